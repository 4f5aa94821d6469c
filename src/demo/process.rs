//! Child processes of the demo, started inside a network namespace and ended on drop.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::topology::Topology;

/// A child process; SIGTERM, then SIGKILL after a grace period, on drop.
pub struct ChildGuard {
    pub name: &'static str,
    child: Option<Child>,
}

impl ChildGuard {
    /// Starts `program args` in network namespace `ns` (the child itself enters it
    /// before exec, so its pid is the program's: signals reach it directly), stderr to
    /// `log`.
    pub fn spawn_in_netns(
        name: &'static str,
        ns: &str,
        program: &Path,
        args: &[impl AsRef<OsStr>],
        log: &Path,
    ) -> io::Result<ChildGuard> {
        let nsf = File::open(Topology::netns_path(ns))?;
        let fd = nsf.as_raw_fd();
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(log)?);
        // SAFETY: runs in the forked child before exec; it only makes the setns system
        // call on a descriptor the parent keeps open (`nsf` lives until spawn returns)
        // and reads errno, both async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(nsf);
        Ok(ChildGuard {
            name,
            child: Some(child),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Exited already? (`Some(status)` then.)
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    pub fn signal(&self, sig: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on the pid of our own unreaped child: it cannot have been
            // recycled for another process.
            unsafe { libc::kill(pid as libc::pid_t, sig) };
        }
    }

    /// SIGKILL and reap.
    pub fn kill_now(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        let _ = c.kill();
        c.wait().ok()
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; reaps.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.child.as_ref()?;
        self.signal(libc::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < grace {
            if let Some(st) = self.try_status() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        log::warn!(
            "{} did not stop on SIGTERM within {grace:?}: SIGKILL",
            self.name
        );
        self.kill_now()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.terminate(Duration::from_secs(5));
    }
}
