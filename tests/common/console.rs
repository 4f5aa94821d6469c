//! Reading the guest's console file as it grows.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Follows a console file: returns whole lines in order, waiting for them to appear.
pub struct ConsoleLog {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    /// Every complete line read so far.
    pub seen: Vec<String>,
    /// Index in `seen` of the first line `wait_for`/`next_line` has not consumed.
    cursor: usize,
}

impl ConsoleLog {
    pub fn new(path: &Path) -> Self {
        ConsoleLog {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
            seen: Vec::new(),
            cursor: 0,
        }
    }

    /// Reads whatever was appended since the last call; returns the new whole lines.
    pub fn poll(&mut self) -> Vec<String> {
        let mut new = Vec::new();
        let Ok(mut f) = File::open(&self.path) else {
            return new;
        };
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return new;
        }
        let mut buf = Vec::new();
        if let Ok(n) = f.read_to_end(&mut buf) {
            self.offset += n as u64;
            self.partial.extend_from_slice(&buf);
        }
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            let line = String::from_utf8_lossy(&line[..line.len() - 1])
                .trim_end_matches('\r')
                .to_string();
            self.seen.push(line.clone());
            new.push(line);
        }
        new
    }

    /// The next line, waiting up to `timeout`.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        self.wait_for(timeout, |_| true).ok()
    }

    /// Waits until a line for which `pred` holds arrives; returns it (consuming it and
    /// every line before it), or an error message listing the tail of what arrived.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.seen[self.cursor..].iter().position(|l| pred(l)) {
                let line = self.seen[self.cursor + i].clone();
                self.cursor += i + 1;
                return Ok(line);
            }
            let checked = self.seen.len();
            self.cursor = checked;
            if Instant::now() >= deadline {
                return Err(format!(
                    "no matching console line within {timeout:?}; last lines of {}:\n{}",
                    self.path.display(),
                    self.tail(20)
                ));
            }
            self.poll();
            if self.seen.len() == checked {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// The last `n` lines seen, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let from = self.seen.len().saturating_sub(n);
        self.seen[from..].join("\n")
    }
}
