#![no_main]
//! The persistent dirty bitmap (`DirtyBitmap::open`) from an arbitrary file for a fuzzed
//! geometry: raw bytes, or a well-formed header (CRC right, fields fuzzed) and fuzzed
//! words, so the geometry, length and tail checks are reached. A bitmap that opens must
//! be self-consistent (count, runs, next_set) and take marks and clears within the disk.

use libfuzzer_sys::fuzz_target;
use storage_mirror::bitmap::DirtyBitmap;
use storage_mirror::BlockSet;
use storage_mirror_fuzz::{fresh, Input};

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mode = inp.byte();
    let block_size = 512u32 << (inp.byte() % 12);
    let disk_size = 1 + u64::from(inp.u32() % (16 << 20));
    let path = fresh().join("bitmap");
    let bytes = if mode & 1 == 0 {
        inp.rest()
    } else {
        let blocks = if mode & 2 == 0 {
            disk_size.div_ceil(u64::from(block_size))
        } else {
            inp.u64() % (1 << 20)
        };
        let (bs, size) = if mode & 4 == 0 {
            (block_size, disk_size)
        } else {
            (inp.u32(), inp.u64())
        };
        let mut h = vec![0u8; 4096];
        h[0..8].copy_from_slice(b"TWRNBMAP");
        h[8..12].copy_from_slice(&1u32.to_le_bytes());
        h[12..16].copy_from_slice(&bs.to_le_bytes());
        h[16..24].copy_from_slice(&blocks.to_le_bytes());
        h[24..32].copy_from_slice(&size.to_le_bytes());
        let crc = crc32c::crc32c(&h[..32]);
        h[32..36].copy_from_slice(&crc.to_le_bytes());
        let mut words = inp.rest();
        if mode & 8 == 0 {
            // The exact length the geometry asks for.
            words.resize(blocks.div_ceil(64) as usize * 8, 0);
        }
        h.extend_from_slice(&words);
        h
    };
    std::fs::write(&path, &bytes).expect("bitmap file");
    let Ok(mut b) = DirtyBitmap::open(&path, disk_size, block_size) else {
        return;
    };
    let blocks = b.blocks();
    let count = b.count();
    let ones: u64 = b.words().iter().map(|w| u64::from(w.count_ones())).sum();
    assert_eq!(count, ones);
    let runs: u64 = b.runs_from(0).map(|(_, n)| n).sum();
    assert_eq!(runs, count);
    if let Some(first) = b.next_set(0) {
        assert!(first < blocks && b.is_set(first));
    }
    b.mark_bytes(&[(0, 1), (disk_size - 1, 1)]).expect("mark");
    assert!(b.is_set(0) && b.is_set(blocks - 1));
    b.clear_blocks(0, blocks).expect("clear");
    b.flush().expect("flush");
    assert_eq!(b.count(), 0);
});
