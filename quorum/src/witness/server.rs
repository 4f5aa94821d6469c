//! `twinrun witness`: the UDP server around [`ServerWire`] and [`WitnessCore`], its
//! configuration (flags over a TOML file) and its status view.
//!
//! One thread, one socket: every datagram is answered before the next is read, and a
//! change of a VM's record is fsynced before its answer is sent (in `WitnessCore`).
//! Every second the server writes `<state_dir>/status.json` (atomically) for
//! `twinrun witness status`.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::core::{CoreLimits, VmStatus, WitnessCore};
use super::store::{FileStore, StoreError};
use super::wire::{random_nonce, ServerWire, WireCounters, WireLimits, MAX_DATAGRAM, MIN_SECRET};
use crate::types::check_name;

/// Default UDP port (everRun's quorum service uses 4557 too).
pub const DEFAULT_PORT: u16 = 4557;
/// Most clusters one witness serves.
pub const MAX_CLUSTERS: usize = 1024;

/// The TOML file of `twinrun witness --config`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub listen: Option<String>,
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub cluster: Vec<ClusterEntry>,
    pub max_vms: Option<u32>,
    pub max_vms_per_cluster: Option<u32>,
    pub max_sessions: Option<usize>,
}

/// One `[[cluster]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterEntry {
    pub id: String,
    pub secret_file: PathBuf,
}

/// Everything the server needs, resolved and checked.
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub clusters: Vec<ClusterEntry>,
    pub core: CoreLimits,
    pub wire: WireLimits,
}

/// Why the witness cannot start.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("cannot read {path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error("{path}: {why}")]
    Toml { path: PathBuf, why: String },
    #[error("bad listen address {0:?} (expected IP:PORT)")]
    Listen(String),
    #[error("no state directory: give --state-dir or state_dir in the config")]
    NoStateDir,
    #[error("no cluster: give --cluster ID=SECRET_FILE or [[cluster]] tables")]
    NoCluster,
    #[error("more than {MAX_CLUSTERS} clusters")]
    TooManyClusters,
    #[error("cluster {0:?} is given twice")]
    DuplicateCluster(String),
    #[error("{0}")]
    Name(String),
    #[error(
        "the secret of cluster {id} in {path} is {len} bytes; at least {MIN_SECRET} are needed"
    )]
    ShortSecret {
        id: String,
        path: PathBuf,
        len: usize,
    },
    #[error("bad limit: {0}")]
    Limit(String),
    #[error("state directory: {0}")]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("socket: {0}")]
    Io(#[from] io::Error),
}

impl WitnessError {
    /// 2 for bad configuration, 1 for failures at run time.
    pub fn exit_code(&self) -> i32 {
        match self {
            WitnessError::Bind { .. } | WitnessError::Io(_) => 1,
            _ => 2,
        }
    }
}

/// Parses `ID=SECRET_FILE` (the `--cluster` flag).
pub fn parse_cluster_flag(s: &str) -> Result<ClusterEntry, String> {
    let (id, path) = s
        .split_once('=')
        .filter(|(i, p)| !i.is_empty() && !p.is_empty())
        .ok_or_else(|| format!("expected ID=SECRET_FILE, got {s:?}"))?;
    check_name("cluster id", id)?;
    Ok(ClusterEntry {
        id: id.to_string(),
        secret_file: PathBuf::from(path),
    })
}

/// Merges the TOML file (if any) and the flags (which win; `--cluster` adds clusters).
pub fn resolve(
    config: Option<&Path>,
    listen: Option<&str>,
    state_dir: Option<&Path>,
    clusters: &[ClusterEntry],
) -> Result<Options, WitnessError> {
    let file = match config {
        None => ConfigFile::default(),
        Some(p) => {
            let text = fs::read_to_string(p).map_err(|e| WitnessError::Read {
                path: p.to_path_buf(),
                why: e.to_string(),
            })?;
            toml::from_str(&text).map_err(|e| WitnessError::Toml {
                path: p.to_path_buf(),
                why: e.to_string(),
            })?
        }
    };
    let listen_s = listen
        .map(str::to_string)
        .or(file.listen.clone())
        .unwrap_or_else(|| format!("0.0.0.0:{DEFAULT_PORT}"));
    let listen: SocketAddr = listen_s
        .parse()
        .map_err(|_| WitnessError::Listen(listen_s.clone()))?;
    let state_dir = state_dir
        .map(Path::to_path_buf)
        .or(file.state_dir.clone())
        .ok_or(WitnessError::NoStateDir)?;
    let mut all = file.cluster.clone();
    all.extend_from_slice(clusters);
    if all.is_empty() {
        return Err(WitnessError::NoCluster);
    }
    if all.len() > MAX_CLUSTERS {
        return Err(WitnessError::TooManyClusters);
    }
    let mut seen = std::collections::HashSet::new();
    for c in &all {
        check_name("cluster id", &c.id).map_err(WitnessError::Name)?;
        if !seen.insert(c.id.clone()) {
            return Err(WitnessError::DuplicateCluster(c.id.clone()));
        }
    }
    let mut core = CoreLimits::default();
    if let Some(v) = file.max_vms {
        core.max_vms = v;
    }
    if let Some(v) = file.max_vms_per_cluster {
        core.max_vms_per_cluster = v;
    }
    let mut wire = WireLimits::default();
    if let Some(v) = file.max_sessions {
        wire.max_sessions = v;
    }
    if core.max_vms == 0 || core.max_vms_per_cluster == 0 || wire.max_sessions == 0 {
        return Err(WitnessError::Limit("limits must be positive".into()));
    }
    if core.max_vms > 1 << 20 || wire.max_sessions > 1 << 16 {
        return Err(WitnessError::Limit(
            "max_vms at most 1048576, max_sessions at most 65536".into(),
        ));
    }
    Ok(Options {
        listen,
        state_dir,
        clusters: all,
        core,
        wire,
    })
}

fn read_secrets(clusters: &[ClusterEntry]) -> Result<HashMap<String, Vec<u8>>, WitnessError> {
    let mut m = HashMap::new();
    for c in clusters {
        let mut s = fs::read(&c.secret_file).map_err(|e| WitnessError::Read {
            path: c.secret_file.clone(),
            why: e.to_string(),
        })?;
        // A trailing newline from `echo` is not part of the secret (the A-Link's rule).
        while s.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            s.pop();
        }
        if s.len() < MIN_SECRET {
            return Err(WitnessError::ShortSecret {
                id: c.id.clone(),
                path: c.secret_file.clone(),
                len: s.len(),
            });
        }
        m.insert(c.id.clone(), s);
    }
    Ok(m)
}

/// What `status.json` holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub listen: String,
    pub pid: u32,
    pub uptime_ms: u64,
    pub clusters: Vec<String>,
    pub sessions: usize,
    pub counters: WireCountersView,
    pub vms: Vec<VmStatusView>,
}

/// Serializable copies (the core's types stay free of Deserialize).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WireCountersView {
    pub datagrams: u64,
    pub requests: u64,
    pub sessions_opened: u64,
    pub malformed: u64,
    pub unknown_cluster: u64,
    pub wrong_secret: u64,
    pub replays: u64,
    pub unknown_session: u64,
    pub bad_tag: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct VmStatusView {
    pub cluster: String,
    pub vm: String,
    pub generation: u64,
    pub holder: Option<u64>,
    pub peer_outdated: bool,
    pub lease_ms: u32,
    pub lease_left_ms: u32,
}

fn counters_view(c: &WireCounters) -> WireCountersView {
    WireCountersView {
        datagrams: c.datagrams,
        requests: c.requests,
        sessions_opened: c.sessions_opened,
        malformed: c.malformed,
        unknown_cluster: c.unknown_cluster,
        wrong_secret: c.wrong_secret,
        replays: c.replays,
        unknown_session: c.unknown_session,
        bad_tag: c.bad_tag,
    }
}

fn vm_view(v: VmStatus) -> VmStatusView {
    VmStatusView {
        cluster: v.cluster,
        vm: v.vm,
        generation: v.generation,
        holder: v.holder,
        peer_outdated: v.peer_outdated,
        lease_ms: v.lease_ms,
        lease_left_ms: v.lease_left_ms,
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

/// Logs refusals, at most one line per kind per second (a flood of garbage must not
/// flood the log), with the count of those left out.
struct RefusalLog {
    last: HashMap<String, (Instant, u64)>,
}

impl RefusalLog {
    fn log(&mut self, r: &super::wire::Refused) {
        let kind = format!("{:?}", std::mem::discriminant(&r.why));
        let now = Instant::now();
        let e = self
            .last
            .entry(kind)
            .or_insert((now - Duration::from_secs(2), 0));
        if now.duration_since(e.0) >= Duration::from_secs(1) {
            let who = match (&r.cluster, r.node) {
                (Some(c), Some(n)) => format!(" (cluster {c}, {n})"),
                (Some(c), None) => format!(" (cluster {c})"),
                (None, Some(n)) => format!(" ({n})"),
                (None, None) => String::new(),
            };
            let more = if e.1 > 0 {
                format!(" [{} more like it in the last second]", e.1)
            } else {
                String::new()
            };
            log::warn!(
                "witness: refused datagram from {}{who}: {}{more}",
                r.from,
                r.why
            );
            *e = (now, 0);
        } else {
            e.1 += 1;
        }
    }
}

/// A bound witness, ready to serve.
pub struct Server {
    sock: UdpSocket,
    opts: Options,
    wire: ServerWire,
    core: WitnessCore,
    store: FileStore,
    start: Instant,
}

impl Server {
    /// Reads the secrets and the durable state, binds the socket.
    pub fn bind(opts: Options) -> Result<Server, WitnessError> {
        let secrets = read_secrets(&opts.clusters)?;
        let store = FileStore::open(&opts.state_dir)?;
        let records = store.load_all()?;
        let start = Instant::now();
        let n = records.len();
        let core = WitnessCore::new(opts.core, records, Duration::ZERO);
        let sock = UdpSocket::bind(opts.listen).map_err(|source| WitnessError::Bind {
            addr: opts.listen,
            source,
        })?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        log::info!(
            "witness: listening on UDP {} for {} cluster(s), {n} VM record(s) from {}",
            sock.local_addr()?,
            opts.clusters.len(),
            opts.state_dir.display()
        );
        Ok(Server {
            sock,
            wire: ServerWire::new(secrets, opts.wire),
            opts,
            core,
            store,
            start,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    fn status(&self) -> Status {
        let now = self.start.elapsed();
        Status {
            listen: self
                .sock
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            pid: std::process::id(),
            uptime_ms: now.as_millis() as u64,
            clusters: self.opts.clusters.iter().map(|c| c.id.clone()).collect(),
            sessions: self.wire.session_count(),
            counters: counters_view(&self.wire.counters),
            vms: self.core.status(now).into_iter().map(vm_view).collect(),
        }
    }

    /// Serves until `stop` is set (checked at least every 200 ms).
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), WitnessError> {
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        let mut refusals = RefusalLog {
            last: HashMap::new(),
        };
        let status_path = self.opts.state_dir.join("status.json");
        let mut last_status = Instant::now() - Duration::from_secs(2);
        while !stop.load(Ordering::Relaxed) {
            if last_status.elapsed() >= Duration::from_secs(1) {
                last_status = Instant::now();
                if let Ok(j) = serde_json::to_vec_pretty(&self.status()) {
                    if let Err(e) = write_atomic(&status_path, &j) {
                        log::warn!("witness: cannot write {}: {e}", status_path.display());
                    }
                }
            }
            let (n, from) = match self.sock.recv_from(&mut buf) {
                Ok(x) => x,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    continue
                }
                Err(e) => return Err(e.into()),
            };
            let nonce = random_nonce()?;
            let now = self.start.elapsed();
            let (reply, refused) =
                self.wire
                    .handle(now, from, &buf[..n], nonce, &mut self.core, &mut self.store);
            if let Some(r) = refused {
                refusals.log(&r);
            }
            if let Some(b) = reply {
                if let Err(e) = self.sock.send_to(&b, from) {
                    log::debug!("witness: cannot answer {from}: {e}");
                }
            }
        }
        log::info!("witness: stopped");
        Ok(())
    }
}

/// `twinrun witness status`: the running server's last status file, or the durable
/// records alone if none is running.
pub fn status_text(state_dir: &Path, json: bool) -> Result<String, WitnessError> {
    let path = state_dir.join("status.json");
    let status: Status = match fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| WitnessError::Toml {
            path: path.clone(),
            why: e.to_string(),
        })?,
        Err(_) => {
            let recs = FileStore::open(state_dir)?.load_all()?;
            Status {
                listen: String::new(),
                pid: 0,
                uptime_ms: 0,
                clusters: Vec::new(),
                sessions: 0,
                counters: WireCountersView::default(),
                vms: recs
                    .into_iter()
                    .map(|(c, v, r)| VmStatusView {
                        cluster: c,
                        vm: v,
                        generation: r.generation,
                        holder: r.holder.map(|n| n.0),
                        peer_outdated: r.peer_outdated,
                        lease_ms: r.lease_ms,
                        lease_left_ms: 0,
                    })
                    .collect(),
            }
        }
    };
    if json {
        return Ok(serde_json::to_string(&status).unwrap_or_default());
    }
    let mut s = String::new();
    if status.pid != 0 {
        s.push_str(&format!(
            "witness pid {} on {} up {} s: {} cluster(s), {} session(s), {} request(s), refused: {} malformed, {} unknown cluster, {} wrong secret, {} replays, {} unknown session\n",
            status.pid,
            status.listen,
            status.uptime_ms / 1000,
            status.clusters.len(),
            status.sessions,
            status.counters.requests,
            status.counters.malformed,
            status.counters.unknown_cluster,
            status.counters.wrong_secret,
            status.counters.replays,
            status.counters.unknown_session
        ));
    } else {
        s.push_str("no running witness found (durable records only)\n");
    }
    s.push_str(&format!(
        "{:<20} {:<20} {:>10} {:>7} {:>9} {:>9}\n",
        "CLUSTER", "VM", "GENERATION", "HOLDER", "PEER", "LEASE_MS"
    ));
    for v in &status.vms {
        s.push_str(&format!(
            "{:<20} {:<20} {:>10} {:>7} {:>9} {:>9}\n",
            v.cluster,
            v.vm,
            v.generation,
            v.holder.map_or("-".to_string(), |h| h.to_string()),
            if v.peer_outdated { "stale" } else { "current" },
            v.lease_left_ms
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_and_flags() {
        let d = tempfile::tempdir().unwrap();
        let secret = d.path().join("s");
        fs::write(&secret, "0123456789abcdef\n").unwrap();
        let cfg = d.path().join("w.toml");
        fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n[[cluster]]\nid = \"plant-a\"\nsecret_file = \"{}\"\n",
                d.path().join("state").display(),
                secret.display()
            ),
        )
        .unwrap();
        let extra = parse_cluster_flag(&format!("plant-b={}", secret.display())).unwrap();
        let o = resolve(Some(&cfg), None, None, &[extra]).unwrap();
        assert_eq!(o.clusters.len(), 2);
        assert_eq!(
            read_secrets(&o.clusters).unwrap()["plant-a"],
            b"0123456789abcdef"
        );
        // Unknown keys and bad values are errors that name the file.
        fs::write(&cfg, "listen = \"x\"\nbogus = 1\n").unwrap();
        let e = resolve(Some(&cfg), None, None, &[]).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        assert!(matches!(
            resolve(None, Some("nope"), None, &[]),
            Err(WitnessError::Listen(_))
        ));
        assert!(matches!(
            resolve(None, None, None, &[]),
            Err(WitnessError::NoStateDir)
        ));
        assert!(matches!(
            resolve(None, None, Some(d.path()), &[]),
            Err(WitnessError::NoCluster)
        ));
        assert!(parse_cluster_flag("a/b=x").is_err());
        assert!(parse_cluster_flag("nofile").is_err());
        let short = d.path().join("short");
        fs::write(&short, "abc").unwrap();
        let o = resolve(
            None,
            None,
            Some(d.path()),
            &[parse_cluster_flag(&format!("c={}", short.display())).unwrap()],
        )
        .unwrap();
        assert!(matches!(
            read_secrets(&o.clusters),
            Err(WitnessError::ShortSecret { .. })
        ));
    }
}
