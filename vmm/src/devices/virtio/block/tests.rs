//! virtio-blk through its transport, against real image files, with both engines.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use super::super::mmio::tests::*;
use super::super::mmio::*;
use super::super::testutil::*;
use super::*;
use crate::config::{DiskConfig, IoEngine};
use crate::devices::bus::BusDevice;

struct TempImage(PathBuf);

impl TempImage {
    fn new(tag: &str, sectors: u64) -> TempImage {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("twinrun-blk-{}-{tag}-{n}.img", std::process::id()));
        let mut f = File::create(&p).unwrap();
        for s in 0..sectors {
            f.write_all(&[s as u8; 512]).unwrap();
        }
        TempImage(p)
    }

    fn cfg(&self, engine: IoEngine, read_only: bool) -> DiskConfig {
        DiskConfig {
            path: self.0.clone(),
            read_only,
            io_engine: engine,
            serial: None,
        }
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const HDR: u64 = 0x8000;
const DATA: u64 = 0x10000;
const STATUS: u64 = 0x40000;

fn header(mem: &GuestMemoryMmap, slot: u16, t: u32, sector: u64) -> u64 {
    let at = HDR + u64::from(slot) * 16;
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&t.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
    at
}

fn ready<'a>(t: &mut MmioTransport, mem: &'a GuestMemoryMmap, features: u64) -> Driver<'a> {
    let drv = Driver::new(mem, 64);
    init(t, features);
    setup_queue(t, 0, &drv, 64);
    driver_ok(t);
    drv
}

fn transport(mem: &GuestMemoryMmap, cfg: &DiskConfig) -> MmioTransport {
    MmioTransport::new(mem.clone(), Box::new(Block::open(cfg).unwrap())).unwrap()
}

fn status(mem: &GuestMemoryMmap, slot: u16) -> u8 {
    read_u8(mem, STATUS + u64::from(slot))
}

fn happy_path(engine: IoEngine) {
    let img = TempImage::new("rw", 64);
    let mem = memory();
    let mut t = transport(&mem, &img.cfg(engine, false));
    // Capacity in config space.
    let mut cap = [0u8; 8];
    t.read(0, CONFIG_SPACE, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 64);
    assert_eq!(r(&mut t, REG_DEVICE_ID), twinrun_guest_abi::VIRTIO_ID_BLOCK);
    let mut drv = ready(&mut t, &mem, VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH);

    // Batch: write sectors 3..5 from two buffers, read sector 9, flush, get-id.
    mem.write_slice(&[0xAB; 512], GuestAddress(DATA)).unwrap();
    mem.write_slice(&[0xCD; 512], GuestAddress(DATA + 0x1000))
        .unwrap();
    let h = header(&mem, 0, VIRTIO_BLK_T_OUT, 3);
    drv.chain(
        0,
        &[
            (h, 16, false),
            (DATA, 512, false),
            (DATA + 0x1000, 512, false),
            (STATUS, 1, true),
        ],
    );
    let h = header(&mem, 1, VIRTIO_BLK_T_IN, 9);
    drv.chain(
        4,
        &[
            (h, 16, false),
            (DATA + 0x2000, 512, true),
            (STATUS + 1, 1, true),
        ],
    );
    let h = header(&mem, 2, VIRTIO_BLK_T_FLUSH, 0);
    drv.chain(8, &[(h, 16, false), (STATUS + 2, 1, true)]);
    let h = header(&mem, 3, VIRTIO_BLK_T_GET_ID, 0);
    drv.chain(
        12,
        &[
            (h, 16, false),
            (DATA + 0x3000, 20, true),
            (STATUS + 3, 1, true),
        ],
    );
    for i in 0..4 {
        mem.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
    }
    w(&mut t, REG_QUEUE_NOTIFY, 0);

    assert_eq!(drv.used_idx(), 4);
    for i in 0..4 {
        assert_eq!(status(&mem, i), VIRTIO_BLK_S_OK, "request {i}");
    }
    assert_eq!(drv.used(0), (0, 1));
    assert_eq!(drv.used(1), (4, 513));
    assert_eq!(drv.used(2), (8, 1));
    let id_len = img.0.file_name().unwrap().len().min(20) as u32;
    assert_eq!(drv.used(3), (12, id_len + 1));
    assert_eq!(r(&mut t, REG_INTERRUPT_STATUS) & INTERRUPT_USED_RING, 1);

    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA + 0x2000))
        .unwrap();
    assert_eq!(got, [9u8; 512]);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA + 0x3000))
        .unwrap();
    let name = img.0.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(&id[..id_len as usize], &name.as_bytes()[..id_len as usize]);

    // The write (sectors 3..5) is in block 0 of the written map; reads, flushes and
    // get-id mark nothing; taking the map resets it.
    let written = t
        .take_written_blocks()
        .expect("a block device keeps a written map");
    assert_eq!(written.runs(), vec![(0, 1)]);
    assert_eq!(t.take_written_blocks().unwrap().count(), 0);

    // The write reached the file.
    let mut f = File::open(&img.0).unwrap();
    let mut buf = vec![0u8; 1024];
    f.seek(SeekFrom::Start(3 * 512)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 0xAB));
    assert!(buf[512..].iter().all(|&b| b == 0xCD));

    // Reads mark guest memory dirty in the vm-memory bitmap.
    let region = mem.find_region(GuestAddress(DATA + 0x2000)).unwrap();
    use vm_memory::bitmap::Bitmap;
    use vm_memory::GuestMemoryRegion;
    assert!(region.bitmap().dirty_at((DATA + 0x2000) as usize));

    // Read back what was written, split across descriptors.
    let h = header(&mem, 4, VIRTIO_BLK_T_IN, 3);
    drv.chain(
        16,
        &[
            (h, 16, false),
            (DATA + 0x5000, 700, true),
            (DATA + 0x6000, 325, true),
        ],
    );
    w(&mut t, REG_QUEUE_NOTIFY, 0);
    assert_eq!(drv.used(4), (16, 1025));
    assert_eq!(read_u8(&mem, DATA + 0x5000 + 511), 0xAB);
    assert_eq!(read_u8(&mem, DATA + 0x5000 + 512), 0xCD);
    assert_eq!(read_u8(&mem, DATA + 0x6000 + 323), 0xCD);
    // The status byte is the last byte of the last descriptor.
    assert_eq!(read_u8(&mem, DATA + 0x6000 + 324), VIRTIO_BLK_S_OK);
}

#[test]
fn happy_path_io_uring() {
    happy_path(IoEngine::IoUring);
}

#[test]
fn happy_path_sync() {
    happy_path(IoEngine::Sync);
}

#[test]
fn serial_from_config() {
    let img = TempImage::new("serial", 8);
    let mem = memory();
    let mut cfg = img.cfg(IoEngine::Sync, false);
    cfg.serial = Some("disk-serial-0".into());
    let mut t = transport(&mem, &cfg);
    let mut drv = ready(&mut t, &mem, VIRTIO_F_VERSION_1);
    let h = header(&mem, 0, VIRTIO_BLK_T_GET_ID, 0);
    drv.chain(0, &[(h, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    w(&mut t, REG_QUEUE_NOTIFY, 0);
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..13], b"disk-serial-0");
    assert_eq!(id[13..], [0u8; 7]);
}

#[test]
fn read_only_disk_rejects_writes_and_offers_ro() {
    for engine in [IoEngine::IoUring, IoEngine::Sync] {
        let img = TempImage::new("ro", 8);
        let mem = memory();
        let mut t = transport(&mem, &img.cfg(engine, true));
        assert_ne!(r(&mut t, REG_DEVICE_FEATURES) as u64 & VIRTIO_BLK_F_RO, 0);
        let mut drv = ready(&mut t, &mem, VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_RO);
        let h = header(&mem, 0, VIRTIO_BLK_T_OUT, 0);
        drv.chain(0, &[(h, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        let h = header(&mem, 1, VIRTIO_BLK_T_IN, 1);
        drv.chain(
            3,
            &[(h, 16, false), (DATA, 512, true), (STATUS + 1, 1, true)],
        );
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(status(&mem, 0), VIRTIO_BLK_S_IOERR);
        assert_eq!(status(&mem, 1), VIRTIO_BLK_S_OK);
        assert_eq!(drv.used(0), (0, 1));
        assert_eq!(std::fs::read(&img.0).unwrap()[0], 0);
    }
}

#[test]
fn errors_reported_in_status_byte() {
    let img = TempImage::new("err", 8);
    let mem = memory();
    let mut t = transport(&mem, &img.cfg(IoEngine::IoUring, false));
    let mut drv = ready(&mut t, &mem, VIRTIO_F_VERSION_1);
    // Unknown type.
    let h = header(&mem, 0, 42, 0);
    drv.chain(0, &[(h, 16, false), (STATUS, 1, true)]);
    // Out of range.
    let h = header(&mem, 1, VIRTIO_BLK_T_IN, 8);
    drv.chain(
        2,
        &[(h, 16, false), (DATA, 512, true), (STATUS + 1, 1, true)],
    );
    // Header too short.
    let h = header(&mem, 2, VIRTIO_BLK_T_IN, 0);
    drv.chain(
        5,
        &[(h, 8, false), (DATA, 512, true), (STATUS + 2, 1, true)],
    );
    // Wrong direction.
    let h = header(&mem, 3, VIRTIO_BLK_T_IN, 0);
    drv.chain(
        8,
        &[(h, 16, false), (DATA, 512, false), (STATUS + 3, 1, true)],
    );
    // And a good one after them still works.
    let h = header(&mem, 4, VIRTIO_BLK_T_IN, 2);
    drv.chain(
        11,
        &[(h, 16, false), (DATA, 512, true), (STATUS + 4, 1, true)],
    );
    w(&mut t, REG_QUEUE_NOTIFY, 0);
    assert_eq!(drv.used_idx(), 5);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_UNSUPP);
    assert_eq!(status(&mem, 1), VIRTIO_BLK_S_IOERR);
    assert_eq!(status(&mem, 2), VIRTIO_BLK_S_IOERR);
    assert_eq!(status(&mem, 3), VIRTIO_BLK_S_IOERR);
    assert_eq!(status(&mem, 4), VIRTIO_BLK_S_OK);
    assert_eq!(read_u8(&mem, DATA), 2);
    assert_eq!(r(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
}

#[test]
fn chain_without_status_or_looping_needs_reset() {
    let img = TempImage::new("nostatus", 8);
    let mem = memory();
    let mut t = transport(&mem, &img.cfg(IoEngine::Sync, false));
    let mut drv = ready(&mut t, &mem, VIRTIO_F_VERSION_1);
    let h = header(&mem, 0, VIRTIO_BLK_T_IN, 0);
    drv.chain(0, &[(h, 16, false), (DATA, 512, false)]);
    w(&mut t, REG_QUEUE_NOTIFY, 0);
    assert_ne!(r(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_ne!(r(&mut t, REG_INTERRUPT_STATUS) & INTERRUPT_CONFIG_CHANGE, 0);
    drop(t);

    let mut t = transport(&mem, &img.cfg(IoEngine::Sync, false));
    let mut drv = ready(&mut t, &mem, VIRTIO_F_VERSION_1);
    // A good request, then a loop: the good one is answered, then the device fails.
    let h = header(&mem, 1, VIRTIO_BLK_T_IN, 1);
    drv.chain(0, &[(h, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    drv.desc(5, h, 16, VRING_DESC_F_NEXT, 6);
    drv.desc(6, DATA, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 5);
    drv.offer(5);
    w(&mut t, REG_QUEUE_NOTIFY, 0);
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK);
    assert_ne!(r(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
}

#[test]
fn data_outside_memory_needs_reset_without_writing() {
    let img = TempImage::new("oob", 8);
    let mem = memory();
    let mut t = transport(&mem, &img.cfg(IoEngine::IoUring, false));
    let mut drv = ready(&mut t, &mem, VIRTIO_F_VERSION_1);
    let h = header(&mem, 0, VIRTIO_BLK_T_IN, 0);
    drv.chain(
        0,
        &[(h, 16, false), (0xFFE00, 1024, true), (STATUS, 1, true)],
    );
    w(&mut t, REG_QUEUE_NOTIFY, 0);
    assert_ne!(r(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
    assert_eq!(drv.used_idx(), 0);
}

#[test]
fn open_checks_size_and_lock() {
    let img = TempImage::new("odd", 1);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&img.0)
        .unwrap()
        .write_all(b"x")
        .unwrap();
    let e = Block::open(&img.cfg(IoEngine::Sync, false)).err().unwrap();
    assert!(matches!(e, BlockError::BadSize { size: 513, .. }), "{e}");
    assert!(e.to_string().contains("not a multiple of 512"));

    let img = TempImage::new("lock", 4);
    let first = Block::open(&img.cfg(IoEngine::Sync, false)).unwrap();
    let e = Block::open(&img.cfg(IoEngine::Sync, false)).err().unwrap();
    assert!(matches!(e, BlockError::Locked { .. }), "{e}");
    let e = Block::open(&img.cfg(IoEngine::Sync, true)).err().unwrap();
    assert!(matches!(e, BlockError::Locked { .. }), "{e}");
    drop(first);
    // Readers share.
    let _a = Block::open(&img.cfg(IoEngine::Sync, true)).unwrap();
    let _b = Block::open(&img.cfg(IoEngine::Sync, true)).unwrap();
    assert!(Block::open(&img.cfg(IoEngine::Sync, false)).is_err());

    let missing = DiskConfig {
        path: "/nonexistent/twinrun.img".into(),
        read_only: false,
        io_engine: IoEngine::Sync,
        serial: None,
    };
    assert!(matches!(
        Block::open(&missing),
        Err(BlockError::Open { .. })
    ));
}

/// Disk index and ranges of one `before_writes` call.
type BeforeWrites = (usize, Vec<(u64, u64)>);

/// Hooks over an in-memory second copy of the disk, recording what they were asked.
#[derive(Default)]
struct CopyHooks {
    copy: std::sync::Mutex<Vec<u8>>,
    fail_before_writes: bool,
    before: std::sync::Mutex<Vec<BeforeWrites>>,
    flushes: std::sync::atomic::AtomicU32,
}

impl CopyHooks {
    fn with_copy(copy: Vec<u8>) -> CopyHooks {
        CopyHooks {
            copy: std::sync::Mutex::new(copy),
            ..CopyHooks::default()
        }
    }
}

impl DiskHooks for CopyHooks {
    fn before_writes(&self, disk: usize, ranges: &[(u64, u64)]) -> std::io::Result<()> {
        self.before.lock().unwrap().push((disk, ranges.to_vec()));
        if self.fail_before_writes {
            return Err(std::io::Error::other("bitmap not durable"));
        }
        Ok(())
    }
    fn read_failed(
        &self,
        _disk: usize,
        offset: u64,
        buf: &mut [u8],
        _err: &std::io::Error,
    ) -> std::io::Result<()> {
        let c = self.copy.lock().unwrap();
        buf.copy_from_slice(&c[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_failed(
        &self,
        _disk: usize,
        offset: u64,
        data: &[u8],
        _err: &std::io::Error,
    ) -> std::io::Result<()> {
        let mut c = self.copy.lock().unwrap();
        c[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn flush_failed(&self, _disk: usize, _err: &std::io::Error) -> std::io::Result<()> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

/// A device on `img` with its controls.
fn faulty(
    mem: &GuestMemoryMmap,
    img: &TempImage,
    engine: IoEngine,
) -> (MmioTransport, DiskControls) {
    let b = Block::open(&img.cfg(engine, false)).unwrap();
    let c = b.controls();
    (MmioTransport::new(mem.clone(), Box::new(b)).unwrap(), c)
}

/// Writes one sector of `fill` at `sector` (slot 0), then reads `sector` into
/// DATA + 0x2000 (slot 1).
fn write_then_read(
    t: &mut MmioTransport,
    mem: &GuestMemoryMmap,
    drv: &mut Driver,
    sector: u64,
    fill: u8,
) {
    mem.write_slice(&[fill; 512], GuestAddress(DATA)).unwrap();
    mem.write_slice(&[0x11; 512], GuestAddress(DATA + 0x2000))
        .unwrap();
    let base = drv.used_idx() * 3;
    let h = header(mem, 0, VIRTIO_BLK_T_OUT, sector);
    drv.chain(
        base,
        &[(h, 16, false), (DATA, 512, false), (STATUS, 1, true)],
    );
    // Separate batches: requests in flight together have no order.
    w(t, REG_QUEUE_NOTIFY, 0);
    let h = header(mem, 1, VIRTIO_BLK_T_IN, sector);
    drv.chain(
        base + 3,
        &[
            (h, 16, false),
            (DATA + 0x2000, 512, true),
            (STATUS + 1, 1, true),
        ],
    );
    w(t, REG_QUEUE_NOTIFY, 0);
}

fn sector_of_file(img: &TempImage, sector: u64) -> Vec<u8> {
    std::fs::read(&img.0).unwrap()[sector as usize * 512..][..512].to_vec()
}

#[test]
fn injected_bad_range_fails_without_touching_the_image() {
    for engine in [IoEngine::IoUring, IoEngine::Sync] {
        let img = TempImage::new("badrange", 16);
        let mem = memory();
        let (mut t, c) = faulty(&mem, &img, engine);
        let mut drv = ready(&mut t, &mem, VIRTIO_F_VERSION_1);
        // Sector 5 bad for writes only, sector 6 for reads only.
        c.faults
            .add_bad_range(5 * 512, 512, FaultOps::Writes)
            .unwrap();
        c.faults.add_bad_range(6 * 512, 1, FaultOps::Reads).unwrap();
        write_then_read(&mut t, &mem, &mut drv, 5, 0xEE);
        assert_eq!(status(&mem, 0), VIRTIO_BLK_S_IOERR);
        assert_eq!(status(&mem, 1), VIRTIO_BLK_S_OK);
        assert_eq!(read_u8(&mem, DATA + 0x2000), 5, "image untouched");
        assert_eq!(sector_of_file(&img, 5), vec![5u8; 512]);
        assert_eq!(c.faults.injected(), 1);

        write_then_read(&mut t, &mem, &mut drv, 6, 0xEE);
        assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK);
        assert_eq!(status(&mem, 1), VIRTIO_BLK_S_IOERR);
        assert_eq!(drv.used(3), (9, 1), "a failed read reports no data");
        assert_eq!(read_u8(&mem, DATA + 0x2000), 0x11, "guest buffer untouched");
        assert_eq!(sector_of_file(&img, 6), vec![0xEE; 512]);
        assert_eq!(c.faults.injected(), 2);

        c.faults.clear();
        write_then_read(&mut t, &mem, &mut drv, 5, 0xEF);
        assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK);
        assert_eq!(status(&mem, 1), VIRTIO_BLK_S_OK);
        assert_eq!(read_u8(&mem, DATA + 0x2000), 0xEF);
    }
}

#[test]
fn failed_disk_fails_everything_including_flush() {
    let img = TempImage::new("faileddisk", 8);
    let mem = memory();
    let (mut t, c) = faulty(&mem, &img, IoEngine::IoUring);
    let mut drv = ready(&mut t, &mem, VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH);
    c.faults.fail_disk();
    mem.write_slice(&[0xAA; 512], GuestAddress(DATA)).unwrap();
    let h = header(&mem, 0, VIRTIO_BLK_T_OUT, 1);
    drv.chain(0, &[(h, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
    let h = header(&mem, 1, VIRTIO_BLK_T_IN, 2);
    drv.chain(
        3,
        &[
            (h, 16, false),
            (DATA + 0x1000, 512, true),
            (STATUS + 1, 1, true),
        ],
    );
    let h = header(&mem, 2, VIRTIO_BLK_T_FLUSH, 0);
    drv.chain(6, &[(h, 16, false), (STATUS + 2, 1, true)]);
    // GET_ID does no disk I/O: it still works.
    let h = header(&mem, 3, VIRTIO_BLK_T_GET_ID, 0);
    drv.chain(
        8,
        &[
            (h, 16, false),
            (DATA + 0x3000, 20, true),
            (STATUS + 3, 1, true),
        ],
    );
    w(&mut t, REG_QUEUE_NOTIFY, 0);
    assert_eq!(drv.used_idx(), 4);
    for i in 0..3 {
        assert_eq!(status(&mem, i), VIRTIO_BLK_S_IOERR, "request {i}");
    }
    assert_eq!(status(&mem, 3), VIRTIO_BLK_S_OK);
    assert_eq!(c.faults.injected(), 3);
    assert_eq!(sector_of_file(&img, 1), vec![1u8; 512]);
}

#[test]
fn delay_slows_each_batch() {
    let img = TempImage::new("delay", 8);
    let mem = memory();
    let (mut t, c) = faulty(&mem, &img, IoEngine::Sync);
    let mut drv = ready(&mut t, &mem, VIRTIO_F_VERSION_1);
    c.faults
        .set_delay(std::time::Duration::from_millis(60))
        .unwrap();
    let start = std::time::Instant::now();
    write_then_read(&mut t, &mem, &mut drv, 3, 0x42);
    assert!(start.elapsed() >= std::time::Duration::from_millis(60));
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK);
    assert_eq!(status(&mem, 1), VIRTIO_BLK_S_OK);
    assert_eq!(read_u8(&mem, DATA + 0x2000), 0x42);
    assert_eq!(c.faults.injected(), 0);
    c.faults.set_delay(std::time::Duration::ZERO).unwrap();
    let start = std::time::Instant::now();
    write_then_read(&mut t, &mem, &mut drv, 3, 0x43);
    assert!(start.elapsed() < std::time::Duration::from_millis(60));
}

#[test]
fn hook_serves_failed_reads_writes_and_flushes() {
    for engine in [IoEngine::IoUring, IoEngine::Sync] {
        let img = TempImage::new("hookserve", 16);
        let mem = memory();
        let (mut t, c) = faulty(&mem, &img, engine);
        t.set_disk_journal(true);
        let mut drv = ready(&mut t, &mem, VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH);
        // The other copy differs from the local image: sector s holds 0x80 + s.
        let copy: Vec<u8> = (0..16u8).flat_map(|s| [0x80 + s; 512]).collect();
        let hooks = Arc::new(CopyHooks::with_copy(copy));
        c.set_hooks(3, Some(hooks.clone()));
        c.faults.fail_disk();

        // A failed read is filled from the copy, through vm-memory (dirty bitmap).
        let h = header(&mem, 0, VIRTIO_BLK_T_IN, 4);
        drv.chain(
            0,
            &[
                (h, 16, false),
                (DATA + 0x2000, 300, true),
                (DATA + 0x4000, 212, true),
                (STATUS, 1, true),
            ],
        );
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK);
        assert_eq!(drv.used(0), (0, 513));
        assert_eq!(read_u8(&mem, DATA + 0x2000), 0x84);
        assert_eq!(read_u8(&mem, DATA + 0x4000 + 211), 0x84);
        let region = mem.find_region(GuestAddress(DATA + 0x4000)).unwrap();
        use vm_memory::bitmap::Bitmap;
        use vm_memory::GuestMemoryRegion;
        assert!(region.bitmap().dirty_at((DATA + 0x4000) as usize));

        // A failed write is absorbed by the copy and journalled; a failed flush too.
        let _ = t.take_disk_journal();
        mem.write_slice(&[0x5A; 1024], GuestAddress(DATA)).unwrap();
        let h = header(&mem, 1, VIRTIO_BLK_T_OUT, 7);
        drv.chain(
            4,
            &[(h, 16, false), (DATA, 1024, false), (STATUS + 1, 1, true)],
        );
        let h = header(&mem, 2, VIRTIO_BLK_T_FLUSH, 0);
        drv.chain(7, &[(h, 16, false), (STATUS + 2, 1, true)]);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(status(&mem, 1), VIRTIO_BLK_S_OK);
        assert_eq!(status(&mem, 2), VIRTIO_BLK_S_OK);
        assert_eq!(hooks.flushes.load(std::sync::atomic::Ordering::Relaxed), 1);
        let copy = hooks.copy.lock().unwrap().clone();
        assert!(copy[7 * 512..9 * 512].iter().all(|&b| b == 0x5A));
        assert_eq!(
            sector_of_file(&img, 7),
            vec![7u8; 512],
            "local image untouched"
        );
        let j = t.take_disk_journal().unwrap();
        assert_eq!(
            j.writes().collect::<Vec<_>>(),
            vec![(7 * 512, &[0x5A; 1024][..])]
        );
        // The failed disk was asked nothing: before_writes sees only submitted writes.
        assert!(hooks.before.lock().unwrap().is_empty());
        assert_eq!(c.faults.injected(), 3);
    }
}

#[test]
fn before_writes_sees_batch_and_its_error_fails_the_writes() {
    let img = TempImage::new("beforewrites", 16);
    let mem = memory();
    let (mut t, c) = faulty(&mem, &img, IoEngine::IoUring);
    t.set_disk_journal(true);
    let mut drv = ready(&mut t, &mem, VIRTIO_F_VERSION_1);
    let ok = Arc::new(CopyHooks::default());
    c.set_hooks(1, Some(ok.clone()));
    write_then_read(&mut t, &mem, &mut drv, 2, 0x77);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK);
    assert_eq!(*ok.before.lock().unwrap(), vec![(1, vec![(1024, 512)])]);
    assert_eq!(sector_of_file(&img, 2), vec![0x77; 512]);

    let refuse = Arc::new(CopyHooks {
        fail_before_writes: true,
        ..CopyHooks::default()
    });
    c.set_hooks(1, Some(refuse.clone()));
    let _ = t.take_disk_journal();
    write_then_read(&mut t, &mem, &mut drv, 3, 0x78);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_IOERR);
    // The read of the same batch still ran (against the untouched image).
    assert_eq!(status(&mem, 1), VIRTIO_BLK_S_OK);
    assert_eq!(read_u8(&mem, DATA + 0x2000), 3);
    assert_eq!(sector_of_file(&img, 3), vec![3u8; 512]);
    assert!(t.take_disk_journal().unwrap().is_empty());
    assert_eq!(c.faults.injected(), 0);

    // Removing the hooks restores the plain behaviour.
    c.set_hooks(1, None);
    write_then_read(&mut t, &mem, &mut drv, 3, 0x79);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK);
    assert_eq!(sector_of_file(&img, 3), vec![0x79; 512]);
}

#[test]
fn no_hook_and_fault_is_ioerr_and_not_journalled() {
    let img = TempImage::new("nohook", 8);
    let mem = memory();
    let (mut t, c) = faulty(&mem, &img, IoEngine::Sync);
    t.set_disk_journal(true);
    let mut drv = ready(&mut t, &mem, VIRTIO_F_VERSION_1);
    c.faults.add_bad_range(0, 8 * 512, FaultOps::All).unwrap();
    write_then_read(&mut t, &mem, &mut drv, 1, 0x33);
    assert_eq!(status(&mem, 0), VIRTIO_BLK_S_IOERR);
    assert_eq!(status(&mem, 1), VIRTIO_BLK_S_IOERR);
    assert!(t.take_disk_journal().unwrap().is_empty());
    assert_eq!(sector_of_file(&img, 1), vec![1u8; 512]);
    assert_eq!(c.faults.injected(), 2);
}

#[test]
fn overlay_writes_lays_only_the_overlapping_parts_in_order() {
    let mut buf = vec![0u8; 16];
    let a = [1u8; 8];
    let b = [2u8; 4];
    let c = [3u8; 64];
    // Before, partly inside, later write over an earlier one, entirely outside.
    super::overlay_writes(
        &mut buf,
        100,
        [(96u64, &a[..]), (106, &b[..]), (1000, &c[..])].into_iter(),
    );
    assert_eq!(&buf[..4], &[1, 1, 1, 1]);
    assert_eq!(&buf[4..6], &[0, 0]);
    assert_eq!(&buf[6..10], &[2, 2, 2, 2]);
    assert!(buf[10..].iter().all(|&x| x == 0));
    let before = buf.clone();
    super::overlay_writes(&mut buf, 100, [(0u64, &c[..])].into_iter());
    assert_eq!(buf, before, "ends before the buffer");
    super::overlay_writes(&mut buf, 100, [(90u64, &c[..])].into_iter());
    assert!(buf.iter().all(|&x| x == 3), "covers the whole buffer");
}

/// One completion a hook saw: a write's (offset, data) or a flush (None, empty).
type Seen = (Option<u64>, Vec<u8>);

/// Hooks that want each batch's completions: they record them and fail when told.
#[derive(Default)]
struct SyncRecorder {
    seen: std::sync::Mutex<Vec<(usize, Vec<Seen>)>>,
    fail: std::sync::atomic::AtomicBool,
}

impl DiskHooks for SyncRecorder {
    fn before_writes(&self, _disk: usize, _ranges: &[(u64, u64)]) -> std::io::Result<()> {
        Ok(())
    }
    fn read_failed(
        &self,
        _: usize,
        _: u64,
        _: &mut [u8],
        e: &std::io::Error,
    ) -> std::io::Result<()> {
        Err(std::io::Error::new(e.kind(), e.to_string()))
    }
    fn write_failed(&self, _: usize, _: u64, _: &[u8], e: &std::io::Error) -> std::io::Result<()> {
        Err(std::io::Error::new(e.kind(), e.to_string()))
    }
    fn flush_failed(&self, _: usize, e: &std::io::Error) -> std::io::Result<()> {
        Err(std::io::Error::new(e.kind(), e.to_string()))
    }
    fn wants_completed(&self) -> bool {
        true
    }
    fn completed(&self, disk: usize, ops: &[DoneOp<'_>]) -> std::io::Result<()> {
        let ops = ops
            .iter()
            .map(|o| match o {
                DoneOp::Write { offset, data } => (Some(*offset), data.to_vec()),
                DoneOp::Flush => (None, Vec::new()),
            })
            .collect();
        self.seen.lock().unwrap().push((disk, ops));
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("peer did not acknowledge"));
        }
        Ok(())
    }
}

#[test]
fn completed_hook_sees_writes_and_flushes_before_the_guest_and_its_error_fails_them() {
    for engine in [IoEngine::IoUring, IoEngine::Sync] {
        let img = TempImage::new("completed", 16);
        let mem = memory();
        let (mut t, c) = faulty(&mem, &img, engine);
        let mut drv = ready(&mut t, &mem, VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH);
        let hooks = Arc::new(SyncRecorder::default());
        c.set_hooks(2, Some(hooks.clone()));

        // A write and a flush in one batch: both shown, with the data, in order.
        mem.write_slice(&[0x6B; 512], GuestAddress(DATA)).unwrap();
        let h = header(&mem, 0, VIRTIO_BLK_T_OUT, 5);
        drv.chain(0, &[(h, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        let h = header(&mem, 1, VIRTIO_BLK_T_FLUSH, 0);
        drv.chain(3, &[(h, 16, false), (STATUS + 1, 1, true)]);
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK);
        assert_eq!(status(&mem, 1), VIRTIO_BLK_S_OK);
        let seen = std::mem::take(&mut *hooks.seen.lock().unwrap());
        assert_eq!(seen.len(), 1, "{engine:?}");
        assert_eq!(seen[0].0, 2);
        let mut ops = seen[0].1.clone();
        ops.sort_by_key(|o| o.0.is_none());
        assert_eq!(ops, vec![(Some(5 * 512), vec![0x6B; 512]), (None, vec![])]);
        assert_eq!(sector_of_file(&img, 5), vec![0x6B; 512]);

        // The hook fails: the guest sees IOERR for the write.
        hooks.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let h = header(&mem, 2, VIRTIO_BLK_T_OUT, 6);
        drv.chain(
            5,
            &[(h, 16, false), (DATA, 512, false), (STATUS + 2, 1, true)],
        );
        w(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(status(&mem, 2), VIRTIO_BLK_S_IOERR);
    }
}
