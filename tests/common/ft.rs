//! FT-mode harness: the two-PM topology, `twinrun vm run --role ...` child processes, a
//! RESP client living in the client namespace, and the checks on the console stream and
//! the disk image. Used by tests/ft_failover.rs.
//!
//! Topology (nothing is added to the root namespace; every name carries a unique prefix):
//!
//! ```text
//!  <p>-p1 (primary PM)                 <p>-ln (LAN)                <p>-p2 (standby PM)
//!  TAP <p>t1 -- bridge <p>b1 -- <p>v1 == <p>w1 +                +  <p>w2 == <p>v2 -- bridge <p>b2 -- TAP <p>t2
//!                                              bridge <p>L -----+
//!  <p>-cl (client) <p>c 10.77.0.1/24 ========= <p>x +
//!
//!  A-Links: <p>a0 10.88.0.1/24 (p1) == <p>z0 10.88.0.2/24 (p2)
//!           <p>a1 10.88.1.1/24 (p1) == <p>z1 10.88.1.2/24 (p2)
//! ```
//!
//! Both VMs use the same MAC and guest IP 10.77.0.2 (the standby's copy only runs after a
//! failover, when it announces the MAC on its own port).

#![allow(dead_code)] // not every test uses every part

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::net::{ip, NetNs};
use crate::common::{guest_elf, twinrun_bin, unique_prefix};
use twinrun_guest_abi as abi;

pub const GUEST_IP: &str = "10.77.0.2";
pub const CLIENT_IP: &str = "10.77.0.1";
pub const MAC: &str = "02:00:00:77:00:02";
pub const ALINK_PORT: u16 = 7100;
pub const DISK_BYTES: u64 = 8 << 20;

/// The two PMs, LAN and client namespaces; dropping it deletes every namespace (and so
/// every interface in them). Kill the VMMs first (declare `Pm`s after the topology).
pub struct FtTopology {
    pub prefix: String,
    /// TAP of each PM (index 0 = pm1, 1 = pm2).
    pub taps: [String; 2],
    /// A-Link interfaces: `alink_ifs[pm][link]`.
    pub alink_ifs: [[String; 2]; 2],
    /// The LAN-side port (in the LAN namespace) of each PM's uplink.
    pub lan_ports: [String; 2],
    // Drop order: PMs, LAN, client.
    pub pm: [NetNs; 2],
    pub lan: NetNs,
    pub client: NetNs,
}

impl FtTopology {
    pub fn new() -> FtTopology {
        let p = unique_prefix();
        let pm = [
            NetNs::new(&format!("{p}-p1")),
            NetNs::new(&format!("{p}-p2")),
        ];
        let lan = NetNs::new(&format!("{p}-ln"));
        let client = NetNs::new(&format!("{p}-cl"));
        let ln = lan.name.as_str();
        let lbr = format!("{p}L");
        ip(&["-n", ln, "link", "add", &lbr, "type", "bridge"]);
        ip(&["-n", ln, "link", "set", &lbr, "up"]);
        let mut taps = [String::new(), String::new()];
        let mut lan_ports = [String::new(), String::new()];
        for (i, ns) in pm.iter().enumerate() {
            let n = i + 1;
            let (tap, br, v, w) = (
                format!("{p}t{n}"),
                format!("{p}b{n}"),
                format!("{p}v{n}"),
                format!("{p}w{n}"),
            );
            let ns = ns.name.as_str();
            ip(&[
                "-n", ns, "tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr",
            ]);
            ip(&["-n", ns, "link", "add", &br, "type", "bridge"]);
            ip(&[
                "-n", ns, "link", "add", &v, "type", "veth", "peer", "name", &w, "netns", ln,
            ]);
            ip(&["-n", ns, "link", "set", &tap, "master", &br]);
            ip(&["-n", ns, "link", "set", &v, "master", &br]);
            for d in [&tap, &br, &v] {
                ip(&["-n", ns, "link", "set", d, "up"]);
            }
            ip(&["-n", ln, "link", "set", &w, "master", &lbr]);
            ip(&["-n", ln, "link", "set", &w, "up"]);
            taps[i] = tap;
            lan_ports[i] = w;
        }
        let cl = client.name.as_str();
        let (c, x) = (format!("{p}c"), format!("{p}x"));
        ip(&[
            "-n", cl, "link", "add", &c, "type", "veth", "peer", "name", &x, "netns", ln,
        ]);
        ip(&["-n", ln, "link", "set", &x, "master", &lbr]);
        ip(&["-n", ln, "link", "set", &x, "up"]);
        ip(&[
            "-n",
            cl,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            &c,
        ]);
        ip(&["-n", cl, "link", "set", &c, "up"]);
        let mut alink_ifs: [[String; 2]; 2] = Default::default();
        // One /24 per link: 10.88.<link>.1 on pm1, .2 on pm2.
        #[allow(clippy::needless_range_loop)] // k names the interfaces and subnets too
        for k in 0..2 {
            let (a, z) = (format!("{p}a{k}"), format!("{p}z{k}"));
            let (n1, n2) = (pm[0].name.as_str(), pm[1].name.as_str());
            ip(&[
                "-n", n1, "link", "add", &a, "type", "veth", "peer", "name", &z, "netns", n2,
            ]);
            ip(&[
                "-n",
                n1,
                "addr",
                "add",
                &format!("10.88.{k}.1/24"),
                "dev",
                &a,
            ]);
            ip(&[
                "-n",
                n2,
                "addr",
                "add",
                &format!("10.88.{k}.2/24"),
                "dev",
                &z,
            ]);
            ip(&["-n", n1, "link", "set", &a, "up"]);
            ip(&["-n", n2, "link", "set", &z, "up"]);
            alink_ifs[0][k] = a;
            alink_ifs[1][k] = z;
        }
        FtTopology {
            prefix: p,
            taps,
            alink_ifs,
            lan_ports,
            pm,
            lan,
            client,
        }
    }

    /// `--alink local,peer` flags of PM `i` (0 or 1).
    pub fn alink_args(&self, i: usize) -> Vec<String> {
        let (me, peer) = if i == 0 { (1, 2) } else { (2, 1) };
        (0..2)
            .flat_map(|k| {
                [
                    "--alink".to_string(),
                    format!("10.88.{k}.{me}:{ALINK_PORT},10.88.{k}.{peer}:{ALINK_PORT}"),
                ]
            })
            .collect()
    }

    /// The A-Link address of PM `i` on link `k`.
    pub fn alink_addr(&self, i: usize, k: usize) -> SocketAddr {
        format!("10.88.{k}.{}:{ALINK_PORT}", i + 1).parse().unwrap()
    }

    /// Sets A-Link interface `k` of PM `i` down or up.
    pub fn set_alink(&self, i: usize, k: usize, up: bool) {
        ip(&[
            "-n",
            &self.pm[i].name,
            "link",
            "set",
            &self.alink_ifs[i][k],
            if up { "up" } else { "down" },
        ]);
    }

    /// Bytes sent so far on A-Link interface `k` of PM `i`.
    pub fn alink_tx_bytes(&self, i: usize, k: usize) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.pm[i].name, "cat"])
            .arg(format!(
                "/sys/class/net/{}/statistics/tx_bytes",
                self.alink_ifs[i][k]
            ))
            .output()
            .expect("read tx_bytes");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("tx_bytes: {}", String::from_utf8_lossy(&out.stderr)))
    }
}

impl Default for FtTopology {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `f` on a new thread that first joins network namespace `ns` (only that thread
/// moves: setns(2) with CLONE_NEWNET changes the calling thread's namespace).
pub fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        enter_netns(&path);
        f()
    })
}

fn enter_netns(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on a valid namespace fd we own, for this thread only; no memory is
    // shared with the kernel.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", io::Error::last_os_error());
}

/// One PM's `twinrun vm run --role ...` process (run with `ip netns exec`, which execs,
/// so the child's pid is the VMM's). SIGKILLed and reaped on drop.
pub struct Pm {
    child: Option<Child>,
    pub stderr_path: PathBuf,
    pub role: &'static str,
}

/// The workload flags of [`Pm::spawn`].
pub const DEFAULT_WORKLOAD: &[&str] = &[
    "--mem-mib",
    "64",
    "--workload",
    "kv,counter,dirty,disk",
    "--counter-rate",
    "500",
    "--dirty-pages",
    "512",
    "--dirty-rate",
    "20000",
    "--disk-rate",
    "200",
    "--disk-flush-every",
    "1",
];

/// Files and knobs of one FT pair.
pub struct PairFiles {
    pub dir: PathBuf,
    pub console: PathBuf,
    pub secret: PathBuf,
    pub disks: [PathBuf; 2],
}

impl PairFiles {
    /// Fresh disk images (the standby's a copy of the primary's), secret, console path.
    pub fn new(dir: &Path) -> PairFiles {
        let disks = [dir.join("pm1.img"), dir.join("pm2.img")];
        File::create(&disks[0])
            .unwrap()
            .set_len(DISK_BYTES)
            .unwrap();
        std::fs::copy(&disks[0], &disks[1]).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, b"ft-failover-test-cluster-secret-0123456789\n").unwrap();
        PairFiles {
            dir: dir.to_path_buf(),
            console: dir.join("console.log"),
            secret,
            disks,
        }
    }
}

impl Pm {
    /// Starts PM `i` (0 = primary on pm1, 1 = standby on pm2).
    pub fn spawn(topo: &FtTopology, files: &PairFiles, i: usize, extra: &[&str]) -> Pm {
        Self::spawn_with(topo, files, i, DEFAULT_WORKLOAD, extra)
    }

    /// [`Pm::spawn`] with other workload flags than [`DEFAULT_WORKLOAD`].
    pub fn spawn_with(
        topo: &FtTopology,
        files: &PairFiles,
        i: usize,
        workload: &[&str],
        extra: &[&str],
    ) -> Pm {
        let role = if i == 0 { "primary" } else { "standby" };
        Self::spawn_as(topo, files, i, role, workload, extra)
    }

    /// PM `i` in `role` (e.g. the old primary's PM restarted as the standby).
    pub fn spawn_as(
        topo: &FtTopology,
        files: &PairFiles,
        i: usize,
        role: &'static str,
        workload: &[&str],
        extra: &[&str],
    ) -> Pm {
        let stderr_path = if (i == 0) == (role == "primary") {
            files.dir.join(format!("{role}.stderr"))
        } else {
            files.dir.join(format!("{role}-pm{}.stderr", i + 1))
        };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &topo.pm[i].name])
            .arg(twinrun_bin())
            .args(["vm", "run", "--role", role])
            .args(topo.alink_args(i))
            .arg("--cluster-secret-file")
            .arg(&files.secret)
            // 8 misses, not the CLI's 4: these tests check what failover preserves, not
            // how fast a silent link is noticed (SIGKILL closes the sockets at once), and
            // the suite runs beside other VMs on 2 cores where a 200 ms window is tight.
            .args(["--heartbeat-ms", &heartbeat_ms(), "--heartbeat-misses", "8"])
            .arg("--guest")
            .arg(guest_elf())
            .args(workload)
            .arg("--disk")
            .arg(format!("{},serial=ftdisk", files.disks[i].display()))
            .args(["--net", &format!("{},{MAC}", topo.taps[i])])
            .args(["--kv-addr", &format!("{GUEST_IP}/24")])
            .arg("--console")
            .arg(format!("file:{}", files.console.display()))
            .args(extra)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(File::create(stderr_path.with_extension("stdout")).unwrap())
            .stderr(File::create(&stderr_path).unwrap());
        let child = cmd.spawn().expect("spawn twinrun");
        Pm {
            child: Some(child),
            stderr_path,
            role,
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => c.try_wait().ok().flatten().is_none(),
            None => false,
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
    }

    /// Waits until the log contains `needle` (checking the process is alive).
    pub fn wait_log(&mut self, needle: &str, timeout: Duration) -> Result<Duration, String> {
        let t0 = Instant::now();
        loop {
            if self.stderr().contains(needle) {
                return Ok(t0.elapsed());
            }
            if !self.alive() {
                return Err(format!(
                    "{} exited before logging {needle:?}; stderr:\n{}",
                    self.role,
                    tail(&self.stderr(), 40)
                ));
            }
            if t0.elapsed() > timeout {
                return Err(format!(
                    "{} did not log {needle:?} within {timeout:?}; stderr:\n{}",
                    self.role,
                    tail(&self.stderr(), 40)
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Pm {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
}

/// One RESP connection (commands sent as arrays of bulk strings).
pub struct Resp {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl Resp {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Resp> {
        let s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        Ok(Resp {
            r: BufReader::new(s.try_clone()?),
            w: s,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.w.local_addr()
    }

    pub fn cmd(&mut self, args: &[&[u8]]) -> io::Result<Reply> {
        let mut buf = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            buf.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            buf.extend_from_slice(a);
            buf.extend_from_slice(b"\r\n");
        }
        self.w.write_all(&buf)?;
        self.reply()
    }

    fn line(&mut self) -> io::Result<String> {
        let mut l = String::new();
        if self.r.read_line(&mut l)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by the server",
            ));
        }
        Ok(l.trim_end_matches(['\r', '\n']).to_string())
    }

    fn reply(&mut self) -> io::Result<Reply> {
        let l = self.line()?;
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("bad reply {l:?}"));
        let (t, rest) = l.split_at_checked(1).ok_or_else(bad)?;
        match t {
            "+" => Ok(Reply::Simple(rest.into())),
            "-" => Ok(Reply::Error(rest.into())),
            ":" => Ok(Reply::Int(rest.parse().map_err(|_| bad())?)),
            "$" => {
                let n: i64 = rest.parse().map_err(|_| bad())?;
                if n < 0 {
                    return Ok(Reply::Bulk(None));
                }
                let mut v = vec![0u8; n as usize + 2];
                io::Read::read_exact(&mut self.r, &mut v)?;
                v.truncate(n as usize);
                Ok(Reply::Bulk(Some(v)))
            }
            _ => Err(bad()),
        }
    }
}

/// What the load client saw.
#[derive(Debug, Default)]
pub struct ClientReport {
    /// Keys whose SET was acknowledged (value = `v<i>`), in order.
    pub sets_acked: Vec<u64>,
    /// INCRs acknowledged (each reply must be the previous + 1).
    pub incrs_acked: i64,
    /// Longest wait for one reply, and when (since the client started).
    pub max_reply: Duration,
    pub max_reply_at: Duration,
    /// Set when the load or the final check failed: what happened.
    pub error: Option<String>,
    /// Keys not readable with their value after the run (lost writes).
    pub lost: Vec<u64>,
    /// The final GET of the INCR counter.
    pub counter_final: Option<i64>,
    pub local_addr: Option<SocketAddr>,
}

/// A load client: SET k<i> v<i> / INCR ctr in a loop on ONE connection until `stop`,
/// then reads every acknowledged write back over the same connection.
pub struct LoadClient {
    pub acks: Arc<AtomicU64>,
    /// Longest reply wait in ms since the last `reset_max`.
    pub window_max_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<ClientReport>>,
    pub started: Instant,
}

impl LoadClient {
    pub fn start(client_ns: &str) -> LoadClient {
        let acks = Arc::new(AtomicU64::new(0));
        let window_max_ms = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let (a, m, s) = (acks.clone(), window_max_ms.clone(), stop.clone());
        let handle = in_netns(client_ns, move || client_loop(a, m, s, started));
        LoadClient {
            acks,
            window_max_ms,
            stop,
            handle: Some(handle),
            started,
        }
    }

    /// Waits until `n` more writes are acknowledged; Err after `timeout`.
    pub fn wait_acks(&self, n: u64, timeout: Duration) -> Result<Duration, String> {
        let t0 = Instant::now();
        let from = self.acks.load(Ordering::SeqCst);
        while self.acks.load(Ordering::SeqCst) < from + n {
            if t0.elapsed() > timeout || self.handle.as_ref().is_some_and(|h| h.is_finished()) {
                return Err(format!(
                    "client: {} of {n} acks within {timeout:?}",
                    self.acks.load(Ordering::SeqCst) - from
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(t0.elapsed())
    }

    pub fn finish(mut self) -> ClientReport {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .unwrap()
            .join()
            .unwrap_or_else(|_| panic!("client thread panicked"))
    }
}

impl Drop for LoadClient {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn client_loop(
    acks: Arc<AtomicU64>,
    window_max_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    started: Instant,
) -> ClientReport {
    let mut rep = ClientReport::default();
    let addr: SocketAddr = format!("{GUEST_IP}:6379").parse().unwrap();
    // The guest may still be coming up: retry the connect only, never once connected.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut c = loop {
        match Resp::connect(addr, Duration::from_secs(15)) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => {
                rep.error = Some(format!("connect: {e}"));
                return rep;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    rep.local_addr = c.local_addr().ok();
    let mut i = 0u64;
    let timed = |c: &mut Resp, args: &[&[u8]], rep: &mut ClientReport| {
        let t = Instant::now();
        let r = c.cmd(args);
        let d = t.elapsed();
        if d > rep.max_reply {
            rep.max_reply = d;
            rep.max_reply_at = t - started;
        }
        window_max_ms.fetch_max(d.as_millis() as u64, Ordering::SeqCst);
        r
    };
    while !stop.load(Ordering::SeqCst) {
        i += 1;
        let (k, v) = (format!("k{i}"), format!("v{i}"));
        match timed(&mut c, &[b"SET", k.as_bytes(), v.as_bytes()], &mut rep) {
            Ok(Reply::Simple(s)) if s == "OK" => rep.sets_acked.push(i),
            other => {
                rep.error = Some(format!("SET {k}: {other:?}"));
                return rep;
            }
        }
        acks.fetch_add(1, Ordering::SeqCst);
        match timed(&mut c, &[b"INCR", b"ctr"], &mut rep) {
            Ok(Reply::Int(n)) if n == rep.incrs_acked + 1 => rep.incrs_acked = n,
            other => {
                rep.error = Some(format!(
                    "INCR ctr after {} acknowledged: {other:?}",
                    rep.incrs_acked
                ));
                return rep;
            }
        }
        acks.fetch_add(1, Ordering::SeqCst);
    }
    // Read everything back over the same connection.
    for &i in &rep.sets_acked.clone() {
        let k = format!("k{i}");
        match c.cmd(&[b"GET", k.as_bytes()]) {
            Ok(Reply::Bulk(Some(v))) if v == format!("v{i}").as_bytes() => {}
            Ok(_) => rep.lost.push(i),
            Err(e) => {
                rep.error = Some(format!("GET {k} after the load: {e}"));
                return rep;
            }
        }
    }
    match c.cmd(&[b"GET", b"ctr"]) {
        Ok(Reply::Bulk(Some(v))) => {
            rep.counter_final = String::from_utf8_lossy(&v).parse().ok();
        }
        other => rep.error = Some(format!("GET ctr after the load: {other:?}")),
    }
    rep
}

/// What the console stream held.
#[derive(Debug, Default)]
pub struct ConsoleCheck {
    pub c_lines: u64,
    /// `D` summaries (dirty passes verified), all with `errors=0`.
    pub d_lines: u64,
    pub w_seqs: Vec<u64>,
    pub boots: u32,
    pub bytes: usize,
}

/// Checks the console stream as seen outside: no hole (NUL bytes of an unwritten range
/// of the positioned file) before the last complete line, `C` lines 1, 2, 3, ... with no
/// gap, duplicate or reordering, exactly one BOOT, no DIRTY-ERROR / PANIC / DISK-ERROR,
/// every `D` summary with `errors=0`.
pub fn check_console(bytes: &[u8]) -> Result<ConsoleCheck, String> {
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let whole = &bytes[..end];
    if let Some(hole) = whole.iter().position(|&b| b == 0) {
        return Err(format!(
            "a hole in the console stream at byte {hole} of {end}"
        ));
    }
    let text = std::str::from_utf8(whole).map_err(|e| format!("console not UTF-8: {e}"))?;
    let mut r = ConsoleCheck {
        bytes: end,
        ..Default::default()
    };
    let mut at = 0usize;
    for line in text.lines() {
        let start = at;
        at += line.len() + 1;
        for bad in ["DIRTY-ERROR", "PANIC", "DISK-ERROR"] {
            if line.starts_with(bad) {
                return Err(format!("at byte {start}: {line}"));
            }
        }
        if line.starts_with("D ") {
            if !line.ends_with(" errors=0") {
                return Err(format!("dirty self-check failed at byte {start}: {line}"));
            }
            r.d_lines += 1;
        }
        if line.starts_with("BOOT") {
            r.boots += 1;
        } else if let Some(n) = line.strip_prefix("C ") {
            let n: u64 = n
                .parse()
                .map_err(|_| format!("bad C line {line:?} at byte {start}"))?;
            if n != r.c_lines + 1 {
                return Err(format!(
                    "C line out of sequence at byte {start}: {n} after {} ({})",
                    r.c_lines,
                    if n <= r.c_lines {
                        "duplicate/reordered"
                    } else {
                        "gap"
                    }
                ));
            }
            r.c_lines = n;
        } else if let Some(n) = line.strip_prefix("W ") {
            r.w_seqs.push(
                n.parse()
                    .map_err(|_| format!("bad W line {line:?} at byte {start}"))?,
            );
        }
    }
    if r.boots != 1 {
        return Err(format!("{} BOOT lines (expected exactly one)", r.boots));
    }
    Ok(r)
}

/// Every record in `seqs` is intact in `img` (abi record format: magic, sequence,
/// FNV-1a 64 checksum over the sector with the checksum zeroed, fill pattern).
pub fn check_disk_records(img: &[u8], seqs: &[u64]) -> Result<(), String> {
    for &seq in seqs {
        let off = ((abi::DISK_FIRST_SECTOR + seq - 1) * 512) as usize;
        let sec = img
            .get(off..off + 512)
            .ok_or_else(|| format!("record {seq} beyond the image"))?;
        let magic = u64::from_le_bytes(sec[0..8].try_into().unwrap());
        let got_seq = u64::from_le_bytes(sec[8..16].try_into().unwrap());
        let sum = u64::from_le_bytes(sec[16..24].try_into().unwrap());
        if magic != abi::DISK_RECORD_MAGIC {
            return Err(format!("record {seq}: bad magic {magic:#x}"));
        }
        if got_seq != seq {
            return Err(format!("record {seq}: holds sequence {got_seq}"));
        }
        let mut z = sec.to_vec();
        z[16..24].fill(0);
        if abi::fnv1a64(&z) != sum {
            return Err(format!("record {seq}: bad checksum"));
        }
        for (i, b) in sec.iter().enumerate().skip(24) {
            if *b != (seq as u8).wrapping_add(i as u8) {
                return Err(format!("record {seq}: byte {i} is {b:#x}"));
            }
        }
    }
    Ok(())
}

/// A small xorshift: kill moments vary per run and a seed replays them.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Shared lines of the console file (for waiting on lines without re-reading).
pub fn read_console(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

/// Count of complete `C` lines so far (no checks).
pub fn count_c(bytes: &[u8]) -> u64 {
    bytes
        .split(|&b| b == b'\n')
        .filter(|l| l.starts_with(b"C "))
        .count() as u64
}

/// Waits for a console line starting with `prefix`.
pub fn wait_console(
    path: &Path,
    prefix: &str,
    timeout: Duration,
    pm: &mut Pm,
) -> Result<(), String> {
    let t0 = Instant::now();
    loop {
        let b = read_console(path);
        if b.split(|&c| c == b'\n')
            .any(|l| l.starts_with(prefix.as_bytes()))
        {
            return Ok(());
        }
        if !pm.alive() || t0.elapsed() > timeout {
            return Err(format!(
                "no console line {prefix:?} within {:?} (alive: {}); {} stderr:\n{}",
                t0.elapsed(),
                pm.alive(),
                pm.role,
                tail(&pm.stderr(), 40)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A-Link heartbeat interval for the pair: `FT_HEARTBEAT_MS`, default 50 (the CLI's).
pub fn heartbeat_ms() -> String {
    std::env::var("FT_HEARTBEAT_MS").unwrap_or_else(|_| "50".into())
}

/// Captures Ethernet frames on interface `ifname` of namespace `ns` with an AF_PACKET
/// socket (on its own thread, started before this returns) until `pick` returns
/// something or `timeout` passes.
pub fn capture<T: Send + 'static>(
    ns: &str,
    ifname: &str,
    timeout: Duration,
    pick: impl Fn(&[u8]) -> Option<T> + Send + 'static,
) -> std::thread::JoinHandle<Option<T>> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let ifname = std::ffi::CString::new(ifname).unwrap();
    let handle = in_netns(ns, move || {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the fd is owned below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: fd is a fresh socket nobody else owns.
        let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: if_nametoindex reads a NUL-terminated string we own.
        let ifindex = unsafe { libc::if_nametoindex(ifname.as_ptr()) };
        assert!(ifindex > 0, "no interface {ifname:?}");
        // SAFETY: sockaddr_ll is plain old data; zeroed is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: bind with a properly sized sockaddr_ll that lives across the call.
        let rc = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                std::ptr::addr_of!(sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "bind AF_PACKET: {}", io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: setsockopt with a timeval that lives across the call.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let _ = ready_tx.send(());
        let mut buf = vec![0u8; 256 << 10];
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            // SAFETY: recv into our buffer, bounded by its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n <= 0 {
                continue;
            }
            if let Some(f) = pick(&buf[..n as usize]) {
                return Some(f);
            }
        }
        None
    });
    // Capturing before the caller acts (or the socket failed: the join reports it).
    let _ = ready_rx.recv_timeout(Duration::from_secs(5));
    handle
}

/// One complete A-Link session frame (a Data or Heartbeat frame: magic "ALNK", kind 3
/// or 4) sent to TCP port `port` on `ifname` of `ns`: its bytes (header and body), to
/// be replayed.
pub fn capture_session_frame(
    ns: &str,
    ifname: &str,
    port: u16,
    timeout: Duration,
) -> Option<Vec<u8>> {
    capture(ns, ifname, timeout, move |eth| alink_frame_in(eth, port))
        .join()
        .unwrap()
}

/// An Ethernet frame from `mac` with EtherType RARP (0x8035): the announcement a
/// failed-over VM's VMM sends (as QEMU does after migration) so the LAN learns its new
/// port.
pub fn is_rarp_from(eth: &[u8], mac: [u8; 6]) -> bool {
    eth.len() >= 14 && eth[6..12] == mac && eth[12..14] == [0x80, 0x35]
}

pub fn mac_bytes() -> [u8; 6] {
    let mut m = [0u8; 6];
    for (i, p) in MAC.split(':').enumerate() {
        m[i] = u8::from_str_radix(p, 16).unwrap();
    }
    m
}

/// The A-Link session frame at the start of the TCP payload of this Ethernet frame, if
/// it is IPv4/TCP to `port` and holds a whole Data/Heartbeat frame.
fn alink_frame_in(eth: &[u8], port: u16) -> Option<Vec<u8>> {
    if eth.len() < 14 || eth[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &eth[14..];
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if ip.get(9) != Some(&6) {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let tcp = ip.get(ihl..total.min(ip.len()))?;
    if u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]) != port {
        return None;
    }
    let off = usize::from(tcp.get(12)? >> 4) * 4;
    let payload = tcp.get(off..)?;
    if payload.len() < 56 || &payload[0..4] != b"ALNK" || !matches!(payload[5], 3 | 4) {
        return None;
    }
    let body_len = u32::from_le_bytes(payload[28..32].try_into().ok()?) as usize;
    payload.get(..56 + body_len).map(<[u8]>::to_vec)
}
