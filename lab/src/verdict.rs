//! The verdict of a kv load run against the guest's console: what every test of a VM
//! that moves (failover, planned swap, migration, a quorum case) checks at its end, in
//! one place so that each of them asks the same questions with the same words.

use crate::console::{check_console, ConsoleReport};
use crate::kvload::LoadReport;

/// What a run must have shown beyond "nothing acknowledged lost, counter exact,
/// console whole".
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    /// The client's one TCP connection carried the whole run (no reconnect).
    pub one_connection: bool,
    /// The disk workload wrote (and the console shows) at least one `W` record.
    pub w_records: bool,
    /// The dirty-memory workload verified at least one pass (`D` lines).
    pub dirty_passes: bool,
}

impl Expect {
    /// A VM moved under the full workload (counter, kv, disk, dirty) on one connection.
    pub const MOVED: Expect = Expect {
        one_connection: true,
        w_records: true,
        dirty_passes: true,
    };
    /// Only the basics: no client error, nothing acknowledged lost, counter exact,
    /// console whole.
    pub const BASIC: Expect = Expect {
        one_connection: false,
        w_records: false,
        dirty_passes: false,
    };
}

/// Checks the client's report and the console stream; the console's report, or the
/// first thing wrong, in words a failing test prints before its logs.
pub fn check_load(
    rep: &LoadReport,
    console: &[u8],
    expect: Expect,
) -> Result<ConsoleReport, String> {
    if !rep.errors.is_empty() || (expect.one_connection && !rep.connection_survived()) {
        return Err(format!(
            "client: {:?} ({} reconnects, {} SETs and {} INCRs acknowledged, longest reply \
             {:?} at {:?})",
            rep.errors,
            rep.reconnects,
            rep.sets_acked.len(),
            rep.incrs_acked,
            rep.max_reply,
            rep.max_reply_at
        ));
    }
    if !rep.lost.is_empty() {
        return Err(format!(
            "{} acknowledged SETs lost (first {:?})",
            rep.lost.len(),
            &rep.lost[..rep.lost.len().min(10)]
        ));
    }
    if rep.counter_final != Some(rep.incrs_acked) {
        return Err(format!(
            "the INCR counter read back ({:?}) differs from the {} acknowledged",
            rep.counter_final, rep.incrs_acked
        ));
    }
    let cc = check_console(console).map_err(|e| format!("console: {e}"))?;
    if expect.w_records && cc.w_seqs.is_empty() {
        return Err("no W record at all on the console".into());
    }
    if expect.dirty_passes && cc.d_lines == 0 {
        return Err("the dirty workload verified no pass".into());
    }
    Ok(cc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console() -> Vec<u8> {
        b"BOOT\nC 1\nW 1\nD pass=1 errors=0\nC 2\n".to_vec()
    }

    fn good() -> LoadReport {
        LoadReport {
            sets_acked: vec![1, 2],
            incrs_acked: 3,
            counter_final: Some(3),
            local_addr: Some("10.0.0.1:4000".parse().unwrap_or_else(|e| panic!("{e}"))),
            ..LoadReport::default()
        }
    }

    #[test]
    fn a_whole_run_passes() {
        let cc = check_load(&good(), &console(), Expect::MOVED).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(cc.w_seqs, vec![1]);
    }

    #[test]
    fn each_failure_is_named() {
        let mut r = good();
        r.reconnects = 1;
        let e = check_load(&r, &console(), Expect::MOVED).unwrap_err();
        assert!(e.contains("1 reconnects"), "{e}");
        assert!(check_load(&r, &console(), Expect::BASIC).is_ok());
        let mut r = good();
        r.lost = vec![7];
        let e = check_load(&r, &console(), Expect::BASIC).unwrap_err();
        assert!(e.contains("1 acknowledged SETs lost (first [7])"), "{e}");
        let mut r = good();
        r.counter_final = Some(2);
        let e = check_load(&r, &console(), Expect::BASIC).unwrap_err();
        assert!(e.contains("(Some(2)) differs from the 3"), "{e}");
        let e = check_load(&good(), b"BOOT\nC 1\nC 3\n", Expect::BASIC).unwrap_err();
        assert!(e.starts_with("console: "), "{e}");
        let e = check_load(&good(), b"BOOT\nC 1\n", Expect::MOVED).unwrap_err();
        assert!(e.contains("no W record"), "{e}");
    }
}
