//! Shared harness: builds a guest memory and a driven virtio-mmio transport from fuzz
//! input, so every target runs the device's real request processing on guest-made
//! rings.
//!
//! Input layout: byte 0 picks the queue size (a power of two up to 256, or an invalid
//! one), byte 1 how many chains the avail index claims, the rest is copied into guest
//! memory from address 0: descriptor table at 0x0, avail ring at 0x1000, used ring at
//! 0x2000, buffers anywhere (descriptors may point anywhere, in memory or not).

use vm_memory::{Bytes, GuestAddress};
use vmm::devices::bus::BusDevice;
use vmm::devices::virtio::mmio::*;
use vmm::devices::virtio::{
    VirtioDevice, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    VIRTIO_F_VERSION_1,
};
use vmm::vstate::memory::GuestMemoryMmap;

pub const MEM_SIZE: usize = 0x1_0000;
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;

pub fn memory(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0)).unwrap();
    mem
}

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(0, off, &v.to_le_bytes());
}

/// Creates the transport, negotiates `features`, sets up queue `queue` from the input
/// and notifies it. Returns the transport for further driving.
pub fn run_queue(
    data: &[u8],
    device: Box<dyn VirtioDevice>,
    features: u64,
    queue: u32,
) -> Option<(MmioTransport, GuestMemoryMmap)> {
    if data.len() < 2 {
        return None;
    }
    let size = match data[0] % 10 {
        9 => u32::from(data[0]), // mostly invalid sizes
        k => 1 << k,
    };
    let mem = memory(&data[2..]);
    // The avail index the driver claims (may exceed the queue size).
    mem.write_obj(u16::from(data[1]), GuestAddress(AVAIL + 2))
        .unwrap();
    let mut t = MmioTransport::new(mem.clone(), device).ok()?;
    w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
    w(&mut t, REG_DRIVER_FEATURES, features as u32);
    w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
    w(&mut t, REG_DRIVER_FEATURES, (features >> 32) as u32);
    w(
        &mut t,
        REG_STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    w(&mut t, REG_QUEUE_SEL, queue);
    w(&mut t, REG_QUEUE_NUM, size);
    w(&mut t, REG_QUEUE_DESC_LOW, DESC as u32);
    w(&mut t, REG_QUEUE_DRIVER_LOW, AVAIL as u32);
    w(&mut t, REG_QUEUE_DEVICE_LOW, USED as u32);
    w(&mut t, REG_QUEUE_READY, 1);
    w(
        &mut t,
        REG_STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
    );
    w(&mut t, REG_QUEUE_NOTIFY, queue);
    Some((t, mem))
}

pub const VERSION_1: u64 = VIRTIO_F_VERSION_1;
