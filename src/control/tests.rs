//! Unit tests of `control`, compiled only with #[cfg(test)] (declared in its parent module).
use std::path::Path;

use super::*;
use crate::sched::Capacity;
use crate::wire::Order;

const T0: SystemTime = SystemTime::UNIX_EPOCH;

fn job(text: &str) -> Arc<Job> {
    Arc::new(crate::spec::parse(Path::new("/tmp/dlaunch-test/job.toml"), text.as_bytes()).unwrap())
}

fn hello(host: &str, slots: u32) -> WorkerHello {
    WorkerHello {
        host: host.into(),
        addr: format!("addr-{host}"),
        capacity: Capacity { slots, cpus: 8, gpus: 0, memory: 1 << 40 },
        description: String::new(),
    }
}

fn started_event() -> Event {
    Event::RunStarted { run: 0, time: T0, version: "test".into(), world_size: 3, tasks: 0, slurm_job_id: None, kept: 0 }
}

fn control(text: &str, workers: &[(u32, WorkerHello)]) -> Result<Control, Unfit> {
    let job = job(text);
    let tasks = Arc::new(crate::plan::expand(&job));
    let plan = crate::ledger::plan_resume(&Ledger::default(), &tasks, Default::default());
    Control::new(job, tasks, workers, Ledger::default(), &plan, started_event(), Instant::now())
}

fn two_workers() -> Vec<(u32, WorkerHello)> {
    vec![(1, hello("n1", 2)), (2, hello("n2", 2))]
}

fn launches(effects: &[Effect]) -> Vec<(u32, Launch)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { rank, order: Order::Launch(l) } => Some((*rank, (**l).clone())),
            _ => None,
        })
        .collect()
}

fn sends(effects: &[Effect]) -> Vec<(u32, Order)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { rank, order } if !matches!(order, Order::Launch(_)) => Some((*rank, order.clone())),
            _ => None,
        })
        .collect()
}

fn ended_events(effects: &[Effect]) -> Vec<(String, AttemptStatus, bool, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Record(Event::AttemptEnded { task, status, retry, reason, .. }) => {
                Some((task.clone(), status.clone(), *retry, reason.clone()))
            }
            _ => None,
        })
        .collect()
}

fn end(launch: &Launch, ending: Ending) -> ProcessEnd {
    ProcessEnd {
        key: launch.key,
        process: launch.process,
        cpus: "0".into(),
        gpus: vec![],
        ending,
        start: Some(T0),
        end: T0,
    }
}

fn env<'a>(launch: &'a Launch, key: &str) -> &'a str {
    launch.env.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or("")
}

const SWEEP: &str = "[job]\nname = \"j\"\n[[tasks]]\nname = \"t\"\ncommand = \"run {x}\"\nmatrix = { x = [1, 2, 3, 4, 5] }\nretries = 1\n";

#[test]
fn tasks_run_once_each_and_the_run_finishes() {
    let mut c = control(SWEEP, &two_workers()).unwrap();
    let effects = c.take_effects();
    assert!(matches!(effects[0], Effect::Record(Event::RunStarted { .. })));
    assert_eq!(effects.iter().filter(|e| matches!(e, Effect::Record(Event::TaskDefined { .. }))).count(), 5);
    let mut seen = Vec::new();
    for _ in 0..10 {
        c.dispatch(None, T0);
        let launched = launches(&c.take_effects());
        assert!(launched.len() <= 4, "never more than the slots");
        for (rank, launch) in launched {
            assert_eq!(env(&launch, "DLAUNCH_WORKER_RANK"), rank.to_string());
            assert_eq!(env(&launch, "MASTER_ADDR"), format!("addr-n{rank}"));
            seen.push(launch.task_id.clone());
            c.process_ended(rank, end(&launch, Ending::Exited { code: 0 }));
        }
    }
    seen.sort();
    assert_eq!(seen, ["t[x=1]", "t[x=2]", "t[x=3]", "t[x=4]", "t[x=5]"]);
    assert_eq!(c.counts(), (5, 0, 0));
}

#[test]
fn failures_are_retried_with_a_new_attempt_then_given_up() {
    let mut c = control(SWEEP.replace("[1, 2, 3, 4, 5]", "[1]").as_str(), &two_workers()).unwrap();
    c.take_effects();
    let mut attempts = Vec::new();
    for _ in 0..2 {
        c.dispatch(None, T0);
        let (rank, launch) = launches(&c.take_effects()).remove(0);
        attempts.push(env(&launch, "DLAUNCH_ATTEMPT").to_string());
        assert!(launch.log_dir.ends_with(format!("attempt-{}", launch.key.attempt)));
        c.process_ended(rank, end(&launch, Ending::Exited { code: 3 }));
        let ended = ended_events(&c.take_effects());
        assert_eq!(ended[0].1, AttemptStatus::Failed);
        assert_eq!(ended[0].3, "exit 3");
        assert_eq!(ended[0].2, attempts.len() == 1, "retry once, then no more");
    }
    assert_eq!(attempts, ["0", "1"]);
    c.dispatch(None, T0);
    assert!(launches(&c.take_effects()).is_empty());
    assert!(c.finished());
    assert_eq!(c.counts(), (0, 1, 0));
}

const GANG: &str = "[job]\nname = \"j\"\n[[tasks]]\nname = \"g\"\ncommand = \"train\"\nprocesses = 4\nretries = 1\n";

#[test]
fn a_gang_starts_whole_fails_whole_and_retries_whole() {
    let mut c = control(GANG, &two_workers()).unwrap();
    c.take_effects();
    c.dispatch(None, T0);
    let effects = c.take_effects();
    let launched = launches(&effects);
    assert_eq!(launched.len(), 4);
    let ranks: Vec<&str> = launched.iter().map(|(_, l)| env(l, "RANK")).collect();
    assert_eq!(ranks, ["0", "1", "2", "3"]);
    let local: Vec<&str> = launched.iter().map(|(_, l)| env(l, "LOCAL_RANK")).collect();
    assert_eq!(local, ["0", "1", "0", "1"]);
    assert!(launched.iter().all(|(_, l)| env(l, "MASTER_ADDR") == "addr-n1"));
    assert!(launched.iter().all(|(_, l)| l.log_dir.ends_with(format!("attempt-0/rank-{}", l.process))));
    // Process 2 fails: the others are told to stop, and report so.
    let (rank, failing) = &launched[2];
    c.process_ended(*rank, end(failing, Ending::Signaled { signal: 11, core_dumped: true }));
    let stops = sends(&c.take_effects());
    assert_eq!(stops.len(), 2, "one stop per rank still running a process: {stops:?}");
    c.process_ended(launched[0].0, end(&launched[0].1, Ending::Stopped));
    c.process_ended(launched[1].0, end(&launched[1].1, Ending::Stopped));
    assert!(ended_events(&c.take_effects()).is_empty(), "not over until every process reported");
    c.process_ended(launched[3].0, end(&launched[3].1, Ending::Stopped));
    let effects = c.take_effects();
    let ended = ended_events(&effects);
    assert_eq!(ended[0].1, AttemptStatus::Failed);
    assert_eq!(ended[0].3, "process 2: killed by SIGSEGV (core dumped)");
    assert!(ended[0].2);
    c.dispatch(None, T0);
    let again = launches(&c.take_effects());
    assert_eq!(again.len(), 4);
    assert!(again.iter().all(|(_, l)| l.key.attempt == 1));
    assert_ne!(env(&again[0].1, "MASTER_PORT"), env(&launched[0].1, "MASTER_PORT"), "a retry gets a fresh port");
}

#[test]
fn a_gang_can_end_when_process_zero_succeeds() {
    let mut c = control(&GANG.replace("retries = 1", "success = \"rank0\""), &two_workers()).unwrap();
    c.take_effects();
    c.dispatch(None, T0);
    let launched = launches(&c.take_effects());
    c.process_ended(launched[0].0, end(&launched[0].1, Ending::Exited { code: 0 }));
    assert_eq!(sends(&c.take_effects()).len(), 2);
    for (rank, launch) in &launched[1..] {
        c.process_ended(*rank, end(launch, Ending::Stopped));
    }
    assert_eq!(ended_events(&c.take_effects())[0].1, AttemptStatus::Succeeded);
    assert_eq!(c.counts(), (1, 0, 0));
}

#[test]
fn lost_workers_get_no_more_work_and_their_tasks_move() {
    let mut c = control(SWEEP, &two_workers()).unwrap();
    c.take_effects();
    c.dispatch(None, T0);
    let launched = launches(&c.take_effects());
    let on_two: Vec<&Launch> = launched.iter().filter(|(r, _)| *r == 2).map(|(_, l)| l).collect();
    assert_eq!(on_two.len(), 2);
    let now = Instant::now();
    c.heard_from(1, now + Duration::from_secs(400));
    c.check_health(now + Duration::from_secs(400));
    let effects = c.take_effects();
    assert!(effects.iter().any(|e| matches!(e, Effect::Record(Event::WorkerLost { rank: 2, .. }))));
    let ended = ended_events(&effects);
    assert_eq!(ended.len(), 2);
    assert!(
        ended.iter().all(|(_, status, retry, reason)| *status == AttemptStatus::Interrupted
            && *retry
            && reason == "worker lost")
    );
    for (rank, launch) in launched.iter().filter(|(r, _)| *r == 1) {
        c.process_ended(*rank, end(launch, Ending::Exited { code: 0 }));
    }
    // Everything else, including the moved tasks, now runs on rank 1.
    let mut ran = 0;
    for _ in 0..10 {
        if c.finished() {
            break;
        }
        c.dispatch(None, T0);
        for (rank, launch) in launches(&c.take_effects()) {
            assert_eq!(rank, 1);
            c.process_ended(rank, end(&launch, Ending::Exited { code: 0 }));
            ran += 1;
        }
    }
    assert!(c.finished());
    assert_eq!(ran, 3, "the two moved tasks and the one never started");
    assert_eq!(c.counts(), (5, 0, 0));
}

#[test]
fn stop_interrupts_everything_and_leaves_the_queue_for_the_next_run() {
    let mut c = control(SWEEP, &two_workers()).unwrap();
    c.take_effects();
    c.dispatch(None, T0);
    let launched = launches(&c.take_effects());
    c.stop("SIGTERM received", Instant::now());
    let orders = sends(&c.take_effects());
    assert_eq!(orders, [(1, Order::Interrupt), (2, Order::Interrupt)]);
    assert!(!c.finished());
    for (rank, launch) in &launched {
        c.process_ended(*rank, end(launch, Ending::Interrupted));
    }
    let ended = ended_events(&c.take_effects());
    assert!(ended.iter().all(|(_, s, retry, _)| *s == AttemptStatus::Interrupted && !retry));
    c.dispatch(None, T0);
    assert!(launches(&c.take_effects()).is_empty(), "no dispatch while stopping");
    assert!(c.finished());
    assert_eq!(c.not_started(), 1);
    assert_eq!(c.counts(), (0, 0, 5));
}

#[test]
fn tasks_that_fit_nowhere_are_refused_at_start() {
    let err = control(&SWEEP.replace("retries = 1", "cpus = 64"), &two_workers()).err().expect("unfit");
    let text = err.to_string();
    assert!(text.contains("task t needs 64 CPUs"), "{text}");
    assert!(text.contains("the largest worker has 2 slots, 8 CPUs"), "{text}");
    assert!(control(&GANG.replace("processes = 4", "processes = 5"), &two_workers()).is_err());
}

#[test]
fn tasks_needing_more_time_than_is_left_wait_for_the_next_allocation() {
    let mut c = control(&SWEEP.replace("retries = 1", "walltime = \"2h\""), &two_workers()).unwrap();
    c.take_effects();
    c.dispatch(Some(Duration::from_secs(3600)), T0);
    assert!(launches(&c.take_effects()).is_empty());
    assert!(c.finished());
    assert_eq!(c.not_started(), 5);
}

#[test]
fn gangs_that_lost_their_room_fail_instead_of_waiting_forever() {
    let mut c = control(GANG, &two_workers()).unwrap();
    c.take_effects();
    c.worker_lost(2, "test", T0);
    c.dispatch(None, T0);
    let ended = ended_events(&c.take_effects());
    assert_eq!(ended[0].3, "no healthy worker left can run it");
    assert!(c.finished());
    assert_eq!(c.counts(), (0, 1, 0));
}

#[test]
fn tasks_behind_a_gang_that_lost_its_room_still_run() {
    // Small tasks overtake the waiting gang until its backfill budget is spent; then a worker
    // is lost and the gang can never start: it fails, and the small tasks behind it run.
    let text = "[job]\nname = \"j\"\n[[tasks]]\nname = \"a\"\ncommand = \"a {x}\"\nmatrix = { x = [1, 2, 3, 4] }\n[[tasks]]\nname = \"g\"\ncommand = \"train\"\nprocesses = 4\n[[tasks]]\nname = \"b\"\ncommand = \"b {x}\"\nmatrix = { x = [1, 2, 3, 4, 5, 6, 7, 8] }\n";
    let mut c = control(text, &two_workers()).unwrap();
    c.take_effects();
    c.dispatch(None, T0);
    let mut running = launches(&c.take_effects());
    let (mut ran, mut ended) = (Vec::new(), Vec::new());
    while let Some((rank, launch)) = running.pop() {
        ran.push(launch.task_id.clone());
        c.process_ended(rank, end(&launch, Ending::Exited { code: 0 }));
        if ran.len() == 4 {
            c.worker_lost(2, "test", T0);
            running.retain(|(r, _)| *r != 2);
        }
        c.dispatch(None, T0);
        let effects = c.take_effects();
        running.extend(launches(&effects));
        ended.extend(ended_events(&effects));
    }
    assert!(ended.iter().any(|(id, _, _, reason)| id == "g" && reason == "no healthy worker left can run it"));
    assert!(c.finished());
    let (succeeded, failed, not_run) = c.counts();
    assert_eq!((failed, not_run), (1, 0), "only the gang fails; ran {ran:?}");
    assert_eq!(succeeded, 12);
}

#[test]
fn tasks_wait_for_ports_when_a_host_has_none_left() {
    let text = SWEEP.replace("retries = 1", "").replace("[job]\n", "[job]\nmaster_ports = \"30000-30001\"\n");
    let mut c = control(&text, &[(1, hello("n1", 4))]).unwrap();
    c.take_effects();
    c.dispatch(None, T0);
    let first = launches(&c.take_effects());
    assert_eq!(first.len(), 2, "two ports, two tasks, though four slots are free");
    c.dispatch(None, T0);
    assert!(launches(&c.take_effects()).is_empty());
    c.process_ended(1, end(&first[0].1, Ending::Exited { code: 0 }));
    c.dispatch(None, T0);
    let next = launches(&c.take_effects());
    assert_eq!(next.len(), 1);
    assert_eq!(env(&next[0].1, "MASTER_PORT"), env(&first[0].1, "MASTER_PORT"), "the freed port is reused");
}

#[test]
fn cancelled_tasks_stop_and_are_neither_retried_nor_failed() {
    // One slot per worker: x=1 and x=2 run, x=3..5 wait.
    let mut c = control(SWEEP, &[(1, hello("n1", 1)), (2, hello("n2", 1))]).unwrap();
    c.take_effects();
    c.dispatch(None, T0);
    let launched = launches(&c.take_effects());
    assert_eq!(launched.len(), 2);
    let (other_rank, other) = launched.iter().find(|(_, l)| l.task_id == "t[x=2]").cloned().unwrap();
    let (rank, running) = launched.into_iter().find(|(_, l)| l.task_id == "t[x=1]").unwrap();
    c.cancel(&["t[x=1]".into(), "t[x=4]".into(), "nope".into()], T0);
    let effects = c.take_effects();
    assert!(effects.iter().any(|e| matches!(e, Effect::Record(Event::TaskCancelled { task, .. }) if task == "t[x=4]")));
    assert_eq!(sends(&effects), [(rank, Order::Stop { key: running.key })]);
    // The process ends of the stop signal; a cancelled attempt is recorded as such, not retried.
    c.process_ended(rank, end(&running, Ending::Stopped));
    let ended = ended_events(&c.take_effects());
    assert_eq!(ended, [("t[x=1]".to_string(), AttemptStatus::Cancelled, false, "cancelled".to_string())]);
    c.process_ended(other_rank, end(&other, Ending::Exited { code: 0 }));
    let mut started = Vec::new();
    for _ in 0..10 {
        c.dispatch(None, T0);
        for (rank, launch) in launches(&c.take_effects()) {
            started.push(launch.task_id.clone());
            c.process_ended(rank, end(&launch, Ending::Exited { code: 0 }));
        }
        c.take_effects();
    }
    started.sort();
    assert_eq!(started, ["t[x=3]", "t[x=5]"], "cancelled tasks never start again");
    let counts = c.ledger().counts(&crate::plan::expand(&job(SWEEP)));
    assert_eq!((counts.succeeded, counts.failed, counts.cancelled, counts.not_run), (3, 0, 2, 0));
}
