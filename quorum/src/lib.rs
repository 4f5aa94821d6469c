//! Quorum for a twinrun pair: who may run a protected VM when the PMs cannot talk.
//!
//! | module | concern | I/O |
//! | --- | --- | --- |
//! | `types` | generations, node ids, witness slots, names | none |
//! | `timing` | lease, renewal and margin, and the arithmetic that keeps them safe | none |
//! | `node` | the node-side quorum state machine (events in, actions out) | none |
//! | `rules` | the grant rules both backends apply (compare-and-set, leases, outdated peer) | none |
//! | `witness::ops` | what a node asks a witness and the answers | none |
//! | `witness::core` | the witness's decisions (compare-and-set of generations, leases) | through `Store` |
//! | `witness::store` | the witness's durable records | files |
//! | `witness::wire` | authenticated datagrams, HMAC challenge/response | none |
//! | `witness::server` | `twinrun witness`: UDP server, config, status | socket, files |
//! | `client` | the `Backend` trait, the witness client, and the runner that drives a node's machine | socket, clock |
//! | `etcd` | etcd as the second backend: key layout, sans-IO session, `etcd-client` edge | etcd (tokio) |
//! | `config` | the pair's `[quorum]` table: backend choice, etcd/witness options, timing | files |
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod backends;
pub mod client;
pub mod config;
pub mod etcd;
pub mod node;
pub mod rules;
pub mod timing;
pub mod types;
pub mod witness;

pub use types::{Generation, NodeId, Role, Slot};
