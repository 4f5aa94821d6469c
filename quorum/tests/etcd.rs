//! The etcd backend against a REAL etcd (Debian's `etcd-server`, 3.4): each test starts
//! its own etcd on loopback with its own ports and a temp data dir, killed and reaped
//! on drop (also on panic, and with the test process through PR_SET_PDEATHSIG).
//!
//! etcd runs with a 10 ms heartbeat and a 100 ms election timeout, so its shortest
//! lease is 1 s (1.5 x the election timeout, rounded up to whole seconds; 2 s with
//! etcd's defaults). The node machines use a 1 s lease, renewed every 200 ms, with a
//! 100 ms margin: a holder's permission lasts 880 ms from the send of its last answered
//! renewal.
//!
//! No assertion depends on scheduling (the suite runs on a shared, loaded machine): a
//! lease that must not lapse is 30 s long, a lapse is waited for (hang guards of
//! [`WITHIN`]), timing bounds are only those that hold whatever the delays (a grant
//! never before the TTL after the holder's last renewal was sent; a pause at the first
//! step past the deadline), and stalls are made by the test (SIGSTOP of etcd, a frozen
//! node machine).
//!
//! Cases: the grant goes to the first asker and the second is refused while the holder
//! renews, past its lease's TTL; a frozen holder (its keep-alives stop) loses the VM only after the TTL, and
//! after its own permission ended; a restart of etcd mid-lease (data dir kept) loses
//! no generation; an unreachable etcd pauses the holder at its local deadline; the
//! peer-outdated mark blocks a stale standby; a commit over a stale revision fails;
//! auth and TLS. Figures (printed, not asserted): acquire and renewal latency, takeover
//! time through etcd with its minimum TTL.
#![cfg(feature = "etcd")]

use std::fs;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::ConnectOptions;
use quorum::client::{Backend, Runner};
use quorum::config::EtcdConfig;
use quorum::etcd::exec::{Exec, Shared};
use quorum::etcd::keys::{decode, Holder, Outdated};
use quorum::etcd::session::{EtcdSession, Op, OpResult, SessionConfig};
use quorum::etcd::{EtcdBackend, EtcdConnection};
use quorum::node::{
    Action, AlertKind, Event, GuestState, Mode, NodeConfig, OutputGate, QuorumNode, Start,
};
use quorum::timing::Timing;
use quorum::witness::ops::{Reply, Request};
use quorum::{NodeId, Role};
use twinrun_lab::Proc;

const A: NodeId = NodeId(1);
const B: NodeId = NodeId(2);
const CLUSTER: &str = "plant-a";
const PREFIX: &str = "/twinrun/quorum";
/// etcd's shortest lease here (see the header).
const LEASE_MS: u32 = 1000;
const OP_TIMEOUT: Duration = Duration::from_millis(400);
/// Hang guard for what must happen (a grant after a lease expired, a pause, a
/// demotion): never a bound on how fast. No assertion here depends on how the
/// scheduler treats the test, etcd or the clients (the machine is shared and loaded):
/// leases that must not lapse are long (30 s), lapses are waited for, and stalls are
/// made by the test itself.
const WITHIN: Duration = Duration::from_secs(60);
/// A lease that cannot lapse by scheduling alone while its holder renews.
const LONG_LEASE_MS: u32 = 30_000;

fn timing() -> Timing {
    Timing {
        lease_ttl: Duration::from_millis(u64::from(LEASE_MS)),
        renew_interval: Duration::from_millis(200),
        margin: Duration::from_millis(100),
        retry: Duration::from_millis(50),
        reach_timeout: Duration::from_millis(500),
        ..Timing::default()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------- etcd process

/// An etcd process with its data dir; killed and reaped on drop (the lab's `Proc`).
struct Etcd {
    proc: Option<Proc>,
    /// Processes started so far (each logs to its own file).
    starts: u32,
    dir: tempfile::TempDir,
    client: u16,
    peer: u16,
    extra: Vec<String>,
    scheme: &'static str,
    /// How the tests' own client connects (TLS).
    opts: ConnectOptions,
}

fn free_ports() -> (u16, u16) {
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    )
}

impl Etcd {
    fn start() -> Etcd {
        Etcd::start_with("http", Vec::new(), ConnectOptions::new())
    }

    /// An etcd serving `scheme` with `extra` flags (TLS files); `opts` for the tests'
    /// own client.
    fn start_with(scheme: &'static str, extra: Vec<String>, opts: ConnectOptions) -> Etcd {
        let mut e = Etcd {
            proc: None,
            starts: 0,
            dir: tempfile::tempdir().unwrap(),
            client: 0,
            peer: 0,
            extra,
            scheme,
            opts,
        };
        // Another process may take a port between its probe and etcd's bind: retry.
        for _ in 0..5 {
            (e.client, e.peer) = free_ports();
            if e.spawn() {
                return e;
            }
        }
        panic!("etcd did not start; log:\n{}", e.log_tail());
    }

    fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.client)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("etcd-{}.log", self.starts))
    }

    fn log_tail(&self) -> String {
        self.proc
            .as_ref()
            .map(|p| p.log_tail(30))
            .unwrap_or_else(|| {
                let s = fs::read_to_string(self.log_path()).unwrap_or_default();
                let lines: Vec<&str> = s.lines().collect();
                lines[lines.len().saturating_sub(30)..].join("\n")
            })
    }

    /// Starts etcd on the current ports and data dir; false if it exits at once (a
    /// port in use). Waits until it serves.
    fn spawn(&mut self) -> bool {
        let data = self.dir.path().join("data");
        let peer = format!("http://127.0.0.1:{}", self.peer);
        self.starts += 1;
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(self.url())
            .arg("--advertise-client-urls")
            .arg(self.url())
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("default={peer}"))
            .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(&self.extra);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches only the
        // child's own state: etcd dies with the test process even if it is killed.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let proc = match Proc::spawn_logged("etcd", &mut cmd, &self.log_path()) {
            Ok(p) => p,
            Err(e) => panic!("cannot run etcd (Debian package etcd-server): {e}"),
        };
        self.proc = Some(proc);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Some(p) = self.proc.as_mut() {
                if !p.alive() {
                    self.proc = None;
                    return false;
                }
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.client)).is_ok() && self.serves() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "etcd did not become ready in 30 s; log:\n{}",
            self.log_tail()
        );
    }

    /// Whether etcd answers a read.
    fn serves(&self) -> bool {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return false;
        };
        let url = self.url();
        let opts = self.opts.clone();
        rt.block_on(async move {
            let read = async {
                let mut c = etcd_client::Client::connect([url], Some(opts)).await?;
                c.get("/", None).await
            };
            matches!(
                tokio::time::timeout(Duration::from_millis(500), read).await,
                Ok(Ok(_))
            )
        })
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGKILL, then the same etcd again (data dir and ports kept).
    fn restart(&mut self) {
        self.kill();
        assert!(self.spawn(), "etcd did not restart:\n{}", self.log_tail());
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.proc.as_ref().and_then(|p| p.pid()).unwrap();
        // SAFETY: kill(2) on our own child's pid, not reaped yet (the Proc holds it).
        unsafe { libc::kill(pid as libc::pid_t, sig) };
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("etcd log tail:\n{}", self.log_tail());
        }
        // The Proc kills and reaps it.
        self.kill();
    }
}

/// A plain etcd client for the tests' own checks (not the code under test).
struct Raw {
    rt: tokio::runtime::Runtime,
    c: etcd_client::Client,
}

impl Raw {
    fn new(url: &str) -> Raw {
        Raw::with(url, ConnectOptions::new())
    }

    fn with(url: &str, opts: ConnectOptions) -> Raw {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let c = rt
            .block_on(etcd_client::Client::connect([url], Some(opts)))
            .unwrap();
        Raw { rt, c }
    }

    /// (value, create_revision, mod_revision, lease) of `key`.
    fn get(&self, key: &str) -> Option<(Vec<u8>, i64, i64, i64)> {
        let mut c = self.c.clone();
        let r = self.rt.block_on(c.get(key, None)).unwrap();
        r.kvs().first().map(|kv| {
            (
                kv.value().to_vec(),
                kv.create_revision(),
                kv.mod_revision(),
                kv.lease(),
            )
        })
    }

    fn revoke(&self, lease: i64) {
        let mut c = self.c.clone();
        self.rt.block_on(c.lease_revoke(lease)).unwrap();
    }
}

fn key(vm: &str, k: &str) -> String {
    format!("{PREFIX}/{CLUSTER}/{vm}/{k}")
}

fn connect(url: &str) -> Arc<EtcdConnection> {
    let cfg = EtcdConfig {
        prefix: PREFIX.into(),
        ..EtcdConfig::new(&[url])
    };
    EtcdConnection::start(&cfg, OP_TIMEOUT).unwrap()
}

// ---------------------------------------------------------------- request level

/// One node's backend, driven request by request.
struct Client {
    b: EtcdBackend,
    node: NodeId,
    next: u64,
}

impl Client {
    fn new(conn: &Arc<EtcdConnection>, node: NodeId) -> Client {
        Client {
            b: conn
                .backend(node, CLUSTER, Duration::from_millis(50))
                .unwrap(),
            node,
            next: 1,
        }
    }

    /// Sends `req` and waits up to 3 s for its answer.
    fn call(&mut self, req: Request) -> Option<Reply> {
        let id = self.next;
        self.next += 1;
        self.b.send(id, &req).unwrap();
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            if let Some((_, r)) = self.b.drain().unwrap().into_iter().find(|a| a.0 == id) {
                return Some(r);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    fn acquire(&mut self, vm: &str, from: u64, lease_ms: u32) -> Option<Reply> {
        self.call(Request::Acquire {
            vm: vm.into(),
            node: self.node,
            from,
            lease_ms,
        })
    }

    fn renew(&mut self, vm: &str, generation: u64, lease_ms: u32) -> Option<Reply> {
        self.call(Request::Renew {
            vm: vm.into(),
            node: self.node,
            generation,
            lease_ms,
            peer_outdated: false,
        })
    }
}

fn percentiles(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    (ms(v[v.len() / 2]), ms(*v.last().unwrap()))
}

#[test]
fn grant_to_the_first_asker_refused_while_the_holder_renews() {
    let etcd = Etcd::start();
    let raw = Raw::new(&etcd.url());
    let conn = connect(&etcd.url());
    let mut a = Client::new(&conn, A);
    let mut b = Client::new(&conn, B);
    // A lease longer than any stall of a loaded machine: this case is about the rule.
    let lease = LONG_LEASE_MS;
    assert_eq!(
        a.acquire("vm0", 0, lease),
        Some(Reply::Granted {
            generation: 1,
            lease_ms: lease
        })
    );
    let granted_at = Instant::now();
    assert_eq!(
        b.acquire("vm0", 0, lease),
        Some(Reply::Lost {
            generation: 1,
            holder: Some(A)
        })
    );
    // The keys: the generation written at the revision of the grant, the owner key
    // created by the same transaction on A's lease.
    let (g, _, g_rev, g_lease) = raw.get(&key("vm0", "generation")).unwrap();
    assert_eq!(
        decode::<Holder>(b"g", &g).unwrap(),
        Holder {
            generation: 1,
            holder: Some(1)
        }
    );
    assert_eq!(g_lease, 0, "the generation is durable");
    let (_, o_create, _, o_lease) = raw.get(&key("vm0", "owner")).unwrap();
    assert_eq!(o_create, g_rev, "one transaction");
    assert_ne!(o_lease, 0, "the owner key lives on A's lease");
    // B is refused (every single time) for as long as A renews, and A renews for
    // longer than its lease: the renewals are what keep the lease at etcd. A renewal
    // that gets no answer (etcd or the client slow) is asked again, as the node
    // machine does; a renewal gap, set by the test, is 1 s: the lease outlives any
    // stall of the test short of 29 s.
    let mut renewals = Vec::new();
    let mut refusals = 0;
    let mut rounds = 0;
    while granted_at.elapsed() <= Duration::from_millis(u64::from(lease) + 1000) {
        let s = Instant::now();
        let renewed = (0..5).find_map(|_| a.renew("vm0", 1, lease));
        assert!(
            matches!(renewed, Some(Reply::Granted { generation: 1, .. })),
            "the holder's renewal: {renewed:?}"
        );
        renewals.push(s.elapsed());
        for _ in 0..3 {
            match b.acquire("vm0", 1, lease) {
                Some(Reply::Busy {
                    generation: 1,
                    holder: Some(A),
                    ..
                }) => refusals += 1,
                // No answer: asked again in the next round.
                None => {}
                other => panic!("B must be refused while A renews, got {other:?}"),
            }
        }
        rounds += 1;
        std::thread::sleep(Duration::from_secs(1));
    }
    assert!(refusals > 0 && rounds > 0);
    // Still A's, on the same lease, past the lease's TTL counted from the grant.
    assert_eq!(raw.get(&key("vm0", "owner")).unwrap().3, o_lease);
    assert!(matches!(
        b.acquire("vm0", 1, lease),
        Some(Reply::Busy {
            holder: Some(A),
            ..
        })
    ));
    // Figures: first grants of 20 VMs (read, lease grant, transaction) and renewals
    // (keep-alive, confirming transaction).
    let mut acquires = Vec::new();
    for i in 0..20 {
        let s = Instant::now();
        let r = a.acquire(&format!("vm-{i}"), 0, lease);
        acquires.push(s.elapsed());
        assert!(matches!(r, Some(Reply::Granted { generation: 1, .. })));
    }
    let (ap50, amax) = percentiles(acquires);
    let (rp50, rmax) = percentiles(renewals);
    eprintln!(
        "etcd figures: acquire p50 {ap50:.2} ms max {amax:.2} ms (20 VMs); renewal p50 {rp50:.2} \
         ms max {rmax:.2} ms; {refusals} refusals while the holder renewed"
    );
}

// ---------------------------------------------------------------- node machines

/// One PM's quorum machine for one VM, driven by its `Runner` through etcd.
struct Pm {
    r: Runner,
    /// Every action with the instant it was returned.
    log: Vec<(Instant, Action)>,
    /// Every poll (each ends with a step of the machine): when it began and ended.
    polls: Vec<(Instant, Instant)>,
}

impl Pm {
    fn new(conn: &Arc<EtcdConnection>, vm: &str, id: NodeId, role: Role, generation: u64) -> Pm {
        let peer = if id == A { B } else { A };
        let mut cfg = NodeConfig::new(vm, id, peer, Mode::Witness { alternate: false });
        cfg.timing = timing();
        cfg.validate().unwrap();
        let node = QuorumNode::new(
            cfg,
            Start {
                role,
                generation,
                elected: None,
            },
        );
        let b = conn.backend(id, CLUSTER, timing().retry).unwrap();
        Pm {
            r: Runner::new(node, Some(Box::new(b)), None),
            log: Vec::new(),
            polls: Vec::new(),
        }
    }

    fn record(&mut self, a: Vec<Action>) -> Vec<Action> {
        let now = Instant::now();
        self.log.extend(a.iter().cloned().map(|a| (now, a)));
        a
    }

    fn event(&mut self, ev: Event) -> Vec<Action> {
        let a = self.r.event(ev).unwrap();
        self.record(a)
    }

    fn poll(&mut self) -> Vec<Action> {
        let began = Instant::now();
        let a = self.r.poll(Duration::from_millis(2)).unwrap();
        let now = Instant::now();
        self.polls.push((began, now));
        self.log.extend(a.iter().cloned().map(|a| (now, a)));
        a
    }

    /// The first logged action matching `f` at or after `since`.
    fn first(&self, since: Instant, f: impl Fn(&Action) -> bool) -> Option<Instant> {
        self.log
            .iter()
            .find(|(t, a)| *t >= since && f(a))
            .map(|(t, _)| *t)
    }

    /// The end of this node's lease at etcd as it counts it (its own clock).
    fn lease_end(&self) -> Option<Instant> {
        let now = self.r.now();
        self.r.node().status(now).lease_left[0].map(|l| self.r.instant(now + l))
    }
}

/// Two PMs and the path between them.
struct Pair {
    pms: [Pm; 2],
    link: bool,
    frozen: [bool; 2],
}

impl Pair {
    /// A protected pair for `vm`: PM1 primary holding generation 1 from etcd, PM2 its
    /// acknowledging standby that knows generation 1.
    fn protected(conn: &Arc<EtcdConnection>, vm: &str) -> Pair {
        let mut p = Pair {
            pms: [
                Pm::new(conn, vm, A, Role::Primary, 0),
                Pm::new(conn, vm, B, Role::Standby, 0),
            ],
            link: true,
            frozen: [false; 2],
        };
        for i in 0..2 {
            let a = p.pms[i].event(Event::PeerReachable(true));
            p.route(i, a);
            let a = p.pms[i].event(Event::Protected(true));
            p.route(i, a);
        }
        assert!(
            p.run_until(WITHIN, |p| {
                p.pms[0].r.node().generation() == 1 && p.pms[1].r.node().generation() == 1
            }),
            "the pair did not get generation 1"
        );
        p
    }

    /// Carries the peer messages among `actions` of PM `from` (and the answers).
    fn route(&mut self, from: usize, actions: Vec<Action>) {
        let mut q: Vec<(usize, Action)> = actions.into_iter().map(|a| (from, a)).collect();
        while let Some((from, a)) = q.pop() {
            let to = 1 - from;
            if let Action::ToPeer(m) = a {
                if self.link && !self.frozen[to] && !self.frozen[from] {
                    let more = self.pms[to].event(Event::FromPeer(m));
                    q.extend(more.into_iter().map(|a| (to, a)));
                }
            }
        }
    }

    fn step(&mut self) {
        for i in 0..2 {
            if !self.frozen[i] {
                let a = self.pms[i].poll();
                self.route(i, a);
            }
        }
    }

    fn run_until(&mut self, limit: Duration, mut done: impl FnMut(&Pair) -> bool) -> bool {
        let t = Instant::now();
        loop {
            self.step();
            if done(self) {
                return true;
            }
            if t.elapsed() > limit {
                return false;
            }
        }
    }

    fn run_for(&mut self, d: Duration) {
        let t = Instant::now();
        while t.elapsed() < d {
            self.step();
        }
    }

    /// Every path between the PMs is cut (both detect it).
    fn cut(&mut self) {
        self.link = false;
        for i in 0..2 {
            if !self.frozen[i] {
                let a = self.pms[i].event(Event::PeerReachable(false));
                self.route(i, a);
            }
        }
    }
}

fn is_takeover(a: &Action) -> bool {
    matches!(a, Action::TakeOver { .. })
}

#[test]
fn a_frozen_holder_loses_the_vm_only_after_the_ttl_and_after_its_own_permission() {
    let etcd = Etcd::start();
    let conn = connect(&etcd.url());
    let validity = timing().local_validity();
    let mut figures = Vec::new();
    for run in 0..3 {
        let vm = format!("vm{run}");
        let mut p = Pair::protected(&conn, &vm);
        // FT for a while: the primary renews (peer current) and the standby acknowledges.
        p.run_for(Duration::from_millis(600));
        assert_eq!(p.pms[0].r.node().gate(), Some(OutputGate::Acked));
        // SIGSTOP of the primary: its keep-alives stop.
        let until = p.pms[0]
            .lease_end()
            .expect("the primary holds a lease at etcd");
        let frozen_at = Instant::now();
        p.frozen[0] = true;
        // The standby notices after the A-Link's detection time (4 x 50 ms).
        p.run_for(Duration::from_millis(200));
        p.cut();
        let cut_at = Instant::now();
        assert!(
            p.run_until(WITHIN, |p| p.pms[1].r.node().role() == Role::Primary),
            "the standby never took over"
        );
        let took = p.pms[1].first(cut_at, is_takeover).unwrap();
        assert_eq!(p.pms[1].r.node().generation(), 2, "the next generation");
        // etcd counted the TTL from the arrival of the last keep-alive, which was sent
        // at or after `until - validity`: the grant cannot come earlier than a TTL
        // after that, and the old holder's own permission ended before it.
        let last_renewal_sent = until - validity;
        assert!(
            took >= last_renewal_sent + timing().lease_ttl,
            "granted {:.0} ms after the holder's last renewal, before the TTL",
            ms(took - last_renewal_sent)
        );
        assert!(
            until < took,
            "the old holder's permission ({:.0} ms after the freeze) outlived the takeover",
            ms(until - frozen_at)
        );
        figures.push((took - frozen_at, took - last_renewal_sent, took - until));
        // SIGCONT: the old primary learns from etcd that it lost and demotes itself.
        p.frozen[0] = false;
        let resumed = Instant::now();
        assert!(
            p.run_until(WITHIN, |p| p.pms[0]
                .first(resumed, |a| matches!(a, Action::Demote { generation: 2 }))
                .is_some()),
            "the old primary did not learn that it lost"
        );
        assert_eq!(p.pms[0].r.node().role(), Role::Standby);
    }
    let (f, s, m): (Vec<_>, Vec<_>, Vec<_>) = (
        figures.iter().map(|x| x.0).collect(),
        figures.iter().map(|x| x.1).collect(),
        figures.iter().map(|x| x.2).collect(),
    );
    let ((f50, fmax), (s50, smax), (m50, mmin)) = (
        percentiles(f),
        percentiles(s),
        (ms(m[m.len() / 2]), ms(*m.iter().min().unwrap())),
    );
    eprintln!(
        "etcd takeover with its minimum TTL ({LEASE_MS} ms, holder validity {:.0} ms), 3 runs: \
         freeze -> grant p50 {f50:.0} ms max {fmax:.0} ms (detection 200 ms included); \
         last renewal sent -> grant p50 {s50:.0} ms max {smax:.0} ms; the holder's \
         permission ended {m50:.0} ms (min {mmin:.0} ms) before the grant",
        ms(validity)
    );
}

#[test]
fn etcd_restarted_mid_lease_keeps_every_generation() {
    let mut etcd = Etcd::start();
    let raw = Raw::new(&etcd.url());
    let conn = connect(&etcd.url());
    let mut a = Client::new(&conn, A);
    let mut b = Client::new(&conn, B);
    // vm0 on a lease no stall lapses (the rule while it lives), vm1 on etcd's shortest
    // (its lapse, waited for).
    let long = LONG_LEASE_MS;
    let short = LEASE_MS;
    for (vm, lease) in [("vm0", long), ("vm1", short)] {
        assert!(matches!(
            a.acquire(vm, 0, lease),
            Some(Reply::Granted { generation: 1, .. })
        ));
    }
    let (_, _, g_rev, _) = raw.get(&key("vm0", "generation")).unwrap();
    let (_, _, _, lease_id) = raw.get(&key("vm0", "owner")).unwrap();
    drop(raw);
    // SIGKILL mid-lease, restart with the same data dir.
    let t = Instant::now();
    etcd.restart();
    let raw = Raw::new(&etcd.url());
    eprintln!("etcd restarted in {:.0} ms", ms(t.elapsed()));
    // The holder's lease survived (etcd restores leases and restarts their TTL): its
    // next renewals keep generation 1 on the same lease.
    let mut renewed = false;
    for _ in 0..20 {
        if let Some(Reply::Granted { generation, .. }) = a.renew("vm0", 1, long) {
            assert_eq!(generation, 1);
            renewed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(renewed, "the holder could not renew after the restart");
    let (g, _, g_rev2, _) = raw.get(&key("vm0", "generation")).unwrap();
    assert_eq!(
        (decode::<Holder>(b"g", &g).unwrap().generation, g_rev2),
        (1, g_rev),
        "the generation and its revision survive"
    );
    assert_eq!(raw.get(&key("vm0", "owner")).unwrap().3, lease_id);
    assert!(matches!(
        b.acquire("vm0", 1, long),
        Some(Reply::Busy {
            holder: Some(A),
            ..
        })
    ));
    assert!(matches!(
        b.acquire("vm0", 0, long),
        Some(Reply::Lost { generation: 1, .. })
    ));
    // A does not renew vm1; B gets generation 2 once A's lease is gone.
    let t = Instant::now();
    let g2 = loop {
        match b.acquire("vm1", 1, short) {
            Some(Reply::Granted { generation, .. }) => break generation,
            Some(Reply::Busy { .. }) | None => {}
            other => panic!("{other:?}"),
        }
        assert!(t.elapsed() < WITHIN, "B never got the VM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(g2, 2);
    // Restart again: generation 2 stays; A's old generation stays lost; vm0 stays A's.
    etcd.restart();
    let mut state = None;
    for _ in 0..20 {
        state = b.call(Request::Query { vm: "vm1".into() });
        if state.is_some() {
            break;
        }
    }
    assert!(
        matches!(
            state,
            Some(Reply::State {
                generation: 2,
                holder: Some(B),
                ..
            })
        ),
        "{state:?}"
    );
    // A's first request after the restart may go unanswered (its keep-alive stream
    // died with the old process): asked again, as the node machine does.
    let lost = (0..5).find_map(|_| a.renew("vm1", 1, short));
    assert!(
        matches!(lost, Some(Reply::Lost { generation: 2, .. })),
        "{lost:?}"
    );
    assert!(matches!(
        a.acquire("vm1", 1, short),
        Some(Reply::Lost { generation: 2, .. })
    ));
    let kept = (0..5).find_map(|_| a.renew("vm0", 1, long));
    assert!(
        matches!(kept, Some(Reply::Granted { generation: 1, .. })),
        "{kept:?}"
    );
}

#[test]
fn etcd_unreachable_pauses_the_holder_at_its_local_deadline() {
    let etcd = Etcd::start();
    let conn = connect(&etcd.url());
    let mut p = Pair::protected(&conn, "vm0");
    // The standby is gone: the primary runs alone once etcd recorded it outdated.
    p.frozen[1] = true;
    p.cut();
    assert!(
        p.run_until(WITHIN, |p| matches!(
            p.pms[0].r.node().gate(),
            Some(OutputGate::Free { until: Some(_) })
        )),
        "the primary never ran simplex"
    );
    p.run_for(Duration::from_millis(500));
    // etcd stops answering (SIGSTOP: connections stay open, requests hang).
    etcd.signal(libc::SIGSTOP);
    let stopped = Instant::now();
    let Some(OutputGate::Free { until: Some(until) }) = p.pms[0].r.node().gate() else {
        panic!("simplex expected")
    };
    assert!(
        p.run_until(WITHIN, |p| p.pms[0]
            .first(stopped, |a| *a == Action::Guest(GuestState::Pause))
            .is_some()),
        "the primary did not pause"
    );
    let paused = p.pms[0]
        .first(stopped, |a| *a == Action::Guest(GuestState::Pause))
        .unwrap();
    // The deadline in force: the last permission before the pause (an answer already
    // on its way when etcd stopped may have been taken after `until` was read).
    let last_until = p.pms[0]
        .log
        .iter()
        .filter(|(t, _)| *t <= paused)
        .filter_map(|(_, a)| match a {
            Action::Output(OutputGate::Free { until: Some(u) }) => Some(*u),
            _ => None,
        })
        .next_back()
        .expect("a permission before the pause");
    assert!(last_until >= until, "permissions only grow");
    let until = last_until;
    let until_at = p.pms[0].r.instant(until);
    // Its permission had ended (whatever the stepping: the release path checks it).
    let n = &p.pms[0].r;
    assert!(!n.node().may_release_unacked(n.now()));
    assert!(!n.node().may_release_unacked(until));
    assert!(paused >= until_at, "paused before its deadline?");
    // Paused by its own wake-up at the deadline, not by chance: no step of the machine
    // that began at or after the deadline went by without pausing (how late that step
    // came is the scheduler's business: a figure below).
    let late_steps = p.pms[0]
        .polls
        .iter()
        .filter(|(began, ended)| *began >= until_at && *ended < paused)
        .count();
    assert_eq!(
        late_steps, 0,
        "{late_steps} step(s) after the deadline did not pause"
    );
    assert_eq!(n.node().gate(), Some(OutputGate::Hold));
    let last_sent = until_at - timing().local_validity();
    eprintln!(
        "etcd unreachable: paused {:.0} ms after the last answered renewal was sent ({:.0} ms \
         after etcd stopped; deadline {:.0} ms, reached {:.1} ms late)",
        ms(paused - last_sent),
        ms(paused.saturating_duration_since(stopped)),
        ms(timing().local_validity()),
        ms(paused - until_at)
    );
    // etcd back (SIGCONT): the primary still holds generation 1 and runs again.
    etcd.signal(libc::SIGCONT);
    let back = Instant::now();
    assert!(
        p.run_until(WITHIN, |p| p.pms[0]
            .first(back, |a| *a == Action::Guest(GuestState::Run))
            .is_some()),
        "the primary did not resume"
    );
    let n = p.pms[0].r.node();
    assert_eq!((n.role(), n.generation()), (Role::Primary, 1));
    assert!(matches!(n.gate(), Some(OutputGate::Free { .. })));
}

#[test]
fn the_outdated_mark_blocks_a_stale_standby() {
    let etcd = Etcd::start();
    let raw = Raw::new(&etcd.url());
    let conn = connect(&etcd.url());
    let mut p = Pair::protected(&conn, "vm0");
    // All paths cut: the primary has etcd mark the standby's replica outdated before it
    // releases output without acknowledgements.
    p.cut();
    assert!(p.run_until(WITHIN, |p| matches!(
        p.pms[0].r.node().gate(),
        Some(OutputGate::Free { .. })
    )));
    let (v, _, _, l) = raw.get(&key("vm0", "outdated")).unwrap();
    assert_eq!(l, 0, "durable");
    assert_eq!(
        decode::<Outdated>(b"o", &v).unwrap(),
        Outdated {
            generation: 1,
            holder: Some(1),
            peer_outdated: true
        }
    );
    // Then the primary dies. Its lease lapses, but the standby lacks the output it
    // released alone: never granted.
    p.frozen[0] = true;
    let dead = Instant::now();
    // Until the standby's takeover is refused for the mark (asked after the old lease
    // expired at etcd): however long etcd takes to expire it.
    let refused = |p: &Pair| {
        p.pms[1]
            .first(
                dead,
                |a| matches!(a, Action::Alert(al) if al.kind == AlertKind::TakeoverRefused),
            )
            .is_some()
    };
    assert!(
        p.run_until(WITHIN, refused),
        "the stale standby's takeover was never refused"
    );
    // It keeps asking (and being refused) for a while more.
    p.run_for(Duration::from_millis(500));
    assert!(
        raw.get(&key("vm0", "owner")).is_none(),
        "the old lease is gone: the mark alone refuses"
    );
    let s = &p.pms[1];
    assert_eq!(
        (s.r.node().role(), s.r.node().generation()),
        (Role::Standby, 1)
    );
    assert!(s.first(dead, is_takeover).is_none());
    assert!(s
        .first(dead, |a| matches!(
            a,
            Action::Alert(al) if al.kind == AlertKind::TakeoverRefused
        ))
        .is_some());
    let mut c = Client::new(&conn, B);
    assert_eq!(
        c.acquire("vm0", 1, LEASE_MS),
        Some(Reply::Outdated { generation: 1 })
    );
}

/// Runs a session's ops until it has nothing to do; returns its answers.
fn drive(rt: &tokio::runtime::Runtime, s: &mut EtcdSession, ex: &mut Exec) -> Vec<(u64, Reply)> {
    while let Some((o, op)) = s.poll_op() {
        let r = rt.block_on(ex.run(&op));
        s.on_result(o, r);
    }
    s.take_answers()
}

#[test]
fn a_commit_over_a_stale_revision_fails() {
    let etcd = Etcd::start();
    let raw = Raw::new(&etcd.url());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let shared = Arc::new(Shared::new(vec![etcd.url()], ConnectOptions::new()));
    let mut ex = [
        Exec::new(shared.clone(), OP_TIMEOUT),
        Exec::new(shared, OP_TIMEOUT),
    ];
    let session = |n| {
        EtcdSession::new(SessionConfig::new(
            n,
            CLUSTER,
            PREFIX,
            Duration::from_millis(50),
        ))
        .unwrap()
    };
    let (mut sa, mut sb) = (session(A), session(B));
    let acq = |node, from| Request::Acquire {
        vm: "vm0".into(),
        node,
        from,
        lease_ms: LEASE_MS,
    };
    sa.request(1, acq(A, 0));
    assert!(matches!(
        drive(&rt, &mut sa, &mut ex[0])[..],
        [(1, Reply::Granted { generation: 1, .. })]
    ));
    // A's lease ends (as at its TTL).
    let (_, _, _, lease_a) = raw.get(&key("vm0", "owner")).unwrap();
    raw.revoke(lease_a);
    assert!(raw.get(&key("vm0", "owner")).is_none());
    let (_, _, g_rev, _) = raw.get(&key("vm0", "generation")).unwrap();
    // B reads (owner gone), decides to take over and gets a lease...
    sb.request(1, acq(B, 1));
    let (o, read) = sb.poll_op().unwrap();
    assert!(matches!(read, Op::Read { .. }));
    let r = rt.block_on(ex[1].run(&read));
    sb.on_result(o, r);
    let (o, grant) = sb.poll_op().unwrap();
    let r = rt.block_on(ex[1].run(&grant));
    let OpResult::Granted { lease: lease_b, .. } = r else {
        panic!("{r:?}")
    };
    sb.on_result(o, r);
    let (o, txn) = sb.poll_op().unwrap();
    let Op::Txn { ref compares, .. } = txn else {
        panic!("{txn:?}")
    };
    assert!(compares.iter().any(|c| c.1 == g_rev));
    // ...but before its commit, A re-creates its owner key at generation 1 (its
    // renewal finds its lease gone and the generation still its own).
    sa.request(
        2,
        Request::Renew {
            vm: "vm0".into(),
            node: A,
            generation: 1,
            lease_ms: LEASE_MS,
            peer_outdated: false,
        },
    );
    assert!(matches!(
        drive(&rt, &mut sa, &mut ex[0])[..],
        [(2, Reply::Granted { generation: 1, .. })]
    ));
    // B's commit compares on what it read: it fails, B is told Busy, its lease goes.
    let r = rt.block_on(ex[1].run(&txn));
    assert!(
        matches!(
            r,
            OpResult::Txn {
                succeeded: false,
                ..
            }
        ),
        "a commit over a stale revision must fail: {r:?}"
    );
    sb.on_result(o, r);
    let answers = drive(&rt, &mut sb, &mut ex[1]);
    assert!(
        matches!(
            answers[..],
            [(
                1,
                Reply::Busy {
                    generation: 1,
                    holder: Some(A),
                    ..
                }
            )]
        ),
        "{answers:?}"
    );
    assert_eq!(sb.stats.revoked, 1);
    let mut c = raw.c.clone();
    let ttl = raw
        .rt
        .block_on(c.lease_time_to_live(lease_b, None))
        .unwrap()
        .ttl();
    assert!(ttl <= 0, "B's unused lease is revoked (ttl {ttl})");
    let (g, _, g_rev2, _) = raw.get(&key("vm0", "generation")).unwrap();
    assert_eq!(
        (decode::<Holder>(b"g", &g).unwrap().holder, g_rev2),
        (Some(1), g_rev)
    );
}

fn connect_with(cfg: &EtcdConfig) -> Client {
    let conn = EtcdConnection::start(cfg, OP_TIMEOUT).unwrap();
    Client::new(&conn, A)
}

/// Asks for generation 1 of `vm`: the answer, or the error the backend met instead.
fn first_grant(c: &mut Client, vm: &str) -> Result<Reply, String> {
    let id = c.next;
    c.next += 1;
    let req = Request::Acquire {
        vm: vm.into(),
        node: c.node,
        from: 0,
        lease_ms: LEASE_MS,
    };
    c.b.send(id, &req).unwrap();
    let t = Instant::now();
    while t.elapsed() < WITHIN {
        if let Some((_, r)) = c.b.drain().unwrap().into_iter().find(|a| a.0 == id) {
            return Ok(r);
        }
        if let Some(e) = c.b.status().last_error {
            return Err(e);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Err(format!("neither an answer nor an error in {WITHIN:?}"))
}

#[test]
fn auth_a_user_limited_to_the_prefix_and_clear_errors() {
    let etcd = Etcd::start();
    let raw = Raw::new(&etcd.url());
    let mut c = raw.c.clone();
    raw.rt
        .block_on(async {
            use etcd_client::Permission;
            c.user_add("root", "root-pw", None).await?;
            c.user_grant_role("root", "root").await?;
            c.role_add("twinrun").await?;
            c.role_grant_permission(
                "twinrun",
                Permission::read_write(format!("{PREFIX}/")).with_prefix(),
            )
            .await?;
            c.user_add("twinrun", "twinrun-pw", None).await?;
            c.user_grant_role("twinrun", "twinrun").await?;
            c.user_add("other", "other-pw", None).await?;
            c.auth_enable().await?;
            Ok::<_, etcd_client::Error>(())
        })
        .unwrap();
    let d = tempfile::tempdir().unwrap();
    let cfg = |user: &str, pw: &str| {
        let f = d.path().join(format!("{user}-{pw}"));
        fs::write(&f, format!("{pw}\n")).unwrap();
        EtcdConfig {
            prefix: PREFIX.into(),
            username: Some(user.into()),
            password_file: Some(f),
            ..EtcdConfig::new(&[&etcd.url()])
        }
    };
    assert_eq!(
        first_grant(&mut connect_with(&cfg("twinrun", "twinrun-pw")), "vm0"),
        Ok(Reply::Granted {
            generation: 1,
            lease_ms: LEASE_MS
        })
    );
    let e = first_grant(&mut connect_with(&cfg("twinrun", "wrong")), "vm1").unwrap_err();
    assert!(e.contains("authentication failed"), "{e}");
    let e = first_grant(&mut connect_with(&cfg("other", "other-pw")), "vm1").unwrap_err();
    assert!(e.contains("permission denied"), "{e}");
    // Without credentials etcd refuses too.
    let e = first_grant(
        &mut connect_with(&EtcdConfig {
            prefix: PREFIX.into(),
            ..EtcdConfig::new(&[&etcd.url()])
        }),
        "vm1",
    )
    .unwrap_err();
    assert!(!e.is_empty());
    // A password file that cannot be read is a configuration error at start.
    let mut bad = cfg("twinrun", "twinrun-pw");
    bad.password_file = Some(d.path().join("missing"));
    let e = EtcdConnection::start(&bad, OP_TIMEOUT)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("missing"), "{e}");
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with the
/// openssl command line tool.
fn certificates(dir: &std::path::Path, ca_name: &str) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (Debian package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let key = |name: &str| {
        run(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            name,
        ])
    };
    key(&format!("{ca_name}.key"));
    run(&[
        "req",
        "-x509",
        "-new",
        "-key",
        &format!("{ca_name}.key"),
        "-out",
        &format!("{ca_name}.pem"),
        "-days",
        "2",
        "-subj",
        &format!("/CN={ca_name}"),
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    for (name, eku, san) in [
        ("server", "serverAuth", "subjectAltName=IP:127.0.0.1"),
        ("client", "clientAuth", "subjectAltName=DNS:twinrun-node"),
    ] {
        key(&format!("{name}.key"));
        run(&[
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ]);
        fs::write(
            dir.join(format!("{name}.ext")),
            format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={eku}\n{san}\n"),
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca_name}.pem"),
            "-CAkey",
            &format!("{ca_name}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }
}

#[test]
fn tls_with_client_certificates() {
    let d = tempfile::tempdir().unwrap();
    let p = |f: &str| d.path().join(f);
    certificates(d.path(), "ca");
    let other = d.path().join("other");
    fs::create_dir(&other).unwrap();
    certificates(&other, "other-ca");
    let s = |f: &str| p(f).display().to_string();
    let probe = ConnectOptions::new().with_tls(
        etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(
                fs::read(p("ca.pem")).unwrap(),
            ))
            .identity(etcd_client::Identity::from_pem(
                fs::read(p("client.pem")).unwrap(),
                fs::read(p("client.key")).unwrap(),
            )),
    );
    let etcd = Etcd::start_with(
        "https",
        vec![
            "--cert-file".into(),
            s("server.pem"),
            "--key-file".into(),
            s("server.key"),
            "--client-cert-auth".into(),
            "--trusted-ca-file".into(),
            s("ca.pem"),
        ],
        probe,
    );
    let cfg = |ca: PathBuf, cert: Option<(PathBuf, PathBuf)>| EtcdConfig {
        prefix: PREFIX.into(),
        ca_file: Some(ca),
        cert_file: cert.as_ref().map(|c| c.0.clone()),
        key_file: cert.map(|c| c.1),
        ..EtcdConfig::new(&[&etcd.url()])
    };
    let mine = Some((p("client.pem"), p("client.key")));
    assert_eq!(
        first_grant(&mut connect_with(&cfg(p("ca.pem"), mine.clone())), "vm0"),
        Ok(Reply::Granted {
            generation: 1,
            lease_ms: LEASE_MS
        })
    );
    // Without a client certificate, or trusting another CA: refused, with the reason.
    let e = first_grant(&mut connect_with(&cfg(p("ca.pem"), None)), "vm1").unwrap_err();
    assert!(!e.is_empty());
    let e = first_grant(
        &mut connect_with(&cfg(other.join("other-ca.pem"), mine)),
        "vm1",
    )
    .unwrap_err();
    assert!(!e.is_empty());
    eprintln!("etcd TLS: granted with the client certificate; refused otherwise ({e})");
}
