//! Seeded simulation of a protected VM's quorum: two PMs running the REAL node state
//! machine (`quorum::node`), a preferred and an alternate witness running the REAL
//! witness logic (`quorum::witness::core`, records kept in a store that survives their
//! crashes), and a toy VM whose output is checkpointed, acknowledged and released as
//! the machines' actions say.
//!
//! Faults per seed: cuts of any subset of the five links {PM1-PM2, PM1-W1, PM1-W2,
//! PM2-W1, PM2-W2} (each direction on its own, so also asymmetric), message loss and
//! delay spikes, crashes and restarts of each PM and witness, a PM frozen (SIGSTOP)
//! and resumed, clock offsets and rates off by up to 0.9 % (the machines assume 1 %),
//! late wake-ups. Real time is the simulator's; each party only sees its own clock.
//!
//! Invariants checked at every step:
//! - I1 one history outside: a stream position is never released with two different
//!   items (no divergent output, whoever releases it);
//! - I2 exclusive release: output released WITHOUT acknowledgement by node n at
//!   generation g at real time t requires that g was granted to n and that no witness
//!   had granted a higher generation before t. Acknowledged release is covered by I1
//!   and I3 (it only releases what the peer committed);
//! - I3 nothing acknowledged outside is lost: a node takes over only from a replica
//!   that holds every released item;
//! - I4 generations only grow: each node's, each witness record's, and grants are
//!   unique and increasing.
//!
//! The etcd variants run the same PMs, faults and invariants with etcd in the witness
//! slots (both, or the preferred only: one etcd cluster, the shipped configuration):
//! each PM runs the REAL etcd session (`quorum::etcd::session`, the backend's sans-IO
//! logic) against a model of etcd's semantics: MVCC revisions (a transaction's puts
//! share one new revision; an absent key compares as revision 0), leases with a TTL in
//! whole seconds (at least its minimum) on etcd's own clock, expired leases revoked
//! with their keys on a 500 ms lessor tick, a keep-alive of an expired lease answered
//! 0, a put on a missing lease refused, everything durable, and after a restart every
//! lease's TTL started anew. Operations travel over the same links (lost or delayed),
//! time out at the node's edge, may be applied with their answer lost, and die with
//! the etcd process that had not answered them. The node machines use a 1 s lease
//! (etcd's minimum at a 100 ms election timeout), 200 ms renewals, a 100 ms margin.
//!
//! `SIM_SEEDS=n` runs more seeds, `SIM_SEED=n` one seed, `SIM_DEBUG=1` prints a trace;
//! `SIM_ETCD_SEEDS=n` sets the etcd variants' seeds.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::time::Duration;

use quorum::etcd::keys::{decode, Holder, Key};
#[cfg(feature = "mutations")]
use quorum::etcd::session::EtcdMutations;
use quorum::etcd::session::{EtcdSession, KeyState, Observed, Op, OpResult, SessionConfig};
#[cfg(feature = "mutations")]
use quorum::node::NodeMutations;
use quorum::node::{
    Action, Event, GuestState, Mode, NodeConfig, OutputGate, PeerMsg, QuorumNode, Start,
};
use quorum::timing::Timing;
#[cfg(feature = "mutations")]
use quorum::witness::core::CoreMutations;
use quorum::witness::core::{CoreLimits, WitnessCore};
use quorum::witness::ops::{Reply, Request};
use quorum::witness::store::{MemStore, VmRecord};
use quorum::{NodeId, Role, Slot};

// ---------------------------------------------------------------- randomness

// splitmix64, the lab's one RNG (the same sequence: kept seeds replay).
use twinrun_lab::Rng;

// ---------------------------------------------------------------- clocks

/// A party's clock: local = offset + real * rate (microseconds).
#[derive(Clone, Copy)]
struct Clock {
    offset: f64,
    rate: f64,
}
impl Clock {
    fn local(&self, real: u64) -> Duration {
        Duration::from_nanos(((self.offset + real as f64 * self.rate) * 1000.0) as u64)
    }
}

// ---------------------------------------------------------------- model

const NODES: [NodeId; 2] = [NodeId(1), NodeId(2)];
const VM: &str = "vm0";
const CLUSTER: &str = "c";
const TICK_US: u64 = 5_000;
const HEARTBEAT_US: u64 = 50_000;
const DETECT_US: u64 = 200_000;
/// The etcd variants: the edge gives up an etcd operation after this long; etcd's
/// lessor revokes expired leases this often; its shortest lease.
const ETCD_OP_TIMEOUT_US: u64 = 200_000;
const ETCD_LESSOR_TICK_US: u64 = 500_000;
const ETCD_MIN_TTL_S: i64 = 1;

/// Which quorum service sits in the witness slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// Two `twinrun witness` cores.
    Udp,
    /// etcd models: in both slots, or the preferred only.
    Etcd { alternate: bool },
}

fn etcd_timing() -> Timing {
    Timing {
        lease_ttl: Duration::from_millis(1000),
        renew_interval: Duration::from_millis(200),
        margin: Duration::from_millis(100),
        retry: Duration::from_millis(50),
        reach_timeout: Duration::from_millis(500),
        ..Timing::default()
    }
}

/// Parties: 0, 1 nodes; 2, 3 witnesses (preferred, alternate).
type Party = usize;

#[derive(Clone, Debug)]
enum Msg {
    Heartbeat,
    Peer(PeerMsg),
    Ckpt {
        gen: u64,
        session: u64,
        base: usize,
        items: Vec<u64>,
        released_through: usize,
    },
    Ack {
        session: u64,
        len: usize,
    },
    ToWitness {
        wire_id: u64,
        id: u64,
        sent_real: u64,
        req: Request,
    },
    FromWitness {
        slot: Slot,
        id: u64,
        reply: Reply,
    },
    /// A node's etcd session to etcd (slot index), and the result back.
    EtcdOp {
        slot: usize,
        op_id: u64,
        op: Op,
        inc: u64,
        sent_real: u64,
    },
    EtcdResult {
        slot: usize,
        op_id: u64,
        result: OpResult,
        inc: u64,
    },
}

#[derive(Clone, Debug)]
enum Ev {
    NodeTick(usize, u64),
    Deliver {
        from: Party,
        to: Party,
        msg: Msg,
        incarnation: u64,
        /// The receiving node's incarnation when sent: a restarted process never gets
        /// what was sent to its predecessor (its connections and sockets died with it).
        to_inc: u64,
    },
    Fault,
    Restart(Party),
    Unfreeze(usize),
    Heal,
    /// The edge's timeout of an etcd operation.
    EtcdTimeout {
        node: usize,
        inc: u64,
        slot: usize,
        op_id: u64,
    },
    /// An etcd session's answer handed to its node machine.
    EtcdAnswer {
        node: usize,
        inc: u64,
        slot: Slot,
        id: u64,
        reply: Reply,
    },
    /// etcd's lessor revokes expired leases.
    EtcdTick(usize),
}

struct Node {
    alive: bool,
    incarnation: u64,
    frozen_until: u64,
    m: QuorumNode,
    clock: Clock,
    // recorded across restarts
    rec_gen: u64,
    rec_elected: Option<(Slot, u64)>,
    // runtime
    gate: OutputGate,
    guest: GuestState,
    last_heard: Option<u64>,
    peer_reachable: bool,
    history: Vec<u64>,
    released: usize,
    /// Primary: current session and what the standby acknowledged in it.
    session: u64,
    acked: usize,
    protected: bool,
    /// Primary: history length when this session's first checkpoint was captured. From
    /// then on the checkpoint driver holds output until acknowledged (output commit),
    /// whatever the quorum gate says: Free only releases what came before.
    commit_from: Option<usize>,
    /// Standby: the session its replica belongs to, and the primary's release mark.
    replica_session: u64,
    has_replica: bool,
    released_through: usize,
    last_hb: u64,
    queued: Vec<(Party, Msg, u64)>,
    /// The etcd variants: this process's etcd session per slot, and its requests by
    /// (slot, id) for the invariant checks on the answers.
    sessions: [Option<EtcdSession>; 2],
    asked: HashMap<(usize, u64), Request>,
}

struct Witness {
    alive: bool,
    core: WitnessCore,
    store: MemStore,
    clock: Clock,
    last_wire: HashMap<NodeId, u64>,
    restarted_at: u64,
    /// The etcd variants: this slot is an etcd cluster (the core is unused).
    etcd: Option<EtcdModel>,
}

/// etcd's semantics for one VM's keys (see the header).
#[derive(Default)]
struct EtcdModel {
    rev: i64,
    kv: HashMap<Key, KeyState>,
    /// lease -> (TTL in seconds, expiry on etcd's clock).
    leases: BTreeMap<i64, (i64, Duration)>,
    next_lease: i64,
}

impl EtcdModel {
    fn observed(&self) -> Observed {
        Observed {
            generation: self.kv.get(&Key::Generation).cloned(),
            owner: self.kv.get(&Key::Owner).cloned(),
            outdated: self.kv.get(&Key::Outdated).cloned(),
        }
    }

    fn generation(&self) -> u64 {
        self.kv
            .get(&Key::Generation)
            .and_then(|s| decode::<Holder>(b"generation", &s.value).ok())
            .map_or(0, |h| h.generation)
    }

    /// Deletes a lease and the keys attached to it (one revision).
    fn revoke(&mut self, lease: i64) {
        if self.leases.remove(&lease).is_some() {
            let attached: Vec<Key> = self
                .kv
                .iter()
                .filter(|(_, s)| s.lease == lease)
                .map(|(k, _)| *k)
                .collect();
            if !attached.is_empty() {
                self.rev += 1;
                for k in attached {
                    self.kv.remove(&k);
                }
            }
        }
    }

    fn revoke_expired(&mut self, now: Duration) {
        let expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.1 <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            self.revoke(id);
        }
    }

    /// A restarted etcd starts every lease's TTL anew.
    fn restart(&mut self, now: Duration) {
        for l in self.leases.values_mut() {
            l.1 = now + secs(l.0);
        }
    }

    fn apply(&mut self, now: Duration, op: &Op) -> Result<OpResult, String> {
        Ok(match op {
            Op::Read { .. } => OpResult::Read(self.observed()),
            Op::Grant { ttl_s } => {
                let ttl = (*ttl_s).max(ETCD_MIN_TTL_S);
                self.next_lease += 1;
                self.leases.insert(self.next_lease, (ttl, now + secs(ttl)));
                OpResult::Granted {
                    lease: self.next_lease,
                    ttl_s: ttl,
                }
            }
            Op::KeepAlive { lease } => match self.leases.get_mut(lease) {
                Some(l) if l.1 > now => {
                    l.1 = now + secs(l.0);
                    OpResult::KeepAlive { ttl_s: l.0 }
                }
                // Expired: etcd answers once its revoke is done.
                Some(_) => {
                    self.revoke(*lease);
                    OpResult::KeepAlive { ttl_s: 0 }
                }
                None => OpResult::KeepAlive { ttl_s: 0 },
            },
            Op::Txn { compares, puts, .. } => {
                let ok = compares
                    .iter()
                    .all(|(k, r)| self.kv.get(k).map_or(0, |s| s.mod_revision) == *r);
                if ok && !puts.is_empty() {
                    if puts
                        .iter()
                        .any(|p| p.lease != 0 && !self.leases.contains_key(&p.lease))
                    {
                        return Ok(OpResult::Failed(
                            "etcdserver: requested lease not found".into(),
                        ));
                    }
                    let before = self.generation();
                    self.rev += 1;
                    for p in puts {
                        let create = self.kv.get(&p.key).map_or(self.rev, |s| s.create_revision);
                        self.kv.insert(
                            p.key,
                            KeyState {
                                value: p.value.clone(),
                                create_revision: create,
                                mod_revision: self.rev,
                                lease: p.lease,
                            },
                        );
                    }
                    if self.generation() < before {
                        return Err(format!(
                            "I4: etcd generation went down {before} -> {}",
                            self.generation()
                        ));
                    }
                }
                OpResult::Txn {
                    succeeded: ok,
                    observed: self.observed(),
                }
            }
            Op::Revoke { lease } => {
                self.revoke(*lease);
                OpResult::Revoked
            }
        })
    }
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(u64::try_from(s).unwrap_or(0))
}

#[derive(Clone, Copy, Default)]
struct Link {
    up: bool,
    loss: u64,
    extra_delay: u64,
}

#[derive(Default, Debug, Clone, Copy)]
struct Stats {
    takeovers: u64,
    demotions: u64,
    pauses: u64,
    simplex_releases: u64,
    refusals: u64,
    released: u64,
    elections: u64,
    events: u64,
}

#[derive(Clone, Copy, Default)]
struct Muts {
    #[cfg(feature = "mutations")]
    node: NodeMutations,
    #[cfg(feature = "mutations")]
    core: CoreMutations,
    #[cfg(feature = "mutations")]
    etcd: EtcdMutations,
}

struct Sim {
    rng: Rng,
    now: u64,
    q: BinaryHeap<Reverse<(u64, u64, usize)>>,
    evs: HashMap<usize, Ev>,
    seq: u64,
    next_ev: usize,
    nodes: Vec<Node>,
    wits: Vec<Witness>,
    links: [[Link; 4]; 4],
    outside: Vec<u64>,
    max_granted: u64,
    granted_to: BTreeMap<u64, (NodeId, u64)>,
    stats: Stats,
    debug: bool,
    muts: Muts,
    end: u64,
    faults_until: u64,
    session_ctr: u64,
    variant: Variant,
}

fn node_cfg(i: usize, muts: &Muts, variant: Variant) -> NodeConfig {
    let alternate = match variant {
        Variant::Udp => true,
        Variant::Etcd { alternate } => alternate,
    };
    #[allow(unused_mut)]
    let mut c = NodeConfig::new(VM, NODES[i], NODES[1 - i], Mode::Witness { alternate });
    if variant != Variant::Udp {
        c.timing = etcd_timing();
    }
    #[cfg(feature = "mutations")]
    {
        c.mutations = muts.node;
    }
    let _ = muts;
    c
}

/// A node's etcd sessions (none in the UDP variant).
fn sessions(i: usize, muts: &Muts, variant: Variant) -> [Option<EtcdSession>; 2] {
    [0, 1].map(|_| {
        (variant != Variant::Udp).then(|| {
            #[allow(unused_mut)]
            let mut c = SessionConfig::new(NODES[i], CLUSTER, "/twinrun", etcd_timing().retry);
            #[cfg(feature = "mutations")]
            {
                c.mutations = muts.etcd;
            }
            let _ = muts;
            EtcdSession::new(c).expect("session config")
        })
    })
}

impl Sim {
    fn new(seed: u64, muts: Muts, variant: Variant) -> Sim {
        let mut rng = Rng(seed);
        let clock = |rng: &mut Rng| Clock {
            offset: rng.unit() * 10e6,
            rate: 1.0 + (rng.unit() * 2.0 - 1.0) * 0.009,
        };
        let mut nodes = Vec::new();
        for i in 0..2 {
            let role = if i == 0 { Role::Primary } else { Role::Standby };
            let m = QuorumNode::new(
                node_cfg(i, &muts, variant),
                Start {
                    role,
                    generation: 0,
                    elected: None,
                },
            );
            nodes.push(Node {
                alive: true,
                incarnation: 1,
                frozen_until: 0,
                m,
                clock: clock(&mut rng),
                rec_gen: 0,
                rec_elected: None,
                gate: OutputGate::Hold,
                guest: if i == 0 {
                    GuestState::Run
                } else {
                    GuestState::Pause
                },
                last_heard: None,
                peer_reachable: false,
                history: Vec::new(),
                released: 0,
                session: 0,
                acked: 0,
                protected: false,
                commit_from: None,
                replica_session: 0,
                has_replica: false,
                released_through: 0,
                last_hb: 0,
                queued: Vec::new(),
                sessions: sessions(i, &muts, variant),
                asked: HashMap::new(),
            });
        }
        let mut wits = Vec::new();
        for _ in 0..2 {
            let c = clock(&mut rng);
            #[allow(unused_mut)]
            let mut core = WitnessCore::new(CoreLimits::default(), [], c.local(0));
            #[cfg(feature = "mutations")]
            {
                core.mutations = muts.core;
            }
            wits.push(Witness {
                alive: true,
                core,
                store: MemStore::default(),
                clock: c,
                last_wire: HashMap::new(),
                restarted_at: 0,
                etcd: (variant != Variant::Udp).then(EtcdModel::default),
            });
        }
        let mut links = [[Link {
            up: true,
            loss: 0,
            extra_delay: 0,
        }; 4]; 4];
        links[2][3].up = false; // witnesses do not talk to each other
        links[3][2].up = false;
        let duration = 2_500_000 + rng.below(1_500_000);
        let mut s = Sim {
            rng,
            now: 0,
            q: BinaryHeap::new(),
            evs: HashMap::new(),
            seq: 0,
            next_ev: 0,
            nodes,
            wits,
            links,
            outside: Vec::new(),
            max_granted: 0,
            granted_to: BTreeMap::new(),
            stats: Stats::default(),
            debug: std::env::var("SIM_DEBUG").is_ok(),
            muts,
            // After healing: 2 s, or 4 s with etcd's 1 s leases (a restarted etcd
            // restarts every lease; expired ones go at the next lessor tick).
            end: duration
                + if variant == Variant::Udp {
                    2_000_000
                } else {
                    4_000_000
                },
            faults_until: duration,
            session_ctr: 0,
            variant,
        };
        for w in 0..2 {
            if s.wits[w].etcd.is_some() {
                let first = s.rng.below(ETCD_LESSOR_TICK_US);
                s.at(first, Ev::EtcdTick(w));
            }
        }
        s.at(0, Ev::NodeTick(0, 1));
        s.at(1000, Ev::NodeTick(1, 1));
        let first = 300_000 + s.rng.below(300_000);
        s.at(first, Ev::Fault);
        s.at(duration, Ev::Heal);
        s
    }

    fn at(&mut self, t: u64, ev: Ev) {
        self.seq += 1;
        let k = self.next_ev;
        self.next_ev += 1;
        self.evs.insert(k, ev);
        self.q.push(Reverse((t, self.seq, k)));
    }

    fn log(&self, s: impl FnOnce() -> String) {
        if self.debug {
            eprintln!("{:>9} {}", self.now, s());
        }
    }

    fn send(&mut self, from: Party, to: Party, msg: Msg) {
        let l = self.links[from][to];
        if !l.up || self.rng.percent(l.loss) {
            return;
        }
        let base = match (&msg, from.max(to) >= 2) {
            (_, true) => self.rng.range(100, 3_000),
            _ => self.rng.range(50, 2_000),
        };
        let spike = if l.extra_delay > 0 {
            self.rng.below(l.extra_delay)
        } else {
            0
        };
        let incarnation = if from < 2 {
            self.nodes[from].incarnation
        } else {
            0
        };
        let to_inc = if to < 2 {
            self.nodes[to].incarnation
        } else {
            0
        };
        self.at(
            self.now + base + spike,
            Ev::Deliver {
                from,
                to,
                msg,
                incarnation,
                to_inc,
            },
        );
    }

    fn run(mut self) -> Result<Stats, String> {
        while let Some(Reverse((t, _, k))) = self.q.pop() {
            if t > self.end {
                break;
            }
            self.now = t;
            self.stats.events += 1;
            let ev = self.evs.remove(&k).ok_or("lost event")?;
            match ev {
                Ev::NodeTick(i, inc) => {
                    if self.nodes[i].alive && self.nodes[i].incarnation == inc {
                        if self.nodes[i].frozen_until > t {
                            // Frozen: the tick happens when it wakes.
                        } else {
                            self.node_tick(i)?;
                        }
                        let jitter = self.rng.below(2_500);
                        self.at(t + TICK_US + jitter, Ev::NodeTick(i, inc));
                    }
                }
                Ev::Deliver {
                    from,
                    to,
                    msg,
                    incarnation,
                    to_inc,
                } => {
                    if from < 2 && self.nodes[from].incarnation != incarnation {
                        // A message of a dead incarnation still in flight: it arrives.
                    }
                    if to < 2 {
                        if !self.nodes[to].alive || self.nodes[to].incarnation != to_inc {
                            continue;
                        }
                        if self.nodes[to].frozen_until > t {
                            self.nodes[to].queued.push((from, msg, incarnation));
                            continue;
                        }
                        self.node_msg(to, from, msg)?;
                    } else {
                        self.witness_msg(to - 2, from, msg)?;
                    }
                }
                Ev::Fault => {
                    if t < self.faults_until {
                        self.fault();
                        let next = self.rng.range(50_000, 400_000);
                        self.at(t + next, Ev::Fault);
                    }
                }
                Ev::Restart(p) => self.restart(p),
                Ev::EtcdTimeout {
                    node,
                    inc,
                    slot,
                    op_id,
                } => {
                    let n = &self.nodes[node];
                    if n.alive && n.incarnation == inc {
                        if n.frozen_until > t {
                            // The edge's timer is frozen with the process.
                            let at = n.frozen_until + 1;
                            self.at(
                                at,
                                Ev::EtcdTimeout {
                                    node,
                                    inc,
                                    slot,
                                    op_id,
                                },
                            );
                        } else {
                            self.etcd_result(
                                node,
                                slot,
                                op_id,
                                OpResult::Failed("timeout".into()),
                            )?;
                        }
                    }
                }
                Ev::EtcdAnswer {
                    node,
                    inc,
                    slot,
                    id,
                    reply,
                } => {
                    let n = &self.nodes[node];
                    if n.alive && n.incarnation == inc {
                        if n.frozen_until > t {
                            let at = n.frozen_until + 1;
                            self.at(
                                at,
                                Ev::EtcdAnswer {
                                    node,
                                    inc,
                                    slot,
                                    id,
                                    reply,
                                },
                            );
                        } else {
                            self.etcd_answer(node, slot, id, reply)?;
                        }
                    }
                }
                Ev::EtcdTick(w) => {
                    let wit = &mut self.wits[w];
                    if wit.alive {
                        let local = wit.clock.local(t);
                        if let Some(e) = wit.etcd.as_mut() {
                            e.revoke_expired(local);
                        }
                    }
                    self.at(t + ETCD_LESSOR_TICK_US, Ev::EtcdTick(w));
                }
                Ev::Unfreeze(i) => {
                    if self.nodes[i].frozen_until <= t {
                        let q = std::mem::take(&mut self.nodes[i].queued);
                        self.log(|| format!("node {i} resumes (SIGCONT), {} queued", q.len()));
                        // The runtime's release path checks the gate's expiry before
                        // anything else.
                        self.release(i)?;
                        for (from, msg, _) in q {
                            if self.nodes[i].alive {
                                self.node_msg(i, from, msg)?;
                            }
                        }
                    }
                }
                Ev::Heal => {
                    self.log(|| "heal everything".into());
                    for a in 0..4 {
                        for b in 0..4 {
                            if a != b && !(a >= 2 && b >= 2) {
                                self.links[a][b] = Link {
                                    up: true,
                                    loss: 0,
                                    extra_delay: 0,
                                };
                            }
                        }
                    }
                    for p in 0..4 {
                        self.restart(p);
                    }
                    for i in 0..2 {
                        self.nodes[i].frozen_until = 0;
                        self.at(t + 1, Ev::Unfreeze(i));
                    }
                }
            }
        }
        self.check_liveness()?;
        Ok(self.stats)
    }

    fn check_liveness(&self) -> Result<(), String> {
        // After 2 s of a healed network with everyone alive, a primary runs and
        // releases (the simulation is not vacuous, and nothing is stuck).
        let running = self
            .nodes
            .iter()
            .filter(|n| n.alive && n.m.role() == Role::Primary && n.guest == GuestState::Run)
            .count();
        if running != 1 {
            return Err(format!(
                "liveness: {running} running primaries 2 s after healing (roles {:?}/{:?}, gens {}/{})",
                self.nodes[0].m.role(),
                self.nodes[1].m.role(),
                self.nodes[0].m.generation(),
                self.nodes[1].m.generation()
            ));
        }
        Ok(())
    }

    fn fault(&mut self) {
        let r = self.rng.below(100);
        let pair = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3)];
        match r {
            0..=29 => {
                // Toggle one link, one or both directions.
                let (a, b) = pair[self.rng.below(5) as usize];
                let up = self.rng.percent(45);
                let dir = self.rng.below(3);
                if dir != 1 {
                    self.links[a][b].up = up;
                }
                if dir != 0 {
                    self.links[b][a].up = up;
                }
                self.log(|| format!("link {a}-{b} dir {dir} up={up}"));
            }
            30..=39 => {
                // Isolate a node or a witness completely, or heal all.
                let p = self.rng.below(4) as usize;
                let up = self.rng.percent(40);
                for q in 0..4 {
                    if q != p && !(p >= 2 && q >= 2) {
                        self.links[p][q].up = up;
                        self.links[q][p].up = up;
                    }
                }
                self.log(|| format!("party {p} all links up={up}"));
            }
            40..=49 => {
                let (a, b) = pair[self.rng.below(5) as usize];
                let loss = [0, 5, 30, 60][self.rng.below(4) as usize];
                let delay = [0, 0, 50_000, 300_000][self.rng.below(4) as usize];
                for (x, y) in [(a, b), (b, a)] {
                    self.links[x][y].loss = loss;
                    self.links[x][y].extra_delay = delay;
                }
                self.log(|| format!("link {a}-{b} loss {loss}% delay<{delay}"));
            }
            50..=62 => {
                let i = self.rng.below(2) as usize;
                if self.nodes[i].alive {
                    self.nodes[i].alive = false;
                    self.log(|| format!("node {i} crashes"));
                    let back = self.rng.range(100_000, 1_200_000);
                    self.at(self.now + back, Ev::Restart(i));
                }
            }
            63..=74 => {
                let w = self.rng.below(2) as usize;
                if self.wits[w].alive {
                    self.wits[w].alive = false;
                    self.log(|| format!("witness {w} crashes"));
                    let back = self.rng.range(50_000, 1_500_000);
                    self.at(self.now + back, Ev::Restart(2 + w));
                }
            }
            75..=86 => {
                let i = self.rng.below(2) as usize;
                let d = self.rng.range(100_000, 900_000);
                self.nodes[i].frozen_until = self.now + d;
                self.log(|| format!("node {i} frozen (SIGSTOP) for {d} us"));
                self.at(self.now + d, Ev::Unfreeze(i));
            }
            _ => {
                // Everything back up (gives the pair chances to resync and switch).
                for a in 0..4 {
                    for b in 0..4 {
                        if a != b && !(a >= 2 && b >= 2) {
                            self.links[a][b].up = true;
                        }
                    }
                }
                self.log(|| "all links up".into());
            }
        }
    }

    fn restart(&mut self, p: Party) {
        if p < 2 {
            if self.nodes[p].alive {
                return;
            }
            let n = &mut self.nodes[p];
            n.alive = true;
            n.incarnation += 1;
            n.frozen_until = 0;
            n.queued.clear();
            // A restarted PM comes back as standby with what it recorded; its disk
            // (history) is whatever it had: a resync replaces it.
            n.m = QuorumNode::new(
                node_cfg(p, &self.muts, self.variant),
                Start {
                    role: Role::Standby,
                    generation: n.rec_gen,
                    elected: n.rec_elected,
                },
            );
            n.gate = OutputGate::Hold;
            n.guest = GuestState::Pause;
            n.last_heard = None;
            n.peer_reachable = false;
            n.protected = false;
            // Its disk holds its history: the VM can be started from it (the witness
            // decides whether that is allowed: the peer-outdated flag).
            n.has_replica = !n.history.is_empty();
            n.replica_session = 0;
            n.session = 0;
            n.acked = 0;
            n.commit_from = None;
            n.released_through = n.released.max(n.released_through).min(n.history.len());
            // A new process: new etcd sessions (no lease remembered).
            n.sessions = sessions(p, &self.muts, self.variant);
            n.asked.clear();
            let inc = n.incarnation;
            self.log(|| format!("node {p} restarts as standby (incarnation {inc})"));
            self.at(self.now + 1, Ev::NodeTick(p, inc));
            if self.nodes[p].has_replica {
                let _ = self.step_node(p, Event::Protected(true));
            }
        } else {
            let w = &mut self.wits[p - 2];
            if w.alive {
                return;
            }
            w.alive = true;
            let now_l = w.clock.local(self.now);
            if let Some(e) = w.etcd.as_mut() {
                e.restart(now_l);
                w.restarted_at = self.now;
                self.log(|| format!("etcd {} restarts", p - 2));
                return;
            }
            let recs = w
                .store
                .records
                .iter()
                .map(|((c, v), r)| (c.clone(), v.clone(), *r))
                .collect::<Vec<_>>();
            w.core = WitnessCore::new(CoreLimits::default(), recs, now_l);
            #[cfg(feature = "mutations")]
            {
                w.core.mutations = self.muts.core;
                if self.muts.core.no_restart_grace {
                    w.core.drop_leases();
                }
            }
            w.last_wire.clear();
            w.restarted_at = self.now;
            self.log(|| format!("witness {} restarts", p - 2));
        }
    }

    fn step_node(&mut self, i: usize, ev: Event) -> Result<(), String> {
        let local = self.nodes[i].clock.local(self.now);
        let gen_before = self.nodes[i].m.generation();
        let actions = self.nodes[i].m.step(local, ev.clone());
        if self.nodes[i].m.generation() < gen_before {
            return Err(format!(
                "I4: node {i} generation went down {gen_before} -> {}",
                self.nodes[i].m.generation()
            ));
        }
        if self.debug
            && !actions.iter().all(|a| {
                matches!(
                    a,
                    Action::ToPeer(PeerMsg::Status { .. })
                        | Action::ToWitness {
                            request: Request::Query { .. } | Request::Renew { .. },
                            ..
                        }
                )
            })
        {
            self.log(|| format!("node {i} {ev:?} -> {actions:?}"));
        }
        for a in actions {
            self.act(i, a)?;
        }
        self.release(i)
    }

    fn act(&mut self, i: usize, a: Action) -> Result<(), String> {
        match a {
            Action::Output(g) => {
                self.nodes[i].gate = g;
                if matches!(g, OutputGate::Free { .. })
                    && self.permitted(i)
                    && self.permitted(1 - i)
                {
                    return Err(format!(
                        "I2: node {i} gets a release permission while node {} holds one",
                        1 - i
                    ));
                }
            }
            Action::Guest(g) => {
                if g == GuestState::Pause && self.nodes[i].guest == GuestState::Run {
                    self.stats.pauses += 1;
                }
                self.nodes[i].guest = g;
            }
            Action::TakeOver { generation } => {
                self.stats.takeovers += 1;
                let n = &self.nodes[i];
                // I3: the replica holds everything released outside.
                if self.outside.len() > n.history.len()
                    || n.history[..self.outside.len()] != self.outside[..]
                {
                    return Err(format!(
                        "I3: node {i} takes over generation {generation} from a replica of {} items \
                         that lacks released output ({} items released outside)",
                        n.history.len(),
                        self.outside.len()
                    ));
                }
                let n = &mut self.nodes[i];
                n.rec_gen = generation;
                n.released = n.released_through.min(n.history.len());
                n.session = 0;
                n.acked = 0;
                n.commit_from = None;
                n.protected = false;
                n.guest = GuestState::Run;
                n.gate = OutputGate::Hold;
                if n.peer_reachable {
                    self.session_ctr += 1;
                    self.nodes[i].session = self.session_ctr;
                }
            }
            Action::Demote { generation } => {
                self.stats.demotions += 1;
                let n = &mut self.nodes[i];
                n.rec_gen = generation;
                n.gate = OutputGate::Hold;
                n.guest = GuestState::Pause;
                n.has_replica = false;
                n.replica_session = 0;
                n.session = 0;
            }
            Action::Generation(g) => {
                self.nodes[i].rec_gen = self.nodes[i].rec_gen.max(g);
            }
            Action::ToWitness { slot, id, request } if self.variant != Variant::Udp => {
                let s = slot.index();
                let n = &mut self.nodes[i];
                if n.asked.len() >= 256 {
                    n.asked.retain(|k, _| k.1 + 64 > id);
                }
                n.asked.insert((s, id), request.clone());
                if let Some(sess) = n.sessions[s].as_mut() {
                    sess.request(id, request);
                }
                self.pump(i, s);
            }
            Action::ToWitness { slot, id, request } => {
                let wire_id = (self.nodes[i].incarnation << 40) | id;
                let msg = Msg::ToWitness {
                    wire_id,
                    id,
                    sent_real: self.now,
                    req: request,
                };
                self.send(i, 2 + slot.index(), msg);
            }
            Action::ToPeer(m) => self.send(i, 1 - i, Msg::Peer(m)),
            Action::RecordElected { slot, seq } => {
                self.stats.elections += 1;
                self.nodes[i].rec_elected = Some((slot, seq));
            }
            // The sim drives no planned swap (see the swap's own sim below).
            Action::Alert(_) | Action::Audit { .. } | Action::Handover(_) => {}
        }
        Ok(())
    }

    /// Whether node `i` may release unacknowledged output at this real moment: alive
    /// (frozen counts: it may wake up and release at once), gate Free, and its own
    /// clock before the gate's end.
    fn permitted(&self, i: usize) -> bool {
        let n = &self.nodes[i];
        if !n.alive || n.m.role() != Role::Primary {
            return false;
        }
        match n.gate {
            OutputGate::Free { until } => until.is_none_or(|u| n.clock.local(self.now) < u),
            _ => false,
        }
    }

    /// The runtime's release path: what the gate allows at this node's `now`.
    fn release(&mut self, i: usize) -> Result<(), String> {
        let local = self.nodes[i].clock.local(self.now);
        let n = &self.nodes[i];
        if !n.alive || n.frozen_until > self.now || n.m.role() != Role::Primary {
            return Ok(());
        }
        let (upto, unacked) = match n.gate {
            OutputGate::Hold => return Ok(()),
            OutputGate::Acked => (n.acked.min(n.history.len()), false),
            OutputGate::Free { until } => {
                if until.is_some_and(|u| local >= u) {
                    return Ok(());
                }
                let free = n
                    .commit_from
                    .unwrap_or(n.history.len())
                    .min(n.history.len());
                let acked = n.acked.min(n.history.len());
                if acked >= free {
                    (acked, false)
                } else {
                    (free, true)
                }
            }
        };
        if upto <= n.released {
            return Ok(());
        }
        let gen = n.m.generation();
        if unacked {
            self.stats.simplex_releases += 1;
            // I2: exclusive unacknowledged release: `gen` was granted to this node, and
            // the other node has no release permission at this real moment.
            match self.granted_to.get(&gen) {
                Some((holder, _)) if *holder == NODES[i] => {}
                other => {
                    return Err(format!(
                        "I2: node {i} releases unacknowledged output at generation {gen}, granted to {other:?}"
                    ))
                }
            }
            if self.permitted(1 - i) {
                return Err(format!(
                    "I2: node {i} releases unacknowledged output at generation {gen} while node {} \
                     (generation {}) holds a release permission",
                    1 - i,
                    self.nodes[1 - i].m.generation()
                ));
            }
        }
        for p in n.released..upto {
            let item = n.history[p];
            match self.outside.get(p) {
                Some(&o) if o != item => {
                    return Err(format!(
                        "I1: position {p} released as {item:#x} by node {i} but {o:#x} was released before"
                    ))
                }
                Some(_) => {}
                None if p == self.outside.len() => {
                    self.outside.push(item);
                    self.stats.released += 1;
                }
                None => return Err(format!("I1: node {i} releases position {p} past the end {}", self.outside.len())),
            }
        }
        self.nodes[i].released = upto;
        Ok(())
    }

    fn node_tick(&mut self, i: usize) -> Result<(), String> {
        let now = self.now;
        // Failure detection over the peer path (the A-Links' job in the runtime).
        let heard = self.nodes[i]
            .last_heard
            .is_some_and(|h| now.saturating_sub(h) < DETECT_US);
        if heard != self.nodes[i].peer_reachable {
            self.set_reachable(i, heard)?;
        }
        // The VM: a primary's running guest produces output.
        let n = &mut self.nodes[i];
        if n.m.role() == Role::Primary && n.guest == GuestState::Run {
            let gen = n.m.generation();
            let pos = n.history.len() as u64;
            n.history.push((gen << 32) | pos);
        }
        // Heartbeats and checkpoints.
        if now.saturating_sub(self.nodes[i].last_hb) >= HEARTBEAT_US {
            self.nodes[i].last_hb = now;
            self.send(i, 1 - i, Msg::Heartbeat);
        }
        let n = &self.nodes[i];
        if n.m.role() == Role::Primary && n.session != 0 {
            if n.commit_from.is_none() {
                let len = n.history.len();
                self.nodes[i].commit_from = Some(len);
            }
            let n = &self.nodes[i];
            let base = n.acked.min(n.history.len());
            let msg = Msg::Ckpt {
                gen: n.m.generation(),
                session: n.session,
                base,
                items: n.history[base..].to_vec(),
                released_through: n.released,
            };
            self.send(i, 1 - i, msg);
        }
        self.step_node(i, Event::Tick)
    }

    fn set_reachable(&mut self, i: usize, r: bool) -> Result<(), String> {
        self.nodes[i].peer_reachable = r;
        if self.nodes[i].m.role() == Role::Primary {
            if r {
                // A new checkpoint session: the standby is resynced from the start.
                self.session_ctr += 1;
                self.nodes[i].session = self.session_ctr;
                self.nodes[i].acked = 0;
                self.nodes[i].commit_from = None;
            } else {
                self.nodes[i].session = 0;
                self.nodes[i].commit_from = None;
                if self.nodes[i].protected {
                    self.nodes[i].protected = false;
                    self.step_node(i, Event::Protected(false))?;
                }
            }
        }
        self.step_node(i, Event::PeerReachable(r))
    }

    fn node_msg(&mut self, i: usize, from: Party, msg: Msg) -> Result<(), String> {
        if from < 2 {
            self.nodes[i].last_heard = Some(self.now);
            if !self.nodes[i].peer_reachable {
                self.set_reachable(i, true)?;
            }
        }
        match msg {
            Msg::Heartbeat => Ok(()),
            Msg::Peer(m) => self.step_node(i, Event::FromPeer(m)),
            Msg::Ckpt {
                gen,
                session,
                base,
                items,
                released_through,
            } => {
                let n = &mut self.nodes[i];
                if n.m.role() != Role::Standby || gen < n.m.generation() {
                    return Ok(()); // older generations are refused
                }
                if session != n.replica_session {
                    if base != 0 {
                        return Ok(());
                    }
                    n.replica_session = session;
                    n.history.clear();
                }
                // Older checkpoints of this session (the links reorder; the A-Link
                // would not) add nothing.
                if base > n.history.len() || base + items.len() < n.history.len() {
                    return Ok(());
                }
                n.history.truncate(base);
                n.history.extend_from_slice(&items);
                n.released_through = n
                    .released_through
                    .max(released_through)
                    .min(n.history.len());
                let len = n.history.len();
                self.send(i, 1 - i, Msg::Ack { session, len });
                if !self.nodes[i].has_replica {
                    self.nodes[i].has_replica = true;
                    self.step_node(i, Event::Protected(true))?;
                }
                Ok(())
            }
            Msg::Ack { session, len } => {
                let n = &mut self.nodes[i];
                if n.m.role() != Role::Primary || session != n.session || session == 0 {
                    return Ok(());
                }
                n.acked = n.acked.max(len).min(n.history.len());
                if !n.protected {
                    n.protected = true;
                    self.step_node(i, Event::Protected(true))?;
                }
                self.release(i)
            }
            Msg::FromWitness { slot, id, reply } => {
                self.step_node(i, Event::WitnessReply { slot, id, reply })
            }
            Msg::EtcdResult {
                slot,
                op_id,
                result,
                inc,
            } => {
                if inc == self.nodes[i].incarnation {
                    self.etcd_result(i, slot, op_id, result)?;
                }
                Ok(())
            }
            Msg::ToWitness { .. } | Msg::EtcdOp { .. } => Ok(()),
        }
    }

    fn witness_msg(&mut self, w: usize, from: Party, msg: Msg) -> Result<(), String> {
        if let Msg::EtcdOp {
            slot,
            op_id,
            op,
            inc,
            sent_real,
        } = msg
        {
            let wit = &mut self.wits[w];
            // Down, or sent to an earlier process (its connection died with it).
            if !wit.alive || sent_real < wit.restarted_at {
                return Ok(());
            }
            let local = wit.clock.local(self.now);
            let Some(model) = wit.etcd.as_mut() else {
                return Ok(());
            };
            let result = model.apply(local, &op)?;
            self.send(
                2 + w,
                from,
                Msg::EtcdResult {
                    slot,
                    op_id,
                    result,
                    inc,
                },
            );
            return Ok(());
        }
        let Msg::ToWitness {
            wire_id,
            id,
            sent_real,
            req,
        } = msg
        else {
            return Ok(());
        };
        let wit = &mut self.wits[w];
        if !wit.alive || sent_real < wit.restarted_at {
            return Ok(()); // down, or a session of an earlier incarnation
        }
        let node = NODES[from];
        // The wire refuses stale sequence numbers: requests apply in send order.
        if wit.last_wire.get(&node).is_some_and(|&l| wire_id <= l) {
            return Ok(());
        }
        wit.last_wire.insert(node, wire_id);
        let local = wit.clock.local(self.now);
        let before = wit.store.records.get(&(CLUSTER.into(), VM.into())).copied();
        let reply = wit.core.handle(local, CLUSTER, &req, &mut wit.store);
        let after = wit.store.records.get(&(CLUSTER.into(), VM.into())).copied();
        if let (Some(b), Some(a)) = (before, after) {
            if a.generation < b.generation {
                return Err(format!(
                    "I4: witness {w} record went down {} -> {}",
                    b.generation, a.generation
                ));
            }
        }
        self.check_answer(&format!("witness {w}"), node, &req, &reply)?;
        let _: Option<VmRecord> = after;
        self.send(
            2 + w,
            from,
            Msg::FromWitness {
                slot: if w == 0 {
                    Slot::Preferred
                } else {
                    Slot::Alternate
                },
                id,
                reply,
            },
        );
        Ok(())
    }
}

impl Sim {
    /// I4 on an answer of `who` to `node`'s `req`: a grant is of a higher generation
    /// than asked from and never of one granted to the other node; a renewal is granted
    /// only for a generation granted to its sender. Counts refusals.
    fn check_answer(
        &mut self,
        who: &str,
        node: NodeId,
        req: &Request,
        reply: &Reply,
    ) -> Result<(), String> {
        if let Reply::Granted { generation, .. } = *reply {
            match *req {
                Request::Acquire { from, .. } => {
                    if generation <= from {
                        return Err(format!("I4: {who} grants {generation} from {from}"));
                    }
                    if let Some((other, _)) = self.granted_to.get(&generation) {
                        if *other != node {
                            return Err(format!(
                                "I4: {who} grants generation {generation} to {node}, already granted to {other}"
                            ));
                        }
                    }
                    self.max_granted = self.max_granted.max(generation);
                    self.granted_to
                        .entry(generation)
                        .or_insert((node, self.now));
                    self.log(|| format!("{who} GRANTS generation {generation} to {node}"));
                }
                Request::Renew { .. } => {
                    let holder = self.granted_to.get(&generation).map(|g| g.0);
                    if holder != Some(node) {
                        return Err(format!(
                            "I4: {who} renews {generation} for {node}, granted to {holder:?}"
                        ));
                    }
                }
                Request::Query { .. } | Request::Release { .. } => {}
            }
        }
        // An acquire answered Lost with the asker as the holder: the record proves an
        // earlier copy of it was granted (the node takes it as its grant). With etcd the
        // grant is checked where the node receives answers, and that copy's answer may
        // never have arrived (the session reset): record the grant from this evidence,
        // never one of a generation granted to the other node.
        if let (
            Request::Acquire { .. },
            Reply::Lost {
                generation,
                holder: Some(h),
            },
        ) = (req, reply)
        {
            if *h == node {
                if let Some((other, _)) = self.granted_to.get(generation) {
                    if *other != node {
                        return Err(format!(
                            "I4: {who} says {node} holds {generation}, granted to {other}"
                        ));
                    }
                }
                self.granted_to
                    .entry(*generation)
                    .or_insert((node, self.now));
            }
        }
        if matches!(
            reply,
            Reply::Busy { .. } | Reply::Outdated { .. } | Reply::Lost { .. }
        ) {
            self.stats.refusals += 1;
        }
        Ok(())
    }

    /// Sends node `i`'s next etcd operation of slot `s` (one in flight at a time, with
    /// the edge's timeout) and hands its session's answers to the machine.
    fn pump(&mut self, i: usize, s: usize) {
        let inc = self.nodes[i].incarnation;
        let Some(sess) = self.nodes[i].sessions[s].as_mut() else {
            return;
        };
        let next = sess.poll_op();
        let answers = sess.take_answers();
        if let Some((op_id, op)) = next {
            self.send(
                i,
                2 + s,
                Msg::EtcdOp {
                    slot: s,
                    op_id,
                    op,
                    inc,
                    sent_real: self.now,
                },
            );
            self.at(
                self.now + ETCD_OP_TIMEOUT_US,
                Ev::EtcdTimeout {
                    node: i,
                    inc,
                    slot: s,
                    op_id,
                },
            );
        }
        let slot = Slot::ALL[s];
        for (id, reply) in answers {
            self.at(
                self.now + 1,
                Ev::EtcdAnswer {
                    node: i,
                    inc,
                    slot,
                    id,
                    reply,
                },
            );
        }
    }

    fn etcd_result(
        &mut self,
        i: usize,
        s: usize,
        op_id: u64,
        result: OpResult,
    ) -> Result<(), String> {
        if let Some(sess) = self.nodes[i].sessions[s].as_mut() {
            sess.on_result(op_id, result);
        }
        self.pump(i, s);
        Ok(())
    }

    /// An etcd session's answer: the witness-side invariants (checked where the UDP
    /// variant checks them at the witness), then the node machine.
    fn etcd_answer(&mut self, i: usize, slot: Slot, id: u64, reply: Reply) -> Result<(), String> {
        let node = NODES[i];
        let req = self.nodes[i].asked.remove(&(slot.index(), id));
        if let Some(req) = req {
            self.check_answer(&format!("etcd {slot}"), node, &req, &reply)?;
        }
        self.step_node(i, Event::WitnessReply { slot, id, reply })
    }
}

fn run_seed(seed: u64, muts: Muts) -> Result<Stats, String> {
    Sim::new(seed, muts, Variant::Udp).run()
}

fn run_seed_etcd(seed: u64, muts: Muts, alternate: bool) -> Result<Stats, String> {
    Sim::new(seed, muts, Variant::Etcd { alternate }).run()
}

/// Seeds that failed once (each fixed since); they run first, every time.
const REGRESSIONS: &[u64] = &[
    3, 144, 295, 337, 768, 1372, 1430, 2731, 3202, 3353, 4131, 7141, 7289, 8025, 9816, 15110,
    34566, 34844, 102, 316, 548, 833, 985, 1354, 1688, 2802,
];

fn seeds() -> (u64, u64) {
    if let Ok(s) = std::env::var("SIM_SEED") {
        let s: u64 = s.parse().expect("SIM_SEED must be a number");
        return (s, s + 1);
    }
    let n = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10_000);
    (0, n)
}

/// Runs the regression seeds then `seeds`; fails with the first failing seeds. With
/// 1000 seeds or more, checks that the faults really happened (not vacuous).
fn check_seeds(
    what: &str,
    regressions: &[u64],
    (lo, hi): (u64, u64),
    elections: bool,
    run: impl Fn(u64) -> Result<Stats, String>,
) {
    let start = std::time::Instant::now();
    let mut total = Stats::default();
    let mut failures = Vec::new();
    for seed in regressions.iter().copied().chain(lo..hi) {
        match run(seed) {
            Ok(s) => {
                total.takeovers += s.takeovers;
                total.demotions += s.demotions;
                total.pauses += s.pauses;
                total.simplex_releases += s.simplex_releases;
                total.refusals += s.refusals;
                total.released += s.released;
                total.elections += s.elections;
                total.events += s.events;
            }
            Err(e) => {
                failures.push(format!("seed {seed}: {e}"));
                if failures.len() >= 5 {
                    break;
                }
            }
        }
    }
    eprintln!(
        "{what}: {} seeds in {:.1} s: {total:?}",
        hi - lo + regressions.len() as u64,
        start.elapsed().as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "failing seeds (replay with SIM_SEED=n SIM_DEBUG=1):\n{}",
        failures.join("\n")
    );
    if hi - lo >= 1000 {
        // The faults really happen: takeovers, losers, pauses, simplex, elections.
        assert!(total.takeovers > 0 && total.demotions > 0 && total.pauses > 0);
        assert!(total.simplex_releases > 0 && (total.elections > 0 || !elections));
    }
}

#[test]
fn simulation_keeps_every_invariant() {
    check_seeds("quorum sim", REGRESSIONS, seeds(), true, |seed| {
        run_seed(seed, Muts::default())
    });
}

/// Seeds of the etcd variants that failed once (each fixed since); they run first.
/// 2383: a primary relied on the peer-outdated mark after sending a renewal that
/// cleared it (applied, answer lost) and released alone (node machine, fixed: the mark
/// is dropped when such a renewal is sent). 4704, 9491: a restarted standby took a
/// checkpoint sent to its previous process as a resync (simulation's network model,
/// fixed: a process never receives what was sent to its predecessor). 4990, 15053,
/// 22946 (one etcd): a primary that held the previous generation re-acquired it after
/// a restart and released alone, taking the grant as the peer-outdated mark, which the
/// rules keep unchanged for a previous holder (node machine, fixed: the mark is relied
/// on only once a renewal that sets it is granted).
const ETCD_REGRESSIONS: &[u64] = &[2383, 4704, 4990, 9491, 15053, 22946];

fn etcd_seeds() -> (u64, u64) {
    if std::env::var("SIM_SEED").is_ok() {
        return seeds();
    }
    let n = std::env::var("SIM_ETCD_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    (0, n)
}

#[test]
fn simulation_with_etcd_keeps_every_invariant() {
    check_seeds(
        "quorum sim, etcd in both slots",
        ETCD_REGRESSIONS,
        etcd_seeds(),
        true,
        |seed| run_seed_etcd(seed, Muts::default(), true),
    );
}

#[test]
fn simulation_with_one_etcd_keeps_every_invariant() {
    check_seeds(
        "quorum sim, one etcd",
        ETCD_REGRESSIONS,
        etcd_seeds(),
        false,
        |seed| run_seed_etcd(seed, Muts::default(), false),
    );
}

#[cfg(feature = "mutations")]
fn mutation_caught(name: &str, muts: Muts, max_seeds: u64) {
    for seed in 0..max_seeds {
        if let Err(e) = run_seed(seed, muts) {
            eprintln!("mutation {name}: caught by seed {seed}: {e}");
            return;
        }
    }
    panic!("mutation {name} was NOT caught in {max_seeds} seeds");
}

#[cfg(feature = "mutations")]
mod mutations {
    use super::*;

    fn node(m: NodeMutations) -> Muts {
        Muts {
            node: m,
            ..Muts::default()
        }
    }
    fn core(m: CoreMutations) -> Muts {
        Muts {
            core: m,
            ..Muts::default()
        }
    }
    fn etcd(m: EtcdMutations) -> Muts {
        Muts {
            etcd: m,
            ..Muts::default()
        }
    }
    /// Like `mutation_caught`, in an etcd variant (both slots, or one etcd).
    fn etcd_caught(name: &str, muts: Muts, max_seeds: u64, alternate: bool) {
        for seed in 0..max_seeds {
            if let Err(e) = run_seed_etcd(seed, muts, alternate) {
                eprintln!("mutation {name}: caught by seed {seed}: {e}");
                return;
            }
        }
        panic!("mutation {name} was NOT caught in {max_seeds} seeds");
    }

    #[test]
    fn etcd_primary_keeps_believing_the_peer_is_outdated() {
        etcd_caught(
            "keep_outdated_belief (node, etcd)",
            Muts {
                node: NodeMutations {
                    keep_outdated_belief: true,
                    ..Default::default()
                },
                ..Muts::default()
            },
            20_000,
            true,
        );
    }
    #[test]
    fn etcd_primary_trusts_the_takeover_as_the_mark() {
        etcd_caught(
            "trust_takeover_mark (node, etcd)",
            Muts {
                node: NodeMutations {
                    trust_takeover_mark: true,
                    ..Default::default()
                },
                ..Muts::default()
            },
            30_000,
            false,
        );
    }
    #[test]
    fn etcd_grants_over_a_live_owner_key() {
        etcd_caught(
            "ignore_owner (etcd)",
            etcd(EtcdMutations {
                ignore_owner: true,
                ..Default::default()
            }),
            2000,
            true,
        );
    }
    #[test]
    fn etcd_commits_without_comparing_revisions() {
        etcd_caught(
            "no_compares (etcd)",
            etcd(EtcdMutations {
                no_compares: true,
                ..Default::default()
            }),
            2000,
            true,
        );
    }
    #[test]
    fn etcd_ignores_outdated() {
        etcd_caught(
            "ignore_outdated (etcd rules)",
            etcd(EtcdMutations {
                rules: CoreMutations {
                    ignore_outdated: true,
                    ..Default::default()
                },
                ..Default::default()
            }),
            2000,
            true,
        );
    }

    #[test]
    #[ignore = "not caught: masked by the peer-outdated fence (a standby is refused while the holder runs alone, so lease timing is defense in depth here; see quorum/README.md)"]
    fn primary_keeps_releasing_after_lease_expiry() {
        mutation_caught(
            "keep_releasing_after_expiry",
            node(NodeMutations {
                keep_releasing_after_expiry: true,
                ..Default::default()
            }),
            3000,
        );
    }
    #[test]
    fn witness_grants_without_lapse() {
        mutation_caught(
            "grant_without_lapse",
            core(CoreMutations {
                grant_without_lapse: true,
                ..Default::default()
            }),
            3000,
        );
    }
    #[test]
    #[ignore = "not caught: masked by the peer-outdated fence (a standby is refused while the holder runs alone, so lease timing is defense in depth here; see quorum/README.md)"]
    fn no_margin() {
        mutation_caught(
            "no_margin",
            node(NodeMutations {
                no_margin: true,
                ..Default::default()
            }),
            10_000,
        );
    }
    #[test]
    #[ignore = "not caught: masked by the peer-outdated fence (a standby is refused while the holder runs alone, so lease timing is defense in depth here; see quorum/README.md)"]
    fn lease_measured_from_the_reply() {
        mutation_caught(
            "measure_from_reply",
            node(NodeMutations {
                measure_from_reply: true,
                ..Default::default()
            }),
            10_000,
        );
    }
    #[test]
    fn simplex_without_outdating_the_peer() {
        mutation_caught(
            "ignore_outdated (node)",
            node(NodeMutations {
                ignore_outdated: true,
                ..Default::default()
            }),
            3000,
        );
    }
    #[test]
    fn witness_ignores_outdated() {
        mutation_caught(
            "ignore_outdated (witness)",
            core(CoreMutations {
                ignore_outdated: true,
                ..Default::default()
            }),
            3000,
        );
    }
    #[test]
    #[ignore = "not caught: masked by the peer-outdated fence (a standby is refused while the holder runs alone, so lease timing is defense in depth here; see quorum/README.md)"]
    fn witness_forgets_leases_on_restart() {
        mutation_caught(
            "no_restart_grace",
            core(CoreMutations {
                no_restart_grace: true,
                ..Default::default()
            }),
            10_000,
        );
    }
    #[test]
    fn standby_asks_any_witness() {
        mutation_caught(
            "any_witness",
            node(NodeMutations {
                any_witness: true,
                ..Default::default()
            }),
            10_000,
        );
    }
    #[test]
    fn holder_renews_at_its_elected_only() {
        mutation_caught(
            "renew_elected_only",
            node(NodeMutations {
                renew_elected_only: true,
                ..Default::default()
            }),
            10_000,
        );
    }
}
