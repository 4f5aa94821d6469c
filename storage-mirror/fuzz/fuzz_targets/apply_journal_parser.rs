#![no_main]
//! The standby's apply journal recovery (`apply_journal::open`) from an arbitrary
//! journal and marker: raw bytes, or records built from the input with their CRC right
//! (entries fuzzed: disks, offsets, lengths), optionally cut or flipped. Recovery must
//! end in a typed error or a journal whose images took only writes inside them, never a
//! panic; a journal that opens takes a commit and opens again.

use std::fs::OpenOptions;

use libfuzzer_sys::fuzz_target;
use storage_mirror::apply_journal;
use storage_mirror_fuzz::{fresh, image, Input};

const RECORD_MAGIC: u32 = 0x4a41_5754;
const MARKER_MAGIC: u32 = 0x4d41_5754;

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let dir = fresh();
    let sizes = [
        u64::from(inp.u32() % (64 << 10)),
        u64::from(inp.u32() % (64 << 10)),
    ];
    let disks: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let p = image(dir, &format!("d{i}.img"), s);
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .expect("scratch disk")
        })
        .collect();
    let jdir = dir.join("journal");
    std::fs::create_dir_all(&jdir).expect("journal dir");
    let mut journal = Vec::new();
    let mut marker = None;
    while !inp.is_empty() {
        match inp.byte() % 4 {
            0 => {
                let n = usize::from(inp.byte());
                journal.extend(inp.bytes(n));
            }
            1 | 2 => {
                let count = inp.byte() % 8;
                let epoch = inp.u64() % 64;
                let mut payload = Vec::new();
                for _ in 0..count {
                    let disk = u16::from(inp.byte() % 3);
                    let len = inp.u32() % 1024;
                    let offset = inp.u64() % (72 << 10);
                    payload.extend_from_slice(&disk.to_le_bytes());
                    payload.extend_from_slice(&0u16.to_le_bytes());
                    payload.extend_from_slice(&len.to_le_bytes());
                    payload.extend_from_slice(&offset.to_le_bytes());
                    let mut d = inp.bytes(len as usize);
                    d.resize(len as usize, 0xa5);
                    payload.extend_from_slice(&d);
                }
                let mut rec = Vec::new();
                rec.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
                rec.extend_from_slice(&u32::from(count).to_le_bytes());
                rec.extend_from_slice(&epoch.to_le_bytes());
                rec.extend_from_slice(&(payload.len() as u64).to_le_bytes());
                rec.extend_from_slice(&[0u8; 8]);
                rec.extend_from_slice(&payload);
                let crc = crc32c::crc32c_append(crc32c::crc32c(&rec[..24]), &rec[32..]);
                rec[24..28].copy_from_slice(&crc.to_le_bytes());
                match inp.byte() % 8 {
                    0 => rec.truncate(usize::from(inp.byte()) % rec.len()),
                    1 => {
                        let i = usize::from(inp.byte()) % rec.len();
                        rec[i] ^= 0x04;
                    }
                    _ => {}
                }
                journal.extend_from_slice(&rec);
            }
            _ => {
                let mut b = vec![0u8; 20];
                b[0..4].copy_from_slice(&MARKER_MAGIC.to_le_bytes());
                b[8..16].copy_from_slice(&(inp.u64() % 64).to_le_bytes());
                let crc = crc32c::crc32c(&b[..16]);
                b[16..20].copy_from_slice(&crc.to_le_bytes());
                if inp.byte() % 4 == 0 {
                    b = inp.bytes(24);
                }
                marker = Some(b);
            }
        }
    }
    std::fs::write(jdir.join("apply.journal"), &journal).expect("journal file");
    if let Some(m) = &marker {
        std::fs::write(jdir.join("apply.marker"), m).expect("marker file");
    }
    let Ok((mut j, report)) = apply_journal::open(&jdir, &disks) else {
        return;
    };
    // The images never grew: every replayed write was inside them.
    for (d, &s) in disks.iter().zip(&sizes) {
        assert_eq!(d.metadata().expect("stat").len(), s);
    }
    assert!(report.torn_tail_bytes <= journal.len() as u64);
    let next = j.last_committed().map_or(0, |e| e + 1);
    if sizes[0] > 0 {
        j.commit(next, &[(0, 0, &[7u8][..])])
            .expect("commit after recovery");
    }
    drop(j);
    let (j, _) = apply_journal::open(&jdir, &disks).expect("reopen");
    if sizes[0] > 0 {
        assert_eq!(j.last_committed(), Some(next));
    }
});
