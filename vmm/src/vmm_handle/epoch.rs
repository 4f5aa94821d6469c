//! [`Vmm::cut_epoch`]: what a caller that keeps a second copy of the VM takes from the
//! paused VM at an epoch boundary, in one call and in the one order that keeps the
//! pieces consistent with each other.
//!
//! Order, and why: the output epoch is closed first (output emitted from here on
//! belongs to the next epoch, whatever else happens), its console bytes and frames are
//! copied while the gate still holds them, then the dirty pages are harvested (and
//! re-protected), the vCPU and device state is captured, and last the disks' writes are
//! taken. All of it while the vCPUs and the device thread are parked, so nothing of
//! the guest moves between the pieces.

use super::{Vmm, VmmError};
use crate::devices::output::{EpochConsole, OutputError};
use crate::devices::virtio::block::DiskJournal;
use crate::persist::VmState;
use crate::vstate::dirty::{DirtySet, HarvestStats};

/// Which cut this is.
#[derive(Clone, Copy, Debug)]
pub enum CutKind<'a> {
    /// The first cut of a series: output commit and the disk journals are turned on
    /// (output and writes from here on are held and journalled per epoch). Each disk's
    /// journal is instead its written blocks since their last take (see
    /// [`Vmm::take_written_blocks`]) plus the byte ranges `read_back[disk]`, read back
    /// from the image: what a copy of the disk taken at that last take lacks.
    First { read_back: &'a [Vec<(u64, u64)>] },
    /// A later cut: each disk's journal holds the writes completed since the previous
    /// cut.
    Next,
}

/// One epoch, cut from the paused VM (the dirty pages are in the caller's set).
#[derive(Debug)]
pub struct EpochCut {
    /// The harvest's counts (hot pages, timings).
    pub harvest: HarvestStats,
    pub state: VmState,
    /// One per disk, in config order.
    pub journals: Vec<DiskJournal>,
    /// The epoch's console bytes with their stream position (None without console
    /// output in the epoch).
    pub console: Option<EpochConsole>,
    /// The epoch's network frames, `(net device index, frame)`, per device in order.
    pub frames: Vec<(usize, Vec<u8>)>,
}

impl Vmm {
    /// Cuts epoch `epoch` (greater than the previous cut's): closes the output epoch,
    /// copies its console bytes and frames, clears `dirty` and harvests the pages
    /// written since the previous harvest into it, captures the VM state and takes the
    /// disks' writes (see [`CutKind`]). Only while paused (or before start / after the
    /// end); the caller copies the dirty pages before resuming.
    pub fn cut_epoch(
        &self,
        epoch: u64,
        dirty: &mut DirtySet,
        kind: CutKind<'_>,
    ) -> Result<EpochCut, VmmError> {
        if !self.quiet() {
            return Err(OutputError::NotPaused.into());
        }
        if matches!(kind, CutKind::First { .. }) {
            self.enable_output_commit()?;
        }
        self.close_epoch(epoch)?;
        // Copies: the gate holds the originals until they are released.
        let console = self.epoch_console(epoch);
        let frames = self.epoch_frames(epoch);
        dirty.clear();
        let harvest = self.harvest_dirty_into(dirty)?;
        let state = self.capture_state()?;
        let journals = match kind {
            CutKind::First { read_back } => {
                self.enable_disk_journal()?;
                self.devices
                    .read_back_written(read_back)
                    .map_err(VmmError::DiskReadBack)?
            }
            CutKind::Next => self.take_disk_journal()?,
        };
        Ok(EpochCut {
            harvest,
            state,
            journals,
            console,
            frames,
        })
    }

    /// Disk `disk`'s written-block map (index in the VM config's `disks`), taken: the
    /// 4 KiB blocks the guest wrote since the previous take. `None` for no such disk.
    /// Exact only while paused; taken while running it is a starting point (writes in
    /// flight land in the next map).
    pub fn take_written_blocks(
        &self,
        disk: usize,
    ) -> Option<crate::devices::virtio::block::written::WrittenBlocks> {
        self.devices.take_written_blocks(Some(disk)).pop()
    }

    /// Takes (and so resets) every disk's written-block map.
    pub fn reset_written_blocks(&self) {
        self.devices.take_written_blocks(None);
    }
}
