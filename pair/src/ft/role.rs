//! The failover survivor's role switch, in one place: the standby that took over
//! becomes the primary of the same VM. Its disks are opened as a primary's (a new
//! generation, degraded: every block the guest writes is recorded for the returning
//! peer's resync) and installed as the VM's disk hooks before the resumed guest runs
//! its first instruction; then the VM is protected again, standby after standby, on
//! the A-Link configuration of a primary (it dials; the restarted old primary listens).

use std::sync::{Arc, Mutex};
use twinrun_lock::MutexExt;

use checkpoint::primary::MirroredDisks;
use checkpoint::standby::BeforeStart;
use storage_mirror::primary::PrimaryDisks;
use vmm::config::VmConfig;
use vmm::Vmm;

/// The survivor's disks, once the hook has opened them.
#[derive(Clone, Default)]
pub struct SurvivorDisks(Arc<Mutex<Option<Arc<PrimaryDisks>>>>);

impl SurvivorDisks {
    /// The disks opened at takeover (None if no failover happened, or it failed).
    pub fn take(&self) -> Option<Arc<PrimaryDisks>> {
        self.0.lock_or_recover().take()
    }
}

/// The hook the standby driver calls on the failed-over VM before it starts, and where
/// it leaves the disks it opened.
/// With `hold_output` (a quorum decides what leaves) the resumed guest's output is held
/// from its first instruction on.
pub fn survivor_hook(cfg: &VmConfig, hold_output: bool) -> (BeforeStart, SurvivorDisks) {
    let images: Vec<_> = cfg.disks.iter().map(|d| d.path.clone()).collect();
    let slot = SurvivorDisks::default();
    let keep = slot.clone();
    let hook = BeforeStart(Arc::new(move |vm: &mut Vmm| {
        let disks = PrimaryDisks::open(&images).map_err(|e| e.to_string())?;
        vm.set_disk_hooks(Some(Arc::new(MirroredDisks(disks.clone()))));
        if hold_output {
            vm.enable_output_commit().map_err(|e| e.to_string())?;
        }
        *keep.0.lock_or_recover() = Some(disks);
        Ok(())
    }));
    (hook, slot)
}
