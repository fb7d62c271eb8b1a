//! `cargo xtask soak --cycles N [--faults] [--seed S] [--no-build] [--keep-going]`: N container
//! lifecycles (create, start, exec, kill, delete) on real VMs. With `--faults`, each cycle also
//! does one random bad thing at a random phase: SIGKILL or SIGSTOP of the monitor, the VMM or
//! the CLI, concurrent operations on one id, a damaged `state.json`. After every cycle it checks
//! that nothing leaked (processes, mounts, taps, loop devices, state dirs, the soak's own fds)
//! and along the way that `runv state` told the truth; at the end it prints the counts and
//! fails if any leak, lie or unexpected error was seen.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::workspace_root;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// how many lifecycles
    #[arg(long, value_name = "N", default_value_t = 10)]
    cycles: u64,
    /// random SIGKILL/SIGSTOP of monitor, VMM and CLI, racing operations, damaged state
    #[arg(long)]
    faults: bool,
    /// the random seed (printed by every run, to repeat one; default: from the clock)
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// use the debug build as it is
    #[arg(long)]
    no_build: bool,
    /// go on after a cycle with a problem
    #[arg(long)]
    keep_going: bool,
}

/// The seed: the one given (0 is xorshift's fixed point, so at least 1), else the clock.
fn seed(given: Option<u64>) -> u64 {
    given.map(|s| s.max(1)).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1
    })
}

/// xorshift64*: reproducible from the printed seed, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    None,
    KillMonitor,
    KillVmm,
    StopMonitor,
    StopVmm,
    KillCliDuringCreate,
    ConcurrentOps,
    ConcurrentCreates,
    DamagedState,
}

const FAULTS: &[Fault] = &[
    Fault::KillMonitor,
    Fault::KillVmm,
    Fault::StopMonitor,
    Fault::StopVmm,
    Fault::KillCliDuringCreate,
    Fault::ConcurrentOps,
    Fault::ConcurrentCreates,
    Fault::DamagedState,
];

struct Out {
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
    fn line(&self) -> String {
        let s = match self.status {
            Some(s) => s.to_string(),
            None => "timed out".into(),
        };
        format!("{s}: {}", self.stderr.trim())
    }
}

struct Soak {
    runv: PathBuf,
    dir: PathBuf,
    root: PathBuf,
    bundle: PathBuf,
    seq: u64,
    /// Problems of this cycle, by kind ("leak: ...", "lie: ...", "error: ...").
    problems: Vec<String>,
}

impl Soak {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.runv);
        // Cold starts: a background template build would outlive its cycle and be counted
        // as a leak.
        c.env("RUNV_AGENT_TIMEOUT", "120")
            .env("RUNV_TEMPLATE", "off")
            .arg("--root")
            .arg(&self.root)
            .args(args);
        c
    }

    /// Starts a runv command whose output goes to files (a monitor inherits them and may
    /// outlive the command: pipes would keep us waiting).
    fn spawn(&mut self, args: &[&str]) -> anyhow::Result<(Child, PathBuf, PathBuf)> {
        self.seq += 1;
        let o = self.dir.join(format!("out-{}", self.seq % 64));
        let e = self.dir.join(format!("err-{}", self.seq % 64));
        let child = self
            .cmd(args)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&o)?)
            .stderr(fs::File::create(&e)?)
            .spawn()
            .with_context(|| format!("spawning runv {args:?}"))?;
        Ok((child, o, e))
    }

    fn wait(child: &mut Child, o: &Path, e: &Path, timeout: Duration) -> Out {
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        Out {
            status,
            stdout: fs::read_to_string(o).unwrap_or_default(),
            stderr: fs::read_to_string(e).unwrap_or_default(),
        }
    }

    fn run(&mut self, args: &[&str], secs: u64) -> anyhow::Result<Out> {
        let (mut c, o, e) = self.spawn(args)?;
        Ok(Self::wait(&mut c, &o, &e, Duration::from_secs(secs)))
    }

    fn problem(&mut self, p: String) {
        eprintln!("  {p}");
        self.problems.push(p);
    }

    /// Runs a command that must succeed; records an error otherwise.
    fn must(&mut self, args: &[&str], secs: u64) -> anyhow::Result<Out> {
        let out = self.run(args, secs)?;
        if !out.ok() {
            self.problem(format!("error: runv {} -> {}", args.join(" "), out.line()));
        }
        Ok(out)
    }

    /// `runv state`'s status, or None with the error line.
    fn status(&mut self, id: &str) -> anyhow::Result<Result<String, String>> {
        let out = self.run(&["state", id], 30)?;
        if !out.ok() {
            return Ok(Err(out.line()));
        }
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
        Ok(Ok(v["status"].as_str().unwrap_or("?").to_string()))
    }

    /// Waits until `state` says `want`; a different final answer is a lie.
    fn expect_status(&mut self, id: &str, want: &str, secs: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.status(id)?;
            if got.as_deref() == Ok(want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.problem(format!("lie: state {id} says {got:?}, expected {want}"));
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn monitor_pid(&mut self, id: &str) -> anyhow::Result<Option<i32>> {
        let out = self.run(&["state", id], 30)?;
        let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap_or_default();
        Ok(v["pid"].as_i64().filter(|p| *p > 0).map(|p| p as i32))
    }

    /// The VMM processes of container `id` (their command line names its state dir).
    fn vmm_pids(&self, id: &str) -> Vec<i32> {
        let needle = self.root.join(id).to_string_lossy().into_owned();
        procs_with(&needle)
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("qemu-system"))
            .map(|(p, _)| p)
            .collect()
    }
}

/// Processes (not us) whose command line contains `needle`.
fn procs_with(needle: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|p| *p != me)
                .filter_map(|p| {
                    let c = fs::read(format!("/proc/{p}/cmdline")).ok()?;
                    let c = String::from_utf8_lossy(&c).replace('\0', " ");
                    c.contains(needle).then_some((p, c))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn signal(pid: i32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn fd_count() -> usize {
    fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn taps() -> usize {
    fs::read_dir("/sys/class/net")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("tap"))
                .count()
        })
        .unwrap_or(0)
}

/// Loop devices backed by a file under `dir`.
fn loops_under(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    fs::read_dir("/sys/block")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| {
                    let f = fs::read_to_string(e.path().join("loop/backing_file")).ok()?;
                    f.contains(&needle)
                        .then(|| e.file_name().to_string_lossy().into_owned())
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let seed = seed(a.seed);
    let ws = workspace_root()?;
    if !a.no_build {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&ws)
            .args([
                "build",
                "-p",
                "runv-cli",
                "-p",
                "driver-qemu",
                "-p",
                "storage-overlay",
            ])
            .status()
            .context("running cargo build")?;
        if !status.success() {
            bail!("build failed ({status})");
        }
    }
    let runv = ws.join("target/debug/runv");
    for p in [&runv, &ws.join("target/guest/initrd.img")] {
        if !p.exists() {
            bail!(
                "{} missing: run `cargo build --workspace` and `cargo xtask guest`",
                p.display()
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("runv-soak-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    // Root's alone, like runv's own state (the logs of failed creates are kept in it).
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let bundle = dir.join("bundle");
    if let Err(e) = make_bundle(&runv, &bundle) {
        let _ = fs::remove_dir_all(&dir);
        return Err(e);
    }
    let mut s = Soak {
        runv,
        root: dir.join("state"),
        dir: dir.clone(),
        bundle,
        seq: 0,
        problems: Vec::new(),
    };
    let mut rng = Rng(seed);
    println!(
        "soak: {} cycles{}, seed {} (--seed {} repeats it), in {}",
        a.cycles,
        if a.faults { " with faults" } else { "" },
        seed,
        seed,
        dir.display()
    );
    let base_fds = fd_count();
    let base_taps = taps();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    let mut faults: BTreeMap<String, u64> = BTreeMap::new();
    let started = Instant::now();
    let r = (|| -> anyhow::Result<()> {
        for n in 0..a.cycles {
            let fault = if a.faults {
                FAULTS[rng.below(FAULTS.len() as u64) as usize]
            } else {
                Fault::None
            };
            *faults.entry(format!("{fault:?}")).or_default() += 1;
            let id = format!("soak{n}");
            let overlay = rng.below(2) == 0;
            cycle(&mut s, &mut rng, &id, fault, overlay)?;
            // Whatever happened, the id must be gone and nothing left behind.
            let _ = s.run(&["delete", "--force", &id], 60)?;
            check_leaks(&mut s, &id, base_fds, base_taps);
            let problems = std::mem::take(&mut s.problems);
            for p in &problems {
                let kind = p.split(':').next().unwrap_or("error").to_string();
                *counts.entry(kind).or_default() += 1;
            }
            println!(
                "cycle {n}: {fault:?}{} {}",
                if overlay { " overlay" } else { "" },
                if problems.is_empty() {
                    "ok".to_string()
                } else {
                    format!("{} problem(s)", problems.len())
                }
            );
            if !problems.is_empty() && !a.keep_going {
                bail!("stopping at the first failing cycle (--keep-going goes on)");
            }
        }
        Ok(())
    })();
    // Clean up whatever a failure left, then report.
    for id in fs::read_dir(&s.root)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
    {
        if id != ".failed" {
            let _ = s.run(&["delete", "--force", &id], 60);
        }
    }
    for (pid, _) in procs_with(&dir.to_string_lossy()) {
        signal(pid, "KILL");
    }
    // Keep the logs of failed creates (`state/.failed`) when something went wrong.
    let failed = r.is_err() || counts.values().sum::<u64>() > 0;
    if failed {
        println!("soak: kept {} for its logs", dir.display());
    } else {
        let _ = fs::remove_dir_all(&dir);
    }
    let mins = started.elapsed().as_secs_f64() / 60.0;
    println!("soak: {:.1} min, faults {faults:?}", mins);
    let total = |k: &str| counts.get(k).copied().unwrap_or(0);
    println!(
        "soak: leaks {}, state lies {}, errors {}",
        total("leak"),
        total("lie"),
        total("error")
    );
    r?;
    if counts.values().sum::<u64>() > 0 {
        bail!("the soak found problems (see above)");
    }
    Ok(())
}

fn make_bundle(runv: &Path, bundle: &Path) -> anyhow::Result<()> {
    let rootfs = bundle.join("rootfs");
    for d in ["bin", "proc", "sys", "dev", "etc", "tmp", "root"] {
        fs::create_dir_all(rootfs.join(d))?;
    }
    fs::copy("/bin/busybox", rootfs.join("bin/busybox"))
        .context("busybox-static is needed: /bin/busybox")?;
    for applet in ["sh", "sleep", "echo", "true", "cat"] {
        let link = rootfs.join("bin").join(applet);
        std::os::unix::fs::symlink("busybox", &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    let st = Command::new(runv)
        .args(["spec", "--bundle"])
        .arg(bundle)
        .status()
        .with_context(|| format!("running {} spec", runv.display()))?;
    if !st.success() {
        bail!("runv spec failed ({st})");
    }
    let path = bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(
        &fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    spec["process"]["terminal"] = false.into();
    spec["root"]["readonly"] = false.into();
    spec["process"]["args"] = serde_json::json!(["sleep", "100000"]);
    fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
    Ok(())
}

fn create_args<'a>(s: &'a Soak, id: &'a str, overlay: bool, pid_file: &'a str) -> Vec<String> {
    let mut v = Vec::new();
    if overlay {
        v.extend(["--storage".to_string(), "overlay".to_string()]);
    }
    v.extend([
        "create".to_string(),
        "--bundle".to_string(),
        s.bundle.to_string_lossy().into_owned(),
        "--pid-file".to_string(),
        pid_file.to_string(),
        id.to_string(),
    ]);
    v
}

fn cycle(s: &mut Soak, rng: &mut Rng, id: &str, fault: Fault, overlay: bool) -> anyhow::Result<()> {
    let pid_file = s.dir.join("pid").to_string_lossy().into_owned();
    let _ = fs::remove_file(&pid_file);
    let args = create_args(s, id, overlay, &pid_file);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    match fault {
        Fault::KillCliDuringCreate => {
            let (mut c, o, e) = s.spawn(&args)?;
            std::thread::sleep(Duration::from_millis(rng.below(4000)));
            let _ = c.kill();
            let _ = Soak::wait(&mut c, &o, &e, Duration::from_secs(10));
            // What is left is up to chance; delete --force must clean all of it.
            let out = s.run(&["delete", "--force", id], 60)?;
            if !out.ok() {
                s.problem(format!(
                    "error: delete --force after a killed create: {}",
                    out.line()
                ));
            }
            if let Ok(st) = s.status(id)? {
                s.problem(format!("lie: {id} still reads {st} after delete --force"));
            }
            return Ok(());
        }
        Fault::ConcurrentCreates => {
            let mut kids = Vec::new();
            for i in 0..3 {
                let pf = format!("{pid_file}{i}");
                let a = create_args(s, id, overlay, &pf);
                let a: Vec<&str> = a.iter().map(String::as_str).collect();
                kids.push(s.spawn(&a)?);
            }
            let outs: Vec<Out> = kids
                .iter_mut()
                .map(|(c, o, e)| Soak::wait(c, o, e, Duration::from_secs(180)))
                .collect();
            let ok = outs.iter().filter(|o| o.ok()).count();
            if ok != 1 {
                let lines: Vec<String> = outs.iter().map(Out::line).collect();
                s.problem(format!(
                    "error: {ok} of 3 racing creates succeeded: {lines:?}"
                ));
            }
            if ok >= 1 {
                s.expect_status(id, "created", 10)?;
            }
            return Ok(());
        }
        _ => {}
    }

    let out = s.must(&args, 180)?;
    if !out.ok() {
        return Ok(());
    }
    s.expect_status(id, "created", 10)?;
    let monitor = s.monitor_pid(id)?;
    let from_file = fs::read_to_string(&pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok());
    if monitor.is_none() || monitor != from_file {
        s.problem(format!(
            "lie: state pid {monitor:?} is not the --pid-file's {from_file:?}"
        ));
    }
    // The fault's phase: 0 after create, 1 after start, 2 after exec.
    let phase = rng.below(3);
    let mut faulted = false;
    for step in 0..3 {
        if step == phase && fault != Fault::None {
            faulted = true;
            inject(s, id, fault, monitor)?;
            break;
        }
        match step {
            0 => {
                s.must(&["start", id], 60)?;
                s.expect_status(id, "running", 10)?;
            }
            1 => {
                let out = s.must(&["exec", id, "echo", "ok"], 120)?;
                if out.ok() && out.stdout != "ok\n" {
                    s.problem(format!("error: exec printed {:?}", out.stdout));
                }
            }
            _ => {}
        }
    }
    if !faulted {
        s.must(&["kill", id, "KILL"], 30)?;
        s.expect_status(id, "stopped", 60)?;
        s.must(&["delete", id], 60)?;
    }
    Ok(())
}

/// Does `fault` to a created or running container, then checks what runv says and that it
/// cleans up.
fn inject(s: &mut Soak, id: &str, fault: Fault, monitor: Option<i32>) -> anyhow::Result<()> {
    match fault {
        Fault::KillMonitor => {
            if let Some(m) = monitor {
                signal(m, "KILL");
            }
            s.expect_status(id, "stopped", 30)?;
            s.must(&["delete", id], 60)?;
        }
        Fault::KillVmm => {
            for p in s.vmm_pids(id) {
                signal(p, "KILL");
            }
            s.expect_status(id, "stopped", 60)?;
            s.must(&["delete", id], 60)?;
        }
        Fault::StopMonitor | Fault::StopVmm => {
            let pids = if fault == Fault::StopMonitor {
                monitor.into_iter().collect()
            } else {
                s.vmm_pids(id)
            };
            for p in &pids {
                signal(*p, "STOP");
            }
            // A stopped process is alive: the container is not stopped, and force delete
            // must still end it.
            if let Ok(st) = s.status(id)? {
                if st == "stopped" {
                    s.problem(format!("lie: {id} reads stopped while its processes live"));
                }
            }
            s.must(&["delete", "--force", id], 60)?;
        }
        Fault::ConcurrentOps => {
            let mut kids = Vec::new();
            for a in [
                vec!["delete", "--force", id],
                vec!["kill", id, "KILL"],
                vec!["delete", "--force", id],
                vec!["state", id],
                vec!["delete", "--force", id],
            ] {
                kids.push((a[0] == "delete", s.spawn(&a)?));
            }
            for (is_delete, (c, o, e)) in &mut kids {
                let out = Soak::wait(c, o, e, Duration::from_secs(120));
                if *is_delete && !out.ok() {
                    s.problem(format!("error: concurrent delete --force: {}", out.line()));
                }
            }
            if let Ok(st) = s.status(id)? {
                s.problem(format!("lie: {id} still reads {st} after delete --force"));
            }
        }
        Fault::DamagedState => {
            let state = s.root.join(id).join("state.json");
            let _ = fs::write(&state, b"{\"ociVersion\": \"1.0.2\", \"id\": ");
            match s.status(id)? {
                Ok(st) => s.problem(format!("lie: a damaged state.json reads {st}")),
                Err(line) if !line.contains("damaged") => {
                    s.problem(format!("error: damaged state not named: {line}"))
                }
                Err(_) => {}
            }
            s.must(&["delete", "--force", id], 60)?;
        }
        Fault::None | Fault::KillCliDuringCreate | Fault::ConcurrentCreates => {}
    }
    Ok(())
}

fn check_leaks(s: &mut Soak, id: &str, base_fds: usize, base_taps: usize) {
    match s.status(id) {
        Ok(Ok(st)) => s.problem(format!("lie: {id} reads {st} after delete --force")),
        Ok(Err(_)) => {}
        // Not a pass: the check did not run.
        Err(e) => s.problem(format!("error: runv state {id} could not run: {e:#}")),
    }
    let left: Vec<String> = fs::read_dir(&s.root)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != ".failed")
                .collect()
        })
        .unwrap_or_default();
    if !left.is_empty() {
        s.problem(format!("leak: state dirs {left:?}"));
    }
    // Processes exit a moment after their state is gone: give them that moment.
    let root = s.root.to_string_lossy().into_owned();
    let mut procs = procs_with(&root);
    for _ in 0..50 {
        if procs.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        procs = procs_with(&root);
    }
    if !procs.is_empty() {
        s.problem(format!("leak: processes {procs:?}"));
        for (p, _) in procs {
            signal(p, "KILL");
        }
    }
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let dir = s.dir.to_string_lossy().into_owned();
    let m: Vec<&str> = mounts.lines().filter(|l| l.contains(&dir)).collect();
    if !m.is_empty() {
        s.problem(format!("leak: mounts {m:?}"));
    }
    let loops = loops_under(&s.dir);
    if !loops.is_empty() {
        s.problem(format!("leak: loop devices {loops:?}"));
    }
    // Taps are global: others on this host may make some; only growth is suspicious.
    let t = taps();
    if t > base_taps {
        s.problem(format!(
            "leak: {} tap devices more than at the start",
            t - base_taps
        ));
    }
    let fds = fd_count();
    if fds > base_fds {
        s.problem(format!("leak: the soak holds {} more fds", fds - base_fds));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(argv: &[&str]) -> Result<Args, clap::Error> {
        crate::parse_task_args(argv)
    }

    #[test]
    fn arguments() {
        let a = parse(&["--cycles", "7", "--faults"]).unwrap();
        assert_eq!((a.cycles, a.faults, a.no_build), (7, true, false));
        assert_eq!(parse(&[]).unwrap().cycles, 10);
        assert!(parse(&["--cycles", "x"]).is_err());
        assert!(parse(&["--seed", "-1"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
    }

    #[test]
    fn seeds_are_never_zero() {
        assert_eq!(seed(Some(0)), 1);
        assert_eq!(seed(Some(42)), 42);
        assert_ne!(seed(None), 0);
    }

    #[test]
    fn the_rng_repeats_from_its_seed() {
        let (mut a, mut b) = (Rng(42), Rng(42));
        let xs: Vec<u64> = (0..5).map(|_| a.below(8)).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.below(8)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| *x < 8));
    }
}
