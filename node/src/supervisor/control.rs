//! Asking a running VMM who it is, through its control socket
//! (`$TWINRUN_RUN_DIR/<vm>.sock`, the protocol of `twinrun vm run`'s control server:
//! u32 LE length + postcard `Request { version, op }`, answered by one `Response`).
//!
//! Only the `Status` exchange is spoken here, with types that encode exactly as the
//! server's (postcard encodes an enum variant by its index: `Op::Status` and
//! `Response::Status` are variant 0 of theirs). The control crate being split out of
//! the CLI (`twinrun-control`) replaces this file with its client once it lands; the
//! integration tests check it against a real VMM meanwhile.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

const PROTOCOL_VERSION: u32 = 1;
const MAX_MESSAGE: u32 = 1 << 20;

#[derive(Serialize)]
struct Request {
    version: u32,
    op: Op,
}

#[derive(Serialize)]
enum Op {
    Status,
}

// Decoded only to find the variant; the fields of the ones never answered to Status
// are never read.
#[allow(dead_code)]
#[derive(Deserialize)]
enum Response {
    Status {
        name: String,
        pid: u32,
        paused: bool,
    },
    Ok,
    // Variants past these are never answered to Status except Error, which comes
    // fourth in the server's enum; the ones between are here only to keep indices.
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
}

/// What a VMM says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmmStatus {
    pub name: String,
    pub pid: u32,
    pub paused: bool,
}

pub fn status(socket: &Path, timeout: Duration) -> Result<VmmStatus, String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let req = postcard::to_allocvec(&Request {
        version: PROTOCOL_VERSION,
        op: Op::Status,
    })
    .map_err(|e| e.to_string())?;
    let mut msg = (req.len() as u32).to_le_bytes().to_vec();
    msg.extend_from_slice(&req);
    s.write_all(&msg).map_err(|e| format!("sending: {e}"))?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len)
        .map_err(|e| format!("reading: {e}"))?;
    let len = u32::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(format!("reply of {len} bytes is too long"));
    }
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf)
        .map_err(|e| format!("reading: {e}"))?;
    match postcard::from_bytes::<Response>(&buf) {
        Ok(Response::Status { name, pid, paused }) => Ok(VmmStatus { name, pid, paused }),
        Ok(Response::Error { message }) => Err(message),
        Ok(_) => Err("unexpected reply to Status".into()),
        Err(e) => Err(format!("reply does not decode: {e}")),
    }
}
