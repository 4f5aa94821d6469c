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
//! Version 1 recorded the image as device and inode numbers only; it is still read
//! (as [`ImageId::Legacy`], with the checks it had) and written as the current version
//! at the next save. See [`ImageId`] for how a replaced image is recognised. Version 3
//! added [`ReplicaMeta::quorum_generation`] (read as 0 from versions 1 and 2).
//!
//! Adding a field: postcard is positional (no field names, no defaults), so a new field
//! is a new version. Copy today's [`ReplicaMeta`] as `ReplicaMetaV2` with a `From` into
//! the new one (as [`ReplicaMetaV1`] does), add the field, bump [`META_VERSION`], and
//! give `decode` an arm for version 2; older versions keep their arms.
//!
//! Saving is crash-safe: the new file is written to `meta.tmp`, fsynced, renamed over
//! `meta`, and the directory fsynced, so after a crash `meta` is either the old or the new
//! version, never a mix. A torn `meta.tmp` left behind is never read.
//!
//! I/O: this module reads and writes files; [`ReplicaMeta`] itself is plain data.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// 3: the quorum generation is recorded; 2: the image is recorded as an [`ImageId`]
/// (1: device and inode numbers).
pub const META_VERSION: u32 = 3;
/// The version-1 layout, still read (see [`ReplicaMetaV1`]).
const META_VERSION_1: u32 = 1;
/// The version-2 layout, still read (see [`ReplicaMetaV2`]).
const META_VERSION_2: u32 = 2;
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;
/// `sync_source_gen` of a resync target that does not know its source's generation (a
/// demoted primary: the winner's data is newer than anything it saw). No replica is
/// ever given this id: the resync decision copies the whole disk (rule c), or, for a
/// demoted primary whose bitmap and the winner's start at the same shared generation,
/// the union of both bitmaps.
pub const SOURCE_UNKNOWN: u64 = u64::MAX;
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
/// The extended attribute that carries an image file's replica id (see [`FileId::token`]).
pub const TOKEN_XATTR: &str = "user.twinrun.replica";
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
    /// Identity of the image this metadata describes, to detect a replaced disk.
    pub image: ImageId,
    /// The highest quorum generation (the pair's fencing token, issue 14) this node
    /// knew when it last wrote this metadata; 0 = none. A demoted primary records the
    /// winner's generation here with its disks marked as the resync target, so a node
    /// that comes back sees from its disk alone that it lost ([`Self::lost_to`]).
    pub quorum_generation: u64,
}

/// [`ReplicaMeta`] as format version 2 stored it (postcard is positional: the fields
/// in this order and no other).
#[derive(Deserialize)]
struct ReplicaMetaV2 {
    disk_size: u64,
    block_size: u32,
    current_gen: u64,
    bitmap_base_gen: u64,
    history: Vec<u64>,
    unclean_primary: bool,
    inconsistent: bool,
    sync_source_gen: u64,
    failed: bool,
    last_committed_epoch: Option<u64>,
    resync: Option<ResyncProgress>,
    verify: Option<VerifyReport>,
    image: ImageId,
}

impl From<ReplicaMetaV2> for ReplicaMeta {
    fn from(v: ReplicaMetaV2) -> ReplicaMeta {
        ReplicaMeta {
            disk_size: v.disk_size,
            block_size: v.block_size,
            current_gen: v.current_gen,
            bitmap_base_gen: v.bitmap_base_gen,
            history: v.history,
            unclean_primary: v.unclean_primary,
            inconsistent: v.inconsistent,
            sync_source_gen: v.sync_source_gen,
            failed: v.failed,
            last_committed_epoch: v.last_committed_epoch,
            resync: v.resync,
            verify: v.verify,
            image: v.image,
            quorum_generation: 0,
        }
    }
}

/// [`ReplicaMeta`] as format version 1 stored it (postcard is positional: the fields
/// in this order and no other).
#[derive(Deserialize)]
struct ReplicaMetaV1 {
    disk_size: u64,
    block_size: u32,
    current_gen: u64,
    bitmap_base_gen: u64,
    history: Vec<u64>,
    unclean_primary: bool,
    inconsistent: bool,
    sync_source_gen: u64,
    failed: bool,
    last_committed_epoch: Option<u64>,
    resync: Option<ResyncProgress>,
    verify: Option<VerifyReport>,
    image_dev: u64,
    image_ino: u64,
}

impl From<ReplicaMetaV1> for ReplicaMeta {
    fn from(v: ReplicaMetaV1) -> ReplicaMeta {
        ReplicaMeta {
            disk_size: v.disk_size,
            block_size: v.block_size,
            current_gen: v.current_gen,
            bitmap_base_gen: v.bitmap_base_gen,
            history: v.history,
            unclean_primary: v.unclean_primary,
            inconsistent: v.inconsistent,
            sync_source_gen: v.sync_source_gen,
            failed: v.failed,
            last_committed_epoch: v.last_committed_epoch,
            resync: v.resync,
            verify: v.verify,
            image: ImageId::Legacy {
                dev: v.image_dev,
                ino: v.image_ino,
            },
            quorum_generation: 0,
        }
    }
}

impl ReplicaMeta {
    /// Did this replica's node lose the VM to a holder of `known` (the generation the
    /// other side or the quorum knows)? 0 on either side: no quorum, nothing to say.
    pub fn lost_to(&self, known: u64) -> bool {
        known != 0 && self.quorum_generation < known
    }

    /// Records a generation this node learned (generations only grow).
    pub fn record_generation(&mut self, generation: u64) {
        self.quorum_generation = self.quorum_generation.max(generation);
    }

    /// This replica's node lost the VM to the holder of quorum `generation` (a demoted
    /// primary): its disk becomes the resync target of the winner's ([`SOURCE_UNKNOWN`]
    /// source: it never saw the winner's data generation), never a source again until
    /// resynced, with the winner's generation recorded. Its bitmap is kept: it holds
    /// every block this node wrote since the generation both sides last shared, which
    /// lets the decision take a delta (rule c, demoted target).
    pub fn mark_demoted(&mut self, generation: u64) {
        self.inconsistent = true;
        self.sync_source_gen = SOURCE_UNKNOWN;
        self.record_generation(generation);
    }

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

/// What identifies the image a replica's metadata describes.
///
/// An inode number alone does not identify a file over time: a filesystem hands a
/// freed number to the next file it creates (ext4 at once, in the same directory), so
/// an image deleted and created again, or a backup restored in its place, can carry
/// the old image's number. Metadata taken for such a file would let a delta resync
/// write a few blocks onto an unrelated disk: silent corruption. Hence a file is also
/// known by its birth time, its inode generation and a random id written on it, and a
/// block device by what the kernel says is behind it rather than by its node in /dev.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ImageId {
    File(FileId),
    Block(BlockId),
    /// From format version 1: the device and inode numbers of the image (a regular
    /// file's, or a block device node's). Checked as version 1 did, and in addition an
    /// image that carries a replica id is not this one (version 1 wrote none). A new
    /// metadata (the replica's next full resync) records a whole [`ImageId`].
    Legacy {
        dev: u64,
        ino: u64,
    },
}

/// A regular file's identity. Every part the filesystem offers is recorded when the
/// metadata is created, and all of them must match for the metadata to apply.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
    /// Birth time (statx `btime`: seconds, nanoseconds), where the filesystem keeps
    /// one. A new file with a reused number is born later, unless both fall in the
    /// same clock tick.
    pub birth: Option<(i64, u32)>,
    /// The inode generation (`FS_IOC_GETVERSION`), where the filesystem has one: the
    /// number NFS file handles pair with the inode number for exactly this reason
    /// (random for each new inode on ext4 and XFS).
    pub generation: Option<u32>,
    /// The random id [`MetaStore::create_fresh`] wrote on the file as the extended
    /// attribute [`TOKEN_XATTR`], where the filesystem keeps user attributes. It goes
    /// with the inode: a new file has none (a copy made with its attributes has the
    /// original's, but also another inode and birth time). `Some(0)` stands for a
    /// value that is not one of ours (ids are never 0).
    pub token: Option<u64>,
}

/// A block device's identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockId {
    /// The device number (major, minor).
    pub rdev: u64,
    /// The device node's own device and inode numbers (devtmpfs): new with each node,
    /// so after a reboot too; compared only when `stable` is unknown.
    pub node_dev: u64,
    pub node_ino: u64,
    /// What is behind the device, from sysfs: the device-mapper UUID (LVM gives each
    /// new volume a random one), the disk's WWID or serial (plus the partition number
    /// and start), or for a loop device its backing file's identity and offset. Stable
    /// across reboots and different for a new volume or disk; when known it alone is
    /// compared (a device number is reused by the next volume created).
    pub stable: Option<String>,
}

impl ImageId {
    /// Whether this recorded identity is `now`'s; if not, why (for `Replaced`).
    pub fn check(&self, now: &ImageId) -> Result<(), String> {
        match (self, now) {
            (ImageId::File(a), ImageId::File(b)) => a.check(b),
            (ImageId::Block(a), ImageId::Block(b)) => a.check(b),
            (ImageId::Legacy { dev, ino }, ImageId::File(b)) => {
                if (b.dev, b.ino) != (*dev, *ino) {
                    Err(format!(
                        "image is file {}:{}, metadata describes {dev}:{ino}",
                        b.dev, b.ino
                    ))
                } else if b.token.is_some() {
                    Err("image carries a replica id the (version 1) metadata never wrote".into())
                } else {
                    Ok(())
                }
            }
            (ImageId::Legacy { dev, ino }, ImageId::Block(b)) => {
                if (b.node_dev, b.node_ino) == (*dev, *ino) {
                    Ok(())
                } else {
                    Err(format!(
                        "image is device node {}:{}, metadata describes {dev}:{ino}",
                        b.node_dev, b.node_ino
                    ))
                }
            }
            (ImageId::Block(_), _) => {
                Err("image is not a block device; metadata describes one".into())
            }
            (ImageId::File(_), _) => {
                Err("image is not a regular file; metadata describes one".into())
            }
            (ImageId::Legacy { .. }, ImageId::Legacy { .. }) => {
                Err("no identity read from the image".into())
            }
        }
    }
}

impl FileId {
    fn check(&self, now: &FileId) -> Result<(), String> {
        if (now.dev, now.ino) != (self.dev, self.ino) {
            return Err(format!(
                "image is file {}:{}, metadata describes {}:{}",
                now.dev, now.ino, self.dev, self.ino
            ));
        }
        if now.birth != self.birth {
            return Err(format!(
                "image file {}:{} was born {}, the metadata's {} (the number was reused)",
                now.dev,
                now.ino,
                birth_text(now.birth),
                birth_text(self.birth)
            ));
        }
        if now.generation != self.generation {
            return Err(format!(
                "image file {}:{} is inode generation {:?}, the metadata's {:?} (the number was reused)",
                now.dev, now.ino, now.generation, self.generation
            ));
        }
        if now.token != self.token {
            return Err(format!(
                "image's replica id ({TOKEN_XATTR}) is {}, the metadata's {}",
                token_text(now.token),
                token_text(self.token)
            ));
        }
        Ok(())
    }
}

impl BlockId {
    fn check(&self, now: &BlockId) -> Result<(), String> {
        if self.stable.is_some() || now.stable.is_some() {
            if now.stable == self.stable {
                return Ok(());
            }
            return Err(format!(
                "block device is {}, metadata describes {}",
                now.stable.as_deref().unwrap_or("unknown"),
                self.stable.as_deref().unwrap_or("unknown")
            ));
        }
        if (now.rdev, now.node_dev, now.node_ino) == (self.rdev, self.node_dev, self.node_ino) {
            return Ok(());
        }
        Err(format!(
            "block device {}:{} (node {}:{}), metadata describes {}:{} (node {}:{})",
            libc::major(now.rdev),
            libc::minor(now.rdev),
            now.node_dev,
            now.node_ino,
            libc::major(self.rdev),
            libc::minor(self.rdev),
            self.node_dev,
            self.node_ino
        ))
    }
}

fn birth_text(b: Option<(i64, u32)>) -> String {
    b.map_or_else(
        || "at an unknown time".into(),
        |(s, ns)| format!("at {s}.{ns:09}"),
    )
}

fn token_text(t: Option<u64>) -> String {
    t.map_or_else(|| "absent".into(), |t| format!("{t:016x}"))
}

/// Identity and size of an image as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageIdentity {
    pub id: ImageId,
    pub size: u64,
}

/// Reads the identity of `image` (a regular file or a block device). Every part comes
/// from one open file, so they all describe the same inode.
pub fn image_identity(image: &Path) -> io::Result<ImageIdentity> {
    image_identity_of(&File::open(image)?)
}

fn image_identity_of(f: &File) -> io::Result<ImageIdentity> {
    let md = f.metadata()?;
    if md.file_type().is_block_device() {
        // A block device's inode size is 0: its size is where its end is.
        let size = (&*f).seek(SeekFrom::End(0))?;
        let rdev = md.rdev();
        return Ok(ImageIdentity {
            id: ImageId::Block(BlockId {
                rdev,
                node_dev: md.dev(),
                node_ino: md.ino(),
                stable: block_stable_id(f, rdev),
            }),
            size,
        });
    }
    Ok(ImageIdentity {
        id: ImageId::File(file_id(f, &md)?),
        size: md.len(),
    })
}

fn file_id(f: &File, md: &fs::Metadata) -> io::Result<FileId> {
    Ok(FileId {
        dev: md.dev(),
        ino: md.ino(),
        birth: birth_time(f)?,
        generation: inode_generation(f),
        token: read_token(f)?,
    })
}

/// statx's birth time, if the filesystem reports one.
fn birth_time(f: &File) -> io::Result<Option<(i64, u32)>> {
    // SAFETY: statx is plain old data; all zeroes is a valid value of it.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a NUL-terminated empty string and AT_EMPTY_PATH makes statx
    // describe the open descriptor `f`; `stx` is a live, writable statx for the call.
    let rc = unsafe {
        libc::statx(
            f.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_BTIME,
            &mut stx,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        // Kernels or libcs without statx: no birth time, like a filesystem without one.
        return match e.raw_os_error() {
            Some(libc::ENOSYS) | Some(libc::EPERM) => Ok(None),
            _ => Err(e),
        };
    }
    Ok((stx.stx_mask & libc::STATX_BTIME != 0)
        .then_some((stx.stx_btime.tv_sec, stx.stx_btime.tv_nsec)))
}

/// The inode generation, if the filesystem answers `FS_IOC_GETVERSION`.
fn inode_generation(f: &File) -> Option<u32> {
    let mut v: libc::c_long = 0;
    // SAFETY: FS_IOC_GETVERSION writes at most one `long` (filesystems write an int)
    // to the pointer, which points at `v`, live and writable for the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_GETVERSION, &mut v) };
    // Any error (ENOTTY and the like) means the filesystem has no generation to give.
    (rc == 0).then_some(v as u32)
}

/// The replica id on the file: `None` if it has none (or the filesystem keeps no
/// user attributes), `Some(0)` for a value that is not an id of ours.
fn read_token(f: &File) -> io::Result<Option<u64>> {
    let name = c"user.twinrun.replica";
    let mut buf = [0u8; 32];
    // SAFETY: `name` is NUL-terminated; `buf` is live and writable for `buf.len()`
    // bytes, and fgetxattr writes at most that many.
    let n = unsafe {
        libc::fgetxattr(
            f.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) | Some(libc::EOPNOTSUPP) => Ok(None),
            // Longer than any id of ours.
            Some(libc::ERANGE) => Ok(Some(0)),
            _ => Err(e),
        };
    }
    let parsed = std::str::from_utf8(&buf[..n as usize])
        .ok()
        .filter(|s| s.len() == 16)
        .and_then(|s| u64::from_str_radix(s, 16).ok());
    Ok(Some(parsed.unwrap_or(0)))
}

/// Writes a new random replica id on the file `path` and makes it durable. `Ok(false)`:
/// the filesystem keeps no user attributes (the file is known by its other parts).
fn write_token(f: &File, path: &Path) -> Result<bool, MetaError> {
    debug_assert_eq!(TOKEN_XATTR, "user.twinrun.replica");
    let token = format!("{:016x}", random_nonzero_u64()?);
    // SAFETY: the name is NUL-terminated; the value pointer and length describe
    // `token`'s bytes, live for the call.
    let rc = unsafe {
        libc::fsetxattr(
            f.as_raw_fd(),
            c"user.twinrun.replica".as_ptr(),
            token.as_ptr().cast(),
            token.len(),
            0,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
            return Ok(false);
        }
        return Err(io_err(path, "write replica id on image")(e));
    }
    f.sync_all().map_err(io_err(path, "fsync image"))?;
    Ok(true)
}

/// What sysfs says is behind block device `rdev` (see [`BlockId::stable`]).
fn block_stable_id(f: &File, rdev: u64) -> Option<String> {
    let sys = PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    ));
    let sys = fs::canonicalize(sys).ok()?;
    let read = |p: &Path| {
        fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    if let Some(uuid) = read(&sys.join("dm/uuid")) {
        return Some(format!("device-mapper {uuid}"));
    }
    if sys.join("loop").is_dir() {
        return loop_backing_id(f, &sys);
    }
    let disk_id = |dir: &Path| {
        ["wwid", "device/wwid", "serial", "device/serial"]
            .iter()
            .find_map(|name| read(&dir.join(name)).map(|v| format!("{name} {v}")))
    };
    match read(&sys.join("partition")) {
        Some(n) => {
            let start = read(&sys.join("start"))?;
            let disk = disk_id(sys.parent()?)?;
            Some(format!("{disk} partition {n} at sector {start}"))
        }
        None => disk_id(&sys),
    }
}

/// `struct loop_info64` of <linux/loop.h>.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;

/// A loop device is known by its backing file (device, inode and, while the file at
/// the backing path is that inode, birth time and generation) and window.
fn loop_backing_id(f: &File, sys: &Path) -> Option<String> {
    // SAFETY: LoopInfo64 is plain old data; all zeroes is a valid value of it.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 writes one `struct loop_info64`, whose layout
    // LoopInfo64 reproduces, to the pointer, which points at `info`, live and
    // writable for the call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), LOOP_GET_STATUS64, &mut info) };
    if rc != 0 {
        return None; // ENXIO: nothing attached.
    }
    // The kernel encodes the backing device number as new_encode_dev does.
    let d = info.lo_device;
    let backing_dev = libc::makedev(
        ((d & 0xfff00) >> 8) as u32,
        ((d & 0xff) | ((d >> 12) & 0xfff00)) as u32,
    );
    let mut id = format!(
        "loop over file {}:{}:{}, offset {}, size limit {}",
        libc::major(backing_dev),
        libc::minor(backing_dev),
        info.lo_inode,
        info.lo_offset,
        info.lo_sizelimit
    );
    // The backing file's other parts, read from its path in sysfs if that still names
    // the same inode.
    if let Some(bf) = fs::read_to_string(sys.join("loop/backing_file"))
        .ok()
        .and_then(|p| File::open(p.trim_end_matches('\n')).ok())
    {
        if let Ok(md) = bf.metadata() {
            if (md.dev(), md.ino()) == (backing_dev, info.lo_inode) {
                if let Ok(b) = file_id(&bf, &md) {
                    id.push_str(&format!(
                        ", born {}, generation {:?}",
                        birth_text(b.birth),
                        b.generation
                    ));
                }
            }
        }
    }
    Some(id)
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
        if let Err(reason) = meta.image.check(&id.id) {
            return Ok(MetaState::Replaced { reason });
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
    /// the caller decides when it becomes the replica's truth. A regular file gets a
    /// new replica id written on it (durably) first: from here on, metadata that
    /// recorded another id, this image's earlier metadata included, no longer applies.
    pub fn create_fresh(&self) -> Result<ReplicaMeta, MetaError> {
        let f = File::open(&self.image).map_err(io_err(&self.image, "open image"))?;
        if f.metadata()
            .map_err(io_err(&self.image, "stat image"))?
            .is_file()
        {
            write_token(&f, &self.image)?;
        }
        let id = image_identity_of(&f).map_err(io_err(&self.image, "stat image"))?;
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
            image: id.id,
            quorum_generation: 0,
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
    let body = &bytes[HEADER_LEN..end];
    let decoded = match version {
        META_VERSION => postcard::take_from_bytes::<ReplicaMeta>(body),
        META_VERSION_2 => postcard::take_from_bytes::<ReplicaMetaV2>(body)
            .map(|(m, rest)| (ReplicaMeta::from(m), rest)),
        META_VERSION_1 => postcard::take_from_bytes::<ReplicaMetaV1>(body)
            .map(|(m, rest)| (ReplicaMeta::from(m), rest)),
        _ => {
            return Err(format!(
                "format version {version}, expected {META_VERSION_1} to {META_VERSION}"
            ))
        }
    };
    let (meta, rest) = decoded.map_err(|e| format!("decode: {e}"))?;
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
        if v != 0 && v != SOURCE_UNKNOWN {
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
    use std::process::Command;
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
        v2[8..12].copy_from_slice(&(META_VERSION + 1).to_le_bytes());
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
        assert_eq!(s.load().unwrap(), MetaState::Ok(m.clone()));
        fs::remove_file(&img).unwrap();
        assert!(matches!(s.load().unwrap(), MetaState::Replaced { .. }));
        // Same path and size, another file (whatever its inode number).
        let img2 = image(&t, 8192);
        assert_eq!(img, img2);
        assert!(matches!(s.load().unwrap(), MetaState::Replaced { .. }));
    }

    /// Deletes `img` and creates files in its directory until one gets the deleted
    /// file's inode number (ext4 hands it to the next file at once; files that get
    /// another number are kept, so the search moves on), then moves that file to `img`.
    /// `None` if the filesystem does not reuse the number within the attempts.
    fn recreate_with_same_inode(img: &Path, len: u64) -> Option<u64> {
        let old = fs::metadata(img).unwrap().ino();
        fs::remove_file(img).unwrap();
        let dir = img.parent().unwrap();
        let mut others = Vec::new();
        for i in 0..20_000 {
            let p = dir.join(format!("candidate-{i}"));
            File::create(&p).unwrap().set_len(len).unwrap();
            if fs::metadata(&p).unwrap().ino() == old {
                fs::rename(&p, img).unwrap();
                for o in others {
                    fs::remove_file(o).unwrap();
                }
                return Some(i);
            }
            others.push(p);
        }
        None
    }

    #[test]
    fn replaced_image_with_the_same_inode_number_is_detected() {
        let t = TempDir::new("meta-reuse");
        let img = image(&t, 8192);
        let s = MetaStore::for_image(&img);
        let m = s.create_fresh().unwrap();
        s.save(&m).unwrap();
        let before = fs::metadata(&img).unwrap();
        let tries = recreate_with_same_inode(&img, 8192).unwrap_or_else(|| {
            panic!(
                "{}: the filesystem never reused inode {}; this test needs one that does \
                 (ext4, like the CI's /tmp)",
                t.0.display(),
                before.ino()
            )
        });
        let after = fs::metadata(&img).unwrap();
        // The very case an inode check cannot see: same device, inode number, size.
        assert_eq!(
            (after.dev(), after.ino(), after.len()),
            (before.dev(), before.ino(), before.len()),
            "after {tries} tries"
        );
        match s.load().unwrap() {
            MetaState::Replaced { reason } => assert!(reason.contains("image"), "{reason}"),
            other => {
                panic!("a new file with the old inode number was taken as the image: {other:?}")
            }
        }
        // Each part of the identity detects it by itself where the filesystem has it.
        let ImageId::File(rec) = &m.image else {
            panic!("{:?}", m.image)
        };
        let ImageId::File(now) = image_identity(&img).unwrap().id else {
            panic!()
        };
        assert_eq!((now.dev, now.ino), (rec.dev, rec.ino));
        assert_ne!(now.token, rec.token, "a new file has no replica id");
        assert_eq!(now.token, None);
        if let (Some(a), Some(b)) = (now.generation, rec.generation) {
            eprintln!("inode generation {b} -> {a}");
        }
        if let (Some(a), Some(b)) = (now.birth, rec.birth) {
            eprintln!("birth {b:?} -> {a:?}");
        }
        // A fresh metadata for the new file applies to it, and only to it.
        let m2 = s.create_fresh().unwrap();
        s.save(&m2).unwrap();
        assert_eq!(s.load().unwrap(), MetaState::Ok(m2));
    }

    #[test]
    fn each_part_of_a_file_identity_counts() {
        let t = TempDir::new("meta-parts");
        let img = image(&t, 8192);
        let s = MetaStore::for_image(&img);
        let m = s.create_fresh().unwrap();
        let ImageId::File(rec) = m.image.clone() else {
            panic!()
        };
        // This machine's filesystems (ext4 /tmp) keep all three; say so if one is lost.
        assert!(
            rec.token.is_some(),
            "no replica id written on {}",
            img.display()
        );
        assert!(rec.birth.is_some(), "no birth time on {}", img.display());
        assert!(
            rec.generation.is_some(),
            "no inode generation on {}",
            img.display()
        );
        let now = ImageId::File(rec.clone());
        assert_eq!(m.image.check(&now), Ok(()));
        let variants = [
            FileId {
                dev: rec.dev + 1,
                ..rec.clone()
            },
            FileId {
                ino: rec.ino + 1,
                ..rec.clone()
            },
            FileId {
                birth: rec.birth.map(|(s, ns)| (s, ns ^ 1)),
                ..rec.clone()
            },
            FileId {
                birth: None,
                ..rec.clone()
            },
            FileId {
                generation: rec.generation.map(|g| g ^ 1),
                ..rec.clone()
            },
            FileId {
                token: rec.token.map(|t| t ^ 1),
                ..rec.clone()
            },
            FileId {
                token: None,
                ..rec.clone()
            },
            FileId {
                token: Some(0),
                ..rec.clone()
            },
        ];
        for v in variants {
            assert!(m.image.check(&ImageId::File(v.clone())).is_err(), "{v:?}");
        }
        // A copy that keeps the attributes (cp -a) keeps the id, not the rest.
        let copy = t.0.join("copy.img");
        assert!(Command::new("cp")
            .arg("-a")
            .arg(&img)
            .arg(&copy)
            .status()
            .unwrap()
            .success());
        let ImageId::File(c) = image_identity(&copy).unwrap().id else {
            panic!()
        };
        assert_eq!(c.token, rec.token);
        assert!(m.image.check(&ImageId::File(c)).is_err());
        // A block device's identity is not a file's.
        let block = ImageId::Block(BlockId::default());
        assert!(m.image.check(&block).is_err());
        assert!(block.check(&now).is_err());
    }

    #[test]
    fn garbage_replica_id_is_a_foreign_one() {
        let t = TempDir::new("meta-token");
        let img = image(&t, 8192);
        let s = MetaStore::for_image(&img);
        let m = s.create_fresh().unwrap();
        s.save(&m).unwrap();
        for bad in ["not-hex-at-all!!", "12", "0123456789abcdef0"] {
            set_token_raw(&img, bad.as_bytes());
            let ImageId::File(now) = image_identity(&img).unwrap().id else {
                panic!()
            };
            assert_eq!(now.token, Some(0), "{bad}");
            assert!(
                matches!(s.load().unwrap(), MetaState::Replaced { .. }),
                "{bad}"
            );
        }
        // A value longer than our buffer is foreign too.
        set_token_raw(&img, &[b'a'; 100]);
        assert!(matches!(s.load().unwrap(), MetaState::Replaced { .. }));
    }

    fn set_token_raw(img: &Path, v: &[u8]) {
        let f = File::open(img).unwrap();
        // SAFETY: NUL-terminated name; `v` is live for the call.
        let rc = unsafe {
            libc::fsetxattr(
                f.as_raw_fd(),
                c"user.twinrun.replica".as_ptr(),
                v.as_ptr().cast(),
                v.len(),
                0,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
    }

    /// Format version 1 as it was written: the old layout, the old version number.
    fn encode_v1(m: &ReplicaMeta, dev: u64, ino: u64) -> Vec<u8> {
        #[derive(Serialize)]
        struct V1<'a> {
            disk_size: u64,
            block_size: u32,
            current_gen: u64,
            bitmap_base_gen: u64,
            history: &'a [u64],
            unclean_primary: bool,
            inconsistent: bool,
            sync_source_gen: u64,
            failed: bool,
            last_committed_epoch: Option<u64>,
            resync: Option<ResyncProgress>,
            verify: Option<VerifyReport>,
            image_dev: u64,
            image_ino: u64,
        }
        let body = postcard::to_stdvec(&V1 {
            disk_size: m.disk_size,
            block_size: m.block_size,
            current_gen: m.current_gen,
            bitmap_base_gen: m.bitmap_base_gen,
            history: &m.history,
            unclean_primary: m.unclean_primary,
            inconsistent: m.inconsistent,
            sync_source_gen: m.sync_source_gen,
            failed: m.failed,
            last_committed_epoch: m.last_committed_epoch,
            resync: m.resync,
            verify: m.verify,
            image_dev: dev,
            image_ino: ino,
        })
        .unwrap();
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    #[test]
    fn version_1_metadata_is_read_and_rewritten_as_the_current_version() {
        let t = TempDir::new("meta-v1");
        // An image as version 1 left it: no replica id on it.
        let img = image(&t, 8192);
        let s = MetaStore::for_image(&img);
        let md = fs::metadata(&img).unwrap();
        let mut m = s.create_fresh().unwrap();
        m.image = ImageId::Legacy {
            dev: md.dev(),
            ino: md.ino(),
        };
        // Version 1 wrote no replica id on the image: take the one just written off.
        let f = File::open(&img).unwrap();
        // SAFETY: NUL-terminated name.
        let rc = unsafe { libc::fremovexattr(f.as_raw_fd(), c"user.twinrun.replica".as_ptr()) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        m.last_committed_epoch = Some(7);
        m.history = vec![3, 4];
        fs::create_dir_all(s.dir()).unwrap();
        fs::write(s.meta_path(), encode_v1(&m, md.dev(), md.ino())).unwrap();
        assert_eq!(s.load().unwrap(), MetaState::Ok(m.clone()));
        // Saved again: the current version, same content.
        s.save(&m).unwrap();
        let b = fs::read(s.meta_path()).unwrap();
        assert_eq!(b[8..12], META_VERSION.to_le_bytes());
        assert_eq!(s.load().unwrap(), MetaState::Ok(m.clone()));
        // Version 1's checks still hold: another inode number is another image...
        fs::write(s.meta_path(), encode_v1(&m, md.dev(), md.ino() + 1)).unwrap();
        assert!(matches!(s.load().unwrap(), MetaState::Replaced { .. }));
        // ...and so is an image stamped by newer metadata (not by this one).
        fs::write(s.meta_path(), encode_v1(&m, md.dev(), md.ino())).unwrap();
        set_token_raw(&img, b"0123456789abcdef");
        match s.load().unwrap() {
            MetaState::Replaced { reason } => assert!(reason.contains("replica id"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }

    /// Format version 2 as it was written: today's fields but the quorum generation.
    fn encode_v2(m: &ReplicaMeta) -> Vec<u8> {
        #[derive(Serialize)]
        struct V2<'a> {
            disk_size: u64,
            block_size: u32,
            current_gen: u64,
            bitmap_base_gen: u64,
            history: &'a [u64],
            unclean_primary: bool,
            inconsistent: bool,
            sync_source_gen: u64,
            failed: bool,
            last_committed_epoch: Option<u64>,
            resync: Option<ResyncProgress>,
            verify: Option<VerifyReport>,
            image: &'a ImageId,
        }
        let body = postcard::to_stdvec(&V2 {
            disk_size: m.disk_size,
            block_size: m.block_size,
            current_gen: m.current_gen,
            bitmap_base_gen: m.bitmap_base_gen,
            history: &m.history,
            unclean_primary: m.unclean_primary,
            inconsistent: m.inconsistent,
            sync_source_gen: m.sync_source_gen,
            failed: m.failed,
            last_committed_epoch: m.last_committed_epoch,
            resync: m.resync,
            verify: m.verify,
            image: &m.image,
        })
        .unwrap();
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&2u32.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    #[test]
    fn version_2_metadata_is_read_without_a_generation_and_rewritten_with_it() {
        let t = TempDir::new("meta-v2");
        let img = image(&t, 8192);
        let s = MetaStore::for_image(&img);
        let mut m = s.create_fresh().unwrap();
        m.last_committed_epoch = Some(9);
        fs::create_dir_all(s.dir()).unwrap();
        fs::write(s.meta_path(), encode_v2(&m)).unwrap();
        // Read as generation 0 (no quorum known), everything else as written.
        assert_eq!(s.load().unwrap(), MetaState::Ok(m.clone()));
        // A demoted node records the winner's generation; saved as version 3.
        m.record_generation(6);
        m.record_generation(4);
        assert_eq!(m.quorum_generation, 6, "generations only grow");
        s.save(&m).unwrap();
        let b = fs::read(s.meta_path()).unwrap();
        assert_eq!(b[8..12], 3u32.to_le_bytes());
        assert_eq!(s.load().unwrap(), MetaState::Ok(m.clone()));
    }

    #[test]
    fn a_target_of_unknown_source_is_valid_and_never_matches_a_replica() {
        let t = TempDir::new("meta-unknown-src");
        let s = MetaStore::for_image(&image(&t, 4096));
        let mut m = s.create_fresh().unwrap();
        m.inconsistent = true;
        m.sync_source_gen = SOURCE_UNKNOWN;
        s.save(&m).unwrap();
        assert_eq!(s.load().unwrap(), MetaState::Ok(m));
        for _ in 0..64 {
            assert_ne!(random_nonzero_u64().unwrap(), SOURCE_UNKNOWN);
        }
    }

    #[test]
    fn a_replica_knows_it_lost_from_the_generations() {
        let t = TempDir::new("meta-lost");
        let s = MetaStore::for_image(&image(&t, 4096));
        let mut m = s.create_fresh().unwrap();
        assert!(!m.lost_to(0), "no quorum: nothing to say");
        assert!(m.lost_to(3), "it never knew generation 3");
        m.record_generation(3);
        assert!(!m.lost_to(3) && !m.lost_to(2));
        assert!(m.lost_to(5));
    }

    /// A read-only loop device over a file, detached on drop.
    struct Loop(PathBuf);

    impl Loop {
        fn read_only_over(file: &Path) -> Loop {
            let out = Command::new("losetup")
                .args(["-r", "-f", "--show"])
                .arg(file)
                .output()
                .expect("losetup");
            assert!(
                out.status.success(),
                "losetup: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Loop(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        }

        /// Points the device at `file` (LOOP_CHANGE_FD: read-only devices, same size),
        /// in place: same device number, same node, no moment without a backing file.
        fn change_to(&self, file: &Path) {
            const LOOP_CHANGE_FD: libc::c_ulong = 0x4C06;
            let dev = File::open(&self.0).unwrap();
            let new = File::open(file).unwrap();
            // SAFETY: LOOP_CHANGE_FD takes the new backing file's descriptor by value;
            // both descriptors are open for the call.
            let rc = unsafe {
                libc::ioctl(
                    dev.as_raw_fd(),
                    LOOP_CHANGE_FD,
                    new.as_raw_fd() as libc::c_ulong,
                )
            };
            assert_eq!(rc, 0, "LOOP_CHANGE_FD: {}", io::Error::last_os_error());
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }

    #[test]
    fn a_block_device_is_known_by_what_is_behind_it() {
        let t = TempDir::new("meta-blk");
        let a = t.0.join("a.img");
        let b = t.0.join("b.img");
        for p in [&a, &b] {
            File::create(p).unwrap().set_len(1 << 20).unwrap();
        }
        let dev = Loop::read_only_over(&a);
        let s = MetaStore {
            image: dev.0.clone(),
            dir: t.0.join("dev.twinrun"),
        };
        let m = s.create_fresh().unwrap();
        assert_eq!(m.disk_size, 1 << 20);
        let ImageId::Block(rec) = &m.image else {
            panic!("{:?}", m.image)
        };
        let stable = rec.stable.clone().expect("a loop device's backing file");
        assert!(stable.contains("loop over file"), "{stable}");
        assert!(
            stable.contains(&fs::metadata(&a).unwrap().ino().to_string()),
            "{stable}"
        );
        s.save(&m).unwrap();
        assert_eq!(s.load().unwrap(), MetaState::Ok(m.clone()));
        // Another node for the same device (as after a reboot, where devtmpfs makes new
        // nodes): still this image.
        let node = t.0.join("node");
        let cpath = std::ffi::CString::new(node.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `cpath` is NUL-terminated and lives for the call.
        let rc = unsafe { libc::mknod(cpath.as_ptr(), libc::S_IFBLK | 0o600, rec.rdev) };
        assert_eq!(rc, 0, "mknod: {}", io::Error::last_os_error());
        let ImageId::Block(other) = image_identity(&node).unwrap().id else {
            panic!()
        };
        assert_ne!(other.node_ino, rec.node_ino);
        assert_eq!(m.image.check(&ImageId::Block(other)), Ok(()));
        // The same device pointed at another file of the same size: same path, node,
        // device number and size; another disk.
        dev.change_to(&b);
        let ImageId::Block(now) = image_identity(&dev.0).unwrap().id else {
            panic!()
        };
        assert_eq!(
            (now.rdev, now.node_dev, now.node_ino),
            (rec.rdev, rec.node_dev, rec.node_ino)
        );
        match s.load().unwrap() {
            MetaState::Replaced { reason } => {
                assert!(reason.contains("loop over file"), "{reason}")
            }
            other => panic!("a loop device over another file was taken as the image: {other:?}"),
        }
        // Without a stable id (a device sysfs says nothing of), the number and the node.
        let bare = |rdev, node_ino| BlockId {
            rdev,
            node_dev: 5,
            node_ino,
            stable: None,
        };
        let r = ImageId::Block(bare(7, 9));
        assert_eq!(r.check(&ImageId::Block(bare(7, 9))), Ok(()));
        assert!(r.check(&ImageId::Block(bare(8, 9))).is_err());
        assert!(r.check(&ImageId::Block(bare(7, 10))).is_err());
        assert!(r
            .check(&ImageId::Block(BlockId {
                stable: Some("x".into()),
                ..bare(7, 9)
            }))
            .is_err());
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
