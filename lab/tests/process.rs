//! Process guards: a child (or a whole process group) is killed and reaped on drop,
//! also when its owner panics; SIGTERM first when asked.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use twinrun_lab::process::{output_timeout, Proc};

/// Gone, or a zombie nobody reaps yet (after its parent died).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn a_child_is_killed_and_reaped_on_drop_even_on_panic() {
    let pid = std::sync::Mutex::new(0);
    let r = std::panic::catch_unwind(|| {
        let mut p = Proc::spawn("sleeper", Command::new("sleep").arg("1000")).unwrap();
        assert!(p.alive());
        *pid.lock().unwrap() = p.pid().unwrap();
        panic!("simulated test failure");
    });
    assert!(r.is_err());
    let pid = pid.into_inner().unwrap();
    assert!(pid > 0 && gone(pid));
}

#[test]
fn a_process_group_is_killed_whole() {
    let dir = std::env::temp_dir().join(format!("twinrun-lab-pg-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let pidfile = dir.join("grandchild");
    let script = format!("sleep 1000 & echo $! > {}; wait", pidfile.display());
    let p = Proc::spawn_group("shell", Command::new("sh").args(["-c", &script])).unwrap();
    let grandchild: u32 =
        twinrun_lab::poll(Duration::from_secs(10), Duration::from_millis(10), || {
            std::fs::read_to_string(&pidfile).ok()?.trim().parse().ok()
        })
        .expect("the shell started its child");
    assert!(!gone(grandchild));
    drop(p);
    assert!(
        twinrun_lab::poll(Duration::from_secs(5), Duration::from_millis(10), || {
            gone(grandchild).then_some(())
        })
        .is_some(),
        "the whole group was killed"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn terminate_sends_sigterm_first_and_logs_go_to_files() {
    let dir = std::env::temp_dir().join(format!("twinrun-lab-term-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let log = dir.join("t.log");
    // Exits 3 on SIGTERM after saying so on stderr.
    let mut p = Proc::spawn_logged(
        "trapper",
        Command::new("sh").args([
            "-c",
            "trap 'echo got-term >&2; exit 3' TERM; echo hello; while :; do sleep 0.05; done",
        ]),
        &log,
    )
    .unwrap();
    assert!(
        twinrun_lab::poll(Duration::from_secs(5), Duration::from_millis(10), || {
            std::fs::read_to_string(log.with_extension("stdout"))
                .ok()
                .filter(|s| s.contains("hello"))
        })
        .is_some()
    );
    let st = p.terminate(Duration::from_secs(5)).unwrap();
    assert_eq!(st.code(), Some(3));
    assert!(p.log().contains("got-term"), "{}", p.log());
    assert!(!p.alive());
    assert_eq!(p.try_wait(), Some(st), "the status stays known");
    // A program that ignores SIGTERM is killed after the grace period (`exec`: the
    // ignored SIGTERM carries over, and the SIGKILL leaves no child behind).
    let mut q = Proc::spawn(
        "stubborn",
        Command::new("sh").args(["-c", "trap '' TERM; exec sleep 1000"]),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let st = q.terminate(Duration::from_millis(300)).unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&st), Some(9));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!Path::new(&dir).exists());
}

#[test]
fn output_timeout_kills_what_hangs() {
    let o = output_timeout(Command::new("echo").arg("hi"), Duration::from_secs(10)).unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n");
    let t0 = std::time::Instant::now();
    assert!(output_timeout(Command::new("sleep").arg("100"), Duration::from_millis(200)).is_err());
    assert!(t0.elapsed() < Duration::from_secs(10));
}
