//! twinrun's KVM virtual machine monitor.
//!
//! Owns guest memory, vCPUs, the boot of the test guest and the virtio-mmio devices,
//! and (later) VM state save/restore. It knows nothing of replication: the checkpoint
//! crate drives it through pause, resume, dirty harvest and state capture.
//!
//! Entry points: [`builder::build_vm`] makes a [`Vmm`] from a
//! [`config::VmConfig`]; [`Vmm::start`], [`Vmm::pause`], [`Vmm::resume`],
//! [`Vmm::wait`] run it; [`VmExit`] says how it ended.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod boot;
pub mod builder;
pub mod config;
pub mod devices;
pub mod exit;
pub mod persist;
pub mod spin;
pub mod vmm_handle;
pub mod vstate;

pub use builder::{build_vm, build_vm_with_options, BuildError};
pub use exit::{RegsReport, VmExit};
pub use persist::restore::{build_vm_from_state, build_vm_from_state_with_memory, RestoreError};
pub use persist::{RestoreReport, VmState};
pub use vmm_handle::{CutKind, EpochCut, Stopper, Vmm, VmmError};
