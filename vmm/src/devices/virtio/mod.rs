//! The virtio device model: what every device implements, and the queue helpers that
//! turn guest-written rings into validated descriptor chains.
//!
//! Everything read from a queue was written by an untrusted guest. The helpers here never
//! trust it: a chain that loops, runs past the queue size, points outside the descriptor
//! table or at memory the guest does not have is reported as a [`VirtioError`], and the
//! transport then puts the device into `DEVICE_NEEDS_RESET` instead of guessing.

pub mod block;
pub mod console;
pub mod mmio;
pub mod net;
pub mod persist;

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::vstate::memory::GuestMemoryMmap;

/// Feature bit every device offers and every driver must accept (virtio 1.x).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.x, 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// InterruptStatus bits (virtio-mmio).
pub const INTERRUPT_USED_RING: u32 = 1;
pub const INTERRUPT_CONFIG_CHANGE: u32 = 2;

/// Largest queue any device here offers.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// A guest error in a queue: the driver broke the virtio contract, so the device stops
/// using its queues until the driver resets it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VirtioError {
    #[error("queue {0} does not exist")]
    NoSuchQueue(usize),
    #[error("queue {0} was notified but is not ready (or the driver is not DRIVER_OK)")]
    QueueNotReady(usize),
    #[error("available ring of queue {queue} is unusable: {why}")]
    AvailRing { queue: usize, why: String },
    #[error("descriptor chain with head {head} loops, is longer than the queue size or leaves the descriptor table")]
    BrokenChain { head: u16 },
    #[error("descriptor chain with head {head} has no descriptor")]
    EmptyChain { head: u16 },
    #[error("descriptor {addr:#x}+{len:#x} in chain {head} is outside guest memory")]
    BufferOutsideMemory { head: u16, addr: u64, len: u32 },
    #[error("descriptor chain with head {head} has a device-readable descriptor after a device-writable one")]
    ReadableAfterWritable { head: u16 },
    #[error(
        "descriptor chain with head {head} has a descriptor of the wrong direction for this queue"
    )]
    WrongDirection { head: u16 },
    #[error("descriptor chain with head {head} is {len} bytes; {why}")]
    BadLength {
        head: u16,
        len: u64,
        why: &'static str,
    },
    #[error("request chain {head} is malformed: {why}")]
    Malformed { head: u16, why: &'static str },
    #[error("driver set DRIVER_OK without FEATURES_OK")]
    DriverOkWithoutFeatures,
    #[error("writing the used ring of queue {queue} failed: {why}")]
    UsedRing { queue: usize, why: String },
}

/// What a device is to its transport.
///
/// All methods run with the transport locked, either on a vCPU thread (register access,
/// queue notifies) or on the device manager's backend thread (`backend_*`).
pub trait VirtioDevice: Send {
    /// Virtio device id (`twinrun_guest_abi::VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Feature bits offered to the driver, [`VIRTIO_F_VERSION_1`] included.
    fn avail_features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device config space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to device config space; ignored by devices with read-only config.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver notified queue `index` (which the transport checked is ready).
    /// Returns whether used entries were added.
    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<bool, VirtioError>;
    /// File descriptors the backend thread should wait on for this device now, with
    /// their epoll event masks. Asked again after every backend event of this device.
    fn backend_fds(&self) -> Vec<(RawFd, u32)> {
        Vec::new()
    }
    /// One of [`VirtioDevice::backend_fds`] fired. `active` says whether the driver is
    /// DRIVER_OK and the device healthy, i.e. whether `queues` may be used. Returns
    /// whether used entries were added.
    fn backend_event(
        &mut self,
        _mem: &GuestMemoryMmap,
        _queues: &mut [Queue],
        _active: bool,
        _fd: RawFd,
        _events: u32,
    ) -> Result<bool, VirtioError> {
        Ok(false)
    }
    /// The driver reset the device (status 0): forget per-driver state.
    fn reset(&mut self) {}
    /// A network device returns the frames waiting on its host side that the guest
    /// has not received (at most `max`), taken off the host; others return none.
    /// Only while the VM is paused (a planned role swap hands them to the new primary).
    fn take_rx_frames(&mut self, _max: usize) -> Vec<Vec<u8>> {
        Vec::new()
    }
    /// A network device delivers `frames` to the guest before anything its host side
    /// receives later; others drop them. Before the VM starts or while it is paused.
    fn inject_rx_frames(&mut self, _frames: Vec<Vec<u8>>) {}
    /// Push buffered output to where it goes (console sinks); called on shutdown.
    fn flush_output(&mut self) {}
    /// What the device is attached to on the host, for state capture and for checking
    /// a restored device against the state.
    fn save_state(&self) -> persist::DeviceState {
        persist::DeviceState::Other {
            device_type: self.device_type(),
        }
    }
    /// A block device returns the blocks the guest wrote since the previous call and
    /// starts a new map; other devices return `None`. Call only while the VM is paused
    /// (snapshots use it to copy just the changed blocks of a disk).
    fn take_written_blocks(&mut self) -> Option<block::written::WrittenBlocks> {
        None
    }
    /// A block device takes its written-block map (as
    /// [`take_written_blocks`](VirtioDevice::take_written_blocks)), adds the byte ranges
    /// `also`, and returns the data of those blocks read back from its image as a
    /// journal (`disk_index` 0: the caller numbers the disks), in block order; other
    /// devices return `None`. Only while the VM is paused: no request is in flight, so
    /// the image holds every completed write.
    fn read_back_written(
        &mut self,
        _also: &[(u64, u64)],
    ) -> Option<std::io::Result<block::journal::DiskJournal>> {
        None
    }
    /// Output devices (console, net) register a stream with the VM's output gate and
    /// route their output through it from now on; others ignore it. Before the VM
    /// starts.
    fn attach_output_gate(
        &mut self,
        _gate: &std::sync::Arc<crate::devices::output::OutputGate>,
    ) -> std::io::Result<()> {
        Ok(())
    }
    /// A block device turns its write journal on or off and returns true; other
    /// devices return false.
    fn set_disk_journal(&mut self, _on: bool) -> bool {
        false
    }
    /// A block device with its journal on returns the writes completed since the
    /// previous call (with `disk_index` 0: the caller numbers the disks) and starts a
    /// new journal. Call only while the VM is paused.
    fn take_disk_journal(&mut self) -> Option<block::journal::DiskJournal> {
        None
    }
    /// A block device returns the handles on its fault injection and hooks (shared
    /// with it, so usable while the VM runs); other devices return `None`.
    fn disk_controls(&self) -> Option<block::DiskControls> {
        None
    }
}

/// One descriptor chain taken off an available ring, walked and range-checked.
#[derive(Clone, Debug)]
pub struct Chain {
    pub head: u16,
    pub descs: Vec<Descriptor>,
}

impl PartialEq for Chain {
    fn eq(&self, other: &Self) -> bool {
        let key = |d: &Descriptor| (d.addr(), d.len(), d.flags(), d.next());
        self.head == other.head && self.descs.iter().map(key).eq(other.descs.iter().map(key))
    }
}

impl Chain {
    /// Total bytes over all descriptors (cannot overflow: at most 2^16 descriptors of
    /// at most 2^32 bytes each).
    pub fn total_len(&self) -> u64 {
        self.descs.iter().map(|d| u64::from(d.len())).sum()
    }
}

/// Returns true when the available ring of `queue` holds a chain the device has not
/// taken yet.
pub fn has_avail(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    queue
        .avail_idx(mem, Ordering::Acquire)
        .map(|idx| idx.0 != queue.next_avail())
        .unwrap_or(false)
}

/// Takes the next chain off the available ring of queue `index`, or `None` when the ring
/// is empty.
///
/// The chain is walked completely: it must end (no loop, at most queue-size
/// descriptors, every `next` inside the table), every buffer must lie inside guest
/// memory, and device-readable descriptors must come before device-writable ones.
pub fn pop_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    index: usize,
) -> Result<Option<Chain>, VirtioError> {
    let mut iter = queue.iter(mem).map_err(|e| VirtioError::AvailRing {
        queue: index,
        why: e.to_string(),
    })?;
    let Some(chain) = iter.next() else {
        return Ok(None);
    };
    let head = chain.head_index();
    let mut descs = Vec::new();
    // The crate's iterator ends silently on a loop (ttl), an index outside the table, an
    // unreadable descriptor or an overflowing total length; a last descriptor that still
    // says NEXT tells us the walk was cut short, which is always a guest error.
    for d in chain {
        descs.push(d);
    }
    match descs.last() {
        None => return Err(VirtioError::EmptyChain { head }),
        Some(d) if d.has_next() => return Err(VirtioError::BrokenChain { head }),
        Some(_) => {}
    }
    let mut seen_writable = false;
    for d in &descs {
        if d.is_write_only() {
            seen_writable = true;
        } else if seen_writable {
            return Err(VirtioError::ReadableAfterWritable { head });
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(VirtioError::BufferOutsideMemory {
                head,
                addr: d.addr().0,
                len: d.len(),
            });
        }
    }
    Ok(Some(Chain { head, descs }))
}

/// Puts chain `head` on the used ring with `len` bytes written.
pub fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    index: usize,
    head: u16,
    len: u32,
) -> Result<(), VirtioError> {
    queue
        .add_used(mem, head, len)
        .map_err(|e| VirtioError::UsedRing {
            queue: index,
            why: e.to_string(),
        })
}

/// Copies the device-readable bytes of `chain` out of guest memory, at most `max` bytes
/// (longer chains are an error). Used by devices that consume whole messages (net TX,
/// console TX).
pub fn read_chain(mem: &GuestMemoryMmap, chain: &Chain, max: u64) -> Result<Vec<u8>, VirtioError> {
    use vm_memory::Bytes;
    let len = chain.total_len();
    if len > max {
        return Err(VirtioError::BadLength {
            head: chain.head,
            len,
            why: "longer than this queue accepts",
        });
    }
    let mut out = vec![0u8; len as usize];
    let mut at = 0usize;
    for d in &chain.descs {
        if d.is_write_only() {
            return Err(VirtioError::WrongDirection { head: chain.head });
        }
        let n = d.len() as usize;
        mem.read_slice(&mut out[at..at + n], d.addr())
            .map_err(|_| VirtioError::BufferOutsideMemory {
                head: chain.head,
                addr: d.addr().0,
                len: d.len(),
            })?;
        at += n;
    }
    Ok(out)
}

/// Writes `data` into the device-writable descriptors of `chain` (which must all be
/// writable) through vm-memory, so the dirty bitmap sees it. Returns bytes written, or
/// `None` when the chain is too small.
pub fn write_chain(
    mem: &GuestMemoryMmap,
    chain: &Chain,
    data: &[u8],
) -> Result<Option<u32>, VirtioError> {
    use vm_memory::Bytes;
    if chain.descs.iter().any(|d| !d.is_write_only()) {
        return Err(VirtioError::WrongDirection { head: chain.head });
    }
    if chain.total_len() < data.len() as u64 {
        return Ok(None);
    }
    let mut at = 0usize;
    for d in &chain.descs {
        if at == data.len() {
            break;
        }
        let n = (d.len() as usize).min(data.len() - at);
        mem.write_slice(&data[at..at + n], d.addr()).map_err(|_| {
            VirtioError::BufferOutsideMemory {
                head: chain.head,
                addr: d.addr().0,
                len: d.len(),
            }
        })?;
        at += n;
    }
    // Fits in u32: bounded by the chain length, which the crate keeps below 2^32.
    Ok(Some(data.len() as u32))
}

/// A raw guest address as a `GuestAddress` plus an offset, or `None` on overflow.
pub fn addr_add(addr: GuestAddress, off: u64) -> Option<GuestAddress> {
    addr.0.checked_add(off).map(GuestAddress)
}

#[cfg(test)]
pub(crate) mod testutil {
    //! Builds driver-side rings in a test guest memory.
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    pub use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    /// 1 MiB of guest memory at 0.
    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    /// A driver's view of one queue of `size` at 0x0 (rings up to 0x3000 for size 256).
    pub struct Driver<'a> {
        pub mock: MockSplitQueue<'a, GuestMemoryMmap>,
        pub avail: u16,
    }

    impl<'a> Driver<'a> {
        pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
            Driver {
                mock: MockSplitQueue::create(mem, GuestAddress(0), size),
                avail: 0,
            }
        }

        /// A ready device-side queue matching this driver's rings.
        pub fn queue(&self) -> Queue {
            self.mock.create_queue::<Queue>().unwrap()
        }

        /// Writes descriptor `i`.
        pub fn desc(&self, i: u16, addr: u64, len: u32, flags: u32, next: u16) {
            let d = Descriptor::new(addr, len, flags as u16, next);
            self.mock
                .desc_table()
                .store(i, RawDescriptor::from(d))
                .unwrap();
        }

        /// Offers the chain starting at `head`.
        pub fn offer(&mut self, head: u16) {
            let ring = self.mock.avail().ring();
            let size = self.mock.desc_table().total_size() / 16;
            ring.ref_at((self.avail as u64 % size) as usize)
                .unwrap()
                .store(u16::to_le(head));
            self.avail = self.avail.wrapping_add(1);
            self.mock.avail().idx().store(u16::to_le(self.avail));
        }

        /// Writes a chain of `(addr, len, writable)` buffers at descriptors
        /// `first..` and offers it.
        pub fn chain(&mut self, first: u16, bufs: &[(u64, u32, bool)]) {
            for (k, &(addr, len, w)) in bufs.iter().enumerate() {
                let i = first + k as u16;
                let mut flags = if w { VRING_DESC_F_WRITE } else { 0 };
                if k + 1 < bufs.len() {
                    flags |= VRING_DESC_F_NEXT;
                }
                self.desc(i, addr, len, flags, i + 1);
            }
            self.offer(first);
        }

        /// `(head, len)` of used entry `i`.
        pub fn used(&self, i: u16) -> (u32, u32) {
            let e = self.mock.used().ring().ref_at(i as usize).unwrap().load();
            (e.id(), e.len())
        }

        pub fn used_idx(&self) -> u16 {
            self.mock.used().idx().load()
        }
    }

    pub fn read_u8(mem: &GuestMemoryMmap, addr: u64) -> u8 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn pops_valid_chain_and_reports_used() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 16);
        let mut q = drv.queue();
        drv.chain(0, &[(0x8000, 16, false), (0x9000, 8, true)]);
        let c = pop_chain(&mut q, &mem, 0).unwrap().unwrap();
        assert_eq!(c.head, 0);
        assert_eq!(c.descs.len(), 2);
        assert_eq!(c.total_len(), 24);
        assert!(pop_chain(&mut q, &mem, 0).unwrap().is_none());
        add_used(&mut q, &mem, 0, c.head, 8).unwrap();
        assert_eq!(drv.used_idx(), 1);
        assert_eq!(drv.used(0), (0, 8));
    }

    #[test]
    fn rejects_descriptor_loop() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 16);
        let mut q = drv.queue();
        drv.desc(0, 0x8000, 16, VRING_DESC_F_NEXT, 1);
        drv.desc(1, 0x8000, 16, VRING_DESC_F_NEXT, 0);
        drv.offer(0);
        assert_eq!(
            pop_chain(&mut q, &mem, 0),
            Err(VirtioError::BrokenChain { head: 0 })
        );
    }

    #[test]
    fn rejects_chain_longer_than_queue() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 4);
        let mut q = drv.queue();
        for i in 0..4u16 {
            // Each descriptor points at the next, the last wraps to the first.
            drv.desc(i, 0x8000, 1, VRING_DESC_F_NEXT, (i + 1) % 4);
        }
        drv.offer(2);
        assert!(matches!(
            pop_chain(&mut q, &mem, 0),
            Err(VirtioError::BrokenChain { .. })
        ));
    }

    #[test]
    fn rejects_next_outside_table_and_bad_head() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 8);
        let mut q = drv.queue();
        drv.desc(0, 0x8000, 16, VRING_DESC_F_NEXT, 200);
        drv.offer(0);
        assert_eq!(
            pop_chain(&mut q, &mem, 0),
            Err(VirtioError::BrokenChain { head: 0 })
        );
        drv.offer(9);
        assert_eq!(
            pop_chain(&mut q, &mem, 0),
            Err(VirtioError::EmptyChain { head: 9 })
        );
    }

    #[test]
    fn rejects_buffers_outside_memory_and_overflowing() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 8);
        let mut q = drv.queue();
        drv.chain(0, &[(0xF_FFF0, 0x20, false)]);
        assert!(matches!(
            pop_chain(&mut q, &mem, 0),
            Err(VirtioError::BufferOutsideMemory { .. })
        ));
        drv.chain(1, &[(u64::MAX - 4, 0x20, false)]);
        assert!(matches!(
            pop_chain(&mut q, &mem, 0),
            Err(VirtioError::BufferOutsideMemory { .. })
        ));
        // Two descriptors whose lengths add past 2^32 end the crate's walk early.
        drv.chain(2, &[(0x8000, u32::MAX, false), (0x8000, 2, false)]);
        assert!(pop_chain(&mut q, &mem, 0).is_err());
    }

    #[test]
    fn rejects_readable_after_writable() {
        let mem = memory();
        let mut drv = Driver::new(&mem, 8);
        let mut q = drv.queue();
        drv.chain(0, &[(0x8000, 16, true), (0x9000, 8, false)]);
        assert_eq!(
            pop_chain(&mut q, &mem, 0),
            Err(VirtioError::ReadableAfterWritable { head: 0 })
        );
    }

    #[test]
    fn rejects_avail_index_jump() {
        let mem = memory();
        let drv = Driver::new(&mem, 8);
        let mut q = drv.queue();
        drv.mock.avail().idx().store(100);
        assert!(matches!(
            pop_chain(&mut q, &mem, 3),
            Err(VirtioError::AvailRing { queue: 3, .. })
        ));
    }

    #[test]
    fn read_and_write_chain_respect_directions_and_limits() {
        use vm_memory::Bytes;
        let mem = memory();
        let mut drv = Driver::new(&mem, 8);
        let mut q = drv.queue();
        mem.write_slice(b"hello", GuestAddress(0x8000)).unwrap();
        mem.write_slice(b" world", GuestAddress(0x9000)).unwrap();
        drv.chain(0, &[(0x8000, 5, false), (0x9000, 6, false)]);
        let c = pop_chain(&mut q, &mem, 0).unwrap().unwrap();
        assert_eq!(read_chain(&mem, &c, 100).unwrap(), b"hello world");
        assert!(matches!(
            read_chain(&mem, &c, 10),
            Err(VirtioError::BadLength { .. })
        ));
        assert_eq!(
            write_chain(&mem, &c, b"x"),
            Err(VirtioError::WrongDirection { head: 0 })
        );
        drv.chain(2, &[(0xA000, 3, true), (0xB000, 3, true)]);
        let c = pop_chain(&mut q, &mem, 0).unwrap().unwrap();
        assert_eq!(write_chain(&mem, &c, b"abcd").unwrap(), Some(4));
        assert_eq!(write_chain(&mem, &c, b"abcdefg").unwrap(), None);
        assert_eq!(read_u8(&mem, 0xB000), b'd');
        assert_eq!(
            read_chain(&mem, &c, 100),
            Err(VirtioError::WrongDirection { head: 2 })
        );
    }
}
