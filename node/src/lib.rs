//! twinrund: the twinrun node daemon.
//!
//! One daemon per PM, run by systemd. It reads the node's config (`config`), keeps
//! the cluster's replicated record of VMs in SQLite (`store`, `replica`), talks to the
//! peer daemon over an authenticated channel (`peer`), decides where each VM runs with
//! a pure step function (`cluster`), asks the quorum gate before acting alone (`gate`),
//! spawns and supervises the VMM processes (`supervisor`), and serves the REST API
//! (`api`). `client` is the API's client, used by the `twinrun` CLI.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod api;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod core;
pub mod daemon;
pub mod gate;
mod migrate_cli;
pub mod model;
pub mod notify;
pub mod peer;
pub mod replica;
pub mod store;
pub mod supervisor;
