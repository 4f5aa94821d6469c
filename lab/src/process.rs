//! Child processes that cannot outlive their owner: SIGKILLed and reaped on drop (also
//! when the owner panics), optionally as a whole process group.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::LabError;

/// A child process (or the leader of a process group of its own), killed and reaped
/// on drop if still running.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    /// Set once reaped.
    status: Option<ExitStatus>,
    /// Signals go to the child's process group (it leads one).
    group: bool,
    log: Option<PathBuf>,
}

impl Proc {
    /// Starts `cmd`; `name` appears in messages.
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Proc, LabError> {
        Self::start(name, cmd, false, None)
    }

    /// Starts `cmd` as the leader of a new process group: every signal, the one of the
    /// drop included, goes to the whole group (what a shell script or a program that
    /// forks helpers leaves behind).
    pub fn spawn_group(name: &str, cmd: &mut Command) -> Result<Proc, LabError> {
        cmd.process_group(0);
        Self::start(name, cmd, true, None)
    }

    /// Starts `cmd` with stdin, stdout and stderr on /dev/null and `RUST_LOG=warn`
    /// (a VMM or server whose output nobody reads).
    pub fn spawn_quiet(name: &str, cmd: &mut Command) -> Result<Proc, LabError> {
        cmd.env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Self::start(name, cmd, false, None)
    }

    /// Starts `cmd` with stdin from /dev/null, stderr to `log` and stdout to `log` with
    /// the extension `stdout`.
    pub fn spawn_logged(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc, LabError> {
        let err = File::create(log).map_err(LabError::io(format!("create {}", log.display())))?;
        let out_path = log.with_extension("stdout");
        let out = File::create(&out_path)
            .map_err(LabError::io(format!("create {}", out_path.display())))?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        Self::start(name, cmd, false, Some(log.to_path_buf()))
    }

    fn start(
        name: &str,
        cmd: &mut Command,
        group: bool,
        log: Option<PathBuf>,
    ) -> Result<Proc, LabError> {
        let child = cmd.spawn().map_err(LabError::io(format!(
            "cannot start {name} ({:?})",
            cmd.get_program()
        )))?;
        Ok(Proc {
            name: name.to_string(),
            child: Some(child),
            status: None,
            group,
            log,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its pid while it has not been reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The child itself while it is not reaped (to take its piped stdin or stdout).
    pub fn child(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }

    /// The log it writes ([`Proc::spawn_logged`]).
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// What its log holds so far (empty without one).
    pub fn log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The last `n` lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        crate::console::tail(&self.log(), n)
    }

    /// Its exit status once it has exited (reaped by this call if need be).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if let Some(c) = &mut self.child {
            if let Ok(Some(s)) = c.try_wait() {
                self.child = None;
                self.status = Some(s);
            }
        }
        self.status
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        self.try_wait().is_none() && self.child.is_some()
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if self.child.is_none() || Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `sig` (to the group of a [`Proc::spawn_group`]). Nothing once reaped (its
    /// pid may belong to another process by then).
    pub fn signal(&self, sig: Signal) -> Result<(), LabError> {
        let Some(c) = &self.child else {
            return Ok(());
        };
        let pid = Pid::from_raw(c.id() as i32);
        // The child is not reaped (we hold it and have not waited), so its pid, and the
        // group id it leads, cannot have been reused.
        let r = if self.group {
            killpg(pid, sig)
        } else {
            kill(pid, sig)
        };
        r.map_err(|e| LabError::Io {
            what: format!("signal {sig} to {}", self.name),
            source: e.into(),
        })
    }

    /// SIGKILL (to the whole group of a [`Proc::spawn_group`]) and reap; its status.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.child.is_some() {
            let _ = self.signal(Signal::SIGKILL);
        }
        if let Some(mut c) = self.child.take() {
            if let Ok(s) = c.wait() {
                self.status = Some(s);
            }
        }
        self.status
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; reaps. Its status.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.try_wait().is_some() || self.child.is_none() {
            return self.status;
        }
        let _ = self.signal(Signal::SIGTERM);
        if let Some(s) = self.wait_timeout(grace) {
            return Some(s);
        }
        eprintln!(
            "{} did not stop on SIGTERM within {grace:?}: SIGKILL",
            self.name
        );
        self.kill()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` to completion with its output captured (stdin from /dev/null), killing
/// it after `timeout`.
pub fn output_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output, LabError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = format!("{:?}", cmd.get_program());
    let child = cmd
        .spawn()
        .map_err(LabError::io(format!("cannot start {program}")))?;
    let pid = Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(r) => {
            let _ = waiter.join();
            r.map_err(LabError::io(format!("waiting for {program}")))
        }
        Err(_) => {
            // The waiter owns the child and has not reaped it (it would have sent), so
            // the pid is still our child's.
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waiter.join();
            Err(LabError::Timeout(format!(
                "{program} did not finish within {timeout:?}"
            )))
        }
    }
}
