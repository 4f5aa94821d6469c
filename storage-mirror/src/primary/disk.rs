//! One mirrored disk on the primary: its replica metadata and persistent dirty bitmap,
//! kept exact through three modes:
//!
//! - **Degraded** (no standby in sync): every written 4 KiB block is marked, durably,
//!   before the write is issued (set-before-write); nothing is cleared until a resync
//!   has copied the block.
//! - **Syncing** (a resync is copying the marked blocks to a standby): as degraded, and
//!   each written block is also noted in memory as *touched*, so that a chunk read
//!   before the write does not clear the block's bit when it is acknowledged.
//! - **Protected** (epochs commit on the standby): the [`ActivityLog`]: a write marks
//!   its whole 4 MiB extent, cleared once every epoch that wrote it is acknowledged.
//!
//! Generations (see [`crate::decision`]): starting without a standby, and losing it,
//! begin a new generation whose bitmap base is the one both replicas shared; epoch 0
//! committing ends the bitmap (base 0).

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::activity::{extent_range, ActivityLog, EXTENT_SHIFT};
use super::peer::EpochWrites;
use crate::bitmap::{BitmapError, DirtyBitmap};
use crate::meta::{MetaError, MetaState, MetaStore, ReplicaMeta};

#[derive(Debug, thiserror::Error)]
pub enum DiskSetupError {
    #[error("disk {path}: replica metadata: {source}")]
    Meta { path: PathBuf, source: MetaError },
    #[error("disk {path}: dirty bitmap: {source}")]
    Bitmap { path: PathBuf, source: BitmapError },
    #[error("disk {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("disk {path}: the replica is marked FAILED; replace the disk (or delete {meta_dir}) so that it is fully resynced")]
    Failed { path: PathBuf, meta_dir: PathBuf },
    #[error("disk {path}: the replica is an interrupted resync target (it lacks blocks of the other replica's generation {source_gen}): it cannot run the VM; run the VM where the other replica is, and this one becomes its standby")]
    Inconsistent { path: PathBuf, source_gen: u64 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Degraded,
    Syncing,
    Protected,
}

impl Mode {
    /// The name `twinrun disk status` shows.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Degraded => "degraded",
            Mode::Syncing => "syncing",
            Mode::Protected => "protected",
        }
    }
}

/// How often a metadata save that only records progress may happen.
const PROGRESS_SAVE_EVERY: Duration = Duration::from_secs(1);

/// One mirrored disk on the primary.
pub struct PrimaryDisk {
    pub path: PathBuf,
    /// A read-only handle for resync reads and digests.
    pub image: File,
    pub store: MetaStore,
    pub meta: ReplicaMeta,
    pub bitmap: DirtyBitmap,
    mode: Mode,
    /// Syncing: blocks written since the pass began (in memory only: a crash ends the
    /// resync, and the bitmap keeps every such block set).
    touched: Vec<u64>,
    /// Protected: extents with unacknowledged writes.
    log: ActivityLog,
    /// Guest bytes written (the resync yields to guest I/O).
    pub guest_write_bytes: u64,
    /// A verify is running: (ranges compared, ranges in total).
    pub verify_progress: Option<(u64, u64)>,
    /// A verify batch is out: the ranges the guest writes meanwhile (their digests on
    /// the two sides may differ only because of that write).
    pub verify_watch: Option<Vec<(u64, u64)>>,
    /// Byte ranges an online verify found differing: kept marked in the bitmap until a
    /// resync copies them (clearing idle extents must not forget them).
    verify_marked: Vec<(u64, u64)>,
    /// When the metadata was last saved only to record progress.
    last_meta_save: Instant,
    /// Protected: the writes of each captured, unacknowledged epoch (shared with the
    /// checkpoint's payload, no copy). When the local disk has failed, a read is served
    /// from the standby's image with these laid over it: the standby may not have
    /// applied them yet.
    retained: BTreeMap<u64, Arc<dyn EpochWrites>>,
}

impl PrimaryDisk {
    /// Opens (or starts) the metadata and bitmap of the image at `path`; the disk is
    /// degraded (recording written blocks) until a standby is in sync.
    pub fn open(path: &Path) -> Result<PrimaryDisk, DiskSetupError> {
        let store = MetaStore::for_image(path);
        let meta_err = |source| DiskSetupError::Meta {
            path: path.to_path_buf(),
            source,
        };
        let loaded = store.load().map_err(meta_err)?;
        let (mut meta, fresh) = match loaded {
            MetaState::Ok(m) => (m, false),
            other => {
                let why = match &other {
                    MetaState::Damaged(r) => format!("damaged ({r})"),
                    MetaState::Replaced { reason } => format!("stale ({reason})"),
                    MetaState::Missing | MetaState::Ok(_) => "missing".to_string(),
                };
                log::warn!(
                    "disk {}: replica metadata {why}; starting a new one (a standby will get a full copy)",
                    path.display(),
                );
                (store.create_fresh().map_err(meta_err)?, true)
            }
        };
        if meta.failed {
            return Err(DiskSetupError::Failed {
                path: path.to_path_buf(),
                meta_dir: store.dir().to_path_buf(),
            });
        }
        // A half-copied replica (a resync target that was interrupted, or a demoted
        // one) never runs a guest: its blocks mix two generations. Only a standby opens
        // it, and the next session resumes or redoes the copy.
        if meta.inconsistent {
            return Err(DiskSetupError::Inconsistent {
                path: path.to_path_buf(),
                source_gen: meta.sync_source_gen,
            });
        }
        let bitmap_path = store.bitmap_path();
        if fresh {
            // A bitmap without its metadata relates to nothing: start clear.
            let _ = std::fs::remove_file(&bitmap_path);
        }
        let bitmap =
            DirtyBitmap::open(&bitmap_path, meta.disk_size, meta.block_size).map_err(|source| {
                DiskSetupError::Bitmap {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
        // Running without a standby from here on: a new generation, unless this
        // replica never got back in sync since its bitmap began (a resync source that
        // crashed): its generation was never shared, and keeping it lets the standby
        // resume the resync (or take a delta) instead of a full copy.
        if meta.bitmap_base_gen == 0 {
            meta.new_generation().map_err(meta_err)?;
        }
        meta.unclean_primary = true;
        store.save(&meta).map_err(meta_err)?;
        let image = File::open(path).map_err(|source| DiskSetupError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let words = bitmap.blocks().div_ceil(64) as usize;
        Ok(PrimaryDisk {
            path: path.to_path_buf(),
            image,
            store,
            meta,
            bitmap,
            mode: Mode::Degraded,
            touched: vec![0; words],
            log: ActivityLog::default(),
            guest_write_bytes: 0,
            retained: BTreeMap::new(),
            verify_progress: None,
            verify_watch: None,
            verify_marked: Vec::new(),
            last_meta_save: Instant::now(),
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    fn block_size(&self) -> u64 {
        u64::from(self.meta.block_size)
    }

    /// Blocks per activity-log extent.
    fn per_extent(&self) -> u64 {
        1u64 << (EXTENT_SHIFT - self.meta.block_size.trailing_zeros())
    }

    /// Byte ranges written in unacknowledged epochs and in the open one (protected).
    pub fn unacked_ranges(&self) -> Vec<(u64, u64)> {
        self.log.unacked_ranges()
    }

    /// Byte ranges not known to be on the standby while a resync runs (set in the
    /// bitmap); empty outside the resync.
    pub fn unsynced_ranges(&self) -> Vec<(u64, u64)> {
        if self.mode != Mode::Syncing {
            return Vec::new();
        }
        let bs = self.block_size();
        self.bitmap
            .runs_from(0)
            .map(|(f, n)| (f * bs, n * bs))
            .collect()
    }

    /// The writes of unacknowledged epochs, oldest first (to lay over a read served
    /// by the standby).
    pub fn retained(&self) -> Vec<Arc<dyn EpochWrites>> {
        self.retained.values().cloned().collect()
    }

    /// Marks what an online verify found differing, durably, for the next resync.
    pub fn mark_verify_differences(&mut self, ranges: &[(u64, u64)]) {
        self.verify_marked.extend_from_slice(ranges);
        if let Err(e) = self.mark(ranges) {
            log::error!(
                "disk {}: marking verify differences: {e}",
                self.path.display()
            );
        }
    }

    /// After clearing bits: the verify differences stay marked.
    fn remark_verify_differences(&mut self) {
        if !self.verify_marked.is_empty() {
            let r = self.verify_marked.clone();
            if let Err(e) = self.mark(&r) {
                log::error!(
                    "disk {}: re-marking verify differences: {e}",
                    self.path.display()
                );
            }
        }
    }

    pub fn save_meta(&self) {
        if let Err(e) = self.store.save(&self.meta) {
            log::error!("disk {}: saving replica metadata: {e}", self.path.display());
        }
    }

    /// A batch of guest writes is about to be issued: record them as the mode wants,
    /// durably before this returns (an error fails the writes).
    pub fn before_writes(&mut self, ranges: &[(u64, u64)]) -> io::Result<()> {
        for &(_, len) in ranges {
            self.guest_write_bytes += len;
        }
        if let Some(w) = &mut self.verify_watch {
            w.extend_from_slice(ranges);
        }
        match self.mode {
            Mode::Degraded => self.mark(ranges),
            Mode::Syncing => {
                let bs = self.block_size();
                for &(off, len) in ranges {
                    if len == 0 {
                        continue;
                    }
                    let (first, last) = (off / bs, (off + len - 1) / bs);
                    for b in first..=last {
                        if let Some(w) = self.touched.get_mut((b / 64) as usize) {
                            *w |= 1 << (b % 64);
                        }
                    }
                }
                self.mark(ranges)
            }
            Mode::Protected => {
                let new = self.log.write(ranges);
                if new.is_empty() {
                    return Ok(());
                }
                let size = self.meta.disk_size;
                let ext: Vec<(u64, u64)> = new.iter().map(|&x| extent_range(x, size)).collect();
                self.mark(&ext)
            }
        }
    }

    fn mark(&mut self, ranges: &[(u64, u64)]) -> io::Result<()> {
        self.bitmap
            .mark_bytes(ranges)
            .map(|_| ())
            .map_err(|e| io::Error::other(format!("dirty bitmap: {e}")))
    }

    /// A resync begins: it copies every marked block (verify differences included);
    /// writes from here on are noted as touched.
    pub fn begin_resync(&mut self) {
        self.verify_marked.clear();
        self.mode = Mode::Syncing;
        self.new_pass();
    }

    /// A resync pass begins: forget which blocks the guest wrote during the last one
    /// (the new pass reads each of them again after the write).
    pub fn new_pass(&mut self) {
        self.touched.iter_mut().for_each(|w| *w = 0);
    }

    /// A resync chunk is durable on the standby: its blocks are in sync unless the
    /// guest wrote them since the pass began.
    pub fn chunk_done(&mut self, first: u64, blocks: u64) {
        let mut run: Option<(u64, u64)> = None;
        let clear = |r: Option<(u64, u64)>, bm: &mut DirtyBitmap| {
            if let Some((f, n)) = r {
                if let Err(e) = bm.clear_blocks(f, n) {
                    log::warn!("dirty bitmap: clearing {n} blocks at {f}: {e}");
                }
            }
        };
        for b in first..first.saturating_add(blocks).min(self.bitmap.blocks()) {
            let touched = self
                .touched
                .get((b / 64) as usize)
                .is_some_and(|w| w & (1 << (b % 64)) != 0);
            if touched {
                clear(run.take(), &mut self.bitmap);
                continue;
            }
            run = match run {
                Some((f, n)) if f + n == b => Some((f, n + 1)),
                other => {
                    clear(other, &mut self.bitmap);
                    Some((b, 1))
                }
            };
        }
        clear(run, &mut self.bitmap);
    }

    /// Records resync progress in the metadata (`twinrun disk status`, and a resumed
    /// resync's total).
    pub fn save_progress(&mut self, done_blocks: u64) {
        if let Some(r) = &mut self.meta.resync {
            r.done_blocks = done_blocks.min(r.total_blocks);
        }
        if let Err(e) = self.bitmap.flush() {
            log::warn!("dirty bitmap flush: {e}");
        }
        self.save_meta();
    }

    /// The open epoch was captured as `epoch` (the guest is paused), with these writes.
    pub fn captured(&mut self, epoch: u64, writes: Option<Arc<dyn EpochWrites>>) {
        if let Some(w) = writes.filter(|w| !w.is_empty()) {
            if self.mode != Mode::Degraded {
                self.retained.insert(epoch, w);
            }
        }
        match self.mode {
            // Epoch 0 carries every block written since the resync began; from here on
            // the activity log covers writes of unacknowledged epochs.
            Mode::Syncing if epoch == 0 => {
                self.mode = Mode::Protected;
                self.log.clear();
            }
            Mode::Protected => self.log.captured(epoch),
            Mode::Syncing | Mode::Degraded => {}
        }
    }

    /// Every epoch through `through` is committed on the standby.
    pub fn acked(&mut self, through: u64) {
        if self.mode != Mode::Protected {
            return;
        }
        self.meta.last_committed_epoch = Some(through);
        if self.last_meta_save.elapsed() > PROGRESS_SAVE_EVERY {
            self.save_meta();
            self.last_meta_save = Instant::now();
        }
        let first_ack = self.meta.bitmap_base_gen != 0 || self.meta.resync.is_some();
        self.retained = self.retained.split_off(&through.saturating_add(1));
        let idle = self.log.acked(through);
        let per_extent = self.per_extent();
        if first_ack {
            // In sync: everything but the active extents is on the standby.
            let runs: Vec<(u64, u64)> = self.bitmap.runs_from(0).collect();
            for (f, n) in runs {
                for b in f..f + n {
                    if !self.log.is_active(b / per_extent) {
                        let _ = self.bitmap.clear_blocks(b, 1);
                    }
                }
            }
            if let Err(e) = self.bitmap.flush() {
                log::warn!("dirty bitmap flush: {e}");
            }
            self.remark_verify_differences();
            self.meta.bitmap_base_gen = 0;
            self.meta.resync = None;
            self.save_meta();
            log::info!(
                "disk {}: in sync with the standby (generation {:016x})",
                self.path.display(),
                self.meta.current_gen
            );
            return;
        }
        let cleared = !idle.is_empty();
        for x in idle {
            let first = x * per_extent;
            let n = per_extent.min(self.bitmap.blocks().saturating_sub(first));
            let _ = self.bitmap.clear_blocks(first, n);
        }
        if cleared {
            self.remark_verify_differences();
        }
    }

    /// The standby is gone: degraded from here on.
    pub fn peer_lost(&mut self) {
        if self.mode == Mode::Degraded {
            return;
        }
        self.retained.clear();
        let was = self.mode;
        // Until epoch 0 is acknowledged the standby never held this generation and the
        // bitmap still holds every block the resync and epoch 0 were to bring it.
        let never_in_sync = self.meta.bitmap_base_gen != 0 || self.meta.resync.is_some();
        if was == Mode::Protected && !never_in_sync {
            self.narrow_to_unacked();
        }
        self.mode = Mode::Degraded;
        if was == Mode::Syncing || never_in_sync {
            // The standby never held this generation (it is an inconsistent resync
            // target of it): the generation goes on, and so does the bitmap, so that
            // the standby's return resumes the resync where it stopped.
            log::warn!(
                "disk {}: resync interrupted, {} blocks still to copy",
                self.path.display(),
                self.bitmap.count()
            );
            return;
        }
        // The bits still set (active extents, unfinished resync) stay: they are part of
        // the delta when the standby returns.
        if let Err(e) = self.meta.new_generation() {
            log::error!("disk {}: new generation: {e}", self.path.display());
        }
        self.save_meta();
        log::warn!(
            "disk {}: DEGRADED, recording written blocks ({} marked)",
            self.path.display(),
            self.bitmap.count()
        );
    }

    /// The standby is gone but this PM lives, so it knows exactly which blocks its
    /// unacknowledged epochs (and the open one) wrote: mark those durably, then clear
    /// the rest of the active extents (a whole extent per write is only needed when
    /// this PM itself crashes).
    fn narrow_to_unacked(&mut self) {
        let ranges = self.log.unacked_ranges();
        if let Err(e) = self.mark(&ranges) {
            log::warn!("disk {}: keeping whole extents: {e}", self.path.display());
            return;
        }
        let bs = self.block_size();
        let mut keep = HashSet::new();
        for &(off, len) in &ranges {
            if len > 0 {
                keep.extend(off / bs..=(off + len - 1) / bs);
            }
        }
        let per_extent = self.per_extent();
        for x in self.log.active() {
            let first = x * per_extent;
            let end = (first + per_extent).min(self.bitmap.blocks());
            for b in first..end {
                if !keep.contains(&b) {
                    let _ = self.bitmap.clear_blocks(b, 1);
                }
            }
        }
        if let Err(e) = self.bitmap.flush() {
            log::warn!("dirty bitmap flush: {e}");
        }
        self.remark_verify_differences();
        self.log.clear();
    }

    /// Marks this replica failed (once): recorded in its metadata, so that it is never
    /// used again until replaced and fully resynced. Returns the mode.
    pub fn note_failure(&mut self, err: &io::Error) -> Mode {
        if !self.meta.failed {
            self.meta.failed = true;
            self.save_meta();
            log::error!(
                "disk {}: LOCAL DISK FAILED ({err}); guest I/O is served from the standby's \
                 replica; this replica is marked failed until it is replaced and fully resynced",
                self.path.display()
            );
        }
        self.mode
    }

    /// Clean stop: flush the bitmap, clear the unclean flag.
    pub fn clean_shutdown(&mut self) {
        if let Err(e) = self.bitmap.flush() {
            log::warn!("disk {}: bitmap flush: {e}", self.path.display());
        }
        self.meta.unclean_primary = false;
        self.save_meta();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BlockSet;
    use std::sync::atomic::{AtomicUsize, Ordering};

    pub(crate) struct Img {
        dir: PathBuf,
        pub(crate) path: PathBuf,
    }

    impl Drop for Img {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    pub(crate) fn image(mib: u64) -> Img {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "twinrun-pdisk-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        File::create(&path).unwrap().set_len(mib << 20).unwrap();
        Img { dir, path }
    }

    fn blocks(d: &PrimaryDisk) -> Vec<(u64, u64)> {
        d.bitmap.runs_from(0).collect()
    }

    #[test]
    fn degraded_marks_every_written_block_durably() {
        let img = image(8);
        let mut d = PrimaryDisk::open(&img.path).unwrap();
        assert_eq!(d.mode(), Mode::Degraded);
        // Starting alone begins a generation whose base is the previous one.
        assert_ne!(d.meta.bitmap_base_gen, 0);
        d.before_writes(&[(512, 512), (3 * 4096, 8192)]).unwrap();
        assert_eq!(blocks(&d), vec![(0, 1), (3, 2)]);
        // Durable before the write is issued: a fresh open sees the bits.
        let again = DirtyBitmap::open(&d.store.bitmap_path(), 8 << 20, 4096).unwrap();
        assert_eq!(again.count(), 3);
    }

    #[test]
    fn a_chunk_written_meanwhile_keeps_its_bit() {
        let img = image(8);
        let mut d = PrimaryDisk::open(&img.path).unwrap();
        d.bitmap.set_all().unwrap();
        d.mode = Mode::Syncing;
        // The guest writes block 5 after the chunk 0..16 was read.
        d.before_writes(&[(5 * 4096, 4096)]).unwrap();
        d.chunk_done(0, 16);
        assert_eq!(blocks(&d)[0], (5, 1));
        // The next pass forgets what was touched in the last one.
        d.new_pass();
        d.chunk_done(5, 1);
        assert_eq!(d.bitmap.next_set(0), Some(16));
    }

    #[test]
    fn activity_log_clears_extents_once_their_epochs_commit() {
        let img = image(16);
        let mut d = PrimaryDisk::open(&img.path).unwrap();
        d.mode = Mode::Syncing;
        d.captured(0, None);
        assert_eq!(d.mode(), Mode::Protected);
        // Epoch 1 writes in extent 0, epoch 2 in extents 0 and 2.
        d.before_writes(&[(4096, 4096)]).unwrap();
        d.captured(1, None);
        d.before_writes(&[(8192, 4096), (9 << 20, 4096)]).unwrap();
        d.captured(2, None);
        // Whole extents are marked (one sync per extent entering the active set).
        assert_eq!(d.bitmap.count(), 2048);
        // Epoch 0 commits: in sync, generation base cleared; active extents stay.
        d.acked(0);
        assert_eq!(d.meta.bitmap_base_gen, 0);
        assert_eq!(d.bitmap.count(), 2048);
        d.acked(1);
        assert_eq!(d.bitmap.count(), 2048, "extent 0 still has epoch 2");
        d.acked(2);
        assert_eq!(d.bitmap.count(), 0);
    }

    #[test]
    fn losing_the_standby_keeps_exactly_the_unacknowledged_blocks() {
        let img = image(16);
        let mut d = PrimaryDisk::open(&img.path).unwrap();
        d.mode = Mode::Syncing;
        d.captured(0, None);
        d.acked(0);
        let gen = d.meta.current_gen;
        d.before_writes(&[(4096, 4096)]).unwrap();
        d.captured(1, None);
        d.acked(1);
        d.before_writes(&[(3 * 4096, 4096)]).unwrap();
        d.captured(2, None);
        d.before_writes(&[(5 << 20, 100)]).unwrap();
        d.peer_lost();
        assert_eq!(d.mode(), Mode::Degraded);
        // Epoch 1 is on the standby; epoch 2 and the open epoch are not.
        assert_eq!(blocks(&d), vec![(3, 1), (1280, 1)]);
        assert_eq!(d.meta.bitmap_base_gen, gen);
        assert_ne!(d.meta.current_gen, gen);
        // Degraded writes are recorded from then on.
        d.before_writes(&[(0, 4096)]).unwrap();
        assert_eq!(blocks(&d)[0], (0, 1));
    }

    #[test]
    fn epoch_0_is_told_of_the_blocks_a_resync_left_unconfirmed() {
        let img = image(8);
        let mut d = PrimaryDisk::open(&img.path).unwrap();
        d.before_writes(&[(4096, 8192), (1 << 20, 512)]).unwrap();
        // Degraded: no resync, nothing to ship.
        assert!(d.unsynced_ranges().is_empty());
        d.begin_resync();
        assert_eq!(d.unsynced_ranges(), vec![(4096, 8192), (1 << 20, 4096)]);
        // Epoch 0 captured: protected, the activity log takes over.
        d.captured(0, None);
        assert!(d.unsynced_ranges().is_empty());
    }

    #[test]
    fn an_interrupted_resync_keeps_its_generation_and_bits() {
        let img = image(8);
        let mut d = PrimaryDisk::open(&img.path).unwrap();
        let gen = d.meta.current_gen;
        d.bitmap.set_all().unwrap();
        d.mode = Mode::Syncing;
        d.chunk_done(0, 100);
        d.peer_lost();
        assert_eq!(d.meta.current_gen, gen, "the standby resumes against it");
        assert_eq!(d.bitmap.count(), 2048 - 100);
    }

    #[test]
    fn verify_marks_survive_extent_clearing() {
        let img = image(16);
        let mut d = PrimaryDisk::open(&img.path).unwrap();
        d.mode = Mode::Syncing;
        d.captured(0, None);
        d.acked(0);
        d.mark_verify_differences(&[(10 * 4096, 4096)]);
        d.before_writes(&[(0, 4096)]).unwrap();
        d.captured(1, None);
        d.acked(1);
        assert_eq!(blocks(&d), vec![(10, 1)]);
    }

    #[test]
    fn a_resync_source_restarted_keeps_its_generation() {
        let img = image(8);
        let d = PrimaryDisk::open(&img.path).unwrap();
        let gen = d.meta.current_gen;
        drop(d);
        // Crashed before any standby got in sync: same generation, the standby resumes.
        let d = PrimaryDisk::open(&img.path).unwrap();
        assert_eq!(d.meta.current_gen, gen);
        // Once in sync (base cleared), a restart begins a new generation.
        let mut d = d;
        d.mode = Mode::Syncing;
        d.captured(0, None);
        d.acked(0);
        drop(d);
        let d = PrimaryDisk::open(&img.path).unwrap();
        assert_ne!(d.meta.current_gen, gen);
        assert_eq!(d.meta.bitmap_base_gen, gen);
    }

    #[test]
    fn a_failed_replica_refuses_to_start() {
        let img = image(8);
        let mut d = PrimaryDisk::open(&img.path).unwrap();
        d.meta.failed = true;
        d.save_meta();
        drop(d);
        assert!(matches!(
            PrimaryDisk::open(&img.path),
            Err(DiskSetupError::Failed { .. })
        ));
    }

    #[test]
    fn a_half_copied_replica_refuses_to_run_a_guest() {
        // An interrupted resync target: its blocks mix the source's generation and its
        // own older one.
        let img = image(8);
        let mut d = PrimaryDisk::open(&img.path).unwrap();
        d.meta.inconsistent = true;
        d.meta.sync_source_gen = 7;
        d.save_meta();
        drop(d);
        for _ in 0..2 {
            // Refused, and the refusal changes nothing: asked again, the same answer.
            match PrimaryDisk::open(&img.path) {
                Err(DiskSetupError::Inconsistent { path, source_gen }) => {
                    assert_eq!(path, img.path);
                    assert_eq!(source_gen, 7);
                }
                other => panic!("an inconsistent replica opened: {:?}", other.map(|_| ())),
            }
        }
        let meta = MetaStore::for_image(&img.path).load().unwrap();
        assert!(matches!(meta, MetaState::Ok(m) if m.inconsistent && m.sync_source_gen == 7));

        // A demoted primary (it lost the VM to the quorum's holder) is refused too.
        let img = image(8);
        let mut d = PrimaryDisk::open(&img.path).unwrap();
        d.meta.mark_demoted(3);
        d.save_meta();
        drop(d);
        assert!(matches!(
            PrimaryDisk::open(&img.path),
            Err(DiskSetupError::Inconsistent { .. })
        ));
    }
}
