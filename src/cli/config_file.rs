//! Reading a VM config file.
//!
//! The file has the fields of [`VmConfig`], but `mem_mib`, `vcpus`, `payload` and
//! `payload.elf` may be left out there and given by flags or defaults instead. So it is
//! read into [`FileConfig`], a mirror of `VmConfig` with those fields optional; the
//! nested types (`Workloads`, `DiskConfig`, ...) are `VmConfig`'s own, and every level
//! denies unknown fields. Errors carry the file name, line and column.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use vmm::config::{ConsoleConfig, DiskConfig, NetConfig, Workloads};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub mem_mib: Option<u64>,
    pub vcpus: Option<u8>,
    pub payload: Option<FilePayload>,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    #[serde(default)]
    pub console: ConsoleConfig,
}

/// Mirror of `vmm::config::Payload` with the ELF optional.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum FilePayload {
    TestGuest {
        elf: Option<PathBuf>,
        #[serde(default)]
        workloads: Workloads,
    },
    /// A stock Linux kernel (`vmm::config::Payload::Linux`).
    Linux {
        kernel: Option<PathBuf>,
        #[serde(default)]
        initrd: Option<PathBuf>,
        #[serde(default)]
        cmdline: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}:{column}: {message}", path.display())]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

/// Reads and parses `path`.
pub fn load(path: &Path) -> Result<FileConfig, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Parses `text`, naming `path` in errors.
pub fn parse(path: &Path, text: &str) -> Result<FileConfig, ConfigFileError> {
    toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        let offset = refine_unknown_field(text, offset, e.message()).unwrap_or(offset);
        let (line, column) = line_column(text, offset);
        ConfigFileError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            message: e.message().trim().to_string(),
        }
    })
}

/// serde's internally tagged enums (`payload`) buffer their content, so an unknown key
/// inside one is reported at the start of the enclosing table. Point at the key itself:
/// the first line at or after `from` that assigns it.
fn refine_unknown_field(text: &str, from: usize, message: &str) -> Option<usize> {
    let name = message.strip_prefix("unknown field `")?.split('`').next()?;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let start = pos;
        pos += line.len();
        if pos <= from {
            continue;
        }
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix(name) else {
            continue;
        };
        if rest.trim_start().starts_with(['=', '.']) {
            return Some(start + (line.len() - trimmed.len()));
        }
    }
    None
}

/// 1-based line and column (in characters) of byte `offset` of `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::config::{Payload, VmConfig};

    #[test]
    fn unknown_key_names_file_and_line() {
        let text = "mem_mib = 64\n[payload]\nkind = \"test-guest\"\n[payload.workloads]\ncounter = true\ncountr_rate = 5\n";
        let e = parse(Path::new("vm.toml"), text).unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with("vm.toml:6:"), "{msg}");
        assert!(msg.contains("countr_rate"), "{msg}");
    }

    #[test]
    fn syntax_error_names_line() {
        let e = parse(Path::new("x.toml"), "mem_mib = 64\nvcpus = = 2\n").unwrap_err();
        assert!(e.to_string().starts_with("x.toml:2:"), "{e}");
    }

    #[test]
    fn wrong_type_names_line() {
        let e = parse(Path::new("x.toml"), "\n\nvcpus = \"two\"\n").unwrap_err();
        assert!(e.to_string().starts_with("x.toml:3:"), "{e}");
    }

    #[test]
    fn partial_file_is_accepted() {
        let c = parse(
            Path::new("x.toml"),
            "[console]\nsink = \"file\"\npath = \"/tmp/c\"\n",
        )
        .unwrap();
        assert!(c.mem_mib.is_none() && c.payload.is_none());
        assert_eq!(
            c.console,
            ConsoleConfig::File {
                path: "/tmp/c".into()
            }
        );
    }

    #[test]
    fn missing_file_is_named() {
        let e = load(Path::new("/nonexistent/twinrun.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/twinrun.toml"), "{e}");
    }

    /// Every `VmConfig` must also read as a `FileConfig`: catches a field added to
    /// `VmConfig` that the mirror lacks.
    #[test]
    fn mirror_accepts_full_vm_config() {
        let full = VmConfig {
            mem_mib: 256,
            vcpus: 2,
            payload: Payload::TestGuest {
                elf: "/g".into(),
                workloads: Workloads::default(),
            },
            disks: vec![DiskConfig {
                path: "/d".into(),
                read_only: true,
                io_engine: Default::default(),
                serial: Some("s".into()),
            }],
            nets: vec![NetConfig {
                tap: "t".into(),
                mac: "02:00:00:00:00:01".into(),
            }],
            console: ConsoleConfig::File { path: "/c".into() },
        };
        let text = toml::to_string(&full).unwrap();
        let c = parse(Path::new("x"), &text).unwrap();
        assert_eq!(c.mem_mib, Some(256));
        assert_eq!(c.disks, full.disks);
    }
}
