//! Online level changes in the simulation (`vm set --protection` on a running VM):
//! the engine's `SetLevel` as the VMM answers it, and the golden scenarios.

use super::*;

impl Sim {
    /// The engine's online level change (`twinrun_pair::ft::level`): an unprotected
    /// VM's VMM (solo) becomes an FT primary; an FT primary whose standby is gone runs
    /// alone; anything else is refused with the engine's reason.
    pub(super) fn set_level(&mut self, i: usize, vm: String, to: Protection) {
        let peer_runs = self.nodes[1 - i].vmms.contains_key(&vm);
        let result = match (self.nodes[i].vmms.get_mut(&vm), to) {
            (Some(e), Protection::Ft) if e.0 == Role::Solo => {
                e.0 = Role::Primary;
                Ok(Protection::Ft)
            }
            (Some(e), Protection::Unprotected) if e.0 == Role::Primary && !peer_runs => {
                *e = (Role::Solo, e.1, false);
                Ok(Protection::Unprotected)
            }
            (Some(_), Protection::Unprotected) => Err(
                "not made within 9s: an FT primary runs alone only once its standby is gone"
                    .to_string(),
            ),
            (Some(_), _) => Err("this runtime cannot change to that level".to_string()),
            (None, _) => Err("no VMM runs here".to_string()),
        };
        self.queue.push_back((i, Input::VmmLevel { vm, result }));
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
    s.note("HA is refused both ways with what to do instead");
    s.command(0, "l2", "ha1", set_level(Protection::Ft));
    s.command(0, "l3", "un1", set_level(Protection::Ha));
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
