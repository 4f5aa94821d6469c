//! Where twinrun keeps per-VM runtime files (control sockets) and persistent state
//! (snapshots), and which VM names are valid.

use std::path::PathBuf;

pub const DEFAULT_RUN_DIR: &str = "/run/twinrun";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/twinrun";
/// Name of a VM started without `--name`.
pub const DEFAULT_VM_NAME: &str = "vm0";

/// `$TWINRUN_RUN_DIR`, or /run/twinrun.
pub fn run_dir() -> PathBuf {
    std::env::var_os("TWINRUN_RUN_DIR").map_or_else(|| DEFAULT_RUN_DIR.into(), PathBuf::from)
}

/// `$TWINRUN_STATE_DIR`, or /var/lib/twinrun.
pub fn state_dir() -> PathBuf {
    std::env::var_os("TWINRUN_STATE_DIR").map_or_else(|| DEFAULT_STATE_DIR.into(), PathBuf::from)
}

/// The control socket of VM `name`.
pub fn control_socket(name: &str) -> PathBuf {
    run_dir().join(format!("{name}.sock"))
}

/// The snapshot directory of VM `name`.
pub fn snapshot_dir(name: &str) -> PathBuf {
    state_dir().join(name).join("snapshots")
}

/// A VM name becomes a file name: 1-64 of `[A-Za-z0-9_.-]`, not starting with a dot.
pub fn check_vm_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "bad VM name {name:?}: use 1-64 letters, digits, '_', '-' or '.', not starting with '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn vm_names() {
        assert!(super::check_vm_name("vm0").is_ok());
        assert!(super::check_vm_name("a-b_c.d").is_ok());
        for bad in ["", ".x", "a/b", "..", "a b", &"x".repeat(65)] {
            assert!(super::check_vm_name(bad).is_err(), "{bad}");
        }
    }
}
