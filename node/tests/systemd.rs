//! twinrund under systemd: the unit files pass `systemd-analyze verify` (offline; systemd
//! is not PID 1 here), and the daemon speaks the notify protocol to a test-provided
//! NOTIFY_SOCKET: READY=1 once its API serves, WATCHDOG=1 within WATCHDOG_USEC, STATUS=
//! lines, STOPPING=1 on SIGTERM. `--check-config` gives file:line errors and touches
//! nothing.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn units_dir() -> std::path::PathBuf {
    repo_root().join("packaging/systemd")
}

/// Copies `unit` into `dir` with the installed binaries' paths pointed at the built
/// ones (verify checks that ExecStart's binary exists).
fn staged(dir: &Path, unit: &str, edit: impl Fn(String) -> String) -> std::path::PathBuf {
    let text = std::fs::read_to_string(units_dir().join(unit)).expect("unit file");
    let text = text
        .replace(
            "/usr/bin/twinrund ",
            &format!("{} ", twinrund_bin().display()),
        )
        .replace(
            "/usr/bin/twinrun ",
            &format!("{} ", twinrun_bin().display()),
        );
    let p = dir.join(unit);
    std::fs::write(&p, edit(text)).expect("write unit");
    p
}

fn verify(unit: &Path) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
        .expect("systemd-analyze is installed (Debian package systemd)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unit_files_verify_clean() {
    let dir = tempfile::tempdir().unwrap();
    for unit in ["twinrund.service", "twinrun-witness.service"] {
        let p = staged(dir.path(), unit, |t| t);
        let (ok, err) = verify(&p);
        assert!(
            ok && err.trim().is_empty(),
            "{unit}: systemd-analyze verify:\n{err}"
        );
    }
    let text = std::fs::read_to_string(units_dir().join("twinrund.service")).unwrap();
    for needed in [
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "KillMode=process",
        "RuntimeDirectoryPreserve=yes",
    ] {
        assert!(text.contains(needed), "twinrund.service lacks {needed}");
    }
    // The check is real: a broken copy is reported.
    let bad = staged(dir.path(), "twinrund.service", |t| {
        t.replace("Type=notify", "Type=notfy")
    });
    let (_, err) = verify(&bad);
    assert!(
        err.contains("notfy"),
        "verify did not report a bad Type=: {err:?}"
    );
}

/// A single node whose peer never comes (enough for the notify protocol).
fn lone_plan() -> ClusterPlan {
    ClusterPlan::new()
}

#[test]
fn notify_ready_watchdog_status_stopping() {
    let plan = lone_plan();
    let cfg = plan.write_config(0);
    let sock_path = plan.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let watchdog = Duration::from_secs(2);
    let log = plan.node_dir(0).join("twinrund.log");
    let mut child = Command::new(twinrund_bin())
        .arg("--config")
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", watchdog.as_micros().to_string())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let started = Instant::now();
    let mut msgs: Vec<(Instant, String)> = Vec::new();
    let mut buf = [0u8; 4096];
    let client = plan.client(0, READER);
    let mut ready_at = None;
    // Until READY=1, then 3 x WATCHDOG_USEC of pings.
    while ready_at.is_none_or(|t: Instant| t.elapsed() < watchdog * 3) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no READY=1 within 60 s: {msgs:?}\n{}",
            log_text()
        );
        if let Ok(n) = sock.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if ready_at.is_none() && text.lines().any(|l| l == "READY=1") {
                ready_at = Some(Instant::now());
                // READY=1 means serving: the API answers now.
                let nodes = client.nodes().expect("API answers once READY=1 was sent");
                assert_eq!(nodes.len(), 2);
            }
            msgs.push((Instant::now(), text));
        }
    }
    let ready = ready_at.unwrap();
    let ready_msg = &msgs.iter().find(|(_, m)| m.contains("READY=1")).unwrap().1;
    assert!(
        ready_msg.contains("STATUS=pm1: API on"),
        "READY comes with a STATUS line: {ready_msg:?}"
    );
    let pings: Vec<Instant> = msgs
        .iter()
        .filter(|(t, m)| *t >= ready && m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect();
    assert!(
        pings.len() >= 4,
        "expected a ping every WATCHDOG_USEC/4, got {} in {:?}",
        pings.len(),
        watchdog * 3
    );
    let mut last = ready;
    for p in &pings {
        let gap = p.duration_since(last);
        assert!(
            gap < watchdog,
            "a watchdog gap of {gap:?} exceeds WATCHDOG_USEC {watchdog:?}"
        );
        last = *p;
    }
    // SIGTERM: STOPPING=1, exit 0.
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut stopping = false;
    while !stopping && Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            stopping |= String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "STOPPING=1");
        }
    }
    assert!(stopping, "no STOPPING=1 after SIGTERM\n{}", log_text());
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(0), "{}", log_text());
}

#[test]
fn check_config_errors_name_file_and_line_and_touch_nothing() {
    let plan = ClusterPlan::new();
    let cfg = plan.write_config(0);
    let ok = Command::new(twinrund_bin())
        .args(["--check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("OK: node pm1"));
    let text = std::fs::read_to_string(&cfg).unwrap();
    let bad = text.replace("heartbeat_ms = 100", "heartbeat_ms = \"fast\"");
    std::fs::write(&cfg, &bad).unwrap();
    let line = bad.lines().position(|l| l.contains("\"fast\"")).unwrap() + 1;
    let out = Command::new(twinrund_bin())
        .args(["--check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with(&format!("twinrund: {}:{line}: ", cfg.display())),
        "{err}"
    );
    // The daemon itself refuses the file the same way, before creating anything.
    let out = Command::new(twinrund_bin())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!(":{line}: ")));
    assert!(
        !plan.node_dir(0).join("state").exists(),
        "a bad config must change nothing"
    );
    // A short secret and a bad tokens file are reported with their paths.
    std::fs::write(&cfg, &text).unwrap();
    std::fs::write(plan.node_dir(0).join("tokens"), "admin short\n").unwrap();
    let out = Command::new(twinrund_bin())
        .args(["--check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tokens:1: tokens must be at least 16"));
}
