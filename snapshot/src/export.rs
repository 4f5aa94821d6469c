//! One portable file holding a whole generation (its chain merged into a full
//! snapshot), and importing it.
//!
//! File: header `TWRNEXPT` | version (u32) | section count (u32) | CRC-32C of those 16
//! bytes (u32); then sections, each: tag (4 bytes: `MANI`, `STAT`, `MEMR`, `DISK`) |
//! index (u32, the disk number for `DISK`) | length (u64) | CRC-32C of those 16 bytes
//! (u32) | data | CRC-32C of the data (u32). `MANI` is a framed manifest, `STAT` the VM
//! state bytes, `MEMR` a run file of all guest memory, `DISK` a raw image.
//!
//! Import reads the whole file and checks every checksum and every structure first;
//! only then does it write, into a new generation directory renamed into place.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::format::{
    self, decode_manifest, encode_manifest, runs_header, Kind, Manifest, PartWriter,
};
use super::rebuild::{config_of, Chain};
use super::store::{Store, MEMORY, STATE};
use super::SnapError;

pub const EXPORT_MAGIC: [u8; 8] = *b"TWRNEXPT";
const TAGS: [&[u8; 4]; 4] = [b"MANI", b"STAT", b"MEMR", b"DISK"];
/// Largest manifest or state section import will hold in memory.
const MAX_SMALL_SECTION: u64 = 64 << 20;

fn section_header(tag: &[u8; 4], index: u32, len: u64) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[..4].copy_from_slice(tag);
    h[4..8].copy_from_slice(&index.to_le_bytes());
    h[8..16].copy_from_slice(&len.to_le_bytes());
    let c = format::crc(&h[..16]);
    h[16..].copy_from_slice(&c.to_le_bytes());
    h
}

struct Out {
    w: BufWriter<File>,
    path: PathBuf,
}

impl Out {
    fn put(&mut self, b: &[u8]) -> Result<(), SnapError> {
        self.w
            .write_all(b)
            .map_err(|e| SnapError::io(&self.path, e))
    }

    /// A section whose data comes from `fill`, which must write exactly `len` bytes
    /// through the given writer; returns the data CRC.
    fn section(
        &mut self,
        tag: &[u8; 4],
        index: u32,
        len: u64,
        fill: impl FnOnce(&mut dyn FnMut(&[u8]) -> Result<(), SnapError>) -> Result<(), SnapError>,
    ) -> Result<(), SnapError> {
        self.put(&section_header(tag, index, len))?;
        let mut c = 0u32;
        let mut n = 0u64;
        {
            let mut sink = |b: &[u8]| -> Result<(), SnapError> {
                c = crc32c::crc32c_append(c, b);
                n += b.len() as u64;
                self.w
                    .write_all(b)
                    .map_err(|e| SnapError::io(&self.path, e))
            };
            fill(&mut sink)?;
        }
        if n != len {
            return Err(SnapError::Vm(format!(
                "section {tag:?}: wrote {n} of {len} bytes"
            )));
        }
        self.put(&c.to_le_bytes())
    }
}

/// Writes generation `g` of `store`, merged into one full snapshot, to `file`.
pub fn export(store: &Store, g: u32, file: &Path) -> Result<u64, SnapError> {
    let chain = Chain::load(store, g)?;
    let mut m = chain.top().clone();
    m.kind = Kind::Full;
    m.parent = None;
    m.disks.iter_mut().for_each(|d| d.kind = Kind::Full);
    let state = fs::read(chain.gens[chain.gens.len() - 1].0.join(STATE))
        .map_err(|e| SnapError::io(file, e))?;
    chain.state()?; // verified
    let mem = vmm::vstate::memory::create_guest_memory(m.mem_bytes)
        .map_err(|e| SnapError::Vm(format!("guest memory of {} bytes: {e}", m.mem_bytes)))?;
    chain.fill_memory(&mem)?;
    let regions: Vec<(u64, u64)> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
    m.mem_pages_bytes = regions.iter().map(|r| r.1).sum();
    let manifest = encode_manifest(&m)?;

    let tmp = file.with_file_name(format!(".{}.tmp", format::file_name(file)));
    let f = File::create(&tmp).map_err(|e| SnapError::io(&tmp, e))?;
    let mut out = Out {
        w: BufWriter::with_capacity(1 << 20, f),
        path: tmp.clone(),
    };
    let r = (|| {
        let count = 3 + m.disks.len() as u32;
        let mut h = Vec::new();
        h.extend_from_slice(&EXPORT_MAGIC);
        h.extend_from_slice(&format::FORMAT_VERSION.to_le_bytes());
        h.extend_from_slice(&count.to_le_bytes());
        let c = format::crc(&h);
        h.extend_from_slice(&c.to_le_bytes());
        out.put(&h)?;
        out.section(b"MANI", 0, manifest.len() as u64, |w| w(&manifest))?;
        out.section(b"STAT", 0, state.len() as u64, |w| w(&state))?;
        let header = runs_header(&regions);
        let len = header.len() as u64 + m.mem_pages_bytes;
        out.section(b"MEMR", 0, len, |w| {
            w(&header)?;
            let mut buf = vec![0u8; 1 << 20];
            for &(a, l) in &regions {
                let mut off = 0;
                while off < l {
                    let n = (l - off).min(buf.len() as u64) as usize;
                    mem.read_slice(&mut buf[..n], GuestAddress(a + off))
                        .map_err(|e| SnapError::Vm(format!("read rebuilt memory: {e}")))?;
                    w(&buf[..n])?;
                    off += n as u64;
                }
            }
            Ok(())
        })?;
        for i in 0..m.disks.len() {
            let img = file.with_file_name(format!(".{}.disk{i}.tmp", format::file_name(file)));
            let r = chain.write_disk(i, &img).and_then(|()| {
                let mut f = File::open(&img).map_err(|e| SnapError::io(&img, e))?;
                let len = f.metadata().map_err(|e| SnapError::io(&img, e))?.len();
                out.section(b"DISK", i as u32, len, |w| {
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let n = f.read(&mut buf).map_err(|e| SnapError::io(&img, e))?;
                        if n == 0 {
                            return Ok(());
                        }
                        w(&buf[..n])?;
                    }
                })
            });
            let _ = fs::remove_file(&img);
            r?;
        }
        let f = out
            .w
            .into_inner()
            .map_err(|e| SnapError::io(&tmp, e.into_error()))?;
        f.sync_all().map_err(|e| SnapError::io(&tmp, e))?;
        Ok(f.metadata().map_err(|e| SnapError::io(&tmp, e))?.len())
    })();
    match r {
        Ok(len) => {
            fs::rename(&tmp, file).map_err(|e| SnapError::io(file, e))?;
            Ok(len)
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Where a section's data is in the file.
struct Section {
    tag: [u8; 4],
    index: u32,
    offset: u64,
    len: u64,
    crc: u32,
}

/// Everything checked about an export file.
struct Checked {
    manifest: Manifest,
    sections: Vec<Section>,
}

fn corrupt(file: &Path, why: impl std::fmt::Display) -> SnapError {
    SnapError::Corrupt(format!(
        "{}: not a valid twinrun snapshot export: {why}; nothing was imported",
        file.display()
    ))
}

/// Reads the whole file, checking every checksum and structure.
fn check(file: &Path) -> Result<Checked, SnapError> {
    let f = File::open(file).map_err(|e| SnapError::io(file, e))?;
    let total = f.metadata().map_err(|e| SnapError::io(file, e))?.len();
    let mut r = BufReader::with_capacity(1 << 20, f);
    let mut read = |buf: &mut [u8], what: &str| -> Result<(), SnapError> {
        r.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                corrupt(file, format!("truncated in {what} ({total} bytes)"))
            } else {
                SnapError::io(file, e)
            }
        })
    };
    let mut h = [0u8; 20];
    read(&mut h, "the header")?;
    if h[..8] != EXPORT_MAGIC {
        return Err(corrupt(file, "bad magic (expected TWRNEXPT)"));
    }
    if format::crc(&h[..16]).to_le_bytes() != h[16..20] {
        return Err(corrupt(file, "header checksum mismatch"));
    }
    let version = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default());
    if version != format::FORMAT_VERSION {
        return Err(corrupt(
            file,
            format!("format version {version} is not supported"),
        ));
    }
    let count = u32::from_le_bytes(h[12..16].try_into().unwrap_or_default());
    if !(3..=64).contains(&count) {
        return Err(corrupt(file, format!("{count} sections")));
    }
    let mut offset = 20u64;
    let mut sections = Vec::new();
    let mut small: Vec<Vec<u8>> = Vec::new();
    let mut mem_head = Vec::new();
    for s in 0..count {
        let mut sh = [0u8; 20];
        read(&mut sh, &format!("section {s}'s header"))?;
        if format::crc(&sh[..16]).to_le_bytes() != sh[16..20] {
            return Err(corrupt(
                file,
                format!("section {s}: header checksum mismatch"),
            ));
        }
        let tag: [u8; 4] = sh[..4].try_into().unwrap_or_default();
        let index = u32::from_le_bytes(sh[4..8].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(sh[8..16].try_into().unwrap_or_default());
        let expect = TAGS[(s as usize).min(3)];
        let want_index = s.saturating_sub(3);
        if &tag != expect || index != want_index {
            return Err(corrupt(
                file,
                format!(
                    "section {s} is {:?}/{index}, expected {:?}/{want_index}",
                    String::from_utf8_lossy(&tag),
                    String::from_utf8_lossy(expect)
                ),
            ));
        }
        if offset + 20 + len + 4 > total {
            return Err(corrupt(
                file,
                format!("truncated in section {s} ({total} bytes)"),
            ));
        }
        let keep = s < 2;
        if keep && len > MAX_SMALL_SECTION {
            return Err(corrupt(
                file,
                format!("section {s} is too large ({len} bytes)"),
            ));
        }
        let mut data = Vec::new();
        let mut c = 0u32;
        let mut left = len;
        let mut buf = vec![0u8; 1 << 20];
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            read(&mut buf[..n], &format!("section {s}"))?;
            c = crc32c::crc32c_append(c, &buf[..n]);
            if keep {
                data.extend_from_slice(&buf[..n]);
            } else if s == 2 && mem_head.len() < 1 << 20 {
                mem_head.extend_from_slice(&buf[..n]);
            }
            left -= n as u64;
        }
        let mut stored = [0u8; 4];
        read(&mut stored, &format!("section {s}'s checksum"))?;
        if u32::from_le_bytes(stored) != c {
            return Err(corrupt(
                file,
                format!(
                    "section {s} ({}) checksum mismatch: the file is damaged",
                    String::from_utf8_lossy(&tag)
                ),
            ));
        }
        sections.push(Section {
            tag,
            index,
            offset: offset + 20,
            len,
            crc: c,
        });
        if keep {
            small.push(data);
        }
        offset += 20 + len + 4;
    }
    if offset != total {
        return Err(corrupt(
            file,
            format!("{} bytes after the last section", total - offset),
        ));
    }
    let manifest = decode_manifest(&small[0], "manifest section").map_err(|e| corrupt(file, e))?;
    config_of(&manifest).map_err(|e| corrupt(file, e))?;
    let state = vmm::VmState::from_bytes(&small[1]).map_err(|e| corrupt(file, e))?;
    let mem_total: u64 = state.memory.iter().map(|r| r.1).sum();
    if mem_total != manifest.mem_bytes {
        return Err(corrupt(file, "state and manifest disagree on memory size"));
    }
    // The memory section must be a run file covering exactly the state's regions.
    let expect_head = runs_header(&state.memory);
    if !mem_head.starts_with(&expect_head)
        || sections[2].len != expect_head.len() as u64 + mem_total
    {
        return Err(corrupt(
            file,
            "memory section does not match the state's memory layout",
        ));
    }
    if sections.len() != 3 + manifest.disks.len() {
        return Err(corrupt(file, "disk sections do not match the manifest"));
    }
    for (d, s) in manifest.disks.iter().zip(&sections[3..]) {
        if d.size != s.len {
            return Err(corrupt(
                file,
                format!(
                    "disk {} has {} bytes, manifest says {}",
                    s.index, s.len, d.size
                ),
            ));
        }
    }
    Ok(Checked { manifest, sections })
}

/// Imports `file` as the next generation (a full one) of VM `name` (default: the
/// name in the file). Returns (vm name, generation).
pub fn import(file: &Path, name: Option<&str>) -> Result<(String, u32), SnapError> {
    let checked = check(file)?;
    let vm = name.unwrap_or(&checked.manifest.vm).to_string();
    let store = Store::new(&vm)?;
    let g = store.generations()?.last().map_or(1, |n| n + 1);
    let tmp = store.begin(g)?;
    let r = (|| {
        let mut f = File::open(file).map_err(|e| SnapError::io(file, e))?;
        let mut m = checked.manifest.clone();
        m.vm = vm.clone();
        m.generation = g;
        m.parent = None;
        m.kind = Kind::Full;
        m.parts.clear();
        for s in &checked.sections[1..] {
            let name = match &s.tag {
                b"STAT" => STATE.to_string(),
                b"MEMR" => MEMORY.to_string(),
                _ => Manifest::disk_file(s.index as usize, Kind::Full),
            };
            f.seek(std::io::SeekFrom::Start(s.offset))
                .map_err(|e| SnapError::io(file, e))?;
            let mut w = PartWriter::create(&tmp.join(&name))?;
            let mut left = s.len;
            let mut buf = vec![0u8; 1 << 20];
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                f.read_exact(&mut buf[..n])
                    .map_err(|e| SnapError::io(file, e))?;
                w.write(&buf[..n])?;
                left -= n as u64;
            }
            let part = w.finish()?;
            // The file could have changed since it was checked.
            if part.crc32c != s.crc {
                return Err(corrupt(file, "changed while being imported"));
            }
            m.parts.push(part);
        }
        store.commit(&tmp, &m)
    })();
    if let Err(e) = r {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok((vm, g))
}
