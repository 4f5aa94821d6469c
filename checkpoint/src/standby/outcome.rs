//! How a standby run ends, what a failover did, and why a run failed.

use std::time::Duration;

use vmm::Vmm;

use super::disks::DiskSideError;
use super::mirror::MirrorError;

#[derive(Debug, thiserror::Error)]
pub enum StandbyDriverError {
    #[error("mirror: {0}")]
    Mirror(#[from] MirrorError),
    #[error("A-Link: {0}")]
    Alink(#[from] alink::AlinkError),
    #[error("opening the standby's disk {path}: {source}")]
    Disk {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the committed VM state does not decode: {0}")]
    State(#[from] vmm::persist::StateFormatError),
    #[error("failover: building the VM: {0}")]
    Build(#[from] vmm::RestoreError),
    #[error("failover: {0}")]
    Vmm(#[from] vmm::VmmError),
    #[error("failover: preparing the VM: {0}")]
    BeforeStart(String),
    #[error("disk mirroring: {0}")]
    Disks(#[from] DiskSideError),
    #[error("the primary sent an epoch before its memory layout")]
    NoHello,
    #[error("failover with no committed state in the mirror")]
    NoState,
    #[error("session refused: the primary carries quorum generation {peer}, older than generation {known} this node knows (it lost the VM; it must rejoin as standby)")]
    Fenced { peer: u64, known: u64 },
}

/// The fencing rule of a session's `Hello` and of every part: a primary with an older
/// generation than `known` (one this node knows) is refused, unless the primary's own
/// node holds `known` (`peer_holds_known`): then it is the primary's fresh grant,
/// learned here (from the witness or the peer messages) before the primary's quorum
/// thread handed it over, and nobody holds anything newer: refusing it would demote
/// the legitimate primary. 0 on either side: no quorum, nothing to compare.
pub fn fence(peer: u64, known: u64, peer_holds_known: bool) -> Result<(), StandbyDriverError> {
    if known != 0 && peer < known && !peer_holds_known {
        return Err(StandbyDriverError::Fenced { peer, known });
    }
    Ok(())
}

/// What happened at the failover.
#[derive(Clone, Debug, Default)]
pub struct FailoverReport {
    pub last_committed: u64,
    pub released_through: Option<u64>,
    /// Console bytes released again (those of committed epochs after
    /// `released_through`), and the stream position of the first of them.
    pub rereleased_bytes: u64,
    pub rereleased_from: Option<u64>,
    /// Where the resumed guest's console output starts.
    pub console_next: Option<u64>,
    /// From the loss of the primary to the VM running.
    pub failover_time: Duration,
    /// RARP announces written before the guest ran, one per net device (the repeats
    /// of `takeover::ANNOUNCE_REPEATS` follow from a thread and are not counted).
    pub announces: usize,
    /// Net frames of committed epochs after `released_through` sent again, and those
    /// the TAP refused (or whose device the config lacks).
    pub resent_frames: u64,
    pub resend_failed: u64,
    /// A planned swap: frames the old primary's TAPs received after its guest's
    /// final pause, handed to this guest.
    pub handed_in_frames: u64,
    /// A planned role swap (the primary handed the VM over), not a failure.
    pub planned: bool,
}

/// How a standby run ended.
pub enum StandbyOutcome<V = Vmm> {
    /// The primary was lost; this VM runs now.
    FailedOver(Box<V>, FailoverReport),
    /// The primary was lost before the first epoch committed.
    NoReplica,
    /// `stop` was set.
    Stopped { committed: Option<u64> },
    /// Every link to the primary went down, the takeover gate did not grant the
    /// takeover, and a link came back: the primary ran on (its next session resyncs
    /// this replica).
    PrimaryBack { committed: Option<u64> },
}

/// What the standby has done so far (for progress reports and tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct StandbyProgress {
    pub committed: Option<u64>,
    pub sync_pages: u64,
    pub applied_pages: u64,
    pub applied_disk_writes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_primary_with_an_older_generation_is_refused() {
        assert!(fence(0, 0, false).is_ok(), "no quorum on either side");
        assert!(fence(7, 0, false).is_ok(), "this node knows no generation");
        assert!(fence(7, 7, false).is_ok(), "the holder itself");
        assert!(fence(9, 7, false).is_ok(), "a newer holder");
        assert!(
            fence(0, 1, true).is_ok() && fence(5, 7, true).is_ok(),
            "the primary's own fresh grant, learned here first"
        );
        let e = fence(5, 7, false).unwrap_err();
        assert!(
            matches!(e, StandbyDriverError::Fenced { peer: 5, known: 7 }),
            "{e:?}"
        );
        let text = e.to_string();
        assert!(
            text.contains("generation 5") && text.contains("generation 7"),
            "{text}"
        );
        assert!(
            fence(0, 7, false).is_err(),
            "a primary without a quorum generation"
        );
    }
}
