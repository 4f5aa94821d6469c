//! The standby's side of disk mirroring: each disk's replica metadata and bitmap (sent
//! to the primary, which decides how to resync), resync chunks written durably, the
//! apply journal through which committed epochs reach the images, and the metadata
//! that marks a resync target inconsistent until epoch 0 commits.
//!
//! [`StandbyDisks`] is the edge with files; [`session::StandbySession`] (sans-IO)
//! decides when to acknowledge chunks, save progress and record commits, and
//! [`StandbyDisks::perform`] carries its actions out and returns the answers to send.

pub mod session;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::apply_journal::{self, ApplyJournal, JournalError};
use crate::bitmap::DirtyBitmap;
use crate::meta::{MetaState, MetaStore, ReplicaMeta, ResyncProgress};
use crate::resync::{write_chunk, Chunk, ResyncError};
use crate::wire::{DiskPlan, DiskReport, DiskToPrimary, PlanKind, WireMeta, DIGEST_LEN};
pub use session::{StandbyAction, StandbyEvent, StandbySession};

#[derive(Debug, thiserror::Error)]
pub enum StandbyDiskError {
    #[error("disk {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("disk {path}: replica metadata: {source}")]
    Meta {
        path: PathBuf,
        source: crate::meta::MetaError,
    },
    #[error("disk {path}: dirty bitmap: {source}")]
    Bitmap {
        path: PathBuf,
        source: crate::bitmap::BitmapError,
    },
    #[error("apply journal: {0}")]
    Journal(#[from] JournalError),
    #[error("the primary's plan names {plan} disks, this standby has {have}")]
    PlanDisks { plan: usize, have: usize },
    #[error("disk {disk}: the primary refused to resync: {reason}")]
    Refused { disk: usize, reason: String },
    #[error("resync chunk for disk {disk} at block {first} ({len} bytes) is outside the disk")]
    ChunkRange { disk: u16, first: u64, len: usize },
    #[error("a resync chunk arrived without a plan")]
    NoPlan,
    #[error("there is no disk {0}")]
    NoDisk(u16),
}

struct StandbyDisk {
    path: PathBuf,
    file: File,
    store: MetaStore,
    meta: MetaState,
    bitmap: Option<DirtyBitmap>,
    size: u64,
    plan: Option<DiskPlan>,
    copied_blocks: u64,
    /// Resync chunks written since the last sync.
    unsynced: bool,
}

impl StandbyDisk {
    /// The replica's bitmap for the geometry `m` describes (created clear if missing).
    fn open_bitmap(&self, m: &ReplicaMeta) -> Result<DirtyBitmap, StandbyDiskError> {
        DirtyBitmap::open(&self.store.bitmap_path(), m.disk_size, m.block_size).map_err(|source| {
            StandbyDiskError::Bitmap {
                path: self.path.clone(),
                source,
            }
        })
    }
}

/// Every disk of the standby.
pub struct StandbyDisks {
    disks: Vec<StandbyDisk>,
    journal: Option<ApplyJournal>,
    journal_dir: Option<PathBuf>,
    /// Bytes written by resync chunks (for the report).
    pub resync_bytes: u64,
    /// Resync chunks written, not yet durable and acknowledged.
    unacked: Vec<(u16, u64, u32)>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StandbyDiskError + '_ {
    move |source| StandbyDiskError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where the apply journal lives: beside the first disk's metadata.
pub fn journal_dir(first_disk: &Path) -> PathBuf {
    MetaStore::for_image(first_disk).dir().join("apply-journal")
}

impl StandbyDisks {
    /// Opens every image, recovers the apply journal (a standby killed while applying
    /// comes back at an epoch boundary) and loads the metadata.
    pub fn open(images: &[PathBuf]) -> Result<StandbyDisks, StandbyDiskError> {
        let mut disks = Vec::new();
        for p in images {
            let p = p.clone();
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .map_err(io_err(&p))?;
            let size = crate::meta::image_identity(&p).map_err(io_err(&p))?.size;
            disks.push(StandbyDisk {
                store: MetaStore::for_image(&p),
                path: p,
                file,
                meta: MetaState::Missing,
                bitmap: None,
                size,
                plan: None,
                copied_blocks: 0,
                unsynced: false,
            });
        }
        let mut me = StandbyDisks {
            disks,
            journal: None,
            journal_dir: None,
            resync_bytes: 0,
            unacked: Vec::new(),
        };
        if let Some(first) = me.disks.first() {
            let dir = journal_dir(&first.path);
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
            let files = me.files()?;
            let (j, rep) = apply_journal::open(&dir, &files)?;
            if !rep.replayed_epochs.is_empty() || rep.torn_tail_bytes > 0 {
                log::warn!(
                    "standby: apply journal recovered: replayed epochs {:?}, discarded {} torn bytes; images at epoch {:?}",
                    rep.replayed_epochs,
                    rep.torn_tail_bytes,
                    rep.applied_through
                );
            }
            drop(j);
            me.journal_dir = Some(dir);
        }
        for d in &mut me.disks {
            d.meta = d.store.load().map_err(|source| StandbyDiskError::Meta {
                path: d.path.clone(),
                source,
            })?;
            if let MetaState::Ok(m) = &d.meta {
                d.bitmap = Some(d.open_bitmap(m)?);
            }
        }
        Ok(me)
    }

    fn files(&self) -> Result<Vec<File>, StandbyDiskError> {
        self.disks
            .iter()
            .map(|d| d.file.try_clone().map_err(io_err(&d.path)))
            .collect()
    }

    /// Forgets this disk's metadata so that the primary sends a full copy (the
    /// operator's "discard this replica's data").
    pub fn discard_all(&mut self) -> Result<(), StandbyDiskError> {
        for d in &mut self.disks {
            match std::fs::remove_dir_all(d.store.dir()) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(d.store.dir())(e)),
            }
            d.meta = MetaState::Missing;
            d.bitmap = None;
        }
        Ok(())
    }

    /// The `Meta` message: each disk's metadata and bitmap words (the payload).
    pub fn report(&self) -> (Vec<DiskReport>, Vec<u8>) {
        let mut reports = Vec::new();
        let mut payload = Vec::new();
        for d in &self.disks {
            let (words, dirty) = match &d.bitmap {
                Some(b) => (b.words().to_vec(), b.count()),
                None => (Vec::new(), 0),
            };
            for w in &words {
                payload.extend_from_slice(&w.to_le_bytes());
            }
            reports.push(DiskReport {
                meta: WireMeta::from(&d.meta),
                bitmap_words: words.len() as u64,
                dirty_blocks: dirty,
            });
        }
        (reports, payload)
    }

    /// The primary's plan: refuse, or mark each resync target inconsistent (durably)
    /// before the first chunk lands, and start a fresh apply journal for this session.
    pub fn on_plan(&mut self, plan: &[DiskPlan]) -> Result<(), StandbyDiskError> {
        if plan.len() != self.disks.len() {
            return Err(StandbyDiskError::PlanDisks {
                plan: plan.len(),
                have: self.disks.len(),
            });
        }
        for (i, p) in plan.iter().enumerate() {
            if p.kind == PlanKind::Refuse {
                return Err(StandbyDiskError::Refused {
                    disk: i,
                    reason: p.reason.clone(),
                });
            }
        }
        for (d, p) in self.disks.iter_mut().zip(plan) {
            log::info!(
                "standby: disk {}: {:?} ({}), {} blocks",
                d.path.display(),
                p.kind,
                p.reason,
                p.blocks
            );
            let meta_err = |source| StandbyDiskError::Meta {
                path: d.path.clone(),
                source,
            };
            let mut m = match &d.meta {
                MetaState::Ok(m) => m.clone(),
                _ => d.store.create_fresh().map_err(meta_err)?,
            };
            if d.bitmap.is_none() {
                let _ = std::fs::remove_file(d.store.bitmap_path());
                d.bitmap = Some(d.open_bitmap(&m)?);
            }
            // Until epoch 0 commits this replica is not a copy of anything the guest saw.
            m.inconsistent = true;
            m.sync_source_gen = p.source_gen;
            m.unclean_primary = false;
            m.resync = Some(ResyncProgress {
                full: p.kind == PlanKind::Full,
                total_blocks: p.blocks,
                done_blocks: 0,
            });
            d.store.save(&m).map_err(meta_err)?;
            d.meta = MetaState::Ok(m);
            d.plan = Some(p.clone());
            d.copied_blocks = 0;
        }
        self.fresh_journal()?;
        Ok(())
    }

    /// A new session numbers its epochs from 0 again: start the journal empty (the
    /// previous session's records were replayed when it was opened).
    fn fresh_journal(&mut self) -> Result<(), StandbyDiskError> {
        self.journal = None;
        let Some(dir) = self.journal_dir.clone() else {
            return Ok(());
        };
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&dir)(e)),
        }
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let files = self.files()?;
        let (j, _) = apply_journal::open(&dir, &files)?;
        self.journal = Some(j);
        Ok(())
    }

    /// Writes one resync chunk durably (the primary clears its bits on our answer).
    pub fn write_chunk(
        &mut self,
        disk: u16,
        first_block: u64,
        blocks: u32,
        data: &[u8],
    ) -> Result<(), StandbyDiskError> {
        let d = self
            .disks
            .get_mut(usize::from(disk))
            .ok_or(StandbyDiskError::ChunkRange {
                disk,
                first: first_block,
                len: data.len(),
            })?;
        if d.plan.is_none() {
            return Err(StandbyDiskError::NoPlan);
        }
        let bs = match &d.meta {
            MetaState::Ok(m) => m.block_size,
            _ => return Err(StandbyDiskError::NoPlan),
        };
        let chunk = Chunk {
            id: 0,
            first_block,
            blocks,
        };
        // Checks range and length (exactly the chunk's bytes, the last block may be
        // short) before writing.
        write_chunk(&d.file, bs, d.size, &chunk, data).map_err(|e| match e {
            ResyncError::Io(source) => StandbyDiskError::Io {
                path: d.path.clone(),
                source,
            },
            _ => StandbyDiskError::ChunkRange {
                disk,
                first: first_block,
                len: data.len(),
            },
        })?;
        d.copied_blocks += u64::from(blocks);
        d.unsynced = true;
        self.resync_bytes += data.len() as u64;
        self.unacked.push((disk, first_block, blocks));
        Ok(())
    }

    /// Chunks written and not yet acknowledged (they are acknowledged once durable).
    pub fn unacked_chunks(&self) -> usize {
        self.unacked.len()
    }

    /// Makes the chunks written so far durable (one `fdatasync` per written disk, not
    /// one per chunk) and returns their acknowledgements `(disk, first_block, blocks)`.
    pub fn sync_chunks(&mut self) -> Result<Vec<(u16, u64, u32)>, StandbyDiskError> {
        for d in &mut self.disks {
            if std::mem::take(&mut d.unsynced) {
                d.file.sync_data().map_err(io_err(&d.path))?;
            }
        }
        Ok(std::mem::take(&mut self.unacked))
    }

    /// Records resync progress in the metadata (for `twinrun disk status`).
    pub fn save_progress(&mut self) {
        for d in &mut self.disks {
            if let MetaState::Ok(m) = &mut d.meta {
                if let Some(p) = &mut m.resync {
                    p.done_blocks = d.copied_blocks.min(p.total_blocks);
                    if let Err(e) = d.store.save(m) {
                        log::warn!("disk {}: saving progress: {e}", d.path.display());
                    }
                }
            }
        }
    }

    /// Records `epoch` as the last committed one in every consistent replica's metadata
    /// (the caller paces it: a metadata save is a write, an fsync and a rename).
    pub fn note_committed(&mut self, epoch: u64) {
        for d in &mut self.disks {
            if let MetaState::Ok(m) = &mut d.meta {
                if !m.inconsistent && m.last_committed_epoch != Some(epoch) {
                    m.last_committed_epoch = Some(epoch);
                    if let Err(e) = d.store.save(m) {
                        log::warn!("disk {}: saving replica metadata: {e}", d.path.display());
                    }
                }
            }
        }
    }

    /// Applies committed epoch `epoch`'s writes through the journal: durable when this
    /// returns (the epoch may be acknowledged).
    pub fn commit(
        &mut self,
        epoch: u64,
        writes: &[(u16, u64, &[u8])],
    ) -> Result<(), StandbyDiskError> {
        if writes.is_empty() {
            // Nothing to make durable: no journal record, no fdatasync (most epochs of
            // most workloads write nothing to disk).
            return Ok(());
        }
        let r = match &mut self.journal {
            Some(j) => j.commit(epoch, writes),
            None => return Err(StandbyDiskError::NoPlan),
        };
        if let Err(JournalError::Disk { disk, source }) = &r {
            // This replica can no longer take the primary's writes: it is failed until
            // replaced and fully resynced (the primary runs on degraded meanwhile).
            self.mark_failed(usize::from(*disk), source);
        }
        Ok(r?)
    }

    fn mark_failed(&mut self, disk: usize, err: &io::Error) {
        let Some(d) = self.disks.get_mut(disk) else {
            return;
        };
        log::error!(
            "standby: disk {} FAILED ({err}); this replica is marked failed until it is \
             replaced and fully resynced",
            d.path.display()
        );
        if let MetaState::Ok(m) = &mut d.meta {
            m.failed = true;
            if let Err(e) = d.store.save(m) {
                log::error!("disk {}: saving replica metadata: {e}", d.path.display());
            }
        }
    }

    /// Epoch 0 committed: every resync target now holds the primary's generation.
    pub fn in_sync(&mut self) {
        for d in &mut self.disks {
            let Some(p) = d.plan.take() else { continue };
            let MetaState::Ok(m) = &mut d.meta else {
                continue;
            };
            m.current_gen = p.source_gen;
            m.history = p.source_history.clone();
            m.bitmap_base_gen = 0;
            m.inconsistent = false;
            if p.kind == PlanKind::Full {
                // Fully resynced: a replaced (or repaired) disk is trusted again.
                m.failed = false;
            }
            m.sync_source_gen = 0;
            m.resync = None;
            m.last_committed_epoch = Some(0);
            if let Some(b) = &mut d.bitmap {
                if let Err(e) = b.clear_all() {
                    log::warn!("disk {}: clearing the bitmap: {e}", d.path.display());
                }
            }
            if let Err(e) = d.store.save(m) {
                log::error!("disk {}: saving replica metadata: {e}", d.path.display());
            }
            log::info!(
                "standby: disk {} in sync (generation {:016x})",
                d.path.display(),
                m.current_gen
            );
        }
    }

    /// Before a failover: the images hold every committed epoch durably; no replica is
    /// a half-done resync target (those are never promoted).
    pub fn prepare_failover(&mut self) -> Result<(), StandbyDiskError> {
        if let Some(j) = &mut self.journal {
            j.sync_all()?;
            if let Some(e) = j.last_committed() {
                self.note_committed(e);
            }
        }
        for d in &self.disks {
            if let MetaState::Ok(ReplicaMeta {
                inconsistent: true, ..
            }) = &d.meta
            {
                return Err(StandbyDiskError::Refused {
                    disk: 0,
                    reason: format!(
                        "{} is an unfinished resync target and cannot be promoted",
                        d.path.display()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Reads `len` bytes at `offset` of disk `disk` from the committed replica.
    pub fn read(&self, disk: u16, offset: u64, len: u32) -> Result<Vec<u8>, StandbyDiskError> {
        let d = self
            .disks
            .get(usize::from(disk))
            .ok_or(StandbyDiskError::NoDisk(disk))?;
        let mut buf = vec![0u8; len as usize];
        d.file
            .read_exact_at(&mut buf, offset)
            .map_err(io_err(&d.path))?;
        Ok(buf)
    }

    /// Performs a session action; `payload` is the payload of the message that caused
    /// it (a chunk's data). Returns the messages to send the primary, with payloads.
    /// An error ends the session (a refused plan has already been answered with
    /// `Refused`).
    pub fn perform(
        &mut self,
        a: StandbyAction,
        payload: &[u8],
        replies: &mut Vec<(DiskToPrimary, Vec<u8>)>,
    ) -> Result<(), StandbyDiskError> {
        match a {
            StandbyAction::SendReport => {
                let (disks, words) = self.report();
                replies.push((DiskToPrimary::Meta { disks }, words));
            }
            StandbyAction::ApplyPlan(plan) => {
                if let Err(e) = self.on_plan(&plan) {
                    log::error!("standby: {e}");
                    let reason: String = e.to_string().chars().take(1000).collect();
                    replies.push((DiskToPrimary::Refused { reason }, Vec::new()));
                    return Err(e);
                }
            }
            StandbyAction::WriteChunk {
                disk,
                first_block,
                blocks,
            } => self.write_chunk(disk, first_block, blocks, payload)?,
            StandbyAction::AckChunks => {
                for (disk, first_block, blocks) in self.sync_chunks()? {
                    replies.push((
                        DiskToPrimary::ChunkDone {
                            disk,
                            first_block,
                            blocks,
                        },
                        Vec::new(),
                    ));
                }
            }
            StandbyAction::SaveProgress => self.save_progress(),
            StandbyAction::ResyncDone { rounds, blocks } => log::info!(
                "standby: disk resync rounds done ({rounds} passes, {blocks} blocks sent, \
                 {} bytes received); consistent once epoch 0 commits",
                self.resync_bytes
            ),
            StandbyAction::ServeRead {
                id,
                disk,
                offset,
                len,
            } => {
                let (ok, data) = match self.read(disk, offset, len) {
                    Ok(d) => (true, d),
                    Err(e) => {
                        log::error!("standby: serving a read for the primary: {e}");
                        (false, Vec::new())
                    }
                };
                replies.push((DiskToPrimary::ReadDone { id, ok }, data));
            }
            StandbyAction::ServeDigests {
                id,
                disk,
                range_bytes,
                first_range,
                count,
            } => {
                let mut buf = Vec::new();
                let r = self.image(usize::from(disk)).map(|(f, size)| {
                    crate::verify::range_digests(f, size, range_bytes, first_range, count, &mut buf)
                });
                let (ok, payload) = match r {
                    Some(Ok(ds)) => {
                        let mut p = Vec::with_capacity(ds.len() * DIGEST_LEN);
                        for d in &ds {
                            p.extend_from_slice(d);
                        }
                        (true, p)
                    }
                    Some(Err(e)) => {
                        log::error!("standby: verify digests: {e}");
                        (false, Vec::new())
                    }
                    None => (false, Vec::new()),
                };
                let count = if ok { count } else { 0 };
                replies.push((DiskToPrimary::Digests { id, count, ok }, payload));
            }
            StandbyAction::InSync => self.in_sync(),
            StandbyAction::NoteCommitted(epoch) => self.note_committed(epoch),
            StandbyAction::PrepareFailover => self.prepare_failover()?,
        }
        Ok(())
    }

    /// The image of disk `i` (for digests).
    pub fn image(&self, i: usize) -> Option<(&File, u64)> {
        self.disks.get(i).map(|d| (&d.file, d.size))
    }

    pub fn len(&self) -> usize {
        self.disks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.disks.is_empty()
    }
}
