//! Small host facts and pieces every VMM driver needs the same way.

use std::os::fd::OwnedFd;
use std::sync::Mutex;

/// A VM's agent channel, handed out once (`Vm::take_agent_channel`).
#[derive(Default)]
pub struct AgentChannel(Mutex<Option<OwnedFd>>);

impl AgentChannel {
    pub fn new(fd: OwnedFd) -> Self {
        Self(Mutex::new(Some(fd)))
    }

    /// Sets the channel (once the hypervisor has connected it).
    pub fn set(&self, fd: OwnedFd) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(fd);
    }

    pub fn take(&self) -> Result<OwnedFd, String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| "the agent channel was already taken".to_string())
    }
}

/// `Rss:` and `Pss:` of a /proc/<pid>/smaps_rollup text, in bytes (0 where absent).
pub fn parse_smaps_rollup(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("Rss:"), field("Pss:"))
}

/// `name` as found in `PATH`, if it is there.
pub fn find_in_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A driver's program (qemu, lkvm, xl): `parameter`, else the environment variable `env`
/// (each a path, or a name looked up in `PATH`, when set and not empty), else `default` from
/// `PATH`; `missing` says what to do when that is not found. `what` names it in errors.
pub fn find_program(
    parameter: Option<&str>,
    env: Option<&str>,
    default: &str,
    what: &str,
    missing: impl FnOnce() -> String,
) -> Result<std::path::PathBuf, String> {
    let from_env = env.and_then(|name| std::env::var(name).ok());
    let chosen = parameter
        .filter(|p| !p.is_empty())
        .or(from_env.as_deref().filter(|p| !p.is_empty()));
    match chosen {
        Some(p) if p.contains('/') => {
            if is_executable(std::path::Path::new(p)) {
                Ok(p.into())
            } else {
                Err(format!(
                    "the {what} binary {p} does not exist or is not executable"
                ))
            }
        }
        Some(name) => find_in_path(name).ok_or_else(|| format!("{name} not found in PATH")),
        None => find_in_path(default).ok_or_else(missing),
    }
}

/// Whether the `flags` line of /proc/cpuinfo names `vmx` (Intel VT-x) or `svm` (AMD-V): without
/// either, a `/dev/kvm` (such as the `kvm_pvm` module's) cannot boot a stock kernel.
pub fn cpuinfo_has_virt_flag(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .filter_map(|l| l.split_once(':'))
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_by_path_name_or_default() {
        assert_eq!(
            find_program(Some("/bin/sh"), None, "x", "shell", String::new).unwrap(),
            std::path::PathBuf::from("/bin/sh")
        );
        let err = find_program(Some("/nonexistent/q"), None, "x", "qemu", String::new).unwrap_err();
        assert_eq!(
            err,
            "the qemu binary /nonexistent/q does not exist or is not executable"
        );
        let err = find_program(Some("no-such-prog-x"), None, "x", "q", String::new).unwrap_err();
        assert_eq!(err, "no-such-prog-x not found in PATH");
        let err = find_program(Some(""), None, "no-such-prog-y", "q", || "install y".into());
        assert_eq!(err.unwrap_err(), "install y");
    }

    #[test]
    fn the_agent_channel_is_taken_once() {
        let channel = AgentChannel::default();
        assert!(channel.take().is_err());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        channel.set(a.into());
        assert!(channel.take().is_ok());
        assert!(channel.take().unwrap_err().contains("already taken"));
    }

    #[test]
    fn smaps_rollup_fields() {
        let text = "55d0-7ffc ---p 00000000 00:00 0 [rollup]\nRss:   123 kB\nPss:  45 kB\n";
        assert_eq!(parse_smaps_rollup(text), (123 * 1024, 45 * 1024));
        assert_eq!(parse_smaps_rollup(""), (0, 0));
    }

    #[test]
    fn virt_flag_is_a_whole_word_of_the_flags_line() {
        assert!(cpuinfo_has_virt_flag("flags\t: fpu svm tsc\n"));
        assert!(cpuinfo_has_virt_flag("flags : vmx\n"));
        assert!(!cpuinfo_has_virt_flag("flags\t: fpu nosvmx tsc\n"));
        assert!(!cpuinfo_has_virt_flag("model name : svm\n"));
    }
}
