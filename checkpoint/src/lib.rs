//! twinrun's FT mode: epoch checkpoints from a primary VMM to a standby over the A-Link,
//! output commit and failover.
//!
//! Layers (see README.md):
//! - [`messages`]: the wire format (postcard heads, raw page payloads, explicit limits;
//!   disk-mirroring messages carried opaque).
//! - [`protocol`]: the primary and standby state machines — pure, no I/O, time passed
//!   in — so that a deterministic simulation drives them through every fault.
//! - [`primary`], [`standby`]: the drivers (step functions over traits for the VM and
//!   the link, and the real loops around them), the capture edge, the mirror, failover.
//! - [`link`]: what the drivers send over.
//! - [`verify`]: replica-equality hashes (test mode).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod link;
pub mod messages;
pub mod primary;
pub mod protocol;
pub mod standby;
pub mod verify;
