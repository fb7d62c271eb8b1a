//! One vCPU's architectural state: saved from a paused VM, loaded into a fresh vCPU.
//!
//! The order of the ioctls is the one Firecracker found necessary: the MP state first on save
//! (reading it lets KVM accept pending INIT/SIPI events, which changes the rest), the vCPU
//! events last; on restore CPUID before the MSRs (KVM checks MSRs against CPUID), the local
//! APIC before the MSRs (the TSC deadline is dropped unless the APIC is in that mode), and
//! the TSC before the TSC deadline.

use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES, Msrs, kvm_cpuid_entry2, kvm_debugregs,
    kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::blob::Blob;

/// The x2APIC MSR range: that state travels in the local APIC's registers.
const X2APIC_MSRS: std::ops::RangeInclusive<u32> = 0x800..=0x8ff;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// How far the TSC of the host that restores may be from the template's without scaling
/// (the NTP tolerance Firecracker also uses): a host's calibration differs across reboots.
const TSC_TOLERANCE_PPM: u64 = 250;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// The CPUID the guest booted with: it made its choices on it.
    pub cpuid: Vec<CpuidEntry>,
    pub mp_state: u32,
    pub regs: Blob,
    pub sregs: Blob,
    /// The XSAVE area (FPU and SSE state included) where KVM has it, else the legacy FPU.
    pub xsave: Option<Blob>,
    pub fpu: Option<Fpu>,
    pub xcrs: Option<Blob>,
    pub debug_regs: Blob,
    pub lapic: Blob,
    pub msrs: Vec<Msr>,
    pub vcpu_events: Blob,
    pub tsc_khz: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Msr {
    pub index: u32,
    pub data: u64,
}

/// The legacy FPU and SSE state, for a KVM without XSAVE (`kvm_fpu` has no byte view).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Fpu {
    /// The eight x87 registers, 16 bytes each.
    pub fpr: Blob,
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    /// The sixteen XMM registers, 16 bytes each.
    pub xmm: Blob,
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for Fpu {
    fn from(f: &kvm_fpu) -> Self {
        Self {
            fpr: Blob(f.fpr.concat()),
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: Blob(f.xmm.concat()),
            mxcsr: f.mxcsr,
        }
    }
}

impl Fpu {
    fn to_kvm(&self, index: u8) -> Result<kvm_fpu, String> {
        let mut f = kvm_fpu {
            fcw: self.fcw,
            fsw: self.fsw,
            ftwx: self.ftwx,
            last_opcode: self.last_opcode,
            last_ip: self.last_ip,
            last_dp: self.last_dp,
            mxcsr: self.mxcsr,
            ..Default::default()
        };
        f.fpr = self.fpr.to(&format!("vCPU {index} x87 registers"))?;
        f.xmm = self.xmm.to(&format!("vCPU {index} XMM registers"))?;
        Ok(f)
    }
}

/// What this KVM offers beyond the basics (from `KVM_CHECK_EXTENSION`).
#[derive(Clone, Copy, Debug)]
pub struct Features {
    pub xsave: bool,
    pub xcrs: bool,
    pub tsc_control: bool,
}

impl Features {
    pub fn of(kvm: &kvm_ioctls::Kvm) -> Self {
        use kvm_ioctls::Cap;
        Self {
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            tsc_control: kvm.check_extension(Cap::TscControl),
        }
    }
}

/// Saves vCPU `index`, which must be out of `KVM_RUN` with no I/O pending (see
/// [`crate::vcpu::run`]). `msr_list` is KVM's `KVM_GET_MSR_INDEX_LIST`.
pub fn save(
    vcpu: &VcpuFd,
    index: u8,
    msr_list: &[u32],
    features: Features,
) -> Result<VcpuState, String> {
    let what =
        |step: &'static str| move |e: kvm_ioctls::Error| format!("vCPU {index}: {step}: {e}");
    let mp_state = vcpu
        .get_mp_state()
        .map_err(what("reading the MP state"))?
        .mp_state;
    let regs = Blob::of(&vcpu.get_regs().map_err(what("reading registers"))?);
    let sregs = Blob::of(
        &vcpu
            .get_sregs()
            .map_err(what("reading segment registers"))?,
    );
    let (xsave, fpu) = if features.xsave {
        let x = vcpu.get_xsave().map_err(what("reading the XSAVE area"))?;
        (Some(Blob::of(&x)), None)
    } else {
        let f = vcpu.get_fpu().map_err(what("reading the FPU"))?;
        (None, Some(Fpu::from(&f)))
    };
    let xcrs = if features.xcrs {
        Some(Blob::of(&vcpu.get_xcrs().map_err(what("reading XCRs"))?))
    } else {
        None
    };
    let debug_regs = Blob::of(
        &vcpu
            .get_debug_regs()
            .map_err(what("reading debug registers"))?,
    );
    let lapic = Blob::of(&vcpu.get_lapic().map_err(what("reading the local APIC"))?);
    let tsc_khz = vcpu.get_tsc_khz().ok();
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(what("reading CPUID"))?
        .as_slice()
        .iter()
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect();
    let msrs =
        readable_msrs(vcpu, msr_list).map_err(|e| format!("vCPU {index}: reading MSRs: {e}"))?;
    let vcpu_events = Blob::of(
        &vcpu
            .get_vcpu_events()
            .map_err(what("reading pending events"))?,
    );
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        fpu,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        vcpu_events,
        tsc_khz,
    })
}

/// Every MSR of `list` that KVM lets us read. `KVM_GET_MSRS` stops at the first one it
/// cannot read (a feature this CPU lacks): skip that one and go on with the rest.
fn readable_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<Msr>, String> {
    let wanted: Vec<u32> = list
        .iter()
        .copied()
        .filter(|i| !X2APIC_MSRS.contains(i))
        .collect();
    let mut out = Vec::with_capacity(wanted.len());
    let mut rest = &wanted[..];
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("{e:?}"))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(|e| e.to_string())?;
        out.extend(msrs.as_slice()[..n.min(batch.len())].iter().map(|e| Msr {
            index: e.index,
            data: e.data,
        }));
        // The MSR at `n` did not read: leave it out.
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(out)
}

/// Loads `state` into vCPU `index`, freshly created and never run.
pub fn restore(
    vcpu: &VcpuFd,
    index: u8,
    state: &VcpuState,
    features: Features,
) -> Result<(), String> {
    let what =
        |step: &'static str| move |e: kvm_ioctls::Error| format!("vCPU {index}: {step}: {e}");
    let name = |field: &str| format!("vCPU {index} {field}");
    if state.cpuid.is_empty() || state.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(format!(
            "vCPU {index}: {} CPUID entries in the state file, expected 1 to {KVM_MAX_CPUID_ENTRIES}",
            state.cpuid.len()
        ));
    }
    if state.msrs.len() > KVM_MAX_MSR_ENTRIES {
        return Err(format!(
            "vCPU {index}: {} MSRs in the state file, at most {KVM_MAX_MSR_ENTRIES}",
            state.msrs.len()
        ));
    }
    // Everything is decoded (and its size checked) before KVM is touched.
    let regs: kvm_regs = state.regs.to(&name("registers"))?;
    let sregs: kvm_sregs = state.sregs.to(&name("segment registers"))?;
    let xsave: Option<kvm_xsave> = state
        .xsave
        .as_ref()
        .map(|b| b.to(&name("XSAVE area")))
        .transpose()?;
    let fpu: Option<kvm_fpu> = state.fpu.as_ref().map(|f| f.to_kvm(index)).transpose()?;
    let xcrs: Option<kvm_xcrs> = state
        .xcrs
        .as_ref()
        .map(|b| b.to(&name("XCRs")))
        .transpose()?;
    let debug_regs: kvm_debugregs = state.debug_regs.to(&name("debug registers"))?;
    let lapic: kvm_lapic_state = state.lapic.to(&name("local APIC"))?;
    let events: kvm_vcpu_events = state.vcpu_events.to(&name("pending events"))?;
    if xsave.is_none() && fpu.is_none() {
        return Err(format!(
            "vCPU {index}: the state file has neither XSAVE nor FPU state"
        ));
    }
    if xsave.is_some() && !features.xsave {
        return Err(format!(
            "vCPU {index}: the template has XSAVE state, which this host's KVM cannot load"
        ));
    }

    let entries: Vec<kvm_cpuid_entry2> = state
        .cpuid
        .iter()
        .map(|e| kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    let cpuid = CpuId::from_entries(&entries).map_err(|e| format!("vCPU {index}: CPUID: {e:?}"))?;
    vcpu.set_cpuid2(&cpuid).map_err(what("setting CPUID"))?;
    restore_tsc_khz(vcpu, index, state.tsc_khz, features)?;
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: state.mp_state,
    })
    .map_err(what("setting the MP state"))?;
    vcpu.set_regs(&regs).map_err(what("setting registers"))?;
    vcpu.set_sregs(&sregs)
        .map_err(what("setting segment registers"))?;
    match (&xsave, &fpu) {
        (Some(x), _) => {
            // SAFETY: `x` is a whole `kvm_xsave`; KVM reads only its legacy 4 KiB since
            // KVM_CAP_XSAVE2 was never enabled on this VM.
            unsafe { vcpu.set_xsave(x) }.map_err(what("setting the XSAVE area"))?
        }
        (None, Some(f)) => vcpu.set_fpu(f).map_err(what("setting the FPU"))?,
        (None, None) => unreachable!("checked above"),
    }
    if let Some(x) = &xcrs {
        vcpu.set_xcrs(x).map_err(what("setting XCRs"))?;
    }
    vcpu.set_debug_regs(&debug_regs)
        .map_err(what("setting debug registers"))?;
    vcpu.set_lapic(&lapic)
        .map_err(what("setting the local APIC"))?;
    restore_msrs(vcpu, index, &state.msrs)?;
    vcpu.set_vcpu_events(&events)
        .map_err(what("setting pending events"))?;
    Ok(())
}

/// The TSC runs at the template's rate: within the tolerance as it is, else scaled where KVM
/// can (a guest calibrated its clock on the template's rate).
fn restore_tsc_khz(
    vcpu: &VcpuFd,
    index: u8,
    saved: Option<u32>,
    features: Features,
) -> Result<(), String> {
    let (Some(saved), Ok(here)) = (saved, vcpu.get_tsc_khz()) else {
        return Ok(());
    };
    let diff = u64::from(saved.abs_diff(here));
    if diff * 1_000_000 <= u64::from(saved) * TSC_TOLERANCE_PPM {
        return Ok(());
    }
    if !features.tsc_control {
        return Err(format!(
            "vCPU {index}: the template's TSC ran at {saved} kHz, this host's runs at {here} kHz \
             and its KVM cannot scale it: make the template on this host"
        ));
    }
    vcpu.set_tsc_khz(saved)
        .map_err(|e| format!("vCPU {index}: setting the TSC to the template's {saved} kHz: {e}"))
}

/// The order MSRs are written in: as saved, but the TSC deadline after the TSC.
pub fn msr_restore_order(msrs: &[Msr]) -> Vec<Msr> {
    let (mut out, deadline): (Vec<Msr>, Vec<Msr>) =
        msrs.iter().partition(|m| m.index != MSR_IA32_TSC_DEADLINE);
    out.extend(deadline);
    out
}

fn restore_msrs(vcpu: &VcpuFd, index: u8, msrs: &[Msr]) -> Result<(), String> {
    let ordered = msr_restore_order(msrs);
    let entries: Vec<kvm_msr_entry> = ordered
        .iter()
        .map(|m| kvm_msr_entry {
            index: m.index,
            data: m.data,
            ..Default::default()
        })
        .collect();
    let list = Msrs::from_entries(&entries).map_err(|e| format!("vCPU {index}: MSRs: {e:?}"))?;
    let written = vcpu
        .set_msrs(&list)
        .map_err(|e| format!("vCPU {index}: setting MSRs: {e}"))?;
    if let Some(refused) = ordered.get(written) {
        return Err(format!(
            "vCPU {index}: KVM refused MSR {:#x} = {:#x} ({written} of {} written): the template \
             was made on another CPU or KVM; remove it and make it again here",
            refused.index,
            refused.data,
            ordered.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tsc_deadline_goes_last() {
        let m = |index| Msr { index, data: 1 };
        let order: Vec<u32> = msr_restore_order(&[m(0x6e0), m(0x10), m(0x174)])
            .iter()
            .map(|m| m.index)
            .collect();
        assert_eq!(order, [0x10, 0x174, 0x6e0]);
    }

    #[test]
    fn the_legacy_fpu_round_trips() {
        let mut f = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 7,
            ..Default::default()
        };
        f.fpr[7][15] = 0xaa;
        f.xmm[15][0] = 0x55;
        let json = serde_json::to_string(&Fpu::from(&f)).unwrap();
        let back = serde_json::from_str::<Fpu>(&json)
            .unwrap()
            .to_kvm(0)
            .unwrap();
        assert_eq!((back.fcw, back.mxcsr, back.last_ip), (0x37f, 0x1f80, 7));
        assert_eq!((back.fpr[7][15], back.xmm[15][0]), (0xaa, 0x55));
        let mut short = Fpu::from(&f);
        short.xmm.0.pop();
        assert!(
            short
                .to_kvm(1)
                .unwrap_err()
                .contains("vCPU 1 XMM registers")
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let json = r#"{"function":1,"index":0,"flags":0,"eax":0,"ebx":0,"ecx":0,"edx":0,"x":1}"#;
        assert!(serde_json::from_str::<CpuidEntry>(json).is_err());
    }
}
