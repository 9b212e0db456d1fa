use std::time::{Duration, SystemTime};

use super::*;
use crate::events::{Ending, ProcessResult};

fn at(seconds: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + seconds)
}

fn started(run: u32, tasks: usize, kept: usize) -> Event {
    Event::RunStarted {
        run,
        time: at(0),
        version: String::new(),
        world_size: 2,
        tasks,
        slurm_job_id: None,
        kept,
        deadline: None,
        backfill_limit: None,
        job: None,
    }
}

fn joined(rank: u32, slots: u32, gpus: u32) -> Event {
    Event::WorkerJoined { rank, host: "n1".into(), capacity: Capacity { slots, cpus: 8, gpus, memory: 1 << 30 } }
}

fn attempt(task: &str, attempt: u32, start: u64, rank: u32, gpus: u32) -> Event {
    Event::AttemptStarted {
        task: task.into(),
        attempt,
        time: at(start),
        processes: vec![Assigned {
            rank,
            host: "n1".into(),
            resources: Resources { cpus: 2, gpus, memory: 0 },
            ports: vec![],
        }],
    }
}

fn ended(task: &str, attempt: u32, status: AttemptStatus, retry: bool, start: u64, end: u64, rank: u32) -> Event {
    Event::AttemptEnded {
        task: task.into(),
        attempt,
        status: status.clone(),
        reason: if status == AttemptStatus::Succeeded { String::new() } else { "exit 1".into() },
        retry,
        processes: vec![ProcessResult {
            process: 0,
            rank,
            host: "n1".into(),
            cpus: "0-1".into(),
            gpus: vec!["0".into()],
            ending: Ending::Exited { code: i32::from(status != AttemptStatus::Succeeded) },
            start: Some(at(start)),
            end: at(end),
        }],
    }
}

fn fold(events: &[Event]) -> RunView {
    let mut view = RunView::default();
    events.iter().for_each(|e| view.apply(e));
    view
}

#[test]
fn counts_follow_attempts_retries_and_cancellation() {
    let view = fold(&[
        started(0, 5, 0),
        joined(1, 2, 2),
        attempt("a", 0, 0, 1, 1),
        attempt("b", 0, 0, 1, 1),
        ended("a", 0, AttemptStatus::Succeeded, false, 0, 10, 1),
        ended("b", 0, AttemptStatus::Failed, true, 0, 5, 1),
        attempt("b", 1, 5, 1, 1),
        ended("b", 1, AttemptStatus::Failed, false, 5, 10, 1),
        attempt("c", 0, 10, 1, 1),
        Event::TaskCancelled { task: "d".into(), time: at(10) },
    ]);
    let c = view.counts();
    assert_eq!((c.total, c.succeeded, c.failed, c.cancelled, c.running, c.queued), (5, 1, 1, 1, 1, 1));
    assert_eq!(view.retried, 1);
    assert_eq!(view.failed["b"].reason, "exit 1");
    // 3 settled in 20 s: 0.15/s; 2 left (c running, e queued): ETA 13 s.
    let (rate, eta) = view.rate_and_eta(at(20));
    assert!((rate.unwrap() - 0.15).abs() < 1e-9);
    assert_eq!(eta.unwrap().as_secs(), 13);
    // Slot use over 20 s on 2 slots: 10 + 5 + 5 finished, c running for 10: 30 / 40.
    let u = &view.utilisation(at(20))[0];
    assert!((u.slots.unwrap() - 0.75).abs() < 1e-9, "{u:?}");
    assert_eq!((u.processes_now, u.busy_now.gpus, u.busy_now.cpus), (1, 1, 2));
}

#[test]
fn a_resumed_run_counts_what_earlier_runs_kept_and_left() {
    let view = fold(&[
        started(0, 3, 0),
        attempt("a", 0, 0, 1, 0),
        ended("a", 0, AttemptStatus::Succeeded, false, 0, 1, 1),
        attempt("b", 0, 1, 1, 0),
        ended("b", 0, AttemptStatus::Failed, false, 1, 2, 1),
        attempt("c", 0, 2, 1, 0),
        // dlaunch was killed here: c was running; the next run keeps a and b's failure.
        started(1, 3, 1),
    ]);
    let c = view.counts();
    assert_eq!((c.succeeded, c.failed, c.running, c.queued), (1, 1, 0, 1));
    assert_eq!(view.next_run(), NextRun { to_run: 1, kept: 1, failed: 1, cancelled: 0 });
    // --retry-failed starts b again: it is no longer counted as failed.
    let mut view = view;
    view.apply(&attempt("b", 1, 3, 1, 0));
    assert_eq!((view.counts().failed, view.counts().running), (0, 1));
}

#[test]
fn a_snapshot_plus_the_tail_is_the_whole_fold() {
    let events = [
        started(0, 4, 0),
        joined(1, 4, 0),
        attempt("a", 0, 0, 1, 0),
        attempt("b", 0, 0, 1, 0),
        ended("a", 0, AttemptStatus::Succeeded, false, 0, 3, 1),
        ended("b", 0, AttemptStatus::Failed, false, 0, 4, 1),
        attempt("c", 0, 4, 1, 0),
        ended("c", 0, AttemptStatus::Cancelled, false, 4, 5, 1),
    ];
    let whole = fold(&events);
    for cut in 0..events.len() {
        let snapshot: RunView = serde_json::from_slice(&serde_json::to_vec(&fold(&events[..cut])).unwrap()).unwrap();
        let mut view = snapshot;
        events[cut..].iter().for_each(|e| view.apply(e));
        assert_eq!(view, whole, "cut at {cut}");
    }
}

#[test]
fn a_stderr_is_named_by_its_file_or_by_the_command_that_reads_its_records() {
    let out = std::path::Path::new("/runs/j");
    assert_eq!(stderr_hint(out, LogMode::Files, "t", 1, 0, 1), "/runs/j/tasks/t/attempt-1/stderr");
    assert_eq!(
        stderr_hint(out, LogMode::Framed, "t[a=it's]", 1, 0, 1),
        r"dlaunch logs /runs/j 't[a=it'\''s]' --attempt 1 --stderr"
    );
    assert_eq!(stderr_hint(out, LogMode::Framed, "g", 0, 3, 4), "dlaunch logs /runs/j g --attempt 0 --rank 3 --stderr");
}

#[test]
fn noteworthy_events_name_the_task_the_cause_and_the_log() {
    let line = noteworthy(&ended("b", 1, AttemptStatus::Failed, true, 0, 1, 3), |t, a, p, n| {
        format!("{t}/{a}/{p}/{n}/stderr")
    })
    .unwrap();
    assert_eq!(line, "task b attempt 1 failed on n1 (rank 3): exit 1; retrying — b/1/0/1/stderr");
    assert!(noteworthy(&ended("a", 0, AttemptStatus::Succeeded, false, 0, 1, 1), |_, _, _, _| String::new()).is_none());
    let held = Event::QueueHeld { task: "g".into(), overtaken: 8, time: at(0) };
    assert_eq!(
        noteworthy(&held, |_, _, _, _| String::new()).unwrap(),
        "task g was overtaken 8 times, its backfill budget: nothing queued behind it starts until it does"
    );
    assert_eq!(cpu_count("0-3,8,10-11"), 7);
    assert_eq!(cpu_count(""), 0);
}

#[test]
fn the_progress_line_is_compact() {
    let view =
        fold(&[started(0, 30, 0), attempt("a", 0, 0, 1, 0), ended("a", 0, AttemptStatus::Succeeded, false, 0, 2, 1)]);
    assert_eq!(progress_line(&view, at(10)), "1/30 done, 0 running, 29 queued, 6.0/min, ETA 4m 50s");
}
