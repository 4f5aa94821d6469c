//! Command-line interface of the `twinrun` binary.
//!
//! `args` holds the clap definitions and the parsers of compound flag values;
//! `config_file` reads a TOML VM config; `resolve` merges file and flags into one
//! validated [`vmm::config::VmConfig`] (without `--guest`, the built test guest that
//! `twinrun_lab::guest` finds); `fault`, `status`, `snapshot` and `disk` run the
//! subcommands that talk to a running VM or read its files.
pub mod args;
pub mod cluster;
pub mod config_file;
pub mod disk;
pub mod fault;
pub mod ft;
pub mod resolve;
pub mod snapshot;
pub mod status;
pub mod swap;
pub mod witness;

pub use args::{Cli, Command, DemoArgs, RestoreArgs, RunArgs, SnapshotCommand, VmCommand};
pub use resolve::{resolve_run_config, CliError};
