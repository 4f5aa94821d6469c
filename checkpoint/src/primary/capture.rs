//! The primary's capture edge: turns a running VM ([`PrimaryVm`]: the real `Vmm`, or
//! the simulation's toy) into checkpoint messages.
//!
//! An epoch capture pauses the guest only for what must be consistent: the VM's epoch
//! cut (output epoch closed, dirty set harvested and re-protected, VM state, disk
//! writes: one call, see `Vmm::cut_epoch`), the [`EpochObserver`]'s bookkeeping, and
//! copying the dirty pages into staging buffers (at memory bandwidth). It resumes the
//! guest before the slow parts: encoding the state, building heads, and of course
//! sending.
//!
//! A sync round pauses only to harvest; pages are copied while the guest runs, one part
//! at a time ([`Capturer::begin_sync_round`], [`Capturer::next_sync_part`]) so that the
//! driver sends each part before copying the next: memory for a round is bounded by
//! the A-Link window, not by the guest's size, and copying overlaps sending. A page the
//! guest writes during the copy was re-protected by the harvest, so it is dirty again
//! and a later round (or the stop-and-copy of epoch 0) sends it again.
//!
//! Staging buffers come from a [`BufPool`]: they go back to it when the A-Link drops
//! the last reference (on acknowledgement), so steady checkpointing reuses memory that
//! is already mapped instead of faulting in fresh pages for every part.

use std::sync::Arc;
use std::time::{Duration, Instant};

use alink::{Buf, BufPool};
use bytes::Bytes;
use vm_memory::{Bytes as _, GuestAddress};

use super::epoch_copy::{BackgroundCopy, EpochCopy, EpochCopyError, EpochCopyStats, Pending};
use super::vm::{Cut, EpochState, PrimaryVm};
use crate::messages::{
    split_runs, ConsoleOut, DiskExtent, FrameOut, LimitError, PageRun, PartHead, PartOf,
    MAX_DISK_BYTES_PER_PART, MAX_DISK_EXTENTS_PER_PART, MAX_FRAMES_PER_EPOCH,
    MAX_FRAME_BYTES_PER_EPOCH, MAX_FRAME_LEN, MAX_PAGES_PER_EPOCH, MAX_PAGES_PER_PART, MAX_PARTS,
    MAX_SYNC_PARTS, PAGE_SIZE,
};
use crate::verify::{is_full_epoch, PageHashes, ReplicaHash};
use vmm::devices::virtio::block::DiskJournal;
use vmm::vstate::dirty::DirtySet;
use vmm::{CutKind, VmmError};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("VMM: {0}")]
    Vmm(#[from] VmmError),
    #[error("reading guest memory at {gpa:#x}: {source}")]
    Memory {
        gpa: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("encoding the VM state: {0}")]
    State(#[from] vmm::persist::StateFormatError),
    #[error("message limits: {0}")]
    Limit(#[from] LimitError),
    #[error("epoch dirtied {0} pages, more than one epoch may carry")]
    TooManyPages(u64),
    #[error("initial-sync round of {0} pages needs more parts than a round may have")]
    SyncTooLarge(u64),
    #[error("hashing guest memory (verify mode): {0}")]
    Hash(vm_memory::GuestMemoryError),
    #[error("epoch pages copied after the pause: {0}")]
    EpochCopy(#[from] EpochCopyError),
    #[error("disk journal of the epoch ({extents} writes, {bytes} bytes) exceeds one part")]
    DiskTooLarge { extents: usize, bytes: u64 },
}

/// One message ready for `Alink::send(&ToStandby::Part(head), payload)`.
pub struct OutPart {
    pub head: PartHead,
    pub payload: Vec<Bytes>,
}

/// What a capture or a sync round produced.
pub struct Captured {
    pub parts: Vec<OutPart>,
    pub pages: u64,
    /// How long the guest was paused (zero for sync rounds' copy). In verify mode
    /// this excludes the full rehash of every `FULL_EVERY`th epoch, which keeps the
    /// guest paused longer.
    pub pause: Duration,
    /// Replica-equality hashes taken while paused (verify mode, epochs only).
    pub hash: Option<ReplicaHash>,
    /// Of `pages`, how many the hot-page policy left writable (epochs only).
    pub hot_pages: usize,
}

/// Told of each epoch while the guest is paused (mirrored disks: their activity log
/// attributes writes to epochs, and a resync's unconfirmed blocks go into epoch 0).
pub trait EpochObserver: Send + Sync {
    /// Byte ranges per disk (config order) that epoch 0 reads back from the images
    /// besides the blocks written since the VM's written-block maps were last reset.
    fn read_back(&self) -> Vec<Vec<(u64, u64)>>;
    /// Epoch `epoch` was cut with these writes (one journal per disk).
    fn captured(&self, epoch: u64, journals: &[Arc<DiskJournal>]);
}

/// Keeps the dirty set between captures (no allocation per epoch).
pub struct Capturer {
    dirty: DirtySet,
    max_part_pages: u32,
    /// Test mode: per-page CRCs of guest memory (see [`crate::verify`]).
    verify: Option<PageHashes>,
    observer: Option<Arc<dyn EpochObserver>>,
    /// Hot pages of the last epoch harvest.
    hot_pages: usize,
    /// Staging buffers of page payloads.
    pool: BufPool,
    /// Parts of at least this many pages are copied by two threads.
    split_min: u64,
    /// Parts copied that way so far.
    split_copies: u64,
    /// Never-touched guest pages (sync rounds skip them unread); None if
    /// `/proc/self/pagemap` cannot be read.
    untouched: Option<vmm::vstate::memory::UntouchedPages>,
    /// Epoch pages copied after the pause, write-protected meanwhile
    /// ([`EpochCopy::WriteProtect`]); None: copied in the pause.
    background: Option<BackgroundCopy>,
    /// Pages whose last (lent) sync copy went lost: the next sync round or epoch
    /// capture sends them again.
    owed: Vec<PageRun>,
}

/// An epoch's pages: copied in the pause, or protected and copied after it.
enum EpochPages {
    Copied(Vec<PartPages>),
    Deferred(Pending),
}

/// An initial-sync part to send lent: its head and the runs of its page data, sent
/// straight from guest memory ([`lent_slices`]).
pub struct LentPart {
    pub head: PartHead,
    pub data: Vec<PageRun>,
}

/// The parts of a sync round for lent sends ([`Capturer::lent_scan`]): each part's pages
/// looked at in guest memory (never-touched and all-zero pages become zero runs, the
/// others data runs), nothing copied. An iterator that may run on another thread
/// while the previous parts are being sent.
pub struct LentScan<'a> {
    mem: &'a vmm::vstate::memory::GuestMemoryMmap,
    untouched: Option<&'a vmm::vstate::memory::UntouchedPages>,
    round: SyncRound,
}

impl Iterator for LentScan<'_> {
    type Item = Result<LentPart, CaptureError>;

    fn next(&mut self) -> Option<Self::Item> {
        let group = self.round.groups.next()?;
        let k = self.round.next;
        self.round.next += 1;
        Some((|| {
            let (data, zero) = scan_sync_pages(self.mem, self.untouched, &group)?;
            let slices = lent_slices(self.mem, &data)?;
            let head = PartHead::new(
                PartOf::Sync {
                    round: self.round.round,
                },
                k,
                self.round.parts,
                0,
                data.clone(),
                Vec::new(),
                None,
                Vec::new(),
                None,
                &slices,
            )?
            .with_zero_runs(zero)?;
            Ok(LentPart { head, data })
        })())
    }
}

/// The guest memory of `runs` as slices, one per run (what a lent send writes from).
/// The guest may write them meanwhile: a lent send is volatile (`SegOpts::volatile`).
pub fn lent_slices<'m>(
    mem: &'m vmm::vstate::memory::GuestMemoryMmap,
    runs: &[PageRun],
) -> Result<Vec<&'m [u8]>, CaptureError> {
    runs.iter()
        .map(|r| guest_bytes(mem, r.gpa, r.pages as usize * PAGE_SIZE))
        .collect()
}

/// `len` bytes of guest memory at `gpa`, which must lie in one region.
fn guest_bytes(
    mem: &vmm::vstate::memory::GuestMemoryMmap,
    gpa: u64,
    len: usize,
) -> Result<&[u8], CaptureError> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let outside = || CaptureError::Memory {
        gpa,
        source: vm_memory::GuestMemoryError::InvalidGuestAddress(GuestAddress(gpa)),
    };
    let region = mem.find_region(GuestAddress(gpa)).ok_or_else(outside)?;
    let off = gpa - region.start_addr().0;
    if off
        .checked_add(len as u64)
        .is_none_or(|end| end > region.len())
    {
        return Err(outside());
    }
    let host = region
        .get_host_address(vm_memory::MemoryRegionAddress(off))
        .map_err(|_| outside())?;
    // SAFETY: `[host, host + len)` lies inside the region's mapping (checked above),
    // which lives as long as `mem` is borrowed. The guest may write it meanwhile: the
    // bytes are only read to be sent (a lent send CRCs them twice and marks what
    // changed torn) or tested for zero (a page that changes is dirty again and sent
    // again), never trusted.
    Ok(unsafe { std::slice::from_raw_parts(host as *const u8, len) })
}

/// The data and zero runs of `group`, looked at in guest memory: a chunk the guest
/// never touched is zero without reading it; other pages are tested.
fn scan_sync_pages(
    mem: &vmm::vstate::memory::GuestMemoryMmap,
    untouched: Option<&vmm::vstate::memory::UntouchedPages>,
    group: &[PageRun],
) -> Result<(Vec<PageRun>, Vec<PageRun>), CaptureError> {
    let (mut data, mut zero) = (Vec::new(), Vec::new());
    let mut never = [false; ZERO_CHECK_CHUNK_PAGES as usize];
    for r in group {
        let mut first = 0u64;
        while first < u64::from(r.pages) {
            let n = (u64::from(r.pages) - first).min(ZERO_CHECK_CHUNK_PAGES);
            let gpa0 = r.gpa + first * PAGE_SIZE as u64;
            if let Some(u) = untouched {
                let never = &mut never[..n as usize];
                u.scan(mem, gpa0, never);
                if never.iter().all(|&b| b) {
                    push_pages(&mut zero, gpa0, n as u32);
                    first += n;
                    continue;
                }
            }
            let chunk = guest_bytes(mem, gpa0, n as usize * PAGE_SIZE)?;
            for (i, page) in chunk.chunks_exact(PAGE_SIZE).enumerate() {
                let gpa = gpa0 + (i * PAGE_SIZE) as u64;
                if is_zero_page(page) {
                    push_page(&mut zero, gpa);
                } else {
                    push_page(&mut data, gpa);
                }
            }
            first += n;
        }
    }
    Ok((data, zero))
}

/// An initial-sync round being copied and sent part by part.
pub struct SyncRound {
    round: u32,
    groups: std::vec::IntoIter<Vec<PageRun>>,
    next: u32,
    parts: u32,
    pages: u64,
}

impl SyncRound {
    /// Pages the round sends.
    pub fn pages(&self) -> u64 {
        self.pages
    }
    /// Parts the round is split into.
    pub fn parts(&self) -> u32 {
        self.parts
    }
}

impl Capturer {
    /// For `vm`'s memory (round 0 of the initial sync sends all of it).
    pub fn new(vm: &impl PrimaryVm) -> Result<Capturer, CaptureError> {
        Ok(Capturer {
            dirty: DirtySet::new(vm.guest_memory()),
            max_part_pages: MAX_PAGES_PER_PART,
            verify: None,
            observer: None,
            hot_pages: 0,
            pool: BufPool::default(),
            split_min: SPLIT_COPY_MIN_PAGES,
            split_copies: 0,
            untouched: vmm::vstate::memory::UntouchedPages::open()
                .map_err(|e| log::debug!("no /proc/self/pagemap ({e}): zero pages are read"))
                .ok(),
            background: None,
            owed: Vec::new(),
        })
    }

    /// Where epoch pages are copied: in the pause (the default), or after it with the
    /// pages write-protected until copied (see [`super::epoch_copy`]). Fails if the
    /// kernel's userfaultfd cannot write-protect `vm`'s memory.
    pub fn set_epoch_copy(
        &mut self,
        vm: &impl PrimaryVm,
        mode: EpochCopy,
    ) -> Result<(), CaptureError> {
        self.background = match mode {
            EpochCopy::InPause => None,
            EpochCopy::WriteProtect => Some(BackgroundCopy::new(vm.guest_memory())?),
        };
        Ok(())
    }

    /// The mode set by [`Capturer::set_epoch_copy`].
    pub fn epoch_copy(&self) -> EpochCopy {
        if self.background.is_some() {
            EpochCopy::WriteProtect
        } else {
            EpochCopy::InPause
        }
    }

    /// Counters of the copies made after the pause (zero in the default mode).
    pub fn epoch_copy_stats(&self) -> EpochCopyStats {
        self.background
            .as_ref()
            .map(BackgroundCopy::stats)
            .unwrap_or_default()
    }

    /// Pages whose last sync copy went lost (a lent part sent void): the next sync
    /// round or epoch capture sends them again.
    pub fn owe(&mut self, runs: &[PageRun]) {
        self.owed.extend_from_slice(runs);
    }

    /// Marks the owed pages in the dirty set, forgetting them.
    fn mark_owed(&mut self) {
        for r in std::mem::take(&mut self.owed) {
            self.dirty
                .mark(GuestAddress(r.gpa), u64::from(r.pages) * PAGE_SIZE as u64);
        }
    }

    /// The parts of round `r` for lent sends (see [`LentScan`]), instead of
    /// [`Capturer::next_sync_part`]'s copies.
    pub fn lent_scan<'a>(&'a self, vmm: &'a impl PrimaryVm, r: SyncRound) -> LentScan<'a> {
        LentScan {
            mem: vmm.guest_memory(),
            untouched: self.untouched.as_ref(),
            round: r,
        }
    }

    /// Parts of at least `n` pages (at least 2) are copied half on vCPU 0's parked
    /// thread (tests lower it from [`SPLIT_COPY_MIN_PAGES`]).
    pub fn set_split_copy_min_pages(&mut self, n: u64) {
        self.split_min = n.max(2);
    }

    /// Parts whose copy was split between two threads so far.
    pub fn split_copies(&self) -> u64 {
        self.split_copies
    }

    /// How the staging-buffer pool has done.
    pub fn pool_stats(&self) -> alink::PoolStats {
        self.pool.stats()
    }

    /// Who is told of each epoch while paused (mirrored disks).
    pub fn set_observer(&mut self, o: Option<Arc<dyn EpochObserver>>) {
        self.observer = o;
    }

    /// Pages per part (tests use small parts to exercise splitting).
    pub fn set_max_part_pages(&mut self, n: u32) {
        self.max_part_pages = n.clamp(1, MAX_PAGES_PER_PART);
    }

    /// Test mode: hash all guest memory and the VM state's canonical parts while paused
    /// at each epoch capture ([`Captured::hash`]).
    pub fn set_verify(&mut self, vm: &impl PrimaryVm, on: bool) {
        self.verify = on.then(|| PageHashes::new(&vmm::persist::memory::layout(vm.guest_memory())));
    }

    /// Initial-sync round `round`, all parts at once (tests; the driver streams them
    /// with [`Capturer::begin_sync_round`] and [`Capturer::next_sync_part`]).
    pub fn sync_round(
        &mut self,
        vmm: &impl PrimaryVm,
        round: u32,
    ) -> Result<Captured, CaptureError> {
        let mut r = self.begin_sync_round(vmm, round)?;
        let mut parts = Vec::with_capacity(r.parts as usize);
        while let Some(p) = self.next_sync_part(vmm, &mut r) {
            parts.push(p?);
        }
        Ok(Captured {
            parts,
            pages: r.pages,
            pause: Duration::ZERO,
            hash: None,
            hot_pages: 0,
        })
    }

    /// Starts initial-sync round `round`: round 0 starts dirty tracking and covers all
    /// of memory; later rounds cover what was dirtied since the previous harvest. Pauses
    /// only for the harvest; the parts are copied by [`Capturer::next_sync_part`] while
    /// the guest runs.
    pub fn begin_sync_round(
        &mut self,
        vmm: &impl PrimaryVm,
        round: u32,
    ) -> Result<SyncRound, CaptureError> {
        vmm.pause()?;
        let r = if round == 0 {
            self.owed.clear();
            vmm.start_dirty_tracking()
                .map(|()| DirtySet::full(vmm.guest_memory()))
        } else {
            self.dirty.clear();
            vmm.harvest_dirty_into(&mut self.dirty).map(|_| {
                self.mark_owed();
                self.dirty.clone()
            })
        };
        vmm.resume()?;
        let set = r?;
        let runs = runs_of(&set);
        let pages: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
        let groups: Vec<Vec<PageRun>> = split_runs(runs, self.max_part_pages.min(SYNC_PART_PAGES));
        let parts = u32::try_from(groups.len())
            .ok()
            .filter(|&n| n <= MAX_SYNC_PARTS)
            .ok_or(CaptureError::SyncTooLarge(pages))?;
        Ok(SyncRound {
            round,
            groups: groups.into_iter(),
            next: 0,
            parts,
            pages,
        })
    }

    /// Copies the next part of `r` (None when the round is done).
    pub fn next_sync_part(
        &mut self,
        vmm: &impl PrimaryVm,
        r: &mut SyncRound,
    ) -> Option<Result<OutPart, CaptureError>> {
        let group = r.groups.next()?;
        let k = r.next;
        r.next += 1;
        Some((|| {
            let (runs, zero, data) = self.copy_sync_pages(vmm, &group)?;
            let payload = vec![data.into_bytes()];
            let head = PartHead::new(
                PartOf::Sync { round: r.round },
                k,
                r.parts,
                0,
                runs,
                Vec::new(),
                None,
                Vec::new(),
                None,
                &payload,
            )?
            .with_zero_runs(zero)?;
            Ok(OutPart { head, payload })
        })())
    }

    /// Captures epoch `epoch`. Pauses the guest unless `already_paused` (a throttle);
    /// resumes it unless `stay_paused` (tests compare memory at this point). Epoch 0
    /// turns on output commit and the disk journal.
    pub fn capture_epoch<V: PrimaryVm>(
        &mut self,
        vmm: &V,
        epoch: u64,
        sync_rounds: u32,
        released_through: Option<u64>,
        already_paused: bool,
        stay_paused: bool,
    ) -> Result<Captured, CaptureError> {
        let t0 = Instant::now();
        if !already_paused {
            vmm.pause()?;
        }
        // Pages copied after the pause only if the guest runs after it.
        let r = self.capture_paused(vmm, epoch, !stay_paused);
        let pause = t0.elapsed();
        // Verify mode, full epoch: all of memory as it is at this capture (still paused).
        let full = is_full_epoch(epoch);
        let rebuilt = match (&mut self.verify, &r) {
            (Some(t), Ok(_)) if full => t.rebuild_from_guest(vmm.guest_memory()),
            _ => Ok(()),
        };
        let resumed = if stay_paused { Ok(()) } else { vmm.resume() };
        // Pages protected in the pause are copied (and released) whatever else failed.
        let r = r.and_then(|(runs, pages, cut, journals)| {
            let page_data = match pages {
                EpochPages::Copied(v) => v,
                EpochPages::Deferred(p) => p.finish()?,
            };
            Ok((runs, page_data, cut, journals))
        });
        resumed?;
        rebuilt.map_err(CaptureError::Hash)?;
        let (runs, page_data, cut, journals) = r?;
        let Cut {
            state,
            console,
            frames,
            ..
        } = cut;
        // Verify mode, other epochs: the dirty pages from the bytes copied while paused.
        let hash = self.verify.as_mut().map(|t| {
            if !full {
                for (runs, chunks) in &page_data {
                    t.update_runs(runs, chunks);
                }
            }
            ReplicaHash {
                memory: t.digest(),
                state: state.hash(),
            }
        });
        // Off the pause: encode state, disk extents, checksums.
        let state = state.to_bytes()?;
        // Disk writes in groups that fit a part each (an extent longer than a piece is
        // cut: epoch 0 reads back whole runs of written blocks), in order.
        let mut groups: Vec<(Vec<DiskExtent>, Vec<u8>)> = vec![(Vec::new(), Vec::new())];
        for j in &journals {
            for (offset, data) in j.writes() {
                for (k, piece) in data.chunks(DISK_PIECE_BYTES).enumerate() {
                    let full = groups.last().is_some_and(|(e, d)| {
                        e.len() == MAX_DISK_EXTENTS_PER_PART
                            || d.len() as u64 + piece.len() as u64 > MAX_DISK_BYTES_PER_PART
                    });
                    if full {
                        groups.push((Vec::new(), Vec::new()));
                    }
                    if let Some((e, d)) = groups.last_mut() {
                        e.push(DiskExtent {
                            device: j.disk_index as u16,
                            offset: offset + (k * DISK_PIECE_BYTES) as u64,
                            len: piece.len() as u32,
                        });
                        d.extend_from_slice(piece);
                    }
                }
            }
        }
        if groups.len() as u64 > u64::from(MAX_PARTS) / 2 {
            let bytes = groups.iter().map(|(_, d)| d.len() as u64).sum();
            let extents = groups.iter().map(|(e, _)| e.len()).sum();
            return Err(CaptureError::DiskTooLarge { extents, bytes });
        }
        // The last group rides with the first page part; the others get parts of their
        // own, before it (the standby applies an epoch's parts in order). So an epoch's
        // disk writes reach the standby before its state: a standby that applied disk
        // writes before their epoch commits (a bug) would show it whenever an epoch is
        // cut short, which the simulation does.
        let (last_disk, last_data) = groups.pop().unwrap_or_default();
        let pages = runs.iter().map(|r| u64::from(r.pages)).sum();
        let n = (groups.len() + page_data.len()) as u32;
        let mut out = Vec::with_capacity(n as usize);
        for (k, (ext, ddata)) in groups.into_iter().enumerate() {
            let payload = vec![Bytes::new(), Bytes::from(ddata), Bytes::new(), Bytes::new()];
            let head = PartHead::new(
                PartOf::Epoch { epoch, sync_rounds },
                k as u32,
                n,
                0,
                Vec::new(),
                ext,
                None,
                Vec::new(),
                released_through,
                &payload,
            )?;
            out.push(OutPart { head, payload });
        }
        let first_page_part = out.len() as u32;
        let mut disk_once = Some((last_disk, last_data));
        let console_out = console.as_ref().map(|c| ConsoleOut {
            pos: c.pos,
            len: c.data.len() as u32,
        });
        // The output section: console bytes then the frames, one chunk.
        let mut output = console.map(|c| c.data).unwrap_or_default();
        let frames_out = ship_frames(frames, &mut output);
        let mut output_once = Some((output, frames_out));
        for (k, (runs, chunks)) in page_data.into_iter().enumerate() {
            let part = first_page_part + k as u32;
            let last = part + 1 == n;
            // The disk writes ride with the first page part, the state and the output
            // with the last.
            let (ext, ddata) = if k == 0 {
                disk_once.take().unwrap_or_default()
            } else {
                (Vec::new(), Vec::new())
            };
            let (st, con, cout, fout) = if last {
                let (con, fout) = output_once.take().unwrap_or_default();
                (state.clone(), con, console_out, fout)
            } else {
                (Vec::new(), Vec::new(), None, Vec::new())
            };
            let mut payload = vec![Bytes::from(st), Bytes::from(ddata), Bytes::from(con)];
            payload.extend(chunks.into_iter().map(Buf::into_bytes));
            let head = PartHead::new(
                PartOf::Epoch { epoch, sync_rounds },
                part,
                n,
                payload[0].len() as u32,
                runs,
                ext,
                cout,
                fout,
                released_through,
                &payload,
            )?;
            out.push(OutPart { head, payload });
        }
        Ok(Captured {
            parts: out,
            pages,
            pause,
            hash,
            hot_pages: self.hot_pages,
        })
    }

    /// The paused part of an epoch capture: the VM's cut, the observer, the page copy
    /// (or, with `may_defer` and a background copier, the pages' write protection).
    #[allow(clippy::type_complexity)]
    fn capture_paused<V: PrimaryVm>(
        &mut self,
        vmm: &V,
        epoch: u64,
        may_defer: bool,
    ) -> Result<
        (
            Vec<PageRun>,
            EpochPages,
            Cut<V::State>,
            Vec<Arc<DiskJournal>>,
        ),
        CaptureError,
    > {
        // Epoch 0 turns output commit and the disk journals on; its disk writes are
        // the blocks written since the written-block maps were last reset (at VM start,
        // or when a resync began) plus what the observer names, read back by the VM
        // from its images (the standby's images must equal the primary's as they were
        // then).
        let read_back = match (epoch, &self.observer) {
            (0, Some(o)) => o.read_back(),
            _ => Vec::new(),
        };
        let kind = if epoch == 0 {
            CutKind::First {
                read_back: &read_back,
            }
        } else {
            CutKind::Next
        };
        let mut cut = vmm.cut_epoch(epoch, &mut self.dirty, kind)?;
        self.mark_owed();
        self.hot_pages = cut.harvest.hot_pages;
        let journals: Vec<Arc<DiskJournal>> = std::mem::take(&mut cut.journals)
            .into_iter()
            .map(Arc::new)
            .collect();
        if let Some(o) = &self.observer {
            o.captured(epoch, &journals);
        }
        let runs = runs_of(&self.dirty);
        if let (true, Some(b)) = (may_defer, &self.background) {
            let total: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
            if total > MAX_PAGES_PER_EPOCH {
                return Err(CaptureError::TooManyPages(total));
            }
            match b.begin(&self.pool, &runs, self.max_part_pages) {
                Ok(p) => return Ok((runs, EpochPages::Deferred(p), cut, journals)),
                // Nothing stays protected: copy here, as without the mode.
                Err(e) => log::warn!("capture: epoch {epoch}: pages copied in the pause: {e}"),
            }
        }
        let (parts, _) = self.page_parts(vmm, &runs)?;
        Ok((runs, EpochPages::Copied(parts), cut, journals))
    }

    /// Copies the pages of `runs` into staging buffers, per part (the guest is
    /// paused). A part of at least [`SPLIT_COPY_MIN_PAGES`] pages is copied half here,
    /// half on vCPU 0's parked thread, into two buffers: on two CPUs the copy, most of
    /// a large epoch's pause, takes about half as long.
    fn page_parts(
        &mut self,
        vmm: &impl PrimaryVm,
        runs: &[PageRun],
    ) -> Result<(Vec<PartPages>, u64), CaptureError> {
        let total: u64 = runs.iter().map(|r| u64::from(r.pages)).sum();
        if total > MAX_PAGES_PER_EPOCH {
            return Err(CaptureError::TooManyPages(total));
        }
        let mut out = Vec::new();
        for group in split_runs(runs.iter().copied(), self.max_part_pages) {
            let pages: u64 = group.iter().map(|r| u64::from(r.pages)).sum();
            if pages < self.split_min {
                let buf = self.copy_pages(vmm, &group)?;
                out.push((group, vec![buf]));
                continue;
            }
            let (mine, theirs) = split_at_pages(&group, pages / 2);
            let n: usize = theirs.iter().map(|r| r.pages as usize).sum();
            let mut buf = self.pool.take(n * PAGE_SIZE);
            let mem = vmm.guest_memory().clone();
            let job = vmm.run_parked(move || copy_runs(&mem, &theirs, &mut buf).map(|()| buf))?;
            // This thread's half meanwhile; the job is always waited for (it writes
            // into a buffer the part owns).
            let here = self.copy_pages(vmm, &mine);
            let there = job.wait(vmm::vmm_handle::PAUSE_LIMIT)?;
            out.push((group, vec![here?, there?]));
            self.split_copies += 1;
        }
        Ok((out, total))
    }

    /// The pages of `group` in one staging buffer, in run order, leaving out the pages
    /// that are all zero: returns the runs of the pages copied, the runs of the zero
    /// pages, and the buffer. Runs are copied in chunks (memory speed), and each chunk's
    /// zero pages are squeezed out of the buffer while it is still in cache.
    fn copy_sync_pages(
        &self,
        vmm: &impl PrimaryVm,
        group: &[PageRun],
    ) -> Result<(Vec<PageRun>, Vec<PageRun>, Buf), CaptureError> {
        let mem = vmm.guest_memory();
        let n: usize = group.iter().map(|r| r.pages as usize).sum();
        let mut buf = self.pool.take(n * PAGE_SIZE);
        let (mut data, mut zero) = (Vec::new(), Vec::new());
        let mut at = 0;
        let mut never = [false; ZERO_CHECK_CHUNK_PAGES as usize];
        for r in group {
            // In chunks that stay in cache between the copy and the zero check.
            let mut first = 0u64;
            while first < u64::from(r.pages) {
                let n = (u64::from(r.pages) - first).min(ZERO_CHECK_CHUNK_PAGES);
                let gpa0 = r.gpa + first * PAGE_SIZE as u64;
                let len = n as usize * PAGE_SIZE;
                // A chunk the guest never touched is zero: not even read (an idle
                // guest's free memory, most of a large guest's round 0).
                if let Some(u) = &self.untouched {
                    let never = &mut never[..n as usize];
                    u.scan(mem, gpa0, never);
                    if never.iter().all(|&b| b) {
                        push_pages(&mut zero, gpa0, n as u32);
                        first += n;
                        continue;
                    }
                }
                mem.read_slice(&mut buf[at..at + len], GuestAddress(gpa0))
                    .map_err(|source| CaptureError::Memory { gpa: gpa0, source })?;
                let mut kept = at;
                for i in 0..n as usize {
                    let src = at + i * PAGE_SIZE;
                    let gpa = gpa0 + (i * PAGE_SIZE) as u64;
                    if is_zero_page(&buf[src..src + PAGE_SIZE]) {
                        push_page(&mut zero, gpa);
                    } else {
                        if kept != src {
                            buf.copy_within(src..src + PAGE_SIZE, kept);
                        }
                        kept += PAGE_SIZE;
                        push_page(&mut data, gpa);
                    }
                }
                at = kept;
                first += n;
            }
        }
        buf.truncate(at);
        Ok((data, zero, buf))
    }

    /// The pages of `group` in one staging buffer, in run order.
    fn copy_pages(&self, vmm: &impl PrimaryVm, group: &[PageRun]) -> Result<Buf, CaptureError> {
        let n: usize = group.iter().map(|r| r.pages as usize).sum();
        let mut buf = self.pool.take(n * PAGE_SIZE);
        copy_runs(vmm.guest_memory(), group, &mut buf)?;
        Ok(buf)
    }
}

/// Appends the epoch's frames to `payload` and describes them, within the message
/// limits: best effort (see [`FrameOut`]), frames past a limit (or that no head can
/// describe) are left out and logged, they are then lost by the network as far as a
/// failover is concerned.
fn ship_frames(frames: Vec<(usize, Vec<u8>)>, payload: &mut Vec<u8>) -> Vec<FrameOut> {
    let mut out = Vec::new();
    let mut bytes = 0u64;
    let mut left_out = 0usize;
    for (net, f) in frames {
        let fits = out.len() < MAX_FRAMES_PER_EPOCH
            && !f.is_empty()
            && f.len() as u64 <= u64::from(MAX_FRAME_LEN)
            && bytes + f.len() as u64 <= u64::from(MAX_FRAME_BYTES_PER_EPOCH);
        let Ok(net) = u16::try_from(net) else {
            left_out += 1;
            continue;
        };
        if !fits {
            left_out += 1;
            continue;
        }
        bytes += f.len() as u64;
        out.push(FrameOut {
            net,
            len: f.len() as u32,
        });
        payload.extend_from_slice(&f);
    }
    if left_out > 0 {
        log::debug!("capture: {left_out} frames of the epoch not shipped (limits)");
    }
    out
}

/// One part's pages: its runs, and the staging buffers holding their bytes back to
/// back in run order (two when the copy was split, see `page_parts`).
pub(super) type PartPages = (Vec<PageRun>, Vec<Buf>);

/// Parts with fewer pages are copied by one thread (handing half to a parked vCPU's
/// thread costs tens of microseconds; copying 2 MiB takes a few hundred).
pub const SPLIT_COPY_MIN_PAGES: u64 = 512;

/// Copies the pages of `runs` from `mem` into `buf`, in run order (`buf` is exactly
/// their size).
fn copy_runs(
    mem: &vmm::vstate::memory::GuestMemoryMmap,
    runs: &[PageRun],
    buf: &mut [u8],
) -> Result<(), CaptureError> {
    let mut at = 0;
    for r in runs {
        let len = r.pages as usize * PAGE_SIZE;
        mem.read_slice(&mut buf[at..at + len], GuestAddress(r.gpa))
            .map_err(|source| CaptureError::Memory { gpa: r.gpa, source })?;
        at += len;
    }
    debug_assert_eq!(at, buf.len());
    Ok(())
}

/// `runs` cut after their first `n` pages (a run may be cut in two).
fn split_at_pages(runs: &[PageRun], n: u64) -> (Vec<PageRun>, Vec<PageRun>) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let mut left = n;
    for r in runs {
        let p = u64::from(r.pages);
        if left >= p {
            a.push(*r);
            left -= p;
        } else if left > 0 {
            a.push(PageRun {
                gpa: r.gpa,
                pages: left as u32,
            });
            b.push(PageRun {
                gpa: r.gpa + left * PAGE_SIZE as u64,
                pages: (p - left) as u32,
            });
            left = 0;
        } else {
            b.push(*r);
        }
    }
    (a, b)
}

/// Pages copied at a time before their zero check (256 KiB: stays in L2).
const ZERO_CHECK_CHUNK_PAGES: u64 = 64;

/// True if the 4 KiB page is all zero. No early exit: OR-ing the whole page vectorizes,
/// and the page was just copied, so it is in cache.
fn is_zero_page(page: &[u8]) -> bool {
    page.iter().fold(0u8, |acc, &b| acc | b) == 0
}

/// Appends the page at `gpa` to `runs`, extending the last run when contiguous.
fn push_page(runs: &mut Vec<PageRun>, gpa: u64) {
    push_pages(runs, gpa, 1);
}

/// Appends `pages` pages from `gpa` to `runs`, extending the last run when contiguous.
fn push_pages(runs: &mut Vec<PageRun>, gpa: u64, pages: u32) {
    if let Some(last) = runs.last_mut() {
        if last.gpa + u64::from(last.pages) * PAGE_SIZE as u64 == gpa {
            last.pages += pages;
            return;
        }
    }
    runs.push(PageRun { gpa, pages });
}

fn runs_of(set: &DirtySet) -> Vec<PageRun> {
    let mut out = Vec::new();
    for (start, bytes) in set.runs() {
        // A run may exceed u32 pages only for > 16 TiB regions; split defensively.
        let mut gpa = start.0;
        let mut pages = bytes / PAGE_SIZE as u64;
        while pages > 0 {
            let n = pages.min(u64::from(u32::MAX)) as u32;
            out.push(PageRun { gpa, pages: n });
            gpa += u64::from(n) * PAGE_SIZE as u64;
            pages -= u64::from(n);
        }
    }
    out
}

/// Pages in one initial-sync part (4 MiB). Smaller than an epoch's largest part so
/// that buffers cycle: the standby drops each sync part as soon as it is written into
/// the mirror and the primary gets its staging buffers back at each acknowledgement,
/// and both pools then hand out memory that is already mapped. Measured (1 GiB guest,
/// loopback): 4,096 pages per part 836 MB/s, 1,024 939 MB/s, 256 926 MB/s; 64 MiB
/// guest: 505, 675, 675 MB/s.
pub const SYNC_PART_PAGES: u32 = 1024;

/// Longest piece of a disk write in a part.
const DISK_PIECE_BYTES: usize = 4 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    fn run(gpa: u64, pages: u32) -> PageRun {
        PageRun { gpa, pages }
    }

    #[test]
    fn split_at_pages_cuts_a_run_where_needed() {
        let runs = [run(0, 3), run(0x10000, 4), run(0x20000, 1)];
        let (a, b) = split_at_pages(&runs, 5);
        assert_eq!(a, [run(0, 3), run(0x10000, 2)]);
        assert_eq!(b, [run(0x12000, 2), run(0x20000, 1)]);
        let (a, b) = split_at_pages(&runs, 3);
        assert_eq!((a.len(), b.len()), (1, 2));
        let (a, b) = split_at_pages(&runs, 0);
        assert!(a.is_empty());
        assert_eq!(b, runs);
        let (a, b) = split_at_pages(&runs, 8);
        assert_eq!(a, runs);
        assert!(b.is_empty());
    }
}
