//! Disk mirroring for a twinrun pair: the two PMs' copies of each disk form a network
//! RAID-1 that survives every order of failures and comes back in sync by copying only
//! what changed whenever that can be trusted.
//!
//! Pure logic (the resync decision, the resync and verify planners, the disk session
//! machines of both sides) takes state and events and returns results or actions with
//! no I/O; the modules that touch files say so. The crate knows nothing of the VMM or
//! the A-Link: the checkpoint crate carries its messages (opaque to it) and tells it of
//! epochs, and adapts the VMM's disk hooks to [`primary::PrimaryDisks`].
//!
//! | module | concern |
//! | --- | --- |
//! | [`meta`] | per-replica metadata: generations, flags, progress; crash-safe store |
//! | [`bitmap`] | persistent dirty bitmap (4 KiB grain), set-before-write |
//! | [`decision`] | no sync / delta / full / refuse, from both sides' metadata (pure) |
//! | [`resync`] | resync planner (disk order, window, rate limit; pure) and chunk I/O |
//! | [`apply_journal`] | the standby's crash-safe, in-order apply of committed epochs |
//! | [`verify`] | online verify: range digests, comparison, marking |
//! | [`wire`] | the disk session's messages, bounded and checked on decode |
//! | [`primary`] | the primary's disks (modes, activity log), session machine, peer reads, verify |
//! | [`standby`] | the standby's disks (report, chunks, apply journal), session machine |
//! | [`sync`] | HA: synchronous mirroring of every write batch (machine, wire, the primary's edge) |

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod apply_journal;
pub mod bitmap;
pub mod decision;
pub mod meta;
pub mod primary;
pub mod resync;
pub mod standby;
pub mod sync;
pub mod verify;
pub mod wire;

/// A set of blocks of one disk, walked in disk order (the dirty bitmap is one; the
/// resync and verify planners take any).
pub trait BlockSet {
    /// Blocks the disk has (bits in the set's domain).
    fn blocks(&self) -> u64;
    fn is_set(&self, block: u64) -> bool;
    /// The first set block at or after `from`.
    fn next_set(&self, from: u64) -> Option<u64>;
}
