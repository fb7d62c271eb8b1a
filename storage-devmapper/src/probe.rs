//! Whether device-mapper thin pools can be used on this host, and why not.

use std::path::Path;

use crate::dm::{DM_CONTROL, Dm};
use crate::tools;

/// Why device-mapper cannot be used here, if it cannot.
pub fn probe_host() -> Result<(), String> {
    if !Path::new(DM_CONTROL).exists() {
        return Err(format!(
            "no {DM_CONTROL} (device-mapper not in this kernel: load dm-mod and dm-thin-pool)"
        ));
    }
    if !nix::unistd::geteuid().is_root() {
        return Err("the devmapper storage driver needs root".into());
    }
    if !Dm::open()?.targets()?.iter().any(|t| t == "thin-pool") {
        return Err("device-mapper has no thin-pool target: load dm-thin-pool \
                    (modprobe crc32c first)"
            .into());
    }
    if let Some(tool) = tools::PROGRAMS.into_iter().find(|t| !tools::in_path(t)) {
        return Err(format!("{tool} not found in PATH (e2fsprogs / util-linux)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_explains_a_missing_device_mapper() {
        if Path::new(DM_CONTROL).exists() {
            // tests/devmapper.rs runs the probe where device-mapper is.
            eprintln!("skipped: {DM_CONTROL} exists here");
            return;
        }
        assert_eq!(
            probe_host().unwrap_err(),
            "no /dev/mapper/control (device-mapper not in this kernel: load dm-mod and dm-thin-pool)"
        );
    }
}
