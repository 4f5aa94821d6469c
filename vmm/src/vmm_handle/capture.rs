//! [`Vmm::capture_state`]: the whole VM state but guest memory, read while paused.

use std::sync::Arc;
use twinrun_lock::MutexExt;

use super::{Vmm, VmmError, PAUSE_LIMIT};
use crate::persist::memory::layout;
use crate::persist::VmState;
use crate::vstate::vcpu_state::{CaptureSpec, VcpuConstants, VcpuState, VcpuStateError};
use crate::vstate::vm_state::{KvmVmState, VmStateError};

/// Why a capture failed.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("the VM must be paused to capture its state")]
    NotPaused,
    #[error(transparent)]
    Vcpu(#[from] VcpuStateError),
    #[error(transparent)]
    Vm(#[from] VmStateError),
}

/// What captures reuse: the host's [`CaptureSpec`] and each vCPU's
/// [`VcpuConstants`], filled by the first capture.
/// (Shared, so that a capture copies no CPUID table but the one its state keeps.)
pub(crate) type CaptureCache = (Option<CaptureSpec>, Vec<Option<Arc<VcpuConstants>>>);

impl Vmm {
    #[allow(clippy::type_complexity)]
    fn capture_inputs(&self) -> Result<(CaptureSpec, Vec<Option<Arc<VcpuConstants>>>), VmmError> {
        let mut c = self.capture_cache.lock_or_recover();
        let spec = match &c.0 {
            Some(s) => s.clone(),
            None => {
                let s = CaptureSpec::probe(self.vm.kvm()).map_err(CaptureError::from)?;
                c.0 = Some(s.clone());
                s
            }
        };
        let mut constants = c.1.clone();
        constants.resize(self.vcpu_count(), None);
        Ok((spec, constants))
    }

    /// Captures every device, every vCPU and the VM-wide KVM state (not guest memory:
    /// copy that separately while still paused). A started VM must be paused; a VM
    /// that was built but not started, or has ended, can be captured as it is.
    ///
    /// vCPU state is read by each vCPU's own thread, parked, after a `KVM_RUN` that
    /// completed any I/O exit KVM had not finished.
    /// Runs `f` on vCPU 0's thread while the (started) VM is paused and returns a
    /// handle to its result: work done during a pause (copying dirty pages) can use
    /// that thread's CPU beside the caller's. Fails unless the VM is paused.
    pub fn submit_to_parked_vcpu<T, F>(
        &self,
        f: F,
    ) -> Result<crate::vstate::control::ParkedJob<'_, T>, VmmError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        if self.threads.is_empty() || !self.control.is_paused() {
            return Err(CaptureError::NotPaused.into());
        }
        Ok(self.control.submit_parked(0, move |_fd| f())?)
    }

    pub fn capture_state(&self) -> Result<VmState, VmmError> {
        let running = !self.threads.is_empty();
        if running && !self.control.is_paused() {
            return Err(CaptureError::NotPaused.into());
        }
        // Devices first: nothing runs them while the VM is paused.
        let mut devices = Vec::new();
        let mut i = 0;
        while let Some(t) = self.devices.transport(i) {
            devices.push(t.lock_or_recover().save_state());
            i += 1;
        }

        let serial = self.serial.as_ref().map(|s| s.lock_or_recover().snapshot());

        let (spec, constants) = self.capture_inputs()?;
        let mut vcpus = Vec::with_capacity(self.vcpu_count());
        let vm = if running {
            // Every vCPU's thread reads its own state while this thread reads the
            // VM-wide state: the pause lasts the longest of them, not their sum.
            let mut jobs = Vec::with_capacity(self.threads.len());
            for index in 0..self.threads.len() {
                let spec = spec.clone();
                let known = constants.get(index).cloned().flatten();
                let vcpu = index as u8;
                jobs.push(self.control.submit_parked(index, move |fd| {
                    VcpuState::capture(fd, vcpu, &spec, known.as_deref())
                })?);
            }
            let vm = KvmVmState::capture(self.vm.fd());
            for job in jobs {
                vcpus.push(job.wait(PAUSE_LIMIT)?.map_err(CaptureError::from)?);
            }
            vm
        } else {
            for (index, fd) in self.vcpus.iter().enumerate() {
                let known = constants.get(index).cloned().flatten();
                let s = VcpuState::capture(fd, index as u8, &spec, known.as_deref())
                    .map_err(CaptureError::from)?;
                vcpus.push(s);
            }
            KvmVmState::capture(self.vm.fd())
        };
        let vm = vm.map_err(CaptureError::from)?;
        if constants.iter().any(Option::is_none) {
            let mut c = self.capture_cache.lock_or_recover();
            c.1 = vcpus
                .iter()
                .map(|v| Some(Arc::new(v.constants())))
                .collect();
        }
        Ok(VmState {
            memory: layout(&self.mem),
            vcpus,
            vm,
            devices,
            serial,
        })
    }
}
