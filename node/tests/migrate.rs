//! Live migration by the daemons (`twinrun vm migrate`), real daemons and VMMs: two
//! `twinrund` in PM namespaces (`twinrun_lab::Topology` with a management network, the
//! guests' TAPs on each PM's bridge), an unprotected VM of the test guest (kv +
//! counter + disk) with a RESP client on ONE TCP connection from the client namespace.
//!
//! - `unprotected_vm_migrates_back_and_forth_under_kv_load`: MIGRATE_RUNS migrations
//!   (default 4), each by the CLI (`twinrun vm migrate`, its progress bar fed by the
//!   API) asked of the node the VM runs on, alternately with and without `--to`.
//!   Checked after each: the CLI says it migrated, the record names the target the
//!   owner, exactly one VMM runs it (on the target), the guest's counter goes on, the
//!   client gets answers on its connection. At the end: the connection survived, no
//!   acknowledged write lost, the INCR counter exact, and the console stream (each
//!   node's console file holds the bytes at their stream positions) has no gap, no
//!   duplicate and one BOOT.
//! - `failed_migrations_leave_the_vm_on_the_source`: the receiving VMM killed during the
//!   pre-copy, and every A-Link cut during it (the migration given up when the source
//!   loses sync or is not in sync in time is the step function's, see the goldens; here
//!   the A-Links stay down until the receiving VMM's session is lost): the VM runs on at
//!   the source on the same connection, and a later migration succeeds.
//! - `ft_vm_migrates_by_a_planned_role_swap`: an FT VM moved to pm2 and back by
//!   `twinrun vm migrate` (a planned role swap each way, the target its new preferred
//!   node, protected again the other way round).
//! - `ha_vm_migrates_back_and_forth_under_kv_load`: an HA VM with the kv client moved
//!   MIGRATE_RUNS times by `twinrun vm migrate` (its primary's VMM: pre-copy to the
//!   in-sync standby, then the handover): protected again the other way round after
//!   each, the connection, every acknowledged write, one BOOT and a whole console.
//! - `ft_vm_migrates_with_a_witness` (issue 15): the same FT migrations with a real
//!   `twinrun witness` as the pair's quorum: each swap hands the lease over (the
//!   target's VMM takes the next generation by compare-and-set), so the migration is
//!   no longer refused for a VM with a witness.
mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{guest_elf, twinrun_bin, twinrund_bin, wait_for, ADMIN, SECRET};
use twinrun_lab::console::count_c;
use twinrun_lab::kvload::{LoadClient, LoadConfig};
use twinrun_lab::node_toml::NodeToml;
use twinrun_lab::topology::KV_PORT;
use twinrun_lab::verdict::{check_load, Expect};
use twinrun_lab::{Proc, Topology};
use twinrund::client::Client;
use twinrund::model::{NodeState, Role, VmView};

const API_PORT: u16 = 7480;
const LINK_PORT: u16 = 7481;
const VM: &str = "mover";

struct Cluster {
    daemons: Vec<Proc>,
    /// The quorum witness, when the cluster runs with one.
    _witness: Option<Proc>,
    dirs: [PathBuf; 2],
    topo: Topology,
    _dir: tempfile::TempDir,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            d.kill();
        }
        // The VMMs live outside the daemons' process trees on purpose.
        for dir in &self.dirs {
            for pid in vmm_pids(dir) {
                // SAFETY: kill(2) of a pid from a pid file this test's daemon wrote.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn vmm_pids(dir: &Path) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir(dir.join("run/pids")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter_map(|v| v["pid"].as_i64().map(|p| p as i32))
        .collect()
}

fn config(topo: &Topology, i: usize, dir: &Path, cluster: &str, quorum: &str) -> String {
    let mut n = NodeToml::on_topology(
        topo,
        i,
        cluster,
        dir.to_path_buf(),
        API_PORT,
        LINK_PORT,
        "mg",
    )
    .expect("management network");
    n.secret_file = dir.join("../secret");
    n.tokens_file = dir.join("../tokens");
    n.twinrun_bin = twinrun_bin();
    n.guest_elf = guest_elf();
    n.extra = quorum.to_string();
    n.render()
}

fn guest_ip(topo: &Topology) -> Ipv4Addr {
    let o = topo.guest_ip().octets();
    Ipv4Addr::new(o[0], o[1], o[2], 20)
}

impl Cluster {
    fn start() -> Cluster {
        Self::start_opts(false)
    }

    /// With a `twinrun witness` on the management network as the pair's quorum.
    fn start_opts(witness: bool) -> Cluster {
        let pid = std::process::id();
        let dir = tempfile::Builder::new()
            .prefix("twm")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let mut b = Topology::builder()
            .prefix(&format!("mg{}", pid % 100_000))
            .management();
        if witness {
            b = b.witnesses(1);
        }
        let topo = b.build().expect("topology");
        std::fs::write(dir.path().join("secret"), SECRET).unwrap();
        std::fs::write(dir.path().join("tokens"), format!("admin {ADMIN}\n")).unwrap();
        std::fs::write(dir.path().join("token"), ADMIN).unwrap();
        let dirs = [dir.path().join("pm1"), dir.path().join("pm2")];
        let cluster = format!("mig{pid}");
        let (witness, quorum) = if witness {
            let w = topo.witness(0).expect("witness host");
            let addr = SocketAddr::from((w.ip, 4557));
            let mut cmd = w.ns.command(twinrun_bin());
            cmd.args(["witness", "--listen", &addr.to_string(), "--state-dir"])
                .arg(dir.path().join("witness"))
                .arg("--cluster")
                .arg(format!("{cluster}={}", dir.path().join("secret").display()));
            let p = Proc::spawn_logged("witness", &mut cmd, &dir.path().join("witness.log"))
                .expect("twinrun witness");
            (
                Some(p),
                format!("\n[quorum]\nmode = \"witness\"\npreferred = \"{addr}\"\n"),
            )
        } else {
            (None, String::new())
        };
        let mut daemons = Vec::new();
        for (i, d) in dirs.iter().enumerate() {
            std::fs::create_dir_all(d).unwrap();
            let cfg = d.join("node.toml");
            std::fs::write(&cfg, config(&topo, i, d, &cluster, &quorum)).unwrap();
            let mut cmd = topo.pms[i].ns.command(twinrund_bin());
            cmd.arg("--config").arg(&cfg).env("RUST_LOG", "info");
            daemons.push(
                Proc::spawn_logged(
                    &format!("pm{}-twinrund", i + 1),
                    &mut cmd,
                    &d.join("twinrund.log"),
                )
                .expect("twinrund"),
            );
        }
        let c = Cluster {
            daemons,
            _witness: witness,
            dirs,
            topo,
            _dir: dir,
        };
        wait_for(
            Duration::from_secs(60),
            "both daemons online",
            || {
                c.api(0, |cl| cl.nodes().ok())
                    .filter(|n| n.iter().any(|n| n.state == NodeState::Online))
            },
            || c.logs(),
        );
        c
    }

    fn token_file(&self) -> PathBuf {
        self._dir.path().join("token")
    }

    fn api_url(&self, i: usize) -> String {
        format!("http://{}:{API_PORT}", self.topo.mgmt_ip(i).expect("mgmt"))
    }

    /// Calls node `i`'s API from inside its namespace.
    fn api<T: Send + 'static>(&self, i: usize, f: impl FnOnce(&Client) -> T + Send + 'static) -> T {
        let base = self.api_url(i);
        self.topo.pms[i]
            .ns
            .thread(move || f(&Client::new(&base, ADMIN)))
            .expect("thread in the namespace")
            .join()
            .expect("joined")
    }

    fn view(&self, i: usize) -> Option<VmView> {
        self.api(i, |c| c.vm(VM).ok())
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for (i, d) in self.dirs.iter().enumerate() {
            let tail = |p: PathBuf| {
                let t = std::fs::read_to_string(&p).unwrap_or_default();
                let lines: Vec<&str> = t.lines().collect();
                lines[lines.len().saturating_sub(30)..].join("\n")
            };
            s += &format!(
                "--- pm{} twinrund:\n{}\n--- pm{} vmm:\n{}\n",
                i + 1,
                tail(d.join("twinrund.log")),
                i + 1,
                tail(d.join(format!("state/vms/{VM}/vmm.log")))
            );
        }
        s
    }

    fn console(&self, i: usize) -> PathBuf {
        self.dirs[i].join(format!("state/vms/{VM}/console.log"))
    }

    /// The guest's console stream: each node's file holds the bytes its VMM released at
    /// their stream positions (the text never holds a NUL, a hole does).
    fn console_stream(&self) -> Vec<u8> {
        let files: Vec<Vec<u8>> = (0..2)
            .map(|i| std::fs::read(self.console(i)).unwrap_or_default())
            .collect();
        let len = files.iter().map(Vec::len).max().unwrap_or(0);
        let mut out = Vec::with_capacity(len);
        for k in 0..len {
            let b = files
                .iter()
                .filter_map(|f| f.get(k).copied())
                .find(|&b| b != 0)
                .unwrap_or(0);
            out.push(b);
        }
        out
    }

    /// Creates the VM of `spec` (TOML) on pm1 and starts it.
    fn create_and_start(&self, spec: &str) {
        let spec: twinrund::model::VmSpec = toml::from_str(spec).expect("spec");
        let name = spec.name.clone();
        let r = self.api(0, move |c| {
            c.create(&spec, None)
                .and_then(|_| c.action(&name, "start", None))
                .map_err(|e| e.to_string())
        });
        r.unwrap_or_else(|e| panic!("create/start: {e}\n{}", self.logs()));
    }

    /// Every A-Link of pm2 down or up.
    fn set_alinks(&self, up: bool) {
        for k in 0..self.topo.alinks() {
            self.topo.set_alink(1, k, up).unwrap();
        }
    }

    /// Creates and starts an FT VM `name` (no NIC) on pm1, waits until it is protected.
    fn create_ft_vm(&self, name: &'static str) {
        let toml = format!(
            r#"name = "{name}"
vcpus = 1
mem_mib = 64
protection = "ft"
preferred_node = "pm1"
autostart = true
failback = "manual"
disks = [{{ size_mib = 8 }}]
[payload]
kind = "test-guest"
workloads = ["counter", "disk"]
counter_rate = 200
"#
        );
        self.create_and_start(&toml);
        wait_for(
            Duration::from_secs(90),
            "the FT VM protected on pm1",
            || {
                self.api(0, move |c| c.vm(name).ok())
                    .filter(|v| v.state == twinrund::model::VmState::Protected)
            },
            || self.logs(),
        );
    }

    /// Creates and starts the VM on pm1, waits until it serves kv.
    fn create_vm(&self) {
        self.create_vm_as("unprotected");
    }

    /// [`Cluster::create_vm`] at protection level `protection`.
    fn create_vm_as(&self, protection: &str) {
        let net = self.topo.guest_mac();
        let mac = format!("{}{:02x}", &net[..net.len() - 2], 20);
        let toml = format!(
            r#"name = "{VM}"
vcpus = 1
mem_mib = 64
protection = "{protection}"
preferred_node = "pm1"
autostart = true
failback = "manual"
disks = [{{ size_mib = 8 }}]
nics = [{{ mac = "{mac}" }}]
[payload]
kind = "test-guest"
workloads = ["kv", "counter", "disk"]
counter_rate = 200
kv_addr = "{ip}/24"
"#,
            ip = guest_ip(&self.topo)
        );
        self.create_and_start(&toml);
        wait_for(
            Duration::from_secs(90),
            "the VM's kv server",
            || {
                std::fs::read_to_string(self.console(0))
                    .ok()
                    .filter(|t| t.contains("KV listening"))
            },
            || self.logs(),
        );
    }

    fn client(&self) -> LoadClient {
        let mut load = LoadConfig::new(
            self.topo.client_ns(),
            SocketAddr::from((guest_ip(&self.topo), KV_PORT)),
        );
        load.counter_key = "mig-counter".into();
        load.incr_every = 10;
        load.reconnect = false;
        load.connect_for = Duration::from_secs(30);
        LoadClient::start(load).expect("kv client")
    }

    /// `twinrun vm migrate` run in node `i`'s namespace against its API.
    fn migrate_cli(&self, i: usize, to: Option<&str>) -> (i32, String) {
        self.migrate_cli_of(VM, i, to)
    }

    fn migrate_cli_of(&self, vm: &str, i: usize, to: Option<&str>) -> (i32, String) {
        let mut cmd = self.topo.pms[i].ns.command(twinrun_bin());
        cmd.args([
            "vm",
            "migrate",
            vm,
            "--api",
            &self.api_url(i),
            "--token-file",
        ])
        .arg(self.token_file());
        if let Some(t) = to {
            cmd.args(["--to", t]);
        }
        let out = twinrun_lab::process::output_timeout(&mut cmd, Duration::from_secs(400))
            .expect("twinrun vm migrate ran");
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// The VM runs on node `i` only: the record says so on both nodes, and one VMM runs
    /// it, there.
    fn wait_runs_on(&self, i: usize, what: &str) {
        let node = format!("pm{}", i + 1);
        wait_for(
            Duration::from_secs(60),
            what,
            || {
                let v = self.view(1 - i)?;
                let w = self.view(i)?;
                let here = w.vmms.iter().any(|m| m.node == node);
                let one = w.vmms.len() == 1 && v.vmms.len() == 1;
                (v.owner.as_deref() == Some(node.as_str())
                    && w.owner.as_deref() == Some(node.as_str())
                    && v.migrating_to.is_none()
                    && here
                    && one)
                    .then_some(())
            },
            || format!("{:?}\n{:?}\n{}", self.view(0), self.view(1), self.logs()),
        );
    }

    /// The guest's counter goes on (its console grows by C lines on node `i`).
    fn counter_goes_on(&self, i: usize, what: &str) {
        let c0 = count_c(&self.console_stream());
        wait_for(
            Duration::from_secs(30),
            what,
            || (count_c(&self.console_stream()) > c0 + 5).then_some(()),
            || format!("node {i}\n{}", self.logs()),
        );
    }

    fn vmm_pid_on(&self, i: usize) -> Option<u32> {
        let node = format!("pm{}", i + 1);
        self.view(i)?
            .vmms
            .iter()
            .find(|m| m.node == node)
            .map(|m| m.pid)
    }
}

fn finish(c: &Cluster, client: LoadClient) {
    let rep = client.finish().unwrap();
    let logs = c.logs();
    let expect = Expect {
        dirty_passes: false,
        ..Expect::MOVED
    };
    let cc = check_load(&rep, &c.console_stream(), expect)
        .unwrap_or_else(|e| panic!("across the migrations: {e}\n{logs}"));
    eprintln!(
        "{} writes acknowledged; console: {} W records, no gap or duplicate",
        rep.sets_acked.len() as u64 + rep.incrs_acked as u64,
        cc.w_seqs.len()
    );
}

fn runs() -> usize {
    std::env::var("MIGRATE_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

#[test]
fn unprotected_vm_migrates_back_and_forth_under_kv_load() {
    let c = Cluster::start();
    c.create_vm();
    let client = c.client();
    client
        .wait_acks(100, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let mut at = 0usize;
    for n in 0..runs() {
        let to = 1 - at;
        let t0 = Instant::now();
        let target = format!("pm{}", to + 1);
        // The longest reply wait of the kv client in a window that holds the migration
        // (a figure, not an assertion: the machines are noisy).
        let ((code, out), stall) = std::thread::scope(|s| {
            let probe = s.spawn(|| client.max_reply_during(Duration::from_millis(2500)));
            let r = c.migrate_cli(at, (n % 2 == 0).then_some(target.as_str()));
            (r, probe.join().unwrap())
        });
        assert_eq!(code, 0, "migration {n}: {out}\n{}", c.logs());
        assert!(
            out.contains(&format!("migrated to {target}")),
            "migration {n}: {out}"
        );
        c.wait_runs_on(to, &format!("migration {n}: the VM on {target} only"));
        client
            .wait_acks(50, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("migration {n}: after it: {e}\n{}", c.logs()));
        c.counter_goes_on(to, &format!("migration {n}: the counter on {target}"));
        // The source's daemon logs the guest's pause until the target accepted.
        let log = std::fs::read_to_string(c.dirs[at].join("twinrund.log")).unwrap_or_default();
        let pause = log
            .lines()
            .rev()
            .find(|l| l.contains("role swap done at checkpoint"))
            .and_then(|l| l.rsplit("guest paused ").next())
            .unwrap_or("?")
            .trim_end_matches(')')
            .to_string();
        eprintln!(
            "migration {n}: pm{} -> {target} in {:?}; guest paused {pause} on the source; \
             longest kv reply around it {stall:?} (CLI: {})",
            at + 1,
            t0.elapsed(),
            out.lines().last().unwrap_or("")
        );
        at = to;
    }
    finish(&c, client);
}

#[test]
fn failed_migrations_leave_the_vm_on_the_source() {
    let c = Cluster::start();
    c.create_vm();
    let client = c.client();
    client
        .wait_acks(100, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let src_pid = c.vmm_pid_on(0).expect("the VMM on pm1");

    // 1. The receiving VMM is killed during the pre-copy: every A-Link is down, so the
    //    pre-copy cannot end before the kill.
    c.set_alinks(false);
    let r = c.api(0, |cl| {
        cl.migrate(VM, Some("pm2"), None).map_err(|e| e.to_string())
    });
    r.unwrap_or_else(|e| panic!("migrate: {e}\n{}", c.logs()));
    let target_pid = wait_for(
        Duration::from_secs(30),
        "the receiving VMM on pm2",
        || c.vmm_pid_on(1),
        || c.logs(),
    );
    // SAFETY: kill(2) of the receiving VMM this test's pm2 daemon started.
    unsafe { libc::kill(target_pid as i32, libc::SIGKILL) };
    wait_for(
        Duration::from_secs(30),
        "the migration given up",
        || c.view(0).filter(|v| v.migrating_to.is_none()),
        || c.logs(),
    );
    c.set_alinks(true);
    c.wait_runs_on(0, "the VM on pm1 only after the target died");
    assert_eq!(c.vmm_pid_on(0), Some(src_pid), "the source VMM is the same");
    client
        .wait_acks(50, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after the target died: {e}\n{}", c.logs()));
    c.counter_goes_on(0, "the counter on pm1 after the target died");
    // The node that gave it up logged why (the receiving VMM's end, on pm2).
    let events: Vec<String> = (0..2)
        .flat_map(|i| c.api(i, |cl| cl.events(Some(VM), 100).unwrap_or_default()))
        .map(|e| e.message)
        .collect();
    assert!(
        events
            .iter()
            .any(|m| m.contains("given up") && m.contains("receiving VMM")),
        "no event says the migration was given up: {events:#?}"
    );

    // 2. Every A-Link cut during the pre-copy (this small guest's ends in milliseconds
    //    once it runs, so the links go down first): the receiving VMM waits and never
    //    takes over, the VM runs on at the source on the same connection; with the
    //    links back the same migration completes.
    c.set_alinks(false);
    let r = c.api(0, |cl| {
        cl.migrate(VM, None, None).map_err(|e| e.to_string())
    });
    r.unwrap_or_else(|e| panic!("migrate: {e}\n{}", c.logs()));
    wait_for(
        Duration::from_secs(30),
        "the receiving VMM on pm2",
        || c.vmm_pid_on(1),
        || c.logs(),
    );
    // The VM runs on at the source meanwhile, on the same connection.
    client
        .wait_acks(100, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("links cut: {e}\n{}", c.logs()));
    assert_eq!(c.vmm_pid_on(0), Some(src_pid));
    let v = c.view(1).expect("view on pm2");
    assert!(
        v.vmms
            .iter()
            .any(|m| m.node == "pm2" && m.role == Role::Standby && !m.failed_over),
        "the receiving VMM never takes over: {v:?}"
    );
    c.set_alinks(true);
    c.wait_runs_on(1, "the migration completes once the links are back");
    client
        .wait_acks(50, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after the migration: {e}\n{}", c.logs()));
    c.counter_goes_on(1, "the counter on pm2");
    finish(&c, client);
}

#[test]
fn ft_vm_migrates_by_a_planned_role_swap() {
    let c = Cluster::start();
    c.create_ft_vm("ftm");
    for (from, to) in [(0usize, 1usize), (1, 0)] {
        let target = format!("pm{}", to + 1);
        let (code, out) = c.migrate_cli_of("ftm", from, None);
        assert_eq!(code, 0, "{out}\n{}", c.logs());
        assert!(out.contains(&format!("migrated to {target}")), "{out}");
        // Protected again the other way round, the same VMMs (a swap, no restart).
        wait_for(
            Duration::from_secs(60),
            "protected with its primary on the target",
            || {
                c.api(to, |cl| cl.vm("ftm").ok()).filter(|v| {
                    v.state == twinrund::model::VmState::Protected
                        && v.owner.as_deref() == Some(target.as_str())
                        && v.spec.preferred_node.as_deref() == Some(target.as_str())
                })
            },
            || c.logs(),
        );
    }
}

/// An HA VM under kv load moves back and forth by live migration (its primary's VMM
/// runs the pre-copy to its in-sync standby, then the handover): HA again the other
/// way round after each, the same guest (one BOOT across both consoles, the counter
/// without gap), the client's one connection and every acknowledged write kept.
#[test]
fn ha_vm_migrates_back_and_forth_under_kv_load() {
    let c = Cluster::start();
    c.create_vm_as("ha");
    wait_for(
        Duration::from_secs(90),
        "the HA VM protected on pm1",
        || {
            c.api(0, |cl| cl.vm(VM).ok())
                .filter(|v| v.state == twinrund::model::VmState::Protected)
        },
        || c.logs(),
    );
    let client = c.client();
    client
        .wait_acks(100, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let mut at = 0usize;
    for n in 0..runs() {
        let to = 1 - at;
        let t0 = Instant::now();
        let target = format!("pm{}", to + 1);
        let ((code, out), stall) = std::thread::scope(|s| {
            let probe = s.spawn(|| client.max_reply_during(Duration::from_millis(2500)));
            let r = c.migrate_cli(at, (n % 2 == 0).then_some(target.as_str()));
            (r, probe.join().unwrap())
        });
        assert_eq!(code, 0, "migration {n}: {out}\n{}", c.logs());
        assert!(
            out.contains(&format!("migrated to {target}")),
            "migration {n}: {out}"
        );
        // HA again the other way round: the target's VMM the primary, the source's its
        // in-sync standby (the same two VMMs: no restart).
        wait_for(
            Duration::from_secs(60),
            "protected with its primary on the target",
            || {
                c.api(to, |cl| cl.vm(VM).ok()).filter(|v| {
                    v.state == twinrund::model::VmState::Protected
                        && v.owner.as_deref() == Some(target.as_str())
                        && v.spec.preferred_node.as_deref() == Some(target.as_str())
                })
            },
            || c.logs(),
        );
        client
            .wait_acks(50, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("migration {n}: after it: {e}\n{}", c.logs()));
        c.counter_goes_on(to, &format!("migration {n}: the counter on {target}"));
        eprintln!(
            "HA migration {n}: pm{} -> {target} in {:?}; longest kv reply around it {stall:?}",
            at + 1,
            t0.elapsed(),
        );
        at = to;
    }
    let boots = String::from_utf8_lossy(&c.console_stream())
        .lines()
        .filter(|l| l.starts_with("BOOT"))
        .count();
    assert_eq!(boots, 1, "the guest booted again\n{}", c.logs());
    finish(&c, client);
}

#[test]
fn ft_vm_migrates_with_a_witness() {
    let c = Cluster::start_opts(true);
    c.create_ft_vm("ftw");
    for (from, to) in [(0usize, 1usize), (1, 0)] {
        let target = format!("pm{}", to + 1);
        let (code, out) = c.migrate_cli_of("ftw", from, None);
        assert_eq!(code, 0, "{out}\n{}", c.logs());
        assert!(out.contains(&format!("migrated to {target}")), "{out}");
        wait_for(
            Duration::from_secs(60),
            "protected with its primary on the target",
            || {
                c.api(to, |cl| cl.vm("ftw").ok()).filter(|v| {
                    v.state == twinrund::model::VmState::Protected
                        && v.owner.as_deref() == Some(target.as_str())
                })
            },
            || c.logs(),
        );
    }
    // The witness really decided: its record of the VM is at the third generation
    // (1 at the start, one per change of primary), held by pm1's node (odd: parity).
    let status = c._dir.path().join("witness/status.json");
    wait_for(
        Duration::from_secs(20),
        "the witness's record at generation 3, held by node 1",
        || {
            let v: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&status).ok()?).ok()?;
            v["vms"]
                .as_array()?
                .iter()
                .any(|r| r["generation"] == 3 && r["holder"] == 1)
                .then_some(())
        },
        || {
            format!(
                "{}\n--- witness status: {}",
                c.logs(),
                std::fs::read_to_string(&status).unwrap_or_default()
            )
        },
    );
}
