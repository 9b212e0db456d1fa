//! Events the core's unit tests share: a run's start, an attempt's start and end.

use std::time::SystemTime;

use crate::events::{Assigned, AttemptStatus, Ending, Event, ProcessResult};

pub(crate) fn run_started() -> Event {
    Event::RunStarted {
        run: 0,
        time: SystemTime::UNIX_EPOCH,
        version: String::new(),
        world_size: 1,
        tasks: 0,
        slurm_job_id: None,
        job: None,
        kept: 0,
        deadline: None,
        backfill_limit: None,
    }
}

pub(crate) fn started(id: &str, attempt: u32) -> Event {
    Event::AttemptStarted {
        task: id.into(),
        attempt,
        time: SystemTime::UNIX_EPOCH,
        processes: vec![Assigned { rank: 1, host: "h".into(), resources: Default::default(), ports: vec![] }],
    }
}

pub(crate) fn ended(id: &str, attempt: u32, status: AttemptStatus, retry: bool) -> Event {
    let code = if status == AttemptStatus::Succeeded { 0 } else { 1 };
    Event::AttemptEnded {
        task: id.into(),
        attempt,
        status,
        reason: String::new(),
        retry,
        processes: vec![ProcessResult {
            process: 0,
            rank: 1,
            host: "h".into(),
            cpus: String::new(),
            gpus: vec![],
            ending: Ending::Exited { code },
            start: None,
            end: SystemTime::UNIX_EPOCH,
        }],
    }
}
