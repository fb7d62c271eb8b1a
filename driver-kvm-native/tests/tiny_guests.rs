//! The VMM core on a real KVM with tiny hand-written guests: the boot state `cpu` builds
//! (32-bit PVH-style protected mode, and long mode on the identity page tables), the vCPU run
//! loop, port I/O to COM1, an MMIO read of a virtio-mmio register, and the i8042 reset that
//! ends the VM. These run wherever /dev/kvm opens, also where KVM cannot boot a full kernel
//! (the `kvm_pvm` module of the development machines); they skip, saying so, without it.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_ioctls::Kvm;
use runv_driver_kvm_native::boot::Entry;
use runv_driver_kvm_native::control::{self, Control};
use runv_driver_kvm_native::devices::{Bus, MmioSlot};
use runv_driver_kvm_native::exit::ExitReason;
use runv_driver_kvm_native::virtio::{Console, MmioTransport};
use runv_driver_kvm_native::{cpu, layout, vcpu, vm};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::tempfile::TempFile;

/// Where the guest code goes (inside the identity-mapped first GiB, clear of the boot tables).
const CODE_ADDR: u64 = 0x10_0000;

fn kvm() -> Option<Kvm> {
    match Kvm::new() {
        Ok(kvm) => Some(kvm),
        Err(e) => {
            eprintln!("skipped: /dev/kvm does not open ({e})");
            None
        }
    }
}

struct Outcome {
    reason: ExitReason,
    console: String,
}

/// Runs `code` at CODE_ADDR on one vCPU entered as `entry`, with COM1, the i8042 and one
/// virtio-mmio console at the first virtio slot, until the VM ends or 20 s pass.
fn run_guest(kvm: &Kvm, code: &[u8], entry: Entry) -> Outcome {
    control::install_kick_handler().unwrap();
    let vm = vm::new_vm(kvm).unwrap();
    let mem = layout::guest_memory(64).unwrap();
    // SAFETY: `mem` lives until the end of this function, after `vm` is dropped below.
    unsafe { vm::register_memory(&vm, &mem) }.unwrap();
    mem.write_slice(code, GuestAddress(CODE_ADDR)).unwrap();
    cpu::write_boot_tables(&mem, entry).unwrap();

    let log = TempFile::new().unwrap();
    let console = std::fs::File::options()
        .append(true)
        .open(log.as_path())
        .unwrap();
    let control = Arc::new(Control::default());
    let (_host, guest) = UnixStream::pair().unwrap();
    let (base, _) = layout::virtio_slot(0).unwrap();
    let transport = MmioTransport::new(
        Box::new(Console::new(guest).unwrap()),
        mem.clone(),
        Arc::new(EventFd::new(0).unwrap()),
    )
    .unwrap();
    let slots = vec![MmioSlot {
        base,
        size: layout::VIRTIO_MMIO_STRIDE,
        transport: Arc::new(Mutex::new(transport)),
    }];
    let bus = Arc::new(Bus::new(
        console,
        Arc::new(EventFd::new(0).unwrap()),
        control.clone(),
        slots,
    ));
    let fd = vcpu::create(kvm, &vm, 0, 1, entry).unwrap();
    let (b, c) = (bus.clone(), control.clone());
    // The vCPU runs under its seccomp filter, as in a real VM: the console writes and
    // KVM_RUN must get through it.
    let filter = runv_driver_kvm_native::sandbox::filters().unwrap().vcpu;
    let fd = Arc::new(Mutex::new(fd));
    let thread = std::thread::spawn(move || vcpu::run(fd, 0, b, c, &filter));

    let timer_control = control.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        timer_control.request_exit(ExitReason::HostError("timed out".into()));
    });
    let reason = control.wait_exit_requested();
    let threads = [thread];
    assert!(control.kick_until(&threads, Duration::from_secs(5), |running, _| running == 0));
    let [thread] = threads;
    thread.join().unwrap();
    drop(bus);
    drop(vm);
    Outcome {
        reason,
        console: std::fs::read_to_string(log.as_path()).unwrap(),
    }
}

/// `mov dx, 0x3f8` then `mov al, b; out dx, al` for each byte (the same bytes in 32- and
/// 64-bit mode, given the operand-size prefix on the `mov dx`).
fn print(text: &[u8]) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03];
    for b in text {
        code.extend_from_slice(&[0xb0, *b, 0xee]);
    }
    code
}

/// `mov al, 0xfe; out 0x64, al; hlt`: the keyboard controller's CPU reset.
const RESET: [u8; 5] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4];

#[test]
fn long_mode_guest_writes_to_com1_and_resets() {
    let Some(kvm) = kvm() else { return };
    let mut code = print(b"long mode\n");
    code.extend_from_slice(&RESET);
    let out = run_guest(&kvm, &code, Entry::Linux64 { rip: CODE_ADDR });
    assert_eq!(
        out.reason,
        ExitReason::GuestRebooted,
        "console: {:?}",
        out.console
    );
    assert_eq!(out.console, "long mode\n");
}

#[test]
fn long_mode_guest_sees_its_boot_registers() {
    let Some(kvm) = kvm() else { return };
    // `cmp rsi, ZERO_PAGE_ADDR; jne +N; <print "rsi ok">; <reset>`: the boot protocol's
    // rsi arrives, and 64-bit code (a REX.W compare) runs.
    let ok = print(b"rsi ok\n");
    let mut code = vec![0x48, 0x81, 0xfe];
    code.extend_from_slice(&(layout::ZERO_PAGE_ADDR as u32).to_le_bytes());
    code.extend_from_slice(&[0x75, ok.len() as u8]);
    code.extend_from_slice(&ok);
    code.extend_from_slice(&RESET);
    let out = run_guest(&kvm, &code, Entry::Linux64 { rip: CODE_ADDR });
    assert_eq!(out.reason, ExitReason::GuestRebooted);
    assert_eq!(out.console, "rsi ok\n");
}

#[test]
fn protected_mode_guest_reads_the_virtio_mmio_magic() {
    let Some(kvm) = kvm() else { return };
    // PVH entry state: flat 32-bit protected mode without paging, ebx = start_info.
    // `mov eax, [VIRTIO_MMIO_BASE]`, then out its four bytes to COM1, then "\n" and reset.
    let mut code = vec![0xa1];
    code.extend_from_slice(&(layout::VIRTIO_MMIO_BASE as u32).to_le_bytes());
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]);
    for _ in 0..4 {
        code.extend_from_slice(&[0xee, 0xc1, 0xe8, 0x08]); // out dx, al; shr eax, 8
    }
    code.extend_from_slice(&[0xb0, b'\n', 0xee]);
    // `cmp ebx, PVH_START_INFO_ADDR; jne +5` skips the reset: the guest then halts, which
    // (with no interrupt to wake it) ends in the 20 s timeout instead of a reboot.
    code.extend_from_slice(&[0x81, 0xfb]);
    code.extend_from_slice(&(layout::PVH_START_INFO_ADDR as u32).to_le_bytes());
    code.extend_from_slice(&[0x75, RESET.len() as u8]);
    code.extend_from_slice(&RESET);
    code.push(0xf4);
    let out = run_guest(&kvm, &code, Entry::Pvh { rip: CODE_ADDR });
    assert_eq!(out.console, "virt\n");
    assert_eq!(out.reason, ExitReason::GuestRebooted);
}
