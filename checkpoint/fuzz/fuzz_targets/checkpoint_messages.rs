#![no_main]
//! The checkpoint wire decoders on arbitrary bytes: `decode_to_standby` (and the
//! standby's decode-once path, `decode_standbound`, walking every view of a part the way
//! the mirror does), `decode_to_primary`. Input layout: byte 0 picks the decoder and
//! bytes 1..3 the head length; the rest is head then payload. Every outcome must be a
//! value or a typed error: no panic, no unbounded allocation, and a part's views stay
//! inside its payload; the quorum generation a message carries (part heads, acks,
//! refusals) is read as the drivers read it.

use checkpoint::messages::{
    decode_standbound, decode_to_primary, decode_to_standby, PartView, Standbound, StandboundMsg,
};
use checkpoint::primary::inbox::screen;
use checkpoint::primary::FromStandby;
use libfuzzer_sys::fuzz_target;

/// Touches everything a part hands out (as the mirror's write and apply do).
fn walk(v: &PartView<'_>) -> u64 {
    let mut n = v.state.len() as u64 + v.console.len() as u64;
    for (gpa, data) in v.pages() {
        assert_eq!(data.len(), 4096);
        n = n.wrapping_add(gpa);
    }
    for gpa in v.zero_pages() {
        n = n.wrapping_add(gpa);
    }
    for (d, data) in v.disk_writes() {
        assert_eq!(data.len(), d.len as usize);
        n += data.len() as u64;
    }
    for (_, f) in v.frames() {
        n += f.len() as u64;
    }
    assert!(v.head.payload_len() >= n.min(v.head.payload_len()));
    n.wrapping_add(v.head.generation)
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if rest.len() < 2 {
        return;
    }
    let head_len = (usize::from(rest[0]) | usize::from(rest[1]) << 8).min(rest.len() - 2);
    let body = &rest[2..];
    let (head, payload) = body.split_at(head_len);
    match which % 3 {
        0 => {
            if let Ok(StandboundMsg::Part(v)) = decode_to_standby(head, payload) {
                walk(&v);
            }
        }
        1 => {
            if let Ok(Standbound::Part(p)) = decode_standbound(head_len, body.to_vec()) {
                walk(&p.view());
            }
        }
        _ => {
            // The fencing check the primary's receive side runs on every message (its
            // own generation from the selector byte, its node's parity from its low
            // bit: generations of that parity are its own and never fence it).
            if let Ok(m) = decode_to_primary(head, payload) {
                let own = u64::from(which / 3);
                let parity = own % 2;
                let mine = |g: u64| g != 0 && g % 2 == parity;
                match screen(&m, own, own, &mine) {
                    Some(FromStandby::Fenced { generation }) => {
                        assert!(generation > own && !mine(generation))
                    }
                    Some(FromStandby::Stale { generation }) => assert!(generation < own),
                    Some(_) => panic!("screen passed on something else than a refusal"),
                    None => assert!(
                        m.fences(own).is_none_or(mine) && m.stale(own).is_none()
                    ),
                }
            }
        }
    }
});
