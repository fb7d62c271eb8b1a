//! Size caps for the VM's logs. The guest console and the VMM's stderr are written by the VMM
//! (appending), for as long as the container lives; the default root `/run/runv` is a tmpfs,
//! so an unbounded log is host RAM. The monitor rotates them: past the cap the file is copied
//! to `<name>.1` (replacing the previous one) and truncated. Writers append (O_APPEND), so
//! they carry on at the new end.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The cap per log file; with the `.1` file a log takes at most twice this. A constant for
/// now: a `runv.toml` or an annotation could set it (the monitor reads it at start).
pub const MAX_LOG_BYTES: u64 = 1 << 20;
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Watches `logs` for the life of the monitor.
pub fn spawn_rotation(logs: Vec<PathBuf>) {
    let spawned = std::thread::Builder::new()
        .name("log-rotation".into())
        .spawn(move || {
            loop {
                for log in &logs {
                    if let Err(e) = rotate_if_large(log, MAX_LOG_BYTES) {
                        tracing::warn!("rotating {}: {e}", log.display());
                    }
                }
                std::thread::sleep(CHECK_EVERY);
            }
        });
    if let Err(e) = spawned {
        // Not fatal: the container works, only its logs are not capped.
        tracing::warn!("cannot start the log rotation thread: {e}");
    }
}

/// Moves the content of `log` to `log.1` when it is larger than `max`. Returns whether it did.
pub fn rotate_if_large(log: &Path, max: u64) -> std::io::Result<bool> {
    match fs::metadata(log) {
        Ok(m) if m.len() > max => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    }
    let mut name = log.as_os_str().to_owned();
    name.push(".1");
    let old = PathBuf::from(name);
    let bytes = fs::read(log)?;
    // Only the last `max` bytes go to `.1`: a burst between two checks is capped too.
    let tail = &bytes[bytes.len().saturating_sub(max as usize)..];
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(crate::state::FILE_MODE)
        .open(&old)?;
    f.write_all(tail)?;
    // What the writer appended between the read and now is lost; a few lines at most.
    OpenOptions::new().write(true).open(log)?.set_len(0)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_log_moves_to_dot_one_and_an_appending_writer_carries_on() {
        let dir = std::env::temp_dir().join(format!("runv-logs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("console.log");
        let mut writer = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        writer.write_all(&[b'a'; 100]).unwrap();
        assert!(!rotate_if_large(&log, 100).unwrap());
        writer.write_all(&[b'b'; 100]).unwrap();
        assert!(rotate_if_large(&log, 100).unwrap());
        assert_eq!(
            fs::read(dir.join("console.log.1")).unwrap(),
            vec![b'b'; 100]
        );
        assert_eq!(fs::metadata(&log).unwrap().len(), 0);
        writer.write_all(b"next").unwrap();
        assert_eq!(fs::read(&log).unwrap(), b"next");
        assert!(!rotate_if_large(&dir.join("absent.log"), 100).unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }
}
