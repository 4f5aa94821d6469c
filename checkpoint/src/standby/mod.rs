//! The standby's side: the mirror of the protected VM, the driver (a step function, and
//! the real loop around it), the adapter of storage-mirror's disks, and failover.

pub mod disks;
pub mod driver;
pub mod mirror;
pub mod outcome;
pub mod takeover;

pub use driver::{
    run_standby, run_standby_with, StandbyDriver, StandbyDriverConfig, TakeoverGate,
    TakeoverGateRef,
};
pub use mirror::{ApplyStats, DiskCommit, Mirror, MirrorError, SyncPlacer};
pub use outcome::{fence, FailoverReport, StandbyDriverError, StandbyOutcome, StandbyProgress};
pub use takeover::{
    rarp_announce, rebind_attachments, BeforeStart, Takeover, TakeoverInput, VmmTakeover,
};
