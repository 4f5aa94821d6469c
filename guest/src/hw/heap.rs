//! The global allocator: a first-fit free list (`linked_list_allocator`) over a range of
//! guest RAM handed over at start-up. Frees are real frees, which the kv server needs.

use core::alloc::{GlobalAlloc, Layout};
use core::cell::UnsafeCell;
use core::ptr::{null_mut, NonNull};
use linked_list_allocator::Heap;

struct GuestAlloc(UnsafeCell<Heap>);

// SAFETY: the guest runs one thread on one vCPU with interrupts off, so the heap is
// never used from two contexts at once.
unsafe impl Sync for GuestAlloc {}

// SAFETY: `Heap` hands out disjoint, correctly aligned blocks from memory given to it
// in `init`; a zero-sized or failed request returns null as `GlobalAlloc` allows.
unsafe impl GlobalAlloc for GuestAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded, no re-entry (see `Sync` above).
        let heap = unsafe { &mut *self.0.get() };
        heap.allocate_first_fit(layout)
            .map(|p| p.as_ptr())
            .unwrap_or(null_mut())
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: single-threaded; `ptr` came from `alloc` with this layout (caller's
        // contract), so it is non-null.
        unsafe {
            let heap = &mut *self.0.get();
            if let Some(p) = NonNull::new(ptr) {
                heap.deallocate(p, layout);
            }
        }
    }
}

#[global_allocator]
static ALLOC: GuestAlloc = GuestAlloc(UnsafeCell::new(Heap::empty()));

/// Gives `[start, start + size)` to the allocator. Call once, before any allocation.
///
/// # Safety
/// The range must be RAM that nothing else uses for the life of the program.
pub unsafe fn init(start: usize, size: usize) {
    // SAFETY: called once at start-up before any allocation; the range is unused RAM
    // (caller's contract).
    unsafe { (*ALLOC.0.get()).init(start as *mut u8, size) }
}
