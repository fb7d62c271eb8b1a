//! The QEMU hypervisor driver (being written).
