//! The standby's I/O side: the mirror of the protected VM.

pub mod mirror;

pub use mirror::{ApplyStats, Mirror, MirrorError};
