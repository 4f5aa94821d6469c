//! virtio-blk driver: one request queue, a few request slots, each a three-descriptor
//! chain (header, data, status byte). Callers own the data buffers.

use super::virtio::queue::{DESC_F_NEXT, DESC_F_WRITE};
use super::virtio::{Transport, Virtq};
use alloc::vec::Vec;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;

pub const S_OK: u8 = 0;

const SLOTS: u16 = 4;
/// Status value the device never writes, to see an untouched status byte.
const S_PENDING: u8 = 0xff;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ReqHdr {
    kind: u32,
    reserved: u32,
    sector: u64,
}

pub struct Blk {
    t: Transport,
    q: Virtq,
    hdrs: Vec<ReqHdr>,
    status: Vec<u8>,
    busy: [bool; SLOTS as usize],
    /// Disk size in 512-byte sectors (config offset 0).
    pub capacity: u64,
}

impl Blk {
    /// # Safety
    /// `base` must be the mapped virtio-mmio window of a block device.
    pub unsafe fn new(base: u64) -> Result<Self, &'static str> {
        // SAFETY: forwarded caller contract.
        let t = unsafe { Transport::probe(base, twinrun_guest_abi::VIRTIO_ID_BLOCK)? };
        t.begin_init(0)?;
        let size = t.queue_size(0, 16)?;
        if size < SLOTS * 3 {
            return Err("block queue too small");
        }
        let q = Virtq::new(0, size);
        t.setup_queue(&q);
        t.driver_ok()?;
        let capacity = t.config_u64(0);
        Ok(Blk {
            t,
            q,
            hdrs: alloc::vec![ReqHdr::default(); SLOTS as usize],
            status: alloc::vec![S_PENDING; SLOTS as usize],
            busy: [false; SLOTS as usize],
            capacity,
        })
    }

    /// Queues a request and notifies the device. `data`/`len` is the data buffer (none
    /// for a flush), which must stay valid and untouched until the request completes.
    /// Returns the slot, or None when every slot is busy.
    pub fn submit(&mut self, kind: u32, sector: u64, data: *mut u8, len: u32) -> Option<u16> {
        let slot = (0..SLOTS).find(|&s| !self.busy[s as usize])?;
        let s = slot as usize;
        self.busy[s] = true;
        self.hdrs[s] = ReqHdr {
            kind,
            reserved: 0,
            sector,
        };
        self.status[s] = S_PENDING;
        let head = slot * 3;
        let hdr_addr = &self.hdrs[s] as *const ReqHdr as u64;
        let st_addr = &self.status[s] as *const u8 as u64;
        if len > 0 {
            // The device writes into the buffer for reads and GET_ID.
            let dflags = if kind == T_OUT { 0 } else { DESC_F_WRITE };
            self.q.set_desc(head, hdr_addr, 16, DESC_F_NEXT, head + 1);
            self.q
                .set_desc(head + 1, data as u64, len, dflags | DESC_F_NEXT, head + 2);
            self.q.set_desc(head + 2, st_addr, 1, DESC_F_WRITE, 0);
        } else {
            self.q.set_desc(head, hdr_addr, 16, DESC_F_NEXT, head + 2);
            self.q.set_desc(head + 2, st_addr, 1, DESC_F_WRITE, 0);
        }
        self.q.push(head);
        self.q.kick(&self.t);
        Some(slot)
    }

    /// A completed request: (slot, status byte).
    pub fn poll(&mut self) -> Option<(u16, u8)> {
        let (id, _len) = self.q.pop_used()?;
        let slot = id / 3;
        if id % 3 != 0 || slot >= SLOTS || !self.busy[slot as usize] {
            // Not a head we submitted: the device is confused; report it as an error
            // on no slot rather than trusting it.
            return Some((u16::MAX, S_PENDING));
        }
        self.busy[slot as usize] = false;
        // SAFETY: the status byte is our own memory; volatile because the device wrote it.
        let st = unsafe { (&self.status[slot as usize] as *const u8).read_volatile() };
        Some((slot, st))
    }
}
