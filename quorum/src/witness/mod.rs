//! The witness: a small authenticated UDP service on a third machine that grants each
//! protected VM's fencing generations by compare-and-set, for many pairs at once.
pub mod core;
pub mod ops;
pub mod server;
pub mod store;
pub mod wire;
