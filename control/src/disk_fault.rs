//! The control socket's disk fault injection: applies a [`FaultAction`] to one disk of
//! the running VM and reports that disk's faults.

use std::sync::Arc;
use std::time::Duration;

use log::info;
use vmm::devices::virtio::block::{faults, DiskFaults};
use vmm::Vmm;

use super::{BadRange, FaultAction, FaultOps, Response};

/// Applies `action` to disk `disk`; every failure is bad input (no such disk, a range
/// or delay past the limits), reported as [`Response::Error`].
pub fn apply(vmm: &Vmm, disk: u32, action: &FaultAction) -> Response {
    let faults: Vec<_> = (0..vmm.devices().disk_count())
        .filter_map(|d| vmm.disk_faults(d))
        .collect();
    apply_to(&faults, disk, action)
}

/// [`apply`] on the VM's disks' fault injectors (in config order).
pub fn apply_to(faults: &[Arc<DiskFaults>], disk: u32, action: &FaultAction) -> Response {
    let err = |message: String| Response::Error { message };
    let Some(f) = usize::try_from(disk).ok().and_then(|d| faults.get(d)) else {
        return err(format!(
            "the VM has no disk {disk} ({} disks)",
            faults.len()
        ));
    };
    let applied = match action {
        FaultAction::Fail => {
            f.fail_disk();
            Ok(())
        }
        FaultAction::BadRange { offset, len, ops } => f.add_bad_range(*offset, *len, to_vmm(*ops)),
        FaultAction::DelayMs(ms) => f.set_delay(Duration::from_millis(*ms)),
        FaultAction::Clear => {
            f.clear();
            Ok(())
        }
        FaultAction::Show => Ok(()),
    };
    if let Err(e) = applied {
        return err(format!("disk {disk}: {e}"));
    }
    if *action != FaultAction::Show {
        info!("disk {disk}: fault injection {action:?} by control request");
    }
    report(disk, f)
}

fn report(disk: u32, f: &DiskFaults) -> Response {
    let c = f.config();
    Response::DiskFaults {
        disk,
        failed: c.failed,
        bad_ranges: c
            .bad_ranges
            .iter()
            .map(|r| BadRange {
                offset: r.offset,
                len: r.len,
                ops: from_vmm(r.ops),
            })
            .collect(),
        delay_ms: c.delay.as_millis() as u64,
        injected: f.injected(),
    }
}

fn to_vmm(ops: FaultOps) -> faults::FaultOps {
    match ops {
        FaultOps::Reads => faults::FaultOps::Reads,
        FaultOps::Writes => faults::FaultOps::Writes,
        FaultOps::All => faults::FaultOps::All,
    }
}

fn from_vmm(ops: faults::FaultOps) -> FaultOps {
    match ops {
        faults::FaultOps::Reads => FaultOps::Reads,
        faults::FaultOps::Writes => FaultOps::Writes,
        faults::FaultOps::All => FaultOps::All,
    }
}
