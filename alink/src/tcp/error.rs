//! Errors of the A-Link handle.

use std::io;

#[derive(Debug, thiserror::Error)]
pub enum AlinkError {
    #[error("invalid A-Link configuration: {0}")]
    Config(String),
    #[error("A-Link I/O: {0}")]
    Io(#[from] io::Error),
    #[error("cannot encode message head: {0}")]
    Encode(#[from] postcard::Error),
    #[error("message of {len} bytes exceeds the frame limit of {max}")]
    TooLarge { len: usize, max: u32 },
    /// A segmented (or lent) message in a session whose protocol predates them.
    #[error("segmented messages need A-Link protocol {need}; this session speaks {version}")]
    SegmentedUnsupported { version: u16, need: u16 },
    #[error("timed out")]
    Timeout,
    #[error("A-Link is shut down")]
    Closed,
    /// The peer's A-Link instance this session served was replaced by a new one (the
    /// peer restarted its end: see [`crate::incarnation`]): the session ended, nothing
    /// more goes out or comes in on this A-Link.
    #[error(
        "the peer's A-Link instance {old:#018x} was replaced by {new:#018x}: the session ended"
    )]
    PeerRestarted { old: u64, new: u64 },
}
