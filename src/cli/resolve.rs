//! Merging the config file and the flags of `twinrun vm run` into one validated
//! [`VmConfig`].
//!
//! Precedence: flag > config file > built-in default. `--workload` replaces the file's
//! set of enabled workloads; `--disk` and `--net` replace the file's lists when given
//! at least once.

use std::path::PathBuf;

use vmm::config::{ConfigError, ConsoleConfig, Payload, VmConfig, Workloads};

use super::args::{RunArgs, Workload};
use super::config_file::{self, ConfigFileError, FileConfig, FilePayload};

/// Guest RAM when neither file nor flag says.
pub const DEFAULT_MEM_MIB: u64 = 128;
pub const DEFAULT_VCPUS: u8 = 1;

/// Everything that makes `vm run` refuse to start; all of them exit with code 2.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    ConfigFile(#[from] ConfigFileError),
    #[error("invalid VM config: {0}")]
    Invalid(#[from] ConfigError),
    #[error(
        "no --guest given and no built test guest found; looked at:\n{}\n\
         build it with `cd guest && cargo build --release`, or pass --guest <elf>",
        list(.searched)
    )]
    GuestNotFound { searched: Vec<PathBuf> },
    #[error("the config file's Linux payload has no kernel; give payload.kernel or --kernel")]
    NoKernel,
    #[error("{what} {} does not exist or is not a regular file (or, for a disk, a block device)", path.display())]
    MissingFile { what: String, path: PathBuf },
    #[error("console {what} directory {} does not exist", path.display())]
    MissingDir { what: &'static str, path: PathBuf },
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| format!("  {}", p.display()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Builds the VM config for `args`: reads `--config`, applies the flags, finds the
/// default guest if needed, validates, and checks that named input files exist.
pub fn resolve_run_config(args: &RunArgs) -> Result<VmConfig, CliError> {
    let file = match &args.config {
        Some(p) => config_file::load(p)?,
        None => FileConfig::default(),
    };
    let cfg = merge(file, args, twinrun_lab::guest::find_built)?;
    cfg.validate()?;
    check_files(&cfg)?;
    Ok(cfg)
}

/// Applies `args` over `file`. `default_guest` is asked only when neither gives an ELF.
pub fn merge(
    file: FileConfig,
    args: &RunArgs,
    default_guest: impl FnOnce() -> Result<PathBuf, Vec<PathBuf>>,
) -> Result<VmConfig, CliError> {
    let (file_elf, mut w, file_linux) = match file.payload {
        Some(FilePayload::TestGuest { elf, workloads }) => (elf, workloads, None),
        Some(FilePayload::Linux {
            kernel,
            initrd,
            cmdline,
        }) => (None, Workloads::default(), Some((kernel, initrd, cmdline))),
        None => (None, Workloads::default(), None),
    };
    // A Linux payload when --kernel is given or the file has one (and --guest is not).
    let linux = match (&args.kernel, file_linux) {
        (Some(k), f) => Some((Some(k.clone()), f)),
        (None, Some(f)) if args.guest.is_none() => Some((f.0.clone(), Some(f))),
        _ => None,
    };
    let payload = match linux {
        Some((kernel, file)) => {
            let (_, f_initrd, f_cmdline) = file.unwrap_or((None, None, None));
            Payload::Linux {
                kernel: kernel.ok_or(CliError::NoKernel)?,
                initrd: args.initrd.clone().or(f_initrd),
                cmdline: args
                    .cmdline
                    .clone()
                    .or(f_cmdline)
                    .unwrap_or_else(|| vmm::config::DEFAULT_CMDLINE.into()),
            }
        }
        None => {
            let elf = match args.guest.clone().or(file_elf) {
                Some(e) => e,
                None => default_guest().map_err(|searched| CliError::GuestNotFound { searched })?,
            };
            apply_workload_flags(&mut w, args);
            Payload::TestGuest { elf, workloads: w }
        }
    };
    Ok(VmConfig {
        mem_mib: args.mem_mib.or(file.mem_mib).unwrap_or(DEFAULT_MEM_MIB),
        vcpus: args.vcpus.or(file.vcpus).unwrap_or(DEFAULT_VCPUS),
        payload,
        disks: if args.disks.is_empty() {
            file.disks
        } else {
            args.disks.clone()
        },
        nets: if args.nets.is_empty() {
            file.nets
        } else {
            args.nets.clone()
        },
        console: args.console.clone().unwrap_or(file.console),
    })
}

fn apply_workload_flags(w: &mut Workloads, a: &RunArgs) {
    if !a.workloads.is_empty() {
        w.counter = a.workloads.contains(&Workload::Counter);
        w.dirty = a.workloads.contains(&Workload::Dirty);
        w.disk = a.workloads.contains(&Workload::Disk);
        w.kv = a.workloads.contains(&Workload::Kv);
        w.blkbench = a.workloads.contains(&Workload::Blkbench);
    }
    fn set<T: Clone>(dst: &mut T, src: &Option<T>) {
        if let Some(v) = src {
            *dst = v.clone();
        }
    }
    set(&mut w.counter_rate, &a.counter_rate);
    set(&mut w.counter_limit, &a.counter_limit);
    set(&mut w.dirty_rate, &a.dirty_rate);
    set(&mut w.dirty_pages, &a.dirty_pages);
    set(&mut w.dirty_seed, &a.dirty_seed);
    set(&mut w.dirty_passes, &a.dirty_passes);
    if a.dirty_fill {
        w.dirty_fill = true;
    }
    set(&mut w.disk_rate, &a.disk_rate);
    set(&mut w.disk_flush_every, &a.disk_flush_every);
    set(&mut w.disk_limit, &a.disk_limit);
    set(&mut w.kv_addr, &a.kv_addr);
    set(&mut w.kv_port, &a.kv_port);
    if let Some(mib) = a.blkbench_mib {
        w.blkbench_bytes = mib.saturating_mul(1 << 20);
    }
    set(&mut w.blkbench_req_kib, &a.blkbench_req_kib);
    set(&mut w.blkbench_depth, &a.blkbench_depth);
    if let Some(g) = &a.kv_gateway {
        w.kv_gateway = Some(g.clone());
    }
}

/// The test guest's ELF; `None` for other payloads (other kinds of payload are being
/// added to `Payload`, so the match tolerates variants this CLI does not build yet).
pub fn test_guest_elf(p: &Payload) -> Option<&std::path::Path> {
    #[allow(unreachable_patterns)]
    match p {
        Payload::TestGuest { elf, .. } => Some(elf),
        _ => None,
    }
}

/// Input files must exist before anything is built, so the error names them.
fn check_files(cfg: &VmConfig) -> Result<(), CliError> {
    if let Some(elf) = test_guest_elf(&cfg.payload) {
        if !elf.is_file() {
            return Err(CliError::MissingFile {
                what: "guest ELF".into(),
                path: elf.to_path_buf(),
            });
        }
    }
    for (i, d) in cfg.disks.iter().enumerate() {
        // A regular file or a block device (e.g. an LVM volume).
        let ok = std::fs::metadata(&d.path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.is_file() || m.file_type().is_block_device()
        });
        if !ok {
            return Err(CliError::MissingFile {
                what: format!("disks[{i}] image"),
                path: d.path.clone(),
            });
        }
    }
    let (what, path) = match &cfg.console {
        ConsoleConfig::Stdout => return Ok(()),
        ConsoleConfig::File { path } => ("file", path),
        ConsoleConfig::Socket { path } => ("socket", path),
    };
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.is_dir() => Err(CliError::MissingDir {
            what,
            path: dir.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::args::{Cli, Command, VmCommand};
    use clap::Parser;
    use std::path::Path;

    fn args(a: &[&str]) -> RunArgs {
        let mut full = vec!["twinrun", "vm", "run"];
        full.extend_from_slice(a);
        match Cli::try_parse_from(full).unwrap().command {
            Command::Vm(VmCommand::Run(r)) => r,
            other => panic!("parsed {other:?}"),
        }
    }

    fn no_guest() -> Result<PathBuf, Vec<PathBuf>> {
        Err(vec!["/a/twinrun-guest".into(), "/b/twinrun-guest".into()])
    }

    fn workloads(c: &VmConfig) -> &Workloads {
        #[allow(unreachable_patterns)]
        match &c.payload {
            Payload::TestGuest { workloads, .. } => workloads,
            _ => panic!("not a test guest"),
        }
    }

    const FILE: &str = r#"
        mem_mib = 512
        vcpus = 2
        [payload]
        kind = "test-guest"
        elf = "/file/guest"
        [payload.workloads]
        dirty = true
        counter_rate = 7
        dirty_pages = 100
        [[disks]]
        path = "/file/disk.img"
        [[nets]]
        tap = "tapf"
        mac = "02:00:00:00:00:0f"
        [console]
        sink = "file"
        path = "/file/console.log"
    "#;

    fn file() -> FileConfig {
        config_file::parse(Path::new("t.toml"), FILE).unwrap()
    }

    #[test]
    fn file_values_used_without_flags() {
        let c = merge(file(), &args(&[]), no_guest).unwrap();
        assert_eq!((c.mem_mib, c.vcpus), (512, 2));
        let elf = test_guest_elf(&c.payload).unwrap();
        assert_eq!(elf, Path::new("/file/guest"));
        let w = workloads(&c);
        assert!(w.dirty && !w.counter);
        assert_eq!((w.counter_rate, w.dirty_pages), (7, 100));
        assert_eq!(c.disks.len(), 1);
        assert_eq!(c.nets[0].tap, "tapf");
    }

    #[test]
    fn flags_override_file() {
        let a = args(&[
            "--mem-mib",
            "64",
            "--guest",
            "/flag/guest",
            "--workload",
            "counter",
            "--counter-rate",
            "9",
            "--disk",
            "/flag/a.img,ro",
            "--disk",
            "/flag/b.img",
            "--net",
            "tapx,02:00:00:00:00:01",
            "--console",
            "stdout",
            "--kv-gateway",
            "10.0.0.1",
        ]);
        let c = merge(file(), &a, no_guest).unwrap();
        assert_eq!((c.mem_mib, c.vcpus), (64, 2), "vcpus kept from the file");
        let elf = test_guest_elf(&c.payload).unwrap();
        assert_eq!(elf, Path::new("/flag/guest"));
        let w = workloads(&c);
        assert!(w.counter && !w.dirty, "--workload replaces the file's set");
        assert_eq!(w.counter_rate, 9);
        assert_eq!(w.dirty_pages, 100, "unflagged workload values kept");
        assert!(!w.dirty_fill, "--dirty-fill is off unless given");
        let a = args(&["--dirty-fill"]);
        assert!(workloads(&merge(file(), &a, no_guest).unwrap()).dirty_fill);
        assert_eq!(w.kv_gateway.as_deref(), Some("10.0.0.1"));
        let paths: Vec<_> = c.disks.iter().map(|d| d.path.clone()).collect();
        assert_eq!(
            paths,
            vec![PathBuf::from("/flag/a.img"), "/flag/b.img".into()]
        );
        assert!(c.disks[0].read_only);
        assert_eq!(c.nets.len(), 1);
        assert_eq!(c.nets[0].tap, "tapx");
        assert_eq!(c.console, ConsoleConfig::Stdout);
    }

    #[test]
    fn defaults_without_file() {
        let c = merge(FileConfig::default(), &args(&[]), || {
            Ok("/found/guest".into())
        })
        .unwrap();
        assert_eq!((c.mem_mib, c.vcpus), (DEFAULT_MEM_MIB, DEFAULT_VCPUS));
        let elf = test_guest_elf(&c.payload).unwrap();
        assert_eq!(elf, Path::new("/found/guest"));
        assert_eq!(workloads(&c), &Workloads::default());
        assert!(c.validate().is_ok());
    }

    #[test]
    fn missing_default_guest_lists_places() {
        let e = merge(FileConfig::default(), &args(&[]), no_guest).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("/a/twinrun-guest") && msg.contains("/b/twinrun-guest"),
            "{msg}"
        );
        assert!(msg.contains("--guest"), "{msg}");
    }

    #[test]
    fn validation_and_missing_files_are_reported() {
        let dir = std::env::temp_dir();
        let a = args(&["--config", "/nonexistent/vm.toml"]);
        let e = resolve_run_config(&a).unwrap_err();
        assert!(matches!(e, CliError::ConfigFile(_)), "{e}");

        let a = args(&["--guest", "/nonexistent/guest.elf"]);
        let e = resolve_run_config(&a).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/guest.elf"), "{e}");

        // An existing file stands in for the ELF: only existence is checked here.
        let elf = std::env::current_exe().unwrap();
        let elf = elf.to_str().unwrap();
        let a = args(&["--guest", elf, "--vcpus", "0"]);
        let e = resolve_run_config(&a).unwrap_err();
        assert!(matches!(e, CliError::Invalid(ConfigError::Vcpus(0))), "{e}");

        let a = args(&[
            "--guest",
            elf,
            "--workload",
            "disk",
            "--disk",
            "/nonexistent/d.img",
        ]);
        let e = resolve_run_config(&a).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/d.img"), "{e}");

        let a = args(&["--guest", elf, "--workload", "kv"]);
        let e = resolve_run_config(&a).unwrap_err();
        assert!(e.to_string().contains("network device"), "{e}");

        let console = format!("file:{}/no-such-dir/c.log", dir.display());
        let a = args(&["--guest", elf, "--console", &console]);
        let e = resolve_run_config(&a).unwrap_err();
        assert!(e.to_string().contains("no-such-dir"), "{e}");

        let a = args(&["--guest", elf, "--workload", "counter"]);
        assert!(resolve_run_config(&a).is_ok());

        let a = args(&["--guest", elf, "--workload", "blkbench"]);
        let e = resolve_run_config(&a).unwrap_err();
        assert!(e.to_string().contains("needs a disk"), "{e}");
    }

    #[test]
    fn blkbench_flags() {
        let a = args(&[
            "--workload",
            "blkbench",
            "--blkbench-mib",
            "8",
            "--blkbench-req-kib",
            "128",
            "--blkbench-depth",
            "2",
        ]);
        let c = merge(FileConfig::default(), &a, || Ok("/g".into())).unwrap();
        let w = workloads(&c);
        assert!(w.blkbench && !w.disk);
        assert_eq!(
            (w.blkbench_bytes, w.blkbench_req_kib, w.blkbench_depth),
            (8 << 20, 128, 2)
        );
    }

    #[test]
    fn kernel_flags_make_a_linux_payload() {
        let a = args(&[
            "--kernel",
            "/k/vmlinux",
            "--initrd",
            "/k/initrd",
            "--cmdline",
            "console=ttyS0 -- echo hi",
        ]);
        let c = merge(FileConfig::default(), &a, || Err(vec![])).unwrap();
        assert_eq!(
            c.payload,
            Payload::Linux {
                kernel: "/k/vmlinux".into(),
                initrd: Some("/k/initrd".into()),
                cmdline: "console=ttyS0 -- echo hi".into(),
            }
        );
        let c = merge(FileConfig::default(), &args(&["--kernel", "/k/bz"]), || {
            Err(vec![])
        })
        .unwrap();
        let Payload::Linux {
            cmdline, initrd, ..
        } = &c.payload
        else {
            panic!("{:?}", c.payload)
        };
        assert_eq!(
            (cmdline.as_str(), initrd),
            (vmm::config::DEFAULT_CMDLINE, &None)
        );
    }
}
