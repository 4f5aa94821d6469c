//! The guest's console as the outside sees it: following a console file as it grows,
//! and checking the stream and the disk records against the formats of `guest/abi`
//! (`BOOT`, `C <n>`, `D ... errors=<n>`, `W <seq>`, the `DIRTY-ERROR` / `PANIC` /
//! `DISK-ERROR` lines, the 512-byte disk record).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use twinrun_guest_abi as abi;

/// Follows a console file: whole lines in order, waiting for them to appear.
#[derive(Debug)]
pub struct ConsoleLog {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    /// Every complete line read so far.
    pub seen: Vec<String>,
    /// Index in `seen` of the first line the waits have not consumed.
    cursor: usize,
    /// How often the waits look at the file.
    every: Duration,
}

impl ConsoleLog {
    pub fn new(path: &Path) -> Self {
        ConsoleLog {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
            seen: Vec::new(),
            cursor: 0,
            every: Duration::from_millis(20),
        }
    }

    /// The waits look at the file every `every` (default 20 ms; a benchmark timing a
    /// line's arrival looks more often).
    pub fn every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads what was appended since the last call; returns the new whole lines.
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
    /// every line before it), or an error listing the tail of what arrived.
    pub fn wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        self.wait_while(timeout, pred, || true)
    }

    /// [`ConsoleLog::wait_for`] that also gives up as soon as `alive` says the writer
    /// is gone (after one more look at the file).
    pub fn wait_while(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
        mut alive: impl FnMut() -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.seen[self.cursor..].iter().position(|l| pred(l)) {
                let line = self.seen[self.cursor + i].clone();
                self.cursor += i + 1;
                return Ok(line);
            }
            self.cursor = self.seen.len();
            let writing = alive();
            let checked = self.seen.len();
            self.poll();
            if self.seen.len() > checked {
                continue;
            }
            if !writing {
                return Err(format!(
                    "the writer of {} ended before a matching line; last lines:\n{}",
                    self.path.display(),
                    self.tail(20)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no matching console line within {timeout:?}; last lines of {}:\n{}",
                    self.path.display(),
                    self.tail(20)
                ));
            }
            std::thread::sleep(self.every);
        }
    }

    /// The last `n` lines seen.
    pub fn tail(&self, n: usize) -> String {
        let from = self.seen.len().saturating_sub(n);
        self.seen[from..].join("\n")
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// How many lines of `text` start with `prefix`.
pub fn count_prefix(text: &str, prefix: &str) -> usize {
    text.lines().filter(|l| l.starts_with(prefix)).count()
}

/// The number after `key=` in a line such as `B write bytes=1 ns=2`.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// The console file's bytes (empty while it does not exist).
pub fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_default()
}

/// Sequence numbers of the `W <seq>` lines (records the guest saw durable).
pub fn written_seqs(console: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(console)
        .lines()
        .filter_map(|l| l.strip_prefix("W ")?.trim().parse().ok())
        .collect()
}

/// Count of `C` lines (no checks).
pub fn count_c(console: &[u8]) -> u64 {
    console
        .split(|&b| b == b'\n')
        .filter(|l| l.starts_with(b"C "))
        .count() as u64
}

/// What the console stream held, up to its last complete line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleReport {
    /// Bytes up to the last complete line.
    pub bytes: usize,
    /// Complete lines.
    pub records: u64,
    pub boots: u64,
    /// `C` lines, and the highest counter value among them.
    pub c_lines: u64,
    pub counter_last: u64,
    /// Holes: runs of NUL bytes, a range of the positioned file nobody wrote.
    pub holes: u64,
    /// Counter values missing, plus holes.
    pub gaps: u64,
    /// Counter values seen again or out of order.
    pub duplicates: u64,
    /// `D` summaries, and those that do not end with `errors=0`.
    pub d_lines: u64,
    pub d_failed: u64,
    pub dirty_errors: u64,
    pub panics: u64,
    pub disk_errors: u64,
    /// `C` or `W` lines whose number does not parse.
    pub bad_lines: u64,
    /// Sequence numbers of the `W` lines.
    pub w_seqs: Vec<u64>,
    /// The first problem found, with its byte offset.
    pub first_problem: Option<String>,
}

impl ConsoleReport {
    /// The stream is whole: exactly one BOOT, no hole, counter lines 1, 2, 3, ... with
    /// no gap, duplicate or reordering, every `D` summary with `errors=0`, no
    /// `DIRTY-ERROR` / `PANIC` / `DISK-ERROR` line, every number readable.
    pub fn verdict(&self) -> Result<(), String> {
        if let Some(p) = &self.first_problem {
            return Err(p.clone());
        }
        if self.boots != 1 {
            return Err(format!("{} BOOT lines (expected exactly one)", self.boots));
        }
        Ok(())
    }
}

/// Reads the console stream (one positioned file the primary and then the standby
/// write): counts everything, notes the first problem.
pub fn analyze(bytes: &[u8]) -> ConsoleReport {
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut r = ConsoleReport {
        bytes: end,
        ..ConsoleReport::default()
    };
    let problem = |r: &mut ConsoleReport, at: usize, what: String| {
        if r.first_problem.is_none() {
            r.first_problem = Some(format!("at byte {at} of {end}: {what}"));
        }
    };
    let mut at = 0usize;
    for raw in bytes[..end].split_inclusive(|&b| b == b'\n') {
        let start = at;
        at += raw.len();
        r.records += 1;
        let mut line = &raw[..raw.len() - 1];
        // A hole (NUL run) ends where the next writer's bytes begin.
        let nul = line.iter().take_while(|&&b| b == 0).count();
        if nul > 0 || line.contains(&0) {
            r.holes += 1;
            r.gaps += 1;
            problem(
                &mut r,
                start,
                "a hole (NUL bytes) in the console stream".into(),
            );
            line = &line[nul..];
        }
        let l = String::from_utf8_lossy(line);
        let l = l.trim_end_matches('\r');
        if l.starts_with("BOOT") {
            r.boots += 1;
        } else if l.starts_with("DIRTY-ERROR") {
            r.dirty_errors += 1;
            problem(&mut r, start, l.to_string());
        } else if l.starts_with("PANIC") {
            r.panics += 1;
            problem(&mut r, start, l.to_string());
        } else if l.starts_with("DISK-ERROR") {
            r.disk_errors += 1;
            problem(&mut r, start, l.to_string());
        } else if l.starts_with("D ") {
            r.d_lines += 1;
            if !l.ends_with(" errors=0") {
                r.d_failed += 1;
                problem(&mut r, start, format!("dirty self-check failed: {l}"));
            }
        } else if let Some(n) = l.strip_prefix("C ") {
            let Ok(n) = n.parse::<u64>() else {
                r.bad_lines += 1;
                problem(&mut r, start, format!("bad C line {l:?}"));
                continue;
            };
            r.c_lines += 1;
            let last = r.counter_last;
            if n <= last {
                r.duplicates += 1;
                problem(
                    &mut r,
                    start,
                    format!("C {n} after C {last} (duplicate/reordered)"),
                );
            } else {
                if n != last + 1 {
                    r.gaps += n - last - 1;
                    problem(&mut r, start, format!("C {n} after C {last} (gap)"));
                }
                r.counter_last = n;
            }
        } else if let Some(n) = l.strip_prefix("W ") {
            match n.parse() {
                Ok(n) => r.w_seqs.push(n),
                Err(_) => {
                    r.bad_lines += 1;
                    problem(&mut r, start, format!("bad W line {l:?}"));
                }
            }
        }
    }
    r
}

/// [`analyze`] and [`ConsoleReport::verdict`]: the report of a whole stream, or what
/// is wrong with it.
pub fn check_console(bytes: &[u8]) -> Result<ConsoleReport, String> {
    let r = analyze(bytes);
    r.verdict()?;
    Ok(r)
}

/// What is wrong with record `seq` in disk image `img`, if anything (abi record
/// format: magic, sequence, FNV-1a 64 over the sector with the checksum zeroed, fill
/// pattern).
pub fn record_problem(img: &[u8], seq: u64) -> Option<String> {
    let off = (abi::DISK_FIRST_SECTOR + seq)
        .checked_sub(1)
        .and_then(|s| s.checked_mul(512))
        .and_then(|o| usize::try_from(o).ok());
    let Some(sec) = off.and_then(|o| img.get(o..o.checked_add(512)?)) else {
        return Some(format!("record {seq} lies beyond the image"));
    };
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&sec[i..i + 8]);
        u64::from_le_bytes(w)
    };
    if word(0) != abi::DISK_RECORD_MAGIC {
        return Some(format!("record {seq}: bad magic {:#x}", word(0)));
    }
    if word(8) != seq {
        return Some(format!("record {seq}: holds sequence {}", word(8)));
    }
    let mut z = sec.to_vec();
    z[16..24].fill(0);
    if abi::fnv1a64(&z) != word(16) {
        return Some(format!("record {seq}: bad checksum"));
    }
    sec.iter()
        .enumerate()
        .skip(24)
        .find(|(i, b)| **b != (seq as u8).wrapping_add(*i as u8))
        .map(|(i, b)| format!("record {seq}: byte {i} is {b:#x}"))
}

/// Every record in `seqs` is intact in `img`, or the first one that is not.
pub fn check_disk_records(img: &[u8], seqs: &[u64]) -> Result<(), String> {
    seqs.iter()
        .find_map(|&s| record_problem(img, s))
        .map_or(Ok(()), Err)
}

/// How many records in `seqs` are not intact in `img`.
pub fn records_lost(img: &[u8], seqs: &[u64]) -> u64 {
    seqs.iter()
        .filter(|&&s| record_problem(img, s).is_some())
        .count() as u64
}

/// A disk record as the guest writes it (for tests of the checks).
pub fn make_record(seq: u64) -> Vec<u8> {
    let mut s = vec![0u8; 512];
    s[0..8].copy_from_slice(&abi::DISK_RECORD_MAGIC.to_le_bytes());
    s[8..16].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in s.iter_mut().enumerate().skip(24) {
        *b = (seq as u8).wrapping_add(i as u8);
    }
    let sum = abi::fnv1a64(&s);
    s[16..24].copy_from_slice(&sum.to_le_bytes());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_gaps_duplicates_holes() {
        let c = analyze(b"BOOT x\nC 1\nC 2\nW 1\nC 3\nD pass=1 errors=0\nC 4\nC 5");
        assert_eq!(
            (c.records, c.counter_last, c.gaps, c.duplicates),
            (7, 4, 0, 0)
        );
        assert_eq!(c.w_seqs, vec![1]);
        assert_eq!(c.verdict(), Ok(()));
        let c = analyze(b"BOOT x\nC 1\nC 3\nC 3\nC 2\nDIRTY-ERROR page=1\n");
        assert_eq!((c.gaps, c.duplicates, c.dirty_errors), (1, 2, 1));
        assert!(c.verdict().unwrap_err().contains("C 3 after C 1 (gap)"));
        let c = analyze(b"C 1\n\0\0\0C 2\n");
        assert_eq!((c.gaps, c.holes, c.counter_last), (1, 1, 2));
        assert!(c.verdict().unwrap_err().contains("hole"));
    }

    #[test]
    fn strict_check() {
        assert!(
            check_console(b"BOOT a\nC 1\nD pass=1 errors=0\nW 3\nC 2\nC 3 partial")
                .is_ok_and(|r| r.c_lines == 2 && r.d_lines == 1 && r.w_seqs == [3])
        );
        for bad in [
            &b"C 1\n"[..],
            b"BOOT\nBOOT\n",
            b"BOOT\nD pass=1 errors=2\n",
            b"BOOT\nPANIC x\n",
            b"BOOT\nDISK-ERROR x\n",
            b"BOOT\nC one\n",
            b"BOOT\nW x\n",
        ] {
            assert!(
                check_console(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn disk_records() {
        let first = abi::DISK_FIRST_SECTOR as usize * 512;
        let mut img = vec![0u8; first + 4 * 512];
        for seq in 1..=3u64 {
            let o = first + (seq as usize - 1) * 512;
            img[o..o + 512].copy_from_slice(&make_record(seq));
        }
        assert_eq!(records_lost(&img, &[1, 2, 3]), 0);
        assert_eq!(check_disk_records(&img, &[1, 2, 3]), Ok(()));
        assert_eq!(records_lost(&img, &[4, 5]), 2);
        img[first + 512 + 100] ^= 1;
        assert_eq!(records_lost(&img, &[1, 2, 3]), 1);
        assert!(check_disk_records(&img, &[1, 2, 3])
            .unwrap_err()
            .contains("record 2"));
    }

    #[test]
    fn small_helpers() {
        assert_eq!(field("B write bytes=10 ns=20", "ns"), Some(20));
        assert_eq!(field("B write bytes=10", "ns"), None);
        assert_eq!(count_prefix("C 1\nD x\nC 2\n", "C "), 2);
        assert_eq!(count_c(b"C 1\nD x\nC 2\n"), 2);
        assert_eq!(written_seqs(b"W 1\nC 2\nW 7\n"), vec![1, 7]);
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
    }
}
