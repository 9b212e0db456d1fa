//! Unit tests of `lease`: a `Broker` driven by fake nodes, whose leaders report what their own
//! `Control` would journal.
use std::path::Path;

use super::*;
use crate::events::AttemptStatus;
use crate::testing::{ended, run_started, started};

const T0: SystemTime = SystemTime::UNIX_EPOCH;

fn job(text: &str) -> Arc<Job> {
    let job =
        crate::spec::parse(Path::new("/tmp/dlaunch-test/job.toml"), text.as_bytes(), &crate::spec::TestProbe).unwrap();
    Arc::new(job)
}

fn hello(host: &str, gpus: u32) -> WorkerHello {
    WorkerHello {
        host: host.into(),
        addr: format!("addr-{host}"),
        capacity: Capacity { slots: 4, cpus: 8, gpus, memory: 1 << 40 },
        description: String::new(),
    }
}

/// A node whose leader is `leader`, with `workers` workers of `gpus` GPUs each, ranks from the
/// leader's on.
fn node(leader: u32, host: &str, workers: u32, gpus: u32) -> Node {
    Node { leader, workers: (leader..leader + workers).map(|rank| (rank, hello(host, gpus))).collect() }
}

fn broker_after(text: &str, nodes: Vec<Node>, ledger: Ledger, now: Instant) -> Result<Broker, Unfit> {
    let job = job(text);
    let tasks = Arc::new(crate::plan::expand(&job).unwrap());
    let plan = crate::ledger::decide_resume(&ledger, &tasks, Default::default());
    Broker::new(job, tasks, nodes, ledger, &plan, run_started(), now)
}

fn broker(text: &str, nodes: Vec<Node>) -> Broker {
    let mut b = broker_after(text, nodes, Ledger::default(), Instant::now()).unwrap();
    b.take_effects();
    b
}

/// A lease sent: (leader, lease, [(task id, attempt)]).
type Lease = (u32, u32, Vec<(String, u32)>);

/// The leases sent.
fn leases(b: &Broker, effects: &[Effect]) -> Vec<Lease> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { rank, down: Down::Lease { lease, tasks } } => {
                let ids = tasks.iter().map(|l| (b.tasks[l.task as usize].id.clone(), l.attempt)).collect();
                Some((*rank, *lease, ids))
            }
            _ => None,
        })
        .collect()
}

/// The leases sent since the last look.
fn sent(b: &mut Broker) -> Vec<Lease> {
    let effects = b.take_effects();
    leases(b, &effects)
}

/// The ids of the tasks leased to `leader` (one lease expected at most).
fn leased_ids(b: &mut Broker, leader: u32) -> Vec<String> {
    let effects = b.take_effects();
    let all = leases(b, &effects);
    assert!(all.iter().all(|(rank, _, _)| *rank == leader), "{all:?}");
    all.into_iter().flat_map(|(_, _, tasks)| tasks.into_iter().map(|(id, _)| id)).collect()
}

/// A node that has taken in `leases` leases says it wants `want`, not idle.
fn wants(b: &mut Broker, leader: u32, want: u32, leases: u32) {
    b.node_said(leader, want, leases, false, None, Instant::now());
}

/// Node 1's leader gave up its worker rank 2 (its journal line).
fn lost_rank_2() -> Event {
    Event::WorkerLost { rank: 2, host: "n1".into(), reason: "no heartbeat for 3s".into() }
}

/// How many tasks failed, ended not run, and were not started, as the summary counts them.
fn failed_not_run_not_started(b: &Broker) -> (usize, usize, usize) {
    let counts = b.ledger().counts(&b.tasks);
    (counts.failed, counts.not_run, b.not_started())
}

/// The leader runs `id` once, ending with `status`.
fn ran(b: &mut Broker, leader: u32, id: &str, attempt: u32, status: AttemptStatus, retry: bool) {
    b.from_node(leader, &started(id, attempt));
    b.from_node(leader, &ended(id, attempt, status, retry));
}

fn skipped(effects: &[Effect]) -> Vec<(String, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Record(Event::TaskSkipped { task, reason }) => Some((task.clone(), reason.clone())),
            _ => None,
        })
        .collect()
}

fn sends(effects: &[Effect]) -> Vec<(u32, Down)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Send { rank, down } => Some((*rank, down.clone())),
            _ => None,
        })
        .collect()
}

fn ids(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

const SWEEP: &str = "[job]\nname = \"j\"\n[[tasks]]\nname = \"t\"\ncommand = \"run {x}\"\nmatrix = { x = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] }\n";

fn sweep(range: std::ops::RangeInclusive<u32>) -> Vec<String> {
    range.map(|x| format!("t[x={x}]")).collect()
}

#[test]
fn setting_up_records_the_run_its_workers_and_its_tasks() {
    let mut b =
        broker_after(SWEEP, vec![node(1, "n1", 2, 0), node(3, "n2", 2, 0)], Ledger::default(), Instant::now()).unwrap();
    let effects = b.take_effects();
    assert!(matches!(effects[0], Effect::Record(Event::RunStarted { .. })));
    let joined: Vec<u32> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Record(Event::WorkerJoined { rank, .. }) => Some(*rank),
            _ => None,
        })
        .collect();
    assert_eq!(joined, [1, 2, 3, 4]);
    assert_eq!(effects.iter().filter(|e| matches!(e, Effect::Record(Event::TaskDefined { .. }))).count(), 10);
    assert_eq!(b.ledger().get("t[x=1]").map(|r| r.status), Some(TaskStatus::Pending));
    assert_eq!(b.not_started(), 10);
    assert_eq!(b.leaders().collect::<Vec<_>>(), [1, 3]);
    assert!(!b.finished(), "no node said anything yet");
}

#[test]
fn leases_go_out_in_fifo_order_across_nodes_numbered_per_leader() {
    let mut b = broker(SWEEP, vec![node(1, "n1", 2, 0), node(3, "n2", 2, 0)]);
    wants(&mut b, 1, 3, 0);
    let attempts0 = |r: std::ops::RangeInclusive<u32>| sweep(r).into_iter().map(|id| (id, 0)).collect::<Vec<_>>();
    assert_eq!(sent(&mut b), [(1, 1, attempts0(1..=3))]);
    wants(&mut b, 3, 2, 0);
    assert_eq!(sent(&mut b), [(3, 1, attempts0(4..=5))], "each leader's leases from 1");
    // Rank 1 has not taken lease 1 in: its want does not count those 3 tasks yet.
    wants(&mut b, 1, 3, 0);
    assert!(sent(&mut b).is_empty(), "the 3 on their way cover what it wants");
    wants(&mut b, 1, 5, 0);
    assert_eq!(sent(&mut b), [(1, 2, attempts0(6..=7))], "only what it wants beyond them");
    wants(&mut b, 1, 4, 2);
    assert_eq!(sent(&mut b), [(1, 3, attempts0(8..=10))], "the rest, and no more");
    assert_eq!(b.not_started(), 10, "leased, none started");
    b.from_node(1, &started("t[x=1]", 0));
    assert_eq!(b.not_started(), 9);
}

const MIXED: &str = "[job]\nname = \"m\"\n\
[[tasks]]\nname = \"g\"\ncommand = \"train {x}\"\ngpus = 2\nmatrix = { x = [1, 2, 3] }\n\
[[tasks]]\nname = \"c\"\ncommand = \"prep {x}\"\nmatrix = { x = [1, 2, 3] }\n";

#[test]
fn a_gpu_task_goes_only_to_a_node_with_gpus_and_holds_back_no_other_node() {
    let mut b = broker(MIXED, vec![node(1, "cpu", 2, 0), node(3, "gpu", 1, 2)]);
    wants(&mut b, 1, 2, 0);
    assert_eq!(leased_ids(&mut b, 1), ["c[x=1]", "c[x=2]"], "the GPU tasks at the head stay for the GPU node");
    wants(&mut b, 3, 2, 0);
    assert_eq!(leased_ids(&mut b, 3), ["g[x=1]", "g[x=2]"], "oldest first");
    wants(&mut b, 1, 4, 1);
    assert_eq!(leased_ids(&mut b, 1), ["c[x=3]"], "all the CPU node can take");
    wants(&mut b, 3, 4, 1);
    assert_eq!(leased_ids(&mut b, 3), ["g[x=3]"], "2-GPU tasks fit the GPU node, CPU tasks too: none left");
}

#[test]
fn a_task_no_single_node_holds_is_refused_naming_the_layout() {
    let text = "[job]\nname = \"u\"\n[[tasks]]\nname = \"wide\"\ncommand = \"x\"\nprocesses = 4\ngpus = 1\n";
    let nodes = || vec![node(1, "a", 2, 1), node(3, "b", 2, 1)];
    let Err(unfit) = broker_after(text, nodes(), Ledger::default(), Instant::now()) else {
        panic!("4 GPUs over two nodes of 2 fit the allocation, but no node");
    };
    let message = unfit.to_string();
    for part in [
        "task wide",
        "1 GPUs",
        "4 processes",
        "layout = \"nodes\" runs each task within one node",
        "the largest node has 2 workers with 16 CPUs, 2 GPUs",
        "use layout = \"flat\" for tasks that span nodes",
    ] {
        assert!(message.contains(part), "{part:?} not in {message}");
    }
    assert!(broker_after(text, vec![node(1, "a", 4, 1)], Ledger::default(), Instant::now()).is_ok());
}

const PIPELINE: &str = "[job]\nname = \"p\"\n\
[[tasks]]\nname = \"train\"\ncommand = \"true\"\nretries = 1\n\
[[tasks]]\nname = \"eval\"\ncommand = \"true\"\nafter = [\"train\"]\n\
[[tasks]]\nname = \"report\"\ncommand = \"true\"\nafter = [\"eval\"]\n";

#[test]
fn a_dependent_is_leased_once_its_dependency_succeeded_even_to_another_node() {
    let mut b = broker(PIPELINE, vec![node(1, "n1", 1, 0), node(2, "n2", 1, 0)]);
    wants(&mut b, 1, 8, 0);
    assert_eq!(leased_ids(&mut b, 1), ["train"], "eval and report wait");
    wants(&mut b, 2, 8, 0);
    assert!(leased_ids(&mut b, 2).is_empty());
    ran(&mut b, 1, "train", 0, AttemptStatus::Failed, true);
    wants(&mut b, 1, 0, 1);
    assert!(b.take_effects().is_empty(), "a failure with a retry left settles nothing");
    ran(&mut b, 1, "train", 1, AttemptStatus::Succeeded, false);
    // Rank 1 is busy (wants nothing): eval goes to rank 2, which wanted and got nothing.
    b.node_said(1, 0, 1, false, None, Instant::now());
    assert_eq!(leased_ids(&mut b, 2), ["eval"]);
    ran(&mut b, 2, "eval", 0, AttemptStatus::Succeeded, false);
    wants(&mut b, 2, 8, 1);
    assert_eq!(leased_ids(&mut b, 2), ["report"]);
}

#[test]
fn a_dependency_that_finally_failed_skips_its_dependents_once() {
    let mut b = broker(PIPELINE, vec![node(1, "n1", 1, 0)]);
    wants(&mut b, 1, 8, 0);
    assert_eq!(leased_ids(&mut b, 1), ["train"]);
    ran(&mut b, 1, "train", 0, AttemptStatus::Failed, true);
    assert!(skipped(&b.take_effects()).is_empty());
    ran(&mut b, 1, "train", 1, AttemptStatus::Failed, false);
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        skipped(&b.take_effects()),
        [pair("eval", "dependency failed: train"), pair("report", "dependency failed: eval")]
    );
    // The same line again (a leader resending a batch) settles nothing twice.
    b.from_node(1, &ended("train", 1, AttemptStatus::Failed, false));
    assert!(skipped(&b.take_effects()).is_empty());
    b.node_said(1, 8, 1, true, None, Instant::now());
    assert!(sent(&mut b).is_empty());
    assert!(b.finished());
    assert_eq!(b.ledger().get("report").map(|r| r.status), Some(TaskStatus::Skipped));
    assert_eq!(b.not_started(), 0);
}

#[test]
fn leases_carry_the_attempt_numbers_earlier_runs_reached() {
    let mut first = broker(SWEEP, vec![node(1, "n1", 1, 0)]);
    wants(&mut first, 1, 2, 0);
    first.take_effects();
    // Interrupted twice, then the run died with t[x=2] running: its next attempt is 1.
    ran(&mut first, 1, "t[x=1]", 0, AttemptStatus::Interrupted, false);
    ran(&mut first, 1, "t[x=1]", 1, AttemptStatus::Interrupted, false);
    first.from_node(1, &started("t[x=2]", 0));
    let ledger = std::mem::take(&mut first.ledger);
    let mut b = broker_after(SWEEP, vec![node(1, "n1", 1, 0)], ledger, Instant::now()).unwrap();
    b.take_effects();
    wants(&mut b, 1, 3, 0);
    let expected = vec![("t[x=1]".to_string(), 2), ("t[x=2]".to_string(), 1), ("t[x=3]".to_string(), 0)];
    assert_eq!(sent(&mut b), [(1, 1, expected)]);
}

#[test]
fn cancel_takes_queued_and_waiting_tasks_here_and_forwards_leased_ones() {
    let text = format!("{SWEEP}{}", &PIPELINE["[job]\nname = \"p\"\n".len()..]);
    let mut b = broker(&text, vec![node(1, "n1", 1, 0), node(2, "n2", 1, 0)]);
    wants(&mut b, 1, 3, 0);
    assert_eq!(leased_ids(&mut b, 1), sweep(1..=3));
    wants(&mut b, 2, 1, 0);
    assert_eq!(leased_ids(&mut b, 2), sweep(4..=4));
    b.from_node(1, &started("t[x=1]", 0));
    ran(&mut b, 1, "t[x=2]", 0, AttemptStatus::Succeeded, false);
    let before = b.not_started();
    let asked = ids(&["t[x=5]", "t[x=1]", "eval", "t[x=3]", "t[x=4]", "t[x=2]", "nope"]);
    b.cancel(&asked, T0);
    let effects = b.take_effects();
    let cancelled: Vec<&str> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Record(Event::TaskCancelled { task, .. }) => Some(task.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(cancelled, ["t[x=5]", "eval"], "queued and waiting: cancelled here");
    assert_eq!(skipped(&effects), [("report".to_string(), "dependency cancelled: eval".to_string())]);
    assert_eq!(
        sends(&effects),
        [(1, Down::Cancel { tasks: ids(&["t[x=1]", "t[x=3]"]) }), (2, Down::Cancel { tasks: ids(&["t[x=4]"]) })],
        "leased: one Cancel per leader holding any, started or not; t[x=2] finished"
    );
    assert_eq!(b.not_started(), before - 3, "t[x=5], eval, and report that waited for it");
    // The nodes' answers settle their tasks; the queue goes on after t[x=5].
    b.from_node(1, &Event::TaskCancelled { task: "t[x=3]".into(), time: T0 });
    wants(&mut b, 2, 2, 1);
    assert_eq!(leased_ids(&mut b, 2), sweep(6..=7));
}

#[test]
fn stop_goes_to_every_leader_once_and_ends_leasing() {
    let mut b = broker(SWEEP, vec![node(1, "n1", 1, 0), node(2, "n2", 1, 0)]);
    wants(&mut b, 1, 2, 0);
    b.take_effects();
    b.node_said(2, 2, 0, false, Some("SIGTERM reached rank 2".into()), Instant::now());
    let stop = Down::Stop { reason: "SIGTERM reached rank 2".into() };
    assert_eq!(sends(&b.take_effects()), [(1, stop.clone()), (2, stop)], "no lease to rank 2, which asked for 2");
    b.stop("walltime");
    assert!(b.take_effects().is_empty(), "once");
    assert_eq!(b.stopping(), Some("SIGTERM reached rank 2"));
    wants(&mut b, 1, 5, 1);
    assert!(b.take_effects().is_empty(), "no more leases");
    b.node_said(2, 5, 0, true, None, Instant::now());
    assert!(!b.finished(), "rank 1 still runs");
    b.node_said(1, 5, 1, true, None, Instant::now());
    assert!(b.finished(), "stopped: 8 tasks still queued do not matter");
    assert_eq!(b.not_started(), 10);
}

#[test]
fn finished_waits_for_a_lease_in_flight_even_at_a_node_that_said_idle() {
    let text = "[job]\nname = \"j\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\nmatrix = { x = [1, 2] }\n";
    let mut b = broker(text, vec![node(1, "n1", 1, 0)]);
    b.node_said(1, 2, 0, true, None, Instant::now());
    assert_eq!(leased_ids(&mut b, 1).len(), 2);
    assert!(!b.finished(), "it said idle before it got the lease");
    b.node_said(1, 2, 0, true, None, Instant::now());
    assert!(!b.finished(), "still not taken in");
    b.node_said(1, 0, 1, false, None, Instant::now());
    assert!(!b.finished());
    ran(&mut b, 1, "t[x=1]", 0, AttemptStatus::Succeeded, false);
    ran(&mut b, 1, "t[x=2]", 0, AttemptStatus::Failed, false);
    b.node_said(1, 2, 1, true, None, Instant::now());
    assert!(b.finished());
    let counts = b.ledger().counts(&b.tasks);
    assert_eq!((counts.succeeded, counts.failed), (1, 1));
}

#[test]
fn nothing_queued_fits_a_node_that_wants_more_so_the_run_is_done() {
    // The GPU node took every GPU task and says it wants nothing more (what it holds cannot
    // start in the time left); the CPU node wants more but fits none of them.
    let mut b = broker(MIXED, vec![node(1, "cpu", 1, 0), node(2, "gpu", 1, 2)]);
    wants(&mut b, 1, 8, 0);
    assert_eq!(leased_ids(&mut b, 1).len(), 3);
    b.node_said(1, 8, 1, true, None, Instant::now());
    b.node_said(2, 0, 0, true, None, Instant::now());
    assert!(b.finished(), "the GPU tasks left fit only a node that wants nothing");
    b.node_said(2, 1, 0, true, None, Instant::now());
    assert!(!b.finished(), "now it wants one: leased");
    assert_eq!(leased_ids(&mut b, 2), ["g[x=1]"]);
}

#[test]
fn a_silent_leader_is_lost_and_stops_the_run() {
    let t0 = Instant::now();
    let mut b = broker_after(SWEEP, vec![node(1, "n1", 2, 0), node(3, "n2", 1, 0)], Ledger::default(), t0).unwrap();
    b.take_effects();
    let timeout = b.heartbeat_timeout();
    b.heard_from(3, t0 + timeout);
    b.check_health(t0 + timeout);
    assert!(b.lost_leaders().is_empty() && b.stopping().is_none(), "silent for the timeout exactly: not yet");
    b.check_health(t0 + timeout + Duration::from_secs(1));
    assert_eq!(b.lost_leaders().iter().copied().collect::<Vec<_>>(), [1]);
    let reason = b.stopping().unwrap_or_default().to_string();
    for part in ["rank 1", "n1", &format_duration(timeout + Duration::from_secs(1)), "resume"] {
        assert!(reason.contains(part), "{part:?} not in {reason}");
    }
    let effects = b.take_effects();
    assert_eq!(sends(&effects), [(3, Down::Stop { reason: reason.clone() })], "not to the lost leader");
    let lost: Vec<u32> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Record(Event::WorkerLost { rank, .. }) => Some(*rank),
            _ => None,
        })
        .collect();
    assert_eq!(lost, [1, 2], "its workers are lost with it");
    b.check_health(t0 + timeout * 3);
    assert_eq!(b.lost_leaders().len(), 2);
    assert!(b.take_effects().iter().all(|e| !matches!(e, Effect::Send { .. })), "nobody left to tell");
    assert!(b.finished());
}

#[test]
fn a_leased_task_cancelled_at_its_node_skips_what_waits_for_it() {
    let mut b = broker(PIPELINE, vec![node(1, "n1", 1, 0)]);
    wants(&mut b, 1, 8, 0);
    assert_eq!(leased_ids(&mut b, 1), ["train"]);
    b.cancel(&ids(&["train"]), T0);
    assert_eq!(sends(&b.take_effects()), [(1, Down::Cancel { tasks: ids(&["train"]) })]);
    ran(&mut b, 1, "train", 0, AttemptStatus::Cancelled, false);
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        skipped(&b.take_effects()),
        [pair("eval", "dependency cancelled: train"), pair("report", "dependency cancelled: eval")]
    );
    b.node_said(1, 8, 1, true, None, Instant::now());
    assert!(b.finished() && b.not_started() == 0);
}

#[test]
fn a_resumed_run_skips_at_once_what_waits_for_a_task_that_failed_before() {
    let mut first = broker(PIPELINE, vec![node(1, "n1", 1, 0)]);
    wants(&mut first, 1, 8, 0);
    first.take_effects();
    ran(&mut first, 1, "train", 0, AttemptStatus::Failed, true);
    ran(&mut first, 1, "train", 1, AttemptStatus::Failed, false);
    let ledger = std::mem::take(&mut first.ledger);
    let mut b = broker_after(PIPELINE, vec![node(1, "n1", 1, 0)], ledger, Instant::now()).unwrap();
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        skipped(&b.take_effects()),
        [pair("eval", "dependency failed: train"), pair("report", "dependency failed: eval")]
    );
    b.node_said(1, 8, 0, true, None, Instant::now());
    assert!(b.take_effects().is_empty(), "nothing to lease");
    assert!(b.finished() && b.not_started() == 0);
}

#[test]
fn a_resumed_run_skips_what_waits_for_a_task_cancelled_before_saying_so() {
    let mut first = broker(PIPELINE, vec![node(1, "n1", 1, 0)]);
    first.cancel(&ids(&["train"]), T0);
    let ledger = std::mem::take(&mut first.ledger);
    let mut b = broker_after(PIPELINE, vec![node(1, "n1", 1, 0)], ledger, Instant::now()).unwrap();
    let pair = |a: &str, b: &str| (a.to_string(), b.to_string());
    assert_eq!(
        skipped(&b.take_effects()),
        [pair("eval", "dependency cancelled: train"), pair("report", "dependency cancelled: eval")]
    );
}

// ---- Found in review (each failed on the code before its fix; the comments tell the defect as found) ----

/// Each task needs a whole node (2 processes of 8 CPUs, on nodes of two 8-CPU workers). Node
/// 1's leader gives up one of its workers (journaled, sent up); from then on its `Control`
/// fails at once, "no healthy worker left can run it", every such task it holds, and says it
/// wants more. Rank 0 keeps leasing it these tasks as if its shape had not changed: the whole
/// queue drains into failures while node 3, healthy, could run every one of them (in the flat
/// layout they would run on node 3's workers).
#[test]
fn a_node_that_lost_a_worker_is_not_leased_tasks_that_no_longer_fit_it() {
    use crate::control::{Control, Effect as NodeEffect};
    let text = "[job]\nname = \"w\"\nheartbeat_timeout = \"2s\"\n[[tasks]]\nname = \"pair\"\ncommand = \"x {i}\"\nprocesses = 2\ncpus = 8\nmatrix = { i = [1, 2, 3, 4, 5, 6] }\n";
    let t0 = Instant::now();
    let mut b = broker_after(text, vec![node(1, "n1", 2, 0), node(3, "n2", 2, 0)], Ledger::default(), t0).unwrap();
    b.take_effects();
    // Node 1's leader, a `Control` over ranks 1 and 2, as in `run/node.rs`.
    let mut leader = Control::for_node(Arc::clone(&b.job), Arc::clone(&b.tasks), &node(1, "n1", 2, 0).workers, t0);
    let later = t0 + Duration::from_secs(3);
    leader.heard_from(1, later);
    leader.check_health(later, T0);
    // Node 3 is busy with one task; node 1 has just lost rank 2.
    b.node_said(3, 1, 0, false, None, later);
    assert_eq!(leased_ids(&mut b, 3), ["pair[i=1]"]);
    b.node_said(3, 0, 1, false, None, later);
    let mut leases_to_1 = 0;
    for _ in 0..10 {
        for effect in leader.take_effects() {
            if let NodeEffect::Record(event) = effect {
                b.from_node(1, &event);
            }
        }
        b.node_said(1, 4, leases_to_1, leader.finished(), None, later);
        for (rank, down) in sends(&b.take_effects()) {
            if let (1, Down::Lease { lease, tasks }) = (rank, down) {
                leader.lease(&tasks);
                leases_to_1 = lease;
            }
        }
        leader.dispatch(None, T0);
    }
    let failed = b.ledger().counts(&b.tasks).failed;
    assert_eq!(failed, 0, "tasks that node 3 could run failed at node 1, which lost the worker they need");
}

/// Two idle nodes of 4 slots each (one worker of `hello`'s 4 slots), 10 tasks. Each leader
/// asks for its stock, 2 tasks per slot (`node::STOCK_PER_SLOT`): 8. Rank 0 gives the first to
/// ask all 8, of which it can start 4, and the second only the 2 left: 4 tasks wait queued at
/// node 1 while 2 of node 3's slots stay empty, for as long as node 1's first tasks run (and
/// nothing moves them later). The flat layout would start 8 at once. Rank 0 should fill free
/// slots everywhere before it stocks any node's queue.
#[test]
fn the_first_node_to_ask_does_not_hoard_tasks_while_another_nodes_slots_are_empty() {
    let mut b = broker(SWEEP, vec![node(1, "n1", 1, 0), node(3, "n2", 1, 0)]);
    // Both leaders answer Start at once, each wanting its stock.
    b.node_said(1, 8, 0, true, None, Instant::now());
    b.node_said(3, 8, 0, true, None, Instant::now());
    let leased = sent(&mut b);
    let to = |leader: u32| leased.iter().filter(|(rank, _, _)| *rank == leader).map(|(_, _, t)| t.len()).sum::<usize>();
    assert!(
        to(3) >= 4,
        "node 3 has 4 free slots but was leased {} tasks, node 1 {} (4 of them to wait): {leased:?}",
        to(3),
        to(1)
    );

    // Worse with the defaults: a worker's slots are unlimited, so a leader's stock is twice its
    // CPUs (`node::stock`), not what its GPUs can run. Three nodes of 4 one-GPU workers (8
    // CPUs each: a stock of 32), 12 one-GPU tasks: the first node takes all 12 and runs them
    // in three waves of 4, while 8 GPUs stay idle.
    let gpus = "[job]\nname = \"g\"\n[[tasks]]\nname = \"train\"\ncommand = \"t {x}\"\ngpus = 1\nmatrix = { x = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12] }\n";
    let mut b = broker(gpus, vec![node(1, "a", 4, 1), node(5, "b", 4, 1), node(9, "c", 4, 1)]);
    for leader in [1, 5, 9] {
        b.node_said(leader, 32, 0, true, None, Instant::now());
    }
    let leased = sent(&mut b);
    let to = |leader: u32| leased.iter().filter(|(rank, _, _)| *rank == leader).map(|(_, _, t)| t.len()).sum::<usize>();
    assert_eq!((to(1), to(5), to(9)), (4, 4, 4), "each node's 4 GPUs busy at once, as in the flat layout");
}

/// A task failed with a retry left, and its node holds the retry but cannot start it (less
/// time is left than its walltime): the node is idle and the run ends with the task not run.
/// The summary's reason is "{not_started} tasks need more time than is left in the
/// allocation" (`run::conclude`); the flat layout counts the held retry (it is in its queue),
/// rank 0 here counts only tasks leased and never started, so it says "0 tasks need more
/// time" about a run that left one task not run.
#[test]
fn a_retry_its_node_holds_but_cannot_start_counts_as_not_started() {
    let text = "[job]\nname = \"r\"\n[[tasks]]\nname = \"t\"\ncommand = \"x\"\nretries = 1\nwalltime = \"10m\"\n";
    let mut b = broker(text, vec![node(1, "n1", 1, 0)]);
    wants(&mut b, 1, 8, 0);
    assert_eq!(leased_ids(&mut b, 1), ["t"]);
    ran(&mut b, 1, "t", 0, AttemptStatus::Failed, true);
    // The retry waits at the node, which cannot start it in the time left: idle, wants 7.
    b.node_said(1, 7, 1, true, None, Instant::now());
    assert!(b.finished());
    assert_eq!(b.ledger().counts(&b.tasks).not_run, 1);
    assert_eq!(b.not_started(), 1, "\"0 tasks need more time than is left in the allocation\", one not run");
}

#[test]
fn tasks_a_node_hands_back_go_first_to_another_node_and_keep_their_attempt_numbers() {
    let mut b = broker(SWEEP, vec![node(1, "n1", 1, 0), node(3, "n2", 1, 0)]);
    wants(&mut b, 1, 3, 0);
    assert_eq!(leased_ids(&mut b, 1), sweep(1..=3));
    ran(&mut b, 1, "t[x=2]", 0, AttemptStatus::Failed, true);
    // Node 1 lost what it needs for x=2's retry and for x=3: they come back.
    b.handed_back(1, &[1, 2], T0);
    b.handed_back(1, &[7], T0);
    assert_eq!(b.not_started(), 10, "x=1 leased, x=2 and x=3 back in the queue, none started");
    wants(&mut b, 3, 3, 0);
    let leased = sent(&mut b);
    let tasks: Vec<(String, u32)> = leased.into_iter().flat_map(|(_, _, tasks)| tasks).collect();
    let pair = |id: &str, attempt: u32| (id.to_string(), attempt);
    assert_eq!(tasks, [pair("t[x=2]", 1), pair("t[x=3]", 0), pair("t[x=4]", 0)], "handed back first, in order");
}

// ---- Found in the second review (each failed on the code before its fix; the comments tell the defect as found) ----

/// One node, one worker of 4 GPUs. The queue is 4 one-GPU tasks (`early`), a 4-GPU task
/// (`big`), then a stream of 40 one-GPU tasks (`late`). The node runs 4 one-GPU tasks at once,
/// one 4-GPU task: `big`'s wave is 1, and `lease` compares it with everything the node holds,
/// of any template, so `big` is passed over by every lease while the node holds 2 tasks or
/// more, which it does for as long as `late` tasks come: it is leased only once the whole
/// stream has been. The flat layout overtakes a queued task at most `backfill_limit` times
/// (8 here) before it holds the queue for it; the node layout starves it without bound (with
/// more nodes too: each is held to 2 tasks for it).
#[test]
fn a_big_task_is_not_overtaken_without_bound_by_a_stream_of_small_ones() {
    let late: Vec<String> = (1..=40).map(|x| x.to_string()).collect();
    let text = format!(
        "[job]\nname = \"s\"\n\
[[tasks]]\nname = \"early\"\ncommand = \"a {{x}}\"\ngpus = 1\nmatrix = {{ x = [1, 2, 3, 4] }}\n\
[[tasks]]\nname = \"big\"\ncommand = \"b\"\ngpus = 4\n\
[[tasks]]\nname = \"late\"\ncommand = \"c {{x}}\"\ngpus = 1\nmatrix = {{ x = [{}] }}\n",
        late.join(", ")
    );
    let mut b = broker(&text, vec![node(1, "n1", 1, 4)]);
    // The node says its want (its stock, 2 per slot: 8) and ends its oldest task each turn.
    let (mut held, mut order, mut taken) = (VecDeque::new(), Vec::new(), 0);
    wants(&mut b, 1, 8, 0);
    for _ in 0..60 {
        for (_, lease, tasks) in sent(&mut b) {
            taken = lease;
            for (id, _) in tasks {
                order.push(id.clone());
                held.push_back(id);
            }
        }
        if order.iter().any(|id| id == "big") {
            break;
        }
        let Some(id) = held.pop_front() else { break };
        ran(&mut b, 1, &id, 0, AttemptStatus::Succeeded, false);
        wants(&mut b, 1, 8, taken);
    }
    let overtaken = order.iter().take_while(|id| *id != "big").filter(|id| id.starts_with("late")).count();
    assert!(
        order.iter().any(|id| id == "big") && overtaken <= 16,
        "big leased after {overtaken} later tasks (flat: at most 8 overtake it): {order:?}"
    );
}

/// `dlaunch cancel` of a task leased to node 1 is forwarded there (`Down::Cancel`), but node
/// 1's batch handing the task back (it lost the worker the task needs) crossed it: the node
/// no longer holds the task, so its `Control::cancel` finds it "neither queued nor running"
/// and does nothing, while rank 0 has queued it again and leases it to node 3, where it runs.
/// The user's cancel is lost without a word. Rank 0 should remember the cancels it forwarded
/// and record a task handed back after one as cancelled, not queue it.
#[test]
fn a_task_handed_back_while_its_cancel_is_on_the_way_stays_cancelled() {
    let mut b = broker(SWEEP, vec![node(1, "n1", 1, 0), node(3, "n2", 1, 0)]);
    wants(&mut b, 1, 3, 0);
    assert_eq!(leased_ids(&mut b, 1), sweep(1..=3));
    b.cancel(&ids(&["t[x=3]"]), T0);
    assert_eq!(sends(&b.take_effects()), [(1, Down::Cancel { tasks: ids(&["t[x=3]"]) })]);
    // Node 1's batch, sent before the Cancel reached it, hands t[x=3] back.
    b.handed_back(1, &[2], T0);
    wants(&mut b, 3, 3, 0);
    let to_3 = leased_ids(&mut b, 3);
    assert!(!to_3.contains(&"t[x=3]".to_string()), "cancelled by the user, then leased to node 3: {to_3:?}");
}

/// Node 1 (two workers of 8 CPUs) runs a long one-worker task (`solo`) and holds a leased
/// `pair` (2 processes of 8 CPUs: both workers), waiting for room. Its other worker is lost:
/// the pair can never run there again, and node 3, idle, could run it now. But the leader
/// hands back only from `fail_unrunnable`, which runs when nothing runs and nothing can start:
/// the pair waits at node 1, not started, for as long as `solo` runs (hours, for a training
/// run), and rank 0 leases it nowhere else. A node's leader should hand back what no longer
/// fits its node as soon as it loses the worker (or at its next dispatch), running tasks or
/// not.
#[test]
fn a_node_hands_back_what_no_longer_fits_it_even_while_other_tasks_run() {
    use crate::control::{Control, Effect as NodeEffect};
    let text = "[job]\nname = \"h\"\nheartbeat_timeout = \"2s\"\n\
[[tasks]]\nname = \"solo\"\ncommand = \"train {x}\"\ncpus = 8\nmatrix = { x = [1, 2] }\n\
[[tasks]]\nname = \"pair\"\ncommand = \"x\"\nprocesses = 2\ncpus = 8\n";
    let t0 = Instant::now();
    let mut b = broker_after(text, vec![node(1, "n1", 2, 0), node(3, "n2", 2, 0)], Ledger::default(), t0).unwrap();
    b.take_effects();
    let mut leader = Control::for_node(Arc::clone(&b.job), Arc::clone(&b.tasks), &node(1, "n1", 2, 0).workers, t0);
    // Node 3 takes solo[x=1] and soon runs it to its end: idle, it wants more.
    wants(&mut b, 3, 1, 0);
    assert_eq!(leased_ids(&mut b, 3), ["solo[x=1]"]);
    wants(&mut b, 1, 2, 0);
    let mut leased = Vec::new();
    for (_, down) in sends(&b.take_effects()) {
        if let Down::Lease { tasks, .. } = down {
            leased.extend(tasks);
        }
    }
    assert_eq!(leased.len(), 2, "solo[x=2] and pair, in queue order");
    leader.lease(&leased);
    leader.dispatch(None, T0);
    let mut solo_on = None;
    for effect in leader.take_effects() {
        if let NodeEffect::Record(event) = effect {
            if let Event::AttemptStarted { processes, .. } = &event {
                solo_on = processes.first().map(|p| p.rank);
            }
            b.from_node(1, &event);
        }
    }
    let solo_on = solo_on.expect("solo started; pair waits for both workers");
    // The worker that does not run solo falls silent and is given up.
    let later = t0 + Duration::from_secs(3);
    leader.heard_from(solo_on, later);
    leader.check_health(later, T0);
    leader.dispatch(None, T0);
    for effect in leader.take_effects() {
        if let NodeEffect::Record(event) = effect {
            b.from_node(1, &event);
        }
    }
    let other = if solo_on == 1 { 2 } else { 1 };
    assert_eq!(b.lost_workers().iter().copied().collect::<Vec<_>>(), [other], "journaled, and sent up");
    ran(&mut b, 3, "solo[x=1]", 0, AttemptStatus::Succeeded, false);
    b.node_said(3, 4, 1, true, None, Instant::now());
    assert!(sent(&mut b).is_empty(), "nothing queued at rank 0: the pair is at node 1");
    let back = leader.take_handed_back();
    assert_eq!(back, [2], "pair (task 2) no longer fits node 1, and node 3 is idle; node 1 held it: {back:?}");
}

/// Three nodes of 4 one-GPU workers (a leader's stock is 32: twice its CPUs), 60 one-GPU
/// tasks of a few milliseconds. Node 1 holds its three waves (12). It ends one and says so;
/// rank 0 sends it one more (lease 2). Before lease 2 arrives the node has run the other 7 and says
/// it is idle, having taken in lease 1 only. Rank 0 counts lease 2's task as held, so the
/// node is "idle with tasks in hand" (`stuck`): `lease` drops the wave cap and sends it all
/// it asks for, 31 tasks, on a node that runs 4 at once (three waves are 12), while nodes 5 and 9 have not had a
/// task: the hoarding the wave cap was made against, back whenever tasks are shorter than a
/// round trip to rank 0. A node is stuck only if it was idle after taking in every lease.
#[test]
fn a_node_idle_before_its_last_lease_arrived_is_not_taken_for_stuck() {
    let values: Vec<String> = (1..=60).map(|x| x.to_string()).collect();
    let text = format!(
        "[job]\nname = \"g\"\n[[tasks]]\nname = \"train\"\ncommand = \"t {{x}}\"\ngpus = 1\nmatrix = {{ x = [{}] }}\n",
        values.join(", ")
    );
    let mut b = broker(&text, vec![node(1, "a", 4, 1), node(5, "b", 4, 1), node(9, "c", 4, 1)]);
    b.node_said(1, 32, 0, true, None, Instant::now());
    let first = leased_ids(&mut b, 1);
    assert_eq!(first.len(), 12, "three waves of 4: {first:?}");
    ran(&mut b, 1, &first[0], 0, AttemptStatus::Succeeded, false);
    b.node_said(1, 32 - 3, 1, false, None, Instant::now());
    let second = leased_ids(&mut b, 1);
    assert_eq!(second.len(), 1, "one ended, one more: {second:?}");
    for id in &first[1..] {
        ran(&mut b, 1, id, 0, AttemptStatus::Succeeded, false);
    }
    // Idle, lease 2 not taken in yet.
    b.node_said(1, 32, 1, true, None, Instant::now());
    let third = leased_ids(&mut b, 1);
    assert!(third.len() < 12, "node 1 now holds {} tasks, 4 GPUs; nodes 5 and 9 none: {third:?}", 1 + third.len());
}

/// One node of two 8-CPU workers; each task is a pair of 8-CPU processes (the whole node).
/// The node loses a worker and hands back the two pairs it holds, as it should. But no node
/// of the run can hold a pair any more: rank 0 queues them, leases them nowhere, and the run
/// ends with them "not run", counted by `not_started`, so the summary's reason is "2 tasks
/// need more time than is left in the allocation" (exit code 3, INCOMPLETE) in a run with no
/// time limit at all. The flat layout fails them ("no healthy worker left can run it",
/// `Control::fail_unrunnable`; exit code 1). Rank 0 should fail what it is handed back when no
/// node left (not lost, in its shape now) fits it, as the flat coordinator does.
#[test]
fn tasks_handed_back_that_no_node_can_run_any_more_fail_as_in_the_flat_layout() {
    let text = "[job]\nname = \"w\"\n[[tasks]]\nname = \"pair\"\ncommand = \"x {i}\"\nprocesses = 2\ncpus = 8\nmatrix = { i = [1, 2] }\n";
    let mut b = broker(text, vec![node(1, "n1", 2, 0)]);
    wants(&mut b, 1, 8, 0);
    assert_eq!(leased_ids(&mut b, 1), ["pair[i=1]", "pair[i=2]"]);
    b.from_node(1, &lost_rank_2());
    b.handed_back(1, &[0, 1], T0);
    b.node_said(1, 8, 1, true, None, Instant::now());
    assert!(sent(&mut b).is_empty(), "no node fits a pair now");
    assert!(b.finished());
    assert_eq!(
        failed_not_run_not_started(&b),
        (2, 0, 0),
        "the flat layout fails both; here they end \"not run\" as if they needed more time than is left"
    );
}

// ---- Found in the third review (each failed on the code before its fix; the comments tell the defect as found) ----

/// The second review's hoarding test with two templates instead of one: three nodes of 4
/// one-GPU workers (a leader's stock is 32), 6 one-GPU `prep` and 6 one-GPU `train` tasks.
/// "A template's first wave goes to any node it fits, whatever else it holds": the first node
/// to ask takes the first wave of `prep` (4) and then the first wave of `train` (4) as well,
/// 8 tasks for its 4 GPUs, while node 9 gets none. The flat layout starts 12 at once; here
/// 4 GPUs stay idle and half the work runs in a second wave. Any job with several templates
/// (prep, train, eval) brings back the hoarding the wave cap was made against.
#[test]
fn a_first_wave_per_template_does_not_let_the_first_node_hoard_while_another_is_empty() {
    let text = "[job]\nname = \"two\"\n\
[[tasks]]\nname = \"prep\"\ncommand = \"p {x}\"\ngpus = 1\nmatrix = { x = [1, 2, 3, 4, 5, 6] }\n\
[[tasks]]\nname = \"train\"\ncommand = \"t {x}\"\ngpus = 1\nmatrix = { x = [1, 2, 3, 4, 5, 6] }\n";
    let mut b = broker(text, vec![node(1, "a", 4, 1), node(5, "b", 4, 1), node(9, "c", 4, 1)]);
    for leader in [1, 5, 9] {
        b.node_said(leader, 32, 0, true, None, Instant::now());
    }
    let leased = sent(&mut b);
    let to = |leader: u32| leased.iter().filter(|(rank, _, _)| *rank == leader).map(|(_, _, t)| t.len()).sum::<usize>();
    assert_eq!((to(1), to(5), to(9)), (4, 4, 4), "each node's 4 GPUs busy at once, as in the flat layout: {leased:?}");
}

/// Workers without a slot limit (the default) and `cpus = 0` tasks: a template's wave is
/// unbounded (`u32::MAX`), so `first` holds for every task and the first leader to ask is
/// leased its whole want (its stock, up to 4,096). Three nodes of one such worker, 30 tasks:
/// node 1 takes all 30 and runs them at once while nodes 2 and 3 get none. The flat layout
/// places each one-process task on the worker with the most room, and a process takes a slot
/// of an unlimited worker too (`Capacity::take`), so it spreads them 10, 10, 10. On a real
/// allocation (100 nodes, 10,000 such tasks) three nodes run 4,096, 4,096 and 1,808 processes
/// at once and 97 are idle.
#[test]
fn tasks_that_ask_for_nothing_on_unlimited_workers_are_shared_among_the_nodes() {
    let values: Vec<String> = (1..=30).map(|x| x.to_string()).collect();
    let text = format!(
        "[job]\nname = \"u\"\n[[tasks]]\nname = \"t\"\ncommand = \"t {{x}}\"\ncpus = 0\nmatrix = {{ x = [{}] }}\n",
        values.join(", ")
    );
    let unlimited = |leader: u32, host: &str| {
        let mut hello = hello(host, 0);
        hello.capacity.slots = u32::MAX;
        Node { leader, workers: vec![(leader, hello)] }
    };
    let mut b = broker(&text, vec![unlimited(1, "a"), unlimited(2, "b"), unlimited(3, "c")]);
    let caps: Vec<Capacity> = b.nodes[0].workers.iter().map(|(_, c)| *c).collect();
    let stock = node_stock(&b.job, &caps);
    assert_eq!(stock, 4096, "what each leader asks for");
    for leader in [1, 2, 3] {
        b.node_said(leader, stock, 0, true, None, Instant::now());
    }
    let leased = sent(&mut b);
    let to = |leader: u32| leased.iter().filter(|(rank, _, _)| *rank == leader).map(|(_, _, t)| t.len()).sum::<usize>();
    assert!(
        to(2) > 0 && to(3) > 0,
        "node 1 was leased {}, node 2 {}, node 3 {} (the flat layout: 10 on each worker)",
        to(1),
        to(2),
        to(3)
    );
}

/// One node of two 8-CPU workers. `prep` (one worker) runs; `pair` (both workers) waits at
/// rank 0 for it. A worker is lost while `prep` runs: no node can hold a pair any more. Rank
/// 0 fails what no node can run only when a node's shape changes (`fail_unrunnable`, from
/// `worker_lost` and `handed_back`); `pair` was not queued then. When `prep` succeeds, `pair`
/// is queued, leased nowhere, and the run ends with it "not run", counted by `not_started`:
/// "1 tasks need more time than is left in the allocation" (exit 3) in a run without a time
/// limit. The flat layout queues it and fails it at the next dispatch ("no healthy worker left
/// can run it", `Control::fail_unrunnable`, exit 1).
#[test]
fn a_task_released_after_no_node_can_run_it_fails_as_in_the_flat_layout() {
    let text = "[job]\nname = \"d\"\n\
[[tasks]]\nname = \"prep\"\ncommand = \"p\"\ncpus = 8\n\
[[tasks]]\nname = \"pair\"\ncommand = \"x\"\nprocesses = 2\ncpus = 8\nafter = [\"prep\"]\n";
    let mut b = broker(text, vec![node(1, "n1", 2, 0)]);
    wants(&mut b, 1, 8, 0);
    assert_eq!(leased_ids(&mut b, 1), ["prep"]);
    b.from_node(1, &started("prep", 0));
    b.from_node(1, &lost_rank_2());
    b.from_node(1, &ended("prep", 0, AttemptStatus::Succeeded, false));
    b.node_said(1, 8, 1, true, None, Instant::now());
    assert!(sent(&mut b).is_empty(), "no node fits a pair now");
    assert!(b.finished());
    assert_eq!(
        failed_not_run_not_started(&b),
        (1, 0, 0),
        "the flat layout fails the pair; here it ends \"not run\", said to need more time than is left"
    );
}

#[test]
fn a_template_a_node_found_late_is_leased_no_more_whatever_rank_0s_clock_says() {
    let text = "[job]\nname = \"l\"\n[[tasks]]\nname = \"long\"\ncommand = \"x {i}\"\nwalltime = \"1h\"\nmatrix = { i = [1, 2, 3] }\n[[tasks]]\nname = \"short\"\ncommand = \"y\"\n";
    let mut b = broker(text, vec![node(1, "n1", 1, 0)]);
    b.set_time_left(Some(Duration::from_secs(7200)));
    wants(&mut b, 1, 1, 0);
    assert_eq!(leased_ids(&mut b, 1), ["long[i=1]"]);
    // By the node's clock the hour no longer fits: it hands the task back and says so.
    b.late_at_node(&[0]);
    b.handed_back(1, &[0], T0);
    wants(&mut b, 1, 4, 1);
    assert_eq!(leased_ids(&mut b, 1), ["short"], "rank 0's clock says 2 h are left; the node's is later");
    assert_eq!(b.not_started(), 4, "the three long ones, and the short one leased");
}
