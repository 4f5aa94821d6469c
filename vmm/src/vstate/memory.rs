//! Guest memory.
//!
//! Guest RAM is a `vm-memory` mmap backend with an atomic dirty bitmap per region, so
//! writes the VMM itself makes to guest memory (device emulation) are tracked beside
//! KVM's own dirty log.

use vm_memory::bitmap::AtomicBitmap;

/// Guest memory as every part of the VMM sees it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;
