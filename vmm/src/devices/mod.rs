//! Emulated devices and the buses that route guest accesses to them.
pub mod bus;
pub mod legacy;
pub mod manager;
pub mod output;
pub mod virtio;

pub use manager::DeviceError;
