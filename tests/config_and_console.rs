//! End to end through the CLI: a TOML config with flag overrides boots the real guest,
//! and the console can stream to a Unix socket.
mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{guest_elf, require_kvm, twinrun_bin, VmRun};

fn c_lines(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("C "))
        .map(|s| s.parse().expect("C <seq>"))
        .collect()
}

#[test]
fn config_file_with_flag_override() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vm.toml");
    std::fs::write(
        &cfg,
        format!(
            "mem_mib = 48\nvcpus = 1\n[payload]\nkind = \"test-guest\"\nelf = {:?}\n\
             [payload.workloads]\ncounter = true\ncounter_rate = 0\ncounter_limit = 40\n",
            guest_elf().display().to_string()
        ),
    )
    .unwrap();
    // The file asks for 40 lines; the flag wins.
    let r = VmRun::new(dir.path(), "cfg")
        .args(["--config", cfg.to_str().unwrap(), "--counter-limit", "7"])
        .run(Duration::from_secs(60));
    r.expect_code(0);
    assert_eq!(c_lines(&r.lines), (1..=7).collect::<Vec<_>>());
    assert!(r.stderr.contains("48 MiB"), "{}", r.stderr);
}

#[test]
fn console_streams_to_a_unix_socket() {
    require_kvm();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("console.sock");
    let mut cmd = Command::new(twinrun_bin());
    cmd.args(["vm", "run", "--mem-mib", "48", "--guest"])
        .arg(guest_elf())
        // Paced so the VM is still running when we connect (~0.5 s): once it has
        // ended there is no socket to connect to.
        .args([
            "--workload",
            "counter",
            "--counter-rate",
            "50",
            "--counter-limit",
            "25",
        ])
        .arg("--console")
        .arg(format!("socket:{}", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // Killed and reaped on drop, also when an assertion fails.
    let mut vm = twinrun_lab::Proc::spawn("twinrun", &mut cmd).unwrap();
    let mut stderr = vm.child().and_then(|c| c.stderr.take()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                panic!("cannot connect to {}: {e}", sock.display());
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // Output written before we connected was kept; read until the VMM closes it.
    let lines: Vec<String> = BufReader::new(stream)
        .lines()
        .map_while(Result::ok)
        .collect();
    let status = vm.wait_timeout(Duration::from_secs(30));
    let mut err = String::new();
    let _ = stderr.read_to_string(&mut err);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{err}");
    assert!(
        lines.first().is_some_and(|l| l.starts_with("BOOT")),
        "{lines:?}"
    );
    assert_eq!(c_lines(&lines), (1..=25).collect::<Vec<_>>());
    assert_eq!(lines.last().map(String::as_str), Some("DONE"));
}
