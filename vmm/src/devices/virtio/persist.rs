//! Serializable state of a virtio-mmio device: the transport registers, every queue,
//! and what the device is attached to on the host (by name or path).
//!
//! A device's host attachment is not restored from this state: the restoring VMM opens
//! the devices its own config names, and the state only has to agree with them (see
//! [`DeviceState`]). That keeps file descriptors and paths under the config's control.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{ConsoleConfig, DiskConfig};

/// What a device is attached to on the host, plus any device-specific state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// virtio-console writing to this sink.
    Console { sink: ConsoleAttachment },
    /// virtio-blk on this image, as the device opened it (serial filled in).
    Block { disk: DiskConfig },
    /// virtio-net on the TAP of this name, with this MAC.
    Net { tap: String, mac: [u8; 6] },
    /// A device with no host attachment or state of its own (test devices).
    Other { device_type: u32 },
}

/// Where a console's output goes. (Not [`ConsoleConfig`] itself: its internally
/// tagged serde form needs a self-describing format, which postcard is not.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConsoleAttachment {
    Stdout,
    File(PathBuf),
    Socket(PathBuf),
    /// Built from a bare sink whose config is not known.
    Unknown,
}

impl From<&ConsoleConfig> for ConsoleAttachment {
    fn from(c: &ConsoleConfig) -> Self {
        match c {
            ConsoleConfig::Stdout => ConsoleAttachment::Stdout,
            ConsoleConfig::File { path } => ConsoleAttachment::File(path.clone()),
            ConsoleConfig::Socket { path } => ConsoleAttachment::Socket(path.clone()),
        }
    }
}

/// One virtqueue: what the driver wrote to its registers and where the device is in
/// its rings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// QueueNum as written by the driver.
    pub size: u16,
    /// QueueDesc, QueueDriver, QueueDevice as written by the driver.
    pub desc: u64,
    pub driver: u64,
    pub device: u64,
    pub ready: bool,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    pub event_idx: bool,
}

/// A virtio-mmio transport and its device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    /// Features the driver accepted (or is writing).
    pub driver_features: u64,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub status: u32,
    pub needs_reset: bool,
    pub queues: Vec<QueueState>,
    pub device: DeviceState,
}

/// Why a transport state could not be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportRestoreError {
    #[error("state is for device type {saved}, this device is type {found}")]
    DeviceType { saved: u32, found: u32 },
    #[error("state has {saved} queues, this device has {found}")]
    QueueCount { saved: usize, found: usize },
    #[error("device attachment differs: state has {saved:?}, this VMM opened {found:?}")]
    Attachment {
        saved: Box<DeviceState>,
        found: Box<DeviceState>,
    },
    #[error("queue {queue}: {why}")]
    Queue { queue: usize, why: String },
}
