//! The twinrun test guest: a freestanding program the VMM enters at CPL3 in long mode
//! (see the `twinrun-guest-abi` crate for the contract). It finds its virtio devices
//! from the parameter block, drives them by polling, and runs the configured
//! workloads together in one cooperative loop paced by the TSC.
#![no_std]
#![no_main]

extern crate alloc;

mod hw;
mod work;

use abi::Params;
use alloc::boxed::Box;
use core::fmt::Write;
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use hw::arch::{exit, rdtsc};
use hw::console::Console;
use twinrun_guest::linebuf::LineBuf;
use twinrun_guest::pace::millis_to_tsc;
use twinrun_guest_abi as abi;
use work::{counter::Counter, dirty::Dirty, disk::Disk, kv::Kv};

// Entry: zero .bss (the loader may not have), align the stack and call `guest_main`
// with the parameter pointer the VMM put in rdi. Nothing else is set up: segments,
// paging and the stack come from the VMM.
core::arch::global_asm!(
    ".section .text._start,\"ax\",@progbits",
    ".global _start",
    "_start:",
    "    mov r12, rdi",
    "    lea rdi, [rip + __bss_start]",
    "    lea rcx, [rip + __bss_end]",
    "    sub rcx, rdi",
    "    xor eax, eax",
    "    cld",
    "    rep stosb",
    "    mov rdi, r12",
    "    and rsp, -16",
    "    call {main}",
    "    ud2",
    main = sym guest_main,
);

extern "C" {
    static __image_end: u8;
}

/// Smallest heap the guest runs with: device rings and buffers plus the kv pool.
const MIN_HEAP: u64 = 16 << 20;

/// The console, once up, for the panic handler.
static CONSOLE: AtomicPtr<Console> = AtomicPtr::new(core::ptr::null_mut());
static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    if PANICKING.swap(true, Ordering::Relaxed) {
        exit(abi::EXIT_PANIC);
    }
    let con = CONSOLE.load(Ordering::Relaxed);
    if !con.is_null() {
        let mut l = LineBuf::new();
        let _ = write!(l, "PANIC {}", info.message());
        if let Some(loc) = info.location() {
            let _ = write!(l, " at {}:{}", loc.file(), loc.line());
        }
        // SAFETY: the console was leaked at start-up and lives forever. The main loop's
        // borrow of it is never used again: this handler does not return.
        let con = unsafe { &mut *con };
        // Bound the wait: a stuck device must not turn a panic into a hang.
        let deadline = rdtsc().saturating_add(millis_to_tsc(2000, 3_000_000));
        con.emergency_line(l.finish(), deadline);
    }
    exit(abi::EXIT_PANIC)
}

fn device(p: &Params, id: u32) -> Option<u64> {
    p.devices[..p.device_count as usize]
        .iter()
        .find(|d| d.device_id == id)
        .map(|d| d.mmio_base)
}

fn workload_names(w: u32) -> LineBuf {
    let mut l = LineBuf::new();
    let mut first = true;
    for (bit, name) in [
        (abi::WORKLOAD_COUNTER, "counter"),
        (abi::WORKLOAD_DIRTY, "dirty"),
        (abi::WORKLOAD_DISK, "disk"),
        (abi::WORKLOAD_KV, "kv"),
        (abi::WORKLOAD_BLKBENCH, "blkbench"),
    ] {
        if w & bit != 0 {
            let _ = write!(l, "{}{}", if first { "" } else { "," }, name);
            first = false;
        }
    }
    l
}

extern "C" fn guest_main(params: *const Params) -> ! {
    // SAFETY: the VMM writes the block at PARAMS_ADDR and passes its address; it is
    // plain integers, so any bytes are a valid value, and the header is checked next.
    let p: Params = unsafe { params.read_volatile() };
    if !p.is_valid() || p.tsc_khz == 0 {
        exit(abi::EXIT_BAD_PARAMS);
    }
    // Only the address of the linker symbol is taken (no read), which is safe.
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    if p.free_base < image_end || p.free_base >= p.ram_low_end {
        exit(abi::EXIT_BAD_PARAMS);
    }

    // Memory: heap from free_base, then the dirty working set at the end of low RAM.
    let avail = p.ram_low_end - p.free_base;
    let ws_bytes = if p.workloads & abi::WORKLOAD_DIRTY != 0 {
        p.dirty_pages as u64 * abi::PAGE_SIZE
    } else {
        0
    };
    let fits = avail >= ws_bytes.saturating_add(MIN_HEAP);
    let heap_size = if fits { avail - ws_bytes } else { avail };
    // SAFETY: [free_base, free_base + heap_size) is RAM past the image that the abi
    // gives the guest; the working set lies beyond it.
    unsafe { hw::heap::init(p.free_base as usize, heap_size as usize) };

    let Some(con_base) = device(&p, abi::VIRTIO_ID_CONSOLE) else {
        exit(abi::EXIT_PANIC);
    };
    // SAFETY: the window comes from the VMM's device list and is mapped.
    let console = match unsafe { Console::new(con_base) } {
        Ok(c) => c,
        Err(_) => exit(abi::EXIT_PANIC),
    };
    let con: &'static mut Console = Box::leak(Box::new(console));
    CONSOLE.store(con as *mut Console, Ordering::Relaxed);

    con.line(format_args!(
        "BOOT workloads={} tsc_khz={}",
        core::str::from_utf8(workload_names(p.workloads).as_bytes()).unwrap_or("?"),
        p.tsc_khz
    ));
    con.flush();
    if !fits {
        panic!(
            "not enough RAM: {} bytes free from {:#x}, need {} heap + {} dirty working set",
            avail, p.free_base, MIN_HEAP, ws_bytes
        );
    }
    run(&p, con, p.free_base + heap_size, heap_size)
}

fn run(p: &Params, con: &mut Console, ws_base: u64, heap_size: u64) -> ! {
    let now = rdtsc();
    let khz = p.tsc_khz;
    let mut counter = (p.workloads & abi::WORKLOAD_COUNTER != 0)
        .then(|| Counter::new(now, p.counter_rate, p.counter_limit, khz));
    let mut dirty = (p.workloads & abi::WORKLOAD_DIRTY != 0).then(|| {
        if p.dirty_pages == 0 {
            panic!("dirty workload needs dirty_pages > 0");
        }
        // SAFETY: [ws_base, ws_base + dirty_pages * 4096) is the end of low RAM, past
        // the heap (checked above), used by nothing else.
        unsafe {
            // dirty_fill: the first pass over the working set unpaced.
            let fill = if p.dirty_fill != 0 {
                p.dirty_pages as u64
            } else {
                0
            };
            let pacer = twinrun_guest::pace::FillPacer::new(now, p.dirty_rate, khz, fill);
            Dirty::new(
                ws_base,
                p.dirty_pages as u64,
                p.dirty_seed,
                p.dirty_passes,
                pacer,
            )
        }
    });
    let mut disk = (p.workloads & abi::WORKLOAD_DISK != 0).then(|| {
        let Some(base) = device(p, abi::VIRTIO_ID_BLOCK) else {
            panic!("disk workload needs a virtio-blk device");
        };
        // SAFETY: the window comes from the VMM's device list and is mapped.
        let blk = match unsafe { hw::blk::Blk::new(base) } {
            Ok(b) => b,
            Err(e) => panic!("virtio-blk: {e}"),
        };
        let mut d = Disk::new(blk, p.disk_rate, p.disk_flush_every, p.disk_limit, now, khz);
        d.start(con);
        d
    });
    let mut blkbench = (p.workloads & abi::WORKLOAD_BLKBENCH != 0).then(|| {
        let Some(base) = device(p, abi::VIRTIO_ID_BLOCK) else {
            panic!("blkbench workload needs a virtio-blk device");
        };
        // SAFETY: the window comes from the VMM's device list and is mapped.
        let blk = match unsafe { hw::blk::Blk::new(base) } {
            Ok(b) => b,
            Err(e) => panic!("virtio-blk: {e}"),
        };
        work::blkbench::BlkBench::new(
            blk,
            p.blkbench_bytes,
            p.blkbench_req_bytes,
            p.blkbench_depth,
            khz,
        )
    });
    let mut kv = (p.workloads & abi::WORKLOAD_KV != 0).then(|| {
        let Some(base) = device(p, abi::VIRTIO_ID_NET) else {
            panic!("kv workload needs a virtio-net device");
        };
        let ip = p.kv_ipv4;
        // A locally administered MAC derived from the address, if the device has none.
        let fallback = [0x02, 0x54, ip[0], ip[1], ip[2], ip[3]];
        // SAFETY: the window comes from the VMM's device list and is mapped.
        let mut net = match unsafe { hw::net::Net::new(base, fallback) } {
            Ok(n) => n,
            Err(e) => panic!("virtio-net: {e}"),
        };
        let cfg = work::kv::KvConfig {
            ip,
            prefix: p.kv_prefix,
            gateway: p.kv_gateway,
            port: p.kv_port,
            store_bytes: (heap_size / 4) as usize,
        };
        let kv = Kv::new(&mut net, &cfg, rdtsc(), khz, con);
        (net, kv)
    });
    con.flush();

    loop {
        let now = rdtsc();
        if let Some(c) = counter.as_mut() {
            c.poll(now, con);
        }
        if let Some(d) = dirty.as_mut() {
            d.poll(now, con);
        }
        if let Some(d) = disk.as_mut() {
            d.poll(now, con);
        }
        if let Some((net, kv)) = kv.as_mut() {
            kv.poll(now, net);
        }
        if let Some(b) = blkbench.as_mut() {
            b.poll(con);
        }
        con.flush();
        let finished = kv.is_none()
            && counter.as_ref().is_none_or(|c| c.done())
            && dirty.as_ref().is_none_or(|d| d.done())
            && disk.as_ref().is_none_or(|d| d.done())
            && blkbench.as_ref().is_none_or(|b| b.done());
        if finished {
            con.line(format_args!("DONE"));
            con.drain(None);
            exit(abi::EXIT_OK);
        }
        core::hint::spin_loop();
    }
}
