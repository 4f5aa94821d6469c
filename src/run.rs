//! Running one VM to its end and turning how it ended into an exit code.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::{error, info, warn};
use twinrun::cli::resolve::test_guest_elf;
use twinrun::exit;
use vmm::config::VmConfig;
use vmm::{build_vm, VmExit};

use crate::signals;

/// Builds, starts and waits for the VM described by `cfg`; returns the exit code.
pub fn run_vm(cfg: &VmConfig) -> i32 {
    // Before any thread exists, so the VMM's threads inherit the mask.
    if let Err(e) = signals::block() {
        error!("cannot block SIGTERM/SIGINT: {e}");
        return exit::START_FAILED;
    }
    let guest = test_guest_elf(&cfg.payload).map_or_else(
        || format!("{:?}", cfg.payload),
        |elf| elf.display().to_string(),
    );
    info!(
        "building VM: {} MiB, {} vCPU(s), guest {}, {} disk(s), {} net(s)",
        cfg.mem_mib,
        cfg.vcpus,
        guest,
        cfg.disks.len(),
        cfg.nets.len()
    );
    let mut vm = match build_vm(cfg) {
        Ok(vm) => vm,
        Err(e) => {
            error!("cannot build the VM: {e}");
            return exit::START_FAILED;
        }
    };
    if let Err(e) = vm.start() {
        error!("cannot start the VM: {e}");
        return exit::START_FAILED;
    }
    info!("VM running");

    let stopper = vm.stopper();
    let signalled = Arc::new(AtomicBool::new(false));
    let flag = signalled.clone();
    // The thread is left blocked in sigwait when the VM ends on its own; process exit
    // ends it.
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || match signals::wait() {
            Ok(name) => {
                info!("received {name}: stopping the VM");
                flag.store(true, Ordering::SeqCst);
                stopper.stop();
            }
            Err(e) => warn!("waiting for signals failed: {e}"),
        });
    if let Err(e) = spawned {
        warn!("cannot start the signal thread ({e}); SIGTERM/SIGINT stay blocked");
    }

    let end = vm.wait();
    exit_code(&end, signalled.load(Ordering::SeqCst))
}

/// Maps how the VM ended to the process exit code, logging it.
fn exit_code(end: &VmExit, signalled: bool) -> i32 {
    match end {
        VmExit::GuestExit { status: 0 } => {
            info!("guest exited with status 0");
            exit::OK
        }
        VmExit::GuestExit { status } => {
            error!("guest exited with status {status} ({status:#x})");
            eprintln!("twinrun: guest exited with status {status} ({status:#x})");
            exit::GUEST_FAILED
        }
        VmExit::GuestReset => {
            info!("guest reset the machine (i8042); the VM ends there");
            exit::OK
        }
        VmExit::Stopped => {
            if signalled {
                info!("VM stopped on signal; devices flushed, exiting cleanly");
            } else {
                info!("VM stopped");
            }
            exit::OK
        }
        crash => {
            error!("VM crashed");
            eprintln!("twinrun: VM crashed: {crash}");
            exit::CRASH
        }
    }
}
