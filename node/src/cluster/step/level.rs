//! Changing the protection level of a running VM (`twinrun vm set VM --protection`),
//! as rules of the step function (issue 15 item 4).
//!
//! An unprotected VM's VMM is an FT primary running alone (argv.rs), so the engine can
//! change between the two levels without a reboot (`twinrun_pair::ft::level`: the
//! control socket's `SetLevel`, [`Action::SetLevel`]):
//!
//! - **unprotected -> FT**: the command writes the level; the owner sends the change to
//!   its VMM (it starts its quorum client with the node's quorum settings and protects
//!   session after session as an FT primary); once it answers, the VMM is the primary
//!   (the pid file says so: a restarted daemon adopts it as one) and the other node,
//!   seeing the owner's VMM reported as a primary (no longer solo), starts the standby
//!   with the FT command line. It shows "protected" once in sync. The standby never
//!   starts before the change is made (it would reach an unprotected VMM).
//! - **FT -> unprotected**: the command writes the level; the other node stops its
//!   standby (a standby started for FT: SIGTERM, it never takes over on a stop); the
//!   owner, once the peer reports no VMM for it, sends the change (once the quorum
//!   recorded the standby as outdated the VMM stops its quorum client, the lease
//!   lapsing, turns dirty logging off and runs alone). A lost owner is then an unprotected VM's loss: it is down, and
//!   the other node, with no standby, does not take it over.
//! - a VMM that refuses the change: the record gets the VMM's level back (the log and
//!   `vm show` say why).
//!
//! Refused at the command with what to do instead: any change to or from HA (its VMMs
//! mirror disks synchronously with other disk hooks: shut down, set, start); while the
//! peer is not online (the change starts or stops the standby there); during a live
//! migration; a VM not yet placed; to FT when the VM runs in the VMM a live migration
//! moved it into (its runtime is a receiving standby's; a restart at the new level
//! does it).

use super::*;

impl Cluster {
    /// Checks a level change of a running VM; Ok: what will happen, in words.
    pub(super) fn level_command(
        &self,
        vm: &str,
        rec: &VmRecord,
        to: Protection,
    ) -> Result<String, CmdError> {
        let from = rec.spec.protection;
        let restart = format!("shut {vm} down, set its level, start it");
        if from == Protection::Ha || to == Protection::Ha {
            return Err(CmdError::Conflict(format!(
                "an HA VM's disks are mirrored synchronously by other disk hooks than FT's \
                 checkpoints, which a running VMM cannot switch ({from} -> {to}): {restart}"
            )));
        }
        if let Some(t) = &rec.migrate_to {
            return Err(CmdError::Conflict(format!(
                "a live migration of {vm} to {t} runs: set its level once it ended"
            )));
        }
        let other_work = match to {
            Protection::Ft => "starts the standby there",
            _ => "stops the standby there first",
        };
        if self.peer_state != PeerState::Online {
            return Err(CmdError::Conflict(format!(
                "{} is not online, and the change to {to} {other_work}: set it again once \
                 {} is online (or {restart})",
                self.peer, self.peer
            )));
        }
        let Some(owner) = rec.owner.clone() else {
            return Err(CmdError::Conflict(format!(
                "{vm} is not placed on a node yet: set its level once it runs (or {restart})"
            )));
        };
        let other = if owner == self.me {
            self.peer.clone()
        } else {
            self.me.clone()
        };
        if self.in_maintenance(&other) {
            return Err(CmdError::Conflict(format!(
                "{other} is in maintenance, and the change to {to} {other_work} \
                 (`twinrun node finalize {other}` first)"
            )));
        }
        // The owner's VMM: (role, failed over).
        let vmm = if owner == self.me {
            self.vms[vm].local.as_ref().map(|l| (l.role, l.failed_over))
        } else {
            self.peer_vmms
                .get(vm)
                .and_then(|p| p.role.map(|r| (r, p.failed_over)))
        };
        let Some((role, failed_over)) = vmm else {
            return Err(CmdError::Conflict(format!(
                "{vm} is not running on {owner} yet: set its level once it runs (or {restart})"
            )));
        };
        match to {
            Protection::Ft if role != Role::Solo => Err(CmdError::Conflict(format!(
                "{vm} runs in the VMM a live migration moved it into ({role}{}), which cannot \
                 become an FT primary while it runs: {restart}",
                if failed_over { ", took over" } else { "" }
            ))),
            Protection::Ft => Ok(format!(
                "the level changes from {from} to ft with no reboot: the VMM on {owner} starts \
                 its quorum client, then {other} starts the standby (`vm show` says protected \
                 once it is in sync)"
            )),
            _ => Ok(format!(
                "the level changes from {from} to {to} with no reboot: {other} stops the \
                 standby, then the VMM on {owner} runs alone (its quorum client stopped, \
                 dirty logging off)"
            )),
        }
    }

    /// The steps of a level change in progress (see the module docs); None when none
    /// runs for `vm` here.
    pub(super) fn level_rules(
        &mut self,
        vm: &str,
        rec: &VmRecord,
        peer_vmm: Option<&PeerVmm>,
        out: &mut Vec<Action>,
    ) -> Option<(VmState, String)> {
        let to = rec.spec.protection;
        if to == Protection::Ha || rec.migrate_to.is_some() {
            return None;
        }
        let me = self.me.clone();
        let peer = self.peer.clone();
        let peer_online = self.peer_state == PeerState::Online;
        let owner_here = rec.owner.as_deref() == Some(me.as_str());
        let s = &self.vms[vm];
        if s.stop_sent {
            return None;
        }
        if !owner_here {
            let l = s.local.as_ref();
            if to == Protection::Unprotected
                && l.is_some_and(|l| {
                    l.role == Role::Standby && !l.failed_over && l.level == Protection::Ft
                })
            {
                // A standby started for FT: it goes first (a stop is never a takeover).
                self.stop_local(vm, false, out);
                let owner = rec.owner.as_deref().unwrap_or("its owner");
                return Some((
                    VmState::Stopping,
                    format!(
                        "its level is now unprotected: stopping the standby here (the VMM on \
                         {owner} then runs alone)"
                    ),
                ));
            }
            let owner_solo = peer_online
                && rec.owner.is_some()
                && peer_vmm.and_then(|p| p.role) == Some(Role::Solo);
            if to == Protection::Ft && l.is_none() && owner_solo {
                return Some((
                    VmState::Running,
                    format!(
                        "changing its level to ft on {peer}: the standby starts here once the \
                         VMM there protects it"
                    ),
                ));
            }
            return None;
        }
        let l = s.local.as_ref()?;
        if !matches!(l.acting(), Role::Primary | Role::Solo)
            || l.level == to
            || l.level == Protection::Ha
        {
            return None;
        }
        let from = l.level;
        let changing = format!("changing its level from {from} to {to} on {me} (no reboot)");
        if s.level_sent {
            return Some((VmState::Running, changing));
        }
        if to == Protection::Unprotected {
            let standby_there = peer_vmm.is_some_and(|p| p.role.is_some());
            if !peer_online || standby_there {
                return Some((
                    VmState::Running,
                    format!("{changing}: waiting for {peer} to stop the standby"),
                ));
            }
        }
        let s = slot_mut(&mut self.vms, vm);
        s.level_sent = true;
        out.push(log(Some(vm), format!("{changing}: asking its VMM")));
        out.push(Action::SetLevel { vm: vm.into(), to });
        Some((VmState::Running, changing))
    }

    /// Our VMM answered a level change.
    pub(super) fn on_level(
        &mut self,
        vm: &str,
        result: Result<Protection, String>,
        out: &mut Vec<Action>,
    ) {
        let Some(s) = self.vms.get_mut(vm) else {
            return;
        };
        s.level_sent = false;
        let Some(l) = s.local.as_mut() else { return };
        match result {
            Ok(level) => {
                l.level = level;
                l.role = if level == Protection::Unprotected {
                    Role::Solo
                } else {
                    Role::Primary
                };
                l.failed_over = false;
                l.protected = false;
                s.note = format!("its level changed to {level} without a reboot");
                out.push(log(Some(vm), s.note.clone()));
            }
            Err(why) => {
                let back = l.level;
                s.note =
                    format!("the level change was refused by its VMM ({why}); it stays {back}");
                out.push(log(Some(vm), s.note.clone()));
                if s.record.spec.protection != back && !s.record.deleted {
                    let mut rec = s.record.clone();
                    rec.spec.protection = back;
                    out.push(self.write(rec));
                }
            }
        }
    }
}
