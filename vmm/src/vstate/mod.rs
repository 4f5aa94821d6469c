//! KVM state: guest memory, the VM and its vCPUs.
pub mod control;
pub mod cpuid;
pub mod dirty;
pub mod memory;
pub mod vcpu;
pub mod vm;
