//! The daemon's core: the step function, the store and the supervisor behind one lock,
//! and the edges that feed the step function (API commands, the peer channel, VMM
//! events, quorum answers) and carry out its actions.
//!
//! Every input goes through [`Core::feed`], which steps, executes the actions (each may
//! produce further inputs, e.g. a spawn produces `VmmRunning`) until nothing is left.
//! The lock is a std mutex held for one feed, never across an await.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use log::{info, warn};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::cluster::NodeCommand;
use crate::cluster::{
    Action, Cluster, CmdError, CmdOk, Command, Input, PeerState, PeerVmm, Policy,
};
use crate::config::NodeConfig;
use crate::gate::{QuorumGate, QuorumRequest};
use crate::model::{
    NodeRecord, NodeState, NodeView, Protection, Role, VmRecord, VmView, VmmInfo,
    NODE_RECORD_PREFIX,
};
use crate::peer::wire::Msg;
use crate::peer::{Outbox, Replica};
use crate::store::{CommandRecord, Event, Store};
use crate::supervisor::{Supervisor, VmmEvent};

/// Answer to a command that was done, as the API returns it (a refused command gets an
/// [`crate::api::ApiError`] with its `command_id`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CommandResponse {
    /// The command's id (the client's `X-Command-Id`, or one made up): sending the same
    /// id again returns this answer and runs nothing.
    pub command_id: String,
    pub vm: String,
    pub op: String,
    pub message: String,
    /// True when this answer is the one given the first time the id was seen.
    pub replayed: bool,
}

/// A command's HTTP status and JSON body (a [`CommandResponse`] or an
/// [`crate::api::ApiError`]).
#[derive(Clone, Debug, PartialEq)]
pub struct CommandOutcome {
    pub status: u16,
    pub body: serde_json::Value,
}

#[derive(Clone, Debug)]
struct PeerInfo {
    state: NodeState,
    protocol: Option<u32>,
    reason: String,
    last_seen: Option<Instant>,
}

struct Inner {
    store: Store,
    cluster: Cluster,
    sup: Supervisor,
    peer: PeerInfo,
    last_report: String,
    /// Replies produced by the current feed, by command id.
    replies: BTreeMap<String, (String, Result<CmdOk, CmdError>)>,
    /// The pre-copy of each local FT primary's current session (live migration's
    /// progress), from its log.
    precopy: BTreeMap<String, PreCopy>,
}

/// A pre-copy as the log shows it: rounds as they were sent (ms since the daemon's
/// start), and whether the target is in sync.
#[derive(Clone, Debug, Default)]
struct PreCopy {
    /// (round, pages, time sent in ms)
    rounds: Vec<(u32, u64, u64)>,
    in_sync: bool,
}

pub struct Core {
    pub cfg: NodeConfig,
    inner: Mutex<Inner>,
    outbox: Outbox,
    gate: Arc<dyn QuorumGate>,
    epoch: Instant,
    me: Weak<Core>,
}

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Setup(String),
}

impl Core {
    /// Opens the store, adopts running VMMs and builds the step function (not yet
    /// booted: [`Core::boot`] once the API and the channel are up).
    pub fn open(
        cfg: NodeConfig,
        gate: Arc<dyn QuorumGate>,
        twinrun_bin: PathBuf,
        outbox: Outbox,
    ) -> Result<Arc<Core>, CoreError> {
        for d in [&cfg.state_dir, &cfg.run_dir] {
            std::fs::create_dir_all(d)
                .map_err(|e| CoreError::Setup(format!("cannot create {}: {e}", d.display())))?;
        }
        if let Some(text) = cfg.quorum_file_text() {
            // The VMMs' `--quorum-config`: written before any VMM is spawned.
            let path = cfg.quorum_file();
            let tmp = path.with_extension("toml.tmp");
            std::fs::write(&tmp, text)
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| CoreError::Setup(format!("cannot write {}: {e}", path.display())))?;
        }
        let store = Store::open(&cfg.db_path())?;
        let records = store.all()?;
        let done = store.done()?;
        let clock = store.clock()?;
        let policy = Policy {
            max_restart: cfg.supervision.max_restart,
            restart_window_ms: cfg.supervision.restart_window_s * 1000,
            boot_grace_ms: cfg.supervision.boot_grace_ms,
            takeover_wait_ms: 5_000,
        };
        let mut cluster = Cluster::new(&cfg.node, &cfg.peer.name, policy, records, done, clock);
        cluster.load_nodes(store.nodes()?);
        let mut sup = Supervisor::new(cfg.clone(), twinrun_bin);
        let adopted = sup.adopt_all();
        let core = Arc::new_cyclic(|me| Core {
            cfg,
            inner: Mutex::new(Inner {
                store,
                cluster,
                sup,
                peer: PeerInfo {
                    state: NodeState::Unknown,
                    protocol: None,
                    reason: "not connected yet since this daemon started".into(),
                    last_seen: None,
                },
                last_report: String::new(),
                replies: BTreeMap::new(),
                precopy: BTreeMap::new(),
            }),
            outbox,
            gate,
            epoch: Instant::now(),
            me: me.clone(),
        });
        let weak = core.me.clone();
        core.gate.on_lost(Box::new(move |vm: &str, reason: String| {
            if let Some(core) = weak.upgrade() {
                core.feed(vec![Input::QuorumLost {
                    vm: vm.to_string(),
                    reason,
                }]);
            }
        }));
        let mut inputs = Vec::new();
        for (vm, role, pid, level) in adopted {
            inputs.push(Input::VmmRunning {
                vm: vm.clone(),
                role,
                pid,
                adopted: true,
            });
            if let Some(level) = level {
                inputs.push(Input::VmmAdoptedLevel { vm, level });
            }
        }
        core.feed(inputs);
        Ok(core)
    }

    pub fn boot(&self) {
        self.feed(vec![Input::Boot]);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock is a bug the step function's invariants
        // caught; the daemon exits (systemd restarts it) rather than go on.
        match self.inner.lock() {
            Ok(g) => g,
            Err(_) => {
                log::error!("internal state poisoned by an earlier panic; exiting");
                std::process::exit(70);
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn uses_scopes(&self) -> bool {
        self.lock().sup.uses_scopes()
    }

    /// Steps every input and carries out the actions, until nothing is left.
    pub fn feed(&self, inputs: Vec<Input>) {
        let mut g = self.lock();
        self.feed_locked(&mut g, inputs);
    }

    fn feed_locked(&self, g: &mut Inner, inputs: Vec<Input>) {
        let mut queue: VecDeque<Input> = inputs.into();
        let mut budget = 10_000u32;
        while let Some(input) = queue.pop_front() {
            budget -= 1;
            if budget == 0 {
                warn!("step loop did not settle; dropping the rest");
                break;
            }
            let actions = g.cluster.step(self.now_ms(), input);
            for a in actions {
                self.execute(g, a, &mut queue);
            }
        }
        // Tell the peer when our VMMs changed.
        let report = serde_json::to_string(&g.cluster.report()).unwrap_or_default();
        if report != g.last_report {
            g.last_report = report.clone();
            self.outbox.send(Msg::Report(report));
        }
    }

    fn execute(&self, g: &mut Inner, a: Action, queue: &mut VecDeque<Input>) {
        match a {
            Action::Spawn { role, record } => {
                let vm = record.spec.name.clone();
                match g.sup.spawn(&record, role) {
                    Ok(pid) => queue.push_back(Input::VmmRunning {
                        vm,
                        role,
                        pid,
                        adopted: false,
                    }),
                    Err(error) => {
                        // No copy here: a grant to run it alone is given up.
                        self.gate.release(&vm);
                        queue.push_back(Input::VmmSpawnFailed { vm, error });
                    }
                }
            }
            Action::Stop { vm, force } => g.sup.stop(&vm, force),
            Action::Persist(rec) => {
                if let Err(e) = g
                    .store
                    .put(&rec)
                    .and_then(|()| g.store.observe(rec.version.clock))
                {
                    warn!("{}: cannot write its record: {e}", rec.spec.name);
                }
                if let Ok(j) = serde_json::to_string(&rec) {
                    self.outbox.send(Msg::Records(vec![j]));
                }
            }
            Action::Done { vm, done } => {
                if let Err(e) = g.store.put_done(&vm, &done) {
                    warn!("{vm}: {e}");
                }
            }
            Action::Reply { id, vm, result } => {
                g.replies.insert(id.clone(), (vm, result));
            }
            Action::AskQuorum { vm, kind } => {
                let req = QuorumRequest {
                    cluster: self.cfg.cluster.clone(),
                    node: self.cfg.node.clone(),
                    peer: self.cfg.peer.name.clone(),
                    vm: vm.clone(),
                    kind,
                    peer_silent_for: g.peer.last_seen.map(|t| t.elapsed()),
                };
                let gate = self.gate.clone();
                let me = self.me.clone();
                // The gate may block on the network: its own thread, answer fed back.
                let spawned = std::thread::Builder::new()
                    .name(format!("quorum-{vm}"))
                    .spawn(move || {
                        let v = gate.decide(&req);
                        if let Some(core) = me.upgrade() {
                            core.feed(vec![Input::Quorum {
                                vm: req.vm,
                                kind: req.kind,
                                granted: v.granted,
                                reason: v.reason,
                            }]);
                        }
                    });
                if let Err(e) = spawned {
                    queue.push_back(Input::Quorum {
                        vm,
                        kind,
                        granted: false,
                        reason: format!("cannot ask the quorum: {e}"),
                    });
                }
            }
            Action::SwapRoles { vm } => {
                // The swap blocks until the standby took over (seconds at most): its own
                // thread. Success shows in the VMMs' logs (swapped out here, a takeover
                // on the peer); only a failure is fed back.
                let sock = self.cfg.vmm_run_dir().join(format!("{vm}.sock"));
                let me = self.me.clone();
                let name = vm.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("swap-{vm}"))
                    .spawn(move || match twinrun_control::swap(&sock) {
                        Ok((epoch, paused_us)) => info!(
                            "{name}: role swap done at checkpoint {epoch} (guest paused {paused_us} us)"
                        ),
                        Err(error) => {
                            if let Some(core) = me.upgrade() {
                                core.feed(vec![Input::SwapFailed { vm: name, error }]);
                            }
                        }
                    });
                if let Err(e) = spawned {
                    queue.push_back(Input::SwapFailed {
                        vm,
                        error: format!("cannot start the swap: {e}"),
                    });
                }
            }
            Action::SetLevel { vm, to } => {
                let change = match g.cluster.record(&vm) {
                    Some(rec) => crate::supervisor::argv::level_change(&self.cfg, rec, to),
                    None => Err("the VM has no record".into()),
                };
                self.set_level(vm, to, change, queue)
            }
            Action::RemoveFiles { vm } => g.sup.remove_files(&vm),
            Action::PersistNode(rec) => {
                if let Err(e) = g.store.put_node(&rec) {
                    warn!("node {}: cannot write its record: {e}", rec.name);
                }
                if let Ok(j) = serde_json::to_string(&rec) {
                    self.outbox.send(Msg::Records(vec![j]));
                }
            }
            Action::Log { vm, msg } => {
                match &vm {
                    Some(v) => info!("{v}: {msg}"),
                    None => info!("{msg}"),
                }
                if let Err(e) = g.store.log_event(vm.as_deref(), &msg) {
                    warn!("event log: {e}");
                }
            }
        }
    }

    /// An online level change of our VMM (`SetLevel` on its control socket): it may
    /// take seconds (FT -> unprotected waits for the quorum), so on its own thread;
    /// the answer is fed back, and on success the VMM's pid file gets its new role
    /// first (a daemon restarted after it adopts the VMM at the new level).
    fn set_level(
        &self,
        vm: String,
        to: Protection,
        change: Result<twinrun_control::LevelChange, String>,
        queue: &mut VecDeque<Input>,
    ) {
        let sock = self.cfg.vmm_run_dir().join(format!("{vm}.sock"));
        let me = self.me.clone();
        let name = vm.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("level-{vm}"))
            .spawn(move || {
                let result = match change {
                    Ok(c) => twinrun_control::set_level(&sock, c).map(|()| to),
                    Err(e) => Err(e),
                };
                if let Some(core) = me.upgrade() {
                    if result.is_ok() {
                        let role = if to == Protection::Unprotected {
                            Role::Solo
                        } else {
                            Role::Primary
                        };
                        core.lock().sup.set_role(&name, role);
                    }
                    core.feed(vec![Input::VmmLevel { vm: name, result }]);
                }
            });
        if let Err(e) = spawned {
            queue.push_back(Input::VmmLevel {
                vm,
                result: Err(format!("cannot start the level change: {e}")),
            });
        }
    }

    /// Periodic work: VMM ends and log markers, then a tick.
    pub fn tick(&self) {
        let now = self.now_ms();
        let mut g = self.lock();
        let events = g.sup.poll();
        for e in &events {
            match e {
                VmmEvent::Protected { vm } => {
                    g.precopy.entry(vm.clone()).or_default().in_sync = true
                }
                VmmEvent::Unprotected { vm } | VmmEvent::Exited { vm, .. } => {
                    if let Some(p) = g.precopy.get_mut(vm) {
                        p.in_sync = false;
                    }
                }
                _ => {}
            }
        }
        let mut inputs: Vec<Input> = Vec::new();
        for e in events {
            inputs.push(match e {
                VmmEvent::Exited { vm, exit } => {
                    // No copy here any more: a grant to run it alone is given up.
                    self.gate.release(&vm);
                    Input::VmmExited { vm, exit }
                }
                VmmEvent::Protected { vm } => Input::VmmProtected { vm },
                VmmEvent::Unprotected { vm } => Input::VmmUnprotected { vm },
                VmmEvent::FailedOver { vm } => Input::VmmFailedOver { vm },
                VmmEvent::SwappedOut { vm } => Input::VmmSwappedOut { vm },
                VmmEvent::SwappedIn { vm } => Input::VmmSwappedIn { vm },
                VmmEvent::SyncRound { vm, round, pages } => {
                    let p = g.precopy.entry(vm).or_default();
                    if round == 0 {
                        *p = PreCopy::default();
                    }
                    if p.rounds.len() < 10_000 {
                        p.rounds.push((round, pages, now));
                    }
                    continue;
                }
            });
        }
        inputs.push(Input::Tick);
        self.feed_locked(&mut g, inputs);
    }

    /// Runs a command from the API exactly once per id.
    pub fn command(&self, id: Option<String>, vm: &str, cmd: Command) -> CommandOutcome {
        let op = cmd.name().to_string();
        self.answer(id, vm, op, |id| Input::Command {
            id,
            vm: vm.to_string(),
            cmd,
        })
    }

    /// Runs a node command (`workon`, `finalize`) from the API exactly once per id.
    pub fn node_command(&self, id: Option<String>, node: &str, cmd: NodeCommand) -> CommandOutcome {
        let op = cmd.name().to_string();
        self.answer(id, node, op, |id| Input::NodeCommand {
            id,
            node: node.to_string(),
            cmd,
        })
    }

    /// Steps the command `input(id)` about `vm` (a VM, or a node), records the answer
    /// under its id and sends it to the peer; a repeated id gets the first answer.
    fn answer(
        &self,
        id: Option<String>,
        vm: &str,
        op: String,
        input: impl FnOnce(String) -> Input,
    ) -> CommandOutcome {
        let id = id.unwrap_or_else(|| new_command_id(&self.cfg.node));
        let mut g = self.lock();
        if let Ok(Some(c)) = g.store.command(&id) {
            let mut body = c.body;
            body["replayed"] = serde_json::Value::Bool(true);
            return CommandOutcome {
                status: c.status,
                body,
            };
        }
        self.feed_locked(&mut g, vec![input(id.clone())]);
        let result = g
            .replies
            .remove(&id)
            .map(|(_, r)| r)
            .unwrap_or_else(|| Err(CmdError::Conflict("the command got no answer".into())));
        g.replies.clear();
        let out = outcome(&id, vm, &op, &result);
        let rec = CommandRecord {
            id: id.clone(),
            vm: vm.to_string(),
            op,
            status: out.status,
            body: out.body.clone(),
            node: self.cfg.node.clone(),
            clock: g.store.clock().unwrap_or(0),
        };
        match g.store.put_command(&rec) {
            Ok(_) => {
                if let Ok(j) = serde_json::to_string(&rec) {
                    self.outbox.send(Msg::Commands(vec![j]));
                }
            }
            Err(e) => warn!("cannot record command {id}: {e}"),
        }
        out
    }

    pub fn vm_views(&self) -> Vec<VmView> {
        let g = self.lock();
        g.cluster
            .records()
            .map(|r| view(&self.cfg.peer.name, &g, r))
            .collect()
    }

    pub fn vm_view(&self, name: &str) -> Option<VmView> {
        let g = self.lock();
        g.cluster
            .record(name)
            .filter(|r| !r.deleted)
            .map(|r| view(&self.cfg.peer.name, &g, r))
    }

    /// A VM's live migration: under way or not, its phase, and the pre-copy figures of
    /// a source VMM on this node.
    pub fn migration_view(&self, name: &str) -> Option<crate::model::MigrationView> {
        let g = self.lock();
        let r = g.cluster.record(name).filter(|r| !r.deleted)?;
        let shown = g.cluster.shown(name);
        let mut m = crate::model::MigrationView {
            vm: name.to_string(),
            active: r.migrate_to.is_some(),
            owner: r.owner.clone(),
            to: r.migrate_to.clone(),
            state: shown
                .as_ref()
                .map_or(crate::model::VmState::Pending, |s| s.state),
            reason: shown.map_or_else(String::new, |s| s.reason),
            rounds: None,
            pages_sent: None,
            bytes_sent: None,
            dirty_pages_per_s: None,
            eta_ms: None,
            in_sync: false,
            memory_bytes: r.spec.mem_mib << 20,
        };
        if let Some(p) = g.precopy.get(name).filter(|p| !p.rounds.is_empty()) {
            let pages: u64 = p.rounds.iter().map(|r| r.1).sum();
            m.rounds = Some(p.rounds.len() as u32);
            m.pages_sent = Some(pages);
            m.bytes_sent = Some(pages << 12);
            m.in_sync = p.in_sync;
            // Round n+1 holds what the guest dirtied while round n was sent (the time
            // between the lines of rounds n-1 and n).
            if let [.., x, a, b] = p.rounds.as_slice() {
                let sending_a = a.2.saturating_sub(x.2).max(1);
                let sending_b = b.2.saturating_sub(a.2).max(1);
                let dirty = b.1 * 1000 / sending_a;
                m.dirty_pages_per_s = Some(dirty);
                if !p.in_sync {
                    // The next round: what is dirtied while b is sent, at b's speed.
                    let next = dirty * sending_b / 1000;
                    let sent_per_s = (b.1 * 1000 / sending_b).max(1);
                    m.eta_ms = Some(next * 1000 / sent_per_s);
                }
            }
        }
        Some(m)
    }

    pub fn node_views(&self) -> Vec<NodeView> {
        let g = self.lock();
        let owned = |n: &str| {
            g.cluster
                .records()
                .filter(|r| r.owner.as_deref() == Some(n))
                .count() as u32
        };
        vec![
            NodeView {
                name: self.cfg.node.clone(),
                state: NodeState::Local,
                api_addr: self.cfg.api.listen.to_string(),
                peer_addr: self.cfg.cluster_link.listen.to_string(),
                vms_owned: owned(&self.cfg.node),
                reason: format!(
                    "this node; quorum: {}; VMMs in {}",
                    self.gate.describe(),
                    if g.sup.uses_scopes() {
                        "systemd scopes"
                    } else {
                        "their own sessions"
                    }
                ),
                protocol: Some(crate::peer::wire::PROTOCOL),
                maintenance: maintenance(&g.cluster, &self.cfg.node),
            },
            NodeView {
                name: self.cfg.peer.name.clone(),
                state: g.peer.state,
                api_addr: self.cfg.peer.api.to_string(),
                peer_addr: self.cfg.peer.addr.to_string(),
                vms_owned: owned(&self.cfg.peer.name),
                reason: g.peer.reason.clone(),
                protocol: g.peer.protocol,
                maintenance: maintenance(&g.cluster, &self.cfg.peer.name),
            },
        ]
    }

    pub fn events(&self, vm: Option<&str>, limit: u32) -> Vec<Event> {
        self.lock().store.events(vm, limit).unwrap_or_default()
    }

    /// One line for systemd's STATUS=.
    pub fn status_line(&self) -> String {
        let g = self.lock();
        let total = g.cluster.records().count();
        let running = g
            .cluster
            .records()
            .filter(|r| g.sup.running(&r.spec.name).is_some())
            .count();
        format!(
            "{}: API on {}; peer {} {}; {total} VMs, {running} VMMs here",
            self.cfg.node,
            self.cfg.api.listen,
            self.cfg.peer.name,
            match g.peer.state {
                NodeState::Online => "online",
                NodeState::Lost => "lost",
                _ => "not seen",
            }
        )
    }
}

/// The digest of every record: the VMs' and the nodes' (under `-node.<name>`).
fn full_digest(store: &Store) -> Vec<(String, crate::model::Version)> {
    let mut d = store.digest().unwrap_or_default();
    d.extend(
        store
            .nodes()
            .unwrap_or_default()
            .into_iter()
            .map(|n| (n.key(), n.version)),
    );
    d.sort();
    d
}

/// A node's maintenance mark as `node list|show` shows it.
fn maintenance(c: &Cluster, node: &str) -> Option<String> {
    c.node_record(node)
        .filter(|n| n.maintenance)
        .map(|n| n.reason.clone())
}

fn view(peer: &str, g: &Inner, r: &VmRecord) -> VmView {
    let name = &r.spec.name;
    let shown = g.cluster.shown(name);
    let mut vmms = Vec::new();
    if let Some(sh) = &shown {
        if let (Some(role), Some(pid)) = (sh.local_role, sh.local_pid) {
            vmms.push(VmmInfo {
                node: g.cluster.me().to_string(),
                role,
                pid,
                protected: sh.local_protected,
                failed_over: sh.local_failed_over,
            });
        }
    }
    if let Some(PeerVmm {
        role: Some(role),
        pid,
        protected,
        failed_over,
        ..
    }) = g.cluster.peer_vmm(name)
    {
        vmms.push(VmmInfo {
            node: peer.to_string(),
            role: *role,
            pid: *pid,
            protected: *protected,
            failed_over: *failed_over,
        });
    }
    VmView {
        spec: r.spec.clone(),
        desired: r.desired,
        owner: r.owner.clone(),
        state: shown
            .as_ref()
            .map_or(crate::model::VmState::Pending, |s| s.state),
        reason: shown
            .as_ref()
            .map_or_else(String::new, |s| s.reason.clone()),
        vmms,
        restarts: shown.as_ref().map_or(0, |s| s.restarts),
        version: r.version.clone(),
        migrating_to: r.migrate_to.clone(),
    }
}

fn outcome(id: &str, vm: &str, op: &str, r: &Result<CmdOk, CmdError>) -> CommandOutcome {
    let (status, kind) = match r {
        Ok(m) => {
            let body = CommandResponse {
                command_id: id.to_string(),
                vm: vm.to_string(),
                op: op.to_string(),
                message: m.clone(),
                replayed: false,
            };
            let status = if op == "create" { 201 } else { 200 };
            return CommandOutcome {
                status,
                body: serde_json::to_value(body).unwrap_or_default(),
            };
        }
        Err(CmdError::UnknownVm(_)) => (404, "not-found"),
        Err(CmdError::Conflict(_)) => (409, "conflict"),
        Err(CmdError::Invalid(_)) => (400, "invalid"),
    };
    let e = crate::api::ApiError {
        error: r
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default(),
        kind: kind.into(),
        command_id: Some(id.to_string()),
        status,
    };
    CommandOutcome {
        status,
        body: serde_json::to_value(e).unwrap_or_default(),
    }
}

/// Turns a stored answer back into the step function's result (replicated commands).
fn result_of(c: &CommandRecord) -> Option<Result<CmdOk, CmdError>> {
    if (200..300).contains(&c.status) {
        let r: CommandResponse = serde_json::from_value(c.body.clone()).ok()?;
        return Some(Ok(r.message));
    }
    let e: crate::api::ApiError = serde_json::from_value(c.body.clone()).ok()?;
    Some(Err(match c.status {
        404 => CmdError::UnknownVm(c.vm.clone()),
        400 => CmdError::Invalid(e.error),
        _ => CmdError::Conflict(e.error),
    }))
}

pub fn new_command_id(node: &str) -> String {
    let n = crate::peer::wire::nonce();
    let hex: String = n[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{node}-{hex}")
}

impl Replica for Core {
    fn digest(&self) -> (Vec<(String, u64, String)>, Vec<String>) {
        let g = self.lock();
        let recs = full_digest(&g.store)
            .into_iter()
            .map(|(n, v)| (n, v.clock, v.node))
            .collect();
        (recs, g.store.command_ids().unwrap_or_default())
    }

    fn records_for(&self, peer: &[(String, u64, String)]) -> Vec<String> {
        let g = self.lock();
        let theirs: Vec<(String, crate::model::Version)> = peer
            .iter()
            .map(|(n, c, node)| {
                (
                    n.clone(),
                    crate::model::Version {
                        clock: *c,
                        node: node.clone(),
                    },
                )
            })
            .collect();
        let ours = full_digest(&g.store);
        crate::replica::to_send(&ours, &theirs)
            .into_iter()
            .filter_map(|n| match n.strip_prefix(NODE_RECORD_PREFIX) {
                Some(node) => g
                    .store
                    .node(node)
                    .ok()
                    .flatten()
                    .and_then(|r| serde_json::to_string(&r).ok()),
                None => g
                    .store
                    .get(&n)
                    .ok()
                    .flatten()
                    .and_then(|r| serde_json::to_string(&r).ok()),
            })
            .collect()
    }

    fn commands_for(&self, peer: &BTreeSet<String>) -> Vec<String> {
        let g = self.lock();
        g.store
            .commands()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| !peer.contains(&c.id))
            .filter_map(|c| serde_json::to_string(&c).ok())
            .collect()
    }

    fn merge_records(&self, records: Vec<String>) {
        let mut g = self.lock();
        // One record at a time: the store merges it and the step function sees it
        // before anything else steps, so every record the step function holds is the
        // store's (a local write never lands on a newer record it has not seen).
        for j in records {
            if let Ok(r) = serde_json::from_str::<NodeRecord>(&j) {
                match g.store.merge_node(&r) {
                    Ok(_) => self.feed_locked(&mut g, vec![Input::NodeRecord(r)]),
                    Err(e) => warn!("merging node {}: {e}", r.name),
                }
                continue;
            }
            match serde_json::from_str::<VmRecord>(&j) {
                Ok(r) => match g.store.merge(&r) {
                    Ok(_) => self.feed_locked(&mut g, vec![Input::Record(r)]),
                    Err(e) => warn!("merging {}: {e}", r.spec.name),
                },
                Err(e) => warn!("the peer sent a record that does not decode: {e}"),
            }
        }
    }

    fn merge_commands(&self, commands: Vec<String>) {
        let mut g = self.lock();
        let mut inputs = Vec::new();
        for j in commands {
            let Ok(c) = serde_json::from_str::<CommandRecord>(&j) else {
                warn!("the peer sent a command record that does not decode");
                continue;
            };
            if let (Ok(true), Some(result)) = (g.store.put_command(&c), result_of(&c)) {
                inputs.push(Input::CommandSeen { id: c.id, result });
            }
        }
        self.feed_locked(&mut g, inputs);
    }

    fn report(&self) -> String {
        serde_json::to_string(&self.lock().cluster.report()).unwrap_or_default()
    }

    fn peer_up(&self, protocol: u32) {
        let mut g = self.lock();
        g.peer = PeerInfo {
            state: NodeState::Online,
            protocol: Some(protocol),
            reason: format!("connected and caught up (protocol {protocol})"),
            last_seen: Some(Instant::now()),
        };
        g.last_report.clear();
        self.feed_locked(&mut g, vec![Input::PeerUp]);
    }

    fn peer_report(&self, report: String) {
        let mut g = self.lock();
        g.peer.last_seen = Some(Instant::now());
        match serde_json::from_str::<BTreeMap<String, PeerVmm>>(&report) {
            Ok(r) => self.feed_locked(&mut g, vec![Input::PeerReport(r)]),
            Err(e) => warn!("the peer's report does not decode: {e}"),
        }
    }

    fn peer_lost(&self, why: String) {
        let mut g = self.lock();
        let was_online = g.peer.state == NodeState::Online;
        g.peer.state = if was_online || g.peer.state == NodeState::Lost {
            NodeState::Lost
        } else {
            NodeState::Unknown
        };
        g.peer.reason = why;
        if was_online {
            self.feed_locked(
                &mut g,
                vec![Input::PeerLost, Input::PeerReport(BTreeMap::new())],
            );
        }
    }
}

/// How long the tick loop sleeps between polls of the VMMs.
pub const TICK: Duration = Duration::from_millis(100);

impl Core {
    pub fn peer_state(&self) -> PeerState {
        self.lock().cluster.peer_state()
    }

    /// (role, pid) of a VM's VMM on this node.
    pub fn local_vmm(&self, vm: &str) -> Option<(Role, u32)> {
        self.lock().sup.running(vm)
    }
}
