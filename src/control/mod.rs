//! The control socket of a running VM: `$TWINRUN_RUN_DIR/<name>.sock`.
//!
//! Protocol: each message is a u32 LE length (at most [`MAX_MESSAGE`]) followed by that
//! many bytes of postcard. The client sends a [`Request`] and reads one [`Response`];
//! it may send more on the same connection. A request of another
//! [`PROTOCOL_VERSION`], or one that does not decode, gets [`Response::Error`].
pub mod disk_fault;
pub mod disks;
pub mod server;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;
pub const MAX_MESSAGE: u32 = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    pub op: Op,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Status,
    Pause,
    Resume,
    SnapshotCreate,
    /// Fault injection on disk `disk` (index in the VM config's `disks`); answered
    /// with [`Response::DiskFaults`].
    DiskFault {
        disk: u32,
        action: FaultAction,
    },
    // New variants go last: postcard encodes the variant index, so appending keeps
    // the messages of older clients decoding.
    /// Replication state of each mirrored disk; answered with [`Response::Disks`]
    /// (FT primary only).
    DiskStatus,
    /// Start an online verify of every mirrored disk; answered with [`Response::Ok`]
    /// (FT primary only, while a standby is in sync).
    DiskVerify,
}

/// What to do to a disk's fault injection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultAction {
    /// The whole disk fails: every read, write and flush is an I/O error.
    Fail,
    /// Operations `ops` touching bytes `[offset, offset + len)` fail.
    BadRange {
        offset: u64,
        len: u64,
        ops: FaultOps,
    },
    /// Each batch of requests waits this long before it runs (0: no delay).
    DelayMs(u64),
    /// Remove every fault.
    Clear,
    /// Change nothing; report.
    Show,
}

/// Which operations a bad range fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultOps {
    Reads,
    Writes,
    All,
}

/// A bad range in a [`Response::DiskFaults`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadRange {
    pub offset: u64,
    pub len: u64,
    pub ops: FaultOps,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Status {
        name: String,
        pid: u32,
        paused: bool,
    },
    Ok,
    Snapshot {
        generation: u32,
        kind: String,
        pause_us: u64,
        bytes: u64,
        folded: Vec<u32>,
    },
    Error {
        message: String,
    },
    /// A disk's faults after the request was applied.
    DiskFaults {
        disk: u32,
        failed: bool,
        bad_ranges: Vec<BadRange>,
        delay_ms: u64,
        /// Operations failed by injection since the VM started.
        injected: u64,
    },
    /// Each mirrored disk's replication state, in the VM config's disk order.
    Disks {
        disks: Vec<storage_mirror::primary::DiskStatus>,
    },
}

pub fn write_message(s: &mut impl Write, payload: &[u8]) -> std::io::Result<()> {
    s.write_all(&(payload.len() as u32).to_le_bytes())?;
    s.write_all(payload)?;
    s.flush()
}

/// Reads one message; `Ok(None)` at a clean end of stream.
pub fn read_message(s: &mut impl Read) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message of {len} bytes is too long"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf)?;
    Ok(Some(buf))
}

/// Sends `op` to the VM whose socket is `path` and waits for the answer.
pub fn call(path: &Path, op: Op, timeout: Duration) -> Result<Response, String> {
    let mut s = UnixStream::connect(path).map_err(|e| {
        format!(
            "cannot reach the VM's control socket {}: {e} (is the VM running?)",
            path.display()
        )
    })?;
    let _ = s.set_read_timeout(Some(timeout));
    let req = Request {
        version: PROTOCOL_VERSION,
        op,
    };
    let bytes = postcard::to_allocvec(&req).map_err(|e| e.to_string())?;
    write_message(&mut s, &bytes).map_err(|e| format!("sending the request: {e}"))?;
    let reply = read_message(&mut s)
        .map_err(|e| format!("reading the reply: {e}"))?
        .ok_or("the VM closed the connection without answering")?;
    postcard::from_bytes(&reply).map_err(|e| format!("bad reply: {e}"))
}
