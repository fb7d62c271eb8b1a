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
//! # udev
//!
//! Device-mapper is driven through `dmsetup` with `DM_DISABLE_UDEV=1 --noudevsync`, so it works
//! without udev (dmsetup makes the `/dev/mapper/<name>` nodes; this driver checks them). The
//! `devicemapper` crate was tried first and dropped: version 0.34 refuses every ioctl with
//! "Udev daemon is not running: unable to create devices" when `/run/udev/control` is missing,
//! as in runv's test host and in minimal hosts.
//!
//! All pool changes are made under an exclusive `flock` on `pool_dir/lock`.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{Flock, FlockArg};
use runv_api::{
    Capabilities, PluginInfo, PluginKind, PreparedRootfs, RootfsSource, Storage, StorageRequest,
    export_storage,
};
use serde::{Deserialize, Serialize};

pub const DEFAULT_POOL_DIR: &str = "/var/lib/runv/devmapper";
pub const DM_CONTROL: &str = "/dev/mapper/control";
const SECTOR: u64 = 512;
/// Thin-pool data block size in sectors (64 KiB).
const DATA_BLOCK_SECTORS: u64 = 128;

/// Options, from `StorageRequest::options` (`--storage-opt key=value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub pool_name: String,
    pub pool_dir: PathBuf,
    pub data_dev: Option<PathBuf>,
    pub metadata_dev: Option<PathBuf>,
    pub data_size: u64,
    pub metadata_size: u64,
    pub base_size: u64,
}

/// Parses `10G`, `256M`, `4096K` or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid size {s:?} (examples: 10G, 256M)"))?;
    n.checked_mul(mult)
        .filter(|v| *v >= 1 << 20 && v % SECTOR == 0)
        .ok_or_else(|| format!("invalid size {s:?}: at least 1M, a multiple of 512 bytes"))
}

impl Options {
    pub fn parse(map: &BTreeMap<String, String>) -> Result<Self, String> {
        let mut o = Options {
            pool_name: "runv-pool".into(),
            pool_dir: DEFAULT_POOL_DIR.into(),
            data_dev: None,
            metadata_dev: None,
            data_size: 20 << 30,
            metadata_size: 256 << 20,
            base_size: 10 << 30,
        };
        for (k, v) in map {
            match k.as_str() {
                "pool_name" => o.pool_name = valid_name(v)?.to_string(),
                "pool_dir" => o.pool_dir = absolute(k, v)?,
                "data_dev" => o.data_dev = Some(absolute(k, v)?),
                "metadata_dev" => o.metadata_dev = Some(absolute(k, v)?),
                "data_size" => o.data_size = parse_size(v)?,
                "metadata_size" => o.metadata_size = parse_size(v)?,
                "base_size" => o.base_size = parse_size(v)?,
                _ => return Err(format!("devmapper storage: unknown option {k:?}")),
            }
        }
        if o.data_dev.is_some() != o.metadata_dev.is_some() {
            return Err(
                "devmapper storage: give both data_dev and metadata_dev, or neither".into(),
            );
        }
        Ok(o)
    }
}

fn absolute(key: &str, v: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(v);
    if p.is_absolute() {
        Ok(p)
    } else {
        Err(format!(
            "devmapper storage: {key} {v:?} is not an absolute path"
        ))
    }
}

/// A device-mapper name: 1..=100 of `[A-Za-z0-9_.+-]` (the kernel allows 127 bytes).
pub fn valid_name(name: &str) -> Result<&str, String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.+-".contains(&b));
    if ok {
        Ok(name)
    } else {
        Err(format!(
            "devmapper storage: {name:?} is not a usable device-mapper name"
        ))
    }
}

/// FNV-1a, 64 bits: stable across Rust versions (unlike `DefaultHasher`), enough for keys.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The base key of a bundle rootfs: see the crate docs.
pub fn base_key(rootfs: &Path) -> Result<String, String> {
    let canon = fs::canonicalize(rootfs)
        .map_err(|e| format!("devmapper storage: rootfs {}: {e}", rootfs.display()))?;
    let md = fs::metadata(&canon).map_err(|e| format!("{}: {e}", canon.display()))?;
    if !md.is_dir() {
        return Err(format!(
            "devmapper storage: rootfs {} is not a directory",
            canon.display()
        ));
    }
    let ident = format!(
        "{}\0{}:{}:{}.{}:{}.{}",
        canon.display(),
        md.dev(),
        md.ino(),
        md.mtime(),
        md.mtime_nsec(),
        md.ctime(),
        md.ctime_nsec()
    );
    Ok(format!("{:016x}", fnv1a(ident.as_bytes())))
}

/// The device-mapper name of a container's snapshot: `runv-c-<id>` for ids made of name
/// characters, else `runv-c-h<hash of the id>`.
pub fn snapshot_name(container_id: &str) -> String {
    match valid_name(container_id) {
        Ok(id) if id.len() <= 90 => format!("runv-c-{id}"),
        _ => format!("runv-c-h{:016x}", fnv1a(container_id.as_bytes())),
    }
}

pub fn base_name(key: &str) -> String {
    format!("runv-base-{key}")
}

/// What the pool holds, in `pool_dir/pool.json`.
#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(default)]
pub struct PoolState {
    /// The next free thin device id (24 bits in dm-thin).
    pub next_id: u32,
    /// base key -> thin id.
    pub bases: BTreeMap<String, Base>,
    /// container id -> its snapshot.
    pub containers: BTreeMap<String, Snapshot>,
}

#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(default)]
pub struct Base {
    pub thin_id: u32,
    pub sectors: u64,
    pub rootfs: PathBuf,
}

#[derive(Serialize, Deserialize, Debug, Default, Clone, PartialEq)]
#[serde(default)]
pub struct Snapshot {
    pub thin_id: u32,
    pub base: String,
    pub name: String,
}

impl PoolState {
    fn alloc_id(&mut self) -> Result<u32, String> {
        // Id 0 is never used, so a fresh state file cannot collide with a stale one.
        let id = self.next_id.max(1);
        if id >= 1 << 24 {
            return Err("devmapper storage: thin device ids exhausted".into());
        }
        self.next_id = id + 1;
        Ok(id)
    }
}

/// The pool, locked, with its state loaded.
struct Pool {
    opts: Options,
    state: PoolState,
    _lock: Flock<fs::File>,
}

/// Runs dmsetup without udev synchronisation: dmsetup then makes the /dev/mapper nodes itself.
fn dmsetup(args: &[&str]) -> Result<String, String> {
    run(Command::new("dmsetup")
        .env("DM_DISABLE_UDEV", "1")
        .arg("--noudevsync")
        .args(args))
    .map_err(|e| format!("devmapper storage: {e}"))
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("running {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!(
            "{:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn block_size(dev: &Path) -> Result<u64, String> {
    run(Command::new("blockdev").arg("--getsize64").arg(dev))?
        .parse()
        .map_err(|e| format!("size of {}: {e}", dev.display()))
}

/// The loop device backing `file`, attaching it when none does.
fn loop_for(file: &Path) -> Result<PathBuf, String> {
    let found = run(Command::new("losetup").arg("-j").arg(file))?;
    if let Some(dev) = found.lines().next().and_then(|l| l.split(':').next()) {
        if !dev.is_empty() {
            return Ok(dev.into());
        }
    }
    Ok(run(Command::new("losetup").args(["--find", "--show"]).arg(file))?.into())
}

fn sparse_file(path: &Path, size: u64) -> Result<bool, String> {
    if path.exists() {
        return Ok(false);
    }
    let f = fs::File::create(path).map_err(|e| format!("creating {}: {e}", path.display()))?;
    f.set_len(size)
        .map_err(|e| format!("sizing {}: {e}", path.display()))?;
    Ok(true)
}

impl Pool {
    fn open(opts: Options) -> Result<Self, String> {
        fs::create_dir_all(&opts.pool_dir)
            .map_err(|e| format!("creating {}: {e}", opts.pool_dir.display()))?;
        let lock_path = opts.pool_dir.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("opening {}: {e}", lock_path.display()))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, e)| format!("locking {}: {e}", lock_path.display()))?;
        let state = match fs::read(opts.pool_dir.join("pool.json")) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| format!("pool.json: {e}"))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => PoolState::default(),
            Err(e) => return Err(format!("reading pool.json: {e}")),
        };
        let mut pool = Pool {
            opts,
            state,
            _lock: lock,
        };
        pool.ensure_active()?;
        Ok(pool)
    }

    fn save(&self) -> Result<(), String> {
        let path = self.opts.pool_dir.join("pool.json");
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(&self.state).map_err(|e| e.to_string())?;
        fs::write(&tmp, json).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        fs::rename(&tmp, &path).map_err(|e| format!("renaming {}: {e}", tmp.display()))
    }

    fn exists(&self, n: &str) -> Result<bool, String> {
        valid_name(n)?;
        Ok(dmsetup(&["info", n]).is_ok())
    }

    /// Loads the pool table unless the pool is active already.
    fn ensure_active(&mut self) -> Result<(), String> {
        if self.exists(&self.opts.pool_name)? {
            return Ok(());
        }
        let (meta, data) = match (&self.opts.metadata_dev, &self.opts.data_dev) {
            (Some(m), Some(d)) => (m.clone(), d.clone()),
            _ => {
                let (mf, df) = (
                    self.opts.pool_dir.join("metadata.img"),
                    self.opts.pool_dir.join("data.img"),
                );
                let new_meta = sparse_file(&mf, self.opts.metadata_size)?;
                sparse_file(&df, self.opts.data_size)?;
                if new_meta {
                    // A new pool: forget bases and snapshots of an older one.
                    self.state = PoolState::default();
                }
                (loop_for(&mf)?, loop_for(&df)?)
            }
        };
        if self.state == PoolState::default() {
            // dm-thin formats a metadata device whose first block is zero.
            let f = fs::OpenOptions::new()
                .write(true)
                .open(&meta)
                .map_err(|e| format!("opening {}: {e}", meta.display()))?;
            nix::sys::uio::pwrite(&f, &[0u8; 4096], 0)
                .map_err(|e| format!("zeroing {}: {e}", meta.display()))?;
            f.sync_all().map_err(|e| e.to_string())?;
        }
        let data_sectors = block_size(&data)? / SECTOR / DATA_BLOCK_SECTORS * DATA_BLOCK_SECTORS;
        let params = format!(
            "{} {} {DATA_BLOCK_SECTORS} 0 1 skip_block_zeroing",
            meta.display(),
            data.display()
        );
        self.activate(
            &self.opts.pool_name.clone(),
            data_sectors,
            "thin-pool",
            params,
        )?;
        self.save()
    }

    /// Creates, loads and resumes a device with one target, and makes its /dev/mapper node.
    fn activate(
        &self,
        n: &str,
        sectors: u64,
        target: &str,
        params: String,
    ) -> Result<PathBuf, String> {
        valid_name(n)?;
        dmsetup(&[
            "create",
            n,
            "--table",
            &format!("0 {sectors} {target} {params}"),
        ])?;
        let numbers = dmsetup(&["info", "-c", "--noheadings", "-o", "major,minor", n])?;
        let (major, minor) = numbers
            .split_once(':')
            .and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)))
            .ok_or_else(|| format!("devmapper storage: dmsetup info {n}: {numbers:?}"))?;
        make_node(n, major, minor)
    }

    fn deactivate(&self, n: &str) -> Result<(), String> {
        if self.exists(n)? {
            dmsetup(&["remove", n])?;
        }
        let node = Path::new("/dev/mapper").join(n);
        match fs::remove_file(&node) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(format!("removing {}: {e}", node.display()))
            }
            _ => Ok(()),
        }
    }

    fn message(&self, msg: &str) -> Result<(), String> {
        dmsetup(&["message", &self.opts.pool_name, "0", msg]).map(|_| ())
    }

    fn thin_params(&self, thin_id: u32) -> String {
        format!("/dev/mapper/{} {thin_id}", self.opts.pool_name)
    }

    /// The base for `rootfs`, made (thin volume + mkfs.ext4 -d) when missing.
    fn base(&mut self, rootfs: &Path) -> Result<String, String> {
        let key = base_key(rootfs)?;
        if self.state.bases.contains_key(&key) {
            return Ok(key);
        }
        let thin_id = self.state.alloc_id()?;
        self.save()?;
        self.message(&format!("create_thin {thin_id}"))?;
        let sectors = self.opts.base_size / SECTOR;
        let n = base_name(&key);
        let made = self
            .activate(&n, sectors, "thin", self.thin_params(thin_id))
            .and_then(|node| {
                run(Command::new("mkfs.ext4")
                    .args([
                        "-q",
                        "-F",
                        "-E",
                        "lazy_itable_init=1,lazy_journal_init=1",
                        "-d",
                    ])
                    .arg(rootfs)
                    .arg(&node))
            });
        let _ = self.deactivate(&n);
        if let Err(e) = made {
            let _ = self.message(&format!("delete {thin_id}"));
            return Err(format!(
                "devmapper storage: making the base for {}: {e}",
                rootfs.display()
            ));
        }
        self.state.bases.insert(
            key.clone(),
            Base {
                thin_id,
                sectors,
                rootfs: rootfs.into(),
            },
        );
        self.save()?;
        Ok(key)
    }

    fn snapshot(&mut self, container_id: &str, key: &str) -> Result<PathBuf, String> {
        let n = snapshot_name(container_id);
        if let Some(s) = self.state.containers.get(container_id) {
            // Prepared before (a retried create): activate it again if needed.
            let node = Path::new("/dev/mapper").join(&s.name);
            if self.exists(&s.name)? && node.exists() {
                return Ok(node);
            }
            let (thin_id, sectors) = (s.thin_id, self.state.bases[&s.base].sectors);
            let _ = self.deactivate(&n);
            return self.activate(&n, sectors, "thin", self.thin_params(thin_id));
        }
        let base = self.state.bases[key].clone();
        let thin_id = self.state.alloc_id()?;
        self.save()?;
        // The origin is inactive (bases are deactivated after mkfs), so no suspend is needed.
        self.message(&format!("create_snap {thin_id} {}", base.thin_id))?;
        self.state.containers.insert(
            container_id.into(),
            Snapshot {
                thin_id,
                base: key.into(),
                name: n.clone(),
            },
        );
        self.save()?;
        self.activate(&n, base.sectors, "thin", self.thin_params(thin_id))
    }

    fn remove_snapshot(&mut self, container_id: &str) -> Result<(), String> {
        let Some(s) = self.state.containers.get(container_id).cloned() else {
            return self.deactivate(&snapshot_name(container_id));
        };
        self.deactivate(&s.name)?;
        self.message(&format!("delete {}", s.thin_id))?;
        self.state.containers.remove(container_id);
        self.save()
    }
}

/// Makes `/dev/mapper/<name>` (a block node, as dmsetup does without udev) unless it is there.
fn make_node(n: &str, major: u32, minor: u32) -> Result<PathBuf, String> {
    use nix::sys::stat::{Mode, SFlag, makedev, mknod};
    let node = Path::new("/dev/mapper").join(n);
    let want = makedev(major.into(), minor.into());
    for _ in 0..100 {
        // udev, when it runs, may be creating it (as a symlink to ../dm-N).
        if let Ok(md) = fs::metadata(&node) {
            if md.file_type().is_block_device() && md.rdev() == want {
                return Ok(node);
            }
            let _ = fs::remove_file(&node);
            break;
        }
        if !Path::new("/run/udev/control").exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    mknod(&node, SFlag::S_IFBLK, Mode::from_bits_truncate(0o600), want)
        .map_err(|e| format!("mknod {}: {e}", node.display()))?;
    Ok(node)
}

/// Deletes the bases from which no live container was made, except those in `keep`. Returns the
/// keys deleted.
pub fn gc(options: &BTreeMap<String, String>, keep: &[String]) -> Result<Vec<String>, String> {
    let mut pool = Pool::open(Options::parse(options)?)?;
    let used: Vec<String> = pool
        .state
        .containers
        .values()
        .map(|s| s.base.clone())
        .collect();
    let unused: Vec<(String, u32)> = pool
        .state
        .bases
        .iter()
        .filter(|(k, _)| !used.contains(k) && !keep.contains(k))
        .map(|(k, b)| (k.clone(), b.thin_id))
        .collect();
    for (key, thin_id) in &unused {
        pool.deactivate(&base_name(key))?;
        pool.message(&format!("delete {thin_id}"))?;
        pool.state.bases.remove(key);
        pool.save()?;
    }
    Ok(unused.into_iter().map(|(k, _)| k).collect())
}

/// The device-mapper thin snapshot storage driver.
#[derive(Debug, Default)]
pub struct DevmapperStorage;

/// Why device-mapper cannot be used here, if it cannot.
pub fn probe_host() -> Result<(), String> {
    if !Path::new(DM_CONTROL).exists() {
        return Err(format!(
            "no {DM_CONTROL} (device-mapper not in this kernel: load dm-mod and dm-thin-pool)"
        ));
    }
    if !nix::unistd::geteuid().is_root() {
        return Err("the devmapper storage driver needs root".into());
    }
    let targets = dmsetup(&["targets"])?;
    if !targets
        .lines()
        .any(|l| l.split_whitespace().next() == Some("thin-pool"))
    {
        return Err("device-mapper has no thin-pool target: load dm-thin-pool \
                    (modprobe crc32c first)"
            .into());
    }
    for tool in ["dmsetup", "mkfs.ext4", "losetup", "blockdev"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()));
        if !found {
            return Err(format!("{tool} not found in PATH (e2fsprogs / util-linux)"));
        }
    }
    Ok(())
}

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
        if !Path::new(DM_CONTROL).exists() {
            // Nothing can have been prepared on this host.
            return Ok(());
        }
        let mut pool = Pool::open(opts)?;
        pool.remove_snapshot(&request.container_id)
    }
}

export_storage!(|| Ok(DevmapperStorage));

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn default_options() {
        let o = Options::parse(&BTreeMap::new()).unwrap();
        assert_eq!(o.pool_name, "runv-pool");
        assert_eq!(o.pool_dir, Path::new(DEFAULT_POOL_DIR));
        assert_eq!((o.data_dev, o.metadata_dev), (None, None));
        assert_eq!(o.base_size, 10 << 30);
    }

    #[test]
    fn options_are_checked() {
        let o = Options::parse(&map(&[
            ("data_dev", "/dev/sdb"),
            ("metadata_dev", "/dev/sdc"),
            ("base_size", "2G"),
            ("pool_name", "p1"),
        ]))
        .unwrap();
        assert_eq!(o.data_dev.as_deref(), Some(Path::new("/dev/sdb")));
        assert_eq!(o.base_size, 2 << 30);
        for bad in [
            map(&[("data_dev", "/dev/sdb")]),
            map(&[("pool_dir", "relative")]),
            map(&[("base_size", "12")]),
            map(&[("base_size", "lots")]),
            map(&[("pool_name", "a b")]),
            map(&[("colour", "blue")]),
        ] {
            assert!(Options::parse(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert!(parse_size("1k").is_err(), "below 1M");
        assert!(parse_size("99999999999T").is_err(), "overflow");
    }

    #[test]
    fn snapshot_names_are_dm_names() {
        assert_eq!(snapshot_name("web-1"), "runv-c-web-1");
        let long = "a".repeat(91);
        for id in [long.as_str(), "with space", "slash/y", ""] {
            let n = snapshot_name(id);
            assert!(n.starts_with("runv-c-h") && valid_name(&n).is_ok(), "{n}");
        }
        assert_ne!(snapshot_name("a b"), snapshot_name("a c"));
        assert!(snapshot_name(&"f".repeat(90)).len() < 127);
    }

    #[test]
    fn base_keys_follow_the_rootfs_directory() {
        let dir = std::env::temp_dir().join(format!("runv-dm-key-{}", std::process::id()));
        let (a, b) = (dir.join("a"), dir.join("b"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        let ka = base_key(&a).unwrap();
        assert_eq!(ka, base_key(&a).unwrap(), "stable");
        assert_eq!(ka.len(), 16);
        assert_ne!(ka, base_key(&b).unwrap(), "another directory");
        fs::write(a.join("new"), "x").unwrap();
        assert_ne!(ka, base_key(&a).unwrap(), "a changed directory");
        assert!(base_key(&dir.join("missing")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn thin_ids_start_at_one_and_grow() {
        let mut s = PoolState::default();
        assert_eq!(s.alloc_id().unwrap(), 1);
        assert_eq!(s.alloc_id().unwrap(), 2);
        s.next_id = 1 << 24;
        assert!(s.alloc_id().is_err());
    }

    #[test]
    fn fnv_is_stable() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn probe_explains_a_missing_device_mapper() {
        if Path::new(DM_CONTROL).exists() {
            eprintln!("skipped: {DM_CONTROL} exists here");
            return;
        }
        let err = DevmapperStorage.probe().unwrap_err();
        assert_eq!(
            err,
            "no /dev/mapper/control (device-mapper not in this kernel: load dm-mod and dm-thin-pool)"
        );
    }
}
