//! The cluster's objects as the operator sees them: a VM's spec (what to run and how to
//! protect it), its replicated record (spec + what the operator wants + where it runs),
//! and the states shown back with the reason a VM is where it is.
//!
//! These types are the API's and the store's: they derive `ToSchema` so the OpenAPI
//! document is generated from them, and every field is readable back.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Name of a node (a PM), as in its config file.
pub type NodeName = String;

/// Limits checked at create/set time (everRun's per-VM limits, seed 004).
pub const MAX_VCPUS: u8 = 20;
pub const MAX_MEM_MIB: u64 = 256 * 1024;
pub const MIN_MEM_MIB: u64 = 16;
pub const MAX_DISKS: usize = 12;
pub const MAX_NICS: usize = 20;
/// Most VMs one cluster holds (everRun: 28; a round bound above it).
pub const MAX_VMS: usize = 64;

/// How a VM is protected (everRun's levels).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protection {
    /// Runs on one node; not failed over; restarted with its node if `autostart`.
    Unprotected,
    /// Disks mirrored synchronously; booted again on the survivor when its node is lost.
    Ha,
    /// Memory and disks checkpointed to a standby every epoch; no reboot on failover.
    Ft,
}

impl Protection {
    /// FT and HA run as a pair of VMMs (primary and standby); unprotected as one.
    pub fn paired(self) -> bool {
        matches!(self, Protection::Ft | Protection::Ha)
    }
}

impl fmt::Display for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protection::Unprotected => "unprotected",
            Protection::Ha => "ha",
            Protection::Ft => "ft",
        })
    }
}

/// What happens once the preferred node is back and fully in sync.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Failback {
    /// The VM moves back by itself.
    Auto,
    /// The VM stays; `twinrun vm failback` moves it.
    #[default]
    Manual,
}

/// What the VM boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PayloadSpec {
    /// The twinrun test guest (path of its ELF on every node; empty: the node's
    /// configured `guest_elf`), with its workloads.
    TestGuest {
        #[serde(default)]
        #[schema(value_type = Option<String>)]
        elf: Option<PathBuf>,
        /// Workloads: counter, dirty, disk, kv.
        #[serde(default)]
        workloads: Vec<String>,
        /// Test-guest counter rate (lines per second), if the counter runs.
        #[serde(default)]
        counter_rate: Option<u32>,
        /// kv server address `a.b.c.d/prefix`, if kv runs.
        #[serde(default)]
        kv_addr: Option<String>,
    },
    /// A Linux kernel with an optional initramfs and command line.
    Linux {
        #[schema(value_type = String)]
        kernel: PathBuf,
        #[serde(default)]
        #[schema(value_type = Option<String>)]
        initrd: Option<PathBuf>,
        #[serde(default)]
        cmdline: Option<String>,
    },
}

/// A disk of the VM. Each node keeps its own image (replica) of it at
/// `<state_dir>/vms/<vm>/disk<i>.img`, created sparse with this size.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    pub size_mib: u64,
}

/// A network interface: the guest's MAC. Each node attaches it to a TAP it names
/// itself (derived from the node's config), bridged where the node's config says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    pub mac: String,
}

/// Everything an operator says about a VM (TOML spec file or API body).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    #[serde(default = "one")]
    pub vcpus: u8,
    pub mem_mib: u64,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    pub payload: PayloadSpec,
    pub protection: Protection,
    /// Node the VM runs on when it can (and fails back to); default: the node that
    /// created it.
    #[serde(default)]
    pub preferred_node: Option<NodeName>,
    /// Start it when the cluster (or its node) starts.
    #[serde(default)]
    pub autostart: bool,
    #[serde(default)]
    pub failback: Failback,
}

fn one() -> u8 {
    1
}

/// What `vm set` may change (absent fields keep their value).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmSettings {
    #[serde(default)]
    pub protection: Option<Protection>,
    #[serde(default)]
    pub preferred_node: Option<NodeName>,
    #[serde(default)]
    pub autostart: Option<bool>,
    #[serde(default)]
    pub failback: Option<Failback>,
}

/// What the operator wants of a VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Desired {
    Running,
    /// Stopped by `shutdown`: the VMM gets SIGTERM (devices flushed).
    #[default]
    Stopped,
    /// Stopped by `poweroff`: the VMM is killed at once.
    PoweredOff,
}

impl fmt::Display for Desired {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Desired::Running => "running",
            Desired::Stopped => "stopped",
            Desired::PoweredOff => "powered-off",
        })
    }
}

/// A record's version: a Lamport clock and the node that wrote it. Versions are totally
/// ordered (clock first, then node name), so both nodes pick the same winner when two
/// writes of one record meet.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
pub struct Version {
    pub clock: u64,
    pub node: NodeName,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.clock, self.node)
    }
}

/// The replicated record of one VM: the same on both nodes once they have talked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmRecord {
    pub spec: VmSpec,
    pub desired: Desired,
    /// The node that runs the VM (FT: the primary). None until first placed.
    pub owner: Option<NodeName>,
    /// Index that picks the VM's A-Link ports and TAP names on both nodes (the lowest
    /// free one at create).
    pub slot: u16,
    /// One-shot commands as counters: a node that runs the VM performs each increment
    /// once (restart, failback), whatever path the record took to reach it.
    pub restart_seq: u64,
    pub failback_seq: u64,
    /// Bumped by `vm start` after an error: the supervisor forgets the crash count.
    pub clear_seq: u64,
    /// A deleted VM stays as a tombstone so a node that was away learns of the delete.
    pub deleted: bool,
    /// Why the cluster (not the operator) stopped it, shown on both nodes.
    #[serde(default)]
    pub stopped_because: Option<String>,
    /// A live migration of this (unprotected) VM to that node is under way (`twinrun vm
    /// migrate`); cleared when it completes (the owner is then that node) or is given up
    /// (the VM runs on where it was). Absent from records written before it, and from
    /// records without one (an N-1 daemon reads them unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrate_to: Option<NodeName>,
    /// The version that created it: tells one incarnation of a name from the next.
    pub created: Version,
    pub version: Version,
}

/// Where a VM is, as shown to the operator (Proxmox's service states, everRun's VM
/// states).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum VmState {
    Stopped,
    /// Waiting for something before it can start (the peer, a quorum grant, a node).
    Pending,
    Starting,
    Running,
    /// FT: both ends up and checkpointing (or HA: both replicas in sync).
    Protected,
    /// A protected VM running on one node only.
    Simplex,
    Stopping,
    /// Its node is lost and it does not fail over (unprotected).
    Down,
    /// Crashed more often than allowed: held until the operator acts.
    Error,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

/// Role of one VMM process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Unprotected (or HA) VM: one process, no peer.
    Solo,
    Primary,
    Standby,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Solo => "solo",
            Role::Primary => "primary",
            Role::Standby => "standby",
        })
    }
}

/// A VMM process as its node reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmmInfo {
    pub node: NodeName,
    pub role: Role,
    pub pid: u32,
    /// FT primary: the standby committed a checkpoint and protects it.
    pub protected: bool,
    /// FT: this process was a standby that took over.
    pub failed_over: bool,
}

/// A VM as `vm show` / `GET /vms/{name}` returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmView {
    pub spec: VmSpec,
    pub desired: Desired,
    pub owner: Option<NodeName>,
    pub state: VmState,
    /// Why the VM is in this state, in words an operator can act on.
    pub reason: String,
    /// The VMM processes known to this node (its own, and the peer's as last reported).
    pub vmms: Vec<VmmInfo>,
    /// Crash restarts in the current window on this node.
    pub restarts: u32,
    pub version: Version,
    /// A live migration to that node is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrating_to: Option<NodeName>,
}

/// A live migration's progress as `GET /vms/{name}/migration` returns it (the CLI's
/// progress bar). The pre-copy figures come from the source VMM's log on the node
/// answering (its rounds as they are sent); asked of the other node they are absent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MigrationView {
    pub vm: String,
    /// The record names a target: the migration is under way.
    pub active: bool,
    /// Where the VM runs (the source while it is under way).
    pub owner: Option<NodeName>,
    pub to: Option<NodeName>,
    pub state: VmState,
    /// The phase, or why it ended, in words.
    pub reason: String,
    /// Pre-copy rounds sent so far (round 0 is all of memory).
    pub rounds: Option<u32>,
    /// Memory pages the pre-copy sent so far, and their bytes (4 KiB pages).
    pub pages_sent: Option<u64>,
    pub bytes_sent: Option<u64>,
    /// Pages the guest dirtied per second during the last round (the next round's
    /// size over the last round's time).
    pub dirty_pages_per_s: Option<u64>,
    /// Estimated time to the final pause: the next round at the rate the last ones
    /// were sent (None until two rounds were seen, or once in sync).
    pub eta_ms: Option<u64>,
    /// The target committed a checkpoint: the handover follows.
    pub in_sync: bool,
    /// The guest's memory in bytes (the pre-copy's first round).
    pub memory_bytes: u64,
}

/// State of a node as seen from the node answering.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum NodeState {
    /// The node answering.
    Local,
    /// Connected and authenticated.
    Online,
    /// Never seen since this daemon started.
    Unknown,
    /// Was online; its heartbeats stopped.
    Lost,
}

/// A node as `node list` / `GET /nodes` returns it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeView {
    pub name: NodeName,
    pub state: NodeState,
    pub api_addr: String,
    pub peer_addr: String,
    /// VMs whose active copy runs there.
    pub vms_owned: u32,
    /// Why the node is in this state.
    pub reason: String,
    /// Daemon protocol version (peer: as it announced).
    pub protocol: Option<u32>,
    /// Set while the node is in maintenance (`twinrun node workon`): why, and what
    /// `twinrun node finalize` does.
    #[serde(default)]
    pub maintenance: Option<String>,
}

/// Key prefix of a node's record in the replicated digest (a VM name never starts
/// with '-', so the two kinds of record never share a key).
pub const NODE_RECORD_PREFIX: &str = "-node.";

/// The replicated record of one node: whether it is in maintenance (`twinrun node
/// workon` / `finalize`). Merged by the same rule as the VM records (last writer wins on
/// the version), so both nodes agree, and a restarted daemon finds it in its store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeRecord {
    pub name: NodeName,
    pub maintenance: bool,
    /// Why, in words (what was moved off the node and what finalize will do).
    pub reason: String,
    /// Unprotected VMs that `workon` shut down cleanly here and `finalize` starts
    /// again on this node.
    #[serde(default)]
    pub shut_down: Vec<String>,
    pub version: Version,
}

impl NodeRecord {
    /// Its key in the replicated digest.
    pub fn key(&self) -> String {
        format!("{NODE_RECORD_PREFIX}{}", self.name)
    }
}

/// Checks a VM name: it becomes file and socket names (the VMM's own rule) and an
/// argument of commands (so not starting with '-'), at most 48 bytes.
pub fn check_vm_name(name: &str) -> Result<(), String> {
    twinrun_control::paths::check_vm_name(name)?;
    if name.len() > 48 || name.starts_with('-') {
        return Err(format!(
            "bad VM name {name:?}: at most 48 bytes, not starting with '-'"
        ));
    }
    Ok(())
}

const WORKLOADS: [&str; 4] = ["counter", "dirty", "disk", "kv"];

impl VmSpec {
    /// Checks the spec against the limits and the cluster's node names; the error says
    /// which field and what is allowed.
    pub fn validate(&self, nodes: &[&str]) -> Result<(), String> {
        check_vm_name(&self.name)?;
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(format!(
                "vcpus must be 1 to {MAX_VCPUS} (got {})",
                self.vcpus
            ));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(format!(
                "mem_mib must be {MIN_MEM_MIB} to {MAX_MEM_MIB} (got {})",
                self.mem_mib
            ));
        }
        if self.disks.len() > MAX_DISKS {
            return Err(format!(
                "at most {MAX_DISKS} disks (got {})",
                self.disks.len()
            ));
        }
        if let Some((i, _)) = self
            .disks
            .iter()
            .enumerate()
            .find(|(_, d)| d.size_mib == 0 || d.size_mib > 1 << 24)
        {
            return Err(format!("disks[{i}].size_mib must be 1 to 16777216"));
        }
        if self.nics.len() > MAX_NICS {
            return Err(format!("at most {MAX_NICS} nics (got {})", self.nics.len()));
        }
        for (i, n) in self.nics.iter().enumerate() {
            check_mac(&n.mac).map_err(|e| format!("nics[{i}].mac: {e}"))?;
        }
        match &self.payload {
            PayloadSpec::TestGuest {
                workloads, kv_addr, ..
            } => {
                for w in workloads {
                    if !WORKLOADS.contains(&w.as_str()) {
                        return Err(format!(
                            "unknown workload {w:?} (expected one of {})",
                            WORKLOADS.join(", ")
                        ));
                    }
                }
                if workloads.iter().any(|w| w == "disk") && self.disks.is_empty() {
                    return Err(
                        "the disk workload needs a disk (disks = [{ size_mib = 8 }])".into(),
                    );
                }
                if workloads.iter().any(|w| w == "kv") && self.nics.is_empty() {
                    return Err("the kv workload needs a nic (nics = [{ mac = \"02:..\" }])".into());
                }
                if let Some(a) = kv_addr {
                    check_cidr(a).map_err(|e| format!("payload.kv_addr: {e}"))?;
                }
            }
            PayloadSpec::Linux { kernel, .. } => {
                if kernel.as_os_str().is_empty() {
                    return Err("payload.kernel is empty".into());
                }
            }
        }
        if let Some(p) = &self.preferred_node {
            if !nodes.contains(&p.as_str()) {
                return Err(format!(
                    "preferred_node {p:?} is not a node of this cluster (nodes: {})",
                    nodes.join(", ")
                ));
            }
        }
        if self.protection == Protection::Ft && self.vcpus > 8 {
            return Err("FT VMs have at most 8 vCPUs".into());
        }
        Ok(())
    }
}

/// A unicast MAC `aa:bb:cc:dd:ee:ff`.
pub fn check_mac(mac: &str) -> Result<(), String> {
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6
        || parts
            .iter()
            .any(|p| p.len() != 2 || u8::from_str_radix(p, 16).is_err())
    {
        return Err(format!("{mac:?} is not a MAC (aa:bb:cc:dd:ee:ff)"));
    }
    let first = u8::from_str_radix(parts[0], 16).unwrap_or(1);
    if first & 1 != 0 {
        return Err(format!(
            "{mac:?} is a multicast MAC (the first byte must be even)"
        ));
    }
    Ok(())
}

fn check_cidr(s: &str) -> Result<(), String> {
    let (ip, prefix) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?} is not a.b.c.d/prefix"))?;
    ip.parse::<std::net::Ipv4Addr>()
        .map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
    match prefix.parse::<u8>() {
        Ok(p) if p <= 32 => Ok(()),
        _ => Err(format!("{prefix:?} is not a prefix length (0-32)")),
    }
}

/// The VMs and nodes as the API lists them (kept sorted by name).
pub type VmMap = BTreeMap<String, VmRecord>;

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn spec(name: &str) -> VmSpec {
        VmSpec {
            name: name.into(),
            vcpus: 1,
            mem_mib: 64,
            disks: vec![DiskSpec { size_mib: 8 }],
            nics: vec![],
            payload: PayloadSpec::TestGuest {
                elf: None,
                workloads: vec!["counter".into(), "disk".into()],
                counter_rate: None,
                kv_addr: None,
            },
            protection: Protection::Ft,
            preferred_node: Some("pm1".into()),
            autostart: true,
            failback: Failback::Auto,
        }
    }

    #[test]
    fn spec_validation_names_the_field() {
        let nodes = ["pm1", "pm2"];
        assert_eq!(spec("web").validate(&nodes), Ok(()));
        let mut s = spec("web");
        s.vcpus = 0;
        assert!(s.validate(&nodes).unwrap_err().contains("vcpus"));
        let mut s = spec("web");
        s.preferred_node = Some("pm9".into());
        assert!(s.validate(&nodes).unwrap_err().contains("pm9"));
        let mut s = spec("web");
        s.nics = vec![NicSpec {
            mac: "01:00:00:00:00:01".into(),
        }];
        assert!(s.validate(&nodes).unwrap_err().contains("multicast"));
        let mut s = spec("web");
        s.disks.clear();
        assert!(s.validate(&nodes).unwrap_err().contains("disk workload"));
        assert!(spec("../x").validate(&nodes).is_err());
        assert!(spec("-x").validate(&nodes).is_err());
    }

    #[test]
    fn versions_order_by_clock_then_node() {
        let v = |c, n: &str| Version {
            clock: c,
            node: n.into(),
        };
        assert!(v(2, "pm1") > v(1, "pm2"));
        assert!(v(2, "pm2") > v(2, "pm1"));
    }

    #[test]
    fn spec_toml_round_trip() {
        let text = r#"
name = "db"
mem_mib = 128
protection = "ft"
preferred_node = "pm2"
failback = "auto"
disks = [{ size_mib = 16 }]
[payload]
kind = "test-guest"
workloads = ["disk"]
"#;
        let s: VmSpec = toml::from_str(text).unwrap();
        assert_eq!(s.vcpus, 1);
        assert_eq!(s.protection, Protection::Ft);
        assert_eq!(s.failback, Failback::Auto);
        assert!(toml::from_str::<VmSpec>("name = \"x\"\nbogus = 1").is_err());
    }
}
