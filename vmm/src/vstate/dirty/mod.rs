//! Dirty page tracking: which guest pages changed since the previous harvest.
//!
//! Two writers change guest memory, and each has its own log:
//! - vCPUs: KVM logs their writes per memory slot (`KVM_MEM_LOG_DIRTY_PAGES`). How the
//!   log is read is behind [`KvmDirtySource`]: the slot bitmap ([`BitmapSource`]) or,
//!   on a VM built with it, the dirty ring ([`RingSource`], see [`ring`]), whose
//!   harvest costs per dirty page with no per-GiB part at all.
//! - the VMM itself (device emulation: virtio used rings, block reads, net RX): KVM never
//!   sees these; the [`SummaryBitmap`] of each region (vm-memory's bitmap type for
//!   guest memory) records them.
//!
//! [`DirtyTracker`] ORs both into one [`DirtySet`]. A harvest must run while no vCPU
//! and no device thread can write guest memory (the VM paused): the caller then copies
//! the harvested pages before resuming. The order that loses nothing is GET (snapshot
//! KVM's bits) -> CLEAR (re-protect exactly those pages) -> copy: a write after the
//! CLEAR faults and is logged again.
//!
//! Cost: a checkpoint pause must not grow with the guest's size, only with what it
//! dirtied. With manual re-protect (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`), GET only
//! copies the slot bitmap (one bit per page: 32 KiB per GiB), which is then scanned
//! once in cache for non-zero words ([`kvm_log`]); CLEAR is issued for ranges of dirty
//! words only. Everything else (the VMM's bitmap, the result set, the hot-page history,
//! counting and iterating) goes through summary levels (one bit per 64-page word) and
//! costs per dirty word.

mod kvm_log;
pub mod ring;
mod set;
mod vmm_bitmap;

use std::time::{Duration, Instant};

use vm_memory::mmap::MmapRegion;
use vm_memory::GuestMemoryBackend;

pub use kvm_log::{clear_ranges, nonzero_words, BitmapSource, CLEAR_MERGE_GAP_WORDS};
pub use ring::{DirtyRings, RingSource, DEFAULT_RING_ENTRIES};
pub use set::{DirtySet, RegionDirty};
pub use vmm_bitmap::SummaryBitmap;

use super::hot_pages::HotPageConfig;
use super::memory::GuestMemoryMmap;
use super::vm::{Vm, VmError};

/// Guest page size that both KVM's log and the VMM's bitmap use on x86-64.
pub const PAGE_SIZE: u64 = 4096;
const PAGE_SHIFT: u32 = 12;

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
    #[error("this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")]
    RingUnsupported,
    #[error("dirty ring of {entries} entries: a power of two from 256 up to {max} is needed")]
    RingSize { entries: u32, max: u32 },
    #[error("KVM_ENABLE_CAP(DIRTY_LOG_RING, {entries} entries): {source}")]
    EnableRing {
        entries: u32,
        source: kvm_ioctls::Error,
    },
    #[error("mapping the dirty ring of vCPU {vcpu}: {source}")]
    MapRing { vcpu: usize, source: std::io::Error },
    #[error("duplicating the VM fd for ring resets: {0}")]
    DupVmFd(std::io::Error),
    #[error("KVM_RESET_DIRTY_RINGS: {0}")]
    ResetRings(vmm_sys_util::errno::Error),
    #[error("dirty ring entry names no guest page (slot {slot:#x}, offset {offset:#x})")]
    RingEntry { slot: u32, offset: u64 },
    #[error("the VM was built with the dirty ring: KVM's bitmap ({0}) cannot be read on it")]
    RingVm(&'static str),
    #[error("the VM was built without the dirty ring: the ring source cannot track it")]
    NoRing,
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
    /// Of `kvm_time`, the time re-protecting (`KVM_CLEAR_DIRTY_LOG`), and how many
    /// calls it took.
    pub kvm_clear_time: Duration,
    pub kvm_clear_calls: usize,
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

    /// True for the dirty ring: a VM built with the ring can be tracked by nothing
    /// else, and one built without it not by the ring.
    fn uses_ring(&self) -> bool {
        false
    }

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

    /// Like [`harvest`](Self::harvest), after early re-protects took `early` (see
    /// [`pre_harvest`](Self::pre_harvest)): ORs `early` into `out` as well.
    fn harvest_after(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        out: &mut DirtySet,
        early: &DirtySet,
    ) -> Result<usize, DirtyError> {
        let before = out.count();
        out.union(early)?;
        let early_pages = out.count() - before;
        Ok(self.harvest(vm, mem, out)? + early_pages)
    }

    /// While the guest runs: takes the pages logged so far into `early` and
    /// re-protects them now, so that the next harvest (in a pause) re-protects only
    /// what is written after this call. A write racing this call is not lost: a page
    /// whose bit GET saw is in `early` (the caller copies it at the harvest, with
    /// whatever it holds then), and a write after its re-protect faults and is logged
    /// again. Returns the pages taken; a log that cannot do it takes none (`Ok(0)`).
    fn pre_harvest(
        &mut self,
        _vm: &Vm,
        _mem: &GuestMemoryMmap,
        _early: &mut DirtySet,
    ) -> Result<usize, DirtyError> {
        Ok(0)
    }

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

    /// Time the last harvest spent re-protecting, and in how many calls.
    fn last_clear(&self) -> (Duration, usize) {
        (Duration::ZERO, 0)
    }
}

/// Takes and resets the VMM-side dirty bitmap of every region of `mem`, ORing it into
/// `out`. Returns how many pages were set. Costs per dirty word (the bitmap's summary
/// level), not per GiB.
pub fn take_vmm_writes(mem: &GuestMemoryMmap, out: &mut DirtySet) -> Result<usize, DirtyError> {
    if out.regions.len() != mem.num_regions() {
        return Err(DirtyError::Layout("region count"));
    }
    let mut pages = 0;
    for (region, set) in mem.iter().zip(&mut out.regions) {
        let bitmap: &SummaryBitmap = MmapRegion::bitmap(region);
        if bitmap.pages() != set.pages() {
            return Err(DirtyError::Layout("region size"));
        }
        bitmap.drain(|w, bits| {
            pages += bits.count_ones() as usize;
            set.or_word(w, bits);
        });
    }
    Ok(pages)
}

/// Combines KVM's log of vCPU writes with vm-memory's log of VMM writes.
pub struct DirtyTracker {
    kvm: Box<dyn KvmDirtySource>,
    /// Pages early re-protects took since the last harvest ([`DirtyTracker::pre_harvest`]).
    early: Option<DirtySet>,
    early_pages: usize,
}

impl DirtyTracker {
    /// The default: KVM's bitmap, with manual re-protect when available.
    pub fn new(vm: &Vm) -> DirtyTracker {
        DirtyTracker::with_source(Box::new(BitmapSource::new(vm)))
    }

    pub fn with_source(kvm: Box<dyn KvmDirtySource>) -> DirtyTracker {
        DirtyTracker {
            kvm,
            early: None,
            early_pages: 0,
        }
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
        if let Some(e) = &mut self.early {
            e.clear();
        }
        self.early_pages = 0;
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
        let early = self.early.as_mut().filter(|_| self.early_pages > 0);
        let kvm_pages = match early {
            Some(e) => {
                let r = self.kvm.harvest_after(vm, mem, out, e);
                // Taken (into `out`) or, on an error, reported by the next harvest:
                // a failed CLEAR leaves KVM's bits set.
                if r.is_ok() {
                    e.clear();
                    self.early_pages = 0;
                }
                r?
            }
            None => self.kvm.harvest(vm, mem, out)?,
        };
        let t1 = Instant::now();
        let vmm_pages = take_vmm_writes(mem, out)?;
        let t2 = Instant::now();
        let (kvm_clear_time, kvm_clear_calls) = self.kvm.last_clear();
        Ok(HarvestStats {
            kvm_pages,
            vmm_pages,
            total_pages: out.count(),
            kvm_time: t1 - t0,
            kvm_clear_time,
            kvm_clear_calls,
            vmm_time: t2 - t1,
            hot_pages: self.kvm.hot_pages(),
        })
    }

    /// While the guest runs, takes what was logged so far and re-protects it now (see
    /// [`KvmDirtySource::pre_harvest`]): the next harvest returns those pages too, but
    /// its re-protect in the pause covers only what was written after this call. On a
    /// shadow-paging KVM that re-protect costs per page and more the larger the guest
    /// (cache and TLB misses in KVM's per-page structures), so taking the pages of an
    /// epoch's first part early keeps that cost out of the pause. Returns the pages
    /// taken by this call.
    pub fn pre_harvest(&mut self, vm: &Vm, mem: &GuestMemoryMmap) -> Result<usize, DirtyError> {
        let early = self.early.get_or_insert_with(|| DirtySet::new(mem));
        let n = self.kvm.pre_harvest(vm, mem, early)?;
        self.early_pages += n;
        Ok(n)
    }

    pub fn stop(&mut self, vm: &Vm, mem: &GuestMemoryMmap) -> Result<(), DirtyError> {
        self.kvm.disable(vm, mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use vm_memory::{Bytes, GuestAddress};

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
