#![no_main]
//! Arbitrary register accesses (any offset, width, value) to a virtio-mmio transport
//! with a console behind it; the tail of the input is guest memory.

use libfuzzer_sys::fuzz_target;
use vmm::config::ConsoleConfig;
use vmm::devices::bus::BusDevice;
use vmm::devices::virtio::console::sink::ConsoleSink;
use vmm::devices::virtio::console::Console;
use vmm::devices::virtio::mmio::MmioTransport;

fuzz_target!(|data: &[u8]| {
    let Ok(sink) = ConsoleSink::new(&ConsoleConfig::File {
        path: "/dev/null".into(),
    }) else {
        return;
    };
    // First 512 bytes: up to 64 accesses of 8 bytes; the rest: guest memory.
    let (ops, memdata) = data.split_at(data.len().min(512));
    let mem = vmm_fuzz::memory(memdata);
    let Ok(mut t) = MmioTransport::new(mem, Box::new(Console::new(sink))) else {
        return;
    };
    for op in ops.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([op[0], op[1]]) & 0x1ff);
        let len = [1usize, 2, 4, 8][usize::from(op[2] & 3)];
        let write = op[2] & 4 != 0;
        let mut v = [0u8; 8];
        v[..5].copy_from_slice(&op[3..8]);
        if write {
            t.write(0, offset, &v[..len]);
        } else {
            t.read(0, offset, &mut v[..len]);
        }
    }
});
