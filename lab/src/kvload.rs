//! A kv load client in a namespace: `SET k<i> v<i>` and `INCR` on ONE connection to
//! the guest's kv server until stopped, remembering every acknowledged write, then
//! reading everything back over the same connection. What a client of a protected VM
//! sees across a failover: the demo's client and the FT tests'.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use twinrun_lock::lock;

use crate::netns::{in_netns, NsThread};
use crate::resp::{Reply, Resp};
use crate::LabError;

/// How the client runs.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// The namespace the client runs in, and the kv server's address.
    pub ns: String,
    pub addr: SocketAddr,
    /// The counter's key.
    pub counter_key: String,
    /// Every `incr_every`-th request is an `INCR` of the counter (at least 2).
    pub incr_every: u64,
    /// Reconnect when the connection breaks (and count it); otherwise the load ends
    /// with an error at the first broken connection or unexpected reply.
    pub reconnect: bool,
    /// How long to keep trying the first connection (the guest may still be coming
    /// up), each attempt bounded by `connect_timeout`.
    pub connect_for: Duration,
    pub connect_timeout: Duration,
    /// The longest wait for one reply.
    pub read_timeout: Duration,
}

impl LoadConfig {
    pub fn new(ns: &str, addr: SocketAddr) -> LoadConfig {
        LoadConfig {
            ns: ns.to_string(),
            addr,
            counter_key: "ctr".into(),
            incr_every: 2,
            reconnect: false,
            connect_for: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(15),
            read_timeout: Duration::from_secs(15),
        }
    }
}

/// What the client saw.
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Keys (their numbers) whose SET was acknowledged, in order.
    pub sets_acked: Vec<u64>,
    /// INCRs acknowledged; one sent when the connection broke may or may not have
    /// been applied (`incr_uncertain`).
    pub incrs_acked: i64,
    pub incr_uncertain: bool,
    /// The counter read back at the end.
    pub counter_final: Option<i64>,
    /// Acknowledged keys not read back with their value.
    pub lost: Vec<u64>,
    /// Longest wait for one reply, and when (since the client started).
    pub max_reply: Duration,
    pub max_reply_at: Duration,
    pub reconnects: u32,
    /// What went wrong, in order (empty: nothing).
    pub errors: Vec<String>,
    pub local_addr: Option<SocketAddr>,
}

impl LoadReport {
    /// The one connection carried the whole run.
    pub fn connection_survived(&self) -> bool {
        self.reconnects == 0 && self.local_addr.is_some()
    }

    /// The counter read back matches the acknowledged INCRs (allowing the one whose
    /// fate a broken connection left unknown).
    pub fn incr_ok(&self) -> bool {
        match self.counter_final {
            Some(v) if self.incr_uncertain => v == self.incrs_acked || v == self.incrs_acked + 1,
            Some(v) => v == self.incrs_acked,
            None => false,
        }
    }
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    acks: AtomicU64,
    window_max_ms: AtomicU64,
    /// When the window's longest reply wait began (wall clock: to set beside the
    /// VMMs' logs).
    window_max_at: Mutex<Option<SystemTime>>,
    mark: Mutex<Option<Instant>>,
    first_reply_after_mark: Mutex<Option<Instant>>,
}

/// The running client.
pub struct LoadClient {
    shared: Arc<Shared>,
    handle: Option<NsThread<LoadReport>>,
    pub started: Instant,
}

impl LoadClient {
    pub fn start(cfg: LoadConfig) -> Result<LoadClient, LabError> {
        let shared = Arc::new(Shared::default());
        let started = Instant::now();
        let s = shared.clone();
        let ns = cfg.ns.clone();
        let handle = in_netns(&ns, move || run(&cfg, &s, started))?;
        Ok(LoadClient {
            shared,
            handle: Some(handle),
            started,
        })
    }

    /// Writes acknowledged so far (SETs and INCRs).
    pub fn acks(&self) -> u64 {
        self.shared.acks.load(Ordering::SeqCst)
    }

    /// Waits until `n` more writes are acknowledged; an error after `timeout` or when
    /// the client ended.
    pub fn wait_acks(&self, n: u64, timeout: Duration) -> Result<Duration, String> {
        let t0 = Instant::now();
        let from = self.acks();
        while self.acks() < from + n {
            if t0.elapsed() > timeout || self.is_finished() {
                return Err(format!(
                    "client: {} of {n} acks within {timeout:?}",
                    self.acks() - from
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(t0.elapsed())
    }

    /// The longest reply wait during `d` from now.
    pub fn max_reply_during(&self, d: Duration) -> Duration {
        self.max_reply_during_at(d).0
    }

    /// [`LoadClient::max_reply_during`], and when (wall clock) that request was sent:
    /// the stall's place in the VMMs' logs.
    pub fn max_reply_during_at(&self, d: Duration) -> (Duration, Option<SystemTime>) {
        *lock(&self.shared.window_max_at) = None;
        self.shared.window_max_ms.store(0, Ordering::SeqCst);
        std::thread::sleep(d);
        let max = Duration::from_millis(self.shared.window_max_ms.load(Ordering::SeqCst));
        (max, *lock(&self.shared.window_max_at))
    }

    /// From now on, remember when the first reply to a request sent after this moment
    /// completes (e.g. once the primary is killed: a reply it released just before
    /// says nothing about the failover).
    pub fn mark(&self) {
        *lock(&self.shared.mark) = Some(Instant::now());
    }

    /// The first reply completed to a request sent after [`LoadClient::mark`].
    pub fn first_reply_after_mark(&self) -> Option<Instant> {
        *lock(&self.shared.first_reply_after_mark)
    }

    /// The client ended (by itself: an error).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(NsThread::is_finished)
    }

    /// Stops the load, reads everything back, and returns what the client saw.
    pub fn finish(mut self) -> Result<LoadReport, LabError> {
        self.shared.stop.store(true, Ordering::SeqCst);
        match self.handle.take() {
            Some(h) => h.join(),
            None => Err(LabError::Invalid("the client was already finished".into())),
        }
    }
}

impl Drop for LoadClient {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }
}

fn connect(cfg: &LoadConfig, for_: Duration) -> std::io::Result<Resp> {
    Resp::connect_retry(cfg.addr, cfg.connect_timeout, cfg.read_timeout, for_)
}

fn run(cfg: &LoadConfig, sh: &Shared, started: Instant) -> LoadReport {
    let mut rep = LoadReport::default();
    let mut c = match connect(cfg, cfg.connect_for) {
        Ok(c) => c,
        Err(e) => {
            rep.errors.push(format!("connect to {}: {e}", cfg.addr));
            return rep;
        }
    };
    rep.local_addr = c.local_addr().ok();
    let ctr = cfg.counter_key.as_str();
    let mut i = 0u64;
    while !sh.stop.load(Ordering::SeqCst) {
        i += 1;
        let incr = i.is_multiple_of(cfg.incr_every.max(2));
        let (k, v) = (format!("k{i}"), format!("v{i}"));
        let t = Instant::now();
        let sent_at = SystemTime::now();
        let r = if incr {
            c.call(&["INCR", ctr])
        } else {
            c.call(&["SET", &k, &v])
        };
        let done = Instant::now();
        let d = done - t;
        if d > rep.max_reply {
            rep.max_reply = d;
            rep.max_reply_at = t - started;
        }
        let ms = d.as_millis() as u64;
        if sh.window_max_ms.fetch_max(ms, Ordering::SeqCst) < ms {
            *lock(&sh.window_max_at) = Some(sent_at);
        }
        if r.is_ok() && lock(&sh.mark).is_some_and(|m| t >= m) {
            lock(&sh.first_reply_after_mark).get_or_insert(done);
        }
        let expected = rep.incrs_acked + 1;
        match r {
            Ok(Reply::Simple(s)) if !incr && s == "OK" => rep.sets_acked.push(i),
            Ok(Reply::Int(n))
                if incr && (n == expected || rep.incr_uncertain && n == expected + 1) =>
            {
                rep.incrs_acked = n;
                rep.incr_uncertain = false;
            }
            Ok(other) => {
                rep.errors.push(format!(
                    "request {i} ({}): unexpected reply {other:?} ({} INCRs acknowledged)",
                    if incr { "INCR" } else { "SET" },
                    rep.incrs_acked
                ));
                if !cfg.reconnect {
                    return rep;
                }
                continue;
            }
            Err(e) => {
                rep.errors.push(format!("request {i}: {e}"));
                if !cfg.reconnect {
                    return rep;
                }
                // The connection broke: the request's fate is unknown.
                rep.reconnects += 1;
                rep.incr_uncertain |= incr;
                match connect(cfg, cfg.connect_for) {
                    Ok(n) => c = n,
                    Err(e) => {
                        rep.errors.push(format!("reconnect: {e}"));
                        return rep;
                    }
                }
                continue;
            }
        }
        sh.acks.fetch_add(1, Ordering::SeqCst);
    }
    read_back(cfg, &mut c, &mut rep);
    rep
}

/// Every acknowledged key and the counter, read back (on the same connection while it
/// holds).
fn read_back(cfg: &LoadConfig, c: &mut Resp, rep: &mut LoadReport) {
    for &i in &rep.sets_acked.clone() {
        let k = format!("k{i}");
        match c.call(&["GET", &k]) {
            Ok(Reply::Bulk(Some(v))) if v == format!("v{i}").as_bytes() => {}
            Ok(other) => {
                rep.lost.push(i);
                if rep.errors.len() < 20 {
                    rep.errors.push(format!("{k}: read back {other:?}"));
                }
            }
            Err(e) => {
                rep.errors.push(format!("GET {k} after the load: {e}"));
                if !cfg.reconnect {
                    return;
                }
                rep.lost.push(i);
                rep.reconnects += 1;
                match connect(cfg, cfg.connect_for) {
                    Ok(n) => *c = n,
                    Err(_) => return,
                }
            }
        }
    }
    match c.call(&["GET", &cfg.counter_key]) {
        Ok(Reply::Bulk(Some(v))) => {
            rep.counter_final = String::from_utf8_lossy(&v).parse().ok();
        }
        Ok(Reply::Bulk(None)) => rep.counter_final = Some(0),
        other => rep
            .errors
            .push(format!("GET {} after the load: {other:?}", cfg.counter_key)),
    }
}
