//! One twinrun VMM process: a VM run alone ([`run_vm`], [`restore_vm`]) or as one end of
//! an FT pair ([`run_pair`]), with SIGTERM/SIGINT handling ([`signals`]) and the
//! process exit codes ([`exit`]). The `twinrun` command line parses flags and calls
//! these; tests call them in-process ([`run_pair_with`] takes a programmatic
//! [`Shutdown`] and a [`PairStatus`] to watch instead of signals and a socket).
//!
//! | module | what it owns |
//! | --- | --- |
//! | [`alone`] | a VM alone: build, start, serve its control socket, wait, exit code; a snapshot's restore |
//! | [`settings`] | what an end of a pair is given ([`FtSettings`], [`Role`]) |
//! | [`ft`] | one end of a pair: the A-Link config, the primary's sessions (standby after standby), the standby's wait and failover, the survivor's role switch ([`ft::role`], in one place), the status it serves |
//! | [`ha`] | one end of an HA pair: disks mirrored synchronously, no checkpoints; the standby boots the guest from its replica when the primary is lost |
//! | [`exit`], [`signals`] | exit codes; SIGTERM/SIGINT taken on a thread |

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod alone;
pub mod exit;
pub mod ft;
pub mod ha;
pub mod settings;
pub mod signals;

pub use alone::{exit_code, restore_vm, run_vm, RestoreOptions};
pub use ft::shutdown::Shutdown;
pub use ft::status::PairStatus;
pub use ft::{run_pair, run_pair_with};
pub use settings::{AlinkSpec, FtSettings, Role};
