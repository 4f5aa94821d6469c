//! State of a virtio-console device: the sink it writes to. Output the sink still
//! holds (a socket sink waiting for a reader) is not part of the state.

use super::Console;
use crate::devices::virtio::persist::{ConsoleAttachment, DeviceState};

impl Console {
    pub(super) fn persist(&self) -> DeviceState {
        DeviceState::Console {
            sink: self
                .attachment
                .as_ref()
                .map_or(ConsoleAttachment::Unknown, ConsoleAttachment::from),
        }
    }
}
