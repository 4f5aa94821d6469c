//! Golden-log tests of the step function: two nodes' `Cluster`s, their stores
//! (last-writer-wins merge, as `store.rs`), the link between them and their VMM
//! processes, driven by a scenario script. Every input a node receives and every action
//! it returns is logged; the log is compared with `node/tests/golden/<name>.expect`
//! (`TWINRUN_BLESS=1` rewrites the files), like Proxmox ha-manager's `log.expect`.
//!
//! The VMM processes here are the simulation's: a spawn runs at once, a stop ends the
//! process cleanly, an FT primary whose standby runs on the other node is protected
//! after the next step, and a standby whose protected primary's node dies takes over.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;

use twinrun_lab::Rng;

use super::step::*;
use crate::model::*;

const NODES: [&str; 2] = ["pm1", "pm2"];

mod level;
mod maintenance;
mod migrate;

struct Node {
    cluster: Option<Cluster>,
    store: BTreeMap<String, VmRecord>,
    done: BTreeMap<String, Done>,
    /// vm -> (role, pid, protected)
    vmms: BTreeMap<String, (Role, u32, bool)>,
    /// The node records (maintenance) in its store.
    node_recs: BTreeMap<String, crate::model::NodeRecord>,
    /// vm -> the level its VMM runs at (what its control socket's status says).
    levels: BTreeMap<String, Protection>,
}

struct Sim {
    now: u64,
    nodes: [Node; 2],
    link: bool,
    /// The VMMs' A-Links (the daemons' channel is `link`): cut, no standby gets in
    /// sync.
    alinks: bool,
    queue: VecDeque<(usize, Input)>,
    log: String,
    next_pid: u32,
    /// Quorum answers: true grants (everRun with no witness), false refuses.
    quorum_grants: bool,
    /// Print the log as it grows (to see a failing seed's history up to its panic).
    verbose: bool,
    /// The engine's takeover when a node in maintenance stops a protected primary
    /// (`standby_takes_over`); the goldens step it by hand.
    takeover_on_stop: bool,
    /// The VMMs take level changes only at `release_levels` (as a VMM that waits for
    /// its session boundary or the quorum's gate): a daemon killed, or a node lost,
    /// in the middle of a level change. A killed daemon's requests are dropped (the
    /// VMM drops a request its asker no longer waits for).
    hold_levels: bool,
    held_levels: Vec<(usize, String, Protection)>,
}

fn policy() -> Policy {
    Policy {
        max_restart: 2,
        restart_window_ms: 60_000,
        boot_grace_ms: 5_000,
        takeover_wait_ms: 3_000,
    }
}

fn spec(
    name: &str,
    protection: Protection,
    pref: &str,
    failback: Failback,
    autostart: bool,
) -> VmSpec {
    VmSpec {
        name: name.into(),
        vcpus: 1,
        mem_mib: 64,
        disks: vec![],
        nics: vec![],
        payload: PayloadSpec::TestGuest {
            elf: None,
            workloads: vec!["counter".into()],
            counter_rate: None,
            kv_addr: None,
        },
        protection,
        preferred_node: Some(pref.into()),
        autostart,
        failback,
    }
}

impl Sim {
    fn new() -> Sim {
        let node = || Node {
            cluster: None,
            store: BTreeMap::new(),
            done: BTreeMap::new(),
            vmms: BTreeMap::new(),
            node_recs: BTreeMap::new(),
            levels: BTreeMap::new(),
        };
        Sim {
            now: 0,
            nodes: [node(), node()],
            link: false,
            alinks: true,
            queue: VecDeque::new(),
            log: String::new(),
            next_pid: 100,
            quorum_grants: true,
            verbose: false,
            takeover_on_stop: false,
            hold_levels: false,
            held_levels: Vec::new(),
        }
    }

    fn note(&mut self, s: &str) {
        self.line(format!("--- {s}"));
    }

    fn line(&mut self, l: String) {
        if self.verbose {
            eprintln!("{l}");
        }
        let _ = writeln!(self.log, "{l}");
    }

    fn up(&self, i: usize) -> bool {
        self.nodes[i].cluster.is_some()
    }

    fn connected(&self) -> bool {
        self.link && self.up(0) && self.up(1)
    }

    /// Starts node `i`'s daemon: loads its store, reports its surviving VMMs, boots.
    fn boot(&mut self, i: usize) {
        let n = &self.nodes[i];
        let clock = n.store.values().map(|r| r.version.clock).max().unwrap_or(0);
        let mut c = Cluster::new(
            NODES[i],
            NODES[1 - i],
            policy(),
            n.store.values().cloned().collect(),
            n.done.clone(),
            clock,
        );
        c.load_nodes(self.nodes[i].node_recs.values().cloned().collect());
        self.nodes[i].cluster = Some(c);
        let running: Vec<(String, Role, u32, bool)> = self.nodes[i]
            .vmms
            .iter()
            .map(|(v, (r, p, prot))| (v.clone(), *r, *p, *prot))
            .collect();
        for (vm, role, pid, protected) in running {
            self.queue.push_back((
                i,
                Input::VmmRunning {
                    vm: vm.clone(),
                    role,
                    pid,
                    adopted: true,
                },
            ));
            // The daemon reads the level from the adopted VMM's status.
            if let Some(level) = self.nodes[i].levels.get(&vm).copied() {
                self.queue.push_back((
                    i,
                    Input::VmmAdoptedLevel {
                        vm: vm.clone(),
                        level,
                    },
                ));
            }
            // The supervisor reads an adopted VMM's log from its start.
            if protected {
                self.queue.push_back((i, Input::VmmProtected { vm }));
            }
        }
        self.queue.push_back((i, Input::Boot));
        self.settle();
        if self.connected() {
            self.connect();
        }
    }

    /// The daemon of node `i` dies (SIGKILL): its VMMs live on.
    fn kill_daemon(&mut self, i: usize) {
        self.nodes[i].cluster = None;
        self.queue.retain(|(n, _)| *n != i);
        self.held_levels.retain(|(n, ..)| *n != i);
        if self.up(1 - i) && self.link {
            self.queue.push_back((1 - i, Input::PeerLost));
        }
        self.settle();
    }

    /// Node `i` dies with everything on it.
    fn crash_node(&mut self, i: usize) {
        let lost: Vec<(String, Role, bool)> = self.nodes[i]
            .vmms
            .iter()
            .map(|(v, (r, _, p))| (v.clone(), *r, *p))
            .collect();
        self.nodes[i].vmms.clear();
        self.nodes[i].cluster = None;
        self.queue.retain(|(n, _)| *n != i);
        self.held_levels.retain(|(n, ..)| *n != i);
        let other = 1 - i;
        if self.up(other) && self.link {
            self.queue.push_back((other, Input::PeerLost));
        }
        for (vm, role, protected) in lost {
            self.peer_vmm_lost(other, &vm, role, protected);
        }
        self.settle();
    }

    /// The VMM of `vm` on node `i` crashes. As the engine does when a VMM dies: a
    /// protected primary's standby on the other node sees its A-Links drop and takes
    /// over (its VMM got the quorum's grant: the dead primary renews the lease no
    /// more), and a primary whose standby died runs on unprotected.
    fn crash_vmm(&mut self, i: usize, vm: &str) {
        if let Some((role, _, protected)) = self.nodes[i].vmms.remove(vm) {
            self.queue.push_back((
                i,
                Input::VmmExited {
                    vm: vm.into(),
                    exit: ExitKind::Crashed("exit code 3".into()),
                },
            ));
            self.peer_vmm_lost(1 - i, vm, role, protected);
        }
        self.settle();
    }

    /// Node `other`'s VMM of `vm` loses its partner, a VMM of `role` (`protected`:
    /// a primary whose standby was in sync) that ended without a handover.
    fn peer_vmm_lost(&mut self, other: usize, vm: &str, role: Role, protected: bool) {
        let Some(e) = self.nodes[other].vmms.get_mut(vm) else {
            return;
        };
        match (role, e.0) {
            // The surviving primary (FT or HA) loses its standby and says so.
            (Role::Standby, Role::Primary) if e.2 => {
                e.2 = false;
                self.queue
                    .push_back((other, Input::VmmUnprotected { vm: vm.into() }));
            }
            // The standby of a protected primary takes over, given the quorum's grant.
            (Role::Primary, Role::Standby) if protected && self.quorum_grants => {
                e.0 = Role::Primary;
                self.queue
                    .push_back((other, Input::VmmFailedOver { vm: vm.into() }));
            }
            _ => {}
        }
    }

    /// Node `i`'s FT primary of `vm` loses its standby (the A-Links are cut).
    fn unprotect(&mut self, i: usize, vm: &str) {
        if let Some(e) = self.nodes[i].vmms.get_mut(vm) {
            if e.2 {
                e.2 = false;
                self.queue
                    .push_back((i, Input::VmmUnprotected { vm: vm.into() }));
            }
        }
        self.settle();
    }

    /// Node `i`'s standby of `vm` takes over (its VMM got the quorum's grant).
    fn fail_over(&mut self, i: usize, vm: &str) {
        if let Some(e) = self.nodes[i].vmms.get_mut(vm) {
            if e.0 == Role::Standby {
                e.0 = Role::Primary;
                self.queue
                    .push_back((i, Input::VmmFailedOver { vm: vm.into() }));
            }
        }
        self.settle();
    }

    /// Node `i`'s primary of `vm` learns a higher generation from the quorum and
    /// exits with code 5 (demoted).
    fn demote(&mut self, i: usize, vm: &str) {
        if self.nodes[i].vmms.remove(vm).is_some() {
            self.queue.push_back((
                i,
                Input::VmmExited {
                    vm: vm.into(),
                    exit: ExitKind::Demoted,
                },
            ));
        }
        self.settle();
    }

    fn set_link(&mut self, up: bool) {
        if self.link == up {
            return;
        }
        self.link = up;
        if up {
            if self.up(0) && self.up(1) {
                self.connect();
            }
        } else {
            for i in 0..2 {
                if self.up(i) {
                    self.queue.push_back((i, Input::PeerLost));
                }
            }
            self.settle();
        }
    }

    /// Both daemons connect: exchange records (merge), then PeerUp and reports.
    fn connect(&mut self) {
        // As the channel does: each side sends what the other's digest lacks.
        let digest = |n: &Node| -> Vec<(String, Version)> {
            n.store
                .iter()
                .map(|(k, r)| (k.clone(), r.version.clone()))
                .collect()
        };
        let (d0, d1) = (digest(&self.nodes[0]), digest(&self.nodes[1]));
        for (i, (ours, theirs)) in [(&d0, &d1), (&d1, &d0)].into_iter().enumerate() {
            for name in crate::replica::to_send(ours, theirs) {
                let r = self.nodes[i].store[&name].clone();
                self.deliver(1 - i, r);
            }
        }
        self.exchange_node_records();
        for i in 0..2 {
            self.queue.push_back((i, Input::PeerUp));
        }
        self.settle();
    }

    /// Sends `rec` to node `to`: it is merged into that node's store when the node
    /// processes it, just before its step function sees it (as the daemon does).
    fn deliver(&mut self, to: usize, rec: VmRecord) {
        if self.up(to) {
            self.queue.push_back((to, Input::Record(rec)));
        } else {
            self.merge_into(to, &rec);
        }
    }

    fn merge_into(&mut self, to: usize, rec: &VmRecord) {
        let newer = self.nodes[to]
            .store
            .get(&rec.spec.name)
            .is_none_or(|m| crate::replica::wins(&rec.version, &m.version));
        if newer {
            self.nodes[to]
                .store
                .insert(rec.spec.name.clone(), rec.clone());
        }
    }

    fn command(&mut self, i: usize, id: &str, vm: &str, cmd: Command) {
        self.queue.push_back((
            i,
            Input::Command {
                id: id.into(),
                vm: vm.into(),
                cmd,
            },
        ));
        self.settle();
    }

    fn wait(&mut self, ms: u64) {
        self.now += ms;
        self.line(format!("t={} wait {ms} ms", self.now));
        for i in 0..2 {
            if self.up(i) {
                self.queue.push_back((i, Input::Tick));
            }
        }
        self.settle();
    }

    fn settle(&mut self) {
        let mut budget = 10_000;
        while let Some((i, input)) = self.queue.pop_front() {
            budget -= 1;
            assert!(budget > 0, "the simulation does not settle:\n{}", self.log);
            if self.nodes[i].cluster.is_none() {
                continue;
            }
            let quiet = matches!(
                input,
                Input::Tick
                    | Input::PeerReport(_)
                    | Input::CommandSeen { .. }
                    | Input::VmmAdoptedLevel { .. }
            );
            if let Input::Record(r) = &input {
                let r = r.clone();
                self.merge_into(i, &r);
            }
            if let Input::NodeRecord(r) = &input {
                let r = r.clone();
                self.merge_node_into(i, &r);
            }
            let Some(c) = self.nodes[i].cluster.as_mut() else {
                continue;
            };
            let shown = fmt_input(&input);
            if self.verbose {
                eprintln!("(stepping {} <- {shown})", NODES[i]);
            }
            let actions = c.step(self.now, input);
            if !quiet || !actions.is_empty() {
                self.line(format!("t={} {} <- {shown}", self.now, NODES[i]));
            }
            for a in actions {
                self.line(format!("t={} {} -> {}", self.now, NODES[i], fmt_action(&a)));
                self.execute(i, a);
            }
            // The peer hears of this node's VMMs after every step.
            if self.connected() {
                let rep = self.nodes[i].cluster.as_ref().map(Cluster::report);
                let stale = self.nodes[1 - i]
                    .cluster
                    .as_ref()
                    .is_some_and(|c| rep.as_ref().is_some_and(|r| !same_report(c, r)));
                if let (true, Some(r)) = (stale, rep) {
                    self.queue.push_back((1 - i, Input::PeerReport(r)));
                }
            }
            // FT primaries whose standby runs are protected.
            self.protect();
        }
    }

    fn protect(&mut self) {
        if !self.connected() || !self.alinks {
            return;
        }
        for i in 0..2 {
            let vms: Vec<String> = self.nodes[i]
                .vmms
                .iter()
                .filter(|(_, (r, _, p))| matches!(r, Role::Primary | Role::Solo) && !p)
                .map(|(v, _)| v.clone())
                .collect();
            for vm in vms {
                if self.nodes[1 - i]
                    .vmms
                    .get(&vm)
                    .is_some_and(|e| e.0 == Role::Standby)
                {
                    if let Some(e) = self.nodes[i].vmms.get_mut(&vm) {
                        e.2 = true;
                    }
                    self.queue.push_back((i, Input::VmmProtected { vm }));
                }
            }
        }
    }

    fn execute(&mut self, i: usize, a: Action) {
        match a {
            Action::Spawn { role, record } => {
                self.next_pid += 1;
                let pid = self.next_pid;
                let vm = record.spec.name.clone();
                self.nodes[i].vmms.insert(vm.clone(), (role, pid, false));
                let level = if role == Role::Solo {
                    Protection::Unprotected
                } else {
                    record.spec.protection
                };
                self.nodes[i].levels.insert(vm.clone(), level);
                self.queue.push_back((
                    i,
                    Input::VmmRunning {
                        vm,
                        role,
                        pid,
                        adopted: false,
                    },
                ));
            }
            Action::Stop { vm, .. } => {
                let was = self.nodes[i].vmms.get(&vm).map(|e| e.0);
                if self.takeover_on_stop {
                    self.standby_takes_over(i, &vm);
                }
                if was == Some(Role::Standby) {
                    // A live migration's other end stops: the VMM on the peer runs
                    // alone again (its log says it waits for a standby); the same for
                    // an FT/HA standby stopped (a level change replaces it).
                    if let Some(e) = self.nodes[1 - i].vmms.get_mut(&vm) {
                        if e.2 {
                            e.2 = false;
                            self.queue
                                .push_back((1 - i, Input::VmmUnprotected { vm: vm.clone() }));
                        }
                    }
                }
                if self.nodes[i].vmms.remove(&vm).is_some() {
                    self.queue.push_back((
                        i,
                        Input::VmmExited {
                            vm,
                            exit: ExitKind::Clean,
                        },
                    ));
                }
            }
            Action::Persist(rec) => {
                self.nodes[i]
                    .store
                    .insert(rec.spec.name.clone(), rec.clone());
                if self.connected() {
                    self.deliver(1 - i, rec);
                }
            }
            Action::Done { vm, done } => {
                self.nodes[i].done.insert(vm, done);
            }
            Action::AskQuorum { vm, kind } => {
                let granted = self.quorum_grants;
                self.queue.push_back((
                    i,
                    Input::Quorum {
                        vm,
                        kind,
                        granted,
                        reason: if granted {
                            "no witness configured (mode none)".into()
                        } else {
                            "witness unreachable".into()
                        },
                    },
                ));
            }
            Action::SwapRoles { vm } => {
                // The engine's planned swap (`control::swap`): only a protected primary
                // whose standby runs on the connected peer swaps; then this VMM logs
                // that it swapped out (it is the standby now) and the peer's that it
                // took over.
                let other = 1 - i;
                let here = self.nodes[i].vmms.get(&vm).copied();
                let there = self.nodes[other].vmms.get(&vm).copied();
                match (here, there) {
                    // Solo: an unprotected VM's VMM (an FT primary alone) handing the
                    // VM to its live migration's receiving VMM.
                    (Some((Role::Primary | Role::Solo, _, true)), Some((Role::Standby, _, _)))
                        if self.connected() && self.alinks =>
                    {
                        if let Some(e) = self.nodes[i].vmms.get_mut(&vm) {
                            *e = (Role::Standby, e.1, false);
                        }
                        if let Some(e) = self.nodes[other].vmms.get_mut(&vm) {
                            e.0 = Role::Primary;
                        }
                        self.queue
                            .push_back((i, Input::VmmSwappedOut { vm: vm.clone() }));
                        self.queue.push_back((other, Input::VmmSwappedIn { vm }));
                    }
                    _ => self.queue.push_back((
                        i,
                        Input::SwapFailed {
                            vm,
                            error: "role swap refused: the pair is not in sync".into(),
                        },
                    )),
                }
            }
            Action::Reply { id, result, .. } => {
                // The daemon records the answer and sends it to the peer.
                if self.connected() {
                    self.queue
                        .push_back((1 - i, Input::CommandSeen { id, result }));
                }
            }
            Action::RemoveFiles { .. } | Action::Log { .. } => {}
            Action::PersistNode(rec) => self.persist_node(i, rec),
            Action::SetLevel { vm, to } => self.set_level(i, vm, to),
        }
    }

    /// With `takeover_on_stop` (the random runs with maintenance): node `i`, in
    /// maintenance, stops the protected FT/HA primary of `vm`; its standby on the
    /// connected peer takes over, as the engine's does when its primary stops (the
    /// golden tests say so step by step with `standbys_take_over`).
    fn standby_takes_over(&mut self, i: usize, vm: &str) {
        let in_maintenance = self.nodes[i]
            .cluster
            .as_ref()
            .is_some_and(|c| c.in_maintenance(NODES[i]));
        let paired = self.nodes[i]
            .store
            .get(vm)
            .is_some_and(|r| r.spec.protection.paired());
        let protected_primary = self.nodes[i]
            .vmms
            .get(vm)
            .is_some_and(|e| e.0 == Role::Primary && e.2);
        if !(in_maintenance && paired && protected_primary && self.connected() && self.alinks) {
            return;
        }
        if let Some(e) = self.nodes[1 - i].vmms.get_mut(vm) {
            if e.0 == Role::Standby {
                e.0 = Role::Primary;
                self.queue
                    .push_back((1 - i, Input::VmmFailedOver { vm: vm.into() }));
            }
        }
    }

    /// The final table: each VM's state on each live node.
    fn table(&mut self) {
        self.note("state");
        for (i, node) in NODES.iter().enumerate() {
            let Some(c) = self.nodes[i].cluster.as_ref() else {
                let _ = writeln!(self.log, "{node} down");
                continue;
            };
            let names: Vec<String> = self.nodes[i].store.keys().cloned().collect();
            for vm in names {
                let Some(sh) = c.shown(&vm) else {
                    let _ = writeln!(self.log, "{} {vm}: (forgotten)", node);
                    continue;
                };
                let rec = c.record(&vm).expect("record");
                let _ = writeln!(
                    self.log,
                    "{} {vm}: {} desired={} owner={} local={} v={} | {}",
                    node,
                    sh.state,
                    rec.desired,
                    rec.owner.as_deref().unwrap_or("-"),
                    sh.local_role.map_or("-".to_string(), |r| r.to_string()),
                    rec.version,
                    sh.reason
                );
            }
        }
    }

    fn compare(mut self, name: &str) {
        self.table();
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(format!("{name}.expect"));
        if std::env::var_os("TWINRUN_BLESS").is_some() {
            std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
            std::fs::write(&path, &self.log).expect("write golden");
            return;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with TWINRUN_BLESS=1 to create it)\n{}",
                path.display(),
                self.log
            )
        });
        if want != self.log {
            let first = want
                .lines()
                .zip(self.log.lines())
                .position(|(a, b)| a != b)
                .unwrap_or(want.lines().count().min(self.log.lines().count()));
            panic!(
                "{name}: log differs from {} at line {}:\n  want: {:?}\n  got:  {:?}\nfull log:\n{}",
                path.display(),
                first + 1,
                want.lines().nth(first),
                self.log.lines().nth(first),
                self.log
            );
        }
    }
}

fn same_report(c: &Cluster, r: &BTreeMap<String, PeerVmm>) -> bool {
    c.peer_report() == r
}

fn fmt_input(i: &Input) -> String {
    match i {
        Input::Record(r) => format!(
            "Record {} v={} desired={} owner={}{}",
            r.spec.name,
            r.version,
            r.desired,
            r.owner.as_deref().unwrap_or("-"),
            if r.deleted { " deleted" } else { "" }
        ),
        Input::Command { id, vm, cmd } => format!("Command {id} {vm} {}", cmd.name()),
        Input::NodeCommand { id, node, cmd } => format!("NodeCommand {id} {node} {}", cmd.name()),
        Input::NodeRecord(r) => format!(
            "NodeRecord {} v={} maintenance={}",
            r.name, r.version, r.maintenance
        ),
        Input::PeerReport(r) => format!("PeerReport {}", r.len()),
        other => format!("{other:?}"),
    }
}

fn fmt_action(a: &Action) -> String {
    match a {
        Action::Spawn { role, record } => format!("Spawn {} {role}", record.spec.name),
        Action::Persist(r) => format!(
            "Persist {} v={} desired={} owner={}{}",
            r.spec.name,
            r.version,
            r.desired,
            r.owner.as_deref().unwrap_or("-"),
            if r.deleted { " deleted" } else { "" }
        ),
        Action::Log { vm, msg } => format!("Log [{}] {msg}", vm.as_deref().unwrap_or("-")),
        Action::PersistNode(r) => format!(
            "PersistNode {} v={} maintenance={} shut_down={:?} | {}",
            r.name, r.version, r.maintenance, r.shut_down, r.reason
        ),
        Action::Done { vm, done } => format!(
            "Done {vm} of {} restart={} failback={} clear={}{}",
            done.created,
            done.restart,
            done.failback,
            done.clear,
            if done.demoted { " demoted" } else { "" }
        ),
        Action::Reply { id, result, .. } => match result {
            Ok(m) => format!("Reply {id} ok: {m}"),
            Err(e) => format!("Reply {id} error: {e}"),
        },
        other => format!("{other:?}"),
    }
}

/// Both nodes booted and connected, one VM of each level created and started.
fn cluster_with_vms() -> Sim {
    let mut s = Sim::new();
    s.note("both nodes boot, link up");
    s.link = true;
    s.boot(0);
    s.boot(1);
    s.note("create and start an FT, an HA and an unprotected VM, all preferring pm1");
    s.command(
        0,
        "c1",
        "ft1",
        Command::Create(spec("ft1", Protection::Ft, "pm1", Failback::Auto, true)),
    );
    s.command(
        0,
        "c2",
        "un1",
        Command::Create(spec(
            "un1",
            Protection::Unprotected,
            "pm1",
            Failback::Manual,
            true,
        )),
    );
    s.command(
        0,
        "c3",
        "ha1",
        Command::Create(spec("ha1", Protection::Ha, "pm1", Failback::Manual, false)),
    );
    for (id, vm) in [("c4", "ft1"), ("c5", "un1"), ("c6", "ha1")] {
        s.command(0, id, vm, Command::Start);
    }
    s.wait(100);
    s
}

#[test]
fn golden_node_loss() {
    let mut s = cluster_with_vms();
    s.note("pm1 dies with its VMMs");
    s.crash_node(0);
    s.wait(100);
    s.compare("node_loss");
}

#[test]
fn golden_ft_primary_vmm_crash() {
    // pm1 lives, its FT and HA primary VMMs crash: each standby on pm2 sees its
    // A-Links drop and takes over, and pm2 sees the takeover before pm1's report that
    // the primary ended (that report still shows it protected): no split brain, pm2's
    // copy goes on, pm1 runs the standby.
    let mut s = cluster_with_vms();
    s.note("pm1's FT primary VMM crashes (exit 3); pm2's standby takes over");
    s.crash_vmm(0, "ft1");
    s.note("pm1's HA primary VMM crashes (exit 3); pm2's standby boots it");
    s.crash_vmm(0, "ha1");
    s.wait(100);
    s.wait(5000);
    for vm in ["ft1", "ha1"] {
        let c = s.nodes[1].cluster.as_ref().expect("pm2 up");
        let owner = c.record(vm).and_then(|r| r.owner.clone());
        assert!(owner.is_some(), "{vm} has an owner\n{}", s.log);
    }
    let c = s.nodes[1].cluster.as_ref().expect("pm2 up");
    assert_eq!(
        c.record("ha1").and_then(|r| r.owner.clone()).as_deref(),
        Some("pm2"),
        "HA stays on the survivor"
    );
    assert_eq!(s.nodes[1].vmms.get("ha1").map(|v| v.0), Some(Role::Primary));
    assert_eq!(s.nodes[0].vmms.get("ha1").map(|v| v.0), Some(Role::Standby));
    assert!(!s.log.contains("split brain"), "{}", s.log);
    s.compare("ft_primary_vmm_crash");
}

#[test]
fn golden_owner_with_an_orphan_standby() {
    // The preferred node comes back holding a standby VMM whose primary ended while
    // its daemon was down, and places the VM on itself: there is nothing for that
    // standby to take over from. After the takeover wait it stops, and the primary
    // starts there (it used to wait for ever).
    let mut s = Sim::new();
    s.note("both nodes boot, link up; an FT VM preferring pm1, failback manual");
    s.link = true;
    s.boot(0);
    s.boot(1);
    let ft = spec("ft1", Protection::Ft, "pm1", Failback::Manual, true);
    s.command(0, "c1", "ft1", Command::Create(ft));
    s.command(0, "c2", "ft1", Command::Start);
    s.wait(100);
    s.note("pm1 dies and comes back: the VM runs on pm2, the standby on pm1");
    s.crash_node(0);
    s.wait(1000);
    s.boot(0);
    s.wait(100);
    s.note("pm1's daemon dies (its standby VMM lives on); pm2 shuts the VM down");
    s.kill_daemon(0);
    s.command(1, "c3", "ft1", Command::Shutdown);
    s.note("pm2's daemon restarts and the VM is started again within its boot grace");
    s.kill_daemon(1);
    s.boot(1);
    s.command(1, "c4", "ft1", Command::Start);
    s.note("pm1's daemon returns with the old standby and places the VM on itself");
    s.boot(0);
    s.wait(1000);
    s.wait(3000);
    s.wait(100);
    let c = s.nodes[0].cluster.as_ref().expect("pm1 up");
    assert_eq!(
        c.record("ft1").and_then(|r| r.owner.clone()).as_deref(),
        Some("pm1"),
        "{}",
        s.log
    );
    assert_eq!(s.nodes[0].vmms.get("ft1").map(|v| v.0), Some(Role::Primary));
    assert_eq!(s.nodes[1].vmms.get("ft1").map(|v| v.0), Some(Role::Standby));
    s.compare("owner_orphan_standby");
}

#[test]
fn golden_node_return_failback() {
    let mut s = cluster_with_vms();
    s.note("pm1 dies with its VMMs, then comes back");
    s.crash_node(0);
    s.wait(1000);
    s.boot(0);
    s.wait(100);
    s.note("the operator asks for failback (FT: planned role swap)");
    s.command(1, "c7", "ft1", Command::Failback);
    s.wait(100);
    s.compare("node_return");
}

#[test]
fn golden_ft_manual_failback_by_swap() {
    let mut s = Sim::new();
    s.note("both nodes boot, link up; an FT VM preferring pm1, failback manual");
    s.link = true;
    s.boot(0);
    s.boot(1);
    let ft = spec("ft1", Protection::Ft, "pm1", Failback::Manual, true);
    s.command(0, "c1", "ft1", Command::Create(ft));
    s.command(0, "c2", "ft1", Command::Start);
    s.wait(100);
    s.note("pm1 dies with its VMMs: pm2's standby takes over");
    s.crash_node(0);
    s.wait(1000);
    s.note("pm1 comes back and runs the standby: failback is manual, the VM stays on pm2");
    s.boot(0);
    s.wait(100);
    s.note("the operator asks for failback: a planned role swap makes pm1 the primary");
    s.command(1, "c3", "ft1", Command::Failback);
    s.wait(100);
    s.note("asked again: nothing to do");
    s.command(0, "c4", "ft1", Command::Failback);
    s.wait(100);
    s.compare("ft_manual_failback");
}

#[test]
fn golden_both_start_at_once() {
    let mut s = Sim::new();
    s.note("records exist on both nodes from before (a whole-cluster restart)");
    let mut ft = spec("ft1", Protection::Ft, "pm2", Failback::Auto, true);
    ft.autostart = true;
    let rec = VmRecord {
        spec: ft,
        desired: Desired::Running,
        owner: None,
        slot: 0,
        restart_seq: 0,
        failback_seq: 0,
        clear_seq: 0,
        deleted: false,
        stopped_because: None,
        migrate_to: None,
        created: Version::default(),
        version: Version {
            clock: 4,
            node: "pm1".into(),
        },
    };
    for n in &mut s.nodes {
        n.store.insert("ft1".into(), rec.clone());
    }
    s.note("both daemons boot before the link is up; neither starts it alone in the grace");
    s.boot(0);
    s.boot(1);
    s.wait(1000);
    s.note("the link comes up: the preferred node pm2 takes it, pm1 runs the standby");
    s.set_link(true);
    s.wait(100);
    s.compare("both_start");
}

#[test]
fn golden_command_twice() {
    let mut s = cluster_with_vms();
    s.note("the same restart command arrives twice (a client retry), and on the other node");
    s.command(0, "r1", "un1", Command::Restart);
    s.command(0, "r1", "un1", Command::Restart);
    s.command(1, "r1", "un1", Command::Restart);
    s.wait(100);
    s.note("a create that conflicts, an unknown VM, a delete of a running VM");
    s.command(
        1,
        "x1",
        "un1",
        Command::Create(spec(
            "un1",
            Protection::Unprotected,
            "pm1",
            Failback::Manual,
            true,
        )),
    );
    s.command(1, "x2", "nope", Command::Start);
    s.command(1, "x3", "un1", Command::Delete);
    s.compare("command_twice");
}

#[test]
fn golden_change_while_peer_away() {
    let mut s = cluster_with_vms();
    s.note("the link is cut; each side changes un1 while they cannot talk");
    s.set_link(false);
    s.wait(100);
    s.command(
        0,
        "p1",
        "un1",
        Command::Set(VmSettings {
            autostart: Some(false),
            ..Default::default()
        }),
    );
    s.command(1, "p2", "ha1", Command::Shutdown);
    s.command(
        1,
        "p3",
        "un1",
        Command::Set(VmSettings {
            failback: Some(Failback::Auto),
            ..Default::default()
        }),
    );
    s.note("the link returns: both converge on the same records");
    s.set_link(true);
    s.wait(100);
    let a = &s.nodes[0].store;
    let b = &s.nodes[1].store;
    assert_eq!(a, b, "stores converge");
    s.compare("change_while_away");
}

#[test]
fn golden_quorum_alone_denied_granted_lost() {
    let mut s = Sim::new();
    s.note("pm1 boots alone (pm2 is off); the witness does not answer at first");
    s.quorum_grants = false;
    s.boot(0);
    s.command(
        0,
        "c1",
        "un1",
        Command::Create(spec(
            "un1",
            Protection::Unprotected,
            "pm1",
            Failback::Manual,
            true,
        )),
    );
    s.command(
        0,
        "c2",
        "ft1",
        Command::Create(spec("ft1", Protection::Ft, "pm1", Failback::Manual, true)),
    );
    s.command(0, "c3", "un1", Command::Start);
    s.command(0, "c4", "ft1", Command::Start);
    s.note("after the boot grace: asked, refused, asked again 2 s later, then granted");
    s.wait(policy().boot_grace_ms);
    s.wait(1000);
    s.quorum_grants = true;
    s.wait(1000);
    s.wait(100);
    s.note("the renewals of the daemon's keys stop being granted (witness gone)");
    for vm in ["un1", "ft1"] {
        s.queue.push_back((
            0,
            Input::QuorumLost {
                vm: vm.into(),
                reason: "the permission to run it alone ended".into(),
            },
        ));
    }
    s.settle();
    s.note("un1 (the daemon's own copy) is stopped and asks again; ft1's VMM keeps its own quorum");
    s.wait(100);
    s.compare("quorum_alone");
}

#[test]
fn golden_crash_restart_policy_and_daemon_restart() {
    let mut s = cluster_with_vms();
    s.note("un1's VMM crashes three times: two restarts, then held in error");
    for _ in 0..3 {
        s.crash_vmm(0, "un1");
        s.wait(100);
    }
    s.note("the operator starts it again: error cleared");
    s.command(1, "s1", "un1", Command::Start);
    s.wait(100);
    s.note("pm1's daemon is killed and restarted: its VMMs are adopted, nothing restarts");
    s.kill_daemon(0);
    s.wait(500);
    s.boot(0);
    s.wait(100);
    s.compare("crash_and_adopt");
}

#[test]
fn golden_demoted_primary_becomes_the_standby() {
    let mut s = cluster_with_vms();
    s.note("every link between pm1 and pm2 is cut, both alive; pm1's primary loses its standby");
    s.set_link(false);
    s.unprotect(0, "ft1");
    s.note("pm2's standby takes over with the quorum's grant; its daemon owns the record");
    s.fail_over(1, "ft1");
    s.wait(100);
    s.note("pm1's primary learns the higher generation: exit 5; pm1 runs the standby, no restart charged");
    s.demote(0, "ft1");
    s.wait(100);
    let shown = s.nodes[0]
        .cluster
        .as_ref()
        .and_then(|c| c.shown("ft1"))
        .expect("ft1 shown on pm1");
    assert_eq!(shown.local_role, Some(Role::Standby), "{}", s.log);
    assert_eq!(shown.restarts, 0, "a demotion is not a crash\n{}", s.log);
    assert!(
        shown.reason.contains("demoted by the quorum"),
        "{}",
        shown.reason
    );
    s.note(
        "the links return: pm2's record (owner pm2) reaches pm1, whose standby protects it again; \
         in sync, the automatic failback swaps the roles: pm1 (preferred) is the primary again",
    );
    s.set_link(true);
    s.wait(100);
    assert!(
        s.log.contains("pm1 <- VmmSwappedIn { vm: \"ft1\" }"),
        "pm1's standby protected it before the failback\n{}",
        s.log
    );
    let shown = s.nodes[0]
        .cluster
        .as_ref()
        .and_then(|c| c.shown("ft1"))
        .expect("ft1 shown on pm1");
    assert_eq!(shown.local_role, Some(Role::Primary), "{}", s.log);
    assert_eq!(
        s.nodes[0].store["ft1"].owner.as_deref(),
        Some("pm1"),
        "{}",
        s.log
    );
    s.compare("demoted_primary");
}

#[test]
fn golden_demoted_primary_survives_a_daemon_restart() {
    let mut s = cluster_with_vms();
    s.note("every link between pm1 and pm2 is cut, both alive; pm2's standby takes over");
    s.set_link(false);
    s.unprotect(0, "ft1");
    s.fail_over(1, "ft1");
    s.wait(100);
    s.note("pm1's primary is demoted (exit 5); pm1 records it and runs the standby");
    s.demote(0, "ft1");
    s.wait(100);
    assert!(s.nodes[0].done["ft1"].demoted, "{}", s.log);
    s.note(
        "pm1's daemon restarts (its standby dies with the node's VMMs) before pm2's record arrives",
    );
    s.kill_daemon(0);
    s.nodes[0].vmms.clear();
    s.boot(0);
    s.wait(100);
    let shown = s.nodes[0]
        .cluster
        .as_ref()
        .and_then(|c| c.shown("ft1"))
        .expect("ft1 shown on pm1");
    assert_eq!(
        shown.local_role,
        Some(Role::Standby),
        "a restarted daemon must not start the demoted primary again\n{}",
        s.log
    );
    assert_eq!(
        s.nodes[0].store["ft1"].owner.as_deref(),
        Some("pm1"),
        "the record here still names pm1: only the recorded demotion keeps it standby\n{}",
        s.log
    );
    s.note(
        "the links return: pm2's record reaches pm1; the demotion mark is cleared; in sync, \
         the automatic failback swaps the roles (pm1 preferred)",
    );
    s.set_link(true);
    s.wait(100);
    assert!(!s.nodes[0].done["ft1"].demoted, "{}", s.log);
    // The standby the restarted daemon started protected the VM before any failback.
    assert!(
        s.log.contains("pm1 <- VmmSwappedIn { vm: \"ft1\" }"),
        "pm1's standby protected it before the failback\n{}",
        s.log
    );
    let shown = s.nodes[0]
        .cluster
        .as_ref()
        .and_then(|c| c.shown("ft1"))
        .expect("ft1 shown on pm1");
    assert_eq!(shown.local_role, Some(Role::Primary), "{}", s.log);
    s.compare("demoted_primary_daemon_restart");
}

#[test]
fn golden_node_return_without_autostart() {
    let mut s = Sim::new();
    s.link = true;
    s.boot(0);
    s.boot(1);
    s.note("an unprotected VM without autostart runs on pm1");
    s.command(
        0,
        "c1",
        "un2",
        Command::Create(spec(
            "un2",
            Protection::Unprotected,
            "pm1",
            Failback::Manual,
            false,
        )),
    );
    s.command(0, "c2", "un2", Command::Start);
    s.note("pm1 dies and comes back: un2 stays stopped, and says why");
    s.crash_node(0);
    s.wait(100);
    s.boot(0);
    s.wait(100);
    s.compare("node_return_no_autostart");
}

impl Sim {
    /// A node that knows it is in maintenance runs no VMM but the source of a live
    /// migration off it (an unprotected VM it owns, `migrate_to` the other node).
    fn check_maintenance(&self, seed: u64) {
        for (i, name) in NODES.iter().enumerate() {
            let Some(c) = self.nodes[i].cluster.as_ref() else {
                continue;
            };
            if !c.in_maintenance(name) {
                continue;
            }
            for vm in self.nodes[i].vmms.keys() {
                let migrating = c.record(vm).is_some_and(|r| {
                    r.spec.protection == Protection::Unprotected
                        && r.owner.as_deref() == Some(*name)
                        && r.migrate_to.is_some()
                });
                assert!(
                    migrating,
                    "seed {seed}: {name} is in maintenance but runs a VMM of {vm}\n{}",
                    self.log
                );
            }
        }
    }

    /// Cross-node invariants, checked whenever the simulation is settled.
    fn check_cluster(&self, seed: u64) {
        if !self.connected() {
            return;
        }
        assert_eq!(
            self.nodes[0].store, self.nodes[1].store,
            "seed {seed}: connected nodes hold different records\n{}",
            self.log
        );
        let names: Vec<&String> = self.nodes[0].store.keys().collect();
        for vm in names {
            let active = (0..2)
                .filter(|&i| {
                    self.nodes[i]
                        .vmms
                        .get(vm)
                        .is_some_and(|(r, _, _)| matches!(r, Role::Solo | Role::Primary))
                })
                .count();
            assert!(
                active <= 1,
                "seed {seed}: {vm} runs an active copy on both nodes\n{}",
                self.log
            );
            let rec = &self.nodes[0].store[vm];
            if rec.deleted || rec.desired != Desired::Running {
                for (n, name) in self.nodes.iter().zip(NODES) {
                    assert!(
                        !n.vmms.contains_key(vm),
                        "seed {seed}: {vm} is not wanted running but has a VMM on {name}\n{}",
                        self.log
                    );
                }
            }
        }
    }
}

/// Random runs of commands, crashes, cut links, daemon kills and node deaths: the step
/// function's own invariants (`Cluster::check`, after every step) and the cluster's
/// (`check_cluster`) hold for every seed. A failing seed is printed with its log; keep
/// it as a regression case in `REGRESSION_SEEDS`.
#[test]
fn seeded_random_runs_keep_the_invariants() {
    // Failing seeds go here. The bugs found so far (split-brain ownership ping-pong, a
    // local write over an unseen newer record, counters undone by a merge, counters of
    // a re-created VM, resurrected tombstones, a VMM of the old level, a running VM
    // with no owner, unresolved slot clashes) were found with an earlier generator
    // whose seeds do not replay with the lab's; 20,000 seeds of this one pass.
    // 23122, 55451: the owner held only a standby left from before (its primary ended
    // while the node was away) and waited for ever for it to take over
    // (`orphan_standby_since` in the step function).
    const REGRESSION_SEEDS: [u64; 2] = [23122, 55451];
    run_seeds(seed_range().chain(REGRESSION_SEEDS), |seed, verbose| {
        random_run(seed, verbose)
    });
}

/// Runs `run(seed, false)` for every seed; if any fail, runs the first failing one
/// again verbosely (its history up to the panic) and fails naming them all.
fn run_seeds(
    seeds: impl Iterator<Item = u64>,
    run: impl Fn(u64, bool) + std::panic::RefUnwindSafe,
) {
    let failed: Vec<u64> = seeds
        .filter(|&seed| std::panic::catch_unwind(|| run(seed, false)).is_err())
        .collect();
    if let Some(&first) = failed.first() {
        let again = std::panic::catch_unwind(|| run(first, true));
        panic!(
            "seeds {failed:?} fail (the history of {first} above; keep them in REGRESSION_SEEDS): {:?}",
            again.err().map(|_| "panicked again")
        );
    }
}

/// The same random runs with `workon` / `finalize` of either node among the events
/// (a separate generator, so the seeds above replay as they did): every rule of
/// maintenance mode, the live migration of unprotected VMs off a node in maintenance
/// and its fallback to a clean shutdown included, keeps the invariants; a node in
/// maintenance runs no VMM but the source of such a migration.
#[test]
fn seeded_random_runs_with_maintenance_keep_the_invariants() {
    // 2152, 4720: a crashed FT primary VMM whose standby's takeover the simulation
    // did not model (2152: pm1, made owner by workon pm2, waited for ever for its
    // standby to take over). 2209, with the takeover modelled: a primary restarted
    // while the peer's daemon was away, and the standby that took over there, wrote
    // their nodes owner in turn for ever (`took_over_pid` in the step function).
    // 16922, 19720: a standby took over from a swapped-in standby whose report still
    // showed it protected: taken for a split brain (`report_lags`). 35041, 40509,
    // 49022, 49296: the owner's orphan standby, as 23122 above.
    const REGRESSION_SEEDS: [u64; 9] = [2152, 2209, 4720, 16922, 19720, 35041, 40509, 49022, 49296];
    run_seeds(seed_range().chain(REGRESSION_SEEDS), |seed, verbose| {
        random_run_with(seed, verbose, true)
    });
}

/// The seeds of a random-run test: 1 to 2,000, or to search further by hand
/// `TWINRUN_SIM_FIRST_SEED` (default 1) and `TWINRUN_SIM_SEEDS` (how many, default
/// 2,000).
fn seed_range() -> std::ops::Range<u64> {
    let var = |name: &str, default: u64| -> u64 {
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    };
    let first = var("TWINRUN_SIM_FIRST_SEED", 1);
    first..first + var("TWINRUN_SIM_SEEDS", 2000)
}

fn random_run(seed: u64, verbose: bool) {
    random_run_with(seed, verbose, false)
}

fn random_run_with(seed: u64, verbose: bool, maintenance: bool) {
    let vms = ["a", "b", "c"];
    let levels = [Protection::Unprotected, Protection::Ft, Protection::Ha];
    {
        let mut rng = Rng::new(seed);
        let mut s = Sim::new();
        s.verbose = verbose;
        s.takeover_on_stop = maintenance;
        s.link = true;
        s.boot(0);
        s.boot(1);
        let mut next_id = 0u32;
        for _ in 0..80 {
            let n = rng.below(2) as usize;
            let vm = vms[rng.below(3) as usize];
            match rng.below(14) {
                0..=5 => {
                    if s.up(n) {
                        next_id += 1;
                        let id = format!("c{next_id}");
                        let cmd = match rng.below(9) {
                            0 => Command::Create(spec(
                                vm,
                                levels[rng.below(3) as usize],
                                NODES[rng.below(2) as usize],
                                if rng.below(2) == 0 {
                                    Failback::Auto
                                } else {
                                    Failback::Manual
                                },
                                rng.below(2) == 0,
                            )),
                            1 | 2 => Command::Start,
                            3 => Command::Shutdown,
                            4 => Command::PowerOff,
                            5 => Command::Restart,
                            6 => Command::Delete,
                            7 => Command::Migrate(None),
                            _ => Command::Failback,
                        };
                        s.command(n, &id, vm, cmd);
                    }
                }
                6 => s.crash_vmm(n, vm),
                7 => {
                    let up = !s.link;
                    s.set_link(up);
                }
                8 => {
                    if s.up(n) {
                        s.kill_daemon(n);
                    } else {
                        s.boot(n);
                    }
                }
                9 => {
                    if s.up(n) && s.up(1 - n) {
                        s.crash_node(n);
                    } else if !s.up(n) {
                        s.boot(n);
                    }
                }
                10 if maintenance => {
                    if s.up(n) {
                        next_id += 1;
                        let id = format!("n{next_id}");
                        let node = NODES[rng.below(2) as usize];
                        let cmd = if rng.below(2) == 0 {
                            NodeCommand::WorkOn
                        } else {
                            NodeCommand::Finalize
                        };
                        s.node_command(n, &id, node, cmd);
                    }
                }
                _ => s.wait(rng.below(3000) + 1),
            }
            s.check_cluster(seed);
            if maintenance {
                s.check_maintenance(seed);
            }
        }
        // Heal everything: both up, linked; the records converge.
        for i in 0..2 {
            if !s.up(i) {
                s.boot(i);
            }
        }
        s.set_link(true);
        s.wait(10_000);
        if maintenance {
            // Out of maintenance, so that every VM may run again.
            for node in NODES {
                next_id += 1;
                s.node_command(0, &format!("n{next_id}"), node, NodeCommand::Finalize);
            }
        }
        s.wait(10_000);
        s.check_cluster(seed);
        // Liveness: healed and quiet, every VM wanted running runs (or is held in
        // error, which the operator clears).
        for (vm, rec) in &s.nodes[0].store {
            if rec.deleted || rec.desired != Desired::Running {
                continue;
            }
            let held = (0..2).any(|i| {
                s.nodes[i]
                    .cluster
                    .as_ref()
                    .and_then(|c| c.shown(vm))
                    .is_some_and(|sh| sh.held.is_some())
            });
            let active = (0..2).any(|i| {
                s.nodes[i]
                    .vmms
                    .get(vm)
                    .is_some_and(|(r, _, _)| matches!(r, Role::Solo | Role::Primary))
            });
            let why: Vec<String> = (0..2)
                .filter_map(|i| s.nodes[i].cluster.as_ref()?.shown(vm))
                .map(|sh| format!("{}: {}", sh.state, sh.reason))
                .collect();
            assert!(
                held || active,
                "seed {seed}: {vm} is wanted running but runs nowhere: {why:?}\n{}",
                s.log
            );
        }
    }
}
