//! `twinrun vm fault`: injects disk faults into a running VM through its control
//! socket and prints the disk's faults afterwards.
//!
//! Exit codes: 0 applied; 2 bad input (flags, unknown VM, no such disk, a range or
//! delay past the limits); 1 the VM could not be reached or answered oddly.

use std::time::Duration;

use clap::{ArgGroup, Args, ValueEnum};

use crate::exit;
use twinrun_control::{self as control, FaultAction, FaultOps, Op, Response};

/// Flags of `twinrun vm fault`: exactly one action.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("action").required(true).multiple(false)
    .args(["fail", "bad_range", "delay_ms", "clear", "show"])))]
pub struct FaultArgs {
    /// Name of the running VM.
    #[arg(long, value_name = "NAME")]
    pub name: String,
    /// Disk index (order of the VM's disks, from 0).
    #[arg(long, value_name = "I")]
    pub disk: u32,
    /// Fail the whole disk: every read, write and flush errors.
    #[arg(long)]
    pub fail: bool,
    /// Fail I/O touching bytes OFFSET..OFFSET+LEN (decimal or 0x hex).
    #[arg(long, value_name = "OFFSET:LEN", value_parser = parse_range)]
    pub bad_range: Option<(u64, u64)>,
    /// Which operations the bad range fails [default: all].
    #[arg(long, value_enum, conflicts_with_all = ["fail", "delay_ms", "clear", "show"])]
    pub ops: Option<OpsArg>,
    /// Slow I/O: each batch of requests waits MS milliseconds (0 removes the delay).
    #[arg(long, value_name = "MS")]
    pub delay_ms: Option<u64>,
    /// Remove every fault of the disk.
    #[arg(long)]
    pub clear: bool,
    /// Change nothing; print the disk's faults and the injected-error count.
    #[arg(long)]
    pub show: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OpsArg {
    Reads,
    Writes,
    All,
}

/// Parses `OFFSET:LEN`, each decimal or `0x` hex; LEN at least 1, no overflow.
pub fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (o, l) = s
        .split_once(':')
        .ok_or_else(|| format!("bad range {s:?}: expected OFFSET:LEN (bytes)"))?;
    let offset = parse_u64(o).map_err(|e| format!("bad range offset {o:?}: {e}"))?;
    let len = parse_u64(l).map_err(|e| format!("bad range length {l:?}: {e}"))?;
    if len == 0 {
        return Err(format!("bad range {s:?}: the length must be at least 1"));
    }
    if offset.checked_add(len).is_none() {
        return Err(format!("bad range {s:?}: OFFSET+LEN overflows"));
    }
    Ok((offset, len))
}

fn parse_u64(s: &str) -> Result<u64, std::num::ParseIntError> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => s.parse(),
    }
}

impl FaultArgs {
    /// The one action the flags ask for (clap guarantees exactly one).
    pub fn action(&self) -> FaultAction {
        if let Some((offset, len)) = self.bad_range {
            let ops = match self.ops {
                Some(OpsArg::Reads) => FaultOps::Reads,
                Some(OpsArg::Writes) => FaultOps::Writes,
                Some(OpsArg::All) | None => FaultOps::All,
            };
            FaultAction::BadRange { offset, len, ops }
        } else if let Some(ms) = self.delay_ms {
            FaultAction::DelayMs(ms)
        } else if self.fail {
            FaultAction::Fail
        } else if self.clear {
            FaultAction::Clear
        } else {
            FaultAction::Show
        }
    }
}

/// Runs `twinrun vm fault`; returns the exit code.
pub fn run(a: &FaultArgs) -> i32 {
    let (code, msg) = match call(a) {
        Ok(text) => {
            println!("{text}");
            return exit::OK;
        }
        Err(e) => e,
    };
    eprintln!("twinrun: error: {msg}");
    code
}

fn call(a: &FaultArgs) -> Result<String, (i32, String)> {
    let usage = |m: String| (exit::USAGE, m);
    let sock = control::socket_of(&a.name).map_err(usage)?;
    let op = Op::DiskFault {
        disk: a.disk,
        action: a.action(),
    };
    match control::call(&sock, op, Duration::from_secs(30)) {
        Ok(r @ Response::DiskFaults { .. }) => Ok(describe(&a.name, &a.action(), &r)),
        // The VM refuses only bad input (no such disk, limits).
        Ok(Response::Error { message }) => Err(usage(message)),
        Ok(other) => Err((
            exit::GUEST_FAILED,
            format!("unexpected reply from {}: {other:?}", a.name),
        )),
        Err(e) => Err((exit::GUEST_FAILED, e)),
    }
}

/// `applied <action> to disk I of NAME` and the disk's faults now, one per line.
pub fn describe(name: &str, action: &FaultAction, r: &Response) -> String {
    let Response::DiskFaults {
        disk,
        failed,
        bad_ranges,
        delay_ms,
        injected,
    } = r
    else {
        return format!("{r:?}");
    };
    let what = match action {
        FaultAction::Fail => "failed the whole disk".to_string(),
        FaultAction::BadRange { offset, len, ops } => {
            format!("added bad range {offset}:{len} ({})", ops_name(*ops))
        }
        FaultAction::DelayMs(0) => "removed the delay".to_string(),
        FaultAction::DelayMs(ms) => format!("set a delay of {ms} ms"),
        FaultAction::Clear => "cleared all faults".to_string(),
        FaultAction::Show => "no change".to_string(),
    };
    let mut out = format!("disk {disk} of {name}: {what}\n");
    out += &format!("  failed: {}\n", if *failed { "yes" } else { "no" });
    if bad_ranges.is_empty() {
        out += "  bad ranges: none\n";
    }
    for b in bad_ranges {
        out += &format!(
            "  bad range: {}:{} ({})\n",
            b.offset,
            b.len,
            ops_name(b.ops)
        );
    }
    out += &format!("  delay: {delay_ms} ms\n");
    out += &format!("  injected errors: {injected}");
    out
}

fn ops_name(ops: FaultOps) -> &'static str {
    match ops {
        FaultOps::Reads => "reads",
        FaultOps::Writes => "writes",
        FaultOps::All => "all",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command, VmCommand};
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<FaultArgs, clap::Error> {
        let mut full = vec!["twinrun", "vm", "fault", "--name", "a", "--disk", "0"];
        full.extend_from_slice(args);
        match Cli::try_parse_from(full)?.command {
            Command::Vm(VmCommand::Fault(a)) => Ok(a),
            other => panic!("parsed {other:?}"),
        }
    }

    #[test]
    fn one_action() {
        assert_eq!(parse(&["--fail"]).unwrap().action(), FaultAction::Fail);
        assert_eq!(
            parse(&["--bad-range", "0x1000:512", "--ops", "writes"])
                .unwrap()
                .action(),
            FaultAction::BadRange {
                offset: 4096,
                len: 512,
                ops: FaultOps::Writes
            }
        );
        assert_eq!(
            parse(&["--bad-range", "0:1"]).unwrap().action(),
            FaultAction::BadRange {
                offset: 0,
                len: 1,
                ops: FaultOps::All
            }
        );
        assert_eq!(
            parse(&["--delay-ms", "20"]).unwrap().action(),
            FaultAction::DelayMs(20)
        );
        assert_eq!(parse(&["--clear"]).unwrap().action(), FaultAction::Clear);
        assert_eq!(parse(&["--show"]).unwrap().action(), FaultAction::Show);
    }

    #[test]
    fn bad_input_is_a_usage_error() {
        for args in [
            &[][..],
            &["--fail", "--clear"],
            &["--ops", "reads", "--fail"],
            &["--bad-range", "12"],
            &["--bad-range", "12:0"],
            &["--bad-range", "x:1"],
            &["--bad-range", "18446744073709551615:2"],
            &["--delay-ms", "-1"],
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
        }
        let e = parse(&["--bad-range", "12:0"]).unwrap_err().to_string();
        assert!(e.contains("at least 1"), "{e}");
    }
}
