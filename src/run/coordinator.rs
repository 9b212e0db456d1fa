//! The loop of rank 0: feeds worker reports to `Control`, carries out its effects (journal
//! lines, then orders), and lets workers hear from it at least every `heartbeat_every`. It sees
//! workers only through a `Transport`; rank 0's own worker, when it has one, is a peer there
//! like the rest (`local`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::journal::{Journal, JournalError};
use crate::run::progress::Progress;
use crate::signals::{self, Backoff, Waker};
use crate::transport::Transport;
use dlaunch_core::control::{Control, Effect};
use dlaunch_core::events::{Ending, Event};
use dlaunch_core::plan::Task;
use dlaunch_core::spec::Job;
use dlaunch_core::wire::{self, Chunk, Order, Payload, Report, WorkerHello};
use serde::{Deserialize, Serialize};

use crate::returned::{Receiver, Restores, receiver::Received};
use dlaunch_core::returned::Checkpoints;

const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How often a side that has said nothing else sends a heartbeat: well within the timeout,
/// and often enough that a lost peer is noticed in about `heartbeat_timeout`.
pub fn heartbeat_every(heartbeat_timeout: Duration) -> Duration {
    (heartbeat_timeout / 4).min(Duration::from_secs(30))
}

/// Where journal lines go: the journal file, or a test's record of what happened when.
pub trait JournalSink {
    fn append(&mut self, event: &Event) -> Result<(), JournalError>;
    /// Hands lines to the kernel; syncs them to disk when due or when `force` is set.
    fn flush(&mut self, force: bool) -> Result<(), JournalError>;
    /// Bytes of the lines appended so far: where the status snapshot's reader picks up.
    fn len(&self) -> u64;
}

impl JournalSink for Journal {
    fn append(&mut self, event: &Event) -> Result<(), JournalError> {
        Journal::append(self, event)
    }

    fn flush(&mut self, force: bool) -> Result<(), JournalError> {
        Journal::flush(self, force)
    }

    fn len(&self) -> u64 {
        Journal::len(self)
    }
}

/// A loop's turns until one says it finished: stop signals handed in as they come, a sleep
/// after each idle turn as long as `pause` makes of the back-off's next pause.
pub fn run_turns<S>(
    state: &mut S,
    waker: &Waker,
    turn: fn(&mut S, Instant, SystemTime, Option<String>) -> Result<Turn, JournalError>,
    pause: fn(&S, Duration) -> Duration,
) -> Result<(), JournalError> {
    let mut backoff = Backoff::new();
    loop {
        let stop = signals::take_stop_request().map(|signal| format!("{signal} received"));
        match turn(state, Instant::now(), SystemTime::now(), stop)? {
            Turn::Finished => return Ok(()),
            Turn::Active => backoff.reset(),
            Turn::Idle => waker.sleep(pause(state, backoff.next_pause())),
        }
    }
}

/// What a turn of the loop came to.
#[derive(Debug, PartialEq)]
pub enum Turn {
    Idle,
    Active,
    /// Every task is settled, or dispatching stopped and nothing runs any more.
    Finished,
}

pub struct Coordinator<T, J> {
    pub control: Control,
    pub transport: T,
    pub journal: J,
    /// When the allocation ends, if known: tasks that cannot finish by then are not started.
    pub deadline: Option<SystemTime>,
    /// Progress lines, the status snapshot and `dlaunch cancel` requests; none in unit tests.
    pub progress: Option<Progress>,
    /// Every worker rank, lost ones too (a lost rank still exits when rank 0 is gone), with
    /// when it was last sent anything.
    last_sent: BTreeMap<u32, Instant>,
    heartbeat_every: Duration,
    /// No rank needs a heartbeat before this.
    next_heartbeat_due: Instant,
    next_health_check: Instant,
    /// Returned output: writes what workers send, with the tasks it belongs to.
    pub receiver: Option<(Receiver, Arc<Vec<Task>>, Arc<Job>)>,
    /// Returned output: chunks written per rank since the last acknowledgement.
    written: BTreeMap<u32, u32>,
    /// Returned output: what each task last returned, restored before its next attempt.
    pub checkpoints: Checkpoints,
    /// Returned output: checkpoints on their way back, and the orders queued behind them.
    restores: Restores,
}

impl<T: Transport, J: JournalSink> Coordinator<T, J> {
    pub fn new(control: Control, transport: T, journal: J, deadline: Option<SystemTime>, now: Instant) -> Self {
        let heartbeat_every = heartbeat_every(control.heartbeat_timeout());
        // Planning took its time since the hellos: every rank hears from rank 0 in the first turn.
        let long_ago = now.checked_sub(heartbeat_every).unwrap_or(now);
        let last_sent = control.worker_ranks().map(|rank| (rank, long_ago)).collect();
        Coordinator {
            control,
            transport,
            journal,
            deadline,
            progress: None,
            last_sent,
            heartbeat_every,
            next_heartbeat_due: now,
            next_health_check: now + HEALTH_CHECK_INTERVAL,
            receiver: None,
            written: BTreeMap::new(),
            checkpoints: Checkpoints::default(),
            restores: Restores::default(),
        }
    }

    /// Runs until every task is settled or dispatching stopped and nothing runs any more.
    pub fn run(&mut self, waker: &Waker) -> Result<(), JournalError> {
        run_turns(self, waker, Self::turn, Self::pause)
    }

    /// How long to sleep after an idle turn whose back-off says `pause`: longer while the
    /// next thing to do is a refill that the workers' running processes leave time for
    /// (`Control::refill_slack`), nothing sent is still on its way and no returned file is
    /// under way (its sender waits for credit).
    pub fn pause(&self, pause: Duration) -> Duration {
        let receiving = self.receiver.as_ref().is_some_and(|(receiver, _, _)| receiver.receiving());
        let quiet = !self.transport.sending() && !receiving;
        match self.control.refill_slack() {
            Some(slack) if quiet => pause.max(slack),
            _ => pause,
        }
    }

    /// One turn: reports in, health and time checked, what fits dispatched, journal lines
    /// written and orders sent. `stop`: why dispatching must stop, if it must.
    pub fn turn(&mut self, now: Instant, wall: SystemTime, stop: Option<String>) -> Result<Turn, JournalError> {
        let mut active = false;
        while let Some((rank, bytes)) = self.transport.try_receive() {
            match wire::decode::<Report>(&bytes) {
                Ok(reports) => {
                    // A heartbeat needs no quick follow-up: it does not keep the loop busy.
                    active |= reports.iter().any(|r| *r != Report::Heartbeat);
                    reports.into_iter().for_each(|r| self.on_report(rank, r, now));
                }
                Err(e) => log::error!("unreadable message from rank {rank}: {e}"),
            }
        }
        if let Some(reason) = stop {
            self.control.stop(&reason, now);
        }
        if now >= self.next_health_check {
            self.control.check_health(now, wall);
            self.observe(now, wall);
            self.next_health_check = now + HEALTH_CHECK_INTERVAL;
        }
        let time_left = self.deadline.map(|d| d.duration_since(wall).unwrap_or_default());
        self.control.dispatch(time_left, wall);
        active |= self.carry_out(now)?;
        if self.control.finished() {
            return Ok(Turn::Finished);
        }
        Ok(if active { Turn::Active } else { Turn::Idle })
    }

    /// Progress output, the status snapshot, and requests from `dlaunch cancel`.
    fn observe(&mut self, now: Instant, wall: SystemTime) {
        let Some(progress) = self.progress.as_mut() else { return };
        for request in progress.tick(self.journal.len(), now) {
            if request.tasks.is_empty() {
                self.control.stop("cancelled with dlaunch cancel", now);
            } else {
                self.control.cancel(&request.tasks, wall);
            }
        }
    }

    fn on_report(&mut self, rank: u32, report: Report, now: Instant) {
        self.control.heard_from(rank, now);
        match report {
            Report::Ended(mut end) => {
                // Rank 0 could not write what the process sent: dlaunch failed, not the task.
                if let Some(error) = self.receiver.as_mut().and_then(|(r, _, _)| r.take_failure(end.key, end.process)) {
                    end.ending = Ending::Infrastructure { error };
                }
                self.control.process_ended(rank, end)
            }
            Report::Placed { key, gpus } => self.control.placed(rank, key, gpus),
            Report::Started { key, time } => self.control.started(rank, key, time),
            Report::Returned { key } => self.control.returned(rank, key, SystemTime::now()),
            Report::Stopping { signal } => self.control.stop(&format!("{signal} received by rank {rank}"), now),
            Report::Heartbeat => {}
            Report::Hello(_) => log::warn!("rank {rank} said hello twice"),
            Report::Chunk(chunk) => self.on_chunk(rank, chunk, now),
            Report::Outputs { key, process, files } => {
                if let Some((receiver, _, _)) = self.receiver.as_mut() {
                    receiver.expect(rank, key, process, files);
                }
            }
            Report::OutputRefused { file, reason } => {
                if let Some((receiver, tasks, _)) = self.receiver.as_mut()
                    && let Some(task) = tasks.get(file.key.task as usize)
                    && receiver.refused(rank, &file)
                {
                    let (task, attempt, path) = (task.id.clone(), file.key.attempt, file.name);
                    self.control.record(Event::OutputMissing { task, attempt, path, reason });
                }
            }
        }
    }

    /// Writes a chunk of returned output and owes its worker the credit back.
    fn on_chunk(&mut self, rank: u32, chunk: Chunk, now: Instant) {
        // Empty chunks cost the worker no credit (`Outbox::next_chunks`).
        if !chunk.bytes.is_empty() {
            *self.written.entry(rank).or_default() += 1;
        }
        let Some((receiver, tasks, job)) = self.receiver.as_mut() else { return };
        let Some(task) = tasks.get(chunk.file.key.task as usize) else {
            log::warn!("rank {rank} sent output of task {}, which this job does not have", chunk.file.key.task);
            return;
        };
        let processes = job.templates.get(task.template).map_or(1, |t| t.processes);
        match receiver.take(rank, chunk, task, processes) {
            Ok(Received::Written(event)) => event.into_iter().for_each(|e| self.control.record(e)),
            Ok(Received::Failed(event)) => self.control.record(event),
            Err(e) => {
                log::error!("{e}");
                self.control.stop(&format!("cannot write the output workers return ({e})"), now);
            }
        }
    }

    /// Journal lines first, then orders: a task is on record before it can start. True when
    /// there was anything but heartbeats to do.
    fn carry_out(&mut self, now: Instant) -> Result<bool, JournalError> {
        let effects = self.control.take_effects();
        let mut busy = !effects.is_empty();
        let mut orders: BTreeMap<u32, Vec<Order>> = BTreeMap::new();
        for effect in effects {
            match effect {
                Effect::Record(event) => {
                    let lost = match &event {
                        Event::WorkerLost { rank, .. } => {
                            self.restores.forget(*rank);
                            self.receiver.as_mut().map(|(r, tasks, _)| r.lost(*rank, tasks))
                        }
                        _ => None,
                    };
                    for event in std::iter::once(event).chain(lost.into_iter().flatten()) {
                        self.checkpoints.note(&event);
                        self.journal.append(&event)?;
                        if let Some(progress) = self.progress.as_mut() {
                            progress.record(&event);
                        }
                    }
                }
                Effect::Send { rank, order } => {
                    let files = match (&order, &self.receiver) {
                        (Order::Launch(launch), Some((receiver, tasks, job))) if !launch.outputs.is_empty() => {
                            receiver.restore(launch, &self.checkpoints, tasks, job)
                        }
                        _ => Vec::new(),
                    };
                    if files.is_empty() && !self.restores.busy(rank) {
                        orders.entry(rank).or_default().push(order);
                    } else {
                        self.restores.queue(rank, files, order);
                    }
                }
            }
        }
        let transport = &self.transport;
        for (rank, next) in self.restores.next(|rank| transport.sends_in_flight(rank) == 0) {
            busy = true;
            orders.entry(rank).or_default().extend(next);
        }
        for (rank, chunks) in std::mem::take(&mut self.written) {
            orders.entry(rank).or_default().push(Order::Received { chunks });
        }
        self.journal.flush(false)?;
        let beat = now >= self.next_heartbeat_due;
        if beat {
            for (&rank, &last) in &self.last_sent {
                if now.saturating_duration_since(last) >= self.heartbeat_every && !orders.contains_key(&rank) {
                    orders.insert(rank, vec![Order::Heartbeat]);
                }
            }
        }
        for rank in orders.keys() {
            self.last_sent.insert(*rank, now);
        }
        if beat {
            // Sends only ever move this later: until then, no rank can be due.
            let oldest = self.last_sent.values().min().copied().unwrap_or(now);
            self.next_heartbeat_due = oldest + self.heartbeat_every;
        }
        if orders.is_empty() {
            return Ok(busy);
        }
        let batch: Vec<(u32, Vec<u8>)> = orders.iter().map(|(rank, o)| (*rank, wire::encode(o))).collect();
        self.transport.send_all(&batch);
        Ok(busy)
    }
}

/// Waits for `expected` hellos (worker ranks, rank 0's own worker among them), sending each
/// rank that said hello a heartbeat meanwhile: workers watch rank 0 from their hello on.
/// Err: how many are missing when `limit` passed.
pub fn collect_hellos<T: Transport>(
    transport: &mut T,
    expected: usize,
    limit: Duration,
    heartbeat_every: Duration,
) -> Result<Vec<(u32, WorkerHello)>, usize> {
    let hello = |report| match report {
        Report::Hello(hello) => Some(hello),
        _ => None,
    };
    collect(transport, expected, limit, (heartbeat_every, &wire::encode(&[Order::Heartbeat])), hello)
}

/// Waits for one message from each of `expected` ranks that `hello` picks out, sending each
/// rank heard from `beat` (a heartbeat, encoded) every `every` meanwhile. Err: how many are
/// missing when `limit` passed.
pub fn collect<T: Transport, M: for<'de> Deserialize<'de> + Payload, H>(
    transport: &mut T,
    expected: usize,
    limit: Duration,
    (every, beat): (Duration, &[u8]),
    hello: impl Fn(M) -> Option<H>,
) -> Result<Vec<(u32, H)>, usize> {
    let start = Instant::now();
    let mut hellos = Vec::new();
    let mut backoff = Backoff::new();
    let mut last_heartbeat = start;
    while hellos.len() < expected {
        if start.elapsed() > limit {
            return Err(expected - hellos.len());
        }
        if last_heartbeat.elapsed() >= every {
            let batch: Vec<(u32, Vec<u8>)> = hellos.iter().map(|(rank, _)| (*rank, beat.to_vec())).collect();
            transport.send_all(&batch);
            last_heartbeat = Instant::now();
        }
        match transport.try_receive() {
            Some((rank, bytes)) => {
                for message in wire::decode::<M>(&bytes).unwrap_or_default() {
                    if let Some(said) = hello(message) {
                        hellos.push((rank, said));
                    }
                }
            }
            None => std::thread::sleep(backoff.next_pause()),
        }
    }
    hellos.sort_by_key(|(rank, _)| *rank);
    Ok(hellos)
}

/// Tells every worker rank (rank 0's own worker too) to exit.
pub fn dismiss<T: Transport>(transport: &mut T, ranks: &[u32]) {
    send_each(transport, ranks, &[Order::Exit]);
}

/// Sends `messages` to each of `ranks`, encoded once.
pub fn send_each<T: Transport, M: Serialize + Payload>(transport: &mut T, ranks: &[u32], messages: &[M]) {
    let bytes = wire::encode(messages);
    let batch: Vec<(u32, Vec<u8>)> = ranks.iter().map(|&rank| (rank, bytes.clone())).collect();
    transport.send_all(&batch);
}

#[cfg(test)]
mod tests;
