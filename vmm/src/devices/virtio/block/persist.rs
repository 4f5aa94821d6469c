//! State of a virtio-blk device: the image it is attached to. Requests complete
//! before the notify that submitted them returns, so no I/O is ever in flight at a
//! pause and there is nothing else to keep.

use super::Block;
use crate::devices::virtio::persist::DeviceState;

impl Block {
    pub(super) fn persist(&self) -> DeviceState {
        DeviceState::Block {
            disk: self.attachment.clone(),
        }
    }
}
