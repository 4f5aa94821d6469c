//! KVM's per-slot dirty bitmap as a [`KvmDirtySource`].
//!
//! With manual re-protect (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`), `KVM_GET_DIRTY_LOG`
//! only copies the slot's bitmap out (32 KiB per GiB) and `KVM_CLEAR_DIRTY_LOG`
//! re-protects the pages whose bits it is given. What a harvest still does per GiB is
//! that copy and one pass over it to find the non-zero words (done 32 words at a time,
//! while the bitmap is in cache from the copy); everything else costs per dirty word:
//! the words go into the [`DirtySet`] through its summary level, and the CLEAR is
//! issued for ranges of dirty words only, not for the whole slot, since KVM walks (and
//! copies in) every word of the range it is given. Two dirty words less than
//! [`CLEAR_MERGE_GAP_WORDS`] apart share one CLEAR: a system call costs about as much
//! as KVM's walk over that many empty words.

use std::os::raw::c_void;

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_dirty_log,
    kvm_dirty_log__bindgen_ty_1, kvm_enable_cap, KVMIO, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{DirtyError, DirtySet, KvmDirtySource, PAGE_SIZE};
use crate::vstate::hot_pages::{HotPageConfig, HotPages};
use crate::vstate::memory::{GuestMemoryMmap, SlotFlags};
use crate::vstate::vm::Vm;

// kvm-ioctls 0.25 wraps neither KVM_CLEAR_DIRTY_LOG nor a KVM_GET_DIRTY_LOG into a
// caller-owned buffer (its `get_dirty_log` allocates on every call).
vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);
vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Dirty words closer than this (in 64-page words) are re-protected by one
/// `KVM_CLEAR_DIRTY_LOG` covering the gap: KVM copies in and walks about 256 empty
/// words (2 KiB) in the time of one extra system call here.
pub const CLEAR_MERGE_GAP_WORDS: usize = 256;

/// Indices of the non-zero words of `bits`, appended to `out` in ascending order.
/// Reads 32 words (256 bytes) per step with one OR-reduction, which the compiler
/// vectorises; the common all-zero block costs a few instructions.
pub fn nonzero_words(bits: &[u64], out: &mut Vec<usize>) {
    const BLOCK: usize = 32;
    let mut base = 0;
    let mut chunks = bits.chunks_exact(BLOCK);
    for c in chunks.by_ref() {
        if c.iter().fold(0, |a, w| a | w) != 0 {
            out.extend((0..BLOCK).filter(|i| c[*i] != 0).map(|i| base + i));
        }
        base += BLOCK;
    }
    let rest = chunks.remainder();
    out.extend((0..rest.len()).filter(|i| rest[*i] != 0).map(|i| base + i));
}

/// Ranges `[first, last]` of word indices to clear together: `words` ascending, two
/// consecutive words merged when fewer than `gap` words apart.
pub fn clear_ranges(words: &[usize], gap: usize, mut f: impl FnMut(usize, usize)) {
    let mut it = words.iter().copied();
    let Some(mut first) = it.next() else {
        return;
    };
    let mut last = first;
    for w in it {
        if w - last > gap {
            f(first, last);
            first = w;
        }
        last = w;
    }
    f(first, last);
}

/// `a` and `b` (both ascending) merged into `out`, ascending, each index once.
pub fn merge_sorted(a: &[usize], b: impl Iterator<Item = usize>, out: &mut Vec<usize>) {
    out.clear();
    let mut i = 0;
    for x in b {
        while i < a.len() && a[i] < x {
            out.push(a[i]);
            i += 1;
        }
        if i < a.len() && a[i] == x {
            i += 1;
        }
        out.push(x);
    }
    out.extend_from_slice(&a[i..]);
}

/// KVM's per-slot dirty bitmap, with manual re-protect when the kernel offers it
/// (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): GET is then a plain copy of the bitmap and
/// `KVM_CLEAR_DIRTY_LOG` re-protects only the pages that were dirty. Without it, GET
/// clears the log and re-protects every page of the slot itself.
pub struct BitmapSource {
    manual: bool,
    /// Per-slot buffer for KVM_GET_DIRTY_LOG, reused across harvests; after a harvest
    /// its dirty words hold what was re-protected.
    bufs: Vec<Vec<u64>>,
    /// Per-slot page counts.
    slot_pages: Vec<usize>,
    /// Indices of the non-zero words of the slot being harvested.
    dirty_words: Vec<usize>,
    /// Hot-page policy (manual re-protect only).
    hot: Option<HotPages>,
    /// CLEAR ioctls issued by the last harvest and their time (for measurements).
    clears: usize,
    clear_time: std::time::Duration,
    /// Words an early re-protect added to a harvest's bitmap: `(index, what GET
    /// reported there)`, restored before the CLEAR.
    saved: Vec<(usize, u64)>,
    /// GET's dirty words merged with the early set's (sorted), for the hot-page policy.
    merged: Vec<usize>,
}

impl BitmapSource {
    /// Probes the kernel's support for manual re-protect.
    pub fn new(vm: &Vm) -> BitmapSource {
        let caps = vm
            .fd()
            .check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
        let mut s = BitmapSource::without_manual_protect();
        s.manual = caps > 0 && caps as u32 & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE != 0;
        s
    }

    /// The legacy mode (GET clears and re-protects the whole slot); for measuring and
    /// for kernels without manual protect.
    pub fn without_manual_protect() -> BitmapSource {
        BitmapSource {
            manual: false,
            bufs: Vec::new(),
            slot_pages: Vec::new(),
            dirty_words: Vec::new(),
            hot: None,
            clears: 0,
            clear_time: std::time::Duration::ZERO,
            saved: Vec::new(),
            merged: Vec::new(),
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

    /// Re-protects the pages set in `buf[first..=last]` (words of the slot's bitmap).
    fn clear_log(
        vm: &VmFd,
        slot: u32,
        slot_pages: usize,
        buf: &[u64],
        first: usize,
        last: usize,
    ) -> Result<(), DirtyError> {
        let first_page = first * 64;
        // KVM wants first_page 64-aligned and num_pages a multiple of 64 unless the
        // range reaches the end of the slot.
        let end_page = ((last + 1) * 64).min(slot_pages);
        let words = &buf[first..=last];
        let log = kvm_clear_dirty_log {
            slot,
            num_pages: u32::try_from(end_page - first_page)
                .map_err(|_| DirtyError::Layout("slot too large"))?,
            first_page: first_page as u64,
            __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                dirty_bitmap: words.as_ptr().cast_mut().cast::<c_void>(),
            },
        };
        // SAFETY: KVM reads ALIGN(num_pages, 64) / 8 bytes from `dirty_bitmap`, which is
        // `words.len()` words: `words` is borrowed for the call and KVM only reads it.
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

    /// Re-protects the pages set in the words `words` (ascending) of `buf`, in ranges
    /// (see [`CLEAR_MERGE_GAP_WORDS`]); returns how many CLEAR calls it took.
    fn clear_words(
        vm: &VmFd,
        slot: u32,
        slot_pages: usize,
        buf: &[u64],
        words: &[usize],
    ) -> Result<usize, DirtyError> {
        let mut result = Ok(());
        let mut calls = 0;
        clear_ranges(words, CLEAR_MERGE_GAP_WORDS, |first, last| {
            if result.is_ok() && buf[first..=last].iter().any(|w| *w != 0) {
                calls += 1;
                result = Self::clear_log(vm, slot, slot_pages, buf, first, last);
            }
        });
        result.map(|()| calls)
    }

    /// A harvest; `early` holds what early re-protects took since the previous one
    /// (already re-protected: it goes into `out` and into the hot-page history, and
    /// is not cleared again).
    fn harvest_impl(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        out: &mut DirtySet,
        early: Option<&DirtySet>,
    ) -> Result<usize, DirtyError> {
        if self.bufs.len() != mem.num_regions()
            || out.regions.len() != self.bufs.len()
            || early.is_some_and(|e| e.regions.len() != self.bufs.len())
        {
            return Err(DirtyError::Layout("slots changed since tracking started"));
        }
        let mut pages = 0;
        self.clears = 0;
        self.clear_time = std::time::Duration::ZERO;
        if let Some(h) = &mut self.hot {
            h.begin(self.bufs.iter().map(Vec::len));
        }
        for (slot, (buf, region)) in self.bufs.iter_mut().zip(&mut out.regions).enumerate() {
            let slot_no = slot as u32;
            Self::get_log(vm.fd(), slot_no, buf)?;
            self.dirty_words.clear();
            nonzero_words(buf, &mut self.dirty_words);
            for &w in &self.dirty_words {
                pages += buf[w].count_ones() as usize;
                region.or_word(w, buf[w]);
            }
            let early_words = early.map(|e| &e.regions[slot]);
            if let Some(e) = early_words {
                for (w, bits) in e.dirty_words() {
                    pages += (bits & !buf[w]).count_ones() as usize;
                    region.or_word(w, bits);
                }
            }
            if !self.manual {
                continue;
            }
            if let Some(h) = &mut self.hot {
                // The policy sees every page reported since the previous harvest, the
                // early ones included (a page the guest rewrites every epoch before
                // the early re-protect is as hot as one it rewrites after).
                self.saved.clear();
                self.merged.clear();
                if let Some(e) = early_words {
                    for (w, bits) in e.dirty_words() {
                        self.saved.push((w, buf[w]));
                        buf[w] |= bits;
                    }
                }
                let words: &[usize] = if self.saved.is_empty() {
                    &self.dirty_words
                } else {
                    merge_sorted(
                        &self.dirty_words,
                        self.saved.iter().map(|s| s.0),
                        &mut self.merged,
                    );
                    &self.merged
                };
                // Rewrites those words of `buf` to what must be re-protected.
                h.select(slot, words, buf);
                // Early pages are re-protected already (or written again since, and
                // then in GET's bits): CLEAR only what GET reported.
                for &(w, got) in &self.saved {
                    buf[w] &= got;
                }
            }
            if self.dirty_words.is_empty() {
                continue;
            }
            let t = std::time::Instant::now();
            let r = Self::clear_words(
                vm.fd(),
                slot_no,
                self.slot_pages[slot],
                buf,
                &self.dirty_words,
            );
            self.clear_time += t.elapsed();
            self.clears += r?;
        }
        Ok(pages)
    }

    fn size_bufs(&mut self, mem: &GuestMemoryMmap) {
        self.slot_pages = mem
            .iter()
            .map(|r| r.len().div_ceil(PAGE_SIZE) as usize)
            .collect();
        self.bufs = self
            .slot_pages
            .iter()
            .map(|p| vec![0u64; p.div_ceil(64)])
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
            // set and the CLEAR below re-protects everything as the baseline. (Measured
            // without it on the shadow-paging KVM here: the per-page re-protect cost
            // is the same, 115-145 us for 1,000 scattered pages.)
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
        self.harvest_impl(vm, mem, out, None)
    }

    fn harvest_after(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        out: &mut DirtySet,
        early: &DirtySet,
    ) -> Result<usize, DirtyError> {
        self.harvest_impl(vm, mem, out, Some(early))
    }

    fn pre_harvest(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        early: &mut DirtySet,
    ) -> Result<usize, DirtyError> {
        if !self.manual {
            // GET would clear and re-protect the whole slot: only a harvest may.
            return Ok(0);
        }
        if self.bufs.len() != mem.num_regions() || early.regions.len() != self.bufs.len() {
            return Err(DirtyError::Layout("slots changed since tracking started"));
        }
        let mut pages = 0;
        for (slot, (buf, region)) in self.bufs.iter_mut().zip(&mut early.regions).enumerate() {
            let slot_no = slot as u32;
            Self::get_log(vm.fd(), slot_no, buf)?;
            self.dirty_words.clear();
            nonzero_words(buf, &mut self.dirty_words);
            for &w in &self.dirty_words {
                // Pages the hot-page policy may keep writable at the harvest stay
                // writable (and logged) until then; the rest are taken now.
                let hot = self
                    .hot
                    .as_ref()
                    .map_or(0, |h| h.candidates(slot, w, buf[w]));
                let take = buf[w] & !hot;
                buf[w] = take;
                pages += take.count_ones() as usize;
                region.or_word(w, take);
            }
            Self::clear_words(
                vm.fd(),
                slot_no,
                self.slot_pages[slot],
                buf,
                &self.dirty_words,
            )?;
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

    fn last_clear(&self) -> (std::time::Duration, usize) {
        (self.clear_time, self.clears)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nonzero_words_in_and_after_blocks() {
        let mut bits = vec![0u64; 32 * 4 + 5];
        for w in [0, 31, 32, 95, 127, 128, 132] {
            bits[w] = 1 << (w % 64);
        }
        let mut out = Vec::new();
        nonzero_words(&bits, &mut out);
        assert_eq!(out, vec![0, 31, 32, 95, 127, 128, 132]);
        out.clear();
        nonzero_words(&[], &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn merge_sorted_is_the_sorted_union() {
        let mut out = Vec::new();
        merge_sorted(&[1, 4, 9], [0, 4, 5, 12].into_iter(), &mut out);
        assert_eq!(out, vec![0, 1, 4, 5, 9, 12]);
        merge_sorted(&[], [3].into_iter(), &mut out);
        assert_eq!(out, vec![3]);
        merge_sorted(&[2, 3], std::iter::empty(), &mut out);
        assert_eq!(out, vec![2, 3]);
    }

    #[test]
    fn clear_ranges_merge_close_words() {
        let mut got = Vec::new();
        clear_ranges(&[1, 2, 10, 300, 301, 2000], 256, |a, b| got.push((a, b)));
        assert_eq!(got, vec![(1, 10), (300, 301), (2000, 2000)]);
        got.clear();
        clear_ranges(&[], 256, |a, b| got.push((a, b)));
        assert!(got.is_empty());
        clear_ranges(&[5], 0, |a, b| got.push((a, b)));
        assert_eq!(got, vec![(5, 5)]);
    }
}
