//! What the demo checks after the run: the console stream outside (one positioned file
//! written by the primary and then the standby) and the standby's disk image.

use twinrun_guest_abi as abi;

/// Findings in the console stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConsoleCheck {
    /// Complete lines.
    pub records: u64,
    /// `C` lines and the last counter value.
    pub counter_lines: u64,
    pub counter_last: u64,
    /// Missing counter values plus holes (NUL runs: bytes nobody wrote).
    pub gaps: u64,
    /// Counter values seen again or out of order.
    pub duplicates: u64,
    pub boots: u64,
    pub dirty_errors: u64,
    pub panics: u64,
    pub disk_errors: u64,
    /// Sequence numbers of `W` lines (records reported durable).
    pub w_seqs: Vec<u64>,
}

pub fn check_console(bytes: &[u8]) -> ConsoleCheck {
    let mut c = ConsoleCheck::default();
    let mut in_hole = false;
    for &b in bytes {
        if b == 0 && !in_hole {
            c.gaps += 1;
        }
        in_hole = b == 0;
    }
    let text = String::from_utf8_lossy(bytes);
    for line in text.split_inclusive('\n') {
        if !line.ends_with('\n') {
            continue; // the line being written when the VM stopped
        }
        let l = line.trim_end_matches('\n');
        c.records += 1;
        if l.starts_with("BOOT") {
            c.boots += 1;
        } else if l.starts_with("DIRTY-ERROR") {
            c.dirty_errors += 1;
        } else if l.starts_with("PANIC") {
            c.panics += 1;
        } else if l.starts_with("DISK-ERROR") {
            c.disk_errors += 1;
        } else if let Some(n) = l.strip_prefix("C ").and_then(|n| n.parse::<u64>().ok()) {
            c.counter_lines += 1;
            if n <= c.counter_last {
                c.duplicates += 1;
            } else {
                c.gaps += n - c.counter_last - 1;
                c.counter_last = n;
            }
        } else if let Some(n) = l.strip_prefix("W ").and_then(|n| n.parse::<u64>().ok()) {
            c.w_seqs.push(n);
        }
    }
    c
}

/// Whether record `seq` is intact in `img` (magic, sequence, checksum, pattern).
pub fn record_ok(img: &[u8], seq: u64) -> bool {
    let Some(off) = (abi::DISK_FIRST_SECTOR + seq)
        .checked_sub(1)
        .and_then(|s| s.checked_mul(512))
    else {
        return false;
    };
    let off = off as usize;
    let Some(sec) = img.get(off..off + 512) else {
        return false;
    };
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&sec[i..i + 8]);
        u64::from_le_bytes(w)
    };
    if word(0) != abi::DISK_RECORD_MAGIC || word(8) != seq {
        return false;
    }
    let mut z = sec.to_vec();
    z[16..24].fill(0);
    abi::fnv1a64(&z) == word(16)
        && sec
            .iter()
            .enumerate()
            .skip(24)
            .all(|(i, b)| *b == (seq as u8).wrapping_add(i as u8))
}

/// Records reported with `W` that are not intact on the image.
pub fn records_lost(img: &[u8], seqs: &[u64]) -> u64 {
    seqs.iter().filter(|&&s| !record_ok(img, s)).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_gaps_duplicates_holes() {
        let c = check_console(b"BOOT x\nC 1\nC 2\nW 1\nC 3\nD pass=1\nC 4\nC 5");
        assert_eq!(
            (c.records, c.counter_last, c.gaps, c.duplicates),
            (7, 4, 0, 0)
        );
        assert_eq!(c.w_seqs, vec![1]);
        let c = check_console(b"BOOT x\nC 1\nC 3\nC 3\nC 2\nDIRTY-ERROR page=1\n");
        assert_eq!((c.gaps, c.duplicates, c.dirty_errors), (1, 2, 1));
        let c = check_console(b"C 1\n\0\0\0C 2\n");
        assert_eq!(c.gaps, 1);
    }

    fn record(seq: u64) -> Vec<u8> {
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

    #[test]
    fn disk_records() {
        let first = abi::DISK_FIRST_SECTOR as usize * 512;
        let mut img = vec![0u8; first + 4 * 512];
        for seq in 1..=3u64 {
            let o = first + (seq as usize - 1) * 512;
            img[o..o + 512].copy_from_slice(&record(seq));
        }
        assert_eq!(records_lost(&img, &[1, 2, 3]), 0);
        assert_eq!(records_lost(&img, &[4, 5]), 2);
        img[first + 512 + 100] ^= 1;
        assert_eq!(records_lost(&img, &[1, 2, 3]), 1);
    }
}
