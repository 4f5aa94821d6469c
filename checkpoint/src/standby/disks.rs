//! Mirrored disks on the standby, as the checkpoint sees them: storage-mirror's
//! [`StandbyDisks`] and its session machine, fed the primary's disk messages (opaque
//! to the checkpoint, decoded by `storage_mirror::wire`) and the checkpoint's commits;
//! the answers go back in [`ToPrimary::Disk`]. The apply journal is the mirror's
//! [`DiskCommit`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use storage_mirror::standby::session::StandbySessionConfig;
use storage_mirror::standby::{StandbyDiskError, StandbyDisks, StandbyEvent, StandbySession};
use storage_mirror::wire::{self, DiskToPrimary};

use super::mirror::DiskCommit;
use crate::link::ToPrimaryLink;
use crate::messages::ToPrimary;

/// How long an answer to the primary may wait for window room.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

impl DiskCommit for StandbyDisks {
    fn commit(&mut self, epoch: u64, writes: &[(u16, u64, &[u8])]) -> Result<(), String> {
        StandbyDisks::commit(self, epoch, writes).map_err(|e| e.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiskSideError {
    #[error(transparent)]
    Disks(#[from] StandbyDiskError),
    #[error("A-Link: {0}")]
    Alink(#[from] alink::AlinkError),
    #[error("encoding a disk message: {0}")]
    Encode(#[from] wire::WireError),
}

/// The standby's disks and their session.
pub struct DiskSide {
    pub disks: StandbyDisks,
    session: StandbySession,
}

impl DiskSide {
    /// Opens the images (recovering the apply journal); with `discard`, forgets their
    /// metadata so that the primary sends full copies.
    pub fn open(
        images: &[PathBuf],
        discard: bool,
        now: Instant,
    ) -> Result<DiskSide, DiskSideError> {
        let mut disks = StandbyDisks::open(images)?;
        if discard {
            log::warn!("standby: discarding the disks' replica metadata: the primary will send full copies");
            disks.discard_all()?;
        }
        Ok(DiskSide {
            disks,
            session: StandbySession::new(StandbySessionConfig::default(), now),
        })
    }

    /// Chunks wait for their acknowledgement (look for messages without waiting).
    pub fn acks_waiting(&self) -> bool {
        self.session.acks_waiting()
    }

    /// Feeds `ev` (caused by a message with `payload`) and performs the actions.
    pub fn feed(
        &mut self,
        ev: StandbyEvent,
        payload: &[u8],
        now: Instant,
        link: &impl ToPrimaryLink,
    ) -> Result<(), DiskSideError> {
        let mut replies = Vec::new();
        let mut result = Ok(());
        for a in self.session.on_event(ev, now) {
            if let Err(e) = self.disks.perform(a, payload, &mut replies) {
                result = Err(e.into());
                break;
            }
        }
        // Answers go out even when the session failed (a refusal says why).
        for (m, data) in replies {
            answer(link, &m, data)?;
        }
        result
    }

    /// A disk message from the primary (its head, opaque to the checkpoint).
    pub fn on_msg(
        &mut self,
        head: &[u8],
        payload: &[u8],
        now: Instant,
        link: &impl ToPrimaryLink,
    ) -> Result<(), DiskSideError> {
        match wire::decode_to_standby(head, payload) {
            Ok(m) => self.feed(StandbyEvent::Msg(m), payload, now, link),
            Err(e) => {
                log::error!("standby: bad disk message from the primary: {e}");
                Ok(())
            }
        }
    }
}

fn answer(
    link: &impl ToPrimaryLink,
    m: &DiskToPrimary,
    data: Vec<u8>,
) -> Result<(), DiskSideError> {
    let payload = if data.is_empty() {
        Vec::new()
    } else {
        vec![alink::Bytes::from(data)]
    };
    let head = ToPrimary::Disk(wire::encode(m)?);
    link.send(&head, payload, ANSWER_WAIT)?;
    Ok(())
}
