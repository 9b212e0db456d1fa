//! dlaunch: an MPI-native batch launcher for HPC allocations.
pub mod plan;
pub mod sched;
pub mod spec;
pub mod topo;
