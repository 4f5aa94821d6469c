//! Debian's QEMU as a peer to measure twinrun against in the same run (REFERENCES.md,
//! "QEMU as a peer"): installing it (`scripts/install-qemu.sh`, with `--peers`), the
//! bare multiboot guest it can run fast here (`benches/peers/guest.c`), QEMU processes
//! and their QMP client, and an uncapped live migration read from `query-migrate`.
//! Used by the `migrate` section.
//!
//! Ported from the unfinished `qemu-peers` branch (066318f): the QMP client and the
//! process/migration driver as they were; that branch's initial-sync comparison
//! (its `sync.rs`, `tcp.rs` and section) is not ported.

pub mod qemu;
pub mod qmp;
