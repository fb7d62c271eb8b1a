//! `runv`: a runc-compatible OCI runtime that runs each container in its own VM.

mod cli;
mod commands;
mod logging;
mod plugins;

use std::process::ExitCode;

use clap::Parser;

use cli::{Cli, Command};
use plugins::Registry;

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let logs_to_file = match logging::init(cli.global.log.as_deref(), format, cli.global.debug) {
        Ok(to_file) => to_file,
        Err(e) => {
            eprintln!("runv: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let message = format!("{e:#}");
            tracing::error!("{message}");
            if logs_to_file {
                eprintln!("runv: {message}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let Some(command) = cli.command else {
        anyhow::bail!("no command given; see `runv --help`");
    };
    let load = || Registry::load(plugins::search_dirs(&cli.runv.driver_dirs));
    match command {
        Command::Drivers(args) => commands::drivers::run(
            &load(),
            &args.format,
            cli.runv.driver.as_deref(),
            cli.runv.storage.as_deref(),
        )?,
        Command::Common(cmd) => match *cmd {
            liboci_cli::CommonCmd::Features(_) => commands::features::run(&load())?,
            other => anyhow::bail!(
                "{} is not available yet",
                command_name(&format!("{other:?}"))
            ),
        },
        Command::Standard(cmd) => {
            anyhow::bail!("{} is not available yet", command_name(&format!("{cmd:?}")))
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn command_name(debug: &str) -> String {
    debug
        .split(['(', ' ', '{'])
        .next()
        .unwrap_or("command")
        .to_lowercase()
}
