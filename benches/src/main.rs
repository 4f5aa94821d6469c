//! twinrun benchmark suite (issue 2): prints figures, never asserts times.
//!
//! `cargo run --release -p twinrun-bench -- [--json out.json] [--quick] [--only LIST] [--peers]`
//! (LIST: comma-separated section names, see `SECTIONS`; all but the two sweeps and
//! `migrate` by default; `--peers` installs Debian's QEMU for `migrate` when missing). Needs root (KVM, network namespaces) and `redis-benchmark` for the kv
//! figures. See benches/README.md.

mod blk;
mod boot;
mod datapath;
mod env;
mod exits;
mod ft;
mod ftnet;
mod ftswap;
mod ftwitness;
mod ha;
mod migrate;
mod mirror;
mod pause;
mod peers;
mod plots;
mod redis;
mod report;
mod series;
mod unprotcost;
mod witnesscost;

use std::path::PathBuf;
use std::time::Instant;

use report::Figure;

struct Opts {
    json: Option<PathBuf>,
    quick: bool,
    only: Vec<String>,
    dir: PathBuf,
    kvm_probe: Option<PathBuf>,
    /// `--report DIR`: JSON and plots written there.
    report: Option<PathBuf>,
    /// `--peers`: install Debian's QEMU when it is missing (the `migrate` section's peer).
    peers: bool,
}

/// The project's raw KVM probe, used as the exit baseline when present.
const KVM_PROBE: &str = "/work/shared/probes/kvm-probe.c";

const SECTIONS: [&str; 19] = [
    "boot",
    "exits",
    "blk",
    "kv",
    "pause",
    "ft",
    "ft-net",
    "ft-witness",
    "ft-witness-cost",
    "unprotected-cost",
    "ft-swap",
    "mirror",
    "ha",
    "datapath",
    "overhead",
    "ft-epoch",
    "ft-min-epoch",
    "migrate",
    "ft-epoch-copy",
];

/// Sections run only when `--only` names them: the epoch-length and minimum-epoch
/// sweeps (minutes) are for choosing defaults, not for every run; `migrate` takes
/// minutes too (36 migrations, QEMU's among them); `ft-epoch-copy` compares two ways of
/// copying epoch pages (an experiment, issue 17 item 2).
const OPT_IN: [&str; 4] = ["ft-epoch", "ft-min-epoch", "migrate", "ft-epoch-copy"];

fn usage() -> ! {
    eprintln!(
        "usage: twinrun-bench [--json FILE] [--quick] [--only boot,exits,blk,kv,pause,ft,ft-net,ft-witness,ft-witness-cost,unprotected-cost,ft-swap,mirror,ha,datapath,overhead,ft-epoch,ft-min-epoch,migrate,ft-epoch-copy] [--dir DIR]
                     [--kvm-probe FILE.c | --no-kvm-probe] [--report DIR] [--peers]
  --only: default all but ft-epoch, ft-min-epoch, migrate and ft-epoch-copy (opt-in)
  --peers: install Debian's QEMU (scripts/install-qemu.sh) when it is missing: the
         migrate section migrates a QEMU guest side by side
  --report DIR: DIR/report.json (figures, context), DIR/series.json (the plots' data) and one SVG + PNG per plot;
         without --only it runs every section, the sweeps included
  --dir: where scratch files go (default: the temp dir); the disk figures compare
         guest and host on that filesystem
  --kvm-probe: C source of the raw KVM probe used as the exit baseline in full runs
         (default {KVM_PROBE} when it exists)"
    );
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let mut o = Opts {
        json: None,
        quick: false,
        only: SECTIONS
            .iter()
            .filter(|s| !OPT_IN.contains(s))
            .map(|s| s.to_string())
            .collect(),
        dir: std::env::temp_dir(),
        kvm_probe: Some(PathBuf::from(KVM_PROBE)).filter(|p| p.is_file()),
        report: None,
        peers: false,
    };
    let mut only_given = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => o.json = Some(args.next().unwrap_or_else(|| usage()).into()),
            "--quick" => o.quick = true,
            "--dir" => o.dir = args.next().unwrap_or_else(|| usage()).into(),
            "--kvm-probe" => o.kvm_probe = Some(args.next().unwrap_or_else(|| usage()).into()),
            "--no-kvm-probe" => o.kvm_probe = None,
            "--report" => o.report = Some(args.next().unwrap_or_else(|| usage()).into()),
            "--peers" => o.peers = true,
            "--only" => {
                let list = args.next().unwrap_or_else(|| usage());
                o.only = list.split(',').map(str::to_string).collect();
                only_given = true;
                if o.only.iter().any(|s| !SECTIONS.contains(&s.as_str())) {
                    usage();
                }
            }
            "-h" | "--help" => usage(),
            _ => usage(),
        }
    }
    if o.report.is_some() && !only_given {
        o.only = SECTIONS.iter().map(|s| s.to_string()).collect();
    }
    if let Some(r) = &o.report {
        if o.json.is_none() {
            o.json = Some(r.join("report.json"));
        }
    }
    o
}

fn main() {
    let o = parse_args();
    let started = Instant::now();
    let mut figs: Vec<Figure> = Vec::new();
    let mut errors: Vec<(String, String)> = Vec::new();
    let mut context = vec![
        (
            "mode".to_string(),
            if o.quick { "quick" } else { "full" }.to_string(),
        ),
        ("scratch_dir".into(), o.dir.display().to_string()),
    ];
    if let Ok(k) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        context.push(("kernel".into(), k.trim().into()));
    }
    if std::fs::read_to_string("/proc/modules").is_ok_and(|m| m.contains("kvm_pvm")) {
        context.push(("kvm".into(), "kvm_pvm (software, shadow paging)".into()));
    }

    eprintln!("building the test guest ...");
    let elf = match env::guest_elf() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    // `twinrun` (release) is built when the first section that runs it asks, once:
    // the in-process sections (exits, pause, datapath, ft) never do.
    let twinrun_built: std::cell::OnceCell<Result<PathBuf, String>> = std::cell::OnceCell::new();
    let twinrun = || -> Result<PathBuf, String> {
        twinrun_built
            .get_or_init(|| {
                eprintln!("   building twinrun (release) ...");
                env::twinrun_bin()
            })
            .clone()
    };
    let scratch = match env::ScratchDir::new(&o.dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    let dir = scratch.0.clone();
    let want = |s: &str| o.only.iter().any(|x| x == s);

    let mut section = |name: &str, f: &mut dyn FnMut() -> Result<Vec<Figure>, String>| {
        if !want(name) {
            return;
        }
        let t = Instant::now();
        eprintln!("== {name} ...");
        match f() {
            Ok(v) => figs.extend(v),
            Err(e) => {
                eprintln!("   {name} FAILED: {e}");
                errors.push((name.to_string(), e));
            }
        }
        eprintln!("   {name} took {:.1} s", t.elapsed().as_secs_f64());
    };

    let q = o.quick;
    section("boot", &mut || {
        boot::run(&twinrun()?, &elf, &dir, if q { 5 } else { 10 })
    });
    section("exits", &mut || {
        // The raw KVM baseline takes ~15-20 s: full runs only.
        let raw = match (&o.kvm_probe, q) {
            (Some(src), false) if env::have("gcc") => match exits::raw_kvm_probe(src, &dir) {
                Ok(us) => Some(us),
                Err(e) => {
                    eprintln!("   raw KVM baseline skipped: {e}");
                    None
                }
            },
            _ => None,
        };
        exits::run(if q { 5_000 } else { 20_000 }, if q { 3 } else { 5 }, raw)
    });
    section("blk", &mut || {
        let bytes = if q { 64 << 20 } else { 256 << 20 };
        let mut v = Vec::new();
        for req in [256 << 10, 1 << 20] {
            let shape = blk::Shape {
                bytes,
                req,
                depth: 4,
            };
            v.extend(blk::run(
                &twinrun()?,
                &elf,
                &dir,
                shape,
                if q { 1 } else { 3 },
            )?);
        }
        Ok(v)
    });
    section("kv", &mut || {
        if !env::have("redis-benchmark") || !env::have("redis-cli") {
            return Err("redis-benchmark/redis-cli not installed (Debian: redis-tools)".into());
        }
        let kv_host = env::kv_host_bin()?;
        redis::run(&twinrun()?, &elf, &kv_host, &dir, 20_000)
    });
    section("pause", &mut || {
        // 4 GiB spreads the dirty pages over high RAM too; memory is mapped lazily,
        // so only the pages the guest touches are allocated.
        if q {
            pause::run(&[256, 1024], 8, 2)
        } else {
            pause::run(&[256, 1024, 4096, 16384], 20, 2)
        }
    });
    section("datapath", &mut || datapath::run(q));
    section("overhead", &mut || ft::overhead(&twinrun()?, &dir, q));
    section("ft", &mut || ft::run(&elf, &dir, q));
    section("ft-net", &mut || {
        if !env::have("redis-benchmark") || !env::have("redis-cli") {
            return Err("redis-benchmark/redis-cli not installed (Debian: redis-tools)".into());
        }
        let sizes = ftnet::Sizes {
            bench_n: if q { 2_000 } else { 5_000 },
            latency_samples: if q { 200 } else { 1_000 },
            tcp_secs: if q { 0.5 } else { 2.0 },
        };
        ftnet::run(&twinrun()?, &elf, &dir, &sizes)
    });
    section("ft-witness", &mut || {
        ftwitness::run(&twinrun()?, &elf, &dir, q)
    });
    section("ft-witness-cost", &mut || {
        if !env::have("redis-benchmark") {
            return Err("redis-benchmark not installed (Debian: redis-tools)".into());
        }
        witnesscost::run(&twinrun()?, &elf, &dir, q)
    });
    section("unprotected-cost", &mut || {
        if !env::have("redis-benchmark") {
            return Err("redis-benchmark not installed (Debian: redis-tools)".into());
        }
        unprotcost::run(&twinrun()?, &elf, &dir, q)
    });
    section("ft-swap", &mut || ftswap::run(&twinrun()?, &elf, &dir, q));
    section("mirror", &mut || mirror::run(&twinrun()?, &elf, &dir, q));
    section("ha", &mut || ha::run(&twinrun()?, &elf, &dir, q));
    section("ft-epoch-copy", &mut || ft::epoch_copy(&elf, &dir, q));
    section("ft-epoch", &mut || {
        if !env::have("redis-benchmark") || !env::have("redis-cli") {
            return Err("redis-benchmark/redis-cli not installed (Debian: redis-tools)".into());
        }
        ft::sweep(&twinrun()?, &elf, &dir, &ft::SweepSizes::new(q))
    });
    section("ft-min-epoch", &mut || {
        if !env::have("redis-benchmark") || !env::have("redis-cli") {
            return Err("redis-benchmark/redis-cli not installed (Debian: redis-tools)".into());
        }
        ft::min_epoch_sweep(&twinrun()?, &elf, &dir, &ft::SweepSizes::new(q))
    });
    section("migrate", &mut || {
        migrate::run(&twinrun()?, &dir, q, o.peers)
    });
    drop(scratch);

    context.push((
        "wall_seconds".into(),
        format!("{:.1}", started.elapsed().as_secs_f64()),
    ));
    for (name, e) in &errors {
        context.push((format!("error.{name}"), e.clone()));
    }
    println!();
    print!("{}", report::table(&figs));
    for (name, e) in &errors {
        println!("{name}: NOT MEASURED: {}", e.lines().next().unwrap_or(""));
    }
    println!("total wall time {:.1} s", started.elapsed().as_secs_f64());
    if let Some(r) = &o.report {
        match write_report(r, &figs) {
            Ok(n) => {
                eprintln!("wrote {n} plot files to {}", r.display());
                context.push(("plots".into(), format!("{n} files in {}", r.display())));
            }
            Err(e) => {
                eprintln!("error: report: {e}");
                errors.push(("report".into(), e));
            }
        }
    }
    if let Some(p) = &o.json {
        let text = report::json(&figs, o.quick, &context);
        if let Err(e) = std::fs::write(p, text) {
            eprintln!("error: writing {}: {e}", p.display());
            std::process::exit(1);
        }
        eprintln!("wrote {}", p.display());
    }
    if !errors.is_empty() {
        std::process::exit(1);
    }
}

/// The plots of `--report`: the series the sections recorded, and for the sections that
/// record none, each figure that has a baseline as a pair of bars (value, baseline).
fn write_report(dir: &std::path::Path, figs: &[Figure]) -> Result<usize, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !plots::register_font() {
        // Debian's DejaVu fonts: plotters measures and draws text with them.
        let _ = std::process::Command::new("apt-get")
            .args(["install", "-y", "-q", "fonts-dejavu-core"])
            .status();
        if !plots::register_font() {
            return Err("no font for the plots (install fonts-dejavu-core)".into());
        }
    }
    let mut series = series::all();
    let recorded: std::collections::BTreeSet<&str> = ["pause", "ft", "datapath", "overhead"].into();
    for f in figs {
        if recorded.contains(f.group.as_str()) {
            continue;
        }
        if let Some((label, value)) = &f.baseline {
            series.push(series::Series {
                plot: format!("figures-{}", f.group),
                title: format!("{}: value against its same-run baseline", f.group),
                data: series::Data::Bars(vec![
                    (format!("{} ({})", f.name, f.unit), f.value),
                    (format!("  baseline: {label}"), *value),
                ]),
            });
        }
    }
    let machine = format!(
        "{} CPUs {}; kernel {}; {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(
                |c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                    .split(':')
                    .nth(1)
                    .unwrap_or("")
                    .trim()
                    .to_string())
            )
            .unwrap_or_default(),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim(),
        if std::fs::read_to_string("/proc/modules").is_ok_and(|m| m.contains("kvm_pvm")) {
            "software KVM (kvm_pvm)"
        } else {
            "KVM"
        }
    );
    let files = plots::render(dir, &series, &format!("twinrun-bench, {machine}"))?;
    // The data behind the plots.
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let rows: Vec<String> = series
        .iter()
        .map(|s| {
            let data = match &s.data {
                series::Data::Line { label, points } => format!(
                    "\"line\":\"{}\",\"points\":[{}]",
                    esc(label),
                    points
                        .iter()
                        .map(|(x, y)| format!("[{x},{y}]"))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                series::Data::Bars(b) => format!(
                    "\"bars\":[{}]",
                    b.iter()
                        .map(|(l, v)| format!("[\"{}\",{v}]", esc(l)))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            };
            format!(
                "{{\"plot\":\"{}\",\"title\":\"{}\",{data}}}",
                esc(&s.plot),
                esc(&s.title)
            )
        })
        .collect();
    let path = dir.join("series.json");
    std::fs::write(
        &path,
        format!(
            "{{\"machine\":\"{}\",\"series\":[{}]}}\n",
            esc(&machine),
            rows.join(",")
        ),
    )
    .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(files.len())
}
