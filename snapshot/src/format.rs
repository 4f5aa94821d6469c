//! The byte formats of a snapshot: framed records (manifest), page/block run files
//! (memory and incremental disks), and the checksummed part writer/reader.
//!
//! Framed record: magic (8) | version (u32 LE) | payload length (u64 LE) | payload |
//! CRC-32C (u32 LE) of everything before it.
//!
//! Run file (`*.runs`): magic `TWRNRUNS` | version (u32) | unit (u32, 4096) | run count
//! (u64) | runs: (address u64, length u64) each, ascending and disjoint | the data of
//! every run, in run order. Addresses are guest-physical (memory) or byte offsets into
//! the image (disks). The whole file's CRC-32C and length are in the manifest.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::SnapError;

/// Version of every format in this module (manifest, run files, export file).
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_MAGIC: [u8; 8] = *b"TWRNMANI";
pub const RUNS_MAGIC: [u8; 8] = *b"TWRNRUNS";
/// Unit of memory pages and disk blocks in run files.
pub const UNIT: u64 = 4096;
const RUNS_HEADER: u64 = 8 + 4 + 4 + 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// All memory and whole disk images.
    Full,
    /// Only what changed since the parent generation.
    Incremental,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Full => "full",
            Kind::Incremental => "incremental",
        })
    }
}

/// One file of a generation, with its size and checksum.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub file: String,
    pub len: u64,
    pub crc32c: u32,
}

/// How one configured disk is held by a generation: a whole image (`disk-<i>.img`) or
/// the changed blocks (`disk-<i>.runs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskPart {
    pub size: u64,
    pub kind: Kind,
}

/// What a generation is; `manifest.bin` of its directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub vm: String,
    pub generation: u32,
    /// The generation this one's pages and blocks apply on top of (`None` when full).
    pub parent: Option<u32>,
    pub kind: Kind,
    /// Random per snapshot: tells a running VM whether its last snapshot is still the
    /// newest generation (else its next one must be full).
    pub snapshot_id: u64,
    pub created_unix_ms: u64,
    /// The VM config (TOML of `vmm::config::VmConfig`).
    pub config_toml: String,
    pub mem_bytes: u64,
    /// Bytes of memory pages held by this generation.
    pub mem_pages_bytes: u64,
    /// How long the VM was paused for this snapshot.
    pub pause_us: u64,
    /// CRC-32C of all guest memory at the snapshot point, when taken in check mode
    /// (`TWINRUN_SNAPSHOT_MEMCHECK=1`): a rebuilt memory can be compared against it.
    pub memory_crc32c: Option<u32>,
    /// `state.bin`, `memory.runs`, then one per disk.
    pub parts: Vec<Part>,
    pub disks: Vec<DiskPart>,
}

impl Manifest {
    pub fn part(&self, file: &str) -> Result<&Part, SnapError> {
        self.parts.iter().find(|p| p.file == file).ok_or_else(|| {
            SnapError::Corrupt(format!(
                "generation {}: manifest lists no part {file}",
                self.generation
            ))
        })
    }

    /// Total bytes of the generation's parts.
    pub fn size(&self) -> u64 {
        self.parts.iter().map(|p| p.len).sum()
    }

    pub fn disk_file(i: usize, kind: Kind) -> String {
        match kind {
            Kind::Full => format!("disk-{i}.img"),
            Kind::Incremental => format!("disk-{i}.runs"),
        }
    }
}

pub fn crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// `magic | version | len | payload | crc`.
pub fn frame(magic: [u8; 8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 24);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let c = crc(&out);
    out.extend_from_slice(&c.to_le_bytes());
    out
}

/// Checks a framed record and returns its payload; `what` names it in errors.
pub fn unframe<'a>(magic: [u8; 8], b: &'a [u8], what: &str) -> Result<&'a [u8], SnapError> {
    let bad = |why: String| SnapError::Corrupt(format!("{what}: {why}"));
    if b.len() < 8 || b[..8] != magic {
        return Err(bad(format!(
            "not a twinrun {} record (bad magic)",
            String::from_utf8_lossy(&magic)
        )));
    }
    if b.len() < 24 {
        return Err(bad(format!("truncated: {} bytes", b.len())));
    }
    let version = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
    if version != FORMAT_VERSION {
        return Err(bad(format!(
            "format version {version} is not supported (this build reads {FORMAT_VERSION})"
        )));
    }
    let len = u64::from_le_bytes(b[12..20].try_into().unwrap_or_default());
    let need = len.saturating_add(24);
    if (b.len() as u64) < need {
        return Err(bad(format!("truncated: {} bytes, {need} needed", b.len())));
    }
    if (b.len() as u64) > need {
        return Err(bad(format!(
            "{} bytes after its end",
            b.len() as u64 - need
        )));
    }
    let end = need as usize - 4;
    let stored = u32::from_le_bytes(b[end..].try_into().unwrap_or_default());
    let computed = crc(&b[..end]);
    if stored != computed {
        return Err(bad(format!(
            "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        )));
    }
    Ok(&b[20..end])
}

pub fn encode_manifest(m: &Manifest) -> Result<Vec<u8>, SnapError> {
    let payload = postcard::to_allocvec(m)
        .map_err(|e| SnapError::Corrupt(format!("cannot encode manifest: {e}")))?;
    Ok(frame(MANIFEST_MAGIC, &payload))
}

pub fn decode_manifest(b: &[u8], what: &str) -> Result<Manifest, SnapError> {
    let payload = unframe(MANIFEST_MAGIC, b, what)?;
    let (m, rest) = postcard::take_from_bytes::<Manifest>(payload)
        .map_err(|e| SnapError::Corrupt(format!("{what}: manifest does not decode: {e}")))?;
    if !rest.is_empty() {
        return Err(SnapError::Corrupt(format!(
            "{what}: {} undecoded manifest bytes",
            rest.len()
        )));
    }
    Ok(m)
}

/// Writes a part file, counting bytes and checksumming as it goes.
pub struct PartWriter {
    path: PathBuf,
    out: BufWriter<File>,
    len: u64,
    hasher: u32,
}

impl PartWriter {
    pub fn create(path: &Path) -> Result<PartWriter, SnapError> {
        let f = File::create(path).map_err(|e| SnapError::io(path, e))?;
        Ok(PartWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 20, f),
            len: 0,
            hasher: 0,
        })
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), SnapError> {
        self.out
            .write_all(data)
            .map_err(|e| SnapError::io(&self.path, e))?;
        self.hasher = crc32c::crc32c_append(self.hasher, data);
        self.len += data.len() as u64;
        Ok(())
    }

    /// Flushes and fsyncs; returns the part record.
    pub fn finish(self) -> Result<Part, SnapError> {
        let path = self.path.clone();
        let f = self
            .out
            .into_inner()
            .map_err(|e| SnapError::io(&path, e.into_error()))?;
        f.sync_all().map_err(|e| SnapError::io(&path, e))?;
        Ok(Part {
            file: file_name(&path),
            len: self.len,
            crc32c: self.hasher,
        })
    }
}

pub fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The header of a run file.
pub fn runs_header(runs: &[(u64, u64)]) -> Vec<u8> {
    let mut h = Vec::with_capacity(RUNS_HEADER as usize + runs.len() * 16);
    h.extend_from_slice(&RUNS_MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    h.extend_from_slice(&(UNIT as u32).to_le_bytes());
    h.extend_from_slice(&(runs.len() as u64).to_le_bytes());
    for &(a, l) in runs {
        h.extend_from_slice(&a.to_le_bytes());
        h.extend_from_slice(&l.to_le_bytes());
    }
    h
}

/// Reads a whole part file, checking its length and CRC against the manifest (so
/// nothing of a damaged file is used).
pub fn verify_part(dir: &Path, part: &Part) -> Result<File, SnapError> {
    let path = dir.join(&part.file);
    let mut f = File::open(&path).map_err(|e| SnapError::io(&path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut len, mut c) = (0u64, 0u32);
    loop {
        let n = f.read(&mut buf).map_err(|e| SnapError::io(&path, e))?;
        if n == 0 {
            break;
        }
        c = crc32c::crc32c_append(c, &buf[..n]);
        len += n as u64;
    }
    if len != part.len {
        return Err(SnapError::Corrupt(format!(
            "{}: {len} bytes, the manifest says {} (truncated or damaged)",
            path.display(),
            part.len
        )));
    }
    if c != part.crc32c {
        return Err(SnapError::Corrupt(format!(
            "{}: checksum mismatch (manifest {:#010x}, file {c:#010x})",
            path.display(),
            part.crc32c
        )));
    }
    Ok(f)
}

/// A verified run file: its runs and where each one's data starts in the file.
pub struct RunsFile {
    pub path: PathBuf,
    pub file: File,
    /// `(address, length, data offset in the file)`.
    pub runs: Vec<(u64, u64, u64)>,
}

impl RunsFile {
    /// Opens and verifies a run file part of generation directory `dir`.
    pub fn open(dir: &Path, part: &Part) -> Result<RunsFile, SnapError> {
        let file = verify_part(dir, part)?;
        let path = dir.join(&part.file);
        let runs = parse_runs(&file, part.len)
            .map_err(|why| SnapError::Corrupt(format!("{}: {why}", path.display())))?;
        Ok(RunsFile { path, file, runs })
    }

    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), SnapError> {
        self.file
            .read_exact_at(buf, off)
            .map_err(|e| SnapError::io(&self.path, e))
    }

    /// Calls `f(address, data)` for every run, in pieces of at most 1 MiB.
    pub fn for_each(
        &self,
        mut f: impl FnMut(u64, &[u8]) -> Result<(), SnapError>,
    ) -> Result<(), SnapError> {
        let mut buf = vec![0u8; 1 << 20];
        for &(addr, len, off) in &self.runs {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                self.read_at(&mut buf[..n], off + done)?;
                f(addr + done, &buf[..n])?;
                done += n as u64;
            }
        }
        Ok(())
    }
}

/// Parses and checks the header of a run file of `len` bytes.
pub fn parse_runs(f: &File, len: u64) -> Result<Vec<(u64, u64, u64)>, String> {
    let mut h = [0u8; RUNS_HEADER as usize];
    if len < RUNS_HEADER {
        return Err(format!("truncated run file ({len} bytes)"));
    }
    f.read_exact_at(&mut h, 0).map_err(|e| e.to_string())?;
    if h[..8] != RUNS_MAGIC {
        return Err("not a twinrun run file (bad magic)".into());
    }
    let version = u32::from_le_bytes(h[8..12].try_into().unwrap_or_default());
    if version != FORMAT_VERSION {
        return Err(format!("run file version {version} is not supported"));
    }
    let count = u64::from_le_bytes(h[16..24].try_into().unwrap_or_default());
    let table = count
        .checked_mul(16)
        .and_then(|t| t.checked_add(RUNS_HEADER))
        .filter(|&t| t <= len)
        .ok_or_else(|| format!("run table of {count} runs does not fit in {len} bytes"))?;
    let mut raw = vec![0u8; (table - RUNS_HEADER) as usize];
    f.read_exact_at(&mut raw, RUNS_HEADER)
        .map_err(|e| e.to_string())?;
    let mut runs = Vec::with_capacity(count as usize);
    let mut off = table;
    let mut prev_end = 0u64;
    for c in raw.chunks_exact(16) {
        let a = u64::from_le_bytes(c[..8].try_into().unwrap_or_default());
        let l = u64::from_le_bytes(c[8..].try_into().unwrap_or_default());
        let end = a
            .checked_add(l)
            .ok_or("run past the end of the address space")?;
        if l == 0 || a < prev_end {
            return Err(format!(
                "run {a:#x}+{l:#x} is empty, out of order or overlapping"
            ));
        }
        prev_end = end;
        runs.push((a, l, off));
        off = off.checked_add(l).ok_or("run data too long")?;
    }
    if off != len {
        return Err(format!(
            "runs hold {} data bytes, the file has {}",
            off - table,
            len - table
        ));
    }
    Ok(runs)
}
