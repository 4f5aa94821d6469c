//! The quorum seam: every decision to act alone goes through a [`QuorumGate`].
//!
//! The step function never decides alone. When a node would run the active copy of a
//! VM while its peer is not online (start or placement after the boot grace) or take
//! over a VM whose owner node is lost, it returns `Action::AskQuorum`; the daemon asks
//! the gate off the step function's thread and feeds the answer back as
//! `Input::Quorum`. Two gates: [`NoWitness`] (config `quorum.mode = "none"`: everRun's
//! documented behaviour with no quorum server, a full partition runs two copies, logged
//! at every grant) and [`ServiceGate`] (a `twinrun witness` or etcd, through the
//! `quorum` crate's backends).
//!
//! The rule that keeps one active copy (node/README.md, "Quorum"): the daemon never
//! competes with a VMM for a lease.
//! - An FT or HA pair's VMMs hold the VM's own key (its name) themselves
//!   (`--quorum-config`); the standby VMM acquires it before it takes over. The
//!   daemon's `Takeover` (write itself owner after its standby took over) is only a
//!   **query**: granted when the service says this node holds the VM's current
//!   generation, i.e. our VMM already won it. The daemon never acquires or renews it.
//! - `Alone` (start an active copy while the peer is not online) is an **acquire** under
//!   a key of the daemon's own, `-alone.<vm>` (a VM name cannot start with '-', so no
//!   VM's own key is ever the same), at the preferred service only (two daemons asking
//!   two witnesses could both win). The daemon renews it while its copy runs and gives
//!   it up when the copy ends; the other node cannot start the VM alone meanwhile.
//!   If renewals stop being granted while the peer is away, the permission ends on this
//!   node's clock before the service could grant the key to the other node, and the
//!   daemon stops its copy first (`Input::QuorumLost`).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use twinrun_lock::MutexExt;

use quorum::backends::Backends;
use quorum::client::Backend;
use quorum::config::QuorumConfigError;
use quorum::timing::Timing;
use quorum::witness::ops::{Reply, Request};
use quorum::{Generation, NodeId};

use crate::cluster::QuorumKind;

/// One question to the quorum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuorumRequest {
    pub cluster: String,
    pub node: String,
    pub peer: String,
    pub vm: String,
    pub kind: QuorumKind,
    /// How long ago the peer was last heard from (None: never, since this start).
    pub peer_silent_for: Option<Duration>,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuorumVerdict {
    pub granted: bool,
    /// Shown in the VM's reason and the event log.
    pub reason: String,
    /// A fencing token (the witness's generation for this VM) that the new owner
    /// hands to its VMM so a stale owner's writes can be refused; None without one.
    pub token: Option<u64>,
}

/// What decides whether this node may act alone. Implementations may block (a network
/// round trip to a witness): the daemon calls them from a blocking task with a bound.
pub trait QuorumGate: Send + Sync + 'static {
    fn decide(&self, req: &QuorumRequest) -> QuorumVerdict;
    /// For `node show`: which gate, and its state.
    fn describe(&self) -> String;
    /// This node's copy of `vm` ended: give up whatever `Alone` grant is held for it.
    fn release(&self, _vm: &str) {}
    /// Where to report that a held `Alone` grant was lost (vm, why); set once.
    fn on_lost(&self, _report: LostReport) {}
}

/// Called with (vm, why) when an `Alone` grant ends without a release.
pub type LostReport = Box<dyn Fn(&str, String) + Send + Sync>;

/// No witness (config `quorum.mode = "none"`): every request is granted, and the
/// reason says what that risks.
pub struct NoWitness;

impl QuorumGate for NoWitness {
    fn decide(&self, req: &QuorumRequest) -> QuorumVerdict {
        let what = match req.kind {
            QuorumKind::Alone => "run alone",
            QuorumKind::Takeover => "take over",
        };
        QuorumVerdict {
            granted: true,
            reason: format!(
                "no witness configured: {} may {what} (if {} is alive behind a cut network, two copies run)",
                req.node, req.peer
            ),
            token: None,
        }
    }

    fn describe(&self) -> String {
        "none (no witness: a full partition can run a VM twice)".into()
    }
}

/// How long one question to the quorum service may take before the answer is "no".
const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// Resend interval of an unanswered request (requests are idempotent).
const RESEND: Duration = Duration::from_millis(100);

/// The key the daemon holds for running `vm` alone: a VM name never starts with '-'.
pub fn alone_key(vm: &str) -> String {
    format!("-alone.{vm}")
}

/// The margin by which the daemon's permission ends before the service could grant the
/// key to another node. The end is enforced by a renewal thread's report and the
/// daemon's reaction, both at the scheduler's mercy: on a loaded 2-core machine the
/// report came 110+ ms past the local validity, more than etcd timing's 100 ms margin
/// (daemon_quorum's `a_holder_cut_off_...` failed once in CI, s24a).
const ALONE_MARGIN: Duration = Duration::from_millis(400);

/// The daemon-held keys' timing: a lease long enough that a loaded daemon's renewals
/// (every 400 ms) keep it, and an etcd lease can be whole seconds; the margin
/// [`ALONE_MARGIN`].
fn alone_timing(cfg: &Timing) -> Timing {
    let mut t = quorum::config::etcd_timing();
    t.max_drift_ppm = cfg.max_drift_ppm;
    t.margin = t.margin.max(ALONE_MARGIN);
    t
}

/// A `twinrun witness` (or etcd) behind the gate: see the module comment for the rule.
pub struct ServiceGate {
    backends: Backends,
    node: NodeId,
    peer: NodeId,
    timing: Timing,
    what: String,
    held: Mutex<HashMap<String, Arc<AtomicBool>>>,
    lost: Arc<OnceLock<LostReport>>,
}

/// One backend, blocking: send, resend, wait for the answer to this request.
struct Asker {
    backend: Box<dyn Backend>,
    next_id: u64,
}

impl Asker {
    fn ask(&mut self, req: &Request, timeout: Duration) -> Result<Reply, String> {
        let start = Instant::now();
        let mut ids = Vec::new();
        loop {
            self.next_id += 1;
            ids.push(self.next_id);
            self.backend
                .send(self.next_id, req)
                .map_err(|e| format!("{}: {e}", self.backend.describe()))?;
            let sent = Instant::now();
            while sent.elapsed() < RESEND && start.elapsed() < timeout {
                let wait = RESEND
                    .saturating_sub(sent.elapsed())
                    .min(timeout.saturating_sub(start.elapsed()));
                wait_readable(self.backend.as_ref(), wait);
                let answers = self
                    .backend
                    .drain()
                    .map_err(|e| format!("{}: {e}", self.backend.describe()))?;
                if let Some((_, r)) = answers.into_iter().find(|(id, _)| ids.contains(id)) {
                    return Ok(r);
                }
            }
            if start.elapsed() >= timeout {
                return Err(format!(
                    "{} did not answer within {} ms",
                    self.backend.describe(),
                    timeout.as_millis()
                ));
            }
        }
    }
}

fn wait_readable(b: &dyn Backend, d: Duration) {
    let mut fd = libc::pollfd {
        fd: b.wake_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = d.as_millis().clamp(1, 1000) as libc::c_int;
    // SAFETY: one valid pollfd that lives across the call; poll writes only `revents`.
    unsafe {
        libc::poll(&mut fd, 1, ms);
    }
}

impl ServiceGate {
    /// Opens the service of the node's `[quorum]` table (`cfg.quorum_table()`).
    pub fn open(
        table: &quorum::config::QuorumConfig,
        node: u64,
        peer: u64,
    ) -> Result<ServiceGate, QuorumConfigError> {
        let backends = table.open(NodeId(node))?;
        let what = match &table.witness {
            Some(w) => format!(
                "witness {}{}",
                w.preferred,
                w.alternate
                    .as_ref()
                    .map_or(String::new(), |a| format!(" (alternate {a})"))
            ),
            None => "etcd".into(),
        };
        Ok(ServiceGate {
            backends,
            node: NodeId(node),
            peer: NodeId(peer),
            timing: table.timing(),
            what,
            held: Mutex::new(HashMap::new()),
            lost: Arc::new(OnceLock::new()),
        })
    }

    fn askers(&self) -> Result<Vec<Asker>, String> {
        let (p, a) = self.backends.for_vm().map_err(|e| e.to_string())?;
        Ok([p, a]
            .into_iter()
            .flatten()
            .map(|backend| Asker {
                backend,
                next_id: 0,
            })
            .collect())
    }

    fn who(&self, holder: Option<NodeId>, req: &QuorumRequest) -> String {
        match holder {
            Some(h) if h == self.node => req.node.clone(),
            Some(h) if h == self.peer => req.peer.clone(),
            Some(h) => format!("{h}"),
            None => "nobody".into(),
        }
    }

    /// Takeover: a query of the VM's own key at every configured service; granted when
    /// the highest generation any of them knows is held by this node (our VMM won it).
    fn takeover(&self, req: &QuorumRequest) -> QuorumVerdict {
        let deny = |reason: String| QuorumVerdict {
            granted: false,
            reason,
            token: None,
        };
        let askers = match self.askers() {
            Ok(a) => a,
            Err(e) => return deny(format!("cannot reach the quorum service: {e}")),
        };
        let mut best: Option<(Generation, Option<NodeId>, u32)> = None;
        let mut errors = Vec::new();
        for mut a in askers {
            match a.ask(&Request::Query { vm: req.vm.clone() }, ASK_TIMEOUT) {
                Ok(Reply::State {
                    generation,
                    holder,
                    lease_left_ms,
                    ..
                }) => {
                    if best.is_none_or(|(g, _, _)| generation > g) {
                        best = Some((generation, holder, lease_left_ms));
                    }
                }
                Ok(other) => errors.push(format!("unexpected answer {other:?}")),
                Err(e) => errors.push(e),
            }
        }
        match best {
            None => deny(format!(
                "the quorum service did not answer: {}",
                errors.join("; ")
            )),
            Some((g, Some(h), _)) if h == self.node && g > 0 => QuorumVerdict {
                granted: true,
                reason: format!(
                    "{} ({}) holds generation {g} of {}: the VMM here won the takeover",
                    self.what, req.node, req.vm
                ),
                token: Some(g),
            },
            Some((g, h, left)) => deny(format!(
                "{} says {} holds generation {g} of {} (lease {left} ms left): the VMM here has not won it",
                self.what,
                self.who(h, req),
                req.vm
            )),
        }
    }

    /// Alone: acquire (or, after a restart of this daemon, renew) the daemon's own key
    /// at the preferred service, then keep renewing it until released.
    fn alone(&self, req: &QuorumRequest) -> QuorumVerdict {
        let deny = |reason: String| QuorumVerdict {
            granted: false,
            reason,
            token: None,
        };
        let key = alone_key(&req.vm);
        if let Some(flag) = self.held.lock_or_recover().get(&key) {
            if !flag.load(Ordering::Acquire) {
                return QuorumVerdict {
                    granted: true,
                    reason: format!("{} already granted {key} to {}", self.what, req.node),
                    token: None,
                };
            }
        }
        let mut asker = match self.askers() {
            Ok(mut a) if !a.is_empty() => a.swap_remove(0),
            Ok(_) => return deny("no quorum service configured".into()),
            Err(e) => return deny(format!("cannot reach the quorum service: {e}")),
        };
        let t = alone_timing(&self.timing);
        let lease_ms = t.lease_ttl.as_millis() as u32;
        let state = match asker.ask(&Request::Query { vm: key.clone() }, ASK_TIMEOUT) {
            Ok(Reply::State {
                generation,
                holder,
                lease_left_ms,
                ..
            }) => (generation, holder, lease_left_ms),
            Ok(other) => return deny(format!("{}: unexpected answer {other:?}", self.what)),
            Err(e) => return deny(format!("the quorum service did not answer: {e}")),
        };
        let (from, holder, _) = state;
        let sent = Instant::now();
        let request = if holder == Some(self.node) && from > 0 {
            // Ours already (this daemon restarted while its copy ran): renew it.
            Request::Renew {
                vm: key.clone(),
                node: self.node,
                generation: from,
                lease_ms,
                peer_outdated: false,
            }
        } else {
            Request::Acquire {
                vm: key.clone(),
                node: self.node,
                from,
                lease_ms,
            }
        };
        let generation = match asker.ask(&request, ASK_TIMEOUT) {
            Ok(Reply::Granted { generation, .. }) => generation,
            Ok(Reply::Busy {
                holder,
                retry_after_ms,
                ..
            }) => {
                return deny(format!(
                    "{} says {} holds {key} (it runs the VM alone, or did {retry_after_ms} ms ago)",
                    self.what,
                    self.who(holder, req)
                ))
            }
            Ok(Reply::Lost { generation, holder }) => {
                return deny(format!(
                    "{} says {} holds generation {generation} of {key}",
                    self.what,
                    self.who(holder, req)
                ))
            }
            Ok(other) => return deny(format!("{}: {other:?}", self.what)),
            Err(e) => return deny(format!("the quorum service did not answer: {e}")),
        };
        let stop = Arc::new(AtomicBool::new(false));
        self.held
            .lock_or_recover()
            .insert(key.clone(), stop.clone());
        let renewer = Renewer {
            asker,
            key: key.clone(),
            vm: req.vm.clone(),
            node: self.node,
            generation,
            timing: t,
            valid_from: sent,
            stop,
            lost: self.lost.clone(),
        };
        if let Err(e) = std::thread::Builder::new()
            .name(format!("alone-{}", req.vm))
            .spawn(move || renewer.run())
        {
            return deny(format!("cannot start the renewal of {key}: {e}"));
        }
        QuorumVerdict {
            granted: true,
            reason: format!(
                "{} granted {key} (generation {generation}) to {}; renewed while it runs here",
                self.what, req.node
            ),
            token: Some(generation),
        }
    }
}

/// Keeps one daemon-held key renewed; reports when the permission ends.
struct Renewer {
    asker: Asker,
    key: String,
    vm: String,
    node: NodeId,
    generation: Generation,
    timing: Timing,
    /// Send time of the last granted request: the permission runs from there.
    valid_from: Instant,
    stop: Arc<AtomicBool>,
    lost: Arc<OnceLock<LostReport>>,
}

impl Renewer {
    fn run(mut self) {
        // The permission ends `local_validity` after the send time of the last granted
        // request, on this clock: before the service can grant the key to anyone else.
        let validity = self.timing.local_validity();
        let min = Duration::from_millis(1);
        let mut why = String::from("no answer yet");
        while !self.stop.load(Ordering::Acquire) {
            let deadline = self.valid_from + validity;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                // Asked again, the key is acquired afresh (or renewed if still ours).
                self.stop.store(true, Ordering::Release);
                self.report(format!(
                    "the permission to run it alone ended (no granted renewal of {} for {} ms: {why})",
                    self.key,
                    self.valid_from.elapsed().as_millis()
                ));
                break;
            }
            std::thread::sleep(self.timing.renew_interval.min(left));
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let sent = Instant::now();
            let req = Request::Renew {
                vm: self.key.clone(),
                node: self.node,
                generation: self.generation,
                lease_ms: self.timing.lease_ttl.as_millis() as u32,
                peer_outdated: false,
            };
            match self
                .asker
                .ask(&req, self.timing.renew_interval.min(left).max(min))
            {
                Ok(Reply::Granted { .. }) => self.valid_from = sent,
                Ok(Reply::Lost { generation, .. }) => {
                    self.stop.store(true, Ordering::Release);
                    self.report(format!(
                        "{} lost: generation {generation} was granted to another node",
                        self.key
                    ));
                    break;
                }
                Ok(other) => why = format!("renewal answered {other:?}"),
                Err(e) => why = e,
            }
        }
    }

    fn report(&self, why: String) {
        log::warn!("{}: {why}", self.vm);
        if let Some(f) = self.lost.get() {
            f(&self.vm, why);
        }
    }
}

impl QuorumGate for ServiceGate {
    fn decide(&self, req: &QuorumRequest) -> QuorumVerdict {
        match req.kind {
            QuorumKind::Takeover => self.takeover(req),
            QuorumKind::Alone => self.alone(req),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} (quorum node id {}; FT/HA VMMs hold their VMs' keys, this daemon holds -alone.<vm> while it runs a VM without its peer)",
            self.what, self.node.0
        )
    }

    fn release(&self, vm: &str) {
        if let Some(flag) = self.held.lock_or_recover().remove(&alone_key(vm)) {
            flag.store(true, Ordering::Release);
        }
    }

    fn on_lost(&self, report: LostReport) {
        let _ = self.lost.set(report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_witness_grants_and_says_the_risk() {
        let v = NoWitness.decide(&QuorumRequest {
            cluster: "c".into(),
            node: "pm2".into(),
            peer: "pm1".into(),
            vm: "db".into(),
            kind: QuorumKind::Takeover,
            peer_silent_for: Some(Duration::from_secs(3)),
        });
        assert!(v.granted);
        assert!(v.reason.contains("two copies"), "{}", v.reason);
    }
}
