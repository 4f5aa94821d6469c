//! Virtio 1.x over virtio-mmio (version 2 register layout), driven by polling.

pub mod mmio;
pub mod queue;

pub use mmio::Transport;
pub use queue::Virtq;

/// VIRTIO_F_VERSION_1: the only transport feature the guest negotiates.
pub const F_VERSION_1: u64 = 1 << 32;
