//! The disk epoch journal: the data of every write the guest made, so that a second
//! copy of the image can be brought to the same content later (a standby applies an
//! epoch's writes only when that epoch commits).
//!
//! While on, each successful write request's data is copied out of guest memory when
//! the request completes (before its used entry is posted, so before the guest may
//! reuse the buffers), in completion order, into one contiguous buffer with one extent
//! per request. Requests that fail are not journalled (the image may have changed in
//! part: such a disk is out of sync and needs a resync). Flushes need no record: the
//! side that applies a journal syncs it. Writes in flight together that overlap are
//! replayed in completion order, which matches the image only if the kernel applied
//! them in that order; drivers do not issue such writes (virtio gives them no order).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::request::SECTOR_SIZE;
use super::written::{WrittenBlocks, WRITE_BLOCK};
use crate::vstate::memory::GuestMemoryMmap;

/// One journalled write: `len` bytes at `data[offset..]`, for the image at `sector`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalExtent {
    pub sector: u64,
    pub offset: u64,
    pub len: u64,
}

/// The writes of one disk between two takes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskJournal {
    /// Index of the disk in the VM config's `disks`.
    pub disk_index: usize,
    /// Write data, back to back in extent order.
    pub data: Vec<u8>,
    /// In completion order.
    pub extents: Vec<JournalExtent>,
}

impl DiskJournal {
    pub fn is_empty(&self) -> bool {
        self.extents.is_empty()
    }

    /// Bytes of write data.
    pub fn bytes(&self) -> u64 {
        self.data.len() as u64
    }

    /// `(byte offset in the image, data)` of each write, in order.
    pub fn writes(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.extents.iter().filter_map(|e| {
            let start = usize::try_from(e.offset).ok()?;
            let end = start.checked_add(usize::try_from(e.len).ok()?)?;
            Some((
                e.sector.checked_mul(SECTOR_SIZE)?,
                self.data.get(start..end)?,
            ))
        })
    }

    /// Appends one write of `len` bytes at byte `offset` of the image, copied from the
    /// guest buffers `bufs`. On a buffer that cannot be read (it was range-checked
    /// when the chain was popped, so only a guest that shrank its memory) the extent
    /// is not added and false is returned.
    pub(crate) fn record(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        bufs: &[(GuestAddress, u32)],
    ) -> bool {
        let start = self.data.len();
        for &(addr, n) in bufs {
            let at = self.data.len();
            self.data.resize(at + n as usize, 0);
            if mem.read_slice(&mut self.data[at..], addr).is_err() {
                self.data.truncate(start);
                return false;
            }
        }
        self.extents.push(JournalExtent {
            sector: offset / SECTOR_SIZE,
            offset: start as u64,
            len: (self.data.len() - start) as u64,
        });
        true
    }
}

/// The blocks of `written` read back from `file` (an image of `size` bytes; the last
/// block may be short) as one journal extent per run of blocks, in block order.
pub fn read_back(file: &File, size: u64, written: &WrittenBlocks) -> io::Result<DiskJournal> {
    let mut j = DiskJournal::default();
    for (first, n) in written.runs() {
        let off = first * WRITE_BLOCK;
        let len = (n * WRITE_BLOCK).min(size.saturating_sub(off));
        if len == 0 {
            continue;
        }
        let at = j.data.len();
        j.data.resize(at + len as usize, 0);
        file.read_exact_at(&mut j.data[at..], off)?;
        j.extents.push(JournalExtent {
            sector: off / SECTOR_SIZE,
            offset: at as u64,
            len,
        });
    }
    Ok(j)
}

/// Applies `journal` to `file` (a copy of the disk): writes each extent in order with
/// `pwrite`, then `fdatasync`. Pure I/O: no VM needed.
pub fn apply_journal(file: &File, journal: &DiskJournal) -> io::Result<()> {
    for (i, e) in journal.extents.iter().enumerate() {
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("journal extent {i} ({e:?}) is outside its data or the image range"),
            )
        };
        let start = usize::try_from(e.offset).map_err(|_| bad())?;
        let end = start
            .checked_add(usize::try_from(e.len).map_err(|_| bad())?)
            .ok_or_else(bad)?;
        let data = journal.data.get(start..end).ok_or_else(bad)?;
        let at = e.sector.checked_mul(SECTOR_SIZE).ok_or_else(bad)?;
        file.write_all_at(data, at)?;
    }
    file.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_and_apply() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        mem.write_slice(&[1u8; 512], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[2u8; 512], GuestAddress(0x3000)).unwrap();
        let mut j = DiskJournal::default();
        assert!(j.record(
            &mem,
            1024,
            &[(GuestAddress(0x1000), 512), (GuestAddress(0x3000), 512)]
        ));
        mem.write_slice(&[3u8; 512], GuestAddress(0x1000)).unwrap();
        assert!(j.record(&mem, 1536, &[(GuestAddress(0x1000), 512)]));
        assert!(!j.record(&mem, 0, &[(GuestAddress(0x20_0000), 512)]));
        assert_eq!(j.extents.len(), 2);
        assert_eq!(j.bytes(), 1536);
        let w: Vec<_> = j.writes().map(|(o, d)| (o, d.len(), d[0])).collect();
        assert_eq!(w, vec![(1024, 1024, 1), (1536, 512, 3)]);

        let p = std::env::temp_dir().join(format!("twinrun-journal-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        f.set_len(4096).unwrap();
        apply_journal(&f, &j).unwrap();
        let img = std::fs::read(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        assert!(img[..1024].iter().all(|&b| b == 0));
        assert!(img[1024..1536].iter().all(|&b| b == 1));
        // The later write of the same sector wins.
        assert!(img[1536..2048].iter().all(|&b| b == 3));
        assert!(img[2048..].iter().all(|&b| b == 0));

        // Read back: blocks 0 and 2 (the last one short of its 4 KiB).
        f.set_len(3 * 4096 - 512).unwrap();
        let mut w = WrittenBlocks::new(3 * 4096);
        w.mark(100, 1);
        w.mark(2 * 4096, 10);
        let back = read_back(&f, 3 * 4096 - 512, &w).unwrap();
        let runs: Vec<_> = back.writes().map(|(o, d)| (o, d.len())).collect();
        assert_eq!(runs, vec![(0, 4096), (8192, 3584)]);
        assert_eq!(&back.data[1024..1536], &[1u8; 512][..]);

        let mut bad = j.clone();
        bad.extents[0].len = 1 << 40;
        assert_eq!(
            apply_journal(&f, &bad).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
