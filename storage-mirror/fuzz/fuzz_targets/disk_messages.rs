#![no_main]
//! The disk session's wire decoders (`storage_mirror::wire`) on arbitrary bytes, and the
//! standby's session machine fed whatever decodes. Input: byte 0 picks the direction,
//! bytes 1..3 the head length, then head and payload. A value or a typed error, never a
//! panic; what decodes encodes and decodes to itself.

use libfuzzer_sys::fuzz_target;
use storage_mirror::standby::session::StandbySessionConfig;
use storage_mirror::standby::{StandbyEvent, StandbySession};
use storage_mirror::wire::{decode_to_primary, decode_to_standby, encode};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if rest.len() < 2 {
        return;
    }
    let head_len = (usize::from(rest[0]) | usize::from(rest[1]) << 8).min(rest.len() - 2);
    let (head, payload) = rest[2..].split_at(head_len);
    if which & 1 == 0 {
        if let Ok(m) = decode_to_standby(head, payload) {
            let again = encode(&m).expect("encode");
            assert_eq!(decode_to_standby(&again, payload).expect("round trip"), m);
            let t = std::time::Instant::now();
            let mut s = StandbySession::new(StandbySessionConfig::default(), t);
            let _ = s.on_event(StandbyEvent::Hello, t);
            let _ = s.on_event(StandbyEvent::Msg(m), t);
            let _ = s.on_event(StandbyEvent::Idle, t);
        }
    } else if let Ok(m) = decode_to_primary(head, payload) {
        let again = encode(&m).expect("encode");
        assert_eq!(decode_to_primary(&again, payload).expect("round trip"), m);
        if let storage_mirror::wire::DiskToPrimary::Meta { disks } = &m {
            let words = storage_mirror::wire::bitmap_words(disks, payload);
            assert_eq!(words.len(), disks.len());
        }
    }
});
