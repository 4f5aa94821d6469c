#![no_main]
//! Replica metadata (`MetaStore::load`) from an arbitrary `meta` file: raw bytes, or a
//! well-formed frame (magic, version, length, CRC) around fuzzed postcard, so the body
//! decoder and the invariants behind the checksum are reached. Always a `MetaState`
//! (Missing, Damaged, Replaced or Ok), never an error for content, never a panic.

use libfuzzer_sys::fuzz_target;
use storage_mirror::meta::{MetaState, MetaStore, META_VERSION};
use storage_mirror_fuzz::{fresh, image, Input};

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let mode = inp.byte();
    let dir = fresh();
    let img = image(dir, "disk.img", 1 << 20);
    let store = MetaStore::for_image(&img);
    let bytes = if mode & 1 == 0 {
        inp.rest()
    } else {
        // Today's version, the old one still read, or any.
        let version = match mode & 0x0a {
            0 => META_VERSION,
            8 => 1,
            _ => inp.u32(),
        };
        let body = inp.rest();
        let mut f = Vec::new();
        f.extend_from_slice(b"TWRNMETA");
        f.extend_from_slice(&version.to_le_bytes());
        f.extend_from_slice(&(body.len() as u32).to_le_bytes());
        f.extend_from_slice(&body);
        let crc = crc32c::crc32c(&f);
        f.extend_from_slice(&crc.to_le_bytes());
        if mode & 4 != 0 && !f.is_empty() {
            let i = usize::from(mode) % f.len();
            f[i] ^= 0x10;
        }
        f
    };
    std::fs::create_dir_all(store.dir()).expect("meta dir");
    std::fs::write(store.meta_path(), &bytes).expect("meta file");
    match store.load().expect("content is never an I/O error") {
        MetaState::Ok(m) => assert!(m.validate().is_ok()),
        MetaState::Missing => panic!("the file is there"),
        MetaState::Damaged(_) | MetaState::Replaced { .. } => {}
    }
});
