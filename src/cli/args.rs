//! clap definitions for `twinrun` and the parsers of compound flag values
//! (`--disk`, `--net`, `--console`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use vmm::config::{parse_mac, ConsoleConfig, DiskConfig, IoEngine, NetConfig};

/// twinrun: a fault-tolerant hypervisor layer.
#[derive(Debug, Parser)]
#[command(name = "twinrun", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process; boxing the big variant would only complicate matching.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage a single virtual machine on this host.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Snapshots of a VM: create, list, restore, delete, export, import.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Mirrored disks: replication state (live or from the metadata files) and
    /// online verify.
    #[command(subcommand)]
    Disk(super::disk::DiskCommand),
    /// The cluster's nodes, through a node daemon's API.
    #[command(subcommand)]
    Node(super::cluster::NodeCommand),
    /// FT demo on this machine (root): a protected pair in network namespaces, a kv
    /// client, SIGKILL of the primary mid-load, and a report of what was lost (nothing).
    Demo(DemoArgs),
    /// Quorum witness service for FT pairs (UDP), and its status.
    Witness(super::witness::WitnessArgs),
}

/// Flags of `twinrun demo`.
#[derive(Debug, Default, Args)]
pub struct DemoArgs {
    /// Print exactly one JSON object (the report) on stdout.
    #[arg(long)]
    pub json: bool,
    /// Kill the primary this long after protection began and the client started.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    pub kill_after_ms: u64,
    /// Keep the client going this long after the kill before reading back.
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    pub keep_going_ms: u64,
    /// The single-pair FT demo (two hand-started VMMs, no daemons) instead of the
    /// whole system.
    #[arg(long)]
    pub pair: bool,
    /// After the report, keep the surviving system running and print its API address,
    /// until Ctrl-C.
    #[arg(long, conflicts_with = "pair")]
    pub keep: bool,
}

/// `twinrun snapshot ...`. Exit code 2 for bad input (unknown VM or generation,
/// damaged or foreign files, disk in use), 1 for other failures.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a running VM (through its control socket).
    Create { vm: String },
    /// List a VM's snapshot generations.
    List { vm: String },
    /// Start a new VM process from a generation (runs until the guest exits).
    Restore(RestoreArgs),
    /// Delete a generation (its pages are folded into the next one).
    Delete { vm: String, generation: u32 },
    /// Write a generation, merged into one full snapshot, to a portable file.
    Export {
        vm: String,
        generation: u32,
        file: PathBuf,
    },
    /// Check an exported file completely, then add it as a new full generation.
    Import {
        file: PathBuf,
        /// VM to import into (default: the name in the file).
        #[arg(long)]
        name: Option<String>,
    },
    /// Rebuild a generation's memory and check it against the hash recorded when it
    /// was taken (snapshots taken with TWINRUN_SNAPSHOT_MEMCHECK=1).
    Verify { vm: String, generation: u32 },
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    pub vm: String,
    pub generation: u32,
    /// Name of the restored VM (default: the snapshot's VM name).
    #[arg(long)]
    pub name: Option<String>,
    /// Console sink of the restored VM: stdout | file:PATH | socket:PATH.
    #[arg(long, value_name = "SINK", value_parser = parse_console_spec)]
    pub console: Option<ConsoleConfig>,
    /// Where to rebuild disk images, in disk order (default: the configured paths).
    #[arg(long = "disk-path", value_name = "PATH")]
    pub disk_paths: Vec<PathBuf>,
}

// Parsed once per process, like `Command`.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot a VM and run it until the guest exits, it crashes, or SIGTERM/SIGINT.
    ///
    /// Exit codes: 0 guest exited with status 0 or the VM was stopped by a signal;
    /// 1 guest exited with a nonzero status; 2 usage or configuration error;
    /// 3 the VM crashed (triple fault, internal error, ...); 4 the VM could not be
    /// built or started.
    Run(RunArgs),
    /// Inject disk faults into a running VM (started with --name): fail the disk, fail
    /// a byte range, slow its I/O, or clear; prints the disk's faults afterwards.
    ///
    /// Exit codes: 0 applied; 1 the VM could not be reached; 2 bad input.
    Fault(super::fault::FaultArgs),
    /// What a running VM (started with --name) reports: for one end of an FT pair its
    /// role, protection state, checkpoints committed, failover, A-Links and disks.
    ///
    /// Exit codes: 0 printed; 1 the VM could not be reached; 2 bad input.
    Status(super::status::StatusArgs),
    /// Planned role swap of a running FT pair (asked of its primary, started with
    /// --name): the standby takes the VM over at a checkpoint boundary, nothing lost,
    /// and this end becomes its standby. Refused when the pair is not in sync.
    ///
    /// Exit codes: 0 swapped; 1 refused, failed (the VM runs on here) or unreachable;
    /// 2 bad input.
    Swap(super::swap::SwapArgs),
    /// The cluster's VMs, through a node daemon's API.
    #[command(flatten)]
    Cluster(super::cluster::ClusterVmCommand),
}

/// A test-guest workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    Counter,
    Dirty,
    Disk,
    Kv,
    /// Sequential disk throughput test (benchmark suite); overwrites disks[0].
    Blkbench,
}

/// Flags of `twinrun vm run`. Every flag overrides the matching value of `--config`;
/// `--workload`, `--disk` and `--net` replace the file's set/list as a whole.
#[derive(Debug, Default, Args)]
pub struct RunArgs {
    /// Name of the VM: its control socket is $TWINRUN_RUN_DIR/<name>.sock and its
    /// snapshots live in $TWINRUN_STATE_DIR/<name>/snapshots (default vm0).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// TOML VM config (the fields of `VmConfig`); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Guest RAM in MiB (default 128 without a config file).
    #[arg(long, value_name = "MIB")]
    pub mem_mib: Option<u64>,
    /// Number of vCPUs (default 1 without a config file).
    #[arg(long, value_name = "N")]
    pub vcpus: Option<u8>,
    /// Test-guest ELF; defaults to the built guest found next to the binary or repo.
    #[arg(long, value_name = "ELF")]
    pub guest: Option<PathBuf>,
    /// Boot a stock Linux kernel (vmlinux or bzImage) instead of the test guest.
    #[arg(long, value_name = "VMLINUX|BZIMAGE", conflicts_with = "guest")]
    pub kernel: Option<PathBuf>,
    /// Initramfs for the Linux kernel.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Linux kernel command line (default: "console=ttyS0 reboot=k panic=1").
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Workloads to run (repeatable or comma-separated); replaces the file's set.
    #[arg(
        long = "workload",
        value_name = "NAME",
        value_enum,
        value_delimiter = ','
    )]
    pub workloads: Vec<Workload>,
    /// Counter lines per second (0 = as fast as possible).
    #[arg(long, value_name = "N")]
    pub counter_rate: Option<u32>,
    /// Stop the counter after N lines (0 = never).
    #[arg(long, value_name = "N")]
    pub counter_limit: Option<u64>,
    /// Pages dirtied per second.
    #[arg(long, value_name = "N")]
    pub dirty_rate: Option<u32>,
    /// Working set of the dirty workload, in pages.
    #[arg(long, value_name = "N")]
    pub dirty_pages: Option<u32>,
    /// Seed of the dirty workload's page contents.
    #[arg(long, value_name = "N")]
    pub dirty_seed: Option<u64>,
    /// Stop the dirty workload after N passes (0 = never).
    #[arg(long, value_name = "N")]
    pub dirty_passes: Option<u64>,
    /// The dirty workload's first pass unpaced (fills the working set at once), the
    /// later passes at --dirty-rate from the end of the fill.
    #[arg(long)]
    pub dirty_fill: bool,
    /// Disk records appended per second.
    #[arg(long, value_name = "N")]
    pub disk_rate: Option<u32>,
    /// Flush after every N records.
    #[arg(long, value_name = "N")]
    pub disk_flush_every: Option<u32>,
    /// Stop the disk workload after N records this boot (0 = never).
    #[arg(long, value_name = "N")]
    pub disk_limit: Option<u64>,
    /// Address of the kv server, a.b.c.d/prefix.
    #[arg(long, value_name = "CIDR")]
    pub kv_addr: Option<String>,
    /// Default gateway of the kv server.
    #[arg(long, value_name = "IP")]
    pub kv_gateway: Option<String>,
    /// TCP port of the kv server.
    #[arg(long, value_name = "PORT")]
    pub kv_port: Option<u16>,
    /// Bytes the blkbench workload writes then reads, in MiB.
    #[arg(long, value_name = "MIB")]
    pub blkbench_mib: Option<u64>,
    /// Request size of the blkbench workload, in KiB.
    #[arg(long, value_name = "KIB")]
    pub blkbench_req_kib: Option<u32>,
    /// Requests the blkbench workload keeps in flight (1 to 4).
    #[arg(long, value_name = "N")]
    pub blkbench_depth: Option<u32>,
    /// Raw disk image: PATH[,ro][,engine=sync|io-uring][,serial=S] (repeatable; replaces the file's disks).
    #[arg(long = "disk", value_name = "SPEC", value_parser = parse_disk_spec)]
    pub disks: Vec<DiskConfig>,
    /// Network device: TAP,MAC (repeatable; replaces the file's nets).
    #[arg(long = "net", value_name = "TAP,MAC", value_parser = parse_net_spec)]
    pub nets: Vec<NetConfig>,
    /// Console sink: stdout | file:PATH | socket:PATH.
    #[arg(long, value_name = "SINK", value_parser = parse_console_spec)]
    pub console: Option<ConsoleConfig>,
    /// FT mode: --role, --alink, --cluster-id, --cluster-secret-file, --epoch-ms,
    /// --heartbeat-ms, --heartbeat-misses.
    #[command(flatten)]
    pub ft: super::ft::FtArgs,
}

/// Parses `PATH[,ro][,engine=sync|io-uring][,serial=S]`.
pub fn parse_disk_spec(s: &str) -> Result<DiskConfig, String> {
    let mut parts = s.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err("expected PATH[,ro][,engine=sync|io-uring][,serial=S]".into());
    }
    let mut disk = DiskConfig {
        path: PathBuf::from(path),
        read_only: false,
        io_engine: IoEngine::default(),
        serial: None,
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => disk.read_only = true,
            None if opt == "rw" => disk.read_only = false,
            Some(("engine", "sync")) => disk.io_engine = IoEngine::Sync,
            Some(("engine", "io-uring" | "io_uring")) => disk.io_engine = IoEngine::IoUring,
            Some(("engine", other)) => {
                return Err(format!(
                    "unknown disk engine {other:?} (expected sync or io-uring)"
                ))
            }
            Some(("serial", serial)) => disk.serial = Some(serial.to_string()),
            _ => {
                return Err(format!(
                    "unknown disk option {opt:?} (expected ro, engine=sync|io-uring or serial=S)"
                ))
            }
        }
    }
    Ok(disk)
}

/// Parses `TAP,MAC`, checking the MAC here so the error points at the flag.
pub fn parse_net_spec(s: &str) -> Result<NetConfig, String> {
    let (tap, mac) = s
        .split_once(',')
        .ok_or_else(|| "expected TAP,MAC (e.g. tap0,02:00:00:00:00:01)".to_string())?;
    if tap.is_empty() {
        return Err("expected TAP,MAC: the TAP name is empty".into());
    }
    parse_mac(mac).map_err(|why| format!("bad MAC {mac:?}: {why}"))?;
    Ok(NetConfig {
        tap: tap.to_string(),
        mac: mac.to_string(),
    })
}

/// Parses `stdout`, `file:PATH` or `socket:PATH`.
pub fn parse_console_spec(s: &str) -> Result<ConsoleConfig, String> {
    let bad = || format!("bad console sink {s:?}: expected stdout, file:PATH or socket:PATH");
    match s.split_once(':') {
        None if s == "stdout" => Ok(ConsoleConfig::Stdout),
        Some(("file", p)) if !p.is_empty() => Ok(ConsoleConfig::File { path: p.into() }),
        Some(("socket", p)) if !p.is_empty() => Ok(ConsoleConfig::Socket { path: p.into() }),
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut full = vec!["twinrun", "vm", "run"];
        full.extend_from_slice(args);
        match Cli::try_parse_from(full)?.command {
            Command::Vm(VmCommand::Run(a)) => Ok(a),
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn disk_spec_options() {
        let d = parse_disk_spec("/tmp/a.img,ro,engine=sync,serial=abc").unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a.img"));
        assert!(d.read_only);
        assert_eq!(d.io_engine, IoEngine::Sync);
        assert_eq!(d.serial.as_deref(), Some("abc"));
        let d = parse_disk_spec("x.img").unwrap();
        assert!(!d.read_only);
        assert_eq!(d.io_engine, IoEngine::IoUring);
        let e = parse_disk_spec("x.img,fast").unwrap_err();
        assert!(e.contains("unknown disk option \"fast\""), "{e}");
        let e = parse_disk_spec("x.img,engine=aio").unwrap_err();
        assert!(e.contains("unknown disk engine \"aio\""), "{e}");
        assert!(parse_disk_spec("").is_err());
        assert!(parse_disk_spec(",ro").is_err());
    }

    #[test]
    fn net_spec_checks_mac() {
        let n = parse_net_spec("tap0,02:00:00:00:00:01").unwrap();
        assert_eq!(
            (n.tap.as_str(), n.mac.as_str()),
            ("tap0", "02:00:00:00:00:01")
        );
        let e = parse_net_spec("tap0,02:00:00:00:00").unwrap_err();
        assert!(e.contains("bad MAC"), "{e}");
        let e = parse_net_spec("tap0,01:00:00:00:00:01").unwrap_err();
        assert!(e.contains("multicast"), "{e}");
        assert!(parse_net_spec("tap0").is_err());
        assert!(parse_net_spec(",02:00:00:00:00:01").is_err());
    }

    #[test]
    fn console_spec() {
        assert_eq!(parse_console_spec("stdout"), Ok(ConsoleConfig::Stdout));
        assert_eq!(
            parse_console_spec("file:/tmp/c.log"),
            Ok(ConsoleConfig::File {
                path: "/tmp/c.log".into()
            })
        );
        assert_eq!(
            parse_console_spec("socket:/tmp/c.sock"),
            Ok(ConsoleConfig::Socket {
                path: "/tmp/c.sock".into()
            })
        );
        assert!(parse_console_spec("file:").is_err());
        assert!(parse_console_spec("tcp:1.2.3.4").is_err());
    }

    #[test]
    fn workloads_repeatable_and_comma_separated() {
        let a = parse(&["--workload", "counter,dirty", "--workload", "disk"]).unwrap();
        assert_eq!(
            a.workloads,
            vec![Workload::Counter, Workload::Dirty, Workload::Disk]
        );
    }

    #[test]
    fn unknown_workload_is_a_usage_error() {
        let e = parse(&["--workload", "counter,bogus"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidValue);
        assert!(e.to_string().contains("bogus"), "{e}");
        // clap exits with 2 for usage errors, matching our config errors.
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn bad_flag_values_are_usage_errors() {
        let e = parse(&["--net", "tap0,zz:00:00:00:00:01"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
        assert!(e.to_string().contains("bad MAC"), "{e}");
        let e = parse(&["--disk", "a.img,bogus"]).unwrap_err();
        assert!(e.to_string().contains("unknown disk option"), "{e}");
        let e = parse(&["--vcpus", "many"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
        let e = parse(&["--mem-mib"]).unwrap_err();
        assert_eq!(e.exit_code(), 2);
    }
}
