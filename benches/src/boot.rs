//! Figure 1: VMM start to the guest's first console line (`BOOT ...`).
//!
//! Two views: the real CLI (`twinrun vm run`, from exec to the line appearing in the
//! console file) and in-process (`vmm::build_vm` + `start`, split into build time and
//! start-to-line). The guest runs the counter workload with a limit of one line, so
//! each run also ends by itself. The console file is polled every 100 µs, which bounds
//! the measurement error.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmm::config::{ConsoleConfig, Payload, VmConfig, Workloads};
use vmm::VmExit;

use twinrun_lab::console::ConsoleLog;
use twinrun_lab::Proc;

use crate::report::{median_p90, Better, Figure};

const POLL: Duration = Duration::from_micros(100);
const LIMIT: Duration = Duration::from_secs(20);
pub const MEM_MIB: u64 = 64;

fn guest_config(elf: &Path, console: &Path) -> VmConfig {
    VmConfig {
        mem_mib: MEM_MIB,
        vcpus: 1,
        payload: Payload::TestGuest {
            elf: elf.to_path_buf(),
            workloads: Workloads {
                counter: true,
                counter_rate: 0,
                counter_limit: 1,
                ..Workloads::default()
            },
        },
        disks: vec![],
        nets: vec![],
        console: ConsoleConfig::File {
            path: console.to_path_buf(),
        },
    }
}

/// One CLI run: (exec to BOOT line, exec to process exit), in ms.
fn cli_once(twinrun: &Path, elf: &Path, console: &Path) -> Result<(f64, f64), String> {
    let _ = std::fs::remove_file(console);
    let mut cmd = Command::new(twinrun);
    cmd.args(["vm", "run", "--workload", "counter", "--counter-limit", "1"])
        .args(["--counter-rate", "0", "--mem-mib", &MEM_MIB.to_string()])
        .arg("--guest")
        .arg(elf)
        .arg("--console")
        .arg(format!("file:{}", console.display()));
    let t0 = Instant::now();
    let mut child = Proc::spawn_quiet("twinrun", &mut cmd).map_err(|e| e.to_string())?;
    let mut con = ConsoleLog::new(console).every(POLL);
    let mut status = None;
    con.wait_while(
        LIMIT,
        |l| l.starts_with("BOOT "),
        || {
            status = status.or_else(|| child.try_wait());
            status.is_none()
        },
    )?;
    let boot = t0.elapsed();
    let status = match status {
        Some(s) => s,
        None => child
            .wait_timeout(LIMIT)
            .ok_or("twinrun did not exit after the counter limit")?,
    };
    let total = t0.elapsed();
    if !status.success() {
        return Err(format!("twinrun exited with {status}"));
    }
    Ok((ms(boot), ms(total)))
}

/// One in-process run: (build_vm, start to BOOT line), in ms.
fn in_process_once(elf: &Path, console: &Path) -> Result<(f64, f64), String> {
    let _ = std::fs::remove_file(console);
    let cfg = guest_config(elf, console);
    let t0 = Instant::now();
    let mut vm = vmm::build_vm(&cfg).map_err(|e| format!("build_vm: {e}"))?;
    let built = t0.elapsed();
    let t1 = Instant::now();
    vm.start().map_err(|e| format!("start: {e}"))?;
    let mut con = ConsoleLog::new(console).every(POLL);
    let r = con.wait_for(LIMIT, |l| l.starts_with("BOOT "));
    let boot = t1.elapsed();
    r?;
    match vm.wait_timeout(LIMIT) {
        Some(VmExit::GuestExit { status: 0 }) => {}
        Some(other) => return Err(format!("VM ended with {other}")),
        None => return Err("VM did not end after the counter limit".into()),
    }
    Ok((ms(built), ms(boot)))
}

/// Same-run floor of the process figures: exec of `/bin/true` to its exit.
fn spawn_floor_once() -> Result<f64, String> {
    let t0 = Instant::now();
    let st = Command::new("true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run true: {e}"))?;
    let d = t0.elapsed();
    if !st.success() {
        return Err(format!("true exited {st}"));
    }
    Ok(ms(d))
}

/// Same-run floor of the in-process figures: 64 MiB of guest memory and an empty KVM
/// VM with one vCPU slot (what any VMM must create), then dropped.
fn kvm_floor_once() -> Result<f64, String> {
    let t0 = Instant::now();
    let mem = vmm::vstate::memory::create_guest_memory(MEM_MIB << 20)
        .map_err(|e| format!("guest memory: {e}"))?;
    let vm = vmm::vstate::vm::Vm::new(&mem, 1).map_err(|e| format!("KVM VM: {e}"))?;
    let d = t0.elapsed();
    drop(vm);
    Ok(ms(d))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run(twinrun: &Path, elf: &Path, dir: &Path, runs: usize) -> Result<Vec<Figure>, String> {
    let console = dir.join("boot.console");
    // One unmeasured run of each, so page cache and first-use costs are paid.
    cli_once(twinrun, elf, &console)?;
    in_process_once(elf, &console)?;
    let (mut cli_boot, mut cli_total, mut build, mut start_boot, mut inproc) =
        (vec![], vec![], vec![], vec![], vec![]);
    let (mut spawn_floor, mut kvm_floor) = (vec![], vec![]);
    for _ in 0..runs {
        spawn_floor.push(spawn_floor_once()?);
        kvm_floor.push(kvm_floor_once()?);
        let (b, t) = cli_once(twinrun, elf, &console)?;
        cli_boot.push(b);
        cli_total.push(t);
        let (bu, sb) = in_process_once(elf, &console)?;
        build.push(bu);
        start_boot.push(sb);
        inproc.push(bu + sb);
    }
    let _ = std::fs::remove_file(&console);
    let n = format!("{runs} runs, {MEM_MIB} MiB guest, console file polled every 100 us");
    let mut figs = Vec::new();
    let spawn = ("exec /bin/true -> exit", median_p90(&spawn_floor));
    let kvm = ("64 MiB memory + empty KVM VM", median_p90(&kvm_floor));
    let mut add = |name: &str, v: &[f64], target: bool, base: Option<(&str, (f64, f64))>| {
        let (med, p90) = median_p90(v);
        for (stat, value, note) in [("median", med, n.clone()), ("p90", p90, String::new())] {
            let mut f = Figure::new(
                "boot",
                &format!("{name} {stat}"),
                value,
                "ms",
                Better::Lower,
            )
            .note(note);
            if target {
                f = f.target(100.0, false, "< 100 ms");
            }
            if let Some((label, (bm, bp))) = base {
                f = f.baseline(label, if stat == "median" { bm } else { bp });
            }
            figs.push(f);
        }
    };
    add(
        "process exec -> BOOT line (twinrun vm run)",
        &cli_boot,
        true,
        Some(spawn),
    );
    add(
        "in-process build_vm + start -> BOOT line",
        &inproc,
        true,
        Some(kvm),
    );
    add("  of which build_vm", &build, false, None);
    add("  of which start -> BOOT line", &start_boot, false, None);
    add(
        "process exec -> exit (1 counter line, DONE)",
        &cli_total,
        false,
        Some(spawn),
    );
    Ok(figs)
}
