//! The primary's I/O side.

pub mod capture;
pub mod disks;
pub mod driver;
pub mod inbox;
pub mod resync;
pub mod verify_disks;

pub use capture::{CaptureError, Captured, Capturer, OutPart};
pub use driver::{run_primary, DriverError, PrimaryDriverConfig, PrimaryReport};
