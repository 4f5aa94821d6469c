//! Taking a snapshot of a running VM: a short pause (capture state, harvest dirty
//! pages, copy them and the written disk blocks into staging buffers), then the files
//! are written after the VM resumed.
//!
//! Disk consistency: virtio-blk completes every request before the notify that
//! submitted it returns, so with the vCPUs parked no disk I/O is in flight and the
//! image file holds exactly what the guest wrote up to the pause. Changed blocks are
//! read from it while paused.
//!
//! A first (full) snapshot is taken live, like pre-copy migration ([`Precopy`]): dirty
//! tracking starts and the disks' written-block maps are reset while the guest runs,
//! then all memory and whole images are copied while it keeps running, then up to
//! [`MAX_ROUNDS`] rounds recopy what was dirtied meanwhile (each needs only a
//! harvest-long pause), and the final pause copies just the rest. So the pause of a
//! full snapshot grows with the guest's dirty rate, not with memory or disk size.
//!
//! Why the result equals memory and disks at the final pause: tracking starts before
//! any copy, so every page or block written after its copy began is logged. A page
//! copied while a vCPU or a device wrote it may be torn, but that write is logged, so
//! the page is in a later harvest and copied again; the last copy of every page
//! written after tracking started happens inside the final pause. Likewise for disks:
//! a write marks its blocks before it is submitted, under the transport lock that the
//! reset (`take_written_blocks`) also takes, so a write either completed before the
//! reset (and the copy reads it) or is marked in a map taken later, and its blocks are
//! read again, at the latest while paused, when no request is in flight.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};
use twinrun_lock::MutexExt;
use vmm::devices::virtio::block::image_size;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::config::VmConfig;
use vmm::devices::virtio::block::written::WrittenBlocks;
use vmm::vstate::dirty::DirtySet;
use vmm::vstate::memory::GuestMemoryMmap;
use vmm::Vmm;

use super::format::{runs_header, DiskPart, Kind, Manifest, Part, PartWriter};
use super::store::{Store, MEMORY, STATE};
use super::{now_ms, random_u64, SnapError};

/// Set to 1 to record a CRC-32C of all guest memory (read while paused) in each
/// manifest, so a rebuilt memory can be checked (`twinrun snapshot verify`).
pub const MEMCHECK_ENV: &str = "TWINRUN_SNAPSHOT_MEMCHECK";

/// What one snapshot did.
#[derive(Clone, Debug)]
pub struct Taken {
    pub generation: u32,
    pub kind: Kind,
    pub pause: Duration,
    pub bytes: u64,
    /// Generations folded away to stay within the limit.
    pub folded: Vec<u32>,
}

/// Snapshot bookkeeping of one running VM.
pub struct Snapshotter {
    vm: String,
    cfg: VmConfig,
    /// The newest snapshot this process took: (generation, snapshot id).
    last: Option<(u32, u64)>,
    dirty: Option<DirtySet>,
}

/// Pre-copy stops once a round found at most this many dirty pages (4 MiB): the
/// final pause copies that few in about a millisecond.
const SMALL_ROUND_PAGES: usize = 1024;
/// Rounds of recopying dirty pages while running, after the first full copy. A guest
/// that dirties memory faster than it is copied does not converge; the final pause
/// then copies what the last round left.
pub const MAX_ROUNDS: usize = 2;

/// Changed blocks read while paused: runs and their data.
enum StagedDisk {
    Blocks(Vec<(u64, u64)>, Vec<u8>),
}

/// What the pause copied (for a full snapshot: all memory, pre-copied and patched).
struct Staged {
    mem_runs: Vec<(u64, u64)>,
    mem_data: Vec<u8>,
    disks: Vec<StagedDisk>,
    memory_crc32c: Option<u32>,
}

/// What a full snapshot copied while the guest ran.
struct Precopy {
    /// All guest memory regions, in order; `mem_data` holds them back to back.
    regions: Vec<(u64, u64)>,
    mem_data: Vec<u8>,
    disks: Vec<PreDisk>,
    /// Time from the start of tracking to the end of the last round.
    live: Duration,
    /// Each round's harvest pause.
    round_pauses: Vec<Duration>,
    /// Pages recopied by the rounds.
    round_pages: usize,
}

/// A whole image copied into the work directory while the guest ran.
struct PreDisk {
    src: File,
    out: File,
    path: std::path::PathBuf,
}

impl PreDisk {
    fn size(&self) -> Result<u64, SnapError> {
        image_size(&self.src).map_err(|e| SnapError::io(&self.path, e))
    }
}

impl Precopy {
    /// Copies the pages of `set` from guest memory into `mem_data`.
    fn copy_pages(&mut self, mem: &GuestMemoryMmap, set: &DirtySet) -> Result<(), SnapError> {
        for (a, l) in set.runs() {
            // A run never spans two regions.
            let mut base = 0u64;
            let mut at = None;
            for &(start, len) in &self.regions {
                if a.0 >= start && a.0 + l <= start + len {
                    at = Some((base + a.0 - start) as usize);
                    break;
                }
                base += len;
            }
            let at = at.ok_or_else(|| {
                SnapError::Vm(format!("dirty run {:#x}+{l:#x} outside guest memory", a.0))
            })?;
            read_guest(mem, &mut self.mem_data[at..at + l as usize], a.0)?;
        }
        Ok(())
    }
}

impl Snapshotter {
    pub fn new(vm: &str, cfg: &VmConfig) -> Snapshotter {
        Snapshotter {
            vm: vm.to_string(),
            cfg: cfg.clone(),
            last: None,
            dirty: None,
        }
    }

    /// Takes the next generation. `paused` says whether the VM is paused already (then
    /// it stays paused).
    pub fn take(&mut self, vmm: &Vmm, paused: bool) -> Result<Taken, SnapError> {
        let store = Store::new(&self.vm)?;
        let gens = store.generations()?;
        let newest = gens.last().copied();
        // Incremental only on top of this process's own newest snapshot, still there.
        let incremental = match (self.last, newest) {
            (Some((g, id)), Some(n)) if g == n => store
                .manifest(n)
                .map(|m| m.snapshot_id == id)
                .unwrap_or(false),
            _ => false,
        };
        let generation = newest.map_or(1, |n| n + 1);
        let tmp = store.begin(generation)?;
        let vm_err = |what: &str, e: vmm::VmmError| SnapError::Vm(format!("{what}: {e}"));

        // --- full snapshot: copy everything while the guest runs ---
        let mut pre = if incremental {
            None
        } else {
            match self.precopy(vmm, paused, &tmp) {
                Ok(p) => Some(p),
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&tmp);
                    self.last = None;
                    return Err(e);
                }
            }
        };

        // --- the pause ---
        let t0 = Instant::now();
        if !paused {
            if let Err(e) = vmm.pause() {
                let _ = std::fs::remove_dir_all(&tmp);
                self.last = None;
                return Err(vm_err("pause", e));
            }
        }
        let staged = self.stage(vmm, incremental, pre.as_mut());
        let resumed = if paused {
            Ok(())
        } else {
            vmm.resume().map_err(|e| vm_err("resume", e))
        };
        let pause = t0.elapsed();
        let (state, staged) = match staged {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                // A failed capture may leave dirty tracking out of step: start over.
                self.last = None;
                return Err(e);
            }
        };
        resumed?;
        if let Some(p) = &pre {
            log::info!(
                "full snapshot pre-copy: {} ms while running, {} round(s) of dirty pages \
                 ({} pages, harvest pauses {:?}), final pause {} us",
                p.live.as_millis(),
                p.round_pauses.len(),
                p.round_pages,
                p.round_pauses,
                pause.as_micros()
            );
        }
        // --- files, with the VM running ---
        let r = self.write(
            &store,
            &tmp,
            generation,
            incremental,
            newest,
            state,
            staged,
            pre.take(),
            pause,
        );
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
            self.last = None;
        }
        let m = r?;
        self.last = Some((generation, m.snapshot_id));
        let folded = store.prune()?;
        Ok(Taken {
            generation,
            kind: m.kind,
            pause,
            bytes: m.size(),
            folded,
        })
    }

    /// The live part of a full snapshot: starts tracking, copies all memory and whole
    /// disk images, then recopies what the guest dirtied meanwhile, for up to
    /// [`MAX_ROUNDS`] rounds. Runs while the guest runs (unless `paused`).
    fn precopy(&mut self, vmm: &Vmm, paused: bool, tmp: &Path) -> Result<Precopy, SnapError> {
        let vm_err = |what: &str, e: vmm::VmmError| SnapError::Vm(format!("{what}: {e}"));
        let t0 = Instant::now();
        let mem = vmm.guest_memory();
        let ndisks = self.cfg.disks.len();
        // Tracking first, copies after: everything written from here on is logged.
        vmm.start_dirty_tracking()
            .map_err(|e| vm_err("start dirty tracking", e))?;
        // Reset the written-block maps: a write not in the new maps has completed.
        let written = take_written(vmm);
        check_disks(written.len(), ndisks)?;
        let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        let total: u64 = regions.iter().map(|r| r.1).sum();
        let mut mem_data = vec![0u8; total as usize];
        let mut at = 0usize;
        for &(a, l) in &regions {
            // In 1 MiB pieces: torn pages are recopied later anyway.
            let end = at + l as usize;
            let mut off = 0u64;
            while at < end {
                let n = (end - at).min(1 << 20);
                read_guest(mem, &mut mem_data[at..at + n], a + off)?;
                at += n;
                off += n as u64;
            }
        }
        let mut disks = Vec::new();
        for (i, d) in self.cfg.disks.iter().enumerate() {
            let f = File::open(&d.path).map_err(|e| SnapError::io(&d.path, e))?;
            let size = image_size(&f).map_err(|e| SnapError::io(&d.path, e))?;
            let dst = tmp.join(Manifest::disk_file(i, Kind::Full));
            // Read back for the checksum once patched.
            let out = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&dst)
                .map_err(|e| SnapError::io(&dst, e))?;
            copy_range(&f, &d.path, &out, &dst, 0, size)?;
            disks.push(PreDisk {
                src: f,
                out,
                path: dst,
            });
        }
        let mut pre = Precopy {
            regions,
            mem_data,
            disks,
            live: Duration::ZERO,
            round_pauses: Vec::new(),
            round_pages: 0,
        };
        // A paused guest dirties nothing: the final harvest is empty anyway.
        if !paused {
            let set = self.dirty.get_or_insert_with(|| DirtySet::new(mem));
            for _ in 0..MAX_ROUNDS {
                set.clear();
                let t = Instant::now();
                vmm.pause().map_err(|e| vm_err("pause", e))?;
                let h = vmm.harvest_dirty_into(set);
                let resumed = vmm.resume();
                pre.round_pauses.push(t.elapsed());
                h.map_err(|e| vm_err("dirty harvest", e))?;
                resumed.map_err(|e| vm_err("resume", e))?;
                let pages = set.count();
                pre.round_pages += pages;
                // Guest running again: these copies may be torn; the final pause fixes them.
                pre.copy_pages(mem, set)?;
                let written = take_written(vmm);
                check_disks(written.len(), ndisks)?;
                for (d, w) in pre.disks.iter().zip(&written) {
                    for (start, len) in block_runs(w, d.size()?) {
                        copy_range(&d.src, &d.path, &d.out, &d.path, start, len)?;
                    }
                }
                if pages <= SMALL_ROUND_PAGES {
                    break;
                }
            }
        }
        pre.live = t0.elapsed();
        Ok(pre)
    }

    /// Runs while paused: capture, harvest, copy. With `pre` (a full snapshot), only
    /// what was written since its last round is copied, over the pre-copied data.
    fn stage(
        &mut self,
        vmm: &Vmm,
        incremental: bool,
        pre: Option<&mut Precopy>,
    ) -> Result<(Vec<u8>, Staged), SnapError> {
        let vm_err = |what: &str, e: vmm::VmmError| SnapError::Vm(format!("{what}: {e}"));
        let mem = vmm.guest_memory();
        let ndisks = self.cfg.disks.len();
        let state = vmm.capture_state().map_err(|e| vm_err("capture", e))?;
        let state = state
            .to_bytes()
            .map_err(|e| SnapError::Vm(format!("encode state: {e}")))?;
        if incremental == pre.is_some() {
            return Err(SnapError::Vm("full snapshot without its pre-copy".into()));
        }
        let set = self.dirty.get_or_insert_with(|| DirtySet::new(mem));
        set.clear();
        vmm.harvest_dirty_into(set)
            .map_err(|e| vm_err("dirty harvest", e))?;
        let (mem_runs, mem_data) = match pre {
            Some(pre) => {
                pre.copy_pages(mem, set)?;
                (pre.regions.clone(), std::mem::take(&mut pre.mem_data))
            }
            None => {
                let mem_runs: Vec<(u64, u64)> = set.runs().map(|(a, l)| (a.0, l)).collect();
                let total: u64 = mem_runs.iter().map(|r| r.1).sum();
                let mut mem_data = vec![0u8; total as usize];
                let mut at = 0usize;
                for &(a, l) in &mem_runs {
                    let l = l as usize;
                    read_guest(mem, &mut mem_data[at..at + l], a)?;
                    at += l;
                }
                (mem_runs, mem_data)
            }
        };
        let memory_crc32c = if std::env::var(MEMCHECK_ENV).is_ok_and(|v| v == "1") {
            Some(memory_crc(vmm)?)
        } else {
            None
        };
        // Disks: the written maps are taken (and reset) for every disk, always.
        let written = take_written(vmm);
        check_disks(written.len(), ndisks)?;
        let mut disks = Vec::new();
        for (d, w) in self.cfg.disks.iter().zip(&written) {
            let f = File::open(&d.path).map_err(|e| SnapError::io(&d.path, e))?;
            let size = image_size(&f).map_err(|e| SnapError::io(&d.path, e))?;
            let mut runs = Vec::new();
            let mut data = Vec::new();
            for (start, len) in block_runs(w, size) {
                let at = data.len();
                data.resize(at + len as usize, 0);
                f.read_exact_at(&mut data[at..], start)
                    .map_err(|e| SnapError::io(&d.path, e))?;
                runs.push((start, len));
            }
            disks.push(StagedDisk::Blocks(runs, data));
        }
        Ok((
            state,
            Staged {
                mem_runs,
                mem_data,
                disks,
                memory_crc32c,
            },
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        store: &Store,
        tmp: &Path,
        generation: u32,
        incremental: bool,
        parent: Option<u32>,
        state: Vec<u8>,
        staged: Staged,
        pre: Option<Precopy>,
        pause: Duration,
    ) -> Result<Manifest, SnapError> {
        let kind = if incremental {
            Kind::Incremental
        } else {
            Kind::Full
        };
        let mut parts = Vec::new();
        let mut w = PartWriter::create(&tmp.join(STATE))?;
        w.write(&state)?;
        parts.push(w.finish()?);
        let mut w = PartWriter::create(&tmp.join(MEMORY))?;
        w.write(&runs_header(&staged.mem_runs))?;
        w.write(&staged.mem_data)?;
        parts.push(w.finish()?);
        let mut disks = Vec::new();
        let mut pre_disks = pre.map(|p| p.disks.into_iter());
        for (i, (d, sd)) in self.cfg.disks.iter().zip(staged.disks).enumerate() {
            let StagedDisk::Blocks(runs, data) = sd;
            let part = match pre_disks.as_mut().and_then(|p| p.next()) {
                // Full: the blocks written since the last round go over the pre-copy.
                Some(pd) => patch_copy(&pd, &runs, &data)?,
                None => {
                    let mut w = PartWriter::create(&tmp.join(Manifest::disk_file(i, kind)))?;
                    w.write(&runs_header(&runs))?;
                    w.write(&data)?;
                    w.finish()?
                }
            };
            let size = std::fs::metadata(&d.path)
                .map_err(|e| SnapError::io(&d.path, e))?
                .len();
            disks.push(DiskPart { size, kind });
            parts.push(part);
        }
        let config_toml = toml::to_string(&self.cfg)
            .map_err(|e| SnapError::Vm(format!("cannot encode the VM config: {e}")))?;
        let m = Manifest {
            vm: self.vm.clone(),
            generation,
            parent: if incremental { parent } else { None },
            kind,
            snapshot_id: random_u64(),
            created_unix_ms: now_ms(),
            config_toml,
            mem_bytes: self.cfg.mem_mib << 20,
            mem_pages_bytes: staged.mem_data.len() as u64,
            pause_us: pause.as_micros() as u64,
            memory_crc32c: staged.memory_crc32c,
            parts,
            disks,
        };
        store.commit(tmp, &m)?;
        Ok(m)
    }
}

/// The written-block map of every block device, in disk order (taken and reset).
fn take_written(vmm: &Vmm) -> Vec<WrittenBlocks> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(t) = vmm.devices().transport(i) {
        let mut t = t.lock_or_recover();
        if let Some(w) = t.take_written_blocks() {
            out.push(w);
        }
        i += 1;
    }
    out
}

/// CRC-32C of all guest memory, region by region (only while paused to be exact).
pub fn memory_crc(vmm: &Vmm) -> Result<u32, SnapError> {
    mem_crc(vmm.guest_memory())
}

pub fn mem_crc(mem: &GuestMemoryMmap) -> Result<u32, SnapError> {
    let mut buf = vec![0u8; 1 << 20];
    let mut c = 0u32;
    for r in mem.iter() {
        let mut off = 0;
        while off < r.len() {
            let n = (r.len() - off).min(buf.len() as u64) as usize;
            mem.read_slice(&mut buf[..n], GuestAddress(r.start_addr().0 + off))
                .map_err(|e| SnapError::Vm(format!("read guest memory: {e}")))?;
            c = crc32c::crc32c_append(c, &buf[..n]);
            off += n as u64;
        }
    }
    Ok(c)
}

fn check_disks(found: usize, configured: usize) -> Result<(), SnapError> {
    if found != configured {
        return Err(SnapError::Vm(format!(
            "found {found} block devices, the config has {configured} disks"
        )));
    }
    Ok(())
}

fn read_guest(mem: &GuestMemoryMmap, buf: &mut [u8], addr: u64) -> Result<(), SnapError> {
    mem.read_slice(buf, GuestAddress(addr))
        .map_err(|e| SnapError::Vm(format!("read guest memory at {addr:#x}: {e}")))
}

/// The marked blocks of `w` as byte ranges `(start, len)` of an image of `size` bytes.
fn block_runs(w: &WrittenBlocks, size: u64) -> Vec<(u64, u64)> {
    w.runs()
        .into_iter()
        .filter_map(|(first, n)| {
            let start = first * super::format::UNIT;
            let len = (n * super::format::UNIT).min(size.saturating_sub(start));
            (len > 0).then_some((start, len))
        })
        .collect()
}

/// Copies `len` bytes at `off` of `src` to the same offset of `dst`.
fn copy_range(
    src: &File,
    src_path: &Path,
    dst: &File,
    dst_path: &Path,
    off: u64,
    len: u64,
) -> Result<(), SnapError> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut o = off;
    while o < off + len {
        let n = (off + len - o).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], o)
            .map_err(|e| SnapError::io(src_path, e))?;
        dst.write_all_at(&buf[..n], o)
            .map_err(|e| SnapError::io(dst_path, e))?;
        o += n as u64;
    }
    Ok(())
}

/// Writes the blocks read in the final pause over a pre-copied image, fsyncs it and
/// checksums the result.
fn patch_copy(pd: &PreDisk, runs: &[(u64, u64)], data: &[u8]) -> Result<Part, SnapError> {
    let mut at = 0usize;
    for &(start, len) in runs {
        let l = len as usize;
        pd.out
            .write_all_at(&data[at..at + l], start)
            .map_err(|e| SnapError::io(&pd.path, e))?;
        at += l;
    }
    pd.out.sync_all().map_err(|e| SnapError::io(&pd.path, e))?;
    let len = pd
        .out
        .metadata()
        .map_err(|e| SnapError::io(&pd.path, e))?
        .len();
    let mut buf = vec![0u8; 1 << 20];
    let mut c = 0u32;
    let mut o = 0u64;
    while o < len {
        let n = (len - o).min(buf.len() as u64) as usize;
        pd.out
            .read_exact_at(&mut buf[..n], o)
            .map_err(|e| SnapError::io(&pd.path, e))?;
        c = crc32c::crc32c_append(c, &buf[..n]);
        o += n as u64;
    }
    Ok(Part {
        file: super::format::file_name(&pd.path),
        len,
        crc32c: c,
    })
}
