//! Tests of runv's kvmtool *plumbing* (spawn, terminals, agent channel hand-over and escaping,
//! stop/pause/resume through `lkvm` commands, exit descriptions, pids, stats), run against a
//! FAKE `lkvm`, not kvmtool: kvmtool is not packaged by Debian 12 and cannot boot a guest on a
//! host without vmx/svm. What the fake does is modelled on kvmtool's source (term.c, serial
//! terminals, `--tty`, the control socket in `$HOME/.lkvm`, `lkvm list` output); passing here
//! says nothing about a real kvmtool, which `real_lkvm_boot` covers where it is installed.
//!
//! The fake is a shell script written into a temp dir. It appends its arguments to `argv.log`
//! next to itself and runs this test binary again with `RUNV_FAKE_LKVM=1`, which makes `main`
//! act as lkvm (so this file has its own `main`: `harness = false`). As lkvm, `run`:
//! * prints ` Info: Assigned terminal 1 to pty /dev/pts/N` on stderr and serves that pty as the
//!   "guest": it undoes lkvm's Ctrl-A escaping exactly as kvmtool's `term_getc` does (and, like
//!   kvmtool, "reboots" on an unescaped `Ctrl-A x`), then echoes what it got; `POWEROFF` makes
//!   the guest reboot, which ends the fake like a real guest ends lkvm;
//! * writes a banner to stdout (the console) and serves `stop`, `pause`, `resume` and `list`
//!   on `$HOME/.lkvm/NAME.sock`; while paused it stops echoing;
//! * fails like lkvm (` Fatal: ...`, exit 128) when the kernel parameters say `fake.fail`.

use std::env;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::exit;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use runv_api::{Vm, VmConfig};
use runv_driver_kvmtool::{
    KvmtoolDriver, KvmtoolVm, cpuinfo_has_virt_flag, kvm_problem, lkvm_binary,
};

const FAKE_ENV: &str = "RUNV_FAKE_LKVM";

fn main() {
    if env::var_os(FAKE_ENV).is_some() {
        fake::main();
    }
    let tests: &[(&str, fn())] = &[
        (
            "fake_lifecycle_channel_pause_stop",
            fake_lifecycle_channel_pause_stop,
        ),
        (
            "fake_guest_reboot_ends_the_vm",
            fake_guest_reboot_ends_the_vm,
        ),
        (
            "fake_start_failure_names_the_lkvm_error",
            fake_start_failure_names_the_lkvm_error,
        ),
        ("fake_drop_kills_lkvm", fake_drop_kills_lkvm),
        ("fake_missing_kvmtool_binary", fake_missing_kvmtool_binary),
        ("real_lkvm_boot", real_lkvm_boot),
    ];
    let filters: Vec<String> = env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let list_only = env::args().any(|a| a == "--list");
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, test) in tests {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        if list_only {
            println!("{name}: test");
            continue;
        }
        ran += 1;
        println!("test {name} ...");
        match std::panic::catch_unwind(test) {
            Ok(()) => println!("test {name} ... ok"),
            Err(_) => {
                println!("test {name} ... FAILED");
                failed.push(*name);
            }
        }
    }
    if list_only {
        return;
    }
    println!(
        "\ntest result: {}. {} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        ran - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        println!("failures: {failed:?}");
        exit(101);
    }
}

/// A scratch directory holding the fake lkvm, guest files and the VM state; removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = env::temp_dir().join(format!("runv-kvmtool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("guest")).unwrap();
        let exe = env::current_exe().unwrap();
        let script = format!(
            "#!/bin/sh\n\
             # A fake lkvm for runv's driver tests (not kvmtool): records its arguments, then\n\
             # runs the test binary as lkvm.\n\
             {{ echo '=='; for a in \"$@\"; do printf '%s\\n' \"$a\"; done; }} >> \"$(dirname \"$0\")/argv.log\"\n\
             {FAKE_ENV}=1 exec '{}' \"$@\"\n",
            exe.display()
        );
        let lkvm = dir.join("lkvm");
        fs::write(&lkvm, script).unwrap();
        fs::set_permissions(&lkvm, fs::Permissions::from_mode(0o755)).unwrap();
        // The config names the ELF vmlinux, as runv's default does; the driver must pick vmlinuz.
        fs::write(dir.join("guest/vmlinux"), b"\x7fELF\x02\x01\x01").unwrap();
        fs::write(dir.join("guest/vmlinuz"), b"MZ fake bzImage").unwrap();
        fs::write(dir.join("guest/initrd.img"), b"fake initrd").unwrap();
        Self(dir)
    }

    fn config(&self, name: &str) -> VmConfig {
        let mut config = VmConfig {
            version: runv_api::VM_CONFIG_VERSION,
            name: name.into(),
            vcpus: 1,
            memory_mib: 128,
            kernel: self.0.join("guest/vmlinux"),
            initrd: Some(self.0.join("guest/initrd.img")),
            kernel_params: "quiet".into(),
            state_dir: self.0.join("state"),
            console_log: self.0.join("console.log"),
            log_file: Some(self.0.join("kvmtool.log")),
            ..Default::default()
        };
        config.parameters.insert(
            "kvmtool".into(),
            self.0.join("lkvm").to_string_lossy().into_owned(),
        );
        config
            .parameters
            .insert("start_timeout_ms".into(), "10000".into());
        config
    }

    /// Every recorded lkvm invocation, as its arguments.
    fn invocations(&self) -> Vec<Vec<String>> {
        let text = fs::read_to_string(self.0.join("argv.log")).unwrap_or_default();
        text.split("==\n")
            .filter(|b| !b.is_empty())
            .map(|b| b.lines().map(str::to_string).collect())
            .collect()
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.0.join(name)).unwrap_or_default()
    }

    fn logs(&self) -> String {
        format!(
            "--- kvmtool.log ---\n{}\n--- console.log ---\n{}",
            self.read("kvmtool.log"),
            self.read("console.log")
        )
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn start(scratch: &Scratch, config: &VmConfig) -> KvmtoolVm {
    KvmtoolDriver
        .start(config)
        .unwrap_or_else(|e| panic!("start: {e}\n{}", scratch.logs()))
}

fn value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    args.windows(2)
        .find(|w| w[0] == flag)
        .map(|w| w[1].as_str())
}

/// Reads exactly `n` bytes, or panics after a few seconds.
fn read_exact_timeout(stream: &mut UnixStream, n: usize) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = vec![0u8; n];
    stream.read_exact(&mut buf).expect("reading the echo");
    buf
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn fake_lifecycle_channel_pause_stop() {
    let scratch = Scratch::new("life");
    let vm = start(&scratch, &scratch.config("c1"));
    let pid = vm.pid();

    // The command line lkvm got.
    let runs = scratch.invocations();
    let run = &runs[0];
    assert_eq!(run[0], "run");
    assert_eq!(value(run, "--name"), Some("c1"));
    let vmlinuz = scratch.0.join("guest/vmlinuz");
    assert_eq!(value(run, "-k"), vmlinuz.to_str());
    assert_eq!(value(run, "--console"), Some("serial"));
    assert_eq!(value(run, "--tty"), Some("1"));
    // The whole kernel command line is runv's (`--nodefaults`: no lkvm earlyprintk).
    assert!(run.iter().any(|a| a == "--nodefaults"), "{run:?}");
    let cmdline = value(run, "-p").unwrap_or_default();
    assert!(
        cmdline.starts_with("noapic ")
            && cmdline.ends_with(
                " console=ttyS0 runv.channel=/dev/ttyS1 runv.exit=reboot panic=-1 quiet"
            ),
        "{cmdline}"
    );
    assert!(
        scratch.read("kvmtool.log").contains("is an ELF vmlinux"),
        "the vmlinux -> vmlinuz choice is logged:\n{}",
        scratch.logs()
    );
    wait_for("the console banner", || {
        scratch.read("console.log").contains("fake guest: booted")
    });
    // lkvm's stderr is in the log.
    assert!(
        scratch
            .read("kvmtool.log")
            .contains("Assigned terminal 1 to pty")
    );

    assert_eq!(vm.pids(), vec![pid]);
    let stats = vm.stats().unwrap();
    assert!(stats.host_rss_bytes > 0, "{stats:?}");
    assert_eq!(stats.guest_memory_bytes, 128 << 20);

    // The channel carries every byte value both ways, Ctrl-A included (the driver escapes it
    // for lkvm's terminal; unescaped, "\x01x" would reboot the guest).
    let mut channel = UnixStream::from(vm.take_agent_channel().unwrap());
    assert!(vm.take_agent_channel().is_err(), "handed over once");
    let mut payload: Vec<u8> = b"hello\x01x\x01\x01world".to_vec();
    payload.extend(0u8..=255);
    channel.write_all(&payload).unwrap();
    assert_eq!(read_exact_timeout(&mut channel, payload.len()), payload);

    // Pause: lkvm pause, confirmed by lkvm list; the paused guest does not answer.
    vm.pause().unwrap();
    assert_eq!(vm.listed_state().unwrap(), "paused");
    channel.write_all(b"ping").unwrap();
    channel
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 4];
    assert!(channel.read(&mut buf).is_err(), "no echo while paused");
    vm.resume().unwrap();
    assert_eq!(read_exact_timeout(&mut channel, 4), b"ping");
    let verbs: Vec<(String, Option<String>)> = scratch
        .invocations()
        .iter()
        .map(|a| (a[0].clone(), value(a, "--name").map(str::to_string)))
        .collect();
    assert!(
        verbs.contains(&("pause".into(), Some("c1".into()))),
        "{verbs:?}"
    );
    assert!(
        verbs.contains(&("resume".into(), Some("c1".into()))),
        "{verbs:?}"
    );
    assert!(verbs.iter().any(|(v, _)| v == "list"), "{verbs:?}");

    // Stop: the guest does not stop by itself, so lkvm stop ends it.
    vm.stop(Duration::from_millis(100)).unwrap();
    assert!(
        scratch
            .invocations()
            .iter()
            .any(|a| a[0] == "stop" && value(a, "--name") == Some("c1"))
    );
    let exit = vm.wait().unwrap();
    assert_eq!(
        (exit.code, exit.signal, exit.description.as_str()),
        (0, 0, "stopped by the host (lkvm stop)"),
        "{}",
        scratch.logs()
    );
    assert!(vm.pids().is_empty());
    assert!(vm.stats().is_err());
    assert!(vm.pause().unwrap_err().contains("already exited"));
    // The core sees the end of the channel.
    channel
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    channel.read_to_end(&mut rest).unwrap();
    drop(vm);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

fn fake_guest_reboot_ends_the_vm() {
    let scratch = Scratch::new("reboot");
    let vm = start(&scratch, &scratch.config("c2"));
    let mut channel = UnixStream::from(vm.take_agent_channel().unwrap());
    channel.write_all(b"POWEROFF").unwrap();
    vm.stop(Duration::from_secs(10)).unwrap();
    let exit = vm.wait().unwrap();
    assert_eq!(
        (exit.code, exit.signal, exit.description.as_str()),
        (0, 0, "the guest shut down"),
        "{}",
        scratch.logs()
    );
    assert!(
        !scratch.invocations().iter().any(|a| a[0] == "stop"),
        "no lkvm stop when the guest ends by itself"
    );
}

fn fake_start_failure_names_the_lkvm_error() {
    let scratch = Scratch::new("fail");
    let mut config = scratch.config("c3");
    config.kernel_params = "fake.fail".into();
    let err = KvmtoolDriver
        .start(&config)
        .map(|_| ())
        .expect_err("lkvm failed, so must start");
    assert!(
        err.contains("Fatal: unable to load kernel"),
        "{err}\n{}",
        scratch.logs()
    );
}

fn fake_drop_kills_lkvm() {
    let scratch = Scratch::new("drop");
    let vm = start(&scratch, &scratch.config("c4"));
    let pid = vm.pid();
    drop(vm);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(scratch.read("kvmtool.log").contains("killed by the host"));
}

fn fake_missing_kvmtool_binary() {
    let scratch = Scratch::new("missing");
    let mut config = scratch.config("c5");
    config
        .parameters
        .insert("kvmtool".into(), "/nonexistent/lkvm".into());
    let err = KvmtoolDriver.start(&config).map(|_| ()).unwrap_err();
    assert!(err.contains("/nonexistent/lkvm"), "{err}");
}

/// A real kvmtool boot of runv's guest, where kvmtool and a usable KVM exist.
fn real_lkvm_boot() {
    if lkvm_binary(None).is_err() {
        println!("skipped: no lkvm");
        return;
    }
    let kvm = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm: {e}"));
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    if let Some(problem) = kvm_problem(kvm, cpuinfo_has_virt_flag(&cpuinfo)) {
        println!("skipped: {problem}");
        return;
    }
    let guest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest");
    if !guest.join("vmlinuz").exists() || !guest.join("initrd.img").exists() {
        println!(
            "skipped: no guest image in {} (cargo xtask guest)",
            guest.display()
        );
        return;
    }
    let scratch = Scratch::new("real");
    let mut config = scratch.config("real");
    config.parameters.remove("kvmtool");
    config.kernel = guest.join("vmlinux");
    config.initrd = Some(guest.join("initrd.img"));
    config.memory_mib = 256;
    config
        .parameters
        .insert("start_timeout_ms".into(), "30000".into());
    let vm = start(&scratch, &config);
    let client = runv_proto::client::AgentClient::connect(
        vm.take_agent_channel().unwrap(),
        Duration::from_secs(90),
    )
    .unwrap_or_else(|e| panic!("agent handshake: {e}\n{}", scratch.logs()));
    // Only the agent wrote to its channel: no boot console output came before its hello.
    assert_eq!(client.skipped_bytes(), 0, "{}", scratch.logs());
    let pong = client
        .request(runv_proto::Request::Ping, Duration::from_secs(30))
        .unwrap();
    assert!(
        matches!(pong, runv_proto::ResponseBody::Pong { .. }),
        "{pong:?}"
    );
    vm.pause().unwrap();
    vm.resume().unwrap();
    let _ = client.request(runv_proto::Request::Shutdown, Duration::from_secs(30));
    vm.stop(Duration::from_secs(60)).unwrap();
    let exit = vm.wait().unwrap();
    assert_eq!(
        exit.description.as_str(),
        "the guest shut down",
        "{}",
        scratch.logs()
    );
}

/// The fake lkvm (see the file's docs).
mod fake {
    use super::*;
    use nix::pty::openpty;

    pub fn main() -> ! {
        let args: Vec<String> = env::args().skip(1).collect();
        let home = env::var("HOME").expect("lkvm is run with HOME set");
        let dir = Path::new(&home).join(".lkvm");
        let code = match args.first().map(String::as_str) {
            Some("run") => run(&args, &dir),
            Some(verb @ ("stop" | "pause" | "resume")) => {
                let name = value(&args, "--name").unwrap_or_default();
                control(&dir, name, verb)
            }
            Some("list") => list(&dir),
            _ => {
                eprintln!("  Fatal: fake lkvm: unknown command {args:?}");
                129
            }
        };
        exit(code)
    }

    fn run(args: &[String], dir: &Path) -> i32 {
        let name = value(args, "--name").unwrap_or("guest").to_string();
        let kernel = value(args, "-k").unwrap_or_default().to_string();
        if value(args, "-p").is_some_and(|p| p.contains("fake.fail")) {
            eprintln!("  Fatal: unable to load kernel {kernel}");
            return 128;
        }
        if value(args, "--tty") != Some("1") || value(args, "--console") != Some("serial") {
            eprintln!("  Fatal: fake lkvm expects --console serial --tty 1");
            return 129;
        }
        // lkvm starts its terminal thread only when stdin and stdout are terminals.
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() || !std::io::stdout().is_terminal() {
            eprintln!("  Fatal: fake lkvm: stdin/stdout are not terminals");
            return 129;
        }
        let pty = openpty(None, None).expect("openpty");
        let pts = nix::unistd::ttyname(&pty.slave).expect("ttyname");
        drop(pty.slave); // as kvmtool's term_set_tty does
        eprintln!("  Info: Assigned terminal 1 to pty {}", pts.display());
        fs::create_dir_all(dir).unwrap();
        let listener = UnixListener::bind(dir.join(format!("{name}.sock"))).unwrap();
        println!("  # lkvm run -k {kernel} --name {name} (fake lkvm, not kvmtool)");
        println!("fake guest: booted");
        let _ = std::io::stdout().flush();

        let paused = Arc::new(AtomicBool::new(false));
        let ipc_paused = Arc::clone(&paused);
        std::thread::spawn(move || serve_ipc(listener, ipc_paused));

        let mut master = fs::File::from(pty.master);
        let mut got_escape = false;
        let mut window: Vec<u8> = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            if paused.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            let n = match master.read(&mut buf) {
                Ok(0) => 0,
                Ok(n) => n,
                // EIO while nobody has the slave open: like kvmtool, wait for it.
                Err(_) => 0,
            };
            if n == 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            // Paused while this read was blocked: the guest handles the input on resume.
            while paused.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let mut out = Vec::new();
            for &c in &buf[..n] {
                // kvmtool's term_getc.
                if got_escape {
                    got_escape = false;
                    if c == b'x' {
                        println!("fake guest: Ctrl-A x: reboot");
                        return 0;
                    }
                    if c == 0x01 {
                        out.push(c);
                        continue;
                    }
                }
                if c == 0x01 {
                    got_escape = true;
                    continue;
                }
                out.push(c);
            }
            window.extend_from_slice(&out);
            if window.windows(8).any(|w| w == b"POWEROFF") {
                println!("fake guest: reboot");
                return 0;
            }
            if window.len() > 64 {
                window.drain(..window.len() - 8);
            }
            master.write_all(&out).unwrap();
        }
    }

    fn serve_ipc(listener: UnixListener, paused: Arc<AtomicBool>) {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut line = String::new();
            let _ = BufReader::new(&conn).read_line(&mut line);
            match line.trim() {
                "stop" => {
                    let _ = conn.write_all(b"ok\n");
                    exit(0);
                }
                "pause" => paused.store(true, Ordering::SeqCst),
                "resume" => paused.store(false, Ordering::SeqCst),
                _ => {}
            }
            let state = if paused.load(Ordering::SeqCst) {
                "paused"
            } else {
                "running"
            };
            let _ = writeln!(conn, "{} {state}", std::process::id());
        }
    }

    fn request(sock: &Path, verb: &str) -> Option<String> {
        let mut conn = UnixStream::connect(sock).ok()?;
        writeln!(conn, "{verb}").ok()?;
        let mut reply = String::new();
        BufReader::new(conn).read_line(&mut reply).ok()?;
        Some(reply)
    }

    fn control(dir: &Path, name: &str, verb: &str) -> i32 {
        match request(&dir.join(format!("{name}.sock")), verb) {
            Some(_) => {
                println!("Guest {name} {verb} requested");
                0
            }
            None => {
                eprintln!("  Fatal: Failed locating instance");
                128
            }
        }
    }

    fn list(dir: &Path) -> i32 {
        println!("{:>6} {:<20} STATE", "PID", "NAME");
        println!("------------------------------------");
        for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".sock") else {
                continue;
            };
            if let Some(reply) = request(&entry.path(), "state") {
                let mut f = reply.split_whitespace();
                if let (Some(pid), Some(state)) = (f.next(), f.next()) {
                    println!("{pid:>5} {name:<20} {state}");
                }
            }
        }
        0
    }
}
