//! Hardware-facing parts of the guest: CPU primitives, the heap, and polling virtio
//! drivers. Only the freestanding binary uses these.

pub mod arch;
pub mod blk;
pub mod console;
pub mod heap;
pub mod net;
pub mod virtio;
