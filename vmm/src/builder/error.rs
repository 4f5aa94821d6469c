//! Why a VM could not be built.

use super::platform::PlatformError;
use crate::boot::linux::LinuxBootError;
use crate::boot::BootError;
use crate::config::ConfigError;
use crate::devices::manager::DeviceError;
use crate::vstate::memory::MemoryError;
use crate::vstate::vcpu::VcpuError;
use crate::vstate::vm::VmError;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("loading the guest: {0}")]
    Boot(#[from] BootError),
    #[error("devices: {0}")]
    Devices(#[from] DeviceError),
    #[error("KVM_GET_TSC_KHZ: {0}")]
    TscKhz(kvm_ioctls::Error),
    #[error("loading the Linux kernel: {0}")]
    LinuxBoot(#[from] LinuxBootError),
    #[error("platform devices: {0}")]
    Platform(#[from] PlatformError),
    #[error("dirty log: {0}")]
    DirtyLog(#[from] crate::vstate::dirty::DirtyError),
}
