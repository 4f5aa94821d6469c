//! A guest larger than 4 GiB is protected and fails over, on real KVM in one process.
//!
//! Three things this guards, each a bug or a cost that only shows with a big guest:
//! - an initial-sync round of a 6 GiB guest has 1,536 parts of 4 MiB; rounds used to be
//!   limited to the 272 parts of an epoch, so guests above 4.25 GiB were never protected;
//! - the guest's memory is almost all zero: zero pages travel as runs without data, so
//!   the sync sends a few hundred KiB, not 6 GiB;
//! - the failed-over VM runs in the standby's mirror memory: nothing is copied, so the
//!   standby runs the guest on (its console continues) within moments of the failover.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alink::{Alink, AlinkConfig, LinkAddrs};
use checkpoint::primary::{run_primary, PrimaryDriverConfig};
use checkpoint::protocol::StandbyConfig;
use checkpoint::standby::{run_standby, StandbyOutcome};
use vmm::build_vm;
use vmm::config::{ConsoleConfig, Payload, VmConfig, Workloads};

mod support;
use support::{guest_elf, Cleanup};

const SECRET: &[u8] = b"large-guest-test-cluster-secret";
const MEM_MIB: u64 = 6 << 10;

fn config(console: &Path) -> VmConfig {
    VmConfig {
        mem_mib: MEM_MIB,
        vcpus: 1,
        payload: Payload::TestGuest {
            elf: guest_elf(),
            workloads: Workloads {
                counter: true,
                counter_rate: 200,
                ..Workloads::default()
            },
        },
        disks: vec![],
        nets: vec![],
        console: ConsoleConfig::File {
            path: console.to_owned(),
        },
    }
}

fn link(node: u64, peer: u64, remote: std::net::SocketAddr) -> AlinkConfig {
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address literal");
    let mut c = AlinkConfig::new(
        11,
        node,
        peer,
        SECRET,
        vec![LinkAddrs { local: any, remote }],
    );
    c.health.interval = Duration::from_millis(50);
    c.health.misses = 10;
    c
}

/// The console stream seen outside: what the primary released (its file), continued by
/// what the standby wrote past it (both files are written at stream positions; where
/// they overlap they must agree).
fn outside_stream(pcon: &Path, scon: &Path) -> Vec<u8> {
    let p = std::fs::read(pcon).unwrap_or_default();
    let s = std::fs::read(scon).unwrap_or_default();
    // The standby rewrites committed output the primary may not have released, at the
    // same positions: it must be the same bytes (its file is sparse before them).
    for (i, (&a, &b)) in p.iter().zip(s.iter()).enumerate() {
        assert!(b == 0 || a == b, "consoles disagree at byte {i}");
    }
    let mut out = p.clone();
    if s.len() > p.len() {
        out.extend_from_slice(&s[p.len()..]);
    }
    out
}

/// The numbers of the complete `C n` lines.
fn c_lines(stream: &[u8]) -> Vec<u64> {
    String::from_utf8_lossy(stream)
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.strip_prefix("C ")?.trim().parse().ok())
        .collect()
}

#[test]
fn a_6_gib_guest_is_protected_and_fails_over_without_copying_its_memory() {
    let pcon = support::temp("large", "primary-console.log");
    let scon = support::temp("large", "standby-console.log");
    let _c = Cleanup(vec![pcon.clone(), scon.clone()]);
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().expect("address literal");
    let slink = Alink::start(link(2, 1, any)).unwrap();
    let plink = Alink::start(link(1, 2, slink.local_addrs()[0])).unwrap();
    let scfg = config(&scon);
    let sstop = Arc::new(AtomicBool::new(false));
    let standby = {
        let sstop = sstop.clone();
        std::thread::spawn(move || {
            let out = run_standby(&slink, &scfg, StandbyConfig { max_staged: 4 }, &sstop);
            (out, slink)
        })
    };
    let mut pvmm = build_vm(&config(&pcon)).unwrap();
    pvmm.set_console_positioned(None).unwrap();
    pvmm.start().unwrap();
    let pvmm = Arc::new(pvmm);
    let (pstop, acked) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
    );
    let primary = {
        let (pstop, pvmm, acked) = (pstop.clone(), pvmm.clone(), acked.clone());
        std::thread::spawn(move || {
            let cfg = PrimaryDriverConfig {
                acked: Some(acked),
                ..PrimaryDriverConfig::default()
            };
            let r = run_primary(&pvmm, &plink, &cfg, &pstop);
            (r, plink)
        })
    };
    let t0 = Instant::now();
    while acked.load(Ordering::SeqCst) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "a 6 GiB guest was not protected within 120 s"
        );
        assert!(!primary.is_finished(), "the primary driver stopped");
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("protected after {:?}", t0.elapsed());
    std::thread::sleep(Duration::from_millis(300));

    // Kill the primary: driver stopped where it is, link dropped, VM stopped.
    pstop.store(true, Ordering::SeqCst);
    let (report, plink) = primary.join().unwrap();
    drop(plink);
    pvmm.stopper().stop();
    let report = report.unwrap();
    let pages = MEM_MIB << 8;
    assert!(
        report.sync_zero_pages > pages * 9 / 10,
        "only {} of {pages} pages went as zero runs",
        report.sync_zero_pages
    );
    assert!(
        report.sync_bytes < 64 << 20,
        "the sync sent {} bytes for an idle guest",
        report.sync_bytes
    );

    let (out, slink) = standby.join().unwrap();
    drop(slink);
    let StandbyOutcome::FailedOver(mut vmm, fo) = out.unwrap() else {
        panic!("the standby did not fail over");
    };
    // The resumed guest goes on counting: the stream outside has every `C` line once,
    // in order, well past what the primary had released.
    let last = c_lines(&std::fs::read(&pcon).unwrap_or_default())
        .last()
        .copied()
        .unwrap_or(0);
    let t1 = Instant::now();
    let mut lines = Vec::new();
    while t1.elapsed() < Duration::from_secs(10) {
        lines = c_lines(&outside_stream(&pcon, &scon));
        if lines.last().is_some_and(|&n| n > last + 20) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    vmm.stopper().stop();
    vmm.wait();
    assert!(
        lines.last().is_some_and(|&n| n > last + 20),
        "the failed-over guest made no progress: the primary released up to C {last}, \
         the stream ends at {:?}",
        lines.last()
    );
    assert_eq!(lines.first(), Some(&1), "the stream starts at C 1");
    assert!(
        lines.windows(2).all(|w| w[1] == w[0] + 1),
        "gap, duplicate or reordering in the console stream"
    );
    eprintln!(
        "sync sent {} bytes, {} zero pages; failover from epoch {}",
        report.sync_bytes, report.sync_zero_pages, fo.last_committed
    );
    if let Ok(mut v) = Arc::try_unwrap(pvmm) {
        v.wait();
    }
}
