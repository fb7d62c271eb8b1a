//! Parsers the bench needs for runv's own output: RFC 3339 times of the JSON log, the shell-quoted
//! qemu command line of `hypervisor.log`, guest console timestamps, `/proc/PID/smaps*`.

/// Nanoseconds since the Unix epoch of an RFC 3339 time such as `2026-11-28T23:44:39.381496208Z`
/// (`Z` or a `±HH:MM` offset).
pub fn rfc3339_ns(s: &str) -> Option<i128> {
    let (date, rest) = s.split_once(['T', 't', ' '])?;
    let mut d = date.split('-');
    let y: i64 = d.next()?.parse().ok()?;
    let mo: u32 = d.next()?.parse().ok()?;
    let da: u32 = d.next()?.parse().ok()?;
    let (time, offset_s) = if let Some(t) = rest.strip_suffix(['Z', 'z']) {
        (t, 0i64)
    } else {
        let i = rest.rfind(['+', '-'])?;
        let (t, off) = rest.split_at(i);
        let sign = if off.starts_with('-') { -1 } else { 1 };
        let (h, m) = off[1..].split_once(':')?;
        (
            t,
            sign * (h.parse::<i64>().ok()? * 3600 + m.parse::<i64>().ok()? * 60),
        )
    };
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':');
    let h: i64 = t.next()?.parse().ok()?;
    let mi: i64 = t.next()?.parse().ok()?;
    let se: i64 = t.next()?.parse().ok()?;
    let mut nanos: i128 = 0;
    if !frac.is_empty() {
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        nanos = digits.parse().ok()?;
    }
    let secs = days_from_civil(y, mo, da) * 86400 + h * 3600 + mi * 60 + se - offset_s;
    Some(secs as i128 * 1_000_000_000 + nanos)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Splits a command line quoted the way the qemu driver logs it (bare words and `'...'` with
/// `'\''` for a quote).
pub fn shell_split(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                for q in chars.by_ref() {
                    if q == '\'' {
                        break;
                    }
                    cur.push(q);
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// The floor's qemu arguments from the driver's: same machine, accelerator, CPU, memory, vCPUs,
/// kernel and kernel command line (minus `runv.*` parameters); no devices, no initrd (the caller
/// adds its own), the serial console into `console_log` as the driver does.
pub fn floor_args(driver_args: &[String], initrd: &str, console_log: &str) -> Vec<String> {
    const FLAGS: &[&str] = &["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"];
    const VALUED: &[&str] = &["-M", "-machine", "-accel", "-cpu", "-m", "-smp", "-kernel"];
    let mut out = Vec::new();
    let mut i = 0;
    while i < driver_args.len() {
        let a = driver_args[i].as_str();
        let value = driver_args.get(i + 1);
        if FLAGS.contains(&a) {
            out.push(a.to_string());
            i += 1;
            continue;
        }
        if let Some(v) = value {
            if VALUED.contains(&a) {
                out.extend([a.to_string(), v.clone()]);
            } else if a == "-append" {
                let kept: Vec<&str> = v
                    .split_whitespace()
                    .filter(|p| !p.starts_with("runv."))
                    .collect();
                out.extend([a.to_string(), kept.join(" ")]);
            }
        }
        // Every other option (devices, chardevs, -name, -initrd, ...) is dropped with its value.
        i += if a.starts_with('-') && value.is_some_and(|v| !v.starts_with('-')) {
            2
        } else {
            1
        };
    }
    out.extend([
        "-initrd".to_string(),
        initrd.to_string(),
        "-chardev".to_string(),
        format!("file,id=console,path={}", console_log.replace(',', ",,")),
        "-serial".to_string(),
        "chardev:console".to_string(),
    ]);
    out
}

/// One line of the guest console: `[    1.886186] Run /init as init process` → (1.886186, text).
pub fn console_line(line: &str) -> Option<(f64, &str)> {
    let rest = line.trim_start().strip_prefix('[')?;
    let (ts, text) = rest.split_once(']')?;
    Some((ts.trim().parse().ok()?, text.trim_start()))
}

/// Guest-side marks of a boot, in seconds of the guest clock since the kernel started.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct GuestMarks {
    /// `Trying to unpack rootfs image as initramfs...` → `Freeing initrd memory`.
    pub initrd_unpack: Option<(f64, f64)>,
    /// `Run /init as init process`.
    pub run_init: Option<f64>,
    /// `runv-agent: info: starting runv-agent`.
    pub agent_start: Option<f64>,
    /// `runv-agent: debug: modules loaded after N ms`.
    pub modules_done: Option<f64>,
    /// `runv-agent: info: channel <name> open after N ms`.
    pub channel_open: Option<f64>,
    /// `runv-agent: info: host connected` (the host's hello arrived: ≈ the host's agent-ready).
    pub host_connected: Option<f64>,
    /// Per-module load times in ms, in load order.
    pub modules: Vec<(String, f64)>,
    /// Characters the console carried (serial output costs time under TCG).
    pub console_bytes: usize,
    /// The last timestamp on the console.
    pub last: Option<f64>,
}

pub fn guest_marks(console: &str) -> GuestMarks {
    let mut m = GuestMarks {
        console_bytes: console.len(),
        ..GuestMarks::default()
    };
    let mut unpack_start = None;
    for line in console.lines() {
        let Some((ts, text)) = console_line(line) else {
            continue;
        };
        m.last = Some(ts);
        if text.starts_with("Trying to unpack rootfs image") {
            unpack_start = Some(ts);
        } else if text.starts_with("Freeing initrd memory") {
            if let Some(s) = unpack_start {
                m.initrd_unpack = Some((s, ts));
            }
        } else if text.starts_with("Run /init as init process") {
            m.run_init.get_or_insert(ts);
        } else if let Some(agent) = text.strip_prefix("runv-agent: ") {
            if agent.starts_with("info: starting runv-agent") {
                m.agent_start.get_or_insert(ts);
            } else if agent.starts_with("debug: modules loaded after") {
                m.modules_done.get_or_insert(ts);
            } else if agent.starts_with("info: channel ") && agent.contains(" open after ") {
                // "channel virtio-serial open after N ms" (older agents: "channel open ...")
                m.channel_open.get_or_insert(ts);
            } else if agent.starts_with("info: host connected") {
                m.host_connected.get_or_insert(ts);
            } else if let Some(rest) = agent.strip_prefix("debug: module ") {
                // "virtio_ring loaded in 36.9 ms"
                if let Some((name, t)) = rest.split_once(" loaded in ") {
                    if let Some(ms) = t.strip_suffix(" ms").and_then(|v| v.parse().ok()) {
                        m.modules.push((name.to_string(), ms));
                    }
                }
            }
        }
    }
    m
}

/// `Rss:` and `Pss:` (kB) of a `/proc/PID/smaps_rollup` text.
pub fn rollup_rss_pss(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("Rss:"), field("Pss:"))
}

/// Rss/Pss (kB) of the parts of a qemu process that matter, from its `/proc/PID/smaps`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct QemuMaps {
    /// Guest RAM: the anonymous, non-executable mapping closest in size to (and at least) the
    /// VM's memory.
    pub guest_ram: (u64, u64),
    /// TCG's translated-code buffer: anonymous executable mappings (none under KVM).
    pub code_cache: (u64, u64),
    /// qemu's private copy of the kernel image it loaded (`-kernel` file mapped private).
    pub kernel_image: (u64, u64),
}

pub fn qemu_maps(smaps: &str, ram_kb: u64, kernel: &str) -> QemuMaps {
    struct Map {
        size: u64,
        rss: u64,
        pss: u64,
        exec: bool,
        path: Option<String>,
    }
    let mut maps: Vec<Map> = Vec::new();
    let kb = |v: &str| {
        v.trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .unwrap_or(0)
    };
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // A mapping header: "addr-addr perms offset dev inode [path]".
            let perms = words.next().unwrap_or("");
            maps.push(Map {
                size: 0,
                rss: 0,
                pss: 0,
                exec: perms.contains('x'),
                path: words.nth(3).map(str::to_string),
            });
        } else if let Some(m) = maps.last_mut() {
            if let Some(v) = line.strip_prefix("Size:") {
                m.size = kb(v);
            } else if let Some(v) = line.strip_prefix("Rss:") {
                m.rss = kb(v);
            } else if let Some(v) = line.strip_prefix("Pss:") {
                m.pss = kb(v);
            }
        }
    }
    let mut out = QemuMaps::default();
    if let Some(ram) = maps
        .iter()
        // A clone's RAM is a private mapping of its template's `memory` file, not anonymous.
        .filter(|m| {
            m.path.as_deref().is_none_or(|p| p.ends_with("/memory")) && !m.exec && m.size >= ram_kb
        })
        .min_by_key(|m| m.size)
    {
        out.guest_ram = (ram.rss, ram.pss);
    }
    for m in &maps {
        if m.path.is_none() && m.exec {
            out.code_cache.0 += m.rss;
            out.code_cache.1 += m.pss;
        }
        if !kernel.is_empty() && m.path.as_deref() == Some(kernel) {
            out.kernel_image.0 += m.rss;
            out.kernel_image.1 += m.pss;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_ns("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_ns("2026-11-28T23:44:39.381496208Z"),
            Some(1_795_909_479_381_496_208)
        );
        assert_eq!(
            rfc3339_ns("2000-03-01T00:00:01.5+01:00"),
            Some(951_865_201_500_000_000)
        );
        assert_eq!(rfc3339_ns("nonsense"), None);
    }

    #[test]
    fn split_and_floor_args() {
        let line = "/usr/bin/qemu -nodefaults -no-reboot -name t2 -M microvm,acpi=on -accel tcg \
                    -cpu max -m 128M -smp 1 -kernel /g/vmlinux -initrd /g/initrd.img -append \
                    'console=ttyS0 runv.exit=reboot panic=-1 runv.log=debug' -chardev \
                    file,id=console,path=/r/c.log,append=on -serial chardev:console -device \
                    virtio-serial-device -fsdev 'local,id=fs0,path=/b/it'\\''s' -device x";
        let a = shell_split(line);
        assert_eq!(a[0], "/usr/bin/qemu");
        assert!(a.contains(&"console=ttyS0 runv.exit=reboot panic=-1 runv.log=debug".into()));
        assert!(a.contains(&"local,id=fs0,path=/b/it's".into()));
        let f = floor_args(&a[1..], "/t/floor.cpio", "/t/console.log");
        assert_eq!(
            f.join(" "),
            "-nodefaults -no-reboot -M microvm,acpi=on -accel tcg -cpu max -m 128M -smp 1 \
             -kernel /g/vmlinux -append console=ttyS0 panic=-1 -initrd /t/floor.cpio \
             -chardev file,id=console,path=/t/console.log -serial chardev:console"
        );
    }

    #[test]
    fn console_marks() {
        let c = "[    0.866087] Trying to unpack rootfs image as initramfs...\n\
                 [    1.086943] Freeing initrd memory: 2372K\n\
                 [    1.886186] Run /init as init process\n\
                 [    2.014401] runv-agent: info: starting runv-agent 0.1.0\n\
                 [    2.066925] runv-agent: debug: module virtio_ring loaded in 36.9 ms\n\
                 [    2.400000] runv-agent: debug: modules loaded after 390 ms\n\
                 [    2.410000] runv-agent: info: channel virtio-serial open after 400 ms\n\
                 [    2.420000] runv-agent: info: host connected: runv 0.1.0\n";
        let m = guest_marks(c);
        assert_eq!(m.initrd_unpack, Some((0.866087, 1.086943)));
        assert_eq!(m.run_init, Some(1.886186));
        assert_eq!(m.agent_start, Some(2.014401));
        assert_eq!(m.modules_done, Some(2.4));
        assert_eq!(m.channel_open, Some(2.41));
        assert_eq!(m.host_connected, Some(2.42));
        assert_eq!(m.modules, vec![("virtio_ring".to_string(), 36.9)]);
        assert_eq!(m.last, Some(2.42));
    }

    #[test]
    fn smaps() {
        assert_eq!(rollup_rss_pss("Rss:   100 kB\nPss:  50 kB\n"), (100, 50));
        let s = "00400000-00500000 r-xp 00000000 08:01 123 /usr/bin/qemu\n\
                 Size: 1024 kB\nRss: 900 kB\nPss: 300 kB\n\
                 7f0000000000-7f0008000000 rw-p 00000000 00:00 0 \n\
                 Size: 131072 kB\nRss: 20000 kB\nPss: 20000 kB\n\
                 7f1000000000-7f1000100000 rw-p 00000000 00:00 0\n\
                 Size: 1024 kB\nRss: 10 kB\nPss: 10 kB\n";
        let m = qemu_maps(s, 131072, "/usr/bin/qemu");
        assert_eq!(m.guest_ram, (20000, 20000));
        assert_eq!(m.code_cache, (0, 0));
        assert_eq!(m.kernel_image, (900, 300));
        let big = format!(
            "{s}7f2000000000-7f2040000000 rwxp 00000000 00:00 0\nSize: 1048576 kB\nRss: 5000 kB\nPss: 5000 kB\n"
        );
        let m = qemu_maps(&big, 131072, "");
        assert_eq!(
            m.guest_ram,
            (20000, 20000),
            "the bigger code buffer is not guest RAM"
        );
        assert_eq!(m.code_cache, (5000, 5000));
        let clone = "7f3000000000-7f3008000000 rw-p 00000000 00:2a 77 /var/lib/runv/templates/k/memory (deleted)\n\
                     Size: 131072 kB\nRss: 30000 kB\nPss: 3000 kB\n";
        let m = qemu_maps(clone, 131072, "");
        assert_eq!(
            m.guest_ram,
            (30000, 3000),
            "a clone's RAM is its template's file"
        );
        assert_eq!(qemu_maps(s, 262144, "").guest_ram, (0, 0));
    }
}
