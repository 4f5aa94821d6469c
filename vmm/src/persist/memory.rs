//! Guest memory to and from a byte stream, region by region in address order, for
//! taking a whole VM elsewhere. (Checkpoints move only dirty pages; this is the full
//! copy a first synchronisation or a saved VM needs.)

use std::io::{self, Read, Write};

use crate::vstate::dirty::SummaryBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::vstate::memory::GuestMemoryMmap;

/// Bytes copied per step.
const CHUNK: usize = 1 << 20;

/// The `(start, length)` of every region, as [`super::VmState::memory`] records it.
pub fn layout(mem: &GuestMemoryMmap) -> Vec<(u64, u64)> {
    mem.iter().map(|r| (r.start_addr().0, r.len())).collect()
}

/// Total bytes of guest RAM.
pub fn total_len(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(|r| r.len()).sum()
}

fn to_io(e: vm_memory::GuestMemoryError) -> io::Error {
    io::Error::other(e)
}

/// Writes all of guest RAM to `w` (exactly [`total_len`] bytes).
pub fn save_memory(mem: &GuestMemoryMmap, w: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    for r in mem.iter() {
        let mut off = 0u64;
        while off < r.len() {
            let n = (r.len() - off).min(CHUNK as u64) as usize;
            mem.read_slice(&mut buf[..n], GuestAddress(r.start_addr().0 + off))
                .map_err(to_io)?;
            w.write_all(&buf[..n])?;
            off += n as u64;
        }
    }
    Ok(())
}

/// Fills all of guest RAM from `r` (exactly [`total_len`] bytes), then clears the
/// VMM's dirty bitmap: the memory now equals the source's, nothing in it is a new
/// write of this VMM.
pub fn load_memory(mem: &GuestMemoryMmap, r: &mut impl Read) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    for region in mem.iter() {
        let mut off = 0u64;
        while off < region.len() {
            let n = (region.len() - off).min(CHUNK as u64) as usize;
            r.read_exact(&mut buf[..n])?;
            mem.write_slice(&buf[..n], GuestAddress(region.start_addr().0 + off))
                .map_err(to_io)?;
            off += n as u64;
        }
    }
    for region in mem.iter() {
        let bitmap: &SummaryBitmap = MmapRegion::bitmap(region);
        bitmap.reset();
    }
    Ok(())
}

/// Copies all of `src` into `dst`, which must have the same layout.
pub fn copy_memory(src: &GuestMemoryMmap, dst: &GuestMemoryMmap) -> io::Result<()> {
    if layout(src) != layout(dst) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "guest memory layouts differ",
        ));
    }
    let mut bytes = Vec::with_capacity(total_len(src) as usize);
    save_memory(src, &mut bytes)?;
    load_memory(dst, &mut bytes.as_slice())
}
