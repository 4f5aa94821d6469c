//! The primary's side: the capture edge, the driver (a step function, and the real
//! loop around it), the receive pump, and the adapter of storage-mirror's disks.

pub mod capture;
pub mod disks;
pub mod driver;
pub mod epoch_copy;
pub mod inbox;
pub mod swap;
pub mod vm;

pub use capture::{
    lent_slices, CaptureError, Captured, Capturer, EpochObserver, LentPart, LentScan, OutPart,
};
pub use disks::MirroredDisks;
pub use driver::{run_primary, DriverError, PrimaryDriver, PrimaryDriverConfig, PrimaryReport};
pub use epoch_copy::{EpochCopy, EpochCopyStats};
pub use inbox::{FromStandby, OwnGenerations};
pub use swap::{SwapDone, SwapPort, SwapReply};
pub use vm::{Cut, EpochState, Parked, PrimaryVm};
