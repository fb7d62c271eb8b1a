//! Serving the protocol: containers, processes, stdio, events.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio as PStdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::libc;
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use runv_proto::{
    AgentError, Event, ExitStatus, FrameReader, Message, Mux, PROTOCOL_VERSION, Phases,
    ProcessInfo, Request, ResponseBody, RootfsSource, Stdio,
};

use crate::forker::{Fd3, ForkError, Forker};
use crate::modules::Modules;
use crate::reaper::Reaper;
use crate::spec::{
    CreateConfig, HelperConfig, Mode, Process, Report, Seccomp, Spec, namespaces_to_create,
};

const CONTAINERS: &str = "/run/runv/containers";
const SHARES: &str = "/run/runv/shares";

pub struct Proc {
    pub pid: i32,
    pub master: Option<Arc<File>>,
    pub exited: Arc<AtomicBool>,
}

pub struct Container {
    init: Proc,
    /// The socket to the init, blocked until we write `start`.
    start: Option<(UnixStream, BufReader<UnixStream>)>,
    dir: PathBuf,
    execs: HashMap<String, Proc>,
    /// Container-wide settings every exec'd process gets too.
    seccomp: Option<Seccomp>,
    cgroup: Option<PathBuf>,
}

pub struct Agent {
    pub mux: Arc<Mux>,
    /// The channel the mux writes to, for output spliced into it (`pipe_pump`).
    channel: Arc<File>,
    /// Forks the helpers that make container processes.
    forker: Forker,
    pub modules: Arc<Modules>,
    pub reaper: Reaper,
    containers: Mutex<HashMap<String, Container>>,
    shares: Mutex<std::collections::HashSet<String>>,
    power_off_when_idle: AtomicBool,
    pub reboot_to_exit: bool,
    /// Booted as a template (`runv.template=1`): its clones' hosts connect anew.
    template: bool,
    /// Hellos received from hosts; each after the first comes from a clone's host.
    host_hellos: std::sync::atomic::AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn err(msg: impl Into<String>) -> AgentError {
    AgentError::new(1, msg)
}

impl Agent {
    pub fn new(
        mux: Arc<Mux>,
        channel: File,
        modules: Arc<Modules>,
        reaper: Reaper,
        reboot_to_exit: bool,
        template: bool,
    ) -> Arc<Self> {
        Arc::new(Self {
            mux,
            channel: Arc::new(channel),
            forker: Forker::default(),
            modules,
            reaper,
            containers: Mutex::new(HashMap::new()),
            shares: Mutex::new(Default::default()),
            power_off_when_idle: AtomicBool::new(false),
            reboot_to_exit,
            template,
            host_hellos: Default::default(),
        })
    }

    /// Reads frames until the host goes away.
    pub fn serve(self: &Arc<Self>, channel: File) -> Result<(), String> {
        // See `forker`: in a template, up before the host saves it; elsewhere alongside.
        if self.template {
            self.forker.prestart(&self.reaper, true);
        } else {
            let me = Arc::clone(self);
            let _ = spawn_thread("forker", move || me.forker.prestart(&me.reaper, false));
        }
        // The magic before the Hello lets the host skip anything else that was written to
        // the channel before us (a boot console on a UART).
        self.mux
            .send_agent_hello(format!("runv-agent {}", env!("CARGO_PKG_VERSION")))
            .map_err(|e| format!("send hello: {e}"))?;
        let reopen = channel
            .try_clone()
            .map_err(|e| format!("dup channel: {e}"))?;
        let mut reader = FrameReader::new(channel);
        loop {
            let frame = match reader.read_frame() {
                Ok(Some(f)) => f,
                Ok(None) if self.template => {
                    // A clone wakes up with no host on its port until the clone's host
                    // connects (virtio-serial reads end while no host is connected): wait
                    // for it instead of ending the VM.
                    std::thread::sleep(Duration::from_millis(10));
                    let file = reopen
                        .try_clone()
                        .map_err(|e| format!("dup channel: {e}"))?;
                    reader = FrameReader::new(file);
                    continue;
                }
                Ok(None) => return Err("host closed the channel".into()),
                Err(e) => return Err(format!("reading from the host: {e}")),
            };
            match self.mux.handle_frame(frame) {
                Ok(None) => {}
                Ok(Some(Message::Hello {
                    version,
                    agent_version,
                    window,
                })) => {
                    // How far ahead we may send the host a process's output.
                    self.mux.set_send_window(window);
                    if version != PROTOCOL_VERSION {
                        crate::error!(
                            "host ({agent_version}) speaks protocol {version}, we speak {PROTOCOL_VERSION}"
                        );
                    } else {
                        crate::info!("host connected: {agent_version}");
                    }
                    // The first host answered our boot greeting; a later one is the host of
                    // a clone of this VM, which waits for our greeting before anything else.
                    if self.host_hellos.fetch_add(1, Ordering::SeqCst) > 0 {
                        self.mux
                            .send_agent_hello(format!("runv-agent {}", env!("CARGO_PKG_VERSION")))
                            .map_err(|e| format!("send hello: {e}"))?;
                    }
                }
                Ok(Some(Message::Request { id, body })) => {
                    let me = Arc::clone(self);
                    let shutdown = matches!(body, Request::Shutdown);
                    let spawned = spawn_thread("request", move || {
                        crate::debug!("request {id}: {body:?}");
                        let result = me.handle(body);
                        if let Err(e) = &result {
                            crate::debug!("request {id} failed: {e}");
                        }
                        let _ = me.mux.send_message(&Message::Response { id, result });
                        if shutdown {
                            me.power_off();
                        }
                    });
                    // Out of threads (a fork bomb filled the process table): answer from
                    // here instead of dying, the host can retry.
                    if let Err(e) = spawned {
                        crate::warn!("request {id}: {e}");
                        let _ = self
                            .mux
                            .send_message(&Message::Response { id, result: Err(e) });
                        if shutdown {
                            self.power_off();
                        }
                    }
                }
                Ok(Some(other)) => crate::warn!("unexpected message from host: {other:?}"),
                Err(e) => return Err(format!("bad frame from the host: {e}")),
            }
        }
    }

    fn handle(self: &Arc<Self>, req: Request) -> Result<ResponseBody, AgentError> {
        match req {
            Request::Ping => Ok(ResponseBody::Pong {
                agent_version: env!("CARGO_PKG_VERSION").into(),
            }),
            Request::CreateContainer {
                id,
                spec,
                rootfs,
                stdio,
                hostname,
                hosts,
                resolv_conf,
                pod_sandbox,
            } => {
                let shared = match &pod_sandbox {
                    Some(sandbox) => Some(self.init_pid(sandbox)?),
                    None => None,
                };
                self.create(
                    id,
                    spec,
                    rootfs,
                    stdio,
                    hostname,
                    hosts,
                    resolv_conf,
                    shared,
                )
            }
            Request::StartContainer { id } => self.start(&id),
            Request::Exec {
                container_id,
                exec_id,
                process,
                stdio,
            } => self.exec(&container_id, exec_id, process, stdio),
            Request::Signal {
                container_id,
                exec_id,
                signal,
                all,
            } => self.signal(&container_id, exec_id.as_deref(), signal, all),
            Request::WindowSize {
                container_id,
                exec_id,
                rows,
                cols,
            } => {
                let cs = lock(&self.containers);
                let c = cs
                    .get(&container_id)
                    .ok_or_else(|| no_container(&container_id))?;
                let p = match &exec_id {
                    None => &c.init,
                    Some(e) => c
                        .execs
                        .get(e)
                        .ok_or_else(|| err(format!("no such exec {e}")))?,
                };
                let m = p
                    .master
                    .as_ref()
                    .ok_or_else(|| err("process has no terminal"))?;
                set_winsize(m, rows, cols).map_err(|e| err(format!("set window size: {e}")))?;
                Ok(ResponseBody::Ok)
            }
            Request::Ps { container_id } => {
                let pid = self.init_pid(&container_id)?;
                Ok(ResponseBody::Ps {
                    processes: ps(pid).map_err(|e| err(format!("ps: {e}")))?,
                })
            }
            Request::RemoveContainer { id } => self.remove(&id),
            Request::Freeze {
                container_id,
                frozen,
            } => {
                let cgroup = {
                    let cs = lock(&self.containers);
                    let c = cs
                        .get(&container_id)
                        .ok_or_else(|| no_container(&container_id))?;
                    c.cgroup.clone().ok_or_else(|| {
                        err("the guest has no cgroup for this container to freeze")
                    })?
                };
                crate::guest_cgroup::freeze(&cgroup, frozen).map_err(err)?;
                Ok(ResponseBody::Ok)
            }
            Request::ConfigureNetwork { interfaces, routes } => {
                self.modules.ensure("virtio_net").map_err(err)?;
                crate::net::configure(&interfaces, &routes).map_err(err)?;
                Ok(ResponseBody::Ok)
            }
            Request::SetPowerOffWhenIdle { enabled } => {
                self.power_off_when_idle.store(enabled, Ordering::SeqCst);
                Ok(ResponseBody::Ok)
            }
            // Synced before the answer: the host then ends the VM without waiting for the
            // power-off that follows (which syncs again).
            Request::Shutdown => {
                nix::unistd::sync();
                Ok(ResponseBody::Synced)
            }
            Request::Restored {
                entropy,
                unix_time_ns,
                macs,
            } => {
                crate::restore::make_unique(&entropy.0, unix_time_ns, &macs).map_err(err)?;
                Ok(ResponseBody::Ok)
            }
        }
    }

    fn init_pid(&self, id: &str) -> Result<i32, AgentError> {
        let cs = lock(&self.containers);
        let c = cs.get(id).ok_or_else(|| no_container(id))?;
        if c.init.exited.load(Ordering::SeqCst) {
            return Err(err("container not running"));
        }
        Ok(c.init.pid)
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        self: &Arc<Self>,
        id: String,
        spec: serde_json::Value,
        rootfs: runv_proto::Rootfs,
        stdio: Stdio,
        hostname: Option<String>,
        hosts: Option<String>,
        resolv_conf: Option<String>,
        pod_sandbox_pid: Option<i32>,
    ) -> Result<ResponseBody, AgentError> {
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(err(format!("invalid container id {id:?}")));
        }
        if lock(&self.containers).contains_key(&id) {
            return Err(err(format!("container with id exists: {id}")));
        }
        let mut phases = Phases::start(crate::log::enabled(crate::log::Level::Debug));
        let spec: Spec =
            serde_json::from_value(spec).map_err(|e| err(format!("bad OCI spec: {e}")))?;
        let process = spec
            .process
            .clone()
            .ok_or_else(|| err("spec has no process"))?;
        phases.mark("parse");
        let dir = Path::new(CONTAINERS).join(&id);
        let root = dir.join("rootfs");
        std::fs::create_dir_all(&root)
            .map_err(|e| err(format!("mkdir {}: {e}", root.display())))?;
        let mut security = None;
        let r = (|| {
            self.mount_rootfs(&rootfs, &root)?;
            phases.mark("rootfs");
            self.ensure_mount_sources(&spec.mounts)?;
            let mut files = Vec::new();
            let mut mounts = spec.mounts.clone();
            for (name, content, dst) in [
                ("hosts", &hosts, "/etc/hosts"),
                ("resolv.conf", &resolv_conf, "/etc/resolv.conf"),
                (
                    "hostname",
                    &hostname
                        .as_ref()
                        .or(spec.hostname.as_ref())
                        .map(|h| format!("{h}\n"))
                        // Only where the engine mounts one (its host file is not in the
                        // VM); runc itself never writes /etc/hostname.
                        .filter(|_| spec.mounts.iter().any(|m| m.destination == "/etc/hostname")),
                    "/etc/hostname",
                ),
            ] {
                if let Some(c) = content {
                    let p = dir.join(name);
                    std::fs::write(&p, c)
                        .map_err(|e| err(format!("write {}: {e}", p.display())))?;
                    let file = p.to_string_lossy().into_owned();
                    // The engine's mount of that file, with its options (ro, nosuid, ...),
                    // now from our copy; without one, a plain bind.
                    match mounts.iter_mut().find(|m| m.destination == dst) {
                        Some(m) => m.source = Some(file),
                        None => files.push((file, dst.to_string())),
                    }
                }
            }
            phases.mark("files");
            let linux = spec.linux.clone().unwrap_or_default();
            let cgroup = crate::guest_cgroup::create(&id, linux.resources.as_ref()).map_err(err)?;
            phases.mark("cgroup");
            let join_namespaces = pod_sandbox_pid
                .map(|pid| crate::spec::namespaces_to_join(&linux, pid))
                .unwrap_or_default();
            // A pod member in the sandbox's UTS namespace keeps the pod's hostname.
            let joins_uts = join_namespaces.iter().any(|(k, _)| k == "uts");
            let create = CreateConfig {
                rootfs: root.to_string_lossy().into_owned(),
                readonly: spec.root.as_ref().is_some_and(|r| r.readonly),
                hostname: hostname
                    .clone()
                    .or(spec.hostname.clone())
                    .filter(|_| !joins_uts),
                domainname: spec.domainname.clone(),
                mounts,
                masked_paths: linux.masked_paths.clone(),
                readonly_paths: linux.readonly_paths.clone(),
                files,
                new_namespaces: namespaces_to_create(&linux),
                join_namespaces,
                uid_mappings: linux.uid_mappings.clone(),
                gid_mappings: linux.gid_mappings.clone(),
                devices: linux.devices.clone(),
                sysctl: linux.sysctl.clone(),
                rootfs_propagation: linux.rootfs_propagation.clone(),
            };
            let cfg = HelperConfig {
                mode: Mode::Create(Box::new(create)),
                process,
                wait_start: true,
                seccomp: linux.seccomp.clone(),
                cgroup: cgroup.as_ref().map(|c| c.to_string_lossy().into_owned()),
                timing: phases.enabled(),
            };
            security = Some((linux.seccomp, cgroup));
            self.spawn(cfg, stdio, &mut phases)
        })();
        if phases.enabled() {
            crate::debug!("create {id} phases: {phases}");
        }
        let spawned = match r {
            Ok(s) => s,
            Err(e) => {
                let _ = umount2(&root, MntFlags::MNT_DETACH);
                let _ = std::fs::remove_dir_all(&dir);
                if let Some((_, Some(cg))) = &security {
                    crate::guest_cgroup::remove(cg);
                }
                return Err(e);
            }
        };
        let Some((seccomp, cgroup)) = security else {
            return Err(err(
                "internal: no container settings after the helper started",
            ));
        };
        let pid = spawned.proc_.pid;
        let exited = Arc::clone(&spawned.proc_.exited);
        let master = spawned.proc_.master.clone();
        lock(&self.containers).insert(
            id.clone(),
            Container {
                init: Proc {
                    pid,
                    master,
                    exited,
                },
                start: Some((spawned.sock, spawned.reader)),
                dir,
                execs: HashMap::new(),
                seccomp,
                cgroup,
            },
        );
        let phases = Phases::start(false);
        if let Err(e) = self.watch_exit(id.clone(), None, spawned.exit, spawned.pumps, phases) {
            // Nobody would report its exit: undo the container rather than leave it.
            let _ = self.remove(&id);
            return Err(e);
        }
        Ok(ResponseBody::Process { pid })
    }

    /// Mounts the share `tag` (9p, or virtio-fs) under /run/runv/shares once and returns where: a tag can be
    /// mounted only once, so containers using it get bind mounts of that.
    fn ensure_share(&self, tag: &str) -> Result<PathBuf, AgentError> {
        let share = Path::new(SHARES).join(tag.replace('/', "_"));
        let mut shares = lock(&self.shares);
        if !shares.contains(tag) && crate::modules::has_virtio_fs() {
            // The kvm-native driver shares by virtio-fs (no driver mixes it with 9p).
            self.modules.ensure("virtiofs").map_err(err)?;
            std::fs::create_dir_all(&share)
                .map_err(|e| err(format!("mkdir {}: {e}", share.display())))?;
            mount(
                Some(tag),
                &share,
                Some("virtiofs"),
                MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|e| err(format!("mount virtio-fs share {tag:?}: {e}")))?;
            shares.insert(tag.to_string());
        }
        if !shares.contains(tag) {
            // Xen shares 9p over its own transport (driver-xen's `p9 =`).
            let (transport, trans) = if crate::modules::on_xen() {
                ("9pnet_xen", "trans=xen,version=9p2000.L,msize=262144")
            } else {
                ("9pnet_virtio", "trans=virtio,version=9p2000.L,msize=262144")
            };
            for m in [transport, "9p"] {
                self.modules.ensure(m).map_err(err)?;
            }
            std::fs::create_dir_all(&share)
                .map_err(|e| err(format!("mkdir {}: {e}", share.display())))?;
            mount(Some(tag), &share, Some("9p"), MsFlags::empty(), Some(trans))
                .map_err(|e| err(format!("mount 9p share {tag:?}: {e}")))?;
            shares.insert(tag.to_string());
        }
        Ok(share)
    }

    /// Mounts the shares that the spec's bind mounts come from (the host's volumes, which
    /// runv shares as `/run/runv/shares/<tag>/<n>`).
    fn ensure_mount_sources(&self, mounts: &[crate::spec::Mount]) -> Result<(), AgentError> {
        for m in mounts {
            let Some(rest) = m
                .source
                .as_deref()
                .and_then(|s| s.strip_prefix(SHARES))
                .and_then(|s| s.strip_prefix('/'))
            else {
                continue;
            };
            if let Some((tag, _)) = rest.split_once('/') {
                if !tag.is_empty() && !tag.contains("..") {
                    self.ensure_share(tag)?;
                }
            }
        }
        Ok(())
    }

    fn mount_rootfs(&self, rootfs: &runv_proto::Rootfs, target: &Path) -> Result<(), AgentError> {
        let mut flags = MsFlags::empty();
        if rootfs.readonly {
            flags |= MsFlags::MS_RDONLY;
        }
        match &rootfs.source {
            RootfsSource::Share { tag } => {
                let share = self.ensure_share(tag)?;
                mount(
                    Some(&share),
                    target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| err(format!("bind share {tag:?}: {e}")))?;
                if rootfs.readonly {
                    mount(
                        None::<&str>,
                        target,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
                        None::<&str>,
                    )
                    .map_err(|e| err(format!("make rootfs read-only: {e}")))?;
                }
                Ok(())
            }
            RootfsSource::SharePath { tag, path } => {
                let rel = Path::new(path);
                if path.is_empty()
                    || !rel
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_)))
                {
                    return Err(err(format!("bad path {path:?} in share {tag:?}")));
                }
                let source = self.ensure_share(tag)?.join(rel);
                mount(
                    Some(&source),
                    target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(|e| err(format!("bind {path:?} of share {tag:?}: {e}")))?;
                if rootfs.readonly {
                    mount(
                        None::<&str>,
                        target,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
                        None::<&str>,
                    )
                    .map_err(|e| err(format!("make rootfs read-only: {e}")))?;
                }
                Ok(())
            }
            RootfsSource::Block { serial, fs_type } => {
                self.modules.ensure("virtio_blk").map_err(err)?;
                if fs_type == "ext4" {
                    let _ = self.modules.ensure("crc32c_generic");
                }
                if self.modules.has(fs_type) {
                    self.modules.ensure(fs_type).map_err(err)?;
                }
                let dev = find_block(serial)?;
                mount(
                    Some(&dev),
                    target,
                    Some(fs_type.as_str()),
                    flags,
                    None::<&str>,
                )
                .map_err(|e| {
                    err(format!(
                        "mount {} ({fs_type}, serial {serial}): {e}",
                        dev.display()
                    ))
                })
            }
        }
    }

    fn start(&self, id: &str) -> Result<ResponseBody, AgentError> {
        let (mut sock, mut reader) = {
            let mut cs = lock(&self.containers);
            let c = cs.get_mut(id).ok_or_else(|| no_container(id))?;
            c.start
                .take()
                .ok_or_else(|| err("cannot start a container that has already started"))?
        };
        sock.write_all(b"start\n")
            .map_err(|e| err(format!("start container: {e}")))?;
        wait_exec(&mut reader)?;
        Ok(ResponseBody::Ok)
    }

    fn exec(
        self: &Arc<Self>,
        cid: &str,
        exec_id: String,
        process: serde_json::Value,
        stdio: Stdio,
    ) -> Result<ResponseBody, AgentError> {
        let mut phases = Phases::start(crate::log::enabled(crate::log::Level::Debug));
        let init_pid = self.init_pid(cid)?;
        if lock(&self.containers)
            .get(cid)
            .is_some_and(|c| c.execs.contains_key(&exec_id))
        {
            return Err(err(format!("exec id {exec_id} already in use")));
        }
        let process: Process =
            serde_json::from_value(process).map_err(|e| err(format!("bad OCI process: {e}")))?;
        let (seccomp, cgroup) = {
            let cs = lock(&self.containers);
            let c = cs.get(cid).ok_or_else(|| no_container(cid))?;
            (
                c.seccomp.clone(),
                c.cgroup.as_ref().map(|c| c.to_string_lossy().into_owned()),
            )
        };
        let cfg = HelperConfig {
            mode: Mode::Exec { init_pid },
            process,
            wait_start: false,
            seccomp,
            cgroup,
            timing: phases.enabled(),
        };
        phases.mark("parse");
        let mut spawned = self.spawn(cfg, stdio, &mut phases)?;
        let pid = spawned.proc_.pid;
        let r = wait_exec(&mut spawned.reader);
        phases.mark("exec");
        {
            let mut cs = lock(&self.containers);
            if let Some(c) = cs.get_mut(cid) {
                c.execs.insert(exec_id.clone(), spawned.proc_);
            }
        }
        if let Err(e) = self.watch_exit(
            cid.to_string(),
            Some(exec_id.clone()),
            spawned.exit,
            spawned.pumps,
            phases,
        ) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            if let Some(c) = lock(&self.containers).get_mut(cid) {
                c.execs.remove(&exec_id);
            }
            return Err(e);
        }
        r?;
        Ok(ResponseBody::Process { pid })
    }

    fn signal(
        &self,
        cid: &str,
        exec_id: Option<&str>,
        sig: i32,
        all: bool,
    ) -> Result<ResponseBody, AgentError> {
        let signal = Signal::try_from(sig).map_err(|_| err(format!("invalid signal {sig}")))?;
        let cs = lock(&self.containers);
        let c = cs.get(cid).ok_or_else(|| no_container(cid))?;
        let p = match exec_id {
            None => &c.init,
            Some(e) => c
                .execs
                .get(e)
                .ok_or_else(|| err(format!("no such exec {e}")))?,
        };
        if p.exited.load(Ordering::SeqCst) {
            return Err(err("container not running"));
        }
        if all && exec_id.is_none() {
            let ns = std::fs::read_link(format!("/proc/{}/ns/pid", p.pid)).ok();
            for pid in proc_pids() {
                if pid != p.pid && std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok() == ns {
                    let _ = kill(Pid::from_raw(pid), signal);
                }
            }
        }
        kill(Pid::from_raw(p.pid), signal).map_err(|e| err(format!("kill: {e}")))?;
        Ok(ResponseBody::Ok)
    }

    fn remove(&self, id: &str) -> Result<ResponseBody, AgentError> {
        let (pid, exited, dir, cgroup) = {
            let cs = lock(&self.containers);
            let c = cs.get(id).ok_or_else(|| no_container(id))?;
            (
                c.init.pid,
                Arc::clone(&c.init.exited),
                c.dir.clone(),
                c.cgroup.clone(),
            )
        };
        if !exited.load(Ordering::SeqCst) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            for _ in 0..500 {
                if exited.load(Ordering::SeqCst) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        lock(&self.containers).remove(id);
        let root = dir.join("rootfs");
        let _ = umount2(&root, MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&dir);
        if let Some(cgroup) = &cgroup {
            crate::guest_cgroup::remove(cgroup);
        }
        Ok(ResponseBody::Ok)
    }

    /// Starts a helper for `cfg` with the given stdio and waits until the new process is
    /// ready (set up, executable found) or failed.
    ///
    /// `phases`: `stdio` (pipes made), `helper` (forked and exec'd), `pid` (the helper joined
    /// the namespaces and cloned), `ready` (the process set up its root and found its
    /// executable), `relay` (output pumps started).
    fn spawn(
        &self,
        cfg: HelperConfig,
        stdio: Stdio,
        phases: &mut Phases,
    ) -> Result<Spawned, AgentError> {
        let io = ProcIo::new(
            &stdio,
            cfg.process.console_size.map(|c| (c.height, c.width)),
        )
        .map_err(|e| err(format!("set up stdio: {e}")))?;
        phases.mark("stdio");
        let (sock, child_sock) = UnixStream::pair().map_err(|e| err(format!("socketpair: {e}")))?;
        let helper_pid = self.start_helper(child_sock, io.child)?;
        self.reaper.forget(helper_pid);
        phases.mark("helper");

        let mut w = sock.try_clone().map_err(|e| err(e.to_string()))?;
        let mut reader = BufReader::new(sock.try_clone().map_err(|e| err(e.to_string()))?);
        let mut line = serde_json::to_vec(&cfg).map_err(|e| err(e.to_string()))?;
        line.push(b'\n');
        w.write_all(&line)
            .map_err(|e| err(format!("configure helper: {e}")))?;
        let pid = match read_report(&mut reader)? {
            Some(Report::Pid(p)) => p,
            Some(Report::Error { message, code }) => return Err(AgentError::new(code, message)),
            other => return Err(err(format!("helper said {other:?}, expected a pid"))),
        };
        phases.mark("pid");
        let exit = self.reaper.watch(pid);
        match read_report(&mut reader)? {
            Some(Report::Ready) => {}
            Some(Report::Error { message, code }) => return Err(AgentError::new(code, message)),
            other => return Err(err(format!("process said {other:?} before it was ready"))),
        }
        phases.mark("ready");
        // Each pump holds a sender; the receiver disconnects once every pump has ended.
        let (pumps_tx, pumps) = std::sync::mpsc::channel::<()>();
        let pipes = io.master.is_none();
        let threads = (|| {
            for (stream, src) in io.outputs {
                let mux = Arc::clone(&self.mux);
                let channel = Arc::clone(&self.channel);
                let done = pumps_tx.clone();
                spawn_thread("pump", move || {
                    // A pty master cannot be spliced from.
                    let r = if pipes {
                        crate::pipe_pump::pump(&mux, stream, src, &channel)
                    } else {
                        mux.pump(stream, src)
                    };
                    drop(done);
                    // Logged after the exit may go out: the console is slow under TCG.
                    match r {
                        Ok(stats) => crate::debug!("stream {stream} sent: {stats}"),
                        Err(e) => crate::debug!("stream {stream}: {e}"),
                    }
                })?;
            }
            if let Some((stream, sink)) = io.input {
                self.mux
                    .try_attach_sink(stream, Box::new(sink))
                    .map_err(|e| err(format!("agent cannot start a thread for stdin: {e}")))?;
            }
            Ok(())
        })();
        drop(pumps_tx);
        if let Err(e) = threads {
            // The process runs but its stdio cannot be relayed: end it and say why.
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            return Err(e);
        }
        phases.mark("relay");
        Ok(Spawned {
            proc_: Proc {
                pid,
                master: io.master,
                exited: Arc::new(AtomicBool::new(false)),
            },
            sock,
            reader,
            exit,
            pumps,
        })
    }

    /// A helper with `sock` as its fd 3 and the child's ends of `io` as its stdio: forked by the
    /// forker, or exec'd where there is none.
    /// Our copies of `sock` and `child` are closed on return.
    fn start_helper(&self, sock: UnixStream, child: ChildStdio) -> Result<i32, AgentError> {
        let fds = [
            sock.as_fd(),
            child.stdin.as_fd(),
            child.stdout.as_fd(),
            child.stderr.as_fd(),
        ];
        let why = match self.forker.spawn_helper(&self.reaper, fds) {
            Ok(pid) => return Ok(pid),
            Err(ForkError::Failed(e)) => return Err(err(format!("spawn helper: {e}"))),
            Err(ForkError::Unavailable(why)) => why,
        };
        crate::debug!("{why}; exec'ing a helper");
        let helper = Command::new("/proc/self/exe")
            .arg("__helper")
            .env_clear()
            .stdin(PStdio::from(child.stdin))
            .stdout(PStdio::from(child.stdout))
            .stderr(PStdio::from(child.stderr))
            .fd3(sock.as_raw_fd())
            .spawn()
            .map_err(|e| err(format!("spawn helper: {e}")))?;
        Ok(helper.id() as i32)
    }

    fn watch_exit(
        self: &Arc<Self>,
        cid: String,
        exec_id: Option<String>,
        exit: std::sync::mpsc::Receiver<ExitStatus>,
        pumps: std::sync::mpsc::Receiver<()>,
        mut phases: Phases,
    ) -> Result<(), AgentError> {
        let me = Arc::clone(self);
        spawn_thread("exit", move || {
            phases.mark("registered");
            let Ok(status) = exit.recv() else { return };
            phases.mark("run");
            {
                let cs = lock(&me.containers);
                if let Some(c) = cs.get(&cid) {
                    let p = match &exec_id {
                        None => Some(&c.init),
                        Some(e) => c.execs.get(e),
                    };
                    if let Some(p) = p {
                        p.exited.store(true, Ordering::SeqCst);
                    }
                }
            }
            // Deliver the output before the exit event where that is quick: an init's pid
            // namespace dies with it, so its streams end once drained. But never hold the
            // exit for long: a host reader that stalls (flow control) or an exec'd process's
            // child holding its streams would keep the container "running" (it was up to an
            // hour for an init). Past the grace the pumps carry on and the host takes what
            // comes before it stops the VM.
            let deadline = std::time::Instant::now() + OUTPUT_GRACE;
            while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
                // Disconnected: every pump has ended.
                if let Err(std::sync::mpsc::RecvTimeoutError::Disconnected) =
                    pumps.recv_timeout(left)
                {
                    break;
                }
            }
            phases.mark("output");
            let _ = me.mux.send_message(&Message::Event {
                event: Event::ProcessExited {
                    container_id: cid.clone(),
                    exec_id: exec_id.clone(),
                    status,
                },
            });
            phases.mark("event");
            // After the event: the console is slow under TCG.
            crate::debug!("{cid}/{exec_id:?} exited: {status:?}");
            if phases.enabled() {
                crate::debug!("exec {cid}/{exec_id:?} phases: {phases}");
            }
            if exec_id.is_none() && me.power_off_when_idle.load(Ordering::SeqCst) {
                let idle = lock(&me.containers)
                    .values()
                    .all(|c| c.init.exited.load(Ordering::SeqCst));
                if idle {
                    me.power_off();
                }
            }
        })
        .map(drop)
    }

    pub fn power_off(&self) {
        std::thread::sleep(Duration::from_millis(50));
        crate::power::power_off(self.reboot_to_exit);
    }
}

struct Spawned {
    proc_: Proc,
    sock: UnixStream,
    reader: BufReader<UnixStream>,
    exit: std::sync::mpsc::Receiver<ExitStatus>,
    /// Disconnects when every output pump has ended.
    pumps: std::sync::mpsc::Receiver<()>,
}

/// Starts a thread without panicking when the guest is out of threads or memory (a fork bomb
/// in a container): EAGAIN is retried for a moment, since such processes come and go, then
/// reported as an error the request answers with.
fn spawn_thread<F>(name: &str, f: F) -> Result<JoinHandle<()>, AgentError>
where
    F: FnOnce() + Send + 'static,
{
    // A failed spawn drops its closure: keep `f` outside so the next attempt can take it.
    let slot = Arc::new(Mutex::new(Some(f)));
    let mut last = None;
    for attempt in 0..SPAWN_ATTEMPTS {
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        let s = Arc::clone(&slot);
        match std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                if let Some(f) = lock(&s).take() {
                    f()
                }
            }) {
            Ok(h) => return Ok(h),
            Err(e) => last = Some(e),
        }
    }
    Err(err(format!(
        "agent cannot start a {name} thread (the guest is out of processes or memory): {}",
        last.map_or_else(|| "unknown".to_string(), |e| e.to_string())
    )))
}

/// About one second of retries for a thread.
const SPAWN_ATTEMPTS: u32 = 50;

/// How long an exit waits for the process's output to be delivered before it is reported.
const OUTPUT_GRACE: Duration = Duration::from_secs(5);

fn no_container(id: &str) -> AgentError {
    err(format!("container does not exist: {id}"))
}

fn read_report(r: &mut BufReader<UnixStream>) -> Result<Option<Report>, AgentError> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => Ok(None),
        Ok(_) => serde_json::from_str(&line)
            .map(Some)
            .map_err(|e| err(format!("bad report {line:?}: {e}"))),
        Err(e) => Err(err(format!("read from helper: {e}"))),
    }
}

/// After `start` (or for an exec): EOF means exec succeeded, an error line that it failed.
fn wait_exec(r: &mut BufReader<UnixStream>) -> Result<(), AgentError> {
    match read_report(r)? {
        None => Ok(()),
        Some(Report::Error { message, code }) => Err(AgentError::new(code, message)),
        Some(other) => Err(err(format!("unexpected report {other:?}"))),
    }
}

/// The ends of a process's standard streams that the process gets.
struct ChildStdio {
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
}

/// A process's standard streams: the child's ends and ours.
struct ProcIo {
    child: ChildStdio,
    outputs: Vec<(u32, File)>,
    input: Option<(u32, File)>,
    master: Option<Arc<File>>,
}

impl ProcIo {
    fn new(stdio: &Stdio, size: Option<(u16, u16)>) -> std::io::Result<Self> {
        let null = || File::options().read(true).write(true).open("/dev/null");
        if stdio.terminal {
            let (master, slave) = open_pty()?;
            if let Some((rows, cols)) = size {
                set_winsize(&master, rows, cols)?;
            }
            let input = match stdio.stdin {
                Some(s) => Some((s, master.try_clone()?)),
                None => None,
            };
            let out = master.try_clone()?;
            return Ok(Self {
                child: ChildStdio {
                    stdin: OwnedFd::from(slave.try_clone()?),
                    stdout: OwnedFd::from(slave.try_clone()?),
                    stderr: OwnedFd::from(slave),
                },
                outputs: vec![(stdio.stdout, out)],
                input,
                master: Some(Arc::new(master)),
            });
        }
        let mut outputs = Vec::new();
        let (child_stdin, input) = match stdio.stdin {
            Some(s) => {
                let (r, w) = pipe()?;
                (OwnedFd::from(r), Some((s, w)))
            }
            None => (OwnedFd::from(null()?), None),
        };
        let (r, w) = pipe()?;
        crate::pipe_pump::enlarge(&r);
        outputs.push((stdio.stdout, r));
        let child_stdout = OwnedFd::from(w);
        let child_stderr = match stdio.stderr {
            Some(s) => {
                let (r, w) = pipe()?;
                crate::pipe_pump::enlarge(&r);
                outputs.push((s, r));
                OwnedFd::from(w)
            }
            None => OwnedFd::from(null()?),
        };
        Ok(Self {
            child: ChildStdio {
                stdin: child_stdin,
                stdout: child_stdout,
                stderr: child_stderr,
            },
            outputs,
            input,
            master: None,
        })
    }
}

fn pipe() -> std::io::Result<(File, File)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
    Ok((File::from(r), File::from(w)))
}

fn open_pty() -> std::io::Result<(File, File)> {
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let m = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&m)?;
    unlockpt(&m)?;
    let name = ptsname_r(&m)?;
    let slave = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&name)?;
    // SAFETY: into_raw_fd hands over sole ownership of the master fd.
    let master = unsafe {
        <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(m))
    };
    Ok((File::from(master), slave))
}

use std::os::unix::fs::OpenOptionsExt;

fn set_winsize(master: &File, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a `winsize` that lives for the duration of the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The serial a hypervisor that cannot set serials gave the disk the host calls `id`, from
/// `runv.disk.<id>=<serial>` on the kernel command line (kvmtool).
fn serial_alias(cmdline: &str, id: &str) -> Option<String> {
    cmdline.split_whitespace().find_map(|w| {
        let (name, serial) = w.strip_prefix("runv.disk.")?.split_once('=')?;
        (name == id && !serial.is_empty()).then(|| serial.to_string())
    })
}

fn find_block(serial: &str) -> Result<PathBuf, AgentError> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let alias = serial_alias(&cmdline, serial);
    for _ in 0..500 {
        if let Ok(dir) = std::fs::read_dir("/sys/block") {
            for d in dir.flatten() {
                let name = d.file_name().to_string_lossy().into_owned();
                if !name.starts_with("vd") {
                    continue;
                }
                // A size of 0 is a template's empty disk slot whose clone's disk the kernel
                // has not sized yet (the configuration-change interrupt is being handled).
                let sized =
                    std::fs::read_to_string(d.path().join("size")).is_ok_and(|s| s.trim() != "0");
                if sized
                    && std::fs::read_to_string(d.path().join("serial"))
                        .is_ok_and(|s| s.trim() == serial || alias.as_deref() == Some(s.trim()))
                {
                    let dev = PathBuf::from("/dev").join(&name);
                    if dev.exists() {
                        return Ok(dev);
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    match alias {
        Some(alias) => Err(err(format!(
            "no virtio-blk disk with serial {serial:?} or {alias:?}"
        ))),
        None => Err(err(format!("no virtio-blk disk with serial {serial:?}"))),
    }
}

fn proc_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Processes in the pid namespace of `init`, with pids as the container sees them.
fn ps(init: i32) -> std::io::Result<Vec<ProcessInfo>> {
    let ns = std::fs::read_link(format!("/proc/{init}/ns/pid"))?;
    let mut raw = Vec::new();
    let mut to_ns = HashMap::new();
    for pid in proc_pids() {
        if std::fs::read_link(format!("/proc/{pid}/ns/pid"))
            .ok()
            .as_ref()
            != Some(&ns)
        {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let nspid: i32 = field("NSpid:")
            .split_whitespace()
            .last()
            .and_then(|s| s.parse().ok())
            .unwrap_or(pid);
        to_ns.insert(pid, nspid);
        let ppid: i32 = field("PPid:").parse().unwrap_or(0);
        let uid: u32 = field("Uid:")
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let state = field("State:").chars().next().unwrap_or('?').to_string();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let mut args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        if args.is_empty() {
            args.push(format!("[{}]", field("Name:")));
        }
        raw.push((nspid, ppid, uid, state, args));
    }
    Ok(raw
        .into_iter()
        .map(|(pid, ppid, uid, state, args)| ProcessInfo {
            pid,
            ppid: to_ns.get(&ppid).copied().unwrap_or(0),
            uid,
            state,
            args,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::serial_alias;

    #[test]
    fn serial_aliases_from_the_kernel_command_line() {
        let cmdline = "console=ttyS0 runv.disk.rootfs=565027412 runv.disk.data= runv.exit=reboot";
        assert_eq!(
            serial_alias(cmdline, "rootfs").as_deref(),
            Some("565027412")
        );
        assert_eq!(serial_alias(cmdline, "data"), None);
        assert_eq!(serial_alias(cmdline, "root"), None);
        assert_eq!(serial_alias("", "rootfs"), None);
    }
}
