//! A generation brought back: its config, VM state, guest memory (the full generation
//! it builds on, then each incremental one's pages in order) and disk images (the same
//! for blocks). Every part is verified against its manifest before it is used.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::config::VmConfig;
use vmm::vstate::memory::GuestMemoryMmap;
use vmm::VmState;

use super::format::{self, Kind, Manifest, RunsFile};
use super::store::{Store, MEMORY, STATE};
use super::SnapError;

/// The generations making up one snapshot, oldest (full) first.
pub struct Chain {
    pub gens: Vec<(PathBuf, Manifest)>,
}

impl Chain {
    pub fn load(store: &Store, g: u32) -> Result<Chain, SnapError> {
        let gens = store.chain(g)?;
        let disks = gens.last().map_or(0, |(_, m)| m.disks.len());
        if gens.iter().any(|(_, m)| m.disks.len() != disks) {
            return Err(SnapError::Corrupt(format!(
                "generation {g}: its chain disagrees on the number of disks"
            )));
        }
        Ok(Chain { gens })
    }

    pub fn top(&self) -> &Manifest {
        &self.gens[self.gens.len() - 1].1
    }

    pub fn config(&self) -> Result<VmConfig, SnapError> {
        config_of(self.top())
    }

    pub fn state(&self) -> Result<VmState, SnapError> {
        let (dir, m) = &self.gens[self.gens.len() - 1];
        read_state(dir, m)
    }

    /// Writes every generation's pages into `mem`, oldest first.
    pub fn fill_memory(&self, mem: &GuestMemoryMmap) -> Result<(), SnapError> {
        for (dir, m) in &self.gens {
            let runs = RunsFile::open(dir, m.part(MEMORY)?)?;
            runs.for_each(|addr, data| {
                mem.write_slice(data, GuestAddress(addr)).map_err(|e| {
                    SnapError::Corrupt(format!(
                        "{}: pages at {addr:#x} are outside guest memory: {e}",
                        runs.path.display()
                    ))
                })
            })?;
        }
        Ok(())
    }

    /// Writes disk `i` as it was at this generation to `dst` (a new file).
    pub fn write_disk(&self, i: usize, dst: &Path) -> Result<(), SnapError> {
        let (bdir, base) = &self.gens[0];
        let dp = base
            .disks
            .get(i)
            .ok_or_else(|| SnapError::Corrupt(format!("no disk {i} in the snapshot")))?;
        if dp.kind != Kind::Full {
            return Err(SnapError::Corrupt(format!(
                "generation {}: full generation holds disk {i} incrementally",
                base.generation
            )));
        }
        let part = base.part(&Manifest::disk_file(i, Kind::Full))?;
        let src = format::verify_part(bdir, part)?;
        super::store::copy_file(&src, part.len, &bdir.join(&part.file), dst)?;
        let out = OpenOptions::new()
            .write(true)
            .open(dst)
            .map_err(|e| SnapError::io(dst, e))?;
        for (dir, m) in &self.gens[1..] {
            let runs = RunsFile::open(dir, m.part(&Manifest::disk_file(i, Kind::Incremental))?)?;
            runs.for_each(|addr, data| {
                if addr + data.len() as u64 > part.len {
                    return Err(SnapError::Corrupt(format!(
                        "{}: blocks at {addr:#x} are past the image end",
                        runs.path.display()
                    )));
                }
                out.write_all_at(data, addr)
                    .map_err(|e| SnapError::io(dst, e))
            })?;
        }
        out.sync_all().map_err(|e| SnapError::io(dst, e))
    }
}

pub fn config_of(m: &Manifest) -> Result<VmConfig, SnapError> {
    toml::from_str(&m.config_toml).map_err(|e| {
        SnapError::Corrupt(format!(
            "generation {}: the stored VM config does not parse: {e}",
            m.generation
        ))
    })
}

pub fn read_state(dir: &Path, m: &Manifest) -> Result<VmState, SnapError> {
    let part = m.part(STATE)?;
    format::verify_part(dir, part)?;
    let path = dir.join(STATE);
    let bytes = fs::read(&path).map_err(|e| SnapError::io(&path, e))?;
    VmState::from_bytes(&bytes).map_err(|e| SnapError::Corrupt(format!("{}: {e}", path.display())))
}

/// How long a restore waits for a disk image's lock to go away. A VMM that was just
/// killed can hold it for a moment after it is reaped: its io_uring instance, which
/// references the image, is torn down asynchronously by the kernel.
const IN_USE_GRACE: Duration = Duration::from_secs(5);

/// Fails when a running VMM holds `path` (it keeps an exclusive flock on its disks).
pub fn check_not_in_use(path: &Path) -> Result<(), SnapError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(SnapError::io(path, e)),
    };
    let deadline = Instant::now() + IN_USE_GRACE;
    let locked = loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 || Instant::now() >= deadline {
            break rc != 0;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if locked {
        return Err(SnapError::Invalid(format!(
            "disk image {} is in use by a running VM; stop it or restore to another path (--disk-path)",
            path.display()
        )));
    }
    Ok(())
}

/// Rebuilds disk `i` into `dest`: written next to it, fsynced, then renamed over it.
pub fn restore_disk(chain: &Chain, i: usize, dest: &Path) -> Result<(), SnapError> {
    check_not_in_use(dest)?;
    let tmp = dest.with_file_name(format!(".{}.twinrun-restore", format::file_name(dest)));
    let r = chain.write_disk(i, &tmp);
    if let Err(e) = r {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, dest).map_err(|e| SnapError::io(dest, e))?;
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
        super::sync_dir(dir)?;
    }
    Ok(())
}
