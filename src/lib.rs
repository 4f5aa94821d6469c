//! The `twinrun` command line: argument parsing and config resolution (a library so
//! the integration tests and the binary share it), the subcommands that talk to a
//! running VM (through `twinrun-control`) or read its files (`twinrun-snapshot`,
//! `storage-mirror`), and `twinrun demo` (on `twinrun-lab`'s namespaces). Running a
//! VM, alone or as one end of an FT pair, is `twinrun-pair`'s (the binary calls it).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod cli;
pub mod demo;
pub use twinrun_pair::{exit, signals};
