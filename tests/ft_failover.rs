//! FT mode at the process level: two `twinrun vm run --role primary|standby` processes in
//! their own network namespaces (two A-Links, a TAP each on a shared LAN, a client
//! namespace: `twinrun_lab::Topology`), the test guest running kv + counter + dirty +
//! disk, a RESP client holding ONE TCP connection to the guest. The pair's state
//! (listening, protected, failed over, links) comes from both ends' control sockets.
//!
//! - `sigkill_primary_at_random_moments`: FT_RUNS runs (default 20, FT_SOAK=1: 200), the
//!   primary SIGKILLed at a seeded random moment (FT_SEED replays); checked: the console
//!   stream seen outside (one positioned file both PMs write) has no hole, gap, duplicate
//!   or reordering of `C` lines and exactly one BOOT, no DIRTY-ERROR; every acknowledged
//!   kv write is read back over the same connection; every `W` record is intact on the
//!   standby's image.
//! - `one_alink_cut_and_restored_then_failover`: a link cut during load causes no
//!   failover and no stall beyond a bound; restored, it carries checkpoint traffic again;
//!   then a clean failover.
//! - `bad_input_on_the_alink_port_is_refused_while_protected`: garbage, a wrong-secret
//!   handshake and a replayed hello on the standby's A-Link listen port are refused and
//!   logged; protection continues; then a clean failover.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::pair::{failed_over, start_protected, PairFiles, Pm};
use common::{require_kvm, topology};
use twinrun_lab::console::{check_disk_records, count_c, read as read_console};
use twinrun_lab::kvload::{LoadClient, LoadConfig};
use twinrun_lab::netns::in_netns;
use twinrun_lab::tap::{capture, is_rarp_from, parse_mac, tcp_payload_to};
use twinrun_lab::topology::{ALINK_PORT, KV_PORT};
use twinrun_lab::verdict::{check_load, Expect};
use twinrun_lab::{Rng, Topology};

const CLUSTER: &str = "ft-test";

/// A running pair. Fields drop in order: processes, then the namespaces, then the files.
struct Pair {
    primary: Pm,
    standby: Pm,
    topo: Topology,
    files: PairFiles,
    _dir: tempfile::TempDir,
}

impl Pair {
    /// Standby first, then the primary; returns once the primary reports protection.
    fn start() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let topo = topology(Topology::builder());
        let files = PairFiles::new(dir.path());
        let extra = ["--cluster-id", CLUSTER, "--epoch-ms", "10"];
        let (primary, standby) = start_protected(&topo, &files, &extra, &extra);
        Pair {
            primary,
            standby,
            topo,
            files,
            _dir: dir,
        }
    }

    fn logs(&self) -> String {
        format!(
            "--- primary stderr:\n{}\n--- standby stderr:\n{}",
            self.primary.tail(40),
            self.standby.tail(40)
        )
    }

    /// A protected pair and a load client on ONE connection to the guest (from the
    /// client namespace) that had `acks` writes acknowledged.
    fn loaded(acks: u64) -> (Pair, LoadClient) {
        let pair = Pair::start();
        let addr = SocketAddr::from((pair.topo.guest_ip(), KV_PORT));
        let client = LoadClient::start(LoadConfig::new(pair.topo.client_ns(), addr)).unwrap();
        client
            .wait_acks(acks, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}\n{}", pair.logs()));
        (pair, client)
    }

    /// SIGKILLs the primary with the client under load, waits for the standby's
    /// failover and for the client and the guest to progress, then runs every check.
    fn kill_and_check(mut self, client: LoadClient, tag: &str) -> RunStats {
        let console_at_kill = read_console(&self.files.console);
        let c_at_kill = count_c(&console_at_kill);
        let acks_at_kill = client.acks();
        // Watch for the MAC announcement (RARP) the standby sends on failover: where its
        // VMM writes it (its TAP) and where the LAN must see it (the LAN-side port of the
        // standby's uplink).
        let mac = parse_mac(&self.topo.guest_mac()).unwrap();
        let watch = |ns: &str, dev: &str| {
            capture(ns, dev, Duration::from_secs(3), move |eth| {
                is_rarp_from(eth, mac).then(Instant::now)
            })
            .unwrap()
        };
        let on_lan = watch(self.topo.switch_ns(), &self.topo.pms[1].lan_port);
        let on_tap = watch(self.topo.pm_ns(1), self.topo.tap(1));
        let t_kill = Instant::now();
        self.primary.kill();
        let failover = self
            .standby
            .wait_status("failed over", Duration::from_secs(10), failed_over)
            .unwrap_or_else(|e| panic!("{tag}: {e}"));
        // The client continues on the same connection; the guest keeps counting.
        let resumed = client
            .wait_acks(40, Duration::from_secs(15))
            .map(|_| t_kill.elapsed())
            .unwrap_or_else(|e| panic!("{tag}: after the kill: {e}\n{}", self.logs()));
        let announced = Announce {
            tap: on_tap.join().unwrap().map(|t| t - t_kill),
            lan: on_lan.join().unwrap().map(|t| t - t_kill),
        };
        if std::env::var_os("FT_REQUIRE_ANNOUNCE").is_some() {
            assert!(
                announced.lan.is_some(),
                "{tag}: no RARP announce of the guest's MAC reached the LAN ({announced:?})\n{}",
                self.logs()
            );
        }
        let t0 = Instant::now();
        while count_c(&read_console(&self.files.console)) <= c_at_kill + 20 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{tag}: the guest's counter made no progress after the failover\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let rep = client.finish().unwrap();
        // Stop the standby before reading its console and disk (final contents).
        let standby_log = self.standby.tail(30);
        self.standby.kill();
        let logs = format!(
            "--- primary stderr:\n{}\n--- standby stderr:\n{standby_log}",
            self.primary.tail(30),
        );
        let console = read_console(&self.files.console);
        let expect = Expect {
            one_connection: false,
            ..Expect::MOVED
        };
        let cc = check_load(&rep, &console, expect)
            .unwrap_or_else(|e| panic!("{tag}: after the failover: {e}\n{logs}"));
        assert!(
            cc.c_lines > c_at_kill,
            "{tag}: no C line after the failover"
        );
        let img = std::fs::read(&self.files.disks[1]).unwrap();
        check_disk_records(&img, &cc.w_seqs)
            .unwrap_or_else(|e| panic!("{tag}: standby image: {e}\n{logs}"));
        RunStats {
            failover,
            announced,
            resumed,
            writes: rep.sets_acked.len() as u64 + rep.incrs_acked as u64,
            writes_at_kill: acks_at_kill,
            c_lines: cc.c_lines,
            w_records: cc.w_seqs.len() as u64,
            max_reply: rep.max_reply,
            tcp_port: rep.local_addr.map(|a| a.port()),
        }
    }
}

/// When (after the SIGKILL) the standby's RARP was seen on its TAP and on the LAN.
#[derive(Debug, Clone, Copy)]
struct Announce {
    tap: Option<Duration>,
    lan: Option<Duration>,
}

#[derive(Debug)]
struct RunStats {
    /// From SIGKILL to the standby's status reporting the failover (as polled).
    failover: Duration,
    /// The standby's RARP announce, as seen on its TAP and on the LAN.
    announced: Announce,
    /// From SIGKILL to 40 more acknowledged writes on the same connection.
    resumed: Duration,
    writes: u64,
    writes_at_kill: u64,
    c_lines: u64,
    w_records: u64,
    max_reply: Duration,
    tcp_port: Option<u16>,
}

fn pct(v: &mut [Duration], p: usize) -> Duration {
    v.sort();
    v[(v.len() * p / 100).min(v.len() - 1)]
}

#[test]
fn sigkill_primary_at_random_moments() {
    require_kvm();
    let runs: u32 = std::env::var("FT_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if std::env::var_os("FT_SOAK").is_some() {
            200
        } else {
            20
        });
    let seed = twinrun_lab::rng::seed_from_env("FT_SEED");
    eprintln!("FT_SEED={seed} FT_RUNS={runs}");
    let mut rng = Rng(seed);
    let t_all = Instant::now();
    let (mut failovers, mut resumes) = (Vec::new(), Vec::new());
    let mut writes = 0;
    let mut announce_lost = Vec::new();
    for run in 0..runs {
        let kill_after = Duration::from_millis(100 + rng.next() % 900);
        let t_run = Instant::now();
        let (pair, client) = Pair::loaded(4);
        std::thread::sleep(kill_after);
        let tag = format!("run {run} (FT_SEED={seed}, kill after {kill_after:?})");
        let s = pair.kill_and_check(client, &tag);
        eprintln!(
            "run {run}: kill {kill_after:?} after load start, {} writes acked before, {} in \
             all; failover logged {:?}, RARP {:?}, client resumed {:?} after SIGKILL; C {} W {}; \
             longest reply {:?}; port {:?}; run {:?}",
            s.writes_at_kill,
            s.writes,
            s.failover,
            s.announced,
            s.resumed,
            s.c_lines,
            s.w_records,
            s.max_reply,
            s.tcp_port,
            t_run.elapsed()
        );
        if s.announced.lan.is_none() {
            announce_lost.push((run, s.announced.tap.is_some(), s.resumed));
        }
        failovers.push(s.failover);
        resumes.push(s.resumed);
        writes += s.writes;
    }
    eprintln!(
        "{runs} runs in {:?}: {writes} kv writes acknowledged and verified; failover logged \
         p50 {:?} max {:?}; client resumed p50 {:?} max {:?}",
        t_all.elapsed(),
        pct(&mut failovers, 50),
        pct(&mut failovers, 100),
        pct(&mut resumes, 50),
        pct(&mut resumes, 100),
    );
    if !announce_lost.is_empty() {
        eprintln!(
            "WARNING: in {} of {runs} runs the standby's RARP announce never reached the LAN \
             (run, seen on the standby's TAP, client resumed after): {announce_lost:?} \
             (FT_REQUIRE_ANNOUNCE=1 makes this a failure)",
            announce_lost.len()
        );
    }
}

#[test]
fn one_alink_cut_and_restored_then_failover() {
    require_kvm();
    let (mut pair, client) = Pair::loaded(10);
    let before = client.max_reply_during(Duration::from_millis(500));
    // Cut link 1 on the primary's side (the peer end loses carrier too).
    pair.topo.set_alink(0, 1, false).unwrap();
    let acks0 = client.acks();
    let during = client.max_reply_during(Duration::from_millis(1500));
    let acks1 = client.acks();
    assert!(pair.primary.alive() && pair.standby.alive());
    assert!(
        !failed_over(&pair.standby.status_now()),
        "the standby failed over with one link still up\n{}",
        pair.logs()
    );
    eprintln!(
        "link 1 cut: longest reply {during:?} (before the cut {before:?}), {} writes acked in 1.5 s",
        acks1 - acks0
    );
    assert!(
        acks1 - acks0 >= 20,
        "protection stalled with one of two links: {} acks in 1.5 s\n{}",
        acks1 - acks0,
        pair.logs()
    );
    assert!(
        during < Duration::from_millis(1000),
        "a reply took {during:?} while one link was cut\n{}",
        pair.logs()
    );
    // The cut took effect: the primary declared link 1 down (heartbeats) and link 0
    // carried the checkpoints meanwhile.
    let links = pair.primary.status_now().links;
    assert!(
        !links[1].up && links[0].up,
        "the primary never saw link 1 go down: {links:?}\n{}",
        pair.logs()
    );
    // Restore: the link must come back into use (checkpoint traffic on it again).
    let conns_before = links[1].connections;
    pair.topo.set_alink(0, 1, true).unwrap();
    let reconnected = pair
        .primary
        .wait_status("reconnected on link 1", Duration::from_secs(10), |s| {
            s.links[1].up && s.links[1].connections > conns_before
        })
        .unwrap_or_else(|e| panic!("link 1 did not reconnect: {e}\n{}", pair.logs()));
    let tx0 = pair.topo.alink_tx_bytes(0, 1).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let tx1 = pair.topo.alink_tx_bytes(0, 1).unwrap();
    let other = pair.topo.alink_tx_bytes(0, 0).unwrap();
    eprintln!(
        "link 1 restored: reconnected after {reconnected:?}, {} bytes sent on it in 1 s \
         (link 0 total {other})",
        tx1 - tx0
    );
    // Heartbeats alone are a few KB/s; checkpoint traffic of the dirty workload is MBs.
    assert!(
        tx1 - tx0 > 256 << 10,
        "link 1 is back but carries no checkpoint traffic: {} bytes in 1 s\n{}",
        tx1 - tx0,
        pair.logs()
    );
    let s = pair.kill_and_check(client, "after the link test");
    eprintln!("then failover: {s:?}");
}

/// Connects from `ns` to `addr`, sends `bytes`, and reads until the peer closes (or 3 s);
/// returns what the peer sent.
fn poke(ns: &str, addr: SocketAddr, bytes: Vec<u8>) -> Vec<u8> {
    in_netns(ns, move || {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let _ = s.write_all(&bytes);
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        got
    })
    .unwrap()
    .join()
    .unwrap()
}

/// A wrong-secret handshake (dialer side, node 1, fixed nonce): our hello, then, after
/// the acceptor's hello, an auth computed with the wrong secret. Returns the bytes of
/// our hello frame (to replay).
fn wrong_secret_handshake(ns: &str, addr: SocketAddr, nonce: [u8; 32]) -> Vec<u8> {
    use alink::frame::{FrameDecoder, FrameEncoder, Kind};
    use alink::handshake::{Handshake, HandshakeConfig, HsStep, Role};
    in_netns(ns, move || {
        let cfg = HandshakeConfig {
            version: alink::PROTOCOL_VERSION,
            cluster_id: twinrun_guest_abi::fnv1a64(CLUSTER.as_bytes()),
            node_id: 1,
            peer_node_id: Some(2),
            secret: b"not-the-cluster-secret-at-all!!".to_vec(),
            timeout: Duration::from_secs(3),
        };
        let (mut hs, hello) = Handshake::new(cfg, Role::Dialer, nonce, Duration::ZERO);
        let mut enc = FrameEncoder::new(1024);
        let hello_frame = enc
            .encode(Kind::Hello, 0, &[], &postcard::to_stdvec(&hello).unwrap())
            .unwrap();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(&hello_frame).unwrap();
        let mut dec = FrameDecoder::new(1024);
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).expect("the acceptor's hello");
        let frames = dec.feed(&buf[..n]).expect("acceptor's hello decodes");
        let step = hs
            .on_body(&frames[0].body, None)
            .expect("acceptor's hello accepted");
        let HsStep::Send(auth) = step else {
            panic!("unexpected handshake step {step:?}")
        };
        let auth_frame = enc
            .encode(Kind::Auth, 0, &[], &postcard::to_stdvec(&auth).unwrap())
            .unwrap();
        let _ = s.write_all(&auth_frame);
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        hello_frame
    })
    .unwrap()
    .join()
    .unwrap()
}

#[test]
fn bad_input_on_the_alink_port_is_refused_while_protected() {
    require_kvm();
    let (mut pair, client) = Pair::loaded(10);
    // The standby accepts (the primary dials): its listen address on link 0, reached
    // from the primary's namespace (where an A-Link peer would be).
    let target = pair.topo.alink_addr(1, 0);
    let from: String = pair.topo.pm_ns(0).to_string();
    // Connections the standby refused, as its status counts them.
    let refusals =
        |p: &Pair| -> u64 { p.standby.status_now().links.iter().map(|l| l.refused).sum() };
    let wait_refusal = |p: &Pair, n: u64, what: &str, needle: &str| {
        let t0 = Instant::now();
        while refusals(p) < n {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "{what}: not refused\n{}",
                p.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // The refusal says why, in the standby's log (written right after it counted).
        let logged = twinrun_lab::poll(Duration::from_secs(5), Duration::from_millis(10), || {
            p.standby.stderr().contains(needle).then_some(())
        });
        let log = p.standby.stderr();
        assert!(
            logged.is_some(),
            "{what}: refusal logged without {needle:?}\n{}",
            p.logs()
        );
        let line = log
            .lines()
            .rfind(|l| l.contains("refused connection"))
            .unwrap_or_default()
            .to_string();
        eprintln!("{what}: {line}");
    };
    let mut expected = refusals(&pair);
    let acks0 = client.acks();

    // 1. Garbage bytes.
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut garbage = vec![0u8; 512];
    rng.fill(&mut garbage);
    poke(&from, target, garbage);
    expected += 1;
    wait_refusal(&pair, expected, "garbage", "bad magic");

    // 2. A well-formed handshake with the wrong secret.
    let nonce = [0x5a; 32];
    let hello = wrong_secret_handshake(&from, target, nonce);
    expected += 1;
    wait_refusal(&pair, expected, "wrong secret", "wrong cluster secret");

    // 3. The same hello frame replayed on a new connection.
    poke(&from, target, hello);
    expected += 1;
    wait_refusal(&pair, expected, "replayed hello", "replayed handshake");

    // 4. A correctly tagged handshake-phase frame header announcing a 2 MiB body (the
    //    handshake allows 1 KiB): refused before anything is allocated.
    let mut enc = alink::frame::FrameEncoder::new(1 << 30);
    let body = vec![0u8; 2 << 20];
    let big = enc
        .header(alink::frame::Kind::Hello, 0, &[], &[&body])
        .unwrap()
        .to_vec();
    poke(&from, target, big);
    expected += 1;
    wait_refusal(&pair, expected, "oversized frame", "exceeds the limit");

    // 5. A session frame captured off the wire (the primary's traffic to the standby on
    //    link 0), replayed on a new connection: its tag is keyed with that session's
    //    key and sequence, so it does not verify anywhere else.
    let frame = capture(
        pair.topo.pm_ns(1),
        &pair.topo.pms[1].alink_ifs[0],
        Duration::from_secs(3),
        |eth| alink_session_frame(tcp_payload_to(eth, ALINK_PORT)?),
    )
    .unwrap()
    .join()
    .unwrap()
    .expect("no A-Link session frame captured on link 0 within 3 s");
    eprintln!(
        "captured a session frame of kind {} ({} bytes)",
        frame[5],
        frame.len()
    );
    poke(&from, target, frame);
    expected += 1;
    wait_refusal(
        &pair,
        expected,
        "replayed session frame",
        "bad frame during handshake",
    );

    // Protection continued all along: the client kept getting replies (each one is
    // released only after the standby acknowledged its epoch), no failover.
    let acks1 = client.acks();
    client
        .wait_acks(20, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("after the bad input: {e}\n{}", pair.logs()));
    assert!(acks1 > acks0, "no kv reply while the bad input was sent");
    assert!(!failed_over(&pair.standby.status_now()));
    assert!(pair.primary.alive() && pair.standby.alive());
    let s = pair.kill_and_check(client, "after the bad input");
    eprintln!("then failover: {s:?}");
}

/// One complete A-Link session frame (a Data or Heartbeat frame: magic "ALNK", kind 3
/// or 4) at the start of a TCP payload: its bytes (header and body), to be replayed.
fn alink_session_frame(payload: &[u8]) -> Option<Vec<u8>> {
    if payload.len() < 56 || &payload[0..4] != b"ALNK" || !matches!(payload[5], 3 | 4) {
        return None;
    }
    let body_len = u32::from_le_bytes(payload[28..32].try_into().ok()?) as usize;
    payload.get(..56 + body_len).map(<[u8]>::to_vec)
}
