//! Live migration in the simulation: the golden scenarios of `vm migrate` (success
//! back and forth, the receiving VMM killed mid-way, the A-Links cut mid-way).

use super::*;

impl Sim {
    /// The VMMs' A-Links go down or up (the daemons keep talking): a primary loses
    /// its standby, and no standby gets in sync while they are down.
    pub(super) fn set_alinks(&mut self, up: bool) {
        self.alinks = up;
        if !up {
            for i in 0..2 {
                let vms: Vec<String> = self.nodes[i]
                    .vmms
                    .iter()
                    .filter(|(_, (_, _, p))| *p)
                    .map(|(v, _)| v.clone())
                    .collect();
                for vm in vms {
                    self.unprotect(i, &vm);
                }
            }
        }
        self.settle();
    }

    /// Where each VM runs, on one line.
    pub(super) fn placement(&mut self) {
        let mut row = String::new();
        for vm in ["ft1", "un1", "ha1"] {
            let at: Vec<String> = (0..2)
                .filter_map(|i| {
                    let (r, _, _) = self.nodes[i].vmms.get(vm)?;
                    Some(format!("{}:{r}", NODES[i]))
                })
                .collect();
            let _ = write!(row, " {vm}=[{}]", at.join(","));
        }
        self.line(format!("placement{row}"));
    }
}

#[test]
fn golden_migrate_back_and_forth() {
    let mut s = cluster_with_vms();
    s.placement();
    s.note("migrate the unprotected VM to pm2: the receiving VMM, in sync, the handover");
    s.command(0, "m1", "un1", Command::Migrate(Some("pm2".into())));
    s.wait(100);
    s.placement();
    s.note("and back, asked on pm1 without --to");
    s.command(0, "m2", "un1", Command::Migrate(None));
    s.wait(100);
    s.placement();
    s.note("once more to pm2, asked on pm2");
    s.command(1, "m3", "un1", Command::Migrate(None));
    s.wait(100);
    s.placement();
    s.note("to where it runs: nothing to do");
    s.command(1, "m4", "un1", Command::Migrate(Some("pm2".into())));
    s.note("the FT VM: a planned role swap; the HA VM: refused with the reason");
    s.command(0, "m5", "ft1", Command::Migrate(None));
    s.wait(100);
    s.command(0, "m6", "ha1", Command::Migrate(None));
    s.command(0, "m7", "un1", Command::Migrate(Some("pm9".into())));
    s.wait(100);
    s.placement();
    s.compare("migrate");
}

#[test]
fn golden_migrate_target_killed() {
    let mut s = cluster_with_vms();
    s.note("the A-Links are slow: the pre-copy is under way when the receiving VMM dies");
    s.set_alinks(false);
    s.command(0, "m1", "un1", Command::Migrate(Some("pm2".into())));
    s.wait(100);
    s.placement();
    s.crash_vmm(1, "un1");
    s.wait(100);
    s.placement();
    s.note("the links are fine again: a later migration succeeds");
    s.set_alinks(true);
    s.command(1, "m2", "un1", Command::Migrate(Some("pm2".into())));
    s.wait(100);
    s.placement();
    s.compare("migrate_target_killed");
}

#[test]
fn golden_migrate_links_cut() {
    let mut s = cluster_with_vms();
    s.note("every A-Link cut: the receiving VMM never gets in sync (it never takes over)");
    s.set_alinks(false);
    s.command(0, "m1", "un1", Command::Migrate(Some("pm2".into())));
    s.wait(100);
    s.placement();
    s.wait(MIGRATE_TIMEOUT_MS);
    s.placement();
    s.note("the peer lost mid-way: given up at once on the source");
    s.command(0, "m2", "un1", Command::Migrate(Some("pm2".into())));
    s.wait(100);
    s.set_link(false);
    s.wait(100);
    s.placement();
    s.note("links back: a later migration succeeds");
    s.set_alinks(true);
    s.set_link(true);
    s.wait(100);
    s.command(0, "m3", "un1", Command::Migrate(Some("pm2".into())));
    s.wait(100);
    s.placement();
    s.compare("migrate_links_cut");
}
