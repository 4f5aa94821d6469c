//! The node's configuration: one TOML file per node (`/etc/twinrun/node.toml`).
//!
//! Everything a VMM needs that is particular to a node (A-Link addresses, TAP names,
//! disk image paths, the secret file) is derived from this file and the VM's record,
//! never typed by the operator per VM. Errors name the file, the line and the key;
//! `twinrund --check-config` reports them and changes nothing.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Shortest cluster secret accepted (the A-Link's own limit).
pub const MIN_SECRET_BYTES: usize = 16;
/// Most A-Links per pair (the A-Link crate's limit).
pub const MAX_ALINKS: usize = 4;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Cluster name: both nodes (and the witness) must agree.
    pub cluster: String,
    /// This node's name.
    pub node: String,
    /// File with the cluster secret (at least 16 bytes), shared by both nodes: it
    /// authenticates the daemons' channel and the A-Links.
    pub secret_file: PathBuf,
    /// Where the daemon keeps its database, VM disk images and logs.
    pub state_dir: PathBuf,
    /// Where pid files and VMM control sockets live (tmpfs: /run/twinrund).
    pub run_dir: PathBuf,
    /// The `twinrun` binary that runs VMMs (default: beside `twinrund`).
    #[serde(default)]
    pub twinrun_bin: Option<PathBuf>,
    /// Test guest ELF used by VMs whose payload names none.
    #[serde(default)]
    pub guest_elf: Option<PathBuf>,
    pub api: ApiConfig,
    /// The daemons' own channel (on priv0 or the management network).
    pub cluster_link: LinkConfig,
    pub peer: PeerConfig,
    pub alink: AlinkConfig,
    #[serde(default)]
    pub priv0: Option<Priv0Config>,
    #[serde(default)]
    pub quorum: QuorumConfig,
    #[serde(default)]
    pub network: NetworkConfig,
    #[serde(default)]
    pub supervision: SupervisionConfig,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Lines `admin <token>` or `read-only <token>` ('#' starts a comment).
    pub tokens_file: PathBuf,
    /// Serve HTTPS: PEM certificate chain and private key (both or neither).
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    pub listen: SocketAddr,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// The peer is lost after this long without a message.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
}

fn default_heartbeat_ms() -> u64 {
    300
}
fn default_peer_timeout_ms() -> u64 {
    2000
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub name: String,
    /// The peer's `cluster_link.listen`.
    pub addr: SocketAddr,
    /// The peer's `api.listen` (shown by `node list`, used by the CLI to redirect).
    pub api: SocketAddr,
}

/// The A-Links of this node: one entry per link, this end's and the peer's address.
/// Each VM gets its own ports: `port_base + slot * links + i`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlinkConfig {
    pub links: Vec<AlinkPair>,
    #[serde(default = "default_port_base")]
    pub port_base: u16,
}

fn default_port_base() -> u16 {
    7500
}

#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlinkPair {
    pub local: IpAddr,
    pub peer: IpAddr,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Priv0Config {
    pub addr: IpAddr,
    pub peer: IpAddr,
}

/// How takeovers are decided (see `gate.rs`): the node's side of the `quorum` crate.
/// The daemon turns it into the pair's `[quorum]` table (`quorum::config::QuorumConfig`,
/// cluster = this cluster) that its VMMs get with `--quorum-config`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuorumConfig {
    #[serde(default)]
    pub mode: QuorumMode,
    /// everRun's preferred / alternate quorum servers (`twinrun witness`, `IP:PORT`).
    #[serde(default)]
    pub preferred: Option<SocketAddr>,
    #[serde(default)]
    pub alternate: Option<SocketAddr>,
    /// The secret the witness knows this cluster by (default: the cluster secret).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// mode = "etcd": the fleet's etcd cluster (the quorum crate's `[quorum.etcd]`).
    #[serde(default)]
    pub etcd: Option<quorum::config::EtcdConfig>,
    /// Lease timing overrides (the quorum crate's `[quorum.timing]`).
    #[serde(default)]
    pub timing: quorum::config::TimingConfig,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuorumMode {
    /// No witness: like everRun with no quorum server, a node that loses its peer
    /// takes over (two copies may run after a full partition). Logged at every takeover.
    #[default]
    None,
    /// `twinrun witness` servers decide every takeover (the `quorum` crate).
    Witness,
    /// An etcd cluster decides (the `quorum` crate's etcd backend).
    Etcd,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// Bridge that the VMs' TAPs join (none: the TAPs are left unattached).
    #[serde(default)]
    pub bridge: Option<String>,
    /// Prefix of TAP names (`<prefix><slot>n<nic>`, at most 15 bytes in all).
    #[serde(default = "default_tap_prefix")]
    pub tap_prefix: String,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            bridge: None,
            tap_prefix: default_tap_prefix(),
        }
    }
}

fn default_tap_prefix() -> String {
    "twr".into()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SupervisionConfig {
    /// Crash restarts of one VM within `restart_window_s` before it is held in error.
    #[serde(default = "default_max_restart")]
    pub max_restart: u32,
    #[serde(default = "default_restart_window_s")]
    pub restart_window_s: u64,
    /// How long after start a node waits for its peer before it starts protected VMs
    /// alone (Marathon blocks at boot until the peer or the witness is seen).
    #[serde(default = "default_boot_grace_ms")]
    pub boot_grace_ms: u64,
    /// Run each VMM in a systemd scope: auto (when systemd is PID 1), always, never.
    #[serde(default)]
    pub scope: ScopeMode,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig {
            max_restart: default_max_restart(),
            restart_window_s: default_restart_window_s(),
            boot_grace_ms: default_boot_grace_ms(),
            scope: ScopeMode::Auto,
        }
    }
}

fn default_max_restart() -> u32 {
    3
}
fn default_restart_window_s() -> u64 {
    600
}
fn default_boot_grace_ms() -> u64 {
    10_000
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScopeMode {
    #[default]
    Auto,
    Always,
    Never,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    At {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

impl ConfigError {
    pub fn line(&self) -> Option<usize> {
        match self {
            ConfigError::At { line, .. } => Some(*line),
            ConfigError::Read { .. } => None,
        }
    }
}

impl NodeConfig {
    /// Reads, parses and validates `path` (nothing else is touched).
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<NodeConfig, ConfigError> {
        let at = |line: usize, message: String| ConfigError::At {
            path: path.to_path_buf(),
            line,
            message,
        };
        let cfg: NodeConfig = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            at(line_of_offset(text, offset), e.message().trim().to_string())
        })?;
        cfg.validate()
            .map_err(|(section, key, message)| at(line_of_key(text, section, key), message))?;
        Ok(cfg)
    }

    /// Semantic checks; Err names the section and key the message is about.
    fn validate(&self) -> Result<(), (&'static str, &'static str, String)> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 32
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        };
        if !name_ok(&self.cluster) {
            return Err((
                "",
                "cluster",
                format!(
                    "bad cluster name {:?}: 1-32 letters, digits, '-' or '_'",
                    self.cluster
                ),
            ));
        }
        if !name_ok(&self.node) {
            return Err((
                "",
                "node",
                format!(
                    "bad node name {:?}: 1-32 letters, digits, '-' or '_'",
                    self.node
                ),
            ));
        }
        if !name_ok(&self.peer.name) {
            return Err((
                "peer",
                "name",
                format!("bad node name {:?}", self.peer.name),
            ));
        }
        if self.peer.name == self.node {
            return Err((
                "peer",
                "name",
                format!(
                    "the peer's name must differ from this node's ({:?})",
                    self.node
                ),
            ));
        }
        if !self.state_dir.is_absolute() {
            return Err(("", "state_dir", "state_dir must be an absolute path".into()));
        }
        if !self.run_dir.is_absolute() {
            return Err(("", "run_dir", "run_dir must be an absolute path".into()));
        }
        // The control socket path (run_dir/vmm/<vm>.sock) must fit sun_path (108).
        if self.run_dir.as_os_str().len() > 50 {
            return Err((
                "",
                "run_dir",
                "run_dir must be at most 50 bytes long (VMM control sockets live under it)".into(),
            ));
        }
        if self.alink.links.is_empty() || self.alink.links.len() > MAX_ALINKS {
            return Err((
                "alink",
                "links",
                format!(
                    "give 1 to {MAX_ALINKS} A-Links (got {})",
                    self.alink.links.len()
                ),
            ));
        }
        if self.alink.port_base < 1024 {
            return Err((
                "alink",
                "port_base",
                "port_base must be at least 1024".into(),
            ));
        }
        if self.cluster_link.heartbeat_ms == 0
            || self.cluster_link.peer_timeout_ms < 2 * self.cluster_link.heartbeat_ms
        {
            return Err(("cluster_link", "peer_timeout_ms", format!(
                "peer_timeout_ms ({}) must be at least twice heartbeat_ms ({}), which must be positive",
                self.cluster_link.peer_timeout_ms, self.cluster_link.heartbeat_ms
            )));
        }
        if self.api.tls_cert.is_some() != self.api.tls_key.is_some() {
            let key = if self.api.tls_cert.is_some() {
                "tls_cert"
            } else {
                "tls_key"
            };
            return Err((
                "api",
                key,
                "give both tls_cert and tls_key (PEM), or neither".into(),
            ));
        }
        if self.cluster_link.listen == self.api.listen {
            return Err((
                "api",
                "listen",
                "api.listen and cluster_link.listen must differ".into(),
            ));
        }
        if self.quorum.mode == QuorumMode::Witness && self.quorum.preferred.is_none() {
            return Err((
                "quorum",
                "preferred",
                "quorum mode \"witness\" needs a preferred witness address".into(),
            ));
        }
        if self.quorum.mode == QuorumMode::Etcd && self.quorum.etcd.is_none() {
            return Err((
                "quorum",
                "mode",
                "quorum mode \"etcd\" needs a [quorum.etcd] table (endpoints = [...])".into(),
            ));
        }
        if self.quorum.mode != QuorumMode::Witness
            && (self.quorum.preferred.is_some() || self.quorum.alternate.is_some())
        {
            return Err((
                "quorum",
                "preferred",
                "preferred / alternate witnesses are for mode = \"witness\"".into(),
            ));
        }
        if self.quorum.mode != QuorumMode::Etcd && self.quorum.etcd.is_some() {
            return Err((
                "quorum",
                "mode",
                "[quorum.etcd] is given but mode is not \"etcd\"".into(),
            ));
        }
        if let Some(q) = self.quorum_table() {
            q.validate()
                .map_err(|e| ("quorum", "mode", e.to_string()))?;
        }
        if self.network.tap_prefix.is_empty() || self.network.tap_prefix.len() > 6 {
            return Err((
                "network",
                "tap_prefix",
                "tap_prefix must be 1 to 6 bytes (TAP names are at most 15)".into(),
            ));
        }
        if self.supervision.max_restart > 100 {
            return Err((
                "supervision",
                "max_restart",
                "max_restart must be at most 100".into(),
            ));
        }
        Ok(())
    }

    /// Reads the cluster secret; the error says what to fix.
    pub fn read_secret(&self) -> Result<Vec<u8>, String> {
        let s = std::fs::read(&self.secret_file).map_err(|e| {
            format!(
                "cannot read the cluster secret {}: {e}",
                self.secret_file.display()
            )
        })?;
        let trimmed: Vec<u8> = s.trim_ascii_end().to_vec();
        if trimmed.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the cluster secret in {} is {} bytes; at least {MIN_SECRET_BYTES} are needed",
                self.secret_file.display(),
                trimmed.len()
            ));
        }
        Ok(trimmed)
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.cluster_link.heartbeat_ms)
    }

    pub fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.cluster_link.peer_timeout_ms)
    }

    pub fn db_path(&self) -> PathBuf {
        self.state_dir.join("cluster.db")
    }

    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        self.state_dir.join("vms").join(vm)
    }

    /// `TWINRUN_RUN_DIR` of the VMMs: their control sockets.
    pub fn vmm_run_dir(&self) -> PathBuf {
        self.run_dir.join("vmm")
    }

    pub fn pid_file(&self, vm: &str) -> PathBuf {
        self.run_dir.join("pids").join(format!("{vm}.pid"))
    }

    pub fn nodes(&self) -> [&str; 2] {
        [&self.node, &self.peer.name]
    }

    /// This node's quorum node id (1 or 2), derived from the two names so both nodes
    /// agree without being told: the name that sorts first is 1. The ids have
    /// different parity, as the quorum crate's generations need.
    pub fn quorum_node_id(&self) -> u64 {
        if self.node < self.peer.name {
            1
        } else {
            2
        }
    }

    /// The peer's quorum node id.
    pub fn peer_quorum_node_id(&self) -> u64 {
        3 - self.quorum_node_id()
    }

    /// The pair's `[quorum]` table for this cluster (None with mode = "none": the VMMs
    /// then run without `--quorum-config`, as the contract says).
    pub fn quorum_table(&self) -> Option<quorum::config::QuorumConfig> {
        use quorum::config::{BackendKind, QuorumConfig as Table, WitnessConfig};
        let q = &self.quorum;
        let (backend, witness, etcd) = match q.mode {
            QuorumMode::None => return None,
            QuorumMode::Witness => (
                BackendKind::Witness,
                Some(WitnessConfig {
                    preferred: q.preferred.map(|a| a.to_string()).unwrap_or_default(),
                    alternate: q.alternate.map(|a| a.to_string()),
                    secret_file: q
                        .secret_file
                        .clone()
                        .unwrap_or_else(|| self.secret_file.clone()),
                }),
                None,
            ),
            QuorumMode::Etcd => (BackendKind::Etcd, None, q.etcd.clone()),
        };
        Some(Table {
            cluster: self.cluster.clone(),
            backend,
            witness,
            etcd,
            static_preference: None,
            timing: q.timing,
        })
    }

    /// The file with the `[quorum]` table the VMMs get (`--quorum-config`).
    pub fn quorum_file(&self) -> PathBuf {
        self.state_dir.join("quorum.toml")
    }

    /// The text of [`Self::quorum_file`].
    pub fn quorum_file_text(&self) -> Option<String> {
        #[derive(serde::Serialize)]
        struct File {
            quorum: quorum::config::QuorumConfig,
        }
        let quorum = self.quorum_table()?;
        toml::to_string(&File { quorum }).ok()
    }
}

/// 1-based line of byte `offset`.
fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Line of `key = ...` inside `[section]` ("" = top level); 1 when not found (a
/// missing key is reported by the parser itself).
fn line_of_key(text: &str, section: &str, key: &str) -> usize {
    let mut current = String::new();
    let mut section_line = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(s) = t.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
            current = s.trim().to_string();
            if current == section {
                section_line = Some(i + 1);
            }
            continue;
        }
        if current == section {
            if let Some((k, _)) = t.split_once('=') {
                if k.trim() == key {
                    return i + 1;
                }
            }
        }
    }
    section_line.unwrap_or(1)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const GOOD: &str = r#"cluster = "plant-a"
node = "pm1"
secret_file = "/etc/twinrun/cluster.secret"
state_dir = "/var/lib/twinrund"
run_dir = "/run/twinrund"

[api]
listen = "127.0.0.1:7480"
tokens_file = "/etc/twinrun/api-tokens"

[cluster_link]
listen = "10.0.0.1:7470"

[peer]
name = "pm2"
addr = "10.0.0.2:7470"
api = "10.0.0.2:7480"

[alink]
links = [{ local = "10.88.0.1", peer = "10.88.0.2" }, { local = "10.88.1.1", peer = "10.88.1.2" }]

[priv0]
addr = "10.0.0.1"
peer = "10.0.0.2"
"#;

    fn parse(text: &str) -> Result<NodeConfig, ConfigError> {
        NodeConfig::parse(Path::new("node.toml"), text)
    }

    #[test]
    fn good_config_parses_with_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.node, "pm1");
        assert_eq!(c.alink.links.len(), 2);
        assert_eq!(c.alink.port_base, 7500);
        assert_eq!(c.supervision.max_restart, 3);
        assert_eq!(c.quorum.mode, QuorumMode::None);
        assert_eq!(c.vm_dir("a"), PathBuf::from("/var/lib/twinrund/vms/a"));
    }

    #[test]
    fn syntax_and_type_errors_carry_file_and_line() {
        let bad = GOOD.replace("listen = \"10.0.0.1:7470\"", "listen = \"10.0.0.1\"");
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.line(), Some(12), "{e}");
        assert!(e.to_string().starts_with("node.toml:12: "), "{e}");
        let bad = GOOD.replace("[peer]", "[peer]\ncolour = \"red\"");
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.line(), Some(15), "{e}");
        assert!(e.to_string().contains("colour"), "{e}");
        let bad = GOOD.replace("node = \"pm1\"", "node = ");
        assert_eq!(parse(&bad).unwrap_err().line(), Some(2));
    }

    #[test]
    fn semantic_errors_point_at_the_key() {
        let bad = GOOD.replace("name = \"pm2\"", "name = \"pm1\"");
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.line(), Some(15), "{e}");
        assert!(e.to_string().contains("must differ"), "{e}");
        let bad = GOOD.replace("state_dir = \"/var/lib/twinrund\"", "state_dir = \"var\"");
        assert_eq!(parse(&bad).unwrap_err().line(), Some(4));
        let bad = GOOD.replace("links = [{ local = \"10.88.0.1\", peer = \"10.88.0.2\" }, { local = \"10.88.1.1\", peer = \"10.88.1.2\" }]", "links = []");
        assert_eq!(parse(&bad).unwrap_err().line(), Some(20));
        let bad = GOOD.replace(
            "tokens_file = \"/etc/twinrun/api-tokens\"",
            "tokens_file = \"/etc/twinrun/api-tokens\"\ntls_cert = \"/c.pem\"",
        );
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.line(), Some(10), "{e}");
        assert!(e.to_string().contains("both tls_cert and tls_key"), "{e}");
        let bad = format!("{GOOD}\n[quorum]\nmode = \"witness\"\n");
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.line(), Some(26), "{e}");
        assert!(e.to_string().contains("needs a preferred witness"), "{e}");
        let bad = format!("{GOOD}\n[quorum]\nmode = \"none\"\npreferred = \"10.0.9.1:4557\"\n");
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.line(), Some(28), "{e}");
        let bad = format!("{GOOD}\n[quorum]\nmode = \"etcd\"\n");
        assert!(parse(&bad)
            .unwrap_err()
            .to_string()
            .contains("[quorum.etcd]"));
        // The quorum crate's own checks, at the [quorum] table.
        let bad = format!("{GOOD}\n[quorum]\nmode = \"witness\"\npreferred = \"10.0.9.1:4557\"\n[quorum.timing]\nlease_ms = 10\n");
        let e = parse(&bad).unwrap_err();
        assert_eq!(e.line(), Some(27), "{e}");
        assert!(e.to_string().contains("lease"), "{e}");
    }

    #[test]
    fn witness_mode_gives_the_pairs_quorum_table() {
        let text = format!("{GOOD}\n[quorum]\nmode = \"witness\"\npreferred = \"10.0.9.1:4557\"\nalternate = \"10.0.9.2:4557\"\n");
        let c = parse(&text).unwrap();
        assert_eq!((c.quorum_node_id(), c.peer_quorum_node_id()), (1, 2));
        let file = c.quorum_file_text().unwrap();
        // The file is exactly what the pair runtime parses.
        let v: toml::Value = toml::from_str(&file).unwrap();
        let table = toml::to_string(&v["quorum"]).unwrap();
        let q = quorum::config::QuorumConfig::from_toml(&table).unwrap();
        assert_eq!(q.cluster, "plant-a");
        assert_eq!(q.backend, quorum::config::BackendKind::Witness);
        let w = q.witness.unwrap();
        assert_eq!(w.preferred, "10.0.9.1:4557");
        assert_eq!(w.alternate.as_deref(), Some("10.0.9.2:4557"));
        assert_eq!(w.secret_file, PathBuf::from("/etc/twinrun/cluster.secret"));
        // pm2's id is 2 on its own node.
        let mut c2 = c.clone();
        std::mem::swap(&mut c2.node, &mut c2.peer.name);
        assert_eq!(c2.quorum_node_id(), 2);
        assert!(parse(GOOD).unwrap().quorum_file_text().is_none());
    }

    #[test]
    fn the_packaged_example_parses() {
        let text = include_str!("../../packaging/node.example.toml");
        let c = parse(text).unwrap();
        assert_eq!((c.node.as_str(), c.peer.name.as_str()), ("pm1", "pm2"));
        assert_eq!(c.alink.links.len(), 2);
    }

    #[test]
    fn secret_must_be_long_enough() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = parse(GOOD).unwrap();
        c.secret_file = dir.path().join("s");
        assert!(c.read_secret().unwrap_err().contains("cannot read"));
        std::fs::write(&c.secret_file, "short\n").unwrap();
        assert!(c.read_secret().unwrap_err().contains("at least 16"));
        std::fs::write(&c.secret_file, "0123456789abcdef0123\n").unwrap();
        assert_eq!(c.read_secret().unwrap(), b"0123456789abcdef0123");
    }
}
