//! The standby's crash-safe, in-order apply of committed epochs' disk writes.
//!
//! Before this journal the standby pwrote each committed epoch's writes into its images
//! and fdatasynced every image per epoch; a standby killed mid-apply came back with a
//! half-applied epoch. Now each epoch is first appended as ONE checksummed record to a
//! journal file and made durable with ONE fdatasync (the durability point: the caller
//! acknowledges the epoch after [`ApplyJournal::commit`] returns); only then are the
//! writes pwritten into the images, without syncing them. Every so often (journal size
//! or epoch count past [`JournalLimits`]) a checkpoint fdatasyncs the images, persists an
//! "applied through" marker crash-safely (write temp, fsync, rename, fsync directory) and
//! truncates the journal. Steady state: one fdatasync per epoch.
//!
//! Recovery ([`open`]) replays, in order, every complete record after the marker onto the
//! images (pwrites are idempotent, so replaying an epoch that had partly or fully reached
//! the images is harmless), syncs them, checkpoints, and discards a torn tail (a partial
//! record or one whose CRC fails: the epoch was never acknowledged). The images then hold
//! exactly the state after an epoch boundary that is at or after the last acknowledged
//! epoch.
//!
//! Files in the journal directory: `apply.journal` (records), `apply.marker` (the applied
//! through epoch; absent until the first checkpoint), `apply.marker.tmp` (transient).
//!
//! Record layout (little endian):
//! `magic u32 | count u32 | epoch u64 | payload_len u64 | crc u32 | reserved u32` (32 bytes)
//! then `count` entries `disk u16 | reserved u16 | len u32 | offset u64 | data[len]`.
//! The CRC32C covers the header's first 24 bytes and the payload.
//!
//! I/O module: this touches files.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

const JOURNAL_FILE: &str = "apply.journal";
const MARKER_FILE: &str = "apply.marker";
const MARKER_TMP: &str = "apply.marker.tmp";

const RECORD_MAGIC: u32 = 0x4a41_5754; // "TWAJ"
const MARKER_MAGIC: u32 = 0x4d41_5754; // "TWAM"
const HEADER_LEN: usize = 32;
const ENTRY_HEADER_LEN: usize = 16;
const MARKER_LEN: usize = 20;

/// Most writes one epoch may carry (a bound on a record's entry count, checked on commit
/// and on replay so a corrupt count can't make recovery loop for long).
pub const MAX_WRITES_PER_EPOCH: usize = 1 << 20;
/// Largest record (header + entries + data): one epoch's disk writes are bounded by the
/// primary's epoch size, far below this.
pub const MAX_RECORD_BYTES: u64 = 1 << 30;

/// When the journal is checkpointed (images synced, marker persisted, journal truncated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalLimits {
    /// Checkpoint once the journal holds at least this many bytes.
    pub max_bytes: u64,
    /// Checkpoint once the journal holds at least this many epochs.
    pub max_epochs: u32,
}

impl Default for JournalLimits {
    fn default() -> Self {
        JournalLimits {
            max_bytes: 64 << 20,
            max_epochs: 256,
        }
    }
}

/// What [`open`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Epochs replayed onto the images, in order.
    pub replayed_epochs: Vec<u64>,
    /// Bytes discarded at the journal's end (partial record, bad CRC, stale records).
    pub torn_tail_bytes: u64,
    /// The epoch the images hold after recovery (None: nothing was ever applied).
    pub applied_through: Option<u64>,
}

#[derive(Debug, Error)]
pub enum JournalError {
    #[error("apply journal {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("apply journal in {0} is in use by another process")]
    Locked(PathBuf),
    #[error("apply marker {path} is damaged")]
    BadMarker { path: PathBuf },
    #[error("epoch {epoch} is not after the last committed epoch {last}")]
    EpochOrder { epoch: u64, last: u64 },
    #[error("epoch {epoch}: write to disk {disk} but only {disks} disks")]
    NoDisk { epoch: u64, disk: u16, disks: usize },
    #[error("epoch {epoch}: write of {len} bytes at {offset} past the end of disk {disk} ({size} bytes)")]
    OutOfRange {
        epoch: u64,
        disk: u16,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("epoch {epoch}: {count} writes / {bytes} bytes exceed the record limits")]
    TooLarge {
        epoch: u64,
        count: usize,
        bytes: u64,
    },
    #[error("disk {disk}: {source}")]
    Disk {
        disk: u16,
        #[source]
        source: io::Error,
    },
    #[error("the apply journal failed earlier; reopen it to recover")]
    Poisoned,
}

/// Test-only crash hooks: the process SIGKILLs itself at the chosen point, so tests can
/// crash exactly between the durability point and the apply, or inside a checkpoint.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashPoint {
    /// Right after the journal fdatasync of this epoch, before any image write.
    AfterAppend(u64),
    /// After `writes_done` of this epoch's image writes.
    MidApply { epoch: u64, writes_done: usize },
    /// In the next checkpoint, after the marker is durable, before the journal truncate.
    AfterMarker,
}

pub struct ApplyJournal {
    dir: PathBuf,
    journal_path: PathBuf,
    journal: File,
    disks: Vec<File>,
    disk_sizes: Vec<u64>,
    limits: JournalLimits,
    /// Bytes of complete records in the journal (the next append's offset).
    journal_len: u64,
    journal_epochs: u32,
    applied_through: Option<u64>,
    last_committed: Option<u64>,
    /// Set after an I/O error left memory and files possibly apart.
    poisoned: bool,
    buf: Vec<u8>,
    crash: Option<CrashPoint>,
}

/// Opens (creating if needed) the journal in `dir` for `disks` with the default limits.
pub fn open(dir: &Path, disks: &[File]) -> Result<(ApplyJournal, RecoveryReport), JournalError> {
    open_with_limits(dir, disks, JournalLimits::default())
}

/// [`open`] with explicit checkpoint limits.
pub fn open_with_limits(
    dir: &Path,
    disks: &[File],
    limits: JournalLimits,
) -> Result<(ApplyJournal, RecoveryReport), JournalError> {
    assert!(limits.max_bytes > 0 && limits.max_epochs > 0);
    assert!(disks.len() <= usize::from(u16::MAX) + 1);
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JournalError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let journal_path = dir.join(JOURNAL_FILE);
    let journal = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&journal_path)
        .map_err(io_err(&journal_path))?;
    lock(&journal).map_err(|e| {
        if e.kind() == io::ErrorKind::WouldBlock {
            JournalError::Locked(dir.to_path_buf())
        } else {
            JournalError::Io {
                path: journal_path.clone(),
                source: e,
            }
        }
    })?;
    let mut files = Vec::with_capacity(disks.len());
    let mut sizes = Vec::with_capacity(disks.len());
    for (i, d) in disks.iter().enumerate() {
        let disk = i as u16;
        let f = d
            .try_clone()
            .map_err(|source| JournalError::Disk { disk, source })?;
        // Seek, not metadata: a block device's metadata length is 0.
        let size = (&f)
            .seek(SeekFrom::End(0))
            .map_err(|source| JournalError::Disk { disk, source })?;
        files.push(f);
        sizes.push(size);
    }
    let marker = read_marker(dir)?;
    let mut j = ApplyJournal {
        dir: dir.to_path_buf(),
        journal_path,
        journal,
        disks: files,
        disk_sizes: sizes,
        limits,
        journal_len: 0,
        journal_epochs: 0,
        applied_through: marker,
        last_committed: marker,
        poisoned: false,
        buf: Vec::new(),
        crash: None,
    };
    let report = j.recover()?;
    Ok((j, report))
}

impl ApplyJournal {
    /// The epoch the images durably hold (as of the last checkpoint).
    pub fn applied_through(&self) -> Option<u64> {
        self.applied_through
    }

    /// The last epoch made durable by [`commit`](Self::commit).
    pub fn last_committed(&self) -> Option<u64> {
        self.last_committed
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    #[doc(hidden)]
    pub fn set_crash_point(&mut self, p: Option<CrashPoint>) {
        self.crash = p;
    }

    /// Makes `epoch`'s writes durable (one journal append + one fdatasync), then writes them
    /// into the images without syncing them. Epochs must strictly increase. Every write is
    /// validated before anything is written. On an I/O error the journal is poisoned:
    /// reopen it to recover (a record that reached the journal is replayed then). An error
    /// after the append (image write, checkpoint) still leaves the epoch durable:
    /// [`last_committed`](Self::last_committed) says which epochs are.
    pub fn commit(&mut self, epoch: u64, writes: &[(u16, u64, &[u8])]) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        if let Some(last) = self.last_committed {
            if epoch <= last {
                return Err(JournalError::EpochOrder { epoch, last });
            }
        }
        let mut payload: u64 = 0;
        for &(disk, offset, data) in writes {
            self.check_write(epoch, disk, offset, data.len() as u64)?;
            payload = payload.saturating_add(ENTRY_HEADER_LEN as u64 + data.len() as u64);
        }
        let rec_len = HEADER_LEN as u64 + payload;
        if writes.len() > MAX_WRITES_PER_EPOCH || rec_len > MAX_RECORD_BYTES {
            return Err(JournalError::TooLarge {
                epoch,
                count: writes.len(),
                bytes: rec_len,
            });
        }
        // One contiguous buffer, one pwrite: the copy is cheap next to the fdatasync.
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.reserve(rec_len as usize);
        buf.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        buf.extend_from_slice(&(writes.len() as u32).to_le_bytes());
        buf.extend_from_slice(&epoch.to_le_bytes());
        buf.extend_from_slice(&payload.to_le_bytes());
        buf.extend_from_slice(&[0u8; 8]); // crc + reserved, filled below
        for &(disk, offset, data) in writes {
            buf.extend_from_slice(&disk.to_le_bytes());
            buf.extend_from_slice(&0u16.to_le_bytes());
            buf.extend_from_slice(&(data.len() as u32).to_le_bytes());
            buf.extend_from_slice(&offset.to_le_bytes());
            buf.extend_from_slice(data);
        }
        debug_assert_eq!(buf.len() as u64, rec_len);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&buf[..24]), &buf[HEADER_LEN..]);
        buf[24..28].copy_from_slice(&crc.to_le_bytes());
        let appended = self
            .journal
            .write_all_at(&buf, self.journal_len)
            .and_then(|()| self.journal.sync_data());
        self.buf = buf;
        if let Err(source) = appended {
            self.poisoned = true;
            return Err(JournalError::Io {
                path: self.journal_path.clone(),
                source,
            });
        }
        // Durable: the caller may acknowledge the epoch once we return, whatever follows.
        self.journal_len += rec_len;
        self.journal_epochs += 1;
        self.last_committed = Some(epoch);
        if self.crash == Some(CrashPoint::AfterAppend(epoch)) {
            crash_now();
        }
        for (i, &(disk, offset, data)) in writes.iter().enumerate() {
            if self.crash
                == Some(CrashPoint::MidApply {
                    epoch,
                    writes_done: i,
                })
            {
                crash_now();
            }
            if let Err(source) = self.disks[usize::from(disk)].write_all_at(data, offset) {
                self.poisoned = true;
                return Err(JournalError::Disk { disk, source });
            }
        }
        if self.journal_len >= self.limits.max_bytes
            || self.journal_epochs >= self.limits.max_epochs
        {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Checkpoints now: images synced, marker persisted, journal emptied. For a clean
    /// shutdown or before failover promotes the images.
    pub fn sync_all(&mut self) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        if self.journal_len > 0 || self.applied_through != self.last_committed {
            self.checkpoint()?;
        }
        Ok(())
    }

    fn check_write(
        &self,
        epoch: u64,
        disk: u16,
        offset: u64,
        len: u64,
    ) -> Result<(), JournalError> {
        let Some(&size) = self.disk_sizes.get(usize::from(disk)) else {
            return Err(JournalError::NoDisk {
                epoch,
                disk,
                disks: self.disks.len(),
            });
        };
        let fits = len <= u64::from(u32::MAX) && offset.checked_add(len).is_some_and(|e| e <= size);
        if !fits {
            return Err(JournalError::OutOfRange {
                epoch,
                disk,
                offset,
                len,
                size,
            });
        }
        Ok(())
    }

    fn checkpoint(&mut self) -> Result<(), JournalError> {
        let r = self.checkpoint_inner();
        if r.is_err() {
            self.poisoned = true;
        }
        r
    }

    fn checkpoint_inner(&mut self) -> Result<(), JournalError> {
        // Order matters: images durable, then the marker saying so, then the journal may go.
        for (i, d) in self.disks.iter().enumerate() {
            d.sync_data().map_err(|source| JournalError::Disk {
                disk: i as u16,
                source,
            })?;
        }
        if let Some(e) = self.last_committed {
            if self.applied_through != Some(e) {
                write_marker(&self.dir, e)?;
            }
        }
        if self.crash == Some(CrashPoint::AfterMarker) {
            crash_now();
        }
        self.applied_through = self.last_committed;
        self.journal
            .set_len(0)
            .and_then(|()| self.journal.sync_data())
            .map_err(|source| JournalError::Io {
                path: self.journal_path.clone(),
                source,
            })?;
        self.journal_len = 0;
        self.journal_epochs = 0;
        Ok(())
    }

    /// Replays complete records past the marker, then checkpoints and empties the journal.
    fn recover(&mut self) -> Result<RecoveryReport, JournalError> {
        let io_err = |source| JournalError::Io {
            path: self.journal_path.clone(),
            source,
        };
        let file_len = self.journal.metadata().map_err(io_err)?.len();
        let mut report = RecoveryReport::default();
        let mut pos: u64 = 0;
        let mut prev: Option<u64> = None;
        let mut buf = std::mem::take(&mut self.buf);
        while let Some((epoch, entries, rec_len)) = self.read_record(pos, file_len, &mut buf)? {
            // Stale records (from before a truncate that didn't reach the disk) can only
            // sit after newer ones if the file is damaged: stop there.
            if prev.is_some_and(|p| epoch <= p) {
                break;
            }
            prev = Some(epoch);
            pos += rec_len;
            if self.applied_through.is_some_and(|a| epoch <= a) {
                continue; // already in the images (synced before the marker was written)
            }
            for &(disk, offset, ref range) in &entries {
                self.check_write(epoch, disk, offset, (range.end - range.start) as u64)?;
            }
            for (disk, offset, range) in entries {
                self.disks[usize::from(disk)]
                    .write_all_at(&buf[range], offset)
                    .map_err(|source| JournalError::Disk { disk, source })?;
            }
            report.replayed_epochs.push(epoch);
            self.last_committed = Some(epoch);
        }
        self.buf = buf;
        report.torn_tail_bytes = file_len - pos;
        if file_len > 0 || self.applied_through != self.last_committed {
            if !report.replayed_epochs.is_empty() || report.torn_tail_bytes > 0 {
                log::info!(
                    "apply journal {}: replayed epochs {:?}, discarded {} torn tail bytes",
                    self.dir.display(),
                    report.replayed_epochs,
                    report.torn_tail_bytes
                );
            }
            self.checkpoint_inner()?;
        }
        report.applied_through = self.applied_through;
        Ok(report)
    }

    /// Reads the record at `pos` into `buf` (payload only). None: no complete valid record.
    fn read_record(
        &self,
        pos: u64,
        file_len: u64,
        buf: &mut Vec<u8>,
    ) -> Result<Option<(u64, Vec<Entry>, u64)>, JournalError> {
        if file_len - pos < HEADER_LEN as u64 {
            return Ok(None);
        }
        let mut h = [0u8; HEADER_LEN];
        self.journal
            .read_exact_at(&mut h, pos)
            .map_err(|source| JournalError::Io {
                path: self.journal_path.clone(),
                source,
            })?;
        let magic = le_u32(&h[0..4]);
        let count = le_u32(&h[4..8]);
        let epoch = le_u64(&h[8..16]);
        let payload = le_u64(&h[16..24]);
        let crc = le_u32(&h[24..28]);
        let rec_len = (HEADER_LEN as u64).saturating_add(payload);
        if magic != RECORD_MAGIC
            || count as usize > MAX_WRITES_PER_EPOCH
            || rec_len > MAX_RECORD_BYTES
            || rec_len > file_len - pos
        {
            return Ok(None);
        }
        buf.clear();
        buf.resize(payload as usize, 0);
        self.journal
            .read_exact_at(buf, pos + HEADER_LEN as u64)
            .map_err(|source| JournalError::Io {
                path: self.journal_path.clone(),
                source,
            })?;
        if crc32c::crc32c_append(crc32c::crc32c(&h[..24]), buf) != crc {
            return Ok(None);
        }
        Ok(parse_entries(buf, count).map(|entries| (epoch, entries, rec_len)))
    }
}

type Entry = (u16, u64, std::ops::Range<usize>);

/// Splits a CRC-checked payload into entries; None if the layout doesn't add up.
fn parse_entries(payload: &[u8], count: u32) -> Option<Vec<Entry>> {
    let mut out = Vec::with_capacity(count.min(1024) as usize);
    let mut at = 0usize;
    for _ in 0..count {
        let h = payload.get(at..at + ENTRY_HEADER_LEN)?;
        let disk = u16::from_le_bytes([h[0], h[1]]);
        let len = u32::from_le_bytes(h[4..8].try_into().ok()?) as usize;
        let offset = u64::from_le_bytes(h[8..16].try_into().ok()?);
        let start = at + ENTRY_HEADER_LEN;
        let end = start.checked_add(len)?;
        if end > payload.len() {
            return None;
        }
        out.push((disk, offset, start..end));
        at = end;
    }
    (at == payload.len()).then_some(out)
}

fn read_marker(dir: &Path) -> Result<Option<u64>, JournalError> {
    let path = dir.join(MARKER_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(JournalError::Io { path, source }),
    };
    // The marker is only ever replaced by rename, so a damaged one is real damage.
    if bytes.len() != MARKER_LEN
        || le_u32(&bytes[0..4]) != MARKER_MAGIC
        || crc32c::crc32c(&bytes[..16]) != le_u32(&bytes[16..20])
    {
        return Err(JournalError::BadMarker { path });
    }
    Ok(Some(le_u64(&bytes[8..16])))
}

fn write_marker(dir: &Path, applied_through: u64) -> Result<(), JournalError> {
    let mut b = [0u8; MARKER_LEN];
    b[0..4].copy_from_slice(&MARKER_MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&applied_through.to_le_bytes());
    let crc = crc32c::crc32c(&b[..16]);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    let tmp = dir.join(MARKER_TMP);
    let path = dir.join(MARKER_FILE);
    let io_err = |p: &Path| {
        let path = p.to_path_buf();
        move |source| JournalError::Io { path, source }
    };
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all_at(&b, 0)
        .and_then(|()| f.sync_all())
        .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    // The rename is durable only once the directory is.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

fn lock(f: &File) -> io::Result<()> {
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn crash_now() -> ! {
    // SAFETY: sends SIGKILL to this process; no memory is involved.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}

/// The little-endian `u32` in `b` (exactly 4 bytes: the callers slice fixed fields).
pub(crate) fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_le_bytes(a)
}

/// The little-endian `u64` in `b` (exactly 8 bytes).
pub(crate) fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    static N: AtomicU32 = AtomicU32::new(0);

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmp(size: u64) -> (Tmp, File) {
        let dir = std::env::temp_dir().join(format!(
            "twinrun-aj-unit-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.join("disk.img"))
            .unwrap();
        f.set_len(size).unwrap();
        (Tmp(dir), f)
    }

    fn read_all(f: &File, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        f.read_exact_at(&mut v, 0).unwrap();
        v
    }

    #[test]
    fn commit_applies_and_reopen_is_clean() {
        let (t, disk) = tmp(8192);
        let jd = t.0.join("j");
        let (mut j, rep) = open(&jd, std::slice::from_ref(&disk)).unwrap();
        assert_eq!(rep, RecoveryReport::default());
        j.commit(5, &[(0, 10, b"hello"), (0, 8190, b"xy")]).unwrap();
        assert_eq!(j.last_committed(), Some(5));
        assert_eq!(j.applied_through(), None);
        let img = read_all(&disk, 8192);
        assert_eq!(&img[10..15], b"hello");
        assert_eq!(&img[8190..], b"xy");
        // Clean shutdown: nothing to replay afterwards.
        j.sync_all().unwrap();
        assert_eq!(j.applied_through(), Some(5));
        drop(j);
        let (j, rep) = open(&jd, std::slice::from_ref(&disk)).unwrap();
        assert!(rep.replayed_epochs.is_empty());
        assert_eq!(rep.applied_through, Some(5));
        assert_eq!(j.last_committed(), Some(5));
    }

    #[test]
    fn rejects_bad_order_and_bad_writes_without_writing() {
        let (t, disk) = tmp(4096);
        let (mut j, _) = open(&t.0.join("j"), std::slice::from_ref(&disk)).unwrap();
        j.commit(1, &[]).unwrap();
        assert!(matches!(
            j.commit(1, &[]),
            Err(JournalError::EpochOrder { epoch: 1, last: 1 })
        ));
        let e = j.commit(2, &[(0, 0, b"ok"), (0, 4095, b"ab")]).unwrap_err();
        assert!(
            matches!(
                e,
                JournalError::OutOfRange {
                    disk: 0,
                    offset: 4095,
                    ..
                }
            ),
            "{e}"
        );
        let e = j.commit(2, &[(1, 0, b"ok")]).unwrap_err();
        assert!(
            matches!(
                e,
                JournalError::NoDisk {
                    disk: 1,
                    disks: 1,
                    ..
                }
            ),
            "{e}"
        );
        assert!(read_all(&disk, 4096).iter().all(|&b| b == 0));
        assert_eq!(j.last_committed(), Some(1));
        j.commit(2, &[(0, 0, b"ok")]).unwrap();
    }

    #[test]
    fn replays_unapplied_records_and_drops_torn_tail() {
        let (t, disk) = tmp(4096);
        let jd = t.0.join("j");
        let (mut j, _) = open(&jd, std::slice::from_ref(&disk)).unwrap();
        j.commit(1, &[(0, 0, b"one")]).unwrap();
        j.commit(2, &[(0, 100, b"two")]).unwrap();
        drop(j);
        // As if the image writes never happened (journal durable, images not).
        disk.write_all_at(&[0u8; 4096], 0).unwrap();
        // A torn third record: header and half the payload.
        let jf = OpenOptions::new()
            .write(true)
            .open(jd.join(JOURNAL_FILE))
            .unwrap();
        let len = jf.metadata().unwrap().len();
        let mut torn = Vec::new();
        torn.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        torn.extend_from_slice(&1u32.to_le_bytes());
        torn.extend_from_slice(&3u64.to_le_bytes());
        torn.extend_from_slice(&100u64.to_le_bytes());
        torn.extend_from_slice(&[0u8; 8 + 20]);
        jf.write_all_at(&torn, len).unwrap();
        let (j, rep) = open(&jd, std::slice::from_ref(&disk)).unwrap();
        assert_eq!(rep.replayed_epochs, vec![1, 2]);
        assert_eq!(rep.torn_tail_bytes, torn.len() as u64);
        assert_eq!(rep.applied_through, Some(2));
        assert_eq!(j.last_committed(), Some(2));
        let img = read_all(&disk, 4096);
        assert_eq!(&img[0..3], b"one");
        assert_eq!(&img[100..103], b"two");
        assert_eq!(std::fs::metadata(jd.join(JOURNAL_FILE)).unwrap().len(), 0);
    }

    #[test]
    fn bad_crc_ends_the_journal() {
        let (t, disk) = tmp(4096);
        let jd = t.0.join("j");
        let (mut j, _) = open(&jd, std::slice::from_ref(&disk)).unwrap();
        j.commit(1, &[(0, 0, b"one")]).unwrap();
        j.commit(2, &[(0, 0, b"two")]).unwrap();
        drop(j);
        disk.write_all_at(&[0u8; 4096], 0).unwrap();
        let jf = OpenOptions::new()
            .read(true)
            .write(true)
            .open(jd.join(JOURNAL_FILE))
            .unwrap();
        let len = jf.metadata().unwrap().len();
        // Flip a data byte of the second record.
        jf.write_all_at(b"X", len - 1).unwrap();
        let (_j, rep) = open(&jd, std::slice::from_ref(&disk)).unwrap();
        assert_eq!(rep.replayed_epochs, vec![1]);
        assert_eq!(rep.torn_tail_bytes, len / 2);
        assert_eq!(&read_all(&disk, 3)[..], b"one");
    }

    #[test]
    fn checkpoints_at_the_epoch_limit_and_skips_applied_records() {
        let (t, disk) = tmp(4096);
        let jd = t.0.join("j");
        let limits = JournalLimits {
            max_bytes: 1 << 20,
            max_epochs: 3,
        };
        let (mut j, _) = open_with_limits(&jd, std::slice::from_ref(&disk), limits).unwrap();
        for e in 1..=4u64 {
            j.commit(e, &[(0, e * 10, &[e as u8; 4])]).unwrap();
        }
        assert_eq!(j.applied_through(), Some(3));
        assert_eq!(read_marker(&jd).unwrap(), Some(3));
        drop(j);
        let (_j, rep) = open_with_limits(&jd, std::slice::from_ref(&disk), limits).unwrap();
        assert_eq!(rep.replayed_epochs, vec![4]);
        assert_eq!(rep.applied_through, Some(4));
    }

    #[test]
    fn second_open_is_refused_while_locked() {
        let (t, disk) = tmp(4096);
        let jd = t.0.join("j");
        let (_j, _) = open(&jd, std::slice::from_ref(&disk)).unwrap();
        assert!(matches!(
            open(&jd, std::slice::from_ref(&disk)),
            Err(JournalError::Locked(_))
        ));
    }
}
