//! The primary's I/O side.

pub mod capture;

pub use capture::{CaptureError, Captured, Capturer, OutPart};
