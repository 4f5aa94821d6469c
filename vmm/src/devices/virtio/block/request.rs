//! Parsing and validation of one virtio-blk request chain.
//!
//! Layout (virtio 1.x, 5.2.6): a 16-byte device-readable header
//! `{ type: le32, reserved: le32, sector: le64 }`, then the data buffers (device-readable
//! for writes, device-writable for reads and GET_ID), then one device-writable status
//! byte. The header must sit in the first descriptor and the status byte is the last byte
//! of the last descriptor; data may be split across descriptors in any way.

use vm_memory::{Bytes, GuestAddress};

use super::super::{addr_add, Chain};
use crate::vstate::memory::GuestMemoryMmap;

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

pub const SECTOR_SIZE: u64 = 512;
pub const HEADER_SIZE: u32 = 16;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
/// Largest data transfer one request may ask for; bigger ones get IOERR (a driver
/// splits its I/O well below this).
pub const MAX_DATA_BYTES: u64 = 16 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
}

/// A request that passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub head: u16,
    pub kind: RequestType,
    /// Byte offset into the image (sector * 512; 0 for FLUSH and GET_ID).
    pub offset: u64,
    /// Guest buffers to transfer, in order.
    pub data: Vec<(GuestAddress, u32)>,
    pub data_len: u64,
    pub status: GuestAddress,
}

/// Why a chain is not a request the device will run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// There is nowhere to report an error: the driver is broken.
    #[error("request chain {head} has no device-writable status byte")]
    NoStatus { head: u16 },
    /// Reported to the driver by writing `code` at `status`.
    #[error("request chain {head} rejected ({why}) with status {code}")]
    Rejected {
        head: u16,
        status: GuestAddress,
        code: u8,
        why: &'static str,
    },
}

/// What the device promises about its image.
#[derive(Clone, Copy, Debug)]
pub struct DiskGeometry {
    pub capacity_bytes: u64,
    pub read_only: bool,
}

/// Validates `chain` as a block request.
pub fn parse(
    mem: &GuestMemoryMmap,
    chain: &Chain,
    disk: DiskGeometry,
) -> Result<Request, RequestError> {
    let head = chain.head;
    let last = chain.descs.last().ok_or(RequestError::NoStatus { head })?;
    if !last.is_write_only() || last.len() == 0 {
        return Err(RequestError::NoStatus { head });
    }
    // len >= 1, and pop_chain checked the buffer is in guest memory.
    let status =
        addr_add(last.addr(), u64::from(last.len()) - 1).ok_or(RequestError::NoStatus { head })?;
    let reject = |code, why| RequestError::Rejected {
        head,
        status,
        code,
        why,
    };

    let first = &chain.descs[0];
    if first.is_write_only() {
        return Err(reject(VIRTIO_BLK_S_IOERR, "header is device-writable"));
    }
    if first.len() < HEADER_SIZE {
        return Err(reject(VIRTIO_BLK_S_IOERR, "header too short"));
    }
    let mut hdr = [0u8; HEADER_SIZE as usize];
    mem.read_slice(&mut hdr, first.addr())
        .map_err(|_| reject(VIRTIO_BLK_S_IOERR, "header unreadable"))?;
    let rtype = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    let kind = match rtype {
        VIRTIO_BLK_T_IN => RequestType::In,
        VIRTIO_BLK_T_OUT => RequestType::Out,
        VIRTIO_BLK_T_FLUSH => RequestType::Flush,
        VIRTIO_BLK_T_GET_ID => RequestType::GetId,
        _ => return Err(reject(VIRTIO_BLK_S_UNSUPP, "unknown request type")),
    };

    // Data buffers: what follows the header, minus the status byte. The status byte
    // shares the last descriptor when that descriptor is longer than one byte.
    let data_writable = matches!(kind, RequestType::In | RequestType::GetId);
    let mut data = Vec::new();
    let n = chain.descs.len();
    for (i, d) in chain.descs.iter().enumerate() {
        let (mut addr, mut len) = (d.addr(), d.len());
        if i == 0 {
            // Header bytes; anything after them is data.
            addr = addr_add(addr, u64::from(HEADER_SIZE))
                .ok_or(reject(VIRTIO_BLK_S_IOERR, "header overflows"))?;
            len -= HEADER_SIZE;
        }
        if i == n - 1 {
            len -= 1;
        }
        if len == 0 {
            continue;
        }
        if d.is_write_only() != data_writable {
            return Err(reject(
                VIRTIO_BLK_S_IOERR,
                "data buffer has the wrong direction",
            ));
        }
        data.push((addr, len));
    }
    let data_len: u64 = data.iter().map(|&(_, l)| u64::from(l)).sum();

    let offset = match kind {
        RequestType::In | RequestType::Out => {
            if kind == RequestType::Out && disk.read_only {
                return Err(reject(VIRTIO_BLK_S_IOERR, "write to a read-only disk"));
            }
            if data_len == 0 || !data_len.is_multiple_of(SECTOR_SIZE) {
                return Err(reject(
                    VIRTIO_BLK_S_IOERR,
                    "data length is not a non-zero multiple of 512",
                ));
            }
            if data_len > MAX_DATA_BYTES {
                return Err(reject(VIRTIO_BLK_S_IOERR, "request too large"));
            }
            let offset = sector
                .checked_mul(SECTOR_SIZE)
                .ok_or(reject(VIRTIO_BLK_S_IOERR, "sector overflows"))?;
            let end = offset
                .checked_add(data_len)
                .ok_or(reject(VIRTIO_BLK_S_IOERR, "sector overflows"))?;
            if end > disk.capacity_bytes {
                return Err(reject(VIRTIO_BLK_S_IOERR, "beyond the end of the disk"));
            }
            offset
        }
        RequestType::Flush => 0,
        RequestType::GetId => {
            if data_len == 0 {
                return Err(reject(VIRTIO_BLK_S_IOERR, "GET_ID without a buffer"));
            }
            0
        }
    };
    Ok(Request {
        head,
        kind,
        offset,
        data,
        data_len,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::super::super::pop_chain;
    use super::super::super::testutil::*;
    use super::*;

    const DISK: DiskGeometry = DiskGeometry {
        capacity_bytes: 8 * 512,
        read_only: false,
    };

    fn hdr(mem: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn run(bufs: &[(u64, u32, bool)], disk: DiskGeometry) -> Result<Request, RequestError> {
        let mem = memory();
        hdr(&mem, 0x8000, VIRTIO_BLK_T_IN, 1);
        hdr(&mem, 0x8100, VIRTIO_BLK_T_OUT, 1);
        hdr(&mem, 0x8200, 77, 0);
        hdr(&mem, 0x8300, VIRTIO_BLK_T_IN, 7);
        hdr(&mem, 0x8400, VIRTIO_BLK_T_IN, u64::MAX / 256);
        hdr(&mem, 0x8500, VIRTIO_BLK_T_GET_ID, 0);
        let mut drv = Driver::new(&mem, 16);
        let mut q = drv.queue();
        drv.chain(0, bufs);
        let c = pop_chain(&mut q, &mem, 0).unwrap().unwrap();
        parse(&mem, &c, disk)
    }

    fn rejected(r: Result<Request, RequestError>) -> u8 {
        match r {
            Err(RequestError::Rejected { code, status, .. }) => {
                assert_eq!(status, GuestAddress(0x20000));
                code
            }
            other => panic!("expected rejection, got {other:?}"),
        }
    }

    #[test]
    fn parses_read_with_split_buffers() {
        let r = run(
            &[
                (0x8000, 16, false),
                (0x10000, 512, true),
                (0x11000, 512, true),
                (0x20000, 1, true),
            ],
            DISK,
        )
        .unwrap();
        assert_eq!(r.kind, RequestType::In);
        assert_eq!(r.offset, 512);
        assert_eq!(r.data_len, 1024);
        assert_eq!(r.status, GuestAddress(0x20000));
    }

    #[test]
    fn status_may_share_last_descriptor() {
        let r = run(&[(0x8000, 16, false), (0x1FE00, 513, true)], DISK).unwrap();
        assert_eq!(r.data, vec![(GuestAddress(0x1FE00), 512)]);
        assert_eq!(r.status, GuestAddress(0x20000));
    }

    #[test]
    fn no_writable_status_is_fatal() {
        assert!(matches!(
            run(&[(0x8000, 16, false), (0x10000, 512, false)], DISK),
            Err(RequestError::NoStatus { .. })
        ));
        assert!(matches!(
            run(&[(0x8000, 16, false), (0x10000, 0, true)], DISK),
            Err(RequestError::NoStatus { .. })
        ));
    }

    #[test]
    fn short_or_writable_header_is_ioerr() {
        let code = rejected(run(&[(0x8000, 8, false), (0x20000, 1, true)], DISK));
        assert_eq!(code, VIRTIO_BLK_S_IOERR);
        let code = rejected(run(&[(0x8000, 16, true), (0x20000, 1, true)], DISK));
        assert_eq!(code, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn unknown_type_is_unsupp() {
        let code = rejected(run(&[(0x8200, 16, false), (0x20000, 1, true)], DISK));
        assert_eq!(code, VIRTIO_BLK_S_UNSUPP);
    }

    #[test]
    fn wrong_data_direction_is_ioerr() {
        // A read whose data buffer is device-readable.
        let code = rejected(run(
            &[
                (0x8000, 16, false),
                (0x10000, 512, false),
                (0x20000, 1, true),
            ],
            DISK,
        ));
        assert_eq!(code, VIRTIO_BLK_S_IOERR);
        // A write whose data buffer is device-writable.
        let code = rejected(run(
            &[
                (0x8100, 16, false),
                (0x10000, 512, true),
                (0x20000, 1, true),
            ],
            DISK,
        ));
        assert_eq!(code, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn bad_lengths_and_ranges_are_ioerr() {
        // Not a multiple of 512.
        let code = rejected(run(
            &[
                (0x8000, 16, false),
                (0x10000, 100, true),
                (0x20000, 1, true),
            ],
            DISK,
        ));
        assert_eq!(code, VIRTIO_BLK_S_IOERR);
        // No data.
        let code = rejected(run(&[(0x8000, 16, false), (0x20000, 1, true)], DISK));
        assert_eq!(code, VIRTIO_BLK_S_IOERR);
        // Past the end: sector 7 + 2 sectors on an 8-sector disk.
        let code = rejected(run(
            &[
                (0x8300, 16, false),
                (0x10000, 1024, true),
                (0x20000, 1, true),
            ],
            DISK,
        ));
        assert_eq!(code, VIRTIO_BLK_S_IOERR);
        // Sector * 512 overflows.
        let code = rejected(run(
            &[
                (0x8400, 16, false),
                (0x10000, 512, true),
                (0x20000, 1, true),
            ],
            DISK,
        ));
        assert_eq!(code, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn too_large_is_ioerr() {
        let mem = memory();
        hdr(&mem, 0x8000, VIRTIO_BLK_T_IN, 0);
        let mut drv = Driver::new(&mem, 64);
        let mut q = drv.queue();
        // 34 descriptors of 512 KiB (the same memory) ask for 17 MiB.
        let mut bufs = vec![(0x8000, 16, false)];
        bufs.extend(std::iter::repeat_n((0x80000, 0x80000, true), 34));
        bufs.push((0x20000, 1, true));
        drv.chain(0, &bufs);
        let c = pop_chain(&mut q, &mem, 0).unwrap().unwrap();
        let big = DiskGeometry {
            capacity_bytes: 1 << 40,
            read_only: false,
        };
        assert_eq!(rejected(parse(&mem, &c, big)), VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn write_to_read_only_is_ioerr() {
        let ro = DiskGeometry {
            capacity_bytes: 8 * 512,
            read_only: true,
        };
        let code = rejected(run(
            &[
                (0x8100, 16, false),
                (0x10000, 512, false),
                (0x20000, 1, true),
            ],
            ro,
        ));
        assert_eq!(code, VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn get_id_needs_a_buffer() {
        let code = rejected(run(&[(0x8500, 16, false), (0x20000, 1, true)], DISK));
        assert_eq!(code, VIRTIO_BLK_S_IOERR);
        let r = run(
            &[(0x8500, 16, false), (0x10000, 20, true), (0x20000, 1, true)],
            DISK,
        )
        .unwrap();
        assert_eq!(r.kind, RequestType::GetId);
    }
}
