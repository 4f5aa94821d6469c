//! `twinrun witness` as a real process on loopback, with real UDP clients: grants and
//! leases, wrong secret, unknown cluster, replay, malformed datagrams, many clusters and
//! VMs, and a restart that keeps every generation.

use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use quorum::witness::ops::{Reply, Request};
use quorum::witness::wire::{
    decode, encode, ClientError, ClientEvent, ClientWire, Packet, Refusal,
};
use quorum::NodeId;
use twinrun_lab::Proc;

const SECRET: &[u8] = b"witness-test-secret-0123";
/// How long a test waits for the witness before it calls it hung (not a latency the
/// witness promises: it fsyncs before answering, and the test machines are loaded).
const ANSWER_WITHIN: Duration = Duration::from_secs(60);

/// A witness process, killed (and reaped) on drop.
struct Witness {
    proc: Proc,
    addr: SocketAddr,
    dir: PathBuf,
}

impl Witness {
    fn start(dir: &Path, clusters: &[&str]) -> Witness {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_twinrun"));
        cmd.args(["witness", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.join("state"));
        for c in clusters {
            let s = dir.join(format!("{c}.secret"));
            fs::write(&s, SECRET).unwrap();
            cmd.arg("--cluster").arg(format!("{c}={}", s.display()));
        }
        let _ = fs::remove_file(dir.join("state/status.json"));
        cmd.stdout(Stdio::null()).stderr(Stdio::inherit());
        let proc = Proc::spawn("witness", &mut cmd).unwrap();
        // The listen address (port 0 was bound) comes from its status file.
        let t = Instant::now();
        let addr = loop {
            if let Ok(b) = fs::read(dir.join("state/status.json")) {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) {
                    if let Some(a) = v["listen"].as_str().and_then(|s| s.parse().ok()) {
                        break a;
                    }
                }
            }
            assert!(t.elapsed() < ANSWER_WITHIN, "the witness did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        Witness {
            proc,
            addr,
            dir: dir.to_path_buf(),
        }
    }

    fn stop(&mut self) -> i32 {
        self.proc.signal(nix::sys::signal::Signal::SIGTERM).unwrap();
        let st = self.proc.wait_timeout(Duration::from_secs(60));
        st.expect("the witness stops on SIGTERM")
            .code()
            .unwrap_or(-1)
    }

    fn status(&self) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_twinrun"))
            .args(["witness", "status", "--json", "--state-dir"])
            .arg(self.dir.join("state"))
            .output()
            .unwrap();
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The status as the witness wrote it after answering at least `requests`
    /// requests. The witness rewrites its status file once a second when its loop
    /// gets there: a fixed sleep can read the one before the last answers.
    fn status_after(&self, requests: u64) -> serde_json::Value {
        let t = Instant::now();
        loop {
            let st = self.status();
            if st["counters"]["requests"].as_u64().unwrap() >= requests {
                return st;
            }
            assert!(
                t.elapsed() < ANSWER_WITHIN,
                "no status after {requests} requests: {st}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A synchronous client: one socket, one session.
struct Client {
    sock: UdpSocket,
    wire: ClientWire,
    to: SocketAddr,
}

impl Client {
    fn new(to: SocketAddr, cluster: &str, node: u64, secret: &[u8]) -> Client {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Client {
            sock,
            wire: ClientWire::new(cluster, NodeId(node), secret),
            to,
        }
    }

    /// The next datagram, waited for until [`ANSWER_WITHIN`] (one that must come).
    fn recv_within(&self) -> Vec<u8> {
        let t = Instant::now();
        while t.elapsed() < ANSWER_WITHIN {
            if let Some(b) = self.recv() {
                return b;
            }
        }
        panic!("no datagram from the witness in {ANSWER_WITHIN:?}");
    }

    fn recv(&self) -> Option<Vec<u8>> {
        let mut b = [0u8; 2048];
        self.sock
            .recv_from(&mut b)
            .ok()
            .map(|(n, _)| b[..n].to_vec())
    }

    /// The handshake; the error the client saw if it failed. A hello is resent every
    /// read timeout (a handshake changes no state, and the wire ignores the answers to
    /// an earlier hello), until [`ANSWER_WITHIN`].
    fn connect(&mut self) -> Result<(), ClientError> {
        let t = Instant::now();
        while t.elapsed() < ANSWER_WITHIN {
            let h = self
                .wire
                .hello(quorum::witness::wire::random_nonce().unwrap());
            self.sock.send_to(&h, self.to).unwrap();
            while let Some(b) = self.recv() {
                match self.wire.on_datagram(&b)? {
                    ClientEvent::Send(a) => {
                        self.sock.send_to(&a, self.to).unwrap();
                    }
                    ClientEvent::Ready => return Ok(()),
                    _ => {}
                }
            }
        }
        panic!("no handshake with the witness in {ANSWER_WITHIN:?}");
    }

    /// Sends `op` once and waits for its answer. Never resent: a resent request is a
    /// new request (a new sequence number; the witness drops a repeated one as a
    /// replay), and an Acquire is not idempotent: a second Acquire from 0 is answered
    /// `Lost` by the grant of the first. Loopback loses no datagram; the witness
    /// answers only once the record is fsynced, which on a loaded disk can take far
    /// longer than one read timeout.
    fn call(&mut self, op: &Request) -> Reply {
        let (seq, b) = self.wire.request(op).unwrap();
        self.sock.send_to(&b, self.to).unwrap();
        let t = Instant::now();
        while t.elapsed() < ANSWER_WITHIN {
            if let Some(b) = self.recv() {
                if let Ok(ClientEvent::Reply { seq: s, reply }) = self.wire.on_datagram(&b) {
                    if s == seq {
                        return reply;
                    }
                }
            }
        }
        panic!("no answer to {op:?} in {ANSWER_WITHIN:?}");
    }
}

fn acquire(vm: &str, node: u64, from: u64) -> Request {
    acquire_for(vm, node, from, SHORT_LEASE_MS)
}

fn acquire_for(vm: &str, node: u64, from: u64, lease_ms: u32) -> Request {
    Request::Acquire {
        vm: vm.into(),
        node: NodeId(node),
        from,
        lease_ms,
    }
}

fn renew(vm: &str, node: u64, generation: u64, lease_ms: u32) -> Request {
    Request::Renew {
        vm: vm.into(),
        node: NodeId(node),
        generation,
        lease_ms,
        peer_outdated: false,
    }
}

/// A lease meant to lapse while the test waits ([`LAPSED_AFTER`]).
const SHORT_LEASE_MS: u32 = 200;
/// Longer than a short lease, so a wait of this long lets it lapse whatever the load
/// (a lease only ever lapses more the later the next request comes).
const LAPSED_AFTER: Duration = Duration::from_millis(260);
/// A lease meant to still run when the test's next request arrives: the test asserts
/// `Busy` under it. A loaded machine can stall the test or the witness for longer than
/// a short lease (startup, handshake, fsync, scheduling); not for this long (the same
/// order as [`ANSWER_WITHIN`], after which the test calls the witness hung).
const LONG_LEASE_MS: u32 = 30_000;
/// A stall made on purpose where the test asserts `Busy`: longer than a short lease,
/// so the case shows it holds whatever the scheduling.
const STALL: Duration = Duration::from_millis(400);

#[test]
fn grants_leases_and_restart_keep_generations() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let d = tempfile::tempdir().unwrap();
    let mut w = Witness::start(d.path(), &["plant-a"]);
    let mut a = Client::new(w.addr, "plant-a", 1, SECRET);
    let mut b = Client::new(w.addr, "plant-a", 2, SECRET);
    a.connect().unwrap();
    b.connect().unwrap();
    // vm0 is about the running leases (long ones: `Busy` is asserted under them);
    // vm1 about leases that lapse (short ones: the test waits them out).
    assert_eq!(
        a.call(&acquire_for("vm0", 1, 0, LONG_LEASE_MS)),
        Reply::Granted {
            generation: 1,
            lease_ms: LONG_LEASE_MS
        }
    );
    assert_eq!(
        a.call(&acquire("vm1", 1, 0)),
        Reply::Granted {
            generation: 1,
            lease_ms: SHORT_LEASE_MS
        }
    );
    assert_eq!(
        a.call(&renew("vm0", 1, 1, LONG_LEASE_MS)),
        Reply::Granted {
            generation: 1,
            lease_ms: LONG_LEASE_MS
        }
    );
    // The standby cannot take over while the holder's lease runs, even after a gap
    // longer than a short lease...
    std::thread::sleep(STALL);
    assert!(matches!(
        b.call(&acquire("vm0", 2, 1)),
        Reply::Busy {
            generation: 1,
            holder: Some(NodeId(1)),
            ..
        }
    ));
    // ...and gets generation 2 once it lapsed (the holder renews for a short lease,
    // then stops renewing).
    assert_eq!(
        a.call(&renew("vm0", 1, 1, SHORT_LEASE_MS)),
        Reply::Granted {
            generation: 1,
            lease_ms: SHORT_LEASE_MS
        }
    );
    std::thread::sleep(LAPSED_AFTER);
    assert_eq!(
        b.call(&acquire_for("vm0", 2, 1, LONG_LEASE_MS)),
        Reply::Granted {
            generation: 2,
            lease_ms: LONG_LEASE_MS
        }
    );
    assert_eq!(
        b.call(&acquire("vm1", 2, 1)),
        Reply::Granted {
            generation: 2,
            lease_ms: SHORT_LEASE_MS
        }
    );
    assert!(matches!(
        a.call(&renew("vm0", 1, 1, SHORT_LEASE_MS)),
        Reply::Lost {
            generation: 2,
            holder: Some(NodeId(2))
        }
    ));
    assert_eq!(w.stop(), 0, "SIGTERM stops the witness cleanly");

    // A restarted witness knows generation 2, and waits a full lease (the one last
    // granted for that VM) before granting.
    let w = Witness::start(d.path(), &["plant-a"]);
    // Its clock runs while it is stopped: a stall longer than a short lease between
    // its start and the next requests (made here on purpose) changes nothing for vm0.
    let pid = Pid::from_raw(i32::try_from(w.proc.pid().unwrap()).unwrap());
    kill(pid, Signal::SIGSTOP).unwrap();
    std::thread::sleep(STALL);
    kill(pid, Signal::SIGCONT).unwrap();
    let mut a = Client::new(w.addr, "plant-a", 1, SECRET);
    a.connect().unwrap();
    assert!(matches!(
        a.call(&acquire("vm0", 1, 1)),
        Reply::Lost { generation: 2, .. }
    ));
    assert!(matches!(
        a.call(&acquire("vm0", 1, 2)),
        Reply::Busy {
            generation: 2,
            holder: Some(NodeId(2)),
            ..
        }
    ));
    let st = w.status();
    for vm in 0..2 {
        assert_eq!(st["vms"][vm]["vm"], format!("vm{vm}"), "{st}");
        assert_eq!(st["vms"][vm]["generation"], 2, "{st}");
        assert_eq!(st["vms"][vm]["holder"], 2, "{st}");
        assert_eq!(st["vms"][vm]["peer_outdated"], true, "{st}");
    }
    // vm1's grace (a short lease from the restart, which was before the witness
    // wrote its status) has lapsed by now: the old primary's replica is stale, it
    // may not take over from 2.
    std::thread::sleep(LAPSED_AFTER);
    assert_eq!(
        a.call(&acquire("vm1", 1, 2)),
        Reply::Outdated { generation: 2 }
    );
    // vm0's grace is its own long lease: it still runs.
    assert!(matches!(
        a.call(&acquire("vm0", 1, 2)),
        Reply::Busy {
            generation: 2,
            holder: Some(NodeId(2)),
            ..
        }
    ));
}

/// The witness answers an Acquire only once its record is fsynced: on a loaded disk
/// that can take longer than the client's read timeout. The answer is waited for, not
/// asked for again (a second Acquire from 0 would be answered `Lost` by the first's
/// grant: what `many_clusters_and_vms` once saw under load). The stall is made here
/// by stopping the witness for longer than a read timeout.
#[test]
fn a_late_answer_is_waited_for() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let d = tempfile::tempdir().unwrap();
    let w = Witness::start(d.path(), &["plant-a"]);
    let mut a = Client::new(w.addr, "plant-a", 1, SECRET);
    a.connect().unwrap();
    let pid = Pid::from_raw(i32::try_from(w.proc.pid().unwrap()).unwrap());
    kill(pid, Signal::SIGSTOP).unwrap();
    // Resumed whatever happens here (and killed by the drop of `w` in any case).
    let resume = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1000));
        kill(pid, Signal::SIGCONT)
    });
    let reply = a.call(&acquire("vm0", 1, 0));
    resume.join().unwrap().unwrap();
    assert_eq!(
        reply,
        Reply::Granted {
            generation: 1,
            lease_ms: 200
        }
    );
    // One request reached the witness, and it holds the one grant.
    let st = w.status_after(1);
    assert_eq!(st["counters"]["requests"], 1, "{st}");
    assert_eq!(st["vms"][0]["generation"], 1, "{st}");
}

#[test]
fn wrong_secret_unknown_cluster_replay_and_garbage_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let w = Witness::start(d.path(), &["plant-a"]);
    // Wrong secret: the witness's proof does not verify at the client...
    let mut bad = Client::new(w.addr, "plant-a", 1, b"not-the-secret-at-all");
    assert_eq!(bad.connect(), Err(ClientError::WitnessNotAuthentic));
    // ...and a guessed auth is refused by the witness.
    let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Each datagram sent here is answered: the timeout only says the witness hung.
    raw.set_read_timeout(Some(ANSWER_WITHIN)).unwrap();
    let hello = encode(&Packet::Hello {
        version: quorum::witness::wire::WIRE_VERSION,
        cluster: "plant-a".into(),
        node: NodeId(1),
        nonce: [9; 32],
    })
    .unwrap();
    raw.send_to(&hello, w.addr).unwrap();
    let mut buf = [0u8; 2048];
    let n = raw.recv(&mut buf).unwrap();
    let Packet::Challenge { witness_nonce, .. } = decode(&buf[..n]).unwrap() else {
        panic!()
    };
    raw.send_to(
        &encode(&Packet::Auth {
            witness_nonce,
            mac: [0; 32],
        })
        .unwrap(),
        w.addr,
    )
    .unwrap();
    let n = raw.recv(&mut buf).unwrap();
    assert!(matches!(
        decode(&buf[..n]).unwrap(),
        Packet::Error {
            refusal: Refusal::WrongSecret,
            ..
        }
    ));

    // Unknown cluster.
    let mut other = Client::new(w.addr, "plant-z", 1, SECRET);
    assert_eq!(
        other.connect(),
        Err(ClientError::Refused(Refusal::UnknownCluster(
            "plant-z".into()
        )))
    );

    // Replay: the same authenticated request a second time gets no answer.
    let mut a = Client::new(w.addr, "plant-a", 1, SECRET);
    a.connect().unwrap();
    let query = Request::Query { vm: "vm0".into() };
    let (seq, req) = a.wire.request(&query).unwrap();
    a.sock.send_to(&req, w.addr).unwrap();
    assert!(matches!(
        a.wire.on_datagram(&a.recv_within()),
        Ok(ClientEvent::Reply { seq: s, reply: Reply::State { .. } }) if s == seq
    ));
    a.sock.send_to(&req, w.addr).unwrap();
    // The witness serves one datagram after the other, and loopback keeps their
    // order: an answer to the replay would come before the answer to a request sent
    // after it. (Not a quiet spell of some length: that holds only on an idle machine.)
    let (next, fresh) = a.wire.request(&query).unwrap();
    a.sock.send_to(&fresh, w.addr).unwrap();
    let first = a.recv_within();
    assert!(
        matches!(
            a.wire.on_datagram(&first),
            Ok(ClientEvent::Reply { seq: s, reply: Reply::State { .. } }) if s == next
        ),
        "a replayed request is not answered: {:?}",
        decode(&first)
    );

    // Garbage and oversized datagrams: a clear refusal, and the witness serves on.
    for junk in [
        vec![0xffu8; 16],
        vec![0u8; 1500],
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    ] {
        raw.send_to(&junk, w.addr).unwrap();
        let n = raw.recv(&mut buf).unwrap();
        assert!(matches!(
            decode(&buf[..n]).unwrap(),
            Packet::Error {
                refusal: Refusal::Malformed(_),
                ..
            }
        ));
    }
    assert!(matches!(
        a.call(&Request::Query { vm: "vm0".into() }),
        Reply::State { .. }
    ));
    // The refusals are counted in the status (written after the three answered
    // queries).
    let st = w.status_after(3);
    let c = &st["counters"];
    assert!(c["wrong_secret"].as_u64().unwrap() >= 1, "{st}");
    assert!(c["unknown_cluster"].as_u64().unwrap() >= 1, "{st}");
    assert!(c["replays"].as_u64().unwrap() >= 1, "{st}");
    assert!(c["malformed"].as_u64().unwrap() >= 3, "{st}");
}

#[test]
fn many_clusters_and_vms() {
    let d = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let w = Witness::start(d.path(), &refs);
    for c in &names {
        let mut cl = Client::new(w.addr, c, 1, SECRET);
        cl.connect().unwrap();
        for v in 0..40 {
            let vm = format!("vm{v}");
            assert!(matches!(
                cl.call(&acquire(&vm, 1, 0)),
                Reply::Granted { generation: 1, .. }
            ));
        }
        // Names are checked.
        assert!(matches!(
            cl.call(&acquire("../etc", 1, 0)),
            Reply::Refused(_)
        ));
    }
    // 40 acquires and one refused name per cluster.
    let st = w.status_after(6 * 41);
    assert_eq!(st["vms"].as_array().unwrap().len(), 240);
    assert_eq!(st["clusters"].as_array().unwrap().len(), 6);
    // Every grant is on disk.
    let files: usize = names
        .iter()
        .map(|c| {
            fs::read_dir(d.path().join("state").join(c))
                .unwrap()
                .count()
        })
        .sum();
    assert_eq!(files, 240);
}

#[test]
fn bad_configuration_exits_with_2() {
    let d = tempfile::tempdir().unwrap();
    let short = d.path().join("short");
    fs::write(&short, "abc").unwrap();
    for args in [
        vec![
            "witness".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
        ],
        vec![
            "witness".into(),
            "--state-dir".into(),
            d.path().display().to_string(),
            "--cluster".into(),
            format!("c={}", short.display()),
        ],
        vec![
            "witness".into(),
            "--state-dir".into(),
            d.path().display().to_string(),
            "--cluster".into(),
            "bad/name=x".into(),
        ],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_twinrun"))
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
