//! Changing the protection level of a running VM without a reboot (issue 15 item 4;
//! `Op::SetLevel` on the control socket, sent by the node daemon on `vm set
//! --protection`).
//!
//! An unprotected VM's VMM is already an FT primary with no standby, so both changes
//! are a change of the settings the primary's session loop ([`super::primary::protect`])
//! runs with, made between two sessions, never inside one:
//!
//! - **unprotected -> FT**: while no peer is connected (no migration runs), the loop
//!   hands the VM back to [`super::run_pair_with`], which starts the quorum client with
//!   the daemon's settings (the same `Runner` a primary started with `--protection ft`
//!   gets: it takes or renews the lease of the generation this node recorded) and runs
//!   the loop again as an FT primary: the next peer is a real standby, resynced and
//!   protected session after session, and the VMM's status says `ft`.
//! - **FT -> unprotected**: only once the standby is gone (the daemon stops it first)
//!   and, with a quorum, once the gate is `Free` (the witness recorded the standby as
//!   outdated, so no standby may take over, and the lease is valid): everything held is
//!   released, the loop hands the VM back, the lease is given up at the witness
//!   (`Release`, the swap's handover; a backend that refuses it, etcd, lets it lapse)
//!   and the quorum thread stopped; dirty logging goes off and the VM runs alone.
//!
//! The control thread waits for the loop's answer for [`LEVEL_WAIT`] at most; a request
//! the loop did not take by then is dropped (it never acts later, on a stale request).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use log::info;
use twinrun_control::{FtRole, LevelChange, QuorumFlags};
use twinrun_lock::lock;

use super::status::PairStatus;
use crate::settings::{AlinkSpec, NodeId, QuorumConfig, QuorumSettings};

/// How long the control thread waits for the session loop.
pub const LEVEL_WAIT: Duration = Duration::from_secs(9);

/// A level change on its way from the control socket to the session loop.
pub struct LevelRequest {
    pub change: LevelChange,
    reply: mpsc::Sender<Result<(), String>>,
    deadline: Instant,
}

impl LevelRequest {
    /// The loop's answer (ignored if the asker gave up).
    pub fn answer(self, r: Result<(), String>) {
        let _ = self.reply.send(r);
    }
}

/// The control thread's side: checks what it can at once, then waits for the loop.
pub(crate) fn ask(
    status: &PairStatus,
    role: FtRole,
    vm_running: bool,
    protection: &str,
    change: LevelChange,
) -> Result<(), String> {
    if protection == "ha" {
        return Err(
            "an HA VMM mirrors its disks synchronously and cannot switch to FT or unprotected \
             while it runs: shut the VM down, set its level, start it"
                .into(),
        );
    }
    if role != FtRole::Primary || !vm_running {
        return Err(
            "this end of the pair runs no VM (a standby): ask the VM's primary; a standby is \
             stopped or started by its daemon"
                .into(),
        );
    }
    if protection == change.name() {
        return Ok(());
    }
    let (tx, rx) = mpsc::channel();
    {
        let mut slot = lock(status.level_slot());
        if slot.as_ref().is_some_and(|r| Instant::now() < r.deadline) {
            return Err("another level change is in progress".into());
        }
        *slot = Some(LevelRequest {
            change: change.clone(),
            reply: tx,
            deadline: Instant::now() + LEVEL_WAIT,
        });
    }
    match rx.recv_timeout(LEVEL_WAIT + Duration::from_millis(500)) {
        Ok(r) => r,
        Err(_) => {
            lock(status.level_slot()).take();
            Err(match change {
                LevelChange::Ft(_) => format!(
                    "not made within {LEVEL_WAIT:?}: an unprotected VM becomes FT only between \
                     sessions (no live migration may run); the VM stays unprotected"
                ),
                LevelChange::Unprotected => format!(
                    "not made within {LEVEL_WAIT:?}: an FT primary runs alone only once its \
                     standby is gone (stop it first) and, with a quorum, the witness recorded \
                     it as outdated (is the witness reachable?); the VM stays FT"
                ),
            })
        }
    }
}

/// The session loop's side: the pending request, if `accept` takes it now (an expired
/// one is dropped; one not accepted stays for a later look).
pub(crate) fn take(
    status: &PairStatus,
    accept: impl FnOnce(&LevelChange) -> bool,
) -> Option<LevelRequest> {
    let mut slot = lock(status.level_slot());
    if slot.as_ref().is_some_and(|r| Instant::now() >= r.deadline) {
        slot.take();
        return None;
    }
    if slot.as_ref().is_some_and(|r| accept(&r.change)) {
        return slot.take();
    }
    None
}

/// The quorum settings `--quorum-config FILE --quorum-node-id N [--priv0 L,P]` would
/// give this VM (the CLI's rules, `src/cli/ft.rs` `resolve_quorum`: the peer's id of
/// the other parity, the VM's name its key, the state file under `$TWINRUN_STATE_DIR/quorum`).
pub fn quorum_settings(flags: &QuorumFlags) -> Result<QuorumSettings, String> {
    let vm = flags.vm.as_str();
    let text = std::fs::read_to_string(&flags.config)
        .map_err(|e| format!("cannot read the quorum config {}: {e}", flags.config))?;
    let mut doc: toml::Table =
        toml::from_str(&text).map_err(|e| format!("quorum config {}: {e}", flags.config))?;
    let table = doc
        .remove("quorum")
        .ok_or_else(|| format!("quorum config {}: no [quorum] table", flags.config))?;
    let config: QuorumConfig = table
        .try_into()
        .map_err(|e| format!("quorum config {}: [quorum]: {e}", flags.config))?;
    config
        .validate()
        .map_err(|e| format!("{}: {e}", flags.config))?;
    let node = flags.node_id;
    if node == 0 {
        return Err("the quorum node id must be positive".into());
    }
    let peer = if node % 2 == 1 { node + 1 } else { node - 1 };
    ::quorum::types::check_name("VM name", vm)?;
    let priv0 = match &flags.priv0 {
        None => None,
        Some((l, p)) => Some(AlinkSpec {
            local: l.parse().map_err(|e| format!("priv0 address {l}: {e}"))?,
            peer: p.parse().map_err(|e| format!("priv0 address {p}: {e}"))?,
        }),
    };
    let root = std::env::var_os("TWINRUN_STATE_DIR")
        .map_or_else(|| std::path::PathBuf::from("/var/lib/twinrun"), Into::into);
    let state_file = root
        .join("quorum")
        .join(format!("{}-{vm}-node{node}.state", config.cluster));
    Ok(QuorumSettings {
        config,
        node: NodeId(node),
        peer: NodeId(peer),
        vm: vm.to_string(),
        state_file,
        priv0,
    })
}

/// Logged when a level change is made (tools read the status's `protection`).
pub fn log_change(from: &str, to: &str) {
    info!("protection level changed online: {from} -> {to} (the VM ran on)");
}
