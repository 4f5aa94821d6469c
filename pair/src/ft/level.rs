//! Changing the protection level of a running VM without a reboot (issue 15 item 4;
//! `Op::SetLevel` on the control socket, sent by the node daemon on `vm set
//! --protection`).
//!
//! An unprotected VM's VMM is already an FT primary with no standby, and an HA
//! primary's disk hooks switch to FT's, so every change is a change of the settings
//! (and, to or from HA, of the runtime and the disk hooks) the primary's session loop
//! runs with, made between two sessions with no standby connected, never inside one
//! (`super::drive` hands the VM between FT's and HA's runtimes):
//!
//! - **unprotected -> FT**: while no peer is connected (no migration runs), the loop
//!   hands the VM back, the quorum client starts with the daemon's settings (the same
//!   `Runner` a primary started with `--protection ft` gets: it takes or renews the
//!   lease of the generation this node recorded) and the loop runs again as an FT
//!   primary: the next peer is a real standby, resynced and protected session after
//!   session, and the VMM's status says `ft`.
//! - **unprotected -> HA**, **FT -> HA**: the same (from FT the quorum client runs on),
//!   then HA's synchronous disk hooks are installed with the guest paused for the swap
//!   and HA's runtime protects the VM (`crate::ha::primary::protect`): status `ha`.
//! - **HA -> FT**, **HA -> unprotected**: taken by HA's session loop while it waits for
//!   a standby; the hooks switch to FT's mode once no write batch is open, then as
//!   from FT.
//! - **FT -> unprotected**: only once the standby is gone (the daemon stops it first)
//!   and, with a quorum, once the gate is `Free` (the witness recorded the standby as
//!   outdated, so no standby may take over, and the lease is valid): everything held is
//!   released, the loop hands the VM back and the quorum thread is stopped: the lease
//!   lapses at the witness (the swap's `Release` is for a pair in sync: the machine
//!   refuses it without an acknowledging standby; lapsing is as safe here, since no
//!   standby can be granted the VM); dirty logging goes off and the VM runs alone.
//!   Changes to HA wait for the same gate.
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
            Err(if protection == "unprotected" {
                format!(
                    "not made within {LEVEL_WAIT:?}: an unprotected VM becomes {} only \
                     between sessions (no live migration may run); the VM stays unprotected",
                    change.name()
                )
            } else {
                format!(
                    "not made within {LEVEL_WAIT:?}: an {protection} primary changes to {} \
                     only once its standby is gone (stop it first) and, with a quorum, the \
                     witness recorded it as outdated (is the witness reachable?); the VM \
                     stays {protection}",
                    change.name()
                )
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

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::config::{Payload, VmConfig, Workloads};

    fn status() -> std::sync::Arc<PairStatus> {
        let cfg = VmConfig {
            mem_mib: 64,
            vcpus: 1,
            payload: Payload::TestGuest {
                elf: "/nonexistent".into(),
                workloads: Workloads::default(),
            },
            disks: vec![],
            nets: vec![],
            console: Default::default(),
        };
        PairStatus::new(crate::settings::Role::Primary, &cfg)
    }

    fn flags(dir: &std::path::Path, text: &str) -> QuorumFlags {
        let path = dir.join("quorum.toml");
        std::fs::write(&path, text).unwrap();
        QuorumFlags {
            config: path.display().to_string(),
            node_id: 2,
            vm: "db".into(),
            priv0: Some(("10.0.0.2:7000".into(), "10.0.0.1:7000".into())),
        }
    }

    #[test]
    fn quorum_flags_resolve_as_the_command_line_would() {
        let dir = tempfile::tempdir().unwrap();
        let f = flags(
            dir.path(),
            "[quorum]\ncluster = \"c1\"\nbackend = \"none\"\nstatic_preference = 1\n",
        );
        let q = quorum_settings(&f).unwrap();
        assert_eq!((q.node.0, q.peer.0, q.vm.as_str()), (2, 1, "db"));
        assert!(q.state_file.ends_with("quorum/c1-db-node2.state"));
        assert_eq!(q.priv0.unwrap().peer.to_string(), "10.0.0.1:7000");
        let bad = flags(dir.path(), "[other]\n");
        assert!(quorum_settings(&bad)
            .unwrap_err()
            .contains("no [quorum] table"));
    }

    #[test]
    fn refused_at_once_where_no_change_can_be_made() {
        let status = status();
        let standby = ask(
            &status,
            FtRole::Standby,
            false,
            "ft",
            LevelChange::Unprotected,
        );
        assert!(standby.unwrap_err().contains("primary"));
        // Already at that level: nothing to do.
        assert_eq!(
            ask(&status, FtRole::Primary, true, "ft", LevelChange::Ft(None)),
            Ok(())
        );
        assert_eq!(
            ask(&status, FtRole::Primary, true, "ha", LevelChange::Ha(None)),
            Ok(())
        );
    }

    #[test]
    fn a_request_not_taken_in_time_is_dropped_never_acted_on_later() {
        let status = status();
        *lock(status.level_slot()) = Some(LevelRequest {
            change: LevelChange::Unprotected,
            reply: mpsc::channel().0,
            deadline: Instant::now(),
        });
        assert!(take(&status, |_| true).is_none());
        assert!(lock(status.level_slot()).is_none());
        let (tx, rx) = mpsc::channel();
        *lock(status.level_slot()) = Some(LevelRequest {
            change: LevelChange::Ft(None),
            reply: tx,
            deadline: Instant::now() + Duration::from_secs(5),
        });
        // Not accepted now (e.g. the gate not free): it stays for a later look.
        assert!(take(&status, |_| false).is_none());
        let r = take(&status, |_| true).expect("taken");
        r.answer(Ok(()));
        assert_eq!(rx.recv().unwrap(), Ok(()));
    }
}
