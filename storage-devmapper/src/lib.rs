//! A runv storage plugin: each container's rootfs is a device-mapper **thin snapshot** of a base
//! thin volume made once per image, handed to the VM as a virtio-blk disk
//! (`RootfsSource::Block { path: /dev/mapper/runv-c-<id>, fs_type: "ext4" }`).
//!
//! # Pool
//!
//! One thin pool per host (name from option `pool_name`, default `runv-pool`). Its metadata and
//! data devices are the options `metadata_dev` and `data_dev` when both are given; otherwise
//! sparse files `metadata.img` and `data.img` under `pool_dir` (default
//! `/var/lib/runv/devmapper`) that runv creates (sizes `metadata_size`, default 256M, and
//! `data_size`, default 20G) and attaches with `losetup`. A new pool starts on a zeroed metadata
//! device; after a reboot the pool is reloaded from the same files (state in `pool.json`).
//!
//! # Bases and snapshots
//!
//! A base is a thin volume (`base_size`, default 10G, thin so it only costs what is written)
//! holding `mkfs.ext4 -d <bundle rootfs>`, keyed by [`base_key`]: the rootfs's canonical path and
//! its directory's device, inode, mtime and ctime. Engines unpack each image into a new
//! directory, so a changed image gets a new base; editing files deep inside a bundle rootfs that
//! already has a base does NOT (delete the base with [`gc`] or touch the rootfs directory).
//! A container gets `create_snap` of its base, activated as `runv-c-<id>`; `cleanup` removes and
//! deletes that snapshot and leaves the pool and the bases.
//!
//! # Garbage collection
//!
//! Snapshots share blocks with their base by reference count, so a base can be deleted while
//! snapshots of it live. [`gc`] deletes every base no live container was made from (and bases
//! the caller does not list in `keep`); the CLI can call it, or an operator after removing images.
//!
//! # Device-mapper, udev and dmsetup
//!
//! Device-mapper is driven through the `devicemapper` crate's ioctls (module `dm`): create,
//! load, resume, remove, thin-pool messages, target list. The crate synchronises with udev where
//! udev runs and skips that where it does not (0.34.8 and later; 0.34.7 refused every ioctl
//! without a running udev, which is why this driver once ran `dmsetup`). The crate never makes
//! `/dev/mapper/<name>` nodes (libdevmapper does, the crate leaves that to udev), so where no
//! udev runs, as in runv's test host and minimal hosts, this driver makes them (module `node`).
//!
//! `dmsetup` is not run by this driver: the crate does all it needs. The Debian package still
//! depends on `dmsetup` for its udev rules: where udev runs, `95-dm-notify.rules` (`dmsetup
//! udevcomplete`) is what releases the crate's udev cookie; without those rules a resume or
//! remove would wait forever. The other programs it runs (`losetup`, `blockdev`, `mkfs.ext4`)
//! are listed in module `tools`.
//!
//! All pool changes are made under an exclusive `flock` on `pool_dir/lock`.

mod dm;
mod names;
mod node;
mod options;
mod pool;
mod probe;
mod state;
mod storage;
#[cfg(test)]
mod test_dir;
mod tools;

pub use dm::DM_CONTROL;
pub use names::{base_key, base_name, fnv1a, snapshot_name, valid_name};
pub use options::{DEFAULT_POOL_DIR, Options, parse_size};
pub use pool::gc;
pub use probe::probe_host;
pub use state::{Base, PoolState, Snapshot};
pub use storage::DevmapperStorage;

runv_api::export_storage!(|| Ok(DevmapperStorage));
