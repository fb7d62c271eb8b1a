//! The `Storage` the plugin exports: prepare a container's snapshot, clean it up.

use std::path::Path;

use runv_api::{
    Capabilities, PluginInfo, PluginKind, PreparedRootfs, RootfsSource, Storage, StorageRequest,
};

use crate::dm::DM_CONTROL;
use crate::options::Options;
use crate::pool::Pool;
use crate::probe::probe_host;

/// The device-mapper thin snapshot storage driver.
#[derive(Debug, Default)]
pub struct DevmapperStorage;

impl Storage for DevmapperStorage {
    fn info(&self) -> PluginInfo {
        PluginInfo {
            kind: PluginKind::Storage,
            name: "devmapper".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "a device-mapper thin snapshot per container, as a virtio-blk disk".into(),
            capabilities: Capabilities::BLOCK_ROOTFS,
        }
    }

    fn probe(&self) -> Result<(), String> {
        probe_host()
    }

    fn prepare(&self, request: &StorageRequest) -> Result<PreparedRootfs, String> {
        let opts = Options::parse(&request.options)?;
        if !request.rootfs.is_absolute() {
            return Err(format!(
                "devmapper storage: the rootfs {} is not an absolute path",
                request.rootfs.display()
            ));
        }
        probe_host()?;
        let mut pool = Pool::open(opts)?;
        let key = pool.base(&request.rootfs)?;
        let path = pool.snapshot(&request.container_id, &key)?;
        Ok(PreparedRootfs {
            source: RootfsSource::Block {
                path,
                fs_type: "ext4".into(),
            },
            readonly: request.readonly,
        })
    }

    fn cleanup(&self, request: &StorageRequest) -> Result<(), String> {
        let opts = Options::parse(&request.options)?;
        if !Path::new(DM_CONTROL).exists() || !Pool::was_made(&opts) {
            // Nothing can have been prepared on this host, or with these options.
            return Ok(());
        }
        Pool::open(opts)?.remove_snapshot(&request.container_id)
    }
}
