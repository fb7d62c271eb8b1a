//! `cargo xtask bench [--json] [--runs N] [--drivers qemu,qemu+overlay] [--no-build] [--no-nested | --nested-only | --warm-only] [--no-pods | --pods-only]`: runv's
//! cold start, warm start from a VM template, exec, throughput and memory on this machine, against a floor (the same qemu,
//! kernel and memory booting an initrd whose /init powers off at once) and runc. Runs are
//! interleaved round by round; medians with min/max; ratios paired per round. See BENCHMARKS.md.

mod nested;
mod own_kernel;
mod parse;
mod pods;
mod stats;
mod warm;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use own_kernel::OwnKernel;
use parse::GuestMarks;
use stats::Summary;

const TARGET_COLD_RATIO: f64 = 1.15;
const DONE_COLD_RATIO: f64 = 1.5;
const TARGET_EXEC_MS: f64 = 20.0;
const TARGET_STDOUT_MIBS: f64 = 100.0;
const TARGET_OVERHEAD_MIB: f64 = 40.0;
const STDOUT_MIB: u64 = 256;
const IDLE_MANY: usize = 10;
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(clap::Args, Debug)]
pub struct Args {
    /// print the report as JSON
    #[arg(long)]
    json: bool,
    /// rounds per measurement
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    runs: usize,
    /// configurations to measure: drivers, or driver+storage (e.g. qemu,qemu+overlay)
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    drivers: Option<Vec<String>>,
    /// use the release build as it is, without running cargo build first
    #[arg(long)]
    no_build: bool,
    /// skip section 7 (kvm-native against qemu-kvm inside the test host)
    #[arg(long, conflicts_with = "nested_only")]
    no_nested: bool,
    /// run section 7 only
    #[arg(long)]
    nested_only: bool,
    /// skip section 8 (pods through containerd's CRI, runv against runc)
    #[arg(long, conflicts_with = "pods_only")]
    no_pods: bool,
    /// run section 8 only
    #[arg(long, conflicts_with_all = ["nested_only", "warm_only"])]
    pods_only: bool,
    /// only the floor, the first driver's cold and warm (template) starts, phases and memory
    #[arg(long, conflicts_with = "nested_only")]
    warm_only: bool,
}

fn at_least_one(v: &str) -> Result<usize, String> {
    match v.parse() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{v:?} is not a number")),
    }
}

/// The options as the bench reads them.
struct Opts {
    json: bool,
    runs: usize,
    drivers: Option<Vec<String>>,
    build: bool,
    nested: bool,
    nested_only: bool,
    /// Only the floor, the first driver's cold and warm starts, their phases and memory.
    warm_only: bool,
    pods: bool,
    pods_only: bool,
}

impl From<Args> for Opts {
    fn from(a: Args) -> Self {
        Opts {
            json: a.json,
            runs: a.runs,
            drivers: a.drivers,
            build: !a.no_build,
            nested: !a.no_nested && !a.warm_only,
            nested_only: a.nested_only,
            warm_only: a.warm_only,
            pods: !a.no_pods && !a.warm_only,
            pods_only: a.pods_only,
        }
    }
}

/// Everything the bench made, removed by `Drop` whatever happened.
struct Env {
    tmp: PathBuf,
    root: PathBuf,
    runc_root: PathBuf,
    runv: PathBuf,
    containers: Vec<String>,
}

impl Env {
    fn runv(&self) -> Command {
        let mut c = Command::new(&self.runv);
        // Cold starts unless a variant names a template (`--template` beats this).
        c.env("RUNV_TEMPLATE", "off");
        c.arg("--root").arg(&self.root);
        c.stdin(Stdio::null());
        c
    }

    fn delete_all(&mut self) {
        for id in std::mem::take(&mut self.containers) {
            let _ = self
                .runv()
                .args(["delete", "--force", &id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.delete_all();
        // Anything still running with our temp dir on its command line is ours (a floor qemu
        // or a VM whose monitor died): end it by pid.
        let tmp = self.tmp.to_string_lossy().to_string();
        for pid in pids_mentioning(&tmp) {
            let _ = nix_kill(pid);
        }
        // Overlay mounts under the temp dir, deepest first.
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let mut under: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|m| m.starts_with(&tmp))
                .collect();
            under.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in under {
                let _ = Command::new("umount").args(["-l", m]).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.tmp);
    }
}

fn pids_mentioning(needle: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid == me {
                continue;
            }
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                if String::from_utf8_lossy(&cmd).contains(needle) {
                    out.push(pid);
                }
            }
        }
    }
    out
}

fn nix_kill(pid: i32) -> Result<()> {
    // No libc dependency in xtask: kill(1) by pid.
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .stderr(Stdio::null())
        .status()?;
    Ok(())
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

/// Waits for a child with a deadline; kills it when the deadline passes.
fn wait_deadline(child: &mut Child, what: &str) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {RUN_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn ok_or_stderr(st: std::process::ExitStatus, what: &str, err_file: &Path) -> Result<()> {
    if !st.success() {
        let err = std::fs::read_to_string(err_file).unwrap_or_default();
        bail!("{what} failed ({st}): {}", err.trim());
    }
    Ok(())
}

// ---------------------------------------------------------------- setup

fn write_bundle(
    env: &Env,
    dir: &Path,
    rootfs: &Path,
    args: &[&str],
    kernel_params: &[&str],
    own: Option<&OwnKernel>,
) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let st = env
        .runv()
        .args(["spec", "--bundle"])
        .arg(dir)
        .status()
        .context("runv spec")?;
    if !st.success() {
        bail!("runv spec --bundle {} failed", dir.display());
    }
    let path = dir.join("config.json");
    let mut spec: Value = serde_json::from_slice(&std::fs::read(&path)?)?;
    spec["process"]["terminal"] = json!(false);
    spec["process"]["args"] = json!(args);
    spec["root"] = json!({"path": rootfs, "readonly": false});
    if !kernel_params.is_empty() {
        // The OCI `vm` section needs the kernel's path: the guest runv uses by default, or
        // runv's own kernel.
        let guest = crate::workspace_root()?.join("target/guest");
        let (kernel, initrd) = match own {
            Some(k) => (k.vmlinux.clone(), k.initrd.clone()),
            None => (guest.join("vmlinux"), guest.join("initrd.img")),
        };
        spec["vm"] = json!({"kernel": {
            "path": kernel,
            "initrd": initrd,
            "parameters": kernel_params,
        }});
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&spec)?)?;
    Ok(())
}

fn busybox_rootfs(rootfs: &Path) -> Result<()> {
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin)?;
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .context("busybox not found (apt-get install busybox-static)")?;
    std::fs::copy(busybox, bin.join("busybox"))?;
    let list = Command::new(bin.join("busybox")).arg("--list").output()?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
    for d in ["proc", "sys", "dev", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    Ok(())
}

/// The floor's initrd: `/init` is a tiny static C program calling reboot(RB_AUTOBOOT) (qemu runs
/// with -no-reboot, so that ends qemu); busybox-static's `reboot -f` when no C compiler is found.
fn floor_initrd(dir: &Path) -> Result<(PathBuf, &'static str)> {
    let tree = dir.join("floor-tree");
    std::fs::create_dir_all(&tree)?;
    let src = dir.join("init.c");
    std::fs::write(
        &src,
        "#include <sys/reboot.h>\n#include <unistd.h>\nint main(void){reboot(RB_AUTOBOOT);return 0;}\n",
    )?;
    let built = Command::new("cc")
        .args(["-static", "-Os", "-s", "-o"])
        .arg(tree.join("init"))
        .arg(&src)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let kind = if built {
        "static C reboot(RB_AUTOBOOT)"
    } else {
        let bin = tree.join("bin");
        std::fs::create_dir_all(&bin)?;
        std::fs::copy("/bin/busybox", bin.join("busybox")).context("busybox for the floor")?;
        std::fs::write(
            tree.join("init"),
            "#!/bin/busybox sh\nexec /bin/busybox reboot -f\n",
        )?;
        Command::new("chmod")
            .arg("755")
            .arg(tree.join("init"))
            .status()?;
        "busybox reboot -f"
    };
    let out = dir.join("floor.cpio");
    crate::run_cmd(Command::new("sh").current_dir(&tree).arg("-c").arg(format!(
        "find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 > '{}'",
        out.display()
    )))?;
    Ok((out, kind))
}

/// The variants the cold-start rounds interleave.
#[derive(Debug, Clone)]
enum Variant {
    Floor {
        quiet: bool,
    },
    /// The floor booting runv's own kernel.
    FloorOwn,
    Runv {
        driver: String,
        storage: Option<String>,
    },
    Phases {
        driver: String,
    },
    /// `runv run` of `/bin/true` and the phase run, booting runv's own kernel.
    RunvOwn {
        driver: String,
    },
    PhasesOwn {
        driver: String,
    },
    /// `runv --template run` of `/bin/true`: restored from a template.
    Warm {
        driver: String,
    },
    WarmPhases {
        driver: String,
    },
    Runc,
}

impl Variant {
    fn label(&self) -> String {
        match self {
            Variant::Floor { quiet: false } => "floor: qemu+kernel, /init reboots".into(),
            Variant::Floor { quiet: true } => "floor, kernel 'quiet'".into(),
            Variant::FloorOwn => "floor, runv's kernel".into(),
            Variant::RunvOwn { driver } => format!("runv run ({driver}, runv's kernel)"),
            Variant::PhasesOwn { driver } => {
                format!("runv --debug run+delete ({driver}, echo, runv's kernel)")
            }
            Variant::Runv {
                driver,
                storage: None,
            } => format!("runv run ({driver})"),
            Variant::Runv {
                driver,
                storage: Some(s),
            } => format!("runv run ({driver} + {s})"),
            Variant::Phases { driver } => format!("runv --debug run+delete ({driver}, echo)"),
            Variant::Warm { driver } => format!("runv --template run ({driver}, warm)"),
            Variant::WarmPhases { driver } => {
                format!("runv --debug --template run+delete ({driver}, echo)")
            }
            Variant::Runc => "runc run (no VM)".into(),
        }
    }
}

/// What one `runv --debug run --keep` + `delete` showed.
#[derive(Debug, Default, Clone)]
struct PhaseSample {
    /// Named durations in ms, in order.
    phases: Vec<(String, f64)>,
    modules: Vec<(String, f64)>,
    console_bytes: usize,
}

struct Bench {
    env: Env,
    opts: Opts,
    bundle_true: PathBuf,
    bundle_echo: PathBuf,
    bundle_echo_own: PathBuf,
    bundle_idle: PathBuf,
    floor_argv: Vec<String>,
    floor_argv_quiet: Vec<String>,
    floor_argv_own: Vec<String>,
    /// runv's own kernel (`cargo xtask kernel`), when there is one.
    own: Option<OwnKernel>,
    qemu: String,
    floor_console: PathBuf,
    seq: usize,
}

pub fn run(args: Args) -> Result<()> {
    let opts = Opts::from(args);
    let ws = crate::workspace_root()?;
    if opts.build {
        eprintln!("bench: cargo build --release --workspace");
        crate::run_cmd(
            Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(&ws)
                .args(["build", "--quiet", "--release", "--workspace"]),
        )?;
    }
    if opts.pods_only {
        let report = json!({ "pods": pods::run(&ws, opts.runs)? });
        if opts.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print!("{}", pods::table(&report["pods"]));
        }
        return Ok(());
    }
    let release = ws.join("target/release");
    let runv = release.join("runv");
    if !runv.exists() {
        bail!(
            "{} is missing: cargo build --release --workspace",
            runv.display()
        );
    }
    let guest = ws.join("target/guest");
    if !guest.join("initrd.img").exists() {
        bail!("{} has no guest: cargo xtask guest", guest.display());
    }
    if opts.build && !opts.nested_only {
        // From the cache unless its configuration or source changed.
        eprintln!("bench: cargo xtask kernel");
        crate::kernel::run(crate::kernel::Args::default())?;
    }
    let own = OwnKernel::find(&ws.join(crate::kernel::OUT_DIR));
    // Short: the VM sockets live under it (unix socket paths are limited to 107 bytes).
    let tmp = PathBuf::from(format!("/tmp/rvb{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let env = Env {
        root: tmp.join("r"),
        runc_root: tmp.join("rc"),
        tmp: tmp.clone(),
        runv,
        containers: Vec::new(),
    };
    let rootfs = tmp.join("rootfs");
    busybox_rootfs(&rootfs)?;
    let mut bench = Bench {
        bundle_true: tmp.join("bt"),
        bundle_echo: tmp.join("be"),
        bundle_echo_own: tmp.join("bo"),
        bundle_idle: tmp.join("bi"),
        env,
        opts,
        floor_argv: Vec::new(),
        floor_argv_quiet: Vec::new(),
        floor_argv_own: Vec::new(),
        own,
        qemu: String::new(),
        floor_console: tmp.join("floor-console.log"),
        seq: 0,
    };
    write_bundle(
        &bench.env,
        &bench.bundle_true,
        &rootfs,
        &["/bin/true"],
        &[],
        None,
    )?;
    for (bundle, own) in [
        (&bench.bundle_echo, None),
        (&bench.bundle_echo_own, bench.own.as_ref()),
    ] {
        write_bundle(
            &bench.env,
            bundle,
            &rootfs,
            &["/bin/echo", "hi"],
            // The kernel rate-limits /dev/kmsg writers to 10 lines per 5 s: without this the
            // agent's later debug lines (channel open, ...) never reach the console.
            &["printk.devkmsg=on"],
            own,
        )?;
    }
    write_bundle(
        &bench.env,
        &bench.bundle_idle,
        &rootfs,
        &["/bin/sleep", "100000"],
        &[],
        None,
    )?;
    let report = if bench.opts.nested_only {
        json!({ "nested_kvm": nested::run(&ws, &release, bench.opts.runs)? })
    } else {
        bench.all(&release, &ws)?
    };
    if bench.opts.nested_only && !bench.opts.json {
        print!("{}", nested::table(&report["nested_kvm"]));
        return Ok(());
    }
    if bench.opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(())
}

impl Bench {
    fn next_id(&mut self, prefix: &str) -> String {
        self.seq += 1;
        format!("{prefix}{}", self.seq)
    }

    fn drivers(&self, release: &Path) -> Vec<(String, Option<String>)> {
        if let Some(list) = &self.opts.drivers {
            return list
                .iter()
                .map(|d| match d.split_once('+') {
                    Some((h, s)) => (h.to_string(), Some(s.to_string())),
                    None => (d.clone(), None),
                })
                .collect();
        }
        // Only drivers whose probe says they can run here (`runv drivers` asks each plugin).
        let names = |kind: &str| -> Vec<String> {
            let out = std::process::Command::new(release.join("runv"))
                .args(["drivers", "--format", "json"])
                .env_remove("RUNV_DRIVER_DIR")
                .output();
            let json: Value = out
                .ok()
                .and_then(|o| serde_json::from_slice(&o.stdout).ok())
                .unwrap_or(Value::Null);
            let mut v: Vec<String> = json["drivers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| d["kind"] == kind && d["available"] == true && d["name"] != "example")
                .filter_map(|d| d["name"].as_str().map(str::to_string))
                .collect();
            v.sort();
            v
        };
        let mut out = Vec::new();
        for h in names("hypervisor") {
            out.push((h.clone(), None));
            for s in names("storage") {
                out.push((h.clone(), Some(s)));
            }
        }
        out
    }

    fn all(&mut self, release: &Path, ws: &Path) -> Result<Value> {
        let drivers = self.drivers(release);
        let first = drivers
            .first()
            .map(|d| d.0.clone())
            .context("no hypervisor driver plugin in target/release")?;
        let mut report = json!({
            "machine": machine(),
            "runs": self.opts.runs,
            "runv": self.env.runv,
            "kernel_release": std::fs::read_to_string(ws.join("target/guest/kernel.release"))
                .unwrap_or_default().trim(),
        });

        // An idle container: the driver's qemu command line, exec, memory of one.
        eprintln!("bench: idle container, exec, memory");
        let c0 = self.start_idle(&first)?;
        let state = read_state(&self.env.root, &c0)?;
        let hv_log = std::fs::read_to_string(self.env.root.join(&c0).join("hypervisor.log"))?;
        let line = hv_log
            .lines()
            .find_map(|l| l.strip_prefix("runv-driver-qemu: starting "))
            .context("no qemu command line in hypervisor.log")?;
        let argv = parse::shell_split(line);
        let (qemu, driver_args) = argv.split_first().context("empty qemu command line")?;
        self.qemu = qemu.clone();
        let (initrd, init_kind) = floor_initrd(&self.env.tmp)?;
        let console = self.floor_console.to_string_lossy().to_string();
        self.floor_argv = parse::floor_args(driver_args, &initrd.to_string_lossy(), &console);
        self.floor_argv_quiet = self.floor_argv.clone();
        if let Some(i) = self.floor_argv_quiet.iter().position(|a| a == "-append") {
            self.floor_argv_quiet[i + 1].push_str(" quiet");
        }
        if let Some(k) = &self.own {
            self.floor_argv_own = own_kernel::with_kernel(&self.floor_argv, &k.vmlinux);
        }
        report["own_kernel"] = match &self.own {
            Some(k) => k.json(),
            None => json!("skipped: no target/guest/runv (cargo xtask kernel)"),
        };
        report["floor"] = json!({
            "qemu": qemu, "args": self.floor_argv, "init": init_kind,
            "driver_command_line": line,
        });
        let kernel = arg_value(driver_args, "-kernel").unwrap_or("").to_string();
        let ram_mib = arg_value(driver_args, "-m")
            .and_then(|m| m.trim_end_matches(['M', 'm']).parse::<u64>().ok())
            .unwrap_or(128);
        std::thread::sleep(Duration::from_secs(2));
        let mem_avail_kb = meminfo("MemAvailable:");
        report["memory_one"] = memory(std::slice::from_ref(&state), ram_mib, &kernel)?;
        if !self.opts.warm_only {
            report["memory_one_own_kernel"] = self.memory_own(&first, ram_mib)?;
        }

        if !self.opts.warm_only {
            report["exec"] = self.exec_bench(&c0)?;
            report["raw_channel"] = raw_channel(ws);
        }

        eprintln!("bench: {IDLE_MANY} idle containers");
        let mut states = vec![state];
        for _ in 1..IDLE_MANY {
            let id = self.start_idle(&first)?;
            states.push(read_state(&self.env.root, &id)?);
        }
        std::thread::sleep(Duration::from_secs(2));
        let mut many = memory(&states, ram_mib, &kernel)?;
        let per = many["per_container_total_pss_mib"]
            .as_f64()
            .unwrap_or(f64::NAN);
        let overhead = many["per_container_overhead_pss_mib"]
            .as_f64()
            .unwrap_or(f64::NAN);
        let avail_mib = mem_avail_kb as f64 / 1024.0;
        many["fit"] = json!({
            "mem_available_mib": avail_mib,
            "idle_as_measured": (avail_mib / per).floor(),
            "guest_ram_fully_touched": (avail_mib / (overhead + ram_mib as f64)).floor(),
        });
        report["memory_many"] = many;
        report["vm_memory_mib"] = json!(ram_mib);
        self.env.delete_all();

        // The same number of idle containers, restored from a template.
        eprintln!("bench: templates; {IDLE_MANY} idle clones");
        self.make_templates(&first)?;
        let mut clones = Vec::new();
        for _ in 0..IDLE_MANY {
            let id = self.start_idle_clone(&first)?;
            clones.push(read_state(&self.env.root, &id)?);
        }
        std::thread::sleep(Duration::from_secs(2));
        report["memory_clones"] = memory(&clones, ram_mib, &kernel)?;
        report["memory_clones_vs_cold"] =
            warm::memory_comparison(&report["memory_many"], &report["memory_clones"]);
        self.env.delete_all();

        // Cold starts, interleaved.
        let mut variants = vec![
            Variant::Floor { quiet: false },
            Variant::Floor { quiet: true },
        ];
        if self.opts.warm_only {
            variants.truncate(1);
            variants.push(Variant::Runv {
                driver: first.clone(),
                storage: None,
            });
        } else {
            if self.own.is_some() {
                variants.push(Variant::FloorOwn);
            }
            for (d, s) in &drivers {
                variants.push(Variant::Runv {
                    driver: d.clone(),
                    storage: s.clone(),
                });
            }
            if self.own.is_some() {
                variants.push(Variant::RunvOwn {
                    driver: first.clone(),
                });
            }
        }
        variants.push(Variant::Phases {
            driver: first.clone(),
        });
        if self.own.is_some() && !self.opts.warm_only {
            variants.push(Variant::PhasesOwn {
                driver: first.clone(),
            });
        }
        variants.push(Variant::Warm {
            driver: first.clone(),
        });
        variants.push(Variant::WarmPhases {
            driver: first.clone(),
        });
        if find_runc().is_some() && !self.opts.warm_only {
            variants.push(Variant::Runc);
        }
        let runs = self.opts.runs;
        let mut samples: Vec<Vec<Option<f64>>> = vec![vec![None; runs]; variants.len()];
        let mut phase_samples = Vec::new();
        let mut own_phase_samples = Vec::new();
        let mut warm_phase_samples = Vec::new();
        let mut floor_marks = Vec::new();
        let mut own_floor_marks = Vec::new();
        for (round, v) in stats::schedule(variants.len(), runs) {
            eprintln!("bench: round {}/{runs}: {}", round + 1, variants[v].label());
            let (secs, extra) = self.cold(&variants[v])?;
            samples[v][round] = Some(secs);
            match extra {
                Extra::Phases(p) if matches!(variants[v], Variant::WarmPhases { .. }) => {
                    warm_phase_samples.push(p)
                }
                Extra::Phases(p) if matches!(variants[v], Variant::PhasesOwn { .. }) => {
                    own_phase_samples.push(p)
                }
                Extra::Phases(p) => phase_samples.push(p),
                Extra::Floor(m) if matches!(variants[v], Variant::FloorOwn) => {
                    own_floor_marks.push(m)
                }
                Extra::Floor(m) => floor_marks.push(m),
                Extra::None => {}
            }
        }
        let floor = &samples[0];
        let floor_sum = summary(floor);
        // The warm start is also compared with the first driver's own cold start.
        let first_cold = variants
            .iter()
            .position(|v| matches!(v, Variant::Runv { driver, storage: None } if *driver == first));
        let own_floor = variants.iter().position(|v| matches!(v, Variant::FloorOwn));
        let mut cold = Vec::new();
        for (i, v) in variants.iter().enumerate() {
            let s = summary(&samples[i]);
            let ratios = stats::summarize(&stats::paired_ratios(&samples[i], floor));
            let r = ratios.map(|r| r.median).unwrap_or(f64::NAN);
            let target = match v {
                Variant::Runv { .. } => Some(json!({
                    "target": format!("<= {TARGET_COLD_RATIO}x floor"),
                    "met": stats::met(r, TARGET_COLD_RATIO, true),
                    "done_criterion": format!("<= {DONE_COLD_RATIO}x floor"),
                    "done_met": stats::met(r, DONE_COLD_RATIO, true),
                })),
                Variant::RunvOwn { .. } => {
                    let to_own = own_floor.and_then(|o| {
                        stats::summarize(&stats::paired_ratios(&samples[i], &samples[o]))
                    });
                    Some(own_kernel::target(ratios, to_own))
                }
                Variant::Warm { .. } => {
                    let to_cold = first_cold.and_then(|c| {
                        stats::summarize(&stats::paired_ratios(&samples[i], &samples[c]))
                    });
                    let met = stats::met(r, warm::TARGET_WARM_FLOOR_RATIO, true);
                    Some(json!({
                        "target": format!("<= {}x floor", warm::TARGET_WARM_FLOOR_RATIO),
                        "met": met,
                        "ratio_to_cold_paired": sum_json(to_cold),
                        "summary": format!(
                            "≤{}× floor: {}; {:.2}× the cold start",
                            warm::TARGET_WARM_FLOOR_RATIO,
                            if met { "met" } else { "NOT met" },
                            to_cold.map(|t| t.median).unwrap_or(f64::NAN)
                        ),
                    }))
                }
                _ => None,
            };
            cold.push(json!({
                "variant": v.label(),
                "seconds": sum_json(s),
                "samples": samples[i],
                "ratio_to_floor_paired": sum_json(ratios),
                "ratio_of_medians": match (s, floor_sum) {
                    (Some(a), Some(b)) => json!(stats::ratio_of_medians(&a, &b)),
                    _ => Value::Null,
                },
                "target": target,
            }));
        }
        report["cold"] = json!(cold);
        report["phases"] = phases_json(&phase_samples);
        report["phases_own_kernel"] = phases_json(&own_phase_samples);
        report["floor_guest_own_kernel"] = floor_guest_json(&own_floor_marks);
        report["warm_phases"] = phases_json(&warm_phase_samples);
        report["floor_guest"] = floor_guest_json(&floor_marks);
        report["nested_kvm"] = if self.opts.nested {
            nested::run(ws, release, self.opts.runs)?
        } else {
            json!("skipped (--no-nested)")
        };
        report["pods"] = if self.opts.pods {
            pods::run(ws, self.opts.runs)?
        } else {
            json!("skipped (--no-pods)")
        };
        Ok(report)
    }

    fn start_idle(&mut self, driver: &str) -> Result<String> {
        let id = self.next_id("idle");
        let err = self.env.tmp.join(format!("{id}.err"));
        self.env.containers.push(id.clone());
        let st = self
            .env
            .runv()
            .args(["--driver", driver, "run", "--detach", "--bundle"])
            .arg(&self.bundle_idle)
            .arg(&id)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err)?)
            .status()?;
        ok_or_stderr(st, &format!("runv run --detach {id}"), &err)?;
        Ok(id)
    }

    fn exec_bench(&mut self, id: &str) -> Result<Value> {
        let n = (self.opts.runs * 2).max(5);
        let mut lat = Vec::new();
        let err = self.env.tmp.join("exec.err");
        for _ in 0..n {
            let t = Instant::now();
            let st = self
                .env
                .runv()
                .args(["exec", id, "/bin/true"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&err)?)
                .status()?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            ok_or_stderr(st, "runv exec /bin/true", &err)?;
            lat.push(ms);
        }
        let mut rates = Vec::new();
        let mut transfer_rates = Vec::new();
        for _ in 0..self.opts.runs.clamp(1, 3) {
            let t = Instant::now();
            let mut child = self
                .env
                .runv()
                .args(["exec", id, "/bin/dd", "if=/dev/zero", "bs=1M"])
                .arg(format!("count={STDOUT_MIB}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()?;
            let mut out = child.stdout.take().context("exec stdout")?;
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0u64;
            let mut first = None;
            loop {
                let k = out.read(&mut buf)?;
                if k == 0 {
                    break;
                }
                first.get_or_insert_with(Instant::now);
                total += k as u64;
            }
            let end = Instant::now();
            let st = wait_deadline(&mut child, "runv exec dd")?;
            if !st.success() || total != STDOUT_MIB << 20 {
                bail!(
                    "runv exec dd: {st}, {total} bytes instead of {}",
                    STDOUT_MIB << 20
                );
            }
            let mib = total as f64 / 1048576.0;
            rates.push(mib / (end - t).as_secs_f64());
            if let Some(f) = first {
                transfer_rates.push(mib / (end - f).as_secs_f64());
            }
        }
        // What the CLI costs by itself (a query that talks to no VM), and what the guest can
        // push through dd alone (to /dev/null, no stdio relay): the two ends of the exec path.
        let mut cli = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            let st = self
                .env
                .runv()
                .args(["state", id])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if st.success() {
                cli.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let mut guest_rates = Vec::new();
        for _ in 0..self.opts.runs.clamp(1, 3) {
            let t = Instant::now();
            let st = self
                .env
                .runv()
                .args(["exec", id, "/bin/sh", "-c"])
                .arg(format!(
                    "dd if=/dev/zero of=/dev/null bs=1M count={STDOUT_MIB} 2>/dev/null"
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if st.success() {
                guest_rates.push(STDOUT_MIB as f64 / t.elapsed().as_secs_f64());
            }
        }
        let l = stats::summarize(&lat);
        let r = stats::summarize(&rates);
        Ok(json!({
            "true_ms": sum_json(l),
            "true_target": format!("< {TARGET_EXEC_MS} ms"),
            "true_met": l.is_some_and(|l| l.median < TARGET_EXEC_MS),
            "cli_state_ms": sum_json(stats::summarize(&cli)),
            "guest_dd_to_null_mib_per_s": sum_json(stats::summarize(&guest_rates)),
            "stdout_mib": STDOUT_MIB,
            "stdout_mib_per_s": sum_json(r),
            "stdout_first_byte_to_eof_mib_per_s": sum_json(stats::summarize(&transfer_rates)),
            "stdout_target": format!(">= {TARGET_STDOUT_MIBS} MiB/s"),
            "stdout_met": r.is_some_and(|r| stats::met(r.median, TARGET_STDOUT_MIBS, false)),
        }))
    }

    fn cold(&mut self, v: &Variant) -> Result<(f64, Extra)> {
        match v {
            Variant::Floor { .. } | Variant::FloorOwn => {
                let quiet = matches!(v, Variant::Floor { quiet: true });
                let _ = std::fs::remove_file(&self.floor_console);
                let argv = match v {
                    Variant::FloorOwn => &self.floor_argv_own,
                    _ if quiet => &self.floor_argv_quiet,
                    _ => &self.floor_argv,
                };
                let err = self.env.tmp.join("floor.err");
                let t = Instant::now();
                let mut child = Command::new(&self.qemu)
                    .args(argv)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&err)?)
                    .spawn()?;
                let st = wait_deadline(&mut child, "floor qemu")?;
                let secs = t.elapsed().as_secs_f64();
                ok_or_stderr(st, "floor qemu", &err)?;
                let marks = parse::guest_marks(
                    &std::fs::read_to_string(&self.floor_console).unwrap_or_default(),
                );
                if marks.run_init.is_none() && !quiet {
                    bail!(
                        "the floor VM never ran /init (see {})",
                        self.floor_console.display()
                    );
                }
                Ok((
                    secs,
                    if quiet {
                        Extra::None
                    } else {
                        Extra::Floor((secs, marks))
                    },
                ))
            }
            Variant::Runv { driver, .. } | Variant::RunvOwn { driver } => {
                let id = self.next_id("cold");
                let err = self.env.tmp.join(format!("{id}.err"));
                self.env.containers.push(id.clone());
                let mut cmd = match v {
                    Variant::RunvOwn { .. } => self.runv_own(),
                    _ => self.env.runv(),
                };
                cmd.args(["--driver", driver]);
                if let Variant::Runv {
                    storage: Some(s), ..
                } = v
                {
                    cmd.args(["--storage", s]);
                }
                let t = Instant::now();
                let mut child = cmd
                    .args(["run", "--bundle"])
                    .arg(&self.bundle_true)
                    .arg(&id)
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&err)?)
                    .spawn()?;
                let st = wait_deadline(&mut child, "runv run")?;
                let secs = t.elapsed().as_secs_f64();
                ok_or_stderr(st, &format!("runv run {id}"), &err)?;
                if self.env.root.join(&id).exists() {
                    bail!("runv run {id} left its state dir behind");
                }
                self.env.containers.retain(|c| c != &id);
                Ok((secs, Extra::None))
            }
            Variant::Phases { driver } => {
                let (secs, p) = self.phase_run(driver, None, false)?;
                Ok((secs, Extra::Phases(p)))
            }
            Variant::PhasesOwn { driver } => {
                let (secs, p) = self.phase_run(driver, None, true)?;
                Ok((secs, Extra::Phases(p)))
            }
            Variant::WarmPhases { driver } => {
                let (secs, p) = self.phase_run(driver, Some(warm::TEMPLATE_DEBUG), false)?;
                Ok((secs, Extra::Phases(p)))
            }
            Variant::Warm { driver } => {
                let id = self.next_id("warm");
                let err = self.env.tmp.join(format!("{id}.err"));
                self.env.containers.push(id.clone());
                let mut cmd = self.runv_warm(warm::TEMPLATE_PLAIN);
                let t = Instant::now();
                let mut child = cmd
                    .args(["--driver", driver, "run", "--bundle"])
                    .arg(&self.bundle_true)
                    .arg(&id)
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&err)?)
                    .spawn()?;
                let st = wait_deadline(&mut child, "runv --template run")?;
                let secs = t.elapsed().as_secs_f64();
                ok_or_stderr(st, &format!("runv --template run {id}"), &err)?;
                self.env.containers.retain(|c| c != &id);
                Ok((secs, Extra::None))
            }
            Variant::Runc => {
                let id = self.next_id("runc");
                let err = self.env.tmp.join(format!("{id}.err"));
                let t = Instant::now();
                let st = Command::new(find_runc().context("runc")?)
                    .arg("--root")
                    .arg(&self.env.runc_root)
                    .args(["run", "--bundle"])
                    .arg(&self.bundle_true)
                    .arg(&id)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&err)?)
                    .status()?;
                let secs = t.elapsed().as_secs_f64();
                ok_or_stderr(st, "runc run", &err)?;
                Ok((secs, Extra::None))
            }
        }
    }

    /// `runv --debug run --keep` of an `echo` container, then `delete`: the phase marks of the
    /// JSON log, the guest console, and the host's first read of the container's output.
    /// `own`: the bundle boots runv's own kernel.
    fn phase_run(
        &mut self,
        driver: &str,
        template: Option<&str>,
        own: bool,
    ) -> Result<(f64, PhaseSample)> {
        let id = self.next_id("phase");
        let log = self.env.tmp.join(format!("{id}.log"));
        let err = self.env.tmp.join(format!("{id}.err"));
        self.env.containers.push(id.clone());
        let t0 = now_ns();
        let start = Instant::now();
        let mut cmd = match template {
            Some(name) => self.runv_warm(name),
            None => self.env.runv(),
        };
        let mut child = cmd
            .args(["--debug", "--log"])
            .arg(&log)
            .args([
                "--log-format",
                "json",
                "--driver",
                driver,
                "run",
                "--keep",
                "--bundle",
            ])
            .arg(if own {
                &self.bundle_echo_own
            } else {
                &self.bundle_echo
            })
            .arg(&id)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err)?)
            .spawn()?;
        let mut out = child.stdout.take().context("stdout")?;
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let mut first = None;
            while let Ok(k) = out.read(&mut buf) {
                if k == 0 {
                    break;
                }
                first.get_or_insert_with(now_ns);
            }
            first
        });
        let st = wait_deadline(&mut child, "runv --debug run")?;
        let run_exit = now_ns();
        let first_output = reader.join().ok().flatten();
        ok_or_stderr(st, &format!("runv run {id}"), &err)?;
        let console = std::fs::read_to_string(self.env.root.join(&id).join("console.log"))
            .unwrap_or_default();
        let d = Instant::now();
        let st = self
            .env
            .runv()
            .args(["delete", &id])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err)?)
            .status()?;
        let delete_ms = d.elapsed().as_secs_f64() * 1e3;
        ok_or_stderr(st, &format!("runv delete {id}"), &err)?;
        self.env.containers.retain(|c| c != &id);
        let secs = start.elapsed().as_secs_f64();

        let mut marks: BTreeMap<String, i128> = BTreeMap::new();
        for line in std::fs::read_to_string(&log)?.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            if let (Some(p), Some(t)) = (v["phase"].as_str(), v["time"].as_str()) {
                if let Some(ns) = parse::rfc3339_ns(t) {
                    marks.entry(p.to_string()).or_insert(ns);
                }
            }
        }
        if template.is_some() {
            if !marks.contains_key("vm-restored") {
                bail!("runv --template run {id} was not restored from the template");
            }
            return Ok((
                secs,
                warm::phase_sample(t0, &marks, first_output, run_exit, delete_ms),
            ));
        }
        let g = parse::guest_marks(&console);
        Ok((
            secs,
            phase_sample(t0, &marks, &g, first_output, run_exit, delete_ms),
        ))
    }
}

enum Extra {
    None,
    Phases(PhaseSample),
    Floor((f64, GuestMarks)),
}

/// Turns one debug run's marks into named phase durations (ms). The host time of the guest
/// kernel's start is estimated as agent-ready minus the guest clock at "host connected".
fn phase_sample(
    t0: i128,
    marks: &BTreeMap<String, i128>,
    g: &GuestMarks,
    first_output: Option<i128>,
    run_exit: i128,
    delete_ms: f64,
) -> PhaseSample {
    let ms = |a: Option<i128>, b: Option<i128>| match (a, b) {
        (Some(a), Some(b)) => (b - a) as f64 / 1e6,
        _ => f64::NAN,
    };
    let m = |k: &str| marks.get(k).copied();
    let anchor = g.channel_open.or(g.host_connected);
    let kernel_start = match (m("agent-ready"), anchor) {
        (Some(r), Some(a)) => Some(r - (a * 1e9) as i128),
        _ => None,
    };
    let guest = |s: Option<f64>| match (kernel_start, s) {
        (Some(k), Some(s)) => Some(k + (s * 1e9) as i128),
        _ => None,
    };
    let mut phases = vec![
        (
            "runv CLI → monitor up".to_string(),
            ms(Some(t0), m("monitor-up")),
        ),
        (
            "monitor up → VMM up (qemu spawned, QMP)".into(),
            ms(m("monitor-up"), m("vmm-up")),
        ),
        (
            "VMM up → kernel entry (est.)".into(),
            ms(m("vmm-up"), kernel_start),
        ),
    ];
    if let Some((a, b)) = g.initrd_unpack {
        phases.push(("  of which initrd unpack (in kernel)".into(), (b - a) * 1e3));
    }
    phases.extend([
        (
            "kernel entry → Run /init".into(),
            ms(kernel_start, guest(g.run_init)),
        ),
        (
            "Run /init → agent start".into(),
            ms(guest(g.run_init), guest(g.agent_start)),
        ),
        (
            "agent: module loading".into(),
            ms(guest(g.agent_start), guest(g.modules_done)),
        ),
        (
            "agent: modules → channel open".into(),
            ms(guest(g.modules_done), guest(g.channel_open)),
        ),
        (
            "channel open → agent ready".into(),
            ms(guest(g.channel_open), m("agent-ready")),
        ),
        (
            "agent ready → container created".into(),
            ms(m("agent-ready"), m("container-created")),
        ),
        (
            "created → started".into(),
            ms(m("container-created"), m("container-started")),
        ),
        (
            "started → first output on host".into(),
            ms(m("container-started"), first_output),
        ),
        (
            "first output → exit seen".into(),
            ms(first_output, m("container-exited")),
        ),
        (
            "exit → VM stopped".into(),
            ms(m("container-exited"), m("vm-stopped")),
        ),
        (
            "VM stopped → runv run returns".into(),
            ms(m("vm-stopped"), Some(run_exit)),
        ),
        ("runv delete".into(), delete_ms),
    ]);
    PhaseSample {
        phases,
        modules: g.modules.clone(),
        console_bytes: g.console_bytes,
    }
}

fn phases_json(samples: &[PhaseSample]) -> Value {
    let Some(first) = samples.first() else {
        return Value::Null;
    };
    let mut phases = Vec::new();
    for (i, (name, _)) in first.phases.iter().enumerate() {
        let xs: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.phases.get(i).map(|p| p.1))
            .collect();
        phases.push(json!({"phase": name, "ms": sum_json(stats::summarize(&xs))}));
    }
    let mut modules = Vec::new();
    for (i, (name, _)) in first.modules.iter().enumerate() {
        let xs: Vec<f64> = samples
            .iter()
            .filter_map(|s| s.modules.get(i).filter(|m| &m.0 == name).map(|m| m.1))
            .collect();
        modules.push(json!({"module": name, "ms": sum_json(stats::summarize(&xs))}));
    }
    let bytes: Vec<f64> = samples.iter().map(|s| s.console_bytes as f64).collect();
    json!({
        "runs": samples.len(),
        "phases": phases,
        "modules": modules,
        "console_bytes": sum_json(stats::summarize(&bytes)),
    })
}

fn floor_guest_json(marks: &[(f64, GuestMarks)]) -> Value {
    let run_init: Vec<f64> = marks
        .iter()
        .filter_map(|(_, m)| m.run_init.map(|t| t * 1e3))
        .collect();
    let host_minus_guest: Vec<f64> = marks
        .iter()
        .filter_map(|(s, m)| m.last.map(|l| s * 1e3 - l * 1e3))
        .collect();
    let bytes: Vec<f64> = marks.iter().map(|(_, m)| m.console_bytes as f64).collect();
    json!({
        "kernel_to_run_init_ms": sum_json(stats::summarize(&run_init)),
        "wall_minus_guest_clock_ms": sum_json(stats::summarize(&host_minus_guest)),
        "console_bytes": sum_json(stats::summarize(&bytes)),
    })
}

// ---------------------------------------------------------------- memory

#[derive(Debug, Clone)]
pub(super) struct ContainerPids {
    monitor: i32,
    vmm: Vec<i32>,
}

pub(super) fn read_state(root: &Path, id: &str) -> Result<ContainerPids> {
    let v: Value = serde_json::from_slice(&std::fs::read(root.join(id).join("state.json"))?)?;
    Ok(ContainerPids {
        monitor: v["pid"].as_i64().context("state.pid")? as i32,
        vmm: v["runv"]["vm_pids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_i64())
                    .map(|p| p as i32)
                    .collect()
            })
            .unwrap_or_default(),
    })
}

pub(super) fn memory(containers: &[ContainerPids], ram_mib: u64, kernel: &str) -> Result<Value> {
    let (mut mon, mut vmm, mut ram) = ((0u64, 0u64), (0u64, 0u64), (0u64, 0u64));
    let (mut tcg, mut kimg) = ((0u64, 0u64), (0u64, 0u64));
    for c in containers {
        let r = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", c.monitor))?;
        let (rss, pss) = parse::rollup_rss_pss(&r);
        mon.0 += rss;
        mon.1 += pss;
        for p in &c.vmm {
            let r = std::fs::read_to_string(format!("/proc/{p}/smaps_rollup"))?;
            let (rss, pss) = parse::rollup_rss_pss(&r);
            let smaps = std::fs::read_to_string(format!("/proc/{p}/smaps"))?;
            let m = parse::qemu_maps(&smaps, ram_mib * 1024, kernel);
            vmm.0 += rss.saturating_sub(m.guest_ram.0);
            vmm.1 += pss.saturating_sub(m.guest_ram.1);
            ram.0 += m.guest_ram.0;
            ram.1 += m.guest_ram.1;
            tcg.0 += m.code_cache.0;
            tcg.1 += m.code_cache.1;
            kimg.0 += m.kernel_image.0;
            kimg.1 += m.kernel_image.1;
        }
    }
    let n = containers.len().max(1) as f64;
    let mib = |kb: u64| kb as f64 / 1024.0 / n;
    let overhead = mib(mon.1) + mib(vmm.1);
    Ok(json!({
        "containers": containers.len(),
        "per_container_mib": {
            "monitor_rss": mib(mon.0), "monitor_pss": mib(mon.1),
            "vmm_rss_excl_guest_ram": mib(vmm.0), "vmm_pss_excl_guest_ram": mib(vmm.1),
            "guest_ram_rss": mib(ram.0), "guest_ram_pss": mib(ram.1),
            "vmm_tcg_code_cache_rss": mib(tcg.0), "vmm_tcg_code_cache_pss": mib(tcg.1),
            "vmm_kernel_image_copy_rss": mib(kimg.0), "vmm_kernel_image_copy_pss": mib(kimg.1),
        },
        "per_container_overhead_pss_mib": overhead,
        "per_container_overhead_rss_mib": mib(mon.0) + mib(vmm.0),
        "per_container_total_pss_mib": overhead + mib(ram.1),
        "overhead_target": format!("< {TARGET_OVERHEAD_MIB} MiB (monitor + VMM, PSS)"),
        "overhead_met": overhead < TARGET_OVERHEAD_MIB,
    }))
}

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------- misc

/// runv-proto's Mux over a socketpair, without the agent or a VM: the protocol crate's own
/// throughput test, built with the release profile (the xtask binary itself is a debug build).
fn raw_channel(ws: &Path) -> Value {
    eprintln!("bench: raw channel (runv-proto Mux over a socketpair, release test)");
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(ws)
        .args([
            "test",
            "--quiet",
            "--release",
            "-p",
            "runv-proto",
            "--test",
            "flow",
            "throughput_over_socketpair",
            "--",
            "--exact",
            "--nocapture",
        ])
        .stdin(Stdio::null())
        .output();
    let Ok(out) = out else {
        return json!({"error": "cargo test did not run"});
    };
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    let rate = text.lines().find_map(|l| {
        l.trim()
            .strip_prefix("throughput: ")?
            .strip_suffix(" MiB/s")?
            .parse::<f64>()
            .ok()
    });
    json!({
        "what": "runv-proto Mux over a unix socketpair, 64 MiB, release (runv-proto/tests/flow.rs)",
        "mib_per_s": rate,
    })
}

fn find_runc() -> Option<PathBuf> {
    [
        "/usr/sbin/runc",
        "/usr/bin/runc",
        "/usr/local/sbin/runc",
        "/usr/local/bin/runc",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

fn arg_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).map(String::as_str)
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    json!({
        "cpu": model,
        "cpus": cpus,
        "mem_total_mib": meminfo("MemTotal:") / 1024,
    })
}

fn summary(xs: &[Option<f64>]) -> Option<Summary> {
    let v: Vec<f64> = xs.iter().flatten().copied().collect();
    stats::summarize(&v)
}

fn sum_json(s: Option<Summary>) -> Value {
    match s {
        Some(s) => json!({"median": s.median, "min": s.min, "max": s.max, "n": s.n}),
        None => Value::Null,
    }
}

// ---------------------------------------------------------------- table

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn met_word(b: &Value) -> &'static str {
    match b.as_bool() {
        Some(true) => "met",
        Some(false) => "missed",
        None => "-",
    }
}

fn table(r: &Value) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let m = &r["machine"];
    let _ = writeln!(
        s,
        "runv bench: {} runs interleaved; {} ({} CPUs, {} MiB); guest kernel {}; VM {} MiB",
        r["runs"],
        m["cpu"].as_str().unwrap_or("?"),
        m["cpus"],
        m["mem_total_mib"],
        r["kernel_release"].as_str().unwrap_or("?"),
        r["vm_memory_mib"],
    );
    let _ = writeln!(
        s,
        "floor: {} {}  (init: {})\n",
        r["floor"]["qemu"].as_str().unwrap_or(""),
        r["floor"]["args"]
            .as_array()
            .map(|a| a
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" "))
            .unwrap_or_default(),
        r["floor"]["init"].as_str().unwrap_or(""),
    );
    let _ = writeln!(
        s,
        "{:<44} {:>8} {:>8} {:>8} {:>18}  target",
        "1-3. cold start (s, spawn → exit+delete)", "median", "min", "max", "× floor [min-max]"
    );
    for c in r["cold"].as_array().into_iter().flatten() {
        let sec = &c["seconds"];
        let ratio = &c["ratio_to_floor_paired"];
        let target = if c["target"].is_null() {
            String::new()
        } else if let Some(summary) = c["target"]["summary"].as_str() {
            summary.to_string()
        } else {
            format!(
                "≤{TARGET_COLD_RATIO}×: {}; done ≤{DONE_COLD_RATIO}×: {}",
                met_word(&c["target"]["met"]),
                met_word(&c["target"]["done_met"])
            )
        };
        let _ = writeln!(
            s,
            "{:<44} {:>8.3} {:>8.3} {:>8.3} {:>6.2} [{:.2}-{:.2}]  {}",
            c["variant"].as_str().unwrap_or(""),
            f(&sec["median"]),
            f(&sec["min"]),
            f(&sec["max"]),
            f(&ratio["median"]),
            f(&ratio["min"]),
            f(&ratio["max"]),
            target
        );
    }
    let fg = &r["floor_guest"];
    let _ = writeln!(
        s,
        "  floor guest: kernel entry → Run /init {:.0} ms; wall − guest clock (qemu start + exit) {:.0} ms; console {:.0} bytes",
        f(&fg["kernel_to_run_init_ms"]["median"]),
        f(&fg["wall_minus_guest_clock_ms"]["median"]),
        f(&fg["console_bytes"]["median"]),
    );

    s.push_str(&phases_table(&r["phases"], "4. phases of a cold start"));
    s.push_str(&own_kernel::table(r));
    s.push_str(&warm::table(r));

    // Not measured with --warm-only.
    if !r["exec"].is_null() {
        let e = &r["exec"];
        let _ = writeln!(
            s,
            "\n5. exec{:<39} {:>8} {:>8} {:>8}  target",
            "", "median", "min", "max"
        );
        let _ = writeln!(
            s,
            "{:<44} {:>8.1} {:>8.1} {:>8.1}  {}: {}",
            "runv exec /bin/true (ms)",
            f(&e["true_ms"]["median"]),
            f(&e["true_ms"]["min"]),
            f(&e["true_ms"]["max"]),
            e["true_target"].as_str().unwrap_or(""),
            met_word(&e["true_met"])
        );
        let _ = writeln!(
            s,
            "{:<44} {:>8.1} {:>8.1} {:>8.1}  {}: {}",
            format!("runv exec dd {STDOUT_MIB} MiB → host (MiB/s)"),
            f(&e["stdout_mib_per_s"]["median"]),
            f(&e["stdout_mib_per_s"]["min"]),
            f(&e["stdout_mib_per_s"]["max"]),
            e["stdout_target"].as_str().unwrap_or(""),
            met_word(&e["stdout_met"])
        );
        let _ = writeln!(
            s,
            "{:<44} {:>8.1} {:>8.1} {:>8.1}",
            "  runv state (CLI alone, ms)",
            f(&e["cli_state_ms"]["median"]),
            f(&e["cli_state_ms"]["min"]),
            f(&e["cli_state_ms"]["max"]),
        );
        let _ = writeln!(
            s,
            "{:<44} {:>8.1} {:>8.1} {:>8.1}",
            "  guest dd → /dev/null, no relay (MiB/s)",
            f(&e["guest_dd_to_null_mib_per_s"]["median"]),
            f(&e["guest_dd_to_null_mib_per_s"]["min"]),
            f(&e["guest_dd_to_null_mib_per_s"]["max"]),
        );
        let _ = writeln!(
            s,
            "{:<44} {:>8.1}",
            "raw channel: runv-proto Mux, socketpair (MiB/s)",
            f(&r["raw_channel"]["mib_per_s"])
        );
    }

    let _ = writeln!(
        s,
        "\n6. memory per idle container (MiB){:<10} {:>8} {:>8} {:>8} {:>9} {:>9}  target",
        "", "mon RSS", "mon PSS", "qemu RSS", "qemu PSS", "guest RSS"
    );
    for (key, what) in [
        ("memory_one", ""),
        ("memory_one_own_kernel", ", runv's kernel"),
        ("memory_many", ""),
    ] {
        let mm = &r[key];
        if mm.is_null() {
            continue;
        }
        let pc = &mm["per_container_mib"];
        let _ = writeln!(
            s,
            "{:<44} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>9.1}  overhead PSS {:.1} {}: {}",
            format!("{} running (per container{what})", mm["containers"]),
            f(&pc["monitor_rss"]),
            f(&pc["monitor_pss"]),
            f(&pc["vmm_rss_excl_guest_ram"]),
            f(&pc["vmm_pss_excl_guest_ram"]),
            f(&pc["guest_ram_rss"]),
            f(&mm["per_container_overhead_pss_mib"]),
            mm["overhead_target"].as_str().unwrap_or(""),
            met_word(&mm["overhead_met"])
        );
    }
    let pc = &r["memory_many"]["per_container_mib"];
    let _ = writeln!(
        s,
        "  inside qemu, RSS/PSS per container: TCG code cache {:.1}/{:.1}, qemu's copy of the -kernel image {:.1}/{:.1}",
        f(&pc["vmm_tcg_code_cache_rss"]),
        f(&pc["vmm_tcg_code_cache_pss"]),
        f(&pc["vmm_kernel_image_copy_rss"]),
        f(&pc["vmm_kernel_image_copy_pss"]),
    );
    let fit = &r["memory_many"]["fit"];
    let _ = writeln!(
        s,
        "  fit in {:.0} MiB available: {:.0} idle containers as measured; {:.0} if every guest touches all {} MiB",
        f(&fit["mem_available_mib"]),
        f(&fit["idle_as_measured"]),
        f(&fit["guest_ram_fully_touched"]),
        r["vm_memory_mib"]
    );
    s.push_str(&nested::table(&r["nested_kvm"]));
    s.push_str(&pods::table(&r["pods"]));
    s
}

/// A phases section of the table (`p`: what [`phases_json`] made; nothing when it is null).
fn phases_table(p: &Value, title: &str) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    if p.is_null() {
        return s;
    }
    let _ = writeln!(
        s,
        "\n{title} (runv --debug run --keep + delete, {} runs; ms)",
        p["runs"]
    );
    let _ = writeln!(
        s,
        "{:<44} {:>8} {:>8} {:>8}",
        "phase", "median", "min", "max"
    );
    for ph in p["phases"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "{:<44} {:>8.1} {:>8.1} {:>8.1}",
            ph["phase"].as_str().unwrap_or(""),
            f(&ph["ms"]["median"]),
            f(&ph["ms"]["min"]),
            f(&ph["ms"]["max"])
        );
    }
    let mods: Vec<String> = p["modules"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            format!(
                "{} {:.0}",
                m["module"].as_str().unwrap_or(""),
                f(&m["ms"]["median"])
            )
        })
        .collect();
    if !mods.is_empty() {
        let _ = writeln!(s, "  modules (ms, median): {}", mods.join(", "));
    }
    let _ = writeln!(
        s,
        "  guest console: {:.0} bytes per boot",
        f(&p["console_bytes"]["median"])
    );
    s
}
