//! KVM state: guest memory, the VM and its vCPUs.
pub mod control;
pub mod cpuid;
pub mod dirty;
pub mod hot_pages;
pub mod memory;
pub mod uffd;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;
