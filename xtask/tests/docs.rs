//! `cargo xtask man` pages render with `man -l`; `cargo xtask completions`' bash script
//! completes subcommands and, from `runv list -q`, container ids.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::{TempDir, target_dir};

fn xtask(args: &[&str], out: &Path) {
    let st = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
}

#[test]
fn every_man_page_renders() {
    let dir = TempDir(std::env::temp_dir().join(format!("runv-man-{}", std::process::id())));
    xtask(&["man"], &dir.0);
    let mut pages: Vec<String> = fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    pages.sort();
    for want in [
        "runv.1",
        "runv-run.1",
        "runv-exec.1",
        "runv-drivers.1",
        "runv-config-show.1",
    ] {
        assert!(pages.iter().any(|p| p == want), "{want} missing: {pages:?}");
    }
    for page in &pages {
        let out = Command::new("man")
            .arg("-l")
            .arg(dir.0.join(page))
            .env("MANWIDTH", "80")
            .output()
            .expect("man not found: install man-db (scripts/setup.sh does)");
        assert!(
            out.status.success(),
            "man -l {page}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = plain(&String::from_utf8_lossy(&out.stdout));
        let name = page.trim_end_matches(".1");
        assert!(
            text.contains("NAME") && text.contains(name),
            "{page}: {text}"
        );
        // troff's "cannot adjust line" is about justifying long words, not an error (lintian
        // ignores it too); anything else it says is a broken page.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let real: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.contains("cannot adjust line"))
            .collect();
        assert!(real.is_empty(), "man -l {page}: {real:?}");
    }
}

/// man's output without overstrikes (`N\bN` for bold, `_\bx` for underline).
fn plain(text: &str) -> String {
    let mut out: Vec<char> = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if chars.peek() == Some(&'\u{8}') {
            chars.next();
            continue;
        }
        out.push(c);
    }
    out.into_iter().collect()
}

#[test]
fn bash_completes_subcommands_and_container_ids() {
    let dir = TempDir(std::env::temp_dir().join(format!("runv-compl-{}", std::process::id())));
    let out = dir.0.join("completions");
    xtask(&["completions"], &out);
    for f in ["runv.bash", "_runv", "runv.fish"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let runv_dir = target_dir().join("debug");
    assert!(runv_dir.join("runv").exists(), "build the workspace first");
    // Containers as `runv list -q` sees them: state dirs under a private root (without a
    // state.json they are listed as damaged, which is all completion needs).
    let root = dir.0.join("root");
    for id in ["web1", "web2", "db"] {
        fs::create_dir_all(root.join(id)).unwrap();
    }
    let script = format!(
        r#"
source {script}
words() {{
    COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMPREPLY=()
    _runv_with_ids runv "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
    printf '%s\n' "${{COMPREPLY[@]}}" | sort | tr '\n' ' '; echo
}}
words runv sta
words runv pa
words runv --root {root} kill we
words runv --root={root} exec --cwd /tmp d
words runv --root {root} kill web1 S
words runv --root {root} list w
"#,
        script = out.join("runv.bash").display(),
        root = root.display(),
    );
    let path = format!(
        "{}:{}",
        runv_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let res = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .env("PATH", path)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let stdout = String::from_utf8_lossy(&res.stdout);
    let lines: Vec<&str> = stdout.lines().map(str::trim).collect();
    assert_eq!(
        lines,
        ["start state", "pause", "web1 web2", "db", "", ""],
        "{stdout}"
    );
}
