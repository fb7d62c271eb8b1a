//! Seccomp filters for the threads that handle guest input: the vCPU threads (MMIO and port
//! exits reach device emulation) and the device thread (virtqueues). A guest that finds a
//! bug in that code and takes over such a thread cannot open files, make sockets, exec, fork,
//! map executable memory anew, or issue any ioctl but KVM_RUN, although the monitor it runs
//! in is root. Built with rust-vmm's `seccompiler`; each thread installs its filter itself
//! (no TSYNC), so the rest of the monitor is unaffected.
//!
//! A syscall off the list fails with EPERM rather than killing the monitor: a rare path the
//! list missed (a panic message, an allocator corner) then degrades one request instead of
//! taking the container down, and it is still denied.

use std::collections::BTreeMap;

use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;

/// What both kinds of thread do: I/O on fds they already hold, memory for the allocator,
/// locks, time, signals (the vCPU kick), and ending.
const COMMON: &[libc::c_long] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_mprotect,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_getpid,
    libc::SYS_gettid,
    // abort() on a fatal error raises SIGABRT at itself.
    libc::SYS_tgkill,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The device thread also waits on its epoll set and keeps it up to date.
const DEVICES: &[libc::c_long] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
];

/// The compiled filters, made before the threads start (so a bad list fails the VM start,
/// not a thread).
pub struct Filters {
    pub vcpu: BpfProgram,
    pub devices: BpfProgram,
}

pub fn filters() -> Result<Filters, String> {
    let kvm_run = SeccompRule::new(vec![
        SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, KVM_RUN)
            .map_err(|e| format!("seccomp condition: {e}"))?,
    ])
    .map_err(|e| format!("seccomp rule: {e}"))?;
    let mut vcpu: BTreeMap<i64, Vec<SeccompRule>> =
        COMMON.iter().map(|s| (*s, Vec::new())).collect();
    vcpu.insert(libc::SYS_ioctl, vec![kvm_run]);
    let devices: BTreeMap<i64, Vec<SeccompRule>> = COMMON
        .iter()
        .chain(DEVICES)
        .map(|s| (*s, Vec::new()))
        .collect();
    Ok(Filters {
        vcpu: compile(vcpu)?,
        devices: compile(devices)?,
    })
}

fn compile(rules: BTreeMap<i64, Vec<SeccompRule>>) -> Result<BpfProgram, String> {
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| format!("seccomp filter: {e}"))?;
    BpfProgram::try_from(filter).map_err(|e| format!("compiling the seccomp filter: {e}"))
}

/// Puts the calling thread under `program` (and sets its no_new_privs, which that needs).
pub fn apply(program: &BpfProgram) -> Result<(), String> {
    seccompiler::apply_filter(program).map_err(|e| format!("installing the seccomp filter: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filtered_thread_keeps_its_io_and_loses_the_rest() {
        let f = filters().unwrap();
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            apply(&f.vcpu).unwrap();
            use std::io::Write;
            (&a).write_all(b"x").unwrap();
            let opened = std::fs::File::open("/proc/self/status");
            let forked = unsafe { libc::syscall(libc::SYS_fork) };
            // SAFETY: FIONREAD on a socket we own, into a local int.
            let mut n: libc::c_int = 0;
            let ioctl =
                unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&a), libc::FIONREAD, &mut n) };
            (
                opened.map_err(|e| e.raw_os_error()),
                forked,
                ioctl,
                std::io::Error::last_os_error().raw_os_error(),
            )
        });
        let (opened, forked, ioctl, errno) = t.join().unwrap();
        assert_eq!(opened.err(), Some(Some(libc::EPERM)));
        assert_eq!(forked, -1);
        assert_eq!((ioctl, errno), (-1, Some(libc::EPERM)));
        let mut buf = [0u8; 1];
        std::io::Read::read_exact(&mut &b, &mut buf).unwrap();
        assert_eq!(&buf, b"x");
        // This thread is not filtered.
        assert!(std::fs::File::open("/proc/self/status").is_ok());
    }
}
