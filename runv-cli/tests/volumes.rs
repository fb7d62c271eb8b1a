//! Bind mounts of host paths (an engine's volumes) reach the container in the VM: read and
//! write, read-only where the spec says so, single files too; and nothing of the host's data
//! is lost when the container goes, even when its monitor was killed.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::Env;
use serde_json::json;

fn volume_bundle(env: &Env, name: &str, args: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
    let host = env.dir.join(format!("{name}-host"));
    fs::create_dir_all(host.join("rw")).unwrap();
    fs::create_dir_all(host.join("ro")).unwrap();
    fs::write(host.join("rw/in.txt"), "from the host\n").unwrap();
    fs::write(host.join("ro/keep.txt"), "keep me\n").unwrap();
    fs::write(host.join("extra.conf"), "setting=1\n").unwrap();
    let bundle = env.bundle(name, args);
    env.edit_spec(&bundle, |s| {
        let mounts = s["mounts"].as_array_mut().unwrap();
        mounts.push(json!({"destination": "/data", "type": "bind",
            "source": host.join("rw"), "options": ["rbind", "rw"]}));
        mounts.push(json!({"destination": "/ro", "type": "bind",
            "source": host.join("ro"), "options": ["bind", "ro"]}));
        mounts.push(json!({"destination": "/etc/extra.conf", "type": "bind",
            "source": host.join("extra.conf"), "options": ["bind"]}));
    });
    (bundle, host)
}

fn mounts_under(dir: &Path) -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(dir.to_str().unwrap()))
        .map(str::to_string)
        .collect()
}

#[test]
fn host_directories_and_files_are_mounted_in_the_container() {
    let env = Env::new("volumes");
    let (bundle, host) = volume_bundle(
        &env,
        "b",
        &[
            "sh",
            "-c",
            "cat /data/in.txt; echo written > /data/out.txt; cat /etc/extra.conf; \
             cat /ro/keep.txt; (echo x > /ro/new.txt) 2>/dev/null || echo ro-refused",
        ],
    );
    let out = env.run_ok(
        env.runv().args(["run", "--bundle"]).arg(&bundle).arg("v1"),
        180,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    for want in ["from the host", "setting=1", "keep me", "ro-refused"] {
        assert!(stdout.contains(want), "{want:?} in {stdout:?}");
    }
    assert_eq!(
        fs::read_to_string(host.join("rw/out.txt")).unwrap(),
        "written\n",
        "the container's write reached the host"
    );
    assert!(
        !host.join("ro/new.txt").exists(),
        "the read-only volume stayed read-only"
    );
    assert!(
        mounts_under(&env.root).is_empty(),
        "volume binds left: {:?}",
        mounts_under(&env.root)
    );
    env.assert_clean();
}

#[test]
fn force_delete_after_a_killed_monitor_keeps_the_hosts_data() {
    let env = Env::new("volumes-kill");
    let (bundle, host) = volume_bundle(&env, "b", &["sleep", "600"]);
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["run", "-d", "--bundle"])
            .arg(&bundle)
            .arg("v2"),
        180,
    );
    assert!(status.success(), "run -d: {err}");
    assert!(
        !mounts_under(&env.root).is_empty(),
        "the volumes are bound for the VM"
    );
    let monitor = env.state("v2")["pid"].as_i64().unwrap();
    Command::new("kill")
        .args(["-9", &monitor.to_string()])
        .status()
        .unwrap();
    env.run_ok(env.runv().args(["delete", "--force", "v2"]), 60);
    assert_eq!(
        fs::read_to_string(host.join("rw/in.txt")).unwrap(),
        "from the host\n",
        "the volume's data survives the delete"
    );
    assert!(host.join("ro/keep.txt").exists());
    assert!(host.join("extra.conf").exists());
    assert!(
        mounts_under(&env.root).is_empty(),
        "volume binds left: {:?}",
        mounts_under(&env.root)
    );
    env.assert_clean();
}
