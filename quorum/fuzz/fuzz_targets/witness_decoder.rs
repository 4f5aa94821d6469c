#![no_main]
//! The witness's datagram decoder and its whole server side (authentication, sessions,
//! the core's decisions) on arbitrary datagrams. Input: a list of datagrams, each
//! `len u8 | bytes`; op bit 0x80 of the length byte makes the next datagram a valid
//! authenticated request built from the fuzzed bytes (so the fuzzer reaches the code
//! behind the tag check).

use std::collections::HashMap;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use quorum::witness::core::{CoreLimits, WitnessCore};
use quorum::witness::ops::Request;
use quorum::witness::store::MemStore;
use quorum::witness::wire::{decode, ClientEvent, ClientWire, ServerWire, WireLimits, MAX_DATAGRAM};
use quorum::NodeId;

const SECRET: &[u8] = b"fuzz-secret-0123456";

fuzz_target!(|data: &[u8]| {
    let mut secrets = HashMap::new();
    secrets.insert("c".to_string(), SECRET.to_vec());
    let lim = WireLimits { max_sessions: 4, max_challenges: 4, ..WireLimits::default() };
    let mut srv = ServerWire::new(secrets, lim);
    let mut core = WitnessCore::new(CoreLimits { max_vms: 8, max_vms_per_cluster: 4 }, [], Duration::ZERO);
    let mut store = MemStore::default();
    let from = "127.0.0.1:1".parse().unwrap();
    // An authenticated client, so fuzzed requests can pass the tag check.
    let mut cl = ClientWire::new("c", NodeId(1), SECRET);
    let mut t = 0u64;
    let mut step = |b: &[u8], srv: &mut ServerWire, core: &mut WitnessCore, store: &mut MemStore| {
        t += 1;
        let (reply, _) = srv.handle(Duration::from_millis(t * 7), from, b, [t as u8; 32], core, store);
        if let Some(r) = &reply {
            assert!(r.len() <= MAX_DATAGRAM);
            assert!(decode(r).is_ok());
        }
        reply
    };
    let h = cl.hello([1; 32]);
    if let Some(ch) = step(&h, &mut srv, &mut core, &mut store) {
        if let Ok(ClientEvent::Send(a)) = cl.on_datagram(&ch) {
            if let Some(w) = step(&a, &mut srv, &mut core, &mut store) {
                let _ = cl.on_datagram(&w);
            }
        }
    }
    let mut rest = data;
    while let Some((&len, r)) = rest.split_first() {
        let take = usize::from(len & 0x7f).min(r.len());
        let (bytes, r) = r.split_at(take);
        rest = r;
        let _ = decode(bytes);
        if len & 0x80 != 0 {
            let vm = String::from_utf8_lossy(bytes.get(..bytes.len().min(8)).unwrap_or(&[])).into_owned();
            let n = bytes.first().copied().unwrap_or(0);
            let op = match n % 3 {
                0 => Request::Query { vm },
                1 => Request::Acquire { vm, node: NodeId(1), from: u64::from(n), lease_ms: u32::from(n) * 4 },
                _ => Request::Renew { vm, node: NodeId(1), generation: u64::from(n), lease_ms: 200, peer_outdated: n & 1 == 1 },
            };
            if let Some((_, b)) = cl.request(&op) {
                if let Some(r) = step(&b, &mut srv, &mut core, &mut store) {
                    let _ = cl.on_datagram(&r);
                }
            }
        } else {
            step(bytes, &mut srv, &mut core, &mut store);
        }
    }
    assert!(srv.session_count() <= 4);
    assert!(core.vm_count() <= 8);
});
