//! Changing the protection level of a running VM (`twinrun vm set VM --protection`),
//! as rules of the step function (issue 15 item 4).
//!
//! Every level runs in a VMM the engine can move between levels without a reboot
//! (`twinrun_pair::ft::level`: the control socket's `SetLevel`, [`Action::SetLevel`]):
//! an unprotected VM's VMM is an FT primary running alone (argv.rs); an HA primary's
//! disk hooks switch between HA's synchronous mirroring and FT's recording. What
//! cannot change in place is a standby: the other node stops the standby of the old
//! level and starts one of the new level (which resyncs by a delta: both levels keep
//! the same per-disk bitmaps). So every change has at most three steps, each a rule
//! here that fires once (`level_sent`, `stop_sent`, `spawn_sent`):
//!
//! 1. **the old standby goes** (from FT or HA): the other node stops its standby
//!    (SIGTERM: a stop is never a takeover);
//! 2. **the owner's VMM changes**, once the peer reports no VMM for it (from FT or
//!    HA; from unprotected at once): from unprotected it starts its quorum client
//!    with the node's quorum settings; to HA it installs HA's synchronous disk hooks;
//!    from HA its hooks become FT's; to unprotected its quorum client stops (once the
//!    witness recorded the standby as outdated). The answer makes its pid file say
//!    the new role (a restarted daemon adopts it so; it also reads the level from the
//!    VMM's status: [`Input::VmmAdoptedLevel`]);
//! 3. **the new standby starts** (to FT or HA): the other node, seeing the owner's VMM
//!    report the new level, starts the standby with that level's command line. The
//!    VM shows "protected" only once that standby is in sync.
//!
//! So unprotected -> HA -> FT: mirroring starts (HA's standby resyncs, then every
//! write waits for both replicas), then HA's standby is replaced by FT's and
//! checkpointing starts. Between steps 1 and 3 of a change from FT or HA the VM has
//! no standby (seconds): a node lost then is an unprotected VM's loss (the other node
//! has nothing to take over with). A VMM that refuses the change: the record gets the
//! VMM's level back (the log and `vm show` say why).
//!
//! Refused at the command with what to do instead: while the peer is not online (the
//! change starts or stops the standby there); during a live migration; a VM not yet
//! placed or running; from unprotected when the VM runs in the VMM a live migration
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
        if let Some(t) = &rec.migrate_to {
            return Err(CmdError::Conflict(format!(
                "a live migration of {vm} to {t} runs: set its level once it ended"
            )));
        }
        let other_work = match (from.paired(), to.paired()) {
            (true, true) => "replaces the standby there",
            (false, _) => "starts the standby there",
            (true, false) => "stops the standby there first",
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
        if from == Protection::Unprotected && role != Role::Solo {
            return Err(CmdError::Conflict(format!(
                "{vm} runs in the VMM a live migration moved it into ({role}{}), which cannot \
                 become a {to} primary while it runs: {restart}",
                if failed_over { ", took over" } else { "" }
            )));
        }
        Ok(match (from, to) {
            (Protection::Unprotected, _) => format!(
                "the level changes from {from} to {to} with no reboot: the VMM on {owner} \
                 starts its quorum client{}, then {other} starts the standby (`vm show` says \
                 protected once it is in sync)",
                if to == Protection::Ha {
                    " and mirrors every disk write synchronously"
                } else {
                    ""
                }
            ),
            (_, Protection::Unprotected) => format!(
                "the level changes from {from} to {to} with no reboot: {other} stops the \
                 standby, then the VMM on {owner} runs alone (its quorum client stopped, \
                 dirty logging off)"
            ),
            _ => format!(
                "the level changes from {from} to {to} with no reboot: {other} stops the \
                 {from} standby, the VMM on {owner} switches its disk hooks to {to}'s (the \
                 same quorum client), then {other} starts the {to} standby (a delta resync; \
                 no standby for those seconds; `vm show` says protected once it is in sync)"
            ),
        })
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
        if rec.migrate_to.is_some() {
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
            if l.is_some_and(|l| l.role == Role::Standby && !l.failed_over && l.level != to) {
                // Step 1: the standby of the old level goes first (a stop is never a
                // takeover).
                let old = l.map_or(to, |l| l.level);
                self.stop_local(vm, false, out);
                let owner = rec.owner.as_deref().unwrap_or("its owner");
                let then = if to.paired() {
                    format!("the VMM on {owner} changes to {to}, then a {to} standby starts here")
                } else {
                    format!("the VMM on {owner} then runs alone")
                };
                return Some((
                    VmState::Stopping,
                    format!("its level is now {to}: stopping the {old} standby here ({then})"),
                ));
            }
            // The level the owner's VMM reports (a peer of an older version reports
            // none: its solo VMM is unprotected, else the record's level).
            let owner_level = peer_vmm.and_then(|p| match (p.level, p.role) {
                (Some(level), _) => Some(level),
                (None, Some(Role::Solo)) => Some(Protection::Unprotected),
                (None, Some(_)) => Some(to),
                (None, None) => None,
            });
            if to.paired()
                && l.is_none()
                && peer_online
                && rec.owner.is_some()
                && owner_level.is_some_and(|lv| lv != to)
            {
                return Some((
                    VmState::Running,
                    format!(
                        "changing its level to {to} on {peer}: the {to} standby starts here \
                         once the VMM there runs at {to}"
                    ),
                ));
            }
            return None;
        }
        let l = s.local.as_ref()?;
        if !matches!(l.acting(), Role::Primary | Role::Solo) || l.level == to {
            return None;
        }
        let from = l.level;
        let changing = format!("changing its level from {from} to {to} on {me} (no reboot)");
        if s.level_sent {
            return Some((VmState::Running, changing));
        }
        if from.paired() {
            // Step 2 waits for step 1: the old standby gone.
            let standby_there = peer_vmm.is_some_and(|p| p.role.is_some());
            if !peer_online || standby_there {
                return Some((
                    VmState::Running,
                    format!("{changing}: waiting for {peer} to stop the {from} standby"),
                ));
            }
        }
        let s = slot_mut(&mut self.vms, vm);
        s.level_sent = true;
        out.push(log(Some(vm), format!("{changing}: asking its VMM")));
        out.push(Action::SetLevel { vm: vm.into(), to });
        Some((VmState::Running, changing))
    }

    /// An adopted VMM's status says the level it runs at (a daemon restarted in the
    /// middle of a level change): the slot follows it, so the change goes on from
    /// where the VMM is (the next step sends `SetLevel` again if it is not there yet;
    /// a VMM already at the level answers it at once).
    pub(super) fn on_adopted_level(&mut self, vm: &str, level: Protection, out: &mut Vec<Action>) {
        let Some(s) = self.vms.get_mut(vm) else {
            return;
        };
        let Some(l) = s.local.as_mut() else { return };
        if l.level == level {
            return;
        }
        l.level = level;
        if matches!(l.role, Role::Solo | Role::Primary) {
            l.role = if level == Protection::Unprotected {
                Role::Solo
            } else {
                Role::Primary
            };
        }
        s.note = format!("adopted its VMM at level {level} (its status says so)");
        out.push(log(Some(vm), s.note.clone()));
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
