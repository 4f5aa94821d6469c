//! Dirty page tracking: which guest pages changed since the previous harvest.
//!
//! Two writers change guest memory, and each has its own log:
//! - vCPUs: KVM logs their writes per memory slot (`KVM_MEM_LOG_DIRTY_PAGES`). How the
//!   log is read is behind [`KvmDirtySource`], so a dirty-ring implementation can be
//!   swapped in for the bitmap one ([`BitmapSource`]).
//! - the VMM itself (device emulation: virtio used rings, block reads, net RX): KVM never
//!   sees these; vm-memory's [`AtomicBitmap`] of each region records them.
//!
//! [`DirtyTracker`] ORs both into one [`DirtySet`]. A harvest must run while no vCPU
//! and no device thread can write guest memory (the VM paused): the caller then copies
//! the harvested pages before resuming. The order that loses nothing is GET (snapshot
//! KVM's bits) -> CLEAR (re-protect exactly those pages) -> copy: a write after the
//! CLEAR faults and is logged again.
//!
//! Cost: with manual re-protect (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`), GET only copies
//! the slot bitmap (one bit per page: 32 KiB per GiB) and CLEAR write-protects only the
//! pages whose bits are passed in. The remaining per-harvest work that grows with memory
//! size is walking the bitmaps word by word (one u64 per 256 KiB of guest memory).

use std::os::raw::c_void;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::hot_pages::{HotPageConfig, HotPages};
use super::memory::{GuestMemoryMmap, SlotFlags};
use super::vm::{Vm, VmError};

/// Guest page size that both KVM's log and vm-memory's bitmap use on x86-64.
pub const PAGE_SIZE: u64 = 4096;
const PAGE_SHIFT: u32 = 12;

// kvm-ioctls 0.25 wraps neither KVM_CLEAR_DIRTY_LOG nor a KVM_GET_DIRTY_LOG into a
// caller-owned buffer (its `get_dirty_log` allocates on every call).
vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("dirty harvest while vCPUs may run: pause the VM first")]
    NotPaused,
    #[error("dirty tracking is not started")]
    NotStarted,
    #[error("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2, {flags:#x}): {source}")]
    EnableManualProtect {
        flags: u64,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_DIRTY_LOG on slot {slot}: {source}")]
    GetLog {
        slot: u32,
        source: vmm_sys_util::errno::Error,
    },
    #[error("KVM_CLEAR_DIRTY_LOG on slot {slot}: {source}")]
    ClearLog {
        slot: u32,
        source: vmm_sys_util::errno::Error,
    },
    #[error("dirty log toggle: {0}")]
    SlotFlags(#[from] VmError),
    #[error("dirty set layout does not match guest memory ({0})")]
    Layout(&'static str),
}

/// Dirty pages of one guest memory region: one bit per page, in u64 words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionDirty {
    start: GuestAddress,
    pages: usize,
    words: Vec<u64>,
}

impl RegionDirty {
    fn new(start: GuestAddress, len: u64) -> RegionDirty {
        let pages = len.div_ceil(PAGE_SIZE) as usize;
        RegionDirty {
            start,
            pages,
            words: vec![0; pages.div_ceil(64)],
        }
    }

    pub fn start(&self) -> GuestAddress {
        self.start
    }

    /// Pages in the region.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// The bitmap: bit `i % 64` of word `i / 64` is page `i` of the region.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// ORs `bits` (same layout as [`words`](Self::words)) in; bits past the region's
    /// last page are ignored. Returns whether any bit was set in `bits`.
    fn or_words(&mut self, bits: &[u64]) -> bool {
        let mut any = 0;
        for (w, b) in self.words.iter_mut().zip(bits) {
            *w |= *b;
            any |= *b;
        }
        self.mask_tail();
        any != 0
    }

    fn mask_tail(&mut self) {
        let tail = self.pages % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
    }
}

/// A set of dirty guest pages, laid out like the guest memory it was made for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtySet {
    regions: Vec<RegionDirty>,
}

impl DirtySet {
    /// An empty set for the regions of `mem`.
    pub fn new(mem: &GuestMemoryMmap) -> DirtySet {
        DirtySet {
            regions: mem
                .iter()
                .map(|r| RegionDirty::new(r.start_addr(), r.len()))
                .collect(),
        }
    }

    /// Every page of `mem` (e.g. the first transfer of a checkpoint).
    pub fn full(mem: &GuestMemoryMmap) -> DirtySet {
        let mut s = DirtySet::new(mem);
        for r in &mut s.regions {
            r.words.fill(u64::MAX);
            r.mask_tail();
        }
        s
    }

    pub fn regions(&self) -> &[RegionDirty] {
        &self.regions
    }

    pub fn clear(&mut self) {
        for r in &mut self.regions {
            r.words.fill(0);
        }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> usize {
        self.regions
            .iter()
            .flat_map(|r| &r.words)
            .map(|w| w.count_ones() as usize)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.regions.iter().all(|r| r.words.iter().all(|w| *w == 0))
    }

    fn locate(&self, addr: GuestAddress) -> Option<(usize, usize)> {
        self.regions.iter().enumerate().find_map(|(i, r)| {
            let off = addr.0.checked_sub(r.start.0)?;
            let page = (off >> PAGE_SHIFT) as usize;
            (page < r.pages).then_some((i, page))
        })
    }

    /// Whether the page holding `addr` is dirty.
    pub fn contains(&self, addr: GuestAddress) -> bool {
        self.locate(addr)
            .is_some_and(|(i, p)| self.regions[i].words[p / 64] & (1 << (p % 64)) != 0)
    }

    /// Marks the pages of `[addr, addr + len)` dirty (parts outside guest memory are
    /// ignored).
    pub fn mark(&mut self, addr: GuestAddress, len: u64) {
        if len == 0 {
            return;
        }
        let first = addr.0 & !(PAGE_SIZE - 1);
        let last = addr.0.saturating_add(len - 1) & !(PAGE_SIZE - 1);
        let mut a = first;
        while a <= last {
            if let Some((i, p)) = self.locate(GuestAddress(a)) {
                self.regions[i].words[p / 64] |= 1 << (p % 64);
            }
            match a.checked_add(PAGE_SIZE) {
                Some(n) => a = n,
                None => break,
            }
        }
    }

    /// Removes one page (e.g. to fold back everything but what a transfer sent).
    pub fn unmark(&mut self, addr: GuestAddress) {
        if let Some((i, p)) = self.locate(addr) {
            self.regions[i].words[p / 64] &= !(1 << (p % 64));
        }
    }

    /// ORs `other` in (e.g. folding back the pages of a transfer that failed).
    pub fn union(&mut self, other: &DirtySet) -> Result<(), DirtyError> {
        if self.regions.len() != other.regions.len()
            || self
                .regions
                .iter()
                .zip(&other.regions)
                .any(|(a, b)| a.start != b.start || a.pages != b.pages)
        {
            return Err(DirtyError::Layout("union of sets for different memory"));
        }
        for (a, b) in self.regions.iter_mut().zip(&other.regions) {
            a.or_words(&b.words);
        }
        Ok(())
    }

    /// Guest addresses of the dirty pages, ascending within each region.
    pub fn pages(&self) -> impl Iterator<Item = GuestAddress> + '_ {
        self.regions.iter().flat_map(|r| {
            r.words
                .iter()
                .enumerate()
                .filter(|(_, w)| **w != 0)
                .flat_map(move |(wi, w)| {
                    Bits(*w).map(move |b| {
                        GuestAddress(r.start.0 + (((wi * 64 + b) as u64) << PAGE_SHIFT))
                    })
                })
        })
    }

    /// Maximal runs of contiguous dirty pages, as `(start, bytes)`; a run never spans
    /// two regions.
    pub fn runs(&self) -> impl Iterator<Item = (GuestAddress, u64)> + '_ {
        Runs {
            pages: Box::new(self.pages()),
            pending: None,
        }
    }
}

/// Set bit positions of a word, lowest first.
struct Bits(u64);

impl Iterator for Bits {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.0 == 0 {
            return None;
        }
        let b = self.0.trailing_zeros() as usize;
        self.0 &= self.0 - 1;
        Some(b)
    }
}

struct Runs<'a> {
    pages: Box<dyn Iterator<Item = GuestAddress> + 'a>,
    pending: Option<(GuestAddress, u64)>,
}

impl Iterator for Runs<'_> {
    type Item = (GuestAddress, u64);
    fn next(&mut self) -> Option<(GuestAddress, u64)> {
        for p in self.pages.by_ref() {
            match &mut self.pending {
                Some((start, len)) if start.0 + *len == p.0 => *len += PAGE_SIZE,
                _ => {
                    if let Some(done) = self.pending.replace((p, PAGE_SIZE)) {
                        return Some(done);
                    }
                }
            }
        }
        self.pending.take()
    }
}

/// What one harvest found and what it cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HarvestStats {
    /// Pages KVM logged (vCPU writes).
    pub kvm_pages: usize,
    /// Pages vm-memory logged (VMM writes).
    pub vmm_pages: usize,
    /// Pages in the result (the union; a page in both counts once). Only counted when
    /// the result started empty, else the pages newly added plus those already there.
    pub total_pages: usize,
    /// Time in the KVM log (GET + CLEAR, or the ring's harvest and reset).
    pub kvm_time: Duration,
    /// Time taking and resetting the VMM's bitmaps.
    pub vmm_time: Duration,
    /// Pages left writable by the hot-page policy (reported again next harvest).
    pub hot_pages: usize,
}

/// How vCPU writes are logged by KVM: the slot bitmap ([`BitmapSource`]) or, on
/// hosts where it works, the dirty ring.
pub trait KvmDirtySource: Send {
    /// Short name for logs and reports.
    fn name(&self) -> &'static str;

    /// Turns logging on for every slot of `mem` and discards what was logged before,
    /// so the next harvest returns only writes made after this call.
    fn enable(&mut self, vm: &Vm, mem: &GuestMemoryMmap) -> Result<(), DirtyError>;

    /// ORs the pages written by vCPUs since the previous harvest (or `enable`) into
    /// `out`, and re-arms logging for them. vCPUs must not be running. Returns how many
    /// pages KVM reported.
    fn harvest(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        out: &mut DirtySet,
    ) -> Result<usize, DirtyError>;

    /// Turns logging off.
    fn disable(&mut self, vm: &Vm, mem: &GuestMemoryMmap) -> Result<(), DirtyError>;

    /// Leaves pages written in consecutive harvests writable (see
    /// [`super::hot_pages`]); `None` re-protects everything at each harvest. False when
    /// this log cannot do it (then nothing changes).
    fn set_hot_pages(&mut self, _cfg: Option<HotPageConfig>) -> bool {
        false
    }

    /// Pages the last harvest left writable.
    fn hot_pages(&self) -> usize {
        0
    }
}

/// KVM's per-slot dirty bitmap, with manual re-protect when the kernel offers it
/// (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): GET is then a plain copy of the bitmap and
/// `KVM_CLEAR_DIRTY_LOG` re-protects only the pages that were dirty. Without it, GET
/// clears the log and re-protects every page of the slot itself.
pub struct BitmapSource {
    manual: bool,
    /// Per-slot buffer for KVM_GET_DIRTY_LOG, reused across harvests.
    bufs: Vec<Vec<u64>>,
    /// Hot-page policy (manual re-protect only) and its buffer of pages to clear.
    hot: Option<HotPages>,
    clear: Vec<u64>,
}

impl BitmapSource {
    /// Probes the kernel's support for manual re-protect.
    pub fn new(vm: &Vm) -> BitmapSource {
        let caps = vm
            .fd()
            .check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
        BitmapSource {
            manual: caps > 0 && caps as u32 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0,
            bufs: Vec::new(),
            hot: None,
            clear: Vec::new(),
        }
    }

    /// The legacy mode (GET clears and re-protects the whole slot); for measuring and
    /// for kernels without manual protect.
    pub fn without_manual_protect() -> BitmapSource {
        BitmapSource {
            manual: false,
            bufs: Vec::new(),
            hot: None,
            clear: Vec::new(),
        }
    }

    pub fn manual_protect(&self) -> bool {
        self.manual
    }

    fn get_log(vm: &VmFd, slot: u32, buf: &mut [u64]) -> Result<(), DirtyError> {
        let log = kvm_dirty_log {
            slot,
            padding1: 0,
            __bindgen_anon_1: kvm_dirty_log__bindgen_ty_1 {
                dirty_bitmap: buf.as_mut_ptr().cast::<c_void>(),
            },
        };
        // SAFETY: `buf` holds one bit per page of slot `slot` rounded up to whole u64
        // words, which is the size KVM writes (ALIGN(npages, 64) / 8); it outlives the
        // call and the ioctl writes nothing else. The return value is checked.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_GET_DIRTY_LOG(), &log) };
        if ret < 0 {
            return Err(DirtyError::GetLog {
                slot,
                source: vmm_sys_util::errno::Error::last(),
            });
        }
        Ok(())
    }

    fn clear_log(vm: &VmFd, slot: u32, pages: usize, buf: &mut [u64]) -> Result<(), DirtyError> {
        let log = kvm_clear_dirty_log {
            slot,
            // A whole slot at once: first_page 0 (64-aligned), num_pages reaching the
            // end of the slot, as KVM requires.
            num_pages: u32::try_from(pages).map_err(|_| DirtyError::Layout("slot too large"))?,
            first_page: 0,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: buf.as_mut_ptr().cast::<c_void>(),
            },
        };
        // SAFETY: `buf` holds ALIGN(pages, 64) / 8 bytes, which is what KVM reads for
        // `num_pages` pages from page 0; it outlives the call and KVM only reads it.
        // The return value is checked.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &log) };
        if ret < 0 {
            return Err(DirtyError::ClearLog {
                slot,
                source: vmm_sys_util::errno::Error::last(),
            });
        }
        Ok(())
    }

    fn size_bufs(&mut self, mem: &GuestMemoryMmap) {
        self.bufs = mem
            .iter()
            .map(|r| vec![0u64; (r.len().div_ceil(PAGE_SIZE) as usize).div_ceil(64)])
            .collect();
    }
}

impl KvmDirtySource for BitmapSource {
    fn name(&self) -> &'static str {
        if self.manual {
            "kvm-bitmap-manual-protect"
        } else {
            "kvm-bitmap"
        }
    }

    fn enable(&mut self, vm: &Vm, mem: &GuestMemoryMmap) -> Result<(), DirtyError> {
        if self.manual {
            // INITIALLY_SET: turning logging on does not write-protect the whole slot
            // at once (hardware KVM keeps huge pages until a CLEAR); every bit starts
            // set and the CLEAR below re-protects everything as the baseline.
            let caps = vm
                .fd()
                .check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))
                as u64;
            let flags = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
                | (caps & u64::from(KVM_DIRTY_LOG_INITIALLY_SET));
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            cap.args[0] = flags;
            vm.fd()
                .enable_cap(&cap)
                .map_err(|source| DirtyError::EnableManualProtect { flags, source })?;
        }
        vm.set_slot_flags(mem, SlotFlags { dirty_log: true })?;
        self.size_bufs(mem);
        // Discard the log so far: the baseline.
        let mut scratch = DirtySet::new(mem);
        let hot = self.hot.take();
        let r = self.harvest(vm, mem, &mut scratch);
        self.hot = hot.map(|mut h| {
            // The baseline reports every page: it says nothing of what is hot.
            h.reset();
            h
        });
        r?;
        Ok(())
    }

    fn harvest(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        out: &mut DirtySet,
    ) -> Result<usize, DirtyError> {
        if self.bufs.len() != mem.num_regions() || out.regions.len() != self.bufs.len() {
            return Err(DirtyError::Layout("slots changed since tracking started"));
        }
        let mut pages = 0;
        if let Some(h) = &mut self.hot {
            h.begin(self.bufs.iter().map(Vec::len));
        }
        for (slot, (buf, region)) in self.bufs.iter_mut().zip(&mut out.regions).enumerate() {
            let slot_no = slot as u32;
            Self::get_log(vm.fd(), slot_no, buf)?;
            let any = region.or_words(buf);
            if any {
                pages += buf.iter().map(|w| w.count_ones() as usize).sum::<usize>();
                if self.manual {
                    match &mut self.hot {
                        Some(h) => {
                            self.clear.clear();
                            self.clear.resize(buf.len(), 0);
                            h.select(slot, buf, &mut self.clear);
                            Self::clear_log(vm.fd(), slot_no, region.pages, &mut self.clear)?;
                        }
                        None => Self::clear_log(vm.fd(), slot_no, region.pages, buf)?,
                    }
                }
            }
        }
        Ok(pages)
    }

    fn disable(&mut self, vm: &Vm, mem: &GuestMemoryMmap) -> Result<(), DirtyError> {
        vm.set_slot_flags(mem, SlotFlags { dirty_log: false })?;
        Ok(())
    }

    fn set_hot_pages(&mut self, cfg: Option<HotPageConfig>) -> bool {
        if !self.manual {
            // Without manual re-protect, GET itself re-protects the whole slot.
            return false;
        }
        self.hot = cfg.map(HotPages::new);
        true
    }

    fn hot_pages(&self) -> usize {
        self.hot.as_ref().map_or(0, HotPages::hot)
    }
}

/// Takes and resets the VMM-side dirty bitmap of every region of `mem`, ORing it into
/// `out`. Returns how many pages were set.
///
/// vm-memory 0.18 offers no cheaper snapshot-and-clear than `get_and_reset`, which
/// swaps every word (one atomic per 64 pages) into a fresh Vec; for 1 GiB that is 4096
/// words, a few microseconds.
pub fn take_vmm_writes(mem: &GuestMemoryMmap, out: &mut DirtySet) -> Result<usize, DirtyError> {
    if out.regions.len() != mem.num_regions() {
        return Err(DirtyError::Layout("region count"));
    }
    let mut pages = 0;
    for (region, set) in mem.iter().zip(&mut out.regions) {
        let bitmap: &AtomicBitmap = MmapRegion::bitmap(region);
        let words = bitmap.get_and_reset();
        if set.or_words(&words) {
            pages += words.iter().map(|w| w.count_ones() as usize).sum::<usize>();
        }
    }
    Ok(pages)
}

/// Combines KVM's log of vCPU writes with vm-memory's log of VMM writes.
pub struct DirtyTracker {
    kvm: Box<dyn KvmDirtySource>,
}

impl DirtyTracker {
    /// The default: KVM's bitmap, with manual re-protect when available.
    pub fn new(vm: &Vm) -> DirtyTracker {
        DirtyTracker::with_source(Box::new(BitmapSource::new(vm)))
    }

    pub fn with_source(kvm: Box<dyn KvmDirtySource>) -> DirtyTracker {
        DirtyTracker { kvm }
    }

    pub fn source_name(&self) -> &'static str {
        self.kvm.name()
    }

    /// See [`KvmDirtySource::set_hot_pages`].
    pub fn set_hot_pages(&mut self, cfg: Option<HotPageConfig>) -> bool {
        self.kvm.set_hot_pages(cfg)
    }

    /// Turns logging on and clears both logs: the next harvest returns the pages
    /// written after this call. Take the baseline copy of memory after this returns.
    pub fn start(&mut self, vm: &Vm, mem: &GuestMemoryMmap) -> Result<(), DirtyError> {
        self.kvm.enable(vm, mem)?;
        let mut scratch = DirtySet::new(mem);
        take_vmm_writes(mem, &mut scratch)?;
        Ok(())
    }

    /// ORs every page written since the previous harvest (or `start`) into `out`.
    /// The caller guarantees that nothing writes guest memory meanwhile (VM paused).
    pub fn harvest_into(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        out: &mut DirtySet,
    ) -> Result<HarvestStats, DirtyError> {
        let t0 = Instant::now();
        let kvm_pages = self.kvm.harvest(vm, mem, out)?;
        let t1 = Instant::now();
        let vmm_pages = take_vmm_writes(mem, out)?;
        let t2 = Instant::now();
        Ok(HarvestStats {
            kvm_pages,
            vmm_pages,
            total_pages: out.count(),
            kvm_time: t1 - t0,
            vmm_time: t2 - t1,
            hot_pages: self.kvm.hot_pages(),
        })
    }

    pub fn stop(&mut self, vm: &Vm, mem: &GuestMemoryMmap) -> Result<(), DirtyError> {
        self.kvm.disable(vm, mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use vm_memory::Bytes;

    #[test]
    fn set_iterates_pages_and_runs() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let mut s = DirtySet::new(&mem);
        assert!(s.is_empty());
        s.mark(GuestAddress(0x1000), 1);
        s.mark(GuestAddress(0x2fff), 2); // pages 2 and 3
        s.mark(GuestAddress(0x40_0000), 4096 * 70); // crosses a word boundary
        s.mark(GuestAddress(0xff_f000), 4096);
        s.mark(GuestAddress(0x100_0000), 4096); // outside: ignored
        assert_eq!(s.count(), 3 + 70 + 1);
        assert!(s.contains(GuestAddress(0x3abc)));
        assert!(!s.contains(GuestAddress(0x4000)));
        let runs: Vec<_> = s.runs().collect();
        assert_eq!(
            runs,
            vec![
                (GuestAddress(0x1000), 3 * 4096),
                (GuestAddress(0x40_0000), 70 * 4096),
                (GuestAddress(0xff_f000), 4096)
            ]
        );
        assert_eq!(s.pages().count(), s.count());
        assert_eq!(s.pages().nth(3), Some(GuestAddress(0x40_0000)));
        s.unmark(GuestAddress(0x2000));
        assert_eq!(s.runs().next(), Some((GuestAddress(0x1000), 4096)));
        let full = DirtySet::full(&mem);
        assert_eq!(full.count(), 4096);
        assert_eq!(
            full.runs().collect::<Vec<_>>(),
            vec![(GuestAddress(0), 16 << 20)]
        );
        let mut u = DirtySet::new(&mem);
        u.union(&s).unwrap();
        assert_eq!(u, s);
        let other = DirtySet::new(&create_guest_memory(32 << 20).unwrap());
        assert!(u.union(&other).is_err());
    }

    #[test]
    fn vmm_writes_are_taken_once() {
        let mem = create_guest_memory(16 << 20).unwrap();
        let mut s = DirtySet::new(&mem);
        take_vmm_writes(&mem, &mut s).unwrap();
        s.clear();
        mem.write_obj(1u64, GuestAddress(0x5008)).unwrap();
        mem.write_slice(&[1u8; 8192], GuestAddress(0x9_0800))
            .unwrap();
        assert_eq!(take_vmm_writes(&mem, &mut s).unwrap(), 4);
        assert_eq!(
            s.pages().collect::<Vec<_>>(),
            [0x5000, 0x9_0000, 0x9_1000, 0x9_2000].map(GuestAddress)
        );
        let mut again = DirtySet::new(&mem);
        assert_eq!(take_vmm_writes(&mem, &mut again).unwrap(), 0);
        assert!(again.is_empty());
    }
}
