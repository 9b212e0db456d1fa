//! dlaunch: an MPI-native batch launcher for HPC allocations.
pub mod spec;
pub mod topo;
