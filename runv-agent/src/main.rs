//! runv-agent: PID 1 of a runv guest. See `init` for boot, `server` for the protocol,
//! `helper` for how container processes are made.

#[macro_use]
mod log;
mod forker;
mod guest_cgroup;
mod helper;
mod init;
mod modules;
mod net;
mod page_reporting;
mod pipe_pump;
mod power;
mod process_setup;
mod reaper;
mod restore;
mod rootfs_setup;
mod seccomp;
mod server;
mod spec;

fn main() {
    if std::env::args().nth(1).as_deref() == Some("__helper") {
        log::init(log::Level::Warn);
        helper::main();
    }
    if std::env::args().nth(1).as_deref() == Some("__forker") {
        log::init(log::Level::Warn);
        forker::main();
    }
    init::main();
}
