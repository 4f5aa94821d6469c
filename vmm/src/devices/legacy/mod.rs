//! Legacy PC devices a stock Linux guest expects on the port I/O bus: the 8250 UART at
//! COM1 (its console) and the i8042 (whose reset line ends the VM).

pub mod i8042;
pub mod serial;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: an eventfd registered with KVM as an irqfd, so a write raises the
/// GSI in the in-kernel IOAPIC/PIC without a trip through the VMM.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}
