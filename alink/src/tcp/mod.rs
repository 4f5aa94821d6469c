//! The I/O edge: TCP connections for each configured link, driving the pure state machines
//! (handshake, health, send window, reorder buffer).
//!
//! Threads (all bounded, all joined on drop):
//! - per link, a manager thread: dials (lower node id) or takes authenticated connections
//!   from the listener (higher node id), then runs the connection's reader loop, which also
//!   ticks the heartbeat machine;
//! - per live connection, a writer thread that writes queued messages with one vectored
//!   write per frame (header, head and the caller's payload buffers, no copies);
//! - on the accepting side, per link, a listener thread; each accepted connection is
//!   authenticated on a short-lived thread (at most [`MAX_PENDING_HANDSHAKES`] at once), so a
//!   garbage or slow connection never blocks the live link.
//!
//! Files, one concern each: [`config`] (what an end is configured with), [`error`],
//! [`events`] (what is reported to the layer above), [`shared`] (state the threads
//! share), [`connect`] (dialing, listening, the handshake on a socket, reconnecting),
//! [`conn`] (one authenticated connection: its reader loop and teardown), [`writer`]
//! (the per-connection writer thread), [`handle`] (the [`Alink`] handle).

mod config;
mod conn;
mod connect;
mod error;
mod events;
mod handle;
mod shared;
mod writer;

pub use config::{AlinkConfig, LinkAddrs};
pub use connect::MAX_PENDING_HANDSHAKES;
pub use error::AlinkError;
pub use events::{Event, MAX_QUEUED_EVENTS};
pub use handle::{Alink, LinkStatus};
