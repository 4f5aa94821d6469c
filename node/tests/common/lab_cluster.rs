//! Two `twinrund` in PM namespaces (`twinrun_lab::Topology` with a management network,
//! and a `twinrun witness` as the pair's quorum when asked), the one VM a test watches
//! (`vm`), and what the tests of a running VM read: the API from inside a node's
//! namespace, the daemons' and VMM's logs, the console stream over both nodes, a RESP
//! client from the client namespace. Used by migrate.rs and level.rs.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{guest_elf, twinrun_bin, twinrund_bin, wait_for, ADMIN, SECRET};
use twinrun_lab::kvload::{LoadClient, LoadConfig};
use twinrun_lab::node_toml::NodeToml;
use twinrun_lab::topology::KV_PORT;
use twinrun_lab::{Proc, Topology};
use twinrund::client::Client;
use twinrund::model::{NodeState, VmView};

pub const API_PORT: u16 = 7480;
pub const LINK_PORT: u16 = 7481;

pub struct LabCluster {
    pub daemons: Vec<Proc>,
    /// The quorum witness, when the cluster runs with one.
    pub witness: Option<Proc>,
    pub dirs: [PathBuf; 2],
    pub topo: Topology,
    /// The VM the logs and the console are read of.
    pub vm: &'static str,
    pub dir: tempfile::TempDir,
}

impl Drop for LabCluster {
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

/// The VMM pids of the pid files in node directory `dir`.
pub fn vmm_pids(dir: &Path) -> Vec<i32> {
    let Ok(rd) = std::fs::read_dir(dir.join("run/pids")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter_map(|v| v["pid"].as_i64().map(|p| p as i32))
        .collect()
}

impl LabCluster {
    /// Starts both daemons (names, namespaces and the cluster id from `tag` and this
    /// process's pid) and waits until they see each other.
    pub fn launch(tag: &str, vm: &'static str, witness: bool) -> LabCluster {
        let pid = std::process::id();
        let dir = tempfile::Builder::new()
            .prefix(&format!("tw{tag}"))
            .tempdir_in("/tmp")
            .expect("tempdir");
        let mut b = Topology::builder()
            .prefix(&format!("{tag}{}", pid % 100_000))
            .management();
        if witness {
            b = b.witnesses(1);
        }
        let topo = b.build().expect("topology");
        std::fs::write(dir.path().join("secret"), SECRET).unwrap();
        std::fs::write(dir.path().join("tokens"), format!("admin {ADMIN}\n")).unwrap();
        std::fs::write(dir.path().join("token"), ADMIN).unwrap();
        let dirs = [dir.path().join("pm1"), dir.path().join("pm2")];
        let cluster = format!("{tag}{pid}");
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
            let mut n =
                NodeToml::on_topology(&topo, i, &cluster, d.clone(), API_PORT, LINK_PORT, tag)
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
        let c = LabCluster {
            daemons,
            witness,
            dirs,
            topo,
            vm,
            dir,
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

    /// Starts node `i`'s daemon again with the same config (after
    /// `daemons[i].kill()`); its old log is kept as `twinrund.log.1`.
    pub fn restart_daemon(&mut self, i: usize) {
        let d = self.dirs[i].clone();
        let log = d.join("twinrund.log");
        let _ = std::fs::rename(&log, d.join("twinrund.log.1"));
        let mut cmd = self.topo.pms[i].ns.command(twinrund_bin());
        cmd.arg("--config")
            .arg(d.join("node.toml"))
            .env("RUST_LOG", "info");
        self.daemons[i] =
            Proc::spawn_logged(&format!("pm{}-twinrund", i + 1), &mut cmd, &log).expect("twinrund");
    }

    /// A file holding the admin token (for the CLI's `--token-file`).
    pub fn token_file(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    pub fn api_url(&self, i: usize) -> String {
        format!("http://{}:{API_PORT}", self.topo.mgmt_ip(i).expect("mgmt"))
    }

    /// Calls node `i`'s API from inside its namespace.
    pub fn api<T: Send + 'static>(
        &self,
        i: usize,
        f: impl FnOnce(&Client) -> T + Send + 'static,
    ) -> T {
        let base = self.api_url(i);
        self.topo.pms[i]
            .ns
            .thread(move || f(&Client::new(&base, ADMIN)))
            .expect("thread in the namespace")
            .join()
            .expect("joined")
    }

    /// The VM as node `i` shows it.
    pub fn view(&self, i: usize) -> Option<VmView> {
        let vm = self.vm;
        self.api(i, move |c| c.vm(vm).ok())
    }

    pub fn vmm_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dirs[i].join(format!("state/vms/{}/vmm.log", self.vm)))
            .unwrap_or_default()
    }

    /// The last 30 lines of each daemon's and VMM's log.
    pub fn logs(&self) -> String {
        let tail = |t: String| {
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        let mut s = String::new();
        for (i, d) in self.dirs.iter().enumerate() {
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

    pub fn console(&self, i: usize) -> PathBuf {
        self.dirs[i].join(format!("state/vms/{}/console.log", self.vm))
    }

    /// The guest's console stream: each node's file holds the bytes its VMM released at
    /// their stream positions (the text never holds a NUL, a hole does).
    pub fn console_stream(&self) -> Vec<u8> {
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

    /// The kv VM's address on the guest network.
    pub fn guest_ip(&self) -> Ipv4Addr {
        let o = self.topo.guest_ip().octets();
        Ipv4Addr::new(o[0], o[1], o[2], 20)
    }

    /// Creates the VM of `spec` (TOML) on pm1 and starts it.
    pub fn create_and_start(&self, spec: &str) {
        let spec: twinrund::model::VmSpec = toml::from_str(spec).expect("spec");
        let name = spec.name.clone();
        let r = self.api(0, move |c| {
            c.create(&spec, None)
                .and_then(|_| c.action(&name, "start", None))
                .map_err(|e| e.to_string())
        });
        r.unwrap_or_else(|e| panic!("create/start: {e}\n{}", self.logs()));
    }

    /// Creates and starts the watched VM (kv + counter + disk, one NIC) on pm1 at
    /// level `protection`, preferring pm1 with manual failback; waits until it serves kv.
    pub fn create_kv_vm(&self, protection: &str) {
        let net = self.topo.guest_mac();
        let mac = format!("{}{:02x}", &net[..net.len() - 2], 20);
        let toml = format!(
            r#"name = "{vm}"
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
            vm = self.vm,
            ip = self.guest_ip()
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

    /// A RESP client on ONE connection (no reconnect) from the client namespace.
    pub fn client(&self, counter_key: &str) -> LoadClient {
        let mut load = LoadConfig::new(
            self.topo.client_ns(),
            SocketAddr::from((self.guest_ip(), KV_PORT)),
        );
        load.counter_key = counter_key.into();
        load.incr_every = 10;
        load.reconnect = false;
        load.connect_for = Duration::from_secs(30);
        LoadClient::start(load).expect("kv client")
    }
}
