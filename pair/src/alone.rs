//! A VM alone: build (or restore from a snapshot), start, serve its control socket,
//! wait for its end, and turn how it ended into an exit code.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use std::time::Duration;

use std::path::PathBuf;

use log::{error, info, warn};
use twinrun_control::paths::DEFAULT_VM_NAME;
use twinrun_control::server::{Server, ServerError};
use twinrun_snapshot::rebuild::{restore_disk, Chain};
use twinrun_snapshot::store::Store;
use twinrun_snapshot::SnapError;
use vmm::config::{ConsoleConfig, Payload, VmConfig};
use vmm::devices::virtio::persist::{ConsoleAttachment, DeviceState};
use vmm::{build_vm, build_vm_from_state, VmExit, VmState, Vmm};

use crate::{exit, signals};

/// What `twinrun snapshot restore` asks for.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// The snapshot's VM and generation.
    pub vm: String,
    pub generation: u32,
    /// Name of the restored VM (default: the snapshot's VM name).
    pub name: Option<String>,
    /// Console sink of the restored VM (default: the snapshot's).
    pub console: Option<ConsoleConfig>,
    /// Where to rebuild disk images, in disk order (default: the configured paths).
    pub disk_paths: Vec<PathBuf>,
}

/// The control server of VM `name` (`None`: the default name, which another VM may
/// hold: then this one runs without a socket). Err is the exit code.
pub fn control_server(name: Option<&str>, cfg: &VmConfig) -> Result<Option<Server>, i32> {
    match Server::bind(name.unwrap_or(DEFAULT_VM_NAME), cfg) {
        Ok(s) => Ok(Some(s)),
        Err(e @ ServerError::InUse { .. }) if name.is_none() => {
            warn!("{e}; running without a control socket (give --name to have one)");
            Ok(None)
        }
        Err(e @ (ServerError::InUse { .. } | ServerError::Name(_))) => {
            eprintln!("twinrun: error: {e}");
            Err(exit::USAGE)
        }
        Err(e) => {
            eprintln!("twinrun: error: cannot create the control socket: {e}");
            Err(exit::START_FAILED)
        }
    }
}

/// Builds, starts and waits for the VM described by `cfg`; returns the exit code.
pub fn run_vm(cfg: &VmConfig, name: Option<&str>) -> i32 {
    let server = match control_server(name, cfg) {
        Ok(s) => s,
        Err(code) => return code,
    };
    // Before any thread exists, so the VMM's threads inherit the mask.
    if let Err(e) = signals::block() {
        error!("cannot block SIGTERM/SIGINT: {e}");
        return exit::START_FAILED;
    }
    let guest = match &cfg.payload {
        Payload::TestGuest { elf, .. } => elf.display().to_string(),
        other => format!("{other:?}"),
    };
    info!(
        "building VM: {} MiB, {} vCPU(s), guest {}, {} disk(s), {} net(s)",
        cfg.mem_mib,
        cfg.vcpus,
        guest,
        cfg.disks.len(),
        cfg.nets.len()
    );
    let vm = match build_vm(cfg) {
        Ok(vm) => vm,
        Err(e) => {
            error!("cannot build the VM: {e}");
            return exit::START_FAILED;
        }
    };
    run_built(vm, server)
}

/// Starts a built VM and serves its control socket until it ends.
fn run_built(mut vm: Vmm, mut server: Option<Server>) -> i32 {
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

    let end = loop {
        match &mut server {
            // The control socket is served from this thread, between checks for the
            // VM's end (requests need the Vmm, which `wait` borrows mutably).
            Some(s) => {
                s.poll(&vm, Duration::from_millis(20));
                if let Some(end) = vm.wait_timeout(Duration::ZERO) {
                    break end;
                }
            }
            None => break vm.wait(),
        }
    };
    drop(server);
    exit_code(&end, signalled.load(Ordering::SeqCst))
}

/// `twinrun snapshot restore`: rebuilds the disks and memory of a generation and runs
/// the VM from its state in this process.
pub fn restore_vm(a: &RestoreOptions) -> i32 {
    if let Err(e) = signals::block() {
        error!("cannot block SIGTERM/SIGINT: {e}");
        return exit::START_FAILED;
    }
    let fail = |e: SnapError| {
        eprintln!("twinrun: error: {e}");
        exit::of_snapshot_error(&e)
    };
    let store = match Store::new(&a.vm) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let chain = match Chain::load(&store, a.generation) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let (mut cfg, state): (VmConfig, VmState) =
        match chain.config().and_then(|c| Ok((c, chain.state()?))) {
            Ok(x) => x,
            Err(e) => return fail(e),
        };
    if let Some(c) = &a.console {
        cfg.console = c.clone();
    }
    if !a.disk_paths.is_empty() {
        if a.disk_paths.len() != cfg.disks.len() {
            return fail(SnapError::Invalid(format!(
                "the snapshot has {} disk(s), {} --disk-path given",
                cfg.disks.len(),
                a.disk_paths.len()
            )));
        }
        for (d, p) in cfg.disks.iter_mut().zip(&a.disk_paths) {
            d.path = p.clone();
        }
    }
    let state = retarget(state, &mut cfg);
    let name = a.name.clone().unwrap_or_else(|| a.vm.clone());
    let server = match control_server(Some(&name), &cfg) {
        Ok(s) => s,
        Err(code) => return code,
    };
    for (i, d) in cfg.disks.iter().enumerate() {
        if let Err(e) = restore_disk(&chain, i, &d.path) {
            return fail(e);
        }
        info!("disk {i} rebuilt at {}", d.path.display());
    }
    let mut filled = Ok(());
    let built = build_vm_from_state(&cfg, &state, |mem| {
        filled = chain.fill_memory(mem);
        Ok(())
    });
    if let Err(e) = filled {
        return fail(e);
    }
    let vm = match built {
        Ok((vm, report)) => {
            if !report.is_exact() {
                warn!("restore is not exact: {report:?}");
            }
            vm
        }
        Err(e) => {
            eprintln!("twinrun: error: cannot restore the VM: {e}");
            return exit::START_FAILED;
        }
    };
    info!(
        "restored VM {name} from snapshot {} generation {}",
        a.vm, a.generation
    );
    run_built(vm, server)
}

/// Maps how the VM ended to the process exit code, logging it.
pub fn exit_code(end: &VmExit, signalled: bool) -> i32 {
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

/// Points the state's device attachments at the (possibly overridden) console and
/// disk paths of `cfg`; disks keep the serial the guest saw.
fn retarget(mut state: VmState, cfg: &mut VmConfig) -> VmState {
    let mut disks = cfg.disks.iter_mut();
    for t in &mut state.devices {
        match &mut t.device {
            DeviceState::Console { sink } => *sink = ConsoleAttachment::from(&cfg.console),
            DeviceState::Block { disk } => {
                if let Some(d) = disks.next() {
                    if d.serial.is_none() {
                        d.serial = disk.serial.clone();
                    }
                    disk.path = d.path.clone();
                }
            }
            _ => {}
        }
    }
    state
}
