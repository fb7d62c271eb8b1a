//! Kubernetes pods through containerd's CRI plugin: a private containerd (own root, state,
//! socket, CNI bridge network, and the sandbox's network and mount namespaces) with two
//! runtime handlers on the stock runc shim, `runv` and `runc` (the reference), driven by a CRI
//! client over gRPC as a kubelet would. One pod is one VM under runv.

mod engines;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use engines::{IMAGE, RUNV, Sandbox, have, which};
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatus, ContainerStatusRequest,
    CreateContainerRequest, ExecRequest, ExecSyncRequest, ImageSpec, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListContainersRequest, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    PodSandboxState, PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint};

const PAUSE: &str = "localhost/runv-pause:test";
const CNI_SUBNET: &str = "10.88.77.0/24";
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

struct Cri {
    sb: Sandbox,
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
}

fn cri_config(sb: &Sandbox, runc: &Path) -> String {
    let cri = "plugins.\"io.containerd.grpc.v1.cri\"";
    format!(
        "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
         [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
         [debug]\n  address = \"\"\n\
         [{cri}]\n  sandbox_image = \"{PAUSE}\"\n  restrict_oom_score_adj = true\n\
           disable_apparmor = true\n  stream_server_address = \"127.0.0.1\"\n\
           stream_server_port = \"0\"\n\
         [{cri}.containerd]\n  default_runtime_name = \"runc\"\n\
         [{cri}.containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n\
         [{cri}.containerd.runtimes.runc.options]\n  BinaryName = \"{runc}\"\n  Root = \"{runc_root}\"\n\
         [{cri}.containerd.runtimes.runv]\n  runtime_type = \"io.containerd.runc.v2\"\n\
         [{cri}.containerd.runtimes.runv.options]\n  BinaryName = \"{RUNV}\"\n  Root = \"{runv_root}\"\n\
         [{cri}.cni]\n  bin_dir = \"/usr/lib/cni\"\n  conf_dir = \"{cni}\"\n",
        root = sb.path("root").display(),
        state = sb.path("state").display(),
        sock = sb.path("c.sock").display(),
        runc = runc.display(),
        runc_root = sb.path("runc-state").display(),
        runv_root = sb.path("runv-state").display(),
        cni = sb.path("cni").display(),
    )
}

fn cni_config(sb: &Sandbox) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "runvtest",
        "plugins": [{
            "type": "bridge",
            "bridge": "rvcni0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": CNI_SUBNET}]],
                "dataDir": sb.path("cni-ipam"),
            },
        }],
    })
    .to_string()
}

impl Cri {
    fn start() -> Option<Cri> {
        if !have(&[
            "containerd",
            "ctr",
            "containerd-shim-runc-v2",
            "runc",
            "unshare",
            "nsenter",
        ]) {
            return None;
        }
        if !Path::new("/usr/lib/cni/bridge").exists() {
            eprintln!("skipped: no CNI plugins in /usr/lib/cni (containernetworking-plugins)");
            return None;
        }
        let mut sb = Sandbox::new("cri");
        let runc = which("runc").unwrap();
        std::fs::create_dir_all(sb.path("cni")).unwrap();
        std::fs::write(sb.path("cni/10-runvtest.conflist"), cni_config(&sb)).unwrap();
        std::fs::write(sb.path("config.toml"), cri_config(&sb, &runc)).unwrap();
        let mut daemon = sb.cmd("containerd");
        daemon.arg("--config").arg(sb.path("config.toml"));
        sb.spawn_daemon(daemon, "containerd.log");
        let ctr = |args: &[&str]| {
            let mut c = sb.host_cmd("ctr");
            c.arg("-a")
                .arg(sb.path("c.sock"))
                .args(["-n", "k8s.io"])
                .args(args);
            c
        };
        sb.wait_for("containerd to answer", 60, |s| {
            s.run(&mut ctr(&["version"]), 10, None).status.success()
        });
        for (name, cmd) in [(IMAGE, vec!["sh"]), (PAUSE, vec!["sleep", "2147483647"])] {
            let archive = sb.oci_image(name, &cmd);
            sb.ok(
                &mut ctr(&["images", "import", archive.to_str().unwrap()]),
                60,
            );
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let endpoint = Endpoint::from_shared(format!("unix://{}", sb.path("c.sock").display()))
            .unwrap()
            .timeout(CALL_TIMEOUT);
        let channel = rt
            .block_on(endpoint.connect())
            .expect("connecting to containerd's CRI");
        let client = RuntimeServiceClient::new(channel);
        Some(Cri { sb, rt, client })
    }

    /// One CRI call, its error with the containerd log's tail on failure.
    fn call<T, F>(&self, what: &str, f: impl FnOnce(RuntimeServiceClient<Channel>) -> F) -> T
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client.clone();
        match self
            .rt
            .block_on(async { tokio::time::timeout(CALL_TIMEOUT, f(client)).await })
        {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => panic!("{what}: {status}\n{}", self.log_tail()),
            Err(_) => panic!("{what}: no answer in {CALL_TIMEOUT:?}\n{}", self.log_tail()),
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.sb.path("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn run_pod(&self, name: &str, handler: &str) -> (String, PodSandboxConfig) {
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: self.sb.path(&format!("logs/{name}")).display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(pod_namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        std::fs::create_dir_all(&config.log_directory).unwrap();
        let request = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.into(),
        };
        let id = self
            .call("RunPodSandbox", |mut c| async move {
                c.run_pod_sandbox(request).await
            })
            .pod_sandbox_id;
        (id, config)
    }

    /// Creates and starts a container of the pod running `cmd`; its log is `<name>.log`.
    fn container(&self, pod: &(String, PodSandboxConfig), name: &str, cmd: &[&str]) -> String {
        let request = CreateContainerRequest {
            pod_sandbox_id: pod.0.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: IMAGE.into(),
                    ..Default::default()
                }),
                command: cmd.iter().map(|s| s.to_string()).collect(),
                log_path: format!("{name}.log"),
                // What a kubelet sends: the pod's network and IPC, a PID namespace of its own.
                linux: Some(LinuxContainerConfig {
                    security_context: Some(LinuxContainerSecurityContext {
                        namespace_options: Some(pod_namespaces()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: Some(pod.1.clone()),
        };
        let id = self
            .call("CreateContainer", |mut c| async move {
                c.create_container(request).await
            })
            .container_id;
        let start = StartContainerRequest {
            container_id: id.clone(),
        };
        self.call("StartContainer", |mut c| async move {
            c.start_container(start).await
        });
        id
    }

    fn exec(&self, id: &str, cmd: &[&str]) -> (String, String, i32) {
        let request = ExecSyncRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        };
        let r = self.call(
            "ExecSync",
            |mut c| async move { c.exec_sync(request).await },
        );
        (
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
            r.exit_code,
        )
    }

    /// A streaming exec, as `kubectl exec` does it: the CRI `Exec` call gives a URL on
    /// containerd's streaming server, spoken to over WebSocket (`v4.channel.k8s.io`: one byte
    /// of channel, then data; channel 3 carries the final status). The server listens on
    /// 127.0.0.1 of the sandbox's network namespace, so the client runs there.
    fn stream_exec(&self, id: &str, cmd: &[&str]) -> (String, String, i32) {
        let request = ExecRequest {
            container_id: id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            stdout: true,
            stderr: true,
            ..Default::default()
        };
        let url = self
            .call("Exec", |mut c| async move { c.exec(request).await })
            .url;
        let netns = format!("/proc/{}/ns/net", self.sb.holder_pid());
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&netns).unwrap();
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            websocket_exec(&url)
        })
        .join()
        .unwrap()
    }

    fn status(&self, id: &str) -> ContainerStatus {
        let request = ContainerStatusRequest {
            container_id: id.into(),
            verbose: false,
        };
        self.call("ContainerStatus", |mut c| async move {
            c.container_status(request).await
        })
        .status
        .expect("a container status")
    }

    fn wait_exited(&self, id: &str, secs: u64) -> ContainerStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status(id);
            if s.state == ContainerState::ContainerExited as i32 {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "container {id} did not exit within {secs}s: {s:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn pod_status(&self, id: &str) -> (i32, String) {
        let request = PodSandboxStatusRequest {
            pod_sandbox_id: id.into(),
            verbose: false,
        };
        let s = self
            .call("PodSandboxStatus", |mut c| async move {
                c.pod_sandbox_status(request).await
            })
            .status
            .expect("a pod status");
        (s.state, s.network.map(|n| n.ip).unwrap_or_default())
    }

    fn log(&self, pod: &(String, PodSandboxConfig), name: &str) -> String {
        std::fs::read_to_string(Path::new(&pod.1.log_directory).join(format!("{name}.log")))
            .unwrap_or_default()
    }

    fn wait_log(&self, pod: &(String, PodSandboxConfig), name: &str, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.log(pod, name).contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} not in the CRI log of {name}: {:?}",
                self.log(pod, name)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop_container(&self, id: &str, timeout: i64) {
        let request = StopContainerRequest {
            container_id: id.into(),
            timeout,
        };
        self.call("StopContainer", |mut c| async move {
            c.stop_container(request).await
        });
    }

    fn remove_container(&self, id: &str) {
        let request = RemoveContainerRequest {
            container_id: id.into(),
        };
        self.call("RemoveContainer", |mut c| async move {
            c.remove_container(request).await
        });
    }

    fn remove_pod(&self, id: &str) {
        let stop = StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.call("StopPodSandbox", |mut c| async move {
            c.stop_pod_sandbox(stop).await
        });
        let remove = RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        };
        self.call("RemovePodSandbox", |mut c| async move {
            c.remove_pod_sandbox(remove).await
        });
    }

    fn container_count(&self) -> usize {
        let request = ListContainersRequest { filter: None };
        self.call("ListContainers", |mut c| async move {
            c.list_containers(request).await
        })
        .containers
        .len()
    }

    /// Processes (shims aside) whose command line names `dir`: monitors, VMMs.
    fn processes_under(&self, dir: &Path) -> Vec<String> {
        let needle = dir.display().to_string();
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
            .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .filter(|c| c.contains(&needle) && !c.contains("containerd-shim"))
            .collect()
    }

    fn mounts_under(&self, dir: &Path) -> Vec<String> {
        let info = std::fs::read_to_string(format!("/proc/{}/mountinfo", self.sb.holder_pid()))
            .unwrap_or_default();
        let needle = dir.display().to_string();
        info.lines()
            .filter(|l| l.contains(&needle))
            .map(str::to_string)
            .collect()
    }
}

fn websocket_exec(url: &str) -> (String, String, i32) {
    use tungstenite::client::IntoClientRequest;
    let mut request = url
        .replacen("http://", "ws://", 1)
        .into_client_request()
        .unwrap();
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "v4.channel.k8s.io".parse().unwrap(),
    );
    let (mut ws, _) = tungstenite::connect(request).unwrap_or_else(|e| panic!("{url}: {e}"));
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    }
    let (mut out, mut err, mut status) = (Vec::new(), Vec::new(), None);
    loop {
        match ws.read() {
            Ok(tungstenite::Message::Binary(b)) if !b.is_empty() => match b[0] {
                1 => out.extend_from_slice(&b[1..]),
                2 => err.extend_from_slice(&b[1..]),
                3 if b.len() > 1 => {
                    status = Some(serde_json::from_slice::<serde_json::Value>(&b[1..]).unwrap())
                }
                _ => {}
            },
            Ok(tungstenite::Message::Close(_)) => break,
            Ok(_) => {}
            Err(
                tungstenite::Error::ConnectionClosed
                | tungstenite::Error::AlreadyClosed
                | tungstenite::Error::Protocol(
                    tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
                ),
            ) => break,
            Err(e) => panic!("streaming exec {url}: {e}"),
        }
    }
    let status = status.expect("the streaming exec's final status (channel 3)");
    let code = if status["status"] == "Success" {
        0
    } else {
        status["details"]["causes"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["reason"] == "ExitCode"))
            .and_then(|c| c["message"].as_str()?.parse().ok())
            .unwrap_or_else(|| panic!("no exit code in {status}"))
    };
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        code,
    )
}

fn pod_namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn host_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_string()
}

/// The pod checks for one handler; `vm` says whether its pods are VMs.
fn pod_flow(cri: &Cri, handler: &str, vm: bool) {
    let pod_a = cri.run_pod(&format!("{handler}-a"), handler);
    let web = cri.container(
        &pod_a,
        "web",
        &[
            "sh",
            "-c",
            "mkdir -p /tmp/www && echo hello-from-web > /tmp/www/index.html && \
             exec httpd -f -p 8080 -h /tmp/www",
        ],
    );
    let client = cri.container(&pod_a, "client", &["sleep", "3600"]);

    // One VM per pod: both containers see the same kernel, not the host's.
    let boot = |id: &str| cri.exec(id, &["cat", "/proc/sys/kernel/random/boot_id"]).0;
    let (boot_web, boot_client) = (boot(&web), boot(&client));
    assert_eq!(boot_web, boot_client, "{handler}: containers of one pod");
    if vm {
        assert_ne!(
            boot_web.trim(),
            host_boot_id(),
            "{handler}: the pod is a VM"
        );
    } else {
        assert_eq!(
            boot_web.trim(),
            host_boot_id(),
            "{handler}: runc shares the host"
        );
    }

    // The pod's network: localhost between containers, one pod IP for both.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (out, err, code) = cri.exec(&client, &["wget", "-q", "-O-", "http://127.0.0.1:8080/"]);
        if code == 0 {
            assert_eq!(out.trim(), "hello-from-web", "{handler}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{handler}: web not reachable on 127.0.0.1: {err}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let (state, ip) = cri.pod_status(&pod_a.0);
    assert_eq!(state, PodSandboxState::SandboxReady as i32);
    assert!(ip.starts_with("10.88.77."), "{handler}: pod IP {ip:?}");
    for id in [&web, &client] {
        let (addrs, _, _) = cri.exec(id, &["ip", "-4", "addr"]);
        assert!(
            addrs.contains(&format!("inet {ip}/")),
            "{handler}: {id} lacks the pod IP {ip}: {addrs}"
        );
    }

    // Separate PID namespaces: each container's pid 1 is its own command.
    let init = |id: &str| cri.exec(id, &["cat", "/proc/1/cmdline"]).0;
    assert!(
        init(&web).starts_with("httpd"),
        "{handler}: {:?}",
        init(&web)
    );
    assert!(init(&client).starts_with("sleep"), "{handler}");
    let pidns = |id: &str| cri.exec(id, &["readlink", "/proc/self/ns/pid"]).0;
    assert_ne!(pidns(&web), pidns(&client), "{handler}: PID namespaces");

    // ExecSync: output and exit code.
    let (out, err, code) = cri.exec(&client, &["sh", "-c", "echo out; echo err >&2; exit 5"]);
    assert_eq!((out.as_str(), err.as_str(), code), ("out\n", "err\n", 5));
    // The same through the streaming server (kubectl exec).
    let (out, err, code) =
        cri.stream_exec(&client, &["sh", "-c", "echo sout; echo serr >&2; exit 6"]);
    assert_eq!(
        (out.as_str(), err.as_str(), code),
        ("sout\n", "serr\n", 6),
        "{handler}"
    );
    let (out, _, code) = cri.stream_exec(&web, &["cat", "/proc/sys/kernel/random/boot_id"]);
    assert_eq!((out, code), (boot_web.clone(), 0), "{handler}");

    // A container's exit code, and its output in the CRI log.
    let three = cri.container(&pod_a, "three", &["sh", "-c", "echo to-the-log; exit 3"]);
    let s = cri.wait_exited(&three, 60);
    assert_eq!(s.exit_code, 3, "{handler}: {s:?}");
    assert_eq!(s.reason, "Error", "{handler}");
    cri.wait_log(&pod_a, "three", "stdout F to-the-log");

    // StopContainer: SIGTERM reaches a trapping process, which exits on its own.
    let trapper = cri.container(
        &pod_a,
        "trapper",
        &[
            "sh",
            "-c",
            "trap 'echo trapped; exit 0' TERM; echo ready; while :; do sleep 1; done",
        ],
    );
    cri.wait_log(&pod_a, "trapper", "ready");
    cri.stop_container(&trapper, 30);
    let s = cri.wait_exited(&trapper, 30);
    assert_eq!(s.exit_code, 0, "{handler}: trapped TERM, not killed: {s:?}");
    cri.wait_log(&pod_a, "trapper", "trapped");

    // Removing containers leaves the pod running.
    cri.remove_container(&three);
    cri.remove_container(&trapper);
    assert_eq!(
        cri.pod_status(&pod_a.0).0,
        PodSandboxState::SandboxReady as i32
    );
    assert_eq!(cri.exec(&web, &["echo", "still"]).0, "still\n");

    // A second pod: a VM of its own, and the first pod's IP over the CNI bridge.
    let pod_b = cri.run_pod(&format!("{handler}-b"), handler);
    let other = cri.container(&pod_b, "other", &["sleep", "3600"]);
    if vm {
        assert_ne!(boot(&other), boot_web, "{handler}: one VM per pod");
    }
    let url = format!("http://{ip}:8080/");
    let (out, err, code) = cri.exec(&other, &["wget", "-q", "-O-", &url]);
    assert_eq!(
        (out.trim(), code),
        ("hello-from-web", 0),
        "{handler}: {err}"
    );

    for pod in [&pod_a.0, &pod_b.0] {
        cri.remove_pod(pod);
    }
    assert_eq!(cri.container_count(), 0, "{handler}");
}

#[test]
fn pods_through_containerd_cri_runv_and_runc() {
    let Some(cri) = Cri::start() else { return };
    for (handler, vm) in [("runv", true), ("runc", false)] {
        pod_flow(&cri, handler, vm);
    }
    // Nothing of the pods is left: no monitor or VMM, no mount, no state, no pod netns
    // (whose taps and qdiscs went with it).
    let runv_root: PathBuf = cri.sb.path("runv-state");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cri.processes_under(&runv_root).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(cri.processes_under(&runv_root), Vec::<String>::new());
    assert_eq!(cri.mounts_under(&runv_root), Vec::<String>::new());
    // The shim puts runv's root in a directory per containerd namespace.
    let left: Vec<String> = std::fs::read_dir(runv_root.join("k8s.io"))
        .expect("runv's root for the k8s.io namespace")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(
        left,
        Vec::<String>::new(),
        "state dirs left in {runv_root:?}"
    );
    let out = cri
        .sb
        .ok(cri.sb.cmd("ip").args(["netns", "list"]), 10)
        .stdout;
    assert_eq!(out.trim(), "", "pod network namespaces left");
}

/// `cargo xtask bench` (section "pods"): from RunPodSandbox to a container's first line in its
/// CRI log, and for one more container in the running pod, under runv and runc alternately.
/// Prints one `BENCH-PODS <json>` line; `RUNV_BENCH_RUNS` rounds (default 3).
#[test]
#[ignore = "a benchmark: run by cargo xtask bench"]
fn pod_start_bench() {
    let Some(cri) = Cri::start() else {
        println!(
            "BENCH-PODS {}",
            serde_json::json!({"skipped": "no containerd CRI here"})
        );
        return;
    };
    let runs: usize = std::env::var("RUNV_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut samples: std::collections::BTreeMap<&str, (Vec<f64>, Vec<f64>)> = Default::default();
    for round in 0..runs {
        for handler in ["runv", "runc"] {
            let t0 = Instant::now();
            let pod = cri.run_pod(&format!("bench-{handler}-{round}"), handler);
            cri.container(&pod, "first", &["sh", "-c", "echo first; exec sleep 3600"]);
            cri.wait_log(&pod, "first", "stdout F first");
            let pod_ms = t0.elapsed().as_secs_f64() * 1e3;
            let t1 = Instant::now();
            cri.container(
                &pod,
                "second",
                &["sh", "-c", "echo second; exec sleep 3600"],
            );
            cri.wait_log(&pod, "second", "stdout F second");
            let extra_ms = t1.elapsed().as_secs_f64() * 1e3;
            cri.remove_pod(&pod.0);
            let e = samples.entry(handler).or_default();
            e.0.push(pod_ms);
            e.1.push(extra_ms);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut report = serde_json::json!({"runs": runs});
    for (handler, (pod, extra)) in &samples {
        report[*handler] = serde_json::json!({
            "pod_to_first_output_ms": {"median": median(pod), "min": pod.iter().copied().fold(f64::MAX, f64::min), "max": pod.iter().copied().fold(0.0, f64::max)},
            "extra_container_ms": {"median": median(extra), "min": extra.iter().copied().fold(f64::MAX, f64::min), "max": extra.iter().copied().fold(0.0, f64::max)},
        });
    }
    println!("BENCH-PODS {report}");
}
