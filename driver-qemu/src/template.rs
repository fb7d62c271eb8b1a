//! Templates: a VM booted with its RAM in a shared file, saved as device state alone, and
//! clones restored from it with that file mapped privately (copy-on-write).
//!
//! Checked with QEMU 7.2 (see ARCHITECTURE.md §2): `x-ignore-shared` makes `migrate` skip RAM
//! blocks backed by a shared file, so the state is ~50 KB; 7.2 has no `file:` URI, so the
//! state file goes to qemu open, by QMP `getfd` (an `fd:` URI: no shell, so qemu's sandbox
//! denies spawning for templates too), and the capability cannot be set on the command line
//! (hence QMP on both sides).
//! A clone runs with `-S`: it stays paused after the state is loaded until we `cont`, after
//! its agent channel is connected (the template's host was connected when it was saved; a
//! host connected before the load keeps the guest from seeing its port close).

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::QemuVm;
use crate::cmdline::escape;

/// The memory backend's QOM id.
const MEMORY_ID: &str = "runv-mem";
/// How long saving or loading the device state may take (it is small; TCG is slow).
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(60);

/// Puts the guest RAM into `memory_file`: shared (a template: writes reach the file) or
/// private (a clone: writes stay in the clone's copy-on-write pages). A clone also waits for
/// its state (`-incoming defer`) and stays paused after loading it (`-S`).
pub fn memory_args(
    args: &mut Vec<String>,
    memory_file: &Path,
    memory_mib: u64,
    shared: bool,
    incoming: bool,
) -> Result<(), String> {
    let path = memory_file
        .to_str()
        .ok_or_else(|| format!("path {} is not UTF-8", memory_file.display()))?;
    let machine = args
        .iter()
        .position(|a| a == "-M")
        .and_then(|i| args.get_mut(i + 1))
        .ok_or("the qemu command line has no -M")?;
    machine.push_str(&format!(",memory-backend={MEMORY_ID}"));
    args.extend([
        "-object".to_string(),
        format!(
            "memory-backend-file,id={MEMORY_ID},size={memory_mib}M,mem-path={},share={}",
            escape(path),
            if shared { "on" } else { "off" }
        ),
    ]);
    if incoming {
        args.extend(["-incoming", "defer", "-S"].map(String::from));
    }
    Ok(())
}

fn ignore_shared(vm: &QemuVm) -> Result<(), String> {
    vm.qmp_call(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
    )
    .map(drop)
}

/// The name the state file's fd has in qemu (`getfd`).
const STATE_FD: &str = "runv-state";

/// Pauses the VM and writes its device state to `dir/state` (the RAM stays in its file).
/// The VM stays paused; the caller ends it.
pub fn save(vm: &QemuVm, dir: &Path) -> Result<(), String> {
    let state = dir.join(runv_api::TEMPLATE_STATE_FILE);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&state)
        .map_err(|e| format!("creating {}: {e}", state.display()))?;
    vm.qmp_call("stop", None)?;
    ignore_shared(vm)?;
    vm.qmp_call_with_file(
        STATE_FD,
        &file,
        "migrate",
        Some(json!({"uri": format!("fd:{STATE_FD}")})),
    )?;
    let deadline = Instant::now() + MIGRATE_TIMEOUT;
    loop {
        let info = vm.qmp_call("query-migrate", None)?;
        match info.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                let why = info
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no reason given");
                return Err(format!("saving the VM state failed: {why}"));
            }
            _ if Instant::now() > deadline => {
                return Err(format!(
                    "saving the VM state took more than {}s",
                    MIGRATE_TIMEOUT.as_secs()
                ));
            }
            _ => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Loads `template_dir/state` into a VM started with [`memory_args`] (incoming), then
/// resumes it.
pub fn load(vm: &QemuVm, template_dir: &Path) -> Result<(), String> {
    let state = template_dir.join(runv_api::TEMPLATE_STATE_FILE);
    let file =
        std::fs::File::open(&state).map_err(|e| format!("opening {}: {e}", state.display()))?;
    ignore_shared(vm)?;
    vm.qmp_call_with_file(
        STATE_FD,
        &file,
        "migrate-incoming",
        Some(json!({"uri": format!("fd:{STATE_FD}")})),
    )?;
    // qemu exits when the state does not fit the machine: its stderr says why.
    let deadline = Instant::now() + MIGRATE_TIMEOUT;
    loop {
        if let Some(why) = vm.exit_error() {
            return Err(format!("loading the template state: {why}"));
        }
        match vm.qmp_status() {
            Ok(status) if status == "paused" => break,
            Ok(status) if status == "inmigrate" => {}
            Ok(status) => {
                return Err(format!("loading the template state left the VM {status}"));
            }
            Err(e) => {
                if let Some(why) = vm.exit_error() {
                    return Err(format!("loading the template state: {why}"));
                }
                return Err(format!("loading the template state: {e}"));
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "loading the template state took more than {}s",
                MIGRATE_TIMEOUT.as_secs()
            ));
        }
        thread::sleep(Duration::from_millis(5));
    }
    vm.qmp_call("cont", None).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_backend_args() {
        let mut args: Vec<String> = ["-M", "microvm,acpi=on", "-m", "128M"]
            .map(String::from)
            .to_vec();
        memory_args(&mut args, Path::new("/t/a,b/memory"), 128, false, true).unwrap();
        assert_eq!(args[1], "microvm,acpi=on,memory-backend=runv-mem");
        assert!(
            args.contains(
                &"memory-backend-file,id=runv-mem,size=128M,mem-path=/t/a,,b/memory,share=off"
                    .to_string()
            )
        );
        assert!(args.ends_with(&["-incoming", "defer", "-S"].map(String::from)));

        let mut args: Vec<String> = ["-M", "pc"].map(String::from).to_vec();
        memory_args(&mut args, Path::new("/t/memory"), 64, true, false).unwrap();
        assert!(args.last().unwrap().ends_with("share=on"));
        assert!(!args.contains(&"-incoming".to_string()));
        assert!(memory_args(&mut vec![], Path::new("/m"), 1, true, false).is_err());
    }
}
