//! Template save and restore through the driver itself (`start_vm` with a memory file, `save`,
//! `restore_vm`), with a tiny guest booted through PVH from a hand-made ELF: it runs wherever
//! /dev/kvm opens, also on the `kvm_pvm` module of the development machines, which cannot boot
//! a stock kernel (the kernel-level test of templates runs in the test host:
//! `runv-cli/tests/templates_kvm.rs`). It skips, saying so, without /dev/kvm.
//!
//! The guest puts a value in a register, prints `ready`, then polls the size of its disk slot
//! (virtio-blk configuration space), which is empty in the template. A clone gets a real disk
//! in that slot: its guest, on from where the template was saved, sees the size, prints the
//! register's value, writes guest memory and resets. So a clone's output proves that registers,
//! segments, memory and the device bus came back, and that the clone's disk is its own; the
//! template's memory file, unchanged after the clones, proves they map it privately.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use runv_api::{BlockDevice, Hypervisor, Vm, VmConfig};
use runv_driver_kvm_native::{KvmNativeDriver, KvmVm, layout};

/// Where the guest's code is loaded (the ELF's only segment).
const CODE_ADDR: u64 = 0x10_0000;
/// Where a clone's guest writes once it runs on.
const SCRATCH_ADDR: u64 = 0x20_0000;

/// The guest (32-bit protected mode, as PVH enters): see the module docs.
fn guest_code() -> Vec<u8> {
    let capacity = layout::VIRTIO_MMIO_BASE + layout::VIRTIO_MMIO_STRIDE + 0x100;
    let mut code = vec![0xbb, b'K', 0, 0, 0]; // mov ebx, 'K'
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    for b in b"ready\n" {
        code.extend_from_slice(&[0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    code.push(0xa1); // spin: mov eax, [capacity]
    code.extend_from_slice(&(capacity as u32).to_le_bytes());
    code.extend_from_slice(&[0x85, 0xc0, 0x74, 0xf7]); // test eax, eax; jz spin
    code.extend_from_slice(&[0xc6, 0x05]); // mov byte [SCRATCH_ADDR], 1
    code.extend_from_slice(&(SCRATCH_ADDR as u32).to_le_bytes());
    code.push(1);
    code.extend_from_slice(&[0x88, 0xd8, 0xee]); // mov al, bl; out dx, al
    code.extend_from_slice(&[0xb0, b'\n', 0xee]); // mov al, '\n'; out dx, al
    code.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4]); // reset through the i8042; hlt
    code
}

/// An ELF64 executable with one loadable segment at CODE_ADDR and a PVH entry note.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const PHDRS: usize = 64;
    const NOTE: usize = PHDRS + 2 * 56;
    const CODE: usize = 0x1000;
    let mut elf = vec![0u8; CODE];
    let mut put = |at: usize, bytes: &[u8]| elf[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &[0x7f, b'E', b'L', b'F', 2, 1, 1]);
    put(16, &2u16.to_le_bytes()); // ET_EXEC
    put(18, &0x3eu16.to_le_bytes()); // x86-64
    put(20, &1u32.to_le_bytes());
    put(24, &CODE_ADDR.to_le_bytes()); // e_entry
    put(32, &(PHDRS as u64).to_le_bytes()); // e_phoff
    put(52, &64u16.to_le_bytes()); // e_ehsize
    put(54, &56u16.to_le_bytes()); // e_phentsize
    put(56, &2u16.to_le_bytes()); // e_phnum
    let phdr = |kind: u32, offset: u64, addr: u64, size: u64| {
        let mut p = Vec::with_capacity(56);
        p.extend_from_slice(&kind.to_le_bytes());
        p.extend_from_slice(&5u32.to_le_bytes()); // r-x
        p.extend_from_slice(&offset.to_le_bytes());
        p.extend_from_slice(&addr.to_le_bytes()); // vaddr
        p.extend_from_slice(&addr.to_le_bytes()); // paddr
        p.extend_from_slice(&size.to_le_bytes()); // filesz
        p.extend_from_slice(&size.to_le_bytes()); // memsz
        p.extend_from_slice(&0x1000u64.to_le_bytes());
        p
    };
    put(PHDRS, &phdr(1, CODE as u64, CODE_ADDR, code.len() as u64));
    put(PHDRS + 56, &phdr(4, NOTE as u64, 0, 20));
    // namesz, descsz, type XEN_ELFNOTE_PHYS32_ENTRY, "Xen\0", the entry.
    put(NOTE, &4u32.to_le_bytes());
    put(NOTE + 4, &4u32.to_le_bytes());
    put(NOTE + 8, &18u32.to_le_bytes());
    put(NOTE + 12, b"Xen\0");
    put(NOTE + 16, &(CODE_ADDR as u32).to_le_bytes());
    elf.extend_from_slice(code);
    elf
}

/// A scratch directory, removed on drop (also when a test fails).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn scratch(tag: &str) -> Option<Scratch> {
    if let Err(e) = kvm_ioctls::Kvm::new() {
        println!("skipped: /dev/kvm does not open ({e})");
        return None;
    }
    let dir = std::env::temp_dir().join(format!("kvm-snap-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("template")).unwrap();
    fs::write(dir.join("guest.elf"), pvh_elf(&guest_code())).unwrap();
    Some(Scratch(dir))
}

fn config(dir: &Path, name: &str, disk: &str) -> VmConfig {
    VmConfig {
        version: runv_api::VM_CONFIG_VERSION,
        name: name.into(),
        vcpus: 1,
        memory_mib: 64,
        kernel: dir.join("guest.elf"),
        block_devices: vec![BlockDevice {
            id: "rootfs".into(),
            host_path: disk.into(),
            readonly: false,
        }],
        state_dir: dir.to_path_buf(),
        console_log: dir.join(format!("{name}.log")),
        ..VmConfig::default()
    }
}

fn wait_for_console(path: &Path, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fs::read_to_string(path).unwrap_or_default().contains(text) {
        assert!(
            Instant::now() < deadline,
            "no {text:?} on {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Boots the template VM to its polling loop and saves it into `dir/template`.
fn make_template(dir: &Path) {
    let template = dir.join("template");
    let config = VmConfig {
        memory_file: Some(template.join(runv_api::TEMPLATE_MEMORY_FILE)),
        ..config(dir, "template", "")
    };
    let vm = KvmVm::start(&config).unwrap();
    wait_for_console(&config.console_log, "ready\n");
    let saved = vm.save(&template);
    vm.stop(Duration::ZERO).unwrap();
    vm.wait().unwrap();
    saved.unwrap();
}

/// Restores a clone with a 1 MiB disk of its own and runs it to its end; returns its console.
fn run_clone(dir: &Path, name: &str) -> Result<String, String> {
    let disk = dir.join(format!("{name}.img"));
    fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let config = VmConfig {
        restore_from: Some(dir.join("template")),
        ..config(dir, name, disk.to_str().unwrap())
    };
    let vm = KvmNativeDriver.restore_vm(config.clone(), &dir.join("template"))?;
    // A clone that never gets on panics here; dropping it ends its VM.
    wait_for_console(&config.console_log, "\n");
    let exit = vm.wait()?;
    assert_eq!(exit.code, 0, "{}", exit.description);
    Ok(fs::read_to_string(&config.console_log).unwrap_or_default())
}

fn memory_byte(dir: &Path, addr: u64) -> u8 {
    let file = fs::File::open(dir.join("template/memory")).unwrap();
    let mut b = [0u8];
    file.read_exact_at(&mut b, addr).unwrap();
    b[0]
}

#[test]
fn clones_run_on_from_the_saved_template_with_their_own_disk() {
    let Some(s) = scratch("clones") else { return };
    make_template(&s.0);
    // The template's RAM is its memory file: the code the loader put there is in it.
    assert_eq!(memory_byte(&s.0, CODE_ADDR), guest_code()[0]);
    let state = fs::read_to_string(s.0.join("template/state")).unwrap();
    assert!(
        state.starts_with("{\"format\":\"runv-kvm-native-vm-state\",\"version\":1,"),
        "{}",
        &state[..80]
    );

    for name in ["clone1", "clone2"] {
        let console = run_clone(&s.0, name).unwrap();
        // Not "ready": that was the template's; "K" was in a register when it was saved.
        assert_eq!(console, "K\n", "{name}");
    }
    assert_eq!(
        memory_byte(&s.0, SCRATCH_ADDR),
        0,
        "a clone's write reached the template's memory file"
    );
}

#[test]
fn only_a_template_vm_can_be_saved() {
    let Some(s) = scratch("plain") else { return };
    let vm = KvmVm::start(&config(&s.0, "plain", "/dev/null")).unwrap();
    let e = vm.save(&s.0.join("template")).unwrap_err();
    vm.stop(Duration::ZERO).unwrap();
    vm.wait().unwrap();
    assert!(
        e.starts_with("this VM's RAM is not in a memory file"),
        "{e}"
    );
    assert!(!s.0.join("template/state").exists());
}

#[test]
fn a_clone_of_another_shape_or_a_damaged_state_is_refused_in_one_line() {
    let Some(s) = scratch("refused") else { return };
    make_template(&s.0);
    let template = s.0.join("template");
    let attempt = |config: VmConfig| match KvmNativeDriver.restore_vm(config, &template) {
        Ok(vm) => {
            let _ = vm.stop(Duration::ZERO);
            let _ = vm.wait();
            panic!("restored")
        }
        Err(e) => {
            assert!(!e.contains('\n'), "{e}");
            e
        }
    };

    let no_disk = VmConfig {
        block_devices: Vec::new(),
        ..config(&s.0, "c1", "")
    };
    assert_eq!(
        attempt(no_disk),
        "the template has 1 console(s), 1 disk(s) and 0 NIC(s), this VM has 1 console(s), \
         0 disk(s) and 0 NIC(s)"
    );
    let bigger = VmConfig {
        memory_mib: 128,
        ..config(&s.0, "c2", "/dev/null")
    };
    assert!(attempt(bigger).contains("a VM of 1 vCPUs and 64 MiB, this one has 1 and 128 MiB"),);

    // Damage: a local APIC one byte short, an unknown field, another version.
    let state_path = template.join("state");
    let good = fs::read_to_string(&state_path).unwrap();
    let mut state: serde_json::Value = serde_json::from_str(&good).unwrap();
    let lapic = state["vcpus"][0]["lapic"].as_str().unwrap().to_string();
    state["vcpus"][0]["lapic"] = lapic[2..].into();
    fs::write(&state_path, state.to_string()).unwrap();
    let e = attempt(config(&s.0, "c3", "/dev/null"));
    assert!(
        e.contains("vCPU 0 local APIC: 1023 bytes in the state file, expected 1024"),
        "{e}"
    );
    let mut state: serde_json::Value = serde_json::from_str(&good).unwrap();
    state["devices"][0]["queues"][0]["size"] = 3.into();
    fs::write(&state_path, state.to_string()).unwrap();
    let e = attempt(config(&s.0, "c4", "/dev/null"));
    assert!(e.starts_with("virtio device 0: queue 0: "), "{e}");
    let mut state: serde_json::Value = serde_json::from_str(&good).unwrap();
    state["version"] = 99.into();
    fs::write(&state_path, state.to_string()).unwrap();
    let e = attempt(config(&s.0, "c5", "/dev/null"));
    assert!(e.contains("version 99, this driver reads version 1"), "{e}");
    fs::write(&state_path, b"[]").unwrap();
    assert!(attempt(config(&s.0, "c6", "/dev/null")).contains("not a VM state"));
}
