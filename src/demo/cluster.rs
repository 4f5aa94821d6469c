//! `twinrun demo` (the front door): the whole system on one machine. Two `twinrund`
//! daemons in PM namespaces (`twinrun_lab::Topology`: PM1, PM2, LAN, client, two
//! A-Links, a management network), a `twinrun witness` in its own namespace, three VMs
//! of the test guest created through the API (FT, HA, unprotected, all preferring PM1)
//! with a kv client on each; then PM1 dies (SIGKILL of its daemon and all its VMMs, its
//! links down) and the demo reports what the outside saw per VM, as PM2's daemon tells
//! it. Everything it made goes away at the end, on error and on Ctrl-C.
//!
//! Nothing is faked: a VM whose level this build's pair runtime cannot run (HA until
//! the `ha` branch is merged) shows the daemon's own error for it and fails the demo.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use twinrun_lab::kvload::{LoadClient, LoadConfig, LoadReport};
use twinrun_lab::node_toml::NodeToml;
use twinrun_lab::topology::KV_PORT;
use twinrun_lab::{Proc, Topology};
use twinrund::client::Client;
use twinrund::model::{NodeState, VmSpec, VmState, VmView};

use super::{json_escape, nap, say, DemoError, KvFigures, WorkDir};
use crate::cli::DemoArgs;

const API_PORT: u16 = 7480;
const LINK_PORT: u16 = 7470;
const WITNESS_PORT: u16 = 4557;
const TOKEN: &str = "demo-admin-token-0123456789";
/// The three VMs: name, protection, the last byte of the guest's LAN address.
const VMS: [(&str, &str, u8); 3] = [
    ("ft", "ft", 2),
    ("ha", "ha", 5),
    ("plain", "unprotected", 6),
];

/// What the outside saw of one VM.
#[derive(Debug, Default)]
pub struct VmOutcome {
    pub name: String,
    pub protection: String,
    pub guest_ip: String,
    /// State and reason on PM1 before the kill, on PM2 after it.
    pub before: Option<(VmState, String)>,
    pub after: Option<(VmState, String)>,
    /// The kv client (None: it never connected, the guest never served).
    pub kv: Option<KvFigures>,
    pub failover_ms: Option<u64>,
    /// What went wrong before the kill (a level the runtime cannot run, a start error).
    pub problem: Option<String>,
}

impl VmOutcome {
    /// What "right" means for the VM's level once PM1 is gone.
    fn ok(&self) -> bool {
        if self.problem.is_some() {
            return false;
        }
        let after = self.after.as_ref().map(|(s, _)| *s);
        match self.protection.as_str() {
            // No lost acknowledged write, the same TCP connection, the counter exact.
            "ft" => {
                self.kv
                    .as_ref()
                    .is_some_and(|k| k.lost_writes == 0 && k.connection_survived && k.incr_ok)
                    && matches!(
                        after,
                        Some(VmState::Simplex | VmState::Running | VmState::Protected)
                    )
            }
            // Booted again on PM2 from its replica (a new connection is expected).
            "ha" => matches!(
                after,
                Some(VmState::Simplex | VmState::Running | VmState::Protected)
            ),
            // Stays down until PM1 returns.
            _ => after == Some(VmState::Down),
        }
    }

    fn json(&self) -> String {
        let st = |s: &Option<(VmState, String)>| match s {
            Some((st, why)) => format!(
                "{{\"state\":\"{}\",\"reason\":\"{}\"}}",
                json_escape(&format!("{st:?}").to_lowercase()),
                json_escape(why)
            ),
            None => "null".into(),
        };
        let kv = match &self.kv {
            Some(k) => format!(
                "{{\"acknowledged_writes\":{},\"lost_writes\":{},\"incr_ok\":{},\
                 \"tcp_connection_survived\":{},\"reconnects\":{},\"max_reply_ms\":{}}}",
                k.acked_writes,
                k.lost_writes,
                k.incr_ok,
                k.connection_survived,
                k.reconnects,
                k.max_reply_ms
            ),
            None => "null".into(),
        };
        format!(
            "{{\"name\":\"{}\",\"protection\":\"{}\",\"guest_ip\":\"{}\",\"ok\":{},\
             \"before\":{},\"after\":{},\"kv\":{},\"failover_ms\":{},\"problem\":{}}}",
            json_escape(&self.name),
            self.protection,
            self.guest_ip,
            self.ok(),
            st(&self.before),
            st(&self.after),
            kv,
            self.failover_ms
                .map_or("null".to_string(), |v| v.to_string()),
            self.problem
                .as_ref()
                .map_or("null".to_string(), |p| format!("\"{}\"", json_escape(p)))
        )
    }
}

/// The demo's findings.
#[derive(Debug, Default)]
pub struct ClusterReport {
    /// The demo's process id: its names (namespaces `tc<pid>-*`, `/tmp/twd<pid>`).
    pub pid: u32,
    pub quorum: String,
    pub vms: Vec<VmOutcome>,
}

impl ClusterReport {
    pub fn ok(&self) -> bool {
        !self.vms.is_empty() && self.vms.iter().all(VmOutcome::ok)
    }

    pub fn json(&self) -> String {
        let vms: Vec<String> = self.vms.iter().map(VmOutcome::json).collect();
        format!(
            "{{\"ok\":{},\"pid\":{},\"quorum\":\"{}\",\"vms\":[{}]}}",
            self.ok(),
            self.pid,
            json_escape(&self.quorum),
            vms.join(",")
        )
    }

    pub fn print_human(&self) {
        println!("\n== twinrun demo: PM1 was killed; what the outside saw ==");
        println!("quorum: {}", self.quorum);
        for v in &self.vms {
            println!(
                "\n{} ({}, guest {}): {}",
                v.name,
                v.protection,
                v.guest_ip,
                if v.ok() { "as it should" } else { "PROBLEM" }
            );
            if let Some(p) = &v.problem {
                println!("  problem: {p}");
            }
            if let Some((s, why)) = &v.before {
                println!("  before (PM1): {s:?}: {why}");
            }
            if let Some((s, why)) = &v.after {
                println!("  after  (PM2): {s:?}: {why}");
            }
            if let (Some(k), "unprotected") = (&v.kv, v.protection.as_str()) {
                println!(
                    "  kv: {} writes acknowledged before PM1 died; then no answer (its only \
                     copy died with PM1; {} reconnect attempts)",
                    k.acked_writes, k.reconnects
                );
            } else if let Some(k) = &v.kv {
                println!(
                    "  kv: {} acknowledged writes, {} lost; counter {}; same TCP connection: {}; \
                     reconnects {}; longest reply {} ms",
                    k.acked_writes,
                    k.lost_writes,
                    if k.incr_ok { "exact" } else { "not exact" },
                    if k.connection_survived { "yes" } else { "no" },
                    k.reconnects,
                    k.max_reply_ms
                );
            }
            if let Some(ms) = v.failover_ms {
                println!("  first kv reply after the kill: {ms} ms");
            }
        }
        println!(
            "\nverdict: {}",
            if self.ok() {
                "every VM did what its level promises"
            } else {
                "PROBLEMS (see above)"
            }
        );
    }
}

/// Kills the VMMs the daemons started (from their pid files) when dropped: they live
/// outside the daemons' process trees on purpose.
struct VmmReaper(Vec<PathBuf>);

impl VmmReaper {
    fn pids(dir: &Path) -> Vec<i32> {
        let Ok(rd) = std::fs::read_dir(dir.join("pids")) else {
            return Vec::new();
        };
        rd.flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .filter_map(|v| v["pid"].as_i64().map(|p| p as i32))
            .collect()
    }

    fn kill(dir: &Path) -> usize {
        let pids = Self::pids(dir);
        for &p in &pids {
            // SAFETY: kill(2); the pid comes from a pid file of a daemon this demo
            // started, in its own directory.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        pids.len()
    }
}

impl Drop for VmmReaper {
    fn drop(&mut self) {
        for d in &self.0 {
            Self::kill(d);
        }
    }
}

/// Calls node `i`'s API from inside its namespace (the management network).
fn api<T: Send + 'static>(
    topo: &Topology,
    i: usize,
    f: impl FnOnce(&Client) -> T + Send + 'static,
) -> Result<T, DemoError> {
    let base = format!("http://{}", api_addr(topo, i)?);
    let t = topo.pms[i]
        .ns
        .thread(move || f(&Client::new(&base, TOKEN)))?;
    Ok(t.join()?)
}

fn api_addr(topo: &Topology, i: usize) -> Result<SocketAddr, DemoError> {
    let ip = topo
        .mgmt_ip(i)
        .ok_or_else(|| DemoError::Failed("the topology has no management network".into()))?;
    Ok(SocketAddr::from((ip, API_PORT)))
}

fn guest_ip(topo: &Topology, last: u8) -> Ipv4Addr {
    let o = topo.guest_ip().octets();
    Ipv4Addr::new(o[0], o[1], o[2], last)
}

/// Does this build's pair runtime take `flag`?
fn runtime_has(exe: &Path, flag: &str) -> bool {
    std::process::Command::new(exe)
        .args(["vm", "run", "--help"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
}

#[allow(clippy::too_many_arguments)]
fn node_config(
    topo: &Topology,
    i: usize,
    cluster: &str,
    dir: &Path,
    exe: &Path,
    guest: &Path,
    secret: &Path,
    tokens: &Path,
    quorum: &str,
) -> Result<String, DemoError> {
    let mut n = NodeToml::on_topology(
        topo,
        i,
        cluster,
        dir.to_path_buf(),
        API_PORT,
        LINK_PORT,
        "dm",
    )
    .ok_or_else(|| DemoError::Failed("no management network".into()))?;
    n.secret_file = secret.to_path_buf();
    n.tokens_file = tokens.to_path_buf();
    n.twinrun_bin = exe.to_path_buf();
    n.guest_elf = guest.to_path_buf();
    n.boot_grace_ms = 3000;
    n.extra = quorum.to_string();
    Ok(n.render())
}

fn spec(topo: &Topology, name: &str, protection: &str, last: u8) -> Result<VmSpec, DemoError> {
    let net = topo.guest_mac();
    // The topology's guest MAC with its last byte made this VM's.
    let mac = format!("{}{last:02x}", &net[..net.len() - 2]);
    let toml = format!(
        r#"name = "{name}"
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
workloads = ["kv", "counter"]
counter_rate = 20
kv_addr = "{ip}/24"
"#,
        ip = guest_ip(topo, last)
    );
    toml::from_str(&toml).map_err(|e| DemoError::Failed(format!("VM spec {name}: {e}")))
}

fn shown(v: &VmView) -> (VmState, String) {
    (v.state, v.reason.clone())
}

pub fn run(a: &DemoArgs, intr: &AtomicBool) -> Result<ClusterReport, DemoError> {
    let exe = std::env::current_exe()?;
    let twinrund = exe.with_file_name("twinrund");
    if !twinrund.is_file() {
        return Err(DemoError::Failed(format!(
            "{} is not built: `cargo build --workspace` (scripts/demo.sh does it)",
            twinrund.display()
        )));
    }
    let guest = twinrun_lab::guest::find_built().map_err(|searched| {
        DemoError::Failed(format!(
            "the test guest is not built (looked at {searched:?}); run ./scripts/build-guest.sh"
        ))
    })?;
    let pid = std::process::id();
    // Short: the daemons' run dirs hold Unix sockets.
    let work = WorkDir(PathBuf::from(format!("/tmp/twd{pid}")));
    std::fs::create_dir_all(&work.0)?;
    let w = |n: &str| work.0.join(n);
    let topo = Topology::builder()
        .prefix(&format!("tc{}", pid % 1_000_000))
        .witnesses(1)
        .build()?;
    let cluster = format!("demo{pid}");
    let (secret, tokens) = (w("secret"), w("tokens"));
    let mut key = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)?;
    std::fs::write(
        &secret,
        key.iter().map(|b| format!("{b:02x}")).collect::<String>(),
    )?;
    std::fs::write(&tokens, format!("admin {TOKEN}\n"))?;
    // What `twinrun vm ... --token-file` reads: the token alone.
    let token_file = w("api-token");
    std::fs::write(&token_file, TOKEN)?;

    // The witness, in its own namespace on the management network.
    let wit = topo.witness(0)?;
    let wit_addr = SocketAddr::from((wit.ip, WITNESS_PORT));
    let mut wcmd = wit.ns.command(&exe);
    wcmd.args(["witness", "--listen", &wit_addr.to_string(), "--state-dir"])
        .arg(w("witness"))
        .arg("--cluster")
        .arg(format!("{cluster}={}", secret.display()));
    let _witness = Proc::spawn_logged("witness", &mut wcmd, &w("witness.log"))?;
    let (quorum_toml, quorum) = if runtime_has(&exe, "--quorum-config") {
        (
            format!("\n[quorum]\nmode = \"witness\"\npreferred = \"{wit_addr}\"\n"),
            format!("witness {wit_addr} (namespace {})", wit.ns.name()),
        )
    } else {
        say("WARNING: this build's pair runtime has no --quorum-config: the daemons run with quorum mode \"none\" (the witness runs but decides nothing)");
        (
            String::new(),
            format!("none: this build's pair runtime takes no --quorum-config (witness {wit_addr} started, unused)"),
        )
    };

    let dirs = [w("pm1"), w("pm2")];
    let _reaper = VmmReaper(dirs.iter().map(|d| d.join("run")).collect());
    let mut daemons = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        std::fs::create_dir_all(dir)?;
        let cfg = dir.join("node.toml");
        std::fs::write(
            &cfg,
            node_config(
                &topo,
                i,
                &cluster,
                dir,
                &exe,
                &guest,
                &secret,
                &tokens,
                &quorum_toml,
            )?,
        )?;
        let mut cmd = topo.pms[i].ns.command(&twinrund);
        cmd.arg("--config").arg(&cfg).env("RUST_LOG", "info");
        daemons.push(Proc::spawn_logged(
            &format!("pm{}-twinrund", i + 1),
            &mut cmd,
            &dir.join("twinrund.log"),
        )?);
    }
    say(&format!(
        "PMs {} and {}, witness {}, client {}; daemons' APIs {} and {}",
        topo.pm_ns(0),
        topo.pm_ns(1),
        wit.ns.name(),
        topo.client_ns(),
        api_addr(&topo, 0)?,
        api_addr(&topo, 1)?
    ));
    let t0 = Instant::now();
    loop {
        let up = api(&topo, 0, |c| {
            c.nodes()
                .ok()
                .is_some_and(|n| n.iter().any(|n| n.state == NodeState::Online))
        })?;
        if up {
            break;
        }
        for d in &mut daemons {
            if let Some(st) = d.try_wait() {
                return Err(DemoError::Failed(format!(
                    "{} exited ({st}):\n{}",
                    d.name(),
                    d.log_tail(20)
                )));
            }
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(DemoError::Failed(
                "the two daemons did not see each other within 60 s".into(),
            ));
        }
        nap(Duration::from_millis(200), intr)?;
    }
    say("both daemons online; creating and starting the FT, HA and unprotected VMs");
    let mut outcomes = Vec::new();
    for (name, prot, last) in VMS {
        let s = spec(&topo, name, prot, last)?;
        let n = name.to_string();
        let r = api(&topo, 0, move |c| {
            c.create(&s, None)
                .and_then(|_| c.action(&n, "start", None))
                .map_err(|e| e.to_string())
        })?;
        outcomes.push(VmOutcome {
            name: name.into(),
            protection: prot.into(),
            guest_ip: guest_ip(&topo, last).to_string(),
            problem: r.err().map(|e| format!("create/start: {e}")),
            ..VmOutcome::default()
        });
    }
    // Each VM until it is where its level wants it (or in error: said, not hidden).
    let t0 = Instant::now();
    loop {
        let views = api(&topo, 0, |c| c.vms().map_err(|e| e.to_string()))?
            .map_err(|e| DemoError::Failed(format!("vm list on pm1: {e}")))?;
        let mut pending = 0;
        for o in outcomes.iter_mut().filter(|o| o.problem.is_none()) {
            let Some(v) = views.iter().find(|v| v.spec.name == o.name) else {
                pending += 1;
                continue;
            };
            o.before = Some(shown(v));
            let ready = match o.protection.as_str() {
                "unprotected" => v.state == VmState::Running,
                _ => v.state == VmState::Protected,
            };
            if v.state == VmState::Error {
                o.problem = Some(format!(
                    "pm1's daemon holds it in error: {} (VMM log: {})",
                    v.reason,
                    last_line(&dirs[0].join(format!("state/vms/{}/vmm.log", o.name)))
                ));
            } else if !ready {
                pending += 1;
            }
        }
        if pending == 0 {
            break;
        }
        if t0.elapsed() > Duration::from_secs(120) {
            for o in outcomes.iter_mut().filter(|o| o.problem.is_none()) {
                let ok = o.before.as_ref().is_some_and(|(s, _)| {
                    *s == VmState::Protected
                        || (o.protection == "unprotected" && *s == VmState::Running)
                });
                if !ok {
                    o.problem = Some(format!(
                        "not ready within 120 s: {:?} (VMM log: {})",
                        o.before,
                        last_line(&dirs[0].join(format!("state/vms/{}/vmm.log", o.name)))
                    ));
                }
            }
            break;
        }
        nap(Duration::from_millis(500), intr)?;
    }
    for o in &outcomes {
        match &o.problem {
            Some(p) => say(&format!("{} ({}): {p}", o.name, o.protection)),
            None => say(&format!(
                "{} ({}): {:?}",
                o.name,
                o.protection,
                o.before.as_ref().map(|b| &b.1)
            )),
        }
    }

    // A kv client on each VM that serves.
    let mut clients: Vec<Option<LoadClient>> = Vec::new();
    for o in &outcomes {
        if o.problem.is_some() {
            clients.push(None);
            continue;
        }
        let ip: Ipv4Addr = o
            .guest_ip
            .parse()
            .map_err(|_| DemoError::Failed("guest ip".into()))?;
        let mut load = LoadConfig::new(topo.client_ns(), SocketAddr::from((ip, KV_PORT)));
        load.counter_key = "demo-counter".into();
        load.incr_every = 10;
        load.reconnect = o.protection != "ft";
        load.connect_for = Duration::from_secs(30);
        load.connect_timeout = Duration::from_secs(2);
        load.read_timeout = Duration::from_secs(10);
        clients.push(Some(LoadClient::start(load)?));
    }
    nap(Duration::from_millis(a.kill_after_ms), intr)?;

    say("killing PM1: SIGKILL of its daemon and all its VMMs, its links down");
    let kill_at = Instant::now();
    daemons[0].kill();
    let n = VmmReaper::kill(&dirs[0].join("run"));
    for k in 0..topo.alinks() {
        topo.set_alink(0, k, false)?;
    }
    topo.set_lan(0, false)?;
    topo.set_mgmt(0, false)?;
    for c in clients.iter().flatten() {
        c.mark();
    }
    say(&format!(
        "PM1 is dead ({n} VMMs killed); watching for {} ms",
        a.keep_going_ms
    ));
    nap(Duration::from_millis(a.keep_going_ms), intr)?;
    let views = api(&topo, 1, |c| c.vms().map_err(|e| e.to_string()))?
        .map_err(|e| DemoError::Failed(format!("vm list on pm2: {e}")))?;
    for (o, c) in outcomes.iter_mut().zip(clients) {
        o.after = views.iter().find(|v| v.spec.name == o.name).map(shown);
        if let Some(c) = c {
            o.failover_ms = c
                .first_reply_after_mark()
                .map(|t| t.saturating_duration_since(kill_at).as_millis() as u64);
            let r: Result<LoadReport, _> = c.finish();
            o.kv = r.ok().as_ref().map(KvFigures::from);
        }
    }
    let report = ClusterReport {
        pid,
        quorum,
        vms: outcomes,
    };
    if a.keep {
        report.print_human();
        println!(
            "\nThe cluster runs on (PM2 alone). Its API: http://{} (token in {}); e.g.\n  \
             ip netns exec {} {} vm list --api http://{} --token-file {}\nCtrl-C ends it and removes everything.",
            api_addr(&topo, 1)?,
            token_file.display(),
            topo.pm_ns(1),
            exe.display(),
            api_addr(&topo, 1)?,
            token_file.display()
        );
        while !intr.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
        return Err(DemoError::Interrupted);
    }
    Ok(report)
}

/// The VMM log's last error line (else its last line): what the operator would read.
fn last_line(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines
        .iter()
        .rev()
        .find(|l| l.contains("error"))
        .or(lines.last())
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| format!("{} is empty", p.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(protection: &str, after: VmState) -> VmOutcome {
        VmOutcome {
            name: "v".into(),
            protection: protection.into(),
            guest_ip: "10.1.0.2".into(),
            after: Some((after, "why \"quoted\"".into())),
            kv: Some(KvFigures {
                acked_writes: 10,
                incr_ok: true,
                connection_survived: true,
                ..KvFigures::default()
            }),
            ..VmOutcome::default()
        }
    }

    #[test]
    fn each_level_is_judged_by_its_own_promise() {
        assert!(outcome("ft", VmState::Simplex).ok());
        let mut lost = outcome("ft", VmState::Simplex);
        if let Some(k) = lost.kv.as_mut() {
            k.lost_writes = 1;
        }
        assert!(!lost.ok());
        assert!(outcome("ha", VmState::Simplex).ok());
        assert!(!outcome("ha", VmState::Error).ok());
        assert!(outcome("unprotected", VmState::Down).ok());
        assert!(!outcome("unprotected", VmState::Running).ok());
        let mut bad = outcome("ft", VmState::Simplex);
        bad.problem = Some("held in error".into());
        assert!(!bad.ok());
    }

    #[test]
    fn json_is_one_object() {
        let r = ClusterReport {
            pid: 1,
            quorum: "none".into(),
            vms: vec![
                outcome("ft", VmState::Simplex),
                outcome("ha", VmState::Error),
            ],
        };
        let j = r.json();
        let v: serde_json::Value = serde_json::from_str(&j).expect("valid JSON");
        assert_eq!(v["ok"], false);
        assert_eq!(v["vms"][0]["ok"], true);
        assert_eq!(v["vms"][0]["after"]["state"], "simplex");
        assert_eq!(v["vms"][1]["after"]["reason"], "why \"quoted\"");
        assert!(!j.contains('\n'));
    }
}
