//! dlaunch: an MPI-native batch launcher for HPC allocations.
pub mod control;
pub mod env;
pub mod events;
pub mod layout;
pub mod ledger;
pub mod plan;
pub mod sched;
pub mod spec;
pub mod topo;
pub mod wire;
