//! The persistent dirty bitmap: one bit per block (4 KiB by default) of a disk, set for
//! every block that may differ from the peer's replica.
//!
//! Crash-safety rule (as DRBD's activity log): a bit is durably set BEFORE the data
//! write it covers is issued. [`DirtyBitmap::mark_bytes`] therefore writes the touched
//! pages of the file and fdatasyncs before returning, and does no I/O at all when every
//! bit was already set (the hot path: a memory check, no allocation). Cleared bits are
//! persisted lazily: a crash may bring a cleared bit back (an extra block resynced),
//! never lose a set one (a block missed).
//!
//! File layout (little endian): a 4 KiB header page — magic `TWRNBMAP`, version,
//! block size (u32), blocks (u64), disk size (u64), CRC32C of those 32 bytes, zeros —
//! then the bitmap as u64 words, bit `b % 64` of word `b / 64` for block `b`. Bits past
//! the last block are always zero. The file is written in 4 KiB pages of words, so a
//! page write never splits a word.
//!
//! I/O: this module owns the file; everything else about it is in memory.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::BlockSet;

pub const BITMAP_VERSION: u32 = 1;
/// Explicit bound: 2^32 blocks (16 TiB at 4 KiB) is a 512 MiB bitmap in memory.
pub const MAX_BLOCKS: u64 = 1 << 32;

const MAGIC: [u8; 8] = *b"TWRNBMAP";
const HEADER_LEN: u64 = 4096;
const HEADER_USED: usize = 36;
const PAGE: usize = 4096;
const WORDS_PER_PAGE: usize = PAGE / 8;
/// Bulk writes (set_all, clear_all, create) go in chunks of this many bytes.
const BULK: usize = 16 * PAGE;

#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    #[error("dirty bitmap {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("dirty bitmap {path}: damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("dirty bitmap {path}: file is {found} bytes, expected {expected}")]
    Truncated {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error(
        "dirty bitmap {path}: made for {found_disk_size} B in {found_block_size} B blocks, \
         the disk is {disk_size} B in {block_size} B blocks"
    )]
    Geometry {
        path: PathBuf,
        disk_size: u64,
        block_size: u32,
        found_disk_size: u64,
        found_block_size: u32,
    },
    #[error("dirty bitmap: invalid geometry: {0}")]
    BadGeometry(String),
    #[error("dirty bitmap: range {offset}+{len} is not within the disk ({disk_size} B)")]
    OutOfRange {
        offset: u64,
        len: u64,
        disk_size: u64,
    },
    #[error("dirty bitmap: block range {first}+{n} is not within {blocks} blocks")]
    BlocksOutOfRange { first: u64, n: u64, blocks: u64 },
    #[error("dirty bitmap: peer bitmap has {found} words, expected {expected}")]
    WordCount { expected: usize, found: usize },
}

pub struct DirtyBitmap {
    file: File,
    path: PathBuf,
    disk_size: u64,
    block_size: u32,
    blocks: u64,
    words: Vec<u64>,
    /// Set bits, kept incrementally.
    count: u64,
    /// Word pages holding set bits not yet known durable (written + fdatasync'd).
    /// While non-empty, mark_bytes never takes the no-I/O path: a failed write or sync
    /// must be retried before a write covered by those bits may be issued.
    pending_sets: Vec<usize>,
    /// Word pages whose clears were not written yet (a failed lazy write).
    pending_clears: Vec<usize>,
    scratch: Vec<u8>,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("path", &self.path)
            .field("blocks", &self.blocks)
            .field("block_size", &self.block_size)
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

fn blocks_for(disk_size: u64, block_size: u32) -> Result<u64, BitmapError> {
    if block_size == 0 || !block_size.is_power_of_two() {
        return Err(BitmapError::BadGeometry(format!(
            "block size {block_size} is not a power of two"
        )));
    }
    if disk_size == 0 {
        return Err(BitmapError::BadGeometry("disk size is 0".into()));
    }
    let blocks = disk_size.div_ceil(u64::from(block_size));
    if blocks > MAX_BLOCKS {
        return Err(BitmapError::BadGeometry(format!(
            "{blocks} blocks exceed the limit of {MAX_BLOCKS}"
        )));
    }
    Ok(blocks)
}

fn header(disk_size: u64, block_size: u32, blocks: u64) -> [u8; PAGE] {
    let mut h = [0u8; PAGE];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&BITMAP_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&block_size.to_le_bytes());
    h[16..24].copy_from_slice(&blocks.to_le_bytes());
    h[24..32].copy_from_slice(&disk_size.to_le_bytes());
    let crc = crc32c::crc32c(&h[..32]);
    h[32..36].copy_from_slice(&crc.to_le_bytes());
    h
}

fn sorted_insert(v: &mut Vec<usize>, page: usize) {
    if let Err(i) = v.binary_search(&page) {
        v.insert(i, page);
    }
}

/// Calls `f(word index, mask)` for each word the blocks `first..=last` touch.
#[inline]
fn for_each_word(first: u64, last: u64, mut f: impl FnMut(usize, u64)) {
    debug_assert!(first <= last);
    let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
    for w in fw..=lw {
        let lo = if w == fw { first % 64 } else { 0 };
        let hi = if w == lw { last % 64 } else { 63 };
        let mask = (u64::MAX >> (63 - hi)) & (u64::MAX << lo);
        f(w, mask);
    }
}

impl DirtyBitmap {
    /// Opens the bitmap of a disk of `disk_size` bytes in `block_size` blocks, creating
    /// it all clear if missing. A file made for another geometry, with a damaged header
    /// or of the wrong length is refused with a typed error (the caller falls back to a
    /// full resync: the bits are unknown).
    pub fn open(path: &Path, disk_size: u64, block_size: u32) -> Result<DirtyBitmap, BitmapError> {
        let blocks = blocks_for(disk_size, block_size)?;
        let n_words = blocks.div_ceil(64) as usize;
        let expected_len = HEADER_LEN + n_words as u64 * 8;
        let io = |op: &'static str| {
            move |source| BitmapError::Io {
                path: path.to_path_buf(),
                op,
                source,
            }
        };
        let file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create(path, disk_size, block_size, blocks, expected_len)?;
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(io("open"))?
            }
            Err(e) => return Err(io("open")(e)),
        };
        let found_len = file.metadata().map_err(io("stat"))?.len();
        let damaged = |reason: String| BitmapError::Damaged {
            path: path.to_path_buf(),
            reason,
        };
        if found_len < HEADER_USED as u64 {
            return Err(BitmapError::Truncated {
                path: path.to_path_buf(),
                expected: expected_len,
                found: found_len,
            });
        }
        let mut h = [0u8; HEADER_USED];
        file.read_exact_at(&mut h, 0).map_err(io("read header"))?;
        if h[0..8] != MAGIC {
            return Err(damaged("bad magic".into()));
        }
        let crc = u32::from_le_bytes([h[32], h[33], h[34], h[35]]);
        if crc != crc32c::crc32c(&h[..32]) {
            return Err(damaged("header crc mismatch".into()));
        }
        let version = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if version != BITMAP_VERSION {
            return Err(damaged(format!(
                "format version {version}, expected {BITMAP_VERSION}"
            )));
        }
        let found_bs = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        let found_blocks = crate::apply_journal::le_u64(&h[16..24]);
        let found_size = crate::apply_journal::le_u64(&h[24..32]);
        if (found_bs, found_size) != (block_size, disk_size) {
            return Err(BitmapError::Geometry {
                path: path.to_path_buf(),
                disk_size,
                block_size,
                found_disk_size: found_size,
                found_block_size: found_bs,
            });
        }
        if found_blocks != blocks {
            return Err(damaged(format!(
                "header says {found_blocks} blocks, geometry gives {blocks}"
            )));
        }
        if found_len != expected_len {
            return Err(BitmapError::Truncated {
                path: path.to_path_buf(),
                expected: expected_len,
                found: found_len,
            });
        }
        let mut words = vec![0u64; n_words];
        let mut scratch = vec![0u8; BULK];
        for (i, chunk) in words.chunks_mut(BULK / 8).enumerate() {
            let bytes = &mut scratch[..chunk.len() * 8];
            file.read_exact_at(bytes, HEADER_LEN + (i * BULK) as u64)
                .map_err(io("read words"))?;
            for (w, b) in chunk.iter_mut().zip(bytes.chunks_exact(8)) {
                *w = crate::apply_journal::le_u64(b);
            }
        }
        let tail = blocks % 64;
        if tail != 0 && words[n_words - 1] >> tail != 0 {
            return Err(damaged("bits set past the last block".into()));
        }
        let count = words.iter().map(|w| u64::from(w.count_ones())).sum();
        Ok(DirtyBitmap {
            file,
            path: path.to_path_buf(),
            disk_size,
            block_size,
            blocks,
            words,
            count,
            pending_sets: Vec::new(),
            pending_clears: Vec::new(),
            scratch,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Set bits (O(1)).
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Block range of a byte range; None for an empty range. Checks bounds.
    fn block_span(&self, offset: u64, len: u64) -> Result<Option<(u64, u64)>, BitmapError> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.disk_size) {
            return Err(BitmapError::OutOfRange {
                offset,
                len,
                disk_size: self.disk_size,
            });
        }
        if len == 0 {
            return Ok(None);
        }
        let bs = u64::from(self.block_size);
        Ok(Some((offset / bs, (offset + len - 1) / bs)))
    }

    /// Marks the blocks of the byte ranges `(offset, len)` dirty and makes the bits
    /// durable before returning: only then may the covered data writes be issued.
    /// Returns the bits newly set. One fdatasync for the whole batch; none at all (and
    /// no allocation) when every bit was already set and durable.
    pub fn mark_bytes(&mut self, ranges: &[(u64, u64)]) -> Result<u64, BitmapError> {
        // Pass 1: bounds, and whether anything is to do (the hot path ends here).
        let mut all_set = true;
        for &(offset, len) in ranges {
            if let Some((first, last)) = self.block_span(offset, len)? {
                if all_set {
                    let words = &self.words;
                    for_each_word(first, last, |w, mask| all_set &= words[w] & mask == mask);
                }
            }
        }
        if all_set && self.pending_sets.is_empty() {
            return Ok(0);
        }
        // Pass 2: set in memory, remember the pages, write and sync them.
        let mut newly = 0;
        for &(offset, len) in ranges {
            if let Some((first, last)) = self.block_span(offset, len)? {
                newly += self.set_span(first, last);
            }
        }
        self.persist_sets()?;
        Ok(newly)
    }

    fn set_span(&mut self, first: u64, last: u64) -> u64 {
        let mut newly = 0;
        let (words, pending) = (&mut self.words, &mut self.pending_sets);
        for_each_word(first, last, |w, mask| {
            let new = mask & !words[w];
            if new != 0 {
                words[w] |= new;
                newly += u64::from(new.count_ones());
                sorted_insert(pending, w / WORDS_PER_PAGE);
            }
        });
        self.count += newly;
        debug_assert!(self.count <= self.blocks);
        newly
    }

    /// Writes every page with not-yet-durable set bits and fdatasyncs. The pages stay
    /// pending until the sync succeeds, so a failed attempt is fully redone next time.
    fn persist_sets(&mut self) -> Result<(), BitmapError> {
        for i in 0..self.pending_sets.len() {
            let page = self.pending_sets[i];
            self.write_page(page)?;
        }
        self.sync()?;
        self.pending_sets.clear();
        Ok(())
    }

    fn sync(&self) -> Result<(), BitmapError> {
        self.file.sync_data().map_err(|source| BitmapError::Io {
            path: self.path.clone(),
            op: "fdatasync",
            source,
        })
    }

    fn write_page(&mut self, page: usize) -> Result<(), BitmapError> {
        let first = page * WORDS_PER_PAGE;
        let n = WORDS_PER_PAGE.min(self.words.len() - first);
        self.write_words(first, n)
    }

    /// Writes words `first..first + n` (n at most BULK / 8) at their file position.
    fn write_words(&mut self, first: usize, n: usize) -> Result<(), BitmapError> {
        assert!(n * 8 <= self.scratch.len());
        let bytes = &mut self.scratch[..n * 8];
        for (b, w) in bytes.chunks_exact_mut(8).zip(&self.words[first..first + n]) {
            b.copy_from_slice(&w.to_le_bytes());
        }
        self.file
            .write_all_at(bytes, HEADER_LEN + first as u64 * 8)
            .map_err(|source| BitmapError::Io {
                path: self.path.clone(),
                op: "write words",
                source,
            })
    }

    /// Writes all words and fdatasyncs (after a bulk change).
    fn write_all_durable(&mut self) -> Result<(), BitmapError> {
        let total = self.words.len();
        let mut first = 0;
        while first < total {
            let n = (BULK / 8).min(total - first);
            self.write_words(first, n)?;
            first += n;
        }
        self.sync()
    }

    fn tail_mask(&self) -> u64 {
        match self.blocks % 64 {
            0 => u64::MAX,
            t => (1u64 << t) - 1,
        }
    }

    /// Every block dirty, durably (a full resync expressed as a bitmap).
    pub fn set_all(&mut self) -> Result<(), BitmapError> {
        let tail = self.tail_mask();
        self.words.fill(u64::MAX);
        if let Some(last) = self.words.last_mut() {
            *last = tail;
        }
        self.count = self.blocks;
        // Every page is about to be written: if that fails, all of them are pending.
        self.pending_sets = (0..self.words.len().div_ceil(WORDS_PER_PAGE)).collect();
        self.write_all_durable()?;
        self.pending_sets.clear();
        self.pending_clears.clear();
        Ok(())
    }

    /// Every block clean, durably (both replicas are known identical).
    pub fn clear_all(&mut self) -> Result<(), BitmapError> {
        self.words.fill(0);
        self.count = 0;
        self.pending_sets.clear();
        self.pending_clears = (0..self.words.len().div_ceil(WORDS_PER_PAGE)).collect();
        self.write_all_durable()?;
        self.pending_clears.clear();
        Ok(())
    }

    /// Clears blocks `first..first + n` (copied to the peer) in memory and writes the
    /// touched pages, without a sync: a cleared bit lost in a crash costs one extra block
    /// of resync. A failed write is retried by the next flush.
    pub fn clear_blocks(&mut self, first: u64, n: u64) -> Result<(), BitmapError> {
        if first.checked_add(n).is_none_or(|e| e > self.blocks) {
            return Err(BitmapError::BlocksOutOfRange {
                first,
                n,
                blocks: self.blocks,
            });
        }
        if n == 0 {
            return Ok(());
        }
        let mut cleared = 0;
        let (words, pending) = (&mut self.words, &mut self.pending_clears);
        for_each_word(first, first + n - 1, |w, mask| {
            let gone = words[w] & mask;
            if gone != 0 {
                words[w] &= !mask;
                cleared += u64::from(gone.count_ones());
                sorted_insert(pending, w / WORDS_PER_PAGE);
            }
        });
        self.count -= cleared;
        self.write_pending_clears()
    }

    fn write_pending_clears(&mut self) -> Result<(), BitmapError> {
        while let Some(&page) = self.pending_clears.first() {
            self.write_page(page)?;
            self.pending_clears.remove(0);
        }
        Ok(())
    }

    /// Writes whatever is pending and fdatasyncs: after it every change is durable.
    pub fn flush(&mut self) -> Result<(), BitmapError> {
        self.write_pending_clears()?;
        self.persist_sets()
    }

    /// Runs of set blocks `(first block, count)` at or after `from`, in disk order.
    pub fn runs_from(&self, from: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut pos = from;
        std::iter::from_fn(move || {
            let start = self.next_set(pos)?;
            let end = self.next_clear(start).unwrap_or(self.blocks);
            pos = end;
            Some((start, end - start))
        })
    }

    /// The first clear block at or after `from`.
    fn next_clear(&self, from: u64) -> Option<u64> {
        if from >= self.blocks {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut bits = !self.words[w] & (u64::MAX << (from % 64));
        loop {
            if bits != 0 {
                let b = w as u64 * 64 + u64::from(bits.trailing_zeros());
                return (b < self.blocks).then_some(b);
            }
            w += 1;
            if w == self.words.len() {
                return None;
            }
            bits = !self.words[w];
        }
    }

    /// ORs in a peer's bitmap of the same geometry and makes the result durable.
    /// Returns the bits newly set here.
    pub fn merge_words(&mut self, peer: &[u64]) -> Result<u64, BitmapError> {
        if peer.len() != self.words.len() {
            return Err(BitmapError::WordCount {
                expected: self.words.len(),
                found: peer.len(),
            });
        }
        let tail = self.tail_mask();
        let last = self.words.len() - 1;
        let mut newly = 0;
        for (i, (w, &p)) in self.words.iter_mut().zip(peer).enumerate() {
            // A peer's stray bits past the end are not blocks: drop them.
            let p = if i == last { p & tail } else { p };
            let new = p & !*w;
            if new != 0 {
                *w |= new;
                newly += u64::from(new.count_ones());
                sorted_insert(&mut self.pending_sets, i / WORDS_PER_PAGE);
            }
        }
        self.count += newly;
        debug_assert!(self.count <= self.blocks);
        if !self.pending_sets.is_empty() {
            self.persist_sets()?;
        }
        Ok(newly)
    }
}

/// Creates an all-clear bitmap file crash-safely: written beside, synced, renamed.
fn create(
    path: &Path,
    disk_size: u64,
    block_size: u32,
    blocks: u64,
    len: u64,
) -> Result<(), BitmapError> {
    let io = |op: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |source| BitmapError::Io {
            path: p,
            op,
            source,
        }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(io("create dir", &dir))?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    f.write_all_at(&header(disk_size, block_size, blocks), 0)
        .map_err(io("write header", &tmp))?;
    // The words start all zero: extending the file gives zeros without writing them.
    f.set_len(len).map_err(io("set length", &tmp))?;
    f.sync_all().map_err(io("fsync", &tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io("rename", path))?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync dir", &dir))
}

impl BlockSet for DirtyBitmap {
    fn blocks(&self) -> u64 {
        self.blocks
    }

    fn is_set(&self, block: u64) -> bool {
        block < self.blocks && self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.blocks {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut bits = self.words[w] & (u64::MAX << (from % 64));
        // Zero words are skipped a word (64 blocks) at a time.
        loop {
            if bits != 0 {
                return Some(w as u64 * 64 + u64::from(bits.trailing_zeros()));
            }
            w += 1;
            if w == self.words.len() {
                return None;
            }
            bits = self.words[w];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::tests::TempDir;

    const BS: u32 = 4096;

    fn reopen(b: &DirtyBitmap) -> DirtyBitmap {
        DirtyBitmap::open(b.path(), b.disk_size(), b.block_size()).unwrap()
    }

    fn set_blocks(b: &DirtyBitmap) -> Vec<u64> {
        (0..b.blocks()).filter(|&i| b.is_set(i)).collect()
    }

    #[test]
    fn create_all_clear_and_geometry() {
        let t = TempDir::new("bm-create");
        let p = t.0.join("sub/bitmap");
        // 100 blocks and a partial one.
        let b = DirtyBitmap::open(&p, 100 * 4096 + 1, BS).unwrap();
        assert_eq!(b.blocks(), 101);
        assert_eq!(b.block_size(), BS);
        assert_eq!(b.count(), 0);
        assert_eq!(b.words().len(), 2);
        assert_eq!(b.next_set(0), None);
        assert_eq!(
            fs::metadata(&p).unwrap().len(),
            HEADER_LEN + 16,
            "header page + 2 words"
        );
        assert!(!t.0.join("sub/bitmap.tmp").exists());
    }

    #[test]
    fn set_before_write_is_on_disk_when_mark_returns() {
        let t = TempDir::new("bm-mark");
        let p = t.0.join("bitmap");
        let mut b = DirtyBitmap::open(&p, 256 << 20, BS).unwrap();
        // Unaligned ranges: 100..5000 touches blocks 0 and 1; one byte at 8 MiB; a range
        // crossing a word and a page boundary.
        let far = 32768 * 4096 - 4096; // last block of the first word page
        let n = b
            .mark_bytes(&[(100, 4900), (8 << 20, 1), (far, 3 * 4096), (0, 0)])
            .unwrap();
        assert_eq!(n, 2 + 1 + 3);
        assert_eq!(b.count(), 6);
        // Reopen from disk without any flush: the bits are there.
        let r = reopen(&b);
        assert_eq!(r.words(), b.words());
        assert_eq!(r.count(), 6);
        assert_eq!(set_blocks(&r), vec![0, 1, 2048, 32767, 32768, 32769]);
        // Already set: nothing new, and no I/O (the file is not even touched: replace
        // its contents behind the bitmap's back and see they stay so).
        let before = fs::read(&p).unwrap();
        fs::write(&p, vec![0u8; before.len()]).unwrap();
        assert_eq!(b.mark_bytes(&[(0, 8192), (8 << 20, 4096)]).unwrap(), 0);
        assert_eq!(fs::read(&p).unwrap(), vec![0u8; before.len()]);
        fs::write(&p, &before).unwrap();
    }

    #[test]
    fn out_of_range_marks_nothing() {
        let t = TempDir::new("bm-oor");
        let mut b = DirtyBitmap::open(&t.0.join("bitmap"), 10 * 4096, BS).unwrap();
        let e = b.mark_bytes(&[(0, 4096), (9 * 4096, 4097)]).unwrap_err();
        assert!(matches!(e, BitmapError::OutOfRange { .. }), "{e}");
        assert_eq!(b.count(), 0, "a refused batch sets no bit");
        assert!(b.mark_bytes(&[(u64::MAX, 2)]).is_err());
        assert!(b.clear_blocks(9, 2).is_err());
        assert_eq!(b.mark_bytes(&[(10 * 4096 - 1, 1)]).unwrap(), 1);
    }

    #[test]
    fn clear_is_lazy_but_written_and_flush_makes_it_durable() {
        let t = TempDir::new("bm-clear");
        let mut b = DirtyBitmap::open(&t.0.join("bitmap"), 1000 * 4096, BS).unwrap();
        b.mark_bytes(&[(0, 200 * 4096)]).unwrap();
        assert_eq!(b.count(), 200);
        b.clear_blocks(10, 100).unwrap();
        assert_eq!(b.count(), 100);
        assert_eq!(b.runs_from(0).collect::<Vec<_>>(), vec![(0, 10), (110, 90)]);
        // The clear was written (page cache): a reopen sees it.
        assert_eq!(reopen(&b).count(), 100);
        b.flush().unwrap();
        let r = reopen(&b);
        assert_eq!(r.words(), b.words());
        // Clearing clear blocks changes nothing.
        b.clear_blocks(10, 100).unwrap();
        assert_eq!(b.count(), 100);
    }

    #[test]
    fn runs_and_next_set_walk_in_disk_order() {
        let t = TempDir::new("bm-runs");
        let blocks = 70_000u64; // more than two word pages
        let mut b = DirtyBitmap::open(&t.0.join("bitmap"), blocks * 4096, BS).unwrap();
        let ranges = [(5u64, 1u64), (63, 2), (128, 64), (40_000, 1), (69_990, 10)];
        let bytes: Vec<(u64, u64)> = ranges.iter().map(|&(f, n)| (f * 4096, n * 4096)).collect();
        assert_eq!(b.mark_bytes(&bytes).unwrap(), 1 + 2 + 64 + 1 + 10);
        assert_eq!(b.runs_from(0).collect::<Vec<_>>(), ranges.to_vec());
        // Starting inside a run yields its rest.
        assert_eq!(b.runs_from(150).next(), Some((150, 42)));
        assert_eq!(b.runs_from(69_995).collect::<Vec<_>>(), vec![(69_995, 5)]);
        assert_eq!(b.runs_from(blocks).next(), None);
        assert_eq!(b.next_set(6), Some(63));
        assert_eq!(b.next_set(192), Some(40_000));
        assert_eq!(b.next_set(40_001), Some(69_990));
        assert!(b.is_set(69_999) && !b.is_set(70_000) && !b.is_set(u64::MAX));
    }

    #[test]
    fn set_all_clear_all_are_durable_and_respect_the_tail() {
        let t = TempDir::new("bm-all");
        let mut b = DirtyBitmap::open(&t.0.join("bitmap"), 130 * 4096, BS).unwrap();
        b.set_all().unwrap();
        assert_eq!(b.count(), 130);
        assert_eq!(b.runs_from(0).collect::<Vec<_>>(), vec![(0, 130)]);
        let r = reopen(&b);
        assert_eq!(r.count(), 130);
        assert_eq!(r.words()[2], (1 << 2) - 1);
        b.clear_all().unwrap();
        assert_eq!(b.count(), 0);
        assert_eq!(reopen(&b).count(), 0);
    }

    #[test]
    fn merge_ors_in_the_peer_durably() {
        let t = TempDir::new("bm-merge");
        let mut a = DirtyBitmap::open(&t.0.join("a"), 200 * 4096, BS).unwrap();
        let mut b = DirtyBitmap::open(&t.0.join("b"), 200 * 4096, BS).unwrap();
        a.mark_bytes(&[(0, 10 * 4096)]).unwrap();
        b.mark_bytes(&[(5 * 4096, 10 * 4096), (199 * 4096, 4096)])
            .unwrap();
        let mut peer = b.words().to_vec();
        peer[3] |= 1 << 63; // past block 200: ignored
        assert_eq!(a.merge_words(&peer).unwrap(), 5 + 1);
        assert_eq!(a.count(), 16);
        assert_eq!(a.runs_from(0).collect::<Vec<_>>(), vec![(0, 15), (199, 1)]);
        assert_eq!(reopen(&a).words(), a.words());
        assert_eq!(a.merge_words(&peer).unwrap(), 0);
        assert!(matches!(
            a.merge_words(&peer[..2]),
            Err(BitmapError::WordCount { .. })
        ));
    }

    #[test]
    fn damaged_truncated_and_foreign_files_are_refused() {
        let t = TempDir::new("bm-bad");
        let p = t.0.join("bitmap");
        let size = 1000 * 4096;
        let mut b = DirtyBitmap::open(&p, size, BS).unwrap();
        b.mark_bytes(&[(0, 4096)]).unwrap();
        drop(b);
        let good = fs::read(&p).unwrap();

        let e = DirtyBitmap::open(&p, size * 2, BS).unwrap_err();
        assert!(matches!(e, BitmapError::Geometry { .. }), "{e}");
        let e = DirtyBitmap::open(&p, size, 512).unwrap_err();
        assert!(matches!(e, BitmapError::Geometry { .. }), "{e}");

        fs::write(&p, &good[..good.len() - 8]).unwrap();
        let e = DirtyBitmap::open(&p, size, BS).unwrap_err();
        assert!(matches!(e, BitmapError::Truncated { .. }), "{e}");
        fs::write(&p, &good[..10]).unwrap();
        let e = DirtyBitmap::open(&p, size, BS).unwrap_err();
        assert!(matches!(e, BitmapError::Truncated { .. }), "{e}");

        for i in 0..HEADER_USED {
            let mut bad = good.clone();
            bad[i] ^= 1;
            fs::write(&p, &bad).unwrap();
            let e = DirtyBitmap::open(&p, size, BS).unwrap_err();
            assert!(matches!(e, BitmapError::Damaged { .. }), "byte {i}: {e}");
        }

        let mut bad = good.clone();
        let last = bad.len() - 1;
        bad[last] = 0x80; // a bit past block 999
        fs::write(&p, &bad).unwrap();
        assert!(matches!(
            DirtyBitmap::open(&p, size, BS),
            Err(BitmapError::Damaged { .. })
        ));

        fs::write(&p, &good).unwrap();
        assert_eq!(DirtyBitmap::open(&p, size, BS).unwrap().count(), 1);
        assert!(matches!(
            DirtyBitmap::open(&p, 0, BS),
            Err(BitmapError::BadGeometry(_))
        ));
        assert!(matches!(
            DirtyBitmap::open(&p, size, 3000),
            Err(BitmapError::BadGeometry(_))
        ));
    }

    #[test]
    fn failed_persist_is_retried_before_the_fast_path() {
        let t = TempDir::new("bm-retry");
        let p = t.0.join("bitmap");
        let mut b = DirtyBitmap::open(&p, 100 * 4096, BS).unwrap();
        // Simulate a write failure: swap the file for a read-only handle.
        let good = std::mem::replace(&mut b.file, File::open(&p).unwrap());
        assert!(b.mark_bytes(&[(0, 4096)]).is_err());
        assert_eq!(b.count(), 1, "set in memory");
        assert!(!b.pending_sets.is_empty());
        b.file = good;
        // The same range again: bits already set in memory, but not durable yet, so
        // this call must write them.
        assert_eq!(b.mark_bytes(&[(0, 4096)]).unwrap(), 0);
        assert!(b.pending_sets.is_empty());
        assert_eq!(reopen(&b).count(), 1);
    }
}
