//! A runv storage plugin: a device-mapper thin snapshot per container, handed to the VM as a
//! block device (implementation follows; `tests/block_rootfs_vm.rs` proves the block path).
