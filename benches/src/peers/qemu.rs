//! Debian's QEMU as a peer: installing it (`scripts/install-qemu.sh`), building the
//! bare multiboot guest (`benches/peers/guest.c`), running QEMU processes under the lab's
//! process guards (killed and reaped on drop, also on panic) and migrating between
//! them over QMP.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use twinrun_lab::Proc;

use super::qmp::{Migration, Qmp};

pub const QEMU: &str = "qemu-system-x86_64";

/// QEMU's version line, or why it cannot be had: not installed and `install` false,
/// or the install script failed (its output in the error).
pub fn ensure(install: bool) -> Result<String, String> {
    let version = || {
        Command::new(QEMU)
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
    };
    if let Some(v) = version() {
        return Ok(v);
    }
    let script = twinrun_lab::guest::repo_root().join("scripts/install-qemu.sh");
    if !install {
        return Err(format!(
            "{QEMU} is not installed: run with --peers to install Debian's QEMU ({})",
            script.display()
        ));
    }
    eprintln!("   {QEMU} missing: {} ...", script.display());
    let out = Command::new("bash")
        .arg(&script)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "installing QEMU failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    version().ok_or_else(|| format!("{QEMU} still missing after {}", script.display()))
}

/// Builds the peer guest into `dir` (gcc, 32-bit, freestanding).
pub fn build_guest(dir: &Path) -> Result<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers");
    let out = dir.join("peer-guest.elf");
    let r = Command::new("gcc")
        .args([
            "-m32",
            "-ffreestanding",
            "-nostdlib",
            "-fno-pic",
            "-no-pie",
            "-static",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
        ])
        .arg(format!("-Wl,-T,{}", src.join("link.ld").display()))
        .args(["-Wl,--build-id=none", "-Wl,--no-warn-rwx-segments"])
        .arg(src.join("guest.c"))
        .arg("-o")
        .arg(&out)
        .output()
        .map_err(|e| format!("cannot run gcc (Debian: gcc) for the QEMU guest: {e}"))?;
    if !r.status.success() {
        return Err(format!(
            "building the QEMU peer guest failed:\n{}",
            String::from_utf8_lossy(&r.stderr)
        ));
    }
    Ok(out)
}

/// Where the guest's working set starts in its memory (`WSET_BASE` in guest.c).
pub const WSET_BASE: u64 = 8 << 20;

/// The guest QEMU runs: memory, working set, dirty rate.
#[derive(Clone, Copy, Debug)]
pub struct GuestSpec {
    pub mem_mib: u64,
    pub wset_pages: u32,
    pub rate: u32,
    pub seed: u32,
    /// The working set's contents are in guest memory at boot ([`write_memory_file`]).
    pub filled: bool,
}

impl GuestSpec {
    /// The multiboot command line (`-append`).
    pub fn append(&self) -> String {
        format!(
            "wset={} rate={} seed={}{}",
            self.wset_pages,
            self.rate,
            self.seed,
            if self.filled { " filled=1" } else { "" }
        )
    }
}

/// The value guest.c's fill writes into every 32-bit word of working-set page `p`
/// (`value()` there).
pub fn page_value(seed: u32, p: u32) -> u32 {
    let mut x = seed.wrapping_mul(0x9E37_79B9) ^ p.wrapping_mul(0x85EB_CA6B) ^ 0x5bd1_e995;
    x ^= x >> 15;
    x = x.wrapping_mul(0x2C1B_3C6D);
    x ^= x >> 12;
    x | 1
}

/// Writes `path`: the guest's whole memory as guest.c's fill leaves it (zero but the
/// working set), for QEMU to boot with its RAM backed by a private mapping of it
/// (`filled=1`). The guest's own fill runs emulated on these machines' software KVM
/// (3-16 MB/s: minutes for 512 MiB); this takes about a second.
pub fn write_memory_file(path: &Path, spec: &GuestSpec) -> Result<(), String> {
    use std::io::{Seek, SeekFrom};
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut f = File::create(path).map_err(err)?;
    f.set_len(spec.mem_mib << 20).map_err(err)?;
    f.seek(SeekFrom::Start(WSET_BASE)).map_err(err)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let mut page = [0u8; 4096];
    for p in 0..spec.wset_pages {
        let v = page_value(spec.seed, p).to_le_bytes();
        for word in page.chunks_exact_mut(4) {
            word.copy_from_slice(&v);
        }
        w.write_all(&page).map_err(err)?;
    }
    w.flush().map_err(err)
}

/// How the migration stream travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    OneStream,
    Multifd(u32),
}

impl Mode {
    pub fn label(self) -> String {
        match self {
            Mode::OneStream => "one stream".into(),
            Mode::Multifd(n) => format!("multifd {n} channels"),
        }
    }
}

/// A running QEMU: its process, QMP connection, serial log and serial input.
pub struct Qemu {
    pub name: String,
    proc: Proc,
    qmp: Qmp,
    serial: PathBuf,
    stderr: PathBuf,
    input: Option<ChildStdin>,
}

impl Qemu {
    /// Starts QEMU with `cmd` (the program, possibly wrapped by `ip netns exec`): the
    /// guest `elf` with `spec`, QMP on `dir/<name>.qmp`, COM1 on stdio (stdout to
    /// `dir/<name>.serial`); with `incoming`, waiting for `migrate-incoming`. With
    /// `mem_file`, the guest's RAM is a private mapping of that file (its initial
    /// contents; [`write_memory_file`]); the RAM block keeps QEMU's default name
    /// (`pc.ram`), so a destination with plain RAM can receive it.
    pub fn start(
        mut cmd: Command,
        name: &str,
        dir: &Path,
        elf: &Path,
        spec: &GuestSpec,
        incoming: bool,
        mem_file: Option<&Path>,
    ) -> Result<Qemu, String> {
        let sock = dir.join(format!("{name}.qmp"));
        let serial = dir.join(format!("{name}.serial"));
        let stderr = dir.join(format!("{name}.stderr"));
        let _ = std::fs::remove_file(&sock);
        let out = File::create(&serial).map_err(|e| format!("{}: {e}", serial.display()))?;
        let err = File::create(&stderr).map_err(|e| format!("{}: {e}", stderr.display()))?;
        // The recipe that works on these machines (REFERENCES.md): the host CPU without
        // the MSR KVM cannot set (arch-capabilities) and without cmpxchg16b, no display,
        // no monitor, COM1 on stdio, no default devices.
        cmd.args(["-enable-kvm", "-cpu", "host,-arch-capabilities,-cx16", "-m"])
            .arg(spec.mem_mib.to_string())
            .args([
                "-smp",
                "1",
                "-nodefaults",
                "-display",
                "none",
                "-monitor",
                "none",
            ])
            .args(["-serial", "stdio", "-kernel"])
            .arg(elf)
            .arg("-append")
            .arg(spec.append())
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()));
        if let Some(f) = mem_file {
            cmd.arg("-object")
                .arg(format!(
                    "memory-backend-file,id=pc.ram,size={}M,mem-path={},share=off",
                    spec.mem_mib,
                    f.display()
                ))
                .args(["-machine", "pc,memory-backend=pc.ram"]);
        }
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        cmd.stdin(Stdio::piped()).stdout(out).stderr(err);
        let mut proc = Proc::spawn(name, &mut cmd).map_err(|e| e.to_string())?;
        let input = proc.child().and_then(|c| c.stdin.take());
        let qmp = match Qmp::connect(&sock, Duration::from_secs(30)) {
            Ok(q) => q,
            Err(e) => {
                proc.kill();
                return Err(format!(
                    "{name}: {e}\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                ));
            }
        };
        Ok(Qemu {
            name: name.to_string(),
            proc,
            qmp,
            serial,
            stderr,
            input,
        })
    }

    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }

    fn died(&mut self) -> Option<String> {
        self.proc.try_wait().map(|st| {
            format!(
                "{} exited ({st}):\n{}",
                self.name,
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            )
        })
    }

    /// Waits (up to `within`) for a serial line starting with `prefix`, counting from
    /// line `from`; returns it. `PEER error` lines and QEMU's exit end the wait early.
    pub fn wait_line(
        &mut self,
        prefix: &str,
        from: usize,
        within: Duration,
    ) -> Result<String, String> {
        let t = Instant::now();
        loop {
            let text = self.serial();
            // Complete lines only: the serial file is read while QEMU writes it.
            let done = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            if let Some(l) = done.lines().skip(from).find(|l| l.starts_with(prefix)) {
                return Ok(l.to_string());
            }
            if let Some(l) = text.lines().find(|l| l.starts_with("PEER error")) {
                return Err(format!("{}: {l}", self.name));
            }
            if let Some(e) = self.died() {
                return Err(e);
            }
            if t.elapsed() > within {
                return Err(format!(
                    "{}: no {prefix:?} line within {within:?}; serial:\n{}",
                    self.name,
                    twinrun_lab::console::tail(&text, 10)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Lines on the serial console so far.
    pub fn lines(&self) -> usize {
        self.serial().lines().count()
    }

    /// Asks the guest to check its working set (`v` on COM1); the bad page count.
    pub fn verify(&mut self, within: Duration) -> Result<u64, String> {
        let from = self.lines();
        let input = self.input.as_mut().ok_or("no serial input")?;
        input
            .write_all(b"v")
            .and_then(|_| input.flush())
            .map_err(|e| format!("{}: serial input: {e}", self.name))?;
        let l = self.wait_line("PEER verify", from, within)?;
        twinrun_lab::console::field(&l, "bad").ok_or_else(|| format!("bad verify line {l:?}"))
    }

    /// Ends the process (SIGTERM, then SIGKILL).
    pub fn stop(mut self) {
        self.proc.terminate(Duration::from_secs(5));
    }
}

/// Migrates `src` to `dst` (started with `incoming`) over `uri` (`tcp:IP:PORT`, where
/// `dst` listens), uncapped, `mode` on both sides; polls the source's `query-migrate`
/// every 20 ms until it ends (`within` at most). The completed migration's figures.
pub fn migrate(
    src: &mut Qemu,
    dst: &mut Qemu,
    uri: &str,
    mode: Mode,
    within: Duration,
) -> Result<Migration, String> {
    // Both capabilities set either way: a QEMU that received a multifd migration keeps
    // multifd on, and a one-stream migration from it to a fresh QEMU then fails
    // ("Unable to write to socket: Broken pipe").
    let caps = vec![
        json!({"capability": "events", "state": true}),
        json!({"capability": "multifd", "state": matches!(mode, Mode::Multifd(_))}),
    ];
    for q in [&mut *src, &mut *dst] {
        q.qmp.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": caps })),
        )?;
    }
    // Uncapped: QEMU's default max-bandwidth is 128 MiB/s; 1 TB/s is no cap here.
    let mut params = json!({ "max-bandwidth": 1u64 << 40 });
    if let Mode::Multifd(n) = mode {
        params["multifd-channels"] = json!(n);
        dst.qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "multifd-channels": n })),
        )?;
    }
    src.qmp.execute("migrate-set-parameters", Some(params))?;
    dst.qmp
        .execute("migrate-incoming", Some(json!({ "uri": uri })))?;
    src.qmp.execute("migrate", Some(json!({ "uri": uri })))?;
    let t = Instant::now();
    loop {
        let m = Migration::parse(&src.qmp.execute("query-migrate", None)?)?;
        if !m.active() {
            if m.status != "completed" {
                return Err(format!(
                    "migration {} -> {} {}: {}",
                    src.name,
                    dst.name,
                    m.status,
                    m.error_desc.as_deref().unwrap_or("no reason given")
                ));
            }
            return Ok(m);
        }
        if let Some(e) = dst.died() {
            return Err(format!("the destination died during the migration: {e}"));
        }
        if t.elapsed() > within {
            let _ = src.qmp.execute("migrate_cancel", None);
            return Err(format!(
                "migration {} -> {} not done within {within:?} ({})",
                src.name, dst.name, m.status
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_of_the_guest() {
        let g = GuestSpec {
            mem_mib: 256,
            wset_pages: 32768,
            rate: 0,
            seed: 3,
            filled: false,
        };
        assert_eq!(g.append(), "wset=32768 rate=0 seed=3");
        let f = GuestSpec { filled: true, ..g };
        assert_eq!(f.append(), "wset=32768 rate=0 seed=3 filled=1");
        assert_eq!(Mode::Multifd(2).label(), "multifd 2 channels");
    }

    /// Values of guest.c's `value()` (gcc -m32, computed by a C harness of the same
    /// function): the memory file must hold what the guest checks.
    #[test]
    fn page_values_match_the_guest() {
        assert_eq!(page_value(7, 0), 1_362_635_279);
        assert_eq!(page_value(7, 1), 3_873_384_733);
        assert_eq!(page_value(1, 123_456), 671_565_617);
    }
}
