//! Bad input to `twinrun vm run` exits with code 2 and a message naming the problem,
//! before any VM is built.
mod common;

use std::process::{Command, Output};

use common::twinrun_bin;

fn run(args: &[&str]) -> Output {
    Command::new(twinrun_bin())
        .args(["vm", "run"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run twinrun")
}

fn expect_usage_error(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}

#[test]
fn missing_guest_file() {
    let out = run(&["--guest", "/nonexistent/guest.elf"]);
    expect_usage_error(&out, &["guest ELF", "/nonexistent/guest.elf"]);
}

#[test]
fn missing_config_file() {
    let out = run(&["--config", "/nonexistent/vm.toml"]);
    expect_usage_error(&out, &["/nonexistent/vm.toml"]);
}

#[test]
fn bad_config_key_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.toml");
    std::fs::write(&cfg, "mem_mib = 64\nvcpus = 1\nmemory = 5\n").unwrap();
    let out = run(&["--config", cfg.to_str().unwrap()]);
    let at = format!("{}:3:", cfg.display());
    expect_usage_error(&out, &[&at, "unknown field `memory`"]);
}

#[test]
fn invalid_config_value() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.toml");
    std::fs::write(&cfg, "mem_mib = 1\n").unwrap();
    let guest = std::env::current_exe().unwrap();
    let out = run(&[
        "--config",
        cfg.to_str().unwrap(),
        "--guest",
        guest.to_str().unwrap(),
    ]);
    expect_usage_error(&out, &["mem_mib = 1"]);
}

#[test]
fn bad_mac() {
    let out = run(&["--net", "tap0,02:00:00:00:zz:01"]);
    expect_usage_error(&out, &["--net", "bad MAC", "02:00:00:00:zz:01"]);
}

#[test]
fn bad_disk_option() {
    let out = run(&["--disk", "/tmp/x.img,engine=aio"]);
    expect_usage_error(&out, &["--disk", "aio"]);
}

#[test]
fn unknown_workload() {
    let out = run(&["--workload", "counter,mining"]);
    expect_usage_error(&out, &["mining", "--workload"]);
}

#[test]
fn missing_disk_image() {
    let guest = std::env::current_exe().unwrap();
    let out = run(&[
        "--guest",
        guest.to_str().unwrap(),
        "--workload",
        "disk",
        "--disk",
        "/nonexistent/disk.img",
    ]);
    expect_usage_error(&out, &["/nonexistent/disk.img"]);
}
