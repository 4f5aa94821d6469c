//! KVM's dirty ring as a [`KvmDirtySource`]: a harvest that costs per dirty page.
//!
//! With the ring (`KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]`), KVM does not set bits in a slot
//! bitmap: each vCPU pushes `(slot, page offset)` of every page it dirties onto its own
//! ring, a `kvm_dirty_gfn` array shared with the VMM through an mmap of the vCPU fd.
//! A harvest walks each ring from where the previous one stopped, up to the first entry
//! KVM has not published (`flags & DIRTY`), marks the entries taken (`RESET`), and one
//! `KVM_RESET_DIRTY_RINGS` then re-protects exactly those pages. Nothing of it walks a
//! whole-slot bitmap (the bitmap source's `KVM_GET_DIRTY_LOG` copies 32 KiB per GiB).
//!
//! Measured (pause bench, release, two runs, load 12-16, one vCPU, 1,000 scattered
//! pages, 256 MiB -> 16 GiB): the walk of the ring is flat, 20-36 us (the bitmap's GET
//! and scan: 15 -> 168 us); what is left is KVM's re-protect in the reset, which on
//! this shadow-paging KVM costs per page and grows with the guest's size as the
//! bitmap's CLEAR does (reset 212-222 -> 351-431 us; CLEAR 119-169 -> 586-639 us):
//! harvest 235-251 -> 404-509 us against the bitmap's 155-194 -> 756-866 us. At
//! 10,000 pages the reset costs more than the ranged CLEAR (1.4-1.6 ms against
//! 0.2 ms at 256 MiB), so the bitmap stays the default. With early re-protects
//! ([`KvmDirtySource::pre_harvest`]) the pause's harvest is 15 -> 109 us on the ring
//! against 16 -> 191 us on the bitmap (what grows is ORing the early set's scattered
//! words into the result, per page but with more cache misses in larger bitmaps).

//! Rules the ring brings:
//! - It is a property of the VM, enabled before any vCPU exists ([`enable_dirty_ring`],
//!   a build option), and `KVM_GET_DIRTY_LOG` is refused once it is on: a VM built
//!   with the ring is tracked by [`RingSource`] only, one without it by the bitmap.
//! - A ring can fill while the guest runs (more pages dirtied between harvests than it
//!   holds). KVM then stops that vCPU with `KVM_EXIT_DIRTY_RING_FULL` before the ring
//!   overflows; its thread drains its own ring into a pending set
//!   ([`DirtyRings::drain_full`]), resets, and re-enters. The next harvest returns the
//!   pending pages: nothing is lost, and those pages were re-protected early (as the
//!   bitmap's `pre_harvest` does on purpose).
//! - A page stays writable from its first logged write until the reset re-protects it,
//!   so the ring cannot leave hot pages writable across harvests: `set_hot_pages` says
//!   no, and callers re-protect everything (they log it and go on).
//!
//! Memory ordering: KVM writes an entry's slot and offset, then sets `DIRTY` with
//! release semantics (`..._ACQ_REL`; on x86 plain stores are ordered anyway); the VMM
//! loads the flags with acquire before reading the entry, and stores `RESET` with
//! release after it, so KVM's reset sees a fully read entry.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVMIO, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::VcpuFd;
use twinrun_lock::MutexExt;
use vm_memory::GuestMemoryBackend;

use super::{DirtyError, DirtySet, KvmDirtySource};
use crate::vstate::memory::{GuestMemoryMmap, SlotFlags};
use crate::vstate::vm::Vm;

vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

/// Entry published by KVM (`KVM_DIRTY_GFN_F_DIRTY`).
const GFN_DIRTY: u32 = 1;
/// Entry taken by the VMM, to be collected by `KVM_RESET_DIRTY_RINGS`.
const GFN_RESET: u32 = 2;
/// Bytes of one `kvm_dirty_gfn`.
const GFN_BYTES: u32 = std::mem::size_of::<kvm_dirty_gfn>() as u32;

/// Entries per vCPU ring unless the build asks otherwise: 32,768 (512 KiB of kernel
/// memory per vCPU, shared with the VMM). A harvest costs per entry used, not per
/// entry of the ring, so a large ring costs only memory; a small one costs full
/// exits (a drain on the vCPU thread) when the guest dirties more between harvests.
pub const DEFAULT_RING_ENTRIES: u32 = 32_768;

/// The largest ring this KVM allows, in entries; 0 when it has no dirty ring.
pub fn ring_max_entries(vm: &Vm) -> u32 {
    [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
        .into_iter()
        .map(|c| vm.fd().check_extension_raw(u64::from(c)))
        .find(|&b| b > 0)
        .map_or(0, |bytes| (bytes as u64 / u64::from(GFN_BYTES)) as u32)
}

/// Turns the dirty ring on for `vm` with `entries` per vCPU (a power of two, at least
/// one page of entries). Only before any vCPU is created.
pub fn enable_dirty_ring(vm: &Vm, entries: u32) -> Result<(), DirtyError> {
    let max = ring_max_entries(vm);
    if max == 0 {
        return Err(DirtyError::RingUnsupported);
    }
    if !entries.is_power_of_two() || entries < 4096 / GFN_BYTES || entries > max {
        return Err(DirtyError::RingSize { entries, max });
    }
    // The acquire/release flavour where offered (required on weakly ordered hosts;
    // the same on x86).
    let cap_no = if vm
        .fd()
        .check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING_ACQ_REL))
        > 0
    {
        KVM_CAP_DIRTY_LOG_RING_ACQ_REL
    } else {
        KVM_CAP_DIRTY_LOG_RING
    };
    let mut cap = kvm_enable_cap {
        cap: cap_no,
        ..Default::default()
    };
    cap.args[0] = u64::from(entries) * u64::from(GFN_BYTES);
    vm.fd()
        .enable_cap(&cap)
        .map_err(|source| DirtyError::EnableRing { entries, source })
}

/// One vCPU's ring, mapped from its fd.
struct Ring {
    gfns: *mut kvm_dirty_gfn,
    entries: u32,
    /// Next entry to read (free-running; the slot is `fetch & (entries - 1)`).
    fetch: u32,
}

// SAFETY: `gfns` points into a shared mapping owned by this value (unmapped in Drop);
// the entries are accessed only through `&mut Ring` (behind a Mutex in `DirtyRings`)
// with atomic loads/stores of the flags, so moving it to another thread is sound.
unsafe impl Send for Ring {}

impl Ring {
    fn map(fd: &VcpuFd, entries: u32) -> std::io::Result<Ring> {
        let len = entries as usize * GFN_BYTES as usize;
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let offset = i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page as i64;
        // SAFETY: maps `len` bytes of the vCPU fd's dirty-ring area, which KVM sized
        // (entries * 16 bytes, set by KVM_ENABLE_CAP) at vCPU creation; a fresh
        // mapping touches no existing memory. The result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Ring {
            gfns: ptr.cast(),
            entries,
            fetch: 0,
        })
    }

    /// Takes every published entry from `fetch` on: `f(slot, offset)` for each, then
    /// marks it for KVM's reset. Returns how many.
    fn drain(&mut self, mut f: impl FnMut(u32, u64)) -> usize {
        let mut n = 0;
        loop {
            let i = (self.fetch & (self.entries - 1)) as usize;
            // SAFETY: `i < entries`, so the entry lies inside the mapping, which lives
            // as long as `self`; kvm_dirty_gfn is 8-aligned, so its `flags` is a valid,
            // aligned u32 that KVM also accesses only atomically.
            let (flags, gfn) = unsafe {
                let e = self.gfns.add(i);
                let flags = AtomicU32::from_ptr(std::ptr::addr_of_mut!((*e).flags));
                (flags, e)
            };
            if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                break;
            }
            // SAFETY: a published entry: KVM wrote slot and offset before the DIRTY flag
            // (acquire above), and does not touch the entry again until it sees RESET.
            let (slot, offset) = unsafe {
                (
                    std::ptr::read_volatile(std::ptr::addr_of!((*gfn).slot)),
                    std::ptr::read_volatile(std::ptr::addr_of!((*gfn).offset)),
                )
            };
            f(slot, offset);
            flags.store(GFN_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; nothing refers to it after.
        unsafe {
            libc::munmap(self.gfns.cast(), self.entries as usize * GFN_BYTES as usize);
        }
    }
}

/// The dirty rings of one VM's vCPUs, shared by the dirty source (harvests, paused or
/// early) and the vCPU threads (ring-full exits).
pub struct DirtyRings {
    rings: Vec<Mutex<Ring>>,
    /// Pages drained by vCPU threads on ring-full exits since the last harvest.
    pending: Mutex<DirtySet>,
    /// A dup of the VM fd, for `KVM_RESET_DIRTY_RINGS` from vCPU threads.
    vm_fd: File,
    entries: u32,
    full_exits: AtomicU64,
    full_pages: AtomicU64,
}

impl DirtyRings {
    /// Maps the ring of every vCPU of `vm` (created after [`enable_dirty_ring`] with
    /// `entries`); `mem` is the VM's memory (slot `i` is region `i`).
    pub fn map(
        vm: &Vm,
        vcpus: &[VcpuFd],
        mem: &GuestMemoryMmap,
        entries: u32,
    ) -> Result<Arc<DirtyRings>, DirtyError> {
        let rings = vcpus
            .iter()
            .enumerate()
            .map(|(i, fd)| {
                Ring::map(fd, entries)
                    .map(Mutex::new)
                    .map_err(|source| DirtyError::MapRing { vcpu: i, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // SAFETY: dup of a valid open fd (the VM's, borrowed for the call); the result
        // is checked and owned by the File alone.
        let dup = unsafe { libc::fcntl(vm.fd().as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(DirtyError::DupVmFd(std::io::Error::last_os_error()));
        }
        // SAFETY: `dup` is a fresh fd nothing else owns.
        let vm_fd = unsafe { File::from_raw_fd(dup) };
        Ok(Arc::new(DirtyRings {
            rings,
            pending: Mutex::new(DirtySet::new(mem)),
            vm_fd,
            entries,
            full_exits: AtomicU64::new(0),
            full_pages: AtomicU64::new(0),
        }))
    }

    /// Entries per vCPU ring.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Ring-full exits handled so far, and the pages they drained.
    pub fn full_exits(&self) -> (u64, u64) {
        (
            self.full_exits.load(Ordering::Relaxed),
            self.full_pages.load(Ordering::Relaxed),
        )
    }

    fn reset(&self) -> Result<(), DirtyError> {
        // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and touches only KVM's state
        // and the rings' entries we marked RESET. The return value is checked.
        let ret = unsafe { vmm_sys_util::ioctl::ioctl(&self.vm_fd, KVM_RESET_DIRTY_RINGS()) };
        if ret < 0 {
            return Err(DirtyError::ResetRings(vmm_sys_util::errno::Error::last()));
        }
        Ok(())
    }

    /// Drains every ring into `out` (which may be `None` to discard). Returns the
    /// entries taken. The caller resets.
    fn drain_all(&self, mut out: Option<&mut DirtySet>) -> Result<usize, DirtyError> {
        let mut n = 0;
        let mut bad = None;
        for r in &self.rings {
            n += r.lock_or_recover().drain(|slot, offset| {
                if let Some(set) = out.as_deref_mut() {
                    if !set_page(set, slot, offset) {
                        bad.get_or_insert((slot, offset));
                    }
                }
            });
        }
        match bad {
            Some((slot, offset)) => Err(DirtyError::RingEntry { slot, offset }),
            None => Ok(n),
        }
    }

    /// On the thread of vCPU `vcpu` after `KVM_EXIT_DIRTY_RING_FULL`, guest running:
    /// drains that vCPU's ring into the pending set the next harvest returns, and
    /// resets, so that the vCPU can re-enter. Returns the pages drained.
    pub fn drain_full(&self, vcpu: usize) -> Result<usize, DirtyError> {
        let ring = self
            .rings
            .get(vcpu)
            .ok_or(DirtyError::Layout("no ring for this vCPU"))?;
        let mut bad = None;
        let n = {
            let mut pending = self.pending.lock_or_recover();
            ring.lock_or_recover().drain(|slot, offset| {
                if !set_page(&mut pending, slot, offset) {
                    bad.get_or_insert((slot, offset));
                }
            })
        };
        self.reset()?;
        self.full_exits.fetch_add(1, Ordering::Relaxed);
        self.full_pages.fetch_add(n as u64, Ordering::Relaxed);
        match bad {
            Some((slot, offset)) => Err(DirtyError::RingEntry { slot, offset }),
            None => Ok(n),
        }
    }
}

/// Sets page `offset` of slot `slot` (address space 0; slot `i` is region `i`) in
/// `set`; false when the entry names no page of it.
fn set_page(set: &mut DirtySet, slot: u32, offset: u64) -> bool {
    let Some(region) = set.regions.get_mut(slot as usize) else {
        return false;
    };
    let Ok(page) = usize::try_from(offset) else {
        return false;
    };
    if page >= region.pages() {
        return false;
    }
    region.or_word(page / 64, 1 << (page % 64));
    true
}

/// KVM's dirty ring as the VM's log of vCPU writes (see the module doc).
pub struct RingSource {
    rings: Arc<DirtyRings>,
    /// Time of the last harvest's `KVM_RESET_DIRTY_RINGS` (the re-protect).
    reset_time: Duration,
    resets: usize,
}

impl RingSource {
    pub fn new(rings: Arc<DirtyRings>) -> RingSource {
        RingSource {
            rings,
            reset_time: Duration::ZERO,
            resets: 0,
        }
    }

    /// Drains every ring into `out`, then one reset re-protects what was taken.
    fn take_into(&mut self, out: &mut DirtySet) -> Result<usize, DirtyError> {
        let n = self.rings.drain_all(Some(out))?;
        self.resets = 0;
        self.reset_time = Duration::ZERO;
        if n > 0 {
            let t = Instant::now();
            self.rings.reset()?;
            self.reset_time = t.elapsed();
            self.resets = 1;
        }
        Ok(n)
    }
}

impl KvmDirtySource for RingSource {
    fn name(&self) -> &'static str {
        "kvm-dirty-ring"
    }

    fn uses_ring(&self) -> bool {
        true
    }

    fn enable(&mut self, vm: &Vm, mem: &GuestMemoryMmap) -> Result<(), DirtyError> {
        if self.rings.pending.lock_or_recover().regions.len() != mem.num_regions() {
            return Err(DirtyError::Layout(
                "slots changed since the rings were mapped",
            ));
        }
        vm.set_slot_flags(mem, SlotFlags { dirty_log: true })?;
        // Discard what was logged so far (a previous tracking session): the baseline.
        let pending_before = {
            let mut p = self.rings.pending.lock_or_recover();
            let n = p.count();
            p.clear();
            n
        };
        let n = self.rings.drain_all(None)?;
        if n > 0 || pending_before > 0 {
            self.rings.reset()?;
        }
        Ok(())
    }

    /// Returns the pages added to `out` (a page logged twice, e.g. by two vCPUs or by
    /// KVM's own emulated writes, counts once).
    fn harvest(
        &mut self,
        _vm: &Vm,
        _mem: &GuestMemoryMmap,
        out: &mut DirtySet,
    ) -> Result<usize, DirtyError> {
        let before = out.count();
        {
            let mut p = self.rings.pending.lock_or_recover();
            out.union(&p)?;
            p.clear();
        }
        self.take_into(out)?;
        Ok(out.count() - before)
    }

    fn pre_harvest(
        &mut self,
        _vm: &Vm,
        _mem: &GuestMemoryMmap,
        early: &mut DirtySet,
    ) -> Result<usize, DirtyError> {
        // Pages ring-full exits drained are taken too: re-protected already. Returns
        // the pages this call took (pages also taken by an earlier call count again,
        // as the bitmap's GET reports them again).
        let pending = {
            let mut p = self.rings.pending.lock_or_recover();
            let n = p.count();
            early.union(&p)?;
            p.clear();
            n
        };
        Ok(pending + self.take_into(early)?)
    }

    fn disable(&mut self, vm: &Vm, mem: &GuestMemoryMmap) -> Result<(), DirtyError> {
        vm.set_slot_flags(mem, SlotFlags { dirty_log: false })?;
        Ok(())
    }

    fn last_clear(&self) -> (Duration, usize) {
        (self.reset_time, self.resets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use vm_memory::GuestAddress;

    #[test]
    fn ring_entries_map_to_pages_of_their_slot() {
        // 4 GiB + 64 MiB: two regions (low RAM below 3 GiB, the rest from 4 GiB).
        let mem = create_guest_memory((3 << 30) + (64 << 20)).unwrap();
        let mut s = DirtySet::new(&mem);
        assert!(set_page(&mut s, 0, 5));
        assert!(set_page(&mut s, 1, 0));
        assert!(set_page(&mut s, 1, (64 << 20) / 4096 - 1));
        assert!(!set_page(&mut s, 1, (64 << 20) / 4096));
        assert!(!set_page(&mut s, 2, 0));
        assert!(!set_page(&mut s, 1 << 16, 0));
        assert_eq!(
            s.pages().collect::<Vec<_>>(),
            vec![
                GuestAddress(5 * 4096),
                GuestAddress(4 << 30),
                GuestAddress((4 << 30) + (64 << 20) - 4096)
            ]
        );
    }
}
