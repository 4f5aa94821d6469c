//! What the primary's capture and driver need of the protected VM, as a trait: the real
//! [`Vmm`], and the simulation's toy VM (`tests/sim.rs`), which runs the very same
//! capture and driver code.
//!
//! An epoch is cut with one call ([`PrimaryVm::cut_epoch`], `Vmm::cut_epoch`): the
//! order of the pieces (output epoch, dirty pages, state, disk writes) is the VM's
//! business, not the caller's.

use std::time::Duration;

use vmm::devices::output::EpochConsole;
use vmm::devices::virtio::block::DiskJournal;
use vmm::vstate::dirty::{DirtySet, HarvestStats};
use vmm::vstate::memory::GuestMemoryMmap;
use vmm::{CutKind, Vmm, VmmError};

/// A captured VM state (everything but memory), as the capture encodes and hashes it.
pub trait EpochState {
    fn to_bytes(&self) -> Result<Vec<u8>, vmm::persist::StateFormatError>;
    /// The replica-equality hash of its canonical parts (see [`crate::verify`]).
    fn hash(&self) -> u32;
}

impl EpochState for vmm::VmState {
    fn to_bytes(&self) -> Result<Vec<u8>, vmm::persist::StateFormatError> {
        vmm::VmState::to_bytes(self)
    }
    fn hash(&self) -> u32 {
        crate::verify::hash_state(self)
    }
}

/// One epoch cut from the paused VM (the dirty pages are in the caller's set).
pub struct Cut<S> {
    pub harvest: HarvestStats,
    pub state: S,
    pub journals: Vec<DiskJournal>,
    pub console: Option<EpochConsole>,
    pub frames: Vec<(usize, Vec<u8>)>,
}

/// Work handed to another thread while the VM is paused, and how to wait for it.
pub enum Parked<'a, T> {
    /// Running on a parked vCPU's thread.
    Vcpu(vmm::vstate::control::ParkedJob<'a, T>),
    /// Already done (no thread to hand it to).
    Done(T),
}

impl<T> Parked<'_, T> {
    pub fn wait(self, limit: Duration) -> Result<T, VmmError> {
        match self {
            Parked::Vcpu(j) => j.wait(limit).map_err(VmmError::from),
            Parked::Done(t) => Ok(t),
        }
    }
}

/// The VM the primary protects.
pub trait PrimaryVm {
    type State: EpochState;
    fn guest_memory(&self) -> &GuestMemoryMmap;
    fn pause(&self) -> Result<Duration, VmmError>;
    fn resume(&self) -> Result<(), VmmError>;
    /// Dirty tracking from here on (the baseline is all of memory).
    fn start_dirty_tracking(&self) -> Result<(), VmmError>;
    /// ORs the pages written since the previous harvest into `out` (paused).
    fn harvest_dirty_into(&self, out: &mut DirtySet) -> Result<HarvestStats, VmmError>;
    /// Cuts epoch `epoch` while paused (see `Vmm::cut_epoch`).
    fn cut_epoch(
        &self,
        epoch: u64,
        dirty: &mut DirtySet,
        kind: CutKind<'_>,
    ) -> Result<Cut<Self::State>, VmmError>;
    /// Runs `f` on another thread while paused (a parked vCPU's), or here.
    fn run_parked<T, F>(&self, f: F) -> Result<Parked<'_, T>, VmmError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static;
    /// Writes the held output of closed epochs through `through`.
    fn release_output(&self, through: u64) -> Result<(), VmmError>;
    /// The open epoch holds output.
    fn output_waiting(&self) -> bool;
    /// Simplex (paused): release everything held, stop holding output and journalling
    /// disk writes. Returns (console bytes, frames) released.
    fn end_output_commit(&self) -> Result<(u64, u64), VmmError>;
    /// Drops the held output of every epoch after `epoch` (and the open one): a
    /// planned role swap handed it to the standby, which releases it.
    fn discard_output_after(&self, epoch: u64);
    /// The frames waiting on the NICs' host side that the paused guest has not
    /// received, `(net index, frame)`, at most `max`, taken: a planned role swap hands
    /// them to the new primary. None for a VM without NICs.
    fn take_rx_frames(&self, _max: usize) -> Vec<(u16, Vec<u8>)> {
        Vec::new()
    }
    /// Gives frames taken by [`PrimaryVm::take_rx_frames`] back to the guest (a swap
    /// that failed: the guest resumes here).
    fn inject_rx_frames(&self, _frames: Vec<(u16, Vec<u8>)>) {}
    /// Takes (resets) the written-block maps of every disk, or of `disk` only.
    fn reset_written_blocks(&self, disk: Option<usize>);
}

impl<T: PrimaryVm + ?Sized> PrimaryVm for &T {
    type State = T::State;
    fn guest_memory(&self) -> &GuestMemoryMmap {
        (**self).guest_memory()
    }
    fn pause(&self) -> Result<Duration, VmmError> {
        (**self).pause()
    }
    fn resume(&self) -> Result<(), VmmError> {
        (**self).resume()
    }
    fn start_dirty_tracking(&self) -> Result<(), VmmError> {
        (**self).start_dirty_tracking()
    }
    fn harvest_dirty_into(&self, out: &mut DirtySet) -> Result<HarvestStats, VmmError> {
        (**self).harvest_dirty_into(out)
    }
    fn cut_epoch(
        &self,
        epoch: u64,
        dirty: &mut DirtySet,
        kind: CutKind<'_>,
    ) -> Result<Cut<T::State>, VmmError> {
        (**self).cut_epoch(epoch, dirty, kind)
    }
    fn run_parked<R, F>(&self, f: F) -> Result<Parked<'_, R>, VmmError>
    where
        R: Send + 'static,
        F: FnOnce() -> R + Send + 'static,
    {
        (**self).run_parked(f)
    }
    fn release_output(&self, through: u64) -> Result<(), VmmError> {
        (**self).release_output(through)
    }
    fn output_waiting(&self) -> bool {
        (**self).output_waiting()
    }
    fn end_output_commit(&self) -> Result<(u64, u64), VmmError> {
        (**self).end_output_commit()
    }
    fn discard_output_after(&self, epoch: u64) {
        (**self).discard_output_after(epoch)
    }
    fn take_rx_frames(&self, max: usize) -> Vec<(u16, Vec<u8>)> {
        (**self).take_rx_frames(max)
    }
    fn inject_rx_frames(&self, frames: Vec<(u16, Vec<u8>)>) {
        (**self).inject_rx_frames(frames)
    }
    fn reset_written_blocks(&self, disk: Option<usize>) {
        (**self).reset_written_blocks(disk)
    }
}

impl PrimaryVm for Vmm {
    type State = vmm::VmState;
    fn guest_memory(&self) -> &GuestMemoryMmap {
        Vmm::guest_memory(self)
    }
    fn pause(&self) -> Result<Duration, VmmError> {
        Vmm::pause(self)
    }
    fn resume(&self) -> Result<(), VmmError> {
        Vmm::resume(self)
    }
    fn start_dirty_tracking(&self) -> Result<(), VmmError> {
        Vmm::start_dirty_tracking(self)
    }
    fn harvest_dirty_into(&self, out: &mut DirtySet) -> Result<HarvestStats, VmmError> {
        Vmm::harvest_dirty_into(self, out)
    }
    fn cut_epoch(
        &self,
        epoch: u64,
        dirty: &mut DirtySet,
        kind: CutKind<'_>,
    ) -> Result<Cut<vmm::VmState>, VmmError> {
        let c = Vmm::cut_epoch(self, epoch, dirty, kind)?;
        Ok(Cut {
            harvest: c.harvest,
            state: c.state,
            journals: c.journals,
            console: c.console,
            frames: c.frames,
        })
    }
    fn run_parked<T, F>(&self, f: F) -> Result<Parked<'_, T>, VmmError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        Ok(Parked::Vcpu(self.submit_to_parked_vcpu(f)?))
    }
    fn release_output(&self, through: u64) -> Result<(), VmmError> {
        Vmm::release_output(self, through).map(|_| ())
    }
    fn output_waiting(&self) -> bool {
        Vmm::output_waiting(self)
    }
    fn end_output_commit(&self) -> Result<(u64, u64), VmmError> {
        let r = self.disable_output_commit();
        self.disable_disk_journal();
        let r = r?;
        Ok((r.console_bytes, r.net_frames))
    }
    fn discard_output_after(&self, epoch: u64) {
        Vmm::discard_output_after(self, epoch)
    }
    fn take_rx_frames(&self, max: usize) -> Vec<(u16, Vec<u8>)> {
        Vmm::take_rx_frames(self, max)
            .into_iter()
            .map(|(i, f)| (i as u16, f))
            .collect()
    }
    fn inject_rx_frames(&self, frames: Vec<(u16, Vec<u8>)>) {
        for (net, frames) in crate::messages::per_net(frames) {
            if !Vmm::inject_rx_frames(self, usize::from(net), frames) {
                log::error!("primary: net {net}: no such NIC for frames given back");
            }
        }
    }
    fn reset_written_blocks(&self, disk: Option<usize>) {
        match disk {
            Some(d) => {
                self.take_written_blocks(d);
            }
            None => Vmm::reset_written_blocks(self),
        }
    }
}
