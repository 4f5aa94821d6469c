//! The primary's side of disk mirroring: every mirrored disk of the VM
//! ([`PrimaryDisks`], each a [`PrimaryDisk`]), the session with a (re)joining standby
//! ([`session`], sans-IO), failed-disk reads served by the standby ([`peer`]) and
//! online verify ([`verify`]).
//!
//! [`PrimaryDisks`] is the edge with files (metadata store, bitmap, image) and the
//! answers to the VMM's disk hooks: the checkpoint crate installs an adapter that
//! forwards `before_writes` and the failed operations here, tells it of each epoch
//! captured and acknowledged, and carries the session's messages.

pub mod activity;
pub mod disk;
pub mod peer;
pub mod session;
pub mod status;
pub mod verify;

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use twinrun_lock::MutexExt;

pub use disk::{DiskSetupError, Mode, PrimaryDisk};
pub use peer::EpochWrites;
pub use session::{
    DiskView, PrimarySession, ResyncStats, SessionAction, SessionConfig, SessionEnd, SessionEvent,
};
pub use status::DiskStatus;

use crate::meta::{ReplicaMeta, ResyncProgress};
use crate::resync::{read_chunk, Chunk};
use crate::wire::{DiskToStandby, PlanKind, MAX_CHUNK_BYTES};
use crate::BlockSet;
use peer::{PeerRequests, PeerSend};

/// How long a vCPU waits for the standby to serve a read.
const PEER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Every mirrored disk of the VM, shared between the checkpoint driver, the VMM's disk
/// hooks (vCPU threads), the verify thread and the control socket.
pub struct PrimaryDisks {
    disks: Vec<Mutex<PrimaryDisk>>,
    peer: PeerRequests,
    /// An online verify was asked for (see [`PrimaryDisks::request_verify`]).
    verify_requested: AtomicBool,
    /// Why the standby was declared failed while it stayed reachable (an HA standby
    /// that stopped acknowledging writes), until a standby is in sync again.
    standby_failed: Mutex<Option<String>>,
}

impl std::fmt::Debug for PrimaryDisks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryDisks")
            .field("disks", &self.len())
            .finish_non_exhaustive()
    }
}

impl PrimaryDisks {
    /// Opens (or starts) the metadata and bitmap of every image; the VM runs degraded
    /// until a standby is in sync.
    pub fn open(images: &[PathBuf]) -> Result<Arc<PrimaryDisks>, DiskSetupError> {
        let disks = images
            .iter()
            .map(|p| PrimaryDisk::open(p).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(PrimaryDisks {
            disks,
            peer: PeerRequests::default(),
            verify_requested: AtomicBool::new(false),
            standby_failed: Mutex::new(None),
        }))
    }

    pub fn len(&self) -> usize {
        self.disks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.disks.is_empty()
    }

    /// Disk `i`, locked (the write hook waits meanwhile: keep it short).
    ///
    /// # Panics
    /// If there is no disk `i` (callers index by the VM config's disks).
    pub fn lock(&self, i: usize) -> MutexGuard<'_, PrimaryDisk> {
        self.disks[i].lock_or_recover()
    }

    fn each(&self, mut f: impl FnMut(&mut PrimaryDisk)) {
        for d in &self.disks {
            f(&mut d.lock_or_recover());
        }
    }

    /// Byte ranges of each disk not known to be on the standby while a resync session
    /// runs (set in its bitmap): epoch 0 carries them along with the blocks written
    /// since the last resync pass, so the standby's replica is whole when epoch 0
    /// commits whatever the passes left behind. Empty outside the resync.
    pub fn unsynced_ranges(&self) -> Vec<Vec<(u64, u64)>> {
        (0..self.len())
            .map(|i| self.lock(i).unsynced_ranges())
            .collect()
    }

    /// Epoch `epoch` was captured (the guest is paused) with these writes per disk
    /// (disk order; missing or None: nothing written).
    pub fn captured(&self, epoch: u64, writes: Vec<Option<Arc<dyn EpochWrites>>>) {
        let mut writes = writes.into_iter();
        self.each(|d| d.captured(epoch, writes.next().flatten()));
    }

    /// Every epoch through `through` is committed on the standby.
    pub fn acked(&self, through: u64) {
        self.each(|d| d.acked(through));
    }

    /// The standby is gone: degraded from here on.
    pub fn peer_lost(&self) {
        self.each(|d| d.peer_lost());
    }

    /// Records (Some) or clears (None) why the standby was declared failed while it
    /// stayed reachable; the status shows it beside the degraded disks.
    pub fn set_standby_failed(&self, why: Option<String>) {
        *self.standby_failed.lock_or_recover() = why;
    }

    /// Why the standby was declared failed, until one is in sync again.
    pub fn standby_failed(&self) -> Option<String> {
        self.standby_failed.lock_or_recover().clone()
    }

    /// Clean stop: flush the bitmaps, clear the unclean flags.
    pub fn clean_shutdown(&self) {
        self.each(|d| d.clean_shutdown());
    }

    /// Each disk's replication state, resync progress and verify results.
    pub fn status(&self) -> Vec<DiskStatus> {
        (0..self.len())
            .map(|i| DiskStatus::of(&self.lock(i)))
            .collect()
    }

    /// Asks for an online verify of every disk (run while protected). False if one is
    /// already requested or running.
    pub fn request_verify(&self) -> bool {
        !self.verify_requested.swap(true, Ordering::SeqCst)
    }

    /// Where requests to the standby go (None: no standby connected; requests out get
    /// no answer).
    pub fn set_peer(&self, tx: Option<PeerSend>) {
        self.peer.set_sender(tx);
    }

    /// The standby answered request `id` (a read or digests).
    pub fn peer_reply(&self, id: u64, ok: bool, data: &[u8]) {
        self.peer.reply(id, ok, data);
    }

    /// A batch of guest writes to disk `disk` is about to be issued (the VMM's hook).
    pub fn before_writes(&self, disk: usize, ranges: &[(u64, u64)]) -> io::Result<()> {
        match self.disks.get(disk) {
            Some(d) => d.lock_or_recover().before_writes(ranges),
            None => Ok(()),
        }
    }

    /// The local image failed a read: marks the replica failed and, while protected,
    /// serves the read from the standby's replica with the unacknowledged epochs'
    /// writes laid over it.
    pub fn read_failed(
        &self,
        disk: usize,
        offset: u64,
        buf: &mut [u8],
        err: &io::Error,
    ) -> io::Result<()> {
        let retained = match self.disks.get(disk) {
            Some(d) => {
                let mut d = d.lock_or_recover();
                if d.note_failure(err) != Mode::Protected {
                    // No replica in sync elsewhere: the guest sees the error.
                    return Err(io::Error::new(err.kind(), err.to_string()));
                }
                d.retained()
            }
            None => return Err(io::Error::new(err.kind(), err.to_string())),
        };
        let len = u32::try_from(buf.len())
            .ok()
            .filter(|&l| l <= MAX_CHUNK_BYTES)
            .ok_or_else(|| io::Error::other("read too large for the standby"))?;
        let id = self
            .peer
            .request(|id| DiskToStandby::Read {
                id,
                disk: disk as u16,
                offset,
                len,
            })
            .ok_or_else(|| io::Error::other("no standby to read from"))?;
        match self.peer.wait(id, PEER_READ_TIMEOUT) {
            Some((true, data)) if data.len() == buf.len() => {
                buf.copy_from_slice(&data);
                peer::overlay(buf, offset, &retained);
                Ok(())
            }
            Some(_) => Err(io::Error::other("the standby could not serve the read")),
            None => Err(io::Error::other("no answer from the standby")),
        }
    }

    /// The local image failed a write (or a flush): while protected it counts as done,
    /// the write travels with its epoch and the standby applies it durably before the
    /// epoch's output leaves.
    pub fn write_failed(&self, disk: usize, err: &io::Error) -> io::Result<()> {
        match self.disks.get(disk) {
            Some(d) if d.lock_or_recover().note_failure(err) == Mode::Protected => Ok(()),
            _ => Err(io::Error::new(err.kind(), err.to_string())),
        }
    }

    /// Performs a session action that touches the disks; returns a follow-up event
    /// (after the last `Prepare`) or, for `SendChunk`, the message to send with its
    /// payload. Other actions (sending, ending, the VM's written-block maps) are the
    /// caller's.
    pub fn perform(&self, a: &SessionAction, prepared: &mut Vec<u64>) -> Performed {
        match a {
            SessionAction::Prepare {
                disk,
                kind,
                peer_words,
            } => {
                let mut d = self.lock(*disk);
                let r = match kind {
                    PlanKind::Full => d.bitmap.set_all().map(|_| ()),
                    PlanKind::Delta => d.bitmap.merge_words(peer_words).map(|_| ()),
                    PlanKind::InSync | PlanKind::Refuse => Ok(()),
                };
                if let Err(e) = r {
                    return Performed::Failed(format!("disk {}: bitmap: {e}", d.path.display()));
                }
                let total = d.bitmap.count();
                d.meta.resync = Some(ResyncProgress {
                    full: *kind == PlanKind::Full,
                    total_blocks: total,
                    done_blocks: 0,
                });
                prepared.push(total);
                if prepared.len() == self.len() {
                    return Performed::Event(SessionEvent::Prepared {
                        blocks: std::mem::take(prepared),
                    });
                }
                Performed::Done
            }
            SessionAction::Decided { disk, kind, reason } => {
                log::info!(
                    "primary: disk {}: {kind:?}: {reason}",
                    self.lock(*disk).path.display()
                );
                Performed::Done
            }
            SessionAction::BeginResync => {
                self.each(|d| d.begin_resync());
                Performed::Done
            }
            SessionAction::ClearChunk {
                disk,
                first_block,
                blocks,
            } => {
                self.lock(*disk).chunk_done(*first_block, *blocks);
                Performed::Done
            }
            SessionAction::NewPass { disk } => {
                self.lock(*disk).new_pass();
                Performed::Done
            }
            SessionAction::SaveProgress { disk, done_blocks } => {
                self.lock(*disk).save_progress(*done_blocks);
                Performed::Done
            }
            SessionAction::SendChunk { disk, chunk } => match self.read_chunk(*disk, chunk) {
                Ok(data) => Performed::Chunk(
                    DiskToStandby::Chunk {
                        disk: *disk as u16,
                        first_block: chunk.first_block,
                        blocks: chunk.blocks,
                        crc: crc32c::crc32c(&data),
                    },
                    data,
                ),
                Err(e) => Performed::Failed(format!("reading disk {disk}: {e}")),
            },
            SessionAction::Send(_) | SessionAction::End(_) => Performed::Done,
        }
    }

    fn read_chunk(&self, disk: usize, c: &Chunk) -> Result<Vec<u8>, crate::resync::ResyncError> {
        let (image, bs, size) = {
            let d = self.lock(disk);
            (d.image.try_clone()?, d.meta.block_size, d.meta.disk_size)
        };
        // Read outside the lock: the guest's writes do not wait for the resync's reads.
        let mut buf = Vec::new();
        read_chunk(&image, bs, size, c, &mut buf)?;
        Ok(buf)
    }

    /// Takes a pending verify request, if every disk is protected (see [`verify`]).
    pub(crate) fn take_verify_request(&self) -> bool {
        self.verify_requested.load(Ordering::SeqCst)
            && (0..self.len()).all(|i| self.lock(i).mode() == Mode::Protected)
    }

    pub(crate) fn verify_finished(&self) {
        self.verify_requested.store(false, Ordering::SeqCst);
    }

    pub(crate) fn peer_requests(&self) -> &PeerRequests {
        &self.peer
    }
}

/// What [`PrimaryDisks::perform`] did.
#[derive(Debug)]
pub enum Performed {
    Done,
    /// Feed this event to the session.
    Event(SessionEvent),
    /// Send this chunk message with this payload.
    Chunk(DiskToStandby, Vec<u8>),
    /// The session cannot go on (I/O error on this side).
    Failed(String),
}

impl DiskView for PrimaryDisks {
    fn disks(&self) -> usize {
        self.len()
    }
    fn meta(&self, disk: usize) -> ReplicaMeta {
        self.lock(disk).meta.clone()
    }
    fn dirty_blocks(&self, disk: usize) -> u64 {
        self.lock(disk).bitmap.count()
    }
    fn guest_write_bytes(&self, disk: usize) -> u64 {
        self.lock(disk).guest_write_bytes
    }
    fn with_bitmap(&self, disk: usize, f: &mut dyn FnMut(&dyn BlockSet)) {
        f(&self.lock(disk).bitmap)
    }
}
