#![no_main]
//! virtio-blk request parsing and execution on fuzzed rings, against a small image.

use std::fs::File;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmm::config::IoEngine;
use vmm::devices::virtio::block::Block;
use vmm_fuzz::{run_queue, VERSION_1};

fn image() -> &'static File {
    static IMG: OnceLock<File> = OnceLock::new();
    IMG.get_or_init(|| {
        let p = std::env::temp_dir().join(format!("twinrun-fuzz-blk-{}.img", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        f.set_len(64 * 512).unwrap();
        // Unlinked: the open descriptor keeps it; nothing is left behind.
        let _ = std::fs::remove_file(&p);
        f
    })
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    // The top bit of the first byte picks the engine and read-only flag.
    let engine = if data[0] & 0x80 != 0 {
        IoEngine::IoUring
    } else {
        IoEngine::Sync
    };
    let ro = data[0] & 0x40 != 0;
    let file = image().try_clone().unwrap();
    let Ok(dev) = Block::with_file(file, "fuzz", ro, engine, "fuzz-serial") else {
        return;
    };
    let _ = run_queue(data, Box::new(dev), VERSION_1 | (1 << 9), 0);
});
