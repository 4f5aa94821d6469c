//! What an HA end serves on its control socket: FT's status (role, state, failover,
//! links, disks: the daemon reads both levels alike) with `protection: "ha"`. A
//! protected HA primary's state is `protected` once its standby's replicas are in
//! sync; `epochs_committed` counts the write batches the standby acknowledged. A
//! standby declared failed by the ack timeout is named, with the reason, in the state
//! of each disk it left degraded.

use twinrun_control::server::FtControl;
use twinrun_control::FtStatus;

use crate::ft::status::PairStatus;

/// What an HA end adds to FT's status: `protection: "ha"`, and a reachable standby
/// declared failed (ack timeout): why, beside each disk it left degraded (kept until
/// a standby is in sync again). [`PairStatus`] serves it while the end is at HA
/// ([`PairStatus::set_ha`]: started so, or changed online), and routes a swap asked of
/// the primary through the live migration (`super::migrate`).
pub(crate) fn decorate(status: &PairStatus, s: &mut FtStatus) {
    s.protection = "ha".into();
    if let Some(why) = status.disks().and_then(|d| d.standby_failed()) {
        for d in s.disks.iter_mut().filter(|d| d.kind != "protected") {
            d.state = format!("{}; {why}", d.state);
        }
    }
}
