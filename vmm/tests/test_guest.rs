//! Runs the real test guest (guest/, built here with cargo) with the counter workload
//! and checks its console output.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use vmm::config::{ConsoleConfig, Payload, VmConfig, Workloads};
use vmm::{build_vm, VmExit};

/// Builds the guest once per test process (`$TWINRUN_GUEST` skips the build).
fn guest_elf() -> PathBuf {
    static ELF: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    ELF.get_or_init(|| {
        if let Some(p) = std::env::var_os("TWINRUN_GUEST") {
            return Ok(PathBuf::from(p));
        }
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "--release"])
            .current_dir(&dir)
            .env("CARGO_TARGET_DIR", dir.join("target"))
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "guest build failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(dir.join("target/x86_64-unknown-linux-gnu/release/twinrun-guest"))
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

/// A console log file removed on drop.
struct LogFile(PathBuf);

impl LogFile {
    fn new(tag: &str) -> LogFile {
        let p = std::env::temp_dir().join(format!("twinrun-vmm-{tag}-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&p);
        LogFile(p)
    }
    fn text(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap_or_default()
    }
}

impl Drop for LogFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn counter_config(log: &LogFile, rate: u32, limit: u64) -> VmConfig {
    VmConfig {
        mem_mib: 64,
        vcpus: 1,
        payload: Payload::TestGuest {
            elf: guest_elf(),
            workloads: Workloads {
                counter: true,
                counter_rate: rate,
                counter_limit: limit,
                ..Workloads::default()
            },
        },
        disks: vec![],
        nets: vec![],
        console: ConsoleConfig::File {
            path: log.0.clone(),
        },
    }
}

/// Checks BOOT, `C 1..=limit` without gaps, DONE.
fn check_counter_output(text: &str, limit: u64) {
    let mut lines = text.lines();
    let boot = lines.next().unwrap_or_default();
    assert!(
        boot.starts_with("BOOT workloads=counter tsc_khz="),
        "first line {boot:?}\n{text}"
    );
    let mut next = 1;
    for l in lines {
        if let Some(n) = l.strip_prefix("C ") {
            assert_eq!(n.parse::<u64>().unwrap(), next, "gap in counter:\n{text}");
            next += 1;
        } else {
            assert_eq!(l, "DONE", "unexpected line:\n{text}");
        }
    }
    assert_eq!(next, limit + 1, "counter lines:\n{text}");
    assert!(text.ends_with("DONE\n"), "{text}");
}

#[test]
fn counter_workload_runs_to_done() {
    let log = LogFile::new("counter");
    let mut vm = build_vm(&counter_config(&log, 0, 200)).expect("build");
    vm.start().unwrap();
    let exit = vm
        .wait_timeout(Duration::from_secs(60))
        .expect("guest did not finish in 60 s");
    assert_eq!(exit, VmExit::GuestExit { status: 0 }, "{exit}");
    check_counter_output(&log.text(), 200);
}

#[test]
fn counter_survives_pausing_every_two_ms() {
    let log = LogFile::new("counter-paused");
    // 1000 lines/s for 400 lines: ~0.4 s of guest time, paused ~every 2 ms.
    let mut vm = build_vm(&counter_config(&log, 1000, 400)).expect("build");
    vm.start().unwrap();
    let mut times = Vec::new();
    let t0 = Instant::now();
    let exit = loop {
        if let Some(e) = vm.wait_timeout(Duration::from_millis(2)) {
            break e;
        }
        match vm.pause() {
            Ok(t) => times.push(t),
            // The guest may exit between the check and the pause.
            Err(_) => continue,
        }
        vm.resume().unwrap();
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "guest did not finish"
        );
    };
    assert_eq!(exit, VmExit::GuestExit { status: 0 }, "{exit}");
    check_counter_output(&log.text(), 400);
    times.sort();
    assert!(times.len() > 50, "only {} pauses", times.len());
    println!(
        "real guest + devices, {} pauses: p50 {:?} p90 {:?} p99 {:?} max {:?}",
        times.len(),
        times[times.len() / 2],
        times[times.len() * 9 / 10],
        times[times.len() * 99 / 100],
        times[times.len() - 1]
    );
}
