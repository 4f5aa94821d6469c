//! Figure 3: virtio-blk sequential throughput in the guest against the same I/O done
//! by the host on the same filesystem, in the same run.
//!
//! Guest: `twinrun vm run --workload blkbench` on a fresh sparse image: it writes
//! `bytes` from sector 0 in `req`-byte requests with up to `depth` in flight, flushes
//! once, then reads the range back the same way (`B write ...` / `B read ...` lines,
//! timed by the guest's TSC from first submit to last completion).
//!
//! Host baseline: a fresh sparse file of the same size in the same directory, the same
//! bytes in the same request size, then one `fdatasync`; for the io_uring engine with
//! io_uring and the same number of requests in flight, for the sync engine with
//! sequential `pwrite`/`pread`. Read passes follow the writes in both, so both read
//! from the page cache the writes just filled.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

use crate::report::{median_p90, Better, Figure};
use twinrun_lab::console::{field, ConsoleLog};
use twinrun_lab::Proc;

#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub bytes: u64,
    pub req: u64,
    pub depth: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    IoUring,
    Sync,
}

impl Engine {
    fn flag(self) -> &'static str {
        match self {
            Engine::IoUring => "io-uring",
            Engine::Sync => "sync",
        }
    }
}

/// (write ns, read ns) of one pass pair.
type Times = (f64, f64);

fn fresh(path: &Path, bytes: u64) -> Result<File, String> {
    let _ = std::fs::remove_file(path);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("create {}: {e}", path.display()))?;
    f.set_len(bytes)
        .map_err(|e| format!("size {}: {e}", path.display()))?;
    Ok(f)
}

fn buffers(s: Shape, slots: usize) -> Vec<Vec<u8>> {
    (0..slots)
        .map(|k| {
            (0..s.req as usize)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(7 + k as u8))
                .collect()
        })
        .collect()
}

fn stamp_ok(buf: &[u8], idx: u64) -> bool {
    buf[..8] == idx.to_le_bytes()
}

fn host_sync(f: &File, s: Shape) -> Result<Times, String> {
    let mut buf = buffers(s, 1).remove(0);
    let reqs = s.bytes.div_ceil(s.req);
    let t0 = Instant::now();
    for i in 0..reqs {
        let off = i * s.req;
        let len = (s.bytes - off).min(s.req) as usize;
        buf[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all_at(&buf[..len], off)
            .map_err(|e| format!("pwrite: {e}"))?;
    }
    f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
    let w = t0.elapsed();
    let t1 = Instant::now();
    for i in 0..reqs {
        let off = i * s.req;
        let len = (s.bytes - off).min(s.req) as usize;
        f.read_exact_at(&mut buf[..len], off)
            .map_err(|e| format!("pread: {e}"))?;
        if !stamp_ok(&buf, i) {
            return Err(format!("host read of request {i} returned other data"));
        }
    }
    Ok((w.as_nanos() as f64, t1.elapsed().as_nanos() as f64))
}

/// One pass with io_uring, `depth` requests in flight, each completion refilled.
fn uring_pass(
    ring: &mut IoUring,
    f: &File,
    s: Shape,
    bufs: &mut [Vec<u8>],
    write: bool,
) -> Result<(), String> {
    let fd = types::Fd(f.as_raw_fd());
    let reqs = s.bytes.div_ceil(s.req);
    let mut next = 0u64;
    let mut done = 0u64;
    // Request index held by each slot.
    let mut held = vec![0u64; bufs.len()];
    let mut free: Vec<usize> = (0..bufs.len()).rev().collect();
    while done < reqs {
        while next < reqs {
            let Some(slot) = free.pop() else { break };
            let off = next * s.req;
            let len = (s.bytes - off).min(s.req) as u32;
            let buf = &mut bufs[slot];
            let sqe = if write {
                buf[..8].copy_from_slice(&next.to_le_bytes());
                opcode::Write::new(fd, buf.as_ptr(), len)
                    .offset(off)
                    .build()
            } else {
                opcode::Read::new(fd, buf.as_mut_ptr(), len)
                    .offset(off)
                    .build()
            }
            .user_data(slot as u64);
            held[slot] = next;
            // SAFETY: the buffer (owned by `bufs`, not touched until its completion is
            // reaped below) and the fd outlive the operation: this function does not
            // return before every submitted request completed.
            unsafe { ring.submission().push(&sqe) }.map_err(|_| "io_uring queue full")?;
            next += 1;
        }
        ring.submit_and_wait(1)
            .map_err(|e| format!("io_uring submit: {e}"))?;
        let cqes: Vec<_> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (slot, res) in cqes {
            let slot = slot as usize;
            let i = held[slot];
            let want = (s.bytes - i * s.req).min(s.req) as i32;
            if res != want {
                return Err(format!(
                    "io_uring request {i}: result {res}, expected {want}"
                ));
            }
            if !write && !stamp_ok(&bufs[slot], i) {
                return Err(format!("host read of request {i} returned other data"));
            }
            free.push(slot);
            done += 1;
        }
    }
    Ok(())
}

fn host_uring(f: &File, s: Shape) -> Result<Times, String> {
    let mut ring = IoUring::new(s.depth.next_power_of_two().max(4))
        .map_err(|e| format!("io_uring setup: {e}"))?;
    let mut bufs = buffers(s, s.depth as usize);
    let t0 = Instant::now();
    uring_pass(&mut ring, f, s, &mut bufs, true)?;
    f.sync_data().map_err(|e| format!("fdatasync: {e}"))?;
    let w = t0.elapsed();
    let t1 = Instant::now();
    uring_pass(&mut ring, f, s, &mut bufs, false)?;
    Ok((w.as_nanos() as f64, t1.elapsed().as_nanos() as f64))
}

fn host(dir: &Path, s: Shape, e: Engine) -> Result<Times, String> {
    let path = dir.join("host.img");
    let f = fresh(&path, s.bytes)?;
    let r = match e {
        Engine::IoUring => host_uring(&f, s),
        Engine::Sync => host_sync(&f, s),
    };
    drop(f);
    let _ = std::fs::remove_file(&path);
    r
}

fn guest(twinrun: &Path, elf: &Path, dir: &Path, s: Shape, e: Engine) -> Result<Times, String> {
    let img = dir.join("guest.img");
    drop(fresh(&img, s.bytes)?);
    let console = dir.join("blk.console");
    let _ = std::fs::remove_file(&console);
    let mut cmd = Command::new(twinrun);
    cmd.args(["vm", "run", "--mem-mib", "128", "--workload", "blkbench"])
        .arg("--guest")
        .arg(elf)
        .arg("--disk")
        .arg(format!("{},engine={}", img.display(), e.flag()))
        .args(["--blkbench-mib", &(s.bytes >> 20).to_string()])
        .args(["--blkbench-req-kib", &(s.req >> 10).to_string()])
        .args(["--blkbench-depth", &s.depth.to_string()])
        .arg("--console")
        .arg(format!("file:{}", console.display()));
    let mut child = Proc::spawn_quiet("twinrun", &mut cmd).map_err(|e| e.to_string())?;
    let status = child.wait_timeout(Duration::from_secs(120));
    let mut con = ConsoleLog::new(&console);
    con.poll();
    let _ = std::fs::remove_file(&img);
    let _ = std::fs::remove_file(&console);
    match status {
        Some(st) if st.success() => {}
        Some(st) => return Err(format!("twinrun exited {st}; console:\n{}", con.tail(10))),
        None => {
            return Err(format!(
                "blkbench VM did not finish in 120 s:\n{}",
                con.tail(10)
            ))
        }
    }
    let find = |p: &str| con.seen.iter().find(|l| l.starts_with(p)).cloned();
    let (Some(w), Some(r)) = (find("B write "), find("B read ")) else {
        return Err(format!("no B lines; console:\n{}", con.tail(10)));
    };
    if field(&w, "bytes") != Some(s.bytes) || field(&r, "bytes") != Some(s.bytes) {
        return Err(format!(
            "guest moved other than {} bytes: {w} / {r}",
            s.bytes
        ));
    }
    if field(&r, "bad") != Some(0) {
        return Err(format!("guest read back wrong data: {r}"));
    }
    let ns = |l: &str| {
        field(l, "ns")
            .map(|v| v as f64)
            .ok_or(format!("bad line {l}"))
    };
    Ok((ns(&w)?, ns(&r)?))
}

fn mb_s(bytes: u64, ns: f64) -> f64 {
    bytes as f64 / ns * 1e3
}

pub fn run(
    twinrun: &Path,
    elf: &Path,
    dir: &Path,
    s: Shape,
    reps: usize,
) -> Result<Vec<Figure>, String> {
    let mut figs = Vec::new();
    for e in [Engine::IoUring, Engine::Sync] {
        let (mut gw, mut gr, mut hw, mut hr) = (vec![], vec![], vec![], vec![]);
        for _ in 0..reps {
            // Host first, then guest, in each repetition: both see the same machine
            // state within a few seconds of each other.
            let (w, r) = host(dir, s, e)?;
            hw.push(mb_s(s.bytes, w));
            hr.push(mb_s(s.bytes, r));
            let (w, r) = guest(twinrun, elf, dir, s, e)?;
            gw.push(mb_s(s.bytes, w));
            gr.push(mb_s(s.bytes, r));
        }
        let med = |v: &[f64]| median_p90(v).0;
        let host_label = match e {
            Engine::IoUring => format!("host io_uring, depth {}", s.depth),
            Engine::Sync => "host pwrite, sequential".into(),
        };
        let note = format!(
            "{} MiB, {} KiB requests, depth {}, median of {reps}",
            s.bytes >> 20,
            s.req >> 10,
            s.depth
        );
        figs.push(
            Figure::new(
                "virtio-blk",
                &format!("guest write+flush {} KiB req, {}", s.req >> 10, e.flag()),
                med(&gw),
                "MB/s",
                Better::Higher,
            )
            .target(0.7, true, ">= 70% of host")
            .baseline(&host_label, med(&hw))
            .note(note.clone()),
        );
        let host_label = host_label.replace("pwrite", "pread");
        figs.push(
            Figure::new(
                "virtio-blk",
                &format!(
                    "guest read {} KiB req (page cache), {}",
                    s.req >> 10,
                    e.flag()
                ),
                med(&gr),
                "MB/s",
                Better::Higher,
            )
            .baseline(&host_label, med(&hr))
            .note(note),
        );
    }
    Ok(figs)
}
