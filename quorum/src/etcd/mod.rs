//! etcd as a quorum backend, a peer of the UDP witness behind the same node machine
//! (issue 14, item 7): for fleets of pairs that already run an etcd cluster.
//!
//! The same grant, made by etcd transactions: a per-VM owner key created on the
//! holder's lease, every grant a compare on the revisions of the VM's keys, the
//! generation (the fencing token) written with the grant so that it grows with the
//! revision, renewal by lease keep-alive, and the peer-outdated mark in a durable key
//! written only while the holder's owner key stands. The decisions are the shared
//! `crate::rules`; see `keys` for the layout and `session` for how requests map onto
//! etcd operations and why that is safe.
//!
//! | module | concern | I/O |
//! | --- | --- | --- |
//! | `keys` | key layout, values (JSON), prefix checks | none |
//! | `session` | requests -> etcd operations -> replies (sans-IO, run by the simulation too) | none |
//! | `exec` | runs operations with the `etcd-client` crate, timeouts, keep-alive streams | etcd (tokio) |
//! | `backend` | `EtcdConnection` (client thread) and `EtcdBackend` (a `client::Backend`) | thread, channels |
pub mod keys;
pub mod session;

#[cfg(feature = "etcd")]
pub mod backend;
#[cfg(feature = "etcd")]
pub mod exec;

#[cfg(feature = "etcd")]
pub use backend::{EtcdBackend, EtcdConnection};
