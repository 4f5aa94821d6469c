//! Pure logic of the twinrun test guest: everything that does not touch hardware, so it
//! can be unit-tested on the host with `cargo test --lib`. The freestanding binary
//! (`src/main.rs`) drives devices and calls into these modules.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod dirtyfill;
pub mod linebuf;
pub mod pace;
pub mod record;
pub mod resp;
pub mod store;
