//! `twinrun vm run` as a child process, killed on drop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::{guest_elf, twinrun_bin, ConsoleLog};

/// Arguments of one `twinrun vm run`; the console always goes to a file in `dir`.
pub struct VmRun {
    dir: PathBuf,
    name: String,
    args: Vec<String>,
    netns: Option<String>,
}

impl VmRun {
    /// A run named `name` (file names in `dir`) of the built test guest.
    pub fn new(dir: &Path, name: &str) -> Self {
        VmRun {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            args: vec!["--guest".into(), guest_elf().display().to_string()],
            netns: None,
        }
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

    pub fn spawn(self) -> VmProcess {
        let console = self.dir.join(format!("{}.console", self.name));
        let stderr_path = self.dir.join(format!("{}.stderr", self.name));
        let stdout_path = self.dir.join(format!("{}.stdout", self.name));
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(twinrun_bin());
                c
            }
            None => Command::new(twinrun_bin()),
        };
        cmd.args(["vm", "run"])
            .args(&self.args)
            .arg("--console")
            .arg(format!("file:{}", console.display()))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path).expect("create stdout file"))
            .stderr(File::create(&stderr_path).expect("create stderr file"));
        let child = cmd.spawn().expect("spawn twinrun");
        VmProcess {
            child: Some(child),
            console: ConsoleLog::new(&console),
            console_path: console,
            stderr_path,
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
            tail(&self.lines, 20)
        );
        self
    }
}

pub fn tail(lines: &[String], n: usize) -> String {
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A running VMM process; killed (SIGKILL) and reaped on drop if still running.
pub struct VmProcess {
    child: Option<Child>,
    pub console: ConsoleLog,
    pub console_path: PathBuf,
    stderr_path: PathBuf,
}

impl VmProcess {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`).
    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            let pid = i32::try_from(c.id()).expect("pid fits i32");
            // SAFETY: kill(2) on our own child's pid, which is not reaped yet (we hold
            // the Child and have not waited), so the pid cannot have been reused.
            let rc = unsafe { libc::kill(pid, signal) };
            assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
        }
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            match child.try_wait() {
                Ok(Some(s)) => {
                    self.child = None;
                    return Some(s);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => return None,
                Err(e) => panic!("waiting for twinrun: {e}"),
            }
        }
    }

    /// The VMM's stderr so far (its log).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
