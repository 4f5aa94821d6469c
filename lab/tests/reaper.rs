//! The reaper: a test process SIGKILLed (as nextest does at a timeout) leaves neither
//! its namespaces nor the processes in them nor the VMMs it registered behind; a
//! reaper dropped normally leaves everything alone.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use twinrun_lab::{NetNs, Reaper, Topology};

/// Where the child test writes what it made (set only in the child).
const CHILD_ENV: &str = "TWINRUN_LAB_REAPER_CHILD";

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

/// Field 22 of /proc/<pid>/stat, as the node daemon's pid files record it.
fn start_time(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = s.rsplit(") ").next().unwrap();
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// `sleep 1000` in a session of its own (as a VMM runs), inside `ns` if given.
fn detached_sleeper(ns: Option<&str>) -> std::process::Child {
    let mut cmd = match ns {
        Some(ns) => twinrun_lab::netns::command_in(ns, "sleep"),
        None => Command::new("sleep"),
    };
    cmd.arg("1000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: setsid(2) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

/// The child: a topology with a process in PM1's namespace, a registered daemon-like
/// pid and a VMM-like process named by a pid file; then it waits to be killed.
#[test]
#[ignore = "the child of a_killed_test_leaves_nothing_behind (run by it)"]
fn reaper_child() {
    let Some(out) = std::env::var_os(CHILD_ENV) else {
        panic!("run by a_killed_test_leaves_nothing_behind only");
    };
    let out = PathBuf::from(out);
    let topo = Topology::builder().single().build().unwrap();
    let in_ns = detached_sleeper(Some(topo.pm_ns(0))).id();
    let daemon = detached_sleeper(None).id();
    let vmm = detached_sleeper(None).id();
    let pids = out.join("pids");
    std::fs::create_dir_all(&pids).unwrap();
    std::fs::write(
        pids.join("vm1.json"),
        format!(
            "{{\"pid\": {vmm}, \"start_time\": {}, \"role\": \"primary\", \"log\": \"x\"}}",
            start_time(vmm)
        ),
    )
    .unwrap();
    topo.reaper.pid_of(daemon).unwrap();
    topo.reaper.pid_files(&pids).unwrap();
    let scratch = out.join("scratch");
    std::fs::create_dir_all(scratch.join("n1/run")).unwrap();
    std::fs::write(scratch.join("n1/disk.img"), b"data").unwrap();
    topo.reaper.directory(&scratch).unwrap();
    let made = format!("{}\n{in_ns} {daemon} {vmm}\n", topo.prefix);
    std::fs::write(out.join("made.tmp"), made).unwrap();
    std::fs::rename(out.join("made.tmp"), out.join("made")).unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn namespaces_of(prefix: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_string)
        .collect()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let done = twinrun_lab::poll(Duration::from_secs(60), Duration::from_millis(50), || {
        f().then_some(())
    });
    assert!(done.is_some(), "{what} within 60 s");
}

#[test]
fn a_killed_test_leaves_nothing_behind() {
    if !twinrun_lab::can_build_namespaces() {
        eprintln!("skipped: needs root and iproute2");
        return;
    }
    let dir = tempdir("reaper");
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "reaper_child", "--ignored", "--nocapture"])
        .env(CHILD_ENV, &dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let made = dir.join("made");
    wait_until("the child made its topology and processes", || {
        made.exists() || child.try_wait().unwrap().is_some()
    });
    assert!(
        child.try_wait().unwrap().is_none(),
        "the child test ended early"
    );
    let text = std::fs::read_to_string(&made).unwrap();
    let mut lines = text.lines();
    let prefix = lines.next().unwrap().to_string();
    let pids: Vec<u32> = lines
        .next()
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(!namespaces_of(&prefix).is_empty());
    assert!(pids.iter().all(|&p| !gone(p)));
    // As nextest does at a timeout: no destructor runs.
    child.kill().unwrap();
    child.wait().unwrap();
    wait_until("every process is killed", || pids.iter().all(|&p| gone(p)));
    wait_until("the namespaces are deleted", || {
        namespaces_of(&prefix).is_empty()
    });
    wait_until("the scratch directory is removed", || {
        !dir.join("scratch").exists()
    });
    assert!(made.exists(), "the reaper removed more than it was given");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_reaper_dropped_normally_kills_nothing() {
    if !twinrun_lab::can_build_namespaces() {
        eprintln!("skipped: needs root and iproute2");
        return;
    }
    let ns = NetNs::new(&twinrun_lab::unique_prefix("rp")).unwrap();
    let mut sleeper = detached_sleeper(None);
    let r = Reaper::start().unwrap();
    let watcher = r.pid();
    r.pid_of(sleeper.id()).unwrap();
    r.namespace(ns.name()).unwrap();
    let scratch = tempdir("reaper-quiet");
    r.directory(&scratch).unwrap();
    for bad in ["/", "/tmp", "relative/dir", "/tmp/../etc"] {
        assert!(
            r.directory(Path::new(bad)).is_err(),
            "the reaper took {bad:?} as a scratch directory"
        );
    }
    drop(r);
    // Dropped: the watcher has exited (drop waits for it), and left both alone.
    assert!(gone(watcher));
    assert!(
        !gone(sleeper.id()),
        "a quiet reaper killed a registered process"
    );
    assert!(NetNs::exists(ns.name()));
    assert!(
        scratch.exists(),
        "a quiet reaper removed a registered directory"
    );
    let _ = std::fs::remove_dir_all(&scratch);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
}

fn tempdir(tag: &str) -> PathBuf {
    let d = Path::new("/tmp").join(format!("twinrun-lab-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
