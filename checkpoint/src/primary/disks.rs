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
use std::sync::{Arc, Mutex, MutexGuard};

use storage_mirror::bitmap::DirtyBitmap;
use storage_mirror::meta::{MetaState, MetaStore, ReplicaMeta, DEFAULT_BLOCK_SIZE};
use vmm::config::VmConfig;
use vmm::devices::virtio::block::hooks::DiskHooks;

/// Activity-log extent: 4 MiB.
pub const EXTENT_SHIFT: u32 = 22;

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
    /// Protected: extents written since the last capture.
    open: Vec<u64>,
    /// Protected: extents written per captured, unacknowledged epoch.
    pending: BTreeMap<u64, Vec<u64>>,
    /// Protected: extent -> number of entries in `open` and `pending`.
    refs: HashMap<u64, u32>,
    /// Protected: the exact byte ranges behind `open` and `pending` (when the standby
    /// is lost while this PM lives, the degraded bitmap keeps exactly these blocks
    /// instead of whole extents).
    open_ranges: Vec<(u64, u64)>,
    pending_ranges: BTreeMap<u64, Vec<(u64, u64)>>,
    /// Guest bytes written (resync yields to guest I/O).
    pub guest_write_bytes: u64,
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
        // Running without a standby from here on.
        meta.new_generation().map_err(meta_err)?;
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
            open: Vec::new(),
            pending: BTreeMap::new(),
            refs: HashMap::new(),
            open_ranges: Vec::new(),
            pending_ranges: BTreeMap::new(),
            guest_write_bytes: 0,
        })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    fn save_meta(&self) {
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
                for &(off, len) in ranges {
                    if len == 0 {
                        continue;
                    }
                    for x in (off >> EXTENT_SHIFT)..=((off + len - 1) >> EXTENT_SHIFT) {
                        self.open.push(x);
                        let r = self.refs.entry(x).or_insert(0);
                        *r += 1;
                        if *r == 1 {
                            new_extents.push(x);
                        }
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

    fn captured(&mut self, epoch: u64) {
        if self.mode == Mode::Syncing && epoch == 0 {
            // Epoch 0 carries every block written since the resync began; from here on
            // the activity log covers writes of unacknowledged epochs.
            self.mode = Mode::Protected;
            self.open.clear();
            self.refs.clear();
            self.pending.clear();
            self.open_ranges.clear();
            self.pending_ranges.clear();
            return;
        }
        if self.mode == Mode::Protected {
            let open = std::mem::take(&mut self.open);
            self.pending.insert(epoch, open);
            let ranges = std::mem::take(&mut self.open_ranges);
            self.pending_ranges.insert(epoch, ranges);
        }
    }

    fn acked(&mut self, through: u64) {
        if self.mode != Mode::Protected {
            return;
        }
        let first_ack = self.meta.bitmap_base_gen != 0 || self.meta.resync.is_some();
        let later = self.pending.split_off(&(through + 1));
        let done = std::mem::replace(&mut self.pending, later);
        self.pending_ranges = self.pending_ranges.split_off(&(through + 1));
        let mut idle = Vec::new();
        for x in done.into_values().flatten() {
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
        for x in idle {
            let first = x * per_extent;
            let n = per_extent.min(self.bitmap.blocks().saturating_sub(first));
            let _ = self.bitmap.clear_blocks(first, n);
        }
    }

    fn peer_lost(&mut self) {
        if self.mode == Mode::Degraded {
            return;
        }
        if self.mode == Mode::Protected {
            self.narrow_to_unacked();
        }
        self.mode = Mode::Degraded;
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
        self.refs.clear();
        self.open.clear();
        self.pending.clear();
        self.open_ranges.clear();
        self.pending_ranges.clear();
    }
}

/// Every mirrored disk of the VM, shared between the driver and the VMM's write hook.
pub struct PrimaryDisks {
    disks: Vec<Mutex<PrimaryDisk>>,
}

impl PrimaryDisks {
    /// Opens (or starts) the metadata and bitmap of every disk of `cfg`; the VM runs
    /// degraded until a standby is in sync.
    pub fn open(cfg: &VmConfig) -> Result<Arc<PrimaryDisks>, DiskSetupError> {
        let disks = cfg
            .disks
            .iter()
            .map(|d| PrimaryDisk::open(&d.path).map(Mutex::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(PrimaryDisks { disks }))
    }

    pub fn len(&self) -> usize {
        self.disks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.disks.is_empty()
    }

    /// Disk `i`, locked (the write hook waits meanwhile: keep it short).
    pub fn lock(&self, i: usize) -> MutexGuard<'_, PrimaryDisk> {
        self.disks[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the resync as begun on every disk.
    pub fn begin_resync(&self) {
        for i in 0..self.len() {
            let mut d = self.lock(i);
            d.mode = Mode::Syncing;
            d.touched.iter_mut().for_each(|w| *w = 0);
        }
    }

    /// Epoch `epoch` was captured (the guest is paused).
    pub fn captured(&self, epoch: u64) {
        for i in 0..self.len() {
            self.lock(i).captured(epoch);
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
        _disk: usize,
        _offset: u64,
        _buf: &mut [u8],
        err: &io::Error,
    ) -> io::Result<()> {
        Err(io::Error::new(err.kind(), err.to_string()))
    }

    fn write_failed(
        &self,
        _disk: usize,
        _offset: u64,
        _data: &[u8],
        err: &io::Error,
    ) -> io::Result<()> {
        Err(io::Error::new(err.kind(), err.to_string()))
    }

    fn flush_failed(&self, _disk: usize, err: &io::Error) -> io::Result<()> {
        Err(io::Error::new(err.kind(), err.to_string()))
    }
}

/// Default block size of new metadata (re-exported for callers that size bitmaps).
pub const BLOCK_SIZE: u32 = DEFAULT_BLOCK_SIZE;
