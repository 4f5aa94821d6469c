//! `twinrun-lab`: "physical machines as network namespaces on one machine", for the
//! tests, the benchmarks and `twinrun demo`.
//!
//! - [`netns`]: network namespaces as RAII guards, commands and threads inside one;
//! - [`topology`]: the pair topology (PM1, PM2, LAN bridge, a TAP per PM bridged onto the
//!   LAN, a client, N A-Links) with optional witnesses and a management network, or
//!   one PM and a client;
//! - [`tap`]: TAP names, AF_PACKET sockets and frame capture, Ethernet/ARP helpers;
//! - [`tcp`]: the two ends of a TCP stream between namespaces;
//! - [`process`]: child processes (and process groups) killed and reaped on drop;
//! - [`reaper`]: a watcher that cleans up after a test process killed without its
//!   destructors (its namespaces, daemons and VMMs);
//! - [`guest`]: the one locator (and builder) of the test guest;
//! - [`resp`]: a RESP client for the guest's kv server, and [`kvload`]: the kv load
//!   client of the demo and the FT tests (one connection across a failover);
//! - [`console`]: following a console file and checking the console stream and the
//!   disk records the guest writes, and [`verdict`]: a load run judged against it;
//! - [`node_toml`]: one node's `twinrund` configuration file;
//! - [`rng`]: the one seeded RNG of tests and simulations.
//!
//! Everything that creates something (namespace, interface, process) removes it on
//! drop, also when the owner panics; names carry a per-process unique prefix so that
//! tests run in parallel, by several users of one machine, do not collide.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod console;
pub mod guest;
pub mod ip;
pub mod kvload;
pub mod netns;
pub mod node_toml;
pub mod process;
pub mod reaper;
pub mod resp;
pub mod rng;
pub mod tap;
pub mod tcp;
pub mod topology;
pub mod verdict;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use netns::NetNs;
pub use process::Proc;
pub use reaper::Reaper;
pub use rng::Rng;
pub use topology::Topology;

/// What went wrong setting something up.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A command ran and failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    /// A system call or a file operation failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// A request this crate cannot fulfil (a name too long, a missing part...).
    #[error("{0}")]
    Invalid(String),
    /// Something did not happen in time.
    #[error("{0}")]
    Timeout(String),
    /// Building something (the test guest) failed.
    #[error("{0}")]
    Build(String),
}

impl LabError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
        let what = what.into();
        move |source| LabError::Io { what, source }
    }
}

/// A name prefix unique among the processes using this crate at the same time:
/// `<tag><pid % 10000><n % 100>` (`tag` of at most 3 bytes keeps it within 9 bytes,
/// which leaves room for the suffixes interface names get within Linux's 15).
pub fn unique_prefix(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}{}{}",
        std::process::id() % 10_000,
        N.fetch_add(1, Ordering::Relaxed) % 100
    )
}

/// Calls `f` every `every` until it returns `Some` (returned) or `timeout` passes
/// (`None`). `f` runs at least once.
pub fn poll<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// True if `program` is an executable file on `$PATH`.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
}

/// Whether this process can build topologies: root, with `ip` (iproute2) installed.
pub fn can_build_namespaces() -> bool {
    nix::unistd::geteuid().is_root() && have("ip")
}
