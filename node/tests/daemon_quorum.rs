//! The daemon's quorum gate against a real `twinrun witness` process on loopback:
//! - `Alone` is an acquire of the daemon's own key (`-alone.<vm>`): one node wins, the
//!   other is refused while the winner renews, and gets it once the winner gives it up
//!   and its lease lapsed; a holder cut off from the witness (SIGSTOP) is told its
//!   permission ended before the witness could grant the key to the other node;
//! - `Takeover` is a query of the VM's own key that a VMM holds: granted only to the
//!   node whose VMM won the generation, and the query changes nothing at the witness;
//! - two real daemons in witness mode: a node started without its peer runs an
//!   unprotected VM alone only with the witness's grant, and the key is then held by
//!   its quorum node id; with the witness unreachable the VM stays pending and says why.

mod common;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use quorum::client::{Backend, WitnessClient};
use quorum::witness::ops::{Reply, Request};
use quorum::NodeId;
use twinrun_lab::Proc;
use twinrund::cluster::QuorumKind;
use twinrund::gate::{alone_key, QuorumGate, QuorumRequest, ServiceGate};
use twinrund::model::VmState;

/// A `twinrun witness` for one cluster, killed and reaped on drop.
struct Witness {
    proc: Proc,
    addr: SocketAddr,
}

impl Witness {
    fn start(dir: &Path, cluster: &str, secret_file: &Path) -> Witness {
        let mut cmd = Command::new(twinrun_bin());
        cmd.args(["witness", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.join("witness"))
            .arg("--cluster")
            .arg(format!("{cluster}={}", secret_file.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let proc = Proc::spawn("witness", &mut cmd).expect("spawn twinrun witness");
        let status = dir.join("witness/status.json");
        let addr = wait_for(
            Duration::from_secs(20),
            "the witness's status file",
            || {
                let v: serde_json::Value = serde_json::from_slice(&fs::read(&status).ok()?).ok()?;
                v["listen"].as_str()?.parse().ok()
            },
            String::new,
        );
        Witness { proc, addr }
    }

    fn signal(&self, sig: i32) {
        if let Some(pid) = self.proc.pid() {
            // SAFETY: kill(2) on our own child process.
            unsafe { libc::kill(pid as i32, sig) };
        }
    }
}

impl Drop for Witness {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        self.proc.kill();
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    cluster: String,
    secret: PathBuf,
    witness: Witness,
}

fn setup() -> Setup {
    setup_for(&format!("q{}-{}", std::process::id(), rand_suffix()))
}

/// A witness that knows `cluster` by the harness's secret.
fn setup_for(cluster: &str) -> Setup {
    let dir = tempfile::Builder::new()
        .prefix("twq")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let cluster = cluster.to_string();
    let secret = dir.path().join("secret");
    fs::write(&secret, SECRET).expect("secret");
    let witness = Witness::start(dir.path(), &cluster, &secret);
    Setup {
        _dir: dir,
        cluster,
        secret,
        witness,
    }
}

fn rand_suffix() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn table(s: &Setup, preferred: SocketAddr) -> quorum::config::QuorumConfig {
    quorum::config::QuorumConfig::from_toml(&format!(
        "cluster = \"{}\"\nbackend = \"witness\"\n[witness]\npreferred = \"{preferred}\"\nsecret_file = \"{}\"\n",
        s.cluster,
        s.secret.display()
    ))
    .expect("quorum table")
}

fn gate(s: &Setup, node: u64) -> ServiceGate {
    ServiceGate::open(&table(s, s.witness.addr), node, 3 - node).expect("gate")
}

fn ask(g: &ServiceGate, me: &str, vm: &str, kind: QuorumKind) -> twinrund::gate::QuorumVerdict {
    let peer = if me == "pm1" { "pm2" } else { "pm1" };
    g.decide(&QuorumRequest {
        cluster: String::new(),
        node: me.into(),
        peer: peer.into(),
        vm: vm.into(),
        kind,
        peer_silent_for: None,
    })
}

/// One request as a VMM's quorum client would send it (the real client and wire).
fn vmm_request(s: &Setup, node: u64, req: &Request) -> Reply {
    let mut c = WitnessClient::new(s.witness.addr, &s.cluster, NodeId(node), SECRET.as_bytes())
        .expect("client");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut id = 0;
    loop {
        id += 1;
        c.send(id, req).expect("send");
        std::thread::sleep(Duration::from_millis(50));
        if let Some((_, r)) = c.drain().expect("drain").into_iter().next() {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "the witness did not answer {req:?}"
        );
    }
}

fn query(s: &Setup, key: &str) -> (u64, Option<NodeId>) {
    match vmm_request(s, 1, &Request::Query { vm: key.into() }) {
        Reply::State {
            generation, holder, ..
        } => (generation, holder),
        other => panic!("query answered {other:?}"),
    }
}

#[test]
fn alone_is_an_acquire_of_the_daemons_own_key_one_node_at_a_time() {
    let s = setup();
    let (g1, g2) = (gate(&s, 1), gate(&s, 2));
    let v1 = ask(&g1, "pm1", "web", QuorumKind::Alone);
    assert!(v1.granted, "{v1:?}");
    let (gen, holder) = query(&s, &alone_key("web"));
    assert_eq!((Some(gen), holder), (v1.token, Some(NodeId(1))));
    // Odd generations are node 1's (different parity per node).
    assert_eq!(gen % 2, 1);
    // The VM's own key is untouched: the daemon never competes with a VMM for it.
    assert_eq!(query(&s, "web"), (0, None));

    // pm2 is refused while pm1 renews (well past one lease of 2 s).
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        let v2 = ask(&g2, "pm2", "web", QuorumKind::Alone);
        assert!(!v2.granted, "{v2:?}");
        assert!(v2.reason.contains("pm1 holds"), "{}", v2.reason);
        std::thread::sleep(Duration::from_millis(500));
    }
    // Asked again while held, pm1 keeps its grant (no new generation).
    assert!(ask(&g1, "pm1", "web", QuorumKind::Alone).granted);
    assert_eq!(query(&s, &alone_key("web")).0, gen);

    // pm1's copy ends: it gives the key up; once its lease lapsed pm2 gets it.
    g1.release("web");
    let v2 = wait_for(
        Duration::from_secs(10),
        "pm2's grant after pm1 released",
        || Some(ask(&g2, "pm2", "web", QuorumKind::Alone)).filter(|v| v.granted),
        String::new,
    );
    let (gen2, holder2) = query(&s, &alone_key("web"));
    assert_eq!((Some(gen2), holder2), (v2.token, Some(NodeId(2))));
    assert!(gen2 > gen && gen2 % 2 == 0, "{gen} -> {gen2}");
    g2.release("web");
}

#[test]
fn takeover_is_granted_only_to_the_node_whose_vmm_holds_the_generation() {
    let s = setup();
    let (g1, g2) = (gate(&s, 1), gate(&s, 2));
    // Nobody holds it yet: neither daemon may own it.
    let v = ask(&g2, "pm2", "db", QuorumKind::Takeover);
    assert!(!v.granted && v.reason.contains("nobody holds"), "{v:?}");
    // pm2's standby VMM wins the takeover at the witness (its own quorum client).
    let g = match vmm_request(
        &s,
        2,
        &Request::Acquire {
            vm: "db".into(),
            node: NodeId(2),
            from: 0,
            lease_ms: 5000,
        },
    ) {
        Reply::Granted { generation, .. } => generation,
        other => panic!("the VMM's acquire answered {other:?}"),
    };
    let v2 = ask(&g2, "pm2", "db", QuorumKind::Takeover);
    assert!(v2.granted, "{v2:?}");
    assert_eq!(v2.token, Some(g));
    let v1 = ask(&g1, "pm1", "db", QuorumKind::Takeover);
    assert!(!v1.granted, "{v1:?}");
    assert!(v1.reason.contains("pm2 holds generation"), "{}", v1.reason);
    // The daemons' questions changed nothing: the VMM still holds its generation.
    assert_eq!(query(&s, "db"), (g, Some(NodeId(2))));
}

#[test]
fn a_holder_cut_off_from_the_witness_is_told_before_the_other_node_can_win() {
    let s = setup();
    let g1 = gate(&s, 1);
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    g1.on_lost(Box::new(move |vm: &str, why: String| {
        let _ = tx
            .lock()
            .map(|t| t.send((vm.to_string(), why, Instant::now())));
    }));
    assert!(ask(&g1, "pm1", "plc", QuorumKind::Alone).granted);
    std::thread::sleep(Duration::from_millis(900));
    // Freeze the witness: renewals go unanswered; the last one granted was sent at
    // most one renewal interval (400 ms) plus its round trip ago.
    let frozen = Instant::now();
    s.witness.signal(libc::SIGSTOP);
    let (vm, why, at) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the lost permission is reported");
    let after = at - frozen;
    assert_eq!(vm, "plc");
    assert!(why.contains("permission to run it alone ended"), "{why}");
    // local validity (2 s lease, drift, the daemon's 400 ms margin: ~1.56 s) from the
    // last granted send, which was at most ~0.45 s before the freeze, so the report
    // comes before the lease (2 s from that send's arrival) could lapse at the witness.
    println!(
        "permission ended {} ms after the witness froze",
        after.as_millis()
    );
    assert!(after < Duration::from_millis(1950), "{after:?}");
    s.witness.signal(libc::SIGCONT);
    // Asked again, the key is still ours (nobody else asked): renewed, same generation.
    let (gen, _) = query(&s, &alone_key("plc"));
    let v = ask(&g1, "pm1", "plc", QuorumKind::Alone);
    assert!(v.granted, "{v:?}");
    assert_eq!(v.token, Some(gen));
    g1.release("plc");
}

fn witness_quorum_toml(addr: SocketAddr) -> String {
    format!("\n[quorum]\nmode = \"witness\"\npreferred = \"{addr}\"\n")
}

#[test]
fn a_daemon_alone_runs_an_unprotected_vm_only_with_the_witness_grant() {
    let mut plan = ClusterPlan::new();
    plan.boot_grace_ms = 500;
    // The witness knows the cluster by the plan's name and secret.
    let s = setup_for(&plan.cluster);
    plan.quorum = witness_quorum_toml(s.witness.addr);
    let _reaper = VmmReaper(&plan);
    // pm1 alone (pm2 never starts).
    let d1 = Daemon::start(&plan, 0);
    let c1 = plan.client(0, ADMIN);
    let ctx = || d1.log_text();
    // The VMMs' quorum file: exactly the pair's [quorum] table.
    let qf = plan.node_dir(0).join("state/quorum.toml");
    let text = fs::read_to_string(&qf).expect("quorum.toml");
    let v: toml::Value = toml::from_str(&text).expect("toml");
    let q = quorum::config::QuorumConfig::from_toml(&toml::to_string(&v["quorum"]).unwrap())
        .expect("the pair's table");
    assert_eq!(q.cluster, plan.cluster);
    c1.create(
        &spec("solo1", "unprotected", "pm1", &["counter"], false),
        None,
    )
    .expect("create");
    c1.action("solo1", "start", None).expect("start");
    wait_for(
        Duration::from_secs(60),
        "solo1 running on pm1 alone",
        || {
            let v = c1.vm("solo1").ok()?;
            (v.state == VmState::Running).then_some(v)
        },
        ctx,
    );
    // The grant came from the witness, under the daemon's key, to node id 1 (pm1).
    let client_setup = &s;
    let (gen, holder) = query(client_setup, &alone_key("solo1"));
    assert!(gen > 0 && holder == Some(NodeId(1)), "{gen} {holder:?}");
    let events = c1.events(Some("solo1"), 50).expect("events");
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("quorum granted to run alone")
                && e.message.contains("-alone.solo1")),
        "{events:?}"
    );
    // A second VM while the witness is frozen: pending, and it says why.
    client_setup.witness.signal(libc::SIGSTOP);
    let frozen = Instant::now();
    c1.create(
        &spec("solo2", "unprotected", "pm1", &["counter"], false),
        None,
    )
    .expect("create");
    c1.action("solo2", "start", None).expect("start");
    // What solo2 showed meanwhile, each change with its time since the freeze (printed
    // if the refusal does not show).
    let seen = std::cell::RefCell::new(Vec::<String>::new());
    let v = wait_for(
        Duration::from_secs(30),
        "solo2 pending on the unreachable witness",
        || {
            let got = c1.vm("solo2");
            let now = match &got {
                Ok(v) => format!("{:?}: {}", v.state, v.reason),
                Err(e) => format!("no answer: {e}"),
            };
            let mut seen = seen.borrow_mut();
            if seen.last().is_none_or(|l| !l.ends_with(&now)) {
                seen.push(format!("{:?} {now}", frozen.elapsed()));
            }
            let v = got.ok()?;
            (v.reason.contains("refused to run it alone")).then_some(v)
        },
        || {
            format!(
                "solo2 since the freeze:\n{}\n{}",
                seen.borrow().join("\n"),
                ctx()
            )
        },
    );
    assert_eq!(v.state, VmState::Pending, "{v:?}");
    assert!(v.reason.contains("did not answer"), "{}", v.reason);
    assert!(v.vmms.is_empty(), "{v:?}");
    client_setup.witness.signal(libc::SIGCONT);
    // solo1 had no granted renewal while the witness was frozen: it was stopped (the
    // peer is away, so nothing else guards against a second copy), and is started
    // again with a fresh grant once the witness answers; solo2 then starts too.
    wait_for(
        Duration::from_secs(60),
        "both VMs running once the witness is back",
        || {
            let a = c1.vm("solo1").ok()?;
            let b = c1.vm("solo2").ok()?;
            (a.state == VmState::Running && b.state == VmState::Running).then_some(())
        },
        ctx,
    );
    let events = c1.events(Some("solo1"), 100).expect("events");
    assert!(
        events.iter().any(|e| e.message.contains("quorum lost")),
        "{events:?}"
    );
}

// ------------------------------------------------------------ the etcd backend

/// An etcd process (Debian `etcd-server`) on loopback with a short election timeout,
/// its data in a temp dir; killed and reaped on drop, and with the test process.
struct Etcd {
    _proc: Proc,
    _dir: tempfile::TempDir,
    url: String,
}

impl Etcd {
    fn start() -> Etcd {
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            let (client, peer) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
            let url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut cmd = Command::new("etcd");
            cmd.args(["--name", "default", "--data-dir"])
                .arg(dir.path().join("data"))
                .args([
                    "--listen-client-urls",
                    &url,
                    "--advertise-client-urls",
                    &url,
                ])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .arg("--initial-cluster")
                .arg(format!("default={peer_url}"))
                .args(["--heartbeat-interval", "10", "--election-timeout", "100"]);
            // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches only the
            // child: etcd dies with the test process even if that is killed.
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
            let mut proc = Proc::spawn_logged("etcd", &mut cmd, &dir.path().join("etcd.log"))
                .expect("run etcd (Debian package etcd-server)");
            let t = Instant::now();
            while proc.alive() && t.elapsed() < Duration::from_secs(30) {
                if std::net::TcpStream::connect(("127.0.0.1", client)).is_ok() {
                    return Etcd {
                        _proc: proc,
                        _dir: dir,
                        url,
                    };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            // A port taken between the probe and etcd's bind: try others.
        }
        panic!("etcd did not start");
    }
}

fn etcd_table(cluster: &str, url: &str) -> quorum::config::QuorumConfig {
    quorum::config::QuorumConfig::from_toml(&format!(
        "cluster = \"{cluster}\"\nbackend = \"etcd\"\n[etcd]\nendpoints = [\"{url}\"]\n[timing]\nlease_ms = 1000\nrenew_ms = 200\n"
    ))
    .expect("etcd table")
}

/// One request through a VMM-side etcd backend of `node`.
fn etcd_request(table: &quorum::config::QuorumConfig, node: u64, req: &Request) -> Reply {
    let backends = table.open(NodeId(node)).expect("etcd backend");
    let (b, _) = backends.for_vm().expect("backend");
    let mut b = b.expect("preferred slot");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut id = 0;
    loop {
        id += 1;
        b.send(id, req).expect("send");
        let sent = Instant::now();
        while sent.elapsed() < Duration::from_millis(500) {
            if let Some((_, r)) = b.drain().expect("drain").into_iter().next() {
                return r;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(Instant::now() < deadline, "etcd did not answer {req:?}");
    }
}

#[test]
fn with_etcd_alone_and_takeover_follow_the_same_rule() {
    let etcd = Etcd::start();
    let cluster = format!("e{}-{}", std::process::id(), rand_suffix());
    let table = etcd_table(&cluster, &etcd.url);
    let g1 = ServiceGate::open(&table, 1, 2).expect("gate 1");
    let g2 = ServiceGate::open(&table, 2, 1).expect("gate 2");
    // Alone: one node at a time, under the daemon's own key.
    let v1 = ask(&g1, "pm1", "web", QuorumKind::Alone);
    assert!(v1.granted, "{v1:?}");
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        let v2 = ask(&g2, "pm2", "web", QuorumKind::Alone);
        assert!(!v2.granted, "{v2:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    g1.release("web");
    let v2 = wait_for(
        Duration::from_secs(15),
        "pm2's grant after pm1 released (etcd lease lapse)",
        || Some(ask(&g2, "pm2", "web", QuorumKind::Alone)).filter(|v| v.granted),
        String::new,
    );
    assert!(v2.token > v1.token, "{v1:?} {v2:?}");
    g2.release("web");
    // Takeover: only for the node whose VMM holds the VM's own key.
    let g = match etcd_request(
        &table,
        2,
        &Request::Acquire {
            vm: "db".into(),
            node: NodeId(2),
            from: 0,
            lease_ms: 5000,
        },
    ) {
        Reply::Granted { generation, .. } => generation,
        other => panic!("the VMM's acquire answered {other:?}"),
    };
    let v = ask(&g2, "pm2", "db", QuorumKind::Takeover);
    assert!(v.granted && v.token == Some(g), "{v:?}");
    let v = ask(&g1, "pm1", "db", QuorumKind::Takeover);
    assert!(!v.granted && v.reason.contains("pm2 holds"), "{v:?}");
}
