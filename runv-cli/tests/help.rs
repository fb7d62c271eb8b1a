//! `runv help <cmd>` and `runv <cmd> --help` show the command's usage.

use std::process::Command;

#[test]
fn help_for_each_command() {
    for args in [
        &["help", "run"][..],
        &["run", "--help"],
        &["help", "config", "show"],
        &["help", "drivers"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_runv"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let cmd = args.iter().filter(|a| !a.starts_with('-') && **a != "help");
        let usage = format!("Usage: runv {}", cmd.copied().collect::<Vec<_>>().join(" "));
        assert!(text.contains(&usage), "{args:?}: {text}");
    }
}
