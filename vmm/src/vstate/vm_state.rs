//! The state KVM keeps for the whole VM: the in-kernel PIC pair and IOAPIC, the PIT
//! and the KVM clock. GSI routes and irqfds are not part of it; whoever sets them up
//! sets them up again on the restored VM.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct VmStateError {
    pub what: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

fn err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError { what, source }
}

#[derive(Clone, Serialize, Deserialize)]
pub struct KvmVmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for KvmVmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The irqchip unions have no Debug; the clock says enough in a log line.
        f.debug_struct("KvmVmState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

fn get_chip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip).map_err(err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

impl KvmVmState {
    /// Reads the VM's interrupt controllers, PIT and clock (the VM must be paused for
    /// the result to be consistent with the vCPUs).
    pub fn capture(fd: &VmFd) -> Result<KvmVmState, VmStateError> {
        let mut clock = fd.get_clock().map_err(err("KVM_GET_CLOCK"))?;
        // Only the value is restored: with KVM_CLOCK_REALTIME (or HOST_TSC) set, KVM
        // would advance the clock by the time that passed until the restore, which the
        // guest must not see.
        clock.flags = 0;
        Ok(KvmVmState {
            pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC)?,
            pit: fd.get_pit2().map_err(err("KVM_GET_PIT2"))?,
            clock,
        })
    }

    /// Loads the state into a VM created with an irqchip and PIT, after its vCPUs.
    pub fn restore(&self, fd: &VmFd) -> Result<(), VmStateError> {
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            fd.set_irqchip(chip).map_err(err("KVM_SET_IRQCHIP"))?;
        }
        fd.set_pit2(&self.pit).map_err(err("KVM_SET_PIT2"))?;
        let mut clock = self.clock;
        clock.flags = 0;
        fd.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))?;
        Ok(())
    }
}
