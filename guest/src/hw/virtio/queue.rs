//! A split virtqueue in guest memory, driven by polling.
//!
//! The VMM's device thread reads the available ring and writes the used ring
//! concurrently with this code, so ring indices are accessed volatile with fences in
//! the order the virtio spec requires. Interrupts are suppressed (no IDT here), and the
//! device's NO_NOTIFY hint is honoured so a busy device costs no MMIO exits.

use super::Transport;
use alloc::alloc::{alloc_zeroed, Layout};
use core::sync::atomic::{fence, Ordering};

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

#[repr(C)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

pub struct Virtq {
    index: u16,
    size: u16,
    desc: *mut Desc,
    /// flags, idx, ring[size], used_event
    avail: *mut u16,
    /// flags u16, idx u16, ring[size] of {id u32, len u32}, avail_event
    used: *mut u8,
    avail_idx: u16,
    last_used: u16,
    /// Buffers were made available since the last notify.
    pending: bool,
}

fn zeroed_pages(bytes: usize) -> *mut u8 {
    let layout = match Layout::from_size_align(bytes.max(1), 4096) {
        Ok(l) => l,
        Err(_) => panic!("virtqueue layout"),
    };
    // SAFETY: the layout has non-zero size.
    let p = unsafe { alloc_zeroed(layout) };
    if p.is_null() {
        alloc::alloc::handle_alloc_error(layout);
    }
    p
}

impl Virtq {
    /// Allocates zeroed rings for queue `index` of `size` entries (power of two).
    pub fn new(index: u16, size: u16) -> Self {
        let n = size as usize;
        let desc = zeroed_pages(16 * n).cast::<Desc>();
        let avail = zeroed_pages(6 + 2 * n).cast::<u16>();
        let used = zeroed_pages(6 + 8 * n);
        // SAFETY: `avail` points at a fresh allocation of at least 2 bytes.
        unsafe { avail.write_volatile(AVAIL_F_NO_INTERRUPT) };
        Virtq {
            index,
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
            last_used: 0,
            pending: false,
        }
    }

    pub fn index(&self) -> u16 {
        self.index
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical (= virtual, identity mapped) ring addresses.
    pub fn addrs(&self) -> (u64, u64, u64) {
        (self.desc as u64, self.avail as u64, self.used as u64)
    }

    /// Fills descriptor `i`. Only call for descriptors the device does not own.
    pub fn set_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(
            i < self.size && next < self.size,
            "descriptor index out of range"
        );
        // SAFETY: `i < size`, so the slot is inside the descriptor table.
        unsafe {
            self.desc.add(i as usize).write_volatile(Desc {
                addr,
                len,
                flags,
                next,
            })
        };
    }

    /// Makes the chain starting at `head` available to the device.
    pub fn push(&mut self, head: u16) {
        let slot = (self.avail_idx % self.size) as usize;
        // SAFETY: ring entries start at u16 index 2 and `slot < size`.
        unsafe { self.avail.add(2 + slot).write_volatile(head) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // The descriptor and ring entry must be visible before the new index.
        fence(Ordering::Release);
        // SAFETY: the idx field is u16 index 1.
        unsafe { self.avail.add(1).write_volatile(self.avail_idx) };
        self.pending = true;
    }

    /// Takes the next completed chain: (head id, bytes written by the device).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        // SAFETY: used idx is the u16 at byte offset 2.
        let idx = unsafe { self.used.add(2).cast::<u16>().read_volatile() };
        if idx == self.last_used {
            return None;
        }
        // Read the element only after seeing the index that covers it.
        fence(Ordering::Acquire);
        let slot = (self.last_used % self.size) as usize;
        // SAFETY: element `slot < size` of the used ring, 8 bytes at offset 4 + 8*slot.
        let (id, len) = unsafe {
            let e = self.used.add(4 + 8 * slot).cast::<u32>();
            (e.read_volatile(), e.add(1).read_volatile())
        };
        self.last_used = self.last_used.wrapping_add(1);
        Some((id as u16, len))
    }

    /// Notifies the device if buffers were added since the last notify and the device
    /// has not said it is already processing (NO_NOTIFY).
    pub fn kick(&mut self, t: &Transport) {
        if !self.pending {
            return;
        }
        self.pending = false;
        // The index store must be ordered before reading the device's flags (spec 2.7.13).
        fence(Ordering::SeqCst);
        // SAFETY: used flags are the u16 at byte offset 0.
        let flags = unsafe { self.used.cast::<u16>().read_volatile() };
        if flags & USED_F_NO_NOTIFY == 0 {
            t.notify(self.index);
        }
    }
}
