//! virtio-console driver (single port): lines go out on the transmit queue (queue 1)
//! through a ring of page-sized buffers. Lines are packed into the current buffer and a
//! buffer is handed to the device on `flush` (once per main-loop round) or when full,
//! so a burst of lines costs one notify.

use super::arch::rdtsc;
use super::virtio::{Transport, Virtq};
use alloc::vec::Vec;
use core::fmt;
use twinrun_guest::linebuf::LineBuf;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const NBUF: u16 = 32;
const BUF_SIZE: usize = 4096;

pub struct Console {
    t: Transport,
    /// Set up so the device sees a complete port, but never given buffers: the guest
    /// takes no input.
    _rx: Virtq,
    tx: Virtq,
    bufs: Vec<u8>,
    free: Vec<u16>,
    /// Buffer being filled and its length.
    cur: Option<(u16, usize)>,
}

impl Console {
    /// # Safety
    /// `base` must be the mapped virtio-mmio window of a console device.
    pub unsafe fn new(base: u64) -> Result<Self, &'static str> {
        // SAFETY: forwarded caller contract.
        let t = unsafe { Transport::probe(base, twinrun_guest_abi::VIRTIO_ID_CONSOLE)? };
        t.begin_init(0)?;
        let rx = Virtq::new(RX_QUEUE, t.queue_size(RX_QUEUE, 4)?);
        t.setup_queue(&rx);
        let tx = Virtq::new(TX_QUEUE, t.queue_size(TX_QUEUE, NBUF)?);
        t.setup_queue(&tx);
        t.driver_ok()?;
        let n = tx.size();
        Ok(Console {
            t,
            _rx: rx,
            tx,
            bufs: alloc::vec![0u8; n as usize * BUF_SIZE],
            free: (0..n).rev().collect(),
            cur: None,
        })
    }

    fn reclaim(&mut self) {
        while let Some((id, _)) = self.tx.pop_used() {
            if id < self.tx.size() {
                self.free.push(id);
            }
        }
    }

    /// A free buffer, waiting for the device if all are in flight. `deadline` (TSC)
    /// bounds the wait for the panic path; None waits as long as it takes, since
    /// dropping output would break the line stream tests rely on.
    fn take_buffer(&mut self, deadline: Option<u64>) -> Option<u16> {
        loop {
            self.reclaim();
            if let Some(id) = self.free.pop() {
                return Some(id);
            }
            self.tx.kick(&self.t);
            if deadline.is_some_and(|d| rdtsc() > d) {
                return None;
            }
            core::hint::spin_loop();
        }
    }

    fn submit_current(&mut self) {
        if let Some((id, len)) = self.cur.take() {
            let addr = self.bufs.as_ptr() as u64 + id as u64 * BUF_SIZE as u64;
            self.tx.set_desc(id, addr, len as u32, 0, 0);
            self.tx.push(id);
        }
    }

    fn write_bytes(&mut self, mut data: &[u8], deadline: Option<u64>) {
        while !data.is_empty() {
            let (id, len) = match self.cur {
                Some((id, len)) if len < BUF_SIZE => (id, len),
                Some(_) => {
                    self.submit_current();
                    continue;
                }
                None => match self.take_buffer(deadline) {
                    Some(id) => (id, 0),
                    None => return,
                },
            };
            let n = data.len().min(BUF_SIZE - len);
            let at = id as usize * BUF_SIZE + len;
            self.bufs[at..at + n].copy_from_slice(&data[..n]);
            self.cur = Some((id, len + n));
            data = &data[n..];
        }
    }

    /// Queues one line (a newline is added).
    pub fn line(&mut self, args: fmt::Arguments<'_>) {
        let mut l = LineBuf::new();
        let _ = fmt::write(&mut l, args);
        // Keep a line inside one buffer when it fits, so the device never sees half a
        // line at the end of a flush.
        let bytes = l.finish();
        if matches!(self.cur, Some((_, len)) if len + bytes.len() > BUF_SIZE) {
            self.submit_current();
        }
        self.write_bytes(bytes, None);
    }

    /// Hands the current buffer to the device and notifies it if needed.
    pub fn flush(&mut self) {
        self.submit_current();
        self.tx.kick(&self.t);
    }

    /// Flushes and waits until the device has consumed every buffer (or `deadline`).
    pub fn drain(&mut self, deadline: Option<u64>) {
        self.flush();
        loop {
            self.reclaim();
            if self.free.len() == self.tx.size() as usize {
                return;
            }
            if deadline.is_some_and(|d| rdtsc() > d) {
                return;
            }
            core::hint::spin_loop();
        }
    }

    /// Writes a line on the panic path, giving up after `deadline`.
    pub fn emergency_line(&mut self, bytes: &[u8], deadline: u64) {
        self.write_bytes(bytes, Some(deadline));
        self.drain(Some(deadline));
    }
}
