//! dlaunch: an MPI-native batch launcher for HPC allocations.
pub mod plan;
pub mod spec;
pub mod topo;
