//! virtio-net on a TAP interface: receiveq 0, transmitq 1, no control queue, no
//! offloads, MAC in config space (`VIRTIO_NET_F_MAC`).
//!
//! Every frame carries the virtio 1.x 12-byte header (`virtio_net_hdr_v1`). With no
//! offloads negotiated the header carries nothing on TX (it is stripped) and is zero on
//! RX apart from `num_buffers = 1`.
//!
//! TX runs on the vCPU thread that notified the queue: each chain is copied out and
//! written to the TAP. RX runs on the device manager's backend thread: it reads frames
//! from the TAP while the receive queue has buffers; when it runs out it stops watching
//! the TAP ("stalled") until the driver notifies the receive queue, which the vCPU
//! thread turns into a write to `rx_evt`, which the backend thread waits on.
//!
//! With output commit on, TX frames go to the VM's output gate instead of the TAP
//! ([`crate::devices::output`]); when the gate is full the device stops taking TX chains
//! and resumes from the backend thread when the gate's wake eventfd fires.

mod persist;
pub mod tap;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use log::warn;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use self::tap::Tap;
use super::*;
use crate::devices::output::{GatePort, OutputGate, ReleaseSink, StreamKind, TapRelease};
use crate::vstate::memory::GuestMemoryMmap;

pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// `struct virtio_net_hdr_v1`.
pub const NET_HDR_LEN: usize = 12;
/// Largest frame plus header a chain may carry (64 KiB TSO frame + Ethernet + header).
pub const MAX_FRAME_WITH_HDR: usize = 65562;
/// Frames moved per backend event, so one busy TAP cannot hog the thread.
const RX_BURST: usize = 64;

const QUEUE_SIZES: [u16; 2] = [QUEUE_MAX_SIZE, QUEUE_MAX_SIZE];

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct NetStats {
    pub tx_frames: u64,
    /// Frames handed to the output gate (counted in `tx_frames` too).
    pub tx_held: u64,
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_dropped: u64,
}

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    rx_evt: EventFd,
    rx_stalled: bool,
    rx_buf: Vec<u8>,
    /// Frames handed in from elsewhere (a swapped-out primary's TAP), delivered to the
    /// guest before anything read from the TAP.
    rx_injected: std::collections::VecDeque<Vec<u8>>,
    /// This NIC's stream in the VM's output gate, once attached.
    gate: Option<GatePort>,
    pub stats: NetStats,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> io::Result<Net> {
        Ok(Net {
            tap,
            mac,
            rx_evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            rx_stalled: false,
            rx_buf: vec![0u8; MAX_FRAME_WITH_HDR],
            rx_injected: std::collections::VecDeque::new(),
            gate: None,
            stats: NetStats::default(),
        })
    }

    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    fn transmit(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> Result<bool, VirtioError> {
        let mut any = false;
        // A full gate leaves the chains in the guest's queue (backpressure, no loss).
        while self.gate.as_ref().is_none_or(GatePort::has_room) {
            let Some(chain) = pop_chain(queue, mem, TX_QUEUE)? else {
                break;
            };
            let frame = read_chain(mem, &chain, MAX_FRAME_WITH_HDR as u64)?;
            if frame.len() < NET_HDR_LEN {
                return Err(VirtioError::BadLength {
                    head: chain.head,
                    len: frame.len() as u64,
                    why: "shorter than the virtio-net header",
                });
            }
            let frame = match &self.gate {
                Some(g) => match g.hold(frame, NET_HDR_LEN) {
                    Ok(()) => {
                        self.stats.tx_frames += 1;
                        self.stats.tx_held += 1;
                        add_used(queue, mem, TX_QUEUE, chain.head, 0)?;
                        any = true;
                        continue;
                    }
                    Err(frame) => frame,
                },
                None => frame,
            };
            match self.tap.write_frame(&frame[NET_HDR_LEN..]) {
                Ok(_) => self.stats.tx_frames += 1,
                Err(e) => {
                    // The host side is not taking frames (link down, queue full): the
                    // frame is lost as it would be on a wire.
                    self.stats.tx_dropped += 1;
                    log::debug!("virtio-net: TX frame dropped: {e}");
                }
            }
            add_used(queue, mem, TX_QUEUE, chain.head, 0)?;
            any = true;
        }
        Ok(any)
    }

    fn receive(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        active: bool,
    ) -> Result<bool, VirtioError> {
        let queue = &mut queues[RX_QUEUE];
        if !active || !virtio_queue::QueueT::ready(queue) {
            self.rx_stalled = true;
            return Ok(false);
        }
        let mut any = false;
        for _ in 0..RX_BURST {
            if !has_avail(queue, mem) {
                self.rx_stalled = true;
                break;
            }
            let n = if let Some(f) = self.rx_injected.pop_front() {
                let n = f.len().min(self.rx_buf.len() - NET_HDR_LEN);
                self.rx_buf[NET_HDR_LEN..NET_HDR_LEN + n].copy_from_slice(&f[..n]);
                n
            } else {
                match self.tap.read_frame(&mut self.rx_buf[NET_HDR_LEN..]) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        warn!("virtio-net: reading TAP {}: {e}", self.tap.name());
                        break;
                    }
                }
            };
            self.rx_buf[..NET_HDR_LEN].fill(0);
            // num_buffers = 1 (le16 at offset 10).
            self.rx_buf[10] = 1;
            let Some(chain) = pop_chain(queue, mem, RX_QUEUE)? else {
                self.stats.rx_dropped += 1;
                break;
            };
            let len = match write_chain(mem, &chain, &self.rx_buf[..NET_HDR_LEN + n])? {
                Some(len) => {
                    self.stats.rx_frames += 1;
                    len
                }
                None => {
                    // Buffer too small for this frame: drop the frame and give the
                    // buffer back empty, as a NIC drops an oversized frame.
                    self.stats.rx_dropped += 1;
                    0
                }
            };
            add_used(queue, mem, RX_QUEUE, chain.head, len)?;
            any = true;
        }
        Ok(any)
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        twinrun_guest_abi::VIRTIO_ID_NET
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn save_state(&self) -> super::persist::DeviceState {
        self.persist()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6]; nothing else is valid with our features.
        super::block::read_config_bytes(&self.mac, offset, data);
    }

    fn process_queue(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        index: usize,
    ) -> Result<bool, VirtioError> {
        match index {
            RX_QUEUE => {
                // New receive buffers: wake the backend thread, which owns RX.
                if let Err(e) = self.rx_evt.write(1) {
                    warn!("virtio-net: cannot wake the RX thread: {e}");
                }
                Ok(false)
            }
            _ => self.transmit(mem, &mut queues[TX_QUEUE]),
        }
    }

    fn backend_fds(&self) -> Vec<(RawFd, u32)> {
        let mut v = vec![(self.rx_evt.as_raw_fd(), libc::EPOLLIN as u32)];
        if let Some(g) = &self.gate {
            v.push((g.wake_fd(), libc::EPOLLIN as u32));
        }
        if !self.rx_stalled {
            v.push((self.tap.as_raw_fd(), libc::EPOLLIN as u32));
        }
        v
    }

    fn backend_event(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [Queue],
        active: bool,
        fd: RawFd,
        _events: u32,
    ) -> Result<bool, VirtioError> {
        if let Some(g) = self.gate.as_ref().filter(|g| g.wake_fd() == fd) {
            // The gate has room again: send what the guest queued meanwhile.
            g.clear_wake();
            if active && virtio_queue::QueueT::ready(&queues[TX_QUEUE]) {
                return self.transmit(mem, &mut queues[TX_QUEUE]);
            }
            return Ok(false);
        }
        if fd == self.rx_evt.as_raw_fd() {
            // Drain the counter; any value means "buffers were added".
            let _ = self.rx_evt.read();
            self.rx_stalled = false;
        }
        self.receive(mem, queues, active)
    }

    fn reset(&mut self) {
        self.rx_stalled = false;
    }

    fn take_rx_frames(&mut self, max: usize) -> Vec<Vec<u8>> {
        // Frames injected and not yet delivered come first: they arrived first.
        let mut out: Vec<Vec<u8>> = self.rx_injected.drain(..).collect();
        let mut buf = vec![0u8; MAX_FRAME_WITH_HDR];
        while out.len() < max {
            match self.tap.read_frame(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.push(buf[..n].to_vec()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    if e.kind() != io::ErrorKind::WouldBlock {
                        warn!("virtio-net: reading TAP {}: {e}", self.tap.name());
                    }
                    break;
                }
            }
        }
        out.truncate(max);
        out
    }

    fn inject_rx_frames(&mut self, frames: Vec<Vec<u8>>) {
        if frames.is_empty() {
            return;
        }
        self.rx_injected.extend(frames);
        // Wake the backend thread (now, or when it starts): it delivers them first.
        self.rx_stalled = false;
        if let Err(e) = self.rx_evt.write(1) {
            warn!("virtio-net: cannot wake the RX thread: {e}");
        }
    }

    fn attach_output_gate(&mut self, gate: &Arc<OutputGate>) -> io::Result<()> {
        let sink: Arc<Mutex<dyn ReleaseSink>> =
            Arc::new(Mutex::new(TapRelease(self.tap.try_clone_writer()?)));
        self.gate = Some(gate.register(StreamKind::Net, sink)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests;
