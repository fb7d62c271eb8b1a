//! `cargo xtask man` and `cargo xtask completions`: man pages (clap_mangen) and shell
//! completions (clap_complete) generated from runv's own clap definitions
//! (`runv_cli::cli::Cli`), at build time: the installed runv carries no generator.
//!
//! bash completion also completes container ids: clap's script knows only the static command
//! line, so a wrapper appended to it adds the output of `runv [--root R] list -q` where a
//! command's first operand is a container id.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;

use crate::workspace_root;

#[derive(clap::Args, Debug)]
pub struct ManArgs {
    /// where to write runv.1 and runv-<command>.1 (default: target/man)
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct CompletionsArgs {
    /// where to write runv.bash, _runv (zsh) and runv.fish (default: target/completions)
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

pub fn run_man(args: ManArgs) -> anyhow::Result<()> {
    let out = args.out.map_or_else(
        || Ok::<_, anyhow::Error>(workspace_root()?.join("target/man")),
        Ok,
    )?;
    for page in man_pages(&out)? {
        println!("{}", page.display());
    }
    Ok(())
}

pub fn run_completions(args: CompletionsArgs) -> anyhow::Result<()> {
    let out = args.out.map_or_else(
        || Ok::<_, anyhow::Error>(workspace_root()?.join("target/completions")),
        Ok,
    )?;
    for file in completions(&out)? {
        println!("{}", file.display());
    }
    Ok(())
}

fn runv_command() -> clap::Command {
    let mut cmd = runv_cli::cli::Cli::command()
        .version(env!("CARGO_PKG_VERSION"))
        .disable_help_subcommand(true);
    // Propagates global flags into every subcommand and gives them their `runv-x` names.
    cmd.build();
    cmd
}

/// Writes `runv.1` and one page per visible (sub)command into `out`; returns the files.
pub fn man_pages(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    fn generate(cmd: &clap::Command, out: &Path, written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
        let man = clap_mangen::Man::new(cmd.clone())
            .manual("runv manual")
            .source(format!("runv {}", env!("CARGO_PKG_VERSION")));
        let path = out.join(man.get_filename());
        let mut text = Vec::new();
        man.render(&mut text)?;
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            generate(sub, out, written)?;
        }
        Ok(())
    }
    generate(&runv_command(), out, &mut written)?;
    Ok(written)
}

/// Writes bash, zsh and fish completions into `out`; returns the files.
pub fn completions(out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    for (shell, name) in [
        (Shell::Bash, "runv.bash"),
        (Shell::Zsh, "_runv"),
        (Shell::Fish, "runv.fish"),
    ] {
        let mut cmd = runv_command();
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut cmd, "runv", &mut text);
        if shell == Shell::Bash {
            text.extend_from_slice(bash_container_ids(&cmd).as_bytes());
        }
        let path = out.join(name);
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

/// The bash wrapper that adds container ids to clap's completions.
fn bash_container_ids(cmd: &clap::Command) -> String {
    // Commands whose first operand is a container id, and every flag that takes a value
    // (its value is not an operand), both read from the clap definition.
    let mut with_id = BTreeSet::new();
    let mut value_flags = BTreeSet::new();
    let mut visit = vec![cmd];
    while let Some(c) = visit.pop() {
        if c.get_positionals()
            .next()
            .is_some_and(|a| a.get_id() == "container_id")
        {
            with_id.insert(c.get_name().to_string());
        }
        for arg in c.get_arguments().filter(|a| !a.is_positional()) {
            if arg.get_action().takes_values() {
                value_flags.extend(arg.get_long().map(|l| format!("--{l}")));
                value_flags.extend(arg.get_short().map(|s| format!("-{s}")));
            }
        }
        visit.extend(c.get_subcommands());
    }
    let with_id: Vec<String> = with_id.into_iter().collect();
    let value_flags: Vec<String> = value_flags.into_iter().collect();
    format!(
        r#"
# Added by `cargo xtask completions`: container ids from `runv list -q` where a command's
# first operand is one.
_runv_container_ids() {{
    local i w sub="" operands=0 skip="" root=()
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${{COMP_WORDS[i]}}
        if [[ -n $skip ]]; then
            [[ $skip == root ]] && root=(--root "$w")
            skip=""
            continue
        fi
        case $w in
            --root) skip=root ;;
            --root=*) root=(--root "${{w#--root=}}") ;;
            {value_flags}) skip=1 ;;
            -*) ;;
            *) if [[ -z $sub ]]; then sub=$w; else operands=$((operands + 1)); fi ;;
        esac
    done
    [[ -z $skip && $operands -eq 0 ]] || return 1
    case $sub in
        {with_id}) "${{COMP_WORDS[0]}}" "${{root[@]}}" list -q 2>/dev/null ;;
        *) return 1 ;;
    esac
}}

_runv_with_ids() {{
    _runv "$@"
    local ids cur=${{COMP_WORDS[COMP_CWORD]}}
    [[ $cur == -* ]] && return 0
    if ids=$(_runv_container_ids); then
        COMPREPLY+=($(compgen -W "$ids" -- "$cur"))
    fi
    return 0
}}

complete -F _runv_with_ids -o bashdefault -o default runv
"#,
        value_flags = value_flags.join("|"),
        with_id = with_id.join("|"),
    )
}
