//! The disk workload's on-disk record format (see the abi crate docs) and the start-up
//! scan that finds how many records a disk holds.
//!
//! Sector layout of record `seq` (at sector `DISK_FIRST_SECTOR + seq - 1`):
//! bytes 0..8 magic `TWRNREC1`, 8..16 `seq`, 16..24 FNV-1a 64 checksum of the whole
//! sector computed with this field zeroed, all little endian; byte `i` for
//! `24 <= i < 512` is `fill_byte(seq, i)` = `(seq as u8).wrapping_add(i as u8)`.

use twinrun_guest_abi::{fnv1a64, DISK_FIRST_SECTOR, DISK_RECORD_MAGIC};

pub const SECTOR: usize = 512;
const HEADER: usize = 24;
const CSUM_AT: usize = 16;

/// Sectors examined after the valid prefix when counting corrupt records: the most a
/// single unflushed write batch can span.
pub const TAIL_WINDOW: u64 = 64;

/// The fill byte at offset `i` of record `seq`'s sector.
pub fn fill_byte(seq: u64, i: usize) -> u8 {
    (seq as u8).wrapping_add(i as u8)
}

/// The sector holding record `seq` (seq from 1).
pub fn sector_of(seq: u64) -> u64 {
    DISK_FIRST_SECTOR + seq - 1
}

/// Writes record `seq` into a 512-byte sector buffer.
pub fn encode(seq: u64, out: &mut [u8]) {
    let out = &mut out[..SECTOR];
    out[0..8].copy_from_slice(&DISK_RECORD_MAGIC.to_le_bytes());
    out[8..16].copy_from_slice(&seq.to_le_bytes());
    out[CSUM_AT..HEADER].fill(0);
    for (i, b) in out.iter_mut().enumerate().skip(HEADER) {
        *b = fill_byte(seq, i);
    }
    let sum = fnv1a64(out);
    out[CSUM_AT..HEADER].copy_from_slice(&sum.to_le_bytes());
}

/// What a sector holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sector {
    /// A well-formed record with this sequence number.
    Record(u64),
    /// All zero: never written.
    Empty,
    /// Anything else (torn or foreign data).
    Bad,
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Classifies one 512-byte sector.
pub fn classify(sector: &[u8]) -> Sector {
    let s = &sector[..SECTOR];
    if s.iter().all(|&b| b == 0) {
        return Sector::Empty;
    }
    if le64(&s[0..8]) != DISK_RECORD_MAGIC {
        return Sector::Bad;
    }
    let seq = le64(&s[8..16]);
    let stored = le64(&s[CSUM_AT..HEADER]);
    // Checksum with the checksum field zeroed, without copying the sector.
    let sum = fnv1a64_parts(&[&s[..CSUM_AT], &[0u8; 8], &s[HEADER..]]);
    if sum != stored || seq == 0 {
        return Sector::Bad;
    }
    if s[HEADER..]
        .iter()
        .enumerate()
        .any(|(k, &b)| b != fill_byte(seq, HEADER + k))
    {
        return Sector::Bad;
    }
    Sector::Record(seq)
}

fn fnv1a64_parts(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in p.iter() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Start-up scan: fed sectors in order from `DISK_FIRST_SECTOR`.
///
/// `recovered` counts the contiguous valid records 1..=n. After the first sector that
/// does not continue the sequence, the next [`TAIL_WINDOW`] sectors (including that
/// one) are examined and every non-empty one is counted as `corrupt` (a torn or
/// unacknowledged write after the durable prefix).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    pub recovered: u64,
    pub corrupt: u64,
    tail_seen: u64,
    in_tail: bool,
}

impl Scan {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next sector; returns false once the scan needs no more sectors.
    pub fn feed(&mut self, sector: &[u8]) -> bool {
        let kind = classify(sector);
        if !self.in_tail {
            if kind == Sector::Record(self.recovered + 1) {
                self.recovered += 1;
                return true;
            }
            self.in_tail = true;
        }
        if kind != Sector::Empty {
            self.corrupt += 1;
        }
        self.tail_seen += 1;
        self.tail_seen < TAIL_WINDOW
    }

    /// The sequence number to write next.
    pub fn next_seq(&self) -> u64 {
        self.recovered + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64) -> [u8; SECTOR] {
        let mut s = [0u8; SECTOR];
        encode(seq, &mut s);
        s
    }

    #[test]
    fn encode_matches_documented_layout() {
        let s = rec(0x1_0203);
        assert_eq!(&s[0..8], b"TWRNREC1");
        assert_eq!(u64::from_le_bytes(s[8..16].try_into().unwrap()), 0x1_0203);
        assert_eq!(s[24], 0x03u8.wrapping_add(24));
        assert_eq!(s[511], 0x03u8.wrapping_add(255));
        // The checksum is FNV-1a over the sector with the field zeroed.
        let mut z = s;
        z[16..24].fill(0);
        assert_eq!(
            u64::from_le_bytes(s[16..24].try_into().unwrap()),
            fnv1a64(&z)
        );
        assert_eq!(classify(&s), Sector::Record(0x1_0203));
    }

    #[test]
    fn damaged_sectors_are_bad() {
        assert_eq!(classify(&[0u8; SECTOR]), Sector::Empty);
        let mut s = rec(5);
        s[300] ^= 0x40;
        assert_eq!(classify(&s), Sector::Bad);
        let mut s = rec(5);
        s[9] = 1; // seq changed: checksum no longer matches
        assert_eq!(classify(&s), Sector::Bad);
        let mut s = rec(5);
        s[0] = b'X';
        assert_eq!(classify(&s), Sector::Bad);
        // A torn write: first half new record, second half zero.
        let mut s = rec(5);
        s[256..].fill(0);
        assert_eq!(classify(&s), Sector::Bad);
    }

    #[test]
    fn scan_counts_prefix_and_torn_tail() {
        let mut scan = Scan::new();
        for seq in 1..=10 {
            assert!(scan.feed(&rec(seq)));
        }
        let mut torn = rec(11);
        torn[100..].fill(0);
        assert!(scan.feed(&torn));
        let mut more = true;
        let mut fed = 1;
        while more {
            more = scan.feed(&[0u8; SECTOR]);
            fed += 1;
        }
        assert_eq!(fed, TAIL_WINDOW);
        assert_eq!(scan.recovered, 10);
        assert_eq!(scan.corrupt, 1);
        assert_eq!(scan.next_seq(), 11);
    }

    #[test]
    fn scan_of_empty_disk_and_out_of_order_records() {
        let mut scan = Scan::new();
        assert!(scan.feed(&[0u8; SECTOR]));
        assert_eq!(scan.recovered, 0);
        assert_eq!(scan.next_seq(), 1);

        // Record 2 where 1 should be: not part of the durable prefix.
        let mut scan = Scan::new();
        scan.feed(&rec(2));
        assert_eq!(scan.recovered, 0);
        assert_eq!(scan.corrupt, 1);
    }

    #[test]
    fn sectors_map_from_first_sector() {
        assert_eq!(sector_of(1), DISK_FIRST_SECTOR);
        assert_eq!(sector_of(10), DISK_FIRST_SECTOR + 9);
    }
}
