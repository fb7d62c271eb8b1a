//! Finding and loading driver plugins at run time.
//!
//! Search order (first match of a driver name wins; later duplicates are skipped with a warning):
//! 1. every `--driver-dir DIR`, in the order given; else
//! 2. the directories in `$RUNV_DRIVER_DIR` (colon-separated); else
//! 3. the first of `<dir of runv>/../lib/runv` (an installed prefix), the directory of the
//!    running binary itself (a development build in `target/<profile>/`) and `/usr/lib/runv`
//!    that holds any plugin file. Only one: a development build must not pick up the plugins
//!    of an installed package (its tests run while the package tests install one), and a
//!    `/usr/local` install must not mix with a distribution's, whose plugins may be built
//!    against another runv-api.
//!
//! Within a directory, files are taken in name order. Only files named `librunv_*.so` are
//! considered. A file that cannot be loaded becomes one warning line and the rest still load.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use abi_stable::library::{LibraryError, lib_header_from_path};
use runv_api::{HypervisorClient, PluginKind, PluginModuleRef, StorageClient};

pub const DEFAULT_SYSTEM_DIR: &str = "/usr/lib/runv";
pub const ENV_DRIVER_DIR: &str = "RUNV_DRIVER_DIR";

/// Drivers tried, in this order, when no `--driver` is given. Drivers not listed here (third
/// party ones, the example) are only used when named.
pub const HYPERVISOR_PREFERENCE: [&str; 4] = ["qemu", "kvm-native", "kvmtool", "xen"];

pub struct Loaded<T> {
    pub client: T,
    pub file: PathBuf,
}

#[derive(Default)]
pub struct Registry {
    pub hypervisors: Vec<Loaded<HypervisorClient>>,
    pub storages: Vec<Loaded<StorageClient>>,
    /// One line per file that was skipped, naming the file and why.
    pub skipped: Vec<Skipped>,
}

pub struct Skipped {
    pub file: PathBuf,
    pub reason: String,
}

/// The directories to search, per the order documented above.
/// Returns the directories and whether they were named explicitly (a missing explicit
/// directory is worth a warning; a missing default one is not).
pub fn search_dirs(cli_dirs: &[PathBuf]) -> (Vec<PathBuf>, bool) {
    if !cli_dirs.is_empty() {
        return (cli_dirs.to_vec(), true);
    }
    if let Some(env) = std::env::var_os(ENV_DRIVER_DIR).filter(|v| !v.is_empty()) {
        return (std::env::split_paths(&env).collect(), true);
    }
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    (
        default_dirs(exe_dir.as_deref(), Path::new(DEFAULT_SYSTEM_DIR)),
        false,
    )
}

/// The one default directory (see the module docs), or none when no candidate holds plugins.
fn default_dirs(exe_dir: Option<&Path>, system_dir: &Path) -> Vec<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = exe_dir {
        if let Some(prefix) = dir.parent() {
            candidates.push(prefix.join("lib/runv"));
        }
        candidates.push(dir.to_path_buf());
    }
    candidates.push(system_dir.to_path_buf());
    candidates
        .into_iter()
        .find(|d| !plugin_files(d, false, &mut Vec::new()).is_empty())
        .into_iter()
        .collect()
}

impl Registry {
    pub fn load((dirs, explicit): (Vec<PathBuf>, bool)) -> Self {
        let mut registry = Registry::default();
        let mut seen_files = HashSet::new();
        for dir in &dirs {
            for file in plugin_files(dir, explicit, &mut registry.skipped) {
                let canonical = fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
                if !seen_files.insert(canonical) {
                    continue;
                }
                registry.load_file(&file);
            }
        }
        for skipped in &registry.skipped {
            let what = if skipped.file.is_dir() || !skipped.file.to_string_lossy().ends_with(".so")
            {
                "driver directory"
            } else {
                "plugin"
            };
            tracing::warn!(
                "skipping {what} {}: {}",
                skipped.file.display(),
                skipped.reason
            );
        }
        registry
    }

    fn load_file(&mut self, file: &Path) {
        let module = match load_module(file) {
            Ok(module) => module,
            Err(reason) => {
                self.skip(file, reason);
                return;
            }
        };
        let kind = module.kind();
        let result = match kind {
            PluginKind::Hypervisor => (module.new_hypervisor())()
                .into_result()
                .map(|b| Plugin::Hypervisor(HypervisorClient::new(b))),
            PluginKind::Storage => (module.new_storage())()
                .into_result()
                .map(|b| Plugin::Storage(StorageClient::new(b))),
        };
        let plugin = match result {
            Ok(plugin) => plugin,
            Err(e) => {
                self.skip(file, format!("the plugin failed to initialise: {e}"));
                return;
            }
        };
        let name = plugin.name();
        if let Some(earlier) = self.file_of(kind, &name) {
            let reason = format!(
                "a {} driver named '{name}' was already loaded from {} (the first one found wins)",
                kind.as_str(),
                earlier.display()
            );
            self.skip(file, reason);
            return;
        }
        let file = file.to_path_buf();
        match plugin {
            Plugin::Hypervisor(client) => self.hypervisors.push(Loaded { client, file }),
            Plugin::Storage(client) => self.storages.push(Loaded { client, file }),
        }
    }

    fn file_of(&self, kind: PluginKind, name: &str) -> Option<&Path> {
        match kind {
            PluginKind::Hypervisor => self
                .hypervisors
                .iter()
                .find(|l| l.client.info().name.as_str() == name)
                .map(|l| l.file.as_path()),
            PluginKind::Storage => self
                .storages
                .iter()
                .find(|l| l.client.info().name.as_str() == name)
                .map(|l| l.file.as_path()),
        }
    }

    fn skip(&mut self, file: &Path, reason: String) {
        self.skipped.push(Skipped {
            file: file.to_path_buf(),
            reason,
        });
    }

    pub fn hypervisor(&self, name: &str) -> Option<&Loaded<HypervisorClient>> {
        self.hypervisors
            .iter()
            .find(|l| l.client.info().name.as_str() == name)
    }

    pub fn storage(&self, name: &str) -> Option<&Loaded<StorageClient>> {
        self.storages
            .iter()
            .find(|l| l.client.info().name.as_str() == name)
    }

    /// The driver named by `--driver`, or the first available one in preference order.
    pub fn choose_hypervisor(
        &self,
        wanted: Option<&str>,
    ) -> anyhow::Result<&Loaded<HypervisorClient>> {
        if let Some(name) = wanted {
            let loaded = self.hypervisor(name).ok_or_else(|| {
                anyhow::anyhow!(
                    "hypervisor driver '{name}' not found (loaded: {}); see `runv drivers`",
                    self.names(PluginKind::Hypervisor)
                )
            })?;
            loaded.client.probe().map_err(|reason| {
                anyhow::anyhow!("hypervisor driver '{name}' cannot run here: {reason}")
            })?;
            return Ok(loaded);
        }
        let mut reasons = Vec::new();
        for name in HYPERVISOR_PREFERENCE {
            if let Some(loaded) = self.hypervisor(name) {
                match loaded.client.probe() {
                    Ok(()) => return Ok(loaded),
                    Err(reason) => reasons.push(format!("{name}: {reason}")),
                }
            }
        }
        if reasons.is_empty() && !self.hypervisors.is_empty() {
            anyhow::bail!(
                "no built-in hypervisor driver found; drivers {} are used only when named with --driver",
                self.names(PluginKind::Hypervisor)
            );
        }
        if reasons.is_empty() {
            anyhow::bail!(
                "no hypervisor driver found; install one or point --driver-dir (or {ENV_DRIVER_DIR}) at a directory of librunv_driver_*.so files"
            );
        }
        anyhow::bail!("no usable hypervisor driver: {}", reasons.join("; "))
    }

    /// The storage driver named by `--storage`, if any.
    pub fn choose_storage(
        &self,
        wanted: Option<&str>,
    ) -> anyhow::Result<Option<&Loaded<StorageClient>>> {
        let Some(name) = wanted else { return Ok(None) };
        let loaded = self.storage(name).ok_or_else(|| {
            anyhow::anyhow!(
                "storage driver '{name}' not found (loaded: {}); see `runv drivers`",
                self.names(PluginKind::Storage)
            )
        })?;
        loaded.client.probe().map_err(|reason| {
            anyhow::anyhow!("storage driver '{name}' cannot run here: {reason}")
        })?;
        Ok(Some(loaded))
    }

    fn names(&self, kind: PluginKind) -> String {
        let names: Vec<String> = match kind {
            PluginKind::Hypervisor => self
                .hypervisors
                .iter()
                .map(|l| l.client.info().name.to_string())
                .collect(),
            PluginKind::Storage => self
                .storages
                .iter()
                .map(|l| l.client.info().name.to_string())
                .collect(),
        };
        if names.is_empty() {
            "none".into()
        } else {
            names.join(", ")
        }
    }
}

enum Plugin {
    Hypervisor(HypervisorClient),
    Storage(StorageClient),
}

impl Plugin {
    fn name(&self) -> String {
        match self {
            Plugin::Hypervisor(c) => c.info().name.to_string(),
            Plugin::Storage(c) => c.info().name.to_string(),
        }
    }
}

/// `librunv_*.so` files in `dir`, in name order. A missing directory is a skipped entry only
/// when it was named explicitly; default locations may well be absent.
fn plugin_files(dir: &Path, explicit: bool, skipped: &mut Vec<Skipped>) -> Vec<PathBuf> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
            tracing::debug!("driver directory {} does not exist", dir.display());
            return Vec::new();
        }
        Err(e) => {
            skipped.push(Skipped {
                file: dir.to_path_buf(),
                reason: format!("cannot read the driver directory: {e}"),
            });
            return Vec::new();
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("librunv_") && n.ends_with(".so"))
        })
        .collect();
    files.sort();
    files
}

fn load_module(file: &Path) -> Result<PluginModuleRef, String> {
    // dlopen of an unreadable file gives a vague message; say what is wrong instead.
    if let Err(e) = fs::File::open(file) {
        return Err(format!("cannot read the file: {e}"));
    }
    let header = lib_header_from_path(file).map_err(|e| describe_error(&e))?;
    header
        .init_root_module::<PluginModuleRef>()
        .map_err(|e| describe_error(&e))
}

fn first_line(text: &str) -> &str {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

fn describe_error(error: &LibraryError) -> String {
    match error {
        LibraryError::OpenError { err, .. } => {
            format!(
                "not a loadable shared library: {}",
                first_line(&err.to_string())
            )
        }
        LibraryError::GetSymbolError { .. } => {
            "not a runv plugin (it exports no abi_stable root module)".to_string()
        }
        LibraryError::IncompatibleVersionNumber {
            expected_version,
            actual_version,
            ..
        } => format!(
            "built against runv-api {actual_version}, but this runv needs a plugin built \
             against runv-api {expected_version} (rebuild the plugin)"
        ),
        LibraryError::AbiInstability(details) => {
            let details = details.to_string();
            let hint = details
                .lines()
                .map(str::trim)
                .find(|l| {
                    l.starts_with("Error:") || l.contains("mismatch") || l.contains("different")
                })
                .unwrap_or_else(|| first_line(&details));
            format!(
                "ABI layout mismatch: built against an incompatible runv-api interface ({})",
                truncate(hint, 160)
            )
        }
        LibraryError::InvalidAbiHeader(_) | LibraryError::InvalidCAbi { .. } => {
            "built with an incompatible abi_stable version or compiler ABI".to_string()
        }
        LibraryError::RootModule { err, .. } => {
            format!(
                "the plugin's root module failed: {}",
                first_line(&err.to_string())
            )
        }
        LibraryError::ParseVersionError(e) => format!("unreadable ABI version: {e}"),
        LibraryError::Many(errors) => errors
            .iter()
            .map(describe_error)
            .collect::<Vec<_>>()
            .join("; "),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let cut: String = s.chars().take(max).collect();
        format!("{cut}…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_default_dir_with_plugins_is_searched() {
        struct Cleanup(PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = fs::remove_dir_all(&self.0);
            }
        }
        let base = std::env::temp_dir().join(format!("runv-plugin-dirs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let _cleanup = Cleanup(base.clone());
        let (bin, lib, system) = (
            base.join("p/bin"),
            base.join("p/lib/runv"),
            base.join("sys"),
        );
        for d in [&bin, &lib, &system] {
            fs::create_dir_all(d).unwrap();
        }
        fs::write(system.join("librunv_driver_a.so"), b"").unwrap();
        // Nothing beside the binary: the system directory.
        assert_eq!(default_dirs(Some(&bin), &system), vec![system.clone()]);
        // A development build (plugins beside the binary) ignores the system directory.
        fs::write(bin.join("librunv_driver_a.so"), b"").unwrap();
        assert_eq!(default_dirs(Some(&bin), &system), vec![bin.clone()]);
        // An installed prefix wins over both.
        fs::write(lib.join("librunv_storage_b.so"), b"").unwrap();
        assert_eq!(default_dirs(Some(&bin), &system), vec![lib.clone()]);
        fs::remove_dir_all(&base).unwrap();
        assert!(default_dirs(Some(&bin), &system).is_empty());
    }
}
