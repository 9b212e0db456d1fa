use std::path::Path;
use std::time::{Duration, SystemTime};

use super::*;
use crate::events::{Assigned, Event};
use crate::spec::{Job, Resources};

fn at(seconds: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + seconds)
}

fn job(tasks: &str) -> Job {
    let text = format!("[job]\nname = \"j\"\nmaster_ports = \"30000-30001\"\n{tasks}");
    crate::spec::parse(Path::new("/tmp/dlaunch-test/job.toml"), text.as_bytes(), &crate::spec::TestProbe).unwrap()
}

const ONE: &str = "[[tasks]]\nname = \"t\"\ncommand = \"run\"\n";

fn started(deadline: Option<SystemTime>) -> Event {
    Event::RunStarted {
        run: 0,
        time: at(0),
        version: String::new(),
        world_size: 2,
        tasks: 10,
        slurm_job_id: None,
        job: None,
        kept: 0,
        deadline,
        backfill_limit: Some(8),
    }
}

fn joined(slots: u32) -> Event {
    Event::WorkerJoined { rank: 1, host: "n1".into(), capacity: Capacity { slots, cpus: 8, gpus: 0, memory: 1 << 30 } }
}

fn running(task: &str, ports: Vec<u16>) -> Event {
    Event::AttemptStarted {
        task: task.into(),
        attempt: 0,
        time: at(1),
        processes: vec![Assigned {
            rank: 1,
            host: "n1".into(),
            resources: Resources { cpus: 1, gpus: 0, memory: 0 },
            ports,
        }],
    }
}

fn view(events: &[Event]) -> RunView {
    let mut view = RunView::default();
    events.iter().for_each(|e| view.apply(e));
    view
}

fn why(job: &Job, task: &str, view: &RunView, now: SystemTime) -> Explanation {
    let question =
        Question { task, template: &job.templates[0], master_ports: job.master_ports, status: None, ahead: 0, now };
    explain(&question, view)
}

#[test]
fn a_task_needing_more_time_than_the_allocation_has_left_waits_for_the_next() {
    let job = job(&ONE.replace("\"run\"\n", "\"run\"\nwalltime = \"2h\"\n"));
    let short = view(&[started(Some(at(3600))), joined(4)]);
    let e = why(&job, "t", &short, at(600));
    assert_eq!(e.state, "queued");
    assert_eq!(e.reasons.len(), 1, "{e:?}");
    assert!(e.reasons[0].starts_with("walltime: it needs 2h of allocation time"), "{e:?}");
    assert!(e.reasons[0].contains("the allocation has 50m left"), "{e:?}");
    // Time enough: walltime is not the cause, and the answer says so.
    let long = view(&[started(Some(at(3 * 3600))), joined(4)]);
    let e = why(&job, "t", &long, at(600));
    assert!(e.reasons[0].starts_with("there is room for it now"), "{e:?}");
    assert!(e.reasons.last().unwrap().ends_with("is left: enough"), "{e:?}");
    // No time limit known: the requirement is still named.
    let e = why(&job, "t", &view(&[started(None), joined(4)]), at(600));
    assert!(e.reasons.last().unwrap().ends_with("it does not start when less is left"), "{e:?}");
}

#[test]
fn a_host_out_of_master_ports_is_named_as_the_shortage() {
    let job = job(ONE);
    // Four slots, two busy: room by resources, but both ports of 30000-30001 are taken.
    let full = view(&[started(None), joined(4), running("a", vec![30000]), running("b", vec![30001])]);
    let e = why(&job, "t", &full, at(10));
    assert_eq!(e.reasons[0], "it needs 1 CPU(s), 0 GPU(s), no memory limit, and no worker has that free now", "{e:?}");
    assert_eq!(e.reasons[1], "rank 1 on n1: ports: needs 1, 0 free of 2 in master_ports 30000-30001 on n1");
    // Journals from before ports were recorded: each running process holds at least one.
    let old = view(&[started(None), joined(4), running("a", vec![]), running("b", vec![])]);
    assert_eq!(why(&job, "t", &old, at(10)).reasons, e.reasons);
    // One port free: it fits.
    let one_free = view(&[started(None), joined(4), running("a", vec![30000])]);
    assert!(why(&job, "t", &one_free, at(10)).reasons[0].starts_with("there is room for it now"));
}

#[test]
fn a_task_that_used_up_its_backfill_budget_holds_the_queue() {
    let job = job(ONE);
    let held = view(&[
        started(None),
        joined(1),
        running("a", vec![30000]),
        Event::QueueHeld { task: "g".into(), overtaken: 8, time: at(5) },
    ]);
    let e = why(&job, "g", &held, at(10));
    assert_eq!(
        e.reasons[0],
        "backfill budget: tasks behind it were started 8 times while it did not fit, its budget of 8; nothing queued behind it starts until it does"
    );
    assert!(e.reasons[1].starts_with("it needs 1 CPU(s)"), "then why it does not fit: {e:?}");
    // Another task waits behind it, though there would be room for that one.
    let freed = view(&[started(None), joined(2), Event::QueueHeld { task: "g".into(), overtaken: 8, time: at(5) }]);
    let e = why(&job, "t", &freed, at(10));
    assert_eq!(e.reasons.len(), 1, "{e:?}");
    assert!(e.reasons[0].starts_with("backfill budget: task g was overtaken 8 times and holds the queue since"));
    // Once g starts, the queue moves again.
    let mut moving = freed.clone();
    moving.apply(&running("g", vec![30000]));
    assert!(why(&job, "t", &moving, at(10)).reasons[0].starts_with("there is room for it now"));
}
