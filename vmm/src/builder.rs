//! Builds a VM from a `VmConfig`: memory, KVM VM, vCPUs, devices, and the loaded guest.

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;

pub mod error;
pub mod linux;
pub mod platform;

pub use error::BuildError;

use crate::boot::linux::LinuxImage;
use crate::boot::{self, BootError, BootFacts, Image};
use crate::config::{BuildOptions, ConfigError, DirtyLog, Payload, VmConfig};
use crate::devices::bus::Bus;
use crate::devices::manager::DeviceManager;
use crate::vmm_handle::Vmm;
use crate::vstate::memory::{create_guest_memory, ram_bounds};
use crate::vstate::vcpu::{create_vcpu, setup_boot_vcpu, VcpuError};
use crate::vstate::vm::Vm;

/// Validates `cfg`, creates memory, the VM, its vCPUs and devices, and loads the
/// payload named in the config (test guest ELF, or Linux kernel and initrd). The VM is
/// not running yet.
pub fn build_vm(cfg: &VmConfig) -> Result<Vmm, BuildError> {
    build_vm_with_options(cfg, &BuildOptions::default())
}

/// [`build_vm`] with host-side options (e.g. the dirty log: KVM's bitmap or ring).
pub fn build_vm_with_options(cfg: &VmConfig, opts: &BuildOptions) -> Result<Vmm, BuildError> {
    cfg.validate()?;
    match &cfg.payload {
        Payload::TestGuest { elf, .. } => {
            let bytes = boot::elf::read_file(elf).map_err(BootError::from)?;
            build_vm_with_image_and_options(cfg, Image::Elf(&bytes), opts)
        }
        Payload::Linux {
            kernel,
            initrd,
            cmdline,
        } => linux::build_with_options(
            cfg,
            &LinuxImage {
                kernel,
                initrd: initrd.as_deref(),
                cmdline,
            },
            opts,
        ),
    }
}

/// Turns KVM's dirty ring on when `opts` asks for it; between creating the VM and its
/// first vCPU (KVM refuses it later). Returns the ring's entries, for
/// [`map_dirty_rings`] once the vCPUs exist.
pub(crate) fn dirty_ring_before_vcpus(
    vm: &Vm,
    opts: &BuildOptions,
) -> Result<Option<u32>, BuildError> {
    let ring = match opts.dirty_log {
        DirtyLog::Bitmap => false,
        DirtyLog::Ring => true,
        DirtyLog::Auto => crate::vstate::dirty::ring::ring_max_entries(vm) > 0,
    };
    if !ring {
        return Ok(None);
    }
    crate::vstate::dirty::ring::enable_dirty_ring(vm, opts.dirty_ring_entries)?;
    Ok(Some(opts.dirty_ring_entries))
}

/// Maps the vCPUs' dirty rings into `vmm` when [`dirty_ring_before_vcpus`] enabled them:
/// its dirty tracking then uses the ring.
pub(crate) fn map_dirty_rings(vmm: &mut Vmm, entries: Option<u32>) -> Result<(), BuildError> {
    if let Some(entries) = entries {
        vmm.map_dirty_rings(entries)?;
    }
    Ok(())
}

/// [`build_vm`] of the test guest with the image given directly (the config's ELF path
/// is not read).
pub fn build_vm_with_image(cfg: &VmConfig, image: Image<'_>) -> Result<Vmm, BuildError> {
    build_vm_with_image_and_options(cfg, image, &BuildOptions::default())
}

/// [`build_vm_with_image`] with host-side options.
pub fn build_vm_with_image_and_options(
    cfg: &VmConfig,
    image: Image<'_>,
    opts: &BuildOptions,
) -> Result<Vmm, BuildError> {
    cfg.validate()?;
    if cfg.payload.is_linux() {
        return Err(BuildError::Config(ConfigError::Workload {
            field: "payload",
            value: "linux".into(),
            why: "a test-guest image was given for a Linux payload",
        }));
    }
    let mem = create_guest_memory(cfg.mem_mib << 20)?;
    let vm = Vm::new(&mem, cfg.vcpus)?;
    let ring = dirty_ring_before_vcpus(&vm, opts)?;
    let base_cpuid = vm
        .kvm()
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VcpuError::SupportedCpuid)?;
    let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
    for i in 0..cfg.vcpus {
        vcpus.push(create_vcpu(&vm, &base_cpuid, i, cfg.vcpus)?);
    }
    let loaded = boot::load(&mem, image)?;
    setup_boot_vcpu(&vcpus[0], loaded.entry)?;
    let tsc_khz = vcpus[0].get_tsc_khz().map_err(BuildError::TscKhz)?;

    // Console in window 0, then disks, then NICs.
    let devices = DeviceManager::new(&mem, cfg)?;
    let mut mmio = Bus::new();
    devices.attach(&mut mmio)?;
    let pio = Bus::new();

    let (ram_low_end, ram_high_end) = ram_bounds(&mem);
    let facts = BootFacts {
        tsc_khz: u64::from(tsc_khz),
        ram_low_end,
        ram_high_end,
        free_base: boot::free_base(&loaded),
        devices: devices.descriptors(),
    };
    let params = boot::params::build(cfg, &facts).map_err(BootError::from)?;
    boot::write_params(&mem, &params)?;
    let mut vmm = Vmm::new(mem, vm, vcpus, mmio, pio, devices);
    map_dirty_rings(&mut vmm, ring)?;
    Ok(vmm)
}
