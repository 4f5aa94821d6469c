//! The standby's I/O side: the mirror of the protected VM and the driver.

pub mod disks;
pub mod driver;
pub mod mirror;

pub use driver::{
    rarp_announce, rebind_attachments, run_standby, run_standby_with, FailoverReport,
    StandbyDriverConfig, StandbyDriverError, StandbyOutcome,
};
pub use mirror::{ApplyStats, Mirror, MirrorError};
