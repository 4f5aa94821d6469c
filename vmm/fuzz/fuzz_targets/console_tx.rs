#![no_main]
//! virtio-console TX on fuzzed rings, output to /dev/null.

use libfuzzer_sys::fuzz_target;
use vmm::config::ConsoleConfig;
use vmm::devices::virtio::console::sink::ConsoleSink;
use vmm::devices::virtio::console::Console;
use vmm_fuzz::{run_queue, VERSION_1};

fuzz_target!(|data: &[u8]| {
    let Ok(sink) = ConsoleSink::new(&ConsoleConfig::File {
        path: "/dev/null".into(),
    }) else {
        return;
    };
    let q = if data.first().is_some_and(|b| b & 0x80 != 0) {
        0
    } else {
        1
    };
    let _ = run_queue(data, Box::new(Console::new(sink)), VERSION_1, q);
});
