//! The checkpoint protocol as pure state machines: events in, actions out, time passed
//! in, no I/O. The drivers perform the actions; the simulation (`tests/sim.rs`) drives
//! both machines through message loss, reordering, duplication and crashes.

pub mod primary;
pub mod standby;

pub use primary::{
    Primary, PrimaryAction, PrimaryConfig, PrimaryError, PrimaryEvent, PrimaryPhase, SwapStage,
};
pub use standby::{
    Standby, StandbyAction, StandbyConfig, StandbyError, StandbyEvent, StandbyPhase,
};
