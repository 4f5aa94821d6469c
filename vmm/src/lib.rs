//! twinrun's KVM virtual machine monitor.
//!
//! Owns guest memory, vCPUs, the boot of the test guest and the virtio-mmio devices,
//! and (later) VM state save/restore. It knows nothing of replication: the checkpoint
//! crate drives it through pause, resume, dirty harvest and state capture.
pub mod boot;
pub mod builder;
pub mod config;
pub mod devices;
pub mod vstate;
