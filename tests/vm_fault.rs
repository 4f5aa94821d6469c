//! `twinrun vm fault` against a running VM: a bad range injected through the CLI fails
//! the guest's next disk writes (its `DISK-ERROR` line, the injected-error count in
//! `--show`), `--clear` removes it, and bad input exits with code 2.
mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{disk_image, require_kvm, twinrun_bin, VmProcess, VmRun};

/// One run directory for this test process.
fn env_dirs() -> &'static Path {
    common::private_dirs()
}

fn fault(args: &[&str]) -> Output {
    env_dirs();
    Command::new(twinrun_bin())
        .args(["vm", "fault"])
        .args(args)
        .output()
        .unwrap()
}

fn wait_socket(name: &str, vm: &mut VmProcess) {
    vm.wait_control(&env_dirs().join("run").join(format!("{name}.sock")));
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

#[test]
fn bad_range_through_the_cli_fails_guest_writes() {
    require_kvm();
    env_dirs();
    let dir = tempfile::tempdir().unwrap();
    let name = format!("flt{}", std::process::id());
    let img = disk_image(dir.path(), "disk.img", 4);
    let mut vm = VmRun::new(dir.path(), "vm")
        .args(["--name", &name, "--mem-mib", "64"])
        .args(["--workload", "counter,disk", "--counter-rate", "50"])
        .args(["--disk-rate", "200", "--disk", &img.display().to_string()])
        .spawn();
    wait_socket(&name, &mut vm);
    vm.console
        .wait_for(Duration::from_secs(60), |l| l == "W 20")
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.stderr()));

    // Records from 1000 on (sector 8 + 999) up to the end of the disk fail on write.
    let offset = (8 + 999) * 512u64;
    let range = format!("{offset}:{}", (4u64 << 20) - offset);
    let o = fault(&[
        "--name",
        &name,
        "--disk",
        "0",
        "--bad-range",
        &range,
        "--ops",
        "writes",
    ]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}{}", text(&o.stderr));
    assert!(
        out.contains(&format!(
            "disk 0 of {name}: added bad range {range} (writes)"
        )),
        "{out}"
    );
    assert!(out.contains("injected errors: 0"), "{out}");

    // The guest reaches the range: its write fails with IOERR (status 1), and it stops
    // writing records.
    let err = vm
        .console
        .wait_for(Duration::from_secs(60), |l| l.starts_with("DISK-ERROR"))
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.stderr()));
    assert!(err.starts_with("DISK-ERROR write "), "{err}");
    assert!(err.ends_with(" status=1"), "{err}");
    let sector: u64 = err
        .split_whitespace()
        .find_map(|w| w.strip_prefix("sector="))
        .unwrap()
        .parse()
        .unwrap();
    // A batch of records starts before the bad range and reaches into it.
    assert!(sector * 512 < offset + (4 << 20), "{err}");
    assert!((sector + 64) * 512 > offset, "{err}");

    let o = fault(&["--name", &name, "--disk", "0", "--show"]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}{}", text(&o.stderr));
    assert!(
        out.contains(&format!("bad range: {range} (writes)")),
        "{out}"
    );
    assert!(out.contains("injected errors: 1"), "{out}");

    let o = fault(&["--name", &name, "--disk", "0", "--clear"]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("cleared all faults"), "{out}");
    assert!(out.contains("bad ranges: none"), "{out}");

    // Bad input to a running VM: no such disk, a delay past the limit.
    let o = fault(&["--name", &name, "--disk", "3", "--fail"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("no disk 3"), "{}", text(&o.stderr));
    let o = fault(&["--name", &name, "--disk", "0", "--delay-ms", "600000"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("longer than the limit"),
        "{}",
        text(&o.stderr)
    );
    // The counter keeps going: only the disk workload stopped.
    vm.console
        .wait_for(Duration::from_secs(30), |l| l.starts_with("C "))
        .unwrap();
}

#[test]
fn bad_input_exits_2() {
    let o = fault(&["--name", "nosuchvm", "--disk", "0", "--fail"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("no running VM named nosuchvm"),
        "{}",
        text(&o.stderr)
    );
    let o = fault(&["--name", "nosuchvm", "--disk", "0", "--bad-range", "5"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("OFFSET:LEN"),
        "{}",
        text(&o.stderr)
    );
    let o = fault(&["--name", "nosuchvm", "--disk", "0"]);
    assert_eq!(o.status.code(), Some(2));
    let o = fault(&["--name", "nosuchvm", "--disk", "0", "--fail", "--clear"]);
    assert_eq!(o.status.code(), Some(2));
}
