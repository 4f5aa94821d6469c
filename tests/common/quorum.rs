//! A protected pair with real `twinrun witness` processes (issue 14's process tests:
//! tests/split_brain.rs, tests/quorum_cases.rs): two `twinrun vm run --role ...` PMs in
//! their namespaces (two A-Links, a TAP each on the LAN, a management network), one or
//! two witnesses (preferred, alternate) on their own hosts of the management network,
//! each killable and restartable on its durable state, and kv load from a client on
//! ONE TCP connection.
//!
//! "Never two copies" is checked where the outside would see it: the frames each VMM
//! writes into its TAP ([`tap_frames`]: a standby, or a demoted primary, writes none),
//! the one console file both PMs write at stream positions (no gap, no duplicate, no
//! reordering, one BOOT), and the client's acknowledged writes (each read back at the
//! end, the INCR counter equal to what was acknowledged).

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::pair::{listening, protected, start_protected, wait_console, PairFiles, Pm};
use super::{topology, twinrun_bin};
use twinrun_control::{FtStatus, QuorumView};
use twinrun_lab::console::read as read_console;
use twinrun_lab::kvload::{LoadClient, LoadConfig};
use twinrun_lab::tap::VmFrames;
use twinrun_lab::topology::KV_PORT;
use twinrun_lab::verdict::{check_load, Expect};
use twinrun_lab::{Proc, Topology};

pub const CLUSTER: &str = "sb-test";
pub const WITNESS_PORT: u16 = 4557;
pub const WITNESS_SECRET: &[u8] = b"split-brain-witness-secret-0123456789";
/// Exit code of a demoted primary (`twinrun_pair::exit::DEMOTED`).
pub const DEMOTED: i32 = 5;

/// One `twinrun witness` on witness host `j`, with its state directory (kept across
/// restarts: a restarted witness starts from what it made durable).
pub struct Witness {
    pub addr: SocketAddr,
    ns: String,
    state_dir: PathBuf,
    secret: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
    starts: u32,
}

impl Witness {
    fn new(topo: &Topology, j: usize, dir: &Path, secret: &Path) -> Witness {
        let w = topo.witness(j).unwrap();
        let mut me = Witness {
            addr: SocketAddr::from((w.ip, WITNESS_PORT)),
            ns: w.ns.name().to_string(),
            state_dir: dir.join(format!("witness{j}-state")),
            secret: secret.to_path_buf(),
            log: dir.join(format!("witness{j}")),
            proc: None,
            starts: 0,
        };
        me.start();
        me
    }

    /// Starts it (again) on its state directory.
    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "the witness at {} runs", self.addr);
        self.starts += 1;
        let mut cmd = twinrun_lab::netns::command_in(&self.ns, twinrun_bin());
        cmd.args(["witness", "--listen", &self.addr.to_string(), "--state-dir"])
            .arg(&self.state_dir)
            .arg("--cluster")
            .arg(format!("{CLUSTER}={}", self.secret.display()))
            .stdout(Stdio::null());
        let log = self.log.with_extension(format!("{}.stderr", self.starts));
        self.proc = Some(
            Proc::spawn_logged("witness", &mut cmd, &log)
                .unwrap_or_else(|e| panic!("spawn the witness: {e}")),
        );
    }

    /// SIGKILL (what it made durable stays in its state directory).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// A protected pair with its witnesses. Fields drop in order: the processes, then the
/// namespaces, then the files.
pub struct QuorumPair {
    pub primary: Pm,
    pub standby: Pm,
    /// The preferred witness, then the alternate (if any).
    pub witnesses: Vec<Witness>,
    /// The etcd serving as the quorum backend instead (`start_with_etcd`).
    pub etcd: Option<EtcdServer>,
    pub topo: Topology,
    pub files: PairFiles,
    pub prefix: String,
    pub dir: tempfile::TempDir,
}

/// Frames the VMM of PM `i` has written into its TAP so far (the TAP's receive
/// counter, read in the PM's namespace).
pub fn tap_frames(topo: &Topology, i: usize) -> u64 {
    let path = format!("/sys/class/net/{}/statistics/rx_packets", topo.tap(i));
    let out = twinrun_lab::netns::command_in(topo.pm_ns(i), "cat")
        .arg(&path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| {
            panic!(
                "cannot read {path}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// Starts recording the frames the VMM of PM `i` writes into its TAP.
pub fn record_vm_frames(topo: &Topology, i: usize) -> VmFrames {
    VmFrames::start(topo.pm_ns(i), topo.tap(i))
        .unwrap_or_else(|e| panic!("recording TAP {}: {e}", topo.tap(i)))
}

/// The frames a recording holds.
pub fn recorded(r: VmFrames) -> Vec<Vec<u8>> {
    r.stop().unwrap_or_else(|e| panic!("recorded frames: {e}"))
}

/// "Never two copies" at the TAPs, exactly: every frame the loser's VMM wrote while
/// recorded is one the winner's VMM also wrote. The loser may still release output of
/// epochs the winner had committed (an acknowledgement read after it was frozen, say:
/// acknowledged output is released without a lease), and the winner sends those same
/// frames again at its takeover (its "frames sent again"); anything else (a frame of
/// an epoch the winner never committed) would be a second copy's output. The winner's
/// recording must have started before its takeover.
pub fn assert_loser_wrote_only_committed_frames(loser: &[Vec<u8>], winner: &[Vec<u8>], ctx: &str) {
    for (i, f) in loser.iter().enumerate() {
        assert!(
            winner.iter().any(|w| w == f),
            "{ctx}: frame {i} of {} the loser wrote ({} bytes) is not among the {} the winner \
             wrote: a second copy's output",
            loser.len(),
            f.len(),
            winner.len()
        );
    }
    eprintln!(
        "{ctx}: the loser wrote {} frames while recorded, all committed ones the winner also \
         wrote; the winner {}",
        loser.len(),
        winner.len()
    );
}

/// The quorum part of a status.
pub fn quorum(st: &FtStatus) -> &QuorumView {
    st.quorum.as_ref().expect("the status shows the quorum")
}

/// A status whose quorum satisfies `f`.
pub fn quorum_is(st: &FtStatus, f: impl Fn(&QuorumView) -> bool) -> bool {
    st.quorum.as_ref().is_some_and(f)
}

impl QuorumPair {
    /// Witness(es), standby, then primary (`witnesses`: 1, or 2 for an alternate;
    /// `extra`: more flags for both ends, e.g. `--protection ha`); returns once the
    /// primary reports protection and the guest's kv server listens.
    pub fn start(prefix: &str, witnesses: usize, extra: &[&str]) -> QuorumPair {
        Self::start_opts(prefix, witnesses, extra, false)
    }

    /// [`Self::start`] with etcd as the quorum backend instead of witnesses: a real
    /// etcd (Debian's etcd-server) on the first witness host of the management
    /// network, its shortest lease (1 s, see [`EtcdServer`]).
    pub fn start_with_etcd(prefix: &str, extra: &[&str]) -> QuorumPair {
        Self::start_opts(prefix, 0, extra, false)
    }

    /// [`Self::start`] with a private network (priv0) between the PMs as a heartbeat
    /// path besides the A-Links (`--priv0`).
    pub fn start_with_priv0(prefix: &str, witnesses: usize, extra: &[&str]) -> QuorumPair {
        Self::start_opts(prefix, witnesses, extra, true)
    }

    /// `witnesses` 0: etcd on a host of the management network instead.
    fn start_opts(prefix: &str, witnesses: usize, extra: &[&str], priv0: bool) -> QuorumPair {
        let dir = tempfile::tempdir().unwrap();
        let topo = topology(
            Topology::builder()
                .prefix(prefix)
                .witnesses(witnesses.max(1))
                .management(),
        );
        let etcd = (witnesses == 0).then(|| EtcdServer::start(&topo, dir.path()));
        if priv0 {
            add_priv0(&topo);
        }
        let files = PairFiles::new(dir.path());
        let wsecret = dir.path().join("witness.secret");
        fs::write(&wsecret, WITNESS_SECRET).unwrap();
        let ws: Vec<Witness> = (0..witnesses)
            .map(|j| Witness::new(&topo, j, dir.path(), &wsecret))
            .collect();
        let state = |n: u64| -> PathBuf { dir.path().join(format!("node{n}.quorum")) };
        let args = |n: u64| -> Vec<String> {
            let mut a: Vec<String> = vec![
                "--cluster-id".into(),
                CLUSTER.into(),
                "--epoch-ms".into(),
                "10".into(),
            ];
            if let Some(e) = &etcd {
                a.extend(["--quorum-config".into(), e.config.display().to_string()]);
            } else {
                a.extend(["--witness".into(), ws[0].addr.to_string()]);
                if let Some(alt) = ws.get(1) {
                    a.extend(["--witness-alternate".into(), alt.addr.to_string()]);
                }
                a.extend([
                    "--witness-secret-file".into(),
                    wsecret.display().to_string(),
                ]);
            }
            a.extend([
                "--quorum-node-id".into(),
                n.to_string(),
                "--quorum-state".into(),
                state(n).display().to_string(),
                // Both ends' control sockets share the test's run directory, so their
                // --name differ; the VM's quorum key must not.
                "--quorum-key".into(),
                format!("{prefix}-vm"),
            ]);
            if priv0 {
                let i = n as usize - 1;
                a.extend([
                    "--priv0".into(),
                    format!("{},{}", priv0_addr(&topo, i), priv0_addr(&topo, 1 - i)),
                ]);
            }
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };
        let (a1, a2) = (args(1), args(2));
        let (primary, standby) = start_protected(
            &topo,
            &files,
            &a1.iter().map(String::as_str).collect::<Vec<_>>(),
            &a2.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        QuorumPair {
            primary,
            standby,
            witnesses: ws,
            etcd,
            topo,
            files,
            prefix: prefix.to_string(),
            dir,
        }
    }

    /// [`Self::start`], then kv load until `acks` writes are acknowledged.
    pub fn loaded(prefix: &str, witnesses: usize, acks: u64, extra: &[&str]) -> (Self, LoadClient) {
        QuorumPair::start(prefix, witnesses, extra).load(acks)
    }

    /// Starts kv load from the client and waits for `acks` acknowledged writes.
    pub fn load(self, acks: u64) -> (Self, LoadClient) {
        let qp = self;
        let addr = SocketAddr::from((qp.topo.guest_ip(), KV_PORT));
        let client = LoadClient::start(LoadConfig::new(qp.topo.client_ns(), addr)).unwrap();
        client
            .wait_acks(acks, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{e}\n{}", qp.logs()));
        (qp, client)
    }

    pub fn logs(&self) -> String {
        format!(
            "--- primary stderr:\n{}\n--- standby stderr:\n{}",
            self.primary.tail(40),
            self.standby.tail(40)
        )
    }

    /// Every A-Link of PM `i` down or up.
    pub fn set_alinks(&self, i: usize, up: bool) {
        for k in 0..self.topo.alinks() {
            self.topo.set_alink(i, k, up).unwrap();
        }
    }

    /// Drops (or stops dropping) everything PM `i` sends on its A-Links: a blackhole
    /// route to the peer's end of each link in PM `i`'s namespace (iproute2 only; no
    /// netem or netfilter module needed). What the peer sends still arrives: an
    /// asymmetric link.
    pub fn drop_alinks_egress(&self, i: usize, drop: bool) {
        for k in 0..self.topo.alinks() {
            let peer = self.topo.alink_addr(1 - i, k).ip();
            let mut cmd = twinrun_lab::netns::command_in(self.topo.pm_ns(i), "ip");
            cmd.args(["route", if drop { "add" } else { "del" }, "blackhole"])
                .arg(format!("{peer}/32"));
            let o = cmd.output().unwrap();
            assert!(
                o.status.success(),
                "ip route blackhole {peer} in {}: {}",
                self.topo.pm_ns(i),
                super::output_text(&o)
            );
        }
    }

    /// PM `i`'s end of the private network (priv0) down or up (the other end loses
    /// its carrier).
    pub fn set_priv0(&self, i: usize, up: bool) {
        twinrun_lab::ip::set_up(self.topo.pm_ns(i), &priv0_if(&self.topo, i), up).unwrap();
    }

    /// Waits until the client has `n` more acknowledged writes than now.
    pub fn progress(&self, client: &LoadClient, n: u64, what: &str) {
        // `wait_acks` counts from now (it was given acks + n: it waited for more than
        // twice the writes asked, a long wait under load).
        client
            .wait_acks(n, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", self.logs()));
    }

    /// The client's acknowledged writes are all there and the console stream seen
    /// outside is one history.
    pub fn check_client_and_console(&self, client: LoadClient, tag: &str) {
        let rep = client.finish().unwrap();
        let logs = self.logs();
        check_load(&rep, &read_console(&self.files.console), Expect::BASIC)
            .unwrap_or_else(|e| panic!("{tag}: {e} (two histories?)\n{logs}"));
    }

    /// The generation recorded in node `n`'s quorum state file (1: primary, 2: standby).
    pub fn recorded_generation(&self, n: u64) -> u64 {
        let p = self.dir.path().join(format!("node{n}.quorum"));
        let text = fs::read_to_string(&p).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("generation "))
            .and_then(|g| g.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The elected witness recorded in node `n`'s quorum state file ("preferred" when
    /// none is recorded).
    pub fn recorded_elected(&self, n: u64) -> String {
        let p = self.dir.path().join(format!("node{n}.quorum"));
        let text = fs::read_to_string(&p).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("elected "))
            .and_then(|e| e.split_whitespace().next().map(str::to_string))
            .unwrap_or_else(|| "preferred".into())
    }
}

/// etcd's client port on its host.
pub const ETCD_PORT: u16 = 2379;

/// A real etcd (Debian's etcd-server) on witness host 0 of the management network,
/// with its data dir in the test's directory, and the pair's quorum config for it.
/// Its heartbeat (10 ms) and election timeout (100 ms) allow a 1 s lease (1.5 x the
/// election timeout, in whole seconds), renewed every 200 ms with a 100 ms margin, as
/// quorum/tests/etcd.rs. Killed with the test (the lab's `Proc`).
pub struct EtcdServer {
    pub url: String,
    /// The `[quorum]` TOML both PMs get with `--quorum-config`.
    pub config: PathBuf,
    proc: Option<Proc>,
}

impl EtcdServer {
    fn start(topo: &Topology, dir: &Path) -> EtcdServer {
        super::require_tool("etcd", "etcd-server");
        let host = topo.witness(0).unwrap();
        let url = format!("http://{}:{ETCD_PORT}", host.ip);
        let peer = format!("http://{}:{}", host.ip, ETCD_PORT + 1);
        let mut cmd = twinrun_lab::netns::command_in(host.ns.name(), "etcd");
        cmd.args(["--name", "q", "--data-dir"])
            .arg(dir.join("etcd-data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("q={peer}")])
            .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .stdout(Stdio::null());
        let proc = Proc::spawn_logged("etcd", &mut cmd, &dir.join("etcd.stderr"))
            .unwrap_or_else(|e| panic!("cannot run etcd (Debian package etcd-server): {e}"));
        let addr = SocketAddr::from((host.ip, ETCD_PORT));
        let t0 = Instant::now();
        // Serving once its client port accepts (a one-member cluster elects itself at
        // once); the PMs' clients retry anyway.
        while twinrun_lab::netns::command_in(host.ns.name(), "bash")
            .args([
                "-c",
                &format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port()),
            ])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "etcd did not listen on {addr}: {}",
                fs::read_to_string(dir.join("etcd.stderr")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let config = dir.join("quorum-etcd.toml");
        fs::write(
            &config,
            format!(
                "[quorum]\ncluster = \"{CLUSTER}\"\nbackend = \"etcd\"\n\n[quorum.etcd]\n\
                 endpoints = [\"{url}\"]\n\n[quorum.timing]\nlease_ms = 1000\n\
                 renew_ms = 200\nmargin_ms = 100\n"
            ),
        )
        .unwrap();
        EtcdServer {
            url,
            config,
            proc: Some(proc),
        }
    }

    /// SIGKILL (its data dir stays).
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// UDP port of the priv0 heartbeat path on both PMs.
pub const PRIV0_PORT: u16 = 7450;
/// Third octet of the private network's subnet (the lab's A-Links use 1.., the
/// management network 200).
const PRIV0_SUBNET: u8 = 50;

fn priv0_if(topo: &Topology, i: usize) -> String {
    format!("{}q{}", topo.prefix, i + 1)
}

/// PM `i`'s address on the private network.
pub fn priv0_addr(topo: &Topology, i: usize) -> SocketAddr {
    SocketAddr::from(([10, topo.net, PRIV0_SUBNET, i as u8 + 1], PRIV0_PORT))
}

/// The private network: a veth pair between the PMs' namespaces (deleted with them).
fn add_priv0(topo: &Topology) {
    use twinrun_lab::ip::{add_addr, add_veth};
    let (a, b) = (priv0_if(topo, 0), priv0_if(topo, 1));
    add_veth(topo.pm_ns(0), &a, topo.pm_ns(1), &b).unwrap();
    for (i, dev) in [(0, &a), (1, &b)] {
        let ip = priv0_addr(topo, i).ip();
        add_addr(topo.pm_ns(i), dev, &format!("{ip}/24")).unwrap();
    }
}

/// Watches PM `i`'s TAP for `d`: the frames it wrote meanwhile (0: it released nothing).
pub fn frames_during(topo: &Topology, i: usize, d: Duration) -> u64 {
    let before = tap_frames(topo, i);
    let t0 = Instant::now();
    while t0.elapsed() < d {
        std::thread::sleep(Duration::from_millis(50));
    }
    tap_frames(topo, i) - before
}
