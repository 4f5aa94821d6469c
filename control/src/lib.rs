//! The control socket of a running VM: `$TWINRUN_RUN_DIR/<name>.sock`, served by every
//! `twinrun vm run` given a name (a VM alone, and either end of an FT pair).
//!
//! Protocol: each message is a u32 LE length (at most [`MAX_MESSAGE`]) followed by that
//! many bytes of postcard. The client sends a [`Request`] and reads one [`Response`];
//! it may send more on the same connection. A request more than one version away from
//! [`PROTOCOL_VERSION`] (see [`accepts`]: rolling upgrade), or one that does not
//! decode, gets [`Response::Error`].
//!
//! - [`Op::Status`] answers [`VmStatus`]: for one end of an FT pair its role, the
//!   protection state, checkpoints committed, the failover it performed, its links and
//!   disks ([`FtStatus`]). Tools and tests read the state of a VM here, not in its log.
//! - [`server`]: serving the socket (a VM alone, or one end of a pair through
//!   [`server::FtControl`]); [`disks`] and [`disk_fault`]: the disk operations.
//! - [`call`]: one request from a client.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod disk_fault;
pub mod disks;
pub mod server;

pub use twinrun_snapshot::paths;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The newest protocol version this code speaks. A change that bumps it keeps the
/// previous version's messages decoding (new [`Op`]/[`Response`] variants go last), so
/// a daemon of the next version can still drive a VMM started by this one.
/// 2: [`Response::Status`] carries a [`VmStatus`] (with the FT state of a pair).
/// 3: [`FtStatus`] carries the pair's quorum state.
/// 4: the quorum generation (fencing) in [`FtStatus`].
pub const PROTOCOL_CURRENT: u32 = 4;
/// The version this build's requests carry and its server speaks: [`PROTOCOL_CURRENT`],
/// or the one before it in a build made with `TWINRUN_PROTO_PREV=1` (the
/// rolling-upgrade tests' "old" node; the messages are the same, only the number
/// differs).
pub const PROTOCOL_VERSION: u32 = PROTOCOL_CURRENT - BUILT_AS_PREVIOUS as u32;

/// Whether this build was made with `TWINRUN_PROTO_PREV=1` (cargo rebuilds when it
/// changes): it then announces the previous version of its protocols. The daemons'
/// peer channel (twinrund) follows the same switch.
pub const BUILT_AS_PREVIOUS: bool = match option_env!("TWINRUN_PROTO_PREV") {
    Some(v) => matches!(v.as_bytes(), b"1"),
    None => false,
};

/// Whether a VMM speaking `ours` serves a client speaking `theirs`: the same version or
/// one either side (during a rolling upgrade the new daemon drives VMMs the old binary
/// started, until their VMs are migrated). Two versions apart is refused.
pub const fn accepts(ours: u32, theirs: u32) -> bool {
    ours.abs_diff(theirs) <= 1
}
pub const MAX_MESSAGE: u32 = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    pub op: Op,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Status,
    Pause,
    Resume,
    SnapshotCreate,
    /// Fault injection on disk `disk` (index in the VM config's `disks`); answered
    /// with [`Response::DiskFaults`].
    DiskFault {
        disk: u32,
        action: FaultAction,
    },
    // New variants go last: postcard encodes the variant index, so appending keeps
    // the messages of older clients decoding.
    /// Replication state of each mirrored disk; answered with [`Response::Disks`]
    /// (FT primary only).
    DiskStatus,
    /// Start an online verify of every mirrored disk; answered with [`Response::Ok`]
    /// (FT primary only, while a standby is in sync).
    DiskVerify,
    /// Planned role swap of an FT pair: the primary hands the VM to its standby at an
    /// epoch boundary with everything acknowledged (nothing lost), and becomes its
    /// standby; answered with [`Response::Swapped`] once the standby took over, or an
    /// error (not in sync, asked of the standby, the standby lost mid-swap: the VM
    /// then runs on here).
    Swap,
    /// Change the protection level of the running VM without a reboot (issue 15): an
    /// unprotected VM's VMM becomes an FT primary ([`LevelChange::Ft`]: its quorum
    /// client starts, a real standby may connect, it protects session after session),
    /// or an HA primary ([`LevelChange::Ha`]: HA's synchronous disk hooks installed, an
    /// HA standby accepted), or a primary whose standby is gone runs alone unprotected
    /// ([`LevelChange::Unprotected`]: its quorum client stopped, dirty logging off), or
    /// an HA primary whose standby is gone becomes an FT primary (FT's hooks, the same
    /// quorum client). Answered with [`Response::Ok`] once the change is made, or an
    /// error saying why not (a standby, a migration or a standby still connected, the
    /// quorum).
    SetLevel(LevelChange),
}

/// The level an [`Op::SetLevel`] asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LevelChange {
    /// FT, with the quorum the daemon would have given `--quorum-config`,
    /// `--quorum-node-id` and `--priv0` (None: no quorum service, the loud warning).
    Ft(Option<QuorumFlags>),
    /// HA (disks mirrored synchronously, no memory checkpoints), with the quorum as
    /// for [`LevelChange::Ft`].
    Ha(Option<QuorumFlags>),
    Unprotected,
}

/// What `--quorum-config FILE --quorum-node-id N [--priv0 LOCAL,PEER]` carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumFlags {
    /// A TOML file with a `[quorum]` table.
    pub config: String,
    pub node_id: u64,
    /// The VM's quorum key (its `--name`).
    pub vm: String,
    /// The private network's heartbeat path: (this end's address, the peer's).
    pub priv0: Option<(String, String)>,
}

impl LevelChange {
    /// "ft", "ha" or "unprotected".
    pub fn name(&self) -> &'static str {
        match self {
            LevelChange::Ft(_) => "ft",
            LevelChange::Ha(_) => "ha",
            LevelChange::Unprotected => "unprotected",
        }
    }
}

/// What to do to a disk's fault injection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultAction {
    /// The whole disk fails: every read, write and flush is an I/O error.
    Fail,
    /// Operations `ops` touching bytes `[offset, offset + len)` fail.
    BadRange {
        offset: u64,
        len: u64,
        ops: FaultOps,
    },
    /// Each batch of requests waits this long before it runs (0: no delay).
    DelayMs(u64),
    /// Remove every fault.
    Clear,
    /// Change nothing; report.
    Show,
}

/// Which operations a bad range fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultOps {
    Reads,
    Writes,
    All,
}

/// A bad range in a [`Response::DiskFaults`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadRange {
    pub offset: u64,
    pub len: u64,
    pub ops: FaultOps,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Status(VmStatus),
    Ok,
    Snapshot {
        generation: u32,
        kind: String,
        pause_us: u64,
        bytes: u64,
        folded: Vec<u32>,
    },
    Error {
        message: String,
    },
    /// A disk's faults after the request was applied.
    DiskFaults {
        disk: u32,
        failed: bool,
        bad_ranges: Vec<BadRange>,
        delay_ms: u64,
        /// Operations failed by injection since the VM started.
        injected: u64,
    },
    /// Each mirrored disk's replication state, in the VM config's disk order.
    Disks {
        disks: Vec<storage_mirror::primary::DiskStatus>,
    },
    /// The standby took the VM over at checkpoint `epoch`; the guest was paused here
    /// for `paused_us` until it accepted (the answer to [`Op::Swap`]).
    Swapped {
        epoch: u64,
        paused_us: u64,
    },
}

/// What a running VM process reports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    pub name: String,
    pub pid: u32,
    /// Paused by a control request (a VM alone).
    pub paused: bool,
    /// One end of an FT pair (`--role`); `None` for a VM running alone.
    pub ft: Option<Box<FtStatus>>,
}

/// What this end of a pair is now. A standby that took over is a primary (with
/// [`FtStatus::failover`] set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FtRole {
    Primary,
    Standby,
}

/// The protection state of one end of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FtState {
    /// No peer on any A-Link: a primary's VM runs unprotected until a standby
    /// connects; a standby listens for a primary.
    WaitingForPeer,
    /// Primary: a standby is connected and being brought in step (disks, memory);
    /// nothing of this session is committed yet, the VM is not protected.
    Syncing,
    /// Primary: the standby committed a checkpoint of this session; output is
    /// released only once committed.
    Protected,
    /// Standby: a primary is connected; the replica follows its checkpoints.
    Mirroring,
}

/// The FT part of [`VmStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FtStatus {
    /// The pair's protection level: "ft" (memory checkpoints) or "ha" (disks mirrored
    /// synchronously, the VM booted again on the survivor). Older ends omit it: "ft".
    #[serde(default = "ft_level")]
    pub protection: String,
    pub role: FtRole,
    pub state: FtState,
    /// A VM runs in this process: a primary's once built and started, a standby's
    /// once it took over.
    pub vm_running: bool,
    /// A-Link sessions begun in the current role: a primary starts one per standby, a
    /// standby one per primary it waits for.
    pub session: u64,
    /// Primary: sessions in which the VM became protected, the current one included.
    pub protections: u64,
    /// Primary: checkpoints of the current session the standby committed.
    pub epochs_committed: u64,
    /// The last epoch committed on the standby's replica. A primary knows it from the
    /// acknowledgements; a standby from its replica metadata, which records it about
    /// once a second (`None` without mirrored disks).
    pub last_committed_epoch: Option<u64>,
    /// Set once this process took over from a lost primary.
    pub failover: Option<FailoverStatus>,
    /// The last finished session of a primary (when its standby was lost or refused).
    pub last_session: Option<SessionStatus>,
    /// Each A-Link of the current session.
    pub links: Vec<LinkState>,
    /// Each disk: a primary's live mirroring state, a standby's replicas from their
    /// metadata.
    pub disks: Vec<disks::DiskView>,
    /// The pair's quorum as this node sees it (None: no quorum service configured).
    /// Always encoded (postcard is not self-describing: a skipped field would not
    /// decode); `default` lets older JSON without it parse.
    #[serde(default)]
    pub quorum: Option<QuorumView>,
}

/// The pair's quorum state on one node (`twinrun vm status --json`, field `quorum`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumView {
    /// "witness", "etcd" or "none".
    pub backend: String,
    /// This node's quorum id.
    pub node: u64,
    /// "primary" or "standby", as the quorum sees this node.
    pub role: String,
    /// The fencing generation held (primary) or last known (standby).
    pub generation: u64,
    /// The elected witness slot ("preferred" or "alternate").
    pub elected: String,
    /// The output gate: "acked" (FT), "free" (simplex, while the lease lasts), "hold".
    pub gate: String,
    /// Unacknowledged release allowed for this long still (gate "free" with a lease).
    pub free_left_ms: Option<u64>,
    /// The guest "run"s or is "paused" by the quorum.
    pub guest: String,
    /// Some path to the peer (any A-Link, or priv0) is alive.
    pub peer_reachable: bool,
    /// Per path to the peer (A-Links in order): alive.
    pub paths: Vec<bool>,
    /// Primary: the standby holds a committed checkpoint; standby: it holds one.
    pub protected: bool,
    /// Per configured witness slot.
    pub witnesses: Vec<WitnessView>,
    /// The generation this node was granted a takeover for, if it took over.
    pub took_over: Option<u64>,
    /// The higher generation that demoted this node, if it lost.
    pub demoted_by: Option<u64>,
    /// The last A-Link session this node refused because its peer carried an older
    /// generation (the fencing rule), in words.
    pub refused_session: Option<String>,
    /// The last operator alerts the quorum raised (witness lost or back, elected
    /// witness changed, simplex, paused...), oldest first, at most
    /// [`QUORUM_ALERTS_KEPT`]; each "kind: message".
    #[serde(default)]
    pub alerts: Vec<String>,
    /// The private network's heartbeat path, when configured: the peer proved alive
    /// on it recently (the peer is reachable while it or any A-Link is alive).
    #[serde(default)]
    pub priv0: Option<bool>,
}

/// How many recent alerts [`QuorumView::alerts`] keeps.
pub const QUORUM_ALERTS_KEPT: usize = 8;

/// One quorum service slot as a node sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessView {
    /// "preferred" or "alternate".
    pub slot: String,
    /// What it is ("witness 10.0.0.3:4557", "etcd ...").
    pub service: String,
    pub reachable: bool,
    /// This node's lease there, if it holds one of its generation.
    pub lease_left_ms: Option<u64>,
}

fn ft_level() -> String {
    "ft".into()
}

/// The takeover this process performed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverStatus {
    /// From the loss of the primary to the VM running here.
    pub time_ms: u64,
    /// The last committed epoch, the VM's state it resumed from.
    pub resumed_from_epoch: u64,
    /// The newest epoch whose output the old primary released.
    pub released_through: Option<u64>,
    /// Console bytes released again from the committed epochs after that.
    pub rereleased_bytes: u64,
    /// RARP announces of the guest's MAC sent before the guest ran.
    pub announces: u64,
}

/// What a primary's session did (from its report at the end of the session).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionStatus {
    pub session: u64,
    pub sync_rounds: u32,
    pub epochs_captured: u64,
    pub epochs_acked: u64,
    pub pause_p50_us: Option<u64>,
    pub pause_p99_us: Option<u64>,
    /// From the end of an epoch's capture to its acknowledgement.
    pub commit_wait_p50_us: Option<u64>,
    /// Dirty pages of the epochs after epoch 0, summed.
    pub epoch_pages: u64,
    pub throttles: u64,
    /// Page data the initial sync sent, and how long it took (round 0 to epoch 0
    /// committed).
    pub sync_bytes: u64,
    pub sync_us: Option<u64>,
    /// Bytes the disk resync of the session copied.
    pub resync_bytes: Option<u64>,
    /// The standby was refused (split brain...): why.
    pub refused: Option<String>,
    /// The standby was lost and the VM ran on unprotected.
    pub simplex: bool,
}

/// One A-Link.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkState {
    pub up: bool,
    /// Authenticated connections so far, and connections refused (bad handshake...).
    pub connections: u64,
    pub refused: u64,
    pub sent_bytes: u64,
}

pub fn write_message(s: &mut impl Write, payload: &[u8]) -> std::io::Result<()> {
    s.write_all(&(payload.len() as u32).to_le_bytes())?;
    s.write_all(payload)?;
    s.flush()
}

/// Reads one message; `Ok(None)` at a clean end of stream.
pub fn read_message(s: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message of {len} bytes is too long"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf)?;
    Ok(Some(buf))
}

/// The control socket of the running VM `name`; an error (bad input) for an invalid
/// name or when no VM of that name runs here.
pub fn socket_of(name: &str) -> Result<std::path::PathBuf, String> {
    paths::check_vm_name(name)?;
    let sock = paths::control_socket(name);
    if !sock.exists() {
        return Err(format!(
            "no running VM named {name} (no control socket {})",
            sock.display()
        ));
    }
    Ok(sock)
}

/// [`Op::Status`] of the VM whose socket is `path`.
pub fn status(path: &Path, timeout: Duration) -> Result<VmStatus, String> {
    match call(path, Op::Status, timeout)? {
        Response::Status(s) => Ok(s),
        Response::Error { message } => Err(message),
        other => Err(format!("unexpected reply to a status request: {other:?}")),
    }
}

/// The FT part of the status of the VM whose socket is `path` (5 s at most); `None`
/// while it does not answer (not started yet, or gone) or runs alone.
pub fn ft_status(path: &Path) -> Option<FtStatus> {
    status(path, Duration::from_secs(5)).ok()?.ft.map(|f| *f)
}

/// How long a swap request waits for its answer at most.
pub const SWAP_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks the FT primary whose socket is `path` for a planned role swap: Ok((epoch,
/// paused_us)) once its standby took the VM over.
pub fn swap(path: &Path) -> Result<(u64, u64), String> {
    match call(path, Op::Swap, SWAP_TIMEOUT + Duration::from_secs(5))? {
        Response::Swapped { epoch, paused_us } => Ok((epoch, paused_us)),
        Response::Error { message } => Err(message),
        other => Err(format!("unexpected reply to a swap request: {other:?}")),
    }
}

/// How long a level change may take at most (FT -> unprotected waits for the quorum
/// to have recorded the standby as outdated before the lease is given up). The control
/// socket serves nothing else meanwhile, so it is short.
pub const LEVEL_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the VMM whose socket is `path` to change its protection level ([`Op::SetLevel`]).
pub fn set_level(path: &Path, change: LevelChange) -> Result<(), String> {
    match call(
        path,
        Op::SetLevel(change),
        LEVEL_TIMEOUT + Duration::from_secs(5),
    )? {
        Response::Ok => Ok(()),
        Response::Error { message } => Err(message),
        other => Err(format!("unexpected reply to a level change: {other:?}")),
    }
}

/// Sends `op` to the VM whose socket is `path` and waits for the answer.
pub fn call(path: &Path, op: Op, timeout: Duration) -> Result<Response, String> {
    let mut s = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the VM's control socket {}: {e} (is the VM running?)",
            path.display()
        )
    })?;
    let _ = s.set_read_timeout(Some(timeout));
    let req = Request {
        version: PROTOCOL_VERSION,
        op,
    };
    let bytes = postcard::to_allocvec(&req).map_err(|e| e.to_string())?;
    write_message(&mut s, &bytes).map_err(|e| format!("sending the request: {e}"))?;
    let reply = read_message(&mut s)
        .map_err(|e| format!("reading the reply: {e}"))?
        .ok_or("the VM closed the connection without answering")?;
    postcard::from_bytes(&reply).map_err(|e| format!("bad reply: {e}"))
}
