//! Loads the built example plugin the way runv does and calls every method through the ABI.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use abi_stable::library::lib_header_from_path;
use runv_api::{Capabilities, HypervisorClient, PluginKind, PluginModuleRef, VmConfig};

fn plugin_path() -> PathBuf {
    // Integration tests run from target/<profile>/deps; the cdylib is in target/<profile>.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    dir.join("librunv_driver_example.so")
}

fn load() -> HypervisorClient {
    let module = lib_header_from_path(&plugin_path())
        .and_then(|h| h.init_root_module::<PluginModuleRef>())
        .unwrap_or_else(|e| panic!("loading {}: {e}", plugin_path().display()));
    assert_eq!(module.kind(), PluginKind::Hypervisor);
    assert!((module.new_storage())().into_result().is_err());
    HypervisorClient::new((module.new_hypervisor())().into_result().unwrap())
}

#[test]
fn every_method_is_callable_through_the_abi() {
    let driver = load();
    assert_eq!(driver.info().name.as_str(), "example");
    assert!(driver.info().capabilities.contains(Capabilities::PAUSE));
    driver.probe().unwrap();

    let config = VmConfig {
        name: "c1".into(),
        memory_mib: 64,
        console_log: "/tmp/console.log".into(),
        ..VmConfig::default()
    };
    let vm = driver.start_vm(&config).unwrap();
    assert_eq!(vm.console_log(), PathBuf::from("/tmp/console.log"));
    assert_eq!(vm.stats().unwrap().guest_memory_bytes, 64 << 20);
    assert!(!vm.pids().is_empty());

    let mut channel = UnixStream::from(vm.take_agent_channel().unwrap());
    assert!(
        vm.take_agent_channel().is_err(),
        "the channel is handed over once"
    );
    channel
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    channel.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    channel.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    vm.pause().unwrap();
    assert!(vm.pause().is_err(), "pausing twice is refused");
    vm.resume().unwrap();
    assert!(vm.save(std::path::Path::new("/tmp/x")).is_err());
    vm.stop(Duration::from_secs(1)).unwrap();
    let exit = vm.wait().unwrap();
    assert_eq!(exit.code, 0);
    assert_eq!(exit.description.as_str(), "stopped by the host");
}

#[test]
fn a_panic_in_the_plugin_comes_back_as_an_error() {
    let driver = load();
    let config = VmConfig {
        name: "panic".into(),
        ..VmConfig::default()
    };
    let err = driver.start_vm(&config).err().expect("start_vm must fail");
    assert!(err.contains("plugin panicked: asked to panic"), "{err}");
}
