//! virtio-net driver as a smoltcp `Device`: receive queue 0 kept full of page-sized
//! buffers that are recycled after each frame; transmit queue 1 with one buffer per
//! descriptor. Notifies happen in `kick`, once per main-loop round.

use super::virtio::queue::DESC_F_WRITE;
use super::virtio::{Transport, Virtq};
use alloc::vec::Vec;
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

/// Virtio 1.x net header (with num_buffers), no offloads: all zero on transmit.
const HDR: usize = 12;
const BUF: usize = 2048;
const MTU: usize = 1514;
const F_MAC: u64 = 1 << 5;

pub struct RxSide {
    q: Virtq,
    bufs: Vec<u8>,
}

pub struct TxSide {
    q: Virtq,
    bufs: Vec<u8>,
    free: Vec<u16>,
    /// Frames dropped for lack of a transmit buffer (TCP retransmits them).
    pub dropped: u64,
    scratch: Vec<u8>,
}

pub struct Net {
    t: Transport,
    rx: RxSide,
    tx: TxSide,
    pub mac: [u8; 6],
}

impl Net {
    /// # Safety
    /// `base` must be the mapped virtio-mmio window of a net device.
    pub unsafe fn new(base: u64, fallback_mac: [u8; 6]) -> Result<Self, &'static str> {
        // SAFETY: forwarded caller contract.
        let t = unsafe { Transport::probe(base, twinrun_guest_abi::VIRTIO_ID_NET)? };
        let features = t.begin_init(F_MAC)?;
        let mut rxq = Virtq::new(0, t.queue_size(0, 256)?);
        t.setup_queue(&rxq);
        let txq = Virtq::new(1, t.queue_size(1, 256)?);
        t.setup_queue(&txq);
        let mac = if features & F_MAC != 0 {
            core::array::from_fn(|i| t.config_u8(i))
        } else {
            fallback_mac
        };
        let rx_bufs = alloc::vec![0u8; rxq.size() as usize * BUF];
        for i in 0..rxq.size() {
            let addr = rx_bufs.as_ptr() as u64 + i as u64 * BUF as u64;
            rxq.set_desc(i, addr, BUF as u32, DESC_F_WRITE, 0);
            rxq.push(i);
        }
        let n = txq.size();
        let mut net = Net {
            t,
            rx: RxSide {
                q: rxq,
                bufs: rx_bufs,
            },
            tx: TxSide {
                q: txq,
                bufs: alloc::vec![0u8; n as usize * BUF],
                free: (0..n).rev().collect(),
                dropped: 0,
                scratch: alloc::vec![0u8; BUF],
            },
            mac,
        };
        net.t.driver_ok()?;
        net.kick();
        Ok(net)
    }

    /// Notifies both queues if they have new buffers.
    pub fn kick(&mut self) {
        self.rx.q.kick(&self.t);
        self.tx.q.kick(&self.t);
    }
}

impl TxSide {
    fn reclaim(&mut self) {
        while let Some((id, _)) = self.q.pop_used() {
            if id < self.q.size() {
                self.free.push(id);
            }
        }
    }
}

pub struct RxToken<'a> {
    rx: &'a mut RxSide,
    id: u16,
    len: usize,
}

pub struct TxToken<'a> {
    tx: &'a mut TxSide,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let at = self.id as usize * BUF;
        let r = f(&self.rx.bufs[at + HDR..at + self.len]);
        // The descriptor still describes this buffer: hand it straight back.
        self.rx.q.push(self.id);
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let tx = self.tx;
        tx.reclaim();
        let len = len.min(BUF - HDR);
        let Some(id) = tx.free.pop() else {
            tx.dropped += 1;
            return f(&mut tx.scratch[..len]);
        };
        let at = id as usize * BUF;
        tx.bufs[at..at + HDR].fill(0);
        let r = f(&mut tx.bufs[at + HDR..at + HDR + len]);
        let addr = tx.bufs.as_ptr() as u64 + at as u64;
        tx.q.set_desc(id, addr, (HDR + len) as u32, 0, 0);
        tx.q.push(id);
        r
    }
}

impl phy::Device for Net {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _ts: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        loop {
            let (id, len) = self.rx.q.pop_used()?;
            let len = len as usize;
            if id >= self.rx.q.size() {
                continue;
            }
            if len <= HDR || len > BUF {
                // Runt or impossible length: recycle the buffer and look further.
                self.rx.q.push(id);
                continue;
            }
            return Some((
                RxToken {
                    rx: &mut self.rx,
                    id,
                    len,
                },
                TxToken { tx: &mut self.tx },
            ));
        }
    }

    fn transmit(&mut self, _ts: Instant) -> Option<TxToken<'_>> {
        self.tx.reclaim();
        if self.tx.free.is_empty() {
            return None;
        }
        Some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        caps.max_burst_size = Some(32);
        caps
    }
}
