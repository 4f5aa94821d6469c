//! What one end of an FT pair is given: its role, its A-Links, the cluster's identity
//! and secret, and the tunables (`twinrun vm run --role ...` resolves its flags into
//! [`FtSettings`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use ::quorum::config::QuorumConfig;
pub use ::quorum::types::NodeId;

/// Which end of a protected pair this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Role {
    /// Runs the VM and checkpoints it to the standby.
    Primary,
    /// Keeps a replica and takes over when every A-Link to the primary is lost.
    Standby,
}

/// How a pair protects its VM (`--protection`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum Protection {
    /// Fault tolerant: memory checkpoints, the standby resumes the VM where it was.
    #[default]
    Ft,
    /// High availability: disks mirrored synchronously, the standby boots the VM
    /// again from its replica.
    Ha,
    /// Unprotected: the VM runs alone, at full speed (no dirty logging, no epochs, no
    /// quorum). Its VMM is still one end of a pair so that it can be live migrated:
    /// the migration's receiving VMM (a standby with `--migration-target`) connects,
    /// the FT session is the pre-copy and the planned swap the handover; given up,
    /// the VM runs alone again.
    Unprotected,
}

impl Protection {
    pub fn name(self) -> &'static str {
        match self {
            Protection::Ft => "ft",
            Protection::Ha => "ha",
            Protection::Unprotected => "unprotected",
        }
    }
}

/// One A-Link: this end's address and the peer's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlinkSpec {
    pub local: SocketAddr,
    pub peer: SocketAddr,
}

/// Everything FT mode needs, checked.
#[derive(Clone, Debug)]
pub struct FtSettings {
    pub role: Role,
    pub alinks: Vec<AlinkSpec>,
    pub cluster_id: String,
    pub secret: Vec<u8>,
    pub epoch_ms: Option<u64>,
    pub min_epoch: Option<Duration>,
    /// `--coalesce-kib`, in bytes.
    pub coalesce_bytes: Option<u64>,
    /// `--hot-pages`: None = the default policy, Some(0) = off.
    pub hot_pages: Option<usize>,
    pub heartbeat_ms: u64,
    pub heartbeat_misses: u32,
    /// Bytes/s; None = unlimited.
    pub resync_rate: Option<u64>,
    pub discard_disk_data: bool,
    /// The pair's quorum (`--quorum-config`/`--witness`); None: no quorum service,
    /// today's behaviour (a cut of every A-Link runs two copies), loudly warned.
    pub quorum: Option<QuorumSettings>,
    /// `--migration-target` (standby only): this standby is the receiving end of a
    /// live migration. It never takes the VM over when the primary is lost (the VM
    /// stays where it ran: a failed migration leaves it on the source); it becomes the
    /// primary only through the planned swap the migration ends with.
    pub migration_target: bool,
    /// `--protection unprotected`: the VM is unprotected; this end is one of the pair
    /// only while a live migration runs (the primary alone otherwise: no quorum, no
    /// dirty logging, no epochs; the standby only as `migration_target`).
    pub unprotected: bool,
}

/// What one node needs to ask its quorum service who may run the VM.
#[derive(Clone, Debug)]
pub struct QuorumSettings {
    /// The `[quorum]` table: backend, witnesses or etcd, timing.
    pub config: QuorumConfig,
    /// This node's quorum id (the two PMs' ids differ in parity).
    pub node: NodeId,
    /// The peer's id (of the other parity).
    pub peer: NodeId,
    /// The VM's quorum key (its `--name`).
    pub vm: String,
    /// Where this node records its generation and elected witness, durably.
    pub state_file: PathBuf,
    /// The private network as a heartbeat path (UDP, this end's and the peer's
    /// address): the peer is reachable while it or any A-Link is alive.
    pub priv0: Option<AlinkSpec>,
}

impl FtSettings {
    /// The numeric cluster id the A-Link carries: FNV-1a 64 of the name.
    pub fn cluster_id_u64(&self) -> u64 {
        twinrun_guest_abi::fnv1a64(self.cluster_id.as_bytes())
    }

    /// The primary protocol's tunables as given (the rest its defaults); the minimum
    /// epoch never longer than the epoch.
    pub fn primary_protocol(&self) -> checkpoint::protocol::PrimaryConfig {
        let mut protocol = checkpoint::protocol::PrimaryConfig::default();
        if let Some(ms) = self.epoch_ms {
            protocol.epoch_len = Duration::from_millis(ms);
        }
        if let Some(d) = self.min_epoch {
            protocol.min_epoch = d;
        }
        protocol.min_epoch = protocol.min_epoch.min(protocol.epoch_len);
        if let Some(b) = self.coalesce_bytes {
            protocol.coalesce_bytes = b;
        }
        protocol
    }
}
