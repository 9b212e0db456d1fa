//! A worker as a peer of the coordinator: orders in, reports out, heartbeats both ways. Worker
//! ranks run `run`; rank 0's own worker is the same peer on a loopback, turned by rank 0's
//! transport (`local::WithLocalWorker`).
//!
//! The peer also watches for the two faults a worker can see itself: a coordinator gone
//! silent (rank 0 killed under a launcher that does not end the job), and its own loop having
//! stood still for longer than `heartbeat_timeout` (the rank was stopped), after which the
//! coordinator has given it up and its tasks run elsewhere.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::signals::{self, Backoff, Waker};
use crate::transport::Transport;
use crate::worker::Worker;
use dlaunch_core::wire::{self, Order, Report};

/// What the peer asks of a worker: `worker::Worker`'s public face, so that tests can put a
/// fake in its place and the peer does not depend on how the worker works inside.
pub trait Runner {
    /// Carries out an order; false on `Exit`.
    fn handle(&mut self, order: Order, now: Instant) -> bool;
    /// Reaps ended processes; enforces deadlines, grace periods and log limits.
    fn poll(&mut self, now: Instant);
    fn take_reports(&mut self) -> Vec<Report>;
    /// Stop signal to every process now, SIGKILL once `grace` has passed.
    fn interrupt(&mut self, now: Instant);
    fn busy(&self) -> bool;
    /// Nothing an order could bring would start before a process ends (and wakes the rank).
    fn waits_for_an_end(&self) -> bool;
    /// Kills what escaped the process groups of tasks that have ended.
    fn kill_escaped(&mut self);
}

impl Runner for Worker {
    fn handle(&mut self, order: Order, now: Instant) -> bool {
        Worker::handle(self, order, now)
    }

    fn poll(&mut self, now: Instant) {
        Worker::poll(self, now)
    }

    fn take_reports(&mut self) -> Vec<Report> {
        Worker::take_reports(self)
    }

    fn interrupt(&mut self, now: Instant) {
        Worker::interrupt(self, now)
    }

    fn busy(&self) -> bool {
        Worker::busy(self)
    }

    fn waits_for_an_end(&self) -> bool {
        Worker::waits_for_an_end(self)
    }

    fn kill_escaped(&mut self) {
        Worker::kill_escaped(self)
    }
}

/// After stopping its tasks, how much longer than `grace` a worker waits for them to go.
const REAP_SLACK: Duration = Duration::from_secs(5);

/// The shortest sleep of a worker that waits only for a process to end: SIGCHLD wakes it
/// sooner, so this bounds how late it hears a stop or cancel order. Polling for orders every
/// 200 µs instead woke a worker over 3,000 times a second while its tasks ran.
const WAITING_FOR_AN_END: Duration = Duration::from_millis(5);

#[derive(Clone, Copy, Debug)]
pub struct PeerSettings {
    /// The rank that coordinates this worker: 0, or its node's leader (`layout = "nodes"`).
    pub coordinator: u32,
    /// A heartbeat goes out when nothing else did for this long.
    pub heartbeat_every: Duration,
    /// Silence that means the other side is gone; `None` for rank 0's own worker, which lives
    /// and stops with its coordinator.
    pub heartbeat_timeout: Option<Duration>,
    /// The job's grace between the stop signal and SIGKILL.
    pub grace: Duration,
}

/// What a turn of the peer came to.
#[derive(Debug, PartialEq)]
pub enum Turn {
    /// Nothing happened: sleep.
    Idle,
    /// Messages came or went: the next turn should come soon.
    Active,
    /// The coordinator said Exit; the worker has shut down.
    Exit,
    /// No word from the coordinator for this long: it is gone.
    CoordinatorLost(Duration),
}

pub struct WorkerPeer<T, W> {
    transport: T,
    worker: W,
    settings: PeerSettings,
    last_sent: Instant,
    last_heard: Instant,
    last_turn: Instant,
    /// Set once the coordinator gave this worker up, or may have.
    given_up: bool,
    exited: bool,
}

impl<T: Transport, W: Runner> WorkerPeer<T, W> {
    /// Says hello to the coordinator and starts watching it.
    pub fn start(mut transport: T, worker: W, hello: Report, settings: PeerSettings, now: Instant) -> Self {
        transport.send_all(&[(settings.coordinator, wire::encode(&[hello]))]);
        WorkerPeer {
            transport,
            worker,
            settings,
            last_sent: now,
            last_heard: now,
            last_turn: now,
            given_up: false,
            exited: false,
        }
    }

    /// One turn: what stood still is noticed first, then orders are carried out, processes
    /// polled, and reports (or a heartbeat) sent.
    pub fn turn(&mut self, now: Instant, stop: Option<Signal>) -> Turn {
        if self.exited {
            return Turn::Exit;
        }
        let stood_still = now.saturating_duration_since(self.last_turn);
        self.last_turn = now;
        if let Some(timeout) = self.settings.heartbeat_timeout
            && stood_still > self.settings.heartbeat_every
        {
            // Time this rank did not run is not the coordinator's silence: what it sent
            // meanwhile may take a few turns to come in.
            self.last_heard = (self.last_heard + stood_still).min(now);
            // The coordinator has heard nothing from here for that long, plus up to one
            // heartbeat interval before it: past the timeout it may have given this rank up.
            // Then this rank must act as given up, and stay silent so that it surely is.
            if stood_still + self.settings.heartbeat_every > timeout {
                let reason = format!(
                    "this rank did not run for {} (stopped?): the coordinator may have given it up",
                    dlaunch_core::spec::format_duration(stood_still)
                );
                self.give_up(reason, now);
            }
        }
        let mut active = false;
        let mut exit = false;
        while let Some((_, bytes)) = self.transport.try_receive() {
            self.last_heard = now;
            match wire::decode::<Order>(&bytes) {
                Ok(orders) => {
                    // A heartbeat needs no quick follow-up: polling hot after each kept a worker
                    // of long tasks awake thousands of times a second.
                    active |= orders.iter().any(|order| *order != Order::Heartbeat);
                    orders.into_iter().for_each(|order| exit |= self.on_order(order, now));
                }
                Err(e) => log::error!("unreadable message from the coordinator: {e}"),
            }
        }
        let mut reports = Vec::new();
        if let Some(signal) = stop {
            self.worker.interrupt(now);
            reports.push(Report::Stopping { signal: signal.to_string() });
        }
        self.worker.poll(now);
        if exit {
            shut_down(&mut self.worker, self.settings.grace);
            self.exited = true;
            return Turn::Exit;
        }
        reports.extend(self.worker.take_reports());
        if self.given_up {
            // Nothing this rank says counts any more: its tasks are on record as lost.
            reports.clear();
        } else {
            // Real news (a process ended) is answered by new work soon: stay quick. A heartbeat is not.
            active |= !reports.is_empty();
            if reports.is_empty() && now.saturating_duration_since(self.last_sent) >= self.settings.heartbeat_every {
                reports.push(Report::Heartbeat);
            }
            if !reports.is_empty() {
                self.transport.send_all(&[(self.settings.coordinator, wire::encode(&reports))]);
                self.last_sent = now;
            }
        }
        let silence = now.saturating_duration_since(self.last_heard);
        match self.settings.heartbeat_timeout {
            Some(timeout) if silence > timeout => Turn::CoordinatorLost(silence),
            _ if active => Turn::Active,
            _ => Turn::Idle,
        }
    }

    /// Carries out one order; true on Exit.
    fn on_order(&mut self, order: Order, now: Instant) -> bool {
        match order {
            Order::Exit => return true,
            Order::Heartbeat => {}
            Order::GivenUp { reason } => self.give_up(format!("the coordinator gave this rank up ({reason})"), now),
            // Orders sent before the coordinator learned this rank is given up: its tasks are
            // on record as lost, so none starts here.
            _ if self.given_up => {}
            order => {
                self.worker.handle(order, now);
            }
        }
        false
    }

    /// Kills every task at once, without grace: a copy of each may already run elsewhere.
    fn give_up(&mut self, reason: String, now: Instant) {
        if self.given_up {
            return;
        }
        if self.worker.busy() {
            log::warn!("{reason}: killing its tasks, which run elsewhere now");
        } else {
            log::warn!("{reason}");
        }
        self.worker.interrupt(now);
        // SIGKILL follows the stop signal once the grace has passed: let it pass now.
        self.worker.poll(now + self.settings.grace);
        self.given_up = true;
    }

    /// How long the rank may sleep after an idle turn whose back-off says `pause`: longer
    /// while nothing can happen before a process ends (which wakes it), nothing it sent is
    /// still on its way (MPI moves a send on only while the rank calls it) and it counts.
    pub fn pause(&self, pause: Duration) -> Duration {
        let waiting = !self.given_up
            && self.worker.waits_for_an_end()
            && self.transport.sends_in_flight(self.settings.coordinator) == 0;
        if waiting { pause.max(WAITING_FOR_AN_END) } else { pause }
    }

    /// The coordinator is gone: stop every task the polite way (stop signal, grace, SIGKILL)
    /// and wait until they are.
    pub fn stop_tasks(&mut self) {
        stop_and_wait(&mut self.worker, self.settings.grace);
    }
}

/// A worker rank's life after start-up: turns until the coordinator says Exit, sleeping while
/// nothing happens. Err: the coordinator fell silent for this long; the tasks are stopped.
pub fn run<T: Transport, W: Runner>(peer: &mut WorkerPeer<T, W>, waker: &Waker) -> Result<(), Duration> {
    let mut backoff = Backoff::new();
    loop {
        match peer.turn(Instant::now(), signals::take_stop_request()) {
            Turn::Exit => return Ok(()),
            Turn::CoordinatorLost(silence) => {
                peer.stop_tasks();
                return Err(silence);
            }
            Turn::Active => backoff.reset(),
            Turn::Idle => waker.sleep(peer.pause(backoff.next_pause())),
        }
    }
}

/// The coordinator said Exit: it counts nothing as running, so anything still here is a stray.
fn shut_down(worker: &mut impl Runner, grace: Duration) {
    worker.kill_escaped();
    if worker.busy() {
        log::warn!("exit requested while processes still run: killing them");
        stop_and_wait(worker, grace);
    }
}

fn stop_and_wait(worker: &mut impl Runner, grace: Duration) {
    let start = Instant::now();
    worker.interrupt(start);
    while worker.busy() && start.elapsed() < grace + REAP_SLACK {
        std::thread::sleep(Duration::from_millis(10));
        worker.poll(Instant::now());
    }
    worker.kill_escaped();
}

#[cfg(test)]
mod tests;
