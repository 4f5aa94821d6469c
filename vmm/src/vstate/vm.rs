//! The KVM virtual machine: the VM file descriptor, its memory slots and in-kernel
//! interrupt controllers.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use std::sync::Mutex;
use twinrun_lock::MutexExt;

use kvm_ioctls::{Kvm, VmFd};

use super::memory::{set_memslots, GuestMemoryMmap, MemoryError, SlotFlags};

/// Intel VMX needs three pages for the real-mode TSS and one for the identity map of
/// unrestricted-guest-less CPUs, somewhere guest-physical that is not RAM. They sit at
/// the top of the 32-bit hole, above the virtio-mmio windows (same place as other
/// VMMs use). AMD and this software KVM ignore them.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("KVM_CREATE_VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR: {0}")]
    SetTss(kvm_ioctls::Error),
    #[error("KVM_SET_IDENTITY_MAP_ADDR: {0}")]
    SetIdentityMap(kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP: {0}")]
    CreateIrqchip(kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2: {0}")]
    CreatePit(kvm_ioctls::Error),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("KVM allows at most {max} vCPUs; {asked} requested")]
    TooManyVcpus { asked: u8, max: usize },
}

/// A KVM VM with its memory registered.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    /// Serialises flag changes (the checkpoint thread may toggle logging while vCPUs
    /// run; KVM itself allows that).
    slot_flags: Mutex<SlotFlags>,
}

impl Vm {
    /// Creates the VM, its in-kernel irqchip (PIC, IOAPIC, per-vCPU LAPICs) and PIT, and
    /// registers `mem` as memory slots. Must come before any vCPU is created (KVM
    /// requires the irqchip first).
    ///
    /// The irqchip is what lets secondary vCPUs sit in `KVM_MP_STATE_UNINITIALIZED`,
    /// blocked in the kernel until an INIT/SIPI, and it is what a real OS guest needs.
    /// It does not disturb the test guest, which runs at CPL3 with interrupts off.
    pub fn new(mem: &GuestMemoryMmap, vcpus: u8) -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        if kvm.get_api_version() != 12 {
            return Err(VmError::ApiVersion(kvm.get_api_version()));
        }
        let max = kvm.get_max_vcpus();
        if usize::from(vcpus) > max {
            return Err(VmError::TooManyVcpus { asked: vcpus, max });
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(VmError::SetTss)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(VmError::SetIdentityMap)?;
        fd.create_irq_chip().map_err(VmError::CreateIrqchip)?;
        // The PIT's speaker port is left to a dummy so port 0x61 never exits to us.
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::CreatePit)?;
        let slot_flags = SlotFlags::default();
        set_memslots(&fd, mem, slot_flags)?;
        Ok(Vm {
            kvm,
            fd,
            slot_flags: Mutex::new(slot_flags),
        })
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Current flags of every memory slot.
    pub fn slot_flags(&self) -> SlotFlags {
        *self.slot_flags.lock_or_recover()
    }

    /// Re-registers every slot of `mem` with `flags` (e.g. to turn on
    /// `KVM_MEM_LOG_DIRTY_PAGES`). `mem` must be the memory the VM was created with.
    pub fn set_slot_flags(&self, mem: &GuestMemoryMmap, flags: SlotFlags) -> Result<(), VmError> {
        let mut cur = self.slot_flags.lock_or_recover();
        set_memslots(&self.fd, mem, flags)?;
        *cur = flags;
        Ok(())
    }
}
