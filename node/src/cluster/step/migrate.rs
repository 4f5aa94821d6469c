//! Live migration (`twinrun vm migrate VM [--to NODE]`), as rules of the step function.
//!
//! The engine's FT machinery is the mechanism. An unprotected VM's VMM is an FT
//! primary running alone (`argv.rs`: no standby, no quorum, the guest at full speed);
//! a migration starts the receiving VMM on the target as its standby with
//! `--migration-target` (it never takes the VM over when the source is lost: a failed
//! migration leaves the VM where it ran). The FT session is the pre-copy (memory
//! rounds while the guest runs, then the final pause with vCPU and device state, the
//! disks resynced); once in sync the source asks the planned role swap at an epoch
//! boundary (held output released by the target, MAC announced there); the target
//! then writes itself the owner and the old end, now its standby, is stopped. The VM
//! goes on alone on the target, in a VMM that can migrate again.
//!
//! The steps, all in the replicated record (`VmRecord::migrate_to`):
//! - the command (any node) writes `migrate_to = target`;
//! - the target starts the receiving VMM while the source's VMM runs;
//! - the source asks the swap once its VMM reports the target in sync;
//! - the target, swapped in, writes `owner = target`, `migrate_to = None` and makes the
//!   target the preferred node (the VM lives where it was moved; not when the source is
//!   in maintenance: `workon` moved it, `finalize` brings it back);
//! - the old end sees the owner move and stops its standby.
//!
//! Given up (`migrate_to = None`, the VM runs on at the source, a reason logged and
//! shown) when: the peer is not online; the target's VMM ends or cannot start; the
//! target lost sync after it was in sync (A-Links cut); the swap fails; it is not in
//! sync after [`MIGRATE_TIMEOUT_MS`]. The receiving VMM then sees the record and stops.
//! A migration off a node in maintenance that is given up falls back to the clean
//! shutdown `workon` did before migration existed (maintenance.rs).
//!
//! FT VMs move by the planned role swap the failback uses (their standby is in sync
//! already): the command makes the target the preferred node and asks a failback.
//! HA VMs move the same way, by the same swap request to their primary's VMM, which
//! carries the live migration out itself (`twinrun-pair`'s `ha::migrate`: one
//! checkpoint session to its in-sync standby as the pre-copy, the planned swap as the
//! handover, then HA again with the old node as the standby; a migration given up
//! leaves the VM HA-protected where it ran, and the swap's failure is reported as an
//! FT swap's is).

use super::*;

/// A migration whose target is not in sync by then is given up (the pre-copy of a
/// guest that dirties memory faster than the A-Links carry never converges).
pub const MIGRATE_TIMEOUT_MS: u64 = 300_000;

impl Cluster {
    pub(super) fn migrate_command(
        &mut self,
        vm: &str,
        to: Option<NodeName>,
        out: &mut Vec<Action>,
    ) -> Result<CmdOk, CmdError> {
        let mut rec = self.live(vm)?;
        let owner = match (&rec.owner, rec.desired) {
            (Some(o), Desired::Running) => o.clone(),
            _ => return Err(CmdError::Conflict(format!("{vm} is not running"))),
        };
        let other = if owner == self.me {
            self.peer.clone()
        } else {
            self.me.clone()
        };
        let target = to.unwrap_or(other);
        if target != self.me && target != self.peer {
            return Err(CmdError::Invalid(format!(
                "no node named {target:?} in this cluster ({} and {})",
                self.me, self.peer
            )));
        }
        if target == owner {
            return Ok(format!("already runs on {target} (nothing to do)"));
        }
        if self.peer_state != PeerState::Online {
            return Err(CmdError::Conflict(format!(
                "{} is not online: a migration needs both nodes",
                self.peer
            )));
        }
        if self.in_maintenance(&target) {
            return Err(CmdError::Conflict(format!(
                "{target} is in maintenance (`twinrun node finalize {target}` first)"
            )));
        }
        match rec.spec.protection {
            Protection::Ft | Protection::Ha => {
                // The planned role swap at an epoch boundary, as a failback to the new
                // preferred node (else an automatic failback would move it back). An HA
                // VM's primary VMM runs the pre-copy to its standby first.
                let ha = rec.spec.protection == Protection::Ha;
                rec.spec.preferred_node = Some(target.clone());
                rec.failback_seq += 1;
                out.push(self.write(rec));
                Ok(if ha {
                    format!(
                        "migrating to {target}: a live migration to its standby there (pre-copy, \
                         then the handover at a checkpoint) once it is in sync"
                    )
                } else {
                    format!(
                        "migrating to {target}: a planned role swap once its standby there is in sync"
                    )
                })
            }
            Protection::Unprotected => {
                if rec.migrate_to.as_deref() == Some(target.as_str()) {
                    return Ok(format!("already migrating to {target}"));
                }
                rec.migrate_to = Some(target.clone());
                out.push(self.write(rec));
                Ok(format!(
                    "migrating to {target}: pre-copy to a receiving VMM there, then the handover \
                     at a checkpoint"
                ))
            }
        }
    }

    /// This node runs the source of an unprotected VM's migration.
    pub(super) fn migrating_from_here(&self, vm: &str) -> bool {
        self.vms.get(vm).is_some_and(|s| {
            !s.record.spec.protection.paired()
                && s.record.migrate_to.is_some()
                && s.record.owner.as_deref() == Some(self.me.as_str())
        })
    }

    /// This node is the target of an unprotected VM's migration (the VM runs on the peer).
    pub(super) fn receiving_here(&self, vm: &str) -> bool {
        self.vms.get(vm).is_some_and(|s| {
            !s.record.spec.protection.paired()
                && s.record.migrate_to.as_deref() == Some(self.me.as_str())
                && s.record.owner.as_deref() != Some(self.me.as_str())
        })
    }

    /// Gives the migration up: the VM runs on where it runs.
    pub(super) fn migrate_abort(&mut self, vm: &str, why: String, out: &mut Vec<Action>) {
        let s = slot_mut(&mut self.vms, vm);
        s.migrate_since = None;
        s.migrate_synced = false;
        s.swap_sent = false;
        let Some(to) = s.record.migrate_to.clone() else {
            return;
        };
        let at = s.record.owner.clone().unwrap_or_default();
        let mut rec = s.record.clone();
        rec.migrate_to = None;
        if self.maintenance_shutdown_instead(&mut rec, &to, &why, out) {
            // Moving off a node in maintenance (`workon`): today's clean shutdown.
            let s = slot_mut(&mut self.vms, vm);
            s.note = format!(
                "migration to {to} given up: {why}; shut down cleanly on {at} (in maintenance)"
            );
            out.push(log(Some(vm), s.note.clone()));
        } else {
            let s = slot_mut(&mut self.vms, vm);
            s.note = format!("migration to {to} given up: {why}; it runs on {at}");
            out.push(log(Some(vm), s.note.clone()));
        }
        out.push(self.write(rec));
    }

    /// An unprotected VM's standby ended without being asked (the receiving VMM, or the
    /// old end after the handover).
    pub(super) fn migrate_end_exited(&mut self, vm: &str, why: &str, out: &mut Vec<Action>) {
        let me = self.me.clone();
        if self.receiving_here(vm) {
            self.migrate_abort(vm, format!("the receiving VMM on {me} ended ({why})"), out);
        }
    }

    /// The migration's rules for an unprotected VM; None: the usual rules apply.
    pub(super) fn migrate_rules(
        &mut self,
        vm: &str,
        rec: &VmRecord,
        peer_vmm: Option<&PeerVmm>,
        local_role: Option<Role>,
        out: &mut Vec<Action>,
    ) -> Option<(VmState, String)> {
        let me = self.me.clone();
        let peer = self.peer.clone();
        let peer_online = self.peer_state == PeerState::Online;
        let peer_role = peer_vmm.and_then(|p| p.role);
        let owner_here = rec.owner.as_deref() == Some(me.as_str());
        if rec.migrate_to.is_none() {
            let s = slot_mut(&mut self.vms, vm);
            s.migrate_since = None;
            s.migrate_synced = false;
        }
        if self.vms[vm].stop_sent {
            return None;
        }
        // The old end after the owner moved, or the receiving end of a migration given
        // up: a standby of a VM that runs on the peer alone.
        if !owner_here && local_role == Some(Role::Standby) {
            let receiving = rec.migrate_to.as_deref() == Some(me.as_str()) && rec.owner.is_some();
            if receiving && !peer_online {
                // The source gives the migration up on its side (the peer is lost to
                // it too, or it is gone); this end never takes the VM over.
                self.stop_local(vm, false, out);
                return Some((
                    VmState::Stopping,
                    format!("migrating here from {peer}, which is not online: stopping the receiving VMM"),
                ));
            }
            if receiving {
                let in_sync = peer_vmm.is_some_and(|p| p.protected);
                return Some((
                    VmState::Running,
                    if in_sync {
                        format!("migrating here from {peer}: in sync, the handover follows")
                    } else {
                        format!("migrating here from {peer}: pre-copy to the receiving VMM")
                    },
                ));
            }
            self.stop_local(vm, false, out);
            let why = format!(
                "runs on {}: stopping the migration's other end here",
                rec.owner.as_deref().unwrap_or("no node")
            );
            return Some((VmState::Stopping, why));
        }
        if owner_here && local_role == Some(Role::Standby) {
            // Handed over by the swap; the target writes the record next.
            return Some((
                VmState::Running,
                format!("handed over to {peer}; waiting for its record (the old end stops then)"),
            ));
        }
        let to = rec.migrate_to.clone()?;
        if !owner_here {
            if to != me || rec.owner.is_none() {
                return None;
            }
            match local_role {
                None => {
                    // The peer runs the VM: its VMM alone, or one that migrated in.
                    let source_runs = peer_vmm.is_some_and(|p| {
                        matches!(p.role, Some(Role::Solo | Role::Primary))
                            || (p.role == Some(Role::Standby) && p.failed_over)
                    });
                    if !peer_online || !source_runs || self.in_maintenance(&me) {
                        return Some((
                            VmState::Pending,
                            format!("migrating here from {peer}: waiting for its VMM there"),
                        ));
                    }
                    self.spawn(vm, Role::Standby, out);
                    return Some((
                        VmState::Starting,
                        format!("migrating here from {peer}: starting the receiving VMM"),
                    ));
                }
                Some(Role::Primary) => {
                    // Swapped in: the VM runs here now.
                    let s = slot_mut(&mut self.vms, vm);
                    s.swapped_in = false;
                    s.note = format!("migrated from {peer}");
                    let mut r = rec.clone();
                    r.owner = Some(me.clone());
                    r.migrate_to = None;
                    // The VM lives where it was moved, unless it was moved off a node
                    // in maintenance: then its preferred node stays (finalize brings
                    // it back per its failback policy).
                    if !self.in_maintenance(&peer) {
                        r.spec.preferred_node = Some(me.clone());
                    }
                    out.push(log(
                        Some(vm),
                        format!("migrated from {peer}: the VM runs on {me}, owner is {me}"),
                    ));
                    out.push(self.write(r));
                    return Some((
                        VmState::Running,
                        format!("running on {me} (migrated from {peer})"),
                    ));
                }
                _ => return None,
            }
        }
        // The source: the VM runs here.
        if !matches!(local_role, Some(Role::Solo | Role::Primary)) {
            return None;
        }
        if to != peer {
            self.migrate_abort(vm, format!("{to} is not the other node"), out);
            return None;
        }
        if !peer_online {
            self.migrate_abort(vm, format!("{peer} is not online"), out);
            return None;
        }
        if self.in_maintenance(&peer) {
            self.migrate_abort(vm, format!("{peer} is in maintenance"), out);
            return None;
        }
        let now = self.now;
        let s = slot_mut(&mut self.vms, vm);
        if s.migrate_since.is_none() {
            s.migrate_since = Some(now);
            s.migrate_synced = false;
        }
        let since = s.migrate_since.unwrap_or(now);
        let in_sync = s.local.as_ref().is_some_and(|l| l.protected);
        if s.swap_sent {
            return Some((
                VmState::Running,
                format!("migrating to {peer}: in sync, handing over at a checkpoint"),
            ));
        }
        let receiving =
            peer_role == Some(Role::Standby) && !peer_vmm.is_some_and(|p| p.failed_over);
        if s.migrate_synced && in_sync && receiving {
            s.swap_sent = true;
            out.push(log(
                Some(vm),
                format!("migration to {peer}: in sync; handing over at a checkpoint"),
            ));
            out.push(Action::SwapRoles { vm: vm.into() });
            return Some((
                VmState::Running,
                format!("migrating to {peer}: in sync, handing over at a checkpoint"),
            ));
        }
        if s.migrate_synced && !in_sync {
            self.migrate_abort(vm, format!("{peer}'s receiving VMM lost sync"), out);
            return None;
        }
        if now >= since + MIGRATE_TIMEOUT_MS {
            self.migrate_abort(
                vm,
                format!("not in sync after {} s", MIGRATE_TIMEOUT_MS / 1000),
                out,
            );
            return None;
        }
        Some((
            VmState::Running,
            match receiving {
                true => {
                    format!("migrating to {peer}: pre-copy to the receiving VMM")
                }
                false => format!("migrating to {peer}: waiting for the receiving VMM there"),
            },
        ))
    }
}
