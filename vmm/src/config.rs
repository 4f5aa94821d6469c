//! Typed configuration of one VM.
//!
//! The CLI builds a [`VmConfig`] from a TOML file and flags; [`VmConfig::validate`]
//! rejects impossible values with a message that names the field, before anything is
//! created.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use twinrun_guest_abi as abi;

/// Guest RAM limits. The upper bound keeps the identity map within the page tables the
/// VMM builds (see `twinrun_guest_abi::MAX_MAPPED_GIB`).
pub const MIN_MEM_MIB: u64 = 16;
pub const MAX_MEM_MIB: u64 = 60 * 1024;
pub const MAX_VCPUS: u8 = 32;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    pub vcpus: u8,
    /// What the VM runs.
    pub payload: Payload,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    #[serde(default)]
    pub console: ConsoleConfig,
}

/// How KVM logs the pages vCPUs write, for dirty tracking (checkpoints, migration,
/// snapshots). A property of the VM chosen when it is built: KVM's dirty ring must be
/// enabled before any vCPU exists, and once it is on the bitmap cannot be read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyLog {
    /// KVM's per-slot bitmap (`KVM_GET_DIRTY_LOG`, manual re-protect): a harvest
    /// copies 32 KiB of bitmap per GiB of guest; hot pages can be left writable.
    #[default]
    Bitmap,
    /// KVM's dirty ring (one per vCPU): a harvest costs per dirty page only. The build
    /// fails on a KVM without it.
    Ring,
    /// The ring when this KVM offers it, else the bitmap.
    Auto,
}

/// Options of a VM build that are not part of the guest's description ([`VmConfig`]):
/// how the host runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BuildOptions {
    pub dirty_log: DirtyLog,
    /// Entries of each vCPU's dirty ring (a power of two, 256 up to what KVM allows);
    /// used when the ring is chosen.
    pub dirty_ring_entries: u32,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            dirty_log: DirtyLog::default(),
            dirty_ring_entries: crate::vstate::dirty::DEFAULT_RING_ENTRIES,
        }
    }
}

/// What the VM boots.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Payload {
    /// The freestanding test guest, entered at CPL3.
    TestGuest {
        /// Path of the guest ELF.
        elf: PathBuf,
        #[serde(default)]
        workloads: Workloads,
    },
    /// A stock Linux kernel, booted through the x86 64-bit boot protocol with an e820
    /// map and ACPI tables; its console is the 8250 UART at 0x3F8 (COM1).
    Linux {
        /// Uncompressed `vmlinux` (ELF) or compressed `bzImage`.
        kernel: PathBuf,
        /// Initramfs (cpio, possibly compressed), placed in guest RAM for the kernel.
        #[serde(default)]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[serde(default = "default_cmdline")]
        cmdline: String,
    },
}

/// The command line a Linux guest gets when none is given: serial console, and
/// `reboot=k` so that a guest reboot goes through the i8042 reset, which ends the VM.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.into()
}

/// Longest kernel command line accepted (the kernel's x86 COMMAND_LINE_SIZE).
pub const MAX_CMDLINE_LEN: usize = 2047;

impl Payload {
    /// The test guest's workloads, or `None` for other payloads.
    pub fn workloads(&self) -> Option<&Workloads> {
        match self {
            Payload::TestGuest { workloads, .. } => Some(workloads),
            Payload::Linux { .. } => None,
        }
    }

    /// The test guest's ELF path, or `None` for other payloads.
    pub fn test_guest_elf(&self) -> Option<&std::path::Path> {
        match self {
            Payload::TestGuest { elf, .. } => Some(elf),
            Payload::Linux { .. } => None,
        }
    }

    pub fn is_linux(&self) -> bool {
        matches!(self, Payload::Linux { .. })
    }
}

/// Which test-guest workloads run, and how hard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Workloads {
    pub counter: bool,
    pub counter_rate: u32,
    pub counter_limit: u64,
    pub dirty: bool,
    pub dirty_rate: u32,
    pub dirty_pages: u32,
    pub dirty_seed: u64,
    pub dirty_passes: u64,
    /// The first pass over the working set unpaced (a fill), the later ones paced.
    pub dirty_fill: bool,
    pub disk: bool,
    pub disk_rate: u32,
    pub disk_flush_every: u32,
    pub disk_limit: u64,
    pub kv: bool,
    /// `a.b.c.d/prefix`
    pub kv_addr: String,
    pub kv_gateway: Option<String>,
    pub kv_port: u16,
    /// Sequential write-then-read throughput test of disks[0] (overwrites it from
    /// sector 0; exclusive with `disk`).
    pub blkbench: bool,
    /// Bytes written then read by `blkbench` (clamped by the guest to the disk size).
    pub blkbench_bytes: u64,
    /// Request size of `blkbench`, in KiB.
    pub blkbench_req_kib: u32,
    /// Requests `blkbench` keeps in flight.
    pub blkbench_depth: u32,
}

/// Most requests the test guest's block driver keeps in flight.
pub const MAX_BLKBENCH_DEPTH: u32 = 4;
/// Largest `blkbench` request (the device accepts data up to 16 MiB per request).
pub const MAX_BLKBENCH_REQ_KIB: u32 = 4096;

impl Default for Workloads {
    fn default() -> Self {
        Workloads {
            counter: false,
            counter_rate: 100,
            counter_limit: 0,
            dirty: false,
            dirty_rate: 10_000,
            dirty_pages: 4096,
            dirty_seed: 1,
            dirty_passes: 0,
            dirty_fill: false,
            disk: false,
            disk_rate: 100,
            disk_flush_every: 1,
            disk_limit: 0,
            kv: false,
            kv_addr: "10.0.0.2/24".into(),
            kv_gateway: None,
            kv_port: 6379,
            blkbench: false,
            blkbench_bytes: 64 << 20,
            blkbench_req_kib: 256,
            blkbench_depth: 4,
        }
    }
}

/// How the block device reaches its image file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoEngine {
    /// io_uring (default).
    #[default]
    IoUring,
    /// Plain blocking pread/pwrite/fdatasync, for kernels without io_uring.
    Sync,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Raw image file.
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub io_engine: IoEngine,
    /// Serial returned by VIRTIO_BLK_T_GET_ID (at most 20 bytes); defaults to the file
    /// name.
    #[serde(default)]
    pub serial: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// TAP interface name; created if it does not exist.
    pub tap: String,
    /// Guest MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// Where guest console output goes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "sink", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ConsoleConfig {
    #[default]
    Stdout,
    /// Appended to this file.
    File { path: PathBuf },
    /// Streamed to whoever connects to this Unix socket (created by the VMM); output
    /// is kept in order until a reader connects.
    Socket { path: PathBuf },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("mem_mib = {0}: guest memory must be between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB")]
    MemSize(u64),
    #[error("vcpus = {0}: must be between 1 and {MAX_VCPUS}")]
    Vcpus(u8),
    #[error("{0} virtio devices configured; at most {max} fit", max = abi::MAX_DEVICES)]
    TooManyDevices(usize),
    #[error("nets[{index}].mac = {value:?}: {why}")]
    Mac {
        index: usize,
        value: String,
        why: &'static str,
    },
    #[error(
        "nets[{index}].tap = {value:?}: a TAP name is 1 to 15 bytes without '/', whitespace or NUL"
    )]
    TapName { index: usize, value: String },
    #[error("disks[{index}].serial: at most 20 bytes")]
    Serial { index: usize },
    #[error("payload.{field} = {path:?}: {why}")]
    PayloadFile {
        field: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("payload.cmdline: {0}")]
    Cmdline(&'static str),
    #[error("console: the socket sink is not available to a Linux guest's serial console yet; use stdout or a file")]
    LinuxConsoleSocket,
    #[error("{field} = {value:?}: {why}")]
    Workload {
        field: &'static str,
        value: String,
        why: &'static str,
    },
}

impl VmConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&self.mem_mib) {
            return Err(ConfigError::MemSize(self.mem_mib));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        let devices = self.disks.len() + self.nets.len() + 1;
        if devices > abi::MAX_DEVICES {
            return Err(ConfigError::TooManyDevices(devices));
        }
        for (index, n) in self.nets.iter().enumerate() {
            parse_mac(&n.mac).map_err(|why| ConfigError::Mac {
                index,
                value: n.mac.clone(),
                why,
            })?;
            if n.tap.is_empty()
                || n.tap.len() > 15
                || n.tap
                    .bytes()
                    .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
            {
                return Err(ConfigError::TapName {
                    index,
                    value: n.tap.clone(),
                });
            }
        }
        for (index, d) in self.disks.iter().enumerate() {
            if d.serial.as_ref().is_some_and(|s| s.len() > 20) {
                return Err(ConfigError::Serial { index });
            }
        }
        let w = match &self.payload {
            Payload::TestGuest { workloads, .. } => workloads,
            Payload::Linux {
                kernel,
                initrd,
                cmdline,
            } => return self.validate_linux(kernel, initrd.as_deref(), cmdline),
        };
        if w.kv {
            parse_cidr(&w.kv_addr).map_err(|why| ConfigError::Workload {
                field: "kv_addr",
                value: w.kv_addr.clone(),
                why,
            })?;
            if let Some(g) = &w.kv_gateway {
                parse_ipv4(g).map_err(|why| ConfigError::Workload {
                    field: "kv_gateway",
                    value: g.clone(),
                    why,
                })?;
            }
            if self.nets.is_empty() {
                return Err(ConfigError::Workload {
                    field: "kv",
                    value: "true".into(),
                    why: "the kv workload needs a network device (nets)",
                });
            }
        }
        if w.disk && self.disks.is_empty() {
            return Err(ConfigError::Workload {
                field: "disk",
                value: "true".into(),
                why: "the disk workload needs a disk (disks)",
            });
        }
        if w.disk && self.disks[0].read_only {
            return Err(ConfigError::Workload {
                field: "disk",
                value: "true".into(),
                why: "the disk workload writes, but disks[0] is read-only",
            });
        }
        if w.disk_flush_every == 0 {
            return Err(ConfigError::Workload {
                field: "disk_flush_every",
                value: "0".into(),
                why: "must be at least 1",
            });
        }
        if w.blkbench {
            self.validate_blkbench(w)?;
        }
        if w.dirty {
            let max_pages = self.mem_mib * 256 / 2;
            if w.dirty_pages == 0 || u64::from(w.dirty_pages) > max_pages {
                return Err(ConfigError::Workload {
                    field: "dirty_pages",
                    value: w.dirty_pages.to_string(),
                    why: "must be at least 1 and at most half of guest memory",
                });
            }
        }
        Ok(())
    }

    fn validate_linux(
        &self,
        kernel: &std::path::Path,
        initrd: Option<&std::path::Path>,
        cmdline: &str,
    ) -> Result<(), ConfigError> {
        check_file("kernel", kernel)?;
        if let Some(i) = initrd {
            check_file("initrd", i)?;
        }
        if cmdline.len() > MAX_CMDLINE_LEN {
            return Err(ConfigError::Cmdline("longer than 2047 bytes"));
        }
        if cmdline
            .bytes()
            .any(|b| b == 0 || !(b.is_ascii_graphic() || b == b' '))
        {
            return Err(ConfigError::Cmdline(
                "only printable ASCII and spaces are allowed",
            ));
        }
        if matches!(self.console, ConsoleConfig::Socket { .. }) {
            return Err(ConfigError::LinuxConsoleSocket);
        }
        Ok(())
    }

    fn validate_blkbench(&self, w: &Workloads) -> Result<(), ConfigError> {
        let err = |field, value: String, why| Err(ConfigError::Workload { field, value, why });
        if self.disks.is_empty() {
            return err(
                "blkbench",
                "true".into(),
                "the blkbench workload needs a disk (disks)",
            );
        }
        if self.disks[0].read_only {
            return err(
                "blkbench",
                "true".into(),
                "the blkbench workload writes, but disks[0] is read-only",
            );
        }
        if w.disk {
            return err(
                "blkbench",
                "true".into(),
                "blkbench overwrites disks[0], which the disk workload uses: run one of them",
            );
        }
        if w.blkbench_bytes < 512 {
            return err(
                "blkbench_bytes",
                w.blkbench_bytes.to_string(),
                "must be at least one 512-byte sector",
            );
        }
        if w.blkbench_req_kib == 0 || w.blkbench_req_kib > MAX_BLKBENCH_REQ_KIB {
            return err(
                "blkbench_req_kib",
                w.blkbench_req_kib.to_string(),
                "must be 1 to 4096 KiB",
            );
        }
        if w.blkbench_depth == 0 || w.blkbench_depth > MAX_BLKBENCH_DEPTH {
            return err(
                "blkbench_depth",
                w.blkbench_depth.to_string(),
                "must be 1 to 4 (the test guest's block driver has 4 request slots)",
            );
        }
        // The guest keeps one request buffer per slot in its heap (at least 16 MiB,
        // shared with device rings): a quarter of guest RAM is a safe bound.
        let buf_bytes = u64::from(w.blkbench_req_kib) * 1024 * u64::from(w.blkbench_depth);
        if buf_bytes > (self.mem_mib << 20) / 4 {
            return err(
                "blkbench_req_kib",
                w.blkbench_req_kib.to_string(),
                "request size x depth must be at most a quarter of guest memory",
            );
        }
        Ok(())
    }
}

/// A payload file must exist, be a regular file and be non-empty.
fn check_file(field: &'static str, path: &std::path::Path) -> Result<(), ConfigError> {
    let err = |why: String| ConfigError::PayloadFile {
        field,
        path: path.to_path_buf(),
        why,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.len() == 0 {
        return Err(err("file is empty".into()));
    }
    Ok(())
}

/// Parses `aa:bb:cc:dd:ee:ff`; rejects multicast addresses (a NIC cannot own one).
pub fn parse_mac(s: &str) -> Result<[u8; 6], &'static str> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts
            .next()
            .ok_or("expected six hex bytes separated by ':'")?;
        if p.len() != 2 {
            return Err("expected six hex bytes separated by ':'");
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| "not a hex byte")?;
    }
    if parts.next().is_some() {
        return Err("expected six hex bytes separated by ':'");
    }
    if mac[0] & 1 != 0 {
        return Err("a multicast address cannot be a NIC's address");
    }
    Ok(mac)
}

pub fn parse_ipv4(s: &str) -> Result<[u8; 4], &'static str> {
    s.parse::<std::net::Ipv4Addr>()
        .map(|a| a.octets())
        .map_err(|_| "not an IPv4 address")
}

/// Parses `a.b.c.d/prefix`.
pub fn parse_cidr(s: &str) -> Result<([u8; 4], u8), &'static str> {
    let (ip, prefix) = s.split_once('/').ok_or("expected a.b.c.d/prefix")?;
    let prefix: u8 = prefix.parse().map_err(|_| "bad prefix length")?;
    if prefix == 0 || prefix > 32 {
        return Err("prefix length must be 1 to 32");
    }
    Ok((parse_ipv4(ip)?, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VmConfig {
        VmConfig {
            mem_mib: 128,
            vcpus: 1,
            payload: Payload::TestGuest {
                elf: "g".into(),
                workloads: Workloads::default(),
            },
            disks: vec![],
            nets: vec![],
            console: ConsoleConfig::Stdout,
        }
    }

    #[test]
    fn rejects_bad_values_by_field() {
        assert!(base().validate().is_ok());
        let mut c = base();
        c.mem_mib = 1;
        assert_eq!(c.validate(), Err(ConfigError::MemSize(1)));
        let mut c = base();
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        let mut c = base();
        c.nets.push(NetConfig {
            tap: "tap0".into(),
            mac: "01:00:00:00:00:01".into(),
        });
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Mac { index: 0, .. })
        ));
        let mut c = base();
        c.nets.push(NetConfig {
            tap: "a/b".into(),
            mac: "02:00:00:00:00:01".into(),
        });
        assert!(matches!(c.validate(), Err(ConfigError::TapName { .. })));
        let mut c = base();
        if let Payload::TestGuest { workloads, .. } = &mut c.payload {
            workloads.disk = true;
        }
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Workload { field: "disk", .. })
        ));
    }

    #[test]
    fn blkbench_validation() {
        let disk = DiskConfig {
            path: "/tmp/b.img".into(),
            read_only: false,
            io_engine: IoEngine::Sync,
            serial: None,
        };
        let with = |f: &dyn Fn(&mut VmConfig, &mut Workloads)| {
            let mut c = base();
            c.disks.push(disk.clone());
            let mut w = Workloads {
                blkbench: true,
                ..Workloads::default()
            };
            f(&mut c, &mut w);
            c.payload = Payload::TestGuest {
                elf: "g".into(),
                workloads: w,
            };
            c.validate()
        };
        assert_eq!(with(&|_, _| {}), Ok(()));
        let field = |r: Result<(), ConfigError>| match r {
            Err(ConfigError::Workload { field, .. }) => field,
            other => panic!("expected a workload error, got {other:?}"),
        };
        assert_eq!(field(with(&|c, _| c.disks.clear())), "blkbench");
        assert_eq!(field(with(&|c, _| c.disks[0].read_only = true)), "blkbench");
        assert_eq!(field(with(&|_, w| w.disk = true)), "blkbench");
        assert_eq!(field(with(&|_, w| w.blkbench_depth = 5)), "blkbench_depth");
        assert_eq!(field(with(&|_, w| w.blkbench_depth = 0)), "blkbench_depth");
        assert_eq!(
            field(with(&|_, w| w.blkbench_req_kib = 0)),
            "blkbench_req_kib"
        );
        assert_eq!(
            field(with(&|_, w| w.blkbench_req_kib = 16 << 10)),
            "blkbench_req_kib"
        );
        assert_eq!(
            field(with(&|_, w| w.blkbench_bytes = 100)),
            "blkbench_bytes"
        );
    }

    #[test]
    fn parses_addresses() {
        assert_eq!(parse_mac("02:ab:00:00:00:ff"), Ok([2, 0xab, 0, 0, 0, 0xff]));
        assert!(parse_mac("02:ab:00:00:00").is_err());
        assert!(parse_mac("02:ab:00:00:00:ff:11").is_err());
        assert_eq!(parse_cidr("10.0.0.2/24"), Ok(([10, 0, 0, 2], 24)));
        assert!(parse_cidr("10.0.0.2").is_err());
        assert!(parse_cidr("10.0.0.2/33").is_err());
    }

    #[test]
    fn toml_round_trip_and_unknown_fields() {
        let text = r#"
            mem_mib = 256
            vcpus = 1
            [payload]
            kind = "test-guest"
            elf = "/x/guest"
            [payload.workloads]
            counter = true
            [[disks]]
            path = "/tmp/d.img"
            [console]
            sink = "file"
            path = "/tmp/c.log"
        "#;
        let c: VmConfig = toml::from_str(text).unwrap();
        assert_eq!(c.mem_mib, 256);
        assert_eq!(c.disks[0].io_engine, IoEngine::IoUring);
        assert!(toml::from_str::<VmConfig>(&text.replace("vcpus", "vcpu")).is_err());
    }

    #[test]
    fn linux_payload_parses_and_checks_files() {
        let dir = std::env::temp_dir().join(format!("twinrun-cfg-linux-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kernel = dir.join("vmlinux");
        std::fs::write(&kernel, b"\x7fELF").unwrap();
        let text = format!(
            "mem_mib = 256\nvcpus = 2\n[payload]\nkind = \"linux\"\nkernel = {:?}\n",
            kernel
        );
        let c: VmConfig = toml::from_str(&text).unwrap();
        let Payload::Linux {
            initrd, cmdline, ..
        } = &c.payload
        else {
            panic!("not a linux payload: {:?}", c.payload);
        };
        assert_eq!((initrd, cmdline.as_str()), (&None, DEFAULT_CMDLINE));
        assert_eq!(c.validate(), Ok(()));
        let mut bad = c.clone();
        bad.payload = Payload::Linux {
            kernel: dir.join("missing"),
            initrd: None,
            cmdline: String::new(),
        };
        assert!(matches!(
            bad.validate(),
            Err(ConfigError::PayloadFile {
                field: "kernel",
                ..
            })
        ));
        bad.payload = Payload::Linux {
            kernel: kernel.clone(),
            initrd: Some(dir.clone()),
            cmdline: String::new(),
        };
        let e = bad.validate().unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        bad.payload = Payload::Linux {
            kernel: kernel.clone(),
            initrd: None,
            cmdline: "a\nb".into(),
        };
        assert!(matches!(bad.validate(), Err(ConfigError::Cmdline(_))));
        bad.payload = c.payload.clone();
        bad.console = ConsoleConfig::Socket {
            path: dir.join("s"),
        };
        assert_eq!(bad.validate(), Err(ConfigError::LinuxConsoleSocket));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
