//! The node-side quorum state machine for one protected VM: pure (events in, actions
//! out, the node's monotonic time passed in), so the pair runtime, the unit tests and
//! the simulation all run this same code.
//!
//! What it decides (issue 14, items 2, 4 and 6):
//! - **which witness is elected**: while the PMs talk, the primary proposes the
//!   preferred witness when both reach it (stable for `preferred_stable`), else the
//!   alternate when both reach that; the standby records it and acknowledges. A
//!   partitioned standby asks only its recorded elected witness; the holder keeps a
//!   lease at every witness the peer may be using (`peer_may_use`), so a switch that a
//!   partition cuts in half is still safe;
//! - **the output gate and the guest**: FT with acknowledgements while protected;
//!   unacknowledged release (simplex) only while the witness lease is valid on the
//!   node's own clock (measured from the SEND time of the last granted renewal minus a
//!   margin, see `timing`) and only once the witness has recorded that the peer's replica
//!   is stale; otherwise hold, and pause the guest when neither the peer nor a lease is
//!   left;
//! - **takeover**: a standby that lost the peer asks its elected witness for generation
//!   g+1 (compare-and-set) and takes over only with the grant;
//! - **losing**: a node that learns a higher generation (from the witness or the peer)
//!   discards its held output and rejoins as standby;
//! - **no witness**: today's behaviour with a loud warning, or a static preference; and
//!   an audited manual override;
//! - **the lease handover of a planned role swap** (issue 15): the primary gives its
//!   lease up at every witness its peer may ask ([`SwapEvent::Begin`]: from then on it
//!   may release nothing without acknowledgement, its gate is FT's or `Hold`) and says
//!   so ([`HandoverNote::Released`]); only then does the swap pause its guest. The
//!   standby, asked to take the VM over at the swap point, takes generation g+1 from
//!   its elected witness by compare-and-set ([`SwapEvent::Acquire`]) and resumes the VM
//!   only with the grant (`Action::TakeOver`); a refusal or no answer
//!   ([`HandoverNote::Refused`]) leaves the VM to the old primary, which renews its
//!   lease again ([`SwapEvent::End`]). The old primary of a completed swap runs on as
//!   the standby at its generation (no `Demote`: it lost nothing).

use std::collections::BTreeSet;
use std::time::Duration;

use crate::timing::Timing;
use crate::types::{next_generation, Generation, NodeId, Role, Slot};
use crate::witness::ops::{Reply, Request};

/// How the pair decides without its peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A preferred witness, and an alternate if `alternate`.
    Witness { alternate: bool },
    /// No witness, today's behaviour: a node that loses its peer runs alone (a primary
    /// goes simplex, a standby takes over). If all paths are cut with both PMs alive,
    /// TWO copies run; loudly warned at start and at every takeover.
    NoWitness,
    /// No witness, static preference: the `preferred` node keeps running (or takes over
    /// after `lease_ttl` of silence); the other never runs alone on link loss.
    StaticPreference { preferred: NodeId },
}

/// Deliberate bugs for the simulation's mutation tests.
#[cfg(feature = "mutations")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeMutations {
    /// The primary keeps releasing (and running) after its lease expired.
    pub keep_releasing_after_expiry: bool,
    /// Lease validity = the full TTL: no margin, no drift allowance.
    pub no_margin: bool,
    /// The lease is measured from the reply's arrival instead of the request's send.
    pub measure_from_reply: bool,
    /// Simplex without waiting for the witness to record the peer's replica as stale.
    pub ignore_outdated: bool,
    /// A partitioned standby asks any witness it reaches, not only the elected one.
    pub any_witness: bool,
    /// The holder renews only at its own elected witness (ignores `peer_may_use`).
    pub renew_elected_only: bool,
    /// Keep believing the peer is marked outdated after sending a renewal that clears
    /// the mark, until that renewal is answered.
    pub keep_outdated_belief: bool,
    /// Take a takeover grant as the peer-outdated mark (release alone before the
    /// renewal that sets it is granted).
    pub trust_takeover_mark: bool,
}

/// Static configuration of one node for one VM.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub vm: String,
    pub node: NodeId,
    pub peer: NodeId,
    pub mode: Mode,
    pub timing: Timing,
    #[cfg(feature = "mutations")]
    pub mutations: NodeMutations,
}

/// Why a [`NodeConfig`] cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("node ids {0} and {1} must differ in parity (one odd, one even): generations name their holder by parity")]
    Parity(u64, u64),
    #[error("{0}")]
    Timing(#[from] crate::timing::TimingError),
    #[error("{0}")]
    Name(String),
}

impl NodeConfig {
    /// Checks the ids, the VM name and the timing.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.0 % 2 == self.peer.0 % 2 {
            return Err(ConfigError::Parity(self.node.0, self.peer.0));
        }
        crate::types::check_name("VM name", &self.vm).map_err(ConfigError::Name)?;
        self.timing.validate()?;
        Ok(())
    }

    pub fn new(vm: &str, node: NodeId, peer: NodeId, mode: Mode) -> NodeConfig {
        NodeConfig {
            vm: vm.to_string(),
            node,
            peer,
            mode,
            timing: Timing::default(),
            #[cfg(feature = "mutations")]
            mutations: NodeMutations::default(),
        }
    }
}

/// What the node remembered across its last run (recorded through
/// [`Action::RecordElected`] and the generation actions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Start {
    pub role: Role,
    /// The generation held or last known (0: never granted).
    pub generation: Generation,
    /// The recorded elected witness and its election sequence (None: preferred, 0).
    pub elected: Option<(Slot, u64)>,
}

/// A quorum message between the two nodes (carried on the A-Link/priv0 by the runtime).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PeerMsg {
    /// Sent every `status_interval`.
    Status {
        generation: Generation,
        role: Role,
        /// Which witnesses the sender reaches (preferred, alternate).
        reach: [bool; 2],
        /// The sender's recorded elected witness, and the last election sequence it
        /// processed.
        elected: Slot,
        elect_seq: u64,
        /// The sender's election proposal not yet acknowledged: it records it when the
        /// acknowledgement arrives, so it may use either.
        proposing: Option<Slot>,
    },
    /// Primary to standby: record `slot` as the elected witness.
    Elect { slot: Slot, seq: u64 },
    /// Standby to primary: recorded.
    ElectAck { seq: u64 },
}

/// Inputs to the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Time passed (call at [`QuorumNode::next_wakeup`] at the latest).
    Tick,
    /// The peer is reachable on at least one path (any A-Link or priv0), or on none.
    PeerReachable(bool),
    /// Primary: the standby committed a checkpoint of this session and acknowledges
    /// (true), or protection ended (false). Standby: it holds a committed replica
    /// (true), or it does not (false: a new session is resyncing it).
    Protected(bool),
    /// A quorum message from the peer.
    FromPeer(PeerMsg),
    /// The answer to witness request `id`.
    WitnessReply { slot: Slot, id: u64, reply: Reply },
    /// The operator asserts that the peer is dead (audited).
    ManualOverride { operator: String, reason: String },
    /// A planned role swap's lease handover (see the module docs).
    Swap(SwapEvent),
}

/// The steps of a planned role swap the runtime tells the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwapEvent {
    /// Primary: an operator asked for a swap. Give the lease up at every witness the
    /// peer may ask; [`HandoverNote::Released`] when all did, or
    /// [`HandoverNote::Refused`].
    Begin,
    /// Primary: the swap is over: the standby accepted it (`done`: this node runs on
    /// as the standby at its generation) or it did not happen (the lease is renewed at
    /// once: the witness's answer, `Granted` or `Lost`, is what says who holds the VM).
    End { done: bool },
    /// Standby: the primary handed the VM over at the swap point: ask the elected
    /// witness for the next generation now (`Action::TakeOver` with the grant, else
    /// [`HandoverNote::Refused`]).
    Acquire,
    /// Standby: the swap was refused here (no grant in time). A grant that still comes
    /// is a takeover grant like any other (the fencing generations demote the old
    /// primary): documented, never two holders.
    AcquireAbandoned,
}

/// What the machine says of a planned swap's lease handover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandoverNote {
    /// Primary: every lease is given up; the swap may pause the guest and hand over.
    Released,
    /// Either side: the handover cannot go on (why, for the operator).
    Refused(String),
    /// Primary mid-handover: the peer holds `generation` (it took the VM over at the
    /// swap point): this node is its standby now.
    PeerTook { generation: Generation },
}

/// What the runtime may do with held guest output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputGate {
    /// Release nothing.
    Hold,
    /// Release only output of checkpoints the standby acknowledged (FT).
    Acked,
    /// Release without acknowledgements, but only while the node's monotonic clock is
    /// before `until` (None: no limit; no-witness modes and manual override). The
    /// runtime checks `until` itself before every release: the permission expires even
    /// if the machine is not stepped in time.
    Free { until: Option<Duration> },
}

/// What the guest should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestState {
    Run,
    Pause,
}

/// Kinds of operator alerts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertKind {
    NoWitness,
    WitnessUnreachable(Slot),
    WitnessReachable(Slot),
    Elected(Slot),
    Simplex,
    Paused,
    Resumed,
    TakeOver,
    TakeoverRefused,
    Lost,
    WitnessRefused,
    ManualOverride,
    Handover,
}

/// An alert for the operator (the runtime logs it and forwards it to notifications).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub kind: AlertKind,
    pub message: String,
}

/// Outputs the runtime must obey, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// The output gate changed.
    Output(OutputGate),
    /// Run or pause the guest (primary only).
    Guest(GuestState),
    /// Standby: run the VM from the replica as primary of `generation` (stamp it on the
    /// A-Link session, every checkpoint and the storage-mirror metadata).
    TakeOver {
        generation: Generation,
    },
    /// Primary that lost: discard held output, stop the VM and rejoin as standby of the
    /// peer at `generation` (the disk becomes the resync target).
    Demote {
        generation: Generation,
    },
    /// Record (durably) that this node now knows `generation` (held or the peer's).
    Generation(Generation),
    /// Send `request` (id `id`) to witness `slot`; answer with [`Event::WitnessReply`].
    ToWitness {
        slot: Slot,
        id: u64,
        request: Request,
    },
    /// Send to the peer (dropped if unreachable).
    ToPeer(PeerMsg),
    /// Record (durably, before the next action) the elected witness.
    RecordElected {
        slot: Slot,
        seq: u64,
    },
    Alert(Alert),
    /// A step of a planned swap's lease handover.
    Handover(HandoverNote),
    /// Write to the audit log.
    Audit {
        operator: String,
        what: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Asked {
    Renew { outdated: bool },
    Acquire { from: Generation },
    Query,
    Release,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    id: u64,
    slot: Slot,
    sent_at: Duration,
    asked: Asked,
}

#[derive(Clone, Copy, Debug)]
struct Lease {
    generation: Generation,
    valid_until: Duration,
    /// The witness recorded the peer's replica as stale (confirmed by the newest
    /// granted renewal).
    peer_outdated: bool,
    confirmed_id: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct SlotState {
    last_sent: Option<Duration>,
    answered: bool,
    last_reply: Option<Duration>,
    reachable: bool,
    lease: Option<Lease>,
}

#[derive(Clone, Copy, Debug)]
struct PeerView {
    at: Duration,
    role: Role,
    reach: [bool; 2],
}

/// Most witness requests remembered as unanswered.
const MAX_PENDING: usize = 32;

/// The machine. See the module docs.
#[derive(Debug)]
pub struct QuorumNode {
    cfg: NodeConfig,
    validity: Duration,
    role: Role,
    generation: Generation,
    peer_reachable: bool,
    protected: bool,
    slots: [SlotState; 2],
    pending: Vec<Pending>,
    next_id: u64,
    elected: Slot,
    /// The election sequence of the recorded `elected`.
    elect_seq: u64,
    /// The highest election sequence seen anywhere (a new proposal goes above it).
    max_seq: u64,
    /// Our election message not yet reflected by the peer: (slot, seq).
    proposal: Option<(Slot, u64)>,
    /// Highest election sequence we sent (Elect or ElectAck).
    sent_elect_seq: u64,
    /// Where the peer may ask for a takeover: the holder keeps a lease at each.
    peer_may_use: BTreeSet<Slot>,
    peer: Option<PeerView>,
    preferred_both_since: Option<Duration>,
    last_status: Option<Duration>,
    acquire_not_before: Duration,
    /// Per slot: the id of an Acquire that may still be granted (no answer to it or to
    /// a later request to that witness yet). A standby does not change its elected
    /// witness while one is out: the holder would stop keeping a lease where a grant
    /// can still happen.
    acquire_unsettled: [Option<u64>; 2],
    peer_lost_at: Option<Duration>,
    /// Manual override in force (until the peer is back).
    overridden: bool,
    /// Primary: a swap's handover is under way: the witnesses whose `Released` is
    /// still awaited (empty: all given up). No renewal is sent meanwhile.
    handover: Option<BTreeSet<Slot>>,
    /// Standby: the acquire asked for a planned swap (slot, id).
    swap_acquire: Option<(Slot, u64)>,
    gate: Option<OutputGate>,
    guest: Option<GuestState>,
    outdated_alerted: bool,
    started: bool,
}

impl QuorumNode {
    /// A node starting at `now` with what it recorded before.
    pub fn new(cfg: NodeConfig, start: Start) -> QuorumNode {
        #[allow(unused_mut)]
        let mut validity = cfg.timing.local_validity();
        #[cfg(feature = "mutations")]
        if cfg.mutations.no_margin {
            validity = cfg.timing.lease_ttl;
        }
        let (elected, elect_seq) = start.elected.unwrap_or((Slot::Preferred, 0));
        let slots_cfg = match cfg.mode {
            Mode::Witness { alternate: true } => Slot::ALL.iter().copied().collect(),
            Mode::Witness { alternate: false } => [Slot::Preferred].into_iter().collect(),
            _ => BTreeSet::new(),
        };
        QuorumNode {
            validity,
            role: start.role,
            generation: start.generation,
            peer_reachable: false,
            protected: false,
            slots: [SlotState::default(); 2],
            pending: Vec::new(),
            next_id: 1,
            elected,
            elect_seq,
            max_seq: elect_seq,
            proposal: None,
            sent_elect_seq: elect_seq,
            // Unknown until the peer tells us: it may use any configured witness.
            peer_may_use: slots_cfg,
            peer: None,
            preferred_both_since: None,
            last_status: None,
            acquire_not_before: Duration::ZERO,
            acquire_unsettled: [None; 2],
            peer_lost_at: None,
            overridden: false,
            handover: None,
            swap_acquire: None,
            gate: None,
            guest: None,
            outdated_alerted: false,
            started: false,
            cfg,
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }
    pub fn generation(&self) -> Generation {
        self.generation
    }
    pub fn elected(&self) -> Slot {
        self.elected
    }
    /// The gate last emitted (None before the first step).
    pub fn gate(&self) -> Option<OutputGate> {
        self.gate
    }
    pub fn guest(&self) -> Option<GuestState> {
        self.guest
    }
    pub fn witness_reachable(&self, slot: Slot) -> bool {
        self.slots[slot.index()].reachable
    }
    pub fn peer_reachable(&self) -> bool {
        self.peer_reachable
    }

    /// Whether output may leave without acknowledgement at `now` (what the runtime's
    /// release path checks, independent of stepping).
    pub fn may_release_unacked(&self, now: Duration) -> bool {
        match self.gate {
            Some(OutputGate::Free { until }) => until.is_none_or(|u| now < u),
            _ => false,
        }
    }

    /// A status for logs and `--json` views.
    pub fn status(&self, now: Duration) -> NodeStatus {
        NodeStatus {
            role: self.role,
            generation: self.generation,
            elected: self.elected,
            peer_reachable: self.peer_reachable,
            protected: self.protected,
            witness_reachable: [self.slots[0].reachable, self.slots[1].reachable],
            lease_left: [0, 1].map(|i| {
                self.slots[i]
                    .lease
                    .filter(|l| l.generation == self.generation)
                    .map(|l| l.valid_until.saturating_sub(now))
            }),
            gate: self.gate,
            guest: self.guest,
            overridden: self.overridden,
        }
    }

    fn configured(&self) -> impl Iterator<Item = Slot> + '_ {
        Slot::ALL.into_iter().filter(move |s| match self.cfg.mode {
            Mode::Witness { alternate } => *s == Slot::Preferred || alternate,
            _ => false,
        })
    }

    /// The latest moment the machine must be stepped again (`Event::Tick`).
    pub fn next_wakeup(&self, now: Duration) -> Duration {
        let t = &self.cfg.timing;
        let mut w = now + t.status_interval.min(t.renew_interval);
        if self.role == Role::Standby && self.acquire_not_before > now {
            w = w.min(self.acquire_not_before);
        }
        for s in self.configured() {
            let st = &self.slots[s.index()];
            if let Some(l) = st.lease {
                if l.valid_until > now {
                    w = w.min(l.valid_until);
                }
            }
            if let Some(sent) = st.last_sent {
                let d = if st.answered {
                    t.renew_interval
                } else {
                    t.retry
                };
                w = w.min((sent + d).max(now));
            }
        }
        w.max(now)
    }

    /// Feeds one event at `now` (non-decreasing) and returns the actions to carry out,
    /// in order.
    pub fn step(&mut self, now: Duration, ev: Event) -> Vec<Action> {
        let mut out = Vec::new();
        if !self.started {
            self.started = true;
            match self.cfg.mode {
                Mode::NoWitness => alert(
                    &mut out,
                    AlertKind::NoWitness,
                    "NO QUORUM WITNESS: if every path between the PMs is cut while both are \
                     alive, both run the VM (split brain); configure a witness or a static \
                     preference"
                        .into(),
                ),
                Mode::StaticPreference { preferred } => alert(
                    &mut out,
                    AlertKind::NoWitness,
                    format!(
                        "no quorum witness: static preference for {preferred}; the other node \
                         never runs alone on link loss"
                    ),
                ),
                Mode::Witness { .. } => {}
            }
        }
        match ev {
            Event::Tick => {}
            Event::PeerReachable(r) => {
                if r != self.peer_reachable {
                    self.peer_reachable = r;
                    if r {
                        self.overridden = false;
                        self.peer_lost_at = None;
                    } else {
                        self.peer_lost_at = Some(now);
                        self.peer = None;
                        self.preferred_both_since = None;
                        if self.role == Role::Primary {
                            self.protected = false;
                        }
                        // Ask the witness at once (renewal with the peer marked stale, or
                        // the takeover), not at the next period.
                        for s in &mut self.slots {
                            s.last_sent = None;
                        }
                    }
                }
            }
            Event::Protected(p) => {
                if p != self.protected {
                    self.protected = p;
                    for s in &mut self.slots {
                        s.last_sent = None;
                    }
                }
            }
            Event::FromPeer(m) => self.on_peer(now, m, &mut out),
            Event::WitnessReply { slot, id, reply } => {
                self.on_reply(now, slot, id, reply, &mut out)
            }
            Event::ManualOverride { operator, reason } => {
                self.on_override(now, operator, reason, &mut out)
            }
            Event::Swap(e) => self.on_swap(now, e, &mut out),
        }
        self.evaluate(now, &mut out);
        out
    }

    fn on_override(
        &mut self,
        _now: Duration,
        operator: String,
        reason: String,
        out: &mut Vec<Action>,
    ) {
        if self.peer_reachable {
            out.push(Action::Audit {
                operator,
                what: format!("manual override REFUSED (the peer is reachable): {reason}"),
            });
            return;
        }
        out.push(Action::Audit {
            operator: operator.clone(),
            what: format!(
                "manual override: peer declared dead by the operator as {} of generation {}: {reason}",
                match self.role {
                    Role::Primary => "primary",
                    Role::Standby => "standby",
                },
                self.generation
            ),
        });
        alert(
            out,
            AlertKind::ManualOverride,
            format!("manual override by {operator}: running without quorum ({reason})"),
        );
        self.overridden = true;
        if self.role == Role::Standby {
            if let Some(g) = next_generation(self.generation, self.cfg.node) {
                self.take_over(g, out);
            }
        }
    }

    /// Whether a swap's handover is under way on this primary (no lease is held).
    pub fn handing_over(&self) -> bool {
        self.handover.is_some()
    }

    fn on_swap(&mut self, now: Duration, e: SwapEvent, out: &mut Vec<Action>) {
        let refuse = |out: &mut Vec<Action>, why: &str| {
            out.push(Action::Handover(HandoverNote::Refused(why.to_string())));
        };
        let witness = matches!(self.cfg.mode, Mode::Witness { .. });
        match e {
            SwapEvent::Begin => {
                if !witness {
                    return refuse(out, "no witness is configured: no lease to hand over");
                }
                if self.role != Role::Primary || self.generation == 0 {
                    return refuse(out, "this node is not the primary holding a generation");
                }
                if !(self.protected && self.peer_reachable) {
                    return refuse(out, "the pair is not in sync (no acknowledging standby)");
                }
                if self.handover.is_some() {
                    return refuse(out, "a handover is under way already");
                }
                // From here on nothing leaves without an acknowledgement: the leases
                // are forgotten before the first release is sent (the gate is FT's
                // while the standby acknowledges, else Hold and Pause).
                let slots = self.lease_set();
                for st in &mut self.slots {
                    st.lease = None;
                }
                self.handover = Some(slots.clone());
                for slot in slots {
                    self.send(now, slot, Asked::Release, out);
                }
            }
            SwapEvent::End { done } => {
                if self.handover.take().is_none() || self.role != Role::Primary {
                    return;
                }
                if done {
                    alert(
                        out,
                        AlertKind::Handover,
                        format!(
                            "planned role swap done: the peer runs the VM; this node is its                              standby (generation {} until the peer's grant is seen)",
                            self.generation
                        ),
                    );
                    self.role = Role::Standby;
                    self.protected = false;
                    self.gate = None;
                    self.guest = None;
                } else {
                    // Renew at once everywhere: `Granted` means the peer holds nothing
                    // newer (and its acquire is `Busy` while this lease runs), `Lost`
                    // demotes this node.
                    for s in &mut self.slots {
                        s.last_sent = None;
                    }
                }
            }
            SwapEvent::Acquire => {
                if !witness {
                    return refuse(out, "no witness is configured");
                }
                if self.role != Role::Standby || !self.protected || self.generation == 0 {
                    return refuse(
                        out,
                        "this node is not a standby with a committed replica of a granted                          generation",
                    );
                }
                if self.swap_acquire.is_some() {
                    return refuse(out, "a swap's acquire is out already");
                }
                let slot = self.elected;
                let id = self.next_id;
                self.send(
                    now,
                    slot,
                    Asked::Acquire {
                        from: self.generation,
                    },
                    out,
                );
                self.swap_acquire = Some((slot, id));
            }
            SwapEvent::AcquireAbandoned => self.swap_acquire = None,
        }
    }

    fn on_peer(&mut self, now: Duration, m: PeerMsg, out: &mut Vec<Action>) {
        match m {
            PeerMsg::Status {
                generation,
                role,
                reach,
                elected,
                elect_seq,
                proposing,
            } => {
                if generation > self.generation {
                    self.learn(generation, "the peer", out);
                }
                self.max_seq = self.max_seq.max(elect_seq);
                if elect_seq >= self.sent_elect_seq {
                    // The peer recorded everything we sent: it uses `elected` (or the
                    // slot it proposes, once acknowledged) only.
                    self.peer_may_use = [elected].into_iter().chain(proposing).collect();
                    if let Some((slot, seq)) = self.proposal {
                        if elect_seq >= seq && elected == slot && self.role == Role::Primary {
                            // Recorded by the peer but the ack was lost: done.
                            self.proposal = None;
                            self.elected = slot;
                            self.elect_seq = seq;
                            out.push(Action::RecordElected { slot, seq });
                        }
                    }
                } else {
                    self.peer_may_use.insert(elected);
                    self.peer_may_use.extend(proposing);
                }
                if self.peer_reachable {
                    self.peer = Some(PeerView {
                        at: now,
                        role,
                        reach,
                    });
                }
            }
            PeerMsg::Elect { slot, seq } => {
                if self.role == Role::Primary || self.acquire_unsettled.iter().any(Option::is_some)
                {
                    // Only a standby follows; and not while a takeover it asked for may
                    // still be granted at the witness it would leave (the primary asks
                    // again).
                    return;
                }
                self.max_seq = self.max_seq.max(seq);
                if seq > self.elect_seq {
                    self.elect_seq = seq;
                    if slot != self.elected {
                        self.elected = slot;
                        alert(
                            out,
                            AlertKind::Elected(slot),
                            format!("elected witness: {slot}"),
                        );
                    }
                    out.push(Action::RecordElected { slot, seq });
                }
                if seq == self.elect_seq && slot == self.elected {
                    // The primary records `slot` when this arrives.
                    self.peer_may_use.insert(slot);
                    self.sent_elect_seq = self.sent_elect_seq.max(seq);
                    out.push(Action::ToPeer(PeerMsg::ElectAck { seq }));
                }
            }
            PeerMsg::ElectAck { seq } => {
                if let Some((slot, s)) = self.proposal {
                    if s == seq {
                        self.proposal = None;
                        if self.elected != slot {
                            self.elected = slot;
                            alert(
                                out,
                                AlertKind::Elected(slot),
                                format!("elected witness: {slot}"),
                            );
                        }
                        self.elect_seq = seq;
                        out.push(Action::RecordElected { slot, seq });
                        // The peer processed `seq`: it uses `slot` only.
                        self.peer_may_use = [slot].into_iter().collect();
                    }
                }
            }
        }
    }

    fn learn(&mut self, generation: Generation, from: &str, out: &mut Vec<Action>) {
        if generation <= self.generation {
            return;
        }
        self.generation = generation;
        for s in &mut self.slots {
            s.lease = None;
        }
        if self.role == Role::Primary
            && self.handover.is_some()
            && crate::types::held_by(generation, self.cfg.peer)
        {
            // The handover's outcome: the peer took the VM at the swap point with the
            // next generation. This node lost nothing; it is the peer's standby.
            self.handover = None;
            self.role = Role::Standby;
            self.protected = false;
            self.gate = None;
            self.guest = None;
            out.push(Action::Output(OutputGate::Hold));
            out.push(Action::Guest(GuestState::Pause));
            out.push(Action::Generation(generation));
            out.push(Action::Handover(HandoverNote::PeerTook { generation }));
            return;
        }
        self.handover = None;
        if self.role == Role::Primary {
            self.role = Role::Standby;
            self.protected = false;
            self.overridden = false;
            self.gate = None;
            self.guest = None;
            alert(
                out,
                AlertKind::Lost,
                format!(
                    "{from} holds generation {generation}: this node lost; its held output is \
                     discarded and it rejoins as standby (its disk becomes the resync target)"
                ),
            );
            out.push(Action::Output(OutputGate::Hold));
            out.push(Action::Guest(GuestState::Pause));
            out.push(Action::Demote { generation });
        } else {
            out.push(Action::Generation(generation));
        }
    }

    fn take_over(&mut self, generation: Generation, out: &mut Vec<Action>) {
        // A swap's acquire answered by an earlier copy of it: nothing more to wait for.
        self.swap_acquire = None;
        self.role = Role::Primary;
        self.generation = generation;
        self.protected = false;
        self.gate = None;
        self.guest = None;
        alert(
            out,
            AlertKind::TakeOver,
            format!("taking over the VM as primary of generation {generation}"),
        );
        out.push(Action::TakeOver { generation });
    }

    fn on_reply(
        &mut self,
        now: Duration,
        slot: Slot,
        id: u64,
        reply: Reply,
        out: &mut Vec<Action>,
    ) {
        let Some(i) = self
            .pending
            .iter()
            .position(|p| p.id == id && p.slot == slot)
        else {
            return; // late duplicate or unknown
        };
        let p = self.pending.remove(i);
        if self.acquire_unsettled[slot.index()].is_some_and(|a| a <= id) {
            self.acquire_unsettled[slot.index()] = None;
        }
        // Older requests to this slot can no longer be answered in order (the wire
        // refuses stale sequence numbers): forget them.
        self.pending.retain(|q| q.slot != slot || q.id > id);
        let st = &mut self.slots[slot.index()];
        st.answered = true;
        st.last_reply = Some(now);
        if !st.reachable {
            st.reachable = true;
            alert(
                out,
                AlertKind::WitnessReachable(slot),
                format!("{slot} reachable"),
            );
        }
        if let (Asked::Acquire { from }, Reply::Lost { generation, holder }) = (&p.asked, &reply) {
            if *holder == Some(self.cfg.node)
                && *from == self.generation
                && Some(*generation) == next_generation(*from, self.cfg.node)
            {
                // An earlier copy of this acquire was granted (its answer lost, or
                // behind this one's): the generation is this node's. No lease is counted
                // from it (the witness's began when that copy arrived, unknown here): a
                // renewal goes out at once and its grant starts one.
                self.swap_acquire = None;
                if self.role == Role::Standby {
                    self.take_over(*generation, out);
                } else {
                    self.generation = *generation;
                    out.push(Action::Generation(*generation));
                }
                self.slots[slot.index()].last_sent = None;
                return;
            }
        }
        if self.swap_acquire == Some((slot, id)) {
            self.swap_acquire = None;
            let why = match &reply {
                Reply::Granted { .. } => None,
                Reply::Busy {
                    holder,
                    retry_after_ms,
                    ..
                } => Some(format!(
                    "the {slot} says the lease of {} still runs ({retry_after_ms} ms left)",
                    holder.map_or("an unknown holder".to_string(), |h| h.to_string())
                )),
                Reply::Outdated { generation } => Some(format!(
                    "the {slot} holds this replica stale (generation {generation})"
                )),
                Reply::Lost { generation, .. } => {
                    Some(format!("the {slot} knows a newer generation {generation}"))
                }
                Reply::Refused(e) => Some(format!("the {slot} refused: {e}")),
                other => Some(format!("the {slot} answered {other:?}")),
            };
            if let Some(why) = why {
                out.push(Action::Handover(HandoverNote::Refused(format!(
                    "no grant of the next generation: {why}"
                ))));
                if let Reply::Lost { generation, .. } = reply {
                    self.learn(generation, &format!("the {slot}"), out);
                }
                return;
            }
        }
        if p.asked == Asked::Release {
            match reply {
                Reply::Released { .. } => {
                    if let Some(w) = self.handover.as_mut() {
                        if w.remove(&slot) && w.is_empty() {
                            out.push(Action::Handover(HandoverNote::Released));
                        }
                    }
                }
                Reply::Lost { generation, .. } => {
                    self.learn(generation, &format!("the {slot}"), out)
                }
                other => {
                    if self.handover.is_some() {
                        out.push(Action::Handover(HandoverNote::Refused(format!(
                            "the {slot} did not release the lease: {other:?}"
                        ))));
                    }
                }
            }
            return;
        }
        #[allow(unused_mut)]
        let mut base = p.sent_at;
        #[cfg(feature = "mutations")]
        if self.cfg.mutations.measure_from_reply {
            base = now;
        }
        match reply {
            Reply::Granted { generation, .. } => match p.asked {
                Asked::Renew { outdated } => {
                    // A renewal answered after a handover began gives no lease: the
                    // release that followed it ended it.
                    if generation == self.generation
                        && self.role == Role::Primary
                        && self.handover.is_none()
                    {
                        let valid_until = base + self.validity;
                        let st = &mut self.slots[slot.index()];
                        let l = st.lease.get_or_insert(Lease {
                            generation,
                            valid_until,
                            peer_outdated: outdated,
                            confirmed_id: id,
                        });
                        if l.generation != generation {
                            *l = Lease {
                                generation,
                                valid_until,
                                peer_outdated: outdated,
                                confirmed_id: id,
                            };
                        }
                        l.valid_until = l.valid_until.max(valid_until);
                        if id >= l.confirmed_id {
                            l.confirmed_id = id;
                            l.peer_outdated = outdated;
                        }
                    }
                }
                Asked::Acquire { from } => {
                    if Some(generation) != next_generation(from, self.cfg.node)
                        || from != self.generation
                    {
                        return;
                    }
                    let lease = Lease {
                        generation,
                        valid_until: base + self.validity,
                        // Not relied on until a renewal that sets it is granted (sent at
                        // once below): a takeover marks the previous holder's replica
                        // stale, but a node that held the previous generation itself (it
                        // restarted) keeps the peer's old status at the witness.
                        peer_outdated: self.trusts_takeover_mark(),
                        confirmed_id: id,
                    };
                    if self.role == Role::Standby {
                        self.take_over(generation, out);
                    } else {
                        // First grant of a fresh pair (from 0), or re-acquired.
                        self.generation = generation;
                        out.push(Action::Generation(generation));
                    }
                    self.slots[slot.index()].lease = Some(lease);
                    if from > 0 || self.role == Role::Primary {
                        // Ask the witness again at once: a renewal confirms the flag.
                        self.slots[slot.index()].last_sent = None;
                    }
                }
                Asked::Query | Asked::Release => {}
            },
            Reply::Lost { generation, .. } => self.learn(generation, &format!("the {slot}"), out),
            Reply::Busy { retry_after_ms, .. } => {
                if matches!(p.asked, Asked::Acquire { .. }) {
                    self.acquire_not_before =
                        now + Duration::from_millis(u64::from(retry_after_ms));
                }
            }
            Reply::Outdated { generation } => {
                if !self.outdated_alerted {
                    self.outdated_alerted = true;
                    alert(
                        out,
                        AlertKind::TakeoverRefused,
                        format!(
                            "the {slot} refuses the takeover: this replica is stale (the primary \
                             of generation {generation} ran without it); waiting for the primary \
                             or a manual override"
                        ),
                    );
                }
                self.acquire_not_before = now + self.cfg.timing.renew_interval;
            }
            Reply::State { generation, .. } => {
                if generation > self.generation {
                    self.learn(generation, &format!("the {slot}"), out);
                }
            }
            Reply::Refused(e) => alert(
                out,
                AlertKind::WitnessRefused,
                format!("the {slot} refused a request: {e}"),
            ),
            Reply::Released { .. } => {}
        }
    }

    /// Whether a takeover grant is taken as the peer-outdated mark (only the mutation).
    fn trusts_takeover_mark(&self) -> bool {
        #[cfg(feature = "mutations")]
        return self.cfg.mutations.trust_takeover_mark && self.role == Role::Standby;
        #[cfg(not(feature = "mutations"))]
        false
    }

    /// Where this node, as holder, must keep a lease.
    fn lease_set(&self) -> BTreeSet<Slot> {
        #[cfg(feature = "mutations")]
        if self.cfg.mutations.renew_elected_only {
            return [self.elected].into_iter().collect();
        }
        let mut s = self.peer_may_use.clone();
        if s.is_empty() {
            s.insert(self.elected);
        }
        s
    }

    fn wants_takeover(&self, now: Duration) -> bool {
        if self.role != Role::Standby || !self.protected {
            return false;
        }
        if !self.peer_reachable {
            return true;
        }
        // Both nodes standby (both restarted): the witness decides who runs.
        self.peer.is_some_and(|p| {
            p.role == Role::Standby
                && now.saturating_sub(p.at) < self.cfg.timing.status_interval * 3
        })
    }

    fn evaluate(&mut self, now: Duration, out: &mut Vec<Action>) {
        let t = self.cfg.timing;
        // Witness reachability.
        for s in self.configured().collect::<Vec<_>>() {
            let st = &mut self.slots[s.index()];
            let fresh = st
                .last_reply
                .is_some_and(|r| now.saturating_sub(r) < t.reach_timeout);
            if st.reachable && !fresh {
                st.reachable = false;
                alert(
                    out,
                    AlertKind::WitnessUnreachable(s),
                    format!("{s} unreachable (no answer for {:?})", t.reach_timeout),
                );
            }
        }
        // Status to the peer.
        if self
            .last_status
            .is_none_or(|l| now.saturating_sub(l) >= t.status_interval)
        {
            self.last_status = Some(now);
            out.push(Action::ToPeer(PeerMsg::Status {
                generation: self.generation,
                role: self.role,
                reach: [self.slots[0].reachable, self.slots[1].reachable],
                elected: self.elected,
                elect_seq: self.elect_seq,
                proposing: self.proposal.map(|p| p.0),
            }));
        }
        match self.cfg.mode {
            Mode::Witness { .. } => {
                self.elect(now, out);
                self.witness_requests(now, out);
            }
            Mode::NoWitness | Mode::StaticPreference { .. } => self.no_witness(now, out),
        }
        self.gate_and_guest(now, out);
    }

    /// The primary proposes a change of elected witness while both PMs talk.
    fn elect(&mut self, now: Duration, out: &mut Vec<Action>) {
        if self.cfg.mode != (Mode::Witness { alternate: true }) || self.role != Role::Primary {
            return;
        }
        let Some(p) = self.peer.filter(|p| {
            self.peer_reachable && now.saturating_sub(p.at) < self.cfg.timing.status_interval * 3
        }) else {
            return;
        };
        let both = |s: Slot| self.slots[s.index()].reachable && p.reach[s.index()];
        if both(Slot::Preferred) {
            self.preferred_both_since.get_or_insert(now);
        } else {
            self.preferred_both_since = None;
        }
        let target = match self.elected {
            Slot::Alternate
                if self
                    .preferred_both_since
                    .is_some_and(|s| now.saturating_sub(s) >= self.cfg.timing.preferred_stable) =>
            {
                Slot::Preferred
            }
            Slot::Preferred if !both(Slot::Preferred) && both(Slot::Alternate) => Slot::Alternate,
            e => e,
        };
        match self.proposal {
            // Resend until acknowledged.
            Some((slot, seq)) if self.last_status == Some(now) => {
                out.push(Action::ToPeer(PeerMsg::Elect { slot, seq }));
            }
            Some(_) => {}
            None if target != self.elected => {
                let seq = self.max_seq.max(self.elect_seq) + 1;
                self.max_seq = seq;
                self.proposal = Some((target, seq));
                self.sent_elect_seq = seq;
                self.peer_may_use.insert(target);
                out.push(Action::ToPeer(PeerMsg::Elect { slot: target, seq }));
            }
            None => {}
        }
    }

    fn send(&mut self, now: Duration, slot: Slot, asked: Asked, out: &mut Vec<Action>) {
        let id = self.next_id;
        self.next_id += 1;
        let lease_ms = self.cfg.timing.lease_ms();
        let vm = self.cfg.vm.clone();
        let request = match asked {
            Asked::Renew { outdated } => Request::Renew {
                vm,
                node: self.cfg.node,
                generation: self.generation,
                lease_ms,
                peer_outdated: outdated,
            },
            Asked::Acquire { from } => Request::Acquire {
                vm,
                node: self.cfg.node,
                from,
                lease_ms,
            },
            Asked::Query => Request::Query { vm },
            Asked::Release => Request::Release {
                vm,
                node: self.cfg.node,
                generation: self.generation,
            },
        };
        if self.pending.len() >= MAX_PENDING {
            self.pending.remove(0);
        }
        self.pending.push(Pending {
            id,
            slot,
            sent_at: now,
            asked,
        });
        if matches!(asked, Asked::Acquire { .. }) {
            self.acquire_unsettled[slot.index()] = Some(id);
        }
        let st = &mut self.slots[slot.index()];
        st.last_sent = Some(now);
        st.answered = false;
        if asked == (Asked::Renew { outdated: false }) {
            // This renewal clears the peer-outdated mark at the witness once it arrives,
            // whether or not its answer comes back: from now on the mark is not relied
            // on (and an answer to an older renewal that set it does not restore it).
            #[cfg(feature = "mutations")]
            let keep = self.cfg.mutations.keep_outdated_belief;
            #[cfg(not(feature = "mutations"))]
            let keep = false;
            if let Some(l) = st.lease.as_mut().filter(|_| !keep) {
                l.peer_outdated = false;
                l.confirmed_id = l.confirmed_id.max(id);
            }
        }
        out.push(Action::ToWitness { slot, id, request });
    }

    fn witness_requests(&mut self, now: Duration, out: &mut Vec<Action>) {
        let t = self.cfg.timing;
        let lease_set = self.lease_set();
        let takeover = self.wants_takeover(now);
        for slot in self.configured().collect::<Vec<_>>() {
            let st = self.slots[slot.index()];
            let due = match st.last_sent {
                None => true,
                Some(s) => {
                    let d = if st.answered {
                        t.renew_interval
                    } else {
                        t.retry
                    };
                    now.saturating_sub(s) >= d
                }
            };
            if self.role == Role::Standby {
                if let Some((s, _)) = self.swap_acquire.filter(|&(s, _)| s == slot) {
                    // A swap's acquire unanswered: ask again (its answer, or the
                    // first one's, decides).
                    if due {
                        let id = self.next_id;
                        self.send(
                            now,
                            s,
                            Asked::Acquire {
                                from: self.generation,
                            },
                            out,
                        );
                        self.swap_acquire = Some((s, id));
                    }
                    continue;
                }
            }
            if self.role == Role::Primary {
                if let Some(waiting) = &self.handover {
                    // No renewal while the lease is handed over: only the releases
                    // not yet answered, again.
                    if due && waiting.contains(&slot) {
                        self.send(now, slot, Asked::Release, out);
                    }
                    continue;
                }
            }
            let asked = if self.role == Role::Primary && self.generation == 0 {
                if slot == self.elected {
                    Asked::Acquire { from: 0 }
                } else {
                    Asked::Query
                }
            } else if self.role == Role::Primary && lease_set.contains(&slot) {
                Asked::Renew {
                    outdated: !(self.protected && self.peer_reachable),
                }
            } else if takeover && self.may_ask_takeover(slot) {
                if now < self.acquire_not_before {
                    if !due {
                        continue;
                    }
                    Asked::Query
                } else {
                    Asked::Acquire {
                        from: self.generation,
                    }
                }
            } else {
                Asked::Query
            };
            let urgent = matches!(asked, Asked::Acquire { from } if from > 0)
                && st.answered
                && now >= self.acquire_not_before
                && st
                    .last_sent
                    .is_some_and(|s| now.saturating_sub(s) >= t.retry);
            if due || urgent {
                self.send(now, slot, asked, out);
            }
        }
    }

    fn may_ask_takeover(&self, slot: Slot) -> bool {
        #[cfg(feature = "mutations")]
        if self.cfg.mutations.any_witness {
            return self.slots[slot.index()].reachable || slot == self.elected;
        }
        // A partitioned node uses only the elected witness.
        slot == self.elected
    }

    fn no_witness(&mut self, now: Duration, out: &mut Vec<Action>) {
        if self.role != Role::Standby || self.peer_reachable || !self.protected {
            return;
        }
        let lost_for = self
            .peer_lost_at
            .map_or(Duration::ZERO, |l| now.saturating_sub(l));
        match self.cfg.mode {
            Mode::NoWitness => {
                alert(
                    out,
                    AlertKind::NoWitness,
                    "taking over WITHOUT QUORUM (no witness configured): if the primary is \
                     alive behind cut links, two copies of the VM run"
                        .into(),
                );
                if let Some(g) = next_generation(self.generation, self.cfg.node) {
                    self.take_over(g, out);
                }
            }
            // Give the other node, which pauses on peer loss, time to do so.
            Mode::StaticPreference { preferred }
                if preferred == self.cfg.node && lost_for >= self.cfg.timing.lease_ttl =>
            {
                if let Some(g) = next_generation(self.generation, self.cfg.node) {
                    self.take_over(g, out);
                }
            }
            _ => {}
        }
    }

    /// The primary's output gate and guest state.
    fn gate_and_guest(&mut self, now: Duration, out: &mut Vec<Action>) {
        if self.role != Role::Primary {
            return;
        }
        let ft = self.protected && self.peer_reachable;
        let (gate, guest) = if ft {
            (OutputGate::Acked, GuestState::Run)
        } else if self.overridden {
            (OutputGate::Free { until: None }, GuestState::Run)
        } else {
            match self.cfg.mode {
                Mode::NoWitness => (OutputGate::Free { until: None }, GuestState::Run),
                Mode::StaticPreference { preferred } => {
                    if preferred == self.cfg.node {
                        (OutputGate::Free { until: None }, GuestState::Run)
                    } else if self.peer_reachable {
                        (OutputGate::Acked, GuestState::Run)
                    } else {
                        (OutputGate::Hold, GuestState::Pause)
                    }
                }
                Mode::Witness { .. } => self.witness_gate(now),
            }
        };
        if self.gate != Some(gate) {
            let was_free = matches!(self.gate, Some(OutputGate::Free { .. }));
            if matches!(gate, OutputGate::Free { .. }) && !was_free && !self.peer_reachable {
                alert(
                    out,
                    AlertKind::Simplex,
                    "running alone (simplex): the peer is unreachable; output is released \
                     while the witness lease lasts"
                        .into(),
                );
            }
            self.gate = Some(gate);
            out.push(Action::Output(gate));
        }
        if self.guest != Some(guest) {
            if guest == GuestState::Pause {
                alert(
                    out,
                    AlertKind::Paused,
                    format!(
                        "guest paused: neither the peer nor a witness lease (generation {}); \
                         output held",
                        self.generation
                    ),
                );
            } else if self.guest == Some(GuestState::Pause) {
                alert(out, AlertKind::Resumed, "guest resumed".into());
            }
            self.guest = Some(guest);
            out.push(Action::Guest(guest));
        }
    }

    fn witness_gate(&self, now: Duration) -> (OutputGate, GuestState) {
        let leases: Vec<Option<Lease>> = self
            .lease_set()
            .iter()
            .map(|s| {
                self.slots[s.index()]
                    .lease
                    .filter(|l| l.generation == self.generation)
            })
            .collect();
        let until = leases
            .iter()
            .map(|l| l.map(|l| l.valid_until))
            .collect::<Option<Vec<_>>>()
            .and_then(|v| v.into_iter().min());
        #[allow(unused_mut)]
        let mut outdated = leases.iter().all(|l| l.is_some_and(|l| l.peer_outdated));
        #[cfg(feature = "mutations")]
        if self.cfg.mutations.ignore_outdated {
            outdated = true;
        }
        #[cfg(feature = "mutations")]
        if self.cfg.mutations.keep_releasing_after_expiry {
            if let Some(until) = until {
                if outdated && self.generation > 0 {
                    let _ = until;
                    return (OutputGate::Free { until: None }, GuestState::Run);
                }
            }
        }
        let valid = until.filter(|&u| now < u && self.generation > 0);
        match valid {
            Some(u) if outdated => (OutputGate::Free { until: Some(u) }, GuestState::Run),
            // Resyncing standby: its acknowledgements release the output.
            _ if self.peer_reachable => (OutputGate::Acked, GuestState::Run),
            // The witness has not yet recorded the peer as stale: one round trip.
            Some(_) => (OutputGate::Hold, GuestState::Run),
            None => (OutputGate::Hold, GuestState::Pause),
        }
    }
}

/// The machine's state for status views.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub role: Role,
    pub generation: Generation,
    pub elected: Slot,
    pub peer_reachable: bool,
    pub protected: bool,
    pub witness_reachable: [bool; 2],
    pub lease_left: [Option<Duration>; 2],
    pub gate: Option<OutputGate>,
    pub guest: Option<GuestState>,
    pub overridden: bool,
}

fn alert(out: &mut Vec<Action>, kind: AlertKind, message: String) {
    out.push(Action::Alert(Alert { kind, message }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    fn node(role: Role, generation: u64, mode: Mode) -> QuorumNode {
        let id = if role == Role::Primary {
            NodeId(1)
        } else {
            NodeId(2)
        };
        let peer = if id == NodeId(1) {
            NodeId(2)
        } else {
            NodeId(1)
        };
        let cfg = NodeConfig::new("vm0", id, peer, mode);
        cfg.validate().unwrap();
        QuorumNode::new(
            cfg,
            Start {
                role,
                generation,
                elected: None,
            },
        )
    }
    fn requests(a: &[Action]) -> Vec<(Slot, u64, Request)> {
        a.iter()
            .filter_map(|a| match a {
                Action::ToWitness { slot, id, request } => Some((*slot, *id, request.clone())),
                _ => None,
            })
            .collect()
    }
    const ONE: Mode = Mode::Witness { alternate: false };

    #[test]
    fn simplex_waits_for_the_outdated_mark_and_ends_before_the_lease() {
        let mut n = node(Role::Primary, 1, ONE);
        n.step(ms(0), Event::PeerReachable(true));
        n.step(ms(0), Event::Protected(true));
        assert_eq!(n.gate(), Some(OutputGate::Acked));
        // The peer goes: a renewal with the peer marked stale goes out at once.
        let a = n.step(ms(10), Event::PeerReachable(false));
        let r = requests(&a);
        let (slot, id, req) = r
            .iter()
            .find(|r| matches!(r.2, Request::Renew { .. }))
            .unwrap()
            .clone();
        assert!(matches!(
            req,
            Request::Renew {
                peer_outdated: true,
                ..
            }
        ));
        assert_eq!(
            n.gate(),
            Some(OutputGate::Hold),
            "no unacked release before the mark"
        );
        let a = n.step(
            ms(15),
            Event::WitnessReply {
                slot,
                id,
                reply: Reply::Granted {
                    generation: 1,
                    lease_ms: 200,
                },
            },
        );
        let until = ms(10) + Timing::default().local_validity();
        assert!(
            a.contains(&Action::Output(OutputGate::Free { until: Some(until) })),
            "{a:?}"
        );
        assert!(n.may_release_unacked(until - ms(1)) && !n.may_release_unacked(until));
        // No more answers: at `until` the guest pauses.
        let a = n.step(until, Event::Tick);
        assert!(a.contains(&Action::Guest(GuestState::Pause)), "{a:?}");
        assert_eq!(n.gate(), Some(OutputGate::Hold));
        // The witness says generation 2 exists: demoted.
        let id = requests(&n.step(until + ms(50), Event::Tick))[0].1;
        let a = n.step(
            until + ms(51),
            Event::WitnessReply {
                slot,
                id,
                reply: Reply::Lost {
                    generation: 2,
                    holder: Some(NodeId(2)),
                },
            },
        );
        assert!(a.contains(&Action::Demote { generation: 2 }), "{a:?}");
        assert_eq!(n.role(), Role::Standby);
    }

    #[test]
    fn a_renewal_that_clears_the_mark_ends_reliance_on_it_when_sent() {
        let mut n = node(Role::Primary, 1, ONE);
        n.step(ms(0), Event::PeerReachable(true));
        n.step(ms(0), Event::Protected(true));
        let a = n.step(ms(10), Event::PeerReachable(false));
        let (slot, id, _) = requests(&a)
            .into_iter()
            .find(|r| matches!(r.2, Request::Renew { .. }))
            .unwrap();
        let granted = Reply::Granted {
            generation: 1,
            lease_ms: 200,
        };
        n.step(
            ms(11),
            Event::WitnessReply {
                slot,
                id,
                reply: granted.clone(),
            },
        );
        assert!(matches!(n.gate(), Some(OutputGate::Free { .. })));
        // The standby is back: a renewal clearing the mark goes out; its answer is lost.
        n.step(ms(20), Event::PeerReachable(true));
        let a = n.step(ms(20), Event::Protected(true));
        assert!(requests(&a).iter().any(|r| matches!(
            r.2,
            Request::Renew {
                peer_outdated: false,
                ..
            }
        )));
        assert_eq!(n.gate(), Some(OutputGate::Acked));
        // The peer goes again, well inside the old lease: the witness may have cleared
        // the mark, so nothing leaves without acknowledgement until it is set again.
        let a = n.step(ms(30), Event::PeerReachable(false));
        assert_eq!(n.gate(), Some(OutputGate::Hold), "{a:?}");
        assert!(!n.may_release_unacked(ms(31)));
        // A late answer to the first renewal (which set the mark) changes nothing...
        n.step(
            ms(31),
            Event::WitnessReply {
                slot,
                id,
                reply: granted.clone(),
            },
        );
        assert_eq!(n.gate(), Some(OutputGate::Hold));
        // ...the answer to the new renewal that sets it does.
        let (slot, id, _) = requests(&a)
            .into_iter()
            .find(|r| {
                matches!(
                    r.2,
                    Request::Renew {
                        peer_outdated: true,
                        ..
                    }
                )
            })
            .unwrap();
        n.step(
            ms(32),
            Event::WitnessReply {
                slot,
                id,
                reply: granted,
            },
        );
        assert!(matches!(n.gate(), Some(OutputGate::Free { .. })));
    }

    #[test]
    fn standby_takes_over_only_with_the_grant() {
        let mut n = node(Role::Standby, 1, ONE);
        n.step(ms(0), Event::PeerReachable(true));
        n.step(ms(0), Event::Protected(true));
        let a = n.step(ms(5), Event::PeerReachable(false));
        let (slot, id, req) = requests(&a)[0].clone();
        assert_eq!(
            req,
            Request::Acquire {
                vm: "vm0".into(),
                node: NodeId(2),
                from: 1,
                lease_ms: 200
            }
        );
        let a = n.step(
            ms(6),
            Event::WitnessReply {
                slot,
                id,
                reply: Reply::Busy {
                    generation: 1,
                    holder: Some(NodeId(1)),
                    retry_after_ms: 100,
                },
            },
        );
        assert!(!a.iter().any(|a| matches!(a, Action::TakeOver { .. })));
        assert!(n.next_wakeup(ms(6)) <= ms(106));
        let a = n.step(ms(106), Event::Tick);
        let (slot, id, req) = requests(&a)
            .into_iter()
            .find(|r| matches!(r.2, Request::Acquire { .. }))
            .unwrap();
        assert!(matches!(req, Request::Acquire { from: 1, .. }));
        let a = n.step(
            ms(107),
            Event::WitnessReply {
                slot,
                id,
                reply: Reply::Granted {
                    generation: 2,
                    lease_ms: 200,
                },
            },
        );
        assert!(a.contains(&Action::TakeOver { generation: 2 }), "{a:?}");
        assert_eq!((n.role(), n.generation()), (Role::Primary, 2));
        // Output leaves alone only once the witness confirmed the old primary's replica
        // stale: the renewal that says so goes out at once.
        assert_eq!(n.gate(), Some(OutputGate::Hold));
        let (slot, id, req) = requests(&a)
            .into_iter()
            .find(|r| matches!(r.2, Request::Renew { .. }))
            .expect("a renewal right after the grant");
        assert!(matches!(
            req,
            Request::Renew {
                generation: 2,
                peer_outdated: true,
                ..
            }
        ));
        n.step(
            ms(108),
            Event::WitnessReply {
                slot,
                id,
                reply: Reply::Granted {
                    generation: 2,
                    lease_ms: 200,
                },
            },
        );
        assert!(matches!(n.gate(), Some(OutputGate::Free { .. })));
    }

    #[test]
    fn outdated_standby_waits_and_override_is_audited() {
        let mut n = node(Role::Standby, 1, ONE);
        n.step(ms(0), Event::Protected(true));
        let a = n.step(
            ms(0),
            Event::ManualOverride {
                operator: "ops".into(),
                reason: "x".into(),
            },
        );
        assert!(a
            .iter()
            .any(|a| matches!(a, Action::TakeOver { generation: 2 })));
        assert!(a.iter().any(|a| matches!(a, Action::Audit { .. })));
        assert_eq!(n.gate(), Some(OutputGate::Free { until: None }));
        // Refused while the peer is reachable.
        let mut n = node(Role::Standby, 1, ONE);
        n.step(ms(0), Event::PeerReachable(true));
        let a = n.step(
            ms(1),
            Event::ManualOverride {
                operator: "ops".into(),
                reason: "x".into(),
            },
        );
        assert!(
            matches!(&a[..], [Action::Audit { what, .. }, ..] if what.contains("REFUSED")),
            "{a:?}"
        );
        assert_eq!(n.role(), Role::Standby);
    }

    #[test]
    fn no_witness_modes() {
        let mut n = node(Role::Standby, 1, Mode::NoWitness);
        let a = n.step(ms(0), Event::Protected(true));
        assert!(a.iter().any(|a| matches!(
            a,
            Action::Alert(Alert {
                kind: AlertKind::NoWitness,
                ..
            })
        )));
        assert!(
            a.iter()
                .any(|a| matches!(a, Action::TakeOver { generation: 2 })),
            "today's behaviour"
        );
        // Static preference: the other node pauses, the preferred one waits a lease.
        let pref = Mode::StaticPreference {
            preferred: NodeId(2),
        };
        let mut p = node(Role::Primary, 1, pref);
        p.step(ms(0), Event::PeerReachable(true));
        let a = p.step(ms(1), Event::PeerReachable(false));
        assert!(a.contains(&Action::Guest(GuestState::Pause)), "{a:?}");
        let mut s = node(Role::Standby, 1, pref);
        s.step(ms(0), Event::PeerReachable(true));
        s.step(ms(0), Event::Protected(true));
        s.step(ms(1), Event::PeerReachable(false));
        assert_eq!(s.role(), Role::Standby);
        let a = s.step(ms(201), Event::Tick);
        assert!(
            a.iter()
                .any(|a| matches!(a, Action::TakeOver { generation: 2 })),
            "{a:?}"
        );
    }

    #[test]
    fn parity_is_checked() {
        let cfg = NodeConfig::new("vm0", NodeId(1), NodeId(3), ONE);
        assert!(matches!(cfg.validate(), Err(ConfigError::Parity(1, 3))));
    }
}

/// The lease handover of a planned role swap, both machines against the real witness
/// logic (`witness::core`) in one process: requests answered at once, or never (a
/// witness that is down).
#[cfg(test)]
mod handover_tests {
    use super::*;
    use crate::types::held_by;
    use crate::witness::core::{CoreLimits, WitnessCore};
    use crate::witness::store::MemStore;

    const ONE: Mode = Mode::Witness { alternate: false };
    const P: NodeId = NodeId(1);
    const S: NodeId = NodeId(2);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    struct Rig {
        w: WitnessCore,
        store: MemStore,
        /// The witness answers (false: it is down, requests are lost).
        up: bool,
        p: QuorumNode,
        s: QuorumNode,
    }

    impl Rig {
        /// A pair in sync: node 1 primary holding generation 1 with a lease and its
        /// peer marked current, node 2 a protected standby that knows generation 1.
        fn in_sync() -> Rig {
            let mk = |me, peer, role| {
                let cfg = NodeConfig::new("vm0", me, peer, ONE);
                cfg.validate().unwrap();
                QuorumNode::new(
                    cfg,
                    Start {
                        role,
                        generation: 0,
                        elected: None,
                    },
                )
            };
            let mut r = Rig {
                w: WitnessCore::new(CoreLimits::default(), [], ms(0)),
                store: MemStore::default(),
                up: true,
                p: mk(P, S, Role::Primary),
                s: mk(S, P, Role::Standby),
            };
            for ev in [Event::PeerReachable(true), Event::Protected(true)] {
                r.step_p(ms(0), ev.clone());
                r.step_s(ms(0), ev);
            }
            r.step_p(ms(1), Event::Tick);
            assert_eq!(r.p.generation(), 1);
            r.step_s(
                ms(2),
                Event::FromPeer(PeerMsg::Status {
                    generation: 1,
                    role: Role::Primary,
                    reach: [true, false],
                    elected: Slot::Preferred,
                    elect_seq: 0,
                    proposing: None,
                }),
            );
            assert_eq!(r.s.generation(), 1);
            assert_eq!(r.p.gate(), Some(OutputGate::Acked));
            r
        }

        /// Steps a machine and serves its witness requests (and the ones their
        /// answers cause) at once; returns every action.
        fn serve(&mut self, primary: bool, now: Duration, ev: Event) -> Vec<Action> {
            let mut all = Vec::new();
            let mut evs = vec![ev];
            while let Some(ev) = evs.pop() {
                let n = if primary { &mut self.p } else { &mut self.s };
                let a = n.step(now, ev);
                for x in &a {
                    if let Action::ToWitness { slot, id, request } = x {
                        if self.up {
                            let reply = self.w.handle(now, "c", request, &mut self.store);
                            evs.push(Event::WitnessReply {
                                slot: *slot,
                                id: *id,
                                reply,
                            });
                        }
                    }
                }
                all.extend(a);
            }
            all
        }
        fn step_p(&mut self, now: Duration, ev: Event) -> Vec<Action> {
            self.serve(true, now, ev)
        }
        fn step_s(&mut self, now: Duration, ev: Event) -> Vec<Action> {
            self.serve(false, now, ev)
        }
    }

    fn notes(a: &[Action]) -> Vec<HandoverNote> {
        a.iter()
            .filter_map(|a| match a {
                Action::Handover(n) => Some(n.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn without_the_release_the_standby_gets_no_grant() {
        let mut r = Rig::in_sync();
        let a = r.step_s(ms(10), Event::Swap(SwapEvent::Acquire));
        assert!(
            matches!(&notes(&a)[..], [HandoverNote::Refused(w)] if w.contains("still runs")),
            "{a:?}"
        );
        assert!(!a.iter().any(|a| matches!(a, Action::TakeOver { .. })));
        assert_eq!((r.s.role(), r.s.generation()), (Role::Standby, 1));
    }

    #[test]
    fn the_released_lease_is_granted_to_the_standby_at_once() {
        let mut r = Rig::in_sync();
        let a = r.step_p(ms(10), Event::Swap(SwapEvent::Begin));
        assert_eq!(notes(&a), vec![HandoverNote::Released], "{a:?}");
        assert!(r.p.handing_over());
        // No lease is held: nothing may leave without an acknowledgement, and a
        // renewal is not sent while the handover is under way.
        assert_eq!(r.p.gate(), Some(OutputGate::Acked));
        assert!(!r.p.may_release_unacked(ms(11)));
        let a = r.step_p(ms(400), Event::Tick);
        assert!(
            !a.iter().any(|a| matches!(
                a,
                Action::ToWitness {
                    request: Request::Renew { .. },
                    ..
                }
            )),
            "{a:?}"
        );
        // The swap point: the standby asks and gets generation 2 (its parity).
        let a = r.step_s(ms(401), Event::Swap(SwapEvent::Acquire));
        assert!(a.contains(&Action::TakeOver { generation: 2 }), "{a:?}");
        assert!(held_by(2, S) && !held_by(2, P));
        assert_eq!((r.s.role(), r.s.generation()), (Role::Primary, 2));
        let mut a = r.step_p(ms(402), Event::Swap(SwapEvent::End { done: true }));
        assert_eq!(r.p.role(), Role::Standby);
        // The old primary learns the new generation, as a standby (from the witness
        // its queries reach, or from its peer).
        a.extend(r.step_p(ms(403), Event::FromPeer(new_primary_status(2))));
        assert!(a.contains(&Action::Generation(2)), "{a:?}");
        assert!(!a.iter().any(|a| matches!(a, Action::Demote { .. })));
        // Both agree on who holds what: the new primary renews 2, the witness says so.
        let a = r.step_s(ms(404), Event::Tick);
        let st = r.w.handle(
            ms(404),
            "c",
            &Request::Query { vm: "vm0".into() },
            &mut r.store,
        );
        assert!(
            matches!(
                st,
                Reply::State {
                    generation: 2,
                    holder: Some(S),
                    ..
                }
            ),
            "{st:?} {a:?}"
        );
        // And a swap back works the same way (generation 3 is node 1's).
        r.step_s(ms(405), Event::Protected(true));
        r.step_s(ms(406), Event::Tick);
        r.step_p(ms(406), Event::Protected(true));
        let a = r.step_s(ms(410), Event::Swap(SwapEvent::Begin));
        assert_eq!(notes(&a), vec![HandoverNote::Released], "{a:?}");
        let a = r.step_p(ms(411), Event::Swap(SwapEvent::Acquire));
        assert!(a.contains(&Action::TakeOver { generation: 3 }), "{a:?}");
        r.step_s(ms(412), Event::Swap(SwapEvent::End { done: true }));
        assert_eq!((r.p.role(), r.s.role()), (Role::Primary, Role::Standby));
    }

    #[test]
    fn a_swap_acquire_granted_but_unanswered_is_taken_from_the_next_copys_answer() {
        let mut r = Rig::in_sync();
        r.step_p(ms(10), Event::Swap(SwapEvent::Begin));
        // The standby's acquire reaches the witness and is granted, but its answer is
        // lost (a witness slow for 150 ms under load: CI of tests/ha_migrate.rs).
        r.up = false;
        let a = r.step_s(ms(11), Event::Swap(SwapEvent::Acquire));
        let req = a
            .iter()
            .find_map(|a| match a {
                Action::ToWitness { request, .. } => Some(request.clone()),
                _ => None,
            })
            .expect("the acquire is sent");
        let granted = r.w.handle(ms(11), "c", &req, &mut r.store);
        assert!(
            matches!(granted, Reply::Granted { generation: 2, .. }),
            "{granted:?}"
        );
        r.up = true;
        // Its copy, sent again, is answered Lost (generation 2, held by this node):
        // the generation is its own, the swap goes on.
        let a = r.step_s(ms(200), Event::Tick);
        assert!(a.contains(&Action::TakeOver { generation: 2 }), "{a:?}");
        assert!(notes(&a).is_empty(), "{a:?}");
        assert_eq!((r.s.role(), r.s.generation()), (Role::Primary, 2));
        // No lease counted from the lost answer; the renewal sent at once starts one.
        assert!(
            a.iter().any(|a| matches!(
                a,
                Action::ToWitness {
                    request: Request::Renew { generation: 2, .. },
                    ..
                }
            )),
            "{a:?}"
        );
    }

    #[test]
    fn a_refused_swap_leaves_the_old_primary_holding_its_generation() {
        let mut r = Rig::in_sync();
        r.step_p(ms(10), Event::Swap(SwapEvent::Begin));
        // The witness goes down before the standby asks: no answer, the swap is
        // refused there.
        r.up = false;
        let a = r.step_s(ms(11), Event::Swap(SwapEvent::Acquire));
        assert!(!a.iter().any(|a| matches!(a, Action::TakeOver { .. })));
        r.step_s(ms(1000), Event::Swap(SwapEvent::AcquireAbandoned));
        r.up = true;
        // The old primary renews at once: granted, its lease runs again.
        let a = r.step_p(ms(1001), Event::Swap(SwapEvent::End { done: false }));
        assert!(
            a.iter().any(|a| matches!(
                a,
                Action::ToWitness {
                    request: Request::Renew { generation: 1, .. },
                    ..
                }
            )),
            "{a:?}"
        );
        assert!(!r.p.handing_over());
        assert_eq!((r.p.role(), r.p.generation()), (Role::Primary, 1));
        // The standby's request, asked again (or arriving late), finds the lease live.
        let a = r.step_s(ms(1002), Event::Swap(SwapEvent::Acquire));
        assert!(
            matches!(&notes(&a)[..], [HandoverNote::Refused(w)] if w.contains("still runs")),
            "{a:?}"
        );
        assert_eq!(r.s.role(), Role::Standby);
    }

    #[test]
    fn a_witness_down_refuses_the_handover_before_anything_pauses() {
        let mut r = Rig::in_sync();
        r.up = false;
        let a = r.step_p(ms(10), Event::Swap(SwapEvent::Begin));
        assert!(notes(&a).is_empty());
        // The release is sent again while unanswered, never a renewal.
        let a = r.step_p(ms(200), Event::Tick);
        let reqs: Vec<_> = a
            .iter()
            .filter_map(|a| match a {
                Action::ToWitness { request, .. } => Some(request.clone()),
                _ => None,
            })
            .collect();
        assert!(
            reqs.iter().all(|q| matches!(q, Request::Release { .. })),
            "{reqs:?}"
        );
        // The peer is lost meanwhile: no lease, so the primary holds and pauses.
        r.step_p(ms(201), Event::PeerReachable(false));
        assert_eq!(r.p.gate(), Some(OutputGate::Hold));
        assert_eq!(r.p.guest(), Some(GuestState::Pause));
    }

    /// The status a peer that became primary with `generation` sends (the handovers'
    /// news).
    fn new_primary_status(generation: u64) -> PeerMsg {
        PeerMsg::Status {
            generation,
            role: Role::Primary,
            reach: [true, false],
            elected: Slot::Preferred,
            elect_seq: 0,
            proposing: None,
        }
    }

    #[test]
    fn the_peers_grant_seen_first_ends_the_handover_without_a_demotion() {
        let mut r = Rig::in_sync();
        r.step_p(ms(10), Event::Swap(SwapEvent::Begin));
        r.step_s(ms(11), Event::Swap(SwapEvent::Acquire));
        assert_eq!(r.s.generation(), 2);
        // The new primary's status reaches the old one before its checkpoint session
        // reports the acceptance.
        let a = r.step_p(ms(12), Event::FromPeer(new_primary_status(2)));
        assert!(
            notes(&a).contains(&HandoverNote::PeerTook { generation: 2 }),
            "{a:?}"
        );
        assert!(!a.iter().any(|a| matches!(a, Action::Demote { .. })));
        assert_eq!(r.p.role(), Role::Standby);
        // Outside a handover the same news demotes a primary (control).
        let mut r = Rig::in_sync();
        let a = r.step_p(ms(12), Event::FromPeer(new_primary_status(2)));
        assert!(a.contains(&Action::Demote { generation: 2 }), "{a:?}");
    }

    #[test]
    fn release_rules() {
        let mut r = Rig::in_sync();
        let rel = |node, generation| Request::Release {
            vm: "vm0".into(),
            node,
            generation,
        };
        // Not the holder: nothing is released.
        let a = r.w.handle(ms(20), "c", &rel(S, 1), &mut r.store);
        assert!(matches!(a, Reply::Lost { generation: 1, .. }), "{a:?}");
        let a = r.w.handle(ms(20), "c", &rel(P, 0), &mut r.store);
        assert!(matches!(a, Reply::Refused(_)), "{a:?}");
        let a = r.w.handle(ms(20), "c", &rel(P, 1), &mut r.store);
        assert_eq!(a, Reply::Released { generation: 1 });
        // Released twice: still released (a retry whose first answer was lost).
        let a = r.w.handle(ms(21), "c", &rel(P, 1), &mut r.store);
        assert_eq!(a, Reply::Released { generation: 1 });
        // An older generation than the holder's is lost.
        let a = r.w.handle(
            ms(22),
            "c",
            &Request::Acquire {
                vm: "vm0".into(),
                node: S,
                from: 1,
                lease_ms: 200,
            },
            &mut r.store,
        );
        assert!(matches!(a, Reply::Granted { generation: 2, .. }), "{a:?}");
        let a = r.w.handle(ms(23), "c", &rel(P, 1), &mut r.store);
        assert!(matches!(a, Reply::Lost { generation: 2, .. }), "{a:?}");
    }
}
