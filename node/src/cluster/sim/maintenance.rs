//! Maintenance mode in the simulation: node records carried like VM records, and the
//! golden scenarios of `workon` / `finalize`.

use super::*;

impl Sim {
    pub(super) fn persist_node(&mut self, i: usize, rec: NodeRecord) {
        self.nodes[i]
            .node_recs
            .insert(rec.name.clone(), rec.clone());
        if self.connected() {
            if self.up(1 - i) {
                self.queue.push_back((1 - i, Input::NodeRecord(rec)));
            } else {
                self.merge_node_into(1 - i, &rec);
            }
        }
    }

    pub(super) fn merge_node_into(&mut self, to: usize, rec: &NodeRecord) {
        let newer = self.nodes[to]
            .node_recs
            .get(&rec.name)
            .is_none_or(|m| crate::replica::wins(&rec.version, &m.version));
        if newer {
            self.nodes[to]
                .node_recs
                .insert(rec.name.clone(), rec.clone());
        }
    }

    /// At connect, as the channel does: each side sends the node records the other
    /// lacks or has older (they share the digest with the VM records).
    pub(super) fn exchange_node_records(&mut self) {
        for i in 0..2 {
            let ours: Vec<NodeRecord> = self.nodes[i].node_recs.values().cloned().collect();
            for r in ours {
                let theirs = self.nodes[1 - i].node_recs.get(&r.name);
                if theirs.is_none_or(|t| crate::replica::wins(&r.version, &t.version)) {
                    self.queue.push_back((1 - i, Input::NodeRecord(r)));
                }
            }
        }
    }

    pub(super) fn node_command(&mut self, i: usize, id: &str, node: &str, cmd: NodeCommand) {
        self.queue.push_back((
            i,
            Input::NodeCommand {
                id: id.into(),
                node: node.into(),
                cmd,
            },
        ));
        self.settle();
    }

    /// The standbys on node `i` of `vms` see their primary stop (SIGTERM at an epoch
    /// boundary) and take over, as the engine does by itself.
    fn standbys_take_over(&mut self, i: usize, vms: &[&str]) {
        for vm in vms {
            self.fail_over(i, vm);
        }
    }

    fn maintenance_rows(&mut self) {
        for (i, node) in NODES.iter().enumerate() {
            let Some(c) = self.nodes[i].cluster.as_ref() else {
                continue;
            };
            let rows: Vec<String> = c
                .node_records()
                .map(|n| {
                    format!(
                        "{node} sees {}: maintenance={} | {}",
                        n.name, n.maintenance, n.reason
                    )
                })
                .collect();
            for r in rows {
                self.line(r);
            }
        }
    }
}

/// Work on pm1 with an FT, an HA and an unprotected VM running there.
fn worked_on() -> Sim {
    let mut s = cluster_with_vms();
    s.note("work on pm1 (asked on pm2)");
    s.node_command(1, "w1", "pm1", NodeCommand::WorkOn);
    s.note("the standbys on pm2 take over from the stopped primaries");
    s.standbys_take_over(1, &["ft1", "ha1"]);
    s.wait(100);
    s
}

#[test]
fn golden_maintenance_workon() {
    let mut s = worked_on();
    s.note("the same command id again: answered, not run again");
    s.node_command(0, "w1", "pm1", NodeCommand::WorkOn);
    s.maintenance_rows();
    for vm in ["ft1", "ha1"] {
        let c = s.nodes[1].cluster.as_ref().expect("pm2 up");
        assert_eq!(
            c.record(vm).and_then(|r| r.owner.clone()).as_deref(),
            Some("pm2")
        );
        assert_eq!(c.shown(vm).map(|x| x.state), Some(VmState::Simplex));
    }
    assert!(
        s.nodes[0].vmms.is_empty(),
        "pm1 runs nothing in maintenance"
    );
    // The unprotected VM was live migrated: the same VMM process on pm2 runs it (the
    // receiving VMM, swapped in), its preferred node is still pm1.
    let un = s.nodes[1]
        .cluster
        .as_ref()
        .and_then(|c| c.record("un1").cloned())
        .expect("un1");
    assert_eq!(un.desired, Desired::Running, "{}", s.log);
    assert_eq!(un.owner.as_deref(), Some("pm2"));
    assert_eq!(un.spec.preferred_node.as_deref(), Some("pm1"));
    assert_eq!(s.nodes[1].vmms.get("un1").map(|v| v.0), Some(Role::Primary));
    s.compare("maintenance_workon");
}

#[test]
fn golden_maintenance_daemon_restart() {
    let mut s = worked_on();
    s.note("pm1's daemon is stopped and started again (an upgrade)");
    s.kill_daemon(0);
    s.note("it comes back while the link to pm2 is down: the mark is in its own store");
    s.set_link(false);
    s.wait(1000);
    s.boot(0);
    s.wait(5000);
    assert!(s.nodes[0]
        .cluster
        .as_ref()
        .expect("up")
        .in_maintenance("pm1"));
    assert!(
        s.nodes[0].vmms.is_empty(),
        "pm1 starts nothing alone in maintenance"
    );
    s.set_link(true);
    s.wait(100);
    s.maintenance_rows();
    assert!(s.nodes[0].vmms.is_empty(), "pm1 still runs nothing");
    for i in 0..2 {
        let c = s.nodes[i].cluster.as_ref().expect("up");
        assert!(c.in_maintenance("pm1"));
    }
    s.compare("maintenance_daemon_restart");
}

#[test]
fn golden_maintenance_finalize() {
    let mut s = worked_on();
    s.note("finalize pm1 (asked on pm1)");
    s.node_command(0, "f1", "pm1", NodeCommand::Finalize);
    s.wait(100);
    s.maintenance_rows();
    // Protected again; ft1 (failback auto, pm1 preferred) is then swapped back to pm1
    // by a planned role swap; HA has no swap: its standby stays on pm1.
    for (vm, role) in [("ft1", Role::Primary), ("ha1", Role::Standby)] {
        assert_eq!(
            s.nodes[0].vmms.get(vm).map(|v| v.0),
            Some(role),
            "{vm}\n{}",
            s.log
        );
        let c = s.nodes[1].cluster.as_ref().expect("pm2 up");
        assert_eq!(c.shown(vm).map(|x| x.state), Some(VmState::Protected));
    }
    // un1's failback is manual: it stays on pm2 (its VMM there) until `vm failback`,
    // which migrates it to its preferred node pm1.
    assert_eq!(s.nodes[1].vmms.get("un1").map(|v| v.0), Some(Role::Primary));
    s.note("vm failback un1 (manual failback): migrated to pm1");
    s.command(1, "b1", "un1", Command::Failback);
    s.wait(100);
    s.placement();
    assert_eq!(s.nodes[0].vmms.get("un1").map(|v| v.0), Some(Role::Primary));
    assert!(!s.nodes[1].vmms.contains_key("un1"), "{}", s.log);
    s.compare("maintenance_finalize");
}

#[test]
fn golden_maintenance_workon_migration_given_up() {
    // Every A-Link cut before workon: the unprotected VM's receiving VMM never gets in
    // sync; after the migration timeout it falls back to the clean shutdown, and
    // finalize starts it again on pm1. (The FT and HA VMs are shut down first: with
    // their A-Links cut their standbys are not in sync, and workon is refused.)
    let mut s = cluster_with_vms();
    s.note("ft1 and ha1 shut down; every A-Link cut; work on pm1");
    s.command(0, "x1", "ft1", Command::Shutdown);
    s.command(0, "x2", "ha1", Command::Shutdown);
    s.wait(100);
    s.set_alinks(false);
    s.node_command(1, "w1", "pm1", NodeCommand::WorkOn);
    s.wait(100);
    s.placement();
    assert_eq!(s.nodes[0].vmms.get("un1").map(|v| v.0), Some(Role::Solo));
    s.note("no sync within the migration timeout: given up, shut down cleanly");
    s.wait(MIGRATE_TIMEOUT_MS);
    s.wait(100);
    s.placement();
    s.maintenance_rows();
    let un = s.nodes[1]
        .cluster
        .as_ref()
        .and_then(|c| c.record("un1").cloned())
        .expect("un1");
    assert_eq!(un.desired, Desired::Stopped, "{}", s.log);
    assert!(
        un.stopped_because
            .as_deref()
            .is_some_and(|b| b.contains("live migration to pm2 was given up")),
        "{un:?}"
    );
    assert!(
        s.nodes[0].vmms.is_empty(),
        "pm1 runs nothing now\n{}",
        s.log
    );
    assert!(!s.nodes[1].vmms.contains_key("un1"));
    s.note("links back; finalize pm1: un1 starts again there");
    s.set_alinks(true);
    s.node_command(0, "f1", "pm1", NodeCommand::Finalize);
    s.wait(100);
    s.placement();
    assert_eq!(s.nodes[0].vmms.get("un1").map(|v| v.0), Some(Role::Solo));
    s.compare("maintenance_workon_migration_given_up");
}

#[test]
fn golden_maintenance_auto_failback_by_migration() {
    // An unprotected VM with automatic failback comes back to its preferred node by
    // live migration when finalize clears the mark.
    let mut s = cluster_with_vms();
    s.note("un1's failback is automatic");
    s.command(
        0,
        "s1",
        "un1",
        Command::Set(VmSettings {
            failback: Some(Failback::Auto),
            ..Default::default()
        }),
    );
    s.node_command(1, "w1", "pm1", NodeCommand::WorkOn);
    s.standbys_take_over(1, &["ft1", "ha1"]);
    s.wait(100);
    s.placement();
    assert_eq!(s.nodes[1].vmms.get("un1").map(|v| v.0), Some(Role::Primary));
    s.note("finalize pm1: un1 migrates back");
    s.node_command(0, "f1", "pm1", NodeCommand::Finalize);
    s.wait(100);
    s.placement();
    assert_eq!(s.nodes[0].vmms.get("un1").map(|v| v.0), Some(Role::Primary));
    assert!(!s.nodes[1].vmms.contains_key("un1"), "{}", s.log);
    s.compare("maintenance_auto_failback_by_migration");
}

#[test]
fn golden_maintenance_both_refused() {
    let mut s = worked_on();
    s.note("work on pm2 while pm1 is in maintenance");
    s.node_command(0, "w2", "pm2", NodeCommand::WorkOn);
    s.node_command(1, "w3", "pm2", NodeCommand::WorkOn);
    s.wait(100);
    assert!(!s.nodes[1]
        .cluster
        .as_ref()
        .expect("up")
        .in_maintenance("pm2"));
    s.compare("maintenance_both_refused");
}

#[test]
fn golden_maintenance_peer_down_refused() {
    let mut s = cluster_with_vms();
    s.note("pm2 dies; then work on pm1, which holds the only copy of every VM");
    s.crash_node(1);
    s.wait(100);
    s.node_command(0, "w1", "pm1", NodeCommand::WorkOn);
    s.wait(100);
    assert!(!s.nodes[0]
        .cluster
        .as_ref()
        .expect("up")
        .in_maintenance("pm1"));
    assert_eq!(s.nodes[0].vmms.len(), 3, "nothing stopped");
    s.compare("maintenance_peer_down_refused");
}

#[test]
fn golden_maintenance_takeover_before_the_peers_report() {
    // pm2's standby takes over before pm2 hears that pm1's primary stopped (pm1's
    // report still shows it): no split brain, pm2's copy is the one that goes on.
    let mut s = cluster_with_vms();
    s.note("work on pm1; pm2's FT standby takes over before pm1's report arrives");
    s.queue.push_back((
        1,
        Input::NodeCommand {
            id: "w1".into(),
            node: "pm1".into(),
            cmd: NodeCommand::WorkOn,
        },
    ));
    if let Some(e) = s.nodes[1].vmms.get_mut("ft1") {
        e.0 = Role::Primary;
    }
    s.queue
        .push_back((1, Input::VmmFailedOver { vm: "ft1".into() }));
    s.settle();
    s.wait(100);
    let c = s.nodes[1].cluster.as_ref().expect("pm2 up");
    assert_eq!(
        c.record("ft1").and_then(|r| r.owner.clone()).as_deref(),
        Some("pm2")
    );
    assert_eq!(s.nodes[1].vmms.get("ft1").map(|v| v.0), Some(Role::Primary));
    assert!(!s.log.contains("split brain"), "{}", s.log);
    s.compare("maintenance_takeover_before_report");
}
