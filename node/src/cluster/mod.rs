//! Cluster decisions: where each VM runs and what to do when a node is lost or comes
//! back, as a pure step function over events (`step.rs`), in the manner of Proxmox's
//! ha-manager. The daemon feeds it what happened (commands, the peer's comings and
//! goings, VMM processes starting and ending, quorum answers) with the time, and carries
//! out the actions it returns; `sim.rs` drives two of them through scripted scenarios
//! whose logs are compared with golden files (`node/tests/golden/*.expect`).

#[cfg(test)]
mod sim;
pub mod step;

pub use step::NodeCommand;
pub use step::MIGRATE_TIMEOUT_MS;
pub use step::{
    Action, Cluster, CmdError, CmdOk, Command, Done, ExitKind, Input, PeerState, PeerVmm, Policy,
    QuorumKind,
};
