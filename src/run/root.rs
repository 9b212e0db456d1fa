//! Rank 0 in `layout = "nodes"`: leases tasks to the nodes' leaders (`lease::Broker`) and
//! writes the lines they journaled into the job's one journal as they come, so that `status`,
//! `report`, `cancel` and a resumed run read one file, as in the flat layout. Its work per task
//! is reading a journal line and writing it; each decision about a process is a leader's.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use crate::journal::{Journal, JournalError};
use crate::run::coordinator::{self, Turn};
use crate::run::progress::Progress;
use crate::signals::Waker;
use crate::transport::Transport;
use dlaunch_core::lease::{Broker, Effect};
use dlaunch_core::wire::{self, Down, Up};

const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The shortest sleep of rank 0 after an idle turn. Each leader holds tasks queued for every
/// slot of its node (`lease::node_stock`) and asks for more while half remain, so an answer
/// a millisecond late starts nothing late; polling MPI every 50-200 µs instead, as a flat
/// rank 0 does for its workers, was most of rank 0's CPU in this layout.
const MIN_PAUSE: Duration = Duration::from_millis(1);

pub struct Root<T> {
    pub broker: Broker,
    pub transport: T,
    pub journal: Journal,
    /// Progress lines, the status snapshot and `dlaunch cancel` requests.
    pub progress: Progress,
    /// Every leader, with when it was last sent anything.
    last_sent: BTreeMap<u32, Instant>,
    heartbeat_every: Duration,
    next_health_check: Instant,
    /// When the allocation ends, if known: tasks that cannot finish by then are not leased.
    deadline: Option<SystemTime>,
}

impl<T: Transport> Root<T> {
    /// Starts the leaders: each learns when the allocation ends, and asks for tasks.
    pub fn new(
        broker: Broker,
        mut transport: T,
        journal: Journal,
        progress: Progress,
        deadline: Option<SystemTime>,
        now: Instant,
    ) -> Self {
        let leaders: Vec<u32> = broker.leaders().collect();
        coordinator::send_each(&mut transport, &leaders, &[Down::Start { deadline }]);
        let last_sent = broker.leaders().map(|rank| (rank, now)).collect();
        let heartbeat_every = coordinator::heartbeat_every(broker.heartbeat_timeout());
        Root {
            broker,
            transport,
            journal,
            progress,
            last_sent,
            heartbeat_every,
            next_health_check: now + HEALTH_CHECK_INTERVAL,
            deadline,
        }
    }

    /// Runs until every task is settled, or dispatching stopped and no node runs anything.
    pub fn run(&mut self, waker: &Waker) -> Result<(), JournalError> {
        coordinator::run_turns(self, waker, Self::turn, |_, pause| pause.max(MIN_PAUSE))
    }

    fn turn(&mut self, now: Instant, wall: SystemTime, stop: Option<String>) -> Result<Turn, JournalError> {
        let mut active = false;
        self.broker.set_time_left(self.deadline.map(|d| d.duration_since(wall).unwrap_or_default()));
        while let Some((rank, bytes)) = self.transport.try_receive() {
            self.broker.heard_from(rank, now);
            match wire::decode::<Up>(&bytes) {
                Ok(ups) => {
                    for up in ups {
                        active |= self.on_up(rank, up, now)?;
                    }
                }
                Err(e) => log::error!("unreadable message from rank {rank}: {e}"),
            }
        }
        if let Some(reason) = stop {
            self.broker.stop(&reason);
        }
        if now >= self.next_health_check {
            self.broker.check_health(now);
            for request in self.progress.tick(self.journal.len(), now) {
                if request.tasks.is_empty() {
                    self.broker.stop("cancelled with dlaunch cancel");
                } else {
                    self.broker.cancel(&request.tasks, wall);
                }
            }
            self.next_health_check = now + HEALTH_CHECK_INTERVAL;
        }
        active |= self.carry_out(now)?;
        if self.broker.finished() {
            return Ok(Turn::Finished);
        }
        Ok(if active { Turn::Active } else { Turn::Idle })
    }

    /// A leader's batch: its journal lines into the journal as they are (each read once, for
    /// the ledger and progress), then what it wants. True when it brought anything.
    fn on_up(&mut self, leader: u32, up: Up, now: Instant) -> Result<bool, JournalError> {
        let batch = match up {
            Up::Batch(batch) => batch,
            Up::Hello { .. } => {
                log::warn!("rank {leader} said hello twice");
                return Ok(false);
            }
        };
        for line in batch.lines.split_inclusive(|&b| b == b'\n') {
            match dlaunch_core::journal::event_of(line) {
                Ok(event) => {
                    self.broker.from_node(leader, &event);
                    self.progress.record(&event);
                    self.journal.append_line(line)?;
                }
                Err(e) => log::error!("rank {leader} sent a journal line that is no event ({e}): left out"),
            }
        }
        // A want repeated in a heartbeat batch is no news (nothing left to lease); the leases
        // it brings are, through the effects.
        let brought = !batch.lines.is_empty();
        self.broker.late_at_node(&batch.late);
        self.broker.handed_back(leader, &batch.handed_back, SystemTime::now());
        self.broker.node_said(leader, batch.want, batch.leases, batch.idle, batch.stopping, now);
        Ok(brought)
    }

    /// Journal lines first, then what leaders are told; a heartbeat to each leader told
    /// nothing for a while. True when there was anything but heartbeats to do.
    fn carry_out(&mut self, now: Instant) -> Result<bool, JournalError> {
        let effects = self.broker.take_effects();
        let busy = !effects.is_empty();
        let mut downs: BTreeMap<u32, Vec<Down>> = BTreeMap::new();
        for effect in effects {
            match effect {
                Effect::Record(event) => {
                    self.journal.append(&event)?;
                    self.progress.record(&event);
                }
                Effect::Send { rank, down } => downs.entry(rank).or_default().push(down),
            }
        }
        self.journal.flush(false)?;
        for (&rank, &last) in &self.last_sent {
            if now.saturating_duration_since(last) >= self.heartbeat_every && !downs.contains_key(&rank) {
                downs.insert(rank, vec![Down::Heartbeat]);
            }
        }
        if downs.is_empty() {
            return Ok(busy);
        }
        for rank in downs.keys() {
            self.last_sent.insert(*rank, now);
        }
        let batch: Vec<(u32, Vec<u8>)> = downs.iter().map(|(rank, d)| (*rank, wire::encode(d))).collect();
        self.transport.send_all(&batch);
        Ok(busy)
    }
}

/// Tells every leader to dismiss its node's workers and exit.
pub fn dismiss<T: Transport>(transport: &mut T, leaders: &[u32]) {
    coordinator::send_each(transport, leaders, &[Down::Exit]);
}
