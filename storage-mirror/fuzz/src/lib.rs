//! Shared by the storage-mirror fuzz targets: a reader over the fuzz input and a
//! scratch directory (tmpfs when there is one: the parsers under test read real files,
//! the way the replicas do).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Takes bytes off the front of the input; runs dry into zeros.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    pub fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let k = n.min(self.0.len());
        let (a, b) = self.0.split_at(k);
        self.0 = b;
        a.to_vec()
    }

    pub fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0).to_vec()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// This process's scratch directory, emptied for each input: under
/// `$TWINRUN_FUZZ_SCRATCH` (the smoke script's own directory, removed after the run),
/// else under /dev/shm.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if let Some(d) = std::env::var_os("TWINRUN_FUZZ_SCRATCH") {
            PathBuf::from(d)
        } else if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        base.join(format!("twinrun-sm-fuzz-{}", std::process::id()))
    })
}

/// A fresh, empty scratch directory.
pub fn fresh() -> &'static Path {
    let d = scratch();
    let _ = std::fs::remove_dir_all(d);
    std::fs::create_dir_all(d).expect("scratch directory");
    d
}

/// Creates a zero image of `len` bytes.
pub fn image(dir: &Path, name: &str, len: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p)
        .and_then(|f| f.set_len(len))
        .expect("scratch image");
    p
}
