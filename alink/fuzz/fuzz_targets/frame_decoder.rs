#![no_main]
//! The A-Link frame decoder (and the handshake message parser behind it) on arbitrary
//! byte streams. Input layout: byte 0 picks the phase (handshake or session) and the read
//! chunk size; the rest is a list of ops, so the fuzzer also reaches the code behind the
//! tag check: 0 = raw bytes, 1 = a correctly tagged frame built from fuzzed fields with an
//! optional byte flip (exercising length limits, phases, sequence and body checksum); with
//! bit 6 set the frame is segmented (per-segment CRCs in a trailer, a fuzzed torn list,
//! a void frame when the payload is empty), decoded half the time by a decoder that
//! places payloads into a scratch buffer.

use alink::frame::{FrameDecoder, FrameEncoder, Kind, PlaceRequest, Placement, SegInfo};
use alink::handshake::{Handshake, HandshakeConfig, ReplayCache, Role, PROTOCOL_VERSION};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

const KEY: &[u8] = b"fuzz-session-key";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let session = mode & 1 != 0;
    let chunk = 1 + (mode >> 1) as usize * 7;
    let mut enc = FrameEncoder::new(1 << 16);
    let mut dec = FrameDecoder::new(1 << 16);
    // Placed payloads land in one scratch buffer (leaked once) the decoder writes
    // through raw pointers.
    static SCRATCH: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let scratch_ptr = *SCRATCH
        .get_or_init(|| Box::leak(vec![0u8; 1 << 16].into_boxed_slice()).as_mut_ptr() as usize);
    if mode & 0x80 != 0 {
        dec.set_placer(Box::new(move |r: &PlaceRequest<'_>| {
            (r.payload_len <= 1 << 16).then(|| {
                // SAFETY: the leaked scratch buffer lives for the process and only the
                // decoder of the input being run writes it.
                unsafe { Placement::new(vec![(scratch_ptr as *mut u8, r.payload_len)]) }
            })
        }));
    }
    if session {
        enc.set_session_key(KEY);
        dec.set_session_key(KEY);
    }
    let mut stream = Vec::new();
    while let Some((&op, r)) = rest.split_first() {
        rest = r;
        let len = rest.first().copied().unwrap_or(0) as usize;
        rest = rest.get(1..).unwrap_or(&[]);
        let take = len.min(rest.len());
        let (bytes, r) = rest.split_at(take);
        rest = r;
        if op & 1 == 0 {
            stream.extend_from_slice(bytes);
            continue;
        }
        let kind = match (op >> 1) & 3 {
            0 => Kind::Hello,
            1 => Kind::Auth,
            2 => Kind::Data,
            _ => Kind::Heartbeat,
        };
        let split = (op as usize >> 3) % (bytes.len() + 1);
        let frame = if op & 0x40 != 0 {
            let info = SegInfo {
                seg_size: 512 << (op >> 3 & 3),
                barrier_delta: u32::from(op),
                void: bytes.len() == split,
            };
            let payload = if info.void { &[][..] } else { &bytes[split..] };
            let torn: Vec<u32> = (0..(op >> 5 & 1) as u32).collect();
            enc.encode_segmented(len as u64, &bytes[..split], payload, info, &torn)
        } else {
            enc.encode(kind, len as u64, &bytes[..split], &bytes[split..])
        };
        if let Some(mut f) = frame {
            if op & 0x80 != 0 && !f.is_empty() {
                let i = len % f.len();
                f[i] ^= 0x41;
            }
            stream.extend_from_slice(&f);
        }
    }
    let cfg = HandshakeConfig {
        version: PROTOCOL_VERSION,
        cluster_id: 1,
        node_id: 2,
        peer_node_id: None,
        secret: b"fuzz-secret".to_vec(),
        timeout: Duration::from_secs(1),
    };
    let (mut hs, _) = Handshake::new(cfg, Role::Acceptor, [7; 32], Duration::ZERO);
    let mut cache = ReplayCache::new(4);
    for c in stream.chunks(chunk) {
        match dec.feed(c) {
            Ok(frames) => {
                for f in frames {
                    assert!(f.body.len() <= 1 << 16);
                    assert!(f.head().len() + f.payload().len() == f.body.len());
                    if !session {
                        let _ = hs.on_body(&f.body, Some(&mut cache));
                    }
                }
            }
            Err(_) => break,
        }
    }
});
