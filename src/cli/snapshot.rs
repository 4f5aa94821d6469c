//! `twinrun snapshot create | list | delete | export | import | verify` (restore runs
//! a VM and lives with `vm run` in the binary).

use std::time::Duration;

use crate::exit;
use twinrun_control::{self as control, Op, Response};
use twinrun_snapshot::export::{export, import};
use twinrun_snapshot::rebuild::Chain;
use twinrun_snapshot::store::Store;
use twinrun_snapshot::take::mem_crc;
use twinrun_snapshot::SnapError;

use super::args::SnapshotCommand;

/// Runs a snapshot command other than restore; returns the exit code.
pub fn run(cmd: &SnapshotCommand) -> i32 {
    match cmd_result(cmd) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("twinrun: error: {e}");
            exit::of_snapshot_error(&e)
        }
    }
}

fn cmd_result(cmd: &SnapshotCommand) -> Result<(), SnapError> {
    match cmd {
        SnapshotCommand::Create { vm } => create(vm),
        SnapshotCommand::List { vm } => list(vm),
        SnapshotCommand::Delete { vm, generation } => {
            Store::new(vm)?.delete(*generation)?;
            println!("deleted generation {generation} of {vm}");
            Ok(())
        }
        SnapshotCommand::Export {
            vm,
            generation,
            file,
        } => {
            let n = export(&Store::new(vm)?, *generation, file)?;
            println!(
                "exported generation {generation} of {vm} to {} ({n} bytes)",
                file.display()
            );
            Ok(())
        }
        SnapshotCommand::Import { file, name } => {
            let (vm, g) = import(file, name.as_deref())?;
            println!("imported {} as generation {g} of {vm}", file.display());
            Ok(())
        }
        SnapshotCommand::Verify { vm, generation } => verify(vm, *generation),
        SnapshotCommand::Restore(_) => Err(SnapError::Invalid(
            "restore is run by the twinrun binary".into(),
        )),
    }
}

fn create(vm: &str) -> Result<(), SnapError> {
    let sock = control::socket_of(vm).map_err(SnapError::Invalid)?;
    match control::call(&sock, Op::SnapshotCreate, Duration::from_secs(600))
        .map_err(SnapError::Vm)?
    {
        Response::Snapshot {
            generation,
            kind,
            pause_us,
            bytes,
            folded,
        } => {
            println!(
                "snapshot of {vm}: generation {generation} ({kind}), {bytes} bytes, paused {pause_us} us"
            );
            if !folded.is_empty() {
                println!("folded away generation(s) {folded:?} to keep at most 16");
            }
            Ok(())
        }
        Response::Error { message } => Err(SnapError::Vm(message)),
        other => Err(SnapError::Vm(format!("unexpected reply {other:?}"))),
    }
}

fn list(vm: &str) -> Result<(), SnapError> {
    let store = Store::new(vm)?;
    println!("GEN      KIND         CREATED(unix ms)  SIZE        PAUSE(us)  PARENT");
    for g in store.generations()? {
        match store.manifest(g) {
            Ok(m) => println!(
                "{:<8} {:<12} {:<17} {:<11} {:<10} {}",
                g,
                m.kind.to_string(),
                m.created_unix_ms,
                m.size(),
                m.pause_us,
                m.parent.map_or("-".into(), |p| p.to_string())
            ),
            Err(e) => println!("{g:<8} damaged: {e}"),
        }
    }
    Ok(())
}

/// Rebuilds the memory of a generation from its chain (every part verified) and
/// compares it with the CRC recorded at snapshot time.
fn verify(vm: &str, g: u32) -> Result<(), SnapError> {
    let store = Store::new(vm)?;
    let chain = Chain::load(&store, g)?;
    chain.state()?;
    let m = chain.top();
    let mem = vmm::vstate::memory::create_guest_memory(m.mem_bytes)
        .map_err(|e| SnapError::Vm(format!("guest memory: {e}")))?;
    chain.fill_memory(&mem)?;
    let got = mem_crc(&mem)?;
    match m.memory_crc32c {
        Some(want) if want == got => {
            println!("generation {g} of {vm}: memory matches (crc32c {got:#010x}), {} generation(s) in its chain", chain.gens.len());
            Ok(())
        }
        Some(want) => Err(SnapError::Corrupt(format!(
            "generation {g} of {vm}: rebuilt memory crc32c {got:#010x} differs from the recorded {want:#010x}"
        ))),
        None => {
            println!("generation {g} of {vm}: all parts verified; no memory hash recorded (crc32c {got:#010x})");
            Ok(())
        }
    }
}
