//! A hostile guest (issue 18, item 2), on a real VM: a fork bomb in an ordinary container
//! must leave the agent (PID 1) and the VM alive, and exec, kill and delete working.

mod common;

use std::time::{Duration, Instant};

use common::{Env, text, wait_until};

#[test]
fn a_fork_bomb_leaves_the_agent_exec_kill_and_delete_working() {
    let env = Env::new("forkbomb");
    // The bomb runs beside the init (which execs sleep, so the init itself never needs to
    // fork again and the container stays up while the bomb fills its pids).
    let bundle = env.bundle(
        "b",
        &["sh", "-c", "sh -c 'b(){ b|b& }; b' & exec sleep 100000"],
    );
    let (status, _, err) = env.run_files(
        env.runv()
            .args(["run", "-d", "--bundle"])
            .arg(&bundle)
            .arg("fb"),
        180,
    );
    assert!(status.success(), "run -d: {err}");

    // Let the bomb reach the limits (under TCG a fork takes a while).
    std::thread::sleep(Duration::from_secs(20));
    assert_eq!(env.state("fb")["status"], "running", "the VM died");

    // While the pids are exhausted an exec may be refused (one line); it must get through
    // once a slot frees up, which a churning bomb does all the time.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut errors = Vec::new();
    loop {
        let (status, out, err) = env.run_files(env.runv().args(["exec", "fb", "echo", "ok"]), 120);
        if status.success() && out == "ok\n" {
            break;
        }
        errors.push(format!("{status}: {}", err.trim()));
        assert!(
            Instant::now() < deadline,
            "exec never got through: {errors:?}"
        );
        assert_eq!(
            env.state("fb")["status"],
            "running",
            "the VM died: {errors:?}"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!("exec got through after {} refusals", errors.len());

    let out = env.run(env.runv().args(["kill", "fb", "KILL"]), 60);
    assert!(out.status.success(), "kill: {}", text(&out.stderr));
    wait_until(120, "the container to stop", || {
        env.state("fb")["status"] == "stopped"
    });
    let out = env.run(env.runv().args(["delete", "fb"]), 60);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    env.assert_clean();
}
