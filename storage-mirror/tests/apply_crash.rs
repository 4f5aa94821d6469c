//! A standby killed at any moment while applying committed epochs comes back consistent:
//! after re-opening the apply journal, the images equal EXACTLY the model images after
//! some epoch E, with E at or after the last epoch the killed process acknowledged.
//!
//! The parent test re-executes this test binary in "child" mode (selected by an env var):
//! the child commits epochs of pseudo-random writes to two real image files, printing
//! "committed N" after each commit returns (= acknowledged), and is SIGKILLed by the
//! parent at random moments, or kills itself at an exact point via the journal's
//! test-only crash hook (right after the journal fsync of epoch N; in the middle of epoch
//! N's image writes; between the checkpoint marker and the journal truncate).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use storage_mirror::apply_journal::{self, CrashPoint, JournalLimits};

const DISK_SIZES: [u64; 2] = [256 << 10, (128 << 10) + 1000];
/// Small limits so checkpoints (marker + truncate) happen often and get killed too.
const LIMITS: JournalLimits = JournalLimits {
    max_bytes: 96 << 10,
    max_epochs: 7,
};
const EPOCHS_PER_ROUND: u64 = 60;

use twinrun_lab::Rng;

/// The writes of `epoch` under `seed`: deterministic, so parent and child agree.
fn epoch_writes(seed: u64, epoch: u64) -> Vec<(u16, u64, Vec<u8>)> {
    let mut r = Rng(seed.wrapping_mul(0x1000_0000_01b3) ^ epoch.wrapping_mul(0x9e37_79b9));
    let n = r.below(6);
    (0..n)
        .map(|_| {
            let disk = r.below(2) as u16;
            let size = DISK_SIZES[usize::from(disk)];
            let len = 1 + r.below(8192);
            let off = r.below(size - len + 1);
            let data = (0..len).map(|_| r.next() as u8).collect();
            (disk, off, data)
        })
        .collect()
}

fn open_disks(dir: &Path) -> Vec<File> {
    (0..DISK_SIZES.len())
        .map(|i| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.join(format!("disk{i}.img")))
                .unwrap()
        })
        .collect()
}

/// Child mode: does nothing unless the parent selected it.
#[test]
fn apply_crash_child() {
    let Ok(dir) = std::env::var("TWINRUN_AJ_CHILD_DIR") else {
        return;
    };
    let dir = PathBuf::from(dir);
    let seed: u64 = std::env::var("TWINRUN_AJ_SEED").unwrap().parse().unwrap();
    let crash = std::env::var("TWINRUN_AJ_CRASH").unwrap();
    let disks = open_disks(&dir);
    let (mut j, rep) =
        apply_journal::open_with_limits(&dir.join("journal"), &disks, LIMITS).unwrap();
    let start = rep.applied_through.unwrap_or(0);
    println!("start {start}");
    let parts: Vec<&str> = crash.split(':').collect();
    let point = match parts[..] {
        ["append", n] => Some(CrashPoint::AfterAppend(n.parse().unwrap())),
        ["mid", n, k] => Some(CrashPoint::MidApply {
            epoch: n.parse().unwrap(),
            writes_done: k.parse().unwrap(),
        }),
        ["marker"] => Some(CrashPoint::AfterMarker),
        _ => None,
    };
    j.set_crash_point(point);
    for e in start + 1..=start + EPOCHS_PER_ROUND {
        let w = epoch_writes(seed, e);
        let refs: Vec<(u16, u64, &[u8])> = w.iter().map(|(d, o, b)| (*d, *o, &b[..])).collect();
        j.commit(e, &refs).unwrap();
        println!("committed {e}");
    }
}

static N: AtomicU32 = AtomicU32::new(0);

struct TmpDir(PathBuf);
impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Model {
    seed: u64,
    epoch: u64,
    disks: Vec<Vec<u8>>,
}
impl Model {
    fn advance_to(&mut self, e: u64) {
        assert!(
            e >= self.epoch,
            "applied epoch went back: {} -> {e}",
            self.epoch
        );
        while self.epoch < e {
            self.epoch += 1;
            for (d, off, data) in epoch_writes(self.seed, self.epoch) {
                let o = off as usize;
                self.disks[usize::from(d)][o..o + data.len()].copy_from_slice(&data);
            }
        }
    }
}

/// The number after `key` in a child's output line (the harness may prefix the line).
fn field(line: &str, key: &str) -> Option<u64> {
    let at = line.find(key)? + key.len();
    line[at..].split_whitespace().next()?.parse().ok()
}

enum Kill {
    /// SIGKILL from the parent shortly after "committed <n>" was seen.
    After { epoch: u64, delay_us: u64 },
    /// The child kills itself at a hook.
    Hook(String),
}

#[test]
fn killed_standby_recovers_at_an_epoch_boundary_with_nothing_acknowledged_lost() {
    let mut kills_at_hooks = 0;
    for seed in 1..=6u64 {
        let tmp = TmpDir(std::env::temp_dir().join(format!(
            "twinrun-apply-crash-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )));
        std::fs::create_dir_all(&tmp.0).unwrap();
        for (i, &size) in DISK_SIZES.iter().enumerate() {
            let f = File::create(tmp.0.join(format!("disk{i}.img"))).unwrap();
            f.set_len(size).unwrap();
        }
        let mut model = Model {
            seed,
            epoch: 0,
            disks: DISK_SIZES.iter().map(|&s| vec![0u8; s as usize]).collect(),
        };
        let mut r = Rng(seed * 7919);
        let mut applied = 0u64;
        for round in 0..6 {
            let kill = match (seed + round) % 4 {
                0 => Kill::Hook(format!("append:{}", applied + 1 + r.below(20))),
                1 => {
                    // Pick an epoch with at least one write and crash after some of them.
                    let mut e = applied + 1 + r.below(20);
                    while epoch_writes(seed, e).is_empty() {
                        e += 1;
                    }
                    let k = r.below(epoch_writes(seed, e).len() as u64);
                    Kill::Hook(format!("mid:{e}:{k}"))
                }
                2 => Kill::Hook("marker".into()),
                _ => Kill::After {
                    epoch: applied + 1 + r.below(EPOCHS_PER_ROUND - 5),
                    delay_us: r.below(3000),
                },
            };
            let hook = match &kill {
                Kill::Hook(h) => h.clone(),
                Kill::After { .. } => "none".into(),
            };
            let stderr = File::create(tmp.0.join("child.stderr")).unwrap();
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "apply_crash_child",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env("TWINRUN_AJ_CHILD_DIR", &tmp.0)
                .env("TWINRUN_AJ_SEED", seed.to_string())
                .env("TWINRUN_AJ_CRASH", &hook)
                .stdout(Stdio::piped())
                .stderr(stderr)
                .spawn()
                .unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let mut last_acked: Option<u64> = None;
            let mut start: Option<u64> = None;
            let mut killed = false;
            for line in lines.by_ref() {
                let line = line.unwrap();
                if let Some(n) = field(&line, "committed ") {
                    last_acked = Some(n);
                } else if let Some(n) = field(&line, "start ") {
                    start = Some(n);
                }
                if let Kill::After { epoch, delay_us } = kill {
                    if !killed && last_acked.is_some_and(|a| a >= epoch) {
                        std::thread::sleep(Duration::from_micros(delay_us));
                        child.kill().unwrap();
                        killed = true;
                    }
                }
            }
            let status = child.wait().unwrap();
            let err = std::fs::read_to_string(tmp.0.join("child.stderr")).unwrap();
            assert_eq!(
                start,
                Some(applied),
                "seed {seed} round {round}: child start; stderr:\n{err}"
            );
            match &kill {
                Kill::Hook(_) => {
                    assert_eq!(
                        status.signal(),
                        Some(9),
                        "hook {hook} not reached: {status:?}\n{err}"
                    );
                    kills_at_hooks += 1;
                }
                Kill::After { .. } => assert!(
                    status.signal() == Some(9) || status.success(),
                    "{status:?}\n{err}"
                ),
            }

            let disks = open_disks(&tmp.0);
            let (j, rep) =
                apply_journal::open_with_limits(&tmp.0.join("journal"), &disks, LIMITS).unwrap();
            let e = rep.applied_through.unwrap_or(0);
            assert_eq!(j.last_committed(), rep.applied_through);
            let acked = last_acked.unwrap_or(applied);
            assert!(
                e >= acked && e <= applied + EPOCHS_PER_ROUND,
                "seed {seed} round {round} ({hook}): recovered at {e}, acknowledged {acked}"
            );
            match kill {
                // The record was durable before the kill: recovery must replay it.
                Kill::Hook(h) if h.starts_with("append:") || h.starts_with("mid:") => {
                    let n: u64 = h.split(':').nth(1).unwrap().parse().unwrap();
                    assert_eq!(e, n, "{h}");
                    assert!(rep.replayed_epochs.contains(&n), "{h}: {rep:?}");
                }
                _ => {}
            }
            if !rep.replayed_epochs.is_empty() {
                let r = &rep.replayed_epochs;
                assert!(
                    r.windows(2).all(|w| w[1] == w[0] + 1),
                    "gap in replay {r:?}"
                );
                assert!(
                    r[0] > applied && r.last() == Some(&e),
                    "replay {r:?} to {e}"
                );
            }
            model.advance_to(e);
            for (i, d) in disks.iter().enumerate() {
                let mut img = vec![0u8; DISK_SIZES[i] as usize];
                d.read_exact_at(&mut img, 0).unwrap();
                let same = img == model.disks[i];
                assert!(same, "seed {seed} round {round} ({hook}): disk {i} differs from the model at epoch {e}");
            }
            drop(j);
            applied = e;
        }
        assert!(
            applied > 20,
            "seed {seed}: only {applied} epochs in 6 rounds"
        );
    }
    assert!(kills_at_hooks >= 12);
}
