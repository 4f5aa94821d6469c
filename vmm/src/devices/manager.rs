//! Creates the VM's virtio-mmio devices from its config, places them on the MMIO bus,
//! and runs the one backend thread that serves host-side events (TAP frames for
//! virtio-net RX, console socket readers).
//!
//! Window `i` is at `MMIO_BASE + i * MMIO_WINDOW_SIZE`: the console first (test guest only), then the
//! disks in config order, then the NICs.
//!
//! Pause protocol: [`DeviceManager::pause`] raises a flag, kicks the backend thread's
//! epoll through an eventfd and waits until the thread reports itself parked at the top
//! of its loop, where it holds no device lock and touches no guest memory.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use twinrun_lock::lock;
use twinrun_lock::CondvarExt;

use log::{error, warn};
use twinrun_guest_abi::{self as abi, DeviceDesc};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::bus::{Bus, BusError};
use super::output::OutputGate;
use super::virtio::block::written::WrittenBlocks;
use super::virtio::block::{Block, BlockError};
use super::virtio::block::{DiskControls, DiskFaults, DiskHooks, DiskJournal};
use super::virtio::console::sink::SinkError;
use super::virtio::console::Console;
use super::virtio::mmio::MmioTransport;
use super::virtio::net::tap::{Tap, TapError};
use super::virtio::net::Net;
use super::virtio::{VirtioDevice, VirtioError};
use crate::config::{parse_mac, VmConfig};
use crate::vstate::memory::GuestMemoryMmap;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{0} virtio devices configured; at most {max} fit", max = abi::MAX_DEVICES)]
    TooManyDevices(usize),
    #[error("disks[{index}]: {source}")]
    Block { index: usize, source: BlockError },
    #[error("nets[{index}]: {source}")]
    Tap { index: usize, source: TapError },
    #[error("nets[{index}].mac = {value:?}: {why}")]
    Mac {
        index: usize,
        value: String,
        why: &'static str,
    },
    #[error("nets[{index}]: {source}")]
    NetSetup {
        index: usize,
        source: std::io::Error,
    },
    #[error("console: {0}")]
    Console(#[from] SinkError),
    #[error("virtio transport: {0}")]
    Transport(#[from] VirtioError),
    #[error("MMIO bus: {0}")]
    Bus(#[from] BusError),
    #[error("device backend thread: {0}")]
    Backend(std::io::Error),
    #[error("attaching virtio device {index} to the output gate: {source}")]
    OutputGate {
        index: usize,
        source: std::io::Error,
    },
}

/// One device on the bus.
struct Slot {
    base: u64,
    device_id: u32,
    transport: Arc<Mutex<MmioTransport>>,
}

#[derive(Default)]
struct CtlState {
    pause: bool,
    parked: bool,
    stop: bool,
}

/// Shared between the manager and its backend thread.
struct Ctl {
    state: Mutex<CtlState>,
    cv: Condvar,
    kick: EventFd,
}

pub struct DeviceManager {
    slots: Vec<Slot>,
    /// Holds guest output while output commit is on (shared with the UART, if any).
    gate: Arc<OutputGate>,
    /// Whether the disks journal their writes.
    journal_on: std::sync::atomic::AtomicBool,
    /// Fault injection and hooks of each disk, in disk (config) order.
    disks: Vec<DiskControls>,
    ctl: Arc<Ctl>,
    thread: Option<JoinHandle<()>>,
    shut_down: bool,
}

/// epoll token of the control eventfd; device tokens are `slot << 32 | fd`.
const CTL_TOKEN: u64 = u64::MAX;

impl DeviceManager {
    pub fn new(mem: &GuestMemoryMmap, cfg: &VmConfig) -> Result<Self, DeviceError> {
        // A Linux guest's console is the UART (devices::legacy::serial), which owns the
        // console sink: it gets no virtio console, and its disks start at window 0.
        let console = !cfg.payload.is_linux();
        let count = usize::from(console) + cfg.disks.len() + cfg.nets.len();
        if count > abi::MAX_DEVICES {
            return Err(DeviceError::TooManyDevices(count));
        }
        let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
        if console {
            devices.push(Box::new(Console::open(&cfg.console)?));
        }
        for (index, d) in cfg.disks.iter().enumerate() {
            devices.push(Box::new(
                Block::open(d).map_err(|source| DeviceError::Block { index, source })?,
            ));
        }
        for (index, n) in cfg.nets.iter().enumerate() {
            let mac = parse_mac(&n.mac).map_err(|why| DeviceError::Mac {
                index,
                value: n.mac.clone(),
                why,
            })?;
            let tap = Tap::open(&n.tap).map_err(|source| DeviceError::Tap { index, source })?;
            devices.push(Box::new(
                Net::new(tap, mac).map_err(|source| DeviceError::NetSetup { index, source })?,
            ));
        }
        Self::from_devices(mem, devices)
    }

    /// A manager over already built devices, placed in order from `MMIO_BASE`.
    pub fn from_devices(
        mem: &GuestMemoryMmap,
        devices: Vec<Box<dyn VirtioDevice>>,
    ) -> Result<Self, DeviceError> {
        let mut slots = Vec::new();
        let mut disks = Vec::new();
        let gate = OutputGate::new();
        for (i, dev) in devices.into_iter().enumerate() {
            let device_id = dev.device_type();
            disks.extend(dev.disk_controls());
            let mut t = MmioTransport::new(mem.clone(), dev)?;
            t.attach_output_gate(&gate)
                .map_err(|source| DeviceError::OutputGate { index: i, source })?;
            slots.push(Slot {
                base: abi::MMIO_BASE + i as u64 * abi::MMIO_WINDOW_SIZE,
                device_id,
                transport: Arc::new(Mutex::new(t)),
            });
        }
        Ok(DeviceManager {
            slots,
            gate,
            journal_on: std::sync::atomic::AtomicBool::new(false),
            disks,
            ctl: Arc::new(Ctl {
                state: Mutex::new(CtlState::default()),
                cv: Condvar::new(),
                kick: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                    .map_err(DeviceError::Backend)?,
            }),
            thread: None,
            shut_down: false,
        })
    }

    pub fn attach(&self, mmio_bus: &mut Bus) -> Result<(), DeviceError> {
        for s in &self.slots {
            mmio_bus.insert(s.transport.clone(), s.base, abi::MMIO_WINDOW_SIZE)?;
        }
        Ok(())
    }

    pub fn descriptors(&self) -> Vec<DeviceDesc> {
        self.slots
            .iter()
            .map(|s| DeviceDesc {
                mmio_base: s.base,
                device_id: s.device_id,
                _pad: 0,
            })
            .collect()
    }

    /// The transport of window `i` (for state capture and interrupt wiring later).
    pub fn transport(&self, i: usize) -> Option<Arc<Mutex<MmioTransport>>> {
        self.slots.get(i).map(|s| s.transport.clone())
    }

    /// The VM's output gate.
    pub fn output_gate(&self) -> &Arc<OutputGate> {
        &self.gate
    }

    /// Turns the write journal of every disk on or off; returns how many disks.
    pub fn set_disk_journal(&self, on: bool) -> usize {
        self.journal_on
            .store(on, std::sync::atomic::Ordering::Relaxed);
        self.slots
            .iter()
            .filter(|s| lock(&s.transport).set_disk_journal(on))
            .count()
    }

    pub fn disk_journal_enabled(&self) -> bool {
        self.journal_on.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every disk's journal (disks numbered in window order, i.e. config order),
    /// taken and reset. Only while the VM is paused.
    pub fn take_disk_journals(&self) -> Vec<DiskJournal> {
        let mut out = Vec::new();
        for s in &self.slots {
            let mut t = lock(&s.transport);
            if t.device_type() != abi::VIRTIO_ID_BLOCK {
                continue;
            }
            let disk_index = out.len();
            let mut j = t.take_disk_journal().unwrap_or_default();
            j.disk_index = disk_index;
            out.push(j);
        }
        out
    }

    /// Every disk's written blocks since the last take (plus the byte ranges
    /// `also[disk]`), read back from its image; disks in config order. Only while the
    /// VM is paused.
    pub fn read_back_written(&self, also: &[Vec<(u64, u64)>]) -> std::io::Result<Vec<DiskJournal>> {
        let mut out = Vec::new();
        for s in &self.slots {
            let disk_index = out.len();
            let extra = also.get(disk_index).map_or(&[][..], |v| &v[..]);
            if let Some(j) = lock(&s.transport).read_back_written(extra) {
                let mut j = j?;
                j.disk_index = disk_index;
                out.push(j);
            }
        }
        Ok(out)
    }

    /// Disk `disk`'s written-block map since its last take, taken (and so reset); the
    /// maps of every disk with `None`. Only while the VM is paused (or not running),
    /// for the map to hold every write issued.
    pub fn take_written_blocks(&self, disk: Option<usize>) -> Vec<WrittenBlocks> {
        let mut out = Vec::new();
        let mut k = 0;
        for s in &self.slots {
            let mut t = lock(&s.transport);
            if t.device_type() != abi::VIRTIO_ID_BLOCK {
                continue;
            }
            if disk.is_none_or(|d| d == k) {
                out.extend(t.take_written_blocks());
            }
            k += 1;
        }
        out
    }

    /// The frames waiting on every NIC's host side that the guest has not received,
    /// `(net index, frame)`, at most `max` in all, taken off the hosts. Only while
    /// the VM is paused (the backend thread is parked and reads none meanwhile).
    pub fn take_rx_frames(&self, max: usize) -> Vec<(usize, Vec<u8>)> {
        let mut out = Vec::new();
        let mut net = 0;
        for s in &self.slots {
            if s.device_id != abi::VIRTIO_ID_NET {
                continue;
            }
            let left = max.saturating_sub(out.len());
            out.extend(
                lock(&s.transport)
                    .take_rx_frames(left)
                    .into_iter()
                    .map(|f| (net, f)),
            );
            net += 1;
        }
        out
    }

    /// Delivers `frames` to NIC `net`'s guest before anything its TAP receives later.
    /// False if there is no such NIC.
    pub fn inject_rx_frames(&self, net: usize, frames: Vec<Vec<u8>>) -> bool {
        let Some(s) = self
            .slots
            .iter()
            .filter(|s| s.device_id == abi::VIRTIO_ID_NET)
            .nth(net)
        else {
            return false;
        };
        lock(&s.transport).inject_rx_frames(frames);
        true
    }

    /// Installs `hooks` on every disk (or removes them with `None`); safe while the
    /// vCPUs run: each disk picks them up at its next batch of requests.
    pub fn set_disk_hooks(&self, hooks: Option<Arc<dyn DiskHooks>>) {
        for (disk, c) in self.disks.iter().enumerate() {
            c.set_hooks(disk, hooks.clone());
        }
    }

    /// The fault injection of disk `disk` (index in the VM config's `disks`).
    pub fn disk_faults(&self, disk: usize) -> Option<Arc<DiskFaults>> {
        self.disks.get(disk).map(|c| c.faults.clone())
    }

    /// How many disks the VM has.
    pub fn disk_count(&self) -> usize {
        self.disks.len()
    }

    pub fn start(&mut self) -> Result<(), DeviceError> {
        if self.thread.is_some() || self.shut_down {
            return Ok(());
        }
        let epoll = Epoll::new().map_err(DeviceError::Backend)?;
        epoll
            .ctl(
                ControlOperation::Add,
                self.ctl.kick.as_raw_fd(),
                EpollEvent::new(EventSet::IN, CTL_TOKEN),
            )
            .map_err(DeviceError::Backend)?;
        let transports: Vec<_> = self.slots.iter().map(|s| s.transport.clone()).collect();
        let ctl = self.ctl.clone();
        let handle = std::thread::Builder::new()
            .name("twinrun-devices".into())
            .spawn(move || backend_loop(epoll, transports, ctl))
            .map_err(DeviceError::Backend)?;
        self.thread = Some(handle);
        Ok(())
    }

    pub fn pause(&self) {
        if self.thread.is_none() {
            return;
        }
        let mut st = lock(&self.ctl.state);
        st.pause = true;
        if let Err(e) = self.ctl.kick.write(1) {
            error!("device manager: cannot kick the backend thread: {e}");
        }
        while !st.parked && !st.stop {
            st = self.ctl.cv.wait_or_recover(st);
        }
    }

    pub fn resume(&self) {
        let mut st = lock(&self.ctl.state);
        st.pause = false;
        self.ctl.cv.notify_all();
    }

    pub fn shutdown(&mut self) {
        if self.shut_down {
            return;
        }
        self.shut_down = true;
        {
            let mut st = lock(&self.ctl.state);
            st.stop = true;
            self.ctl.cv.notify_all();
        }
        let _ = self.ctl.kick.write(1);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                error!("device backend thread panicked");
            }
        }
        for s in &self.slots {
            lock(&s.transport).flush_output();
        }
    }
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Parks while a pause is requested; returns false when the thread must stop.
fn check_ctl(ctl: &Ctl) -> bool {
    let mut st = lock(&ctl.state);
    if st.pause && !st.stop {
        st.parked = true;
        ctl.cv.notify_all();
        while st.pause && !st.stop {
            st = ctl.cv.wait_or_recover(st);
        }
        st.parked = false;
    }
    !st.stop
}

fn backend_loop(epoll: Epoll, transports: Vec<Arc<Mutex<MmioTransport>>>, ctl: Arc<Ctl>) {
    // What each slot has registered: fd -> event mask.
    let mut registered: Vec<HashMap<RawFd, u32>> = vec![HashMap::new(); transports.len()];
    for (i, t) in transports.iter().enumerate() {
        let fds = lock(t).backend_fds();
        sync_fds(&epoll, i, &mut registered[i], &fds);
    }
    let mut events = vec![EpollEvent::default(); 32];
    // Events left over when a pause interrupted a batch; handled first after resume
    // (edge-triggered ones would not fire again).
    let mut deferred: Vec<(u64, u32)> = Vec::new();
    loop {
        if !check_ctl(&ctl) {
            return;
        }
        let batch: Vec<(u64, u32)> = if deferred.is_empty() {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("device backend: epoll_wait: {e}");
                    return;
                }
            };
            events[..n].iter().map(|e| (e.data(), e.events())).collect()
        } else {
            std::mem::take(&mut deferred)
        };
        for (k, &(token, evs)) in batch.iter().enumerate() {
            if token == CTL_TOKEN {
                let _ = ctl.kick.read();
                continue;
            }
            // A pause requested mid-batch must not wait for the whole batch.
            if lock(&ctl.state).pause {
                deferred.extend(batch[k..].iter().filter(|e| e.0 != CTL_TOKEN));
                break;
            }
            let slot = (token >> 32) as usize;
            let fd = token as u32 as RawFd;
            let Some(t) = transports.get(slot) else {
                continue;
            };
            let fds = {
                let mut t = lock(t);
                if !registered[slot].contains_key(&fd) {
                    // Unregistered by an earlier event in this batch.
                    continue;
                }
                t.backend_event(fd, evs);
                t.backend_fds()
            };
            sync_fds(&epoll, slot, &mut registered[slot], &fds);
        }
    }
}

/// Brings epoll's registrations for `slot` in line with what the device wants now.
fn sync_fds(epoll: &Epoll, slot: usize, have: &mut HashMap<RawFd, u32>, want: &[(RawFd, u32)]) {
    let token = |fd: RawFd| ((slot as u64) << 32) | u64::from(fd as u32);
    have.retain(|fd, mask| {
        if want.iter().any(|&(f, m)| f == *fd && m == *mask) {
            return true;
        }
        // The fd may already be closed (epoll then dropped it itself): ignore errors.
        let _ = epoll.ctl(
            ControlOperation::Delete,
            *fd,
            EpollEvent::new(EventSet::empty(), token(*fd)),
        );
        false
    });
    for &(fd, mask) in want {
        if have.contains_key(&fd) {
            continue;
        }
        match epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::from_bits_truncate(mask), token(fd)),
        ) {
            Ok(()) => {
                have.insert(fd, mask);
            }
            Err(e) => warn!("device backend: cannot watch fd {fd}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests;
