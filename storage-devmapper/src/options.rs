//! The driver's options and their checks.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::names::valid_name;

pub const DEFAULT_POOL_DIR: &str = "/var/lib/runv/devmapper";
pub const SECTOR: u64 = 512;

/// Options, from `StorageRequest::options` (runv's CLI passes none yet: `runv --storage devmapper`
/// runs on the defaults).
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
        .filter(|v| *v >= 1 << 20 && v.is_multiple_of(SECTOR))
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

#[cfg(test)]
mod tests {
    use std::path::Path;

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
        assert!(parse_size("").is_err(), "empty");
        assert!(parse_size("€").is_err(), "a multi-byte last character");
    }
}
