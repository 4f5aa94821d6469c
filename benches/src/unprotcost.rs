//! `unprotected-cost`: what an unprotected VM's VMM costs its guest (issue 16). The
//! node daemon runs an unprotected VM as the primary of a pair with no standby, so that
//! it can be live migrated. Measured in the same run, alternating the order round by
//! round, kv throughput (`redis-benchmark` SET/GET from the client namespace, as
//! `ft-net`) of the same guest in:
//!
//! - `solo`: `twinrun vm run` with no role (a VM that cannot migrate: the reference);
//! - `before`: `--role primary` alone (session 22's unprotected VMM: an FT primary
//!   with no standby and no quorum);
//! - `after`: `--role primary --protection unprotected` (the runtime knows);
//! - `before, after a migration given up` / `after, ...`: the same two once a
//!   migration's receiving VMM (`--role standby --migration-target`, in PM2) got in
//!   sync and was then stopped (the daemon's "given up"): the FT primary keeps its
//!   dirty logging on; the unprotected one turns it off.
//!
//! Figures, not asserts.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use twinrun_control::FtState;
use twinrun_lab::{Proc, Topology};

use crate::ftnet::{read_log, twinrun_in, vm_args, wait_filled};
use crate::redis::{kv_median, kv_rounds, kv_set_get, PIPELINES};
use crate::report::{Better, Figure};

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    Solo,
    Before,
    After,
    BeforeGivenUp,
    AfterGivenUp,
}

impl Mode {
    const ALL: [Mode; 5] = [
        Mode::Solo,
        Mode::Before,
        Mode::After,
        Mode::BeforeGivenUp,
        Mode::AfterGivenUp,
    ];

    fn label(self) -> &'static str {
        match self {
            Mode::Solo => "solo `vm run`",
            Mode::Before => "before: FT primary alone",
            Mode::After => "after: --protection unprotected",
            Mode::BeforeGivenUp => "before, after a migration given up",
            Mode::AfterGivenUp => "after, after a migration given up",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Mode::Solo => "solo",
            Mode::Before => "before",
            Mode::After => "after",
            Mode::BeforeGivenUp => "before-gu",
            Mode::AfterGivenUp => "after-gu",
        }
    }

    fn unprotected(self) -> bool {
        matches!(self, Mode::After | Mode::AfterGivenUp)
    }

    fn given_up(self) -> bool {
        matches!(self, Mode::BeforeGivenUp | Mode::AfterGivenUp)
    }
}

fn secret_file(dir: &Path) -> Result<PathBuf, String> {
    let path = dir.join("cost.secret");
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut key))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&path, hex).map_err(|e| format!("secret file: {e}"))?;
    Ok(path)
}

/// One VM of `mode`, measured: (SET, GET) req/s per pipeline depth.
fn one(
    twinrun: &Path,
    elf: &Path,
    dir: &Path,
    topo: &Topology,
    mode: Mode,
    round: usize,
    n: u32,
) -> Result<Vec<(f64, f64)>, String> {
    let tag = format!("{}-{round}", mode.tag());
    let secret = secret_file(dir)?;
    let name = format!("cost-{tag}-{}", std::process::id());
    let pair_args = |role: &str, pm: usize| {
        let mut a: Vec<String> = vec!["--role".into(), role.into(), "--name".into()];
        a.push(format!("{name}-{role}"));
        a.extend(topo.alink_args(pm));
        a.extend(["--cluster-id".into(), name.clone()]);
        a.push("--cluster-secret-file".into());
        a.push(secret.display().to_string());
        a.extend(["--heartbeat-misses".into(), "20".into()]);
        if mode.unprotected() {
            a.extend(["--protection".into(), "unprotected".into()]);
        }
        a
    };
    let console = dir.join(format!("{tag}.console"));
    let _ = std::fs::remove_file(&console);
    let mut cmd = twinrun_in(topo, 0, twinrun, dir);
    cmd.args(vm_args(elf, topo, &console, 0));
    if mode != Mode::Solo {
        cmd.args(pair_args("primary", 0));
    }
    let log = dir.join(format!("{tag}.log"));
    let mut vm = Proc::spawn_logged(mode.tag(), &mut cmd, &log)
        .map_err(|e| format!("spawn {}: {e}", mode.tag()))?;
    wait_filled(&mut vm, &console)?;
    if mode.given_up() {
        // A migration's receiving VMM gets in sync, then is stopped (given up).
        let psock = dir.join("run").join(format!("{name}-primary.sock"));
        let scon = dir.join(format!("{tag}-target.console"));
        let _ = std::fs::remove_file(&scon);
        let mut t = twinrun_in(topo, 1, twinrun, dir);
        t.args(vm_args(elf, topo, &scon, 1))
            .args(pair_args("standby", 1))
            .arg("--migration-target");
        let slog = dir.join(format!("{tag}-target.log"));
        let mut target = Proc::spawn_logged("target", &mut t, &slog)
            .map_err(|e| format!("spawn the target: {e}"))?;
        let t0 = Instant::now();
        while twinrun_control::ft_status(&psock).is_none_or(|s| s.state != FtState::Protected) {
            if t0.elapsed() > Duration::from_secs(90) || !target.alive() || !vm.alive() {
                return Err(format!(
                    "{}: the target did not get in sync:\n{}\n{}",
                    mode.label(),
                    read_log(&log),
                    read_log(&slog)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        target.terminate(Duration::from_secs(5));
        let t0 = Instant::now();
        while twinrun_control::ft_status(&psock).is_none_or(|s| s.last_session.is_none()) {
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(format!(
                    "{}: the session did not end:\n{}",
                    mode.label(),
                    read_log(&log)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let out = kv_set_get(topo, n, || format!("{}: {}", mode.label(), read_log(&log)))?;
    if !vm.alive() {
        return Err(format!("{} exited:\n{}", mode.label(), read_log(&log)));
    }
    vm.terminate(Duration::from_secs(5));
    Ok(out)
}

pub fn run(twinrun: &Path, elf: &Path, dir: &Path, quick: bool) -> Result<Vec<Figure>, String> {
    let rounds = if quick { 2 } else { 3 };
    let n = if quick { 2_000 } else { 5_000 };
    let dir = dir.join("unprotected-cost");
    std::fs::create_dir_all(dir.join("run")).map_err(|e| format!("{}: {e}", dir.display()))?;
    let topo = Topology::create(&format!("bu{}", std::process::id() % 1_000_000))
        .map_err(|e| format!("topology: {e}"))?;
    let samples = kv_rounds(
        rounds,
        &Mode::ALL,
        |m| m.label().to_string(),
        |r, mode| one(twinrun, elf, &dir, &topo, mode, r, n),
    )?;
    let note = format!(
        "median of {rounds} rounds, each a fresh VM (order reversed every other round); \
         redis-benchmark -n {n} -c {} from the client namespace; kv guest, 64 MiB, 32 MiB \
         filled; baseline: session 22's unprotected VMM (an FT primary alone) in the same \
         state",
        crate::redis::CLIENTS
    );
    let mut figs = Vec::new();
    for (i, p) in PIPELINES.iter().enumerate() {
        for what in ["SET", "GET"] {
            let med = |m: Mode| kv_median(&samples, m, i, what);
            let solo = med(Mode::Solo);
            for (after, before) in [
                (Mode::After, Mode::Before),
                (Mode::AfterGivenUp, Mode::BeforeGivenUp),
            ] {
                let (a, b) = (med(after), med(before));
                figs.push(
                    Figure::new(
                        "unprotected-cost",
                        &format!("kv {what} -P{p}, {}", after.label()),
                        a,
                        "req/s",
                        Better::Higher,
                    )
                    .baseline(before.label(), b)
                    .note(format!("{note}; {}: {solo:.0} req/s", Mode::Solo.label())),
                );
            }
        }
    }
    Ok(figs)
}
