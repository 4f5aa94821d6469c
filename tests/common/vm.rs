//! `twinrun vm run` (or `twinrun snapshot restore`) as a child process with its console
//! in a file, killed and reaped on drop.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use twinrun_lab::console::{tail, ConsoleLog};
use twinrun_lab::Proc;

use super::{guest_elf, twinrun_bin};

/// Arguments of one `twinrun vm run` (or `snapshot restore`); the console always goes
/// to a file in `dir`.
pub struct VmRun {
    dir: PathBuf,
    name: String,
    args: Vec<String>,
    netns: Option<String>,
    env: Vec<(String, OsString)>,
}

impl VmRun {
    /// A `vm run` named `name` (file names in `dir`) of the built test guest.
    pub fn new(dir: &Path, name: &str) -> Self {
        VmRun {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            args: vec![
                "vm".into(),
                "run".into(),
                "--guest".into(),
                guest_elf().display().to_string(),
            ],
            netns: None,
            env: Vec::new(),
        }
    }

    /// A `snapshot restore <args>` named `name`.
    pub fn restore(dir: &Path, name: &str, args: &[&str]) -> Self {
        let mut r = VmRun::new(dir, name);
        r.args = ["snapshot", "restore"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        r.args.extend(args.iter().map(|s| s.to_string()));
        r
    }

    /// Adds raw flags.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Runs the VMM inside network namespace `ns` (`ip netns exec`, which execs, so the
    /// child's pid is the VMM's).
    pub fn in_netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_string());
        self
    }

    /// Sets an environment variable of the VMM.
    pub fn env(mut self, key: &str, value: impl Into<OsString>) -> Self {
        self.env.push((key.to_string(), value.into()));
        self
    }

    pub fn spawn(self) -> VmProcess {
        let console = self.dir.join(format!("{}.console", self.name));
        let stderr_path = self.dir.join(format!("{}.stderr", self.name));
        let mut cmd = match &self.netns {
            Some(ns) => twinrun_lab::netns::command_in(ns, twinrun_bin()),
            None => Command::new(twinrun_bin()),
        };
        cmd.args(&self.args)
            .arg("--console")
            .arg(format!("file:{}", console.display()))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            );
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn_logged(&self.name, &mut cmd, &stderr_path)
            .unwrap_or_else(|e| panic!("spawn twinrun: {e}"));
        VmProcess {
            proc,
            console: ConsoleLog::new(&console),
            console_path: console,
        }
    }

    /// Runs to the end (at most `timeout`); returns the exit status, the console lines
    /// and stderr.
    pub fn run(self, timeout: Duration) -> Finished {
        let mut p = self.spawn();
        let status = p.wait_timeout(timeout).unwrap_or_else(|| {
            let err = p.stderr();
            p.console.poll();
            panic!(
                "twinrun did not finish within {timeout:?}\nconsole tail:\n{}\nstderr:\n{err}",
                p.console.tail(20)
            )
        });
        p.console.poll();
        Finished {
            status,
            lines: std::mem::take(&mut p.console.seen),
            stderr: p.stderr(),
        }
    }
}

/// A finished run.
pub struct Finished {
    pub status: ExitStatus,
    pub lines: Vec<String>,
    pub stderr: String,
}

impl Finished {
    /// Panics with the context unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.status.code(),
            Some(code),
            "unexpected exit ({})\nstderr:\n{}\nconsole tail:\n{}",
            self.status,
            self.stderr,
            tail(&self.lines.join("\n"), 20)
        );
        self
    }
}

/// A running VMM process; killed (SIGKILL) and reaped on drop if still running.
pub struct VmProcess {
    proc: Proc,
    pub console: ConsoleLog,
    pub console_path: PathBuf,
}

impl VmProcess {
    pub fn pid(&self) -> u32 {
        self.proc.pid().unwrap_or(0)
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        let sig = nix::sys::signal::Signal::try_from(signal).expect("a signal number");
        self.proc.signal(sig).expect("signal the VMM");
    }

    /// SIGKILL and reap; the status must say it died of SIGKILL.
    pub fn sigkill(&mut self) {
        let s = self.proc.kill().expect("the VMM was running");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&s),
            Some(libc::SIGKILL),
            "{s}"
        );
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.proc.wait_timeout(timeout)
    }

    /// The VMM's stderr so far (its log).
    pub fn stderr(&self) -> String {
        self.proc.log()
    }

    /// Waits (60 s at most) until the control socket `sock` answers a status request
    /// from this process (an early exit fails at once).
    pub fn wait_control(&mut self, sock: &Path) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let pid = self.pid();
        loop {
            if twinrun_control::status(sock, Duration::from_secs(5)).is_ok_and(|s| s.pid == pid) {
                return;
            }
            if let Some(s) = self.proc.try_wait() {
                panic!("twinrun exited ({s}) early; stderr:\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "no control socket answer from {}; stderr:\n{}",
                sock.display(),
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
