//! What an HA end serves on its control socket: FT's status (role, state, failover,
//! links, disks: the daemon reads both levels alike) with `protection: "ha"`. A
//! protected HA primary's state is `protected` once its standby's replicas are in
//! sync; `epochs_committed` counts the write batches the standby acknowledged. A
//! standby declared failed by the ack timeout is named, with the reason, in the state
//! of each disk it left degraded.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use storage_mirror::primary::PrimaryDisks;
use twinrun_control::server::{FtControl, Server};
use twinrun_control::{FtRole, FtStatus};
use vmm::devices::virtio::block::DiskFaults;

use super::migrate::MigrateSide;
use crate::ft::status::PairStatus;

/// [`PairStatus`] as an HA end reports it, and the live migration it is asked for
/// (`Op::Swap`, asked of the primary: see [`super::migrate`]).
pub struct HaControl(pub Arc<PairStatus>, pub Arc<MigrateSide>);

impl FtControl for HaControl {
    fn status(&self) -> FtStatus {
        let mut s = self.0.status();
        s.protection = "ha".into();
        // A reachable standby declared failed (ack timeout): why, beside each disk it
        // left degraded (kept until a standby is in sync again).
        if let Some(why) = self.0.disks().and_then(|d| d.standby_failed()) {
            for d in s.disks.iter_mut().filter(|d| d.kind != "protected") {
                d.state = format!("{}; {why}", d.state);
            }
        }
        s
    }
    fn disk_faults(&self) -> Vec<Arc<DiskFaults>> {
        self.0.disk_faults()
    }
    fn disks(&self) -> Option<Arc<PrimaryDisks>> {
        self.0.disks()
    }
    fn swap(&self) -> Result<(u64, u64), String> {
        if self.0.status().role != FtRole::Primary {
            return Err("this end of the HA pair is the standby: ask the primary".into());
        }
        // The pre-copy first (one checkpoint session), then FT's planned swap on it.
        self.1.request(|| FtControl::swap(&*self.0))
    }
}

/// Serves the control socket of this end on its own thread until dropped.
pub struct ControlThread {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ControlThread {
    pub fn start(
        mut server: Server,
        status: Arc<PairStatus>,
        side: Arc<MigrateSide>,
    ) -> ControlThread {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let ctl = HaControl(status, side);
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    server.poll_ft(&ctl, Duration::from_millis(50));
                }
            })
            .map_err(|e| log::warn!("cannot start the control thread ({e}): no control socket"))
            .ok();
        ControlThread { stop, thread }
    }
}

impl Drop for ControlThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
