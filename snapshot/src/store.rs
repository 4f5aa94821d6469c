//! The generations of one VM on disk: listing, reading, committing, deleting, and
//! folding one generation into the next.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{
    self, decode_manifest, encode_manifest, runs_header, Kind, Manifest, PartWriter, RunsFile,
};
use super::{sync_dir, SnapError, MAX_GENERATIONS};

pub const MANIFEST: &str = "manifest.bin";
pub const STATE: &str = "state.bin";
pub const MEMORY: &str = "memory.runs";

pub struct Store {
    pub vm: String,
    pub dir: PathBuf,
}

fn gen_name(g: u32) -> String {
    format!("gen-{g:08}")
}

impl Store {
    /// The store of VM `vm` under `$TWINRUN_STATE_DIR` (not created until written).
    pub fn new(vm: &str) -> Result<Store, SnapError> {
        crate::paths::check_vm_name(vm).map_err(SnapError::Invalid)?;
        Ok(Store {
            vm: vm.to_string(),
            dir: crate::paths::snapshot_dir(vm),
        })
    }

    pub fn gen_dir(&self, g: u32) -> PathBuf {
        self.dir.join(gen_name(g))
    }

    /// Committed generations, ascending. Leftover `.tmp`/`.old` directories of an
    /// interrupted write are ignored (and removed by [`Store::begin`]).
    pub fn generations(&self) -> Result<Vec<u32>, SnapError> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(SnapError::io(&self.dir, e)),
        };
        let mut out = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name.strip_prefix("gen-") {
                if n.len() == 8 {
                    if let Ok(g) = n.parse::<u32>() {
                        out.push(g);
                    }
                }
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    pub fn manifest(&self, g: u32) -> Result<Manifest, SnapError> {
        let dir = self.gen_dir(g);
        let path = dir.join(MANIFEST);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SnapError::Invalid(format!(
                    "VM {} has no snapshot generation {g} (see `twinrun snapshot list {}`)",
                    self.vm, self.vm
                )))
            }
            Err(e) => return Err(SnapError::io(&path, e)),
        };
        let m = decode_manifest(&bytes, &path.display().to_string())?;
        if m.generation != g {
            return Err(SnapError::Corrupt(format!(
                "{}: says generation {}, its directory {g}",
                path.display(),
                m.generation
            )));
        }
        Ok(m)
    }

    /// The generations whose parts make up generation `g`: the full one it builds on,
    /// then every incremental one up to `g`, following the parent links.
    pub fn chain(&self, g: u32) -> Result<Vec<(PathBuf, Manifest)>, SnapError> {
        let mut out = Vec::new();
        let mut at = g;
        loop {
            let m = self.manifest(at)?;
            let parent = m.parent;
            let kind = m.kind;
            out.push((self.gen_dir(at), m));
            match (kind, parent) {
                (Kind::Full, _) => break,
                (Kind::Incremental, Some(p)) if p < at => at = p,
                (Kind::Incremental, _) => {
                    return Err(SnapError::Corrupt(format!(
                        "generation {at} is incremental without an earlier parent"
                    )))
                }
            }
            if out.len() > 1 + MAX_GENERATIONS * 4 {
                return Err(SnapError::Corrupt("parent links loop".into()));
            }
        }
        out.reverse();
        Ok(out)
    }

    /// A fresh, empty work directory for generation `g` (removing a leftover one).
    pub fn begin(&self, g: u32) -> Result<PathBuf, SnapError> {
        fs::create_dir_all(&self.dir).map_err(|e| SnapError::io(&self.dir, e))?;
        let tmp = self.dir.join(format!("{}.tmp", gen_name(g)));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| SnapError::io(&tmp, e))?;
        }
        fs::create_dir(&tmp).map_err(|e| SnapError::io(&tmp, e))?;
        Ok(tmp)
    }

    /// Writes the manifest into `tmp` and renames it into place as generation
    /// `m.generation`. When the generation exists (a fold replacing it), the two
    /// directories are swapped atomically and the old one removed.
    pub fn commit(&self, tmp: &Path, m: &Manifest) -> Result<(), SnapError> {
        let bytes = encode_manifest(m)?;
        let mpath = tmp.join(MANIFEST);
        let mut w = PartWriter::create(&mpath)?;
        w.write(&bytes)?;
        w.finish()?;
        sync_dir(tmp)?;
        let dest = self.gen_dir(m.generation);
        if dest.exists() {
            exchange(tmp, &dest)?;
            // `tmp` now holds the replaced generation.
            fs::remove_dir_all(tmp).map_err(|e| SnapError::io(tmp, e))?;
        } else {
            fs::rename(tmp, &dest).map_err(|e| SnapError::io(&dest, e))?;
        }
        sync_dir(&self.dir)
    }

    /// Removes generation `g`. A later generation built on it gets its pages and
    /// blocks folded in first, so it stays restorable.
    pub fn delete(&self, g: u32) -> Result<(), SnapError> {
        let m = self.manifest(g)?;
        let gens = self.generations()?;
        for &later in gens.iter().filter(|&&x| x > g) {
            let lm = self.manifest(later)?;
            if lm.kind == Kind::Incremental && lm.parent == Some(g) {
                self.fold(&m, &lm)?;
                break;
            }
        }
        self.remove(g)
    }

    fn remove(&self, g: u32) -> Result<(), SnapError> {
        let dir = self.gen_dir(g);
        let gone = self.dir.join(format!("{}.old", gen_name(g)));
        fs::rename(&dir, &gone).map_err(|e| SnapError::io(&dir, e))?;
        sync_dir(&self.dir)?;
        fs::remove_dir_all(&gone).map_err(|e| SnapError::io(&gone, e))
    }

    /// Keeps at most [`MAX_GENERATIONS`]: folds the oldest away while there are more.
    pub fn prune(&self) -> Result<Vec<u32>, SnapError> {
        let mut removed = Vec::new();
        loop {
            let gens = self.generations()?;
            if gens.len() <= MAX_GENERATIONS {
                return Ok(removed);
            }
            self.delete(gens[0])?;
            removed.push(gens[0]);
        }
    }

    /// Replaces generation `b` (incremental on `a`) by `a` with `b` applied on top:
    /// kind and parent of `a`, state and config of `b`.
    fn fold(&self, a: &Manifest, b: &Manifest) -> Result<(), SnapError> {
        let (adir, bdir) = (self.gen_dir(a.generation), self.gen_dir(b.generation));
        let tmp = self.begin(b.generation)?;
        let mut m = b.clone();
        m.kind = a.kind;
        m.parent = a.parent;
        m.parts.clear();
        m.disks.clear();
        // State: b's, verified and copied.
        let sp = b.part(STATE)?;
        let src = format::verify_part(&bdir, sp)?;
        m.parts.push(copy_file(
            &src,
            sp.len,
            &bdir.join(STATE),
            &tmp.join(STATE),
        )?);
        // Memory: runs of both, b's bytes winning.
        let ra = RunsFile::open(&adir, a.part(MEMORY)?)?;
        let rb = RunsFile::open(&bdir, b.part(MEMORY)?)?;
        let (part, bytes) = merge_runs(&ra, &rb, &tmp.join(MEMORY))?;
        m.mem_pages_bytes = bytes;
        m.parts.push(part);
        for (i, (da, db)) in a.disks.iter().zip(&b.disks).enumerate() {
            let kind = if db.kind == Kind::Full {
                Kind::Full
            } else {
                da.kind
            };
            let out = tmp.join(Manifest::disk_file(i, kind));
            let part = match (da.kind, db.kind) {
                (_, Kind::Full) => {
                    let p = b.part(&Manifest::disk_file(i, Kind::Full))?;
                    let f = format::verify_part(&bdir, p)?;
                    copy_file(&f, p.len, &bdir.join(&p.file), &out)?
                }
                (Kind::Full, Kind::Incremental) => {
                    let p = a.part(&Manifest::disk_file(i, Kind::Full))?;
                    let f = format::verify_part(&adir, p)?;
                    let rb = RunsFile::open(&bdir, b.part(&Manifest::disk_file(i, db.kind))?)?;
                    patch_image(&f, p.len, &adir.join(&p.file), &rb, &out)?
                }
                (Kind::Incremental, Kind::Incremental) => {
                    let ra = RunsFile::open(&adir, a.part(&Manifest::disk_file(i, da.kind))?)?;
                    let rb = RunsFile::open(&bdir, b.part(&Manifest::disk_file(i, db.kind))?)?;
                    merge_runs(&ra, &rb, &out)?.0
                }
            };
            m.parts.push(part);
            m.disks.push(format::DiskPart {
                size: db.size,
                kind,
            });
        }
        self.commit(&tmp, &m)
    }
}

/// Swaps two directory entries atomically (renameat2 RENAME_EXCHANGE).
fn exchange(a: &Path, b: &Path) -> Result<(), SnapError> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes())
        .map_err(|_| SnapError::Invalid("NUL in path".into()))?;
    let cb = CString::new(b.as_os_str().as_bytes())
        .map_err(|_| SnapError::Invalid("NUL in path".into()))?;
    // SAFETY: both are valid NUL-terminated paths; AT_FDCWD resolves them as given.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(SnapError::io(b, std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Copies `len` bytes of an (already verified) file to `dst`, checksumming the copy.
pub fn copy_file(
    src: &fs::File,
    len: u64,
    src_path: &Path,
    dst: &Path,
) -> Result<format::Part, SnapError> {
    let mut w = PartWriter::create(dst)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], off)
            .map_err(|e| SnapError::io(src_path, e))?;
        w.write(&buf[..n])?;
        off += n as u64;
    }
    w.finish()
}

/// A whole image `src` with the blocks of `runs` written over it, into `dst`.
fn patch_image(
    src: &fs::File,
    len: u64,
    src_path: &Path,
    runs: &RunsFile,
    dst: &Path,
) -> Result<format::Part, SnapError> {
    // Walk the image in order, taking each byte from the runs where they cover it.
    let mut w = PartWriter::create(dst)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    let mut emit_src = |w: &mut PartWriter, from: u64, to: u64| -> Result<(), SnapError> {
        let mut o = from;
        while o < to {
            let n = (to - o).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], o)
                .map_err(|e| SnapError::io(src_path, e))?;
            w.write(&buf[..n])?;
            o += n as u64;
        }
        Ok(())
    };
    let mut rbuf = vec![0u8; 1 << 20];
    for &(addr, rlen, off) in &runs.runs {
        if addr.saturating_add(rlen) > len {
            return Err(SnapError::Corrupt(format!(
                "{}: block run {addr:#x}+{rlen:#x} is past the image's {len} bytes",
                runs.path.display()
            )));
        }
        emit_src(&mut w, pos, addr)?;
        let mut done = 0;
        while done < rlen {
            let n = (rlen - done).min(rbuf.len() as u64) as usize;
            runs.read_at(&mut rbuf[..n], off + done)?;
            w.write(&rbuf[..n])?;
            done += n as u64;
        }
        pos = addr + rlen;
    }
    emit_src(&mut w, pos, len)?;
    w.finish()
}

/// One piece of a merged run file: `len` bytes at `addr`, from `file` at `off`.
struct Piece<'a> {
    addr: u64,
    len: u64,
    file: &'a RunsFile,
    off: u64,
}

/// The union of two run files into `dst`, `b`'s bytes where both have an address.
/// Returns the part and the data bytes.
fn merge_runs(a: &RunsFile, b: &RunsFile, dst: &Path) -> Result<(format::Part, u64), SnapError> {
    let mut pieces: Vec<Piece<'_>> = Vec::new();
    let mut ai = a.runs.iter().copied().peekable();
    let mut cur_a: Option<(u64, u64, u64)> = ai.next();
    for &(baddr, blen, boff) in &b.runs {
        let bend = baddr + blen;
        // Pieces of `a` before and around this `b` run.
        while let Some((aa, al, ao)) = cur_a {
            let aend = aa + al;
            if aa >= bend {
                break;
            }
            if aa < baddr {
                let take = aend.min(baddr) - aa;
                pieces.push(Piece {
                    addr: aa,
                    len: take,
                    file: a,
                    off: ao,
                });
            }
            if aend > bend {
                // The rest of this `a` run continues after the `b` run.
                let skip = bend - aa;
                cur_a = Some((bend, aend - bend, ao + skip));
                break;
            }
            cur_a = ai.next();
        }
        pieces.push(Piece {
            addr: baddr,
            len: blen,
            file: b,
            off: boff,
        });
    }
    while let Some((aa, al, ao)) = cur_a {
        pieces.push(Piece {
            addr: aa,
            len: al,
            file: a,
            off: ao,
        });
        cur_a = ai.next();
    }
    // Coalesce adjacent pieces into runs for the header.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for p in &pieces {
        match runs.last_mut() {
            Some((s, l)) if *s + *l == p.addr => *l += p.len,
            _ => runs.push((p.addr, p.len)),
        }
    }
    let mut w = PartWriter::create(dst)?;
    w.write(&runs_header(&runs))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0;
    for p in &pieces {
        let mut done = 0;
        while done < p.len {
            let n = (p.len - done).min(buf.len() as u64) as usize;
            p.file.read_at(&mut buf[..n], p.off + done)?;
            w.write(&buf[..n])?;
            done += n as u64;
        }
        bytes += p.len;
    }
    Ok((w.finish()?, bytes))
}
