//! The pair's quorum, wired in: one [`quorum::client::Runner`] per VM process, on its
//! own thread, driving the node machine (`quorum::node`) against the configured
//! witness(es) or etcd, fed by the runtime (every path to the peer, protection) and
//! obeyed by it:
//!
//! - the standby fails over only on `Action::TakeOver` (the driver asks the
//!   [`TakeoverGate`] this module implements);
//! - the primary's output gate and guest state between protected sessions (`Free`
//!   until the lease's end, `Hold`, `Pause`), applied by [`super::gate`];
//! - `Demote`: the primary lost the VM to a higher generation;
//! - the generation and elected witness recorded durably in the node's state file;
//! - alerts and per-path changes in the log, the whole state in the control socket's
//!   status;
//! - the lease handover of a planned role swap ([`LeaseHandover`], issue 15): the
//!   primary gives its lease up before its guest pauses for the swap, the standby takes
//!   the next generation by compare-and-set before it accepts the swap point (its
//!   driver asks [`TakeoverGate::grant_swap`]); without the grant the swap is refused
//!   and the guest resumes on the old primary, which renews its lease.
//!
//! Quorum messages between the two nodes (`PeerMsg`: status, witness election) ride
//! on the A-Link's heartbeats as side messages (`alink::side`): on every healthy link,
//! never behind a busy checkpoint stream, lost when no path is up (the machine resends
//! on its own schedule). So the pair elects its witness at runtime: the preferred while
//! both nodes reach it, else the alternate, back to the preferred once both reach it
//! again; each change recorded in the state file before it is used, and a partitioned
//! node asks only the witness it recorded.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use twinrun_lock::lock;

use ::quorum::client::Runner;
use ::quorum::config::{BackendKind, QuorumConfig};
use ::quorum::node::{
    Action, Event, GuestState, HandoverNote, NodeConfig, OutputGate, PeerMsg, QuorumNode, Start,
    SwapEvent,
};
use ::quorum::types::{held_by, NodeId, Role as QRole, Slot};
use alink::beacon::BeaconConfig;
use alink::priv0::{Priv0Addrs, Priv0Path};
use alink::Alink;
use checkpoint::standby::TakeoverGate;
use log::{error, info, warn};
use twinrun_control::{QuorumView, WitnessView};

use crate::settings::{QuorumSettings, Role};

/// How long the quorum thread waits for witness answers between looks at the links.
const POLL: Duration = Duration::from_millis(5);

/// First byte of a quorum side message on the A-Link (the rest: a postcard `PeerMsg`),
/// so other users of side messages, or a later format, are told apart.
const PEER_MSG_TAG: u8 = b'Q';

/// What the primary may do with its held output, as the quorum last said.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// The checkpoint session releases on acknowledgements (or the standby is
    /// resyncing: nothing is released without it).
    Acked,
    /// Release without acknowledgements, before `until` only (None: no limit).
    Free { until: Option<Instant> },
    /// Release nothing.
    Hold,
}

impl Gate {
    /// Whether output may leave without acknowledgement at `now`.
    pub fn free_at(self, now: Instant) -> bool {
        matches!(self, Gate::Free { until } if until.is_none_or(|u| now < u))
    }
}

/// What the runtime and the quorum thread share.
struct Shared {
    /// The current session's A-Link (None between sessions: no path to the peer).
    link: Mutex<Option<Arc<Alink>>>,
    /// A primary's acknowledged checkpoints of the current session.
    acked: Mutex<Option<Arc<AtomicU64>>>,
    /// A standby: its replica holds a committed checkpoint of the current session.
    committed: AtomicBool,
    out: Mutex<Out>,
    view: Arc<Mutex<QuorumView>>,
    stop: AtomicBool,
    /// The highest generation this node knows (recorded, granted or learned): stamped
    /// on a primary's session `Hello`, the floor of a standby's sessions.
    generation: Arc<AtomicU64>,
    /// The last session refused by the fencing rule, in words (for the status).
    refused: Mutex<Option<String>>,
    /// The last alerts raised, for the status.
    alerts: Mutex<std::collections::VecDeque<String>>,
    /// The private network's heartbeat path, when configured (for the process's life).
    priv0: Mutex<Option<Arc<Priv0Path>>>,
    /// This node and its peer (a generation names its holder: `held_by`).
    node: NodeId,
    peer: NodeId,
    /// A planned swap's steps for the machine (fed by the quorum thread).
    swap_events: Mutex<Vec<SwapEvent>>,
    /// What the machine said of the swap's handover since the last step began.
    notes: Mutex<Vec<HandoverNote>>,
}

/// The machine's orders, as the runtime reads them.
struct Out {
    gate: Gate,
    pause: bool,
    took_over: Option<u64>,
    demoted: Option<u64>,
    /// The peer took the VM over at a swap point (its generation) before this end's
    /// session saw the acceptance: the VM is the peer's.
    handed: Option<u64>,
}

/// The quorum of one end of a pair (FT or HA), shown in `status`; without one
/// (`ft.quorum` unset) logs `no_quorum_warning` and returns None; Err: the exit code.
pub fn start_for(
    ft: &crate::settings::FtSettings,
    status: &crate::ft::status::PairStatus,
    no_quorum_warning: &str,
) -> Result<Option<Quorum>, i32> {
    let Some(qs) = &ft.quorum else {
        log::warn!("{no_quorum_warning}");
        return Ok(None);
    };
    match Quorum::start(qs, ft.role) {
        Ok(q) => {
            if let Some(spec) = &qs.priv0 {
                match start_priv0(ft, qs, spec) {
                    Ok(p) => q.set_priv0(p),
                    Err(e) => {
                        log::error!("quorum: {e}");
                        return Err(crate::exit::START_FAILED);
                    }
                }
            }
            status.set_quorum(q.view());
            status.swap_side().set_handover(q.lease_handover());
            Ok(Some(q))
        }
        Err(e) => {
            log::error!("quorum: {e}");
            Err(crate::exit::USAGE)
        }
    }
}

/// The private network's heartbeat path of this node: the A-Links' heartbeat timing,
/// the cluster's id and secret, the quorum node ids (stable across role changes).
fn start_priv0(
    ft: &crate::settings::FtSettings,
    qs: &QuorumSettings,
    spec: &crate::settings::AlinkSpec,
) -> Result<Priv0Path, String> {
    let cfg = BeaconConfig {
        cluster_id: ft.cluster_id_u64(),
        me: qs.node.0,
        peer: qs.peer.0,
        secret: ft.secret.clone(),
        health: alink::HealthConfig {
            interval: Duration::from_millis(ft.heartbeat_ms),
            misses: ft.heartbeat_misses,
        },
    };
    let addrs = Priv0Addrs {
        local: spec.local,
        peer: spec.peer,
    };
    Priv0Path::start(addrs, cfg).map_err(|e| {
        format!(
            "cannot start the priv0 heartbeat path on {}: {e}",
            spec.local
        )
    })
}

/// One node's quorum (see the module docs). Stops its thread when dropped.
pub struct Quorum {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Quorum {
    /// Reads the node's recorded state, opens the backends and starts the thread for
    /// this end (`role` at start).
    pub fn start(q: &QuorumSettings, role: Role) -> Result<Quorum, String> {
        let recorded = read_state(&q.state_file)?;
        let mut ncfg = NodeConfig::new(&q.vm, q.node, q.peer, q.config.mode());
        ncfg.timing = q.config.timing();
        ncfg.validate().map_err(|e| e.to_string())?;
        let backends = q.config.open(q.node).map_err(|e| e.to_string())?;
        let (preferred, alternate) = backends.for_vm().map_err(|e| e.to_string())?;
        let start = Start {
            role: match role {
                Role::Primary => QRole::Primary,
                Role::Standby => QRole::Standby,
            },
            generation: recorded.generation,
            elected: recorded.elected,
        };
        info!(
            "quorum: backend {:?}, node {} (peer {}), VM {:?}, generation {} recorded in {}",
            q.config.backend,
            q.node.0,
            q.peer.0,
            q.vm,
            recorded.generation,
            q.state_file.display()
        );
        let node = QuorumNode::new(ncfg, start);
        let runner = Runner::new(node, preferred, alternate);
        let shared = Arc::new(Shared {
            link: Mutex::new(None),
            acked: Mutex::new(None),
            committed: AtomicBool::new(false),
            out: Mutex::new(Out {
                // Nothing leaves before the machine's first word.
                gate: Gate::Hold,
                pause: false,
                took_over: None,
                demoted: None,
                handed: None,
            }),
            view: Arc::new(Mutex::new(QuorumView::default())),
            stop: AtomicBool::new(false),
            generation: Arc::new(AtomicU64::new(recorded.generation)),
            refused: Mutex::new(None),
            alerts: Mutex::new(std::collections::VecDeque::new()),
            priv0: Mutex::new(None),
            node: q.node,
            peer: q.peer,
            swap_events: Mutex::new(Vec::new()),
            notes: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let cfg = q.config.clone();
        let node_id = q.node.0;
        let state_file = q.state_file.clone();
        let thread = std::thread::Builder::new()
            .name("quorum".into())
            .spawn(move || run(runner, &sh, &cfg, node_id, &state_file))
            .map_err(|e| format!("cannot start the quorum thread: {e}"))?;
        Ok(Quorum {
            shared,
            thread: Some(thread),
        })
    }

    /// Watches the private network too: the peer is reachable while any A-Link OR
    /// priv0 is alive (a takeover needs every path silent), and peer messages go on
    /// both.
    pub fn set_priv0(&self, p: Priv0Path) {
        *lock(&self.shared.priv0) = Some(Arc::new(p));
    }

    /// A session begins on `link` (a primary's `acked` counts what its standby
    /// acknowledged); the replica of a standby's new session holds nothing yet.
    pub fn begin_session(&self, link: Arc<Alink>, acked: Option<Arc<AtomicU64>>) {
        self.shared.committed.store(false, Ordering::SeqCst);
        *lock(&self.shared.acked) = acked;
        *lock(&self.shared.link) = Some(link);
    }

    /// The session ended: no path to the peer until the next one (the runtime drops
    /// the link after this).
    pub fn end_session(&self) {
        *lock(&self.shared.link) = None;
        *lock(&self.shared.acked) = None;
        self.shared.committed.store(false, Ordering::SeqCst);
    }

    pub fn gate(&self) -> Gate {
        lock(&self.shared.out).gate
    }

    /// [`Self::gate`] as a closure that outlives `self`'s borrow (for the HA disks'
    /// completion path, which `storage_mirror` calls on every unacknowledged write).
    pub fn gate_reader(&self) -> impl Fn() -> Gate + Send + Sync + 'static {
        let shared = self.shared.clone();
        move || lock(&shared.out).gate
    }

    /// The machine wants the guest paused.
    pub fn pause(&self) -> bool {
        lock(&self.shared.out).pause
    }

    /// The generation of a peer that won the VM over this primary, if it lost.
    pub fn demoted(&self) -> Option<u64> {
        lock(&self.shared.out).demoted
    }

    /// An HA standby's replicas are in sync (its node is `Protected`): the HA
    /// runtime has no standby driver to tell [`Self::takeover_gate`].
    pub fn set_committed(&self) {
        self.shared.committed.store(true, Ordering::SeqCst);
    }

    /// The machine granted this node the VM (`TakeOver`): an HA standby may boot it.
    pub fn may_take_over(&self) -> bool {
        lock(&self.shared.out).took_over.is_some()
    }

    /// The generation this node knows, as the primary driver stamps it on a session.
    pub fn generation(&self) -> Arc<AtomicU64> {
        self.shared.generation.clone()
    }

    /// Which generations were granted to this node (the primary driver's screen: an
    /// ack citing a newer one of them is this node's fresh grant, which the standby
    /// learned first, and fences nothing).
    pub fn own_generations(&self) -> checkpoint::primary::OwnGenerations {
        let node = self.shared.node;
        Arc::new(move |g| held_by(g, node))
    }

    /// A session was refused by the fencing rule (`why` is logged by the caller).
    pub fn session_refused(&self, why: String) {
        *lock(&self.shared.refused) = Some(why);
    }

    /// The takeover gate of this node's standby driver.
    pub fn takeover_gate(&self) -> checkpoint::standby::TakeoverGateRef {
        checkpoint::standby::TakeoverGateRef(Arc::new(Granted(self.shared.clone())))
    }

    /// The planned swap's lease handover of this node (see [`LeaseHandover`]).
    pub fn lease_handover(&self) -> LeaseHandover {
        LeaseHandover(self.shared.clone())
    }

    /// The peer took the VM over at a swap point (its generation) while this end's
    /// session had not seen the acceptance: the VM is the peer's, this end stops it.
    pub fn handed_over(&self) -> Option<u64> {
        lock(&self.shared.out).handed
    }

    /// The quorum part of the control socket's status, kept up to date.
    pub fn view(&self) -> Arc<Mutex<QuorumView>> {
        self.shared.view.clone()
    }
}

impl Drop for Quorum {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The standby driver's [`TakeoverGate`]: committed replicas make the node
/// `Protected`; the takeover waits for the machine's `TakeOver`.
struct Granted(Arc<Shared>);

impl TakeoverGate for Granted {
    fn committed(&self, _epoch: u64) {
        self.0.committed.store(true, Ordering::SeqCst);
    }

    fn may_take_over(&self) -> bool {
        lock(&self.0.out).took_over.is_some()
    }

    fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::SeqCst)
    }

    fn peer_holds(&self, generation: u64) -> bool {
        held_by(generation, self.0.peer)
    }

    fn grant_swap(&self) -> Result<(), String> {
        LeaseHandover(self.0.clone())
            .acquire(HANDOVER_WAIT)
            .map(|_| ())
    }
}

/// How long each end waits for its witness in a swap's handover (the primary for the
/// release, the standby for the grant): many round trips to a witness that answers
/// (requests are sent again every `retry`), and short against the swap's own timeout.
pub(crate) const HANDOVER_WAIT: Duration = Duration::from_secs(3);

/// One node's side of a planned swap's lease handover (issue 15). The primary calls
/// [`LeaseHandover::release`] before its guest pauses, then [`LeaseHandover::end`]
/// with the swap's outcome; the standby's driver asks for the grant at the swap point
/// ([`TakeoverGate::grant_swap`] = [`LeaseHandover::acquire`]).
///
/// Why this is safe: the primary's lease is the only thing that lets it release output
/// without an acknowledgement; it forgets its leases before it sends the releases, so
/// from then on its output leaves only on the standby's acks (FT), and while the pair
/// is cut it holds and pauses. The standby resumes the VM only with generation g+1,
/// granted by compare-and-set at its elected witness after the primary's release (the
/// witness grants nothing while a lease of g runs). A swap that does not happen ends
/// with a renewal of g: granted means the standby holds nothing newer (and its acquire
/// finds the lease running), lost means it took the VM (then this node is demoted or,
/// mid-handover, becomes its standby). So the parity rule holds (g+1 is the
/// standby's node's), and no generation has two holders.
#[derive(Clone)]
pub struct LeaseHandover(Arc<Shared>);

impl LeaseHandover {
    fn feed(&self, e: SwapEvent) {
        lock(&self.0.swap_events).push(e);
    }

    /// Waits up to `timeout` for a note `pick` accepts, or for `done` (checked first).
    fn wait<T>(
        &self,
        timeout: Duration,
        done: impl Fn(&Out) -> Option<T>,
        pick: impl Fn(&HandoverNote) -> Option<Result<T, String>>,
    ) -> Option<Result<T, String>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = done(&lock(&self.0.out)) {
                return Some(Ok(v));
            }
            if let Some(r) = lock(&self.0.notes).iter().find_map(&pick) {
                return Some(r);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Primary: gives the lease up at every witness the peer may ask; Ok once all
    /// answered. Err: the swap must not begin (the lease is renewed again).
    pub fn release(&self, timeout: Duration) -> Result<(), String> {
        lock(&self.0.notes).clear();
        self.feed(SwapEvent::Begin);
        let r = self.wait(
            timeout,
            |_| None,
            |n| match n {
                HandoverNote::Released => Some(Ok(())),
                HandoverNote::Refused(why) => Some(Err(why.clone())),
                HandoverNote::PeerTook { generation } => Some(Err(format!(
                    "the peer holds generation {generation} already"
                ))),
            },
        );
        let r = r.unwrap_or_else(|| {
            Err(format!(
                "the witness did not confirm the lease's release within {timeout:?} (is it                  reachable?)"
            ))
        });
        if let Err(why) = &r {
            warn!("quorum: swap handover refused: {why}");
            self.end(false);
        } else {
            info!("quorum: swap handover: lease released at the witness; the swap may begin");
        }
        r
    }

    /// Primary: the swap is over (`done`: the standby accepted; this node runs on as
    /// its standby) or did not happen (the lease is renewed at once).
    pub fn end(&self, done: bool) {
        if done {
            // A standby never takes over on an old grant of its own.
            let mut o = lock(&self.0.out);
            o.took_over = None;
            o.demoted = None;
        }
        self.feed(SwapEvent::End { done });
    }

    /// Standby at the swap point: asks the elected witness for the next generation and
    /// waits for the grant (Ok: its generation). Err: the swap is refused here.
    pub fn acquire(&self, timeout: Duration) -> Result<u64, String> {
        let before = lock(&self.0.out).took_over;
        lock(&self.0.notes).clear();
        self.feed(SwapEvent::Acquire);
        let r = self.wait(
            timeout,
            |o| o.took_over.filter(|g| Some(*g) != before),
            |n| match n {
                HandoverNote::Refused(why) => Some(Err(why.clone())),
                _ => None,
            },
        );
        match r {
            Some(Ok(g)) => {
                warn!("quorum: swap: generation {g} GRANTED: this node takes the VM over");
                Ok(g)
            }
            Some(Err(why)) => Err(why),
            None => {
                self.feed(SwapEvent::AcquireAbandoned);
                Err(format!("no answer from the witness within {timeout:?}"))
            }
        }
    }
}

/// The quorum thread: feeds the machine what the runtime sees and carries out its
/// actions, until the process ends.
fn run(mut runner: Runner, sh: &Shared, cfg: &QuorumConfig, node: u64, state_file: &Path) {
    let mut reach = None;
    let mut paths: Vec<bool> = Vec::new();
    let mut protected = None;
    let mut recorded = read_state(state_file).unwrap_or_default();
    let mut first = true;
    let mut priv0_was = None;
    while !sh.stop.load(Ordering::SeqCst) {
        // Read under the lock, not kept: the runtime drops a session's link after
        // `end_session`, and its next one binds the same addresses.
        let (now_paths, r, from_peer) = match lock(&sh.link).as_ref() {
            Some(l) => (
                l.link_status().iter().map(|s| s.up).collect::<Vec<bool>>(),
                // Any path alive (the A-Link's own view: it is reachable until the
                // heartbeats time out on every link).
                l.peer_reachable(),
                l.recv_side(),
            ),
            None => (Vec::new(), false, Vec::new()),
        };
        let (r, from_peer, p0) = with_priv0(sh, r, from_peer, &mut priv0_was);
        if now_paths != paths {
            for (i, up) in now_paths.iter().enumerate() {
                if paths.get(i) != Some(up) {
                    info!(
                        "quorum: path a-link {i} to the peer {}",
                        if *up { "alive" } else { "SILENT" }
                    );
                }
            }
            paths = now_paths.clone();
        }
        // Primary: the standby acknowledged a checkpoint of this session (the machine
        // drops it itself when the peer is lost); standby: its replica holds a
        // committed checkpoint (kept when the primary is lost: that is what it takes
        // over from).
        let p = match lock(&sh.acked).as_ref() {
            Some(a) => a.load(Ordering::SeqCst) > 0,
            None => sh.committed.load(Ordering::SeqCst),
        };
        let mut actions = Vec::new();
        let mut feed = |ev: Event, runner: &mut Runner| match runner.event(ev) {
            Ok(a) => actions.extend(a),
            Err(e) => warn!("quorum: {e}"),
        };
        if first {
            first = false;
            feed(Event::Tick, &mut runner);
        }
        if reach != Some(r) {
            reach = Some(r);
            info!(
                "quorum: peer {}",
                if r {
                    "reachable"
                } else {
                    "UNREACHABLE on every path"
                }
            );
            feed(Event::PeerReachable(r), &mut runner);
        }
        if protected != Some(p) {
            protected = Some(p);
            feed(Event::Protected(p), &mut runner);
        }
        let swap_events = std::mem::take(&mut *lock(&sh.swap_events));
        for e in swap_events {
            feed(Event::Swap(e), &mut runner);
        }
        for m in from_peer {
            match decode_peer_msg(&m) {
                Ok(msg) => feed(Event::FromPeer(msg), &mut runner),
                Err(why) => warn!("quorum: a side message from the peer: {why}"),
            }
        }
        match runner.poll(POLL) {
            Ok(a) => actions.extend(a),
            Err(e) => {
                warn!("quorum: {e}");
                std::thread::sleep(POLL);
            }
        }
        for a in actions {
            obey(a, &runner, sh, state_file, &mut recorded);
        }
        // Generations only grow; the runtime reads the highest one known.
        sh.generation
            .fetch_max(recorded.generation, Ordering::SeqCst);
        let mut v = view(&runner, sh, cfg, node, &paths);
        v.priv0 = p0;
        *lock(&sh.view) = v;
    }
}

/// Adds the priv0 path to what the A-Link says: the peer is reachable if either is
/// alive; priv0's side messages join the A-Link's. Logs priv0's changes; returns
/// (reachable, messages, priv0 alive if configured).
fn with_priv0(
    sh: &Shared,
    alink_reach: bool,
    mut from_peer: Vec<Vec<u8>>,
    was: &mut Option<bool>,
) -> (bool, Vec<Vec<u8>>, Option<bool>) {
    let Some(p) = lock(&sh.priv0).clone() else {
        return (alink_reach, from_peer, None);
    };
    let st = p.status();
    if *was != Some(st.alive) {
        *was = Some(st.alive);
        info!(
            "quorum: path priv0 ({} -> {}) to the peer {}",
            p.addrs().local,
            p.addrs().peer,
            if st.alive {
                "alive".to_string()
            } else {
                format!(
                    "SILENT (last proof {})",
                    st.last_proof_ms
                        .map_or("never".to_string(), |ms| format!("{ms} ms ago"))
                )
            }
        );
    }
    from_peer.extend(p.recv_side());
    (alink_reach || st.alive, from_peer, Some(st.alive))
}

fn obey(a: Action, runner: &Runner, sh: &Shared, state_file: &Path, rec: &mut Recorded) {
    match a {
        Action::Output(g) => {
            let gate = match g {
                OutputGate::Acked => Gate::Acked,
                OutputGate::Hold => Gate::Hold,
                OutputGate::Free { until } => Gate::Free {
                    until: until.map(|u| runner.instant(u)),
                },
            };
            let mut o = lock(&sh.out);
            // A renewed lease moves `until` at every renewal: log changes of kind only.
            if std::mem::discriminant(&o.gate) != std::mem::discriminant(&gate) {
                info!("quorum: output gate {g:?}");
            }
            o.gate = gate;
        }
        Action::Guest(g) => {
            info!("quorum: guest {g:?}");
            lock(&sh.out).pause = g == GuestState::Pause;
        }
        Action::TakeOver { generation } => {
            rec.generation = generation;
            record(state_file, rec);
            // Before the takeover is visible: the failed-over driver stamps this one.
            sh.generation.fetch_max(generation, Ordering::SeqCst);
            warn!("quorum: takeover GRANTED: generation {generation}");
            lock(&sh.out).took_over = Some(generation);
        }
        Action::Demote { generation } => {
            rec.generation = rec.generation.max(generation);
            record(state_file, rec);
            sh.generation.fetch_max(generation, Ordering::SeqCst);
            error!(
                "quorum: DEMOTED: the peer holds generation {generation}; this node's held \
                 output is discarded and its VM stops"
            );
            let mut o = lock(&sh.out);
            o.demoted = Some(generation);
            o.gate = Gate::Hold;
            o.pause = true;
        }
        Action::Generation(g) => {
            if g > rec.generation {
                rec.generation = g;
                record(state_file, rec);
            }
            // At once, not at the end of the round: a grant's peer message (a later
            // action of the same round) must not reach the standby before this
            // node's driver stamps the grant (issue 14; the standby's `peer_holds`
            // makes the order matter for nothing but the log).
            sh.generation.fetch_max(g, Ordering::SeqCst);
        }
        Action::RecordElected { slot, seq } => {
            rec.elected = Some((slot, seq));
            record(state_file, rec);
        }
        Action::ToPeer(m) => {
            // No session: no path to the peer; the machine resends on its schedule.
            if let Some(l) = lock(&sh.link).as_ref() {
                if !l.send_side(&encode_peer_msg(&m)) {
                    warn!("quorum: peer message too long for a side message: {m:?}");
                }
            }
            if let Some(p) = lock(&sh.priv0).as_ref() {
                p.send_side(&encode_peer_msg(&m));
            }
        }
        // The runner carries witness traffic itself.
        Action::ToWitness { .. } => {}
        Action::Alert(al) => {
            warn!("quorum ALERT {:?}: {}", al.kind, al.message);
            let mut q = lock(&sh.alerts);
            if q.len() >= twinrun_control::QUORUM_ALERTS_KEPT {
                q.pop_front();
            }
            q.push_back(format!("{:?}: {}", al.kind, al.message));
        }
        Action::Audit { operator, what } => warn!("quorum AUDIT ({operator}): {what}"),
        Action::Handover(n) => {
            if let HandoverNote::PeerTook { generation } = n {
                warn!(
                    "quorum: the peer took the VM over at the swap point (generation                      {generation}): this end is its standby"
                );
                let mut o = lock(&sh.out);
                o.handed = Some(generation);
                o.gate = Gate::Hold;
                o.pause = true;
                o.took_over = None;
            }
            lock(&sh.notes).push(n);
        }
    }
}

fn view(runner: &Runner, sh: &Shared, cfg: &QuorumConfig, node: u64, paths: &[bool]) -> QuorumView {
    let now = runner.now();
    let st = runner.node().status(now);
    let out = lock(&sh.out);
    let slot_name = |s: Slot| match s {
        Slot::Preferred => "preferred",
        Slot::Alternate => "alternate",
    };
    QuorumView {
        backend: match cfg.backend {
            BackendKind::Witness => "witness",
            BackendKind::Etcd => "etcd",
            BackendKind::None => "none",
        }
        .into(),
        node,
        role: match st.role {
            QRole::Primary => "primary",
            QRole::Standby => "standby",
        }
        .into(),
        generation: st.generation,
        elected: slot_name(st.elected).into(),
        gate: match st.gate {
            Some(OutputGate::Acked) => "acked",
            Some(OutputGate::Free { .. }) => "free",
            Some(OutputGate::Hold) | None => "hold",
        }
        .into(),
        free_left_ms: match st.gate {
            Some(OutputGate::Free { until: Some(u) }) => {
                Some(u.saturating_sub(now).as_millis() as u64)
            }
            _ => None,
        },
        guest: if out.pause { "paused" } else { "run" }.into(),
        peer_reachable: st.peer_reachable,
        paths: paths.to_vec(),
        protected: st.protected,
        witnesses: Slot::ALL
            .iter()
            .filter_map(|&s| {
                runner.backend(s).map(|b| WitnessView {
                    slot: slot_name(s).into(),
                    service: b.describe(),
                    reachable: st.witness_reachable[s.index()],
                    lease_left_ms: st.lease_left[s.index()].map(|d| d.as_millis() as u64),
                })
            })
            .collect(),
        took_over: out.took_over,
        demoted_by: out.demoted,
        refused_session: lock(&sh.refused).clone(),
        alerts: lock(&sh.alerts).iter().cloned().collect(),
        // Set by the caller (the thread reads the path once per round).
        priv0: None,
    }
}

fn encode_peer_msg(m: &PeerMsg) -> Vec<u8> {
    let mut v = vec![PEER_MSG_TAG];
    // A PeerMsg is a few small integers and enums: it always encodes.
    v.extend(postcard::to_allocvec(m).unwrap_or_default());
    v
}

fn decode_peer_msg(b: &[u8]) -> Result<PeerMsg, String> {
    match b.split_first() {
        Some((&PEER_MSG_TAG, rest)) => {
            postcard::from_bytes(rest).map_err(|e| format!("not a quorum message: {e}"))
        }
        Some((t, _)) => Err(format!("unknown side message kind {t:#x}")),
        None => Err("empty side message".into()),
    }
}

/// What a node records across its runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Recorded {
    generation: u64,
    elected: Option<(Slot, u64)>,
}

const STATE_HEADER: &str = "twinrun-quorum-state 1";

/// Reads the state file (absent: a node that never held or saw a generation).
fn read_state(path: &Path) -> Result<Recorded, String> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Recorded::default()),
        Err(e) => return Err(format!("quorum state {}: {e}", path.display())),
    };
    parse_state(&text).map_err(|why| format!("quorum state {}: {why}", path.display()))
}

fn parse_state(text: &str) -> Result<Recorded, String> {
    let mut lines = text.lines();
    if lines.next() != Some(STATE_HEADER) {
        return Err(format!(
            "not a quorum state file (expected {STATE_HEADER:?} first)"
        ));
    }
    let mut r = Recorded::default();
    for l in lines {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["generation", g] => {
                r.generation = g.parse().map_err(|_| format!("bad generation {g:?}"))?
            }
            ["elected", s, seq] => {
                let slot = match *s {
                    "preferred" => Slot::Preferred,
                    "alternate" => Slot::Alternate,
                    _ => return Err(format!("bad elected slot {s:?}")),
                };
                let seq = seq
                    .parse()
                    .map_err(|_| format!("bad election sequence {seq:?}"))?;
                r.elected = Some((slot, seq));
            }
            [] => {}
            _ => return Err(format!("bad line {l:?}")),
        }
    }
    Ok(r)
}

fn format_state(r: &Recorded) -> String {
    let mut s = format!("{STATE_HEADER}\ngeneration {}\n", r.generation);
    if let Some((slot, seq)) = r.elected {
        let name = match slot {
            Slot::Preferred => "preferred",
            Slot::Alternate => "alternate",
        };
        s += &format!("elected {name} {seq}\n");
    }
    s
}

/// Writes the state durably (temporary file, fsync, rename, fsync of the directory)
/// before the runtime acts on it. A failure is logged loudly: the node runs on, but a
/// restart may not know the newest generation (the witness still fences it).
fn record(path: &Path, r: &Recorded) {
    if let Err(e) = write_state(path, r) {
        error!("quorum: cannot record the state in {}: {e}", path.display());
    }
}

fn write_state(path: &Path, r: &Recorded) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = dir {
        fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(format_state(r).as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(d) = dir {
        fs::File::open(d)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip_and_errors() {
        let r = Recorded {
            generation: 7,
            elected: Some((Slot::Alternate, 3)),
        };
        assert_eq!(parse_state(&format_state(&r)), Ok(r));
        let d = Recorded::default();
        assert_eq!(parse_state(&format_state(&d)), Ok(d));
        assert!(parse_state("garbage").is_err());
        assert!(parse_state(&format!("{STATE_HEADER}\ngeneration x\n")).is_err());
        assert!(parse_state(&format!("{STATE_HEADER}\nelected nowhere 1\n")).is_err());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/q.state");
        assert_eq!(read_state(&p), Ok(Recorded::default()));
        write_state(&p, &r).unwrap();
        assert_eq!(read_state(&p), Ok(r));
    }

    #[test]
    fn peer_messages_round_trip() {
        for m in [
            PeerMsg::Status {
                generation: 3,
                role: QRole::Standby,
                reach: [false, true],
                elected: Slot::Alternate,
                elect_seq: 2,
                proposing: Some(Slot::Preferred),
            },
            PeerMsg::Elect {
                slot: Slot::Alternate,
                seq: 9,
            },
            PeerMsg::ElectAck { seq: 9 },
        ] {
            assert_eq!(decode_peer_msg(&encode_peer_msg(&m)), Ok(m));
        }
        assert!(decode_peer_msg(&[]).is_err());
        assert!(decode_peer_msg(b"Xabc").is_err());
        assert!(decode_peer_msg(&[PEER_MSG_TAG, 0xff, 0xff]).is_err());
    }

    #[test]
    fn free_gate_expires() {
        let now = Instant::now();
        let g = Gate::Free {
            until: Some(now + Duration::from_millis(10)),
        };
        assert!(g.free_at(now));
        assert!(!g.free_at(now + Duration::from_millis(10)));
        assert!(Gate::Free { until: None }.free_at(now));
        assert!(!Gate::Hold.free_at(now));
        assert!(!Gate::Acked.free_at(now));
    }
}
