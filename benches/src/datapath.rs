//! Section `datapath`: the A-Link's page data paths against raw TCP over the same ends,
//! with the same number of streams, in the same run, on loopback and across two network
//! namespaces (veth): `alink/examples/throughput` (see `alink/README.md`), built here and
//! run as a process; its JSON becomes figures and the report's throughput plots.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::report::{Better, Figure};

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// The throughput example, release build, in this binary's cargo target dir.
fn example_bin() -> Result<PathBuf, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let out = cargo()
        .args([
            "build",
            "--release",
            "-p",
            "alink",
            "--example",
            "throughput",
        ])
        .current_dir(&root)
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building alink's throughput example failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let p = exe
        .parent()
        .ok_or("current_exe has no directory")?
        .join("examples")
        .join("throughput");
    p.is_file()
        .then_some(p.clone())
        .ok_or_else(|| format!("built example not found at {}", p.display()))
}

/// One figure of the example's JSON line.
struct Run {
    net: String,
    what: String,
    streams: u32,
    gbps: f64,
}

/// Pulls `"key":value` out of one flat JSON object (the example's own output).
fn field<'a>(obj: &'a str, key: &str) -> Option<&'a str> {
    let at = obj.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &obj[at..];
    let rest = rest.strip_prefix('"').map_or(rest, |r| r);
    let end = rest.find(['"', ',', '}'])?;
    Some(&rest[..end])
}

fn parse(json: &str) -> Vec<Run> {
    let Some(runs) = json.split("\"runs\":[").nth(1) else {
        return Vec::new();
    };
    runs.split("},{")
        .filter_map(|o| {
            Some(Run {
                net: field(o, "net")?.to_string(),
                what: field(o, "what")?.to_string(),
                streams: field(o, "streams")?.parse().ok()?,
                gbps: field(o, "gbps")?.parse().ok()?,
            })
        })
        .collect()
}

pub fn run(quick: bool) -> Result<Vec<Figure>, String> {
    let bin = example_bin()?;
    let mut c = Command::new(&bin);
    c.args(["--where", "both", "--secs", if quick { "1" } else { "2" }]);
    if quick {
        c.arg("--quick");
    }
    let out = c.output().map_err(|e| format!("{}: {e}", bin.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| {
            format!(
                "no JSON from the throughput example:\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    let runs = parse(line);
    if runs.is_empty() {
        return Err(format!(
            "unreadable JSON from the throughput example: {line}"
        ));
    }
    let get = |net: &str, what: &str, streams: u32| {
        runs.iter()
            .find(|r| r.net == net && r.what == what && r.streams == streams)
            .map(|r| r.gbps)
    };
    let mut figs = Vec::new();
    for net in ["loopback", "netns-veth"] {
        for streams in [1u32, 2] {
            let bars: Vec<(String, f64)> = runs
                .iter()
                .filter(|r| r.net == net && r.streams == streams)
                .map(|r| (r.what.clone(), r.gbps))
                .collect();
            if bars.is_empty() {
                continue;
            }
            crate::series::bars(
                &format!("throughput-{net}-{streams}"),
                &format!("GB/s, {net}, {streams} stream(s)/link(s), same run"),
                bars,
            );
            let Some(raw) = get(net, "raw write", streams) else {
                continue;
            };
            for (what, target) in [
                ("alink lent+placed volatile", Some(0.8)),
                ("alink staged", None),
            ] {
                if let Some(v) = get(net, what, streams) {
                    let mut f = Figure::new(
                        "datapath",
                        &format!("{net}, {streams} link(s): {what}"),
                        v * 1e3,
                        "MB/s",
                        Better::Higher,
                    )
                    .baseline(&format!("raw TCP, {streams} stream(s), same ends"), raw * 1e3)
                    .note("4 MiB messages of 1,024 scattered pages, 512 MiB memory to 512 MiB mirror; alink/examples/throughput".to_string());
                    if let Some(t) = target {
                        f = f.target(t, true, ">= 80 % of raw TCP");
                    }
                    figs.push(f);
                }
            }
            for s in ["raw zerocopy", "raw uring", "raw uring-zc"] {
                if let (Some(v), Some(w)) = (get(net, s, streams), get(net, "raw writev", streams))
                {
                    figs.push(
                        Figure::new(
                            "datapath",
                            &format!("{net}, {streams} stream(s): {s}"),
                            v * 1e3,
                            "MB/s",
                            Better::Higher,
                        )
                        .baseline("raw writev, same pages", w * 1e3),
                    );
                }
            }
        }
    }
    Ok(figs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_examples_json() {
        let j = r#"{"secs":1,"runs":[{"net":"loopback","what":"raw write","streams":1,"gbps":0.7923,"note":""},{"net":"netns-veth","what":"alink staged","streams":2,"gbps":1.5,"note":"(x)"}]}"#;
        let r = parse(j);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].net.as_str(), r[0].streams, r[0].gbps),
            ("loopback", 1, 0.7923)
        );
        assert_eq!(r[1].what, "alink staged");
        assert!(parse("{}").is_empty());
    }
}
