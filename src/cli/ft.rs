//! Flags of FT mode (`twinrun vm run --role primary|standby ...`) and their parsers.
//!
//! Without `--role` the VM runs unprotected, as before. With it, the VM (primary) or its
//! replica (standby) is tied to the peer over one or more A-Links, each given as
//! `--alink <local_ip:port>,<peer_ip:port>`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
pub use twinrun_pair::settings::{
    AlinkSpec, FtSettings, NodeId, Protection, QuorumConfig, QuorumSettings, Role,
};

/// Heartbeat interval default: with 4 misses a dead link is noticed in about 200 ms,
/// well under the 500 ms failover target.
pub const DEFAULT_HEARTBEAT_MS: u64 = 50;
pub const DEFAULT_HEARTBEAT_MISSES: u32 = 4;
pub const DEFAULT_CLUSTER_ID: &str = "twinrun";
/// The A-Link refuses shorter secrets.
pub const MIN_SECRET_BYTES: usize = 16;

/// The FT flags of `vm run` (flattened into [`super::RunArgs`]).
#[derive(Debug, Default, Args)]
pub struct FtArgs {
    /// Run as one end of a protected pair (absent: unprotected).
    #[arg(long, value_enum, value_name = "ROLE")]
    pub role: Option<Role>,
    /// Protection level of the pair: ft (memory checkpoints, no reboot on failover),
    /// ha (disks mirrored synchronously, the VM boots again on the survivor) or
    /// unprotected (the VM runs alone at full speed; the pair exists only while a live
    /// migration runs: the node daemon's unprotected VMs).
    #[arg(long, value_enum, value_name = "LEVEL", default_value = "ft")]
    pub protection: Protection,
    /// One A-Link: LOCAL_IP:PORT,PEER_IP:PORT (repeatable, one per link; the standby
    /// listens on its local address, the primary connects to its peer address).
    #[arg(long = "alink", value_name = "LOCAL,PEER", value_parser = parse_alink_spec)]
    pub alinks: Vec<AlinkSpec>,
    /// Cluster id; both ends must agree (default "twinrun").
    #[arg(long, value_name = "ID")]
    pub cluster_id: Option<String>,
    /// File holding the cluster secret (at least 16 bytes); required with --role.
    #[arg(long, value_name = "PATH")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Checkpoint epoch length in ms (default: the protocol's).
    #[arg(long, value_name = "MS")]
    pub epoch_ms: Option<u64>,
    /// An epoch with output waiting ends after at least this many ms (fractions
    /// allowed, 0 = at once; default: the protocol's, 0.5): longer batches more replies
    /// per checkpoint (fewer pauses) at the cost of request latency.
    #[arg(long, value_name = "MS")]
    pub min_epoch_ms: Option<f64>,
    /// Waiting output ends an epoch early only while less than this many KiB of
    /// checkpoints are unacknowledged (or none is); past it the epoch waits for an
    /// acknowledgement (default 1024; 0 = only with nothing in flight). Bounds the
    /// checkpoint rate of a guest that writes much memory and output at once.
    #[arg(long, value_name = "KIB")]
    pub coalesce_kib: Option<u64>,
    /// Pages the guest keeps rewriting stay writable and are copied at every epoch,
    /// at most this many (default 2048; 0 = re-protect every page at every epoch, the
    /// right choice on hosts with hardware dirty logging, where write exits are cheap).
    #[arg(long, value_name = "PAGES")]
    pub hot_pages: Option<usize>,
    /// A-Link heartbeat interval in ms (default 50).
    #[arg(long, value_name = "MS")]
    pub heartbeat_ms: Option<u64>,
    /// Missed heartbeats after which a link is down (default 4).
    #[arg(long, value_name = "N")]
    pub heartbeat_misses: Option<u32>,
    /// Disk resync rate limit in MiB/s while the guest is quiet (default: unlimited;
    /// guest I/O always slows the resync down).
    #[arg(long, value_name = "MIB_S")]
    pub resync_rate: Option<u64>,
    /// Standby: forget this replica's disk metadata so that the primary sends a full
    /// copy (the way out of a refused resync, e.g. after a split brain).
    #[arg(long)]
    pub discard_disk_data: bool,
    /// Standby: the receiving end of a live migration (`twinrun vm migrate`): it never
    /// fails over when the primary is lost (the VM stays on the source), and takes the
    /// VM over only by the planned role swap that ends the migration.
    #[arg(long)]
    pub migration_target: bool,
    /// The pair's quorum: a TOML file whose `[quorum]` table says which backend
    /// (witness, etcd or none) decides who runs the VM when the PMs cannot talk
    /// (see quorum/README.md). Without it (or --witness) a cut of every A-Link with
    /// both PMs alive runs two copies.
    #[arg(long, value_name = "FILE")]
    pub quorum_config: Option<PathBuf>,
    /// This PM's quorum node id (1 or 2; the two PMs of a pair differ in parity).
    /// Required with --quorum-config or --witness.
    #[arg(long, value_name = "N")]
    pub quorum_node_id: Option<u64>,
    /// Where this node records its fencing generation (default
    /// $TWINRUN_STATE_DIR/quorum/<cluster>-<vm>-node<N>.state).
    #[arg(long, value_name = "FILE")]
    pub quorum_state: Option<PathBuf>,
    /// The VM's key at the quorum service (default: its --name). Both ends of a pair
    /// must use the same key.
    #[arg(long, value_name = "NAME")]
    pub quorum_key: Option<String>,
    /// Shorthand for a quorum config with backend "witness": the preferred witness.
    #[arg(long, value_name = "IP:PORT")]
    pub witness: Option<String>,
    /// The alternate witness (with --witness).
    #[arg(long, value_name = "IP:PORT")]
    pub witness_alternate: Option<String>,
    /// The witness's secret for this cluster (with --witness).
    #[arg(long, value_name = "PATH")]
    pub witness_secret_file: Option<PathBuf>,
    /// The private network as a heartbeat path besides the A-Links (with a quorum):
    /// LOCAL_IP:PORT,PEER_IP:PORT (UDP). The standby takes over only when every
    /// A-Link AND priv0 is silent.
    #[arg(long, value_name = "LOCAL,PEER", value_parser = parse_alink_spec)]
    pub priv0: Option<AlinkSpec>,
}

/// Largest `--min-epoch-ms` (an epoch with output waiting must end within a second).
const MAX_MIN_EPOCH_MS: f64 = 1000.0;
/// Largest `--coalesce-kib` (16 GiB: past any window, i.e. never wait).
const MAX_COALESCE_KIB: u64 = 16 << 20;
/// Largest `--hot-pages`: 256 MiB copied per epoch (the wire's per-epoch page limit is
/// far above any sensible hot set).
const MAX_HOT_PAGES: usize = 65536;

/// Why the FT flags cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FtError {
    #[error("--role needs at least one --alink LOCAL_IP:PORT,PEER_IP:PORT")]
    NoAlink,
    #[error("--role needs --cluster-secret-file <path>")]
    NoSecretFile,
    #[error("cannot read the cluster secret file {path}: {why}")]
    SecretUnreadable { path: String, why: String },
    #[error("the cluster secret file {path} is empty")]
    SecretEmpty { path: String },
    #[error("the cluster secret in {path} is {len} bytes; at least {MIN_SECRET_BYTES} are needed")]
    SecretShort { path: String, len: usize },
    #[error("{0} is only meaningful with --role")]
    NeedsRole(&'static str),
    #[error("--{0} must be positive")]
    Zero(&'static str),
    #[error("--min-epoch-ms must be a number of ms from 0 to {MAX_MIN_EPOCH_MS} (got {0})")]
    MinEpoch(String),
    #[error("--hot-pages must be at most {0}")]
    HotPages(usize),
    #[error("--coalesce-kib must be at most {0}")]
    Coalesce(u64),
    #[error("{0} is only meaningful with --role standby")]
    StandbyOnly(&'static str),
    #[error("at most {max} --alink (got {got})")]
    TooManyLinks { max: usize, got: usize },
    #[error("{0}")]
    Quorum(String),
}

/// Parses `LOCAL_IP:PORT,PEER_IP:PORT`.
pub fn parse_alink_spec(s: &str) -> Result<AlinkSpec, String> {
    let (l, p) = s.split_once(',').ok_or_else(|| {
        "expected LOCAL_IP:PORT,PEER_IP:PORT (e.g. 10.0.1.1:7000,10.0.1.2:7000)".to_string()
    })?;
    let local = l
        .trim()
        .parse()
        .map_err(|e| format!("bad local address {l:?}: {e}"))?;
    let peer = p
        .trim()
        .parse()
        .map_err(|e| format!("bad peer address {p:?}: {e}"))?;
    Ok(AlinkSpec { local, peer })
}

/// Reads the secret: the file's bytes without trailing whitespace (a newline an editor
/// added must not change the secret).
pub fn read_secret(path: &Path) -> Result<Vec<u8>, FtError> {
    let shown = path.display().to_string();
    let mut bytes = std::fs::read(path).map_err(|e| FtError::SecretUnreadable {
        path: shown.clone(),
        why: e.to_string(),
    })?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(FtError::SecretEmpty { path: shown });
    }
    if bytes.len() < MIN_SECRET_BYTES {
        return Err(FtError::SecretShort {
            path: shown,
            len: bytes.len(),
        });
    }
    Ok(bytes)
}

/// Checks the FT flags: `None` without `--role` (FT flags then refused), the settings
/// otherwise.
pub fn resolve_ft(a: &FtArgs) -> Result<Option<FtSettings>, FtError> {
    let Some(role) = a.role else {
        let stray = [
            (!a.alinks.is_empty(), "--alink"),
            (a.cluster_id.is_some(), "--cluster-id"),
            (a.cluster_secret_file.is_some(), "--cluster-secret-file"),
            (a.epoch_ms.is_some(), "--epoch-ms"),
            (a.min_epoch_ms.is_some(), "--min-epoch-ms"),
            (a.coalesce_kib.is_some(), "--coalesce-kib"),
            (a.hot_pages.is_some(), "--hot-pages"),
            (a.heartbeat_ms.is_some(), "--heartbeat-ms"),
            (a.heartbeat_misses.is_some(), "--heartbeat-misses"),
            (a.resync_rate.is_some(), "--resync-rate"),
            (a.discard_disk_data, "--discard-disk-data"),
            (a.migration_target, "--migration-target"),
            (a.quorum_config.is_some(), "--quorum-config"),
            (a.quorum_node_id.is_some(), "--quorum-node-id"),
            (a.quorum_state.is_some(), "--quorum-state"),
            (a.quorum_key.is_some(), "--quorum-key"),
            (a.witness.is_some(), "--witness"),
            (a.witness_alternate.is_some(), "--witness-alternate"),
            (a.witness_secret_file.is_some(), "--witness-secret-file"),
            (a.priv0.is_some(), "--priv0"),
            (a.protection == Protection::Ha, "--protection ha"),
            (
                a.protection == Protection::Unprotected,
                "--protection unprotected",
            ),
        ];
        return match stray.into_iter().find(|(set, _)| *set) {
            Some((_, flag)) => Err(FtError::NeedsRole(flag)),
            None => Ok(None),
        };
    };
    if a.alinks.is_empty() {
        return Err(FtError::NoAlink);
    }
    if a.alinks.len() > alink::MAX_LINKS {
        return Err(FtError::TooManyLinks {
            max: alink::MAX_LINKS,
            got: a.alinks.len(),
        });
    }
    let path = a
        .cluster_secret_file
        .as_ref()
        .ok_or(FtError::NoSecretFile)?;
    let secret = read_secret(path)?;
    let heartbeat_ms = a.heartbeat_ms.unwrap_or(DEFAULT_HEARTBEAT_MS);
    let heartbeat_misses = a.heartbeat_misses.unwrap_or(DEFAULT_HEARTBEAT_MISSES);
    if heartbeat_ms == 0 {
        return Err(FtError::Zero("heartbeat-ms"));
    }
    if heartbeat_misses == 0 {
        return Err(FtError::Zero("heartbeat-misses"));
    }
    if a.epoch_ms == Some(0) {
        return Err(FtError::Zero("epoch-ms"));
    }
    let min_epoch = match a.min_epoch_ms {
        None => None,
        Some(ms) if ms.is_finite() && (0.0..=MAX_MIN_EPOCH_MS).contains(&ms) => {
            Some(Duration::from_secs_f64(ms / 1e3))
        }
        Some(ms) => return Err(FtError::MinEpoch(ms.to_string())),
    };
    if a.resync_rate == Some(0) {
        return Err(FtError::Zero("resync-rate"));
    }
    if a.discard_disk_data && role != Role::Standby {
        return Err(FtError::StandbyOnly("--discard-disk-data"));
    }
    if a.migration_target && role != Role::Standby {
        return Err(FtError::StandbyOnly("--migration-target"));
    }
    let unprotected = a.protection == Protection::Unprotected;
    if a.hot_pages.is_some_and(|n| n > MAX_HOT_PAGES) {
        return Err(FtError::HotPages(MAX_HOT_PAGES));
    }
    if a.coalesce_kib.is_some_and(|k| k > MAX_COALESCE_KIB) {
        return Err(FtError::Coalesce(MAX_COALESCE_KIB));
    }
    Ok(Some(FtSettings {
        role,
        alinks: a.alinks.clone(),
        cluster_id: a
            .cluster_id
            .clone()
            .unwrap_or_else(|| DEFAULT_CLUSTER_ID.to_string()),
        secret,
        epoch_ms: a.epoch_ms,
        min_epoch,
        coalesce_bytes: a.coalesce_kib.map(|k| k << 10),
        hot_pages: a.hot_pages,
        heartbeat_ms,
        heartbeat_misses,
        resync_rate: a.resync_rate.map(|m| m.saturating_mul(1 << 20)),
        discard_disk_data: a.discard_disk_data,
        quorum: None,
        // An unprotected VM's standby exists only as a migration's receiving end.
        migration_target: a.migration_target || unprotected && role == Role::Standby,
        unprotected,
    }))
}

/// [`resolve_ft`] plus the quorum flags, which need the VM's `--name` (its quorum key).
pub fn resolve_ft_named(a: &FtArgs, name: Option<&str>) -> Result<Option<FtSettings>, FtError> {
    let Some(mut ft) = resolve_ft(a)? else {
        return Ok(None);
    };
    ft.quorum = resolve_quorum(a, name, &ft.cluster_id)?;
    if ft.unprotected && ft.quorum.is_some() {
        return Err(FtError::Quorum(
            "--protection unprotected runs the VM alone: it takes no quorum (--quorum-config \
             or --witness)"
                .into(),
        ));
    }
    Ok(Some(ft))
}

/// The quorum settings of `--quorum-config` or `--witness` (None without either).
pub fn resolve_quorum(
    a: &FtArgs,
    name: Option<&str>,
    cluster_id: &str,
) -> Result<Option<QuorumSettings>, FtError> {
    let bad = |s: String| Err(FtError::Quorum(s));
    let config = match (&a.quorum_config, &a.witness) {
        (Some(_), Some(_)) => return bad("give --quorum-config or --witness, not both".into()),
        (None, None) => {
            let stray = [
                (a.quorum_node_id.is_some(), "--quorum-node-id"),
                (a.quorum_state.is_some(), "--quorum-state"),
                (a.quorum_key.is_some(), "--quorum-key"),
                (a.witness_alternate.is_some(), "--witness-alternate"),
                (a.witness_secret_file.is_some(), "--witness-secret-file"),
                (a.priv0.is_some(), "--priv0"),
            ];
            return match stray.into_iter().find(|(set, _)| *set) {
                Some((_, f)) => bad(format!("{f} needs --quorum-config or --witness")),
                None => Ok(None),
            };
        }
        (Some(path), None) => {
            if a.witness_alternate.is_some() || a.witness_secret_file.is_some() {
                return bad(
                    "--witness-alternate and --witness-secret-file go with --witness".into(),
                );
            }
            read_quorum_config(path)?
        }
        (None, Some(preferred)) => {
            let Some(secret_file) = a.witness_secret_file.clone() else {
                return bad("--witness needs --witness-secret-file".into());
            };
            let c = QuorumConfig {
                cluster: cluster_id.to_string(),
                backend: quorum::config::BackendKind::Witness,
                witness: Some(quorum::config::WitnessConfig {
                    preferred: preferred.clone(),
                    alternate: a.witness_alternate.clone(),
                    secret_file,
                }),
                etcd: None,
                static_preference: None,
                timing: Default::default(),
            };
            c.validate().map_err(|e| FtError::Quorum(e.to_string()))?;
            c
        }
    };
    let Some(node) = a.quorum_node_id else {
        return bad("the quorum needs --quorum-node-id N (1 or 2, one per PM)".into());
    };
    if node == 0 {
        return bad("--quorum-node-id must be positive".into());
    }
    let peer = if node % 2 == 1 { node + 1 } else { node - 1 };
    let Some(vm) = a.quorum_key.as_deref().or(name) else {
        return bad("the quorum needs the VM's --name (its key at the witness)".into());
    };
    quorum::types::check_name("VM name", vm).map_err(FtError::Quorum)?;
    let state_file = a.quorum_state.clone().unwrap_or_else(|| {
        let root = std::env::var_os("TWINRUN_STATE_DIR")
            .map_or_else(|| PathBuf::from("/var/lib/twinrun"), PathBuf::from);
        root.join("quorum")
            .join(format!("{}-{vm}-node{node}.state", config.cluster))
    });
    Ok(Some(QuorumSettings {
        config,
        node: NodeId(node),
        peer: NodeId(peer),
        vm: vm.to_string(),
        state_file,
        priv0: a.priv0,
    }))
}

/// Reads the `[quorum]` table of a TOML file.
pub fn read_quorum_config(path: &Path) -> Result<QuorumConfig, FtError> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| FtError::Quorum(format!("cannot read the quorum config {shown}: {e}")))?;
    let mut doc: toml::Table = toml::from_str(&text)
        .map_err(|e| FtError::Quorum(format!("quorum config {shown}: {e}")))?;
    let Some(table) = doc.remove("quorum") else {
        return Err(FtError::Quorum(format!(
            "quorum config {shown}: no [quorum] table"
        )));
    };
    let c: QuorumConfig = table
        .try_into()
        .map_err(|e| FtError::Quorum(format!("quorum config {shown}: [quorum]: {e}")))?;
    c.validate()
        .map_err(|e| FtError::Quorum(format!("{shown}: {e}")))?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command, VmCommand};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<FtArgs, clap::Error> {
        let mut full = vec!["twinrun", "vm", "run"];
        full.extend_from_slice(args);
        match Cli::try_parse_from(full)?.command {
            Command::Vm(VmCommand::Run(a)) => Ok(a.ft),
            _ => panic!("not vm run"),
        }
    }

    fn secret_file(content: &[u8]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), content).unwrap();
        f
    }

    #[test]
    fn alink_spec() {
        let s = parse_alink_spec("10.0.1.1:7000,10.0.1.2:7001").unwrap();
        assert_eq!(s.local, "10.0.1.1:7000".parse().unwrap());
        assert_eq!(s.peer, "10.0.1.2:7001".parse().unwrap());
        assert!(parse_alink_spec("10.0.1.1:7000").is_err());
        assert!(parse_alink_spec("10.0.1.1,10.0.1.2:7000").is_err());
        assert!(parse_alink_spec("x:1,10.0.1.2:7000").is_err());
    }

    #[test]
    fn no_role_is_unprotected_and_refuses_ft_flags() {
        assert!(resolve_ft(&parse(&[]).unwrap()).unwrap().is_none());
        let a = parse(&["--alink", "1.1.1.1:1,2.2.2.2:2"]).unwrap();
        assert_eq!(resolve_ft(&a).unwrap_err(), FtError::NeedsRole("--alink"));
    }

    #[test]
    fn protection_defaults_to_ft_and_ha_needs_a_role() {
        assert_eq!(parse(&[]).unwrap().protection, Protection::Ft);
        let a = parse(&["--protection", "ha"]).unwrap();
        assert_eq!(a.protection, Protection::Ha);
        assert_eq!(
            resolve_ft(&a).unwrap_err(),
            FtError::NeedsRole("--protection ha")
        );
        let a = parse(&["--protection", "unprotected"]).unwrap();
        assert_eq!(
            resolve_ft(&a).unwrap_err(),
            FtError::NeedsRole("--protection unprotected")
        );
        assert!(parse(&["--protection", "none"]).is_err());
    }

    #[test]
    fn unprotected_standby_is_a_migration_target() {
        let f = secret_file(b"0123456789abcdef0123");
        let path = f.path().to_str().unwrap();
        let link = "1.1.1.1:1,2.2.2.2:2";
        let args = |role| {
            let a = [
                "--role",
                role,
                "--alink",
                link,
                "--cluster-secret-file",
                path,
                "--protection",
                "unprotected",
            ];
            resolve_ft(&parse(&a).unwrap()).unwrap().unwrap()
        };
        let p = args("primary");
        assert!(p.unprotected && !p.migration_target);
        let s = args("standby");
        assert!(s.unprotected && s.migration_target);
    }

    #[test]
    fn role_needs_links_and_secret() {
        let a = parse(&["--role", "primary"]).unwrap();
        assert_eq!(resolve_ft(&a).unwrap_err(), FtError::NoAlink);
        let a = parse(&["--role", "standby", "--alink", "1.1.1.1:1,2.2.2.2:2"]).unwrap();
        assert_eq!(resolve_ft(&a).unwrap_err(), FtError::NoSecretFile);
        let a = parse(&[
            "--role",
            "standby",
            "--alink",
            "1.1.1.1:1,2.2.2.2:2",
            "--cluster-secret-file",
            "/nonexistent/secret",
        ])
        .unwrap();
        let e = resolve_ft(&a).unwrap_err();
        assert!(matches!(e, FtError::SecretUnreadable { .. }), "{e}");
    }

    #[test]
    fn secret_file_checks() {
        let empty = secret_file(b"\n");
        assert!(matches!(
            read_secret(empty.path()),
            Err(FtError::SecretEmpty { .. })
        ));
        let short = secret_file(b"short\n");
        assert!(matches!(
            read_secret(short.path()),
            Err(FtError::SecretShort { len: 5, .. })
        ));
        let good = secret_file(b"0123456789abcdef-secret\n");
        assert_eq!(
            read_secret(good.path()).unwrap(),
            b"0123456789abcdef-secret"
        );
    }

    #[test]
    fn defaults_and_values() {
        let f = secret_file(b"0123456789abcdef0123");
        let p = f.path().to_str().unwrap();
        let a = parse(&[
            "--role",
            "primary",
            "--alink",
            "10.0.1.1:7000,10.0.1.2:7000",
            "--alink",
            "10.0.2.1:7000,10.0.2.2:7000",
            "--cluster-secret-file",
            p,
        ])
        .unwrap();
        let s = resolve_ft(&a).unwrap().unwrap();
        assert_eq!(s.role, Role::Primary);
        assert_eq!(s.alinks.len(), 2);
        assert_eq!(s.cluster_id, "twinrun");
        assert_eq!((s.heartbeat_ms, s.heartbeat_misses), (50, 4));
        assert_eq!(s.epoch_ms, None);
        let a = parse(&[
            "--role",
            "standby",
            "--alink",
            "10.0.1.2:7000,10.0.1.1:7000",
            "--cluster-secret-file",
            p,
            "--cluster-id",
            "c7",
            "--epoch-ms",
            "10",
            "--heartbeat-ms",
            "20",
            "--heartbeat-misses",
            "3",
        ])
        .unwrap();
        let s = resolve_ft(&a).unwrap().unwrap();
        assert_eq!(s.role, Role::Standby);
        assert_eq!(s.cluster_id, "c7");
        assert_eq!(s.epoch_ms, Some(10));
        assert_eq!((s.heartbeat_ms, s.heartbeat_misses), (20, 3));
        assert_ne!(s.cluster_id_u64(), 0);
        let a = parse(&[
            "--role",
            "standby",
            "--alink",
            "1.1.1.1:1,2.2.2.2:2",
            "--cluster-secret-file",
            p,
            "--heartbeat-ms",
            "0",
        ])
        .unwrap();
        assert_eq!(resolve_ft(&a).unwrap_err(), FtError::Zero("heartbeat-ms"));
        assert!(parse(&["--role", "witness"]).is_err());
        let with = |flag: &str, v: &str| {
            let arg = format!("{flag}={v}");
            let a = parse(&[
                "--role",
                "primary",
                "--alink",
                "1.1.1.1:1,2.2.2.2:2",
                "--cluster-secret-file",
                p,
                &arg,
            ])
            .unwrap();
            resolve_ft(&a)
        };
        let s = with("--min-epoch-ms", "0.25").unwrap().unwrap();
        assert_eq!(s.min_epoch, Some(Duration::from_micros(250)));
        let s = with("--min-epoch-ms", "0").unwrap().unwrap();
        assert_eq!(s.min_epoch, Some(Duration::ZERO));
        for bad in ["-1", "NaN", "inf", "1000.5"] {
            assert!(
                matches!(with("--min-epoch-ms", bad), Err(FtError::MinEpoch(_))),
                "{bad}"
            );
        }
        assert_eq!(
            with("--hot-pages", "0").unwrap().unwrap().hot_pages,
            Some(0)
        );
        assert_eq!(
            with("--hot-pages", "65537").unwrap_err(),
            FtError::HotPages(65536)
        );
        assert_eq!(
            with("--coalesce-kib", "0").unwrap().unwrap().coalesce_bytes,
            Some(0)
        );
        assert_eq!(
            with("--coalesce-kib", "256")
                .unwrap()
                .unwrap()
                .coalesce_bytes,
            Some(256 << 10)
        );
        assert_eq!(
            with("--coalesce-kib", "16777217").unwrap_err(),
            FtError::Coalesce(16 << 20)
        );
    }

    #[test]
    fn quorum_flags() {
        let s = secret_file(b"0123456789abcdef0123");
        let w = secret_file(b"witness-secret-0123456789");
        let sp = s.path().to_str().unwrap().to_string();
        let wp = w.path().to_str().unwrap().to_string();
        let base: Vec<&str> = vec![
            "--role",
            "primary",
            "--alink",
            "10.0.1.1:7000,10.0.1.2:7000",
            "--cluster-secret-file",
            &sp,
        ];
        let ft = resolve_ft_named(&parse(&base).unwrap(), Some("vm1"))
            .unwrap()
            .unwrap();
        assert!(ft.quorum.is_none(), "no quorum without its flags");
        let with = |extra: &[&str]| {
            let mut v = base.clone();
            v.extend_from_slice(extra);
            resolve_ft_named(&parse(&v).unwrap(), Some("vm1"))
        };
        let q = with(&[
            "--witness",
            "10.0.200.10:4557",
            "--witness-secret-file",
            &wp,
            "--quorum-node-id",
            "2",
            "--quorum-state",
            "/tmp/q.state",
        ])
        .unwrap()
        .unwrap()
        .quorum
        .unwrap();
        assert_eq!((q.node.0, q.peer.0, q.vm.as_str()), (2, 1, "vm1"));
        assert_eq!(q.state_file, PathBuf::from("/tmp/q.state"));
        assert_eq!(q.config.cluster, DEFAULT_CLUSTER_ID);
        let q = with(&[
            "--witness",
            "10.0.200.10:4557",
            "--witness-secret-file",
            &wp,
            "--quorum-node-id",
            "1",
            "--quorum-key",
            "shared",
        ])
        .unwrap()
        .unwrap()
        .quorum
        .unwrap();
        assert_eq!((q.node.0, q.peer.0, q.vm.as_str()), (1, 2, "shared"));
        let err = |extra: &[&str]| match with(extra) {
            Err(FtError::Quorum(m)) => m,
            other => panic!("expected a quorum error for {extra:?}, got {other:?}"),
        };
        assert!(
            err(&["--witness", "10.0.200.10:4557", "--quorum-node-id", "1"])
                .contains("--witness-secret-file")
        );
        assert!(err(&[
            "--witness",
            "10.0.200.10:4557",
            "--witness-secret-file",
            &wp
        ])
        .contains("--quorum-node-id"));
        assert!(err(&[
            "--witness",
            "nowhere",
            "--witness-secret-file",
            &wp,
            "--quorum-node-id",
            "1"
        ])
        .contains("nowhere"));
        assert!(err(&["--quorum-node-id", "1"]).contains("needs --quorum-config or --witness"));
        assert!(err(&[
            "--witness",
            "10.0.200.10:4557",
            "--quorum-config",
            "/x.toml",
            "--quorum-node-id",
            "1"
        ])
        .contains("not both"));
        // No --name: no quorum key.
        let mut v = base.clone();
        v.extend_from_slice(&[
            "--witness",
            "10.0.200.10:4557",
            "--witness-secret-file",
            &wp,
            "--quorum-node-id",
            "1",
        ]);
        assert!(
            matches!(resolve_ft_named(&parse(&v).unwrap(), None), Err(FtError::Quorum(m)) if m.contains("--name"))
        );
        // Quorum flags need --role.
        assert_eq!(
            resolve_ft(&parse(&["--witness", "10.0.200.10:4557"]).unwrap()).unwrap_err(),
            FtError::NeedsRole("--witness")
        );
    }

    #[test]
    fn quorum_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("q.toml");
        std::fs::write(
            &f,
            "[quorum]\ncluster = \"plant-a\"\nbackend = \"witness\"\n\n[quorum.witness]\npreferred = \"10.0.0.3:4557\"\nsecret_file = \"/etc/s\"\n\n[other]\nx = 1\n",
        )
        .unwrap();
        let c = read_quorum_config(&f).unwrap();
        assert_eq!(c.cluster, "plant-a");
        std::fs::write(&f, "[other]\nx = 1\n").unwrap();
        assert!(
            matches!(read_quorum_config(&f), Err(FtError::Quorum(m)) if m.contains("no [quorum] table"))
        );
        std::fs::write(&f, "[quorum]\ncluster = \"a\"\nbackend = \"witness\"\n").unwrap();
        assert!(
            matches!(read_quorum_config(&f), Err(FtError::Quorum(m)) if m.contains("[quorum.witness]"))
        );
        std::fs::write(&f, "[quorum\n").unwrap();
        assert!(read_quorum_config(&f).is_err());
        assert!(read_quorum_config(&dir.path().join("missing.toml")).is_err());
    }
}
