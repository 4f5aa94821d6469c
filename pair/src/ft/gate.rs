//! The primary's guest output while no standby protects it, as the quorum decides
//! ([`super::quorum::Gate`]): output commit stays on, so everything the guest emits is
//! held; output is released only while the gate is `Free` and before its `until` (the
//! lease's end on this node's clock, checked here right before each release, whatever
//! the quorum thread's timing); `Hold` releases nothing; the guest is paused and
//! resumed as the machine says. A demoted primary's held output is never released.
//!
//! During a protected session the checkpoint driver owns output commit (it releases on
//! the standby's acknowledgements); [`HeldOutput::before_session`] hands it over and
//! [`HeldOutput::after_session`] takes it back.

use std::time::Instant;

use checkpoint::primary::PrimaryReport;
use log::{info, warn};
use vmm::{Vmm, VmmError};

use super::quorum::{Gate, Quorum};

/// Output commit of the primary's VM between protected sessions.
pub struct HeldOutput {
    /// Output commit is on (the VM holds its output).
    commit_on: bool,
    last_closed: Option<u64>,
    released: Option<u64>,
    /// Paused by the quorum.
    paused: bool,
}

impl HeldOutput {
    /// `commit_on`: the VM holds its output already, with no epoch closed (a failover
    /// survivor's hook turned it on before the guest ran).
    pub fn new(commit_on: bool) -> HeldOutput {
        HeldOutput {
            commit_on,
            last_closed: None,
            released: None,
            paused: false,
        }
    }

    /// Runs `f` with the guest paused (unless the quorum paused it already).
    fn paused_for<T>(
        &self,
        vm: &Vmm,
        f: impl FnOnce() -> Result<T, VmmError>,
    ) -> Result<T, VmmError> {
        if !self.paused {
            vm.pause()?;
        }
        let r = f();
        if !self.paused {
            vm.resume()?;
        }
        r
    }

    /// Obeys the quorum once: pause or resume, hold or release (call every ms or so).
    pub fn step(&mut self, vm: &Vmm, q: &Quorum) -> Result<(), VmmError> {
        let pause = q.pause();
        if pause && !self.paused {
            vm.pause()?;
            self.paused = true;
            warn!("quorum: guest PAUSED (neither the standby nor a witness lease)");
        } else if !pause && self.paused {
            self.paused = false;
            vm.resume()?;
            info!("quorum: guest resumed");
        }
        match q.gate() {
            Gate::Free { until: None } => {
                // No quorum service (or a manual override): no lease bounds the release.
                if self.commit_on {
                    let st = self.paused_for(vm, || vm.disable_output_commit())?;
                    self.commit_on = false;
                    info!("quorum: output released without limit: {st:?}");
                }
            }
            Gate::Free { until: Some(until) } => {
                self.hold(vm)?;
                if Instant::now() >= until {
                    return Ok(());
                }
                if vm.output_waiting() {
                    let next = self.last_closed.map_or(0, |e| e + 1);
                    self.paused_for(vm, || vm.close_epoch(next).map(|_| ()))?;
                    self.last_closed = Some(next);
                }
                if let Some(last) = self.last_closed.filter(|&l| Some(l) != self.released) {
                    // The lease is checked again here: the thread may have slept.
                    if Instant::now() < until {
                        vm.release_output(last)?;
                        self.released = Some(last);
                    }
                }
            }
            Gate::Hold | Gate::Acked => self.hold(vm)?,
        }
        Ok(())
    }

    /// Output commit on (nothing leaves until released).
    fn hold(&mut self, vm: &Vmm) -> Result<(), VmmError> {
        if !self.commit_on {
            self.paused_for(vm, || vm.enable_output_commit())?;
            self.commit_on = true;
            self.last_closed = None;
            self.released = None;
            info!("quorum: guest output held");
        }
        Ok(())
    }

    /// A standby is connected (a new session, the gate `Acked`): everything held is
    /// released and output commit handed to the checkpoint driver (its epoch 0 turns
    /// it on again). Safe: only a standby accepts a primary's A-Link, and this node is
    /// still the holder (a node that lost is demoted before it gets here).
    pub fn before_session(&mut self, vm: &Vmm) -> Result<(), VmmError> {
        if self.paused {
            self.paused = false;
            vm.resume()?;
        }
        if self.commit_on {
            let st = self.paused_for(vm, || vm.disable_output_commit())?;
            self.commit_on = false;
            info!("quorum: held output released at the standby's return: {st:?}");
        }
        Ok(())
    }

    /// The session ended (the standby was lost; the driver held its unacknowledged
    /// output): take output commit back where the driver left it.
    pub fn after_session(&mut self, vm: &Vmm, report: Option<&PrimaryReport>) {
        vm.disable_disk_journal();
        match report {
            Some(r) if r.epochs_captured > 0 => {
                self.commit_on = true;
                self.last_closed = Some(r.epochs_captured - 1);
                self.released = r.released;
            }
            // The session ended before its epoch 0: output commit was never on.
            _ => {
                self.commit_on = false;
                self.last_closed = None;
                self.released = None;
            }
        }
    }

    /// Demoted: stops the guest without releasing anything held (the VM stops with
    /// its output commit on; nothing is flushed).
    pub fn discard(&mut self, vm: &Vmm) {
        if !self.paused {
            if let Err(e) = vm.pause() {
                warn!("cannot pause the demoted VM: {e}");
            }
            self.paused = true;
        }
        if self.commit_on {
            // Every epoch after the last released, and the open one.
            match self.released {
                Some(r) => vm.discard_output_after(r),
                None => vm.discard_output_after(0),
            }
        }
    }
}
