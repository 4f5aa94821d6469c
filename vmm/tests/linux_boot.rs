//! Stock Linux guest: early boot on this machine, full boot where hardware
//! virtualization exists.
//!
//! Both need the Debian cloud kernel and initramfs from `guest/linux/build.sh` (run
//! here when `guest/linux/out/` lacks them; it fetches packages with apt-get).
//!
//! `early_boot_prints_e820_and_acpi_tables` takes 30-150 s of wall time under the
//! software KVM of the development machines (the kernel's CPL0 code is emulated): it is
//! in the `linux-boot` nextest group (scripts/nextest.toml) with a longer timeout.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmm::config::{ConsoleConfig, DiskConfig, IoEngine, Payload, VmConfig};
use vmm::{build_vm, VmExit};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// vmlinux, bzImage and initramfs, building them when missing.
fn artifacts() -> (PathBuf, PathBuf, PathBuf) {
    let out = repo().join("guest/linux/out");
    let files = (
        out.join("vmlinux"),
        out.join("bzImage"),
        out.join("initramfs.cpio"),
    );
    if !(files.0.exists() && files.1.exists() && files.2.exists()) {
        let st = Command::new(repo().join("guest/linux/build.sh"))
            .status()
            .expect("running guest/linux/build.sh");
        assert!(st.success(), "guest/linux/build.sh failed");
    }
    files
}

fn linux_config(kernel: &Path, initrd: &Path, cmdline: &str, console: &Path) -> VmConfig {
    VmConfig {
        mem_mib: 256,
        vcpus: 2,
        payload: Payload::Linux {
            kernel: kernel.to_path_buf(),
            initrd: Some(initrd.to_path_buf()),
            cmdline: cmdline.into(),
        },
        disks: vec![],
        nets: vec![],
        console: ConsoleConfig::File {
            path: console.to_path_buf(),
        },
    }
}

/// Waits until `done(console text)` or `limit`; returns the text and the time taken.
fn watch(
    vm: &mut vmm::Vmm,
    console: &Path,
    limit: Duration,
    done: impl Fn(&str) -> bool,
) -> (String, Option<Duration>, Option<VmExit>) {
    let t0 = Instant::now();
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if done(&text) {
            return (text, Some(t0.elapsed()), None);
        }
        if let Some(end) = vm.wait_timeout(Duration::from_millis(500)) {
            let text = std::fs::read_to_string(console).unwrap_or_default();
            let ok = done(&text).then(|| t0.elapsed());
            return (text, ok, Some(end));
        }
        if t0.elapsed() > limit {
            return (text, None, None);
        }
    }
}

/// The e820 lines Linux prints for the 256 MiB map twinrun gives it.
const E820_LINES: [&str; 5] = [
    "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
    "BIOS-e820: [mem 0x000000000009fc00-0x000000000009ffff] reserved",
    "BIOS-e820: [mem 0x00000000000e0000-0x00000000000fffff] reserved",
    "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
    "BIOS-e820: [mem 0x00000000c0000000-0x00000000ffffffff] reserved",
];

fn acpi_line<'a>(text: &'a str, sig: &str) -> Option<&'a str> {
    text.lines()
        .find(|l| l.contains(&format!("ACPI: {sig} 0x")) && l.contains("TWINRN"))
}

#[test]
fn early_boot_prints_e820_and_acpi_tables() {
    let (vmlinux, _, initrd) = artifacts();
    let dir = support::guest::TempDir::new("linux-early");
    let console = dir.0.join("console.log");
    let cfg = linux_config(
        &vmlinux,
        &initrd,
        "console=ttyS0 earlyprintk=ttyS0 reboot=k panic=1",
        &console,
    );
    let mut vm = build_vm(&cfg).expect("build the Linux VM");
    vm.start().unwrap();
    let done = |t: &str| {
        E820_LINES.iter().all(|l| t.contains(l))
            && ["RSDP", "XSDT", "FACP", "DSDT", "APIC"]
                .iter()
                .all(|s| acpi_line(t, s).is_some())
    };
    let (text, took, ended) = watch(&mut vm, &console, Duration::from_secs(150), done);
    vm.stopper().stop();
    let end = vm.wait();
    let Some(took) = took else {
        panic!(
            "the kernel did not print our e820 map and ACPI tables within 150 s \
             (VM end: {ended:?} / {end}); console:\n{text}"
        );
    };
    eprintln!("early boot: e820 and ACPI tables on the console after {took:.1?} wall time");
    let rsdp = acpi_line(&text, "RSDP").unwrap();
    assert!(rsdp.contains("0x00000000000E0000"), "{rsdp}");
    for sig in ["XSDT", "FACP", "DSDT", "APIC"] {
        eprintln!("{}", acpi_line(&text, sig).unwrap().trim());
    }
}

fn has_hw_virt() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| {
            c.lines()
                .filter(|l| l.starts_with("flags"))
                .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
        })
        .unwrap_or(false)
}

#[test]
fn full_boot_runs_a_command_with_disk() {
    if !has_hw_virt() {
        eprintln!(
            "SKIPPED full_boot_runs_a_command_with_disk: this CPU has neither vmx nor svm in \
             /proc/cpuinfo, so /dev/kvm is a software KVM that emulates guest kernel code and a \
             full Linux boot does not finish (see vmm/README.md, \"Stock Linux guests\")"
        );
        return;
    }
    let (vmlinux, _, initrd) = artifacts();
    let dir = support::guest::TempDir::new("linux-full");
    let console = dir.0.join("console.log");
    let disk = dir.0.join("disk.img");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let mut cfg = linux_config(
        &vmlinux,
        &initrd,
        "console=ttyS0 reboot=k panic=1 -- echo twinrun-full-boot-ok; ls /dev/vda",
        &console,
    );
    cfg.disks.push(DiskConfig {
        path: disk.clone(),
        read_only: false,
        io_engine: IoEngine::Sync,
        serial: None,
    });
    let mut vm = build_vm(&cfg).expect("build the Linux VM");
    vm.start().unwrap();
    let done = |t: &str| t.contains("TWINRUN-WORKLOAD-END");
    let (text, took, _) = watch(&mut vm, &console, Duration::from_secs(120), done);
    let end = vm.wait_timeout(Duration::from_secs(30));
    if end.is_none() {
        vm.stopper().stop();
        vm.wait();
    }
    assert!(took.is_some(), "no workload output; console:\n{text}");
    assert!(text.contains("twinrun-full-boot-ok"), "{text}");
    assert!(text.contains("/dev/vda"), "{text}");
    // The init reboots; with reboot=k that is the i8042 reset, which ends the VM.
    assert_eq!(end, Some(VmExit::GuestReset), "console:\n{text}");
}
