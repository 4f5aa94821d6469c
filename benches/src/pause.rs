//! Figure 5: what a checkpoint pause costs (issue 3) — kicking and parking the vCPUs,
//! capturing vCPU and device state, harvesting the dirty log — and how fast the dirty
//! pages are then copied, against a plain `memcpy` of the same pages in the same run.
//!
//! A hand-assembled CPL3 guest (`vmm::boot::Image::Flat`) writes one word into each of
//! the first N pages of a table of page addresses the bench wrote into guest memory,
//! reports the round on a control device, and spins on MMIO reads until released. The
//! table holds pages spread over all of RAM (high RAM above 4 GiB too), shuffled, so
//! any prefix is scattered over the whole guest. Per round, once the guest reported:
//! `pause` (timed: kick/park), `capture_state` (timed), `harvest_dirty_into` (timed),
//! then the harvested pages are copied into a staging buffer through guest memory
//! (`read_slice` per run of the dirty set: "page copy") and with `memcpy` from the
//! same host addresses in the same order into the same buffer (which of the two goes
//! first alternates per round, so neither always finds the pages in cache), then
//! `resume`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use twinrun_guest_abi as abi;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm::boot::Image;
use vmm::builder::build_vm_with_image_and_options;
use vmm::config::{BuildOptions, ConsoleConfig, DirtyLog, Payload, VmConfig, Workloads};
use vmm::devices::bus::BusDevice;
use vmm::vstate::dirty::DirtySet;
use vmm::vstate::memory::GuestMemoryMmap;
use vmm::Vmm;

use crate::report::{Better, Figure};

/// Control device window.
const DEV_BASE: u64 = abi::MMIO_BASE + 0x6000;
const REG_DONE: u64 = 0;
const REG_GO: u64 = 8;
const REG_N: u64 = 0x10;
/// The table of page addresses (u64 each): above the image, below the dirtied pages.
const TABLE: u64 = 8 << 20;
/// Lowest page the guest dirties: above the image, stack, page tables and table.
const FIRST_PAGE: u64 = 16 << 20;
const PAGE: usize = 4096;
/// Dirty pages per round, as the issue lists them.
pub const COUNTS: [u32; 4] = [0, 100, 1_000, 10_000];
const MAX_PAGES: usize = 10_000;

/// Machine code of the guest. Round `g` (1, 2, ...): `n = [REG_N]`; for the first `n`
/// entries `p` of the table, `[p] = g`; `[REG_DONE] = g`; spin until `[REG_GO] == g`.
fn code() -> Vec<u8> {
    let mut c = vec![0xbb]; // mov ebx, DEV_BASE (below 4 GiB)
    c.extend_from_slice(&(DEV_BASE as u32).to_le_bytes());
    c.extend_from_slice(&[0x31, 0xc9]); // xor ecx, ecx
    let outer = c.len();
    c.extend_from_slice(&[0x48, 0xff, 0xc1]); // inc rcx
    c.push(0xbf); // mov edi, TABLE
    c.extend_from_slice(&(TABLE as u32).to_le_bytes());
    c.extend_from_slice(&[0x8b, 0x53, REG_N as u8]); // mov edx, [rbx + REG_N]
    c.extend_from_slice(&[0x85, 0xd2]); // test edx, edx
    let inner: [u8; 14] = [
        0x48, 0x8b, 0x07, // mov rax, [rdi]
        0x48, 0x89, 0x08, // mov [rax], rcx
        0x48, 0x83, 0xc7, 0x08, // add rdi, 8
        0xff, 0xca, // dec edx
        0x75, 0xf2, // jnz inner (-14)
    ];
    c.extend_from_slice(&[0x74, inner.len() as u8]); // jz after
    c.extend_from_slice(&inner);
    c.extend_from_slice(&[0x89, 0x0b]); // after: mov [rbx + REG_DONE], ecx
    c.extend_from_slice(&[0x8b, 0x73, REG_GO as u8]); // wait: mov esi, [rbx + REG_GO]
    c.extend_from_slice(&[0x39, 0xce]); // cmp esi, ecx
    c.extend_from_slice(&[0x75, 0xf9]); // jne wait (-7)
    let back = outer as isize - (c.len() as isize + 2);
    c.extend_from_slice(&[0xeb, back as i8 as u8]); // jmp outer
    c
}

/// `MAX_PAGES` page addresses evenly spread over every region of `layout` (from
/// `FIRST_PAGE` up), in a fixed pseudo-random order.
fn page_table(layout: &[(u64, u64)]) -> Vec<u64> {
    let usable: Vec<(u64, u64)> = layout
        .iter()
        .filter_map(|&(start, len)| {
            let s = start.max(FIRST_PAGE);
            let end = start + len;
            (s < end).then(|| (s, (end - s) / PAGE as u64))
        })
        .collect();
    let total: u64 = usable.iter().map(|(_, n)| n).sum();
    let stride = (total / MAX_PAGES as u64).max(1);
    let mut pages = Vec::with_capacity(MAX_PAGES);
    for i in 0..MAX_PAGES as u64 {
        let mut idx = (i * stride) % total;
        for &(s, n) in &usable {
            if idx < n {
                pages.push(s + idx * PAGE as u64);
                break;
            }
            idx -= n;
        }
    }
    // The lab's seeded RNG: deterministic, so runs dirty the same pages.
    twinrun_lab::Rng::new(0x9e37_79b9_7f4a_7c15).shuffle(&mut pages);
    pages
}

#[derive(Default)]
struct Control {
    done: AtomicU32,
    go: AtomicU32,
    n: AtomicU32,
}

struct Dev(Arc<Control>);

impl BusDevice for Dev {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let v = match offset {
            REG_GO => self.0.go.load(Ordering::SeqCst),
            REG_N => self.0.n.load(Ordering::SeqCst),
            _ => 0,
        };
        let b = u64::from(v).to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&b[..n]);
    }
    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == REG_DONE && data.len() >= 4 {
            let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.0.done.store(v, Ordering::SeqCst);
        }
    }
}

/// The VM (built, not started), its control registers, and the guest's page table
/// (pages spread over all RAM, or over its first `within_mib` MiB), with KVM's dirty
/// ring or its bitmap.
fn build(
    mem_mib: u64,
    within_mib: Option<u64>,
    ring: bool,
) -> Result<(Vmm, Arc<Control>, Vec<u64>), String> {
    let cfg = VmConfig {
        mem_mib,
        vcpus: 1,
        payload: Payload::TestGuest {
            elf: "/unused".into(),
            workloads: Workloads::default(),
        },
        disks: vec![],
        nets: vec![],
        // The flat guest never touches the console.
        console: ConsoleConfig::Stdout,
    };
    let opts = BuildOptions {
        dirty_log: if ring {
            DirtyLog::Ring
        } else {
            DirtyLog::Bitmap
        },
        ..BuildOptions::default()
    };
    let mut vm = build_vm_with_image_and_options(&cfg, Image::Flat(&code()), &opts)
        .map_err(|e| format!("build: {e}"))?;
    let layout = vmm::persist::memory::layout(vm.guest_memory());
    let layout: Vec<(u64, u64)> = match within_mib {
        Some(mib) => {
            let cap = mib << 20;
            layout
                .iter()
                .filter(|(s, _)| *s < cap)
                .map(|&(s, l)| (s, l.min(cap - s)))
                .collect()
        }
        None => layout,
    };
    let table = page_table(&layout);
    let bytes: Vec<u8> = table.iter().flat_map(|p| p.to_le_bytes()).collect();
    vm.guest_memory()
        .write_slice(&bytes, GuestAddress(TABLE))
        .map_err(|e| format!("writing the page table: {e}"))?;
    let ctl = Arc::new(Control::default());
    let dev: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Dev(ctl.clone())));
    vm.insert_mmio_device(dev, DEV_BASE, 0x1000)
        .map_err(|e| format!("insert control device: {e}"))?;
    Ok((vm, ctl, table))
}

fn wait_done(ctl: &Control, round: u32) -> Result<(), String> {
    let t0 = Instant::now();
    while ctl.done.load(Ordering::SeqCst) != round {
        if t0.elapsed() > Duration::from_secs(30) {
            return Err(format!("guest did not finish round {round} within 30 s"));
        }
        std::thread::sleep(Duration::from_micros(20));
    }
    Ok(())
}

/// Copies the dirty pages into `staging` through guest memory, run by run (what a
/// checkpoint's page copy does). Returns the bytes copied.
fn page_copy(mem: &GuestMemoryMmap, set: &DirtySet, staging: &mut [u8]) -> Result<usize, String> {
    let mut off = 0;
    for (addr, len) in set.runs() {
        let len = len as usize;
        let dst = staging
            .get_mut(off..off + len)
            .ok_or("staging buffer too small")?;
        mem.read_slice(dst, addr)
            .map_err(|e| format!("read {addr:?}: {e}"))?;
        off += len;
    }
    Ok(off)
}

/// The baseline: `memcpy` of each page from its host address, in the same order.
fn plain_memcpy(src: &[*const u8], staging: &mut [u8]) {
    assert!(src.len() * PAGE <= staging.len());
    for (i, p) in src.iter().enumerate() {
        // SAFETY: every pointer is the host address of a whole guest page
        // (`get_host_address` of a page-aligned address of a region, whose mapping
        // outlives this call); the destination range is inside `staging` (asserted);
        // a guest mapping and a Vec never overlap.
        unsafe { std::ptr::copy_nonoverlapping(*p, staging.as_mut_ptr().add(i * PAGE), PAGE) };
    }
}

/// Per-round timings of one (memory size, dirty count), in seconds.
#[derive(Default)]
struct Rounds {
    kick: Vec<f64>,
    capture: Vec<f64>,
    harvest: Vec<f64>,
    /// Of the harvest: KVM_GET_DIRTY_LOG and the scan of its bitmap (ring: the walk of
    /// the rings); the re-protect (KVM_CLEAR_DIRTY_LOG; ring: KVM_RESET_DIRTY_RINGS)
    /// and its call count; the VMM's own bitmap.
    kvm_get: Vec<f64>,
    kvm_clear: Vec<f64>,
    clear_calls: Vec<f64>,
    vmm_log: Vec<f64>,
    /// The early re-protect while the guest ran (early runs only; not in the pause).
    early: Vec<f64>,
    total: Vec<f64>,
    copy_gbs: Vec<f64>,
    memcpy_gbs: Vec<f64>,
}

/// Nearest-rank percentile `p` (0-100) of `v`.
fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0 * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// Runs every dirty count on one guest of `mem_mib`.
fn measure(
    mem_mib: u64,
    within_mib: Option<u64>,
    early: bool,
    ring: bool,
    rounds: usize,
    warmup: usize,
) -> Result<Vec<Rounds>, String> {
    let (mut vm, ctl, table) = build(mem_mib, within_mib, ring)?;
    vm.start_dirty_tracking()
        .map_err(|e| format!("start dirty tracking: {e}"))?;
    ctl.n.store(COUNTS[0], Ordering::SeqCst);
    vm.start().map_err(|e| format!("start: {e}"))?;
    let mut set = DirtySet::new(vm.guest_memory());
    let mut staging = vec![1u8; MAX_PAGES * PAGE]; // written, so faulted in
    let mut ptrs: Vec<*const u8> = Vec::with_capacity(MAX_PAGES);
    let mut out = Vec::new();
    let mut round = 0u32;
    for (ci, &n) in COUNTS.iter().enumerate() {
        let mut r = Rounds::default();
        // Dirtying 10,000 pages costs the software KVM ~10 ms of write faults per
        // round: half the rounds there keep the section near a minute.
        let rounds = if n >= 10_000 {
            rounds.div_ceil(2)
        } else {
            rounds
        };
        for i in 0..warmup + rounds {
            round += 1;
            wait_done(&ctl, round)?;
            // Early runs: the guest has written its pages and spins; they are taken and
            // re-protected now, while it runs, as a driver would part-way into an epoch.
            let t = Instant::now();
            if early {
                vm.pre_harvest_dirty()
                    .map_err(|e| format!("early re-protect: {e}"))?;
            }
            let early_time = t.elapsed();
            let kick = vm.pause().map_err(|e| format!("pause: {e}"))?;
            let t = Instant::now();
            let state = vm.capture_state().map_err(|e| format!("capture: {e}"))?;
            let capture = t.elapsed();
            set.clear();
            let t = Instant::now();
            let hs = vm
                .harvest_dirty_into(&mut set)
                .map_err(|e| format!("harvest: {e}"))?;
            let harvest = t.elapsed();
            drop(state);
            // Besides the N pages, the CPU's accessed/dirty bits in the guest's page
            // tables (first touches of a 2 MiB page) may show up: allowed, but none of
            // the guest's own writes may be missing.
            if let Some(p) = table[..n as usize]
                .iter()
                .find(|p| !set.contains(GuestAddress(**p)))
            {
                return Err(format!(
                    "{mem_mib} MiB round {round}: page {p:#x} written by the guest \
                     is not in the harvest ({} pages)",
                    set.count()
                ));
            }
            if staging.len() < set.count() * PAGE {
                // Page-table pages on top of the N (see above): grow, prefaulted.
                staging.resize(set.count() * PAGE, 1);
            }
            ptrs.clear();
            for a in set.pages() {
                let p = vm
                    .guest_memory()
                    .get_host_address(a)
                    .map_err(|e| format!("host address of {a:?}: {e}"))?;
                ptrs.push(p.cast_const());
            }
            let time_copy = |staging: &mut [u8]| {
                let t = Instant::now();
                page_copy(vm.guest_memory(), &set, staging).map(|b| (b, t.elapsed()))
            };
            let time_memcpy = |staging: &mut [u8]| {
                let t = Instant::now();
                plain_memcpy(&ptrs, staging);
                t.elapsed()
            };
            let (bytes, copy, memcpy) = if i % 2 == 0 {
                let (b, c) = time_copy(&mut staging)?;
                (b, c, time_memcpy(&mut staging))
            } else {
                let m = time_memcpy(&mut staging);
                let (b, c) = time_copy(&mut staging)?;
                (b, c, m)
            };
            if i >= warmup {
                r.kick.push(kick.as_secs_f64());
                r.capture.push(capture.as_secs_f64());
                r.harvest.push(harvest.as_secs_f64());
                r.kvm_get
                    .push((hs.kvm_time.saturating_sub(hs.kvm_clear_time)).as_secs_f64());
                r.kvm_clear.push(hs.kvm_clear_time.as_secs_f64());
                r.clear_calls.push(hs.kvm_clear_calls as f64);
                r.vmm_log.push(hs.vmm_time.as_secs_f64());
                if early {
                    r.early.push(early_time.as_secs_f64());
                }
                r.total.push((kick + capture + harvest).as_secs_f64());
                if bytes > 0 {
                    r.copy_gbs.push(bytes as f64 / copy.as_secs_f64() / 1e9);
                    r.memcpy_gbs.push(bytes as f64 / memcpy.as_secs_f64() / 1e9);
                }
            }
            // The next count starts with the next round the guest begins.
            let next = if i + 1 == warmup + rounds {
                COUNTS.get(ci + 1).copied().unwrap_or(0)
            } else {
                n
            };
            ctl.n.store(next, Ordering::SeqCst);
            ctl.go.store(round, Ordering::SeqCst);
            vm.resume().map_err(|e| format!("resume: {e}"))?;
        }
        out.push(r);
    }
    vm.stopper().stop();
    let _ = vm.wait_timeout(Duration::from_secs(10));
    Ok(out)
}

fn size_name(mib: u64) -> String {
    if mib >= 1024 {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

/// What one guest size measured, per dirty count of [`COUNTS`].
pub struct SizeRun {
    pub mib: u64,
    /// Dirty pages confined to the first this many MiB (a control run), else spread
    /// over all RAM.
    pub within_mib: Option<u64>,
    /// The pages were taken by an early re-protect (`Vmm::pre_harvest_dirty`) while the
    /// guest ran, before the pause.
    pub early: bool,
    /// KVM's dirty ring instead of its bitmap.
    pub ring: bool,
    rounds: Vec<Rounds>,
}

impl SizeRun {
    pub fn label(&self) -> String {
        let l = match self.within_mib {
            Some(w) => format!("{} (pages in {})", size_name(self.mib), size_name(w)),
            None => size_name(self.mib),
        };
        match (self.ring, self.early) {
            (true, true) => format!("{l}, dirty ring, early re-protect"),
            (true, false) => format!("{l}, dirty ring"),
            (false, true) => format!("{l}, early re-protect"),
            (false, false) => l,
        }
    }
}

/// Measures every size (pages spread over all RAM), then, when there is more than one
/// size, the largest again with the pages confined to the smallest size's RAM: the
/// same pages in the same 2 MiB regions as the smallest guest, which separates what
/// grows with the guest's size from what grows with how scattered its writes are.
pub fn measure_all(
    sizes_mib: &[u64],
    rounds: usize,
    warmup: usize,
) -> Result<Vec<SizeRun>, String> {
    let mut all = Vec::new();
    let mut plan: Vec<(u64, Option<u64>, bool, bool)> =
        sizes_mib.iter().map(|m| (*m, None, false, false)).collect();
    if let (Some(&small), Some(&large)) = (sizes_mib.first(), sizes_mib.last()) {
        if large > small {
            plan.push((large, Some(small), false, false));
        }
    }
    // Every size again with the pages taken by an early re-protect before the pause.
    plan.extend(sizes_mib.iter().map(|m| (*m, None, true, false)));
    // And with KVM's dirty ring (a harvest per dirty page), where this KVM has it.
    // Then the ring with early re-protects: the pause's harvest is then only what
    // was written since the early call, with no per-GiB part.
    if ring_available() {
        plan.extend(sizes_mib.iter().map(|m| (*m, None, false, true)));
        plan.extend(sizes_mib.iter().map(|m| (*m, None, true, true)));
    } else {
        eprintln!("   (this KVM has no dirty ring: the ring runs are skipped)");
    }
    for (mib, within_mib, early, ring) in plan {
        let t = Instant::now();
        let rounds = measure(mib, within_mib, early, ring, rounds, warmup)?;
        let run = SizeRun {
            mib,
            within_mib,
            early,
            ring,
            rounds,
        };
        eprintln!(
            "   {} guest: {:.1} s",
            run.label(),
            t.elapsed().as_secs_f64()
        );
        all.push(run);
    }
    Ok(all)
}

/// Whether a VM can be built with the dirty ring here.
fn ring_available() -> bool {
    build(64, None, true).is_ok()
}

pub fn run(sizes_mib: &[u64], rounds: usize, warmup: usize) -> Result<Vec<Figure>, String> {
    Ok(figures(&measure_all(sizes_mib, rounds, warmup)?))
}

pub fn figures(all: &[SizeRun]) -> Vec<Figure> {
    for run in all {
        for (plot, p) in [("pause-p50", 50.0), ("pause-p99", 99.0)] {
            let points = COUNTS
                .iter()
                .zip(&run.rounds)
                .filter(|(n, _)| **n > 0)
                .map(|(n, r)| (f64::from(*n), pct(&r.total, p) * 1e6))
                .collect();
            crate::series::line(
                plot,
                &format!("checkpoint pause p{p:.0} (us: kick + capture + harvest) vs dirty pages"),
                &run.label(),
                points,
            );
        }
        let points = COUNTS
            .iter()
            .zip(&run.rounds)
            .filter(|(n, _)| **n > 0)
            .map(|(n, r)| (f64::from(*n), pct(&r.harvest, 50.0) * 1e6))
            .collect();
        crate::series::line(
            "harvest-p50",
            "dirty harvest p50 (us) vs dirty pages",
            &run.label(),
            points,
        );
    }
    let us = |v: &[f64], p: f64| pct(v, p) * 1e6;
    let smallest = all.first().map(|r| r.mib);
    let mut figs = Vec::new();
    for run in all {
        let (mib, per) = (&run.mib, &run.rounds);
        for (ci, (n, r)) in COUNTS.iter().zip(per).enumerate() {
            let head = format!("{}, {n} pages", run.label());
            let calls = pct(&r.clear_calls, 50.0);
            let note = |v: &[f64]| {
                format!(
                    "p99 {:.1} us, {} rounds, {calls} CLEAR call(s) p50",
                    us(v, 99.0),
                    v.len()
                )
            };
            for (what, v) in [
                ("vCPU kick/park", &r.kick),
                ("capture", &r.capture),
                ("harvest", &r.harvest),
                ("harvest: KVM GET + scan", &r.kvm_get),
                ("harvest: KVM re-protect", &r.kvm_clear),
                ("harvest: VMM bitmap", &r.vmm_log),
            ] {
                figs.push(
                    Figure::new(
                        "pause",
                        &format!("{head}: {what} p50"),
                        us(v, 50.0),
                        "us",
                        Better::Lower,
                    )
                    .note(note(v)),
                );
            }
            let mut f = Figure::new(
                "pause",
                &format!("{head}: total pause p50"),
                us(&r.total, 50.0),
                "us",
                Better::Lower,
            )
            .note(format!(
                "kick + capture + harvest; p99 {:.1} us",
                us(&r.total, 99.0)
            ));
            // The smallest guest measured the same way (early or not) is the baseline.
            let base_run = all.iter().find(|b| {
                Some(b.mib) == smallest
                    && b.early == run.early
                    && b.ring == run.ring
                    && b.within_mib.is_none()
            });
            if let (Some(base_mib), Some(base_run), true) =
                (smallest, base_run, Some(*mib) != smallest)
            {
                let base = &base_run.rounds[ci];
                let base_label = base_run.label();
                f = f.baseline(&format!("{base_label}, same pages"), us(&base.total, 50.0));
                if base_mib == 256 && run.within_mib.is_none() {
                    if *mib == 4096 {
                        f = f.target(1.5, true, "<= 1.5x 256 MiB");
                    } else if *mib == 16384 {
                        f = f.target(1.2, true, "<= 1.2x 256 MiB");
                    }
                }
                // The harvest alone against the smallest guest's, same run.
                figs.push(
                    Figure::new(
                        "pause",
                        &format!("{head}: harvest p50 vs smallest"),
                        us(&r.harvest, 50.0),
                        "us",
                        Better::Lower,
                    )
                    .baseline(
                        &format!("{base_label}, same pages"),
                        us(&base.harvest, 50.0),
                    ),
                );
            }
            if run.early && *n > 0 {
                figs.push(
                    Figure::new(
                        "pause",
                        &format!("{head}: early re-protect (guest running) p50"),
                        us(&r.early, 50.0),
                        "us",
                        Better::Lower,
                    )
                    .note("not in the pause: the guest runs meanwhile"),
                );
            }
            if *mib == 1024 && *n == 1000 && run.within_mib.is_none() {
                f = f.target(1000.0, false, "< 1 ms");
            }
            figs.push(f);
            figs.push(Figure::new(
                "pause",
                &format!("{head}: total pause p99"),
                us(&r.total, 99.0),
                "us",
                Better::Lower,
            ));
            if *n > 0 {
                figs.push(
                    Figure::new(
                        "pause",
                        &format!("{head}: page copy p50"),
                        pct(&r.copy_gbs, 50.0),
                        "GB/s",
                        Better::Higher,
                    )
                    .baseline("memcpy, same pages", pct(&r.memcpy_gbs, 50.0))
                    .target(0.7, true, ">= 70% of memcpy")
                    .note(format!("{} KiB per round", *n as usize * PAGE / 1024)),
                );
            }
        }
    }
    figs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loops_jump_where_intended() {
        let c = code();
        // The inner loop's jnz lands on `mov rax, [rdi]`.
        let at = c.windows(3).position(|w| w == [0x48, 0x8b, 0x07]).unwrap();
        let jnz = at + 12;
        assert_eq!(c[jnz], 0x75);
        assert_eq!(jnz as i64 + 2 + i64::from(c[jnz + 1] as i8), at as i64);
        // The outer jmp lands on `inc rcx`.
        let jmp = c.len() - 2;
        assert_eq!(c[jmp], 0xeb);
        let outer = jmp as i64 + 2 + i64::from(c[jmp + 1] as i8);
        assert_eq!(&c[outer as usize..outer as usize + 3], &[0x48, 0xff, 0xc1]);
    }

    #[test]
    fn table_spreads_over_all_ram_without_repeats() {
        // A 4 GiB guest: 3 GiB low, 1 GiB above 4 GiB.
        let layout = [(0, 3 << 30), (abi::RAM_HIGH_START, 1 << 30)];
        let t = page_table(&layout);
        assert_eq!(t.len(), MAX_PAGES);
        let mut s = t.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), MAX_PAGES);
        assert!(t.iter().all(|p| p % PAGE as u64 == 0 && *p >= FIRST_PAGE));
        assert!(t
            .iter()
            .all(|p| *p < 3 << 30
                || (abi::RAM_HIGH_START..abi::RAM_HIGH_START + (1 << 30)).contains(p)));
        // Even a prefix of 100 reaches high RAM and the bottom quarter of low RAM.
        assert!(t[..100].iter().any(|p| *p >= abi::RAM_HIGH_START));
        assert!(t[..100].iter().any(|p| *p < 1 << 30));
    }

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(pct(&v, 50.0), 50.0);
        assert_eq!(pct(&v, 99.0), 99.0);
        assert!(pct(&[], 50.0).is_nan());
    }
}
