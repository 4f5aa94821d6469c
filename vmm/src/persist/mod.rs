//! VM state capture and restore: everything but guest memory, as one serializable
//! [`VmState`], and the file format it is stored in.
//!
//! Capture ([`crate::Vmm::capture_state`]) reads the devices first, then every vCPU,
//! then the VM-wide KVM state, all while the VM is paused. Restore
//! ([`restore::build_vm_from_state`]) builds a fresh VMM: memory first, then the vCPUs,
//! then the VM-wide state, then the devices (reopened from the config by name and path,
//! and checked against the state).
//!
//! Byte format ([`VmState::to_bytes`]): magic `TWRNSTAT`, version (u32 LE), payload
//! length (u64 LE), the postcard-encoded state, CRC-32 of the payload (u32 LE).

pub mod memory;
pub mod restore;

use serde::{Deserialize, Serialize};

use crate::devices::legacy::serial::SerialSnapshot;
use crate::devices::virtio::persist::TransportState;
use crate::vstate::vcpu_state::{RefusedMsr, VcpuState};
use crate::vstate::vm_state::KvmVmState;

pub const STATE_MAGIC: [u8; 8] = *b"TWRNSTAT";
/// Bumped on any change to the encoded structures.
pub const STATE_VERSION: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 8;
const TRAILER_LEN: usize = 4;

/// Everything needed to resume a paused VM, except its guest memory.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Guest RAM regions `(guest-physical start, length)` the memory must match.
    pub memory: Vec<(u64, u64)>,
    pub vcpus: Vec<VcpuState>,
    pub vm: KvmVmState,
    /// One per virtio-mmio window, in window order.
    pub devices: Vec<TransportState>,
    /// COM1 of a Linux guest (`None` for the test guest, which has no UART).
    pub serial: Option<SerialSnapshot>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateFormatError {
    #[error("not a twinrun VM state (bad magic)")]
    BadMagic,
    #[error("VM state version {0} is not supported (this build reads version {STATE_VERSION})")]
    Version(u32),
    #[error("VM state is truncated: {have} bytes, {need} needed")]
    Truncated { have: usize, need: u64 },
    #[error("VM state has {0} bytes after its end")]
    TrailingBytes(usize),
    #[error("VM state checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("VM state does not decode: {0}")]
    Decode(postcard::Error),
    #[error("VM state payload has {0} undecoded bytes")]
    PayloadTrailing(usize),
    #[error("cannot encode VM state: {0}")]
    Encode(postcard::Error),
}

impl VmState {
    pub fn to_bytes(&self) -> Result<Vec<u8>, StateFormatError> {
        let payload = postcard::to_allocvec(self).map_err(StateFormatError::Encode)?;
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&payload);
        out.extend_from_slice(&crc32(&payload).to_le_bytes());
        Ok(out)
    }

    pub fn from_bytes(b: &[u8]) -> Result<VmState, StateFormatError> {
        if b.len() < HEADER_LEN {
            if !STATE_MAGIC.starts_with(&b[..b.len().min(8)]) {
                return Err(StateFormatError::BadMagic);
            }
            return Err(StateFormatError::Truncated {
                have: b.len(),
                need: HEADER_LEN as u64,
            });
        }
        if b[..8] != STATE_MAGIC {
            return Err(StateFormatError::BadMagic);
        }
        let word = |at: usize| <[u8; 4]>::try_from(&b[at..at + 4]).map(u32::from_le_bytes);
        let version = word(8).map_err(|_| StateFormatError::BadMagic)?;
        if version != STATE_VERSION {
            return Err(StateFormatError::Version(version));
        }
        let len = <[u8; 8]>::try_from(&b[12..20])
            .map(u64::from_le_bytes)
            .map_err(|_| StateFormatError::BadMagic)?;
        let need = (HEADER_LEN as u64)
            .checked_add(len)
            .and_then(|n| n.checked_add(TRAILER_LEN as u64))
            .ok_or(StateFormatError::Truncated {
                have: b.len(),
                need: u64::MAX,
            })?;
        if (b.len() as u64) < need {
            return Err(StateFormatError::Truncated {
                have: b.len(),
                need,
            });
        }
        // `need` <= b.len(), so it fits usize.
        let end = need as usize;
        if b.len() > end {
            return Err(StateFormatError::TrailingBytes(b.len() - end));
        }
        let payload = &b[HEADER_LEN..end - TRAILER_LEN];
        let stored = word(end - TRAILER_LEN).map_err(|_| StateFormatError::BadMagic)?;
        let computed = crc32(payload);
        if stored != computed {
            return Err(StateFormatError::Checksum { stored, computed });
        }
        let (state, rest) =
            postcard::take_from_bytes::<VmState>(payload).map_err(StateFormatError::Decode)?;
        if !rest.is_empty() {
            return Err(StateFormatError::PayloadTrailing(rest.len()));
        }
        Ok(state)
    }
}

/// What a restore could not reproduce exactly. The VM is usable; the caller decides
/// whether these matter (e.g. log them, or refuse to fail over).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// MSRs KVM refused to set here; they keep the values KVM gave the new vCPU.
    pub refused_msrs: Vec<RefusedMsr>,
    /// MSRs KVM listed but would not read on the source, per vCPU (not in the state).
    pub unreadable_msrs: Vec<(u8, u32)>,
    /// vCPUs whose TSC frequency differs and could not be set: `(vcpu, saved, host)`.
    pub tsc_khz_mismatch: Vec<(u8, u32, u32)>,
}

impl RestoreReport {
    /// True when the restored VM is an exact copy of the captured one.
    pub fn is_exact(&self) -> bool {
        self.refused_msrs.is_empty()
            && self.unreadable_msrs.is_empty()
            && self.tsc_khz_mismatch.is_empty()
    }
}

/// CRC-32 (IEEE 802.3, reflected, as zlib computes it).
fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in data {
        c = table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[cfg(test)]
mod tests;
