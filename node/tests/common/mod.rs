//! Harness of twinrund's integration tests: real `twinrund` processes (each with its
//! own config, state and run directories, ports and loopback addresses), the real
//! `twinrun` binary for their VMMs, the built test guest. Everything a test starts is
//! killed and removed on drop, also when the test fails; VMM processes are found by
//! their pid files and killed too.
#![allow(dead_code)] // each test binary uses a different part

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use twinrun_lab::node_toml::NodeToml;
pub use twinrund::client::Client;
use twinrund::model::{Role, VmView};

pub const ADMIN: &str = "admin-token-0123456789";
pub const READER: &str = "reader-token-0123456789";
pub const SECRET: &str = "cluster-secret-0123456789abcdef";

pub use twinrun_lab::guest::repo_root;

pub mod lab_cluster;

/// The `twinrund` binary cargo built for these tests.
pub fn twinrund_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_twinrund"))
}

/// The `twinrun` binary (another package's): `$TWINRUN_BIN`, else the one a workspace
/// build left in the target directory (`cargo nextest run --workspace` builds it for
/// the root package's tests), else built once here. A `cargo test -p twinrund` after a
/// change to the CLI uses the binary as last built: build the workspace first, or
/// set `$TWINRUN_BIN`. (Building it from here each time would relink it whenever the
/// two packages' feature sets differ, ~30 s.)
pub fn twinrun_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("TWINRUN_BIN") {
            return Ok(PathBuf::from(p));
        }
        // The test binary lives in target/<profile>/deps; twinrun in target/debug.
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let target = exe
            .ancestors()
            .find(|a| a.file_name().is_some_and(|n| n == "target"))
            .map(Path::to_path_buf)
            .unwrap_or_else(|| repo_root().join("target"));
        let p = target.join("debug/twinrun");
        if p.is_file() {
            return Ok(p);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "-p", "twinrun", "--bin", "twinrun"])
            .current_dir(repo_root())
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "building twinrun failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{} is missing after the build", p.display()))
        }
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The test guest ELF (`$TWINRUN_GUEST`, or built once per test process by
/// `twinrun_lab::guest`); panics with cargo's output when the build fails.
pub fn guest_elf() -> PathBuf {
    twinrun_lab::guest::guest_elf().unwrap_or_else(|e| panic!("{e}"))
}

/// A free TCP port on `ip` (bound then released: a later bind may still race, but
/// every test asks the kernel, so two tests never pick the same fixed port).
pub fn free_port(ip: &str) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind port 0")
}

/// A base for A-Link ports with `span` free ports after it (checked on both IPs).
pub fn free_port_range(ips: &[&str], span: u16) -> u16 {
    'outer: for _ in 0..200 {
        let base = free_port("127.0.0.1");
        if base > u16::MAX - span {
            continue;
        }
        for p in base..base + span {
            for ip in ips {
                if TcpListener::bind((*ip, p)).is_err() {
                    continue 'outer;
                }
            }
        }
        return base;
    }
    panic!("no free port range");
}

/// A two-node cluster's addresses and settings, unique to this test.
pub struct ClusterPlan {
    pub dir: tempfile::TempDir,
    pub cluster: String,
    pub names: [String; 2],
    pub api: [SocketAddr; 2],
    pub link: [SocketAddr; 2],
    pub alink_ip: [String; 2],
    pub port_base: u16,
    pub max_restart: u32,
    pub boot_grace_ms: u64,
    /// Serve the API over TLS: (certificate, key) PEM files.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// A `[quorum]` table appended to both configs (empty: mode "none").
    pub quorum: String,
    /// Kills the daemons and the VMMs of their pid files if this test is killed.
    pub reaper: twinrun_lab::Reaper,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl ClusterPlan {
    pub fn new() -> ClusterPlan {
        // Short paths: run dirs hold Unix sockets (108-byte limit).
        let dir = tempfile::Builder::new()
            .prefix("twd")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        // 127.x.y.z: distinct loopback addresses per test process and node, so the
        // two nodes' A-Link listeners can use the same ports.
        let pid = std::process::id();
        let (b, c) = ((pid % 200 + 20) as u8, ((pid / 200) % 250) as u8);
        let ips = [
            format!("127.{b}.{c}.{}", 2 * n + 1),
            format!("127.{b}.{c}.{}", 2 * n + 2),
        ];
        let port = |ip: &str| SocketAddr::new(ip.parse().expect("ip"), free_port(ip));
        let reaper = twinrun_lab::Reaper::start().expect("reaper");
        for i in 1..=2 {
            let pids = dir.path().join(format!("n{i}/run/pids"));
            reaper.pid_files(&pids).expect("reaper");
        }
        // Images, logs and state of both nodes: removed if this test is killed.
        reaper.directory(dir.path()).expect("reaper");
        ClusterPlan {
            cluster: format!("test-{pid}-{n}"),
            names: ["pm1".into(), "pm2".into()],
            api: [port(&ips[0]), port(&ips[1])],
            link: [port(&ips[0]), port(&ips[1])],
            port_base: free_port_range(&[&ips[0], &ips[1]], 64),
            alink_ip: ips,
            dir,
            max_restart: 2,
            boot_grace_ms: 1500,
            tls: None,
            quorum: String::new(),
            reaper,
        }
    }

    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("n{}", i + 1))
    }

    pub fn config_path(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("node.toml")
    }

    /// Writes node `i`'s config, secret and tokens files.
    pub fn write_config(&self, i: usize) -> PathBuf {
        let d = self.node_dir(i);
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("secret"), SECRET).expect("secret");
        std::fs::write(
            d.join("tokens"),
            format!("admin {ADMIN}\nread-only {READER}\n"),
        )
        .expect("tokens");
        let j = 1 - i;
        let text = NodeToml {
            cluster: self.cluster.clone(),
            node: self.names[i].clone(),
            peer: self.names[j].clone(),
            dir: d.clone(),
            secret_file: d.join("secret"),
            tokens_file: d.join("tokens"),
            twinrun_bin: twinrun_bin(),
            guest_elf: guest_elf(),
            api: self.api[i],
            link: self.link[i],
            peer_api: self.api[j],
            peer_link: self.link[j],
            alinks: vec![(
                self.alink_ip[i].parse().expect("ip"),
                self.alink_ip[j].parse().expect("ip"),
            )],
            port_base: self.port_base,
            network: None,
            max_restart: self.max_restart,
            restart_window_s: Some(600),
            boot_grace_ms: self.boot_grace_ms,
            tls: self.tls.clone(),
            extra: self.quorum.clone(),
        }
        .render();
        let p = self.config_path(i);
        std::fs::write(&p, text).expect("config");
        p
    }

    pub fn client(&self, i: usize, token: &str) -> Client {
        match &self.tls {
            Some((cert, _)) => {
                Client::with_ca(&format!("https://{}", self.api[i]), token, cert).expect("CA")
            }
            None => Client::new(&format!("http://{}", self.api[i]), token),
        }
    }
}

/// A running `twinrund`; SIGKILLed on drop.
pub struct Daemon {
    pub child: Option<Child>,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts node `i` of `plan` and waits until its API answers.
    pub fn start(plan: &ClusterPlan, i: usize) -> Daemon {
        Self::start_with(plan, i, &[])
    }

    pub fn start_with(plan: &ClusterPlan, i: usize, env: &[(&str, &str)]) -> Daemon {
        let cfg = plan.write_config(i);
        let log = plan.node_dir(i).join("twinrund.log");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log");
        let child = Command::new(twinrund_bin())
            .arg("--config")
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log"))
            .stderr(f)
            .spawn()
            .expect("spawn twinrund");
        plan.reaper.pid_of(child.id()).expect("reaper");
        let d = Daemon {
            child: Some(child),
            log,
        };
        let c = plan.client(i, READER);
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Err(e) = c.nodes() {
            assert!(
                Instant::now() < deadline,
                "twinrund did not serve its API ({e}):\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&mut self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill(2) on our own unreaped child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        self.signal(libc::SIGTERM);
        let mut c = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills every VMM the plan's nodes started (from their pid files) when dropped.
pub struct VmmReaper<'a>(pub &'a ClusterPlan);

impl Drop for VmmReaper<'_> {
    fn drop(&mut self) {
        for i in 0..2 {
            for pid in vmm_pids(self.0, i) {
                // SAFETY: kill(2); the pid comes from our own pid file and the VMM was
                // started by this test's daemon (a stale pid is at worst a no-op here,
                // tests run as root in their own process tree).
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// Pids of the VMMs node `i`'s pid files name.
pub fn vmm_pids(plan: &ClusterPlan, i: usize) -> Vec<u32> {
    let dir = plan.node_dir(i).join("run/pids");
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter_map(|v| v["pid"].as_u64().map(|p| p as u32))
        .collect()
}

pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next()
                .unwrap_or("");
            state != "Z" && state != "X"
        })
        .unwrap_or(false)
}

/// Polls `f` until it returns Some, or panics after `timeout` with `what` and `ctx()`.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
    ctx: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\n{}",
            ctx()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Both daemons' logs, for the message of a wait that failed.
pub fn logs(d1: &Daemon, d2: &Daemon) -> String {
    format!("--- pm1:\n{}\n--- pm2:\n{}", d1.log_text(), d2.log_text())
}

/// Whether the node `c` speaks to sees its peer online.
pub fn peer_online(c: &Client) -> bool {
    c.nodes()
        .is_ok_and(|n| n[1].state == twinrund::model::NodeState::Online)
}

/// Both nodes' daemons, returned once they have met (each sees the other online).
pub fn start_both(plan: &ClusterPlan, timeout: Duration) -> (Daemon, Daemon) {
    let d1 = Daemon::start(plan, 0);
    let d2 = Daemon::start(plan, 1);
    let (c1, c2) = (plan.client(0, READER), plan.client(1, READER));
    wait_for(
        timeout,
        "the daemons to meet",
        || (peer_online(&c1) && peer_online(&c2)).then_some(()),
        || logs(&d1, &d2),
    );
    (d1, d2)
}

/// A VM spec (TOML) of the test guest.
pub fn spec_toml(
    name: &str,
    protection: &str,
    preferred: &str,
    workloads: &[&str],
    disks: bool,
) -> String {
    let wl: Vec<String> = workloads.iter().map(|w| format!("\"{w}\"")).collect();
    format!(
        r#"name = "{name}"
vcpus = 1
mem_mib = 64
protection = "{protection}"
preferred_node = "{preferred}"
autostart = true
failback = "manual"
{disks}
[payload]
kind = "test-guest"
workloads = [{wl}]
counter_rate = 50
"#,
        disks = if disks {
            "disks = [{ size_mib = 8 }]"
        } else {
            ""
        },
        wl = wl.join(", ")
    )
}

pub fn spec(
    name: &str,
    protection: &str,
    preferred: &str,
    workloads: &[&str],
    disks: bool,
) -> twinrund::model::VmSpec {
    toml::from_str(&spec_toml(name, protection, preferred, workloads, disks)).expect("spec")
}

/// Bytes in the console log of `vm` on `node` (0 before it exists).
pub fn console_len(plan: &ClusterPlan, node: usize, vm: &str) -> u64 {
    std::fs::metadata(
        plan.node_dir(node)
            .join(format!("state/vms/{vm}/console.log")),
    )
    .map_or(0, |m| m.len())
}

/// The console log (the guest's output) of `vm` on `node`.
pub fn console_path(plan: &ClusterPlan, node: usize, vm: &str) -> PathBuf {
    plan.node_dir(node)
        .join(format!("state/vms/{vm}/console.log"))
}

/// Waits until the console of `vm` on `node` grows (the guest runs).
pub fn console_grows(plan: &ClusterPlan, node: usize, vm: &str, ctx: &dyn Fn() -> String) {
    let before = console_len(plan, node, vm);
    wait_for(
        Duration::from_secs(90),
        &format!("{vm}'s console on node {} to grow", node + 1),
        || (console_len(plan, node, vm) > before).then_some(()),
        || format!("{}\n{}", console_path(plan, node, vm).display(), ctx()),
    );
}

/// (role, pid, protected) of `vm`'s VMM on `node`, as this view has it.
pub fn vmm(v: &VmView, node: &str) -> Option<(Role, u32, bool)> {
    v.vmms
        .iter()
        .find(|m| m.node == node)
        .map(|m| (m.role, m.pid, m.protected))
}
