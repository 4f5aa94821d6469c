//! [`Vmm::capture_state`]: the whole VM state but guest memory, read while paused.

use std::sync::Arc;

use super::{Vmm, VmmError, PAUSE_LIMIT};
use crate::persist::memory::layout;
use crate::persist::VmState;
use crate::vstate::vcpu_state::{msrs_to_save, xsave_size, VcpuState, VcpuStateError};
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

impl Vmm {
    /// Captures every device, every vCPU and the VM-wide KVM state (not guest memory:
    /// copy that separately while still paused). A started VM must be paused; a VM
    /// that was built but not started, or has ended, can be captured as it is.
    ///
    /// vCPU state is read by each vCPU's own thread, parked, after a `KVM_RUN` that
    /// completed any I/O exit KVM had not finished.
    pub fn capture_state(&self) -> Result<VmState, VmmError> {
        let running = !self.threads.is_empty();
        if running && !self.control.is_paused() {
            return Err(CaptureError::NotPaused.into());
        }
        // Devices first: nothing runs them while the VM is paused.
        let mut devices = Vec::new();
        let mut i = 0;
        while let Some(t) = self.devices.transport(i) {
            devices.push(t.lock().unwrap_or_else(|p| p.into_inner()).save_state());
            i += 1;
        }

        let serial = self
            .serial
            .as_ref()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).snapshot());

        let kvm = self.vm.kvm();
        let msrs: Arc<[u32]> = msrs_to_save(kvm).map_err(CaptureError::from)?.into();
        let xsave_bytes = xsave_size(kvm);
        let has_xcrs = kvm.check_extension(kvm_ioctls::Cap::Xcrs);
        let mut vcpus = Vec::with_capacity(self.vcpu_count());
        if running {
            for index in 0..self.threads.len() {
                let msrs = msrs.clone();
                let vcpu = index as u8;
                let r = self.control.run_parked(
                    index,
                    move |fd| VcpuState::capture(fd, vcpu, &msrs, xsave_bytes, has_xcrs),
                    PAUSE_LIMIT,
                )?;
                vcpus.push(r.map_err(CaptureError::from)?);
            }
        } else {
            for (index, fd) in self.vcpus.iter().enumerate() {
                let s = VcpuState::capture(fd, index as u8, &msrs, xsave_bytes, has_xcrs)
                    .map_err(CaptureError::from)?;
                vcpus.push(s);
            }
        }
        let vm = KvmVmState::capture(self.vm.fd()).map_err(CaptureError::from)?;
        Ok(VmState {
            memory: layout(&self.mem),
            vcpus,
            vm,
            devices,
            serial,
        })
    }
}
