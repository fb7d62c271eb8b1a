//! The `runv` command line's definition, as a library so that `cargo xtask man` and
//! `cargo xtask completions` generate man pages and shell completions from the same clap
//! definitions the binary parses with (at build time, not at run time).

pub mod cli;
