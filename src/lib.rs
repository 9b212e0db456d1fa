//! dlaunch's imperative shell: MPI, hwloc and the CUDA driver, processes, signals and files.
//! Every decision is made by the pure core, `dlaunch_core`; this crate carries them out.
pub mod beneath;
pub mod check;
pub mod console;
pub mod discover;
pub mod guard;
pub mod host;
pub mod jobfile;
pub mod journal;
pub mod logging;
pub mod observe;
pub mod proc;
pub mod returned;
pub mod run;
pub mod signals;
pub mod slurm;
pub mod stage;
pub mod transport;
pub mod wait_for;
pub mod worker;
