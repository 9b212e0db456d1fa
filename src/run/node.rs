//! A node's leader in `layout = "nodes"`: the coordinator of its node's workers — the flat
//! layout's `Coordinator` over `Control::for_node`, its own worker on a loopback — and rank 0's
//! peer. It runs the tasks rank 0 leases it and sends up, in batches, what it journaled and
//! how many more tasks it would take (`wire::Up`): rank 0 hears from nodes, not processes.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::journal::JournalError;
use crate::run::coordinator::{self, Coordinator, JournalSink, Turn};
use crate::signals::{self, Backoff, Waker};
use crate::transport::Transport;
use dlaunch_core::control::Control;
use dlaunch_core::events::Event;
use dlaunch_core::sched::Capacity;
use dlaunch_core::spec::{self, Job};
use dlaunch_core::wire::{self, Batch, Down, Up};
use dlaunch_core::{exit_code, plan};

/// Rank 0, which leases tasks to leaders.
const ROOT: u32 = 0;

/// How long journal lines may wait for the next batch when nothing else is to say: rank 0's
/// journal, and so `dlaunch status`, lags a node by at most this. Sooner when the node runs
/// low on tasks, has nothing left to run, or stops.
const BATCH_EVERY: Duration = Duration::from_millis(500);

/// A leader's journal: lines for rank 0, which writes them into the job's one journal.
#[derive(Default)]
struct Lines {
    bytes: Vec<u8>,
    len: u64,
}

impl JournalSink for Lines {
    fn append(&mut self, event: &Event) -> Result<(), JournalError> {
        let before = self.bytes.len();
        serde_json::to_writer(&mut self.bytes, event).map_err(|e| JournalError::Io {
            path: "the journal lines for rank 0".into(),
            source: std::io::Error::other(e),
        })?;
        self.bytes.push(b'\n');
        self.len += (self.bytes.len() - before) as u64;
        Ok(())
    }

    fn flush(&mut self, _force: bool) -> Result<(), JournalError> {
        Ok(())
    }

    fn len(&self) -> u64 {
        self.len
    }
}

/// The leader's transport: what rank 0 says is set aside for the node's loop, the rest is the
/// node's workers' and goes to its `Coordinator`.
struct FromRoot<T> {
    inner: T,
    said: Vec<Down>,
    last_heard: Instant,
}

impl<T: Transport> Transport for FromRoot<T> {
    fn try_receive(&mut self) -> Option<(u32, Vec<u8>)> {
        loop {
            let (rank, bytes) = self.inner.try_receive()?;
            if rank != ROOT {
                return Some((rank, bytes));
            }
            self.last_heard = Instant::now();
            match wire::decode::<Down>(&bytes) {
                Ok(downs) => self.said.extend(downs),
                Err(e) => log::error!("unreadable message from rank 0: {e}"),
            }
        }
    }

    fn send_all(&mut self, batch: &[(u32, Vec<u8>)]) {
        self.inner.send_all(batch)
    }

    fn sends_in_flight(&self, rank: u32) -> usize {
        self.inner.sends_in_flight(rank)
    }

    fn sending(&self) -> bool {
        self.inner.sending()
    }
}

/// What the leader last told rank 0, to say only what changed (or is due).
struct Told {
    at: Instant,
    want: u32,
    leases: u32,
    idle: bool,
    stopping: bool,
}

/// Leads the node as rank `rank`: `workers` are its worker ranks (this rank's own worker, on
/// `transport`'s loopback, among them). Returns the rank's exit code.
pub fn lead<T: Transport>(transport: T, rank: u32, workers: &[u32], job: Arc<Job>, waker: &Waker) -> i32 {
    let every = coordinator::heartbeat_every(job.heartbeat_timeout);
    let mut transport = FromRoot { inner: transport, said: Vec::new(), last_heard: Instant::now() };
    let hellos = match coordinator::collect_hellos(&mut transport, workers.len(), super::HELLO_TIMEOUT, every) {
        Ok(hellos) => hellos,
        Err(missing) => {
            eprintln!(
                "dlaunch: no hello from {missing} worker rank(s) of this node within {}s",
                super::HELLO_TIMEOUT.as_secs()
            );
            return exit_code::INTERNAL;
        }
    };
    transport.send_all(&[(ROOT, wire::encode(&[Up::Hello { workers: hellos.clone() }]))]);
    // Rank 0 expands the same job the same way: a task is an index into this list.
    let tasks = match plan::expand(&job) {
        Ok(tasks) => Arc::new(tasks),
        Err(e) => {
            eprintln!("dlaunch: {}: {e}", job.file.display());
            coordinator::dismiss(&mut transport, workers);
            return exit_code::INTERNAL;
        }
    };
    let capacities: Vec<Capacity> = hellos.iter().map(|(_, hello)| hello.capacity).collect();
    let stock = dlaunch_core::lease::node_stock(&job, &capacities);
    let control = Control::for_node(Arc::clone(&job), tasks, &hellos, Instant::now());
    let mut node = Coordinator::new(control, transport, Lines::default(), None, Instant::now());
    let outcome = lead_until_exit(&mut node, rank, stock, &job, waker).map_err(|e| match e {
        LeadError::RootSilent(silence) => stop_for_good(&mut node, rank, silence, waker),
        e => e,
    });
    match outcome {
        Ok(()) => {
            coordinator::dismiss(&mut node.transport, workers);
            exit_code::SUCCESS
        }
        Err(e @ LeadError::RootLost { .. }) => {
            eprintln!("dlaunch: {e}");
            // Not through MPI_Finalize, which would wait for rank 0 forever; the node's workers
            // find this rank silent and end the same way.
            std::process::exit(exit_code::INTERNAL)
        }
        Err(e) => {
            eprintln!("dlaunch: rank {rank}: {e}");
            coordinator::dismiss(&mut node.transport, workers);
            exit_code::INTERNAL
        }
    }
}

/// Why a leader ended before rank 0 said Exit.
#[derive(Debug, thiserror::Error)]
enum LeadError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(
        "rank {rank}: no word from rank 0 for {}, longer than heartbeat_timeout: it is gone. This node stopped its tasks; run the job again to resume.",
        spec::format_duration(*silence)
    )]
    RootLost { rank: u32, silence: Duration },
    /// Rank 0 has been silent this long: stop the node's tasks, then `RootLost`.
    #[error("rank 0 silent for {}", spec::format_duration(*.0))]
    RootSilent(Duration),
}

fn lead_until_exit<T: Transport>(
    node: &mut Coordinator<FromRoot<T>, Lines>,
    rank: u32,
    stock: u32,
    job: &Job,
    waker: &Waker,
) -> Result<(), LeadError> {
    let mut backoff = Backoff::new();
    let (mut started, mut leases) = (false, 0);
    let mut told = Told { at: Instant::now(), want: 0, leases: 0, idle: false, stopping: false };
    let every = coordinator::heartbeat_every(job.heartbeat_timeout);
    loop {
        // As a worker rank reports it: rank 0's own signal reads "received" alone.
        let stop = signals::take_stop_request().map(|signal| format!("{signal} received by rank {rank}"));
        let mut active = node.turn(Instant::now(), SystemTime::now(), stop)? == Turn::Active;
        let said = std::mem::take(&mut node.transport.said);
        let (now, wall) = (Instant::now(), SystemTime::now());
        for down in &said {
            match down {
                Down::Start { deadline } => {
                    node.deadline = *deadline;
                    started = true;
                }
                Down::Lease { lease, tasks } => {
                    node.control.lease(tasks);
                    leases = *lease;
                }
                Down::Cancel { tasks } => node.control.cancel(tasks, wall),
                Down::Stop { reason } => node.control.stop(reason, now),
                Down::Heartbeat => {}
                Down::Exit => return Ok(()),
            }
        }
        if said.iter().any(|d| *d != Down::Heartbeat) {
            // What came is to be dispatched or stopped now, not a turn later.
            node.turn(now, wall, None)?;
            active = true;
        }
        let silence = now.saturating_duration_since(node.transport.last_heard);
        if silence > job.heartbeat_timeout {
            return Err(LeadError::RootSilent(silence));
        }
        if started {
            let want = stock.saturating_sub(node.control.queued() as u32);
            let idle = node.control.finished();
            let stopping = node.control.stopping().map(str::to_string);
            let lines = !node.journal.bytes.is_empty();
            // Running low, each end is news: rank 0 may have held tasks back for this node
            // until its slots free (`lease::Broker::lease`).
            let low = want >= stock / 2 && (want != told.want || lines);
            let urgent = low
                || idle != told.idle
                || leases != told.leases
                || stopping.is_some() != told.stopping
                || node.control.has_news_for_rank_0();
            let since = now.saturating_duration_since(told.at);
            let due = (lines && since >= BATCH_EVERY) || since >= every;
            if urgent || due {
                let lines = std::mem::take(&mut node.journal.bytes);
                let (handed_back, late) = (node.control.take_handed_back(), node.control.take_newly_late());
                let stopping_now = stopping.clone().filter(|_| !told.stopping);
                let batch = Batch { lines, want, leases, idle, handed_back, late, stopping: stopping_now };
                node.transport.send_all(&[(ROOT, wire::encode(&[Up::Batch(batch)]))]);
                told = Told { at: now, want, leases, idle, stopping: stopping.is_some() };
                // A heartbeat sent is no work: polling hot after it kept an idle leader awake.
                active |= urgent;
            }
        }
        if active {
            backoff.reset();
        } else {
            let pause = node.pause(backoff.next_pause());
            waker.sleep(pause.min(BATCH_EVERY));
        }
    }
}

/// Rank 0 is gone: the node's tasks are stopped (within the job's grace) before the leader
/// gives up, as a worker rank does when its coordinator is gone.
fn stop_for_good<T: Transport>(
    node: &mut Coordinator<FromRoot<T>, Lines>,
    rank: u32,
    silence: Duration,
    waker: &Waker,
) -> LeadError {
    node.control.stop("rank 0 is gone", Instant::now());
    let mut backoff = Backoff::new();
    while let Ok(turn) = node.turn(Instant::now(), SystemTime::now(), None) {
        if turn == Turn::Finished {
            break;
        }
        waker.sleep(backoff.next_pause());
    }
    LeadError::RootLost { rank, silence }
}
