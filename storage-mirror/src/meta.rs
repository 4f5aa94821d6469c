//! Per-replica metadata, kept in a directory beside the image: `disk.img` ->
//! `disk.img.twinrun/meta` (the dirty bitmap lives in the same directory, see
//! [`MetaStore::bitmap_path`]).
//!
//! The metadata says which *generation* of data the replica holds and how it relates to
//! the peer's: the resync decision ([`crate::decision`]) is a pure function of both
//! sides' [`MetaState`].
//!
//! File format (all integers little endian):
//!
//! | bytes | field |
//! | --- | --- |
//! | 8 | magic `TWRNMETA` |
//! | 4 | format version ([`META_VERSION`]) |
//! | 4 | body length (at most [`MAX_BODY_LEN`]) |
//! | n | postcard-encoded [`ReplicaMeta`] |
//! | 4 | CRC32C of everything before it |
//!
//! Saving is crash-safe: the new file is written to `meta.tmp`, fsynced, renamed over
//! `meta`, and the directory fsynced, so after a crash `meta` is either the old or the new
//! version, never a mix. A torn `meta.tmp` left behind is never read.
//!
//! I/O: this module reads and writes files; [`ReplicaMeta`] itself is plain data.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const META_VERSION: u32 = 1;
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// Earlier generations remembered; enough to recognise a peer that missed a few
/// restarts, small enough that an unrelated disk is not mistaken for an old copy.
pub const HISTORY_LEN: usize = 4;
/// Upper bound of the encoded body: the metadata is a few hundred bytes; anything
/// larger is damage, not data.
pub const MAX_BODY_LEN: u32 = 64 * 1024;

const MAGIC: [u8; 8] = *b"TWRNMETA";
const HEADER_LEN: usize = 16;
const CRC_LEN: usize = 4;
const META_FILE: &str = "meta";
const META_TMP: &str = "meta.tmp";
const BITMAP_FILE: &str = "bitmap";
/// getrandom returning zero (or the same id) twice in a row is already absurd; the
/// bound only keeps the loop explicit.
const RANDOM_ATTEMPTS: u32 = 16;
/// Where block devices' metadata lives unless `$TWINRUN_STATE_DIR` says otherwise.
const DEFAULT_STATE_DIR: &str = "/var/lib/twinrun";

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("replica metadata {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    #[error("replica metadata: encode: {0}")]
    Encode(#[from] postcard::Error),
    #[error("replica metadata: getrandom: {0}")]
    Random(io::Error),
    #[error("replica metadata is invalid: {0}")]
    Invalid(String),
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> MetaError + 'a {
    move |source| MetaError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Progress of a resync this replica is the target of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResyncProgress {
    pub full: bool,
    pub total_blocks: u64,
    pub done_blocks: u64,
}

/// Result of the last finished online verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub finished_unix_ms: u64,
    pub ranges_compared: u64,
    pub ranges_differing: u64,
    pub blocks_marked: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaMeta {
    pub disk_size: u64,
    pub block_size: u32,
    /// Random nonzero id of the data generation this replica holds.
    pub current_gen: u64,
    /// 0 = none; else the generation both replicas shared when the bitmap began recording.
    pub bitmap_base_gen: u64,
    /// Earlier `current_gen` values, newest first, at most [`HISTORY_LEN`].
    pub history: Vec<u64>,
    /// Set while running as primary or alone; cleared on clean shutdown.
    pub unclean_primary: bool,
    /// A resync target until the resync ends: never promoted or used for failover.
    pub inconsistent: bool,
    /// When `inconsistent`: the source's `current_gen` the resync copies from.
    pub sync_source_gen: u64,
    /// The local disk failed: needs replacement and a full resync.
    pub failed: bool,
    pub last_committed_epoch: Option<u64>,
    pub resync: Option<ResyncProgress>,
    pub verify: Option<VerifyReport>,
    /// Identity of the image file, to detect a replaced disk.
    pub image_dev: u64,
    pub image_ino: u64,
}

impl ReplicaMeta {
    /// Start running without the peer: from now on the bitmap records every write, and
    /// this replica's data is a new generation the peer never saw.
    pub fn new_generation(&mut self) -> Result<(), MetaError> {
        let mut fresh = random_nonzero_u64()?;
        for _ in 0..RANDOM_ATTEMPTS {
            if fresh != self.current_gen && !self.history.contains(&fresh) {
                break;
            }
            fresh = random_nonzero_u64()?;
        }
        self.advance_generation(fresh);
        Ok(())
    }

    /// The deterministic core of [`Self::new_generation`], with the new id given.
    /// The bitmap base is kept when already set: the bitmap keeps recording since the
    /// last generation both replicas shared, across any number of restarts alone.
    pub fn advance_generation(&mut self, fresh: u64) {
        assert_ne!(fresh, 0, "generation ids are nonzero");
        assert_ne!(fresh, self.current_gen, "a new generation needs a new id");
        if self.bitmap_base_gen == 0 {
            self.bitmap_base_gen = self.current_gen;
        }
        self.history.insert(0, self.current_gen);
        self.history.truncate(HISTORY_LEN);
        self.current_gen = fresh;
    }

    /// The invariants every stored metadata satisfies.
    pub fn validate(&self) -> Result<(), String> {
        if self.current_gen == 0 {
            return Err("current generation is 0".into());
        }
        if self.block_size == 0 || !self.block_size.is_power_of_two() {
            return Err(format!(
                "block size {} is not a power of two",
                self.block_size
            ));
        }
        if self.history.len() > HISTORY_LEN {
            return Err(format!(
                "history holds {} generations, at most {HISTORY_LEN}",
                self.history.len()
            ));
        }
        if self.inconsistent && self.sync_source_gen == 0 {
            return Err("inconsistent without a sync source generation".into());
        }
        if let Some(p) = self.resync {
            if p.done_blocks > p.total_blocks {
                return Err(format!(
                    "resync progress {} of {} blocks",
                    p.done_blocks, p.total_blocks
                ));
            }
        }
        Ok(())
    }
}

/// What a replica's metadata directory says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetaState {
    /// No metadata file: a new disk, or one never mirrored.
    Missing,
    /// The file exists but cannot be trusted (magic, CRC, version, decode, invariants).
    Damaged(String),
    /// The metadata is intact but describes another image file (deleted and recreated,
    /// copied, resized): the disk was replaced.
    Replaced {
        reason: String,
    },
    Ok(ReplicaMeta),
}

/// Identity of an image file as the metadata records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
}

/// Reads the identity of `image` (a regular file or a block device).
pub fn image_identity(image: &Path) -> io::Result<ImageIdentity> {
    let md = fs::metadata(image)?;
    let size = if md.file_type().is_block_device() {
        // A block device's inode size is 0: its size is where its end is.
        File::open(image)?.seek(SeekFrom::End(0))?
    } else {
        md.len()
    };
    Ok(ImageIdentity {
        dev: md.dev(),
        ino: md.ino(),
        size,
    })
}

/// The metadata directory of one image.
#[derive(Clone, Debug)]
pub struct MetaStore {
    image: PathBuf,
    dir: PathBuf,
}

impl MetaStore {
    /// The metadata of `image`: beside it (`<image>.twinrun/`) for a file; for a block
    /// device (whose directory, `/dev`, is not persistent) under
    /// `$TWINRUN_STATE_DIR/mirror/` (default `/var/lib/twinrun/mirror/`), named after
    /// the device path (`/dev/vg0/vm1` -> `dev_vg0_vm1.twinrun`).
    pub fn for_image(image: &Path) -> MetaStore {
        let is_block = fs::metadata(image).is_ok_and(|m| m.file_type().is_block_device());
        let dir = if is_block {
            let root = std::env::var_os("TWINRUN_STATE_DIR")
                .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), PathBuf::from);
            let name: String = image
                .to_string_lossy()
                .trim_start_matches('/')
                .replace('/', "_");
            root.join("mirror").join(format!("{name}.twinrun"))
        } else {
            let mut dir = image.as_os_str().to_owned();
            dir.push(".twinrun");
            PathBuf::from(dir)
        };
        MetaStore {
            image: image.to_path_buf(),
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn image(&self) -> &Path {
        &self.image
    }

    pub fn meta_path(&self) -> PathBuf {
        self.dir.join(META_FILE)
    }

    /// Where this replica's [`crate::bitmap::DirtyBitmap`] lives.
    pub fn bitmap_path(&self) -> PathBuf {
        self.dir.join(BITMAP_FILE)
    }

    /// Reads the metadata. Only real I/O errors are `Err`: anything wrong with the
    /// content is a [`MetaState`] the resync decision handles.
    pub fn load(&self) -> Result<MetaState, MetaError> {
        let path = self.meta_path();
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(f) => {
                // Read one byte past the limit so an oversized file is seen as such.
                let limit = (HEADER_LEN + MAX_BODY_LEN as usize + CRC_LEN + 1) as u64;
                f.take(limit)
                    .read_to_end(&mut bytes)
                    .map_err(io_err(&path, "read"))?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(MetaState::Missing),
            Err(e) => return Err(io_err(&path, "open")(e)),
        }
        let meta = match decode(&bytes) {
            Ok(m) => m,
            Err(reason) => return Ok(MetaState::Damaged(reason)),
        };
        let id = match image_identity(&self.image) {
            Ok(id) => id,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(MetaState::Replaced {
                    reason: format!("image {} is missing", self.image.display()),
                })
            }
            Err(e) => return Err(io_err(&self.image, "stat image")(e)),
        };
        if (id.dev, id.ino) != (meta.image_dev, meta.image_ino) {
            return Ok(MetaState::Replaced {
                reason: format!(
                    "image is file {}:{}, metadata describes {}:{}",
                    id.dev, id.ino, meta.image_dev, meta.image_ino
                ),
            });
        }
        if id.size != meta.disk_size {
            return Ok(MetaState::Replaced {
                reason: format!(
                    "image is {} bytes, metadata describes {} bytes",
                    id.size, meta.disk_size
                ),
            });
        }
        Ok(MetaState::Ok(meta))
    }

    /// Replaces the stored metadata atomically (tmp file, fsync, rename, fsync dir).
    pub fn save(&self, m: &ReplicaMeta) -> Result<(), MetaError> {
        m.validate().map_err(MetaError::Invalid)?;
        let bytes = encode(m)?;
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir, "create dir"))?;
        let tmp = self.dir.join(META_TMP);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        f.write_all(&bytes).map_err(io_err(&tmp, "write"))?;
        f.sync_all().map_err(io_err(&tmp, "fsync"))?;
        drop(f);
        let path = self.meta_path();
        fs::rename(&tmp, &path).map_err(io_err(&path, "rename"))?;
        sync_dir(&self.dir)
    }

    /// Metadata for the image as it is now, holding a new random generation. Not saved:
    /// the caller decides when it becomes the replica's truth.
    pub fn create_fresh(&self) -> Result<ReplicaMeta, MetaError> {
        let id = image_identity(&self.image).map_err(io_err(&self.image, "stat image"))?;
        Ok(ReplicaMeta {
            disk_size: id.size,
            block_size: DEFAULT_BLOCK_SIZE,
            current_gen: random_nonzero_u64()?,
            bitmap_base_gen: 0,
            history: Vec::new(),
            unclean_primary: false,
            inconsistent: false,
            sync_source_gen: 0,
            failed: false,
            last_committed_epoch: None,
            resync: None,
            verify: None,
            image_dev: id.dev,
            image_ino: id.ino,
        })
    }
}

/// Makes a rename or create inside `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), MetaError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync dir"))
}

fn encode(m: &ReplicaMeta) -> Result<Vec<u8>, MetaError> {
    let body = postcard::to_stdvec(m)?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l <= MAX_BODY_LEN)
        .ok_or_else(|| MetaError::Invalid(format!("encoded body is {} bytes", body.len())))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + CRC_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&META_VERSION.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn decode(bytes: &[u8]) -> Result<ReplicaMeta, String> {
    if bytes.len() < HEADER_LEN + CRC_LEN {
        return Err(format!(
            "file is {} bytes, shorter than a header",
            bytes.len()
        ));
    }
    if bytes[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let len = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    if len > MAX_BODY_LEN {
        return Err(format!("body length {len} exceeds {MAX_BODY_LEN}"));
    }
    let end = HEADER_LEN + len as usize;
    if bytes.len() != end + CRC_LEN {
        return Err(format!(
            "file is {} bytes, header says {}",
            bytes.len(),
            end + CRC_LEN
        ));
    }
    let stored = u32::from_le_bytes([bytes[end], bytes[end + 1], bytes[end + 2], bytes[end + 3]]);
    let crc = crc32c::crc32c(&bytes[..end]);
    if stored != crc {
        return Err(format!("crc {stored:#010x}, computed {crc:#010x}"));
    }
    if version != META_VERSION {
        return Err(format!("format version {version}, expected {META_VERSION}"));
    }
    let (meta, rest): (ReplicaMeta, _) =
        postcard::take_from_bytes(&bytes[HEADER_LEN..end]).map_err(|e| format!("decode: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes after the body", rest.len()));
    }
    meta.validate()?;
    Ok(meta)
}

fn random_nonzero_u64() -> Result<u64, MetaError> {
    for _ in 0..RANDOM_ATTEMPTS {
        let mut buf = [0u8; 8];
        // SAFETY: `buf` is a live, writable buffer of exactly `buf.len()` bytes for the
        // whole call; getrandom writes at most that many bytes into it.
        let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(MetaError::Random(e));
        }
        if n as usize != buf.len() {
            continue; // Short read (interrupted): try again for a whole id.
        }
        let v = u64::from_le_bytes(buf);
        if v != 0 {
            return Ok(v);
        }
    }
    Err(MetaError::Random(io::Error::other(
        "no nonzero random id after repeated attempts",
    )))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A unique temp directory removed on drop (tests run in parallel).
    pub(crate) struct TempDir(pub PathBuf);
    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "sm-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn image(dir: &TempDir, size: u64) -> PathBuf {
        let p = dir.0.join("disk.img");
        let f = File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }

    #[test]
    fn dir_is_beside_the_image() {
        let s = MetaStore::for_image(Path::new("/var/lib/vm/disk.img"));
        assert_eq!(s.dir(), Path::new("/var/lib/vm/disk.img.twinrun"));
        assert_eq!(
            s.meta_path(),
            Path::new("/var/lib/vm/disk.img.twinrun/meta")
        );
        assert_eq!(
            s.bitmap_path(),
            Path::new("/var/lib/vm/disk.img.twinrun/bitmap")
        );
    }

    #[test]
    fn missing_then_save_load_roundtrip() {
        let t = TempDir::new("meta-rt");
        let img = image(&t, 1 << 20);
        let s = MetaStore::for_image(&img);
        assert_eq!(s.load().unwrap(), MetaState::Missing);
        let mut m = s.create_fresh().unwrap();
        assert_eq!(m.disk_size, 1 << 20);
        assert_eq!(m.block_size, DEFAULT_BLOCK_SIZE);
        assert_ne!(m.current_gen, 0);
        m.last_committed_epoch = Some(42);
        m.resync = Some(ResyncProgress {
            full: true,
            total_blocks: 256,
            done_blocks: 10,
        });
        m.verify = Some(VerifyReport {
            finished_unix_ms: 1,
            ranges_compared: 2,
            ranges_differing: 3,
            blocks_marked: 4,
        });
        s.save(&m).unwrap();
        assert_eq!(s.load().unwrap(), MetaState::Ok(m.clone()));
        // A second save replaces the first.
        m.unclean_primary = true;
        s.save(&m).unwrap();
        assert_eq!(s.load().unwrap(), MetaState::Ok(m));
        assert!(!s.dir().join(META_TMP).exists());
    }

    #[test]
    fn torn_tmp_file_is_ignored() {
        let t = TempDir::new("meta-torn");
        let img = image(&t, 8192);
        let s = MetaStore::for_image(&img);
        let m = s.create_fresh().unwrap();
        s.save(&m).unwrap();
        // A crash in the middle of the next save leaves half a tmp file behind.
        let full = encode(&m).unwrap();
        fs::write(s.dir().join(META_TMP), &full[..full.len() / 2]).unwrap();
        assert_eq!(s.load().unwrap(), MetaState::Ok(m.clone()));
        // And the next save still works over it.
        s.save(&m).unwrap();
        assert_eq!(s.load().unwrap(), MetaState::Ok(m));
    }

    #[test]
    fn every_flipped_byte_is_damage() {
        let t = TempDir::new("meta-flip");
        let img = image(&t, 8192);
        let s = MetaStore::for_image(&img);
        let m = s.create_fresh().unwrap();
        s.save(&m).unwrap();
        let good = fs::read(s.meta_path()).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            fs::write(s.meta_path(), &bad).unwrap();
            match s.load().unwrap() {
                MetaState::Damaged(_) => {}
                other => panic!("byte {i} flipped: {other:?}"),
            }
        }
    }

    #[test]
    fn truncated_empty_and_version_are_damage() {
        let t = TempDir::new("meta-trunc");
        let img = image(&t, 8192);
        let s = MetaStore::for_image(&img);
        let m = s.create_fresh().unwrap();
        s.save(&m).unwrap();
        let good = fs::read(s.meta_path()).unwrap();
        for cut in [0, 3, HEADER_LEN, good.len() - 1] {
            fs::write(s.meta_path(), &good[..cut]).unwrap();
            assert!(
                matches!(s.load().unwrap(), MetaState::Damaged(_)),
                "cut {cut}"
            );
        }
        // A future version with a valid CRC is still refused.
        let mut v2 = good.clone();
        v2[8..12].copy_from_slice(&2u32.to_le_bytes());
        let n = v2.len() - CRC_LEN;
        let crc = crc32c::crc32c(&v2[..n]);
        v2[n..].copy_from_slice(&crc.to_le_bytes());
        fs::write(s.meta_path(), &v2).unwrap();
        match s.load().unwrap() {
            MetaState::Damaged(r) => assert!(r.contains("version"), "{r}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn replaced_image_is_detected() {
        let t = TempDir::new("meta-repl");
        let img = image(&t, 8192);
        let s = MetaStore::for_image(&img);
        let m = s.create_fresh().unwrap();
        s.save(&m).unwrap();
        // Delete and recreate: same path and size, different file. Keep the old file
        // open so its inode number cannot be reused by the new one.
        let hold = File::open(&img).unwrap();
        fs::remove_file(&img).unwrap();
        assert!(matches!(s.load().unwrap(), MetaState::Replaced { .. }));
        let img2 = image(&t, 8192);
        assert_eq!(img, img2);
        assert!(matches!(s.load().unwrap(), MetaState::Replaced { .. }));
        drop(hold);
    }

    #[test]
    fn resized_image_is_replaced() {
        let t = TempDir::new("meta-resize");
        let img = image(&t, 8192);
        let s = MetaStore::for_image(&img);
        s.save(&s.create_fresh().unwrap()).unwrap();
        OpenOptions::new()
            .write(true)
            .open(&img)
            .unwrap()
            .set_len(16384)
            .unwrap();
        match s.load().unwrap() {
            MetaState::Replaced { reason } => assert!(reason.contains("16384"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_meta_is_not_saved() {
        let t = TempDir::new("meta-inval");
        let img = image(&t, 8192);
        let s = MetaStore::for_image(&img);
        let mut m = s.create_fresh().unwrap();
        m.current_gen = 0;
        assert!(matches!(s.save(&m), Err(MetaError::Invalid(_))));
        assert_eq!(s.load().unwrap(), MetaState::Missing);
    }

    #[test]
    fn new_generation_records_base_and_bounded_history() {
        let t = TempDir::new("meta-gen");
        let img = image(&t, 8192);
        let m0 = MetaStore::for_image(&img).create_fresh().unwrap();
        let g0 = m0.current_gen;
        let mut m = m0.clone();
        m.new_generation().unwrap();
        assert_ne!(m.current_gen, 0);
        assert_ne!(m.current_gen, g0);
        assert_eq!(m.bitmap_base_gen, g0);
        assert_eq!(m.history, vec![g0]);
        // Further restarts alone keep the base: the bitmap still counts from g0.
        let mut seen = vec![g0, m.current_gen];
        for _ in 0..HISTORY_LEN + 2 {
            m.new_generation().unwrap();
            seen.push(m.current_gen);
            assert_eq!(m.bitmap_base_gen, g0);
            assert!(m.history.len() <= HISTORY_LEN);
        }
        let expect: Vec<u64> = seen
            .iter()
            .rev()
            .skip(1)
            .take(HISTORY_LEN)
            .copied()
            .collect();
        assert_eq!(m.history, expect);
        m.validate().unwrap();
    }
}
