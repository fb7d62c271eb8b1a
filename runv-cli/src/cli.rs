//! The command line: runc's global flags and subcommands (from youki's liboci-cli) plus runv's
//! own flags and commands.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use liboci_cli::{CommonCmd, GlobalOpts, StandardCmd};

#[derive(Parser, Debug)]
#[command(
    name = "runv",
    about = "runv: an OCI runtime that runs every container in its own lightweight VM",
    disable_version_flag = true,
    mut_arg("log", |a| a.help("write runv's log to this file (default: stderr)")),
    mut_arg("debug", |a| a.help("log at debug level")),
    mut_arg("log_format", |a| a.help("log format: text (default) or json (runc-style lines)")),
    mut_arg("systemd_cgroup", |a| a.help("linux.cgroupsPath is a systemd slice:prefix:name, managed through systemd")),
    mut_subcommand("checkpointt", |c| c.hide(true)),
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalOpts,

    #[command(flatten)]
    pub runv: RunvOpts,

    /// print the version
    #[arg(short = 'v', long = "version")]
    pub version: bool,

    #[command(subcommand)]
    pub command: Option<Command>,
}

/// runv's own global flags.
#[derive(Args, Debug, Default, Clone)]
pub struct RunvOpts {
    /// directory to load driver plugins from (repeatable; default $RUNV_DRIVER_DIR, else the
    /// first of PREFIX/lib/runv beside the binary, the binary's own directory and
    /// /usr/lib/runv that holds plugins)
    #[arg(long = "driver-dir", global = true, value_name = "DIR")]
    pub driver_dirs: Vec<PathBuf>,
    /// hypervisor driver to use (default: the first available of qemu, kvm-native, kvmtool, xen)
    #[arg(long, global = true, value_name = "NAME")]
    pub driver: Option<String>,
    /// storage driver for container root filesystems (default: share the bundle rootfs as is)
    #[arg(long, global = true, value_name = "NAME")]
    pub storage: Option<String>,
    /// guest kernel (default: the spec's vm.kernel, PREFIX/share/runv, then target/guest)
    #[arg(long, global = true, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// guest initrd (default: as for --kernel)
    #[arg(long, global = true, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// accelerator for drivers that have a choice: kvm or tcg (default: kvm where usable)
    #[arg(long, global = true, value_name = "ACCEL")]
    pub accel: Option<String>,
    /// start VMs from templates: auto (default: use a matching one, else boot and make one in
    /// the background), off, or a template's name
    #[arg(long, global = true, value_name = "auto|off|NAME")]
    pub template: Option<String>,
    /// the template store (default $RUNV_TEMPLATE_DIR, else /var/lib/runv/templates)
    #[arg(long = "template-dir", global = true, value_name = "DIR")]
    pub template_dir: Option<PathBuf>,
    /// host configuration file (default $RUNV_CONFIG, else /etc/runv/config.toml)
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// accepted for runc compatibility; runv containers are isolated by their VM
    #[arg(long, hide = true, value_name = "VALUE")]
    pub rootless: Option<String>,
    /// accepted for runc compatibility; checkpointing is not supported
    #[arg(long, hide = true, value_name = "PATH")]
    pub criu: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    #[command(flatten)]
    Standard(Box<StandardCmd>),
    #[command(flatten)]
    Common(Box<CommonCmd>),
    /// list the driver plugins found, their capabilities and whether they can run here
    Drivers(DriversArgs),
    /// VM templates: saved, booted VMs that containers start from as clones
    Template(TemplateArgs),
    /// show the host configuration (see `runv help config`)
    Config(ConfigArgs),
}

#[derive(Args, Debug)]
pub struct TemplateArgs {
    #[command(subcommand)]
    pub command: TemplateCommand,
}

#[derive(Subcommand, Debug)]
pub enum TemplateCommand {
    /// boot a VM of the given shape to agent-ready and save it as a template
    Create(CreateArgs),
    /// list the templates in the store
    List(ListArgs),
    /// remove templates (containers running from them are not affected)
    Rm(RmArgs),
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// a name to use with --template NAME
    #[arg(long)]
    pub name: Option<String>,
    /// take the VM size, kernel and hypervisor settings from this bundle's config.json
    #[arg(long, short)]
    pub bundle: Option<PathBuf>,
    /// vCPUs (default: the bundle's, else 1)
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// guest memory in MiB (default: the bundle's, else 128)
    #[arg(long = "memory-mib")]
    pub memory_mib: Option<u64>,
    /// network interfaces, as many as the containers' network namespaces have
    #[arg(long, default_value_t = 0)]
    pub nics: usize,
    /// for containers with bind mounts of host paths (they add a shared directory)
    #[arg(long)]
    pub volumes: bool,
    /// output format: table or json
    #[arg(short, long, default_value = "table")]
    pub format: String,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// output format: table or json
    #[arg(short, long, default_value = "table")]
    pub format: String,
}

#[derive(Args, Debug)]
pub struct RmArgs {
    /// template names or keys
    #[arg(required = true)]
    pub templates: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub command: ConfigCommand,
}

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// print each setting's effective value and where it came from (flag, env, file, default)
    Show {
        /// output format: table or json
        #[arg(short, long, default_value = "table")]
        format: String,
    },
}

#[derive(Args, Debug)]
pub struct DriversArgs {
    /// output format: table or json
    #[arg(short, long, default_value = "table")]
    pub format: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn engine_style_invocation_parses() {
        let cli = Cli::try_parse_from([
            "runv",
            "--root",
            "/run/x",
            "--log",
            "/tmp/log.json",
            "--log-format",
            "json",
            "--systemd-cgroup",
            "create",
            "--bundle",
            "/b",
            "--pid-file",
            "/p",
            "id1",
        ])
        .unwrap();
        assert_eq!(cli.global.log_format.as_deref(), Some("json"));
        assert!(matches!(cli.command, Some(Command::Standard(_))));
    }

    #[test]
    fn runv_flags_work_after_the_subcommand_too() {
        let cli =
            Cli::try_parse_from(["runv", "drivers", "--driver-dir", "/a", "--format", "json"])
                .unwrap();
        assert_eq!(cli.runv.driver_dirs, vec![PathBuf::from("/a")]);
    }
}
