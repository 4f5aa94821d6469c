//! `twinrun disk status` and `twinrun disk verify`:
//!
//! - offline status of real images whose replica metadata and dirty bitmaps are made
//!   with the storage-mirror API: in sync, degraded with bits set, an interrupted resync
//!   target (inconsistent, with progress and a verify report), failed, no metadata,
//!   damaged metadata, replaced image; text and `--json`;
//! - bad input exits with code 2 and names the problem;
//! - live: a plain VM refuses the disk ops (exit 2); a protected FT primary says
//!   protected, in text and JSON, and accepts a verify request; `twinrun vm status`
//!   of both ends (the primary protected, the standby mirroring).
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::pair::{listening, protected, PairFiles, Pm};
use common::{disk_image, require_kvm, topology, twinrun_bin, VmRun};
use storage_mirror::bitmap::DirtyBitmap;
use storage_mirror::meta::{MetaStore, ReplicaMeta, ResyncProgress, VerifyReport};

/// One run directory for this test process (control sockets of the VMs it starts).
fn env_dirs() -> &'static Path {
    common::private_dirs()
}

fn disk(args: &[&str]) -> Output {
    env_dirs();
    Command::new(twinrun_bin())
        .arg("disk")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

fn expect_usage_error(out: &Output, needles: &[&str]) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr:\n{err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}:\n{err}");
    }
}

/// The paragraph of disk `i` in the text output.
fn paragraph(out: &str, i: usize) -> &str {
    let head = format!("disk {i}: ");
    let start = out
        .find(&head)
        .unwrap_or_else(|| panic!("no {head:?} in:\n{out}"));
    let rest = &out[start..];
    match rest[1..].find("\ndisk ") {
        Some(end) => &rest[..end + 1],
        None => rest,
    }
}

const DISK_MIB: u64 = 1;
/// Blocks of a 1 MiB disk in 4 KiB blocks.
const BLOCKS: u64 = 256;

/// Saves `edit(fresh metadata)` beside `img` and opens its bitmap (created clear).
fn with_meta(img: &Path, edit: impl FnOnce(&mut ReplicaMeta)) -> (ReplicaMeta, DirtyBitmap) {
    let store = MetaStore::for_image(img);
    let mut m = store.create_fresh().unwrap();
    edit(&mut m);
    store.save(&m).unwrap();
    let b = DirtyBitmap::open(&store.bitmap_path(), m.disk_size, m.block_size).unwrap();
    (m, b)
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn offline_status_of_each_state() {
    let dir = tempfile::tempdir().unwrap();
    let img = |n: &str| disk_image(dir.path(), n, DISK_MIB);
    let images: Vec<PathBuf> = ["sync", "degr", "tgt", "fail", "none", "dmg", "repl"]
        .iter()
        .map(|n| img(&format!("{n}.img")))
        .collect();

    // 0: in sync (clean, nothing recorded).
    let (in_sync, _) = with_meta(&images[0], |_| {});
    // 1: degraded: ran alone (a new generation, bitmap base = the shared one) and wrote
    // bytes 0..4096 and 8192..18192: blocks 0, 2, 3, 4.
    let (degraded, mut b) = with_meta(&images[1], |m| {
        m.new_generation().unwrap();
        m.unclean_primary = true;
    });
    assert_eq!(b.mark_bytes(&[(0, 4096), (8192, 10_000)]).unwrap(), 4);
    drop(b);
    // 2: an interrupted full resync target, a quarter copied; last verify found ranges.
    let (target, _) = with_meta(&images[2], |m| {
        m.inconsistent = true;
        m.sync_source_gen = 0x0123_4567_89ab_cdef;
        m.resync = Some(ResyncProgress {
            full: true,
            total_blocks: BLOCKS,
            done_blocks: 64,
        });
        m.verify = Some(VerifyReport {
            // 2024-02-29 12:34:56 UTC
            finished_unix_ms: 1_709_210_096_000,
            ranges_compared: 16,
            ranges_differing: 2,
            blocks_marked: 5,
        });
        m.last_committed_epoch = Some(42);
    });
    // 3: failed.
    with_meta(&images[3], |m| m.failed = true);
    // 4: no metadata at all. 5: a metadata file that is not one.
    let dmg = MetaStore::for_image(&images[5]);
    std::fs::create_dir_all(dmg.dir()).unwrap();
    std::fs::write(dmg.meta_path(), b"this is not replica metadata").unwrap();
    // 6: metadata of an image since deleted and recreated. The new file often gets the
    // old one's inode number (ext4 reuses it at once): the metadata must see through
    // that (storage-mirror's meta tests force the reuse).
    with_meta(&images[6], |_| {});
    std::fs::remove_file(&images[6]).unwrap();
    img("repl.img");

    let mut args = vec!["status".to_string(), "--image".to_string()];
    args.extend(images.iter().map(|p| path_str(p)));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = disk(&argv);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}{}", text(&o.stderr));
    assert!(out.starts_with("disks: offline"), "{out}");

    let p = paragraph(&out, 0);
    assert!(p.contains(&path_str(&images[0])), "{p}");
    assert!(p.contains("state: in sync\n"), "{p}");
    assert!(
        p.contains(&format!(
            "generation: {:016x}, bitmap base: none",
            in_sync.current_gen
        )),
        "{p}"
    );
    assert!(p.contains("dirty: 0 of 256 blocks of 4096 B"), "{p}");
    assert!(p.contains("resync: none"), "{p}");
    assert!(p.contains("last verify: never"), "{p}");
    assert!(p.contains("unclean: no"), "{p}");

    let p = paragraph(&out, 1);
    assert!(p.contains("state: degraded (4 blocks to copy)"), "{p}");
    assert!(
        p.contains(&format!(
            "generation: {:016x}, bitmap base: {:016x}",
            degraded.current_gen, degraded.bitmap_base_gen
        )),
        "{p}"
    );
    assert!(
        p.contains(&format!("history: {:016x}", degraded.history[0])),
        "{p}"
    );
    assert!(
        p.contains("dirty: 4 of 256 blocks of 4096 B (16.0 KiB of 1.0 MiB)"),
        "{p}"
    );
    assert!(p.contains("unclean: yes"), "{p}");

    let p = paragraph(&out, 2);
    assert!(
        p.contains("state: resync target, INCONSISTENT (not promotable)"),
        "{p}"
    );
    assert!(p.contains("resync source: 0123456789abcdef"), "{p}");
    assert!(p.contains("resync: 64/256 blocks (25.0%), full\n"), "{p}");
    assert!(
        p.contains(
            "last verify: 2024-02-29 12:34:56 UTC: 16 ranges compared, 2 differing, \
             5 blocks marked"
        ),
        "{p}"
    );
    assert!(p.contains("last committed epoch: 42"), "{p}");

    assert!(paragraph(&out, 3).contains("state: FAILED"), "{out}");
    assert!(paragraph(&out, 4).contains("state: no metadata"), "{out}");
    assert!(
        paragraph(&out, 5).contains("state: metadata damaged: "),
        "{out}"
    );
    assert!(paragraph(&out, 6).contains("state: replaced: "), "{out}");

    // The same through --json: one array, one object per image, in order.
    argv_json_matches(&argv, &images, &in_sync, &degraded, &target);

    // Reading changed nothing: no bitmap appeared where there was none.
    assert!(!MetaStore::for_image(&images[4]).dir().exists());
    assert!(!dmg.bitmap_path().exists());
}

fn argv_json_matches(
    argv: &[&str],
    images: &[PathBuf],
    in_sync: &ReplicaMeta,
    degraded: &ReplicaMeta,
    target: &ReplicaMeta,
) {
    let mut args = argv.to_vec();
    args.push("--json");
    let o = disk(&args);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}{}", text(&o.stderr));
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: not JSON:\n{out}"));
    let a = v.as_array().expect("a JSON array");
    assert_eq!(a.len(), images.len(), "{out}");
    let kinds: Vec<&str> = a.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "in-sync",
            "degraded",
            "inconsistent",
            "failed",
            "no-metadata",
            "damaged",
            "replaced"
        ]
    );
    for (d, p) in a.iter().zip(images) {
        assert_eq!(d["path"], path_str(p).as_str());
        assert_eq!(d["source"], "offline");
    }
    assert_eq!(
        a[0]["current_gen"],
        format!("{:016x}", in_sync.current_gen).as_str()
    );
    assert_eq!(a[0]["dirty_blocks"], 0);
    assert_eq!(a[0]["bitmap_base_gen"], serde_json::Value::Null);
    assert_eq!(a[1]["dirty_blocks"], 4);
    assert_eq!(a[1]["dirty_bytes"], 16384);
    assert_eq!(a[1]["blocks"], BLOCKS);
    assert_eq!(a[1]["unclean_primary"], true);
    assert_eq!(
        a[1]["bitmap_base_gen"],
        format!("{:016x}", degraded.bitmap_base_gen).as_str()
    );
    assert_eq!(a[2]["inconsistent"], true);
    assert_eq!(a[2]["resync"]["done_blocks"], 64);
    assert_eq!(a[2]["resync"]["total_blocks"], BLOCKS);
    assert_eq!(a[2]["resync"]["full"], true);
    assert_eq!(a[2]["verify"]["ranges_differing"], 2);
    assert_eq!(a[2]["verify"]["blocks_marked"], 5);
    assert_eq!(
        a[2]["current_gen"],
        format!("{:016x}", target.current_gen).as_str()
    );
    assert_eq!(a[3]["failed"], true);
    assert_eq!(a[4]["current_gen"], serde_json::Value::Null);
    assert!(a[5]["state"].as_str().unwrap().contains("damaged"));
}

#[test]
fn bad_input_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let img = disk_image(dir.path(), "x.img", DISK_MIB);
    let missing = dir.path().join("missing.img");
    let o = disk(&["status", "--image", &path_str(&img), &path_str(&missing)]);
    expect_usage_error(&o, &["no such image", &path_str(&missing)]);
    assert!(o.stdout.is_empty(), "printed before the check");
    let o = disk(&["status", "--image", &path_str(dir.path())]);
    expect_usage_error(&o, &["is a directory"]);
    let o = disk(&["status", "--name", "x", "--image", &path_str(&img)]);
    expect_usage_error(&o, &["--name", "--image"]);
    let o = disk(&["status"]);
    expect_usage_error(&o, &["--name", "--image"]);
    let ghost = format!("ghost{}", std::process::id());
    let o = disk(&["status", "--name", &ghost]);
    expect_usage_error(&o, &["no running VM named", &ghost]);
    let o = disk(&["status", "--name", "a/b"]);
    expect_usage_error(&o, &["bad VM name"]);
    let o = disk(&["verify", "--name", &ghost]);
    expect_usage_error(&o, &["no running VM named", &ghost]);
    let o = disk(&["verify"]);
    expect_usage_error(&o, &["--name"]);
    let o = disk(&["verify", "--name", "x", "--timeout-secs", "5"]);
    expect_usage_error(&o, &["--wait"]);
}

#[test]
fn a_plain_vm_does_not_mirror() {
    require_kvm();
    env_dirs();
    let dir = tempfile::tempdir().unwrap();
    let name = format!("dplain{}", std::process::id());
    let img = disk_image(dir.path(), "disk.img", 4);
    let mut vm = VmRun::new(dir.path(), "vm")
        .args(["--name", &name, "--mem-mib", "64"])
        .args(["--workload", "counter", "--counter-rate", "50"])
        .args(["--disk", &path_str(&img)])
        .spawn();
    vm.wait_control(&env_dirs().join("run").join(format!("{name}.sock")));
    let o = disk(&["status", "--name", &name]);
    expect_usage_error(&o, &["does not mirror its disks", "--role"]);
    let o = disk(&["verify", "--name", &name]);
    expect_usage_error(&o, &["does not mirror its disks"]);
}

#[test]
fn live_status_of_a_protected_primary() {
    require_kvm();
    env_dirs();
    let dir = tempfile::tempdir().unwrap();
    let topo = topology(twinrun_lab::Topology::builder());
    let files = PairFiles::new(dir.path());
    let wl = [
        "--mem-mib",
        "64",
        "--workload",
        "counter",
        "--counter-rate",
        "50",
    ];
    let name = format!("dlive{}", std::process::id());
    let mut standby = Pm::spawn_with(&topo, &files, 1, &wl, &["--epoch-ms", "10"]);
    standby
        .wait_status("listening", Duration::from_secs(30), listening)
        .unwrap();
    let mut primary = Pm::spawn_with(
        &topo,
        &files,
        0,
        &wl,
        &["--epoch-ms", "10", "--name", &name],
    );
    primary
        .wait_status("protected", Duration::from_secs(60), protected)
        .unwrap_or_else(|e| panic!("{e}\n--- standby:\n{}", standby.stderr()));
    // The first session copies the whole disk before protection: in sync now.
    let o = disk(&["status", "--name", &name]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}{}", text(&o.stderr));
    assert!(out.contains("(live, from the running primary)"), "{out}");
    let p = paragraph(&out, 0);
    assert!(p.contains(&path_str(&files.disks[0])), "{p}");
    assert!(
        p.contains("state: protected (in sync with the standby)"),
        "{p}"
    );
    let o = disk(&["status", "--name", &name, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let a = v.as_array().unwrap();
    assert_eq!(a.len(), 1, "{v}");
    assert_eq!(a[0]["kind"], "protected");
    assert_eq!(a[0]["source"], "live");
    assert_eq!(a[0]["failed"], false);
    // A verify request is accepted while protected.
    let o = disk(&["verify", "--name", &name]);
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    assert!(text(&o.stdout).contains("started"), "{}", text(&o.stdout));
    // `twinrun vm status` of both ends: the primary protected, the standby mirroring.
    let status = |name: &str, json: bool| {
        let mut c = Command::new(twinrun_bin());
        c.args(["vm", "status", "--name", name]);
        if json {
            c.arg("--json");
        }
        let o = c.output().unwrap();
        assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
        text(&o.stdout)
    };
    let p = status(&name, false);
    assert!(p.contains("role: primary, PROTECTED"), "{p}");
    assert!(
        p.contains("a-link 0: up") && p.contains("a-link 1: up"),
        "{p}"
    );
    assert!(p.contains("protected (in sync with the standby)"), "{p}");
    let v: serde_json::Value = serde_json::from_str(&status(&name, true)).unwrap();
    assert_eq!(v["ft"]["role"], "Primary", "{v}");
    assert_eq!(v["ft"]["state"], "Protected", "{v}");
    assert!(v["ft"]["epochs_committed"].as_u64().unwrap() >= 1, "{v}");
    let s = status(&standby.name, false);
    assert!(s.contains("role: standby, mirroring the primary"), "{s}");
    assert!(
        s.contains("(offline)"),
        "the standby's replica from its metadata: {s}"
    );
    let o = Command::new(twinrun_bin())
        .args([
            "vm",
            "status",
            "--name",
            &format!("ghost{}", std::process::id()),
        ])
        .output()
        .unwrap();
    expect_usage_error(&o, &["no running VM named"]);
    assert!(primary.alive() && standby.alive());
}
