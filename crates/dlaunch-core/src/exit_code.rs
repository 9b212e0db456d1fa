//! Exit codes of `dlaunch run`, also documented in the README and understood by
//! slurm/dlaunch.sbatch.

pub const SUCCESS: i32 = 0;
pub const TASKS_FAILED: i32 = 1;
pub const BAD_INPUT: i32 = 2;
/// Work is left (interrupted, or the allocation ran out of time): run again to finish.
pub const INCOMPLETE: i32 = 3;
/// dlaunch itself could not do its job (lost output directory, MPI failure, ...).
pub const INTERNAL: i32 = 4;
