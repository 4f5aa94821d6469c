//! Whole-VM state capture and restore with the real test guest: run the counter,
//! dirty and disk workloads, pause mid-run, capture the state and all guest memory,
//! throw the VMM away, build a new one from the state (in this process, and in a child
//! process from files), and check the guest carried on as if nothing happened: no
//! counter or disk record gap or duplicate, no dirty-page self-check error.

mod support;
use support::guest;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use guest::{create_image, disk, guest_config, wait_for_lines};
use vmm::config::{VmConfig, Workloads};
use vmm::persist::memory::{load_memory, save_memory};
use vmm::{build_vm, build_vm_from_state, VmExit, VmState};

const COUNTER_LIMIT: u64 = 1500;
const DISK_LIMIT: u64 = 150;
/// Set in the child process of the cross-process test: `<dir>` holding the files.
const CHILD_ENV: &str = "TWINRUN_STATE_CHILD_DIR";

fn config(dir: &Path) -> VmConfig {
    let workloads = Workloads {
        counter: true,
        counter_rate: 1000,
        counter_limit: COUNTER_LIMIT,
        dirty: true,
        dirty_pages: 1024,
        dirty_rate: 20_000,
        dirty_passes: 25,
        disk: true,
        disk_rate: 100,
        disk_limit: DISK_LIMIT,
        ..Workloads::default()
    };
    VmConfig {
        vcpus: 2,
        disks: vec![disk(&dir.join("disk.img"))],
        ..guest_config(workloads, &dir.join("console.log"))
    }
}

fn console(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("console.log")).unwrap_or_default()
}

/// Runs the guest until it has printed `lines` counter lines, pauses it and returns
/// its state and memory; the VMM is gone when this returns (disk unlocked).
fn run_and_capture(cfg: &VmConfig, dir: &Path, lines: usize) -> (VmState, Vec<u8>) {
    create_image(&dir.join("disk.img"), 16 << 20);
    let mut vm = build_vm(cfg).expect("build");
    vm.start().unwrap();
    wait_for_lines(
        &mut vm,
        &dir.join("console.log"),
        "C ",
        lines,
        Duration::from_secs(20),
        "before the capture",
    );
    vm.pause().unwrap();
    let t = Instant::now();
    let state = vm.capture_state().expect("capture");
    let mut mem = Vec::new();
    save_memory(vm.guest_memory(), &mut mem).unwrap();
    println!(
        "captured {} vCPUs, {} devices, {} MSRs on vCPU 0 ({} unreadable) + {} MiB in {:?}",
        state.vcpus.len(),
        state.devices.len(),
        state.vcpus[0].msrs.len(),
        state.vcpus[0].unreadable_msrs.len(),
        mem.len() >> 20,
        t.elapsed()
    );
    // Registers and devices of a paused VM do not change while it stays paused (its
    // TSC and clock do, which is why a restore sets them).
    let again = vm.capture_state().unwrap();
    assert_eq!(again.devices, state.devices);
    for (a, b) in again.vcpus.iter().zip(&state.vcpus) {
        assert_eq!(a.regs, b.regs);
        assert_eq!(a.sregs, b.sregs);
        assert_eq!(a.xsave, b.xsave);
    }
    drop(vm);
    (state, mem)
}

/// Restores and runs to the end; returns the exit.
fn restore_and_finish(cfg: &VmConfig, state: &VmState, mem: &[u8]) -> VmExit {
    let (mut vm, report) =
        build_vm_from_state(cfg, state, |m| load_memory(m, &mut &mem[..])).expect("restore");
    println!("restore report: {report:?}");
    for r in &report.refused_msrs {
        println!(
            "  vCPU {} MSR {:#x} = {:#x} refused by KVM",
            r.vcpu, r.index, r.data
        );
    }
    vm.start().unwrap();
    vm.wait_timeout(Duration::from_secs(30))
        .expect("restored guest did not finish in 30 s")
}

/// The whole console stream: one BOOT, counter and disk records contiguous from 1 with
/// no duplicate, dirty passes without errors, DONE last.
fn check_output(text: &str) {
    let mut next_c = 1;
    let mut next_w = 1;
    let mut boots = 0;
    let mut passes = 0;
    for l in text.lines() {
        if l.starts_with("BOOT ") {
            boots += 1;
        } else if let Some(n) = l.strip_prefix("C ") {
            assert_eq!(n.parse::<u64>().unwrap(), next_c, "counter:\n{text}");
            next_c += 1;
        } else if let Some(n) = l.strip_prefix("W ") {
            assert_eq!(n.parse::<u64>().unwrap(), next_w, "disk records:\n{text}");
            next_w += 1;
        } else if l.starts_with("D ") {
            assert!(l.ends_with(" errors=0"), "{l}\n{text}");
            passes += 1;
        } else if l.starts_with("DISK ") {
            assert!(l.starts_with("DISK recovered=0 corrupt=0"), "{l}");
        } else {
            assert!(!l.contains("ERROR"), "guest reported an error: {l}\n{text}");
            assert_eq!(l, "DONE", "unexpected line:\n{text}");
        }
    }
    assert_eq!(boots, 1, "{text}");
    assert_eq!(next_c, COUNTER_LIMIT + 1, "{text}");
    assert_eq!(next_w, DISK_LIMIT + 1, "{text}");
    assert!(passes >= 25, "{passes} dirty passes\n{text}");
    assert!(text.ends_with("DONE\n"), "{text}");
}

#[test]
fn guest_continues_after_restore_in_a_new_vmm() {
    let dir = guest::TempDir::new("state-inproc");
    let cfg = config(&dir.0);
    let (state, mem) = run_and_capture(&cfg, &dir.0, 300);
    let before = console(&dir.0);
    assert!(!before.contains("DONE"), "captured too late:\n{before}");
    // Through the byte format, as a standby would receive it.
    let state = VmState::from_bytes(&state.to_bytes().unwrap()).unwrap();
    let exit = restore_and_finish(&cfg, &state, &mem);
    assert_eq!(exit, VmExit::GuestExit { status: 0 }, "{exit}");
    let text = console(&dir.0);
    assert!(text.starts_with(&before));
    check_output(&text);
}

#[test]
fn restore_refuses_a_state_that_does_not_match_the_config() {
    let dir = guest::TempDir::new("state-mismatch");
    let cfg = config(&dir.0);
    let (state, mem) = run_and_capture(&cfg, &dir.0, 50);
    let fill = |m: &_| load_memory(m, &mut &mem[..]);

    let mut other = cfg.clone();
    other.mem_mib = 128;
    let e = build_vm_from_state(&other, &state, fill)
        .err()
        .expect("mem");
    assert!(e.to_string().contains("memory layout"), "{e}");

    let mut other = cfg.clone();
    other.vcpus = 1;
    let e = build_vm_from_state(&other, &state, fill)
        .err()
        .expect("vcpus");
    assert!(e.to_string().contains("vCPUs"), "{e}");

    let mut other = cfg.clone();
    create_image(&dir.0.join("other.img"), 16 << 20);
    other.disks[0].path = dir.0.join("other.img");
    let e = build_vm_from_state(&other, &state, fill)
        .err()
        .expect("disk");
    assert!(e.to_string().contains("attachment differs"), "{e}");

    let e = build_vm_from_state(&cfg, &state, |_| Err(std::io::Error::other("no source")))
        .err()
        .expect("fill");
    assert!(e.to_string().contains("no source"), "{e}");
}

#[test]
fn guest_continues_after_restore_in_another_process() {
    let dir = guest::TempDir::new("state-xproc");
    let cfg = config(&dir.0);
    let (state, mem) = run_and_capture(&cfg, &dir.0, 300);
    let before = console(&dir.0);
    std::fs::write(dir.0.join("state.bin"), state.to_bytes().unwrap()).unwrap();
    std::fs::write(dir.0.join("memory.bin"), &mem).unwrap();
    std::fs::write(
        dir.0.join("config.toml"),
        toml::to_string(&cfg).expect("config to toml"),
    )
    .unwrap();

    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "restore_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &dir.0)
        .output()
        .unwrap();
    let child = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "child failed:\n{child}");
    assert!(child.contains("CHILD-RESTORED-OK"), "{child}");
    let text = console(&dir.0);
    assert!(text.starts_with(&before));
    check_output(&text);
}

/// The restoring side of the cross-process test; does nothing when run on its own.
#[test]
fn restore_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let cfg: VmConfig =
        toml::from_str(&std::fs::read_to_string(dir.join("config.toml")).unwrap()).unwrap();
    let state = VmState::from_bytes(&std::fs::read(dir.join("state.bin")).unwrap()).unwrap();
    let mut mem = std::fs::File::open(dir.join("memory.bin")).unwrap();
    let (mut vm, report) =
        build_vm_from_state(&cfg, &state, |m| load_memory(m, &mut mem)).expect("restore");
    println!("child restore report: {report:?}");
    vm.start().unwrap();
    let exit = vm
        .wait_timeout(Duration::from_secs(30))
        .expect("restored guest did not finish in 30 s");
    assert_eq!(exit, VmExit::GuestExit { status: 0 }, "{exit}");
    println!("CHILD-RESTORED-OK");
}

#[test]
fn guest_survives_a_chain_of_restores() {
    let dir = guest::TempDir::new("state-chain");
    let cfg = config(&dir.0);
    let (mut state, mut mem) = run_and_capture(&cfg, &dir.0, 100);
    // Each generation runs a little, then is captured and replaced by the next.
    for hop in 1..=6 {
        let (mut vm, report) =
            build_vm_from_state(&cfg, &state, |m| load_memory(m, &mut &mem[..])).expect("restore");
        if !report.is_exact() {
            println!("hop {hop}: {report:?}");
        }
        vm.start().unwrap();
        wait_for_lines(
            &mut vm,
            &dir.0.join("console.log"),
            "C ",
            100 + hop * 150,
            Duration::from_secs(10),
            &format!("hop {hop}"),
        );
        vm.pause().unwrap();
        state = vm.capture_state().expect("capture");
        mem.clear();
        save_memory(vm.guest_memory(), &mut mem).unwrap();
        drop(vm);
    }
    let exit = restore_and_finish(&cfg, &state, &mem);
    assert_eq!(exit, VmExit::GuestExit { status: 0 }, "{exit}");
    check_output(&console(&dir.0));
}
