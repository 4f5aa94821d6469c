//! Taking a snapshot of a running VM: a short pause (capture state, harvest dirty
//! pages, copy them and the written disk blocks into staging buffers), then the files
//! are written after the VM resumed.
//!
//! Disk consistency: virtio-blk completes every request before the notify that
//! submitted it returns, so with the vCPUs parked no disk I/O is in flight and the
//! image file holds exactly what the guest wrote up to the pause. Changed blocks are
//! read from it while paused; a first (full) snapshot copies whole images while paused
//! (its pause grows with disk size; incremental ones copy only the blocks written
//! since the previous snapshot).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::config::VmConfig;
use vmm::devices::virtio::block::written::WrittenBlocks;
use vmm::vstate::dirty::DirtySet;
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

enum StagedDisk {
    /// The whole image, already copied into the work directory.
    Copied(Part),
    /// Changed blocks: runs and their data.
    Blocks(Vec<(u64, u64)>, Vec<u8>),
}

/// Pages and blocks copied while paused.
struct Staged {
    mem_runs: Vec<(u64, u64)>,
    mem_data: Vec<u8>,
    disks: Vec<StagedDisk>,
    memory_crc32c: Option<u32>,
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

        // --- the pause ---
        let t0 = Instant::now();
        if !paused {
            vmm.pause().map_err(|e| vm_err("pause", e))?;
        }
        let staged = self.stage(vmm, incremental, &tmp);
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
        // --- files, with the VM running ---
        let r = self.write(
            &store,
            &tmp,
            generation,
            incremental,
            newest,
            state,
            staged,
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

    /// Runs while paused: capture, harvest, copy.
    fn stage(
        &mut self,
        vmm: &Vmm,
        incremental: bool,
        tmp: &Path,
    ) -> Result<(Vec<u8>, Staged), SnapError> {
        let vm_err = |what: &str, e: vmm::VmmError| SnapError::Vm(format!("{what}: {e}"));
        let mem = vmm.guest_memory();
        let state = vmm.capture_state().map_err(|e| vm_err("capture", e))?;
        let state = state
            .to_bytes()
            .map_err(|e| SnapError::Vm(format!("encode state: {e}")))?;
        let mut mem_runs = Vec::new();
        if incremental {
            let set = self.dirty.get_or_insert_with(|| DirtySet::new(mem));
            set.clear();
            vmm.harvest_dirty_into(set)
                .map_err(|e| vm_err("dirty harvest", e))?;
            mem_runs.extend(set.runs().map(|(a, l)| (a.0, l)));
        } else {
            // Baseline for the next incremental: everything written from now on.
            vmm.start_dirty_tracking()
                .map_err(|e| vm_err("start dirty tracking", e))?;
            mem_runs.extend(mem.iter().map(|r| (r.start_addr().0, r.len())));
        }
        let total: u64 = mem_runs.iter().map(|r| r.1).sum();
        let mut mem_data = vec![0u8; total as usize];
        let mut at = 0usize;
        for &(a, l) in &mem_runs {
            let l = l as usize;
            mem.read_slice(&mut mem_data[at..at + l], GuestAddress(a))
                .map_err(|e| SnapError::Vm(format!("read guest memory at {a:#x}: {e}")))?;
            at += l;
        }
        let memory_crc32c = if std::env::var(MEMCHECK_ENV).is_ok_and(|v| v == "1") {
            Some(memory_crc(vmm)?)
        } else {
            None
        };
        // Disks: the written maps are taken (and reset) for every disk, always.
        let written = take_written(vmm);
        if written.len() != self.cfg.disks.len() {
            return Err(SnapError::Vm(format!(
                "found {} block devices, the config has {} disks",
                written.len(),
                self.cfg.disks.len()
            )));
        }
        let mut disks = Vec::new();
        for (i, (d, w)) in self.cfg.disks.iter().zip(&written).enumerate() {
            let f = File::open(&d.path).map_err(|e| SnapError::io(&d.path, e))?;
            let size = f.metadata().map_err(|e| SnapError::io(&d.path, e))?.len();
            if incremental {
                let mut runs = Vec::new();
                let mut data = Vec::new();
                for (first, n) in w.runs() {
                    let start = first * super::format::UNIT;
                    let len = (n * super::format::UNIT).min(size.saturating_sub(start));
                    if len == 0 {
                        continue;
                    }
                    let at = data.len();
                    data.resize(at + len as usize, 0);
                    f.read_exact_at(&mut data[at..], start)
                        .map_err(|e| SnapError::io(&d.path, e))?;
                    runs.push((start, len));
                }
                disks.push(StagedDisk::Blocks(runs, data));
            } else {
                let dst = tmp.join(Manifest::disk_file(i, Kind::Full));
                let part = super::store::copy_file(&f, size, &d.path, &dst)?;
                disks.push(StagedDisk::Copied(part));
            }
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
        for (i, (d, sd)) in self.cfg.disks.iter().zip(staged.disks).enumerate() {
            let part = match sd {
                StagedDisk::Blocks(runs, data) => {
                    let mut w = PartWriter::create(&tmp.join(Manifest::disk_file(i, kind)))?;
                    w.write(&runs_header(&runs))?;
                    w.write(&data)?;
                    w.finish()?
                }
                StagedDisk::Copied(part) => part,
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
        let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
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

pub fn mem_crc(mem: &vmm::vstate::memory::GuestMemoryMmap) -> Result<u32, SnapError> {
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
