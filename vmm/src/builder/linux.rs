//! Building a VM for a stock Linux guest: kernel, initrd and command line, ACPI tables
//! and e820 map, the 64-bit boot vCPU; the platform devices come from
//! [`super::platform`].

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;

use super::error::BuildError;
use super::platform::{attach_platform, virtio_windows};
use crate::boot::linux::{self, LinuxImage};
use crate::config::VmConfig;
use crate::devices::bus::Bus;
use crate::devices::manager::DeviceManager;
use crate::vmm_handle::Vmm;
use crate::vstate::memory::create_guest_memory;
use crate::vstate::vcpu::{create_vcpu, VcpuError};
use crate::vstate::vm::Vm;

/// Builds a VM that boots the Linux kernel `image` (the config's payload).
pub fn build(cfg: &VmConfig, image: &LinuxImage<'_>) -> Result<Vmm, BuildError> {
    build_with_options(cfg, image, &crate::config::BuildOptions::default())
}

/// [`build`] with host-side options (the dirty log).
pub fn build_with_options(
    cfg: &VmConfig,
    image: &LinuxImage<'_>,
    opts: &crate::config::BuildOptions,
) -> Result<Vmm, BuildError> {
    let mem = create_guest_memory(cfg.mem_mib << 20)?;
    // Irqchip and PIT first (Vm::new), then the dirty ring if asked, then the vCPUs.
    let vm = Vm::new(&mem, cfg.vcpus)?;
    let ring = super::dirty_ring_before_vcpus(&vm, opts)?;
    let base_cpuid = vm
        .kvm()
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VcpuError::SupportedCpuid)?;
    let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
    for i in 0..cfg.vcpus {
        vcpus.push(create_vcpu(&vm, &base_cpuid, i, cfg.vcpus)?);
    }
    let devices = DeviceManager::new(&mem, cfg)?;
    let windows = virtio_windows(&devices);
    let entry = linux::load(&mem, image, usize::from(cfg.vcpus), &windows)?;
    linux::setup_boot_vcpu(&vcpus[0], &entry)?;
    log::info!(
        "linux: entry {:#x}, kernel ends {:#x}, initrd {:x?}",
        entry.rip,
        entry.kernel_end,
        entry.initrd
    );
    let mut mmio = Bus::new();
    devices.attach(&mut mmio)?;
    let mut vmm = Vmm::new(mem, vm, vcpus, mmio, Bus::new(), devices);
    super::map_dirty_rings(&mut vmm, ring)?;
    attach_platform(&mut vmm, cfg, None)?;
    Ok(vmm)
}
