//! The etcd backend's logic, without I/O: it turns the node machine's requests into
//! etcd operations ([`Op`]: a read of the VM's keys, a lease grant, one lease
//! keep-alive, a conditional transaction, a revoke) and their results ([`OpResult`])
//! into the same [`Reply`]s the UDP witness gives. The edge (`etcd::exec`) runs the
//! operations against a real etcd; the simulation runs them against a model of etcd's
//! semantics. One operation is in flight at a time, so a node's requests take effect
//! in the order it sent them.
//!
//! How a request is served:
//! 1. read the VM's three keys (`etcd::keys`) in one linearizable range;
//! 2. decide with the shared rules (`crate::rules::Rules::decide`): "the holder's lease
//!    is live" is "the owner key exists" (etcd deletes it when the lease lapses);
//! 3. if the decision grants (a lease starts now for the holder): extend the owner's
//!    lease by ONE keep-alive sent now when the requester already owns it, else grant
//!    a fresh lease; then commit the decided record by a transaction that compares the
//!    `mod_revision` of all three keys with what step 1 read, and puts the changed
//!    values (the owner key on the lease). The reply goes out only if it committed: it
//!    is durable, and it was decided over exactly the state it replaced. Otherwise the
//!    transaction's else-branch read is decided on again (a few rounds, then the request
//!    is dropped: the node machine asks again).
//!
//! Order: one operation is in flight at a time, but one that timed out may still reach
//! etcd later (a delayed packet, a member that forwards it after a partition). So after
//! a transaction whose outcome is unknown, the VM is *fenced*: its next commit rewrites
//! the `outdated` key, which is never deleted, so the stale transaction's compare on
//! that key's revision can never hold again; it cannot take effect after a later
//! request. A lease given up (a grant that did not commit, whose revoke may also arrive
//! late) is never adopted afterwards.
//!
//! The holder's renewal is the same path starting at step 3 with the state its last
//! commit left: one keep-alive of its own lease, then a transaction that confirms
//! (compares) that nothing changed and writes the peer-outdated mark if it changed.
//! So a renewal is answered `Granted` only after a keep-alive sent after the request,
//! which etcd answered with a TTL at least the requested lease: the node machine's
//! lease, measured from the request's send time, ends before etcd's (the `Backend`
//! contract). Jepsen's finding on etcd 3.4.3 (a lock can be returned after its lease
//! expired) does not apply: nothing here trusts a lock; every grant is a compare on
//! revisions, every permission is bounded by the requester's own clock, and the
//! generation is a fencing token.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use super::keys::{decode, encode, Holder, Key, Outdated, VmKeys};
use crate::rules::{self, Known, Rules};
use crate::types::{Generation, NodeId};
use crate::witness::ops::{OpError, Reply, Request};
use crate::witness::store::VmRecord;

/// One key as etcd returned it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyState {
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

/// A VM's three keys as one read saw them (None: absent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub generation: Option<KeyState>,
    pub owner: Option<KeyState>,
    pub outdated: Option<KeyState>,
}

impl Observed {
    pub fn get(&self, k: Key) -> Option<&KeyState> {
        match k {
            Key::Generation => self.generation.as_ref(),
            Key::Owner => self.owner.as_ref(),
            Key::Outdated => self.outdated.as_ref(),
        }
    }

    pub fn slot(&mut self, k: Key) -> &mut Option<KeyState> {
        match k {
            Key::Generation => &mut self.generation,
            Key::Owner => &mut self.owner,
            Key::Outdated => &mut self.outdated,
        }
    }

    /// The key's `mod_revision`, 0 if absent (what etcd compares an absent key as).
    pub fn mod_revision(&self, k: Key) -> i64 {
        self.get(k).map_or(0, |s| s.mod_revision)
    }
}

/// A put of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Put {
    pub key: Key,
    pub value: Vec<u8>,
    /// The lease to attach the key to (0: none).
    pub lease: i64,
}

/// An operation for the edge to run against etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read the VM's keys (a linearizable range over `keys.dir`).
    Read { keys: VmKeys },
    /// Grant a lease of `ttl_s` seconds.
    Grant { ttl_s: i64 },
    /// ONE keep-alive of `lease`, sent now; its own answer is the result.
    KeepAlive { lease: i64 },
    /// If every key's `mod_revision` equals the one given (0: absent), the puts, then a
    /// read of the VM's keys; otherwise only the read.
    Txn {
        keys: VmKeys,
        compares: Vec<(Key, i64)>,
        puts: Vec<Put>,
    },
    /// Revoke a lease nobody may act on (a grant that did not commit).
    Revoke { lease: i64 },
}

/// What the edge reports for an [`Op`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    Read(Observed),
    Granted {
        lease: i64,
        ttl_s: i64,
    },
    /// The lease's TTL after the keep-alive; 0 or less: the lease is gone.
    KeepAlive {
        ttl_s: i64,
    },
    Txn {
        succeeded: bool,
        observed: Observed,
    },
    Revoked,
    /// An error or a timeout: the outcome is unknown (a transaction may have committed).
    Failed(String),
}

/// Deliberate bugs for the simulation's mutation tests.
#[cfg(feature = "mutations")]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EtcdMutations {
    /// Decide as if the owner key were absent (grant over a live lease).
    pub ignore_owner: bool,
    /// Commit without comparing revisions (a blind write).
    pub no_compares: bool,
    /// The shared rules' bugs, applied by this session.
    pub rules: crate::rules::CoreMutations,
}

/// Who the session is and where its keys live.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub node: NodeId,
    pub cluster: String,
    /// Key prefix (`etcd::keys::check_prefix`).
    pub prefix: String,
    /// When another node's owner key stands: ask again after this long (etcd deletes
    /// the key some time after the lease lapses; it does not say when).
    pub busy_retry: Duration,
    #[cfg(feature = "mutations")]
    pub mutations: EtcdMutations,
}

impl SessionConfig {
    pub fn new(node: NodeId, cluster: &str, prefix: &str, busy_retry: Duration) -> Self {
        SessionConfig {
            node,
            cluster: cluster.to_string(),
            prefix: prefix.to_string(),
            busy_retry,
            #[cfg(feature = "mutations")]
            mutations: EtcdMutations::default(),
        }
    }
}

/// Most requests waiting (older ones are dropped: the machine resends).
pub const MAX_QUEUED: usize = 8;
/// Most VMs one session serves (a node machine asks about one).
pub const MAX_VMS: usize = 64;
/// Leases given up that are remembered (never adopted again).
const MAX_ABANDONED: usize = 1024;
/// Decisions per request before it is dropped (each a lost race with another writer).
const MAX_ROUNDS: u32 = 3;

/// This node's lease for one VM and the state its last commit left.
#[derive(Clone, Debug)]
struct Held {
    generation: Generation,
    lease: i64,
    observed: Observed,
}

#[derive(Clone, Debug)]
enum Step {
    Read,
    /// The holder's renewal: one keep-alive of its own lease, then decided against the
    /// state of its last commit.
    RenewHeld {
        lease: i64,
        observed: Observed,
    },
    /// Extending the owner key's lease (the requester owns it) before the commit.
    Extend {
        lease: i64,
        observed: Observed,
        next: VmRecord,
        reply: Reply,
    },
    /// A fresh lease for the owner key before the commit.
    Grant {
        observed: Observed,
        next: VmRecord,
        reply: Reply,
    },
    Commit {
        observed: Observed,
        lease: i64,
        new_lease: bool,
        next: VmRecord,
        reply: Reply,
    },
}

#[derive(Clone, Debug)]
struct Work {
    id: u64,
    req: Request,
    keys: VmKeys,
    ttl_s: i64,
    rounds: u32,
    step: Step,
}

/// Counters for status views and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub answered: u64,
    pub dropped: u64,
    pub failed_ops: u64,
    pub lost_races: u64,
    pub revoked: u64,
}

/// The etcd backend of one node (see the module docs).
#[derive(Debug)]
pub struct EtcdSession {
    cfg: SessionConfig,
    rules: Rules,
    queue: VecDeque<(u64, Request)>,
    work: Option<Work>,
    revokes: Vec<i64>,
    /// The op in flight: its id, and whether it is a revoke (whose result no request
    /// waits for).
    in_flight: Option<(u64, bool)>,
    next_op: u64,
    held: HashMap<String, Held>,
    /// The VMs asked about (at most [`MAX_VMS`]).
    vms: HashSet<String>,
    /// VMs whose next commit must rewrite `outdated` (a transaction's outcome unknown).
    fenced: HashSet<String>,
    abandoned: VecDeque<i64>,
    answers: Vec<(u64, Reply)>,
    pub stats: SessionStats,
    /// The last failure (for logs and status).
    pub last_error: Option<String>,
}

impl EtcdSession {
    /// A session; the prefix and cluster are checked.
    pub fn new(cfg: SessionConfig) -> Result<EtcdSession, String> {
        // Checks prefix and cluster with a valid VM name.
        VmKeys::new(&cfg.prefix, &cfg.cluster, "x")?;
        Ok(EtcdSession {
            rules: Rules {
                #[cfg(feature = "mutations")]
                mutations: cfg.mutations.rules,
            },
            cfg,
            queue: VecDeque::new(),
            work: None,
            revokes: Vec::new(),
            in_flight: None,
            next_op: 1,
            held: HashMap::new(),
            vms: HashSet::new(),
            fenced: HashSet::new(),
            abandoned: VecDeque::new(),
            answers: Vec::new(),
            stats: SessionStats::default(),
            last_error: None,
        })
    }

    pub fn node(&self) -> NodeId {
        self.cfg.node
    }

    /// Queues request `id` (dropping the oldest beyond [`MAX_QUEUED`]).
    pub fn request(&mut self, id: u64, req: Request) {
        if self.queue.len() >= MAX_QUEUED {
            self.queue.pop_front();
            self.stats.dropped += 1;
        }
        self.queue.push_back((id, req));
    }

    /// Whether nothing is queued or in progress.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.work.is_none() && self.revokes.is_empty()
    }

    /// The answers ready, in order.
    pub fn take_answers(&mut self) -> Vec<(u64, Reply)> {
        std::mem::take(&mut self.answers)
    }

    /// The next operation to run, if none is in flight: (op id, op).
    pub fn poll_op(&mut self) -> Option<(u64, Op)> {
        if self.in_flight.is_some() {
            return None;
        }
        if let Some(lease) = self.revokes.pop() {
            return Some(self.issue(Op::Revoke { lease }, true));
        }
        while self.work.is_none() {
            let (id, req) = self.queue.pop_front()?;
            self.start(id, req);
        }
        let w = self.work.as_ref()?;
        let op = match &w.step {
            Step::Read => Op::Read {
                keys: w.keys.clone(),
            },
            Step::RenewHeld { lease, .. } | Step::Extend { lease, .. } => {
                Op::KeepAlive { lease: *lease }
            }
            Step::Grant { .. } => Op::Grant { ttl_s: w.ttl_s },
            Step::Commit {
                observed,
                lease,
                next,
                ..
            } => self.commit_op(&w.keys, observed, *lease, next, w.req.vm()),
        };
        Some(self.issue(op, false))
    }

    fn issue(&mut self, op: Op, revoke: bool) -> (u64, Op) {
        let id = self.next_op;
        self.next_op += 1;
        self.in_flight = Some((id, revoke));
        (id, op)
    }

    fn start(&mut self, id: u64, req: Request) {
        if let Err(e) = rules::validate(&req) {
            self.answer(id, Reply::Refused(e));
            return;
        }
        if matches!(req, Request::Release { .. }) {
            // etcd's owner key lives on an etcd lease the holder keeps alive; giving it
            // up early (a planned swap's handover) is not built for this backend.
            self.answer(
                id,
                Reply::Refused(OpError::Unsupported(
                    "releasing a lease (a planned role swap) with the etcd backend".into(),
                )),
            );
            return;
        }
        let keys = match VmKeys::new(&self.cfg.prefix, &self.cfg.cluster, req.vm()) {
            Ok(k) => k,
            Err(e) => {
                self.answer(id, Reply::Refused(OpError::BadName(e)));
                return;
            }
        };
        if !self.vms.contains(req.vm()) {
            if self.vms.len() >= MAX_VMS {
                self.answer(id, Reply::Refused(OpError::TooManyVms(MAX_VMS as u32)));
                return;
            }
            self.vms.insert(req.vm().to_string());
        }
        let lease_ms = match req {
            Request::Renew { lease_ms, .. } | Request::Acquire { lease_ms, .. } => lease_ms,
            Request::Query { .. } | Request::Release { .. } => 0,
        };
        // etcd's TTLs are whole seconds: round up (a longer lease at etcd is safe; the
        // node measures its own from `lease_ms`).
        let ttl_s = i64::from(lease_ms.div_ceil(1000)).max(1);
        let step = match (&req, self.held.get(req.vm())) {
            (Request::Renew { generation, .. }, Some(h)) if h.generation == *generation => {
                Step::RenewHeld {
                    lease: h.lease,
                    observed: h.observed.clone(),
                }
            }
            _ => Step::Read,
        };
        self.work = Some(Work {
            id,
            req,
            keys,
            ttl_s,
            rounds: 0,
            step,
        });
    }

    fn answer(&mut self, id: u64, reply: Reply) {
        self.stats.answered += 1;
        self.answers.push((id, reply));
    }

    /// The result of op `op`. Results of other ops (late, after a timeout) are ignored.
    pub fn on_result(&mut self, op: u64, result: OpResult) {
        let Some((in_flight, revoke)) = self.in_flight else {
            return;
        };
        if in_flight != op {
            return;
        }
        self.in_flight = None;
        if revoke {
            if result == OpResult::Revoked {
                self.stats.revoked += 1;
            }
            return;
        }
        let Some(mut w) = self.work.take() else {
            return;
        };
        let vm = w.req.vm().to_string();
        let step = std::mem::replace(&mut w.step, Step::Read);
        match (step, result) {
            (step, OpResult::Failed(e)) => {
                self.stats.failed_ops += 1;
                self.last_error = Some(e);
                // The outcome is unknown: the next renewal starts from a read.
                self.held.remove(&vm);
                if let Step::Commit {
                    lease, new_lease, ..
                } = step
                {
                    // The transaction may still take effect: fence it off.
                    self.fenced.insert(vm);
                    if new_lease {
                        // Nobody was told of this lease: if the commit happened,
                        // revoking it frees the VM at once instead of after a TTL.
                        self.abandon(lease);
                    }
                }
                self.drop_work();
            }
            (Step::Read, OpResult::Read(observed)) => self.plan(w, observed, None),
            (Step::RenewHeld { lease, observed }, OpResult::KeepAlive { ttl_s }) => {
                if ttl_s <= 0 {
                    self.held.remove(&vm);
                    self.again(w);
                } else if ttl_s < w.ttl_s {
                    self.lease_too_short(ttl_s, w.ttl_s);
                } else {
                    self.plan(w, observed, Some(lease));
                }
            }
            (
                Step::Extend {
                    lease,
                    observed,
                    next,
                    reply,
                },
                OpResult::KeepAlive { ttl_s },
            ) => {
                if ttl_s <= 0 {
                    self.held.remove(&vm);
                    self.again(w);
                } else if ttl_s < w.ttl_s {
                    self.lease_too_short(ttl_s, w.ttl_s);
                } else {
                    w.step = Step::Commit {
                        observed,
                        lease,
                        new_lease: false,
                        next,
                        reply,
                    };
                    self.work = Some(w);
                }
            }
            (
                Step::Grant {
                    observed,
                    next,
                    reply,
                },
                OpResult::Granted { lease, ttl_s },
            ) => {
                if ttl_s < w.ttl_s {
                    self.abandon(lease);
                    self.lease_too_short(ttl_s, w.ttl_s);
                } else {
                    w.step = Step::Commit {
                        observed,
                        lease,
                        new_lease: true,
                        next,
                        reply,
                    };
                    self.work = Some(w);
                }
            }
            (
                Step::Commit {
                    lease,
                    new_lease,
                    next,
                    reply,
                    ..
                },
                OpResult::Txn {
                    succeeded,
                    observed,
                },
            ) => {
                if succeeded {
                    self.fenced.remove(&vm);
                    if next.holder == Some(self.cfg.node) {
                        self.held.insert(
                            vm,
                            Held {
                                generation: next.generation,
                                lease,
                                observed,
                            },
                        );
                    } else {
                        self.held.remove(&vm);
                    }
                    self.answer(w.id, reply);
                } else {
                    // Another writer came first: decide again on what it left.
                    self.stats.lost_races += 1;
                    self.held.remove(&vm);
                    if new_lease {
                        self.abandon(lease);
                    }
                    w.rounds += 1;
                    if w.rounds >= MAX_ROUNDS {
                        self.drop_work();
                    } else {
                        self.plan(w, observed, None);
                    }
                }
            }
            (step, result) => {
                self.last_error = Some(format!(
                    "unexpected etcd result {result:?} in step {step:?}"
                ));
                self.held.remove(&vm);
                self.drop_work();
            }
        }
    }

    /// Gives a lease up: revoked, and never adopted again.
    fn abandon(&mut self, lease: i64) {
        self.revokes.push(lease);
        if self.abandoned.len() >= MAX_ABANDONED {
            self.abandoned.pop_front();
        }
        self.abandoned.push_back(lease);
    }

    fn drop_work(&mut self) {
        self.stats.dropped += 1;
        self.work = None;
    }

    fn lease_too_short(&mut self, got: i64, want: i64) {
        self.last_error = Some(format!(
            "etcd gave a lease TTL of {got} s where {want} s was asked: refusing to rely on it"
        ));
        self.drop_work();
    }

    /// Starts the request over from a read.
    fn again(&mut self, mut w: Work) {
        w.rounds += 1;
        if w.rounds >= MAX_ROUNDS {
            self.drop_work();
            return;
        }
        w.step = Step::Read;
        self.work = Some(w);
    }

    /// Decides `w` over `observed`. `extended`: the lease a keep-alive just extended.
    fn plan(&mut self, mut w: Work, observed: Observed, extended: Option<i64>) {
        let known = match self.known(&w.keys, &observed) {
            Ok(k) => k,
            Err(e) => {
                log::error!(
                    "quorum: etcd state of {} is damaged: {e}; refusing until an operator \
                     repairs it",
                    w.keys.dir
                );
                self.last_error = Some(e);
                self.answer(w.id, Reply::Refused(OpError::StorageFailed));
                return;
            }
        };
        let d = self.rules.decide(known.as_ref(), &w.req);
        let Some(next) = d.next else {
            self.answer(w.id, d.reply);
            return;
        };
        let owner = observed.owner.clone().filter(|_| !self.ignores_owner());
        w.step = match owner {
            // The requester owns the key: extend its lease (unless just done), unless
            // it is a lease this session gave up (its revoke may still arrive).
            Some(o)
                if next.holder.is_some()
                    && self.owner_holder(&w.keys, &o) == next.holder
                    && !self.abandoned.contains(&o.lease) =>
            {
                if extended == Some(o.lease) {
                    Step::Commit {
                        observed,
                        lease: o.lease,
                        new_lease: false,
                        next,
                        reply: d.reply,
                    }
                } else {
                    Step::Extend {
                        lease: o.lease,
                        observed,
                        next,
                        reply: d.reply,
                    }
                }
            }
            // Someone else's lease stands (the rules only get here to record a
            // generation of an unknown holder): never overwrite it; ask again once gone.
            Some(o) => {
                let h = self.owner_holder(&w.keys, &o);
                self.answer(
                    w.id,
                    Reply::Busy {
                        generation: known.map_or(0, |k| k.rec.generation),
                        holder: h,
                        retry_after_ms: ms(self.cfg.busy_retry),
                    },
                );
                return;
            }
            None => Step::Grant {
                observed,
                next,
                reply: d.reply,
            },
        };
        self.work = Some(w);
    }

    fn ignores_owner(&self) -> bool {
        #[cfg(feature = "mutations")]
        return self.cfg.mutations.ignore_owner;
        #[cfg(not(feature = "mutations"))]
        false
    }

    fn owner_holder(&self, keys: &VmKeys, o: &KeyState) -> Option<NodeId> {
        decode::<Holder>(&keys.key(Key::Owner), &o.value)
            .ok()
            .and_then(|h| h.holder())
    }

    /// What the rules know of the VM, from the keys; an error if they contradict each
    /// other (they are only ever written together: someone else wrote them).
    fn known(&self, keys: &VmKeys, o: &Observed) -> Result<Option<Known>, String> {
        let dec_h = |k: Key| -> Result<Option<Holder>, String> {
            o.get(k)
                .map(|s| decode::<Holder>(&keys.key(k), &s.value))
                .transpose()
        };
        let gen = dec_h(Key::Generation)?;
        let owner = dec_h(Key::Owner)?;
        let out = o
            .outdated
            .as_ref()
            .map(|s| decode::<Outdated>(&keys.key(Key::Outdated), &s.value))
            .transpose()?;
        if o.owner.as_ref().is_some_and(|s| s.lease == 0) {
            return Err(format!("{}owner has no lease", keys.dir));
        }
        let Some(g) = gen else {
            if owner.is_some() || out.is_some() {
                return Err(format!(
                    "{}owner or {}outdated exists without {}generation",
                    keys.dir, keys.dir, keys.dir
                ));
            }
            return Ok(None);
        };
        let out = out.ok_or_else(|| format!("{}outdated is missing", keys.dir))?;
        if (out.generation, out.holder) != (g.generation, g.holder) {
            return Err(format!(
                "{}outdated {out:?} does not match {}generation {g:?}",
                keys.dir, keys.dir
            ));
        }
        if let Some(ow) = owner {
            if ow != g {
                return Err(format!(
                    "{}owner {ow:?} does not match {}generation {g:?}",
                    keys.dir, keys.dir
                ));
            }
        }
        Ok(Some(Known {
            rec: VmRecord {
                generation: g.generation,
                holder: g.holder(),
                peer_outdated: out.peer_outdated,
                lease_ms: 0,
            },
            // etcd does not say how long the lease has left: ask again after the poll.
            live: owner
                .filter(|_| !self.ignores_owner())
                .map(|_| self.cfg.busy_retry),
        }))
    }

    /// The transaction that commits `next` over `observed` with the owner on `lease`.
    fn commit_op(
        &self,
        keys: &VmKeys,
        observed: &Observed,
        lease: i64,
        next: &VmRecord,
        vm: &str,
    ) -> Op {
        let h = Holder {
            generation: next.generation,
            holder: next.holder.map(|n| n.0),
        };
        let out = Outdated {
            generation: next.generation,
            holder: h.holder,
            peer_outdated: next.peer_outdated,
        };
        let same = |k: Key, v: &[u8]| observed.get(k).is_some_and(|s| s.value == v);
        let mut puts = Vec::new();
        let hv = encode(&h);
        if !same(Key::Generation, &hv) {
            puts.push(Put {
                key: Key::Generation,
                value: hv.clone(),
                lease: 0,
            });
        }
        let ov = encode(&out);
        // A fenced VM rewrites `outdated` even unchanged (see the module docs).
        if !same(Key::Outdated, &ov) || self.fenced.contains(vm) {
            puts.push(Put {
                key: Key::Outdated,
                value: ov,
                lease: 0,
            });
        }
        if !same(Key::Owner, &hv) || observed.owner.as_ref().is_some_and(|s| s.lease != lease) {
            puts.push(Put {
                key: Key::Owner,
                value: hv,
                lease,
            });
        }
        #[allow(unused_mut)]
        let mut compares: Vec<(Key, i64)> = Key::ALL
            .iter()
            .map(|&k| (k, observed.mod_revision(k)))
            .collect();
        #[cfg(feature = "mutations")]
        if self.cfg.mutations.no_compares {
            compares.clear();
        }
        Op::Txn {
            keys: keys.clone(),
            compares,
            puts,
        }
    }
}

fn ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: NodeId = NodeId(1);
    const B: NodeId = NodeId(2);

    fn session(node: NodeId) -> EtcdSession {
        EtcdSession::new(SessionConfig::new(
            node,
            "c",
            "/t",
            Duration::from_millis(50),
        ))
        .unwrap()
    }
    fn ks(value: Vec<u8>, rev: i64, lease: i64) -> KeyState {
        KeyState {
            value,
            create_revision: rev,
            mod_revision: rev,
            lease,
        }
    }
    /// The three keys at generation `g` of `holder` written at `rev`, the owner on
    /// `lease` if Some.
    fn state(g: u64, holder: NodeId, outdated: bool, rev: i64, lease: Option<i64>) -> Observed {
        let h = Holder {
            generation: g,
            holder: Some(holder.0),
        };
        Observed {
            generation: Some(ks(encode(&h), rev, 0)),
            owner: lease.map(|l| ks(encode(&h), rev, l)),
            outdated: Some(ks(
                encode(&Outdated {
                    generation: g,
                    holder: Some(holder.0),
                    peer_outdated: outdated,
                }),
                rev,
                0,
            )),
        }
    }
    fn acquire(node: NodeId, from: u64) -> Request {
        Request::Acquire {
            vm: "vm0".into(),
            node,
            from,
            lease_ms: 1000,
        }
    }
    fn renew(node: NodeId, g: u64, outdated: bool) -> Request {
        Request::Renew {
            vm: "vm0".into(),
            node,
            generation: g,
            lease_ms: 1000,
            peer_outdated: outdated,
        }
    }
    fn op(s: &mut EtcdSession) -> (u64, Op) {
        s.poll_op().expect("an op")
    }

    /// Node A gets generation 1 at revision 5 on lease 7.
    fn holder() -> EtcdSession {
        let mut s = session(A);
        s.request(1, acquire(A, 0));
        let (o, op1) = op(&mut s);
        assert!(matches!(op1, Op::Read { .. }));
        assert!(s.poll_op().is_none(), "one op at a time");
        s.on_result(o, OpResult::Read(Observed::default()));
        let (o, op2) = op(&mut s);
        assert_eq!(op2, Op::Grant { ttl_s: 1 });
        s.on_result(o, OpResult::Granted { lease: 7, ttl_s: 1 });
        let (o, Op::Txn { compares, puts, .. }) = op(&mut s) else {
            panic!("a transaction")
        };
        assert!(compares.iter().all(|c| c.1 == 0), "{compares:?}");
        assert_eq!(puts.len(), 3);
        assert!(puts.iter().all(|p| (p.key == Key::Owner) == (p.lease == 7)));
        assert!(s.take_answers().is_empty(), "no answer before the commit");
        s.on_result(
            o,
            OpResult::Txn {
                succeeded: true,
                observed: state(1, A, false, 5, Some(7)),
            },
        );
        assert_eq!(
            s.take_answers(),
            vec![(
                1,
                Reply::Granted {
                    generation: 1,
                    lease_ms: 1000
                }
            )]
        );
        s
    }

    #[test]
    fn renewal_is_a_fresh_keep_alive_then_a_confirming_commit() {
        let mut s = holder();
        s.request(2, renew(A, 1, false));
        let (o, op1) = op(&mut s);
        assert_eq!(op1, Op::KeepAlive { lease: 7 }, "no read: the held state");
        s.on_result(o, OpResult::KeepAlive { ttl_s: 1 });
        let (o, Op::Txn { compares, puts, .. }) = op(&mut s) else {
            panic!()
        };
        assert_eq!(
            compares,
            vec![(Key::Generation, 5), (Key::Owner, 5), (Key::Outdated, 5)]
        );
        assert!(puts.is_empty(), "nothing changes: a pure check");
        s.on_result(
            o,
            OpResult::Txn {
                succeeded: true,
                observed: state(1, A, false, 5, Some(7)),
            },
        );
        assert!(matches!(s.take_answers()[..], [(2, Reply::Granted { .. })]));
        // The peer goes stale: the mark is written under the same compares.
        s.request(3, renew(A, 1, true));
        let (o, _) = op(&mut s);
        s.on_result(o, OpResult::KeepAlive { ttl_s: 1 });
        let (o, Op::Txn { puts, .. }) = op(&mut s) else {
            panic!()
        };
        assert_eq!(puts.len(), 1);
        assert_eq!(puts[0].key, Key::Outdated);
        assert!(s.take_answers().is_empty());
        s.on_result(o, OpResult::Failed("timeout".into()));
        assert!(s.take_answers().is_empty(), "unknown outcome: no answer");
        assert!(
            s.poll_op().is_none(),
            "nothing to revoke: the lease is in use"
        );
        // After a failure the next renewal reads first.
        s.request(4, renew(A, 1, true));
        assert!(matches!(op(&mut s).1, Op::Read { .. }));
    }

    #[test]
    fn a_lapsed_lease_is_replaced_while_the_generation_is_ours() {
        let mut s = holder();
        s.request(2, renew(A, 1, false));
        let (o, _) = op(&mut s);
        s.on_result(o, OpResult::KeepAlive { ttl_s: 0 });
        let (o, op1) = op(&mut s);
        assert!(matches!(op1, Op::Read { .. }));
        s.on_result(o, OpResult::Read(state(1, A, false, 5, None)));
        let (o, op2) = op(&mut s);
        assert_eq!(op2, Op::Grant { ttl_s: 1 });
        s.on_result(o, OpResult::Granted { lease: 8, ttl_s: 1 });
        let (o, Op::Txn { puts, .. }) = op(&mut s) else {
            panic!()
        };
        assert_eq!(puts.len(), 1, "only the owner key: {puts:?}");
        assert_eq!((puts[0].key, puts[0].lease), (Key::Owner, 8));
        s.on_result(
            o,
            OpResult::Txn {
                succeeded: true,
                observed: state(1, A, false, 9, Some(8)),
            },
        );
        assert!(matches!(s.take_answers()[..], [(2, Reply::Granted { .. })]));
    }

    #[test]
    fn the_survivor_needs_the_owner_gone_and_loses_races() {
        let mut s = session(B);
        // A's owner key stands: Busy, nothing written.
        s.request(1, acquire(B, 1));
        let (o, _) = op(&mut s);
        s.on_result(o, OpResult::Read(state(1, A, false, 5, Some(7))));
        assert_eq!(
            s.take_answers(),
            vec![(
                1,
                Reply::Busy {
                    generation: 1,
                    holder: Some(A),
                    retry_after_ms: 50
                }
            )]
        );
        assert!(s.poll_op().is_none());
        // Gone: a fresh lease, then a commit over exactly what was read...
        s.request(2, acquire(B, 1));
        let (o, _) = op(&mut s);
        s.on_result(o, OpResult::Read(state(1, A, false, 5, None)));
        let (o, _) = op(&mut s);
        s.on_result(o, OpResult::Granted { lease: 9, ttl_s: 1 });
        let (o, Op::Txn { compares, .. }) = op(&mut s) else {
            panic!()
        };
        assert_eq!(
            compares,
            vec![(Key::Generation, 5), (Key::Owner, 0), (Key::Outdated, 5)]
        );
        // ...which A's renewal beat: decided again on what it left (Busy), and the
        // lease nobody will use is revoked.
        s.on_result(
            o,
            OpResult::Txn {
                succeeded: false,
                observed: state(1, A, false, 6, Some(10)),
            },
        );
        assert!(matches!(
            s.take_answers()[..],
            [(2, Reply::Busy { generation: 1, .. })]
        ));
        assert_eq!(op(&mut s).1, Op::Revoke { lease: 9 });
        // The takeover marks A stale; an outdated mark refuses B.
        let mut s = session(B);
        s.request(3, acquire(B, 1));
        let (o, _) = op(&mut s);
        s.on_result(o, OpResult::Read(state(1, A, true, 5, None)));
        assert_eq!(
            s.take_answers(),
            vec![(3, Reply::Outdated { generation: 1 })]
        );
        s.request(4, acquire(B, 1));
        let (o, _) = op(&mut s);
        s.on_result(o, OpResult::Read(state(1, A, false, 5, None)));
        let (o, _) = op(&mut s);
        s.on_result(o, OpResult::Granted { lease: 9, ttl_s: 1 });
        let (_, Op::Txn { puts, .. }) = op(&mut s) else {
            panic!()
        };
        let out = puts.iter().find(|p| p.key == Key::Outdated).unwrap();
        assert_eq!(
            decode::<Outdated>(b"k", &out.value).unwrap(),
            Outdated {
                generation: 2,
                holder: Some(2),
                peer_outdated: true
            }
        );
    }

    #[test]
    fn failures_short_leases_and_damage() {
        // A failed commit of a fresh lease: no answer, the lease is revoked.
        let mut s = session(B);
        s.request(1, acquire(B, 1));
        let (o, _) = op(&mut s);
        s.on_result(o, OpResult::Read(state(1, A, false, 5, None)));
        let (o, _) = op(&mut s);
        s.on_result(o, OpResult::Granted { lease: 9, ttl_s: 1 });
        let (o, _) = op(&mut s);
        s.on_result(o, OpResult::Failed("connection reset".into()));
        assert!(s.take_answers().is_empty());
        assert_eq!(op(&mut s).1, Op::Revoke { lease: 9 });
        // etcd granted less than asked: not relied on.
        let mut s = session(B);
        s.request(2, acquire(B, 0));
        let (o, _) = op(&mut s);
        s.on_result(o, OpResult::Read(Observed::default()));
        let (o, _) = op(&mut s);
        s.request(3, acquire(B, 0));
        s.on_result(o, OpResult::Granted { lease: 4, ttl_s: 0 });
        assert!(s.take_answers().is_empty());
        let (o, revoke) = op(&mut s);
        assert_eq!(revoke, Op::Revoke { lease: 4 });
        assert!(s.last_error.as_ref().unwrap().contains("TTL"));
        // Results of ops not in flight are ignored; the queued request goes on.
        s.on_result(999, OpResult::Read(Observed::default()));
        assert!(s.poll_op().is_none(), "the revoke is still in flight");
        s.on_result(o, OpResult::Revoked);
        assert_eq!(s.stats.revoked, 1);
        assert!(matches!(op(&mut s).1, Op::Read { .. }));
        // Damaged keys: refused, with the key named in the error.
        let mut s = session(B);
        s.request(4, acquire(B, 1));
        let (o, _) = op(&mut s);
        let mut bad = state(1, A, false, 5, None);
        bad.outdated.as_mut().unwrap().value = b"{oops".to_vec();
        s.on_result(o, OpResult::Read(bad));
        assert_eq!(
            s.take_answers(),
            vec![(4, Reply::Refused(OpError::StorageFailed))]
        );
        assert!(s.last_error.as_ref().unwrap().contains("/t/c/vm0/outdated"));
        let mut s = session(B);
        s.request(5, acquire(B, 1));
        let (o, _) = op(&mut s);
        let lone = Observed {
            owner: state(1, A, false, 5, Some(3)).owner,
            ..Observed::default()
        };
        s.on_result(o, OpResult::Read(lone));
        assert_eq!(
            s.take_answers(),
            vec![(5, Reply::Refused(OpError::StorageFailed))]
        );
        // Bad requests never reach etcd.
        s.request(6, Request::Query { vm: "../x".into() });
        assert!(s.poll_op().is_none());
        assert!(matches!(
            s.take_answers()[..],
            [(6, Reply::Refused(OpError::BadName(_)))]
        ));
    }

    #[test]
    fn queue_is_bounded_and_ordered() {
        let mut s = session(A);
        for i in 0..(MAX_QUEUED as u64 + 3) {
            s.request(i, Request::Query { vm: "vm0".into() });
        }
        let mut seen = Vec::new();
        while let Some((o, _)) = s.poll_op() {
            s.on_result(o, OpResult::Read(Observed::default()));
            seen.extend(s.take_answers().into_iter().map(|a| a.0));
        }
        assert_eq!(seen, (3..(MAX_QUEUED as u64 + 3)).collect::<Vec<_>>());
        assert_eq!(s.stats.dropped, 3);
    }
}
