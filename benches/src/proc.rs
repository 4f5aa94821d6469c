//! Child processes killed on drop, and following a console file as it grows.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// A child process, SIGKILLed and reaped on drop if still running (also when a
/// benchmark panics).
pub struct Guarded {
    child: Option<Child>,
}

impl Guarded {
    pub fn spawn(cmd: &mut Command) -> Result<Guarded, String> {
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot spawn {:?}: {e}", cmd.get_program()))?;
        Ok(Guarded { child: Some(child) })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// None while it runs.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let s = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(s)
    }

    pub fn wait_timeout(&mut self, t: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + t;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if self.child.is_none() || Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(pid) = self.pid() {
            // SAFETY: kill(2) on our own unreaped child: the pid cannot be reused yet.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            if let Some(s) = self.wait_timeout(grace) {
                return Some(s);
            }
        }
        self.kill();
        None
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` to completion with its output captured, killing it after `t`.
pub fn output_timeout(cmd: &mut Command, t: Duration) -> Result<Output, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot spawn {:?}: {e}", cmd.get_program()))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(t) {
        Ok(r) => {
            let _ = waiter.join();
            r.map_err(|e| format!("waiting for {:?}: {e}", cmd.get_program()))
        }
        Err(_) => {
            // SAFETY: the waiter thread owns the Child and has not reaped it (it would
            // have sent by now), so the pid is still our child's.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let _ = waiter.join();
            Err(format!(
                "{:?} did not finish within {t:?}",
                cmd.get_program()
            ))
        }
    }
}

/// Follows a console file: whole lines in order.
pub struct ConsoleFile {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    pub lines: Vec<String>,
}

impl ConsoleFile {
    pub fn new(path: &Path) -> ConsoleFile {
        ConsoleFile {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
            lines: Vec::new(),
        }
    }

    /// Reads what was appended; returns how many new lines arrived.
    pub fn poll(&mut self) -> usize {
        let before = self.lines.len();
        let Ok(mut f) = File::open(&self.path) else {
            return 0;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return 0;
        }
        let mut buf = Vec::new();
        if let Ok(n) = f.read_to_end(&mut buf) {
            self.offset += n as u64;
            self.partial.extend_from_slice(&buf);
        }
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            self.lines
                .push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
        }
        self.lines.len() - before
    }

    /// Polls every `every` until a line starting with `prefix` arrives (returns it) or
    /// `alive` says the writer is gone or `timeout` passes.
    pub fn wait_prefix(
        &mut self,
        prefix: &str,
        every: Duration,
        timeout: Duration,
        mut alive: impl FnMut() -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        let mut seen = 0;
        loop {
            self.poll();
            if let Some(l) = self.lines[seen..].iter().find(|l| l.starts_with(prefix)) {
                return Ok(l.clone());
            }
            seen = self.lines.len();
            if !alive() {
                self.poll();
                if let Some(l) = self.lines.iter().find(|l| l.starts_with(prefix)) {
                    return Ok(l.clone());
                }
                return Err(format!(
                    "the VM ended before a {prefix:?} line; console tail:\n{}",
                    self.tail(10)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no {prefix:?} line within {timeout:?}; console tail:\n{}",
                    self.tail(10)
                ));
            }
            std::thread::sleep(every);
        }
    }

    pub fn tail(&self, n: usize) -> String {
        self.lines[self.lines.len().saturating_sub(n)..].join("\n")
    }
}

/// The value of `key=` in a console line such as `B write bytes=1 ns=2`.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}
