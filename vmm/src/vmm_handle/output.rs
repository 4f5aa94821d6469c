//! Output commit and the disk journal on [`Vmm`]: thin, checked wrappers over the
//! device manager's [`OutputGate`](crate::devices::output::OutputGate) and the block
//! devices' journals. Semantics (epoch numbering, ordering, bounds) are documented in
//! [`crate::devices::output`] and [`crate::devices::virtio::block::journal`].

use super::{Vmm, VmmError};
use crate::devices::output::{EpochConsole, OutputEpochStats, OutputError, ReleaseStats};
use crate::devices::virtio::block::DiskJournal;

impl Vmm {
    /// True when no vCPU and no device thread can emit output or touch guest memory:
    /// before start, after the end, or paused.
    pub(super) fn quiet(&self) -> bool {
        !self.started || self.threads.is_empty() || self.control.is_paused()
    }

    /// From now on guest output (virtio-console, UART, virtio-net TX) is held in the
    /// open epoch instead of reaching the sinks and TAPs. The output emitted until the
    /// first [`close_epoch`](Self::close_epoch) belongs to the epoch that close names
    /// (any number, 0 included). Enabling twice changes nothing.
    pub fn enable_output_commit(&self) -> Result<(), VmmError> {
        self.devices.output_gate().enable();
        Ok(())
    }

    /// Limit of held bytes (default
    /// [`DEFAULT_HELD_LIMIT`](crate::devices::output::DEFAULT_HELD_LIMIT)): at the limit,
    /// virtio devices stop taking transmit chains, so the guest waits.
    pub fn set_output_limit(&self, bytes: u64) {
        self.devices.output_gate().set_limit(bytes);
    }

    /// Ends the open epoch as `epoch`: all output emitted since the previous close
    /// (or since enable) belongs to it; later output goes to the next close. Only while
    /// paused; `epoch` must exceed the previous close.
    pub fn close_epoch(&self, epoch: u64) -> Result<OutputEpochStats, VmmError> {
        if !self.quiet() {
            return Err(OutputError::NotPaused.into());
        }
        Ok(self.devices.output_gate().close_epoch(epoch)?)
    }

    /// Writes every held item of closed epochs `<= through_epoch`, per stream in
    /// emission order, to the real sinks and TAPs (console: `writev` batches; TAP: one
    /// write per frame). Any thread, guest running or not; concurrent calls are
    /// serialised. Output of epochs not yet closed stays held.
    pub fn release_output(&self, through_epoch: u64) -> Result<ReleaseStats, VmmError> {
        let gate = self.devices.output_gate();
        if !gate.is_enabled() {
            return Err(OutputError::NotEnabled.into());
        }
        Ok(gate.release(through_epoch))
    }

    /// Drops held output of closed epochs `> epoch` and all output of the open epoch
    /// (it was not committed). The next close must name an epoch `> epoch`.
    pub fn discard_output_after(&self, epoch: u64) {
        self.devices.output_gate().discard_after(epoch);
    }

    /// Releases everything still held (closed and open epochs, in order) and lets
    /// output through directly again. Only while paused; discard first what must not
    /// appear.
    pub fn disable_output_commit(&self) -> Result<ReleaseStats, VmmError> {
        if !self.quiet() {
            return Err(OutputError::NotPaused.into());
        }
        Ok(self.devices.output_gate().disable())
    }

    /// The console output of `epoch` with its stream position: a copy of what the
    /// gate holds for it. Only for the epoch closed last, before it is released (call
    /// it right after [`close_epoch`](Self::close_epoch), still paused). None without
    /// a console or for another epoch.
    pub fn epoch_console(&self, epoch: u64) -> Option<EpochConsole> {
        self.devices.output_gate().epoch_console(epoch)
    }

    /// The network frames of `epoch` as `(net device index, frame with its Ethernet
    /// header)`, per device in emission order: copies of what the gate holds for it.
    /// Same rule as [`epoch_console`](Self::epoch_console): only for the epoch closed
    /// last, before it is released; empty otherwise.
    pub fn epoch_frames(&self, epoch: u64) -> Vec<(usize, Vec<u8>)> {
        self.devices.output_gate().epoch_frames(epoch)
    }

    /// Position in the console stream of the next byte the guest emits.
    pub fn console_position(&self) -> Option<u64> {
        self.devices.output_gate().console_position()
    }

    /// Makes a file console sink write at stream positions (`pwrite`) instead of
    /// appending, the next byte at `next` (default: the file's length). Released
    /// output goes to the positions it was emitted at, so writing it twice (a standby
    /// after failover, see [`write_console_at`](Self::write_console_at)) is harmless.
    /// Only before start or while paused. Returns the position, None if the console is
    /// not a file.
    pub fn set_console_positioned(&self, next: Option<u64>) -> Result<Option<u64>, VmmError> {
        if !self.quiet() {
            return Err(OutputError::NotPaused.into());
        }
        self.devices
            .output_gate()
            .make_console_positioned(next)
            .map_err(|e| OutputError::Sink(e.to_string()).into())
    }

    /// Writes `data` at console stream position `pos`, bypassing the gate (output a
    /// standby releases again after failover). False without a console.
    pub fn write_console_at(&self, pos: u64, data: &[u8]) -> bool {
        self.devices.output_gate().write_console_at(pos, data)
    }

    /// Writes a raw Ethernet frame (with its Ethernet header) on net device `index`'s
    /// TAP, bypassing output commit: the VMM's own frames, like the RARP announce of
    /// the guest's MAC after a failover. False if there is no such device or the TAP
    /// refused the frame.
    pub fn send_raw_frame(&self, index: usize, frame: &[u8]) -> bool {
        self.devices.output_gate().send_frame(index, frame)
    }

    /// The frames waiting on the TAPs that the guest has not received, `(net index,
    /// frame)`, at most `max`, taken off the TAPs. Only while paused: a planned role
    /// swap hands them to the new primary, whose guest receives them
    /// ([`Vmm::inject_rx_frames`]) instead of losing them with this VM.
    pub fn take_rx_frames(&self, max: usize) -> Vec<(usize, Vec<u8>)> {
        self.devices.take_rx_frames(max)
    }

    /// Delivers `frames` to NIC `net`'s guest before anything its TAP receives later
    /// (before the VM starts: the frames a swapped-out primary's TAP had received).
    /// False if there is no such NIC.
    pub fn inject_rx_frames(&self, net: usize, frames: Vec<Vec<u8>>) -> bool {
        self.devices.inject_rx_frames(net, frames)
    }

    /// Held bytes over all streams and epochs (for backpressure).
    pub fn held_output_bytes(&self) -> u64 {
        self.devices.output_gate().held_bytes()
    }

    /// Calls `f` whenever the open epoch starts holding output (see
    /// [`crate::devices::output::OutputGate::set_waiting_notifier`]); `None` removes it.
    pub fn set_output_notifier(&self, f: Option<crate::devices::output::WaitingNotifier>) {
        self.devices.output_gate().set_waiting_notifier(f);
    }

    /// True when the open epoch holds output (an epoch may then end early).
    pub fn output_waiting(&self) -> bool {
        self.devices.output_gate().output_waiting()
    }

    /// Turns on the write journal of every disk, empty. Returns the number of disks.
    pub fn enable_disk_journal(&self) -> Result<usize, VmmError> {
        if !self.quiet() {
            return Err(OutputError::NotPaused.into());
        }
        Ok(self.devices.set_disk_journal(true))
    }

    /// Turns the disk journals off (and drops what they held).
    pub fn disable_disk_journal(&self) {
        self.devices.set_disk_journal(false);
    }

    /// Every disk's writes since the previous take (or enable), in completion order,
    /// one [`DiskJournal`] per disk in config order; the journals start empty again.
    /// Only while paused, so no write is half-recorded.
    pub fn take_disk_journal(&self) -> Result<Vec<DiskJournal>, VmmError> {
        if !self.quiet() {
            return Err(OutputError::NotPaused.into());
        }
        if !self.devices.disk_journal_enabled() {
            return Err(OutputError::JournalNotEnabled.into());
        }
        Ok(self.devices.take_disk_journals())
    }
}
