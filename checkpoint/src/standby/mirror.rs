//! The standby's copy of the protected VM: guest RAM laid out like the primary's
//! `GuestMemoryMmap` regions, the committed VM state, the disk images, and a staging
//! area for epochs still arriving.
//!
//! Staging keeps each received part as the driver decoded it: its checked head beside
//! the message body as it came off the A-Link (the receive buffer *is* the staging
//! buffer: no copy, and no second decode). [`Mirror::apply`] checks every staged part
//! of the epoch against the mirror (addresses inside guest RAM, known disks, one VM
//! state) before it writes anything, so a bad epoch is refused whole; then it writes the
//! pages, the disk writes (through a [`DiskCommit`], or directly followed by
//! `fdatasync`), and replaces the state. The protocol never fails over in the middle of
//! an apply (the standby state machine waits for `Applied`), so from the protocol's
//! view the apply is atomic.
//!
//! The RAM copy is a `GuestMemoryMmap` laid out like the primary's (anonymous mappings
//! the kernel fills lazily, so untouched guest pages cost nothing). At failover it is
//! handed to the new VM as its RAM ([`Mirror::take_memory`]): nothing is copied, so the
//! failover time does not grow with the guest's size (copying 1 GiB into fresh memory
//! took 3.2 s here).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::messages::{
    decode_head_of_sync_part, decode_standbound, DecodeError, PartData, PartOf, PartView,
    ReceivedPart, Standbound, PAGE_SIZE,
};
use crate::verify::PageHashes;
use vmm::vstate::memory::GuestMemoryMmap;

/// Guest memory regions at most (the x86 layout has two: below and above the PCI gap).
pub const MAX_REGIONS: usize = 16;
/// Bytes staged over all epochs, at most (the primary's in-flight limit bounds it in
/// practice; this is the standby's own guard).
pub const MAX_STAGED_BYTES: usize = 1 << 30;
/// Net frame bytes kept for re-sending on failover, over all committed epochs not yet
/// released by the primary. Past it the oldest epochs' frames are forgotten: they are
/// the likeliest to have been released already, and a frame not re-sent is only a
/// frame the network lost (see [`crate::messages::FrameOut`]).
pub const MAX_KEPT_FRAME_BYTES: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error(
        "guest memory layout {0:x?} is invalid (empty, overlapping, unaligned or too many regions)"
    )]
    Layout(Vec<(u64, u64)>),
    #[error("staged message of epoch {epoch} does not decode: {source}")]
    Decode { epoch: u64, source: DecodeError },
    #[error("a staged message of epoch {0} is not a part of that epoch")]
    NotEpochPart(u64),
    #[error("page at {0:#x} is outside guest RAM")]
    PageOutside(u64),
    #[error("disk {device} does not exist ({disks} disks)")]
    NoDisk { device: u16, disks: usize },
    #[error("epoch {epoch}: {count} parts carry a VM state (exactly one must)")]
    StateCount { epoch: u64, count: usize },
    #[error("epoch {0} is not staged")]
    NotStaged(u64),
    #[error("staging would exceed {MAX_STAGED_BYTES} bytes")]
    StagingFull,
    #[error("committing the epoch's disk writes: {0}")]
    Journal(String),
    #[error("writing disk {device}: {source}")]
    Disk { device: u16, source: io::Error },
    #[error("allocating the mirror's guest memory: {0}")]
    Memory(String),
    /// The first epoch would commit while pages of the initial sync are still owed: a
    /// placed part's torn pages or a lost part's pages that neither a later sync round
    /// nor this epoch wrote (the primary sends them again; if it did not, the replica
    /// would hold a half-written page).
    #[error(
        "epoch {epoch} would leave {count} initial-sync pages unchecked (first at {first:#x}): \
         a torn or lost sync part was never sent again"
    )]
    Unsynced {
        epoch: u64,
        count: usize,
        first: u64,
    },
}

/// One region of the mirror's RAM: where it sits in guest physical memory and in this
/// process (a mapping owned by [`Mirror::mem`]).
struct Region {
    start: u64,
    len: usize,
    host: usize,
}

/// The bytes of `g`.
fn bytes_of(g: &Region) -> &[u8] {
    // SAFETY: regions are built only from `Mirror::mem`'s mappings and dropped with
    // them (`take_memory` empties `regions` as it takes `mem`), so `host..host + len`
    // is mapped for as long as the region is borrowed. No vCPU runs on that memory
    // while the mirror owns it and every writer holds `&mut Mirror` (but the A-Link's
    // placed writes of the initial sync, into pages nothing reads before the first
    // apply: see `SyncPlacer`), so it does not change during the borrow.
    unsafe { std::slice::from_raw_parts(g.host as *const u8, g.len) }
}

/// Where an epoch's disk writes go when it is applied: durable when `commit` returns
/// (the epoch is acknowledged after it).
pub trait DiskCommit {
    fn commit(&mut self, epoch: u64, writes: &[(u16, u64, &[u8])]) -> Result<(), String>;
}

/// A staged message: a decoded part, or one that did not decode (staged by
/// [`Mirror::stage`], refused whole by the apply). Unboxed: the few staged messages
/// are almost all parts, and boxing would cost an allocation per part.
#[allow(clippy::large_enum_variant)]
enum Staged {
    Part(ReceivedPart),
    Bad(DecodeError),
    NotPart,
}

impl Staged {
    fn bytes(&self) -> usize {
        match self {
            Staged::Part(p) => p.len(),
            Staged::Bad(_) | Staged::NotPart => 0,
        }
    }
}

/// What an apply wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub pages: u64,
    pub disk_writes: u64,
    pub disk_bytes: u64,
    pub console_bytes: u64,
    pub net_frames: u64,
}

pub struct Mirror {
    /// Guest RAM (None once taken by a failover).
    mem: Option<GuestMemoryMmap>,
    /// Nothing but round-0 sync data was written yet: every page round 0 has not
    /// reached is still zero (the protocol delivers round 0's parts once each, in order,
    /// before anything else).
    pristine: bool,
    regions: Vec<Region>,
    disks: Vec<File>,
    /// Encoded `VmState` of the newest committed epoch.
    state: Option<Vec<u8>>,
    committed: Option<u64>,
    staging: BTreeMap<u64, Vec<Staged>>,
    staged_bytes: usize,
    /// Console output of committed epochs not known to be released by the primary:
    /// epoch -> (stream position, bytes).
    console: BTreeMap<u64, (u64, Vec<u8>)>,
    /// Net frames of committed epochs not known to be released by the primary:
    /// epoch -> frames as `(net device index, frame)`, in order per NIC.
    frames: BTreeMap<u64, Vec<(u16, Vec<u8>)>>,
    /// Bytes in `frames` (bounded by [`MAX_KEPT_FRAME_BYTES`]).
    frame_bytes: usize,
    /// Test mode: per-page CRCs (see [`Mirror::enable_page_hashes`]).
    hashes: Option<PageHashes>,
    /// Pages of the initial sync whose last copy was not checked (torn in a placed
    /// part, or in a lost part): a later sync round or the first epoch must write them
    /// before that epoch commits.
    owed: BTreeSet<u64>,
    /// Whether a [`SyncPlacer`] of this mirror may still hand out places: until the
    /// first epoch's apply (then every sync part was resolved: the A-Link delivers in
    /// order) or the memory is taken.
    placing: Arc<AtomicBool>,
    /// Messages (A-Link sequence numbers) a placer of this mirror gave places for and
    /// that were not delivered yet: a part delivered as placed counts as in this mirror
    /// only if it is here (else it went to another mirror's placer: owed).
    placed: Arc<Mutex<HashSet<u64>>>,
}

/// Hands the A-Link the mirror's pages as the places of initial-sync parts' page data
/// (`Alink::set_placer`): the part's runs, checked against the mirror's layout. Holds a
/// reference to the mirror's mappings, so they stay mapped while the A-Link may still
/// write into them, and stops placing once the mirror's first epoch is applied.
///
/// Why writing in place is sound here: the parts of one round name distinct pages; the
/// primary gives every part of round `r + 1` the barrier of round `r`'s
/// `SyncRoundDone`, so a page of a later round is written only after the standby has
/// processed every earlier part (its zero pages written, its own placed data done);
/// nothing reads the mirror's RAM before the first epoch's apply, which the A-Link can
/// deliver only after every sync part was resolved (in order).
#[derive(Clone)]
pub struct SyncPlacer {
    _mem: GuestMemoryMmap,
    /// `(start gpa, len, host address)` per region.
    regions: Vec<(u64, usize, usize)>,
    open: Arc<AtomicBool>,
    placed: Arc<Mutex<HashSet<u64>>>,
}

impl SyncPlacer {
    /// Where the payload of message `seq` (`head`: its encoded head) goes: the mirror's
    /// pages of its runs, when it is a placeable initial-sync part of `payload_len`
    /// bytes in page segments whose runs all lie in guest RAM; else None (the A-Link
    /// reads it into a buffer and the driver checks it as any message).
    pub fn place(
        &self,
        seq: u64,
        head: &[u8],
        payload_len: usize,
        seg_size: u32,
    ) -> Option<alink::Placement> {
        if !self.open.load(Ordering::Acquire) || seg_size as usize != PAGE_SIZE {
            return None;
        }
        let h = decode_head_of_sync_part(head)?;
        if h.payload_len() != payload_len as u64 {
            return None;
        }
        let mut dests = Vec::with_capacity(h.runs.len());
        for r in &h.runs {
            let len = r.pages as usize * PAGE_SIZE;
            let (off, host) = self.regions.iter().find_map(|&(start, rlen, host)| {
                let off = usize::try_from(r.gpa.checked_sub(start)?).ok()?;
                (off.checked_add(len)? <= rlen).then_some((off, host))
            })?;
            let ptr = (host + off) as *mut u8;
            // Back the run's pages in one call (fresh anonymous memory would otherwise
            // fault per page under the socket read). Best effort.
            // SAFETY: `[ptr, ptr + len)` lies inside a region of `_mem`'s mappings,
            // which this placer keeps alive; MADV_POPULATE_WRITE never changes contents.
            unsafe {
                libc::madvise(ptr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE);
            }
            dests.push((ptr, len));
        }
        twinrun_lock::MutexExt::lock_or_recover(&*self.placed).insert(seq);
        // SAFETY: every range lies inside the mirror's mappings, which `_mem` keeps
        // mapped for as long as the A-Link holds this placer (it drops it only after
        // its reader threads ended, or on `clear_placer`, after which a message being
        // placed is one of the sync, resolved before the first apply closes `open`).
        // The runs are in increasing order without overlap (`placeable`), so the
        // ranges do not overlap; nobody else reads or writes these pages meanwhile
        // (see the type's docs: one round's parts are distinct pages, rounds are
        // ordered by barriers, the mirror is read only from the first apply on).
        Some(unsafe { alink::Placement::new(dests) })
    }
}

impl Drop for Mirror {
    /// A placer of this mirror places nothing more (its mappings stay alive in it).
    fn drop(&mut self) {
        self.placing.store(false, Ordering::Release);
    }
}

impl Mirror {
    /// A zeroed mirror for guest RAM `layout` (`(gpa, len)` per region, as
    /// `vmm::persist::memory::layout` gives it) and the standby's disk images, in the
    /// VM config's order.
    pub fn new(layout: &[(u64, u64)], disks: Vec<File>) -> Result<Mirror, MirrorError> {
        let bad = || MirrorError::Layout(layout.to_vec());
        if layout.is_empty() || layout.len() > MAX_REGIONS {
            return Err(bad());
        }
        let mut ranges = Vec::with_capacity(layout.len());
        let mut prev_end = 0u64;
        for &(start, len) in layout {
            let end = start.checked_add(len).ok_or_else(bad)?;
            if len == 0
                || start % PAGE_SIZE as u64 != 0
                || len % PAGE_SIZE as u64 != 0
                || start < prev_end
            {
                return Err(bad());
            }
            prev_end = end;
            ranges.push((
                GuestAddress(start),
                usize::try_from(len).map_err(|_| bad())?,
            ));
        }
        let mem = GuestMemoryMmap::from_ranges(&ranges)
            .map_err(|e| MirrorError::Memory(e.to_string()))?;
        let mut regions = Vec::with_capacity(ranges.len());
        for r in mem.iter() {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| MirrorError::Memory(e.to_string()))?;
            regions.push(Region {
                start: r.start_addr().0,
                len: r.len() as usize,
                host: host as usize,
            });
        }
        Ok(Mirror {
            mem: Some(mem),
            pristine: true,
            regions,
            disks,
            state: None,
            committed: None,
            staging: BTreeMap::new(),
            staged_bytes: 0,
            console: BTreeMap::new(),
            frames: BTreeMap::new(),
            frame_bytes: 0,
            hashes: None,
            owed: BTreeSet::new(),
            placing: Arc::new(AtomicBool::new(true)),
            placed: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    /// A placer for the initial sync's parts (see [`SyncPlacer`]); None once the
    /// memory was taken or the first epoch applied.
    pub fn sync_placer(&self) -> Option<SyncPlacer> {
        let mem = self.mem.clone()?;
        self.placing.load(Ordering::Acquire).then(|| SyncPlacer {
            _mem: mem,
            regions: self
                .regions
                .iter()
                .map(|r| (r.start, r.len, r.host))
                .collect(),
            open: self.placing.clone(),
            placed: self.placed.clone(),
        })
    }

    /// Initial-sync pages whose last copy was not checked yet (see [`PartData`]).
    pub fn owed_pages(&self) -> usize {
        self.owed.len()
    }

    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.regions
            .iter()
            .map(|r| (r.start, r.len as u64))
            .collect()
    }

    /// Hands the mirror's RAM over (to the VM built at failover: see
    /// `vmm::build_vm_from_state_with_memory`). The mirror holds no memory afterwards:
    /// every page access fails as outside guest RAM.
    pub fn take_memory(&mut self) -> Option<GuestMemoryMmap> {
        self.placing.store(false, Ordering::Release);
        self.regions.clear();
        self.hashes = None;
        self.mem.take()
    }

    /// Asks the kernel to back `[gpa, gpa + len)` (within its region) with writable
    /// pages now (`MADV_POPULATE_WRITE`, Linux 5.14): one call instead of a fault per
    /// page. Best effort: where unsupported the writes fault the pages in as before.
    fn populate(&self, gpa: u64, len: usize) {
        let Some((r, off)) = self.locate(gpa) else {
            return;
        };
        let g = &self.regions[r];
        let len = len.min(g.len - off);
        // SAFETY: `[host + off, host + off + len)` lies inside region `r`'s mapping,
        // owned by `self.mem` and alive while `self` is; MADV_POPULATE_WRITE only
        // faults pages in (zero-filled or as they are), it never changes contents.
        let rc = unsafe {
            libc::madvise(
                (g.host + off) as *mut libc::c_void,
                len,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc != 0 {
            log::trace!("MADV_POPULATE_WRITE: {}", io::Error::last_os_error());
        }
    }

    /// The 4 KiB page at `off` of region `r`, writable.
    fn page_mut(&mut self, r: usize, off: usize) -> &mut [u8] {
        let g = &self.regions[r];
        assert!(off + PAGE_SIZE <= g.len, "page_slot checked the page");
        // SAFETY: as in `bytes_of` (the region's mapping lives while `self` does), and
        // `&mut self` makes this the only reference into the mirror's RAM.
        unsafe { std::slice::from_raw_parts_mut((g.host + off) as *mut u8, PAGE_SIZE) }
    }

    pub fn committed(&self) -> Option<u64> {
        self.committed
    }

    /// The encoded `VmState` of the newest committed epoch.
    pub fn state_bytes(&self) -> Option<&[u8]> {
        self.state.as_deref()
    }

    /// Decodes the committed VM state.
    pub fn vm_state(&self) -> Option<Result<vmm::VmState, vmm::persist::StateFormatError>> {
        self.state.as_deref().map(vmm::VmState::from_bytes)
    }

    /// Test mode ([`crate::verify`]): keep a CRC per page, updated by every apply for
    /// the pages it writes (read back from the mirror). Built from the whole mirror now.
    pub fn enable_page_hashes(&mut self) {
        let mut t = PageHashes::new(&self.layout());
        t.rebuild_from(self.regions.iter().map(|r| (r.start, bytes_of(r))));
        self.hashes = Some(t);
    }

    /// The page-hash digest of the mirror's RAM (equal to the primary's when the
    /// contents are equal); `full` rehashes every page first. `None` unless enabled.
    pub fn page_hash_digest(&mut self, full: bool) -> Option<u32> {
        let t = self.hashes.as_mut()?;
        if full {
            t.rebuild_from(self.regions.iter().map(|r| (r.start, bytes_of(r))));
        }
        Some(t.digest())
    }

    /// [`crate::verify::hash_guest_memory`]'s value for the mirror, from scratch.
    pub fn memory_hash(&self) -> u32 {
        let mut t = PageHashes::new(&self.layout());
        t.rebuild_from(self.regions.iter().map(|r| (r.start, bytes_of(r))));
        t.digest()
    }

    /// The mirror's copy of the page holding `gpa`.
    pub fn page(&self, gpa: u64) -> Option<&[u8]> {
        let (r, off) = self.locate(gpa)?;
        let off = off & !(PAGE_SIZE - 1);
        bytes_of(&self.regions[r]).get(off..off + PAGE_SIZE)
    }

    fn locate(&self, gpa: u64) -> Option<(usize, usize)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let off = gpa.checked_sub(r.start)?;
            (off < r.len as u64).then_some((i, off as usize))
        })
    }

    /// Where the page at `gpa` lives, if the whole page is inside one region.
    fn page_slot(&self, gpa: u64) -> Result<(usize, usize), MirrorError> {
        match self.locate(gpa) {
            Some((r, off)) if off + PAGE_SIZE <= self.regions[r].len => Ok((r, off)),
            _ => Err(MirrorError::PageOutside(gpa)),
        }
    }

    /// Writes the pages of an initial-sync part (head and payload as sent) straight into
    /// the mirror: [`Mirror::write_sync_part`] after a decode.
    pub fn write_sync(&mut self, head: &[u8], payload: &[u8]) -> Result<u64, MirrorError> {
        let mut body = head.to_vec();
        body.extend_from_slice(payload);
        match decode_standbound(head.len(), body)
            .map_err(|source| MirrorError::Decode { epoch: 0, source })?
        {
            Standbound::Part(p) => self.write_sync_part(&p.view()),
            _ => Err(MirrorError::NotEpochPart(0)),
        }
    }

    /// Writes an initial-sync part as the driver received it: its page data from its
    /// buffer ([`Mirror::write_sync_part`]), or already in place (placed: the checked
    /// pages are synced, the torn ones owed; lost: every data page owed); then its zero
    /// pages. Returns the pages written or confirmed.
    pub fn write_sync_received(&mut self, p: &ReceivedPart) -> Result<u64, MirrorError> {
        let view = p.view();
        let (torn, lost): (&[u32], bool) = match p.data() {
            PartData::Inline => return self.write_sync_part(&view),
            // Placed by this mirror's placer, or (a message of an earlier session
            // placed by its mirror's placer) not here at all.
            PartData::Placed { torn, seq } => (
                torn,
                !twinrun_lock::MutexExt::lock_or_recover(&*self.placed).remove(seq),
            ),
            PartData::Lost => (&[], true),
        };
        let mut data = Vec::with_capacity(view.head.page_count() as usize);
        for r in &view.head.runs {
            for i in 0..u64::from(r.pages) {
                let gpa = r.gpa + i * PAGE_SIZE as u64;
                self.page_slot(gpa)?;
                data.push(gpa);
            }
        }
        let mut n = 0;
        for (i, gpa) in data.into_iter().enumerate() {
            if lost || torn.contains(&(i as u32)) {
                self.owed.insert(gpa);
            } else {
                self.owed.remove(&gpa);
                n += 1;
            }
        }
        Ok(n + self.write_zero_pages(&view)?)
    }

    /// Writes the pages of an initial-sync part straight into the mirror (it is no
    /// replica before epoch 0 commits). Checks every address first.
    pub fn write_sync_part(&mut self, view: &PartView<'_>) -> Result<u64, MirrorError> {
        let mut slots = Vec::with_capacity(view.head.page_count() as usize);
        for (gpa, _) in view.pages() {
            slots.push(self.page_slot(gpa)?);
        }
        for gpa in view.zero_pages() {
            self.page_slot(gpa)?;
        }
        // Back each run's pages in one call before writing them: the mirror is fresh
        // memory, and taking a page fault per 4 KiB page costs more than the copy.
        for run in &view.head.runs {
            self.populate(run.gpa, run.pages as usize * PAGE_SIZE);
        }
        let mut n = 0;
        for ((r, off), (gpa, data)) in slots.into_iter().zip(view.pages()) {
            self.page_mut(r, off).copy_from_slice(data);
            if !self.owed.is_empty() {
                self.owed.remove(&gpa);
            }
            n += 1;
        }
        Ok(n + self.write_zero_pages(view)?)
    }

    /// Writes the zero pages of an initial-sync part (checking their addresses first).
    fn write_zero_pages(&mut self, view: &PartView<'_>) -> Result<u64, MirrorError> {
        let mut zero = Vec::with_capacity(view.head.zero_page_count() as usize);
        for gpa in view.zero_pages() {
            zero.push((self.page_slot(gpa)?, gpa));
        }
        let mut n = 0;
        // Round 0 covers every page exactly once and the mirror starts as untouched
        // zero memory: its zero pages are zero already (and writing them would only
        // make the kernel back them). A later round's zero page may hold an older copy.
        let round0 = matches!(view.head.of, PartOf::Sync { round: 0 });
        self.pristine &= round0;
        let skip_zero = self.pristine;
        for ((r, off), gpa) in zero {
            if !skip_zero {
                self.page_mut(r, off).fill(0);
            }
            if !self.owed.is_empty() {
                self.owed.remove(&gpa);
            }
            n += 1;
        }
        Ok(n)
    }

    /// Keeps a received message (head length and body, as the A-Link delivered it) in
    /// the staging area of `epoch`, decoding it first; one that does not decode is kept
    /// as such and makes the epoch's apply fail (before anything is written).
    pub fn stage(
        &mut self,
        epoch: u64,
        head_len: usize,
        body: impl Into<alink::Buf>,
    ) -> Result<(), MirrorError> {
        let staged = match decode_standbound(head_len, body) {
            Ok(Standbound::Part(p)) => Staged::Part(p),
            Ok(_) => Staged::NotPart,
            Err(e) => Staged::Bad(e),
        };
        self.stage_staged(epoch, staged)
    }

    /// Keeps a decoded part in the staging area of `epoch`.
    pub fn stage_part(&mut self, epoch: u64, part: ReceivedPart) -> Result<(), MirrorError> {
        self.stage_staged(epoch, Staged::Part(part))
    }

    fn stage_staged(&mut self, epoch: u64, s: Staged) -> Result<(), MirrorError> {
        let n = s.bytes();
        if self.staged_bytes + n > MAX_STAGED_BYTES {
            return Err(MirrorError::StagingFull);
        }
        self.staged_bytes += n;
        self.staging.entry(epoch).or_default().push(s);
        Ok(())
    }

    /// Drops every staged epoch.
    pub fn discard_staged(&mut self) {
        self.staging.clear();
        self.staged_bytes = 0;
    }

    /// Applies staged `epoch`: validates every part, then writes pages, disk writes
    /// (then `fdatasync` of each written disk), console log and state.
    pub fn apply(&mut self, epoch: u64) -> Result<ApplyStats, MirrorError> {
        self.apply_into(epoch, None)
    }

    /// [`Mirror::apply`], with the disk writes going through `disks` when given (the
    /// standby's apply journal: one durable record per epoch instead of direct writes
    /// and an `fdatasync` of every written image).
    pub fn apply_into(
        &mut self,
        epoch: u64,
        disks: Option<&mut dyn DiskCommit>,
    ) -> Result<ApplyStats, MirrorError> {
        let msgs = self
            .staging
            .remove(&epoch)
            .ok_or(MirrorError::NotStaged(epoch))?;
        self.pristine = false;
        self.staged_bytes -= msgs.iter().map(Staged::bytes).sum::<usize>();
        let mut parts = Vec::with_capacity(msgs.len());
        for m in &msgs {
            match m {
                Staged::Part(p) => parts.push(p),
                Staged::Bad(source) => {
                    return Err(MirrorError::Decode {
                        epoch,
                        source: source.clone(),
                    })
                }
                Staged::NotPart => return Err(MirrorError::NotEpochPart(epoch)),
            }
        }
        parts.sort_by_key(|p| p.head().part);
        let views: Vec<PartView<'_>> = parts.iter().map(|p| p.view()).collect();
        // The first epoch ends the initial sync: the A-Link delivered every sync part
        // before it (in order), so no place is being written any more; and every page
        // whose last sync copy was not checked must be in this epoch.
        self.placing.store(false, Ordering::Release);
        if self.committed.is_none() && !self.owed.is_empty() {
            for v in &views {
                for (gpa, _) in v.pages() {
                    self.owed.remove(&gpa);
                }
            }
            if let Some(&first) = self.owed.first() {
                return Err(MirrorError::Unsynced {
                    epoch,
                    count: self.owed.len(),
                    first,
                });
            }
        }
        // Validate everything before writing anything.
        let states = views.iter().filter(|v| !v.state.is_empty()).count();
        if states != 1 {
            return Err(MirrorError::StateCount {
                epoch,
                count: states,
            });
        }
        let mut slots = Vec::new();
        for v in &views {
            for (gpa, _) in v.pages() {
                slots.push(self.page_slot(gpa)?);
            }
            for (d, _) in v.disk_writes() {
                if usize::from(d.device) >= self.disks.len() {
                    return Err(MirrorError::NoDisk {
                        device: d.device,
                        disks: self.disks.len(),
                    });
                }
            }
        }
        let mut stats = ApplyStats::default();
        let mut slot = slots.into_iter();
        let mut written = vec![false; self.disks.len()];
        let mut journalled: Vec<(u16, u64, &[u8])> = Vec::new();
        let journal = disks.is_some();
        for v in &views {
            // `pages()` first: zip must not pull a slot past this part's last page.
            for ((gpa, data), (r, off)) in v.pages().zip(slot.by_ref()) {
                self.page_mut(r, off).copy_from_slice(data);
                if let Some(t) = &mut self.hashes {
                    // Read back from where it landed, not from the message.
                    t.update(gpa, &bytes_of(&self.regions[r])[off..off + PAGE_SIZE]);
                }
                stats.pages += 1;
            }
            for (d, data) in v.disk_writes() {
                let dev = usize::from(d.device);
                stats.disk_writes += 1;
                stats.disk_bytes += data.len() as u64;
                if journal {
                    journalled.push((d.device, d.offset, data));
                    continue;
                }
                self.disks[dev]
                    .write_all_at(data, d.offset)
                    .map_err(|source| MirrorError::Disk {
                        device: d.device,
                        source,
                    })?;
                written[dev] = true;
            }
            if let Some(c) = v.head.console {
                stats.console_bytes += v.console.len() as u64;
                self.console.insert(epoch, (c.pos, v.console.to_vec()));
            }
            if !v.head.frames.is_empty() {
                let frames: Vec<(u16, Vec<u8>)> =
                    v.frames().map(|(net, f)| (net, f.to_vec())).collect();
                stats.net_frames += frames.len() as u64;
                self.frame_bytes += frames.iter().map(|(_, f)| f.len()).sum::<usize>();
                if let Some(old) = self.frames.insert(epoch, frames) {
                    self.frame_bytes -= old.iter().map(|(_, f)| f.len()).sum::<usize>();
                }
                self.bound_frames();
            }
            if !v.state.is_empty() {
                self.state = Some(v.state.to_vec());
            }
        }
        // The epoch is acknowledged after this: its disk writes must be durable.
        if let Some(j) = disks {
            j.commit(epoch, &journalled).map_err(MirrorError::Journal)?;
        }
        for (dev, w) in written.into_iter().enumerate() {
            if w {
                self.disks[dev]
                    .sync_data()
                    .map_err(|source| MirrorError::Disk {
                        device: dev as u16,
                        source,
                    })?;
            }
        }
        self.committed = Some(epoch);
        Ok(stats)
    }

    /// Forgets the console output and frames of epochs through `through` (the primary
    /// released them).
    pub fn trim_output(&mut self, through: u64) {
        self.console.retain(|e, _| *e > through);
        self.frames = match through.checked_add(1) {
            Some(from) => self.frames.split_off(&from),
            None => BTreeMap::new(),
        };
        self.frame_bytes = self.frames.values().flatten().map(|(_, f)| f.len()).sum();
    }

    /// Forgets the oldest epochs' frames until the kept bytes are within
    /// [`MAX_KEPT_FRAME_BYTES`].
    fn bound_frames(&mut self) {
        while self.frame_bytes > MAX_KEPT_FRAME_BYTES {
            let Some((e, old)) = self.frames.pop_first() else {
                break;
            };
            let n: usize = old.iter().map(|(_, f)| f.len()).sum();
            self.frame_bytes -= n;
            log::debug!("mirror: frames of epoch {e} forgotten ({n} bytes, over the bound)");
        }
    }

    /// Net frames to send again on failover: those of committed epochs after
    /// `released_through`, as `(net device index, frame)`, in epoch order (in emission
    /// order per NIC).
    pub fn frames_to_resend(
        &self,
        released_through: Option<u64>,
    ) -> impl Iterator<Item = (u16, &[u8])> {
        let from = released_through.map_or(0, |r| r.saturating_add(1));
        self.frames
            .range(from..)
            .flat_map(|(_, fs)| fs.iter().map(|(net, f)| (*net, f.as_slice())))
    }

    /// Console output to release again on failover: committed epochs after
    /// `released_through`, as `(stream position, bytes)`, in order.
    pub fn console_to_rerelease(
        &self,
        released_through: Option<u64>,
    ) -> impl Iterator<Item = (u64, &[u8])> {
        let from = released_through.map_or(0, |r| r.saturating_add(1));
        self.console
            .range(from..)
            .map(|(_, (pos, b))| (*pos, b.as_slice()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{
        encode, ConsoleOut, DiskExtent, FrameOut, PageRun, PartHead, PartOf, ToStandby,
    };
    use vm_memory::Bytes;

    struct TempFile(std::path::PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn temp_disk(len: u64) -> (TempFile, File) {
        let p = std::env::temp_dir().join(format!(
            "twinrun-mirror-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(len).unwrap();
        (TempFile(p), f)
    }

    /// One encoded message: `(head_len, body)`.
    fn part(
        epoch: u64,
        part: u32,
        parts: u32,
        pages: &[(u64, u8)],
        state: &[u8],
        disk: Option<(u64, &[u8])>,
        console: Option<(u64, &[u8])>,
    ) -> (usize, Vec<u8>) {
        part_frames(epoch, part, parts, pages, state, disk, console, &[])
    }

    /// [`part`] with net frames `(net device index, frame)`.
    #[allow(clippy::too_many_arguments)]
    fn part_frames(
        epoch: u64,
        part: u32,
        parts: u32,
        pages: &[(u64, u8)],
        state: &[u8],
        disk: Option<(u64, &[u8])>,
        console: Option<(u64, &[u8])>,
        frames: &[(u16, &[u8])],
    ) -> (usize, Vec<u8>) {
        let runs: Vec<PageRun> = pages
            .iter()
            .map(|&(gpa, _)| PageRun { gpa, pages: 1 })
            .collect();
        let page_data: Vec<u8> = pages
            .iter()
            .flat_map(|&(_, b)| vec![b; PAGE_SIZE])
            .collect();
        let extents: Vec<DiskExtent> = disk
            .iter()
            .map(|(off, d)| DiskExtent {
                device: 0,
                offset: *off,
                len: d.len() as u32,
            })
            .collect();
        let disk_data = disk.map(|(_, d)| d.to_vec()).unwrap_or_default();
        let con = console.map(|(pos, b)| ConsoleOut {
            pos,
            len: b.len() as u32,
        });
        let con_data = console.map(|(_, b)| b.to_vec()).unwrap_or_default();
        let fout: Vec<FrameOut> = frames
            .iter()
            .map(|(net, f)| FrameOut {
                net: *net,
                len: f.len() as u32,
            })
            .collect();
        let frame_data: Vec<u8> = frames.iter().flat_map(|(_, f)| f.to_vec()).collect();
        let chunks = [state.to_vec(), disk_data, con_data, frame_data, page_data];
        let h = PartHead::new(
            PartOf::Epoch {
                epoch,
                sync_rounds: 0,
            },
            part,
            parts,
            state.len() as u32,
            runs,
            extents,
            con,
            fout,
            None,
            &chunks,
        )
        .unwrap();
        let head = encode(&ToStandby::Part(h)).unwrap();
        let n = head.len();
        let mut body = head;
        body.extend_from_slice(&chunks.concat());
        (n, body)
    }

    fn layout() -> Vec<(u64, u64)> {
        let mem = vmm::vstate::memory::create_guest_memory(4 << 20).unwrap();
        vmm::persist::memory::layout(&mem)
    }

    /// An initial-sync part of `round`: `pages` with data (each filled with its byte),
    /// `zero` as all-zero runs.
    fn sync_part(round: u32, pages: &[(u64, u8)], zero: Vec<PageRun>) -> (Vec<u8>, Vec<u8>) {
        let runs: Vec<PageRun> = pages
            .iter()
            .map(|&(gpa, _)| PageRun { gpa, pages: 1 })
            .collect();
        let data: Vec<u8> = pages
            .iter()
            .flat_map(|&(_, b)| vec![b; PAGE_SIZE])
            .collect();
        let h = PartHead::new(
            PartOf::Sync { round },
            0,
            1,
            0,
            runs,
            vec![],
            None,
            vec![],
            None,
            &[&data[..]],
        )
        .unwrap()
        .with_zero_runs(zero)
        .unwrap();
        (encode(&ToStandby::Part(h)).unwrap(), data)
    }

    #[test]
    fn zero_pages_of_sync_rounds_are_skipped_only_while_pristine() {
        let mut m = Mirror::new(&layout(), Vec::new()).unwrap();
        // Round 0: one page with data, three zero pages (untouched memory: skipped).
        let (h, b) = sync_part(
            0,
            &[(0x1000, 5)],
            vec![PageRun {
                gpa: 0x2000,
                pages: 3,
            }],
        );
        assert_eq!(m.write_sync(&h, &b).unwrap(), 4);
        assert!(m.page(0x1000).unwrap().iter().all(|&x| x == 5));
        assert!(m.page(0x3000).unwrap().iter().all(|&x| x == 0));
        // Round 1: the page with data became zero: it must be zeroed here.
        let (h, b) = sync_part(
            1,
            &[(0x2000, 6)],
            vec![PageRun {
                gpa: 0x1000,
                pages: 1,
            }],
        );
        assert_eq!(m.write_sync(&h, &b).unwrap(), 2);
        assert!(m.page(0x1000).unwrap().iter().all(|&x| x == 0));
        assert!(m.page(0x2000).unwrap().iter().all(|&x| x == 6));
        // A zero run outside guest RAM is refused before anything is written.
        let (h, b) = sync_part(
            2,
            &[(0x5000, 7)],
            vec![PageRun {
                gpa: 1 << 40,
                pages: 1,
            }],
        );
        assert!(matches!(
            m.write_sync(&h, &b),
            Err(MirrorError::PageOutside(_))
        ));
        assert!(m.page(0x5000).unwrap().iter().all(|&x| x == 0));
    }

    #[test]
    fn apply_writes_pages_disk_state_and_fills_a_vm() {
        let (_guard, disk) = temp_disk(8192);
        let mut m = Mirror::new(&layout(), vec![disk.try_clone().unwrap()]).unwrap();
        let (h0, b0) = part(0, 0, 2, &[(0x1000, 1), (0x2000, 2)], &[], None, None);
        let (h1, b1) = part(
            0,
            1,
            2,
            &[(0x3000, 3)],
            b"STATE",
            Some((512, b"disk-data")),
            Some((40, b"console")),
        );
        m.stage(0, h1, b1).unwrap();
        m.stage(0, h0, b0).unwrap();
        let st = m.apply(0).unwrap();
        assert_eq!(st.pages, 3);
        assert_eq!(st.disk_bytes, 9);
        assert_eq!(m.committed(), Some(0));
        assert_eq!(m.state_bytes(), Some(&b"STATE"[..]));
        assert!(m.page(0x2000).unwrap().iter().all(|&b| b == 2));
        assert!(m.page(0x4000).unwrap().iter().all(|&b| b == 0));
        let mut d = [0u8; 9];
        disk.read_exact_at(&mut d, 512).unwrap();
        assert_eq!(&d, b"disk-data");
        let re: Vec<_> = m.console_to_rerelease(None).collect();
        assert_eq!(re, vec![(40, &b"console"[..])]);
        m.trim_output(0);
        assert_eq!(m.console_to_rerelease(None).count(), 0);

        // The RAM itself goes to the failed-over VM, laid out as a VM's.
        let mem = m.take_memory().unwrap();
        assert_eq!(vmm::persist::memory::layout(&mem), layout());
        let mut page = vec![0u8; PAGE_SIZE];
        mem.read_slice(&mut page, GuestAddress(0x3000)).unwrap();
        assert!(page.iter().all(|&b| b == 3));
        assert!(m.page(0x3000).is_none());
        assert!(m.take_memory().is_none());
    }

    #[test]
    fn frames_of_committed_epochs_are_kept_until_released_and_bounded() {
        let mut m = Mirror::new(&layout(), Vec::new()).unwrap();
        for (e, fr) in [
            (0u64, vec![(0u16, &b"f0"[..])]),
            (1, vec![]),
            (2, vec![(0, &b"f2a"[..]), (1, &b"f2b"[..])]),
        ] {
            let (h, b) = part_frames(e, 0, 1, &[], b"S", None, None, &fr);
            m.stage(e, h, b).unwrap();
            let st = m.apply(e).unwrap();
            assert_eq!(st.net_frames, fr.len() as u64);
        }
        let all: Vec<_> = m.frames_to_resend(None).collect();
        assert_eq!(
            all,
            vec![(0, &b"f0"[..]), (0, &b"f2a"[..]), (1, &b"f2b"[..])]
        );
        // Only epochs after what the primary released.
        assert_eq!(m.frames_to_resend(Some(0)).count(), 2);
        assert_eq!(m.frames_to_resend(Some(2)).count(), 0);
        m.trim_output(1);
        assert_eq!(m.frame_bytes, 6);
        assert_eq!(m.frames_to_resend(None).count(), 2);
        m.trim_output(u64::MAX);
        assert_eq!((m.frame_bytes, m.frames_to_resend(None).count()), (0, 0));
        // Past the bound the oldest epochs go first.
        let big = vec![7u8; 60000];
        let per_epoch = 64;
        let epochs = MAX_KEPT_FRAME_BYTES / (big.len() * per_epoch) + 2;
        for e in 3..3 + epochs as u64 {
            let fr: Vec<(u16, &[u8])> = (0..per_epoch).map(|_| (0, &big[..])).collect();
            let (h, b) = part_frames(e, 0, 1, &[], b"S", None, None, &fr);
            m.stage(e, h, b).unwrap();
            m.apply(e).unwrap();
        }
        assert!(m.frame_bytes <= MAX_KEPT_FRAME_BYTES);
        assert!(!m.frames.contains_key(&3), "oldest forgotten");
        assert!(m.frames.contains_key(&(2 + epochs as u64)), "newest kept");
    }

    #[test]
    fn a_bad_epoch_is_refused_whole() {
        let mut m = Mirror::new(&layout(), Vec::new()).unwrap();
        // One good page, one page far outside RAM: nothing may be written.
        let (h, b) = part(1, 0, 1, &[(0x1000, 7), (1 << 40, 8)], b"S", None, None);
        m.stage(1, h, b).unwrap();
        assert!(matches!(m.apply(1), Err(MirrorError::PageOutside(_))));
        assert!(m.page(0x1000).unwrap().iter().all(|&b| b == 0));
        assert_eq!(m.committed(), None);
        // A disk that does not exist.
        let (h, b) = part(2, 0, 1, &[], b"S", Some((0, b"x")), None);
        m.stage(2, h, b).unwrap();
        assert!(matches!(m.apply(2), Err(MirrorError::NoDisk { .. })));
        // A payload shorter than its head says (corruption is the A-Link's frame check).
        let (h, mut b) = part(3, 0, 1, &[(0x1000, 1)], b"S", None, None);
        b.pop();
        m.stage(3, h, b).unwrap();
        assert!(matches!(m.apply(3), Err(MirrorError::Decode { .. })));
        assert!(matches!(m.apply(9), Err(MirrorError::NotStaged(9))));
        m.stage(4, 0, vec![1, 2, 3]).unwrap();
        m.discard_staged();
        assert!(matches!(m.apply(4), Err(MirrorError::NotStaged(4))));
    }

    /// A placed or lost sync part as the A-Link delivers it: its head alone in the
    /// body, the payload in the mirror (placed) or nowhere (lost).
    fn delivered(
        head: &[u8],
        at: alink::PayloadAt,
        torn: Vec<u32>,
        placed_len: usize,
    ) -> alink::InMsg {
        alink::InMsg {
            seq: 1,
            head_len: head.len(),
            body: head.to_vec().into(),
            at,
            torn,
            seg_size: PAGE_SIZE as u32,
            placed_len,
        }
    }

    /// What the A-Link does with a placement: reads the payload into its ranges.
    fn place(p: &alink::Placement, payload: &[u8]) {
        let mut at = 0;
        for &(addr, len) in p.ranges() {
            // SAFETY: the placer gave ranges inside the mirror's live mappings; the
            // test holds the mirror and nothing else touches these pages meanwhile.
            unsafe { std::ptr::copy_nonoverlapping(payload[at..].as_ptr(), addr as *mut u8, len) };
            at += len;
        }
        assert_eq!(at, payload.len());
    }

    fn received(m: alink::InMsg) -> Result<ReceivedPart, DecodeError> {
        match crate::messages::decode_delivered(crate::messages::LENT_SYNC_VERSION, 0, m)? {
            Standbound::Part(p) => Ok(p),
            _ => panic!("not a part"),
        }
    }

    /// Sync pages placed straight into the mirror count as synced only when checked:
    /// torn pages and a lost part's pages are owed until a later round or the first
    /// epoch writes them, and that epoch is refused whole while any is still owed.
    #[test]
    fn placed_sync_pages_count_only_when_checked() {
        let mut m = Mirror::new(&layout(), Vec::new()).unwrap();
        let placer = m.sync_placer().unwrap();
        // Round 0: pages 0x1000 and 0x2000 placed, the second torn on the way.
        let (h, b) = sync_part(0, &[(0x1000, 5), (0x2000, 6)], vec![]);
        let p = placer.place(1, &h, b.len(), PAGE_SIZE as u32).unwrap();
        assert_eq!(p.ranges().len(), 2);
        place(&p, &b);
        let rp = received(delivered(&h, alink::PayloadAt::Placed, vec![1], b.len())).unwrap();
        assert_eq!(m.write_sync_received(&rp).unwrap(), 1);
        assert!(m.page(0x1000).unwrap().iter().all(|&x| x == 5));
        assert_eq!(m.owed_pages(), 1);
        // A lost part: its pages are owed, whatever the places hold.
        let (h, b) = sync_part(
            0,
            &[(0x3000, 7)],
            vec![PageRun {
                gpa: 0x4000,
                pages: 1,
            }],
        );
        let rp = received(delivered(&h, alink::PayloadAt::Lost, vec![], 0)).unwrap();
        assert_eq!(
            m.write_sync_received(&rp).unwrap(),
            1,
            "the zero page counts"
        );
        assert_eq!(m.owed_pages(), 2);
        // Round 1 sends 0x3000 again (from its buffer): synced.
        let (h, b2) = sync_part(1, &[(0x3000, 8)], vec![]);
        assert_eq!(m.write_sync(&h, &b2).unwrap(), 1);
        assert_eq!(m.owed_pages(), 1);
        // Epoch 0 without the torn page 0x2000: refused whole, nothing written.
        let (hl, body) = part(0, 0, 1, &[(0x5000, 9)], b"S", None, None);
        m.stage(0, hl, body).unwrap();
        assert!(matches!(
            m.apply(0),
            Err(MirrorError::Unsynced {
                epoch: 0,
                count: 1,
                first: 0x2000
            })
        ));
        assert!(m.page(0x5000).unwrap().iter().all(|&x| x == 0));
        assert_eq!(m.committed(), None);
        // With it: committed; the placer places nothing more.
        let (hl, body) = part(0, 0, 1, &[(0x2000, 6), (0x5000, 9)], b"S", None, None);
        m.stage(0, hl, body).unwrap();
        m.apply(0).unwrap();
        assert_eq!(m.owed_pages(), 0);
        assert!(m.page(0x2000).unwrap().iter().all(|&x| x == 6));
        assert!(placer.place(1, &h, b2.len(), PAGE_SIZE as u32).is_none());
        drop(b);
    }

    /// A part delivered as placed that this mirror's placer never placed (another
    /// session's mirror's placer did) is not in this mirror: its pages are owed.
    #[test]
    fn a_part_placed_by_another_mirror_is_owed() {
        let mut m = Mirror::new(&layout(), Vec::new()).unwrap();
        let other = Mirror::new(&layout(), Vec::new()).unwrap();
        let (h, b) = sync_part(0, &[(0x1000, 5)], vec![]);
        place(
            &other
                .sync_placer()
                .unwrap()
                .place(42, &h, b.len(), 4096)
                .unwrap(),
            &b,
        );
        let rp = alink::InMsg {
            seq: 42,
            ..delivered(&h, alink::PayloadAt::Placed, vec![], b.len())
        };
        assert_eq!(m.write_sync_received(&received(rp).unwrap()).unwrap(), 0);
        assert_eq!(m.owed_pages(), 1);
        // Once dropped, a mirror's placer places nothing more.
        let p = other.sync_placer().unwrap();
        drop(other);
        assert!(p.place(43, &h, b.len(), 4096).is_none());
    }

    /// The placer and the decode take only initial-sync parts of page data whose head
    /// matches what the A-Link placed.
    #[test]
    fn placements_and_placed_parts_are_checked_against_their_heads() {
        let m = Mirror::new(&layout(), Vec::new()).unwrap();
        let placer = m.sync_placer().unwrap();
        let (h, b) = sync_part(0, &[(0x1000, 5)], vec![]);
        assert!(
            placer.place(1, &h, b.len(), 512).is_none(),
            "segments are not pages"
        );
        assert!(placer.place(1, &h, b.len() + 1, PAGE_SIZE as u32).is_none());
        let (out, _) = sync_part(0, &[(1 << 40, 5)], vec![]);
        assert!(
            placer.place(1, &out, PAGE_SIZE, PAGE_SIZE as u32).is_none(),
            "outside RAM"
        );
        // The last page of RAM fits; a run crossing its end does not.
        let end = layout().last().map(|&(s, l)| s + l).unwrap();
        let (last, _) = sync_part(0, &[(end - 0x1000, 1)], vec![]);
        assert!(placer
            .place(1, &last, PAGE_SIZE, PAGE_SIZE as u32)
            .is_some());
        let (ep_h, ep_b) = part(0, 0, 1, &[(0x1000, 1)], b"S", None, None);
        let ep_h = &ep_b[..ep_h];
        assert!(placer
            .place(1, ep_h, ep_b.len() - ep_h.len(), PAGE_SIZE as u32)
            .is_none());
        // Decoding what the A-Link delivered placed.
        assert!(matches!(
            received(delivered(
                ep_h,
                alink::PayloadAt::Placed,
                vec![],
                ep_b.len() - ep_h.len()
            )),
            Err(DecodeError::Placement(_))
        ));
        assert!(received(delivered(&h, alink::PayloadAt::Placed, vec![], b.len() - 1)).is_err());
        assert!(matches!(
            received(delivered(&h, alink::PayloadAt::Placed, vec![1], b.len())),
            Err(DecodeError::Placement(_))
        ));
        let mut with_payload = delivered(&h, alink::PayloadAt::Placed, vec![], b.len());
        with_payload.body = [&h[..], &b[..]].concat().into();
        assert!(matches!(
            received(with_payload),
            Err(DecodeError::Placement(_))
        ));
        assert!(received(delivered(&h, alink::PayloadAt::Lost, vec![], 0)).is_ok());
    }

    #[test]
    fn layouts_are_checked() {
        assert!(Mirror::new(&[], Vec::new()).is_err());
        assert!(Mirror::new(&[(0, 100)], Vec::new()).is_err());
        assert!(Mirror::new(&[(0, 8192), (4096, 4096)], Vec::new()).is_err());
        assert!(Mirror::new(&[(0, 8192), (1 << 32, 4096)], Vec::new()).is_ok());
    }
}
