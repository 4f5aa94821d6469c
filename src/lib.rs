//! The `twinrun` command line: argument parsing and config resolution (a library so
//! the integration tests and the binary share it), plus running a VM.
pub mod cli;
pub mod control;
pub mod demo;
pub mod exit;
pub mod paths;
pub mod signals;
pub mod snapshot;
