//! The platform devices of a Linux guest (COM1, i8042, one irqfd per virtio-mmio
//! window), for a VM being built and for one being restored.

use std::sync::{Arc, Mutex};
use twinrun_lock::MutexExt;

use twinrun_guest_abi as abi;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::linux::acpi::{COM1_IRQ, COM1_PORT, I8042_DATA_PORT, I8042_IRQ};
use crate::boot::linux::VirtioWindow;
use crate::config::VmConfig;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{SerialDevice, SerialError, SerialSnapshot, SERIAL_PORT_LEN};
use crate::devices::legacy::IrqLine;
use crate::devices::manager::DeviceManager;
use crate::devices::virtio::console::sink::{ConsoleSink, SinkError};
use crate::exit::VmExit;
use crate::vmm_handle::{Vmm, VmmError};

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
            t.lock_or_recover().set_irq_eventfd(Some(evt));
        }
    }
    Ok(())
}
