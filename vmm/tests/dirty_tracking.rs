//! Dirty page tracking on real KVM: exact page sets from a hand-assembled guest, and
//! the real test guest (dirty workload + virtio-blk reads + net RX) whose memory is
//! rebuilt from harvested pages alone and compared with live memory at every pause
//! (every other epoch with an early re-protect while it runs).

mod support;
use support::{flat_dirty_guest as flat, guest, tap};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest::{create_image, disk, guest_config, TempFile};
use tap::{arp_request, is_arp_reply, PacketSocket, Tap};
use twinrun_guest_abi as abi;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::config::{BuildOptions, DirtyLog, NetConfig, VmConfig, Workloads};
use vmm::vstate::dirty::{BitmapSource, DirtyError, DirtySet, PAGE_SIZE};
use vmm::vstate::memory::GuestMemoryMmap;
use vmm::{VmExit, Vmm, VmmError};

/// One round of the flat guest: `n` pages from `base`, `stride` bytes apart.
#[derive(Clone, Copy)]
struct Round {
    n: u64,
    base: u64,
    stride: u64,
}

impl Round {
    const fn dense(n: u64) -> Round {
        Round {
            n,
            base: flat::DIRTY_BASE,
            stride: PAGE_SIZE,
        }
    }

    fn pages(&self) -> Vec<GuestAddress> {
        (0..self.n)
            .map(|i| GuestAddress(self.base + i * self.stride))
            .collect()
    }

    fn set(&self, ctl: &flat::Control) {
        ctl.n.store(self.n as u32, Ordering::SeqCst);
        ctl.base.store(self.base, Ordering::SeqCst);
        ctl.stride.store(self.stride as u32, Ordering::SeqCst);
    }
}

/// Runs rounds of the flat guest and checks each harvest is exactly the pages written
/// (plus the pages the VMM wrote itself while paused).
fn exact_sets(vmm: &mut Vmm, ctl: &flat::Control) {
    let plan = [5, 3, 3, 70, 0, 1].map(Round::dense);
    exact_sets_with(vmm, ctl, &plan);
}

/// As [`exact_sets`], with the guest writing the pages of `plan[i]` in round `i + 1`.
fn exact_sets_with(vmm: &mut Vmm, ctl: &flat::Control, plan: &[Round]) {
    // Round 1 writes 5 pages; each later round sets N before releasing the guest.
    plan[0].set(ctl);
    vmm.start().unwrap();
    let mut expect_vmm: Vec<GuestAddress> = Vec::new();
    // 2 MiB pages the guest has touched so far.
    let mut touched = std::collections::BTreeSet::new();
    for (i, r) in plan.iter().enumerate() {
        let n = r.n;
        let round = i as u32 + 1;
        flat::wait_done(ctl, round);
        vmm.pause().unwrap();
        let (set, stats) = {
            let mut s = DirtySet::new(vmm.guest_memory());
            let st = vmm.harvest_dirty_into(&mut s).unwrap();
            (s, st)
        };
        let mut want = r.pages();
        want.append(&mut expect_vmm);
        want.sort();
        want.dedup();
        let mut got: Vec<GuestAddress> = set.pages().collect();
        let mut extra = 0;
        let first_touch = r.pages().iter().any(|p| touched.insert(p.0 >> 21));
        if round == 1 || first_touch {
            // The first accesses (of the program, or of a 2 MiB page) also make the
            // CPU set accessed/dirty bits in the page tables, which KVM rightly logs
            // as guest writes.
            let tables = abi::PML4_ADDR..abi::PD_ADDR + abi::MAX_MAPPED_GIB * PAGE_SIZE;
            let before = got.len();
            got.retain(|p| !tables.contains(&p.0));
            extra = before - got.len();
        }
        assert_eq!(got, want, "round {round} ({stats:?})");
        assert_eq!(stats.kvm_pages, n as usize + extra, "round {round}");
        let gap = vmm::vstate::dirty::CLEAR_MERGE_GAP_WORDS as u64 * 64 * PAGE_SIZE;
        if r.stride > gap && vmm.dirty_rings().is_none() {
            // One re-protect call per page at least (page-table pages may add some).
            assert!(
                stats.kvm_clear_calls as u64 >= n,
                "round {round} ({stats:?})"
            );
        }
        // Nothing more until the guest runs again.
        assert!(vmm.harvest_dirty().unwrap().is_empty());
        // A VMM write while paused (as device emulation does) shows in the next
        // harvest, even for a page the guest never touches.
        let vmm_page = GuestAddress(0x30_0000 + u64::from(round) * 0x1_1000);
        vmm.guest_memory().write_obj(round, vmm_page).unwrap();
        expect_vmm.push(GuestAddress(vmm_page.0 & !(PAGE_SIZE - 1)));
        if let Some(next) = plan.get(i + 1) {
            next.set(ctl);
        }
        ctl.go.store(round, Ordering::SeqCst);
        vmm.resume().unwrap();
        // Harvesting while vCPUs run is refused.
        assert!(matches!(
            vmm.harvest_dirty(),
            Err(VmmError::Dirty(DirtyError::NotPaused))
        ));
    }
    vmm.stopper().stop();
    assert_eq!(
        vmm.wait_timeout(Duration::from_secs(10)),
        Some(VmExit::Stopped)
    );
    // After the end nothing runs: harvesting is allowed and sees the last round.
    let last = vmm.harvest_dirty().unwrap();
    assert!(last.count() >= expect_vmm.len());
}

#[test]
fn flat_guest_harvests_exactly_the_pages_written() {
    let (mut vmm, ctl) = flat::build(64);
    assert!(matches!(
        vmm.harvest_dirty(),
        Err(VmmError::Dirty(DirtyError::NotStarted))
    ));
    vmm.start_dirty_tracking().unwrap();
    assert!(vmm.vm().slot_flags().dirty_log);
    exact_sets(&mut vmm, &ctl);
}

/// Pages far enough apart that each is re-protected by its own KVM_CLEAR_DIRTY_LOG
/// call (dirty words more than `CLEAR_MERGE_GAP_WORDS` apart), in both memory slots
/// (3 GiB of low RAM, 1 GiB above 4 GiB): every page is reported exactly once per
/// round it is written, so each range was re-protected, and nothing is reported
/// again without a write, so no range was missed.
#[test]
fn scattered_pages_across_both_slots_are_re_protected_range_by_range() {
    let (mut vmm, ctl) = flat::build(4096);
    vmm.start_dirty_tracking().unwrap();
    // More than CLEAR_MERGE_GAP_WORDS (256 words: 64 MiB) between dirty words: low RAM
    // from 16 MiB, 80 MiB + 4 KiB apart (30 pages end below 3 GiB); high RAM from
    // 4 GiB + 4 KiB, 68 MiB + 4 KiB apart (14 pages end below 5 GiB).
    let gap = (vmm::vstate::dirty::CLEAR_MERGE_GAP_WORDS as u64) * 64 * PAGE_SIZE;
    let low = |n| Round {
        n,
        base: flat::DIRTY_BASE,
        stride: (80 << 20) + PAGE_SIZE,
    };
    let high = |n| Round {
        n,
        base: (4 << 30) + PAGE_SIZE,
        stride: (68 << 20) + PAGE_SIZE,
    };
    assert!(low(1).stride > gap && high(1).stride > gap);
    let plan = [
        low(3),
        high(14),
        low(30),
        low(30),
        high(5),
        Round::dense(0),
        high(14),
    ];
    exact_sets_with(&mut vmm, &ctl, &plan);
}

/// Early re-protects (`Vmm::pre_harvest_dirty`, guest running) between harvests: each
/// harvest is exactly the pages written since the previous one, whether they were
/// written before an early re-protect, after it, or both (a page written, taken early,
/// then written again must fault and be logged again); nothing taken early is
/// reported twice or left set in KVM's log. Edge pages of both slots of a 4 GiB guest
/// (the last page below 3 GiB, the first and last pages of high RAM) and pages far
/// apart, with and without the hot-page policy.
fn early_re_protect_exact(hot: bool) {
    early_re_protect_exact_with(hot, &BuildOptions::default());
}

fn early_re_protect_exact_with(hot: bool, opts: &BuildOptions) {
    let (mut vmm, ctl) = flat::build_with_options(4096, opts);
    if hot {
        assert!(vmm.set_hot_pages(Some(vmm::vstate::hot_pages::HotPageConfig::default())));
    }
    vmm.start_dirty_tracking().unwrap();
    let edges_low = Round {
        n: 2,
        base: (3 << 30) - PAGE_SIZE,
        stride: (1 << 30) + PAGE_SIZE,
    };
    let last_high = Round {
        n: 1,
        base: (5 << 30) - PAGE_SIZE,
        stride: PAGE_SIZE,
    };
    let far = |n| Round {
        n,
        base: flat::DIRTY_BASE + PAGE_SIZE,
        stride: (40 << 20) + 3 * PAGE_SIZE,
    };
    // (round, take early after it and let the guest go on without a harvest)
    let plan = [
        (far(20), true),
        (edges_low, true),
        (far(20), false), // the same pages again after their early re-protect
        (last_high, false),
        (far(5), true),
        (Round::dense(64), true),
        (far(5), true), // early, then nothing until the harvest
        (Round::dense(0), false),
        (edges_low, false),
        (far(20), true),
        (far(20), true),
        (far(20), false),
        (last_high, true),
        (Round::dense(0), false),
    ];
    plan[0].0.set(&ctl);
    vmm.start().unwrap();
    let mut want: Vec<GuestAddress> = Vec::new();
    let mut ever = std::collections::BTreeSet::new();
    let tables = abi::PML4_ADDR..abi::PD_ADDR + abi::MAX_MAPPED_GIB * PAGE_SIZE;
    for (i, (r, early)) in plan.iter().enumerate() {
        let round = i as u32 + 1;
        flat::wait_done(&ctl, round);
        want.extend(r.pages());
        ever.extend(r.pages());
        if *early {
            // The guest spins (it reads only) while the pages are taken.
            let n = vmm.pre_harvest_dirty().unwrap();
            if !hot {
                assert!(n as u64 >= r.n, "round {round}: took {n}");
            }
        } else {
            vmm.pause().unwrap();
            let mut set = DirtySet::new(vmm.guest_memory());
            let st = vmm.harvest_dirty_into(&mut set).unwrap();
            let mut got: Vec<GuestAddress> = set.pages().collect();
            // Accessed/dirty bits of first touches land in the page tables.
            got.retain(|p| !tables.contains(&p.0));
            want.sort();
            want.dedup();
            if hot {
                // Nothing missed; extra pages only ones written before (left writable
                // by the policy, so reported until they cool).
                let missing: Vec<_> = want.iter().filter(|p| !got.contains(p)).collect();
                assert!(
                    missing.is_empty(),
                    "round {round}: missing {missing:?} ({st:?})"
                );
                assert!(
                    got.iter().all(|p| ever.contains(p)),
                    "round {round} ({st:?})"
                );
            } else {
                assert_eq!(got, want, "round {round} ({st:?})");
            }
            want.clear();
            // Nothing more until the guest runs: no page taken early is reported again
            // (with hot pages, only pages kept writable are).
            let again: Vec<GuestAddress> = vmm
                .harvest_dirty()
                .unwrap()
                .pages()
                .filter(|p| !tables.contains(&p.0))
                .collect();
            if hot {
                assert!(again.iter().all(|p| ever.contains(p)), "round {round}");
            } else {
                assert!(again.is_empty(), "round {round}: {again:?}");
            }
            vmm.resume().unwrap();
        }
        if let Some((next, _)) = plan.get(i + 1) {
            next.set(&ctl);
        }
        ctl.go.store(round, Ordering::SeqCst);
    }
    vmm.stopper().stop();
    assert_eq!(
        vmm.wait_timeout(Duration::from_secs(10)),
        Some(VmExit::Stopped)
    );
}

#[test]
fn early_re_protect_harvests_exactly_the_pages_written() {
    early_re_protect_exact(false);
}

#[test]
fn early_re_protect_with_hot_pages_misses_nothing() {
    early_re_protect_exact(true);
}

#[test]
fn flat_guest_exact_without_manual_protect() {
    let (mut vmm, ctl) = flat::build(64);
    vmm.start_dirty_tracking_with(Box::new(BitmapSource::without_manual_protect()))
        .unwrap();
    exact_sets(&mut vmm, &ctl);
}

#[test]
fn stop_turns_logging_off() {
    let (vmm, _ctl) = flat::build(32);
    vmm.start_dirty_tracking().unwrap();
    // Restarting sets a new baseline: a VMM write before it is not reported.
    vmm.guest_memory()
        .write_obj(1u8, GuestAddress(0x7000))
        .unwrap();
    vmm.start_dirty_tracking().unwrap();
    assert!(vmm.harvest_dirty().unwrap().is_empty());
    vmm.guest_memory()
        .write_obj(1u8, GuestAddress(0x8000))
        .unwrap();
    let s = vmm.harvest_dirty().unwrap();
    assert_eq!(s.pages().collect::<Vec<_>>(), vec![GuestAddress(0x8000)]);
    vmm.stop_dirty_tracking().unwrap();
    assert!(!vmm.vm().slot_flags().dirty_log);
    assert!(matches!(
        vmm.harvest_dirty(),
        Err(VmmError::Dirty(DirtyError::NotStarted))
    ));
}

// ---------------------------------------------------------------------------------
// The real test guest.

const GUEST_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x02];
const HOST_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x01];

/// Counts ARP replies (from the guest) waiting on the socket.
fn drain_arp_replies(sock: &PacketSocket, buf: &mut [u8]) -> u64 {
    let mut n = 0;
    sock.drain(buf, |f| {
        if is_arp_reply(f) {
            n += 1;
        }
    });
    n
}

/// A frame to the guest's MAC with an unused EtherType and changing contents: the
/// guest drops it, but only after the device wrote it into a receive buffer.
fn noise_frame(seq: u64) -> Vec<u8> {
    let mut f = Vec::with_capacity(1400);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&[0x88, 0xb5]);
    let mut body = [0u8; 1400 - 14];
    twinrun_lab::Rng::new(seq).fill(&mut body);
    f.extend_from_slice(&body);
    f
}

/// The host mapping of guest memory as one byte slice (the test uses one region).
fn live(mem: &GuestMemoryMmap) -> &[u8] {
    assert_eq!(mem.num_regions(), 1);
    let r = mem.iter().next().unwrap();
    assert_eq!(r.start_addr(), GuestAddress(0));
    // SAFETY: the region's mapping is `len` bytes and lives as long as `mem`. The
    // caller reads it only while the VM is paused, so nothing writes it meanwhile.
    unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) }
}

fn first_diff_page(a: &[u8], b: &[u8]) -> Option<u64> {
    a.chunks(PAGE_SIZE as usize)
        .zip(b.chunks(PAGE_SIZE as usize))
        .position(|(x, y)| x != y)
        .map(|p| p as u64 * PAGE_SIZE)
}

/// Copies the pages of `set` from live memory into `shadow`, except `skip`.
fn apply(shadow: &mut [u8], live: &[u8], set: &DirtySet, skip: Option<u64>) {
    for (start, len) in set.runs() {
        let (a, e) = (start.0 as usize, (start.0 + len) as usize);
        match skip {
            Some(s) if (a..e).contains(&(s as usize)) => {
                let s = s as usize;
                shadow[a..s].copy_from_slice(&live[a..s]);
                let s2 = s + PAGE_SIZE as usize;
                shadow[s2..e].copy_from_slice(&live[s2..e]);
            }
            _ => shadow[a..e].copy_from_slice(&live[a..e]),
        }
    }
}

#[test]
fn real_guest_memory_rebuilt_from_dirty_pages_matches_at_every_pause() {
    real_guest_rebuilt(&BuildOptions::default(), 2500, 20_000);
}

/// [`real_guest_memory_rebuilt_from_dirty_pages_matches_at_every_pause`] on KVM's
/// dirty ring, a small one (256 entries per vCPU) and a guest dirtying fast: rings fill
/// between pauses, their vCPUs drain them (ring-full exits), and memory rebuilt from
/// the harvests still matches at every pause.
#[test]
fn real_guest_on_a_small_dirty_ring_matches_at_every_pause() {
    let opts = ring_options(256);
    real_guest_rebuilt(&opts, 1000, 400_000);
}

fn real_guest_rebuilt(opts: &BuildOptions, pauses: usize, dirty_rate: u32) {
    let tap = Tap::new(if opts.dirty_log == DirtyLog::Ring {
        "twdr"
    } else {
        "twdf"
    });
    let log = TempFile::new("dirty.log");
    let image = TempFile::new("dirty.img");
    create_image(image.path(), 16 << 20);
    let workloads = Workloads {
        dirty: true,
        dirty_pages: 2048,
        dirty_rate,
        kv: true,
        blkbench: true,
        blkbench_bytes: 16 << 20,
        blkbench_req_kib: 64,
        blkbench_depth: 4,
        ..Workloads::default()
    };
    let cfg = VmConfig {
        disks: vec![disk(image.path())],
        nets: vec![NetConfig {
            tap: tap.name().to_owned(),
            mac: "02:77:00:00:00:02".into(),
        }],
        ..guest_config(workloads, log.path())
    };
    let mut vmm = vmm::build_vm_with_options(&cfg, opts).expect("build");
    let ring = opts.dirty_log == DirtyLog::Ring;
    assert_eq!(vmm.dirty_rings().is_some(), ring);

    // Host side of the network: ARP requests and noise frames into the VM's RX.
    let sock = Arc::new(PacketSocket::bind(tap.name()).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (sock, stop, sent) = (sock.clone(), stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let arp = arp_request(HOST_MAC);
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                let ok = if seq.is_multiple_of(4) {
                    sock.send(&arp)
                } else {
                    sock.send(&noise_frame(seq))
                };
                if ok {
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(300));
            }
        })
    };

    // Baseline: tracking on, then one full copy while nothing runs.
    vmm.start_dirty_tracking().unwrap();
    let mut shadow = live(vmm.guest_memory()).to_vec();
    let mut set = DirtySet::new(vmm.guest_memory());

    let pauses_total = pauses;
    let mut rng = twinrun_lab::Rng::new(0x2545_f491_4f6c_dd1d);
    let (mut pages_total, mut with_vmm, mut vmm_only, mut negatives) = (0usize, 0, 0, 0);
    let mut arp_replies = 0;
    let mut early_pages = 0;
    let mut rbuf = vec![0u8; 65536];
    let t0 = Instant::now();
    vmm.start().unwrap();
    // A ring VM runs on past `pauses` until a ring filled at least once: how many pages
    // an epoch dirties depends on the CPU the guest gets, so the later epochs are long
    // enough to fill the ring on a loaded machine (bounded: 2 minutes).
    let ring_filled = |vmm: &Vmm| vmm.dirty_rings().is_none_or(|r| r.full_exits().0 > 0);
    let mut i = 0;
    while i < pauses_total || (!ring_filled(&vmm) && t0.elapsed() < Duration::from_secs(120)) {
        if i > 0 {
            vmm.resume().unwrap();
        }
        let wait = if i < pauses_total {
            Duration::from_micros(200 + rng.below(1800))
        } else {
            Duration::from_millis(20)
        };
        if i % 2 == 1 {
            // Every other epoch takes its first half's pages early, while the guest,
            // the block device and the net RX keep writing: a write racing the early
            // re-protect must still reach the rebuilt memory.
            std::thread::sleep(wait / 2);
            early_pages += vmm.pre_harvest_dirty().unwrap();
            std::thread::sleep(wait / 2);
        } else {
            std::thread::sleep(wait);
        }
        if let Some(e) = vmm.wait_timeout(Duration::ZERO) {
            panic!("guest ended at pause {i}: {e}");
        }
        vmm.pause().expect("pause");
        set.clear();
        let stats = vmm.harvest_dirty_into(&mut set).unwrap();
        pages_total += stats.total_pages;
        if stats.vmm_pages > 0 {
            with_vmm += 1;
        }
        if stats.total_pages > stats.kvm_pages {
            vmm_only += 1;
        }
        let mem = live(vmm.guest_memory());
        // Negative check now and then: leaving out one page that really changed must
        // be caught by the comparison.
        let changed = set
            .pages()
            .find(|p| {
                let a = p.0 as usize;
                shadow[a..a + PAGE_SIZE as usize] != mem[a..a + PAGE_SIZE as usize]
            })
            .map(|p| p.0);
        if let (true, Some(page)) = (i.is_multiple_of(50), changed) {
            apply(&mut shadow, mem, &set, Some(page));
            assert_eq!(
                first_diff_page(&shadow, mem),
                Some(page),
                "the comparison must catch a page left out"
            );
            negatives += 1;
        }
        apply(&mut shadow, mem, &set, None);
        if shadow.as_slice() != mem {
            let p = first_diff_page(&shadow, mem).unwrap();
            panic!(
                "pause {i}: rebuilt memory differs at page {p:#x} (in set: {}) {stats:?}",
                set.contains(GuestAddress(p))
            );
        }
        arp_replies += drain_arp_replies(&sock, &mut rbuf);
        i += 1;
    }
    let pauses_total = i;
    let elapsed = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    vmm.stopper().stop();
    assert_eq!(
        vmm.wait_timeout(Duration::from_secs(10)),
        Some(VmExit::Stopped)
    );
    let text = log.text();
    println!(
        "{pauses_total} pauses in {elapsed:?}: {pages_total} dirty pages harvested, {with_vmm} \
         harvests with VMM writes ({vmm_only} with pages only the VMM wrote), {negatives} \
         negative checks, {} frames sent, {arp_replies} ARP replies, {early_pages} pages \
         taken by early re-protects",
        sent.load(Ordering::Relaxed)
    );
    assert!(early_pages > 0, "no early re-protect took a page");
    if let Some(r) = vmm.dirty_rings() {
        let (exits, pages) = r.full_exits();
        println!("dirty ring: {exits} ring-full exits drained {pages} pages");
        assert!(
            exits > 0,
            "no ring filled: the test does not test ring-full exits"
        );
    }
    assert!(text.starts_with("BOOT "), "{text}");
    assert!(!text.contains("DIRTY-ERROR"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("B read ") && l.ends_with(" bad=0")),
        "blkbench read pass (device writes into guest memory) did not finish:\n{text}"
    );
    assert!(
        text.contains("D pass="),
        "dirty workload made no full pass:\n{text}"
    );
    assert!(
        vmm_only > 100,
        "device writes exercised only {vmm_only} times"
    );
    assert!(negatives > 10, "negative check ran {negatives} times");
    assert!(arp_replies > 0, "the guest never answered ARP (net RX)");
}

// ---------------------------------------------------------------------------------
// KVM's dirty ring (`DirtyLog::Ring`): the same exact sets as the bitmap's.

fn ring_options(entries: u32) -> BuildOptions {
    BuildOptions {
        dirty_log: DirtyLog::Ring,
        dirty_ring_entries: entries,
    }
}

fn ring_guest(mem_mib: u64, entries: u32) -> (Vmm, Arc<flat::Control>) {
    let (vmm, ctl) = flat::build_with_options(mem_mib, &ring_options(entries));
    assert_eq!(vmm.dirty_rings().map(|r| r.entries()), Some(entries));
    (vmm, ctl)
}

#[test]
fn ring_flat_guest_harvests_exactly_the_pages_written() {
    let (mut vmm, ctl) = ring_guest(64, vmm::vstate::dirty::DEFAULT_RING_ENTRIES);
    vmm.start_dirty_tracking().unwrap();
    assert!(vmm.vm().slot_flags().dirty_log);
    exact_sets(&mut vmm, &ctl);
    assert_eq!(vmm.dirty_rings().unwrap().full_exits().0, 0);
}

/// Edge and far-apart pages of both slots of a 4 GiB guest, on the ring.
#[test]
fn ring_scattered_pages_across_both_slots_exact() {
    let (mut vmm, ctl) = ring_guest(4096, vmm::vstate::dirty::DEFAULT_RING_ENTRIES);
    vmm.start_dirty_tracking().unwrap();
    let edge = |base, n, stride| Round { n, base, stride };
    let plan = [
        edge((3 << 30) - PAGE_SIZE, 2, (1 << 30) + PAGE_SIZE), // last low, first high
        edge((5 << 30) - PAGE_SIZE, 1, PAGE_SIZE),             // last page of high RAM
        edge(flat::DIRTY_BASE, 30, (80 << 20) + PAGE_SIZE),
        edge((4 << 30) + PAGE_SIZE, 14, (68 << 20) + PAGE_SIZE),
        Round::dense(0),
        edge(flat::DIRTY_BASE, 30, (80 << 20) + PAGE_SIZE),
    ];
    exact_sets_with(&mut vmm, &ctl, &plan);
}

#[test]
fn ring_early_re_protect_harvests_exactly_the_pages_written() {
    early_re_protect_exact_with(
        false,
        &ring_options(vmm::vstate::dirty::DEFAULT_RING_ENTRIES),
    );
}

/// A ring far smaller than a round's writes (256 entries, rounds of up to 3,000
/// pages): the vCPU stops with KVM_EXIT_DIRTY_RING_FULL many times per round, drains
/// its ring and goes on; every harvest is still exactly the pages written.
#[test]
fn ring_full_exits_lose_nothing() {
    let (mut vmm, ctl) = ring_guest(64, 256);
    vmm.start_dirty_tracking().unwrap();
    let plan = [3000, 5, 2000, 0, 1000, 3000, 1].map(Round::dense);
    exact_sets_with(&mut vmm, &ctl, &plan);
    let (exits, pages) = vmm.dirty_rings().unwrap().full_exits();
    // At least (pages - soft limit) / ring size of exits per big round.
    assert!(exits >= 30, "{exits} ring-full exits ({pages} pages)");
    assert!(
        pages >= 8000,
        "{exits} ring-full exits drained {pages} pages"
    );
}

/// The ring cannot leave hot pages writable, and KVM's bitmap cannot be read on a
/// ring VM: both are refused, tracking goes on with the ring.
#[test]
fn ring_refuses_hot_pages_and_the_bitmap() {
    let (mut vmm, ctl) = ring_guest(64, 4096);
    assert!(!vmm.set_hot_pages(Some(vmm::vstate::hot_pages::HotPageConfig::default())));
    assert!(vmm.set_hot_pages(None));
    assert!(matches!(
        vmm.start_dirty_tracking_with(Box::new(BitmapSource::new(vmm.vm()))),
        Err(VmmError::Dirty(DirtyError::RingVm(_)))
    ));
    vmm.start_dirty_tracking().unwrap();
    assert!(!vmm.set_hot_pages(Some(vmm::vstate::hot_pages::HotPageConfig::default())));
    exact_sets(&mut vmm, &ctl);
}

/// With the ring off (`DirtyLog::Bitmap`), the bitmap tracks as before; `Auto` picks
/// the ring where KVM has it; the ring source refuses a VM built without rings.
#[test]
fn bitmap_source_when_the_ring_is_off() {
    let opts = BuildOptions {
        dirty_log: DirtyLog::Bitmap,
        ..BuildOptions::default()
    };
    let (mut vmm, ctl) = flat::build_with_options(64, &opts);
    assert!(vmm.dirty_rings().is_none());
    assert!(vmm.set_hot_pages(None));
    vmm.start_dirty_tracking().unwrap();
    exact_sets(&mut vmm, &ctl);

    let auto = BuildOptions {
        dirty_log: DirtyLog::Auto,
        ..BuildOptions::default()
    };
    let (vmm, _ctl) = flat::build_with_options(32, &auto);
    let has_ring = vmm::vstate::dirty::ring::ring_max_entries(vmm.vm()) > 0;
    assert_eq!(vmm.dirty_rings().is_some(), has_ring);
}

/// A VM tracked by the ring is captured (state + memory) mid-run and restored into a
/// new VMM (built without rings: the bitmap tracks it); the guest carries on without
/// a gap and the restored VM's tracking works.
#[test]
fn ring_vm_snapshot_restores_and_is_tracked_by_the_bitmap() {
    use vmm::persist::memory::{load_memory, save_memory};
    let log = TempFile::new("ring-snap.log");
    let cfg = guest::counter_config(log.path(), 1000, 400);
    let mut vm = vmm::build_vm_with_options(
        &cfg,
        &ring_options(vmm::vstate::dirty::DEFAULT_RING_ENTRIES),
    )
    .expect("build");
    vm.start_dirty_tracking().unwrap();
    vm.start().unwrap();
    guest::wait_for_lines(
        &mut vm,
        log.path(),
        "C ",
        100,
        Duration::from_secs(20),
        "before the capture",
    );
    vm.pause().unwrap();
    // The counter's own writes (its state, the console ring) were logged by the ring.
    assert!(vm.harvest_dirty().unwrap().count() > 0);
    let state = vm.capture_state().expect("capture");
    let mut mem = Vec::new();
    save_memory(vm.guest_memory(), &mut mem).unwrap();
    drop(vm);

    let (mut vm, _report) =
        vmm::build_vm_from_state(&cfg, &state, |m| load_memory(m, &mut &mem[..])).expect("restore");
    assert!(vm.dirty_rings().is_none());
    vm.start_dirty_tracking().unwrap();
    vm.start().unwrap();
    assert_eq!(
        vm.wait_timeout(Duration::from_secs(30)),
        Some(VmExit::GuestExit { status: 0 })
    );
    assert_eq!(guest::check_counter_lines(&log.text(), true), 400);
    assert!(vm.harvest_dirty().unwrap().count() > 0);
}
