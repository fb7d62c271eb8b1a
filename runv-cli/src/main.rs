//! `runv`: a runc-compatible OCI runtime that runs each container in its own VM.

mod bundle;
mod commands;
mod console;
mod container_id;
mod control;
mod hooks;
mod host_cgroup;
mod host_config;
mod logging;
mod monitor;
mod network;
mod plugins;
mod pod;
mod signals;
mod state;
mod stats;
mod templates;

use std::process::ExitCode;

use clap::Parser;
use runv_cli::cli;

use cli::{Cli, Command};

fn main() -> ExitCode {
    // The monitor is started by `create` as `runv __monitor DIR`; it is not a user command.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() == 3 && args[1] == "__monitor" {
        return monitor::main(std::path::Path::new(&args[2]));
    }
    // A background template build, started by `create` under `--template auto`.
    if args.len() == 3 && args[1] == "__template-build" {
        return templates::build::background_main(&args[2].to_string_lossy());
    }
    // Rust ignores SIGPIPE, so `runv list | head` would panic in println!; a CLI should just
    // end quietly as runc does. (Not in the monitor, which must outlive a closed reader.)
    // SAFETY: restoring the default disposition installs no handler code.
    let _ = unsafe {
        nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        )
    };
    let cli = parse_args(args);
    if cli.version {
        commands::version::print();
        return ExitCode::SUCCESS;
    }
    let format = match logging::Format::parse(cli.global.log_format.as_deref()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("runv: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    // The config is read before logging starts (it sets the level); its error, if any, is
    // reported through the logger below, so that an engine's --log file shows it.
    let host = host_config::HostConfig::load(&cli.runv, cli.global.debug);
    let level = host.as_ref().ok().and_then(|h| h.log_filter());
    let logs_to_file = match logging::init_level(cli.global.log.as_deref(), format, level) {
        Ok(to_file) => to_file,
        Err(e) => {
            eprintln!("runv: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match host.and_then(|host| run(cli, host)) {
        Ok(code) => code,
        Err(e) => {
            let message = format!("{e:#}");
            tracing::error!("{message}");
            if logs_to_file {
                eprintln!("runv: {message}");
            }
            match e.downcast_ref::<commands::ExitWith>() {
                Some(exit) => ExitCode::from(exit.code),
                None => ExitCode::FAILURE,
            }
        }
    }
}

/// Parses the command line; `kill ID` without a signal means SIGTERM, as with runc.
fn parse_args(args: Vec<std::ffi::OsString>) -> Cli {
    match Cli::try_parse_from(&args) {
        Ok(cli) => cli,
        Err(e)
            if e.kind() == clap::error::ErrorKind::MissingRequiredArgument
                && args.iter().any(|a| a == "kill") =>
        {
            let mut with_term = args.clone();
            with_term.push("SIGTERM".into());
            Cli::try_parse_from(with_term).unwrap_or_else(|_| e.exit())
        }
        Err(e) => e.exit(),
    }
}

fn run(cli: Cli, host: host_config::HostConfig) -> anyhow::Result<ExitCode> {
    use commands::create::CreateArgs;
    use commands::lifecycle::{self, RunArgs};
    use commands::query;
    use liboci_cli::{CommonCmd, StandardCmd};

    let Some(command) = cli.command else {
        anyhow::bail!("no command given; see `runv --help`");
    };
    let ctx = commands::context::Ctx {
        store: state::Store::new(cli.global.root.as_deref()),
        opts: host.apply(&cli.runv),
        log: cli.global.log.clone(),
        log_format: cli.global.log_format.clone(),
        debug: cli.global.debug,
        systemd_cgroup: cli.global.systemd_cgroup,
        host,
    };
    match command {
        Command::Drivers(args) => commands::drivers::run(
            &ctx.registry(),
            &args.format,
            ctx.opts.driver.as_deref(),
            ctx.opts.storage.as_deref(),
        )?,
        Command::Template(args) => templates::command::run(&ctx, &args)?,
        Command::Config(args) => match args.command {
            cli::ConfigCommand::Show { format } => host_config::show(&ctx.host, &format)?,
        },
        Command::Standard(cmd) => match *cmd {
            StandardCmd::Create(a) => commands::create::run(
                &ctx,
                &CreateArgs {
                    id: &a.container_id,
                    bundle: &a.bundle,
                    console_socket: a.console_socket.as_deref(),
                    pid_file: a.pid_file.as_deref(),
                },
            )?,
            StandardCmd::Start(a) => lifecycle::start(&ctx, &a.container_id)?,
            StandardCmd::State(a) => query::state(&ctx, &a.container_id)?,
            StandardCmd::Kill(a) => lifecycle::kill(&ctx, &a.container_id, &a.signal, a.all)?,
            StandardCmd::Delete(a) => lifecycle::delete(&ctx, &a.container_id, a.force)?,
        },
        Command::Common(cmd) => match *cmd {
            CommonCmd::Features(_) => commands::features::run(&ctx.registry())?,
            CommonCmd::Run(a) => {
                return lifecycle::run(
                    &ctx,
                    &RunArgs {
                        create: CreateArgs {
                            id: &a.container_id,
                            bundle: &a.bundle,
                            console_socket: a.console_socket.as_deref(),
                            pid_file: a.pid_file.as_deref(),
                        },
                        detach: a.detach,
                        keep: a.keep,
                    },
                );
            }
            CommonCmd::Exec(a) => return commands::exec::run(&ctx, &a),
            CommonCmd::List(a) => query::list(&ctx, &a.format, a.quiet)?,
            CommonCmd::Ps(a) => query::ps(&ctx, &a.container_id, &a.format)?,
            CommonCmd::Pause(a) => lifecycle::pause(&ctx, &a.container_id, true)?,
            CommonCmd::Resume(a) => lifecycle::pause(&ctx, &a.container_id, false)?,
            CommonCmd::Events(a) => query::events(&ctx, &a.container_id, a.stats, a.interval)?,
            CommonCmd::Update(a) => query::update(&ctx, &a)?,
            CommonCmd::Spec(a) => query::spec(a.bundle.as_deref())?,
            CommonCmd::Checkpointt(_) => {
                anyhow::bail!("checkpoint is not supported by runv")
            }
        },
    }
    Ok(ExitCode::SUCCESS)
}
