//! The cluster step function: `Cluster::step(now, input) -> actions`, no I/O.
//!
//! Each node runs one `Cluster` over the replicated VM records and its own view of the
//! peer. Both nodes apply the same rules to the same records, so they agree on where a
//! VM runs without a master: the record's `owner` is written only by the node that
//! becomes the owner (placement, takeover, failback), and a node runs only its own VMM
//! processes. What a node may do alone (start an active copy while the peer is not
//! online, take over from a lost peer) it asks the quorum gate first.
//!
//! Invariants (checked by `check` after every step in tests and debug builds):
//! - at most one local VMM per VM, and a Solo or Primary one only where `owner == me`
//!   or (FT) where the standby took over;
//! - an action in flight (spawn, stop, quorum question) is never issued twice;
//! - each command id is answered once (a repeat gets the first answer back and changes
//!   nothing), and each `restart_seq` / `failback_seq` / `clear_seq` step is performed
//!   once on a node.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;

use crate::model::{
    Desired, Failback, NodeName, NodeRecord, Protection, Role, Version, VmRecord, VmSettings,
    VmSpec, VmState, MAX_VMS,
};

mod level;
mod maintenance;
mod migrate;
pub use maintenance::NodeCommand;
pub use migrate::MIGRATE_TIMEOUT_MS;

/// Commands remembered by the step function for duplicate detection (the store keeps
/// more, across restarts and nodes).
pub const MAX_APPLIED: usize = 4096;

/// Limits the supervisor applies; from the node config.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Crash restarts within `restart_window_ms` before the VM is held in error.
    pub max_restart: u32,
    pub restart_window_ms: u64,
    /// After boot, how long to wait for the peer before acting alone.
    pub boot_grace_ms: u64,
    /// A protected FT primary that ended: how long to wait for the standby's takeover
    /// to be reported before restarting the primary here.
    pub takeover_wait_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// Not seen since this daemon started.
    Unknown,
    /// Connected, authenticated, records exchanged.
    Online,
    /// Was online; its heartbeats stopped.
    Lost,
}

/// What the peer reports about one VM.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerVmm {
    /// The peer's VMM for it, if any: (role, pid).
    pub role: Option<Role>,
    pub pid: u32,
    pub protected: bool,
    pub failed_over: bool,
    /// The peer holds it in error.
    pub error: Option<String>,
    /// The level its VMM runs at (an online level change moves it; absent from a peer
    /// of an older version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<Protection>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Create(VmSpec),
    Delete,
    Start,
    Shutdown,
    PowerOff,
    Restart,
    Set(VmSettings),
    Failback,
    /// Live migration to that node (None: the other one than its owner).
    Migrate(Option<NodeName>),
}

impl Command {
    pub fn name(&self) -> &'static str {
        match self {
            Command::Create(_) => "create",
            Command::Delete => "delete",
            Command::Start => "start",
            Command::Shutdown => "shutdown",
            Command::PowerOff => "poweroff",
            Command::Restart => "restart",
            Command::Set(_) => "set",
            Command::Failback => "failback",
            Command::Migrate(_) => "migrate",
        }
    }
}

/// A command's success: what was done, in words.
pub type CmdOk = String;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CmdError {
    UnknownVm(String),
    /// The command does not fit the VM's state; the message says what to do first.
    Conflict(String),
    Invalid(String),
}

impl fmt::Display for CmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdError::UnknownVm(vm) => write!(f, "no VM named {vm:?} (see `twinrun vm list`)"),
            CmdError::Conflict(m) | CmdError::Invalid(m) => f.write_str(m),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// Exit status 0: the guest ended, or the VMM stopped on request.
    Clean,
    /// Anything else, described ("exit code 3", "killed by signal 9").
    Crashed(String),
    /// Exit code 5 of an FT/HA VMM: the quorum demoted it (the peer took the VM over
    /// with a higher generation; nothing held was released, its disks are marked as
    /// the resync target). Not a crash: this node is now the VM's standby.
    Demoted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum QuorumKind {
    /// Run the active copy of a VM while the peer is not online.
    Alone,
    /// Become the owner of a VM whose owner node is lost.
    Takeover,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// The daemon started; adopted VMMs were reported before it.
    Boot,
    Tick,
    /// The peer connected, authenticated and its records were merged.
    PeerUp,
    PeerLost,
    /// The peer's VMMs (complete: a VM missing has none there).
    PeerReport(BTreeMap<String, PeerVmm>),
    /// A record received from the peer (after the store merged it by the same rule:
    /// it replaces ours only if its version is greater).
    Record(VmRecord),
    Command {
        id: String,
        vm: String,
        cmd: Command,
    },
    /// A command the peer ran (replicated): the same id arriving here is not run again.
    CommandSeen {
        id: String,
        result: Result<CmdOk, CmdError>,
    },
    /// A local VMM runs (spawned or found running at boot).
    VmmRunning {
        vm: String,
        role: Role,
        pid: u32,
        adopted: bool,
    },
    VmmSpawnFailed {
        vm: String,
        error: String,
    },
    /// Our FT primary reports the standby committed a checkpoint.
    VmmProtected {
        vm: String,
    },
    /// Our FT primary lost its standby (or is waiting for one).
    VmmUnprotected {
        vm: String,
    },
    /// Our FT standby took over the VM.
    VmmFailedOver {
        vm: String,
    },
    VmmExited {
        vm: String,
        exit: ExitKind,
    },
    /// Our FT primary handed the VM to the peer in a planned role swap and is now
    /// its standby (the same process; the peer's VMM reports a takeover).
    VmmSwappedOut {
        vm: String,
    },
    /// Our FT standby took the VM over in a planned role swap (the peer's primary
    /// handed it over at a checkpoint and stays on as the standby).
    VmmSwappedIn {
        vm: String,
    },
    /// A role swap (failback) could not be done; `error` says why.
    SwapFailed {
        vm: String,
        error: String,
    },
    Quorum {
        vm: String,
        kind: QuorumKind,
        granted: bool,
        reason: String,
    },
    /// A held `Alone` grant ended (its renewals stopped being granted): an unprotected
    /// copy here stops unless the peer is online (then the record alone decides); an
    /// FT/HA VMM is left to its own quorum (it holds the VM's key itself).
    QuorumLost {
        vm: String,
        reason: String,
    },
    /// A node's record received from the peer (merged by the store by the same rule as
    /// a VM's record).
    NodeRecord(NodeRecord),
    /// The answer of our VMM to [`Action::SetLevel`]: the level it runs at now, or why
    /// it refused (cluster/step/level.rs).
    VmmLevel {
        vm: String,
        result: Result<Protection, String>,
    },
    /// The level an adopted VMM's own status says it runs at (after its
    /// [`Input::VmmRunning`]): a daemon restarted in the middle of a level change
    /// learns where the VMM got to (cluster/step/level.rs).
    VmmAdoptedLevel {
        vm: String,
        level: Protection,
    },
    /// A command about a node (`twinrun node workon|finalize`), answered once per id.
    NodeCommand {
        id: String,
        node: String,
        cmd: NodeCommand,
    },
}

/// How far a node got through one VM incarnation's one-shot counters (persisted
/// locally, so a restarted daemon performs no step twice). A counter of another
/// incarnation (the VM was deleted and created again) does not count.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Done {
    pub created: Version,
    pub restart: u64,
    pub failback: u64,
    pub clear: u64,
    /// This node's FT/HA VMM was demoted by the quorum and the record may still name
    /// this node the owner: a restarted daemon runs the standby here, never the
    /// primary (which would be a second copy). Absent in rows written before it.
    #[serde(default)]
    pub demoted: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start a VMM for `record` with `role` on this node.
    Spawn {
        role: Role,
        record: VmRecord,
    },
    /// Stop our VMM: SIGTERM (devices flushed) or, with `force`, SIGKILL.
    Stop {
        vm: String,
        force: bool,
    },
    /// Write the record and send it to the peer.
    Persist(VmRecord),
    /// Remember how far this node got through a VM's one-shot counters.
    Done {
        vm: String,
        done: Done,
    },
    /// Answer a command (and record the answer under its id).
    Reply {
        id: String,
        vm: String,
        result: Result<CmdOk, CmdError>,
    },
    AskQuorum {
        vm: String,
        kind: QuorumKind,
    },
    /// FT failback: a planned role swap at an epoch boundary.
    SwapRoles {
        vm: String,
    },
    /// The VM is deleted and stopped here: remove its files on this node.
    RemoveFiles {
        vm: String,
    },
    Log {
        vm: Option<String>,
        msg: String,
    },
    /// Write a node's record and send it to the peer.
    PersistNode(NodeRecord),
    /// Change the protection level of our running VMM without a restart (its control
    /// socket's `SetLevel`: unprotected, HA, FT); answered by [`Input::VmmLevel`].
    SetLevel {
        vm: String,
        to: Protection,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Grant {
    None,
    Asked,
    Granted,
    /// Refused at this time (ms); asked again after [`QUORUM_RETRY_MS`].
    Denied(String, u64),
}

/// A refused quorum question is asked again after this long (the holder may have
/// gone, the service may be back).
pub const QUORUM_RETRY_MS: u64 = 2000;

#[derive(Clone, Debug)]
struct Local {
    role: Role,
    pid: u32,
    protected: bool,
    failed_over: bool,
    /// The level its runtime protects the VM at: the record's when it started (a Solo
    /// VMM's is unprotected), then what an online level change made it.
    level: Protection,
}

impl Local {
    /// The role it plays now (a standby that took over is the primary).
    fn acting(&self) -> Role {
        if self.role == Role::Standby && self.failed_over {
            Role::Primary
        } else {
            self.role
        }
    }
}

#[derive(Clone, Debug)]
struct Slot {
    record: VmRecord,
    local: Option<Local>,
    /// Times (ms) of crash restarts within the window.
    crashes: VecDeque<u64>,
    /// The incarnation the done_* counters belong to (`VmRecord::created`).
    incarnation: Version,
    done_restart: u64,
    done_failback: u64,
    done_clear: u64,
    held: Option<String>,
    spawn_sent: bool,
    stop_sent: bool,
    /// Stopping for a restart: spawn again once it exits.
    restarting: bool,
    /// Our protected FT primary ended at this time: the standby should take over.
    lost_primary_at: Option<u64>,
    /// Our FT/HA VMM was demoted by the quorum (exit 5): the peer runs the VM, this
    /// node runs the standby even while the record (not yet merged from the peer)
    /// still names it the owner. Cleared when the record names the peer, or when the
    /// standby here takes over again.
    demoted: bool,
    alone: Grant,
    takeover: Grant,
    swap_sent: bool,
    /// Our standby took the VM over in a planned role swap: the peer handed it over
    /// (its report may still say primary until it arrives), so this is no split brain.
    /// Cleared when the record names this node the owner.
    swapped_in: bool,
    /// The pid of the local VMM whose takeover last made this node the owner: a
    /// record naming the peer again while that VMM runs means the peer claims it too
    /// (both ran it while apart); asked again before the peer reports, both nodes
    /// would write themselves owner in turn for ever.
    took_over_pid: Option<u32>,
    /// Since when (ms) this node, the owner, has held only a standby while the online
    /// peer reports no primary for it: nothing for it to take over from.
    orphan_standby_since: Option<u64>,
    /// Why the last role swap failed; cleared by a new failback command.
    swap_blocked: Option<String>,
    /// An online level change was sent to our VMM and not yet answered.
    level_sent: bool,
    /// The live migration this node runs as its source: since when (ms), and whether
    /// the target was in sync once (a loss of sync after that gives it up).
    migrate_since: Option<u64>,
    migrate_synced: bool,
    files_removed: bool,
    /// The last thing that happened to it, shown when the state says nothing more.
    note: String,
    state: VmState,
    reason: String,
}

impl Slot {
    /// A slot for `record`; `done` counts only if it is of the record's incarnation,
    /// else every step the record holds counts as done (it was not ours to do).
    fn new(record: VmRecord, done: Option<&Done>) -> Slot {
        let demoted = done.is_some_and(|d| d.created == record.created && d.demoted);
        let done = match done {
            Some(d) if d.created == record.created => (d.restart, d.failback, d.clear),
            _ => (record.restart_seq, record.failback_seq, record.clear_seq),
        };
        Slot {
            incarnation: record.created.clone(),
            record,
            local: None,
            crashes: VecDeque::new(),
            done_restart: done.0,
            done_failback: done.1,
            done_clear: done.2,
            held: None,
            spawn_sent: false,
            stop_sent: false,
            restarting: false,
            lost_primary_at: None,
            demoted,
            alone: Grant::None,
            takeover: Grant::None,
            swap_sent: false,
            swapped_in: false,
            took_over_pid: None,
            orphan_standby_since: None,
            swap_blocked: None,
            level_sent: false,
            migrate_since: None,
            migrate_synced: false,
            files_removed: false,
            note: String::new(),
            state: VmState::Stopped,
            reason: String::new(),
        }
    }
}

/// A VM's state and reason as the step function sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shown {
    pub state: VmState,
    pub reason: String,
    pub local_role: Option<Role>,
    pub local_pid: Option<u32>,
    pub local_protected: bool,
    pub local_failed_over: bool,
    pub restarts: u32,
    pub held: Option<String>,
}

pub struct Cluster {
    me: NodeName,
    peer: NodeName,
    policy: Policy,
    now: u64,
    booted_at: Option<u64>,
    clock: u64,
    peer_state: PeerState,
    peer_vmms: BTreeMap<String, PeerVmm>,
    vms: BTreeMap<String, Slot>,
    applied: BTreeMap<String, Result<CmdOk, CmdError>>,
    applied_order: VecDeque<String>,
    /// The nodes' records (maintenance), by node name.
    nodes: BTreeMap<NodeName, NodeRecord>,
}

impl Cluster {
    /// `records` as loaded from the store; `done` how far this node got through each
    /// VM's counters; `clock` the store's Lamport clock.
    pub fn new(
        me: &str,
        peer: &str,
        policy: Policy,
        records: Vec<VmRecord>,
        done: BTreeMap<String, Done>,
        clock: u64,
    ) -> Cluster {
        let vms = records
            .into_iter()
            .map(|r| {
                let d = done.get(&r.spec.name);
                (r.spec.name.clone(), Slot::new(r, d))
            })
            .collect();
        Cluster {
            me: me.into(),
            peer: peer.into(),
            policy,
            now: 0,
            booted_at: None,
            clock,
            peer_state: PeerState::Unknown,
            peer_vmms: BTreeMap::new(),
            vms,
            applied: BTreeMap::new(),
            applied_order: VecDeque::new(),
            nodes: BTreeMap::new(),
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    pub fn peer_state(&self) -> PeerState {
        self.peer_state
    }

    pub fn record(&self, vm: &str) -> Option<&VmRecord> {
        self.vms.get(vm).map(|s| &s.record)
    }

    /// Live (not deleted) records by name.
    pub fn records(&self) -> impl Iterator<Item = &VmRecord> {
        self.vms.values().map(|s| &s.record).filter(|r| !r.deleted)
    }

    pub fn shown(&self, vm: &str) -> Option<Shown> {
        let s = self.vms.get(vm)?;
        Some(Shown {
            state: s.state,
            reason: s.reason.clone(),
            local_role: s.local.as_ref().map(Local::acting),
            local_pid: s.local.as_ref().map(|l| l.pid),
            local_protected: s.local.as_ref().is_some_and(|l| l.protected),
            local_failed_over: s.local.as_ref().is_some_and(|l| l.failed_over),
            restarts: s.crashes.len() as u32,
            held: s.held.clone(),
        })
    }

    /// The peer's VMMs as last reported.
    pub fn peer_report(&self) -> &BTreeMap<String, PeerVmm> {
        &self.peer_vmms
    }

    pub fn peer_vmm(&self, vm: &str) -> Option<&PeerVmm> {
        self.peer_vmms.get(vm)
    }

    /// What this node reports to the peer about its VMMs.
    pub fn report(&self) -> BTreeMap<String, PeerVmm> {
        self.vms
            .iter()
            .filter(|(_, s)| s.local.is_some() || s.held.is_some())
            .map(|(n, s)| {
                (
                    n.clone(),
                    PeerVmm {
                        role: s.local.as_ref().map(|l| l.role),
                        pid: s.local.as_ref().map_or(0, |l| l.pid),
                        protected: s.local.as_ref().is_some_and(|l| l.protected),
                        failed_over: s.local.as_ref().is_some_and(|l| l.failed_over),
                        error: s.held.clone(),
                        level: s.local.as_ref().map(|l| l.level),
                    },
                )
            })
            .collect()
    }

    fn version(&mut self) -> Version {
        self.clock += 1;
        Version {
            clock: self.clock,
            node: self.me.clone(),
        }
    }

    /// Persists `rec` with a new version; returns the action.
    fn write(&mut self, mut rec: VmRecord) -> Action {
        rec.version = self.version();
        if let Some(s) = self.vms.get_mut(&rec.spec.name) {
            s.record = rec.clone();
        }
        Action::Persist(rec)
    }

    fn node_online(&self, node: &str) -> bool {
        (node == self.me || (node == self.peer && self.peer_state == PeerState::Online))
            && !self.in_maintenance(node)
    }

    /// One step: apply `input` at time `now` (ms, monotonic) and return what to do.
    pub fn step(&mut self, now: u64, input: Input) -> Vec<Action> {
        self.now = now.max(self.now);
        let mut out = Vec::new();
        match input {
            Input::Boot => {
                self.booted_at = Some(self.now);
                self.boot(&mut out);
            }
            Input::Tick => {}
            Input::PeerUp => {
                if self.peer_state != PeerState::Online {
                    out.push(log(None, format!("peer {} online", self.peer)));
                }
                self.peer_state = PeerState::Online;
                // Grants to act alone held only while the peer was away.
                for s in self.vms.values_mut() {
                    if s.alone != Grant::Asked {
                        s.alone = Grant::None;
                    }
                }
            }
            Input::PeerLost => {
                if self.peer_state == PeerState::Online {
                    out.push(log(None, format!("peer {} lost", self.peer)));
                }
                self.peer_state = PeerState::Lost;
            }
            Input::PeerReport(r) => self.peer_vmms = r,
            Input::Record(rec) => self.on_record(rec, &mut out),
            Input::Command { id, vm, cmd } => self.on_command(id, vm, cmd, &mut out),
            Input::CommandSeen { id, result } => {
                if !self.applied.contains_key(&id) {
                    self.remember(&id, &result);
                }
            }
            Input::VmmRunning {
                vm,
                role,
                pid,
                adopted,
            } => {
                if let Some(s) = self.vms.get_mut(&vm) {
                    s.spawn_sent = false;
                    s.level_sent = false;
                    s.local = Some(Local {
                        role,
                        pid,
                        protected: false,
                        failed_over: false,
                        level: if role == Role::Solo {
                            Protection::Unprotected
                        } else {
                            s.record.spec.protection
                        },
                    });
                    if adopted {
                        s.note = format!("adopted its running {role} VMM (pid {pid})");
                        out.push(log(Some(&vm), s.note.clone()));
                    }
                }
            }
            Input::VmmSpawnFailed { vm, error } if self.receiving_here(&vm) => {
                if let Some(s) = self.vms.get_mut(&vm) {
                    s.spawn_sent = false;
                }
                let why = format!("the receiving VMM could not be started: {error}");
                self.migrate_abort(&vm, why, &mut out);
            }
            Input::VmmSpawnFailed { vm, error } => {
                if let Some(s) = self.vms.get_mut(&vm) {
                    s.spawn_sent = false;
                    let why = format!("its VMM could not be started: {error}");
                    out.push(log(Some(&vm), why.clone()));
                    // A spawn that fails is a crash for the restart budget.
                    self.crashed(&vm, why, &mut out);
                }
            }
            Input::VmmProtected { vm } => {
                if self.migrating_from_here(&vm) {
                    // This session's standby is the migration's receiving VMM, in sync
                    // now (a protection flag from before the migration does not count).
                    slot_mut(&mut self.vms, &vm).migrate_synced = true;
                }
                if let Some(l) = self.vms.get_mut(&vm).and_then(|s| s.local.as_mut()) {
                    if !l.protected {
                        l.protected = true;
                        out.push(log(Some(&vm), "protected: the standby is in sync".into()));
                    }
                }
            }
            Input::VmmUnprotected { vm } => {
                if let Some(l) = self.vms.get_mut(&vm).and_then(|s| s.local.as_mut()) {
                    if l.protected {
                        l.protected = false;
                        out.push(log(
                            Some(&vm),
                            "no longer protected: its standby is gone".into(),
                        ));
                    }
                }
            }
            Input::VmmFailedOver { vm } => self.on_failed_over(&vm, &mut out),
            Input::VmmExited { vm, exit } => self.on_exit(&vm, exit, &mut out),
            Input::VmmSwappedOut { vm } => self.on_swapped_out(&vm, &mut out),
            Input::VmmSwappedIn { vm } => {
                if let Some(s) = self.vms.get_mut(&vm) {
                    s.swapped_in = s.local.as_ref().is_some_and(|l| !l.failed_over);
                }
                self.on_failed_over(&vm, &mut out);
            }
            Input::SwapFailed { vm, error } if self.migrating_from_here(&vm) => {
                self.migrate_abort(&vm, format!("the handover failed: {error}"), &mut out);
            }
            Input::SwapFailed { vm, error } => {
                if let Some(s) = self.vms.get_mut(&vm) {
                    let why = format!("failback not done: {error}");
                    out.push(log(Some(&vm), why.clone()));
                    s.swap_blocked = Some(why);
                }
            }
            Input::Quorum {
                vm,
                kind,
                granted,
                reason,
            } => {
                if let Some(s) = self.vms.get_mut(&vm) {
                    let g = if granted {
                        Grant::Granted
                    } else {
                        Grant::Denied(reason.clone(), self.now)
                    };
                    let what = match kind {
                        QuorumKind::Alone => "to run alone",
                        QuorumKind::Takeover => "to take over",
                    };
                    out.push(log(
                        Some(&vm),
                        format!(
                            "quorum {} {what}: {reason}",
                            if granted { "granted" } else { "denied" }
                        ),
                    ));
                    match kind {
                        QuorumKind::Alone => s.alone = g,
                        QuorumKind::Takeover => s.takeover = g,
                    }
                }
            }
            Input::QuorumLost { vm, reason } => {
                let peer_online = self.peer_state == PeerState::Online;
                if let Some(s) = self.vms.get_mut(&vm) {
                    s.alone = Grant::None;
                    out.push(log(Some(&vm), format!("quorum lost: {reason}")));
                    // Only an unprotected copy is the daemon's to stop: an FT/HA VMM
                    // holds the VM's own key and pauses itself when it loses both its
                    // peer and the witness (the quorum crate's rules).
                    let solo = s.local.as_ref().is_some_and(|l| l.role == Role::Solo);
                    if solo && !peer_online {
                        s.note = format!("stopped: {reason}");
                        self.stop_local(&vm, true, &mut out);
                    }
                }
            }
            Input::NodeRecord(rec) => self.on_node_record(rec, &mut out),
            Input::NodeCommand { id, node, cmd } => self.on_node_command(id, node, cmd, &mut out),
            Input::VmmLevel { vm, result } => self.on_level(&vm, result, &mut out),
            Input::VmmAdoptedLevel { vm, level } => self.on_adopted_level(&vm, level, &mut out),
        }
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for vm in names {
            self.reconcile(&vm, &mut out);
        }
        // Tombstones stay (as in the store): a record of the deleted VM that the
        // peer sends later must lose against them here as it does in the store.
        #[cfg(any(test, debug_assertions))]
        self.check();
        out
    }

    fn boot(&mut self, out: &mut Vec<Action>) {
        // VMs this node owned that did not survive (the node itself restarted): start
        // again only with autostart, else record that they are off.
        let me = self.me.clone();
        let names: Vec<String> = self.vms.keys().cloned().collect();
        for vm in names {
            let Some(s) = self.vms.get(&vm) else { continue };
            let r = &s.record;
            if r.deleted || s.local.is_some() || r.desired != Desired::Running {
                continue;
            }
            if r.owner.as_deref() == Some(me.as_str()) && !r.spec.autostart {
                let why = format!(
                    "ran on {me} before its daemon started and runs no more; autostart is off: left stopped"
                );
                let mut rec = r.clone();
                rec.desired = Desired::Stopped;
                rec.owner = None;
                rec.stopped_because = Some(why.clone());
                let a = self.write(rec);
                out.push(log(Some(&vm), why));
                out.push(a);
            }
        }
    }

    fn on_record(&mut self, rec: VmRecord, out: &mut Vec<Action>) {
        self.clock = self.clock.max(rec.version.clock);
        let name = rec.spec.name.clone();
        match self.vms.get_mut(&name) {
            // The same rule as the store's merge: an older or equal record changes
            // nothing (the daemon feeds every received record, winner or not, so the
            // clock above moves past every clock seen).
            Some(s) if !crate::replica::wins(&rec.version, &s.record.version) => {}
            Some(s) => {
                // Records from the catch-up (before PeerUp) that replace one written
                // here: both were written while the nodes were apart, and ours lost.
                if self.peer_state != PeerState::Online
                    && s.record.version.node == self.me
                    && rec.version.node != self.me
                    && !s.record.deleted
                {
                    out.push(log(
                        Some(&name),
                        format!(
                            "the change made here at {} while {} was away lost to its change at {} (the later version wins)",
                            s.record.version, self.peer, rec.version
                        ),
                    ));
                }
                if rec.created != s.incarnation {
                    // Another incarnation (deleted and created again): its counters
                    // start afresh, and nothing of the old one is held against it.
                    s.incarnation = rec.created.clone();
                    s.demoted = false;
                    s.done_restart = rec.restart_seq;
                    s.done_failback = rec.failback_seq;
                    s.done_clear = rec.clear_seq;
                    s.held = None;
                    s.crashes.clear();
                    s.record = rec;
                    let d = done(&name, s);
                    out.push(d);
                    return;
                }
                if rec.clear_seq > s.done_clear {
                    s.held = None;
                    s.crashes.clear();
                }
                // The one-shot counters only grow: a record that won over ours by
                // last-writer-wins must not undo a restart, failback or clear that ours
                // carried (both were written while the nodes were apart). The maximum
                // of each is written as a new version, which both nodes then hold.
                // Floors: what ours carried and what this node already performed.
                let ours = s.record.clone();
                let floor = (
                    ours.restart_seq.max(s.done_restart),
                    ours.failback_seq.max(s.done_failback),
                    ours.clear_seq.max(s.done_clear),
                );
                let mut rec = rec;
                let lost_steps = !rec.deleted
                    && (floor.0 > rec.restart_seq
                        || floor.1 > rec.failback_seq
                        || floor.2 > rec.clear_seq);
                if lost_steps {
                    rec.restart_seq = rec.restart_seq.max(floor.0);
                    rec.failback_seq = rec.failback_seq.max(floor.1);
                    rec.clear_seq = rec.clear_seq.max(floor.2);
                    out.push(log(
                        Some(&name),
                        "kept the commands (restart, failback, clear) of the change it replaced"
                            .into(),
                    ));
                    s.record = rec.clone();
                    out.push(self.write(rec));
                    return;
                }
                s.record = rec;
            }
            None => {
                if rec.deleted {
                    return;
                }
                out.push(log(
                    Some(&name),
                    format!("learned of it from {}", rec.version.node),
                ));
                self.vms.insert(name, Slot::new(rec, None));
            }
        }
    }

    fn remember(&mut self, id: &str, result: &Result<CmdOk, CmdError>) {
        self.applied.insert(id.to_string(), result.clone());
        self.applied_order.push_back(id.to_string());
        while self.applied_order.len() > MAX_APPLIED {
            if let Some(old) = self.applied_order.pop_front() {
                self.applied.remove(&old);
            }
        }
    }

    fn on_command(&mut self, id: String, vm: String, cmd: Command, out: &mut Vec<Action>) {
        if let Some(first) = self.applied.get(&id) {
            out.push(log(
                Some(&vm),
                format!("command {id} ({}) seen before: not run again", cmd.name()),
            ));
            out.push(Action::Reply {
                id,
                vm,
                result: first.clone(),
            });
            return;
        }
        let name = cmd.name();
        let result = self.run_command(&vm, cmd, out);
        match &result {
            Ok(m) => out.push(log(Some(&vm), format!("command {id} {name}: {m}"))),
            Err(e) => out.push(log(Some(&vm), format!("command {id} {name} refused: {e}"))),
        }
        self.remember(&id, &result);
        out.push(Action::Reply { id, vm, result });
    }

    fn live(&self, vm: &str) -> Result<VmRecord, CmdError> {
        match self.vms.get(vm) {
            Some(s) if !s.record.deleted => Ok(s.record.clone()),
            _ => Err(CmdError::UnknownVm(vm.into())),
        }
    }

    fn runs_anywhere(&self, vm: &str) -> bool {
        self.vms.get(vm).is_some_and(|s| s.local.is_some())
            || self.peer_vmms.get(vm).is_some_and(|p| p.role.is_some())
    }

    fn run_command(
        &mut self,
        vm: &str,
        cmd: Command,
        out: &mut Vec<Action>,
    ) -> Result<CmdOk, CmdError> {
        match cmd {
            Command::Create(spec) => {
                if spec.name != vm {
                    return Err(CmdError::Invalid(
                        "the spec's name differs from the VM's".into(),
                    ));
                }
                spec.validate(&[&self.me, &self.peer])
                    .map_err(CmdError::Invalid)?;
                if self.live(vm).is_ok() {
                    return Err(CmdError::Conflict(format!(
                        "a VM named {vm:?} exists already (delete it first, or choose another name)"
                    )));
                }
                if self.records().count() >= MAX_VMS {
                    return Err(CmdError::Conflict(format!(
                        "the cluster holds at most {MAX_VMS} VMs"
                    )));
                }
                let mut spec = spec;
                if spec.preferred_node.is_none() {
                    spec.preferred_node = Some(self.me.clone());
                }
                let used: std::collections::BTreeSet<u16> =
                    self.records().map(|r| r.slot).collect();
                let slot = (0..MAX_VMS as u16 * 2)
                    .find(|s| !used.contains(s))
                    .unwrap_or(0);
                let version = self.version();
                let rec = VmRecord {
                    spec,
                    desired: Desired::Stopped,
                    owner: None,
                    slot,
                    restart_seq: 0,
                    failback_seq: 0,
                    clear_seq: 0,
                    deleted: false,
                    stopped_because: None,
                    migrate_to: None,
                    created: version.clone(),
                    version,
                };
                // A new incarnation: a fresh slot (a tombstone's counters belong to the
                // old VM).
                let fresh = Slot::new(rec.clone(), None);
                out.push(done(vm, &fresh));
                self.vms.insert(vm.to_string(), fresh);
                out.push(Action::Persist(rec));
                Ok("created (stopped; `twinrun vm start` runs it)".into())
            }
            Command::Delete => {
                let rec = self.live(vm)?;
                if rec.desired == Desired::Running || self.runs_anywhere(vm) {
                    return Err(CmdError::Conflict(format!(
                        "{vm} is running: stop it first (`twinrun vm shutdown {vm}` or `poweroff`)"
                    )));
                }
                let mut rec = rec;
                rec.deleted = true;
                rec.owner = None;
                out.push(self.write(rec));
                Ok("deleted".into())
            }
            Command::Start => {
                let mut rec = self.live(vm)?;
                let held = self.vms.get(vm).and_then(|s| s.held.clone());
                let peer_held = self.peer_vmms.get(vm).and_then(|p| p.error.clone());
                if rec.desired == Desired::Running && held.is_none() && peer_held.is_none() {
                    return Ok("already running (nothing to do)".into());
                }
                rec.desired = Desired::Running;
                rec.stopped_because = None;
                let msg = if held.is_some() || peer_held.is_some() {
                    rec.clear_seq += 1;
                    "error cleared; starting"
                } else {
                    "starting"
                };
                out.push(self.write(rec));
                Ok(msg.into())
            }
            Command::Shutdown | Command::PowerOff => {
                let mut rec = self.live(vm)?;
                let want = if cmd == Command::Shutdown {
                    Desired::Stopped
                } else {
                    Desired::PoweredOff
                };
                if rec.desired == want && !self.runs_anywhere(vm) {
                    return Ok("already stopped (nothing to do)".into());
                }
                rec.desired = want;
                rec.owner = None;
                rec.stopped_because = None;
                rec.migrate_to = None;
                out.push(self.write(rec));
                Ok(if want == Desired::Stopped {
                    "shutting down".into()
                } else {
                    "powering off".into()
                })
            }
            Command::Restart => {
                let mut rec = self.live(vm)?;
                if rec.desired != Desired::Running {
                    return Err(CmdError::Conflict(format!(
                        "{vm} is not running: use `twinrun vm start {vm}`"
                    )));
                }
                rec.restart_seq += 1;
                out.push(self.write(rec));
                Ok("restarting".into())
            }
            Command::Set(set) => {
                let mut rec = self.live(vm)?;
                let mut level_change = None;
                if let Some(p) = set.protection {
                    if p != rec.spec.protection
                        && (rec.desired == Desired::Running || self.runs_anywhere(vm))
                    {
                        // Online, without a reboot, where the engine can (level.rs);
                        // refused with what to do where it cannot.
                        level_change = Some(self.level_command(vm, &rec, p)?);
                    }
                    rec.spec.protection = p;
                }
                if let Some(n) = set.preferred_node {
                    rec.spec.preferred_node = Some(n);
                }
                if let Some(a) = set.autostart {
                    rec.spec.autostart = a;
                }
                if let Some(f) = set.failback {
                    rec.spec.failback = f;
                }
                rec.spec
                    .validate(&[&self.me, &self.peer])
                    .map_err(CmdError::Invalid)?;
                out.push(self.write(rec));
                Ok(match level_change {
                    Some(how) => format!("settings changed; {how}"),
                    None => "settings changed".into(),
                })
            }
            Command::Failback => {
                let mut rec = self.live(vm)?;
                let pref = rec.spec.preferred_node.clone().unwrap_or_default();
                if rec.desired != Desired::Running || rec.owner.is_none() {
                    return Err(CmdError::Conflict(format!("{vm} is not running")));
                }
                if rec.owner.as_deref() == Some(pref.as_str()) {
                    return Ok(format!(
                        "already on its preferred node {pref} (nothing to do)"
                    ));
                }
                match rec.spec.protection {
                    // HA: by live migration (the same swap request; its VMM migrates).
                    Protection::Ft | Protection::Ha => {}
                    // By live migration to its preferred node.
                    Protection::Unprotected if pref.is_empty() => {
                        return Err(CmdError::Conflict(format!(
                            "{vm} has no preferred node to fail back to (`twinrun vm migrate \
                             {vm}` moves it)"
                        )))
                    }
                    Protection::Unprotected => return self.migrate_command(vm, Some(pref), out),
                }
                rec.failback_seq += 1;
                out.push(self.write(rec));
                Ok(format!("failing back to {pref} once it is in sync"))
            }
            Command::Migrate(to) => self.migrate_command(vm, to, out),
        }
    }

    fn on_failed_over(&mut self, vm: &str, out: &mut Vec<Action>) {
        let Some(s) = self.vms.get_mut(vm) else {
            return;
        };
        let Some(l) = s.local.as_mut() else { return };
        if l.failed_over {
            return;
        }
        l.failed_over = true;
        l.protected = false;
        if std::mem::take(&mut s.demoted) {
            out.push(done(vm, s));
        }
        let level = if s.swapped_in {
            "planned role swap"
        } else if s.record.spec.protection == Protection::Ha {
            "HA restart on the survivor"
        } else {
            "FT failover"
        };
        s.note = format!("took over from {} ({level})", self.peer);
        out.push(log(Some(vm), s.note.clone()));
    }

    /// A planned role swap moved the VM to the peer: the VMM here is its standby now
    /// (the peer's takeover makes it the owner, through the quorum as a failover does).
    fn on_swapped_out(&mut self, vm: &str, out: &mut Vec<Action>) {
        let Some(s) = self.vms.get_mut(vm) else {
            return;
        };
        let Some(l) = s.local.as_mut() else { return };
        // Solo: an unprotected VM's VMM handed over by a live migration.
        if !matches!(l.acting(), Role::Primary | Role::Solo) {
            return;
        }
        l.role = Role::Standby;
        l.failed_over = false;
        l.protected = false;
        s.swap_sent = false;
        s.note = format!("role swap done: {} runs it, the standby is here", self.peer);
        out.push(log(Some(vm), s.note.clone()));
    }

    fn crashed(&mut self, vm: &str, why: String, out: &mut Vec<Action>) {
        let now = self.now;
        let window = self.policy.restart_window_ms;
        let max = self.policy.max_restart as usize;
        let Some(s) = self.vms.get_mut(vm) else {
            return;
        };
        while s.crashes.front().is_some_and(|&t| t + window < now) {
            s.crashes.pop_front();
        }
        if s.crashes.len() >= max {
            let held = format!(
                "crashed {} times within {} s (last: {why}); fix the cause, then `twinrun vm start {vm}`",
                s.crashes.len() + 1,
                window / 1000
            );
            out.push(log(Some(vm), format!("held in error: {held}")));
            s.held = Some(held);
        } else {
            s.crashes.push_back(now);
            s.note = format!("restarted after {why} ({} of {max})", s.crashes.len());
            out.push(log(Some(vm), s.note.clone()));
        }
    }

    fn on_exit(&mut self, vm: &str, exit: ExitKind, out: &mut Vec<Action>) {
        let now = self.now;
        let Some(s) = self.vms.get_mut(vm) else {
            return;
        };
        let Some(l) = s.local.take() else { return };
        s.spawn_sent = false;
        let requested = std::mem::take(&mut s.stop_sent);
        if requested {
            out.push(log(Some(vm), format!("its {} VMM stopped", l.role)));
            return;
        }
        let why = match &exit {
            ExitKind::Clean => "exit status 0".to_string(),
            ExitKind::Crashed(w) => w.clone(),
            ExitKind::Demoted => "exit code 5 (demoted by the quorum)".to_string(),
        };
        out.push(log(Some(vm), format!("its {} VMM ended: {why}", l.role)));
        let rec = s.record.clone();
        let acting = l.acting();
        if acting == Role::Standby && !rec.spec.protection.paired() {
            // An unprotected VM's standby is one end of a live migration: the receiving
            // VMM (the migration is given up; the VM runs on at the source) or the old
            // end after the handover. Neither is a crash of the VM.
            self.migrate_end_exited(vm, &why, out);
            return;
        }
        if exit == ExitKind::Demoted && rec.spec.protection.paired() {
            // The quorum says the peer holds a higher generation: it runs the VM. Our
            // VMM released nothing it held and marked its disks the resync target; it
            // comes back as the standby, with no restart charged (not a crash).
            s.demoted = true;
            s.lost_primary_at = None;
            s.note = format!(
                "demoted by the quorum: {} took it over with a higher generation; the standby here resyncs its disks",
                self.peer
            );
            out.push(log(Some(vm), s.note.clone()));
            // Recorded before anything else runs: a daemon restarted before the
            // peer's record arrives must not start the demoted primary again.
            out.push(done(vm, s));
            return;
        }
        if exit == ExitKind::Clean && acting != Role::Standby {
            // The guest ended by itself: it is stopped, not crashed.
            let mut rec = rec;
            rec.desired = Desired::Stopped;
            rec.owner = None;
            rec.stopped_because = Some(format!("the guest exited (status 0) on {}", self.me));
            out.push(self.write(rec));
            return;
        }
        if acting == Role::Primary && l.protected && rec.spec.protection.paired() {
            // The standby takes over by itself; restart here only if it does not.
            s.lost_primary_at = Some(now);
            s.note = format!(
                "its primary ended ({why}); the standby on {} takes over",
                self.peer
            );
            return;
        }
        self.crashed(vm, why, out);
    }

    /// Brings one VM's local VMM in line with its record and computes its state.
    fn reconcile(&mut self, vm: &str, out: &mut Vec<Action>) {
        let me = self.me.clone();
        let peer = self.peer.clone();
        let peer_state = self.peer_state;
        let now = self.now;
        let in_grace = match self.booted_at {
            None => true,
            Some(t) => peer_state == PeerState::Unknown && now < t + self.policy.boot_grace_ms,
        };
        let peer_vmm = self.peer_vmms.get(vm).cloned();
        let Some(s) = self.vms.get(vm) else { return };
        let rec = s.record.clone();

        // Counters: a clear forgets crashes; a restart stops the VMM to start it again.
        if rec.clear_seq > s.done_clear {
            let s = slot_mut(&mut self.vms, vm);
            s.held = None;
            s.crashes.clear();
            s.done_clear = rec.clear_seq;
            out.push(done(vm, s));
        }
        let s = &self.vms[vm];
        if rec.restart_seq > s.done_restart {
            let s = slot_mut(&mut self.vms, vm);
            s.done_restart = rec.restart_seq;
            if s.local.is_some() && !s.stop_sent {
                s.restarting = true;
                s.stop_sent = true;
                s.note = "restarted by command".into();
                out.push(Action::Stop {
                    vm: vm.into(),
                    force: false,
                });
            }
            out.push(done(vm, s));
        }
        if rec.failback_seq > self.vms[vm].done_failback && rec.owner.as_deref() != Some(&me) {
            // Failback is the owner's job; the other node just notes the step.
            let s = slot_mut(&mut self.vms, vm);
            s.done_failback = rec.failback_seq;
            out.push(done(vm, s));
        }

        if let Some((state, reason)) = self.maintenance_here(vm, &rec, peer_vmm.as_ref(), out) {
            let s = slot_mut(&mut self.vms, vm);
            s.state = state;
            s.reason = reason;
            return;
        }
        let s = &self.vms[vm];
        let local_role = s.local.as_ref().map(Local::acting);
        let (state, reason) = if rec.deleted {
            if s.local.is_some() {
                self.stop_local(vm, true, out);
                (VmState::Stopping, "deleted: stopping its VMM".into())
            } else if !s.files_removed {
                let s = slot_mut(&mut self.vms, vm);
                s.files_removed = true;
                out.push(Action::RemoveFiles { vm: vm.into() });
                (VmState::Stopped, "deleted".into())
            } else {
                (VmState::Stopped, "deleted".into())
            }
        } else if rec.desired != Desired::Running {
            if s.local.is_some() {
                self.stop_local(vm, rec.desired == Desired::PoweredOff, out);
                (VmState::Stopping, format!("{} by command", rec.desired))
            } else if peer_vmm.as_ref().is_some_and(|p| p.role.is_some()) {
                (VmState::Stopping, format!("stopping on {peer}"))
            } else if let Some(why) = &rec.stopped_because {
                (VmState::Stopped, why.clone())
            } else {
                (VmState::Stopped, format!("{} by command", rec.desired))
            }
        } else if let Some(h) = s.held.clone() {
            if s.local.is_some() {
                self.stop_local(vm, false, out);
            }
            (VmState::Error, h)
        } else if let Some(h) = peer_vmm.as_ref().and_then(|p| p.error.clone()) {
            (VmState::Error, format!("held in error on {peer}: {h}"))
        } else {
            self.reconcile_running(vm, &rec, in_grace, peer_vmm.as_ref(), local_role, out)
        };
        let (state, reason) = self.maintenance_of_peer(&rec, local_role, state, reason);
        let s = slot_mut(&mut self.vms, vm);
        s.state = state;
        s.reason = reason;
    }

    fn stop_local(&mut self, vm: &str, force: bool, out: &mut Vec<Action>) {
        let s = slot_mut(&mut self.vms, vm);
        if !s.stop_sent {
            s.stop_sent = true;
            out.push(Action::Stop {
                vm: vm.into(),
                force,
            });
        }
    }

    fn spawn(&mut self, vm: &str, role: Role, out: &mut Vec<Action>) {
        let s = slot_mut(&mut self.vms, vm);
        if s.spawn_sent || s.local.is_some() || s.stop_sent {
            return;
        }
        s.spawn_sent = true;
        s.restarting = false;
        out.push(Action::Spawn {
            role,
            record: s.record.clone(),
        });
    }

    /// May this node run the active copy of `vm` now? Asks the quorum gate when the
    /// peer is not online; Err is why not (yet).
    fn may_run_alone(
        &mut self,
        vm: &str,
        in_grace: bool,
        out: &mut Vec<Action>,
    ) -> Result<(), String> {
        if self.peer_state == PeerState::Online {
            return Ok(());
        }
        if in_grace {
            return Err(format!(
                "waiting for {} (boot grace) before starting it alone",
                self.peer
            ));
        }
        let s = slot_mut(&mut self.vms, vm);
        match &s.alone {
            Grant::Granted => Ok(()),
            Grant::Asked => Err("waiting for the quorum's answer to run it alone".into()),
            Grant::Denied(why, at) if self.now < at + QUORUM_RETRY_MS => {
                Err(format!("the quorum refused to run it alone: {why}"))
            }
            Grant::Denied(..) => {
                s.alone = Grant::Asked;
                out.push(Action::AskQuorum {
                    vm: vm.into(),
                    kind: QuorumKind::Alone,
                });
                Err("asking the quorum again to run it alone".into())
            }
            Grant::None => {
                s.alone = Grant::Asked;
                out.push(Action::AskQuorum {
                    vm: vm.into(),
                    kind: QuorumKind::Alone,
                });
                Err("asking the quorum to run it alone".into())
            }
        }
    }

    fn reconcile_running(
        &mut self,
        vm: &str,
        rec: &VmRecord,
        in_grace: bool,
        peer_vmm: Option<&PeerVmm>,
        local_role: Option<Role>,
        out: &mut Vec<Action>,
    ) -> (VmState, String) {
        let me = self.me.clone();
        let peer = self.peer.clone();
        let peer_online = self.peer_state == PeerState::Online;
        // FT and HA run as a pair of VMMs (primary on the owner, standby on the
        // other); the standby's VMM takes over by itself (HA: boots the guest from its
        // disk replica), the daemon sees it through the status and follows.
        let ft = rec.spec.protection.paired();
        let pref = rec
            .spec
            .preferred_node
            .clone()
            .unwrap_or_else(|| me.clone());
        let peer_role = peer_vmm.and_then(|p| p.role);
        if let Some(shown) = self.level_rules(vm, rec, peer_vmm, out) {
            return shown;
        }
        if !ft {
            if let Some(shown) = self.migrate_rules(vm, rec, peer_vmm, local_role, out) {
                return shown;
            }
        }
        if let Some(role) = local_role {
            // A VMM started for another protection level (the level was changed on
            // the other node while the nodes were apart) stops, to start again as one
            // that fits.
            // Unprotected: its VMM alone, or the receiving end of a live migration
            // that took it over (an FT process running alone: it can migrate again).
            let fits = if ft {
                role != Role::Solo
            } else {
                matches!(role, Role::Solo | Role::Primary)
            };
            if !fits {
                self.stop_local(vm, false, out);
                return (
                    VmState::Stopping,
                    format!(
                        "its level is now {}: stopping the {role} VMM started for the old one",
                        rec.spec.protection
                    ),
                );
            }
        }
        if local_role.is_none() {
            let clash = self
                .records()
                .find(|r| r.slot == rec.slot && r.spec.name != rec.spec.name)
                .map(|r| (r.spec.name.clone(), r.created.clone()));
            if let Some((other, other_created)) = clash {
                // Two VMs created while the nodes were apart took the same slot (A-Link
                // ports, TAP names). One that runs nowhere moves to the lowest free slot
                // if the other runs or is not to run, or else the younger one does; both
                // nodes pick the same slot.
                let younger =
                    (rec.created.clone(), rec.spec.name.clone()) > (other_created, other.clone());
                let other_runs = self.vms.get(&other).is_some_and(|s| s.local.is_some())
                    || self.peer_vmms.get(&other).is_some_and(|p| p.role.is_some());
                let other_waits = self
                    .vms
                    .get(&other)
                    .is_some_and(|s| s.record.desired == Desired::Running);
                if peer_role.is_none() && (other_runs || !other_waits || younger) {
                    let used: std::collections::BTreeSet<u16> =
                        self.records().map(|r| r.slot).collect();
                    if let Some(free) = (0..MAX_VMS as u16 * 2).find(|s| !used.contains(s)) {
                        let mut r = rec.clone();
                        r.slot = free;
                        out.push(log(
                            Some(vm),
                            format!("its slot {} was also {other}'s (both created while the nodes were apart): moved to slot {free}", rec.slot),
                        ));
                        out.push(self.write(r));
                        return (
                            VmState::Pending,
                            format!("moved to slot {free} (A-Link ports, TAP names)"),
                        );
                    }
                }
                return (
                    VmState::Pending,
                    format!("its A-Link ports and TAP names clash with VM {other}'s (both created while the nodes were apart); one of them moves"),
                );
            }
        }

        // Placement: the node chosen (the preferred one if online, else the other)
        // writes owner = itself; the other waits for the record.
        let owner = match rec.owner.clone() {
            Some(o) => o,
            None if matches!(local_role, Some(Role::Solo | Role::Primary)) => {
                // It already runs here (a start on the other node while the nodes were
                // apart cleared the owner): this copy is the one; were the other node
                // to claim it too, the later record wins and the loser stops its copy.
                let mut r = rec.clone();
                r.owner = Some(me.clone());
                out.push(log(
                    Some(vm),
                    format!("already runs on {me}: owner is {me}"),
                ));
                out.push(self.write(r));
                me.clone()
            }
            None => {
                let target = if self.node_online(&pref) {
                    pref.clone()
                } else {
                    me.clone()
                };
                if target != me {
                    return (
                        VmState::Pending,
                        format!("{target} (its preferred node) starts it"),
                    );
                }
                if let Err(why) = self.may_run_alone(vm, in_grace, out) {
                    return (VmState::Pending, why);
                }
                let mut r = rec.clone();
                r.owner = Some(me.clone());
                out.push(log(Some(vm), format!("placed on {me}")));
                out.push(self.write(r));
                me.clone()
            }
        };
        let rec = &self.vms[vm].record.clone();

        if owner != me && self.vms[vm].demoted {
            // The peer's record arrived: the usual rules take it from here.
            let s = slot_mut(&mut self.vms, vm);
            s.demoted = false;
            out.push(done(vm, s));
        }
        if owner == me && ft && self.vms[vm].demoted {
            // Demoted while apart: the peer took it over (its record follows when the
            // nodes meet). Never the primary here: the standby, with its disks.
            if local_role.is_none() {
                self.spawn(vm, Role::Standby, out);
                return (
                    VmState::Starting,
                    format!("starting the standby on {me} ({})", self.vms[vm].note),
                );
            }
            if local_role == Some(Role::Standby) {
                if self.vms[vm].stop_sent {
                    return (VmState::Stopping, self.vms[vm].note.clone());
                }
                return (
                    VmState::Running,
                    format!(
                        "standby on {me}, primary on {peer} ({}); the record follows when {peer} is online",
                        self.vms[vm].note
                    ),
                );
            }
        }
        if owner == me {
            let want = if ft { Role::Primary } else { Role::Solo };
            // A standby here still waiting to take over (the record moved first).
            if local_role == Some(Role::Standby) {
                // Unless the online peer runs no primary for it, longer than a
                // takeover takes: a standby left from before (its primary ended while
                // this node was apart or down) has nothing to take over from, and
                // waits for ever. It stops; the primary starts here.
                let peer_active = peer_vmm.is_some_and(|p| {
                    p.role == Some(Role::Primary)
                        || (p.role == Some(Role::Standby) && p.failed_over)
                });
                let now = self.now;
                let s = slot_mut(&mut self.vms, vm);
                if !peer_online || peer_active || s.stop_sent {
                    s.orphan_standby_since = None;
                } else {
                    let since = *s.orphan_standby_since.get_or_insert(now);
                    if now >= since + self.policy.takeover_wait_ms {
                        s.orphan_standby_since = None;
                        out.push(log(
                            Some(vm),
                            format!(
                                "the standby here has no primary on {peer} to take over from: stopping it to start the primary here"
                            ),
                        ));
                        self.stop_local(vm, false, out);
                        return (
                            VmState::Stopping,
                            format!("stopping the standby here (no primary on {peer}) to start the primary"),
                        );
                    }
                }
                return (
                    VmState::Pending,
                    format!("waiting for the standby here to take over from {peer}"),
                );
            }
            if local_role.is_none() {
                let s = &self.vms[vm];
                if let Some(t) = s.lost_primary_at {
                    let reported = peer_vmm.is_some_and(|p| p.failed_over);
                    if reported || !peer_online {
                        // The peer took over (its record will follow) or is gone too.
                        if !peer_online {
                            let s = slot_mut(&mut self.vms, vm);
                            s.lost_primary_at = None;
                        }
                        return (
                            VmState::Pending,
                            format!("{peer} took over; waiting for its record"),
                        );
                    }
                    if self.now < t + self.policy.takeover_wait_ms {
                        return (VmState::Pending, s.note.clone());
                    }
                    let s = slot_mut(&mut self.vms, vm);
                    s.lost_primary_at = None;
                    let why = "primary ended and the standby did not take over".to_string();
                    out.push(log(Some(vm), why.clone()));
                    self.crashed(vm, why, out);
                    if self.vms[vm].held.is_some() {
                        return (
                            VmState::Error,
                            self.vms[vm].held.clone().unwrap_or_default(),
                        );
                    }
                }
                if let Err(why) = self.may_run_alone(vm, in_grace, out) {
                    return (VmState::Pending, why);
                }
                let restarting = self.vms[vm].restarting;
                self.spawn(vm, want, out);
                let note = &self.vms[vm].note;
                let why = if restarting || !note.is_empty() && note.starts_with("restarted") {
                    note.clone()
                } else {
                    format!("starting its {want} VMM on {me}")
                };
                return (VmState::Starting, why);
            }
            // Our VMM runs.
            let s = &self.vms[vm];
            #[allow(clippy::expect_used)] // `local` is checked just above.
            let l = s.local.as_ref().expect("local exists");
            if s.stop_sent {
                return (VmState::Stopping, s.note.clone());
            }
            if !ft {
                let why = format!("running on {me}");
                return (VmState::Running, self.with_note(vm, why));
            }
            // FT/HA primary (possibly a standby that took over).
            if l.protected {
                // Failback: owner is not the preferred node, which is back and in sync.
                if pref != me && peer_online && peer_role == Some(Role::Standby) {
                    let asked = rec.failback_seq > s.done_failback;
                    if asked {
                        let s = slot_mut(&mut self.vms, vm);
                        s.swap_sent = false;
                        s.swap_blocked = None;
                    }
                    let s = &self.vms[vm];
                    if let Some(why) = &s.swap_blocked {
                        return (
                            VmState::Protected,
                            format!("protected on {me}, standby on {peer}; {why}"),
                        );
                    }
                    if rec.spec.failback == Failback::Auto || asked {
                        if !s.swap_sent {
                            let s = slot_mut(&mut self.vms, vm);
                            s.swap_sent = true;
                            s.done_failback = rec.failback_seq;
                            out.push(log(Some(vm), format!("failback to {pref}: role swap")));
                            out.push(Action::SwapRoles { vm: vm.into() });
                            out.push(done(vm, s));
                        }
                        return (
                            VmState::Protected,
                            format!("protected; failing back to {pref}"),
                        );
                    }
                    return (
                        VmState::Protected,
                        format!("protected on {me} with its standby on {peer}; its preferred node is {pref}: `twinrun vm failback {vm}` moves it (failback is manual)"),
                    );
                }
                return (
                    VmState::Protected,
                    format!("primary on {me}, standby on {peer} in sync"),
                );
            }
            let why = if !peer_online {
                format!("simplex: primary on {me}; {peer} is {}", self.peer_word())
            } else if peer_role == Some(Role::Standby) {
                format!("primary on {me}; standby on {peer} synchronizing")
            } else {
                format!("primary on {me}; waiting for {peer} to start the standby")
            };
            let state = if peer_online {
                VmState::Running
            } else {
                VmState::Simplex
            };
            return (state, self.with_note(vm, why));
        }

        // The owner is the peer.
        if ft {
            if let Some(Role::Primary) = local_role {
                // A planned swap: the peer handed the VM over (its report lags).
                let peer_primary = peer_online
                    && !self.vms[vm].swapped_in
                    && peer_vmm.is_some_and(|p| {
                        p.role == Some(Role::Primary)
                            || (p.role == Some(Role::Standby) && p.failed_over)
                    });
                // Our own planned swap handed the VM to the peer: its takeover can be
                // seen before our VMM's "swapped out" line; not a split brain. (A swap
                // that failed clears `swap_sent`, and the check below applies again.)
                if peer_primary && self.vms[vm].swap_sent {
                    return (
                        VmState::Protected,
                        format!(
                            "role swap: {peer} takes the VM over, the VMM here becomes its standby"
                        ),
                    );
                }
                // A peer in maintenance is stopping its copy (a planned move, its
                // report may still show it): ours is the one that goes on.
                if peer_primary && !self.in_maintenance(&peer) {
                    // Our standby took over from a primary (a standby there that took
                    // over itself, or swapped in) the peer still reports protected, i.e.
                    // paired with the standby that just left the pair: the
                    // report predates the primary's end (its exit, or its loss of the
                    // standby, which the peer reports next). Not a split brain until a
                    // report says that primary runs on alone.
                    let report_lags = self.vms[vm].local.as_ref().is_some_and(|l| l.failed_over)
                        && peer_vmm.is_some_and(|p| p.protected);
                    if report_lags {
                        return (
                            VmState::Pending,
                            format!(
                                "took over from {peer}; waiting for {peer}'s report that its primary ended"
                            ),
                        );
                    }
                    // Both nodes run it (our standby took over while the owner lived:
                    // the A-Links were cut, or a partition healed). The record decides:
                    // the owner's copy stays, ours stops.
                    if !self.vms[vm].stop_sent {
                        out.push(log(
                            Some(vm),
                            format!(
                                "split brain: both nodes ran it; the record names {peer} the owner: stopping the copy here (its disk needs a resync)"
                            ),
                        ));
                    }
                    self.stop_local(vm, false, out);
                    return (
                        VmState::Stopping,
                        format!(
                            "split brain resolved for {peer}, the owner: stopping the copy here"
                        ),
                    );
                }
                // The record names the peer again after our takeover (with this
                // VMM) made us the owner: the peer claims it too. Wait for its report:
                // the split brain rule above decides if it runs a copy.
                let pid = self.vms[vm].local.as_ref().map(|l| l.pid);
                if !peer_online && pid.is_some() && self.vms[vm].took_over_pid == pid {
                    return (
                        VmState::Pending,
                        format!(
                            "took over, but the record names {peer} the owner again: waiting for {peer}'s report"
                        ),
                    );
                }
                // Our standby took over: the record must follow, under the quorum.
                return self.takeover(vm, rec, out);
            }
            if local_role == Some(Role::Standby) {
                if self.vms[vm].stop_sent {
                    return (VmState::Stopping, self.vms[vm].note.clone());
                }
                return if !peer_online {
                    (
                        VmState::Simplex,
                        format!(
                            "{peer} is {}; the standby here takes over when the A-Links confirm",
                            self.peer_word()
                        ),
                    )
                } else if peer_vmm.is_some_and(|p| p.protected) {
                    (
                        VmState::Protected,
                        format!("primary on {peer}, standby on {me} in sync"),
                    )
                } else {
                    (
                        VmState::Running,
                        format!("primary on {peer}; standby on {me} synchronizing"),
                    )
                };
            }
            if !peer_online {
                return (
                    VmState::Down,
                    format!(
                        "its owner {peer} is {} and no standby ran here",
                        self.peer_word()
                    ),
                );
            }
            self.spawn(vm, Role::Standby, out);
            return (VmState::Starting, format!("starting the standby on {me}"));
        }
        if local_role.is_some() {
            // An unprotected copy here while the record says the peer owns it.
            self.stop_local(vm, false, out);
            return (
                VmState::Stopping,
                format!("its owner is {peer}: stopping the copy here"),
            );
        }
        if !peer_online {
            let why = format!(
                "{peer} is {}: unprotected VMs are not failed over; it comes back with {peer}{}",
                self.peer_word(),
                if rec.spec.autostart {
                    " (autostart)"
                } else {
                    " if started again (autostart is off)"
                }
            );
            return (VmState::Down, why);
        }
        match peer_role {
            Some(_) => (VmState::Running, format!("running on {peer}")),
            None => (VmState::Starting, format!("{peer} is starting it")),
        }
    }

    /// Our FT/HA standby took over from the lost owner: ask the quorum, then own it.
    fn takeover(&mut self, vm: &str, rec: &VmRecord, out: &mut Vec<Action>) -> (VmState, String) {
        let me = self.me.clone();
        let s = slot_mut(&mut self.vms, vm);
        match s.takeover.clone() {
            Grant::None => {
                s.takeover = Grant::Asked;
                out.push(Action::AskQuorum {
                    vm: vm.into(),
                    kind: QuorumKind::Takeover,
                });
                (
                    VmState::Simplex,
                    "took over; asking the quorum to own it".into(),
                )
            }
            Grant::Asked => (VmState::Simplex, "took over; waiting for the quorum".into()),
            Grant::Denied(why, at) if self.now < at + QUORUM_RETRY_MS => (
                VmState::Simplex,
                format!("took over but the quorum refused ownership: {why}"),
            ),
            Grant::Denied(..) => {
                s.takeover = Grant::Asked;
                out.push(Action::AskQuorum {
                    vm: vm.into(),
                    kind: QuorumKind::Takeover,
                });
                (
                    VmState::Simplex,
                    "took over; asking the quorum again to own it".into(),
                )
            }
            Grant::Granted => {
                s.takeover = Grant::None;
                s.swapped_in = false;
                s.took_over_pid = s.local.as_ref().map(|l| l.pid);
                let mut r = rec.clone();
                r.owner = Some(me.clone());
                out.push(log(Some(vm), format!("owner is now {me} (takeover)")));
                out.push(self.write(r));
                (VmState::Simplex, format!("took over on {me}"))
            }
        }
    }

    fn peer_word(&self) -> &'static str {
        match self.peer_state {
            PeerState::Unknown => "not seen yet",
            PeerState::Online => "online",
            PeerState::Lost => "lost",
        }
    }

    fn with_note(&self, vm: &str, why: String) -> String {
        let note = &self.vms[vm].note;
        if note.is_empty() || note.starts_with("placed") {
            why
        } else {
            format!("{why} ({note})")
        }
    }

    /// Invariants; panics name the broken one.
    pub fn check(&self) {
        assert!(
            self.applied.len() <= MAX_APPLIED && self.applied_order.len() == self.applied.len()
        );
        for (name, s) in &self.vms {
            assert_eq!(name, &s.record.spec.name, "slot keyed by its record's name");
            assert!(
                !(s.spawn_sent && s.local.is_some()),
                "{name}: spawn in flight with a VMM running"
            );
            assert!(
                s.crashes.len() <= self.policy.max_restart as usize,
                "{name}: crash budget"
            );
            if let Some(l) = &s.local {
                if l.acting() == Role::Solo
                    && !s.stop_sent
                    && !s.record.deleted
                    && s.record.desired == Desired::Running
                {
                    assert_eq!(
                        s.record.owner.as_deref(),
                        Some(self.me.as_str()),
                        "{name}: a solo VMM runs only on its owner"
                    );
                }
            }
            assert!(
                s.record.deleted
                    || (s.done_restart <= s.record.restart_seq
                        && s.done_clear <= s.record.clear_seq),
                "{name}: a counter step done that the record does not hold (done {}/{}, record {}/{})",
                s.done_restart,
                s.done_clear,
                s.record.restart_seq,
                s.record.clear_seq
            );
        }
    }
}

fn log(vm: Option<&str>, msg: String) -> Action {
    Action::Log {
        vm: vm.map(str::to_owned),
        msg,
    }
}

fn done(vm: &str, s: &Slot) -> Action {
    Action::Done {
        vm: vm.into(),
        done: Done {
            created: s.incarnation.clone(),
            restart: s.done_restart,
            failback: s.done_failback,
            clear: s.done_clear,
            demoted: s.demoted,
        },
    }
}

/// The slot of `vm`, which every caller created first: a missing one is a bug in this
/// step function, never input (the map is indexed the same way elsewhere).
#[allow(clippy::expect_used)]
fn slot_mut<'a>(vms: &'a mut BTreeMap<String, Slot>, vm: &str) -> &'a mut Slot {
    vms.get_mut(vm).expect("slot exists")
}
