use abi_stable::StableAbi;

/// What a driver can do, as bits that are only ever added (unknown bits are ignored).
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy, PartialEq, Eq, Default, Debug)]
pub struct Capabilities(pub u64);

impl Capabilities {
    pub const NONE: Self = Self(0);
    /// The rootfs can be a host directory shared into the VM (9p, virtio-fs).
    pub const SHARED_DIR_ROOTFS: Self = Self(1 << 0);
    /// The rootfs can be a block device (virtio-blk).
    pub const BLOCK_ROOTFS: Self = Self(1 << 1);
    /// The whole VM can be paused and resumed.
    pub const PAUSE: Self = Self(1 << 2);
    /// Devices can be added to a running VM.
    pub const HOT_PLUG: Self = Self(1 << 3);
    /// VM state can be saved and restored (templates, checkpoints).
    pub const SNAPSHOT: Self = Self(1 << 4);
    /// The agent channel can be a vsock.
    pub const VSOCK: Self = Self(1 << 5);
    /// With [`Self::SNAPSHOT`]: a template VM can have disks without a host side (an empty
    /// `host_path`), and its clones bring their own disks into those slots (the guest sees
    /// their size change), so containers with a block rootfs can start from templates.
    pub const TEMPLATE_DISKS: Self = Self(1 << 6);
    /// With [`Self::SNAPSHOT`] and [`Self::SHARED_DIR_ROOTFS`]: a clone cannot take shared
    /// directories (virtio-fs needs the guest RAM shared with its daemon, and a clone's RAM
    /// is a private mapping of its template's). Where templates are in use the core gives
    /// such a driver what it would give one without shared directories (a block rootfs).
    pub const NO_TEMPLATE_SHARES: Self = Self(1 << 7);

    const NAMES: [(Self, &'static str); 8] = [
        (Self::SHARED_DIR_ROOTFS, "shared-dir-rootfs"),
        (Self::BLOCK_ROOTFS, "block-rootfs"),
        (Self::PAUSE, "pause"),
        (Self::HOT_PLUG, "hot-plug"),
        (Self::SNAPSHOT, "snapshot"),
        (Self::VSOCK, "vsock"),
        (Self::TEMPLATE_DISKS, "template-disks"),
        (Self::NO_TEMPLATE_SHARES, "no-template-shares"),
    ];

    pub const fn union(self, other: Self) -> Self {
        Self(self.0 | other.0)
    }

    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn without(self, other: Self) -> Self {
        Self(self.0 & !other.0)
    }

    /// Names of the known bits that are set, in a fixed order.
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMES
            .iter()
            .filter(|(bit, _)| self.contains(*bit))
            .map(|(_, name)| *name)
            .collect()
    }
}

impl std::ops::BitOr for Capabilities {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        self.union(rhs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_bits() {
        let caps = Capabilities::PAUSE | Capabilities::SHARED_DIR_ROOTFS;
        assert_eq!(caps.names(), vec!["shared-dir-rootfs", "pause"]);
        assert!(caps.contains(Capabilities::PAUSE));
        assert!(!caps.contains(Capabilities::VSOCK));
        assert!(Capabilities(1 << 40).names().is_empty());
    }
}
