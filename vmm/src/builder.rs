//! Builds a running VM from a `VmConfig`.
