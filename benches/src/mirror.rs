//! Disk mirroring (issue 5) on a real pair: two `twinrun vm run --role` processes in the
//! PM namespaces of the pair topology (`twinrun_lab::Topology`), A-Links over veths,
//! real image files in the scratch directory. Protection, degradation and the
//! standby's readiness come from the processes' control sockets; the resync figures
//! (bytes, passes, time) and plans from the primary's log, which is where the disk
//! session reports them while the session runs.
//!
//! 1. Full resync against a raw copy. The primary's image (`disk` bytes of non-zero
//!    data) is copied to a fresh standby image (no metadata: a full copy) while the
//!    guest is quiet (counter only), three times, each right after the raw copy below
//!    (one resync of 256 MiB is one sample of a loaded machine: the medians are
//!    compared, the rounds are in the note); the time is the primary's own
//!    `disk resync done: ... in <t>` (from the standby's disk report to the last block
//!    durable on the standby). Baselines in the same run: the same image read and
//!    written to a new file then fsync'd, and the same through one TCP connection over
//!    A-Link 1 (sender in pm1, receiver writing and fsyncing in pm2).
//! 2. Delta resync. The same images, a new pair whose guest appends 512-byte records
//!    (8 per 4 KiB block); once protected the standby is SIGKILLed, the primary runs
//!    degraded until the guest wrote about 1 % of the disk's blocks, then a standby
//!    comes back and gets a delta; its time is compared with the full resync's.
//! 3. Mirrored write throughput and latency. The guest's `disk` workload unpaced: 32 KiB
//!    requests (64 records), each followed by a flush, one at a time; records made
//!    durable over a window once the pair is protected (same images, by now in sync),
//!    against the same guest unprotected on the raw copy's output (a non-sparse image
//!    of the same size). Not `blkbench`: it writes at boot, before the pair is
//!    protected, and epoch 0 then carries tens of MiB of disk writes, which the
//!    primary refuses today ("disk journal of the epoch ... exceeds one part").
//!
//! The namespaces, processes and files go away on drop (also on error).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use twinrun_control::{FtState, FtStatus};
use twinrun_lab::tcp::{tcp_join, tcp_receiver, tcp_sender};
use twinrun_lab::{Proc, Rng, Topology};

use crate::report::{Better, Figure};

const GROUP: &str = "mirror";
const RESYNC_DONE: &str = "primary: disk resync done: ";
const BLOCK: u64 = 4096;
const CHUNK: usize = 1 << 20;
/// Records the guest's `disk` workload appends per second (8 per 4 KiB block).
const DISK_RATE: u64 = 4000;
/// Records per request (and per flush) of the unpaced writer of figure 3: the guest's
/// largest request (32 KiB).
pub(crate) const SYNC_RECORDS: u64 = 64;
/// Wait after the first durable record (and after protection) before the window.
const WARMUP_MS: u64 = 300;
pub(crate) const PAIR_TIMEOUT: Duration = Duration::from_secs(60);

/// One `disk resync done` line.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Resync {
    bytes: u64,
    passes: u64,
    secs: f64,
}

/// A `Duration`'s `Debug` text (`1.5s`, `812.3ms`, `950µs`, `12ns`) in seconds.
fn parse_debug_duration(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    let scale = match unit {
        "s" => 1.0,
        "ms" => 1e-3,
        "µs" | "us" => 1e-6,
        "ns" => 1e-9,
        _ => return None,
    };
    Some(v * scale)
}

/// Every `disk resync done: N chunks, B bytes, P passes in D` line of a primary log.
fn resyncs(log: &str) -> Vec<Resync> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find(RESYNC_DONE)? + RESYNC_DONE.len()..];
            let (counts, took) = rest.split_once(" in ")?;
            let nums: Vec<u64> = counts
                .split(|c: char| !c.is_ascii_digit())
                .filter(|s| !s.is_empty())
                .filter_map(|s| s.parse().ok())
                .collect();
            let [_, bytes, passes] = nums[..] else {
                return None;
            };
            Some(Resync {
                bytes,
                passes,
                secs: parse_debug_duration(took)?,
            })
        })
        .collect()
}

/// The plan kinds (`Full`, `Delta`, `InSync`...) the primary logged, in order.
fn plans(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("primary: disk ")? + "primary: disk ".len()..];
            // Not the "resync done" lines (nor pair/primary.rs's "FT primary: disk
            // resync of the session" ones).
            if rest.starts_with("resync") {
                return None;
            }
            let kind = rest.split(": ").nth(1)?;
            Some(kind.to_string())
        })
        .collect()
}

pub(crate) fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

pub(crate) fn tail(p: &Path, n: usize) -> String {
    let s = read(p);
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

/// Files removed on drop.
pub(crate) struct Files(pub(crate) Vec<PathBuf>);

impl Drop for Files {
    fn drop(&mut self) {
        for p in &self.0 {
            if p.is_dir() {
                let _ = std::fs::remove_dir_all(p);
            } else {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Writes `bytes` of non-zero data (seeded, every 4 KiB block stamped with its
/// index so no two blocks are equal) to `path`, fsync'd.
pub(crate) fn fill_image(path: &Path, bytes: u64) -> Result<(), String> {
    let mut f = File::create(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut buf = vec![0u8; CHUNK];
    for w in buf.chunks_exact_mut(8) {
        w.copy_from_slice(&(rng.next() | 1).to_le_bytes());
    }
    let mut off = 0u64;
    while off < bytes {
        let n = ((bytes - off) as usize).min(CHUNK);
        for (i, b) in buf[..n].chunks_mut(BLOCK as usize).enumerate() {
            let idx = off / BLOCK + i as u64 + 1;
            b[..8].copy_from_slice(&idx.to_le_bytes());
        }
        f.write_all(&buf[..n])
            .map_err(|e| format!("write {}: {e}", path.display()))?;
        off += n as u64;
    }
    f.sync_all()
        .map_err(|e| format!("fsync {}: {e}", path.display()))
}

/// A fresh sparse file of `bytes` (a new disk: no metadata beside it).
fn sparse_image(path: &Path, bytes: u64) -> Result<(), String> {
    let _ = std::fs::remove_file(path);
    File::create(path)
        .and_then(|f| f.set_len(bytes))
        .map_err(|e| format!("create {}: {e}", path.display()))
}

/// Copies `from` to a new file `to` in 1 MiB reads and writes, then fsync; seconds.
fn raw_copy(from: &Path, to: &Path) -> Result<f64, String> {
    let _ = std::fs::remove_file(to);
    let t0 = Instant::now();
    let mut src = File::open(from).map_err(|e| format!("open {}: {e}", from.display()))?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(|e| format!("create {}: {e}", to.display()))?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = src.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n])
            .map_err(|e| format!("write: {e}"))?;
    }
    dst.sync_all().map_err(|e| format!("fsync: {e}"))?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Copies `from` through one TCP connection: a receiver in `rx_ns` on `ip` writing
/// `to` and fsyncing it, a sender in `tx_ns` reading `from`. Seconds from the accept
/// to the receiver's fsync; the bytes received must be the file's size.
fn tcp_copy(
    from: &Path,
    to: &Path,
    tx_ns: &str,
    rx_ns: &str,
    ip: IpAddr,
    bytes: u64,
) -> Result<f64, String> {
    let _ = std::fs::remove_file(to);
    let to = to.to_path_buf();
    let (addr, rx) = tcp_receiver(Some(rx_ns.to_string()), ip, move |mut s| {
        let t0 = Instant::now();
        let mut f = File::create(&to).map_err(|e| format!("create {}: {e}", to.display()))?;
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).map_err(|e| format!("recv: {e}"))?;
            if n == 0 {
                break;
            }
            f.write_all(&buf[..n]).map_err(|e| format!("write: {e}"))?;
            total += n as u64;
        }
        f.sync_all().map_err(|e| format!("fsync: {e}"))?;
        Ok((total, t0.elapsed().as_secs_f64()))
    })?;
    let from = from.to_path_buf();
    let tx = tcp_sender(Some(tx_ns.to_string()), addr, move |mut s| {
        let mut src = File::open(&from).map_err(|e| format!("open {}: {e}", from.display()))?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = src.read(&mut buf).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Ok(());
            }
            s.write_all(&buf[..n]).map_err(|e| format!("send: {e}"))?;
        }
    });
    let (total, secs) = tcp_join(tx, rx)?;
    if total != bytes {
        return Err(format!("TCP copy moved {total} of {bytes} bytes"));
    }
    Ok(secs)
}

/// What every VM of this section shares.
struct Ctx<'a> {
    twinrun: &'a Path,
    elf: &'a Path,
    dir: &'a Path,
    topo: &'a Topology,
    secret: PathBuf,
    images: [PathBuf; 2],
}

/// One `twinrun vm run` of this section in namespace `ns` (`RUST_LOG=info`: the resync
/// figures come from info lines, whatever the caller's RUST_LOG says), named `name`
/// (its control socket in `dir/run`).
pub(crate) struct Vm {
    pub(crate) proc: Proc,
    sock: PathBuf,
}

impl Vm {
    pub(crate) fn spawn(
        role: &'static str,
        ns: &twinrun_lab::NetNs,
        cx: (&Path, &Path),
        name: &str,
        args: &[String],
        log: &Path,
    ) -> Result<Vm, String> {
        let (twinrun, dir) = cx;
        let mut cmd = ns.command(twinrun);
        cmd.args(args)
            .args(["--name", name])
            .env("RUST_LOG", "info")
            .env("TWINRUN_RUN_DIR", dir.join("run"));
        let proc =
            Proc::spawn_logged(role, &mut cmd, log).map_err(|e| format!("spawn {role}: {e}"))?;
        Ok(Vm {
            proc,
            sock: dir.join("run").join(format!("{name}.sock")),
        })
    }

    pub(crate) fn status(&self) -> Option<FtStatus> {
        twinrun_control::ft_status(&self.sock)
    }
}

pub(crate) fn vm_args(
    elf: &Path,
    image: &Path,
    console: &Path,
    workload: &[String],
) -> Vec<String> {
    let mut v: Vec<String> = ["vm", "run", "--mem-mib", "64", "--guest"]
        .map(String::from)
        .to_vec();
    v.push(elf.display().to_string());
    v.extend(workload.iter().cloned());
    v.extend([
        "--disk".into(),
        format!("{},serial=mirror", image.display()),
        "--console".into(),
        format!("file:{}", console.display()),
    ]);
    v
}

/// The unpaced synchronous writer of figure 3 (and of the `ha` section): requests of
/// [`SYNC_RECORDS`] records (32 KiB), each followed by a flush, one at a time.
pub(crate) fn sync_writer() -> Vec<String> {
    [
        "--workload",
        "counter,disk",
        "--counter-rate",
        "10",
        "--disk-rate",
        "10000000",
        "--disk-flush-every",
        &SYNC_RECORDS.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// Runs `workload` unprotected on `image` in `ns` (console and log
/// `dir/<prefix>-local.{console,log}`, added to `files`), hands `measure` its console,
/// the time it was spawned and whether it still runs, then stops it.
pub(crate) fn unprotected<R>(
    (twinrun, elf, dir): (&Path, &Path, &Path),
    ns: &twinrun_lab::NetNs,
    prefix: &str,
    image: &Path,
    workload: &[String],
    files: &mut Files,
    measure: impl FnOnce(&Path, Instant, &mut dyn FnMut() -> bool) -> Result<R, String>,
) -> Result<R, String> {
    let ucon = dir.join(format!("{prefix}-local.console"));
    let ulog = dir.join(format!("{prefix}-local.log"));
    let _ = std::fs::remove_file(&ucon);
    files.0.push(ucon.clone());
    files.0.push(ulog.clone());
    let name = format!("{prefix}-{}-local", std::process::id());
    let args = vm_args(elf, image, &ucon, workload);
    let spawned = Instant::now();
    let mut vm = Vm::spawn("unprotected", ns, (twinrun, dir), &name, &args, &ulog)?;
    let r = measure(&ucon, spawned, &mut || vm.proc.alive());
    vm.proc.terminate(Duration::from_secs(5));
    r.map_err(|e| format!("unprotected: {e}\n{}", tail(&ulog, 10)))
}

/// A primary and a standby; the standby is stopped first (no failover) on drop.
struct Pair {
    // Field order is drop order: the standby first.
    standby: Option<Vm>,
    primary: Vm,
    plog: PathBuf,
    slog: PathBuf,
    pcon: PathBuf,
}

impl Ctx<'_> {
    fn role_args(&self, i: usize, tag: &str, workload: &[String]) -> Vec<String> {
        let role = if i == 0 { "primary" } else { "standby" };
        let con = self.dir.join(format!("mirror-{tag}-{role}.console"));
        let _ = std::fs::remove_file(&con);
        let mut a = vm_args(self.elf, &self.images[i], &con, workload);
        a.extend(["--role".into(), role.into()]);
        a.extend(self.topo.alink_args(i));
        a.extend([
            "--cluster-id".into(),
            format!("bench-mirror-{}", std::process::id()),
            "--cluster-secret-file".into(),
            self.secret.display().to_string(),
            // No failover is measured: a wide window keeps a busy 2-core machine
            // (resync, copies) from a false one.
            "--heartbeat-misses".into(),
            "20".into(),
        ]);
        a
    }

    fn spawn(&self, i: usize, tag: &str, workload: &[String], log: &Path) -> Result<Vm, String> {
        let role = if i == 0 { "primary" } else { "standby" };
        let name = format!("mirror-{}-{tag}-{role}", std::process::id());
        let args = self.role_args(i, tag, workload);
        Vm::spawn(
            role,
            &self.topo.pms[i].ns,
            (self.twinrun, self.dir),
            &name,
            &args,
            log,
        )
    }

    fn spawn_standby(&self, tag: &str, workload: &[String]) -> Result<(Vm, PathBuf), String> {
        let slog = self.dir.join(format!("mirror-{tag}-standby.log"));
        let mut s = self.spawn(1, tag, workload, &slog)?;
        let t0 = Instant::now();
        while s.status().is_none_or(|st| st.session == 0) {
            if let Some(st) = s.proc.try_wait() {
                return Err(format!("the standby exited ({st}):\n{}", tail(&slog, 20)));
            }
            if t0.elapsed() > PAIR_TIMEOUT {
                return Err(format!("the standby never listened:\n{}", tail(&slog, 20)));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok((s, slog))
    }

    /// Starts the standby, then the primary; returns once the pair is protected, with
    /// the time from the primary's "VM running" to "protected" as this process saw it.
    fn pair(&self, tag: &str, workload: &[String]) -> Result<(Pair, Duration), String> {
        let (standby, slog) = self.spawn_standby(tag, workload)?;
        let plog = self.dir.join(format!("mirror-{tag}-primary.log"));
        let pcon = self.dir.join(format!("mirror-{tag}-primary.console"));
        let primary = self.spawn(0, tag, workload, &plog)?;
        let mut pair = Pair {
            standby: Some(standby),
            primary,
            plog,
            slog,
            pcon,
        };
        let running = pair.wait_status("VM running", |s| s.vm_running)?;
        let protected = pair.wait_status("protected", |s| s.protections >= 1)?;
        Ok((pair, protected.duration_since(running)))
    }
}

impl Pair {
    /// Polls the primary's status (every 5 ms) until `done` holds; when it saw it.
    fn wait_status(
        &mut self,
        what: &str,
        done: impl Fn(&FtStatus) -> bool,
    ) -> Result<Instant, String> {
        let t0 = Instant::now();
        loop {
            if self.primary.status().is_some_and(|s| done(&s)) {
                return Ok(Instant::now());
            }
            if let Some(st) = self.primary.proc.try_wait() {
                return Err(format!(
                    "the primary exited ({st}) before {what}:\n{}",
                    tail(&self.plog, 20)
                ));
            }
            if let Some(st) = self.standby.as_mut().and_then(|s| s.proc.try_wait()) {
                return Err(format!(
                    "the standby exited ({st}) before the primary was {what}:\n{}\n\
                     primary:\n{}",
                    tail(&self.slog, 20),
                    tail(&self.plog, 20)
                ));
            }
            if t0.elapsed() > PAIR_TIMEOUT {
                return Err(format!(
                    "not {what} within {PAIR_TIMEOUT:?} (status {:?}); primary:\n{}\nstandby:\n{}",
                    self.primary.status(),
                    tail(&self.plog, 20),
                    tail(&self.slog, 10)
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Highest `W <seq>` (durable record) on the primary's console.
    fn last_record(&self) -> u64 {
        read(&self.pcon)
            .lines()
            .filter_map(|l| l.strip_prefix("W ")?.trim().parse().ok())
            .max()
            .unwrap_or(0)
    }

    fn stop(mut self) {
        if let Some(mut s) = self.standby.take() {
            s.proc.terminate(Duration::from_secs(5));
        }
        self.primary.proc.terminate(Duration::from_secs(5));
    }
}

/// Durable records counted on a console over a window.
pub(crate) struct Rate {
    pub(crate) records: u64,
    pub(crate) secs: f64,
}

impl Rate {
    pub(crate) fn mib_s(&self) -> f64 {
        mib_s(self.records * 512, self.secs)
    }

    pub(crate) fn ms_per_request(&self) -> f64 {
        self.secs * 1e3 / (self.records as f64 / SYNC_RECORDS as f64)
    }
}

/// The console's content and when it was read.
fn snapshot(console: &Path) -> (String, Instant) {
    let s = read(console);
    (s, Instant::now())
}

/// Highest `W <seq>` in console text (the last one: records are durable in order).
fn last_w(text: &str) -> u64 {
    text.lines()
        .rev()
        .find_map(|l| l.strip_prefix("W ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits for the first `W` line, [`WARMUP_MS`] more, then counts the records made
/// durable over `window` (seen on the console: for a protected VM the lines are
/// released per committed epoch, so both ends are late by about one epoch). The
/// console is read whole at each end (a few MiB) and timed right after the read.
pub(crate) fn records_rate(
    console: &Path,
    window: Duration,
    mut alive: impl FnMut() -> bool,
) -> Result<Rate, String> {
    let t = Instant::now();
    while last_w(&read(console)) == 0 {
        if !alive() || t.elapsed() > PAIR_TIMEOUT {
            return Err(format!("no durable record:\n{}", tail(console, 10)));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(WARMUP_MS));
    let (text, t0) = snapshot(console);
    let s0 = last_w(&text);
    std::thread::sleep(window);
    let (text, t1) = snapshot(console);
    let s1 = last_w(&text);
    if !alive() {
        return Err(format!(
            "the VM ended during the window:\n{}",
            tail(console, 10)
        ));
    }
    if let Some(why) = text.lines().find(|l| l.starts_with("DISK-")) {
        return Err(format!(
            "the guest's disk workload stopped ({why}):\n{}",
            tail(console, 10)
        ));
    }
    if s1 <= s0 {
        return Err(format!(
            "no records during the window:\n{}",
            tail(console, 10)
        ));
    }
    Ok(Rate {
        records: s1 - s0,
        secs: (t1 - t0).as_secs_f64(),
    })
}

/// Full resyncs measured per run (alternating with the raw copy): medians are compared.
const FULL_ROUNDS: usize = 3;

/// The median of `v` (not empty), the upper one of an even count.
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// The resync of median time among `v` (not empty).
fn median_resync(v: &[Resync]) -> Resync {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    s[s.len() / 2]
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1 << 20) as f64 / secs
}

pub fn run(twinrun: &Path, elf: &Path, dir: &Path, quick: bool) -> Result<Vec<Figure>, String> {
    let disk: u64 = if quick { 128 << 20 } else { 256 << 20 };
    let blocks = disk / BLOCK;
    let topo = Topology::create(&format!("mr{}", std::process::id() % 1_000_000))
        .map_err(|e| format!("pair topology: {e}"))?;
    let secret = dir.join("mirror.secret");
    let images = [dir.join("mirror-pm1.img"), dir.join("mirror-pm2.img")];
    let (copy, tcp_out) = (dir.join("mirror-copy.img"), dir.join("mirror-tcp.img"));
    let mut files = Files(vec![secret.clone(), copy.clone(), tcp_out.clone()]);
    for img in &images {
        files.0.push(img.clone());
        // The metadata directory beside the image (`MetaStore::for_image`).
        files
            .0
            .push(PathBuf::from(format!("{}.twinrun", img.display())));
    }
    let mut key = [0u8; 32];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&secret, hex).map_err(|e| format!("secret file: {e}"))?;
    let cx = Ctx {
        twinrun,
        elf,
        dir,
        topo: &topo,
        secret,
        images: images.clone(),
    };

    eprintln!(
        "   {} MiB image of non-zero data; raw copies ...",
        disk >> 20
    );
    fill_image(&images[0], disk)?;
    let alink_ip = topo.alink(0).1.ip();
    let tcp_secs = tcp_copy(
        &images[0],
        &tcp_out,
        topo.pm_ns(0),
        topo.pm_ns(1),
        alink_ip,
        disk,
    )?;
    let _ = std::fs::remove_file(&tcp_out);

    // One resync of 256 MiB takes about a second: one sample of the machine's load. The
    // raw copy and the full resync alternate, FULL_ROUNDS times, and the medians are
    // compared (each round a fresh standby image without metadata: a full copy).
    let rounds = if quick { 1 } else { FULL_ROUNDS };
    eprintln!("   full resync (quiet guest) x {rounds}, each after a raw copy ...");
    let quiet: Vec<String> = ["--workload", "counter", "--counter-rate", "10"]
        .map(String::from)
        .to_vec();
    let (mut raws, mut fulls) = (Vec::new(), Vec::new());
    for k in 0..rounds {
        raws.push(raw_copy(&images[0], &copy)?);
        sparse_image(&images[1], disk)?;
        let meta = PathBuf::from(format!("{}.twinrun", images[1].display()));
        let _ = std::fs::remove_dir_all(&meta);
        let (pair, _) = cx.pair(&format!("full{k}"), &quiet)?;
        let log = read(&pair.plog);
        pair.stop();
        let full = *resyncs(&log)
            .first()
            .ok_or_else(|| format!("no resync line in the primary's log:\n{log}"))?;
        if plans(&log).first().map(String::as_str) != Some("Full") || full.bytes != disk {
            return Err(format!(
                "session {k} was not a full copy of {disk} bytes: {full:?}, plans {:?}",
                plans(&log)
            ));
        }
        fulls.push(full);
    }
    let raw_secs = median(&raws);
    let full = median_resync(&fulls);
    let rounds_note = fulls
        .iter()
        .zip(&raws)
        .map(|(f, r)| format!("{:.0}/{:.0}", mib_s(f.bytes, f.secs), mib_s(disk, *r)))
        .collect::<Vec<_>>()
        .join(", ");

    eprintln!("   delta resync after ~1% of the blocks written degraded ...");
    let records_wanted = blocks / 100 * (BLOCK / 512);
    let writer: Vec<String> = [
        "--workload",
        "counter,disk",
        "--counter-rate",
        "10",
        "--disk-flush-every",
        "64",
        "--disk-rate",
        &DISK_RATE.to_string(),
    ]
    .map(String::from)
    .to_vec();
    let (mut pair, _) = cx.pair("delta", &writer)?;
    std::thread::sleep(Duration::from_millis(300));
    if let Some(mut s) = pair.standby.take() {
        s.proc.kill();
    }
    pair.wait_status("degraded", |s| s.disks.iter().any(|d| d.kind == "degraded"))?;
    // Output held at the loss is released once the primary is degraded.
    std::thread::sleep(Duration::from_millis(100));
    let at_loss = pair.last_record();
    let t0 = Instant::now();
    let limit = Duration::from_secs_f64(records_wanted as f64 / DISK_RATE as f64 * 4.0 + 5.0);
    while pair.last_record() < at_loss + records_wanted {
        if t0.elapsed() > limit {
            return Err(format!(
                "the guest wrote {} of {records_wanted} records within {limit:?}",
                pair.last_record() - at_loss
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let degraded_records = pair.last_record() - at_loss;
    let (standby, slog) = cx.spawn_standby("delta2", &writer)?;
    pair.standby = Some(standby);
    pair.slog = slog;
    pair.wait_status("protected again", |s| s.protections >= 2)?;
    let log = read(&pair.plog);
    pair.stop();
    let all = resyncs(&log);
    let kinds = plans(&log);
    let (Some(delta), Some("Delta")) = (all.get(1).copied(), kinds.get(1).map(String::as_str))
    else {
        return Err(format!(
            "the returning standby got no delta: plans {kinds:?}, resyncs {all:?}"
        ));
    };

    eprintln!("   synchronous guest writes: unprotected, then on the pair ...");
    let window = Duration::from_secs_f64(if quick { 1.5 } else { 3.0 });
    let sync_writer = sync_writer();
    let local = unprotected(
        (twinrun, elf, dir),
        &topo.pms[0].ns,
        "mirror",
        &copy,
        &sync_writer,
        &mut files,
        |con, _, alive| records_rate(con, window, alive),
    )?;
    let (mut pair, to_protect) = cx.pair("sync", &sync_writer)?;
    let pcon = pair.pcon.clone();
    let ft = records_rate(&pcon, window, || pair.primary.proc.alive());
    let plog = read(&pair.plog);
    let alive = pair.primary.proc.alive();
    // Protected once, still in its first session: never degraded meanwhile.
    let stayed = pair
        .primary
        .status()
        .is_some_and(|s| s.protections == 1 && s.session == 1 && s.state == FtState::Protected);
    pair.stop();
    let ft = ft.map_err(|e| format!("FT: {e}\n{plog}"))?;
    if !alive || !stayed {
        return Err(format!(
            "the pair did not stay protected during the measurement:\n{plog}"
        ));
    }
    let sync_pre = resyncs(&plog).first().copied();
    drop(topo);
    drop(files);

    let full_rate = mib_s(full.bytes, full.secs);
    let mut figs = Vec::new();
    let img_note = format!(
        "{} MiB image of non-zero data, sparse fresh standby image, default epoch, unlimited rate",
        disk >> 20
    );
    figs.push(
        Figure::new(
            GROUP,
            "full resync throughput",
            full_rate,
            "MiB/s",
            Better::Higher,
        )
        .target(0.7, true, ">= 70% of raw copy")
        .baseline("read+write+fsync copy, same fs", mib_s(disk, raw_secs))
        .note(format!(
            "{img_note}; median of {rounds} rounds, each after a raw copy; {} bytes in {:.3} s \
             ({} passes), quiet guest; rounds (resync/raw MiB/s): {rounds_note}",
            full.bytes, full.secs, full.passes
        )),
    );
    figs.push(
        Figure::new(
            GROUP,
            "full resync vs TCP copy",
            full_rate,
            "MiB/s",
            Better::Higher,
        )
        .target(0.7, true, ">= 70% of raw copy")
        .baseline(
            "copy over A-Link 1 TCP pm1->pm2 + fsync",
            mib_s(disk, tcp_secs),
        )
        .note(format!(
            "TCP copy {disk} bytes in {tcp_secs:.3} s, one connection"
        )),
    );
    figs.push(
        Figure::new(
            GROUP,
            "full resync time",
            full.secs * 1e3,
            "ms",
            Better::Lower,
        )
        .baseline("read+write+fsync copy", raw_secs * 1e3)
        .note(format!("{} bytes; TCP copy {tcp_secs:.3} s", full.bytes)),
    );
    figs.push(
        Figure::new(
            GROUP,
            "delta resync time",
            delta.secs * 1e3,
            "ms",
            Better::Lower,
        )
        .target(0.05, true, "< 5% of full")
        .baseline("full resync, same run", full.secs * 1e3)
        .note(format!(
            "{} bytes = {:.2}% of the disk's blocks ({} passes); {degraded_records} records \
                 (512 B, 8 per block) written degraded, guest writing {DISK_RATE} records/s",
            delta.bytes,
            delta.bytes as f64 / disk as f64 * 100.0,
            delta.passes
        )),
    );
    figs.push(
        Figure::new(
            GROUP,
            "delta resync bytes",
            delta.bytes as f64,
            "bytes",
            Better::Lower,
        )
        .baseline("full resync bytes", full.bytes as f64)
        .note(format!("{blocks} blocks of 4 KiB in the disk")),
    );
    let pre = sync_pre.map_or(String::new(), |r| {
        format!(" (its first resync: {} bytes in {:.3} s)", r.bytes, r.secs)
    });
    let sync_note = format!(
        "guest `disk` workload unpaced: {SYNC_RECORDS} records of 512 B per request, each \
         followed by a flush; {:.1} s window starting {WARMUP_MS} ms after start/protection; \
         FT {} records, local {}; protected {:.0} ms after the VM started{pre}",
        window.as_secs_f64(),
        ft.records,
        local.records,
        to_protect.as_secs_f64() * 1e3
    );
    figs.push(
        Figure::new(
            GROUP,
            "FT guest write+flush throughput",
            ft.mib_s(),
            "MiB/s",
            Better::Higher,
        )
        .target(0.8, true, ">= 80% of local")
        .baseline("same guest unprotected, same kind of image", local.mib_s())
        .note(sync_note.clone()),
    );
    figs.push(
        Figure::new(
            GROUP,
            "FT guest write+flush latency (mean per request)",
            ft.ms_per_request(),
            "ms",
            Better::Lower,
        )
        .baseline("same guest unprotected", local.ms_per_request())
        .note(format!(
            "requests are serial: window / requests ({} KiB write + flush each)",
            SYNC_RECORDS * 512 / 1024
        )),
    );
    Ok(figs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_durations() {
        let near = |s: &str, v: f64| (parse_debug_duration(s).unwrap() - v).abs() < 1e-12;
        assert!(near("1.5s", 1.5));
        assert!(near("250ms", 0.25));
        assert!(near("950µs", 950e-6));
        assert!(near("12ns", 12e-9));
        assert_eq!(parse_debug_duration("5min"), None);
    }

    #[test]
    fn resync_and_plan_lines() {
        let log = "[x INFO checkpoint] primary: disk /a.img: Full: no metadata\n\
                   [x INFO checkpoint] primary: disk resync done: 256 chunks, 268435456 bytes, 2 passes in 1.25s\n\
                   [x INFO checkpoint] primary: disk /a.img: Delta: 3 blocks\n\
                   [x INFO checkpoint] primary: disk resync done: 1 chunks, 12288 bytes, 1 passes in 3.5ms\n\
                   [x INFO twinrun] FT primary: disk resync of the session: 1 chunks, 12288 bytes, 1 passes in 3.5ms\n";
        assert_eq!(
            resyncs(log),
            vec![
                Resync {
                    bytes: 268435456,
                    passes: 2,
                    secs: 1.25
                },
                Resync {
                    bytes: 12288,
                    passes: 1,
                    secs: 0.0035
                }
            ]
        );
        assert_eq!(plans(log), vec!["Full", "Delta"]);
    }
}
