//! Online level changes in the simulation (`vm set --protection` on a running VM):
//! the engine's `SetLevel` as the VMM answers it, and the golden scenarios.

use super::*;

impl Sim {
    /// The engine's online level change (`twinrun_pair::ft::level`): an unprotected
    /// VM's VMM (solo) becomes an FT or HA primary at once; an FT or HA primary changes
    /// level only once its standby is gone; anything else is refused with the
    /// engine's reason.
    pub(super) fn set_level(&mut self, i: usize, vm: String, to: Protection) {
        if self.hold_levels {
            self.held_levels.push((i, vm, to));
            return;
        }
        let peer_runs = self.nodes[1 - i].vmms.contains_key(&vm);
        let result = match (self.nodes[i].vmms.get_mut(&vm), to) {
            (Some(e), Protection::Ft | Protection::Ha) if e.0 == Role::Solo => {
                e.0 = Role::Primary;
                Ok(to)
            }
            (Some(e), _) if e.0 == Role::Primary && !peer_runs => {
                if to == Protection::Unprotected {
                    *e = (Role::Solo, e.1, false);
                } else {
                    e.2 = false;
                }
                Ok(to)
            }
            (Some(e), _) if e.0 == Role::Primary => Err(format!(
                "not made within 9s: a primary changes to {to} only once its standby is gone"
            )),
            (Some(_), _) => Err("this end of the pair runs no VM (a standby)".to_string()),
            (None, _) => Err("no VMM runs here".to_string()),
        };
        if result.is_ok() {
            self.nodes[i].levels.insert(vm.clone(), to);
        }
        self.queue.push_back((i, Input::VmmLevel { vm, result }));
    }

    /// The VMMs take the level changes held for them (see `hold_levels`).
    fn release_levels(&mut self) {
        self.hold_levels = false;
        for (i, vm, to) in std::mem::take(&mut self.held_levels) {
            self.set_level(i, vm, to);
        }
        self.settle();
    }
}

impl Sim {
    /// Where each VM's VMMs run, with the level each runs at (its status's).
    fn levels(&mut self) {
        let mut row = String::new();
        for vm in ["ft1", "un1", "ha1"] {
            let at: Vec<String> = (0..2)
                .filter_map(|i| {
                    let (r, _, _) = self.nodes[i].vmms.get(vm)?;
                    let l = self.nodes[i].levels.get(vm)?;
                    Some(format!("{}:{r}/{l}", NODES[i]))
                })
                .collect();
            let _ = write!(row, " {vm}=[{}]", at.join(","));
        }
        self.line(format!("levels{row}"));
    }

    fn vmm(&self, i: usize, vm: &str) -> Option<(Role, Protection)> {
        let (r, _, _) = self.nodes[i].vmms.get(vm)?;
        Some((*r, *self.nodes[i].levels.get(vm)?))
    }
}

fn set_level(to: Protection) -> Command {
    Command::Set(VmSettings {
        protection: Some(to),
        ..Default::default()
    })
}

#[test]
fn golden_level_change_online() {
    let mut s = cluster_with_vms();
    s.placement();
    s.note("un1 (unprotected, on pm1) becomes FT, asked on pm2: pm1's VMM changes, then pm2 starts the standby");
    s.command(1, "l1", "un1", set_level(Protection::Ft));
    s.note("the same command again (a client retry), on both nodes");
    s.command(1, "l1", "un1", set_level(Protection::Ft));
    s.command(0, "l1", "un1", set_level(Protection::Ft));
    s.wait(100);
    s.placement();
    assert_eq!(s.nodes[0].vmms.get("un1").map(|v| v.0), Some(Role::Primary));
    assert_eq!(s.nodes[1].vmms.get("un1").map(|v| v.0), Some(Role::Standby));
    s.note("un1 back to unprotected: pm2 stops its standby, then pm1's VMM runs alone");
    s.command(0, "l4", "un1", set_level(Protection::Unprotected));
    s.wait(100);
    s.placement();
    assert_eq!(s.nodes[0].vmms.get("un1").map(|v| v.0), Some(Role::Solo));
    assert!(!s.nodes[1].vmms.contains_key("un1"));
    s.note("FT again, then pm1 dies: pm2's standby takes over");
    s.command(0, "l5", "un1", set_level(Protection::Ft));
    s.wait(100);
    s.placement();
    s.crash_node(0);
    s.fail_over(1, "un1");
    s.wait(6000);
    s.placement();
    s.compare("level_change");
}

#[test]
fn golden_level_change_then_node_loss_unprotected_stays_down() {
    let mut s = cluster_with_vms();
    s.note("ft1 (FT, primary on pm1) becomes unprotected; then pm1 dies: nothing takes it over");
    s.command(0, "l1", "ft1", set_level(Protection::Unprotected));
    s.wait(100);
    s.placement();
    assert_eq!(s.nodes[0].vmms.get("ft1").map(|v| v.0), Some(Role::Solo));
    s.crash_node(0);
    s.wait(6000);
    s.placement();
    assert!(!s.nodes[1].vmms.contains_key("ft1"));
    s.compare("level_change_node_loss");
}

#[test]
fn golden_level_change_while_peer_away_is_refused() {
    let mut s = cluster_with_vms();
    s.note("the link is cut: a level change starts or stops the standby on the peer: refused");
    s.set_link(false);
    s.wait(100);
    s.command(0, "l1", "un1", set_level(Protection::Ft));
    s.command(0, "l2", "ft1", set_level(Protection::Unprotected));
    s.note("a VM that is stopped changes its level at once (nothing runs)");
    s.set_link(true);
    s.wait(100);
    s.command(0, "d1", "un1", Command::Shutdown);
    s.wait(100);
    s.command(0, "l3", "un1", set_level(Protection::Ha));
    s.placement();
    s.compare("level_change_peer_away");
}

#[test]
fn golden_level_change_through_ha() {
    let mut s = cluster_with_vms();
    s.levels();
    s.note("un1 (unprotected, on pm1) becomes HA, asked on pm2: pm1's VMM installs HA's hooks, then pm2 starts the HA standby");
    s.command(1, "h1", "un1", set_level(Protection::Ha));
    s.note("the same command again (a client retry), on both nodes");
    s.command(1, "h1", "un1", set_level(Protection::Ha));
    s.command(0, "h1", "un1", set_level(Protection::Ha));
    s.wait(100);
    s.levels();
    assert_eq!(s.vmm(0, "un1"), Some((Role::Primary, Protection::Ha)));
    assert_eq!(s.vmm(1, "un1"), Some((Role::Standby, Protection::Ha)));
    s.note("HA -> FT: pm2 stops the HA standby, then pm1's VMM takes FT's hooks, then pm2 starts the FT standby");
    s.command(0, "h2", "un1", set_level(Protection::Ft));
    s.wait(100);
    s.levels();
    assert_eq!(s.vmm(0, "un1"), Some((Role::Primary, Protection::Ft)));
    assert_eq!(s.vmm(1, "un1"), Some((Role::Standby, Protection::Ft)));
    s.note("FT -> HA, asked on pm2: the same steps the other way");
    s.command(1, "h3", "un1", set_level(Protection::Ha));
    s.wait(100);
    s.levels();
    assert_eq!(s.vmm(0, "un1"), Some((Role::Primary, Protection::Ha)));
    assert_eq!(s.vmm(1, "un1"), Some((Role::Standby, Protection::Ha)));
    s.note("HA -> unprotected: pm2 stops the standby, then pm1's VMM runs alone");
    s.command(0, "h4", "un1", set_level(Protection::Unprotected));
    s.wait(100);
    s.levels();
    assert_eq!(s.vmm(0, "un1"), Some((Role::Solo, Protection::Unprotected)));
    assert_eq!(s.vmm(1, "un1"), None);
    s.note("ha1 (HA from its start) becomes FT; then pm1 dies: pm2's FT standby takes over");
    s.command(0, "h5", "ha1", set_level(Protection::Ft));
    s.wait(100);
    s.levels();
    assert_eq!(s.vmm(1, "ha1"), Some((Role::Standby, Protection::Ft)));
    s.crash_node(0);
    s.wait(6000);
    s.levels();
    assert_eq!(s.vmm(1, "ha1").map(|v| v.0), Some(Role::Primary));
    s.compare("level_change_ha");
}

#[test]
fn golden_level_change_node_lost_mid_change() {
    let mut s = cluster_with_vms();
    s.note("ha1 (HA, primary on pm1) becomes FT: pm2 stops the HA standby, and pm1 dies before its VMM takes the change: nothing runs ha1 on pm2 (no standby there to take over)");
    s.hold_levels = true;
    s.command(0, "m1", "ha1", set_level(Protection::Ft));
    s.levels();
    assert_eq!(s.vmm(1, "ha1"), None);
    s.crash_node(0);
    s.hold_levels = false;
    s.wait(6000);
    s.levels();
    assert_eq!(s.vmm(1, "ha1"), None);
    s.note("pm1 returns: ha1 (no autostart) stays off; un1 (autostart) starts on pm1");
    s.boot(0);
    s.wait(6000);
    s.levels();
    s.note("un1 becomes HA; pm2 (where its standby would run) dies before pm1's VMM takes the change: the change is made, un1 runs at HA simplex on pm1");
    s.hold_levels = true;
    s.command(0, "m2", "un1", set_level(Protection::Ha));
    s.crash_node(1);
    s.release_levels();
    s.wait(100);
    s.levels();
    assert_eq!(s.vmm(0, "un1"), Some((Role::Primary, Protection::Ha)));
    s.note("pm2 returns: it starts the HA standby");
    s.boot(1);
    s.wait(6000);
    s.levels();
    assert_eq!(s.vmm(1, "un1"), Some((Role::Standby, Protection::Ha)));
    s.compare("level_change_node_lost");
}

#[test]
fn golden_level_change_daemon_restarted_mid_change() {
    let mut s = cluster_with_vms();
    s.note("ha1 (HA) becomes FT: pm2 stops the HA standby; pm1's daemon is killed before its VMM took the change (the request is dropped)");
    s.hold_levels = true;
    s.command(0, "r1", "ha1", set_level(Protection::Ft));
    s.kill_daemon(0);
    s.hold_levels = false;
    s.note("pm1's daemon restarts: the record says FT, the adopted VMM's status says HA: the change goes on (no FT standby against an HA primary)");
    s.boot(0);
    s.wait(100);
    s.levels();
    assert_eq!(s.vmm(0, "ha1"), Some((Role::Primary, Protection::Ft)));
    assert_eq!(s.vmm(1, "ha1"), Some((Role::Standby, Protection::Ft)));
    s.compare("level_change_daemon_restart");
}
