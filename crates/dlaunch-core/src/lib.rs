//! dlaunch's functional core: every decision dlaunch makes, as pure functions of data.
//!
//! Nothing here talks to MPI, hwloc, the CUDA driver, processes, signals, the clock or the
//! filesystem (the shell crate `dlaunch` does, and hands the results in: `now`, the job file's
//! bytes, a [`spec::Probe`] for paths the job file names). So all of it is unit-tested on any
//! machine, and `scripts/check-core.sh` keeps it that way.
pub mod compat;
pub mod control;
mod deps;
pub mod env;
pub mod events;
pub mod exit_code;
pub mod explain;
pub mod frame;
pub mod graph;
pub mod journal;
pub mod layout;
pub mod lease;
pub mod ledger;
pub mod plan;
pub mod report;
pub mod returned;
pub mod sched;
pub mod spec;
pub mod substitute;
pub mod summary;
#[cfg(test)]
mod testing;
pub mod topo;
pub mod view;
pub mod wire;
pub mod worker;
