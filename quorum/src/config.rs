//! The pair's quorum configuration (the `[quorum]` table of a pair's or the daemon's
//! TOML): which backend decides who may run a VM alone, and the timing.
//!
//! ```toml
//! [quorum]
//! cluster = "plant-a"          # the pair's cluster id (witness cluster, etcd key path)
//! backend = "etcd"             # "witness" | "etcd" | "none"
//!
//! [quorum.witness]             # backend = "witness": twinrun witness over UDP
//! preferred = "10.0.0.3:4557"
//! alternate = "10.0.0.4:4557"  # optional
//! secret_file = "/etc/twinrun/quorum.secret"
//!
//! [quorum.etcd]                # backend = "etcd": a fleet's etcd cluster
//! endpoints = ["https://10.0.0.5:2379", "https://10.0.0.6:2379"]
//! prefix = "/twinrun/quorum"   # default
//! ca_file = "/etc/twinrun/etcd-ca.pem"          # TLS (https endpoints), optional
//! cert_file = "/etc/twinrun/etcd-client.pem"    # client certificate, optional
//! key_file = "/etc/twinrun/etcd-client.key"
//! username = "twinrun"                          # etcd auth, optional
//! password_file = "/etc/twinrun/etcd.password"
//! op_timeout_ms = 500          # default: the renewal interval
//!
//! [quorum.timing]              # optional; defaults depend on the backend
//! lease_ms = 2000
//! renew_ms = 400
//! margin_ms = 100
//!
//! # backend = "none": static_preference = 1 keeps node 1 running on link loss (the
//! # other never runs alone); without it, today's behaviour with a loud warning.
//! ```
//!
//! [`QuorumConfig::open`] turns it into the backends a node's [`crate::client::Runner`]
//! drives (one per configured slot, per VM).

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::node::Mode;
use crate::timing::Timing;
use crate::types::{check_name, NodeId};
use crate::witness::wire::MIN_SECRET;

/// Default etcd key prefix.
pub const DEFAULT_ETCD_PREFIX: &str = "/twinrun/quorum";
/// Most etcd endpoints.
pub const MAX_ETCD_ENDPOINTS: usize = 16;

/// Which quorum backend a pair uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// `twinrun witness` servers over UDP (a preferred and an optional alternate).
    Witness,
    /// An etcd cluster (v3 API, 3.4 or later).
    Etcd,
    /// No quorum service (see [`Mode::NoWitness`] and [`Mode::StaticPreference`]).
    None,
}

/// `[quorum.witness]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessConfig {
    pub preferred: String,
    pub alternate: Option<String>,
    pub secret_file: PathBuf,
}

/// `[quorum.etcd]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// `http://HOST:PORT` or `https://HOST:PORT` (all of one scheme).
    pub endpoints: Vec<String>,
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// CA certificate (PEM) that signed the servers' certificates (https).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM), for servers that require them.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// etcd user (auth enabled), with its password in `password_file`.
    pub username: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Give up an etcd operation after this long (default: the renewal interval).
    pub op_timeout_ms: Option<u64>,
}

fn default_prefix() -> String {
    DEFAULT_ETCD_PREFIX.to_string()
}

impl EtcdConfig {
    /// etcd at `endpoints` with the default prefix, no TLS, no auth.
    pub fn new(endpoints: &[&str]) -> EtcdConfig {
        EtcdConfig {
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            prefix: default_prefix(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password_file: None,
            op_timeout_ms: None,
        }
    }

    /// Checks what can be checked without reading files or connecting.
    pub fn validate(&self) -> Result<(), QuorumConfigError> {
        let bad = |why: String| Err(QuorumConfigError::Etcd(why));
        if self.endpoints.is_empty() || self.endpoints.len() > MAX_ETCD_ENDPOINTS {
            return bad(format!(
                "give 1 to {MAX_ETCD_ENDPOINTS} endpoints (got {})",
                self.endpoints.len()
            ));
        }
        let mut tls = None;
        for e in &self.endpoints {
            let (is_tls, rest) = if let Some(r) = e.strip_prefix("https://") {
                (true, r)
            } else if let Some(r) = e.strip_prefix("http://") {
                (false, r)
            } else {
                return bad(format!(
                    "endpoint {e:?} must start with http:// or https://"
                ));
            };
            let hostport = rest.strip_suffix('/').unwrap_or(rest);
            let ok = hostport
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok || hostport.contains('/') || hostport.chars().any(char::is_whitespace) {
                return bad(format!("endpoint {e:?} must be SCHEME://HOST:PORT"));
            }
            if tls.is_some_and(|t| t != is_tls) {
                return bad("endpoints mix http:// and https://".into());
            }
            tls = Some(is_tls);
        }
        let tls = tls == Some(true);
        if !tls && (self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some()) {
            return bad("ca_file, cert_file and key_file need https:// endpoints".into());
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return bad("cert_file and key_file go together".into());
        }
        if self.username.is_some() != self.password_file.is_some() {
            return bad("username and password_file go together".into());
        }
        if let Some(u) = &self.username {
            if u.is_empty() || u.len() > 128 || u.chars().any(|c| c.is_control()) {
                return bad(format!("bad username {u:?}"));
            }
        }
        if self.op_timeout_ms == Some(0) {
            return bad("op_timeout_ms must be positive".into());
        }
        crate::etcd::keys::check_prefix(&self.prefix).map_err(QuorumConfigError::Etcd)?;
        Ok(())
    }
}

/// `[quorum.timing]`: overrides of [`Timing`] (milliseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimingConfig {
    pub lease_ms: Option<u64>,
    pub renew_ms: Option<u64>,
    pub margin_ms: Option<u64>,
    pub max_drift_ppm: Option<u32>,
    pub retry_ms: Option<u64>,
    pub reach_timeout_ms: Option<u64>,
}

/// `[quorum]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuorumConfig {
    pub cluster: String,
    pub backend: BackendKind,
    pub witness: Option<WitnessConfig>,
    pub etcd: Option<EtcdConfig>,
    /// backend = "none": the node id that keeps running on link loss.
    pub static_preference: Option<u64>,
    #[serde(default)]
    pub timing: TimingConfig,
}

/// Why a quorum configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum QuorumConfigError {
    #[error("quorum config: {0}")]
    Toml(String),
    #[error("quorum config: {0}")]
    Name(String),
    #[error("quorum config: backend = \"{0}\" needs a [quorum.{0}] table")]
    MissingTable(&'static str),
    #[error("quorum config: [quorum.{0}] is given but backend is not \"{0}\"")]
    UnusedTable(&'static str),
    #[error("quorum config: static_preference is only for backend = \"none\"")]
    StaticPreference,
    #[error("quorum config: bad witness address {0:?} (expected IP:PORT)")]
    WitnessAddr(String),
    #[error("quorum config: etcd: {0}")]
    Etcd(String),
    #[error("quorum config: timing: {0}")]
    Timing(#[from] crate::timing::TimingError),
    #[error("quorum config: cannot read {path}: {why}")]
    Read { path: PathBuf, why: String },
    #[error(
        "quorum config: the secret in {path} is {len} bytes; at least {MIN_SECRET} are needed"
    )]
    ShortSecret { path: PathBuf, len: usize },
    #[error("quorum: cannot open a witness socket: {0}")]
    Socket(std::io::Error),
    #[error("quorum: this build has no etcd support (cargo feature \"etcd\")")]
    NoEtcd,
    #[error("quorum: cannot start the etcd client: {0}")]
    Runtime(String),
}

/// Reads a secret or password file: its bytes, one trailing newline removed.
pub(crate) fn read_secret(path: &Path) -> Result<Vec<u8>, QuorumConfigError> {
    let mut s = fs::read(path).map_err(|e| QuorumConfigError::Read {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    if s.last() == Some(&b'\n') {
        s.pop();
        if s.last() == Some(&b'\r') {
            s.pop();
        }
    }
    Ok(s)
}

impl QuorumConfig {
    /// Parses the `[quorum]` table's contents (not the whole file) and validates it.
    pub fn from_toml(text: &str) -> Result<QuorumConfig, QuorumConfigError> {
        let c: QuorumConfig =
            toml::from_str(text).map_err(|e| QuorumConfigError::Toml(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// Checks names, tables, addresses and timing (no file is read).
    pub fn validate(&self) -> Result<(), QuorumConfigError> {
        check_name("cluster id", &self.cluster).map_err(QuorumConfigError::Name)?;
        match self.backend {
            BackendKind::Witness => {
                let w = self
                    .witness
                    .as_ref()
                    .ok_or(QuorumConfigError::MissingTable("witness"))?;
                for a in std::iter::once(&w.preferred).chain(&w.alternate) {
                    a.parse::<SocketAddr>()
                        .map_err(|_| QuorumConfigError::WitnessAddr(a.clone()))?;
                }
            }
            BackendKind::Etcd => self
                .etcd
                .as_ref()
                .ok_or(QuorumConfigError::MissingTable("etcd"))?
                .validate()?,
            BackendKind::None => {}
        }
        if self.backend != BackendKind::Witness && self.witness.is_some() {
            return Err(QuorumConfigError::UnusedTable("witness"));
        }
        if self.backend != BackendKind::Etcd && self.etcd.is_some() {
            return Err(QuorumConfigError::UnusedTable("etcd"));
        }
        if self.backend != BackendKind::None && self.static_preference.is_some() {
            return Err(QuorumConfigError::StaticPreference);
        }
        self.timing().validate()?;
        if self.backend == BackendKind::Etcd && self.timing().lease_ttl < Duration::from_secs(1) {
            return Err(QuorumConfigError::Etcd(
                "etcd leases are whole seconds: lease_ms must be at least 1000".into(),
            ));
        }
        Ok(())
    }

    /// The node machine's mode.
    pub fn mode(&self) -> Mode {
        match self.backend {
            BackendKind::Witness => Mode::Witness {
                alternate: self.witness.as_ref().is_some_and(|w| w.alternate.is_some()),
            },
            // One etcd cluster: it is replicated itself.
            BackendKind::Etcd => Mode::Witness { alternate: false },
            BackendKind::None => match self.static_preference {
                Some(n) => Mode::StaticPreference {
                    preferred: NodeId(n),
                },
                None => Mode::NoWitness,
            },
        }
    }

    /// The timing: the backend's defaults with the `[quorum.timing]` overrides.
    pub fn timing(&self) -> Timing {
        let mut t = match self.backend {
            BackendKind::Etcd => etcd_timing(),
            _ => Timing::default(),
        };
        let o = &self.timing;
        let d = Duration::from_millis;
        if let Some(v) = o.lease_ms {
            t.lease_ttl = d(v);
        }
        if let Some(v) = o.renew_ms {
            t.renew_interval = d(v);
        }
        if let Some(v) = o.margin_ms {
            t.margin = d(v);
        }
        if let Some(v) = o.max_drift_ppm {
            t.max_drift_ppm = v;
        }
        if let Some(v) = o.retry_ms {
            t.retry = d(v);
        }
        if let Some(v) = o.reach_timeout_ms {
            t.reach_timeout = d(v);
        }
        t
    }
}

/// The timing defaults for etcd: its lease TTL cannot go below its election timeout
/// times 1.5, rounded up to whole seconds: 2 s with etcd's defaults (heartbeat 100 ms,
/// election 1000 ms). A renewal every 400 ms leaves four per lease.
pub fn etcd_timing() -> Timing {
    Timing {
        lease_ttl: Duration::from_secs(2),
        renew_interval: Duration::from_millis(400),
        margin: Duration::from_millis(100),
        retry: Duration::from_millis(50),
        reach_timeout: Duration::from_millis(1000),
        ..Timing::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_backend() {
        let c = QuorumConfig::from_toml(
            r#"
            cluster = "plant-a"
            backend = "etcd"
            [etcd]
            endpoints = ["https://10.0.0.5:2379", "https://etcd-2.lan:2379"]
            ca_file = "/etc/ca.pem"
            username = "twinrun"
            password_file = "/etc/pw"
            [timing]
            lease_ms = 3000
            "#,
        )
        .unwrap();
        assert_eq!(c.mode(), Mode::Witness { alternate: false });
        assert_eq!(c.etcd.as_ref().unwrap().prefix, DEFAULT_ETCD_PREFIX);
        assert_eq!(c.timing().lease_ttl, Duration::from_secs(3));
        assert_eq!(c.timing().renew_interval, Duration::from_millis(400));

        let c = QuorumConfig::from_toml(
            r#"
            cluster = "plant-a"
            backend = "witness"
            [witness]
            preferred = "10.0.0.3:4557"
            alternate = "10.0.0.4:4557"
            secret_file = "/etc/s"
            "#,
        )
        .unwrap();
        assert_eq!(c.mode(), Mode::Witness { alternate: true });
        assert_eq!(c.timing(), Timing::default());

        let c =
            QuorumConfig::from_toml("cluster = \"c\"\nbackend = \"none\"\nstatic_preference = 2")
                .unwrap();
        assert_eq!(
            c.mode(),
            Mode::StaticPreference {
                preferred: NodeId(2)
            }
        );
    }

    #[test]
    fn clear_errors() {
        let err = |t: &str| QuorumConfig::from_toml(t).unwrap_err().to_string();
        assert!(err("cluster = \"c\"\nbackend = \"etcd\"").contains("[quorum.etcd]"));
        assert!(err("cluster = \"c\"\nbackend = \"zookeeper\"").contains("unknown variant"));
        assert!(err("cluster = \"c/d\"\nbackend = \"none\"").contains("cluster id"));
        let etcd = |body: &str| {
            err(&format!(
                "cluster = \"c\"\nbackend = \"etcd\"\n[etcd]\n{body}"
            ))
        };
        assert!(etcd("endpoints = []").contains("1 to 16 endpoints"));
        assert!(etcd("endpoints = [\"10.0.0.1:2379\"]").contains("http://"));
        assert!(etcd("endpoints = [\"http://10.0.0.1\"]").contains("SCHEME://HOST:PORT"));
        assert!(etcd("endpoints = [\"http://a:1\", \"https://b:1\"]").contains("mix"));
        assert!(etcd("endpoints = [\"http://a:1\"]\nca_file = \"x\"").contains("https"));
        assert!(etcd("endpoints = [\"https://a:1\"]\ncert_file = \"x\"").contains("together"));
        assert!(etcd("endpoints = [\"http://a:1\"]\nusername = \"u\"").contains("together"));
        assert!(etcd("endpoints = [\"http://a:1\"]\nprefix = \"x/\"").contains("prefix"));
        assert!(etcd("endpoints = [\"http://a:1\"]\nbogus = 1").contains("unknown field"));
        let e = err("cluster = \"c\"\nbackend = \"etcd\"\n[etcd]\nendpoints = [\"http://a:1\"]\n[timing]\nlease_ms = 500\nrenew_ms = 100\nmargin_ms = 50");
        assert!(e.contains("at least 1000"), "{e}");
        let e = err("cluster = \"c\"\nbackend = \"none\"\n[timing]\nrenew_ms = 1000");
        assert!(e.contains("renew interval"), "{e}");
        assert!(err("cluster = \"c\"\nbackend = \"witness\"\n[witness]\npreferred = \"nohost\"\nsecret_file = \"s\"").contains("IP:PORT"));
        assert!(err("cluster = \"c\"\nbackend = \"witness\"\nstatic_preference = 1\n[witness]\npreferred = \"1.2.3.4:5\"\nsecret_file = \"s\"").contains("static_preference"));
        assert!(
            err("cluster = \"c\"\nbackend = \"none\"\n[etcd]\nendpoints = [\"http://a:1\"]")
                .contains("not \"etcd\"")
        );
    }

    #[test]
    fn open_reads_the_secret() {
        let d = tempfile::tempdir().unwrap();
        let s = d.path().join("s");
        fs::write(&s, b"short\n").unwrap();
        let c = QuorumConfig {
            cluster: "c".into(),
            backend: BackendKind::Witness,
            witness: Some(WitnessConfig {
                preferred: "127.0.0.1:4557".into(),
                alternate: None,
                secret_file: s.clone(),
            }),
            etcd: None,
            static_preference: None,
            timing: TimingConfig::default(),
        };
        assert!(matches!(
            c.open(NodeId(1)),
            Err(QuorumConfigError::ShortSecret { len: 5, .. })
        ));
        fs::write(&s, b"a-long-enough-secret-0123456789\n").unwrap();
        let (p, a) = c.open(NodeId(1)).unwrap().for_vm().unwrap();
        assert_eq!(p.unwrap().describe(), "witness 127.0.0.1:4557");
        assert!(a.is_none());
        let mut missing = c.clone();
        missing.witness.as_mut().unwrap().secret_file = d.path().join("nope");
        assert!(matches!(
            missing.open(NodeId(1)),
            Err(QuorumConfigError::Read { .. })
        ));
    }
}
