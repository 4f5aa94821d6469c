//! Process exit codes of `twinrun vm run`.

/// Guest exited with status 0, or the VM was stopped by SIGTERM/SIGINT.
pub const OK: i32 = 0;
/// Guest exited with a nonzero status.
pub const GUEST_FAILED: i32 = 1;
/// Bad command line or VM config (clap uses 2 for usage errors too).
pub const USAGE: i32 = 2;
/// The VM crashed: triple fault, KVM internal error, failed entry, vCPU error, HLT.
pub const CRASH: i32 = 3;
/// The VM could not be built or started (KVM, TAP, disk or console setup failed).
pub const START_FAILED: i32 = 4;
/// FT primary demoted by the quorum: the peer took the VM over (a higher generation)
/// while this node was cut off; its VM stopped without releasing held output, its
/// disks are marked as the resync target. Restart it with `--role standby`.
pub const DEMOTED: i32 = 5;

/// Exit code of a failed snapshot command: [`USAGE`] for bad input (damaged or foreign
/// files included), 1 for a failure of this machine.
pub fn of_snapshot_error(e: &twinrun_snapshot::SnapError) -> i32 {
    if e.is_bad_input() {
        USAGE
    } else {
        1
    }
}
