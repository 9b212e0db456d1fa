//! The coordinator loop over a loopback, with fake worker peers the test plays turn by turn,
//! and a journal that writes down when each line came relative to each message sent.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use super::*;
use crate::run::local::WithLocalWorker;
use crate::run::testing::{FakeRunner, ended};
use crate::run::worker_rank::PeerSettings;
use crate::transport::{Loopback, network};
use dlaunch_core::events::Ending;
use dlaunch_core::ledger::{Ledger, decide_resume};
use dlaunch_core::sched::Capacity;
use dlaunch_core::wire::Launch;

const MS: Duration = Duration::from_millis(1);

/// What the coordinator did, in order.
#[derive(Clone, Debug)]
enum Step {
    Recorded(Event),
    Flushed,
    Sent(u32, Vec<Order>),
}

type Log = Rc<RefCell<Vec<Step>>>;

struct Recording<T> {
    inner: T,
    log: Log,
}

impl<T: Transport> Transport for Recording<T> {
    fn try_receive(&mut self) -> Option<(u32, Vec<u8>)> {
        self.inner.try_receive()
    }

    fn send_all(&mut self, batch: &[(u32, Vec<u8>)]) {
        for (rank, bytes) in batch {
            self.log.borrow_mut().push(Step::Sent(*rank, wire::decode(bytes).unwrap()));
        }
        self.inner.send_all(batch);
    }

    fn sends_in_flight(&self, rank: u32) -> usize {
        self.inner.sends_in_flight(rank)
    }

    fn sending(&self) -> bool {
        self.inner.sending()
    }
}

struct Lines(Log);

impl JournalSink for Lines {
    fn append(&mut self, event: &Event) -> Result<(), JournalError> {
        self.0.borrow_mut().push(Step::Recorded(event.clone()));
        Ok(())
    }

    fn flush(&mut self, _force: bool) -> Result<(), JournalError> {
        self.0.borrow_mut().push(Step::Flushed);
        Ok(())
    }

    fn len(&self) -> u64 {
        self.0.borrow().len() as u64
    }
}

/// Four one-process tasks; workers with two slots each. No prefetch: the fake peers here run
/// what they are sent at once (prefetch has its tests in the core and the worker).
const SWEEP: &str = "[job]\nname = \"j\"\nheartbeat_timeout = \"2s\"\nprefetch = 0\n[[tasks]]\nname = \"t\"\ncommand = \"run {i}\"\nmatrix = { i = [1, 2, 3, 4] }\n";

fn hello() -> Report {
    Report::Hello(WorkerHello {
        host: "n".into(),
        addr: "n".into(),
        capacity: Capacity { slots: 2, cpus: 8, gpus: 0, memory: 1 << 40 },
        description: String::new(),
    })
}

fn control(hellos: &[(u32, WorkerHello)]) -> Control {
    let job = Arc::new(
        dlaunch_core::spec::parse(Path::new("/tmp/dlaunch-test/job.toml"), SWEEP.as_bytes(), &crate::jobfile::FsProbe)
            .unwrap(),
    );
    let tasks = Arc::new(dlaunch_core::plan::expand(&job).unwrap());
    let plan = decide_resume(&Ledger::default(), &tasks, Default::default());
    let started = Event::RunStarted {
        run: 0,
        time: SystemTime::UNIX_EPOCH,
        version: "test".into(),
        world_size: 3,
        tasks: tasks.len(),
        slurm_job_id: None,
        job: None,
        kept: 0,
        deadline: None,
        backfill_limit: None,
    };
    Control::new(job, tasks, hellos, Ledger::default(), &plan, started, Instant::now()).unwrap()
}

type Fixture = (Coordinator<Recording<Loopback>, Lines>, Vec<Loopback>, Log);

/// A coordinator and two fake worker peers (ranks 1 and 2) whose hellos it has collected.
fn coordinator(t0: Instant) -> Fixture {
    let (end, mut peers) = network(0, &[1, 2]);
    for peer in &mut peers {
        say(peer, &[hello()]);
    }
    let log = Log::default();
    let mut transport = Recording { inner: end, log: Rc::clone(&log) };
    let hellos = collect_hellos(&mut transport, 2, Duration::from_secs(5), Duration::from_secs(1)).unwrap();
    assert_eq!(hellos.iter().map(|(rank, _)| *rank).collect::<Vec<_>>(), [1, 2]);
    let coordinator = Coordinator::new(control(&hellos), transport, Lines(Rc::clone(&log)), None, t0);
    (coordinator, peers, log)
}

fn say(peer: &mut Loopback, reports: &[Report]) {
    peer.send_all(&[(0, wire::encode(reports))]);
}

fn orders(peer: &mut Loopback) -> Vec<Order> {
    std::iter::from_fn(|| peer.try_receive()).flat_map(|(_, bytes)| wire::decode::<Order>(&bytes).unwrap()).collect()
}

fn launches(orders: &[Order]) -> Vec<Launch> {
    orders
        .iter()
        .filter_map(|o| match o {
            Order::Launch(l) => Some((**l).clone()),
            _ => None,
        })
        .collect()
}

/// Each message sent came after the journal lines that explain it, and after a flush that
/// handed those lines to the kernel: a launch after its `attempt_started`, a give-up after its
/// `worker_lost`.
fn assert_journal_first(log: &[Step]) {
    let position = |wanted: &dyn Fn(&Event) -> bool| {
        log.iter().position(|s| matches!(s, Step::Recorded(e) if wanted(e))).expect("recorded")
    };
    let mut checked = 0;
    for (sent_at, step) in log.iter().enumerate() {
        let Step::Sent(rank, orders) = step else { continue };
        for order in orders {
            let (what, recorded_at) = match order {
                Order::Launch(l) => (
                    format!("the launch of {} attempt {}", l.task_id, l.key.attempt),
                    position(
                        &|e| matches!(e, Event::AttemptStarted { task, attempt, .. } if *task == l.task_id && *attempt == l.key.attempt),
                    ),
                ),
                Order::GivenUp { .. } => (
                    format!("the give-up of rank {rank}"),
                    position(&|e| matches!(e, Event::WorkerLost { rank: r, .. } if r == rank)),
                ),
                _ => continue,
            };
            assert!(recorded_at < sent_at, "{what} was sent before it was recorded");
            let flushed = log[recorded_at..sent_at].iter().any(|s| matches!(s, Step::Flushed));
            assert!(flushed, "{what} was sent before its journal line was flushed");
            checked += 1;
        }
    }
    assert!(checked > 0, "the log holds orders to check");
}

#[test]
fn hello_dispatch_ends_and_counts_with_journal_lines_before_the_orders_they_cause() {
    let t0 = Instant::now();
    let (mut c, mut peers, log) = coordinator(t0);
    let mut now = t0;
    let mut ran = Vec::new();
    while c.turn(now, SystemTime::now(), None).unwrap() != Turn::Finished {
        for (peer, rank) in peers.iter_mut().zip([1, 2]) {
            let launched = launches(&orders(peer));
            let ends: Vec<Report> = launched
                .iter()
                .map(|l| {
                    ran.push((rank, l.task_id.clone()));
                    let code = if l.task_id == "t[i=3]" { 1 } else { 0 };
                    ended(l, Ending::Exited { code })
                })
                .collect();
            say(peer, &ends);
        }
        now += MS;
        assert!(now < t0 + Duration::from_secs(1), "the run should have finished");
    }
    assert_eq!(c.control.counts(), (3, 1, 0));
    assert_eq!(ran.len(), 4, "each task ran once: {ran:?}");
    assert!(ran.iter().any(|(r, _)| *r == 1) && ran.iter().any(|(r, _)| *r == 2), "both workers got work");
    assert_journal_first(&log.borrow());
    dismiss(&mut c.transport, &[1, 2]);
    for peer in &mut peers {
        assert_eq!(orders(peer), [Order::Exit]);
    }
}

#[test]
fn a_silent_worker_is_given_up_told_so_and_its_tasks_run_elsewhere() {
    let t0 = Instant::now();
    let (mut c, mut peers, log) = coordinator(t0);
    c.turn(t0, SystemTime::now(), None).unwrap();
    let on_one = launches(&orders(&mut peers[0]));
    assert_eq!((on_one.len(), launches(&orders(&mut peers[1])).len()), (2, 2));
    // Rank 1 keeps talking; rank 2 says nothing for longer than heartbeat_timeout (2s).
    say(&mut peers[0], &[Report::Heartbeat]);
    let later = t0 + Duration::from_secs(3);
    c.turn(later, SystemTime::now(), None).unwrap();
    assert_eq!(c.control.lost_workers().iter().copied().collect::<Vec<_>>(), [2]);
    let to_two = orders(&mut peers[1]);
    assert!(matches!(&to_two[..], [Order::GivenUp { reason }] if reason.starts_with("no heartbeat for")), "{to_two:?}");
    let ends: Vec<Report> = on_one.iter().map(|l| ended(l, Ending::Exited { code: 0 })).collect();
    say(&mut peers[0], &ends);
    c.turn(later + MS, SystemTime::now(), None).unwrap();
    let moved = launches(&orders(&mut peers[0]));
    assert_eq!(moved.len(), 2, "rank 2's tasks now run on rank 1");
    assert!(moved.iter().all(|l| l.key.attempt == 1), "as new attempts, with their own log directories");
    let ends: Vec<Report> = moved.iter().map(|l| ended(l, Ending::Exited { code: 0 })).collect();
    say(&mut peers[0], &ends);
    assert_eq!(c.turn(later + 2 * MS, SystemTime::now(), None).unwrap(), Turn::Finished);
    assert_eq!(c.control.counts(), (4, 0, 0));
    assert_journal_first(&log.borrow());
}

#[test]
fn a_stop_interrupts_every_worker_and_the_run_ends_when_they_have_reported() {
    let t0 = Instant::now();
    let (mut c, mut peers, _) = coordinator(t0);
    c.turn(t0, SystemTime::now(), None).unwrap();
    let running: Vec<Vec<Launch>> = peers.iter_mut().map(|p| launches(&orders(p))).collect();
    let turn = c.turn(t0 + MS, SystemTime::now(), Some("SIGTERM received".into())).unwrap();
    assert_eq!(turn, Turn::Active);
    for (peer, launched) in peers.iter_mut().zip(&running) {
        assert_eq!(orders(peer), [Order::Interrupt]);
        let ends: Vec<Report> = launched.iter().map(|l| ended(l, Ending::Interrupted)).collect();
        say(peer, &ends);
    }
    assert_eq!(c.turn(t0 + 2 * MS, SystemTime::now(), None).unwrap(), Turn::Finished);
    assert_eq!(c.control.stopping(), Some("SIGTERM received"));
    assert_eq!(c.control.counts(), (0, 0, 4), "interrupted tasks are left to run on resume");
}

#[test]
fn workers_hear_from_rank_0_when_it_has_nothing_else_to_say() {
    let t0 = Instant::now();
    let (mut c, mut peers, _) = coordinator(t0);
    c.turn(t0, SystemTime::now(), None).unwrap();
    peers.iter_mut().for_each(|p| drop(orders(p)));
    // heartbeat_timeout 2s: a heartbeat when nothing went out for 0.5s.
    assert_eq!(c.turn(t0 + 300 * MS, SystemTime::now(), None).unwrap(), Turn::Idle);
    assert!(peers.iter_mut().all(|p| orders(p).is_empty()), "nothing yet");
    assert_eq!(c.turn(t0 + 500 * MS, SystemTime::now(), None).unwrap(), Turn::Idle, "a heartbeat is no work");
    for peer in &mut peers {
        assert_eq!(orders(peer), [Order::Heartbeat]);
    }
    c.turn(t0 + 800 * MS, SystemTime::now(), None).unwrap();
    assert!(peers.iter_mut().all(|p| orders(p).is_empty()), "not again before another 0.5s");
}

#[test]
fn rank_0s_own_worker_is_a_peer_like_any_other() {
    let fake = FakeRunner::new(Duration::ZERO, Some(Ending::Exited { code: 0 }));
    let settings =
        PeerSettings { coordinator: 0, heartbeat_every: Duration::from_secs(1), heartbeat_timeout: None, grace: MS };
    let (remote, _) = network(0, &[]);
    let mut transport = WithLocalWorker::new(remote, fake.clone(), hello(), settings);
    let hellos = collect_hellos(&mut transport, 1, Duration::from_secs(5), Duration::from_secs(1)).unwrap();
    assert_eq!(hellos.iter().map(|(rank, _)| *rank).collect::<Vec<_>>(), [0]);
    let log = Log::default();
    let t0 = Instant::now();
    let mut c = Coordinator::new(control(&hellos), transport, Lines(log), None, t0);
    let mut turns = 0;
    while c.turn(t0 + turns * MS, SystemTime::now(), None).unwrap() != Turn::Finished {
        turns += 1;
        assert!(turns < 100, "the run should have finished");
    }
    assert_eq!(c.control.counts(), (4, 0, 0));
    dismiss(&mut c.transport, &[0]);
    let log = fake.log();
    assert_eq!(log.iter().filter(|l| l.starts_with("launch")).count(), 4);
    assert_eq!(log.last().map(String::as_str), Some("kill escaped"), "Exit reached it and it shut down");
}
