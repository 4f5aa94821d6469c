//! [`Vmm`]: a built VM and its threads — start, pause, resume, stop and wait.

use std::os::unix::thread::JoinHandleExt;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use twinrun_lock::MutexExt;

use kvm_ioctls::VcpuFd;

use crate::devices::bus::{Bus, BusDevice, BusError};
use crate::devices::legacy::serial::SerialDevice;
use crate::devices::manager::{DeviceError, DeviceManager};
use crate::exit::VmExit;
use crate::vstate::control::{
    install_kick_handler, kick_signal, ControlError, RunControl, RunPage,
};
use crate::vstate::dirty::{
    DirtyError, DirtyRings, DirtySet, DirtyTracker, HarvestStats, KvmDirtySource, RingSource,
};
use crate::vstate::hot_pages::HotPageConfig;
use crate::vstate::memory::{GuestMemoryMmap, SlotFlags};
use crate::vstate::vcpu::VcpuRunner;
use crate::vstate::vm::{Vm, VmError};

/// How long `pause` waits for every vCPU to park before giving up. Kicks take
/// microseconds; this only bounds a vCPU stuck in a slow device handler.
pub const PAUSE_LIMIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("the VM has not been started")]
    NotStarted,
    #[error("the VM was already started")]
    AlreadyStarted,
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
    #[error("cannot map kvm_run of vCPU {0}: {1}")]
    MapRun(u8, std::io::Error),
    #[error("cannot spawn thread for vCPU {0}: {1}")]
    Spawn(u8, std::io::Error),
    #[error("bus: {0}")]
    Bus(#[from] BusError),
    #[error("devices: {0}")]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("dirty tracking: {0}")]
    Dirty(#[from] DirtyError),
    #[error("state capture: {0}")]
    Capture(#[from] CaptureError),
    #[error("output commit: {0}")]
    Output(#[from] crate::devices::output::OutputError),
    #[error("attaching the UART to the output gate: {0}")]
    SerialGate(std::io::Error),
    #[error("reading written blocks back from a disk image: {0}")]
    DiskReadBack(std::io::Error),
}

mod capture;
mod epoch;
mod output;
pub use capture::CaptureError;
pub use epoch::{CutKind, EpochCut};

/// Ends a running VM from any thread (e.g. a SIGTERM handler thread): `wait` then
/// returns [`VmExit::Stopped`].
#[derive(Clone)]
pub struct Stopper {
    control: Arc<RunControl>,
}

impl Stopper {
    pub fn stop(&self) {
        self.control.end(VmExit::Stopped);
    }

    /// Ends the VM with `exit` (a device that ends the VM, e.g. the i8042 reset).
    pub(crate) fn end_with(&self, exit: VmExit) {
        self.control.end(exit);
    }
}

/// A built VM. Created by [`crate::builder::build_vm`]; not running until
/// [`start`](Vmm::start).
pub struct Vmm {
    /// vCPU fds while no thread owns them (before start, after the threads ended).
    vcpus: Vec<VcpuFd>,
    threads: Vec<JoinHandle<Option<VcpuFd>>>,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    control: Arc<RunControl>,
    devices: DeviceManager,
    started: bool,
    finished: Option<VmExit>,
    /// Dirty page tracking, once started.
    dirty: Mutex<Option<DirtyTracker>>,
    /// COM1 of a Linux guest (its state is part of [`Vmm::capture_state`]).
    serial: Option<Arc<Mutex<SerialDevice>>>,
    /// What [`Vmm::capture_state`] reads once and reuses.
    capture_cache: Mutex<capture::CaptureCache>,
    /// Hot-page policy for dirty tracking (see [`Vmm::set_hot_pages`]).
    hot_pages: Mutex<Option<HotPageConfig>>,
    /// KVM's dirty rings when the VM was built with them (then the only dirty log).
    rings: Option<Arc<DirtyRings>>,
    // Declared last: the threads (joined in Drop) use the VM and its memory.
    vm: Vm,
    mem: GuestMemoryMmap,
}

impl Vmm {
    pub(crate) fn new(
        mem: GuestMemoryMmap,
        vm: Vm,
        vcpus: Vec<VcpuFd>,
        mmio: Bus,
        pio: Bus,
        devices: DeviceManager,
    ) -> Vmm {
        let n = vcpus.len();
        Vmm {
            vcpus,
            threads: Vec::new(),
            mmio: Arc::new(mmio),
            pio: Arc::new(pio),
            control: Arc::new(RunControl::new(n)),
            devices,
            started: false,
            finished: None,
            dirty: Mutex::new(None),
            serial: None,
            capture_cache: Mutex::new((None, Vec::new())),
            hot_pages: Mutex::new(None),
            rings: None,
            vm,
            mem,
        }
    }

    /// Maps the dirty ring of every vCPU (enabled on the VM before they were created,
    /// with `entries` each): dirty tracking then uses the ring. Only before `start`.
    pub(crate) fn map_dirty_rings(&mut self, entries: u32) -> Result<(), DirtyError> {
        self.rings = Some(DirtyRings::map(&self.vm, &self.vcpus, &self.mem, entries)?);
        Ok(())
    }

    /// The vCPUs' dirty rings, when the VM was built with them
    /// ([`crate::config::DirtyLog`]).
    pub fn dirty_rings(&self) -> Option<&Arc<DirtyRings>> {
        self.rings.as_ref()
    }

    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Changes the flags of every memory slot (e.g. turns on KVM dirty logging).
    pub fn set_slot_flags(&self, flags: SlotFlags) -> Result<(), VmmError> {
        Ok(self.vm.set_slot_flags(&self.mem, flags)?)
    }

    /// Turns on dirty page tracking (KVM's log for vCPU writes, vm-memory's bitmap for
    /// the VMM's own writes) and clears both logs: the next harvest returns the pages
    /// written after this call. Copy the baseline of memory after it returns. Calling it
    /// again restarts tracking from a new baseline.
    pub fn start_dirty_tracking(&self) -> Result<(), VmmError> {
        let mut d = self.dirty.lock_or_recover();
        let t = match (d.take(), &self.rings) {
            (Some(t), _) => t,
            (None, Some(rings)) => {
                DirtyTracker::with_source(Box::new(RingSource::new(rings.clone())))
            }
            (None, None) => DirtyTracker::new(&self.vm),
        };
        self.install_tracker(&mut d, t)
    }

    /// Like [`start_dirty_tracking`](Self::start_dirty_tracking) with a chosen KVM log
    /// (e.g. the bitmap without manual re-protect, to measure it).
    pub fn start_dirty_tracking_with(
        &self,
        source: Box<dyn KvmDirtySource>,
    ) -> Result<(), VmmError> {
        // GET_DIRTY_LOG is refused on a VM with the ring, and a VM without it has none.
        match (self.rings.is_some(), source.uses_ring()) {
            (true, false) => return Err(DirtyError::RingVm(source.name()).into()),
            (false, true) => return Err(DirtyError::NoRing.into()),
            _ => {}
        }
        let mut d = self.dirty.lock_or_recover();
        if let Some(mut old) = d.take() {
            old.stop(&self.vm, &self.mem)?;
        }
        self.install_tracker(&mut d, DirtyTracker::with_source(source))
    }

    /// Hot pages for dirty tracking, now and when tracking (re)starts (see
    /// [`crate::vstate::hot_pages`]); `None` re-protects every page at each harvest.
    /// False when the KVM log in use cannot keep pages writable (the dirty ring, or a
    /// bitmap without manual re-protect): then every page is re-protected.
    pub fn set_hot_pages(&self, cfg: Option<HotPageConfig>) -> bool {
        *self.hot_pages.lock_or_recover() = cfg;
        let mut d = self.dirty.lock_or_recover();
        match d.as_mut() {
            Some(t) => t.set_hot_pages(cfg),
            // The ring cannot leave pages writable (see `vstate::dirty::ring`).
            None => cfg.is_none() || self.rings.is_none(),
        }
    }

    fn install_tracker(
        &self,
        slot: &mut Option<DirtyTracker>,
        mut t: DirtyTracker,
    ) -> Result<(), VmmError> {
        let hot = *self.hot_pages.lock_or_recover();
        if hot.is_some() && !t.set_hot_pages(hot) {
            log::info!(
                "dirty tracking: hot pages need manual re-protect; every page is re-protected"
            );
        }
        t.start(&self.vm, &self.mem)?;
        log::debug!("dirty tracking started ({})", t.source_name());
        *slot = Some(t);
        Ok(())
    }

    /// Turns KVM dirty logging off.
    pub fn stop_dirty_tracking(&self) -> Result<(), VmmError> {
        let mut d = self.dirty.lock_or_recover();
        if let Some(mut t) = d.take() {
            t.stop(&self.vm, &self.mem)?;
        }
        Ok(())
    }

    /// The pages written (by vCPUs or by the VMM) since the previous harvest or
    /// [`start_dirty_tracking`](Self::start_dirty_tracking). Only while paused (or
    /// before start / after the end): the caller copies the pages before resuming.
    pub fn harvest_dirty(&self) -> Result<DirtySet, VmmError> {
        let mut set = DirtySet::new(&self.mem);
        self.harvest_dirty_into(&mut set)?;
        Ok(set)
    }

    /// Like [`harvest_dirty`](Self::harvest_dirty), ORing into a caller-kept set (no
    /// allocation for the result); returns counts and timings.
    pub fn harvest_dirty_into(&self, out: &mut DirtySet) -> Result<HarvestStats, VmmError> {
        // Nothing may write guest memory between the harvest and the caller's copy:
        // vCPUs parked (or gone) and, because Vmm::pause parks them too, the devices.
        let quiet = !self.started || self.threads.is_empty() || self.control.is_paused();
        if !quiet {
            return Err(DirtyError::NotPaused.into());
        }
        let mut d = self.dirty.lock_or_recover();
        let t = d.as_mut().ok_or(DirtyError::NotStarted)?;
        Ok(t.harvest_into(&self.vm, &self.mem, out)?)
    }

    /// While the guest runs (or paused): takes the pages logged so far and
    /// re-protects them now, so that the next [`harvest_dirty_into`](Self::harvest_dirty_into)
    /// returns them as well but re-protects, inside the pause, only what was written
    /// after this call (see [`DirtyTracker::pre_harvest`]). Returns the pages taken.
    pub fn pre_harvest_dirty(&self) -> Result<usize, VmmError> {
        let mut d = self.dirty.lock_or_recover();
        let t = d.as_mut().ok_or(DirtyError::NotStarted)?;
        Ok(t.pre_harvest(&self.vm, &self.mem)?)
    }

    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len() + self.threads.len()
    }

    /// Adds a device to the MMIO bus; only before `start` (the bus is then shared
    /// read-only by the vCPU threads).
    pub fn insert_mmio_device(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), VmmError> {
        Arc::get_mut(&mut self.mmio)
            .ok_or(VmmError::AlreadyStarted)?
            .insert(dev, base, len)?;
        Ok(())
    }

    /// Adds a device to the port I/O bus; only before `start`.
    pub fn insert_pio_device(
        &mut self,
        dev: Arc<Mutex<dyn BusDevice>>,
        port: u16,
        len: u16,
    ) -> Result<(), VmmError> {
        Arc::get_mut(&mut self.pio)
            .ok_or(VmmError::AlreadyStarted)?
            .insert(dev, u64::from(port), u64::from(len))?;
        Ok(())
    }

    /// Records the UART so that state capture includes it, and routes its output
    /// through the output gate; only before `start`.
    pub(crate) fn set_serial(&mut self, serial: Arc<Mutex<SerialDevice>>) -> Result<(), VmmError> {
        serial
            .lock_or_recover()
            .attach_output_gate(self.devices.output_gate())
            .map_err(VmmError::SerialGate)?;
        self.serial = Some(serial);
        Ok(())
    }

    /// The UART of a Linux guest, if any.
    pub fn serial(&self) -> Option<&Arc<Mutex<SerialDevice>>> {
        self.serial.as_ref()
    }

    /// The virtio devices (for state capture and tests).
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// Installs disk hooks on every disk (`None` removes them); safe while running.
    pub fn set_disk_hooks(&self, hooks: Option<Arc<dyn crate::devices::virtio::block::DiskHooks>>) {
        self.devices.set_disk_hooks(hooks);
    }

    /// Fault injection of disk `disk` (index in the VM config's `disks`).
    pub fn disk_faults(
        &self,
        disk: usize,
    ) -> Option<Arc<crate::devices::virtio::block::DiskFaults>> {
        self.devices.disk_faults(disk)
    }

    /// Starts the device backend thread, then one thread per vCPU.
    pub fn start(&mut self) -> Result<(), VmmError> {
        if self.started {
            return Err(VmmError::AlreadyStarted);
        }
        install_kick_handler().map_err(VmmError::Signal)?;
        self.devices.start()?;
        let run_size = self.vm.fd().run_size();
        for (i, fd) in self.vcpus.iter().enumerate() {
            let page = RunPage::map(fd, run_size).map_err(|e| VmmError::MapRun(i as u8, e))?;
            self.control.add_vcpu(page);
        }
        self.started = true;
        for (i, fd) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let index = i as u8;
            let mut runner = VcpuRunner::new(
                index,
                fd,
                self.mmio.clone(),
                self.pio.clone(),
                self.control.clone(),
            )
            .with_dirty_rings(self.rings.clone());
            let control = self.control.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    // The spawning thread may block signals (e.g. a CLI that handles
                    // SIGTERM with signalfd); the kick must get through.
                    if let Err(e) = vmm_sys_util::signal::unblock_signal(kick_signal()) {
                        log::warn!("vCPU {index}: cannot unblock the kick signal: {e:?}");
                    }
                    let r = std::panic::catch_unwind(AssertUnwindSafe(|| runner.run()));
                    match r {
                        Ok(()) => Some(runner.fd),
                        Err(_) => {
                            control.end(VmExit::VcpuError {
                                vcpu: index,
                                error: "vCPU thread panicked".into(),
                            });
                            control.vcpu_exited();
                            None
                        }
                    }
                });
            match spawned {
                Ok(h) => {
                    self.control.set_thread(i, h.as_pthread_t());
                    self.threads.push(h);
                }
                Err(e) => {
                    // Do not leave the threads already started running.
                    self.control.end(VmExit::VcpuError {
                        vcpu: index,
                        error: format!("cannot spawn thread: {e}"),
                    });
                    self.join();
                    return Err(VmmError::Spawn(index, e));
                }
            }
        }
        Ok(())
    }

    /// Stops every vCPU (kicks them out of `KVM_RUN` and parks them). Returns how long
    /// it took, once all are parked.
    pub fn pause(&self) -> Result<Duration, VmmError> {
        if !self.started {
            return Err(VmmError::NotStarted);
        }
        let t0 = std::time::Instant::now();
        // vCPUs first: once they are parked nothing new reaches the devices; then the
        // backend thread, so no device touches guest memory until resume.
        self.control.pause(PAUSE_LIMIT)?;
        self.devices.pause();
        Ok(t0.elapsed())
    }

    pub fn resume(&self) -> Result<(), VmmError> {
        if !self.started {
            return Err(VmmError::NotStarted);
        }
        self.devices.resume();
        Ok(self.control.resume()?)
    }

    pub fn stopper(&self) -> Stopper {
        Stopper {
            control: self.control.clone(),
        }
    }

    /// Blocks until the VM ends; joins the vCPU threads and shuts the devices down
    /// (flushing console output).
    pub fn wait(&mut self) -> VmExit {
        if let Some(e) = &self.finished {
            return e.clone();
        }
        if !self.started {
            return VmExit::VcpuError {
                vcpu: 0,
                error: "wait() on a VM that was never started".into(),
            };
        }
        let exit = self.control.wait_end(None).unwrap_or(VmExit::Stopped);
        self.finish(exit)
    }

    /// How the VM ended, if it did, WITHOUT joining its threads (unlike
    /// [`wait_timeout`](Self::wait_timeout)): a caller whose disk hooks may hold a vCPU
    /// until that caller acts (an HA primary waiting for its standby's acknowledgement)
    /// looks here, releases them, then [`wait`](Self::wait)s.
    pub fn ended(&self) -> Option<VmExit> {
        if let Some(e) = &self.finished {
            return Some(e.clone());
        }
        if !self.started {
            return None;
        }
        self.control.wait_end(Some(Duration::ZERO))
    }

    /// Like [`wait`](Self::wait), but gives up after `t` (the VM keeps running).
    pub fn wait_timeout(&mut self, t: Duration) -> Option<VmExit> {
        if let Some(e) = &self.finished {
            return Some(e.clone());
        }
        if !self.started {
            return None;
        }
        let exit = self.control.wait_end(Some(t))?;
        Some(self.finish(exit))
    }

    fn finish(&mut self, exit: VmExit) -> VmExit {
        self.join();
        self.devices.shutdown();
        self.finished = Some(exit.clone());
        exit
    }

    fn join(&mut self) {
        // After this no thread id is used again, so joining is safe.
        self.control.disable_kicks();
        for h in self.threads.drain(..) {
            if let Ok(Some(fd)) = h.join() {
                self.vcpus.push(fd);
            }
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.control.end(VmExit::Stopped);
            self.join();
        }
        self.devices.shutdown();
    }
}
