//! The worker peer over a loopback, with a fake worker: what it does when the coordinator
//! goes quiet, when it gives this rank up, and when this rank itself stood still.

use super::*;
use crate::run::testing::{FakeRunner, ended, launch};
use crate::transport::{Loopback, network};
use dlaunch_core::events::Ending;
use dlaunch_core::wire::WorkerHello;

const SECOND: Duration = Duration::from_secs(1);

fn settings(timeout: Option<Duration>) -> PeerSettings {
    PeerSettings { coordinator: 0, heartbeat_every: SECOND, heartbeat_timeout: timeout, grace: 10 * SECOND }
}

fn hello() -> Report {
    Report::Hello(WorkerHello {
        host: "n1".into(),
        addr: "n1".into(),
        capacity: dlaunch_core::sched::Capacity { slots: 4, cpus: 4, gpus: 0, memory: 1 << 30 },
        description: String::new(),
    })
}

/// A worker peer (rank 1) with the coordinator's end of its loopback, hello already read.
fn peer(timeout: Option<Duration>, t0: Instant) -> (WorkerPeer<Loopback, FakeRunner>, FakeRunner, Loopback) {
    let (mut coordinator, mut ends) = network(0, &[1]);
    let fake = FakeRunner::new(10 * SECOND, None);
    let peer = WorkerPeer::start(ends.remove(0), fake.clone(), hello(), settings(timeout), t0);
    assert_eq!(received(&mut coordinator), [hello()]);
    (peer, fake, coordinator)
}

fn received(coordinator: &mut Loopback) -> Vec<Report> {
    std::iter::from_fn(|| coordinator.try_receive())
        .flat_map(|(rank, bytes)| {
            assert_eq!(rank, 1);
            wire::decode::<Report>(&bytes).unwrap()
        })
        .collect()
}

fn order(coordinator: &mut Loopback, orders: &[Order]) {
    coordinator.send_all(&[(1, wire::encode(orders))]);
}

#[test]
fn a_rank_that_stood_still_past_the_timeout_kills_its_tasks_at_once_and_says_nothing() {
    let t0 = Instant::now();
    let (mut peer, fake, mut coordinator) = peer(Some(4 * SECOND), t0);
    order(&mut coordinator, &[Order::Launch(Box::new(launch(0, "a"))), Order::Launch(Box::new(launch(1, "b")))]);
    assert_eq!(peer.turn(t0, None), Turn::Active);
    // "a" ended while the rank was stopped: its report is stale, the coordinator moved it.
    fake.end_first(Ending::Exited { code: 0 });
    let woke = t0 + 5 * SECOND;
    order(&mut coordinator, &[Order::Launch(Box::new(launch(2, "c")))]);
    peer.turn(woke, None);
    assert_eq!(
        fake.log(),
        ["launch a", "launch b", "stop signal b", "SIGKILL b"],
        "killed in the first turn, no grace"
    );
    for later in 1..20 {
        order(&mut coordinator, &[Order::Launch(Box::new(launch(3, "d"))), Order::Heartbeat]);
        assert_ne!(peer.turn(woke + later * SECOND / 2, None), Turn::Exit);
    }
    assert_eq!(received(&mut coordinator), [], "no report, no heartbeat: the coordinator has given this rank up");
    assert_eq!(fake.log().len(), 4, "no order after that starts anything");
    order(&mut coordinator, &[Order::Exit]);
    assert_eq!(peer.turn(woke + 11 * SECOND, None), Turn::Exit);
}

#[test]
fn given_up_by_the_coordinator_it_kills_first_and_reports_nothing() {
    let t0 = Instant::now();
    let (mut peer, fake, mut coordinator) = peer(Some(4 * SECOND), t0);
    order(&mut coordinator, &[Order::Launch(Box::new(launch(0, "a")))]);
    peer.turn(t0, None);
    fake.0.borrow_mut().reports.push(ended(&launch(9, "stale"), Ending::Exited { code: 0 }));
    order(&mut coordinator, &[Order::GivenUp { reason: "no heartbeat for 5s".into() }]);
    peer.turn(t0 + SECOND, None);
    assert_eq!(fake.log(), ["launch a", "stop signal a", "SIGKILL a"]);
    peer.turn(t0 + 2 * SECOND, None);
    assert_eq!(received(&mut coordinator), []);
}

#[test]
fn a_silent_coordinator_is_gone_after_the_timeout_and_tasks_get_their_grace() {
    let t0 = Instant::now();
    let (mut peer, fake, mut coordinator) = peer(Some(4 * SECOND), t0);
    order(&mut coordinator, &[Order::Launch(Box::new(launch(0, "a")))]);
    peer.turn(t0, None);
    for step in 1..=12 {
        if step == 4 {
            order(&mut coordinator, &[Order::Heartbeat]);
        }
        let turn = peer.turn(t0 + step * SECOND / 2, None);
        assert!(matches!(turn, Turn::Idle | Turn::Active), "heard from it at 2s, {turn:?} at step {step}");
    }
    assert_eq!(received(&mut coordinator), vec![Report::Heartbeat; 6], "one heartbeat per second of quiet");
    assert_eq!(peer.turn(t0 + 6 * SECOND + SECOND / 2, None), Turn::CoordinatorLost(4 * SECOND + SECOND / 2));
    assert_eq!(fake.log(), ["launch a"], "nothing stopped before the run loop does it");
    fake.0.borrow_mut().grace = Duration::from_millis(30);
    let start = Instant::now();
    peer.stop_tasks();
    assert!(start.elapsed() >= Duration::from_millis(30), "the grace was given");
    assert_eq!(fake.log(), ["launch a", "stop signal a", "SIGKILL a", "kill escaped"]);
}

#[test]
fn standing_still_shorter_than_the_timeout_may_already_mean_given_up() {
    // Its last heartbeat went out up to a second before it stopped: after 3.5s stopped, the
    // coordinator may have heard nothing for 4.5s, past the timeout.
    let t0 = Instant::now();
    let (mut peer, fake, mut coordinator) = peer(Some(4 * SECOND), t0);
    order(&mut coordinator, &[Order::Launch(Box::new(launch(0, "a")))]);
    peer.turn(t0, None);
    peer.turn(t0 + SECOND / 2, None);
    peer.turn(t0 + 4 * SECOND, None);
    assert_eq!(fake.log(), ["launch a", "stop signal a", "SIGKILL a"]);
}

#[test]
fn time_this_rank_stood_still_is_not_the_coordinators_silence() {
    // Stopped for 2.5s (safe: 2.5s + 1s is within the 4s timeout), then on for 1s: the
    // coordinator said nothing for 4.5s of wall time, but only 2s while this rank ran.
    let t0 = Instant::now();
    let (mut peer, fake, mut coordinator) = peer(Some(4 * SECOND), t0);
    order(&mut coordinator, &[Order::Launch(Box::new(launch(0, "a")))]);
    for at in [0, 500, 1000, 3500, 4000, 4500] {
        let turn = peer.turn(t0 + Duration::from_millis(at), None);
        assert!(matches!(turn, Turn::Idle | Turn::Active), "{turn:?} at {at} ms");
    }
    assert_eq!(fake.log(), ["launch a"], "not given up, nothing killed");
}

#[test]
fn rank_0s_own_worker_watches_nothing_it_lives_and_stops_with_its_coordinator() {
    let t0 = Instant::now();
    let (mut peer, fake, mut coordinator) = peer(None, t0);
    order(&mut coordinator, &[Order::Launch(Box::new(launch(0, "a")))]);
    peer.turn(t0, None);
    assert_eq!(peer.turn(t0 + 3600 * SECOND, None), Turn::Idle);
    assert_eq!(fake.log(), ["launch a"]);
    assert_eq!(received(&mut coordinator), [Report::Heartbeat], "it still says it is alive");
}

#[test]
fn reports_go_out_as_they_come_and_a_stop_signal_is_passed_on() {
    let t0 = Instant::now();
    let (mut peer, fake, mut coordinator) = peer(Some(4 * SECOND), t0);
    order(&mut coordinator, &[Order::Launch(Box::new(launch(0, "a")))]);
    peer.turn(t0, None);
    fake.end_first(Ending::Exited { code: 0 });
    assert_eq!(peer.turn(t0 + SECOND / 10, None), Turn::Active);
    assert_eq!(received(&mut coordinator), [ended(&launch(0, "a"), Ending::Exited { code: 0 })]);
    peer.turn(t0 + SECOND / 5, Some(Signal::SIGTERM));
    assert_eq!(received(&mut coordinator), [Report::Stopping { signal: "SIGTERM".into() }]);
}

#[test]
fn a_worker_waiting_only_for_a_process_to_end_sleeps_longer_between_turns() {
    let t0 = Instant::now();
    let (mut peer, fake, mut coordinator) = peer(Some(4 * SECOND), t0);
    let short = Duration::from_micros(200);
    assert_eq!(peer.pause(short), short, "an order may come that starts something: keep polling");
    fake.0.borrow_mut().waits_for_an_end = true;
    assert_eq!(peer.pause(short), WAITING_FOR_AN_END, "a child's end wakes it sooner");
    assert_eq!(peer.pause(SECOND), SECOND, "never shorter than the back-off");
    order(&mut coordinator, &[Order::GivenUp { reason: "no heartbeat for 5s".into() }]);
    peer.turn(t0 + SECOND, None);
    assert_eq!(peer.pause(short), short, "given up: it no longer waits for its processes");
}
