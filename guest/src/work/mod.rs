//! The workloads. Each is a state machine polled in turn by the main loop with the
//! current TSC; none blocks.

pub mod blkbench;
pub mod counter;
pub mod dirty;
pub mod disk;
pub mod kv;
