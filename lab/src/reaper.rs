//! The reaper: what a test leaves behind when it is killed.
//!
//! A test that nextest kills at its timeout (SIGKILL) runs no destructor: the daemons
//! it started, the VMMs they started (in sessions of their own, by design, so they
//! survive their daemon) and its network namespaces stay, and slow every later test.
//! A [`Reaper`] is a watcher process started with the thing it guards (a
//! [`crate::Topology`], a node test's cluster): a POSIX shell in a session of its own
//! (nextest's signals to the test's process group miss it) that reads what to clean
//! from a pipe only the test process holds (the pipe is close-on-exec, so no child
//! inherits it). It learns what to clean while the test runs: namespaces (by name or
//! by prefix), pids, and directories of the node daemon's VMM pid files (read at the
//! end, so VMMs started later count). When the test process dies, however it dies, the
//! kernel closes the pipe and the watcher, seeing end of file, kills every process in
//! those namespaces (`ip netns pids`), every registered pid and every VMM the pid files
//! name (only if its start time, field 22 of `/proc/<pid>/stat`, is the one the file
//! records, so a reused pid is left alone), deletes the namespaces (and the
//! interfaces in them) and, last, the registered scratch directories (a node test's
//! state dirs, its images and logs: gigabytes over a day of killed tests). Dropped normally, the reaper tells the watcher to exit quietly:
//! the owner cleans up itself.
//!
//! Why a shell and not a fork of the test: after fork(2) a multi-threaded process may
//! only call async-signal-safe functions until exec, and the test binaries of other
//! crates cannot name a helper binary of this one; `sh` and `ip` are on every machine
//! the tests run on (`ip` is needed for namespaces anyway).

use std::io::Write as _;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;

use crate::LabError;

/// The watcher: registrations one a line; `quit` ends it quietly, end of file (the
/// test process died) makes it clean up everything registered.
const SCRIPT: &str = r#"
trap '' HUP INT TERM PIPE
reg=''
while IFS= read -r line; do
  [ "$line" = quit ] && exit 0
  reg="$reg$line
"
done
# The test process is gone. Field 22 of /proc/PID/stat (the comm field may hold
# spaces, so count from after its closing parenthesis).
start_time() {
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  set -- ${s##*") "}
  shift 19
  echo "$1"
}
kill_ns() {
  for p in $(ip netns pids "$1" 2>/dev/null); do
    [ "$p" != $$ ] && kill -9 "$p" 2>/dev/null
  done
}
namespaces() {
  ip netns list 2>/dev/null | while read -r n _; do
    case "$n" in "$1"*) echo "$n" ;; esac
  done
}
for round in 1 2; do
  printf '%s' "$reg" | while read -r kind arg; do
    case "$kind" in
      pid) kill -9 "$arg" 2>/dev/null ;;
      pids)
        for f in "$arg"/*; do
          [ -f "$f" ] || continue
          t=$(tr -d ' \n' < "$f" 2>/dev/null)
          pid=$(printf '%s' "$t" | sed -n 's/.*"pid":\([0-9]*\).*/\1/p')
          st=$(printf '%s' "$t" | sed -n 's/.*"start_time":\([0-9]*\).*/\1/p')
          [ -n "$pid" ] || continue
          now=$(start_time "$pid") || continue
          [ -z "$st" ] || [ "$now" = "$st" ] && kill -9 "$pid" 2>/dev/null
        done ;;
      ns) kill_ns "$arg" ;;
      prefix) for n in $(namespaces "$arg"); do kill_ns "$n"; done ;;
    esac
  done
done
printf '%s' "$reg" | while read -r kind arg; do
  case "$kind" in
    ns) ip netns del "$arg" 2>/dev/null ;;
    prefix) for n in $(namespaces "$arg"); do ip netns del "$n" 2>/dev/null; done ;;
    link) ip link del "$arg" 2>/dev/null ;;
    dir) rm -rf -- "$arg" 2>/dev/null ;;
  esac
done
exit 0
"#;

/// A watcher that cleans up after its owner's process if it dies (see the module).
#[derive(Debug)]
pub struct Reaper {
    child: Child,
    /// The pipe's write end; `None` once told to quit.
    tx: Mutex<Option<ChildStdin>>,
}

impl Reaper {
    /// Starts a watcher, in a session of its own, for this process.
    pub fn start() -> Result<Reaper, LabError> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", SCRIPT, "twinrun-lab-reaper"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: setsid(2) is async-signal-safe and touches no memory of the parent;
        // it only fails if the child already leads a process group, which a fresh
        // child does not.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(LabError::io("cannot start the reaper (sh)"))?;
        let tx = child.stdin.take();
        Ok(Reaper {
            child,
            tx: Mutex::new(tx),
        })
    }

    /// The watcher's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn send(&self, kind: &str, arg: &str) -> Result<(), LabError> {
        if arg.is_empty() || arg.contains(['\n', '\r']) {
            return Err(LabError::Invalid(format!(
                "reaper: {kind} {arg:?} is not one line"
            )));
        }
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let Some(w) = tx.as_mut() else {
            return Err(LabError::Invalid("the reaper was told to quit".into()));
        };
        w.write_all(format!("{kind} {arg}\n").as_bytes())
            .map_err(LabError::io("writing to the reaper"))
    }

    /// Kill the processes in namespace `name` and delete it.
    pub fn namespace(&self, name: &str) -> Result<(), LabError> {
        self.send("ns", name)
    }

    /// The same for every namespace whose name starts with `prefix` (those made later
    /// too: a topology's, registered before its first namespace exists).
    pub fn namespaces_starting(&self, prefix: &str) -> Result<(), LabError> {
        self.send("prefix", prefix)
    }

    /// Kill process `pid` (a child of the test: a daemon).
    pub fn pid_of(&self, pid: u32) -> Result<(), LabError> {
        self.send("pid", &pid.to_string())
    }

    /// Kill every process named by a pid file in `dir` (the node daemon's
    /// `run/pids`: JSON with `pid` and `start_time`), read when the test is gone.
    pub fn pid_files(&self, dir: &Path) -> Result<(), LabError> {
        let d = dir
            .to_str()
            .ok_or_else(|| LabError::Invalid(format!("reaper: {} is not UTF-8", dir.display())))?;
        self.send("pids", d)
    }

    /// Delete interface `name` of the root namespace (a TAP or veth made there).
    pub fn link(&self, name: &str) -> Result<(), LabError> {
        self.send("link", name)
    }

    /// Remove directory `dir` and everything in it, after every process is killed (a
    /// test's scratch directory). Only an absolute path of at least two components is
    /// taken: a reaper must never be the way `/` or a relative path gets removed.
    pub fn directory(&self, dir: &Path) -> Result<(), LabError> {
        let d = dir
            .to_str()
            .ok_or_else(|| LabError::Invalid(format!("reaper: {} is not UTF-8", dir.display())))?;
        let parts = dir
            .components()
            .filter(|c| matches!(c, std::path::Component::Normal(_)))
            .count();
        let plain = dir.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        });
        if !dir.is_absolute() || parts < 2 || !plain {
            return Err(LabError::Invalid(format!(
                "reaper: {d:?} is not an absolute scratch directory (at least /a/b, no . or ..)"
            )));
        }
        self.send("dir", d)
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let mut tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mut w) = tx.take() {
            let _ = w.write_all(b"quit\n");
        }
        // It exits at once on `quit` (or, should the line not get through, at end of
        // file, cleaning what its owner cleans anyway).
        let _ = self.child.wait();
    }
}
