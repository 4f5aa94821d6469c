//! HA protection (issue 15 item 4) on a real pair: two `twinrun vm run --protection ha
//! --role ...` processes in the PM namespaces of the pair topology, A-Links over veths,
//! real image files in the scratch directory.
//!
//! 1. Mirrored write+flush throughput: the guest's `disk` workload unpaced (32 KiB
//!    requests, each followed by a flush, one at a time), records made durable over a
//!    window once the pair is protected, against the same guest unprotected on an image
//!    of the same kind in the same run (target >= 80 %).
//! 2. Restart time: SIGKILL the protected primary; the time from the kill to the
//!    guest's first console output on the survivor (it boots from its replica),
//!    against the guest's own boot (an unprotected VM from spawn to its first output)
//!    measured in the same run (target: at most 1 s more than that boot).
//!
//! The namespaces, processes and files go away on drop (also on error).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use twinrun_control::FtState;
use twinrun_lab::Topology;

use crate::mirror::{
    fill_image, read, records_rate, sync_writer, tail, unprotected, vm_args, Files, Rate, Vm,
    PAIR_TIMEOUT, SYNC_RECORDS,
};
use crate::report::{Better, Figure};

const GROUP: &str = "ha";

struct Ctx<'a> {
    twinrun: &'a Path,
    elf: &'a Path,
    dir: &'a Path,
    topo: &'a Topology,
    secret: PathBuf,
    images: [PathBuf; 2],
}

/// A protected HA pair (the standby first on drop).
struct Pair {
    standby: Vm,
    primary: Vm,
    plog: PathBuf,
    slog: PathBuf,
    pcon: PathBuf,
    scon: PathBuf,
}

impl Ctx<'_> {
    fn spawn(
        &self,
        i: usize,
        tag: &str,
        workload: &[String],
    ) -> Result<(Vm, PathBuf, PathBuf), String> {
        let role = if i == 0 { "primary" } else { "standby" };
        let con = self.dir.join(format!("ha-{tag}-{role}.console"));
        let log = self.dir.join(format!("ha-{tag}-{role}.log"));
        let _ = std::fs::remove_file(&con);
        let mut a = vm_args(self.elf, &self.images[i], &con, workload);
        a.extend([
            "--protection".into(),
            "ha".into(),
            "--role".into(),
            role.into(),
        ]);
        a.extend(self.topo.alink_args(i));
        a.extend([
            "--cluster-id".into(),
            format!("bench-ha-{}", std::process::id()),
            "--cluster-secret-file".into(),
            self.secret.display().to_string(),
        ]);
        let name = format!("ha-{}-{tag}-{role}", std::process::id());
        let vm = Vm::spawn(
            role,
            &self.topo.pms[i].ns,
            (self.twinrun, self.dir),
            &name,
            &a,
            &log,
        )?;
        Ok((vm, con, log))
    }

    fn pair(&self, tag: &str, workload: &[String]) -> Result<Pair, String> {
        let (mut standby, scon, slog) = self.spawn(1, tag, workload)?;
        wait(&mut standby, &slog, "listening", |s| s.session >= 1)?;
        let (mut primary, pcon, plog) = self.spawn(0, tag, workload)?;
        wait(&mut primary, &plog, "protected", |s| {
            s.state == FtState::Protected
        })
        .map_err(|e| format!("{e}\nstandby:\n{}", tail(&slog, 15)))?;
        Ok(Pair {
            standby,
            primary,
            plog,
            slog,
            pcon,
            scon,
        })
    }
}

impl Pair {
    /// Stops the pair cleanly, the standby first (the primary then records the
    /// replicas' state in its metadata).
    fn stop(mut self) {
        self.standby.proc.terminate(Duration::from_secs(5));
        self.primary.proc.terminate(Duration::from_secs(5));
    }
}

fn wait(
    vm: &mut Vm,
    log: &Path,
    what: &str,
    done: impl Fn(&twinrun_control::FtStatus) -> bool,
) -> Result<Instant, String> {
    let t0 = Instant::now();
    loop {
        if vm.status().is_some_and(|s| done(&s)) {
            return Ok(Instant::now());
        }
        if let Some(st) = vm.proc.try_wait() {
            return Err(format!("exited ({st}) before {what}:\n{}", tail(log, 20)));
        }
        if t0.elapsed() > PAIR_TIMEOUT {
            return Err(format!(
                "not {what} within {PAIR_TIMEOUT:?}:\n{}",
                tail(log, 20)
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `console` holds a complete line; when it was seen.
fn first_output(console: &Path, alive: &mut dyn FnMut() -> bool) -> Result<Instant, String> {
    let t0 = Instant::now();
    loop {
        if read(console).contains('\n') {
            return Ok(Instant::now());
        }
        if !alive() || t0.elapsed() > PAIR_TIMEOUT {
            return Err(format!("no console output on {}", console.display()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn run(twinrun: &Path, elf: &Path, dir: &Path, quick: bool) -> Result<Vec<Figure>, String> {
    // Room for the unpaced writer over the whole run (64 MiB filled up before the
    // unprotected baseline's window ended: DISK-FULL).
    let disk: u64 = if quick { 256 << 20 } else { 512 << 20 };
    let topo = Topology::create(&format!("ha{}", std::process::id() % 1_000_000))
        .map_err(|e| format!("pair topology: {e}"))?;
    let secret = dir.join("ha.secret");
    let images = [dir.join("ha-pm1.img"), dir.join("ha-pm2.img")];
    let local_img = dir.join("ha-local.img");
    let mut files = Files(vec![secret.clone(), local_img.clone()]);
    for p in &images {
        files.0.push(p.clone());
        files
            .0
            .push(PathBuf::from(format!("{}.twinrun", p.display())));
    }
    files.0.push(dir.join("run"));
    std::fs::write(&secret, b"ha-bench-cluster-secret-0123456789\n")
        .map_err(|e| format!("secret: {e}"))?;
    for p in images.iter().chain([&local_img]) {
        fill_image(p, disk)?;
    }
    let cx = Ctx {
        twinrun,
        elf,
        dir,
        topo: &topo,
        secret,
        images,
    };

    eprintln!("   HA write+flush: unprotected, then on the pair ...");
    let window = Duration::from_secs_f64(if quick { 1.5 } else { 3.0 });
    let writer = sync_writer();
    // The unprotected baseline runs before and after the pair (the same image, the
    // writer starting again at its first record): fdatasync on this shared disk swings
    // with the other load of the machine, and one window alone was seen 0.5-6 ms per
    // request apart between runs. The baseline is the mean of the two.
    let run_local = |tag: &str, files: &mut Files| -> Result<(Rate, Duration), String> {
        unprotected(
            (twinrun, elf, dir),
            &topo.pms[0].ns,
            &format!("ha-{tag}"),
            &local_img,
            &writer,
            files,
            |con, spawned, alive| {
                let boot = first_output(con, &mut *alive)? - spawned;
                Ok((records_rate(con, window, alive)?, boot))
            },
        )
    };
    let (local_before, boot) = run_local("before", &mut files)?;
    // The images start unrelated (no metadata): the pair's first session is a full
    // resync, during which an unpaced writer would fill the image before the pair is
    // protected (DISK-FULL). So a quiet guest brings the replicas in sync first and
    // stops (standby first); the measured pair then starts in sync.
    eprintln!("   HA initial sync (quiet guest) ...");
    let quiet: Vec<String> = ["--workload", "counter", "--counter-rate", "10"]
        .map(String::from)
        .to_vec();
    let prime = cx.pair("prime", &quiet)?;
    for p in [&prime.pcon, &prime.scon, &prime.plog, &prime.slog] {
        files.0.push(p.to_path_buf());
    }
    prime.stop();
    let mut pair = cx.pair("sync", &writer)?;
    for p in [&pair.pcon, &pair.scon, &pair.plog, &pair.slog] {
        files.0.push(p.to_path_buf());
    }
    let ha = records_rate(&pair.pcon, window, || pair.primary.proc.alive());
    let stayed = pair
        .primary
        .status()
        .is_some_and(|s| s.session == 1 && s.state == FtState::Protected);
    let ha = ha.map_err(|e| format!("HA: {e}\n{}", tail(&pair.plog, 20)))?;
    if !stayed {
        return Err(format!(
            "the HA pair did not stay protected during the measurement:\n{}",
            tail(&pair.plog, 20)
        ));
    }

    eprintln!("   HA restart: SIGKILL the primary ...");
    pair.primary.proc.kill();
    let killed = Instant::now();
    let scon = pair.scon.clone();
    let standby = &mut pair.standby;
    let up = first_output(&scon, &mut || standby.proc.alive())
        .map_err(|e| format!("survivor: {e}\n{}", tail(&pair.slog, 20)))?;
    let restart = up - killed;
    pair.standby.proc.terminate(Duration::from_secs(5));
    drop(pair);
    eprintln!("   HA write+flush: unprotected again ...");
    let (local_after, _) = run_local("after", &mut files)?;
    drop(topo);
    drop(files);
    let local = Rate {
        records: (local_before.records + local_after.records) / 2,
        secs: (local_before.secs + local_after.secs) / 2.0,
    };

    let note = format!(
        "guest `disk` workload unpaced: {SYNC_RECORDS} records of 512 B per request, each \
         followed by a flush; {:.1} s window; HA {} records, local {} before and {} after \
         (baseline: their mean); {} MiB images; both PMs share this machine's one disk, so \
         the pair's two fdatasyncs per batch queue on it",
        window.as_secs_f64(),
        ha.records,
        local_before.records,
        local_after.records,
        disk >> 20
    );
    Ok(vec![
        Figure::new(
            GROUP,
            "HA guest write+flush throughput",
            ha.mib_s(),
            "MiB/s",
            Better::Higher,
        )
        .target(0.8, true, ">= 80% of local")
        .baseline("same guest unprotected, same kind of image", local.mib_s())
        .note(note),
        Figure::new(
            GROUP,
            "HA guest write+flush latency (mean per request)",
            ha.ms_per_request(),
            "ms",
            Better::Lower,
        )
        .baseline("same guest unprotected", local.ms_per_request()),
        Figure::new(
            GROUP,
            "HA restart time (SIGKILL to first output on the survivor)",
            restart.as_secs_f64() * 1e3,
            "ms",
            Better::Lower,
        )
        .baseline(
            "the guest's own boot (spawn to first output)",
            boot.as_secs_f64() * 1e3,
        )
        .note("A-Links over veths; a SIGKILLed peer's sockets close at once"),
        Figure::new(
            GROUP,
            "HA restart time beyond the guest's own boot",
            (restart.as_secs_f64() - boot.as_secs_f64()) * 1e3,
            "ms",
            Better::Lower,
        )
        .target(1000.0, false, "<= 1 s plus the guest's boot"),
    ])
}
