//! Building a VM for a stock Linux guest: kernel, initrd and command line, ACPI tables
//! and e820 map, the 64-bit boot vCPU, and the platform devices (COM1, i8042, irqfds).

use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use twinrun_guest_abi as abi;
use vmm_sys_util::eventfd::EventFd;

use super::BuildError;
use crate::boot::linux::acpi::{COM1_IRQ, COM1_PORT, I8042_DATA_PORT, I8042_IRQ};
use crate::boot::linux::{self, LinuxImage, VirtioWindow};
use crate::config::VmConfig;
use crate::devices::bus::Bus;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{SerialDevice, SerialError, SerialSnapshot, SERIAL_PORT_LEN};
use crate::devices::legacy::IrqLine;
use crate::devices::manager::DeviceManager;
use crate::devices::virtio::console::sink::{ConsoleSink, SinkError};
use crate::exit::VmExit;
use crate::vmm_handle::{Vmm, VmmError};
use crate::vstate::memory::create_guest_memory;
use crate::vstate::vcpu::{create_vcpu, VcpuError};
use crate::vstate::vm::Vm;

/// GSI of virtio-mmio window `i` is `VIRTIO_GSI_BASE + i` (the DSDT says the same):
/// above COM1 (4), below the IOAPIC's 24 pins for all [`abi::MAX_DEVICES`] windows.
pub const VIRTIO_GSI_BASE: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("KVM_IRQFD for GSI {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("console: {0}")]
    Sink(#[from] SinkError),
    #[error("serial: {0}")]
    Serial(#[from] SerialError),
    #[error("placing a device: {0}")]
    Bus(Box<VmmError>),
}

/// The virtio-mmio windows with their GSIs, in window order.
pub fn virtio_windows(devices: &DeviceManager) -> Vec<VirtioWindow> {
    devices
        .descriptors()
        .iter()
        .enumerate()
        .map(|(i, d)| VirtioWindow {
            base: d.mmio_base,
            len: abi::MMIO_WINDOW_SIZE,
            gsi: VIRTIO_GSI_BASE + i as u32,
        })
        .collect()
}

/// Builds a VM that boots the Linux kernel `image` (the config's payload).
pub fn build(cfg: &VmConfig, image: &LinuxImage<'_>) -> Result<Vmm, BuildError> {
    let mem = create_guest_memory(cfg.mem_mib << 20)?;
    // Irqchip and PIT first (Vm::new), then the vCPUs.
    let vm = Vm::new(&mem, cfg.vcpus)?;
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
    attach_platform(&mut vmm, cfg, None)?;
    Ok(vmm)
}

fn irq_line(vmm: &Vmm, gsi: u32) -> Result<EventFd, PlatformError> {
    let evt =
        EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(PlatformError::EventFd)?;
    vmm.vm()
        .fd()
        .register_irqfd(&evt, gsi)
        .map_err(|source| PlatformError::Irqfd { gsi, source })?;
    Ok(evt)
}

/// Adds COM1 (output to the config's console sink, IRQ 4 through an irqfd; restored
/// from `serial` when given), the i8042 (IRQ 1; its reset command ends the VM with
/// [`VmExit::GuestReset`]) and one irqfd per virtio-mmio window. Before `start` only.
pub fn attach_platform(
    vmm: &mut Vmm,
    cfg: &VmConfig,
    serial: Option<&SerialSnapshot>,
) -> Result<(), PlatformError> {
    let bus = |e: VmmError| PlatformError::Bus(Box::new(e));

    let irq = IrqLine(irq_line(vmm, COM1_IRQ)?);
    let sink = ConsoleSink::new(&cfg.console)?;
    let uart = match serial {
        Some(s) => SerialDevice::from_snapshot(s, irq, sink)?,
        None => SerialDevice::new(irq, sink),
    };
    let uart = Arc::new(Mutex::new(uart));
    vmm.insert_pio_device(uart.clone(), COM1_PORT, SERIAL_PORT_LEN)
        .map_err(bus)?;
    vmm.set_serial(uart).map_err(bus)?;

    let kbd_irq = IrqLine(irq_line(vmm, I8042_IRQ)?);
    let stopper = vmm.stopper();
    let i8042 = I8042::new(
        Some(kbd_irq),
        Box::new(move || stopper.end_with(VmExit::GuestReset)),
    );
    // Ports 0x60..=0x64 (0x61 is the PIT speaker port, which KVM handles itself).
    vmm.insert_pio_device(Arc::new(Mutex::new(i8042)), I8042_DATA_PORT, 5)
        .map_err(bus)?;

    for (i, w) in virtio_windows(vmm.devices()).iter().enumerate() {
        let evt = irq_line(vmm, w.gsi)?;
        if let Some(t) = vmm.devices().transport(i) {
            t.lock()
                .unwrap_or_else(|p| p.into_inner())
                .set_irq_eventfd(Some(evt));
        }
    }
    Ok(())
}
