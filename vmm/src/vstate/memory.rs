//! Guest memory.
//!
//! Guest RAM is a `vm-memory` mmap backend with a dirty bitmap per region
//! ([`SummaryBitmap`]: one bit per page plus a summary level, so taking it costs per
//! dirty word), so writes the VMM itself makes to guest memory (device emulation) are
//! tracked beside KVM's own dirty log.
//!
//! The layout follows the guest ABI: low RAM from 0 up to at most
//! [`abi::RAM_GAP_START`], the rest from [`abi::RAM_HIGH_START`]. Each region becomes one
//! KVM memory slot, numbered in region order.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use twinrun_guest_abi as abi;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::dirty::SummaryBitmap;

/// Guest memory as every part of the VMM sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<SummaryBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<SummaryBitmap>;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {0:#x} is zero or not a multiple of 2 MiB")]
    BadSize(u64),
    #[error("guest memory of {0:#x} bytes does not fit the guest-physical address space")]
    TooLarge(u64),
    #[error("cannot map guest memory: {0}")]
    Mmap(#[from] vm_memory::mmap::FromRangesError),
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot}: {source}")]
    SetMemslot {
        slot: u32,
        source: kvm_ioctls::Error,
    },
}

/// Guest RAM ranges `(start, len)` for `size` bytes of RAM, low RAM first.
///
/// `size` must be a non-zero multiple of 2 MiB so that every region is covered by whole
/// 2 MiB pages in the identity map.
pub fn ram_ranges(size: u64) -> Result<Vec<(GuestAddress, usize)>, MemoryError> {
    const TWO_MIB: u64 = 2 << 20;
    if size == 0 || !size.is_multiple_of(TWO_MIB) {
        return Err(MemoryError::BadSize(size));
    }
    let low = size.min(abi::RAM_GAP_START);
    let high = size - low;
    let high_end = abi::RAM_HIGH_START
        .checked_add(high)
        .ok_or(MemoryError::TooLarge(size))?;
    if high_end > abi::MAX_MAPPED_GIB << 30 {
        return Err(MemoryError::TooLarge(size));
    }
    let as_usize = |n: u64| usize::try_from(n).map_err(|_| MemoryError::TooLarge(size));
    let mut ranges = vec![(GuestAddress(0), as_usize(low)?)];
    if high > 0 {
        ranges.push((GuestAddress(abi::RAM_HIGH_START), as_usize(high)?));
    }
    Ok(ranges)
}

/// Allocates guest RAM of `size` bytes (anonymous, shared, zero-filled) laid out per
/// [`ram_ranges`].
pub fn create_guest_memory(size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    Ok(GuestMemoryMmap::from_ranges(&ram_ranges(size)?)?)
}

/// Finds guest pages that were never touched: nothing mapped and nothing swapped out,
/// per `/proc/self/pagemap` (those two bits need no privilege). In private anonymous
/// memory such a page reads as zero, so a copier can skip it without reading it (and
/// without the read fault that would map the zero page into this process).
#[derive(Debug)]
pub struct UntouchedPages {
    pagemap: std::fs::File,
}

/// pagemap entry bits: page present, page swapped out.
const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;

impl UntouchedPages {
    pub fn open() -> std::io::Result<UntouchedPages> {
        Ok(UntouchedPages {
            pagemap: std::fs::File::open("/proc/self/pagemap")?,
        })
    }

    /// `out[i]` = the page at `gpa + i * 4 KiB` was never touched, for `out.len()`
    /// pages. All false whenever nothing can be concluded: memory that is not private
    /// anonymous (a file or shared mapping keeps data it does not map), a range that
    /// is not inside one region, a read error.
    pub fn scan(&self, mem: &GuestMemoryMmap, gpa: u64, out: &mut [bool]) {
        use std::os::unix::fs::FileExt;
        const PAGE: u64 = 4096;
        out.fill(false);
        let Some(region) = mem.find_region(GuestAddress(gpa)) else {
            return;
        };
        let flags = region.flags();
        if region.file_offset().is_some()
            || flags & libc::MAP_ANONYMOUS == 0
            || flags & libc::MAP_PRIVATE == 0
        {
            return;
        }
        let off = gpa - region.start_addr().0;
        let len = out.len() as u64 * PAGE;
        if !off.is_multiple_of(PAGE) || off + len > region.len() {
            return;
        }
        let Ok(host) = region.get_host_address(vm_memory::MemoryRegionAddress(off)) else {
            return;
        };
        let mut raw = vec![0u8; out.len() * 8];
        if self
            .pagemap
            .read_exact_at(&mut raw, host as u64 / PAGE * 8)
            .is_err()
        {
            return;
        }
        for (o, e) in out.iter_mut().zip(raw.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(e);
            *o = u64::from_ne_bytes(b) & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED) == 0;
        }
    }
}

/// End of low RAM and end of high RAM (0 when there is none), as the guest's `Params`
/// block reports them.
pub fn ram_bounds(mem: &GuestMemoryMmap) -> (u64, u64) {
    let mut low_end = 0;
    let mut high_end = 0;
    for r in mem.iter() {
        let end = r.start_addr().0 + r.len();
        if r.start_addr().0 < abi::RAM_GAP_START {
            low_end = low_end.max(end);
        } else {
            high_end = high_end.max(end);
        }
    }
    (low_end, high_end)
}

/// Memory-slot flags for guest RAM. Kept as a type so the later dirty-tracking work can
/// switch logging on and off for every slot with [`set_memslots`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotFlags {
    /// `KVM_MEM_LOG_DIRTY_PAGES`: KVM records guest writes per page.
    pub dirty_log: bool,
}

impl SlotFlags {
    fn bits(self) -> u32 {
        if self.dirty_log {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        }
    }
}

/// Registers (or re-registers with new `flags`) one KVM memory slot per region of
/// `mem`: slot `i` is region `i`. Re-registering an existing slot with the same address
/// and size only changes its flags, which is how dirty logging is toggled.
pub fn set_memslots(vm: &VmFd, mem: &GuestMemoryMmap, flags: SlotFlags) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let desc = kvm_userspace_memory_region {
            slot,
            flags: flags.bits(),
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range is the live mmap of `region`, owned by `mem`. The caller
        // keeps `mem` (which the returned VM handle holds) alive for as long as the VM
        // exists, so KVM never sees a dangling mapping.
        unsafe { vm.set_user_memory_region(desc) }
            .map_err(|source| MemoryError::SetMemslot { slot, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn untouched_pages_are_those_never_written_nor_read() {
        let mem = create_guest_memory(4 << 20).unwrap();
        mem.write_slice(&[1u8; 8], GuestAddress(0x1000)).unwrap();
        let mut b = [0u8; 8];
        // A read maps the zero page: present, so no longer "untouched".
        mem.read_slice(&mut b, GuestAddress(0x3000)).unwrap();
        let u = UntouchedPages::open().unwrap();
        let mut out = [false; 5];
        u.scan(&mem, 0, &mut out);
        assert_eq!(out, [true, false, true, false, true]);
        // Outside guest RAM or crossing its end: nothing concluded.
        let mut out = [true; 2];
        u.scan(&mem, (4 << 20) - 4096, &mut out);
        assert_eq!(out, [false, false]);
        u.scan(&mem, 1 << 40, &mut out);
        assert_eq!(out, [false, false]);
    }

    #[test]
    fn layout_splits_at_the_gap() {
        let r = ram_ranges(128 << 20).unwrap();
        assert_eq!(r, vec![(GuestAddress(0), 128 << 20)]);
        let r = ram_ranges(4 << 30).unwrap();
        assert_eq!(
            r,
            vec![
                (GuestAddress(0), abi::RAM_GAP_START as usize),
                (GuestAddress(abi::RAM_HIGH_START), (1 << 30) as usize)
            ]
        );
        assert!(matches!(ram_ranges(0), Err(MemoryError::BadSize(0))));
        assert!(matches!(ram_ranges(4097), Err(MemoryError::BadSize(_))));
        assert!(matches!(
            ram_ranges(64 << 30),
            Err(MemoryError::TooLarge(_))
        ));
    }

    #[test]
    fn memory_is_zeroed_and_tracks_vmm_writes() {
        let mem = create_guest_memory(16 << 20).unwrap();
        assert_eq!(ram_bounds(&mem), (16 << 20, 0));
        let v: u64 = mem.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0);
        mem.write_obj(7u64, GuestAddress(0x3000)).unwrap();
        let region = mem.find_region(GuestAddress(0x3000)).unwrap();
        use vm_memory::bitmap::Bitmap;
        assert!(region.bitmap().dirty_at(0x3000));
        assert!(!region.bitmap().dirty_at(0x5000));
    }
}
