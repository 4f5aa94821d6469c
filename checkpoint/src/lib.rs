//! twinrun's FT mode: epoch checkpoints from a primary VMM to a standby over the A-Link,
//! output commit and failover.
//!
//! Layers (see README.md):
//! - [`disk_msgs`]: the disk-mirroring part of the wire format.
//! - [`messages`]: the wire format (postcard heads, raw page payloads, explicit limits).
//! - [`protocol`]: the primary and standby state machines — pure, no I/O, time passed
//!   in — so that a deterministic simulation drives them through every fault.
pub mod disk_msgs;
pub mod messages;
pub mod primary;
pub mod protocol;
pub mod standby;
pub mod verify;
