//! Maintenance mode (everRun's "work on" / "finalize"), as rules of the step function.
//!
//! `workon N` moves every VM off node N and marks N in maintenance in its replicated
//! node record; from then on N runs no VMM (so its daemon and VMMs may be stopped or
//! upgraded) and places nothing. FT and HA VMs run simplex on the other node: N's VMMs
//! get SIGTERM (never SIGKILL), so an FT primary stops at an epoch boundary having
//! released only acknowledged output, and the standby takes over from the last
//! acknowledged checkpoint by the path it always takes (then asks the quorum to own the
//! VM). Unprotected VMs are live migrated to the other node (everRun shuts them down):
//! `workon` writes their `migrate_to` and N's source VMM runs on, in maintenance, until
//! the handover (migrate.rs); a migration given up falls back to the clean shutdown with
//! the reason (the VM listed in the node record, and `finalize N` starts it again on
//! N). An unprotected VM that runs nowhere yet is shut down the same way.
//! `finalize N` clears the mark: N starts the FT/HA standbys again (resync by the
//! engine), and failback follows each VM's policy by the usual rules; unprotected VMs
//! whose preferred node is N migrate back when their failback is automatic (manual:
//! `twinrun vm failback VM`).
//!
//! Refused, with the reason: both nodes in maintenance; work on a node while the other
//! is not online and runs nothing of N's VMs (N holds their only copy); work on a node
//! whose FT/HA primary has no standby in sync (stopping it would stop the VM).

use super::*;

/// A command about a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeCommand {
    /// Move every VM off the node and mark it in maintenance.
    WorkOn,
    /// Bring it back: leave maintenance, restart what workon shut down.
    Finalize,
}

impl NodeCommand {
    pub fn name(self) -> &'static str {
        match self {
            NodeCommand::WorkOn => "workon",
            NodeCommand::Finalize => "finalize",
        }
    }
}

/// Why an unprotected VM is stopped: the same words on both nodes (finalize restarts
/// only a VM still stopped for this reason: [`shut_prefix`]).
fn shut_for(node: &str, why: &str) -> String {
    format!(
        "{} ({why}); `twinrun node finalize {node}` starts it again on {node}",
        shut_prefix(node)
    )
}

fn shut_prefix(node: &str) -> String {
    format!("shut down cleanly for the maintenance of {node}")
}

impl Cluster {
    /// The node records as loaded from the store (before `Boot`).
    pub fn load_nodes(&mut self, recs: Vec<NodeRecord>) {
        for r in recs {
            self.clock = self.clock.max(r.version.clock);
            self.nodes.insert(r.name.clone(), r);
        }
    }

    pub fn node_record(&self, node: &str) -> Option<&NodeRecord> {
        self.nodes.get(node)
    }

    /// Every node record (what the daemon replicates and persists).
    pub fn node_records(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values()
    }

    pub fn in_maintenance(&self, node: &str) -> bool {
        self.nodes.get(node).is_some_and(|n| n.maintenance)
    }

    pub(super) fn on_node_record(&mut self, rec: NodeRecord, out: &mut Vec<Action>) {
        self.clock = self.clock.max(rec.version.clock);
        if let Some(ours) = self.nodes.get(&rec.name) {
            if !crate::replica::wins(&rec.version, &ours.version) {
                return;
            }
            if ours.maintenance == rec.maintenance {
                self.nodes.insert(rec.name.clone(), rec);
                return;
            }
        }
        out.push(log(
            None,
            format!(
                "{} {} (from {})",
                rec.name,
                if rec.maintenance {
                    "is in maintenance"
                } else {
                    "left maintenance"
                },
                rec.version.node
            ),
        ));
        let back = rec.name == self.me && !rec.maintenance;
        self.nodes.insert(rec.name.clone(), rec);
        if back {
            self.forget_maintenance_notes();
        }
    }

    /// This node left maintenance: the notes of the VMMs it stopped for it are old news.
    fn forget_maintenance_notes(&mut self) {
        for s in self.vms.values_mut() {
            if s.note.contains("for the maintenance of") {
                s.note.clear();
            }
        }
    }

    pub(super) fn on_node_command(
        &mut self,
        id: String,
        node: String,
        cmd: NodeCommand,
        out: &mut Vec<Action>,
    ) {
        if let Some(first) = self.applied.get(&id) {
            out.push(log(
                None,
                format!(
                    "command {id} ({} {node}) seen before: not run again",
                    cmd.name()
                ),
            ));
            out.push(Action::Reply {
                id,
                vm: node,
                result: first.clone(),
            });
            return;
        }
        let result = match cmd {
            NodeCommand::WorkOn => self.work_on(&node, &id, out),
            NodeCommand::Finalize => self.finalize(&node, out),
        };
        let name = cmd.name();
        match &result {
            Ok(m) => out.push(log(None, format!("command {id} {name} {node}: {m}"))),
            Err(e) => out.push(log(
                None,
                format!("command {id} {name} {node} refused: {e}"),
            )),
        }
        self.remember(&id, &result);
        out.push(Action::Reply {
            id,
            vm: node,
            result,
        });
    }

    fn known_node(&self, node: &str) -> Result<String, CmdError> {
        if node == self.me {
            Ok(self.peer.clone())
        } else if node == self.peer {
            Ok(self.me.clone())
        } else {
            Err(CmdError::Invalid(format!(
                "no node named {node:?} (nodes: {}, {})",
                self.me, self.peer
            )))
        }
    }

    /// Does node `n` run a VMM of `vm` now (as this node knows)?
    fn runs_on(&self, vm: &str, n: &str) -> Option<(Role, bool)> {
        if n == self.me {
            self.vms
                .get(vm)
                .and_then(|s| s.local.as_ref())
                .map(|l| (l.acting(), l.protected))
        } else {
            self.peer_vmms.get(vm).and_then(|p| {
                let role = if p.role == Some(Role::Standby) && p.failed_over {
                    Some(Role::Primary)
                } else {
                    p.role
                };
                role.map(|r| (r, p.protected))
            })
        }
    }

    fn work_on(&mut self, node: &str, id: &str, out: &mut Vec<Action>) -> Result<CmdOk, CmdError> {
        let other = self.known_node(node)?;
        if self.in_maintenance(node) {
            return Ok(format!("{node} is in maintenance already (nothing to do)"));
        }
        if self.in_maintenance(&other) {
            return Err(CmdError::Conflict(format!(
                "{other} is in maintenance: both nodes in maintenance would leave no node to run \
                 the VMs; `twinrun node finalize {other}` first"
            )));
        }
        let other_up = other == self.me || self.peer_state == PeerState::Online;
        let live: Vec<VmRecord> = self
            .records()
            .filter(|r| r.desired == Desired::Running)
            .cloned()
            .collect();
        if !other_up {
            let only: Vec<String> = live
                .iter()
                .filter(|r| self.runs_on(&r.spec.name, node).is_some())
                .map(|r| r.spec.name.clone())
                .collect();
            if !only.is_empty() {
                return Err(CmdError::Conflict(format!(
                    "{other} is {}: {node} holds the only copy of {} (stopping it would stop \
                     them); bring {other} back first",
                    self.peer_word(),
                    only.join(", ")
                )));
            }
        }
        // An FT/HA VM moves by its standby taking over: only from a standby in sync.
        let unsynced: Vec<String> = live
            .iter()
            .filter(|r| r.spec.protection.paired())
            .filter(|r| {
                matches!(
                    self.runs_on(&r.spec.name, node),
                    Some((Role::Primary, false))
                )
            })
            .map(|r| r.spec.name.clone())
            .collect();
        if !unsynced.is_empty() {
            return Err(CmdError::Conflict(format!(
                "the standby on {other} of {} is not in sync yet: stopping the primary on {node} \
                 now would stop the VM; wait until `twinrun vm show` says protected",
                unsynced.join(", ")
            )));
        }
        let mut shut_down = Vec::new();
        let mut moved = Vec::new();
        let mut migrating = Vec::new();
        let mut migrate_writes = Vec::new();
        let mut writes = Vec::new();
        for r in &live {
            let vm = &r.spec.name;
            if r.spec.protection.paired() {
                if r.owner.as_deref() == Some(node) {
                    moved.push(vm.clone());
                    if self.runs_on(vm, node).is_none() {
                        // Runs nowhere yet: placed again (on the other node).
                        let mut rec = r.clone();
                        rec.owner = None;
                        writes.push(rec);
                    }
                }
            } else if r.owner.as_deref() == Some(node) {
                let mut rec = r.clone();
                if self.runs_on(vm, node).is_some() {
                    // Live migration; its source VMM runs on in maintenance until the
                    // handover (or, given up, is shut down: `migrate_abort`).
                    migrating.push(vm.clone());
                    if rec.migrate_to.as_deref() == Some(other.as_str()) {
                        continue;
                    }
                    rec.migrate_to = Some(other.clone());
                    migrate_writes.push(rec);
                    continue;
                } else {
                    rec.desired = Desired::Stopped;
                    rec.owner = None;
                    rec.stopped_because =
                        Some(shut_for(node, "it was not running: nothing to migrate"));
                    shut_down.push(vm.clone());
                }
                writes.push(rec);
            }
        }
        let reason = format!(
            "work on (command {id}): FT/HA VMs run simplex on {other}{}{}{}; its daemon and VMMs \
             may be stopped; `twinrun node finalize {node}` brings it back",
            if moved.is_empty() {
                String::new()
            } else {
                format!(
                    " ({}: the primary on {node} stops cleanly, the standby takes over)",
                    moved.join(", ")
                )
            },
            if migrating.is_empty() {
                String::new()
            } else {
                format!(
                    "; unprotected VMs live migrate to {other} (shut down cleanly if a \
                     migration is given up): {}",
                    migrating.join(", ")
                )
            },
            if shut_down.is_empty() {
                String::new()
            } else {
                format!(
                    "; unprotected VMs shut down cleanly (not running), started again by \
                     finalize: {}",
                    shut_down.join(", ")
                )
            }
        );
        // The migrations first: a node that learns it is in maintenance already knows
        // which of its VMMs run on as a migration's source. Then the node record: a
        // peer that gets it before the other VM records never starts one of them on
        // the node.
        for rec in migrate_writes {
            out.push(self.write(rec));
        }
        let rec = NodeRecord {
            name: node.to_string(),
            maintenance: true,
            reason: reason.clone(),
            shut_down,
            version: self.version(),
        };
        self.nodes.insert(node.to_string(), rec.clone());
        out.push(Action::PersistNode(rec));
        for rec in writes {
            out.push(self.write(rec));
        }
        Ok(format!("{node} is in maintenance: {reason}"))
    }

    fn finalize(&mut self, node: &str, out: &mut Vec<Action>) -> Result<CmdOk, CmdError> {
        self.known_node(node)?;
        let Some(mark) = self.nodes.get(node).filter(|n| n.maintenance).cloned() else {
            return Ok(format!("{node} is not in maintenance (nothing to do)"));
        };
        if node == self.peer && self.peer_state != PeerState::Online {
            return Err(CmdError::Conflict(format!(
                "{node} is {}: start its daemon, then finalize",
                self.peer_word()
            )));
        }
        let why = shut_prefix(node);
        let mut writes = Vec::new();
        for vm in &mark.shut_down {
            if let Some(r) = self.vms.get(vm).map(|s| s.record.clone()) {
                if !r.deleted
                    && r.desired == Desired::Stopped
                    && r.stopped_because
                        .as_deref()
                        .is_some_and(|b| b.starts_with(&why))
                {
                    let mut rec = r;
                    rec.desired = Desired::Running;
                    rec.owner = Some(node.to_string());
                    rec.stopped_because = None;
                    writes.push(rec);
                }
            }
        }
        let restarted: Vec<String> = writes.iter().map(|r| r.spec.name.clone()).collect();
        // Unprotected VMs that prefer this node and run on the other come back by live
        // migration when their failback is automatic (the one `workon` moved, or any).
        let other = self.known_node(node)?;
        let mut back = Vec::new();
        let mut manual = Vec::new();
        for r in self.records() {
            if r.deleted
                || r.desired != Desired::Running
                || r.spec.protection != Protection::Unprotected
                || r.owner.as_deref() != Some(other.as_str())
                || r.spec.preferred_node.as_deref() != Some(node)
                || r.migrate_to.is_some()
                || self.runs_on(&r.spec.name, &other).is_none()
            {
                continue;
            }
            if r.spec.failback == Failback::Auto && self.peer_state == PeerState::Online {
                let mut rec = r.clone();
                rec.migrate_to = Some(node.to_string());
                back.push(rec);
            } else {
                manual.push(r.spec.name.clone());
            }
        }
        let reason = format!(
            "finalized: left maintenance; FT/HA standbys start here and resync{}{}{}",
            if restarted.is_empty() {
                String::new()
            } else {
                format!("; started again here: {}", restarted.join(", "))
            },
            if back.is_empty() {
                String::new()
            } else {
                let names: Vec<&str> = back.iter().map(|r| r.spec.name.as_str()).collect();
                format!("; unprotected VMs migrate back here: {}", names.join(", "))
            },
            if manual.is_empty() {
                String::new()
            } else {
                format!(
                    "; unprotected VMs that prefer {node} stay on {other} until `twinrun vm \
                     failback` (manual failback, or {other} not reachable): {}",
                    manual.join(", ")
                )
            }
        );
        writes.extend(back);
        let rec = NodeRecord {
            name: node.to_string(),
            maintenance: false,
            reason: reason.clone(),
            shut_down: Vec::new(),
            version: self.version(),
        };
        self.nodes.insert(node.to_string(), rec.clone());
        if node == self.me {
            self.forget_maintenance_notes();
        }
        out.push(Action::PersistNode(rec));
        for rec in writes {
            out.push(self.write(rec));
        }
        Ok(format!(
            "{node} {reason}; failback follows each VM's policy"
        ))
    }

    /// This node is in maintenance: it stops its VMMs cleanly and starts none. `None`
    /// when the usual rules apply.
    pub(super) fn maintenance_here(
        &mut self,
        vm: &str,
        rec: &VmRecord,
        peer_vmm: Option<&PeerVmm>,
        out: &mut Vec<Action>,
    ) -> Option<(VmState, String)> {
        if !self.in_maintenance(&self.me) || rec.deleted {
            return None;
        }
        let me = self.me.clone();
        let peer = self.peer.clone();
        if self.migrating_from_here(vm) {
            // Moving off by live migration: its VMM runs on until the handover, or the
            // migration is given up (then it is shut down: `migrate_abort`). A source
            // VMM that ended is not started again here: the migration is given up.
            if self.vms[vm].local.is_some() || self.vms[vm].spawn_sent {
                return None;
            }
            self.migrate_abort(vm, format!("its VMM on {me} ended"), out);
            return Some((
                VmState::Stopped,
                shut_for(
                    &me,
                    &format!("its VMM on {me} ended during the live migration"),
                ),
            ));
        }
        let s = &self.vms[vm];
        if let Some(l) = &s.local {
            let role = l.acting();
            let how = if rec.spec.protection.paired() && role == Role::Primary {
                format!("; the standby on {peer} takes over from the last acknowledged checkpoint")
            } else {
                String::new()
            };
            if !s.stop_sent {
                let s = slot_mut(&mut self.vms, vm);
                s.note = format!("its {role} VMM was stopped for the maintenance of {me}");
                out.push(log(
                    Some(vm),
                    format!("{me} is in maintenance: stopping its {role} VMM cleanly{how}"),
                ));
            }
            self.stop_local(vm, false, out);
            return Some((
                VmState::Stopping,
                format!("{me} is in maintenance: stopping its {role} VMM here cleanly{how}"),
            ));
        }
        if rec.desired != Desired::Running {
            return None;
        }
        let on_peer = peer_vmm.is_some_and(|p| p.role.is_some());
        Some(match (rec.spec.protection.paired(), on_peer) {
            (true, true) => (
                VmState::Simplex,
                format!(
                    "{me} is in maintenance: runs on {peer} alone; `twinrun node finalize {me}` \
                     protects it again"
                ),
            ),
            (false, true) => (
                VmState::Running,
                format!("running on {peer}; {me} is in maintenance"),
            ),
            (_, false) => (
                VmState::Pending,
                format!(
                    "{me} is in maintenance: it runs only on {peer}, which does not run it (yet)"
                ),
            ),
        })
    }

    /// The peer is in maintenance: a protected VM running here alone says so.
    pub(super) fn maintenance_of_peer(
        &self,
        rec: &VmRecord,
        local_role: Option<Role>,
        state: VmState,
        reason: String,
    ) -> (VmState, String) {
        let peer = &self.peer;
        if !self.in_maintenance(peer)
            || rec.deleted
            || rec.desired != Desired::Running
            || !rec.spec.protection.paired()
            || local_role != Some(Role::Primary)
            || !matches!(state, VmState::Running | VmState::Simplex)
        {
            return (state, reason);
        }
        (
            VmState::Simplex,
            format!(
                "simplex: primary on {}; {peer} is in maintenance (`twinrun node finalize {peer}` \
                 protects it again)",
                self.me
            ),
        )
    }

    /// A live migration off a node in maintenance was given up: the VM falls back to
    /// the clean shutdown, with the reason, listed in the node record so that
    /// `finalize` starts it again there. False when the source is not in maintenance.
    pub(super) fn maintenance_shutdown_instead(
        &mut self,
        rec: &mut VmRecord,
        to: &str,
        why: &str,
        out: &mut Vec<Action>,
    ) -> bool {
        let Some(node) = rec.owner.clone().filter(|o| self.in_maintenance(o)) else {
            return false;
        };
        rec.desired = Desired::Stopped;
        rec.owner = None;
        rec.stopped_because = Some(shut_for(
            &node,
            &format!("its live migration to {to} was given up: {why}"),
        ));
        if let Some(mut mark) = self.nodes.get(&node).cloned() {
            if !mark.shut_down.contains(&rec.spec.name) {
                mark.shut_down.push(rec.spec.name.clone());
                mark.version = self.version();
                self.nodes.insert(node.clone(), mark.clone());
                out.push(Action::PersistNode(mark));
            }
        }
        true
    }
}
