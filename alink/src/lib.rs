//! A-Link: the transport between the two PMs of a twinrun pair.
//!
//! Layers, each a pure state machine except the I/O edge:
//! - [`buf`]: pooled byte buffers for frame bodies and page payloads.
//! - [`frame`]: framed, versioned, authenticated frames; incremental decoder.
//! - [`handshake`]: mutual challenge/response with the cluster secret; session keys.
//! - [`incarnation`]: which peer instance a bundle of links serves.
//! - [`health`]: per-link heartbeats and failure detection.
//! - [`linkset`]: window of unacknowledged messages spread over healthy links.
//! - [`reorder`]: in-order, duplicate-free delivery on the receiving side, and the rules
//!   that make payloads written in place safe.
//! - [`lent`]: memory lent for one blocking send (guest memory, no staging copy).
//! - [`side`]: small best-effort messages on the heartbeats of every link (the quorum's).
//! - [`tcp`]: TCP links, threads, the [`Alink`] handle.
//! - [`beacon`], [`priv0`]: heartbeats on the private network (priv0), a path that is
//!   not an A-Link: round-trip proofs of the peer's life over UDP, and side messages.
//!
//! See README.md for the frame format and the protocol.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod beacon;
pub mod buf;
pub mod frame;
pub mod handshake;
pub mod health;
pub mod incarnation;
pub mod lent;
pub mod linkset;
pub mod priv0;
pub mod reorder;
pub mod side;
pub mod tcp;

#[cfg(test)]
mod sim;

pub use buf::{Buf, BufPool, PoolStats};
pub use bytes::Bytes;
pub use frame::{PlaceRequest, Placement};
pub use handshake::{HandshakeError, PROTOCOL_CURRENT, PROTOCOL_VERSION, SEGMENTED_SINCE};
pub use health::HealthConfig;
pub use linkset::{LinkEvent, SegOpts, WindowLimits, MAX_LINKS};
pub use reorder::{InMsg, PayloadAt};
pub use tcp::{Alink, AlinkConfig, AlinkError, Event, LinkAddrs, LinkStatus};
