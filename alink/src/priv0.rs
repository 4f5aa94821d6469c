//! The private network (priv0) as a heartbeat path: a UDP socket between fixed
//! addresses, its thread and the handle (the I/O edge of [`crate::beacon`]).
//!
//! It lives as long as its owner (the pair process), across A-Link sessions: it is the
//! path that still says "the peer is alive" while every A-Link is cut. It carries side
//! messages like the A-Links' heartbeats do (each queued message goes out at once in
//! its own packet; no resend), and nothing else.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use twinrun_lock::lock;

use log::{info, warn};

use crate::beacon::{Beacon, BeaconConfig, MAX_PACKET};
use crate::side::{SideRx, SideTx};

/// Refusals are logged at most this often (a stranger spraying packets must not flood
/// the log); the count is in the status.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(5);
/// The thread looks at its stop flag at least this often.
const MAX_WAIT: Duration = Duration::from_millis(50);

/// Where the path runs: this end's address (bound) and the peer's (the only source
/// accepted, the only destination).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Priv0Addrs {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// The path's state, for logs and status views.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Priv0Status {
    pub alive: bool,
    /// Since the peer last proved alive (None: never).
    pub last_proof_ms: Option<u64>,
    pub refused: u64,
}

struct Inner {
    beacon: Beacon,
    side_tx: SideTx,
    side_rx: SideRx,
}

struct Shared {
    inner: Mutex<Inner>,
    sock: UdpSocket,
    addrs: Priv0Addrs,
    epoch: Instant,
    stop: AtomicBool,
}

impl Shared {
    fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    fn send(&self, p: &[u8]) {
        // A full socket buffer or an unreachable peer is a silent path: the beacon's
        // liveness says so.
        let _ = self.sock.send_to(p, self.addrs.peer);
    }
}

/// The running path; stops its thread when dropped.
pub struct Priv0Path {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Priv0Path {
    /// Binds `addrs.local` and starts the thread.
    pub fn start(addrs: Priv0Addrs, cfg: BeaconConfig) -> std::io::Result<Priv0Path> {
        let sock = UdpSocket::bind(addrs.local)?;
        let instance = random_instance();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                beacon: Beacon::new(cfg, instance),
                side_tx: SideTx::new(1, instance),
                side_rx: SideRx::default(),
            }),
            sock,
            addrs,
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("priv0".into())
            .spawn(move || run(&sh))?;
        info!(
            "priv0: heartbeat path {} -> {} started",
            addrs.local, addrs.peer
        );
        Ok(Priv0Path {
            shared,
            thread: Some(thread),
        })
    }

    /// The peer proved alive on this path recently (see [`crate::beacon`]).
    pub fn alive(&self) -> bool {
        let now = self.shared.now();
        lock(&self.shared.inner).beacon.alive(now)
    }

    pub fn status(&self) -> Priv0Status {
        let now = self.shared.now();
        let i = lock(&self.shared.inner);
        Priv0Status {
            alive: i.beacon.alive(now),
            last_proof_ms: i.beacon.proof_age(now).map(|d| d.as_millis() as u64),
            refused: i.beacon.refused(),
        }
    }

    pub fn addrs(&self) -> Priv0Addrs {
        self.shared.addrs
    }

    /// Sends a side message on this path now (best effort); false if too long.
    pub fn send_side(&self, msg: &[u8]) -> bool {
        let now = self.shared.now();
        let packets = {
            let mut i = lock(&self.shared.inner);
            if !i.side_tx.push(msg) {
                return false;
            }
            let bodies = i.side_tx.take_for(0);
            bodies
                .iter()
                .filter_map(|b| i.beacon.packet(now, Some(b)))
                .collect::<Vec<_>>()
        };
        for p in packets {
            self.shared.send(&p);
        }
        true
    }

    /// The side messages received since the last call, oldest first.
    pub fn recv_side(&self) -> Vec<Vec<u8>> {
        lock(&self.shared.inner).side_rx.drain()
    }
}

impl Drop for Priv0Path {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A random instance number for this process's end (from the kernel; the clock if
/// that fails, still different across restarts).
fn random_instance() -> u64 {
    match crate::handshake::random_nonce() {
        Ok(n) => {
            let mut w = [0u8; 8];
            w.copy_from_slice(&n[..8]);
            u64::from_le_bytes(w)
        }
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

fn run(sh: &Shared) {
    let mut buf = vec![0u8; MAX_PACKET + 1];
    let mut last_refusal_log: Option<Instant> = None;
    let mut refused_unlogged = 0u64;
    while !sh.stop.load(Ordering::SeqCst) {
        let now = sh.now();
        let (packet, wait) = {
            let mut i = lock(&sh.inner);
            let p = if i.beacon.due(now) {
                i.beacon.packet(now, None)
            } else {
                None
            };
            (p, i.beacon.next_deadline(now))
        };
        if let Some(p) = packet {
            sh.send(&p);
        }
        let wait = wait.clamp(Duration::from_millis(1), MAX_WAIT);
        // The timeout is never zero (clamped): set_read_timeout accepts it.
        let _ = sh.sock.set_read_timeout(Some(wait));
        let (n, from) = match sh.sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => {
                // E.g. ECONNREFUSED from an ICMP error of an earlier send: transient.
                log::debug!("priv0: receive: {e}");
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
        };
        let why = if from != sh.addrs.peer {
            Some(format!("a packet from {from}, not the peer"))
        } else {
            let now = sh.now();
            let mut i = lock(&sh.inner);
            match i.beacon.on_packet(now, &buf[..n]) {
                Ok(a) => {
                    if let Some(b) = a.body {
                        if let Err(e) = i.side_rx.on_body(&b) {
                            Some(format!("a side message: {e}"))
                        } else {
                            None
                        }
                    } else {
                        None
                    }
                }
                Err(e) => Some(e.to_string()),
            }
        };
        if let Some(why) = why {
            refused_unlogged += 1;
            if last_refusal_log.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
                warn!(
                    "priv0: refused {refused_unlogged} packet(s) on {}; last: {why}",
                    sh.addrs.local
                );
                last_refusal_log = Some(Instant::now());
                refused_unlogged = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::HealthConfig;

    fn cfg(me: u64, peer: u64, secret: &[u8]) -> BeaconConfig {
        BeaconConfig {
            cluster_id: 9,
            me,
            peer,
            secret: secret.to_vec(),
            health: HealthConfig {
                interval: Duration::from_millis(20),
                misses: 4,
            },
        }
    }

    fn free_addr() -> SocketAddr {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < Duration::from_secs(20), "never: {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn two_ends_see_each_other_carry_side_messages_and_notice_silence() {
        let (x, y) = (free_addr(), free_addr());
        let secret = b"priv0-test-secret-0123456789";
        let a = Priv0Path::start(Priv0Addrs { local: x, peer: y }, cfg(1, 2, secret)).unwrap();
        let b = Priv0Path::start(Priv0Addrs { local: y, peer: x }, cfg(2, 1, secret)).unwrap();
        wait_for("both alive", || a.alive() && b.alive());
        assert!(a.send_side(b"hello"));
        let mut got = Vec::new();
        wait_for("the side message", || {
            let mut m = b.recv_side();
            let any = !m.is_empty();
            got.append(&mut m);
            any
        });
        assert_eq!(got, vec![b"hello".to_vec()]);
        drop(b);
        wait_for("silent after the peer stopped", || !a.alive());
        let st = a.status();
        assert!(!st.alive && st.last_proof_ms.is_some());
    }

    #[test]
    fn a_peer_with_the_wrong_secret_is_never_alive() {
        let (x, y) = (free_addr(), free_addr());
        let a = Priv0Path::start(
            Priv0Addrs { local: x, peer: y },
            cfg(1, 2, b"priv0-test-secret-0123456789"),
        )
        .unwrap();
        let b = Priv0Path::start(
            Priv0Addrs { local: y, peer: x },
            cfg(2, 1, b"another-secret-9876543210xx"),
        )
        .unwrap();
        wait_for("refusals counted", || a.status().refused >= 5);
        assert!(!a.alive() && !b.alive());
    }
}
