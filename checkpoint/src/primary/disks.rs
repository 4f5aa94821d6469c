//! The primary's side of disk mirroring: each disk's replica metadata and persistent
//! dirty bitmap, kept exact by the VMM's write hook, through three modes:
//!
//! - **Degraded** (no standby in sync): every written 4 KiB block is marked, durably,
//!   before the write is issued (set-before-write); nothing is cleared until a resync
//!   has copied the block.
//! - **Syncing** (a resync is copying the marked blocks to a standby): as degraded, and
//!   each written block is also noted in memory as *touched*, so that a chunk read
//!   before the write does not clear the block's bit when it is acknowledged.
//! - **Protected** (epochs commit on the standby): an activity log. A write marks its
//!   whole 4 MiB extent (one `fdatasync` per extent entering the active set, not one
//!   per block), counted per epoch; once every epoch that wrote an extent is
//!   acknowledged the extent is cleared (lazily persisted). After a crash of this PM the
//!   set bits cover every block of its unacknowledged epochs: the delta a returning
//!   ex-primary needs.
//!
//! Generations (see `storage_mirror::decision`): starting without a standby, and losing
//! it, begin a new generation whose bitmap base is the one both replicas shared; epoch 0
//! committing ends the bitmap (base 0).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use storage_mirror::bitmap::DirtyBitmap;
use storage_mirror::meta::{MetaState, MetaStore, ReplicaMeta, ResyncProgress, VerifyReport};
use vmm::config::VmConfig;
use vmm::devices::virtio::block::hooks::DiskHooks;
use vmm::devices::virtio::block::{overlay_writes, DiskJournal};

use crate::disk_msgs::{DiskToStandby, MAX_CHUNK_BYTES};
use crate::messages::ToStandby;

/// Activity-log extent: 4 MiB.
pub const EXTENT_SHIFT: u32 = 22;

/// The extents each of `ranges` (byte offset, length) touches, one item per (range,
/// extent) pair: how writes are counted in and out of the activity log.
fn extents_of(ranges: &[(u64, u64)]) -> impl Iterator<Item = u64> + '_ {
    ranges
        .iter()
        .filter(|&&(_, len)| len > 0)
        .flat_map(|&(off, len)| (off >> EXTENT_SHIFT)..=((off + len - 1) >> EXTENT_SHIFT))
}

#[derive(Debug, thiserror::Error)]
pub enum DiskSetupError {
    #[error("disk {path}: replica metadata: {source}")]
    Meta {
        path: PathBuf,
        source: storage_mirror::meta::MetaError,
    },
    #[error("disk {path}: dirty bitmap: {source}")]
    Bitmap {
        path: PathBuf,
        source: storage_mirror::bitmap::BitmapError,
    },
    #[error("disk {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("disk {path}: the replica is marked FAILED; replace the disk (or delete {meta_dir}) so that it is fully resynced")]
    Failed { path: PathBuf, meta_dir: PathBuf },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Degraded,
    Syncing,
    Protected,
}

/// One mirrored disk on the primary.
pub struct PrimaryDisk {
    pub path: PathBuf,
    /// A read-only handle for resync reads and digests.
    pub image: File,
    pub store: MetaStore,
    pub meta: ReplicaMeta,
    pub bitmap: DirtyBitmap,
    mode: Mode,
    /// Syncing: blocks written since the resync began (in memory only: a crash ends the
    /// resync, and the bitmap keeps every such block set).
    touched: Vec<u64>,
    /// Protected: byte ranges written since the last capture, and per captured,
    /// unacknowledged epoch (when the standby is lost while this PM lives, the degraded
    /// bitmap keeps exactly these blocks instead of whole extents).
    open_ranges: Vec<(u64, u64)>,
    pending_ranges: BTreeMap<u64, Vec<(u64, u64)>>,
    /// Protected: extent -> (range, extent) pairs of `open_ranges` and `pending_ranges`
    /// that touch it; an extent is active while this is nonzero.
    refs: HashMap<u64, u32>,
    /// Guest bytes written (resync yields to guest I/O).
    pub guest_write_bytes: u64,
    /// A verify is running: (ranges compared, ranges in total).
    pub(crate) verify_progress: Option<(u64, u64)>,
    /// A verify batch is out: the ranges the guest writes meanwhile (their digests on
    /// the two sides may differ only because of that write).
    pub(crate) verify_watch: Option<Vec<(u64, u64)>>,
    /// Byte ranges an online verify found differing: kept marked in the bitmap until a
    /// resync copies them (clearing idle extents must not forget them).
    verify_marked: Vec<(u64, u64)>,
    /// Pace of metadata saves that only record progress (the last committed epoch).
    last_meta_save: Instant,
    /// Protected: the writes of each captured, unacknowledged epoch (shared with the
    /// capture's payload, no copy). When the local disk has failed, a read is served
    /// from the standby's image with these laid over it: the standby may not have
    /// applied them yet.
    retained: BTreeMap<u64, Arc<DiskJournal>>,
}

impl PrimaryDisk {
    fn open(path: &Path) -> Result<PrimaryDisk, DiskSetupError> {
        let store = MetaStore::for_image(path);
        let meta_err = |source| DiskSetupError::Meta {
            path: path.to_path_buf(),
            source,
        };
        let (mut meta, fresh) = match store.load().map_err(meta_err)? {
            MetaState::Ok(m) => (m, false),
            other => {
                log::warn!(
                    "disk {}: replica metadata {} ; starting a new one (a standby will get a full copy)",
                    path.display(),
                    match &other {
                        MetaState::Missing => "missing".to_string(),
                        MetaState::Damaged(r) => format!("damaged ({r})"),
                        MetaState::Replaced { reason } => format!("stale ({reason})"),
                        MetaState::Ok(_) => unreachable!(),
                    }
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
            refs: HashMap::new(),
            open_ranges: Vec::new(),
            pending_ranges: BTreeMap::new(),
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

    /// Byte ranges written in unacknowledged epochs and in the open one (protected).
    pub(crate) fn unacked_ranges(&self) -> Vec<(u64, u64)> {
        let mut v = self.open_ranges.clone();
        for r in self.pending_ranges.values() {
            v.extend_from_slice(r);
        }
        v
    }

    /// Marks what an online verify found differing, durably, for the next resync.
    pub(crate) fn mark_verify_differences(&mut self, ranges: &[(u64, u64)]) {
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

    pub(crate) fn save_meta(&self) {
        if let Err(e) = self.store.save(&self.meta) {
            log::error!("disk {}: saving replica metadata: {e}", self.path.display());
        }
    }

    fn block_size(&self) -> u64 {
        u64::from(self.meta.block_size)
    }

    fn before_writes(&mut self, ranges: &[(u64, u64)]) -> io::Result<()> {
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
                self.open_ranges.extend_from_slice(ranges);
                let mut new_extents = Vec::new();
                for x in extents_of(ranges) {
                    let r = self.refs.entry(x).or_insert(0);
                    *r += 1;
                    if *r == 1 {
                        new_extents.push(x);
                    }
                }
                if new_extents.is_empty() {
                    return Ok(());
                }
                let size = self.meta.disk_size;
                let ext: Vec<(u64, u64)> = new_extents
                    .iter()
                    .map(|&x| {
                        let start = x << EXTENT_SHIFT;
                        (
                            start,
                            (1u64 << EXTENT_SHIFT).min(size.saturating_sub(start)),
                        )
                    })
                    .collect();
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

    /// A resync pass begins: forget which blocks the guest wrote during the last one
    /// (the new pass reads each of them again after the write).
    pub fn new_pass(&mut self) {
        self.touched.iter_mut().for_each(|w| *w = 0);
    }

    /// A resync began: it copies every marked block, verify differences included.
    fn forget_verify_marks(&mut self) {
        self.verify_marked.clear();
    }

    /// A resync chunk is durable on the standby: its blocks are in sync unless the
    /// guest wrote them since the resync began.
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

    fn captured(&mut self, epoch: u64, journal: Option<&Arc<DiskJournal>>) {
        if let Some(j) = journal.filter(|j| !j.is_empty()) {
            if self.mode != Mode::Degraded {
                self.retained.insert(epoch, j.clone());
            }
        }
        if self.mode == Mode::Syncing && epoch == 0 {
            // Epoch 0 carries every block written since the resync began; from here on
            // the activity log covers writes of unacknowledged epochs.
            self.mode = Mode::Protected;
            self.refs.clear();
            self.open_ranges.clear();
            self.pending_ranges.clear();
            return;
        }
        if self.mode == Mode::Protected {
            let ranges = std::mem::take(&mut self.open_ranges);
            self.pending_ranges.insert(epoch, ranges);
        }
    }

    fn acked(&mut self, through: u64) {
        if self.mode != Mode::Protected {
            return;
        }
        self.meta.last_committed_epoch = Some(through);
        if self.last_meta_save.elapsed() > Duration::from_secs(1) {
            self.save_meta();
            self.last_meta_save = Instant::now();
        }
        let first_ack = self.meta.bitmap_base_gen != 0 || self.meta.resync.is_some();
        self.retained = self.retained.split_off(&(through + 1));
        let later = self.pending_ranges.split_off(&(through + 1));
        let done = std::mem::replace(&mut self.pending_ranges, later);
        let mut idle = Vec::new();
        for x in done.values().flat_map(|r| extents_of(r)) {
            if let Some(r) = self.refs.get_mut(&x) {
                *r -= 1;
                if *r == 0 {
                    self.refs.remove(&x);
                    idle.push(x);
                }
            }
        }
        if first_ack {
            // In sync: everything but the active extents is on the standby.
            let runs: Vec<(u64, u64)> = self.bitmap.runs_from(0).collect();
            let per_extent = 1u64 << (EXTENT_SHIFT - self.meta.block_size.trailing_zeros());
            for (f, n) in runs {
                for b in f..f + n {
                    let x = b / per_extent;
                    if !self.refs.contains_key(&x) {
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
        let per_extent = 1u64 << (EXTENT_SHIFT - self.meta.block_size.trailing_zeros());
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

    fn peer_lost(&mut self) {
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
}

impl PrimaryDisk {
    /// The standby is gone but this PM lives, so it knows exactly which blocks its
    /// unacknowledged epochs (and the open one) wrote: mark those durably, then clear
    /// the rest of the active extents (a whole extent per write is only needed when
    /// this PM itself crashes).
    fn narrow_to_unacked(&mut self) {
        let mut ranges: Vec<(u64, u64)> = self.open_ranges.clone();
        for r in self.pending_ranges.values() {
            ranges.extend_from_slice(r);
        }
        if let Err(e) = self.mark(&ranges) {
            log::warn!("disk {}: keeping whole extents: {e}", self.path.display());
            return;
        }
        let bs = self.block_size();
        let mut keep = std::collections::HashSet::new();
        for &(off, len) in &ranges {
            if len > 0 {
                keep.extend(off / bs..=(off + len - 1) / bs);
            }
        }
        let per_extent = 1u64 << (EXTENT_SHIFT - self.meta.block_size.trailing_zeros());
        let extents: Vec<u64> = self.refs.keys().copied().collect();
        for x in extents {
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
        self.refs.clear();
        self.open_ranges.clear();
        self.pending_ranges.clear();
    }
}

/// What `twinrun disk status` shows of one mirrored disk of a running primary.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskStatus {
    pub path: String,
    /// "degraded" (no standby in sync: written blocks recorded), "syncing" (a resync
    /// is copying to the standby), "protected" (in sync, epochs commit on the standby).
    pub mode: String,
    /// The local replica failed: guest I/O goes to the standby.
    pub failed: bool,
    pub current_gen: u64,
    pub bitmap_base_gen: u64,
    /// Blocks marked in the persistent bitmap (still to copy to the standby).
    pub dirty_blocks: u64,
    pub blocks: u64,
    pub block_size: u32,
    /// Of the running or last resync.
    pub resync: Option<ResyncProgress>,
    /// Of the running verify: (ranges compared, ranges in total).
    pub verify_running: Option<(u64, u64)>,
    /// Of the last finished verify.
    pub verify: Option<VerifyReport>,
}

/// Every mirrored disk of the VM, shared between the driver and the VMM's write hook.
pub struct PrimaryDisks {
    disks: Vec<Mutex<PrimaryDisk>>,
    peer: PeerReads,
    /// An online verify was asked for (see [`PrimaryDisks::request_verify`]).
    pub(crate) verify_requested: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for PrimaryDisks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryDisks")
            .field("disks", &self.len())
            .finish_non_exhaustive()
    }
}

/// Reads of a failed local disk served by the standby: requests go out through the
/// driver's outbox, answers come back through its inbox pump.
#[derive(Default)]
struct PeerReads {
    tx: Mutex<Option<Sender<ToStandby>>>,
    next_id: AtomicU64,
    replies: Mutex<HashMap<u64, Option<PeerReply>>>,
    cv: Condvar,
}

/// The standby's answer to a read: success and the data.
type PeerReply = (bool, Vec<u8>);

/// How long a vCPU waits for the standby to serve a read.
const PEER_READ_TIMEOUT: Duration = Duration::from_secs(5);

impl PrimaryDisks {
    /// Opens (or starts) the metadata and bitmap of every disk of `cfg`; the VM runs
    /// degraded until a standby is in sync.
    pub fn open(cfg: &VmConfig) -> Result<Arc<PrimaryDisks>, DiskSetupError> {
        let disks = cfg
            .disks
            .iter()
            .map(|d| PrimaryDisk::open(&d.path).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(PrimaryDisks {
            disks,
            peer: PeerReads::default(),
            verify_requested: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    pub fn len(&self) -> usize {
        self.disks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.disks.is_empty()
    }

    /// Byte ranges of disk `i` not known to be on the standby while a resync session
    /// runs (set in its bitmap): epoch 0 carries them along with the blocks written
    /// since the last resync pass, so the standby's replica is whole when epoch 0
    /// commits whatever the passes left behind (the first acknowledgement then clears
    /// the bitmap). Empty outside the resync.
    pub fn unsynced_ranges(&self, i: usize) -> Vec<(u64, u64)> {
        let d = self.lock(i);
        if d.mode != Mode::Syncing {
            return Vec::new();
        }
        let bs = u64::from(d.meta.block_size);
        d.bitmap
            .runs_from(0)
            .map(|(f, n)| (f * bs, n * bs))
            .collect()
    }

    /// Disk `i`, locked (the write hook waits meanwhile: keep it short).
    pub fn lock(&self, i: usize) -> MutexGuard<'_, PrimaryDisk> {
        self.disks[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the resync as begun on every disk.
    pub fn begin_resync(&self) {
        for i in 0..self.len() {
            let mut d = self.lock(i);
            d.forget_verify_marks();
            d.mode = Mode::Syncing;
            d.touched.iter_mut().for_each(|w| *w = 0);
        }
    }

    /// Epoch `epoch` was captured (the guest is paused) with these disk writes.
    pub fn captured(&self, epoch: u64, journals: &[Arc<DiskJournal>]) {
        for i in 0..self.len() {
            let j = journals.iter().find(|j| j.disk_index == i);
            self.lock(i).captured(epoch, j);
        }
    }

    /// Each disk's replication state, resync progress and verify results.
    pub fn status(&self) -> Vec<DiskStatus> {
        (0..self.len())
            .map(|i| {
                let d = self.lock(i);
                DiskStatus {
                    path: d.path.display().to_string(),
                    mode: match d.mode {
                        Mode::Degraded => "degraded",
                        Mode::Syncing => "syncing",
                        Mode::Protected => "protected",
                    }
                    .into(),
                    failed: d.meta.failed,
                    current_gen: d.meta.current_gen,
                    bitmap_base_gen: d.meta.bitmap_base_gen,
                    dirty_blocks: d.bitmap.count(),
                    blocks: d.bitmap.blocks(),
                    block_size: d.meta.block_size,
                    resync: d.meta.resync,
                    verify_running: d.verify_progress,
                    verify: d.meta.verify,
                }
            })
            .collect()
    }

    /// Asks for an online verify of every disk (run by the primary's driver while
    /// protected). False if one is already requested or running.
    pub fn request_verify(&self) -> bool {
        !self.verify_requested.swap(true, Ordering::SeqCst)
    }

    /// Where reads of a failed disk go (None: no standby connected).
    pub fn set_peer(&self, tx: Option<Sender<ToStandby>>) {
        *self.peer.tx.lock().unwrap_or_else(|p| p.into_inner()) = tx;
        if let Ok(mut r) = self.peer.replies.lock() {
            r.clear();
        }
        self.peer.cv.notify_all();
    }

    /// The standby answered read `id`.
    pub fn read_done(&self, id: u64, ok: bool, data: &[u8]) {
        let mut r = self.peer.replies.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = r.get_mut(&id) {
            *slot = Some((ok, data.to_vec()));
            self.peer.cv.notify_all();
        }
    }

    /// Marks disk `disk`'s replica failed (once): logged and recorded in its metadata,
    /// so that it is never used again until replaced and fully resynced.
    fn note_failure(&self, disk: usize, err: &io::Error) -> Mode {
        let mut d = self.lock(disk);
        if !d.meta.failed {
            d.meta.failed = true;
            d.save_meta();
            log::error!(
                "disk {}: LOCAL DISK FAILED ({err}); guest I/O is served from the standby's \
                 replica; this replica is marked failed until it is replaced and fully resynced",
                d.path.display()
            );
        }
        d.mode
    }

    /// A fresh id for a request to the standby, registered for its answer.
    pub(crate) fn next_request_id(&self) -> u64 {
        let id = self.peer.next_id.fetch_add(1, Ordering::Relaxed);
        self.peer
            .replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, None);
        id
    }

    /// Queues `m` for the standby (false: none connected).
    pub(crate) fn send_to_peer(&self, m: ToStandby) -> bool {
        let tx = self.peer.tx.lock().unwrap_or_else(|p| p.into_inner());
        tx.as_ref().is_some_and(|tx| tx.send(m).is_ok())
    }

    /// Waits for the answer to request `id` (None: timeout or the standby went away).
    pub(crate) fn wait_reply(&self, id: u64, timeout: Duration) -> Option<PeerReply> {
        let mut r = self.peer.replies.lock().unwrap_or_else(|p| p.into_inner());
        let t0 = Instant::now();
        loop {
            match r.get(&id) {
                Some(Some(_)) => return r.remove(&id).flatten(),
                // Cleared: the standby went away.
                None => return None,
                Some(None) => {}
            }
            let left = timeout.saturating_sub(t0.elapsed());
            if left.is_zero() {
                r.remove(&id);
                return None;
            }
            r = self
                .peer
                .cv
                .wait_timeout(r, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Reads from the standby's replica, with the unacknowledged epochs' writes laid
    /// over it.
    fn peer_read(&self, disk: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let retained: Vec<Arc<DiskJournal>> = self.lock(disk).retained.values().cloned().collect();
        let len = u32::try_from(buf.len())
            .ok()
            .filter(|&l| l <= MAX_CHUNK_BYTES)
            .ok_or_else(|| io::Error::other("read too large for the standby"))?;
        let id = self.next_request_id();
        let sent = self.send_to_peer(ToStandby::Disk(DiskToStandby::Read {
            id,
            disk: disk as u16,
            offset,
            len,
        }));
        if !sent {
            self.peer
                .replies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            return Err(io::Error::other("no standby to read from"));
        }
        let reply = self.wait_reply(id, PEER_READ_TIMEOUT);
        match reply {
            Some((true, data)) if data.len() == buf.len() => {
                buf.copy_from_slice(&data);
                for j in &retained {
                    overlay_writes(buf, offset, j.writes());
                }
                Ok(())
            }
            Some(_) => Err(io::Error::other("the standby could not serve the read")),
            None => Err(io::Error::other("no answer from the standby")),
        }
    }

    /// Every epoch through `through` is committed on the standby.
    pub fn acked(&self, through: u64) {
        for i in 0..self.len() {
            self.lock(i).acked(through);
        }
    }

    /// The standby is gone: degraded from here on.
    pub fn peer_lost(&self) {
        for i in 0..self.len() {
            self.lock(i).peer_lost();
        }
    }

    /// Clean stop: flush the bitmaps, clear the unclean flag.
    pub fn clean_shutdown(&self) {
        for i in 0..self.len() {
            let mut d = self.lock(i);
            if let Err(e) = d.bitmap.flush() {
                log::warn!("disk {}: bitmap flush: {e}", d.path.display());
            }
            d.meta.unclean_primary = false;
            d.save_meta();
        }
    }
}

impl DiskHooks for PrimaryDisks {
    fn before_writes(&self, disk: usize, ranges: &[(u64, u64)]) -> io::Result<()> {
        match self.disks.get(disk) {
            Some(d) => d
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .before_writes(ranges),
            None => Ok(()),
        }
    }

    fn read_failed(
        &self,
        disk: usize,
        offset: u64,
        buf: &mut [u8],
        err: &io::Error,
    ) -> io::Result<()> {
        if disk >= self.len() || self.note_failure(disk, err) != Mode::Protected {
            // No replica in sync elsewhere: the guest sees the error.
            return Err(io::Error::new(err.kind(), err.to_string()));
        }
        self.peer_read(disk, offset, buf)
    }

    fn write_failed(
        &self,
        disk: usize,
        _offset: u64,
        _data: &[u8],
        err: &io::Error,
    ) -> io::Result<()> {
        // Protected: the write is journalled with its epoch, which the standby applies
        // (durably) before the epoch's output leaves: the standby's replica has it.
        if disk >= self.len() || self.note_failure(disk, err) != Mode::Protected {
            return Err(io::Error::new(err.kind(), err.to_string()));
        }
        Ok(())
    }

    fn flush_failed(&self, disk: usize, err: &io::Error) -> io::Result<()> {
        // Protected: every epoch is durable on the standby once acknowledged.
        if disk >= self.len() || self.note_failure(disk, err) != Mode::Protected {
            return Err(io::Error::new(err.kind(), err.to_string()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use storage_mirror::BlockSet;

    struct Img {
        dir: PathBuf,
        path: PathBuf,
    }

    impl Drop for Img {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn image(mib: u64) -> Img {
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
        let disks = PrimaryDisks {
            disks: vec![Mutex::new(d)],
            peer: PeerReads::default(),
            verify_requested: std::sync::atomic::AtomicBool::new(false),
        };
        // Degraded: no resync, nothing to ship.
        assert!(disks.unsynced_ranges(0).is_empty());
        disks.begin_resync();
        assert_eq!(
            disks.unsynced_ranges(0),
            vec![(4096, 8192), (1 << 20, 4096)]
        );
        // Epoch 0 captured: protected, the activity log takes over.
        disks.captured(0, &[]);
        assert!(disks.unsynced_ranges(0).is_empty());
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
}
