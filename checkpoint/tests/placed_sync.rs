//! The initial sync's lent sends and placed receives on real KVM, under frame faults:
//! the primary's sync rounds send pages straight from guest memory over two loopback
//! links (A-Link protocol 4), the standby's A-Link reads them straight into its mirror,
//! and one of the links runs through a proxy that corrupts a frame, truncates one
//! mid-payload and duplicates one (one fault per connection, the first on a sync part).
//! The guest rewrites its working set all the time (`dirty` workload), so pages change
//! under their sends (torn) as well. Checked: at every committed epoch from epoch 0 on
//! the standby's mirror hashes the same as the primary did at that epoch's capture, so
//! no torn, lost or half-placed page was ever counted as synced; the faults really
//! happened and cost the link its connections.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use alink::{Alink, AlinkConfig, LinkAddrs, WindowLimits};
use checkpoint::primary::{run_primary, PrimaryDriverConfig};
use checkpoint::protocol::{PrimaryConfig, StandbyConfig};
use checkpoint::standby::{run_standby_with, StandbyDriverConfig, StandbyOutcome};
use checkpoint::verify::HashLog;
use vmm::build_vm;
use vmm::config::{ConsoleConfig, Payload, VmConfig, Workloads};

const SECRET: &[u8] = b"placed-sync-test-cluster-secret";
/// Committed epochs to check, at least.
const EPOCHS: u64 = 300;

mod support;
use support::{guest_elf, Cleanup};

fn temp(tag: &str) -> PathBuf {
    support::temp("placedsync", tag)
}

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// 256 MiB guest, `dirty` over 32,768 pages (128 MiB) at 200,000 pages/s.
fn dirty_config(console: &Path) -> VmConfig {
    VmConfig {
        mem_mib: 256,
        vcpus: 1,
        payload: Payload::TestGuest {
            elf: guest_elf(),
            workloads: Workloads {
                dirty: true,
                dirty_pages: 32768,
                dirty_rate: 200_000,
                dirty_seed: 11,
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

fn fast(mut c: AlinkConfig) -> AlinkConfig {
    c.health.interval = Duration::from_millis(20);
    c.health.misses = 25;
    c.window = WindowLimits {
        max_msgs: 1024,
        max_bytes: 128 << 20,
    };
    c
}

/// What the proxy does to the primary's byte stream, per connection (in order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Flip one byte in the middle of the `n`th frame with a payload.
    Corrupt(usize),
    /// Close the connection in the middle of the `n`th frame with a payload.
    Truncate(usize),
    /// Send the `n`th frame with a payload twice.
    Duplicate(usize),
    Pass,
}

/// Reads one whole frame (header, body, segment trailer) from `r`: its bytes, whether
/// it is a data frame with a payload, whether it is segmented.
fn read_frame(r: &mut impl Read) -> Option<(Vec<u8>, bool, bool)> {
    let mut hdr = [0u8; 56];
    r.read_exact(&mut hdr).ok()?;
    let flags = u16::from_le_bytes([hdr[6], hdr[7]]);
    let head_len = u32::from_le_bytes(hdr[24..28].try_into().unwrap()) as usize;
    let body_len = u32::from_le_bytes(hdr[28..32].try_into().unwrap()) as usize;
    let mut f = hdr.to_vec();
    let mut body = vec![0u8; body_len];
    r.read_exact(&mut body).ok()?;
    f.extend_from_slice(&body);
    let data = hdr[5] == 3;
    let segmented = flags & 1 != 0 && flags & 2 == 0;
    if segmented {
        let seg = 512usize << ((flags >> 4) & 0xf);
        let nseg = (body_len - head_len).div_ceil(seg);
        let mut fixed = vec![0u8; 4 * nseg + 4];
        r.read_exact(&mut fixed).ok()?;
        let torn = u32::from_le_bytes(fixed[4 * nseg..].try_into().unwrap()) as usize;
        f.extend_from_slice(&fixed);
        let mut rest = vec![0u8; 4 * torn + 4];
        r.read_exact(&mut rest).ok()?;
        f.extend_from_slice(&rest);
    }
    Some((f, data && body_len > head_len, segmented))
}

/// A proxy in front of `target`: its k-th accepted connection gets `faults[k]` on the
/// dialer-to-acceptor direction (then Pass); each fault done is recorded in `hits`
/// with whether it hit a segmented frame. Returns its address.
fn faulty_proxy(
    target: SocketAddr,
    faults: Vec<Fault>,
    hits: Arc<Mutex<Vec<(Fault, bool)>>>,
    stop: Arc<AtomicBool>,
) -> SocketAddr {
    let l = TcpListener::bind(any()).unwrap();
    let addr = l.local_addr().unwrap();
    l.set_nonblocking(true).unwrap();
    thread::spawn(move || {
        let mut k = 0;
        while !stop.load(Ordering::Relaxed) {
            let Ok((down, _)) = l.accept() else {
                thread::sleep(Duration::from_millis(5));
                continue;
            };
            down.set_nonblocking(false).unwrap();
            let Ok(up) = TcpStream::connect(target) else {
                continue;
            };
            let fault = faults.get(k).copied().unwrap_or(Fault::Pass);
            k += 1;
            let (mut a, mut b) = (up.try_clone().unwrap(), down.try_clone().unwrap());
            thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = a.read(&mut buf) {
                    if n == 0 || b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = b.shutdown(std::net::Shutdown::Both);
            });
            let (mut down, mut up, hits) = (down, up, hits.clone());
            thread::spawn(move || {
                let mut data = 0;
                while let Some((mut f, is_data, seg)) = read_frame(&mut down) {
                    if is_data {
                        data += 1;
                    }
                    let hit = is_data
                        && matches!(fault, Fault::Corrupt(n) | Fault::Truncate(n) | Fault::Duplicate(n) if n == data);
                    if hit {
                        hits.lock().unwrap().push((fault, seg));
                    }
                    let ok = match fault {
                        Fault::Corrupt(_) if hit => {
                            let at = 56 + (f.len() - 56) / 2;
                            f[at] ^= 0x10;
                            up.write_all(&f).is_ok()
                        }
                        Fault::Truncate(_) if hit => {
                            let _ = up.write_all(&f[..56 + (f.len() - 56) / 2]);
                            false
                        }
                        Fault::Duplicate(_) if hit => {
                            up.write_all(&f).is_ok() && up.write_all(&f).is_ok()
                        }
                        _ => up.write_all(&f).is_ok(),
                    };
                    if !ok {
                        break;
                    }
                }
                let _ = up.shutdown(std::net::Shutdown::Both);
                let _ = down.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    addr
}

#[test]
fn lent_and_placed_sync_under_frame_faults_keeps_the_replica_equal() {
    let _ = env_logger::builder().is_test(true).try_init();
    let pcon = temp("primary.log");
    let scon = temp("standby.log");
    let _c = Cleanup(vec![pcon.clone(), scon.clone()]);
    let pcfg = dirty_config(&pcon);
    let scfg = dirty_config(&scon);
    let stop_proxy = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(Mutex::new(Vec::new()));

    let slink = Alink::start(fast(AlinkConfig::new(
        12,
        2,
        1,
        SECRET,
        vec![
            LinkAddrs {
                local: any(),
                remote: any(),
            },
            LinkAddrs {
                local: any(),
                remote: any(),
            },
        ],
    )))
    .unwrap();
    let proxy = faulty_proxy(
        slink.local_addrs()[0],
        vec![
            Fault::Corrupt(2),
            Fault::Truncate(3),
            Fault::Duplicate(2),
            Fault::Pass,
        ],
        hits.clone(),
        stop_proxy.clone(),
    );
    let plink = Alink::start(fast(AlinkConfig::new(
        12,
        1,
        2,
        SECRET,
        vec![
            LinkAddrs {
                local: any(),
                remote: proxy,
            },
            LinkAddrs {
                local: any(),
                remote: slink.local_addrs()[1],
            },
        ],
    )))
    .unwrap();

    let slog = Arc::new(HashLog::default());
    let plog = Arc::new(HashLog::default());
    let sstop = Arc::new(AtomicBool::new(false));
    let standby = {
        let (sstop, slog) = (sstop.clone(), slog.clone());
        thread::spawn(move || {
            let opts = StandbyDriverConfig {
                protocol: StandbyConfig { max_staged: 4 },
                verify: Some(slog),
                ..StandbyDriverConfig::default()
            };
            let out = run_standby_with(&slink, &scfg, &opts, &sstop);
            (out, slink)
        })
    };
    let mut pvmm = build_vm(&pcfg).unwrap();
    pvmm.start().unwrap();
    let pvmm = Arc::new(pvmm);
    // The guest's working set written once (128 MiB at 200,000 pages/s) and both links
    // up before the sync starts, so that the faults meet sync parts.
    thread::sleep(Duration::from_millis(1000));
    let t0 = Instant::now();
    while plink.link_status().iter().filter(|s| s.up).count() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(10), "links not up");
        thread::sleep(Duration::from_millis(5));
    }
    let pstop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let primary = {
        let (pstop, pvmm, acked, plog) = (pstop.clone(), pvmm.clone(), acked.clone(), plog.clone());
        thread::spawn(move || {
            let cfg = PrimaryDriverConfig {
                protocol: PrimaryConfig {
                    epoch_len: Duration::from_millis(2),
                    min_epoch: Duration::from_millis(1),
                    max_in_flight: 4,
                    coalesce_bytes: PrimaryConfig::default().coalesce_bytes,
                    sync_max_rounds: 6,
                    sync_small_pages: 256,
                },
                connect_timeout: Duration::from_secs(10),
                acked: Some(acked),
                verify: Some(plog),
                ..PrimaryDriverConfig::default()
            };
            let r = run_primary(&pvmm, &plink, &cfg, &pstop);
            (r, plink)
        })
    };

    let t0 = Instant::now();
    while acked.load(Ordering::SeqCst) < EPOCHS + 1
        && t0.elapsed() < Duration::from_secs(60)
        && !primary.is_finished()
        && !standby.is_finished()
    {
        thread::sleep(Duration::from_millis(50));
    }
    let elapsed = t0.elapsed();
    sstop.store(true, Ordering::SeqCst);
    let (sout, slink) = standby.join().unwrap();
    let committed = match sout.unwrap() {
        StandbyOutcome::Stopped { committed } | StandbyOutcome::PrimaryBack { committed } => {
            committed
        }
        StandbyOutcome::FailedOver(..) => panic!("the standby failed over"),
        StandbyOutcome::NoReplica => panic!("no replica"),
    };
    pstop.store(true, Ordering::SeqCst);
    let (preport, plink) = primary.join().unwrap();
    let preport = preport.unwrap();
    let sstatus = slink.link_status();
    let session = slink.session_version();
    drop((plink, slink));
    stop_proxy.store(true, Ordering::Relaxed);
    pvmm.stopper().stop();
    let mut pvmm = Arc::try_unwrap(pvmm).unwrap_or_else(|_| panic!("primary VMM still shared"));
    pvmm.wait();
    drop(pvmm);

    assert_eq!(session, alink::PROTOCOL_CURRENT);
    let p = plog.snapshot();
    let s = slog.snapshot();
    let committed = committed.expect("nothing committed");
    assert_eq!(s.keys().next(), Some(&0), "the standby skipped epoch 0");
    assert_eq!(
        s.len() as u64,
        committed + 1,
        "an applied epoch was not hashed"
    );
    let mismatches: Vec<_> = s
        .iter()
        .filter(|(e, sh)| p.get(e) != Some(sh))
        .map(|(e, _)| *e)
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} of {} epochs differ from the primary's, first {:?}",
        mismatches.len(),
        s.len(),
        &mismatches[..mismatches.len().min(5)]
    );
    assert!(
        s.len() as u64 > EPOCHS,
        "only {} epochs committed in {elapsed:?}",
        s.len()
    );
    let hits = hits.lock().unwrap().clone();
    eprintln!(
        "{} epochs committed and equal in {elapsed:?}; sync: {} rounds, {} bytes, {:?}; \
         faults {hits:?}; link 0 {:?}",
        s.len(),
        preport.sync_rounds,
        preport.sync_bytes,
        preport.sync_time,
        sstatus[0]
    );
    assert_eq!(
        hits.first(),
        Some(&(Fault::Corrupt(2), true)),
        "the first fault must hit a lent sync part"
    );
    assert!(hits.len() >= 2, "faults {hits:?}");
    assert!(sstatus[0].connections >= 3, "{:?}", sstatus[0]);
    assert!(sstatus[0].refused >= 1, "{:?}", sstatus[0]);
    let con = std::fs::read_to_string(&pcon).unwrap_or_default();
    assert!(!con.contains("DIRTY-ERROR"), "the dirty self-check failed");
}
