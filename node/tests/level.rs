//! Changing a running VM's protection level (`twinrun vm set VM --protection`, issue 15
//! item 4) with real daemons, VMMs and a `twinrun witness`: two `twinrund` in PM
//! namespaces (`twinrun_lab::Topology` with a management network and one witness), an
//! unprotected VM of the test guest (kv + counter + disk) and a RESP client on ONE TCP
//! connection from the client namespace.
//!
//! - `unprotected_vm_becomes_ft_and_survives_its_node_loss`: `vm set --protection ft`
//!   under load: the same VMM (pid) becomes the FT primary (status `ft`, a quorum),
//!   pm2 starts the standby, the VM shows protected; then pm1's daemon and VMM are
//!   SIGKILLed: the VM goes on on pm2 on the same connection, and no acknowledged write
//!   is lost (`check_load`).
//! - `ft_to_unprotected_and_back_online`: unprotected -> FT -> unprotected -> FT under
//!   load, always the same VMM on pm1: going unprotected stops pm2's standby, the VMM's
//!   status says `unprotected` with no quorum, and its log has no quorum warning; back
//!   to FT it is protected again. The client's connection survives, nothing is lost.
mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{guest_elf, twinrun_bin, twinrund_bin, wait_for, ADMIN, SECRET};
use twinrun_lab::kvload::{LoadClient, LoadConfig};
use twinrun_lab::node_toml::NodeToml;
use twinrun_lab::topology::KV_PORT;
use twinrun_lab::verdict::{check_load, Expect};
use twinrun_lab::{Proc, Topology};
use twinrund::client::Client;
use twinrund::model::{NodeState, Protection, Role, VmSettings, VmState, VmView};

const API_PORT: u16 = 7480;
const LINK_PORT: u16 = 7481;
const VM: &str = "lvl";

struct Cluster {
    daemons: Vec<Proc>,
    _witness: Proc,
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

fn guest_ip(topo: &Topology) -> Ipv4Addr {
    let o = topo.guest_ip().octets();
    Ipv4Addr::new(o[0], o[1], o[2], 20)
}

impl Cluster {
    fn start() -> Cluster {
        let pid = std::process::id();
        let dir = tempfile::Builder::new()
            .prefix("twl")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let topo = Topology::builder()
            .prefix(&format!("lv{}", pid % 100_000))
            .management()
            .witnesses(1)
            .build()
            .expect("topology");
        std::fs::write(dir.path().join("secret"), SECRET).unwrap();
        std::fs::write(dir.path().join("tokens"), format!("admin {ADMIN}\n")).unwrap();
        let dirs = [dir.path().join("pm1"), dir.path().join("pm2")];
        let cluster = format!("lvl{pid}");
        let w = topo.witness(0).expect("witness host");
        let addr = SocketAddr::from((w.ip, 4557));
        let mut cmd = w.ns.command(twinrun_bin());
        cmd.args(["witness", "--listen", &addr.to_string(), "--state-dir"])
            .arg(dir.path().join("witness"))
            .arg("--cluster")
            .arg(format!("{cluster}={}", dir.path().join("secret").display()));
        let witness = Proc::spawn_logged("witness", &mut cmd, &dir.path().join("witness.log"))
            .expect("twinrun witness");
        let quorum = format!("\n[quorum]\nmode = \"witness\"\npreferred = \"{addr}\"\n");
        let mut daemons = Vec::new();
        for (i, d) in dirs.iter().enumerate() {
            std::fs::create_dir_all(d).unwrap();
            let mut n =
                NodeToml::on_topology(&topo, i, &cluster, d.clone(), API_PORT, LINK_PORT, "lv")
                    .expect("management network");
            n.secret_file = d.join("../secret");
            n.tokens_file = d.join("../tokens");
            n.twinrun_bin = twinrun_bin();
            n.guest_elf = guest_elf();
            n.extra = quorum.clone();
            let cfg = d.join("node.toml");
            std::fs::write(&cfg, n.render()).unwrap();
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

    /// Calls node `i`'s API from inside its namespace.
    fn api<T: Send + 'static>(&self, i: usize, f: impl FnOnce(&Client) -> T + Send + 'static) -> T {
        let base = format!("http://{}:{API_PORT}", self.topo.mgmt_ip(i).expect("mgmt"));
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

    fn vmm_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dirs[i].join(format!("state/vms/{VM}/vmm.log")))
            .unwrap_or_default()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for (i, d) in self.dirs.iter().enumerate() {
            let tail = |t: String| {
                let lines: Vec<&str> = t.lines().collect();
                lines[lines.len().saturating_sub(30)..].join("\n")
            };
            s += &format!(
                "--- pm{} twinrund:\n{}\n--- pm{} vmm:\n{}\n",
                i + 1,
                tail(std::fs::read_to_string(d.join("twinrund.log")).unwrap_or_default()),
                i + 1,
                tail(self.vmm_log(i))
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
        (0..len)
            .map(|k| {
                files
                    .iter()
                    .filter_map(|f| f.get(k).copied())
                    .find(|&b| b != 0)
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Creates the unprotected kv VM on pm1, starts it, waits until it serves kv.
    fn create_vm(&self) {
        let net = self.topo.guest_mac();
        let mac = format!("{}{:02x}", &net[..net.len() - 2], 20);
        let toml = format!(
            r#"name = "{VM}"
vcpus = 1
mem_mib = 64
protection = "unprotected"
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
        let spec: twinrund::model::VmSpec = toml::from_str(&toml).expect("spec");
        let r = self.api(0, move |c| {
            c.create(&spec, None)
                .and_then(|_| c.action(VM, "start", None))
                .map_err(|e| e.to_string())
        });
        r.unwrap_or_else(|e| panic!("create/start: {e}\n{}", self.logs()));
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
        load.counter_key = "lvl-counter".into();
        load.incr_every = 10;
        load.reconnect = false;
        load.connect_for = Duration::from_secs(30);
        LoadClient::start(load).expect("kv client")
    }

    /// `vm set VM --protection to`, asked of node `i`; the answer's message.
    fn set_level(&self, i: usize, to: Protection) -> String {
        let r = self.api(i, move |c| {
            let s = VmSettings {
                protection: Some(to),
                ..Default::default()
            };
            c.set(VM, &s, None).map_err(|e| e.to_string())
        });
        let r = r.unwrap_or_else(|e| panic!("vm set --protection {to}: {e}\n{}", self.logs()));
        format!("{r:?}")
    }

    /// The VMM of the VM on node `i` (from that node's view): (role, pid).
    fn vmm_on(&self, i: usize) -> Option<(Role, u32)> {
        let node = format!("pm{}", i + 1);
        self.view(i)?
            .vmms
            .iter()
            .find(|m| m.node == node)
            .map(|m| (m.role, m.pid))
    }

    /// The control socket's FT status of the VMM on node `i`.
    fn ft_status(&self, i: usize) -> Option<twinrun_control::FtStatus> {
        twinrun_control::ft_status(&self.dirs[i].join(format!("run/vmm/{VM}.sock")))
    }

    fn wait_protected(&self, what: &str) {
        wait_for(
            Duration::from_secs(120),
            what,
            || {
                let v = self.view(0)?;
                (v.state == VmState::Protected).then_some(())
            },
            || format!("{:?}\n{}", self.view(0), self.logs()),
        );
    }
}

impl Cluster {
    /// The cluster with the unprotected VM on pm1 and a client with 100 writes
    /// acknowledged.
    fn under_load() -> (Cluster, LoadClient) {
        let c = Cluster::start();
        c.create_vm();
        let client = c.client();
        client
            .wait_acks(100, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
        (c, client)
    }
}

/// The lines of `log` that hold any of `what` (printed as the run's evidence).
fn lines(log: &str, what: &[&str]) -> String {
    log.lines()
        .filter(|l| what.iter().any(|w| l.contains(w)))
        .collect::<Vec<_>>()
        .join("\n")
}

fn finish(c: &Cluster, client: LoadClient, what: &str) {
    let rep = client.finish().unwrap();
    let expect = Expect {
        dirty_passes: false,
        ..Expect::MOVED
    };
    let cc = check_load(&rep, &c.console_stream(), expect)
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", c.logs()));
    eprintln!(
        "{what}: {} writes acknowledged; console: {} W records, no gap or duplicate",
        rep.sets_acked.len() as u64 + rep.incrs_acked as u64,
        cc.w_seqs.len()
    );
}

#[test]
fn unprotected_vm_becomes_ft_and_survives_its_node_loss() {
    let (c, client) = Cluster::under_load();
    let (role, pid) = c.vmm_on(0).expect("the VMM on pm1");
    assert_eq!(role, Role::Solo);
    assert_eq!(
        c.ft_status(0).map(|s| s.protection),
        Some("unprotected".into())
    );

    let answer = c.set_level(1, Protection::Ft);
    assert!(answer.contains("no reboot"), "{answer}");
    c.wait_protected("the VM protected after vm set --protection ft");
    let (role, same) = c.vmm_on(0).expect("the VMM on pm1");
    assert_eq!(
        (role, same),
        (Role::Primary, pid),
        "the same VMM, now the primary"
    );
    let st = c.ft_status(0).expect("status of pm1's VMM");
    assert_eq!(st.protection, "ft");
    assert!(st.quorum.is_some(), "the FT primary runs its quorum client");
    assert!(
        c.vmm_on(1).is_some_and(|(r, _)| r == Role::Standby),
        "{:?}",
        c.view(1)
    );
    client
        .wait_acks(100, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("protected: {e}\n{}", c.logs()));

    // pm1 dies: its daemon and its VMM, SIGKILL.
    let mut c = c;
    c.daemons[0].kill();
    for p in vmm_pids(&c.dirs[0]) {
        // SAFETY: kill(2) of the VMM this test's pm1 daemon started.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    wait_for(
        Duration::from_secs(60),
        "the VM taken over on pm2",
        || {
            let v = c.view(1)?;
            (v.owner.as_deref() == Some("pm2")).then_some(())
        },
        || format!("{:?}\n{}", c.view(1), c.logs()),
    );
    client
        .wait_acks(100, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("after pm1's loss: {e}\n{}", c.logs()));
    let (pm1, pm2) = (c.vmm_log(0), c.vmm_log(1));
    assert!(
        pm1.contains("protection level changed online: unprotected -> ft"),
        "{pm1}"
    );
    assert!(!pm1.contains("WITHOUT QUORUM"), "{pm1}");
    eprintln!(
        "pm1 VMM:\n{}\npm2 VMM:\n{}",
        lines(
            &pm1,
            &["level changed", "quorum: backend", "FT primary: protected"]
        ),
        lines(&pm2, &["GRANTED", "failover complete"])
    );
    assert!(pm2.contains("failover complete"), "{pm2}");
    finish(&c, client, "unprotected -> ft, then pm1 lost");
}

#[test]
fn ft_to_unprotected_and_back_online() {
    let (c, client) = Cluster::under_load();
    let (_, pid) = c.vmm_on(0).expect("the VMM on pm1");
    c.set_level(0, Protection::Ft);
    c.wait_protected("protected (first time)");

    let answer = c.set_level(0, Protection::Unprotected);
    assert!(answer.contains("no reboot"), "{answer}");
    wait_for(
        Duration::from_secs(60),
        "the VMM on pm1 unprotected, no standby on pm2",
        || {
            let st = c.ft_status(0)?;
            let alone = c.view(0)?.vmms.len() == 1;
            (st.protection == "unprotected" && st.quorum.is_none() && alone).then_some(())
        },
        || format!("{:?}\n{:?}\n{}", c.ft_status(0), c.view(0), c.logs()),
    );
    assert_eq!(
        c.vmm_on(0),
        Some((Role::Solo, pid)),
        "the same VMM runs on alone"
    );
    assert!(c.vmm_on(1).is_none(), "{:?}", c.view(1));
    client
        .wait_acks(100, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("unprotected again: {e}\n{}", c.logs()));
    let log = c.vmm_log(0);
    assert!(!log.contains("WITHOUT QUORUM"), "a quorum warning:\n{log}");
    assert!(
        log.contains("protection level changed online: ft -> unprotected"),
        "{log}"
    );
    eprintln!(
        "pm1 VMM:\n{}",
        lines(
            &log,
            &["level changed", "lease", "dirty logging", "quorum: backend"]
        )
    );

    c.set_level(0, Protection::Ft);
    c.wait_protected("protected again");
    assert_eq!(
        c.vmm_on(0),
        Some((Role::Primary, pid)),
        "still the same VMM"
    );
    client
        .wait_acks(100, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("ft again: {e}\n{}", c.logs()));
    finish(&c, client, "unprotected -> ft -> unprotected -> ft");
    drop(c);
}
