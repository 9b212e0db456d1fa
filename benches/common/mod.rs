//! What the benches share: they drive the real coordinator core, which starts from a
//! `run_started` event like rank 0's.

use std::time::SystemTime;

use dlaunch_core::events::Event;

/// The `run_started` of a fresh run of `tasks` tasks on `world_size` ranks.
pub fn run_started(world_size: u32, tasks: usize) -> Event {
    Event::RunStarted {
        run: 0,
        time: SystemTime::now(),
        version: String::new(),
        world_size,
        tasks,
        slurm_job_id: None,
        job: None,
        kept: 0,
        deadline: None,
        backfill_limit: None,
    }
}
