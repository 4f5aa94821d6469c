//! Builds a fresh VMM from a [`VmState`] and guest memory contents.

use crate::builder::error::BuildError;
use crate::builder::platform::attach_platform;
use crate::config::VmConfig;
use crate::devices::bus::Bus;
use crate::devices::manager::DeviceManager;
use crate::devices::virtio::persist::TransportRestoreError;
use crate::vmm_handle::Vmm;
use crate::vstate::memory::{create_guest_memory, ram_ranges, GuestMemoryMmap};
use crate::vstate::vcpu_state::{xsave_size, VcpuStateError};
use crate::vstate::vm::Vm;
use crate::vstate::vm_state::VmStateError;
use twinrun_lock::MutexExt;

use super::memory::layout;
use super::{RestoreReport, VmState};

/// Why a VM could not be restored: its state does not fit the config, or building
/// the VM around it failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("the state's guest memory layout {saved:x?} differs from the config's {config:x?}")]
    MemoryLayout {
        saved: Vec<(u64, u64)>,
        config: Vec<(u64, u64)>,
    },
    #[error("the state has {saved} vCPUs, the config {config}")]
    VcpuCount { saved: usize, config: u8 },
    #[error("the state's vCPU {position} says it is vCPU {index}")]
    VcpuIndex { position: usize, index: u8 },
    #[error("the state has {saved} devices, the config makes {config}")]
    DeviceCount { saved: usize, config: usize },
    #[error("filling guest memory: {0}")]
    FillMemory(std::io::Error),
    #[error("guest memory given has layout {given:x?}, the config's is {config:x?}")]
    MemoryGiven {
        given: Vec<(u64, u64)>,
        config: Vec<(u64, u64)>,
    },
    #[error(transparent)]
    Vcpu(#[from] VcpuStateError),
    #[error("VM state: {0}")]
    Vm(#[from] VmStateError),
    #[error("device {index}: {source}")]
    Device {
        index: usize,
        source: TransportRestoreError,
    },
    #[error("KVM_CREATE_VCPU {0}: {1}")]
    CreateVcpu(u8, kvm_ioctls::Error),
}

/// Builds a VMM from `state`: new guest memory filled by `fill_memory`, a new KVM VM,
/// vCPUs loaded with the state, the VM-wide KVM state, and the devices `cfg` names
/// (reopened by path and TAP name, which must match the state) put back where the
/// driver left them. The VMM is ready to [`Vmm::start`]; the guest continues where it
/// was paused.
///
/// The caller must make sure no other VMM still holds the disk images (they are
/// locked) or the TAPs (opened exclusively).
pub fn build_vm_from_state<F>(
    cfg: &VmConfig,
    state: &VmState,
    fill_memory: F,
) -> Result<(Vmm, RestoreReport), RestoreError>
where
    F: FnOnce(&GuestMemoryMmap) -> std::io::Result<()>,
{
    cfg.validate().map_err(BuildError::from)?;
    let mem = create_guest_memory(cfg.mem_mib << 20).map_err(BuildError::from)?;
    // Checked before the fill: a wrong layout must not cost a copy of all of RAM.
    check_layout(state, &mem)?;
    fill_memory(&mem).map_err(RestoreError::FillMemory)?;
    build_vm_from_state_with_memory(cfg, state, mem)
}

/// The memory layout `cfg` gives must be the one `state` was saved with.
fn check_layout(state: &VmState, mem: &GuestMemoryMmap) -> Result<(), RestoreError> {
    let config_layout = layout(mem);
    if config_layout != state.memory {
        return Err(RestoreError::MemoryLayout {
            saved: state.memory.clone(),
            config: config_layout,
        });
    }
    Ok(())
}

/// [`build_vm_from_state`] on guest memory that already holds the guest's RAM (a
/// standby's mirror at failover: the VM runs in the very memory the checkpoints were
/// applied to, so nothing is copied however large the guest). Its layout must be the
/// one `cfg` gives and `state` was saved with.
pub fn build_vm_from_state_with_memory(
    cfg: &VmConfig,
    state: &VmState,
    mem: GuestMemoryMmap,
) -> Result<(Vmm, RestoreReport), RestoreError> {
    cfg.validate().map_err(BuildError::from)?;
    // The memory given must be what `cfg` would have allocated.
    let expected: Vec<(u64, u64)> = ram_ranges(cfg.mem_mib << 20)
        .map_err(BuildError::from)?
        .iter()
        .map(|&(start, len)| (start.0, len as u64))
        .collect();
    let given = layout(&mem);
    if given != expected {
        return Err(RestoreError::MemoryGiven {
            given,
            config: expected,
        });
    }
    check_layout(state, &mem)?;
    if state.vcpus.len() != usize::from(cfg.vcpus) {
        return Err(RestoreError::VcpuCount {
            saved: state.vcpus.len(),
            config: cfg.vcpus,
        });
    }

    let mut report = RestoreReport::default();
    let vm = Vm::new(&mem, cfg.vcpus).map_err(BuildError::from)?;
    let xsave_bytes = xsave_size(vm.kvm());
    let has_xcrs = vm.kvm().check_extension(kvm_ioctls::Cap::Xcrs);
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for (position, vs) in state.vcpus.iter().enumerate() {
        if usize::from(vs.index) != position {
            return Err(RestoreError::VcpuIndex {
                position,
                index: vs.index,
            });
        }
        let fd = vm
            .fd()
            .create_vcpu(u64::from(vs.index))
            .map_err(|e| RestoreError::CreateVcpu(vs.index, e))?;
        let r = vs
            .restore(&fd, xsave_bytes, has_xcrs)
            .map_err(RestoreError::from)?;
        report.refused_msrs.extend(r.refused_msrs);
        if let Some((saved, host)) = r.tsc_khz_mismatch {
            report.tsc_khz_mismatch.push((vs.index, saved, host));
        }
        report
            .unreadable_msrs
            .extend(vs.unreadable_msrs.iter().map(|&m| (vs.index, m)));
        vcpus.push(fd);
    }
    state.vm.restore(vm.fd()).map_err(RestoreError::from)?;

    let devices = DeviceManager::new(&mem, cfg).map_err(BuildError::from)?;
    let count = devices.descriptors().len();
    if count != state.devices.len() {
        return Err(RestoreError::DeviceCount {
            saved: state.devices.len(),
            config: count,
        });
    }
    for (index, ts) in state.devices.iter().enumerate() {
        let Some(t) = devices.transport(index) else {
            break;
        };
        t.lock_or_recover()
            .restore_state(ts)
            .map_err(|source| RestoreError::Device { index, source })?;
    }
    let mut mmio = Bus::new();
    devices.attach(&mut mmio).map_err(BuildError::from)?;
    let pio = Bus::new();
    let mut vmm = Vmm::new(mem, vm, vcpus, mmio, pio, devices);
    if cfg.payload.is_linux() {
        // UART, i8042 and the irqfds: GSI routes and irqfds are not part of the irqchip
        // state, so they are made again; the UART gets its captured registers.
        attach_platform(&mut vmm, cfg, state.serial.as_ref()).map_err(BuildError::from)?;
    }
    Ok((vmm, report))
}
