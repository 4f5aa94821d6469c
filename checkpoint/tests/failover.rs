//! FT mode end to end in one process, on real KVM: a primary VMM running the test guest
//! (counter + dirty + disk) protected by the checkpoint drivers over two loopback
//! A-Links to a standby driver; the primary is "killed" at a random moment (its driver
//! stops, its links are dropped, its VM stopped without releasing held output); the
//! standby fails over onto its own console file and disk image and runs on.
//!
//! Checked per run: the console stream outside (the primary's positioned console file up
//! to where the standby took over, then the standby's) has no gap, duplicate or
//! reordering of `C` lines and never disagrees where both wrote; no `DIRTY-ERROR`; every
//! disk record reported with a `W` line is intact on the
//! standby's image; the guest made progress after the failover.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use alink::{Alink, AlinkConfig, LinkAddrs, WindowLimits};
use checkpoint::primary::{run_primary, PrimaryDriverConfig, PrimaryReport};
use checkpoint::protocol::{PrimaryConfig, StandbyConfig};
use checkpoint::standby::{run_standby, FailoverReport, StandbyOutcome};
use twinrun_guest_abi as abi;
use vmm::config::{ConsoleConfig, DiskConfig, IoEngine, Payload, VmConfig, Workloads};
use vmm::{build_vm, Vmm};

const SECRET: &[u8] = b"failover-test-cluster-secret";
const DISK_BYTES: u64 = 8 << 20;

mod support;
use support::{guest_elf, Cleanup};

fn temp(run: u32, tag: &str) -> PathBuf {
    support::temp("failover", &format!("{run}-{tag}"))
}

fn config(console: &Path, disk: &Path) -> VmConfig {
    VmConfig {
        mem_mib: 64,
        vcpus: 1,
        payload: Payload::TestGuest {
            elf: guest_elf(),
            workloads: Workloads {
                counter: true,
                counter_rate: 500,
                dirty: true,
                dirty_pages: 512,
                dirty_rate: 20_000,
                disk: true,
                disk_rate: 200,
                disk_flush_every: 1,
                ..Workloads::default()
            },
        },
        disks: vec![DiskConfig {
            path: disk.to_owned(),
            read_only: false,
            io_engine: IoEngine::default(),
            serial: Some("ftdisk".into()),
        }],
        nets: vec![],
        console: ConsoleConfig::File {
            path: console.to_owned(),
        },
    }
}

fn fast(mut c: AlinkConfig) -> AlinkConfig {
    // Detection in about half a second: quick enough for many runs per test, slow
    // enough that a CI machine running the whole suite on 2 cores does not starve the
    // heartbeat threads into a false "link down" (80 ms did, during initial sync).
    c.health.interval = Duration::from_millis(50);
    c.health.misses = 10;
    c.window = WindowLimits {
        max_msgs: 1024,
        max_bytes: 128 << 20,
    };
    c
}

/// The kill moments vary per run, and a failing seed can be replayed.
use twinrun_lab::Rng;

struct RunResult {
    primary: PrimaryReport,
    failover: FailoverReport,
    c_lines: u64,
    c_after_failover: u64,
    w_checked: u64,
}

/// A TCP forwarder standing in for one A-Link's path: `cut` kills its connections and
/// refuses new ones (a pulled cable).
struct Proxy {
    addr: std::net::SocketAddr,
    cut: Arc<AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl Proxy {
    fn start(to: std::net::SocketAddr) -> Proxy {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c2, k2) = (cut.clone(), conns.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(a) = s else { return };
                if c2.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let Ok(b) = std::net::TcpStream::connect(to) else {
                    continue;
                };
                let mut k = k2.lock().unwrap();
                k.push(a.try_clone().unwrap());
                k.push(b.try_clone().unwrap());
                for (mut r, mut w) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut r, &mut w);
                        let _ = w.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { addr, cut, conns }
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn one_run(run: u32, kill_after: Duration, cut_one_link: bool) -> RunResult {
    let pcon = temp(run, "primary-console.log");
    let scon = temp(run, "standby-console.log");
    let pdisk = temp(run, "primary.img");
    let sdisk = temp(run, "standby.img");
    let _c = Cleanup(vec![
        pcon.clone(),
        scon.clone(),
        pdisk.clone(),
        sdisk.clone(),
    ]);
    for f in [&pcon, &scon] {
        let _ = std::fs::remove_file(f);
    }
    std::fs::File::create(&pdisk)
        .unwrap()
        .set_len(DISK_BYTES)
        .unwrap();
    // The standby's image starts as a copy of the primary's (the initial disk copy is
    // the storage issue's).
    std::fs::copy(&pdisk, &sdisk).unwrap();
    let pcfg = config(&pcon, &pdisk);
    let scfg = config(&scon, &sdisk);

    // Standby accepts (node 2), primary dials (node 1); two links.
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    let slinks = vec![
        LinkAddrs {
            local: any,
            remote: any,
        };
        2
    ];
    let slink = Alink::start(fast(AlinkConfig::new(9, 2, 1, SECRET, slinks))).unwrap();
    // Link 1 goes through a proxy that can cut it.
    let proxy = Proxy::start(slink.local_addrs()[1]);
    let plinks = vec![
        LinkAddrs {
            local: any,
            remote: slink.local_addrs()[0],
        },
        LinkAddrs {
            local: any,
            remote: proxy.addr,
        },
    ];
    let plink = Alink::start(fast(AlinkConfig::new(9, 1, 2, SECRET, plinks))).unwrap();

    let sstop = Arc::new(AtomicBool::new(false));
    let standby = {
        let sstop = sstop.clone();
        std::thread::spawn(move || {
            let out = run_standby(&slink, &scfg, StandbyConfig { max_staged: 4 }, &sstop);
            (out, slink)
        })
    };

    let mut pvmm: Vmm = build_vm(&pcfg).unwrap();
    assert_eq!(pvmm.set_console_positioned(None).unwrap(), Some(0));
    pvmm.start().unwrap();
    let pstop = Arc::new(AtomicBool::new(false));
    let pvmm = Arc::new(pvmm);
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let primary = {
        let (pstop, pvmm, acked) = (pstop.clone(), pvmm.clone(), acked.clone());
        std::thread::spawn(move || {
            let cfg = PrimaryDriverConfig {
                protocol: PrimaryConfig {
                    epoch_len: Duration::from_millis(5),
                    min_epoch: Duration::from_millis(1),
                    max_in_flight: 4,
                    coalesce_bytes: PrimaryConfig::default().coalesce_bytes,
                    sync_max_rounds: 4,
                    sync_small_pages: 256,
                },
                connect_timeout: Duration::from_secs(10),
                // Small parts: epochs span several messages, so a kill can cut one.
                max_part_pages: Some(64),
                acked: Some(acked),
                verify: None,
                ..PrimaryDriverConfig::default()
            };
            let r = run_primary(&pvmm, &plink, &cfg, &pstop);
            (r, plink)
        })
    };

    // Random kill moments count from the first acknowledged epoch: a primary killed
    // before anything was protected has nothing to fail over to (a separate case, which
    // the state machines' simulation covers), and on a loaded machine the initial sync
    // alone can take longer than the shortest kill delay.
    let protected_by = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < protected_by,
            "run {run}: no epoch acknowledged within 60 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    if cut_one_link {
        std::thread::sleep(kill_after / 2);
        let before = acked.load(Ordering::SeqCst);
        assert!(before > 0, "not protected before the cut");
        proxy.cut();
        std::thread::sleep(kill_after / 2);
        let after = acked.load(Ordering::SeqCst);
        eprintln!("run {run}: link 1 cut with {before} epochs acknowledged; {after} at the kill");
        // 5 ms epochs: well over a hundred per second while protection continues.
        assert!(
            after > before + 50,
            "protection stalled after losing one of two links: {before} -> {after}"
        );
    } else {
        std::thread::sleep(kill_after);
    }
    // The primary dies: its driver stops wherever it is, its links go (messages still
    // queued in its window are lost), its VM stops without releasing held output.
    pstop.store(true, Ordering::SeqCst);
    let (preport, plink) = primary.join().unwrap();
    drop(plink);
    let preport = preport.unwrap();
    pvmm.stopper().stop();
    let mut pvmm = Arc::try_unwrap(pvmm).unwrap_or_else(|_| panic!("primary VMM still shared"));
    pvmm.wait();
    drop(pvmm);
    assert!(
        !preport.simplex,
        "the primary lost its standby before the kill"
    );
    assert!(
        preport.epochs_acked > 0,
        "nothing was protected: {preport:?}"
    );

    let t_kill = Instant::now();
    let (outcome, slink) = standby.join().unwrap();
    let (mut svmm, freport) = match outcome.unwrap() {
        StandbyOutcome::FailedOver(v, r) => (v, r),
        StandbyOutcome::NoReplica => panic!("no replica"),
        StandbyOutcome::Stopped { .. } => panic!("standby stopped"),
        StandbyOutcome::PrimaryBack { .. } => panic!("primary back"),
    };
    let detect = t_kill.elapsed();
    // Let the resumed guest run on.
    std::thread::sleep(Duration::from_millis(600));
    svmm.stopper().stop();
    svmm.wait();
    drop(svmm);
    drop(slink);
    sstop.store(true, Ordering::SeqCst);

    // The console outside: the primary's released bytes, then the standby's from the
    // first position it wrote.
    let p = std::fs::read(&pcon).unwrap();
    let s = std::fs::read(&scon).unwrap();
    let from = freport
        .rereleased_from
        .or(freport.console_next)
        .expect("standby console position") as usize;
    assert!(
        p.len() >= from,
        "gap: primary released {} bytes, standby starts at {from}",
        p.len()
    );
    let overlap = p.len().min(s.len());
    assert_eq!(
        &p[from..overlap],
        &s[from..overlap],
        "primary and standby disagree on console bytes they both released"
    );
    assert!(s.len() > p.len(), "the standby's guest printed nothing new");
    let mut merged = p[..from].to_vec();
    merged.extend_from_slice(&s[from..]);
    assert!(!merged.contains(&0), "a hole in the console stream");
    let text = String::from_utf8(merged).unwrap();
    assert!(text.ends_with('\n') || !text.is_empty());

    // Lines: BOOT once; C strictly consecutive; no DIRTY-ERROR/PANIC/DISK-ERROR.
    let mut next_c = 1u64;
    let mut boots = 0;
    let mut w_seqs = Vec::new();
    let protected_from = preport.protected_from_console.unwrap_or(0) as usize;
    let mut at = 0usize;
    let mut c_at_takeover = 0;
    let mut w_protected = 0u64;
    for line in text.split_inclusive('\n') {
        let start = at;
        at += line.len();
        let l = line.trim_end_matches('\n');
        if !line.ends_with('\n') {
            continue; // the line the stopped guest was writing
        }
        assert!(!l.starts_with("DIRTY-ERROR"), "{l}");
        assert!(!l.starts_with("PANIC"), "{l}");
        assert!(!l.starts_with("DISK-ERROR"), "{l}");
        if l.starts_with("BOOT") {
            boots += 1;
        } else if let Some(n) = l.strip_prefix("C ") {
            let n: u64 = n.parse().unwrap_or_else(|_| panic!("bad line {l:?}"));
            assert_eq!(n, next_c, "C line out of sequence at byte {start}");
            next_c += 1;
            if start < from {
                c_at_takeover = n;
            }
        } else if let Some(n) = l.strip_prefix("W ") {
            let n: u64 = n.parse().unwrap_or_else(|_| panic!("bad line {l:?}"));
            // Records written before epoch 0 reach the standby with epoch 0 (the
            // written-block map since start); later ones with their epoch's journal.
            w_seqs.push(n);
            if start >= protected_from {
                w_protected += 1;
            }
        }
    }
    assert_eq!(boots, 1, "the guest booted twice?");
    let c_lines = next_c - 1;
    assert!(
        c_lines > c_at_takeover,
        "no counter progress after failover"
    );

    // Every record reported durable is intact on the standby's image.
    let img = std::fs::read(&sdisk).unwrap();
    assert!(w_protected > 0, "no disk record reported under protection");
    for &seq in &w_seqs {
        let off = ((abi::DISK_FIRST_SECTOR + seq - 1) * 512) as usize;
        let sec = &img[off..off + 512];
        let magic = u64::from_le_bytes(sec[0..8].try_into().unwrap());
        let got_seq = u64::from_le_bytes(sec[8..16].try_into().unwrap());
        let sum = u64::from_le_bytes(sec[16..24].try_into().unwrap());
        assert_eq!(magic, abi::DISK_RECORD_MAGIC, "record {seq}: bad magic");
        assert_eq!(got_seq, seq, "record {seq}: wrong sequence");
        let mut z = sec.to_vec();
        z[16..24].fill(0);
        assert_eq!(abi::fnv1a64(&z), sum, "record {seq}: bad checksum");
        for (i, b) in sec.iter().enumerate().skip(24) {
            assert_eq!(
                *b,
                (seq as u8).wrapping_add(i as u8),
                "record {seq}: byte {i}"
            );
        }
    }
    eprintln!(
        "run {run}: kill after {kill_after:?}: {} epochs captured, {} acked, pause p50 {:?}; \
         failover from epoch {} (primary released through {:?}), {} bytes re-released, \
         detected+failed over in {detect:?} (restore {:?}); C lines {c_lines} ({c_at_takeover} \
         before takeover), W records checked {}",
        preport.epochs_captured,
        preport.epochs_acked,
        preport.pauses.get(preport.pauses.len() / 2),
        freport.last_committed,
        freport.released_through,
        freport.rereleased_bytes,
        freport.failover_time,
        w_seqs.len(),
    );
    RunResult {
        primary: preport,
        failover: freport,
        c_lines,
        c_after_failover: c_lines - c_at_takeover,
        w_checked: w_seqs.len() as u64,
    }
}

#[test]
fn primary_killed_at_random_moments_standby_takes_over_without_loss() {
    let _ = env_logger::builder().is_test(true).try_init();
    let seed = twinrun_lab::rng::seed_from_env("FAILOVER_SEED");
    let runs: u32 = std::env::var("FAILOVER_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    eprintln!("FAILOVER_SEED={seed}");
    let mut rng = Rng(seed);
    let mut total_epochs = 0;
    let mut rereleases = 0;
    for run in 0..runs {
        let kill_after = Duration::from_millis(1200 + rng.next() % 2000);
        let r = one_run(run, kill_after, false);
        total_epochs += r.primary.epochs_captured;
        rereleases += u64::from(r.failover.rereleased_bytes > 0);
        assert!(r.c_lines > 0 && r.c_after_failover > 0 && r.w_checked > 0);
    }
    eprintln!("{runs} runs, {total_epochs} epochs, {rereleases} failovers re-released output");
}

#[test]
fn losing_one_of_two_links_keeps_protection_then_failover_is_clean() {
    let _ = env_logger::builder().is_test(true).try_init();
    let r = one_run(100, Duration::from_millis(2400), true);
    assert!(!r.primary.simplex);
    assert!(r.c_after_failover > 0 && r.w_checked > 0);
}
