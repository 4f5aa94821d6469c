//! The witness's durable state: one small file per (cluster, VM), replaced atomically
//! (write a temp file, fsync, rename, fsync the directory) BEFORE the witness answers a
//! request that changed it, so a restarted witness never grants an old generation again.
//!
//! Layout: `<state_dir>/<cluster>/<vm>.rec` (names are checked by `types::check_name`),
//! each file `magic "TWQW" | version u8 | len u32 LE | postcard VmRecord | sha256[..8]`.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::types::{check_name, Generation, NodeId};

/// What the witness remembers about one VM across restarts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub generation: Generation,
    /// Who was granted (or adopted) `generation`; None while unknown.
    pub holder: Option<NodeId>,
    /// The holder's peer has a stale replica: it may not acquire the next generation.
    pub peer_outdated: bool,
    /// The holder's lease length: after a restart the witness assumes the holder may
    /// have renewed just before the crash and waits this long before granting.
    pub lease_ms: u32,
}

/// Where records are made durable. The file store is the real one; the simulation
/// keeps records in memory that survive a simulated crash.
pub trait Store {
    /// Makes `rec` durable for (`cluster`, `vm`); returns only once it is.
    fn save(&mut self, cluster: &str, vm: &str, rec: &VmRecord) -> io::Result<()>;
}

/// Records kept in memory (tests and the simulation: "durable" = survives a restart
/// of the witness object).
#[derive(Default, Debug, Clone)]
pub struct MemStore {
    pub records: BTreeMap<(String, String), VmRecord>,
    /// Make the next saves fail (a full or broken disk).
    pub fail: bool,
}

impl Store for MemStore {
    fn save(&mut self, cluster: &str, vm: &str, rec: &VmRecord) -> io::Result<()> {
        if self.fail {
            return Err(io::Error::other("injected storage failure"));
        }
        self.records
            .insert((cluster.to_string(), vm.to_string()), *rec);
        Ok(())
    }
}

const MAGIC: &[u8; 4] = b"TWQW";
const VERSION: u8 = 1;
const MAX_RECORD: usize = 256;

/// Why the state directory cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: damaged record: {why}")]
    Damaged { path: PathBuf, why: String },
}

/// The witness's state directory.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl FileStore {
    /// Opens (creating) the state directory.
    pub fn open(dir: &Path) -> Result<FileStore, StoreError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        Ok(FileStore {
            dir: dir.to_path_buf(),
        })
    }

    /// Every record in the directory. A damaged record is an error, not skipped: the
    /// witness must not start and forget a generation it granted.
    pub fn load_all(&self) -> Result<Vec<(String, String, VmRecord)>, StoreError> {
        let mut out = Vec::new();
        for c in fs::read_dir(&self.dir).map_err(io_err(&self.dir))? {
            let c = c.map_err(io_err(&self.dir))?;
            let cpath = c.path();
            let Some(cluster) = c.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if check_name("cluster", &cluster).is_err() || !cpath.is_dir() {
                continue;
            }
            for v in fs::read_dir(&cpath).map_err(io_err(&cpath))? {
                let v = v.map_err(io_err(&cpath))?;
                let path = v.path();
                let name = v.file_name();
                let Some(vm) = name.to_str().and_then(|n| n.strip_suffix(".rec")) else {
                    continue; // temp files and strangers
                };
                if check_name("vm", vm).is_err() {
                    continue;
                }
                let bytes = fs::read(&path).map_err(io_err(&path))?;
                let rec = decode(&bytes).map_err(|why| StoreError::Damaged {
                    path: path.clone(),
                    why,
                })?;
                out.push((cluster.clone(), vm.to_string(), rec));
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        Ok(out)
    }
}

impl Store for FileStore {
    fn save(&mut self, cluster: &str, vm: &str, rec: &VmRecord) -> io::Result<()> {
        check_name("cluster", cluster).map_err(io::Error::other)?;
        check_name("vm", vm).map_err(io::Error::other)?;
        let cdir = self.dir.join(cluster);
        if !cdir.is_dir() {
            fs::create_dir_all(&cdir)?;
            File::open(&self.dir)?.sync_all()?;
        }
        let tmp = cdir.join(format!("{vm}.rec.tmp"));
        let dst = cdir.join(format!("{vm}.rec"));
        let bytes = encode(rec);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &dst)?;
        File::open(&cdir)?.sync_all()
    }
}

fn checksum(body: &[u8]) -> [u8; 8] {
    let d = Sha256::digest(body);
    let mut c = [0u8; 8];
    c.copy_from_slice(&d[..8]);
    c
}

/// Encodes a record file.
pub fn encode(rec: &VmRecord) -> Vec<u8> {
    let body = postcard::to_stdvec(rec).unwrap_or_default();
    let mut out = Vec::with_capacity(17 + body.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out.extend_from_slice(&checksum(&out[9..]));
    out
}

/// Decodes a record file, checking magic, version, length and checksum.
pub fn decode(b: &[u8]) -> Result<VmRecord, String> {
    if b.len() < 17 || b.len() > MAX_RECORD {
        return Err(format!("length {} (expected 17..={MAX_RECORD})", b.len()));
    }
    if &b[..4] != MAGIC {
        return Err("bad magic".into());
    }
    if b[4] != VERSION {
        return Err(format!("version {} (expected {VERSION})", b[4]));
    }
    let len = u32::from_le_bytes([b[5], b[6], b[7], b[8]]) as usize;
    if 9 + len + 8 != b.len() {
        return Err(format!("body length {len} does not match the file"));
    }
    let body = &b[9..9 + len];
    if checksum(body) != b[9 + len..] {
        return Err("checksum mismatch".into());
    }
    let rec: VmRecord = postcard::from_bytes(body).map_err(|e| format!("undecodable: {e}"))?;
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(g: u64) -> VmRecord {
        VmRecord {
            generation: g,
            holder: Some(NodeId(2)),
            peer_outdated: true,
            lease_ms: 200,
        }
    }

    #[test]
    fn round_trip_and_reload() {
        let d = tempfile::tempdir().unwrap();
        let mut s = FileStore::open(d.path()).unwrap();
        s.save("c1", "vm0", &rec(3)).unwrap();
        s.save("c1", "vm0", &rec(4)).unwrap();
        s.save("c2", "vm1", &rec(1)).unwrap();
        let all = FileStore::open(d.path()).unwrap().load_all().unwrap();
        assert_eq!(
            all,
            vec![
                ("c1".into(), "vm0".into(), rec(4)),
                ("c2".into(), "vm1".into(), rec(1))
            ]
        );
        // A leftover temp file (crash between write and rename) is ignored.
        fs::write(d.path().join("c1/vm0.rec.tmp"), b"junk").unwrap();
        assert_eq!(
            FileStore::open(d.path()).unwrap().load_all().unwrap().len(),
            2
        );
    }

    #[test]
    fn damage_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let mut s = FileStore::open(d.path()).unwrap();
        s.save("c1", "vm0", &rec(3)).unwrap();
        let p = d.path().join("c1/vm0.rec");
        let mut b = fs::read(&p).unwrap();
        let n = b.len();
        b[n - 9] ^= 1;
        fs::write(&p, &b).unwrap();
        let e = s.load_all().unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        for bad in [&b"TWQW"[..], &[0u8; 20][..]] {
            assert!(decode(bad).is_err());
        }
    }

    #[test]
    fn names_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let mut s = FileStore::open(d.path()).unwrap();
        assert!(s.save("../x", "vm0", &rec(1)).is_err());
        assert!(s.save("c", "a/b", &rec(1)).is_err());
    }
}
