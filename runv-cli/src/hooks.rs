//! OCI hooks, run on the host at the spec's points with the container state on stdin.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

#[derive(Clone, Copy, Debug)]
pub enum Point {
    Prestart,
    CreateRuntime,
    CreateContainer,
    StartContainer,
    Poststart,
    Poststop,
}

impl Point {
    fn key(self) -> &'static str {
        match self {
            Point::Prestart => "prestart",
            Point::CreateRuntime => "createRuntime",
            Point::CreateContainer => "createContainer",
            Point::StartContainer => "startContainer",
            Point::Poststart => "poststart",
            Point::Poststop => "poststop",
        }
    }
}

/// Runs every hook of `point` in order; the first failure stops the rest.
pub fn run(spec: &Value, point: Point, state: &Value) -> anyhow::Result<()> {
    let Some(hooks) = spec["hooks"][point.key()].as_array() else {
        return Ok(());
    };
    let input = serde_json::to_vec(state)?;
    for hook in hooks {
        run_one(hook, &input).with_context(|| format!("{} hook", point.key()))?;
    }
    Ok(())
}

fn run_one(hook: &Value, input: &[u8]) -> anyhow::Result<()> {
    let path = hook["path"].as_str().context("hook without a path")?;
    let args: Vec<&str> = hook["args"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut cmd = Command::new(path);
    if let Some((argv0, rest)) = args.split_first() {
        use std::os::unix::process::CommandExt;
        cmd.arg0(argv0).args(rest);
    }
    if let Some(env) = hook["env"].as_array() {
        cmd.env_clear();
        for kv in env.iter().filter_map(Value::as_str) {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
    }
    let timeout = hook["timeout"].as_u64().map(Duration::from_secs);
    let mut child = cmd
        .stdin(state_input(input)?)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {path}"))?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if timeout.is_some_and(|t| started.elapsed() > t) {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{path} timed out after {}s",
                timeout.unwrap_or_default().as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        bail!("{path} failed ({status}): {}", err.trim());
    }
    Ok(())
}

/// The hook's stdin: the state in an anonymous file, not a pipe. A hook may exit without
/// reading its input (that is not an error), and writing to a pipe it closed raises SIGPIPE,
/// which kills the runv command (the CLI keeps SIGPIPE's default); a pipe would also block a
/// large state until the hook reads, past its timeout.
fn state_input(input: &[u8]) -> anyhow::Result<Stdio> {
    use std::io::{Seek, SeekFrom};
    let fd = nix::sys::memfd::memfd_create(
        c"runv-hook-state",
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .context("creating the hook's input")?;
    let mut file = std::fs::File::from(fd);
    file.write_all(input)
        .and_then(|()| file.seek(SeekFrom::Start(0)).map(drop))
        .context("writing the hook's input")?;
    Ok(Stdio::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_get_state_on_stdin_and_failures_are_reported() {
        let dir = std::env::temp_dir().join(format!("runv-hooks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("state");
        let spec = serde_json::json!({"hooks": {"prestart": [
            {"path": "/bin/sh", "args": ["sh", "-c", format!("cat > {}", out.display())]}
        ], "poststop": [
            {"path": "/bin/sh", "args": ["sh", "-c", "echo nope >&2; exit 3"]}
        ]}});
        let state = serde_json::json!({"id": "c1", "status": "created"});
        run(&spec, Point::Prestart, &state).unwrap();
        let seen: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        assert_eq!(seen["id"], "c1");
        let err = format!("{:#}", run(&spec, Point::Poststop, &state).unwrap_err());
        assert!(
            err.contains("poststop hook") && err.contains("nope"),
            "{err}"
        );
        run(&spec, Point::Poststart, &state).unwrap();
        // A hook that never reads a large state is neither a failure nor a hang.
        let quiet = serde_json::json!({"hooks": {"poststop": [
            {"path": "/bin/sh", "args": ["sh", "-c", "exit 0"], "timeout": 10}
        ]}});
        let big = serde_json::json!({"id": "c1", "annotations": {"k": "v".repeat(1 << 20)}});
        run(&quiet, Point::Poststop, &big).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
