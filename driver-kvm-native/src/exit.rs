//! Why a VM ended: set once by whoever decided it (a vCPU exit, the reset line, the host), and
//! read by `wait` to tell a clean end from a failure by variant rather than by comparing text.

use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The i8042 reset line or KVM's reset event: how the agent ends the VM.
    GuestRebooted,
    GuestPoweredOff,
    /// `stop`, a drop, or the core's stop after its timeout.
    StoppedByHost,
    GuestCrashed,
    /// A KVM system event this driver does not know.
    GuestSystemEvent(u32),
    /// A triple fault: the guest reset itself without the reset line.
    TripleFault {
        vcpu: u8,
    },
    Halted {
        vcpu: u8,
    },
    FailEntry {
        vcpu: u32,
        hardware_reason: u64,
    },
    /// Usually an emulation failure (a host KVM that cannot run full guests).
    InternalError {
        vcpu: u8,
    },
    Unexpected {
        vcpu: u8,
        exit: String,
    },
    KvmRun {
        vcpu: u8,
        error: String,
    },
    /// The host could not keep the VM running (e.g. a thread did not start).
    HostError(String),
}

impl ExitReason {
    /// Whether the VM ended as it should (the VM's exit code is 0).
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            ExitReason::GuestRebooted | ExitReason::GuestPoweredOff | ExitReason::StoppedByHost
        )
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::GuestRebooted => f.write_str("guest rebooted"),
            ExitReason::GuestPoweredOff => f.write_str("guest powered off"),
            ExitReason::StoppedByHost => f.write_str("stopped by the host"),
            ExitReason::GuestCrashed => f.write_str("guest crashed"),
            ExitReason::GuestSystemEvent(kind) => write!(f, "guest system event {kind}"),
            ExitReason::TripleFault { vcpu } => {
                write!(f, "guest reset (triple fault on vCPU {vcpu})")
            }
            ExitReason::Halted { vcpu } => write!(f, "vCPU {vcpu} halted"),
            ExitReason::FailEntry {
                vcpu,
                hardware_reason,
            } => write!(
                f,
                "KVM could not enter vCPU {vcpu} (hardware reason {hardware_reason:#x})"
            ),
            ExitReason::InternalError { vcpu } => write!(
                f,
                "KVM internal error on vCPU {vcpu} (an emulation failure: does this host's KVM \
                 run full guests?)"
            ),
            ExitReason::Unexpected { vcpu, exit } => {
                write!(f, "unexpected exit on vCPU {vcpu}: {exit}")
            }
            ExitReason::KvmRun { vcpu, error } => write!(f, "KVM_RUN on vCPU {vcpu}: {error}"),
            ExitReason::HostError(why) => f.write_str(why),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_ends_and_texts() {
        assert!(ExitReason::GuestRebooted.is_clean());
        assert!(ExitReason::StoppedByHost.is_clean());
        assert!(!ExitReason::GuestCrashed.is_clean());
        assert!(!ExitReason::HostError("x".into()).is_clean());
        assert_eq!(
            ExitReason::TripleFault { vcpu: 1 }.to_string(),
            "guest reset (triple fault on vCPU 1)"
        );
    }
}
