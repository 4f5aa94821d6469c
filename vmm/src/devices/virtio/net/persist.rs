//! State of a virtio-net device: the TAP it is attached to, by name, and its MAC.
//! Whether RX is stalled is not kept: a restored device starts watching the TAP and
//! stalls again by itself if the receive queue has no buffers.

use super::Net;
use crate::devices::virtio::persist::DeviceState;

impl Net {
    pub(super) fn persist(&self) -> DeviceState {
        DeviceState::Net {
            tap: self.tap.name().to_owned(),
            mac: self.mac,
        }
    }
}
