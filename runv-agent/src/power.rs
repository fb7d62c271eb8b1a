//! Ending the VM. Its own module because both boot (`init`, when no channel comes up) and the
//! server (when the host or the last container goes) end it.

use std::time::Duration;

use nix::sys::reboot::{RebootMode, reboot};

/// Syncs and ends the VM: power off, or reboot when `runv.exit=reboot` (for hypervisors
/// without ACPI power-off; qemu runs with -no-reboot, so either ends it).
pub fn power_off(reboot_instead: bool) -> ! {
    nix::unistd::sync();
    let mode = if reboot_instead {
        RebootMode::RB_AUTOBOOT
    } else {
        RebootMode::RB_POWER_OFF
    };
    let e = reboot(mode);
    crate::error!("reboot: {e:?}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
