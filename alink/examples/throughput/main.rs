//! Throughput of the A-Link's data paths against raw TCP between the same two ends, with
//! the same number of streams, in the same run: on loopback and/or between two network
//! namespaces joined by veth pairs (one per link). Also the send mechanisms a writer
//! could use (vectored writes, MSG_ZEROCOPY, io_uring with and without zero copy) on
//! the same scattered pages. Needs root for namespaces.
//!
//!   cargo run --release -p alink --example throughput -- [--where loopback|netns|both]
//!       [--secs S] [--repeat N] [--quick]
//!
//! Prints a table per run and, last, one JSON line with every figure (GB/s).

mod net;
mod paths;
mod raw;

use std::sync::Arc;

use net::{Net, Pages};
use paths::Path;
use raw::{Recv, Send};

/// "Guest memory" and its mirror: 512 MiB each, four times the A-Link window.
const MEM_PAGES: usize = 128 << 10;

struct Fig {
    net: &'static str,
    what: String,
    streams: usize,
    gbps: f64,
    note: String,
}

fn main() {
    env_logger::init();
    let mut nets = vec!["loopback", "netns"];
    let mut secs = 2.0;
    let mut repeat = 1;
    let mut quick = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--where" => match args.next().as_deref() {
                Some("loopback") => nets = vec!["loopback"],
                Some("netns") => nets = vec!["netns"],
                Some("both") => {}
                _ => usage(),
            },
            "--secs" => {
                secs = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--repeat" => {
                repeat = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| usage())
            }
            "--quick" => quick = true,
            _ => usage(),
        }
    }
    if nets.contains(&"netns") && !net::netns_available() {
        eprintln!("netns runs need root and iproute2; running loopback only");
        nets.retain(|n| *n != "netns");
    }
    let src = Arc::new(Pages::new(MEM_PAGES, 0x5a));
    let dst = Arc::new(Pages::new(MEM_PAGES, 0));
    let mut figs = Vec::new();
    for round in 0..repeat {
        for n in &nets {
            let net = match *n {
                "netns" => match Net::netns(2) {
                    Ok(n) => n,
                    Err(e) => {
                        eprintln!("namespaces: {e}");
                        std::process::exit(1);
                    }
                },
                _ => Net::Loopback,
            };
            eprintln!("== {} (repeat {}/{repeat})", net.name(), round + 1);
            run_all(&net, secs, quick, &src, &dst, &mut figs);
        }
    }
    let json: Vec<String> = figs
        .iter()
        .map(|f| {
            format!(
                "{{\"net\":\"{}\",\"what\":\"{}\",\"streams\":{},\"gbps\":{:.4},\"note\":\"{}\"}}",
                f.net, f.what, f.streams, f.gbps, f.note
            )
        })
        .collect();
    println!("{{\"secs\":{secs},\"runs\":[{}]}}", json.join(","));
}

fn usage() -> ! {
    eprintln!("usage: throughput [--where loopback|netns|both] [--secs S] [--repeat N] [--quick]");
    std::process::exit(2)
}

fn run_all(
    net: &Net,
    secs: f64,
    quick: bool,
    src: &Arc<Pages>,
    dst: &Arc<Pages>,
    figs: &mut Vec<Fig>,
) {
    let mut port = 7600 + (std::process::id() % 500) as u16 * 40;
    let mut next_port = || {
        port += 4;
        port
    };
    let mut push = |what: String, streams: usize, r: Result<f64, String>, note: String| match r {
        Ok(v) => {
            eprintln!(
                "  {:<28} {streams} stream(s): {:6.3} GB/s {note}",
                what,
                v / 1e9
            );
            figs.push(Fig {
                net: net.name(),
                what,
                streams,
                gbps: v / 1e9,
                note,
            });
        }
        Err(e) => eprintln!("  {what} {streams}: FAILED: {e}"),
    };
    let sends: &[Send] = if quick {
        &[Send::Write, Send::Writev]
    } else {
        &[
            Send::Write,
            Send::Writev,
            Send::ZeroCopy,
            Send::Uring,
            Send::UringZc,
        ]
    };
    for streams in [1usize, 2] {
        for &s in sends {
            let mem = raw::Mem { src, dst };
            let r = raw::run(net, streams, (s, Recv::Read), secs, mem, next_port());
            let note = r
                .as_ref()
                .ok()
                .and_then(|o| o.zc_copied)
                .map(|c| format!("(kernel copied {:.0} % of zero-copy sends)", 100.0 * c))
                .unwrap_or_default();
            push(
                format!("raw {}", s.name()),
                streams,
                r.map(|o| o.bytes_per_s),
                note,
            );
        }
        let mem = raw::Mem { src, dst };
        let how = (Send::Writev, Recv::ReadvPages);
        let r = raw::run(net, streams, how, secs, mem, next_port());
        push(
            "raw writev->readv pages".into(),
            streams,
            r.map(|o| o.bytes_per_s),
            String::new(),
        );
        let path_list: &[Path] = if quick {
            &[Path::Staged, Path::LentPlaced { volatile: true }]
        } else {
            &[
                Path::Staged,
                Path::LentPlaced { volatile: false },
                Path::LentPlaced { volatile: true },
            ]
        };
        for &p in path_list {
            let r = paths::run(net, streams, p, secs, src, dst, next_port());
            push(format!("alink {}", p.name()), streams, r, String::new());
        }
    }
}
