//! The Xen hypervisor driver for runv (in progress).
