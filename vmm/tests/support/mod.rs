//! Shared by the vmm integration tests (each test binary declares `mod support;` and
//! uses part of it): the test guest and its files and configs, a hand-assembled guest
//! that dirties chosen pages, and the TAP side of the NIC tests.
#![allow(dead_code, unused_imports)]

pub mod flat_dirty_guest;
pub mod guest;
pub mod tap;
