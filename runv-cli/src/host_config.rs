//! The host configuration: `/etc/runv/config.toml` (or `--config FILE`, or `$RUNV_CONFIG`).
//!
//! Engines can hand runv only a binary path and a few arguments, so host-wide defaults live in a
//! file. Each value is resolved as flag > environment > file > built-in default, and remembers
//! where it came from, for `runv config show`. Per-container settings in the bundle (the spec's
//! `vm` section, the `runv.vm.*` annotations, `linux.resources`) sit between the flags and the
//! environment: they describe one container, the environment and the file only the host's
//! defaults.
//!
//! A bad value is one line naming the file (or variable), the key and the line:
//! `/etc/runv/config.toml:4: vm.vcpus: must be 1 to 64, got 0`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use toml::Spanned;

use crate::cli::RunvOpts;

pub const DEFAULT_PATH: &str = "/etc/runv/config.toml";
pub const ENV_CONFIG: &str = "RUNV_CONFIG";

pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 128;
/// The same bounds as the spec's sizes get (`Bundle::vm_size`).
pub const MAX_VCPUS: u32 = 64;
pub const MIN_MEMORY_MIB: u64 = crate::bundle::MIN_MEMORY_MIB;
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// Where a value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// a command-line flag, e.g. `--driver`
    Flag(&'static str),
    /// an environment variable, e.g. `RUNV_DRIVER`
    Env(&'static str),
    /// the config file, at this line
    File(PathBuf, usize),
    Default,
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Flag(_) => "flag",
            Source::Env(_) => "env",
            Source::File(..) => "file",
            Source::Default => "default",
        }
    }

    /// The flag, variable or `file:line`; empty for a default.
    pub fn origin(&self) -> String {
        match self {
            Source::Flag(f) => f.to_string(),
            Source::Env(v) => v.to_string(),
            Source::File(path, line) => format!("{}:{line}", path.display()),
            Source::Default => String::new(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Setting<T> {
    pub value: T,
    pub source: Source,
}

impl<T> Setting<T> {
    fn default(value: T) -> Self {
        Setting {
            value,
            source: Source::Default,
        }
    }
}

/// The effective host configuration.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// The file that was read (`None`: the default path does not exist).
    pub file: Setting<Option<PathBuf>>,
    pub driver: Setting<Option<String>>,
    pub storage: Setting<Option<String>>,
    pub kernel: Setting<Option<PathBuf>>,
    pub initrd: Setting<Option<PathBuf>>,
    pub accel: Setting<Option<String>>,
    pub vcpus: Setting<u32>,
    pub memory_mib: Setting<u64>,
    /// `auto`, `off` or a template's name (`--template`, `RUNV_TEMPLATE`, `template =`).
    pub template: Setting<String>,
    /// `None`: warn to stderr, info to a `--log` file.
    pub log_level: Setting<Option<String>>,
    /// Per driver: parameters the driver gets unless the spec or a flag sets them.
    pub driver_parameters: BTreeMap<String, BTreeMap<String, Setting<String>>>,
}

/// The file's layout. Values are spanned so that checks after parsing can name the line.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    driver: Option<Spanned<String>>,
    storage: Option<Spanned<String>>,
    kernel: Option<Spanned<String>>,
    initrd: Option<Spanned<String>>,
    accel: Option<Spanned<String>>,
    template: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
    vm: Option<VmTable>,
    driver_parameters: Option<BTreeMap<String, BTreeMap<String, Spanned<String>>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct VmTable {
    vcpus: Option<Spanned<i64>>,
    memory_mib: Option<Spanned<i64>>,
}

/// Reads the environment; a seam for tests.
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        // An empty variable counts as unset, as engines often pass `VAR=`.
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl HostConfig {
    /// Resolves every value from the flags, the process environment and the file.
    pub fn load(flags: &RunvOpts, debug: bool) -> anyhow::Result<Self> {
        Self::load_with(flags, debug, &ProcessEnv)
    }

    pub fn load_with(flags: &RunvOpts, debug: bool, env: &dyn Env) -> anyhow::Result<Self> {
        let file = match (&flags.config, env.var(ENV_CONFIG)) {
            (Some(path), _) => Setting {
                value: Some(path.clone()),
                source: Source::Flag("--config"),
            },
            (None, Some(path)) => Setting {
                value: Some(PathBuf::from(path)),
                source: Source::Env(ENV_CONFIG),
            },
            (None, None) => Setting::default(
                Path::new(DEFAULT_PATH)
                    .exists()
                    .then(|| PathBuf::from(DEFAULT_PATH)),
            ),
        };
        let parsed = match &file.value {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the config file {}", path.display()))?;
                Some((path.clone(), parse_file(path, &text)?, text))
            }
            None => None,
        };
        let (path, fc, text) = match parsed {
            Some((p, f, t)) => (p, f, t),
            None => (PathBuf::new(), FileConfig::default(), String::new()),
        };
        let at = |span: Range<usize>| Source::File(path.clone(), line_of(&text, span.start));
        let bad = |key: &str, span: Range<usize>, why: String| {
            anyhow::anyhow!(
                "{}:{}: {key}: {why}",
                path.display(),
                line_of(&text, span.start)
            )
        };

        // One string-valued key: flag, env, file, default; each value checked by `check`.
        let string_key = |key: &str,
                          flag: (Option<String>, &'static str),
                          var: &'static str,
                          from_file: &Option<Spanned<String>>,
                          check: &dyn Fn(&str) -> Result<(), String>|
         -> anyhow::Result<Setting<Option<String>>> {
            if let Some(v) = flag.0 {
                check(&v).map_err(|why| anyhow::anyhow!("{}: {why}", flag.1))?;
                return Ok(Setting {
                    value: Some(v),
                    source: Source::Flag(flag.1),
                });
            }
            if let Some(v) = env.var(var) {
                check(&v).map_err(|why| anyhow::anyhow!("{var}: {why}"))?;
                return Ok(Setting {
                    value: Some(v),
                    source: Source::Env(var),
                });
            }
            if let Some(v) = from_file {
                check(v.get_ref()).map_err(|why| bad(key, v.span(), why))?;
                return Ok(Setting {
                    value: Some(v.get_ref().clone()),
                    source: at(v.span()),
                });
            }
            Ok(Setting::default(None))
        };
        let path_of = |s: Setting<Option<String>>| Setting {
            value: s.value.map(PathBuf::from),
            source: s.source,
        };
        let flag_path = |p: &Option<PathBuf>| p.as_ref().map(|p| p.display().to_string());

        let driver = string_key(
            "driver",
            (flags.driver.clone(), "--driver"),
            "RUNV_DRIVER",
            &fc.driver,
            &check_name,
        )?;
        let storage = string_key(
            "storage",
            (flags.storage.clone(), "--storage"),
            "RUNV_STORAGE",
            &fc.storage,
            &check_name,
        )?;
        // Flags may be relative to the working directory (as before); the file and the
        // environment are read by engines from anywhere, so there they must be absolute.
        let kernel = path_of(string_key(
            "kernel",
            (flag_path(&flags.kernel), "--kernel"),
            "RUNV_KERNEL",
            &fc.kernel,
            &check_absolute,
        )?);
        let initrd = path_of(string_key(
            "initrd",
            (flag_path(&flags.initrd), "--initrd"),
            "RUNV_INITRD",
            &fc.initrd,
            &check_absolute,
        )?);
        let accel = string_key(
            "accel",
            (flags.accel.clone(), "--accel"),
            "RUNV_ACCEL",
            &fc.accel,
            &|v| match v {
                "kvm" | "tcg" => Ok(()),
                _ => Err(format!("want kvm or tcg, got {v:?}")),
            },
        )?;
        let template = string_key(
            "template",
            (flags.template.clone(), "--template"),
            "RUNV_TEMPLATE",
            &fc.template,
            &check_template,
        )?;
        let template = Setting {
            value: template.value.unwrap_or_else(|| "auto".into()),
            source: template.source,
        };
        let log_level = string_key(
            "log_level",
            (debug.then(|| "debug".to_string()), "--debug"),
            "RUNV_LOG_LEVEL",
            &fc.log_level,
            &|v| {
                if LOG_LEVELS.contains(&v) {
                    Ok(())
                } else {
                    Err(format!("want one of {}, got {v:?}", LOG_LEVELS.join(", ")))
                }
            },
        )?;

        let vm = fc.vm.unwrap_or_default();
        let number = |key: &str,
                      var: &'static str,
                      from_file: &Option<Spanned<i64>>,
                      range: (u64, u64),
                      default: u64|
         -> anyhow::Result<Setting<u64>> {
            let check = |n: i64| -> Result<u64, String> {
                u64::try_from(n)
                    .ok()
                    .filter(|n| (range.0..=range.1).contains(n))
                    .ok_or_else(|| format!("must be {} to {}, got {n}", range.0, range.1))
            };
            if let Some(v) = env.var(var) {
                let n: i64 = v
                    .trim()
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{var}: not a number: {v:?}"))?;
                let n = check(n).map_err(|why| anyhow::anyhow!("{var}: {why}"))?;
                return Ok(Setting {
                    value: n,
                    source: Source::Env(var),
                });
            }
            if let Some(v) = from_file {
                let n = check(*v.get_ref()).map_err(|why| bad(key, v.span(), why))?;
                return Ok(Setting {
                    value: n,
                    source: at(v.span()),
                });
            }
            Ok(Setting::default(default))
        };
        let vcpus = number(
            "vm.vcpus",
            "RUNV_VCPUS",
            &vm.vcpus,
            (1, MAX_VCPUS.into()),
            DEFAULT_VCPUS.into(),
        )?;
        let vcpus = Setting {
            value: vcpus.value as u32,
            source: vcpus.source,
        };
        let memory_mib = number(
            "vm.memory_mib",
            "RUNV_MEMORY_MIB",
            &vm.memory_mib,
            (MIN_MEMORY_MIB, MAX_MEMORY_MIB),
            DEFAULT_MEMORY_MIB,
        )?;

        let mut driver_parameters = BTreeMap::new();
        for (name, params) in fc.driver_parameters.unwrap_or_default() {
            let mut out = BTreeMap::new();
            for (key, value) in params {
                let full = format!("driver_parameters.{name}.{key}");
                check_name(&name).map_err(|why| bad(&full, value.span(), why))?;
                if key.is_empty() || key.contains(['=', ',', ' ']) {
                    return Err(bad(
                        &full,
                        value.span(),
                        "a parameter name cannot be empty or hold '=', ',' or spaces".into(),
                    ));
                }
                out.insert(
                    key,
                    Setting {
                        source: at(value.span()),
                        value: value.into_inner(),
                    },
                );
            }
            driver_parameters.insert(name, out);
        }

        Ok(HostConfig {
            file,
            driver,
            storage,
            kernel,
            initrd,
            accel,
            vcpus,
            memory_mib,
            template,
            log_level,
            driver_parameters,
        })
    }

    /// The log level to use, `None` for the built-in choice (warn to stderr, info to a file).
    pub fn log_filter(&self) -> Option<tracing_subscriber::filter::LevelFilter> {
        self.log_level.value.as_deref().and_then(|v| v.parse().ok())
    }

    /// The flags with the host defaults filled in, for the code that reads `RunvOpts`.
    pub fn apply(&self, flags: &RunvOpts) -> RunvOpts {
        RunvOpts {
            driver: self.driver.value.clone(),
            storage: self.storage.value.clone(),
            accel: self.accel.value.clone(),
            template: Some(self.template.value.clone()),
            ..flags.clone()
        }
    }

    /// Every key with its value and source, in the file's order.
    pub fn entries(&self) -> Vec<(String, String, &Source)> {
        fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
            v.as_ref().map(|v| v.to_string()).unwrap_or_default()
        }
        let mut rows = vec![
            (
                "config".to_string(),
                self.file
                    .value
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                &self.file.source,
            ),
            (
                "driver".into(),
                opt(&self.driver.value),
                &self.driver.source,
            ),
            (
                "storage".into(),
                opt(&self.storage.value),
                &self.storage.source,
            ),
            (
                "kernel".into(),
                opt(&self.kernel.value.as_ref().map(|p| p.display())),
                &self.kernel.source,
            ),
            (
                "initrd".into(),
                opt(&self.initrd.value.as_ref().map(|p| p.display())),
                &self.initrd.source,
            ),
            ("accel".into(), opt(&self.accel.value), &self.accel.source),
            (
                "template".into(),
                self.template.value.clone(),
                &self.template.source,
            ),
            (
                "log_level".into(),
                opt(&self.log_level.value),
                &self.log_level.source,
            ),
            (
                "vm.vcpus".into(),
                self.vcpus.value.to_string(),
                &self.vcpus.source,
            ),
            (
                "vm.memory_mib".into(),
                self.memory_mib.value.to_string(),
                &self.memory_mib.source,
            ),
        ];
        for (driver, params) in &self.driver_parameters {
            for (key, setting) in params {
                rows.push((
                    format!("driver_parameters.{driver}.{key}"),
                    setting.value.clone(),
                    &setting.source,
                ));
            }
        }
        rows
    }
}

/// What an unset value means, for `config show`.
pub fn default_meaning(key: &str) -> &'static str {
    match key {
        "config" => "(none: /etc/runv/config.toml does not exist)",
        "driver" => "(the first available of qemu, kvm-native, kvmtool, xen)",
        "storage" => "(none: the bundle's rootfs is shared as it is)",
        "kernel" | "initrd" => "(the spec's vm section, PREFIX/share/runv, target/guest)",
        "accel" => "(kvm where usable, else tcg)",
        "log_level" => "(warn to stderr, info to a --log file)",
        _ => "",
    }
}

fn parse_file(path: &Path, text: &str) -> anyhow::Result<FileConfig> {
    toml::from_str(text).map_err(|e| {
        let start = e.span().map(|s| s.start).unwrap_or(0);
        let line = line_of(text, start);
        // toml's message can span lines (it quotes the input); the first line is the reason.
        let message = e.message().lines().next().unwrap_or("invalid TOML").trim();
        match key_at(text, start) {
            Some(key) => anyhow::anyhow!("{}:{line}: {key}: {message}", path.display()),
            None => anyhow::anyhow!("{}:{line}: {message}", path.display()),
        }
    })
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    let offset = offset.min(text.len());
    text.as_bytes()[..offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The dotted key whose line holds `offset`: the `key = ` before it, under the last `[table]`
/// header above it. Good enough for naming the key in an error; not a TOML parser.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let line_start = text[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[line_start..].lines().next().unwrap_or("");
    let trimmed = line.trim();
    if trimmed.starts_with('[') {
        return Some(trimmed.trim_matches(['[', ']', ' ']).to_string());
    }
    let key = trimmed.split('=').next()?.trim();
    if key.is_empty() || !line.contains('=') {
        return None;
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && !l.starts_with("[["))
        .map(|l| l.trim_matches(['[', ']', ' ']).to_string());
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_string(),
    })
}

fn check_name(v: &str) -> Result<(), String> {
    if !v.is_empty()
        && v.len() <= 64
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        Ok(())
    } else {
        Err(format!(
            "not a driver name: {v:?} (letters, digits, '-', '_', '.')"
        ))
    }
}

fn check_absolute(v: &str) -> Result<(), String> {
    if Path::new(v).is_absolute() {
        Ok(())
    } else {
        Err(format!("want an absolute path, got {v:?}"))
    }
}

fn check_template(v: &str) -> Result<(), String> {
    check_name(v).map_err(|_| format!("want auto, off or a template name, got {v:?}"))
}

/// Prints the effective configuration (`runv config show`).
pub fn show(config: &HostConfig, format: &str) -> anyhow::Result<()> {
    let rows = config.entries();
    match format {
        "json" => {
            let mut values = serde_json::Map::new();
            for (key, value, source) in &rows {
                values.insert(
                    key.clone(),
                    serde_json::json!({
                        "value": json_value(key, value),
                        "source": source.kind(),
                        "origin": source.origin(),
                    }),
                );
            }
            println!("{}", serde_json::Value::Object(values));
        }
        "table" => {
            let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
            for (key, value, source) in &rows {
                let value = if value.is_empty() {
                    default_meaning(key).to_string()
                } else {
                    value.clone()
                };
                let from = match source {
                    Source::Default => "default".to_string(),
                    other => format!("{} {}", other.kind(), other.origin()),
                };
                println!("{key:width$}  {value}  [{from}]");
            }
        }
        other => bail!("invalid format {other:?}: want table or json"),
    }
    Ok(())
}

/// A value as JSON: null when unset, numbers as numbers.
fn json_value(key: &str, value: &str) -> serde_json::Value {
    if value.is_empty() {
        return serde_json::Value::Null;
    }
    match value.parse::<u64>() {
        Ok(n) if key.starts_with("vm.") => n.into(),
        _ => value.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct FakeEnv(HashMap<&'static str, &'static str>);

    impl Env for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    struct TempFile(PathBuf);

    impl TempFile {
        fn new(tag: &str, text: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("runv-config-{tag}-{}.toml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn load(
        file: &TempFile,
        flags: RunvOpts,
        env: &[(&'static str, &'static str)],
    ) -> anyhow::Result<HostConfig> {
        let flags = RunvOpts {
            config: Some(file.0.clone()),
            ..flags
        };
        HostConfig::load_with(&flags, false, &FakeEnv(env.iter().copied().collect()))
    }

    const FULL: &str = r#"# a host's defaults
driver = "kvm-native"
storage = "overlay"
kernel = "/k/vmlinux"
template = "auto"

[vm]
vcpus = 2
memory_mib = 512

[driver_parameters.qemu]
accel = "tcg"
"#;

    #[test]
    fn flags_beat_env_beat_file_beat_defaults() {
        let f = TempFile::new("prec", FULL);
        let c = load(&f, RunvOpts::default(), &[]).unwrap();
        assert_eq!(c.driver.value.as_deref(), Some("kvm-native"));
        assert_eq!(c.driver.source, Source::File(f.0.clone(), 2));
        assert_eq!(c.vcpus.value, 2);
        assert_eq!(c.vcpus.source, Source::File(f.0.clone(), 8));
        assert_eq!(c.accel.source, Source::Default);
        assert_eq!(c.driver_parameters["qemu"]["accel"].value, "tcg");

        let c = load(
            &f,
            RunvOpts::default(),
            &[("RUNV_DRIVER", "qemu"), ("RUNV_VCPUS", "3")],
        )
        .unwrap();
        assert_eq!(c.driver.value.as_deref(), Some("qemu"));
        assert_eq!(c.driver.source, Source::Env("RUNV_DRIVER"));
        assert_eq!(c.vcpus.value, 3);
        assert_eq!(c.storage.source, Source::File(f.0.clone(), 3));

        let flags = RunvOpts {
            driver: Some("xen".into()),
            ..RunvOpts::default()
        };
        let c = load(&f, flags, &[("RUNV_DRIVER", "qemu")]).unwrap();
        assert_eq!(c.driver.value.as_deref(), Some("xen"));
        assert_eq!(c.driver.source, Source::Flag("--driver"));
        assert_eq!(c.memory_mib.value, 512);
    }

    #[test]
    fn defaults_without_a_file() {
        let f = TempFile::new("empty", "");
        let c = load(&f, RunvOpts::default(), &[]).unwrap();
        assert_eq!(c.driver.value, None);
        assert_eq!(c.vcpus.value, DEFAULT_VCPUS);
        assert_eq!(c.memory_mib.value, DEFAULT_MEMORY_MIB);
        assert_eq!(c.template.value, "auto");
        assert_eq!(c.log_filter(), None);
        assert_eq!(c.file.source, Source::Flag("--config"));
    }

    fn error(text: &str) -> String {
        let f = TempFile::new("bad", text);
        let e = load(&f, RunvOpts::default(), &[]).unwrap_err();
        let e = format!("{e:#}");
        assert!(!e.contains('\n'), "not one line: {e}");
        let prefix = format!("{}:", f.0.display());
        e.strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("does not name the file: {e}"))
            .to_string()
    }

    #[test]
    fn bad_values_name_file_key_and_line() {
        assert_eq!(
            error("driver = \"qemu\"\n[vm]\nvcpus = 0\n"),
            "3: vm.vcpus: must be 1 to 64, got 0"
        );
        assert!(error("[vm]\n\nmemory_mib = \"lots\"\n").starts_with("3: vm.memory_mib: "));
        assert!(error("\ndrver = \"qemu\"\n").starts_with("2: drver: unknown field"));
        assert!(error("kernel = \"vmlinux\"\n").starts_with("1: kernel: want an absolute path"));
        assert!(error("log_level = \"loud\"\n").starts_with("1: log_level: want one of"));
        assert!(error("accel = \"hvf\"\n").starts_with("1: accel: want kvm or tcg"));
        assert!(error("template = \"a b\"\n").starts_with("1: template: want auto, off"));
        assert!(error("driver = \n").starts_with("1: driver: "));
        assert!(
            error("[driver_parameters.qemu]\n\"a=b\" = \"x\"\n")
                .starts_with("2: driver_parameters.qemu.a=b: ")
        );
    }

    #[test]
    fn bad_env_and_flag_values_name_the_variable_or_flag() {
        let f = TempFile::new("env", "");
        let e = load(&f, RunvOpts::default(), &[("RUNV_VCPUS", "many")]).unwrap_err();
        assert_eq!(format!("{e:#}"), "RUNV_VCPUS: not a number: \"many\"");
        let flags = RunvOpts {
            accel: Some("x".into()),
            ..RunvOpts::default()
        };
        let e = load(&f, flags, &[]).unwrap_err();
        assert_eq!(format!("{e:#}"), "--accel: want kvm or tcg, got \"x\"");
    }

    #[test]
    fn a_named_file_that_is_missing_is_an_error() {
        let flags = RunvOpts {
            config: Some("/nonexistent/runv.toml".into()),
            ..RunvOpts::default()
        };
        let e = HostConfig::load_with(&flags, false, &FakeEnv(HashMap::new())).unwrap_err();
        assert!(format!("{e:#}").starts_with("reading the config file /nonexistent/runv.toml"));
    }
}
