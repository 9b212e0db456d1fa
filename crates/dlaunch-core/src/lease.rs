//! Rank 0 in the node layout (`[job] layout = "nodes"`): it decides nothing per process. Each
//! node's leader runs a `control::Control` over that node's workers; rank 0 leases leaders
//! blocks of queued tasks as they ask for them (`wire::Down::Lease`), folds the events they
//! journaled into the one ledger, holds back tasks that wait for others, and notices leaders
//! that went silent. The shell feeds it what leaders send and carries out its effects.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::control::{Unfit, demand, need_of};
use crate::deps::{Blocked, Deps};
use crate::events::{AttemptStatus, Event};
use crate::ledger::{Ledger, Resume, TaskStatus, definitions, subject};
use crate::plan::Task;
use crate::sched::{Capacity, Scheduler};
use crate::spec::{Job, Resources, format_duration, format_size};
use crate::wire::{Down, Leased, WorkerHello};

/// A node of the run: its leader rank and its workers, the leader's own worker among them.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub leader: u32,
    pub workers: Vec<(u32, WorkerHello)>,
}

/// Something the shell must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    Send { rank: u32, down: Down },
    Record(Event),
}

/// Where a task of the job stands at rank 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// Not in rank 0's hands: not run in this run, settled, or waiting for its dependencies
    /// (`Deps` knows which).
    Aside,
    Queued,
    /// Leased to the node at this index, not started there yet.
    Leased(u32),
    /// Leased to the node at this index and started there at least once.
    Started(u32),
}

/// Waves of tasks a node may hold: the one it runs and two queued behind it, as its leader
/// asks for them (two per slot); leases then carry a wave at a time, not a task per end.
const STOCK_WAVES: u32 = 3;

/// Marks "no task" and "no record" in the tables indexed by task and by ledger position.
const NONE: u32 = u32::MAX;

/// What rank 0 knows of one node.
#[derive(Debug)]
struct NodeState {
    leader: u32,
    host: String,
    /// Its workers not lost, with what each has.
    workers: Vec<(u32, Capacity)>,
    /// Its index among the run's node shapes (`Broker::waves`): a node that loses a worker
    /// takes a shape of its own.
    shape: usize,
    /// Tasks leased to it and not settled: queued, held or running there, retries included;
    /// in all and per template.
    outstanding: u32,
    held: Vec<u32>,
    last_heard: Instant,
    /// As it last said.
    want: u32,
    idle: bool,
    /// The last lease it has taken in, and the last sent to it.
    taken: u32,
    sent: u32,
    /// Leases sent that it has not taken in: (lease, tasks). Its `want` does not count them.
    in_flight: VecDeque<(u32, u32)>,
    lost: bool,
}

impl NodeState {
    /// Nothing more can happen there without rank 0.
    fn settled(&self) -> bool {
        self.lost || (self.idle && self.taken >= self.sent)
    }

    fn wanting(&self) -> bool {
        !self.lost && self.want > 0
    }

    /// How many more tasks it takes, beyond those on their way to it.
    fn room(&self) -> u32 {
        let coming: u32 = self.in_flight.iter().map(|&(_, tasks)| tasks).sum();
        self.want.saturating_sub(coming)
    }
}

/// The tasks queued at rank 0, one FIFO list per template, each task with its place in the
/// whole queue: a node takes the oldest of the lists whose template fits it, so tasks that do
/// not fit it are never walked. A task taken out of the middle (cancelled) leaves its entry,
/// dropped when it comes to the head.
#[derive(Debug)]
struct Queue {
    lists: Vec<VecDeque<(u32, u32)>>,
    /// Per template, its tasks still queued.
    live: Vec<usize>,
    len: usize,
    /// The place the next task queued takes; counts up from `FIRST_PLACE`.
    next: u32,
    /// The place the next task handed back takes, ahead of every other; counts down.
    front: u32,
}

/// Places below are for tasks handed back, so that they go first.
const FIRST_PLACE: u32 = 1 << 31;

impl Queue {
    fn new(templates: usize) -> Self {
        let lists = vec![VecDeque::new(); templates];
        Queue { lists, live: vec![0; templates], len: 0, next: FIRST_PLACE, front: FIRST_PLACE }
    }

    fn push(&mut self, template: usize, task: usize) {
        self.lists[template].push_back((self.next, task as u32));
        self.next += 1;
        self.counted(template);
    }

    /// Queues `task` ahead of every task queued so far: it was leased and comes back.
    fn push_front(&mut self, template: usize, task: usize) {
        self.front -= 1;
        self.lists[template].push_front((self.front, task as u32));
        self.counted(template);
    }

    fn counted(&mut self, template: usize) {
        self.live[template] += 1;
        self.len += 1;
    }

    /// Counts one task of `template` as gone from the queue (its entry stays until met).
    fn forget(&mut self, template: usize) {
        self.live[template] -= 1;
        self.len -= 1;
    }

    /// The place of `template`'s oldest queued task, its list rid of entries of tasks gone.
    fn head(&mut self, template: usize, places: &[Place]) -> Option<u32> {
        let list = &mut self.lists[template];
        while let Some(&(seq, task)) = list.front() {
            if places[task as usize] == Place::Queued {
                return Some(seq);
            }
            list.pop_front();
        }
        None
    }
}

pub struct Broker {
    job: Arc<Job>,
    tasks: Arc<Vec<Task>>,
    ledger: Ledger,
    deps: Deps,
    queue: Queue,
    /// Per task: where it stands.
    places: Vec<Place>,
    /// Per task, its record's position in the ledger; per ledger position, its task (`NONE`
    /// for records of tasks this job file no longer has). Records never move.
    position_of: Vec<u32>,
    task_at: Vec<u32>,
    nodes: Vec<NodeState>,
    /// Per rank, its node's index if it leads one (`NONE` otherwise).
    node_of: Vec<u32>,
    /// Per node shape, per template: how many of its tasks a node of the shape runs at once
    /// (0: they do not fit it): a node's first wave of them.
    waves: Vec<Vec<u32>>,
    /// Per template: how long its tasks need, and how long the allocation has left, if known.
    time_needed: Vec<Option<Duration>>,
    time_left: Option<Duration>,
    /// Per template: a node found its tasks late (`late_at_node`).
    late: Vec<bool>,
    /// Per template: what all nodes lack of their first wave of its tasks, tasks they could
    /// start now (templates are few: kept per node change).
    unfilled: Vec<u64>,
    /// Worker ranks given up on, by their leader or with it.
    lost_workers: BTreeSet<u32>,
    /// Leased tasks whose cancel went to their node: one the node hands back meanwhile is
    /// cancelled, not queued again.
    cancels_sent: HashSet<usize>,
    /// Per template: whether a node not lost fits its tasks (nodes lose workers).
    runnable: Vec<bool>,
    /// Nodes not settled (`NodeState::settled`), and per shape the nodes that want tasks.
    unsettled: usize,
    wanting: Vec<usize>,
    /// Nodes that wanted more than they got: tasks that dependencies release go to them too.
    hungry: BTreeSet<usize>,
    /// Tasks were queued since the last lease (their dependencies succeeded).
    released: bool,
    /// Tasks leased that have not started.
    leased_unstarted: usize,
    lost: BTreeSet<u32>,
    stopping: Option<String>,
    effects: Vec<Effect>,
}

impl Broker {
    /// Sets up a run: checks every task fits within one node, records the run's start, its
    /// workers and its tasks' definitions, and queues `resume.to_run`. `ledger` holds what
    /// earlier runs recorded (empty for a fresh run).
    pub fn new(
        job: Arc<Job>,
        tasks: Arc<Vec<Task>>,
        nodes: Vec<Node>,
        ledger: Ledger,
        resume: &Resume,
        run_started: Event,
        now: Instant,
    ) -> Result<Broker, Unfit> {
        let (shapes, shape_of) = shapes(&nodes);
        let waves = check_fit(&job, &tasks, &nodes, &shapes, resume)?;
        let mut node_of = Vec::new();
        let states: Vec<NodeState> = nodes
            .iter()
            .zip(shape_of)
            .enumerate()
            .map(|(index, (node, shape))| {
                let leader = node.leader as usize;
                if node_of.len() <= leader {
                    node_of.resize(leader + 1, NONE);
                }
                node_of[leader] = index as u32;
                let own = node.workers.iter().find(|(rank, _)| *rank == node.leader).or(node.workers.first());
                NodeState {
                    leader: node.leader,
                    host: own.map_or_else(String::new, |(_, hello)| hello.host.clone()),
                    workers: node.workers.iter().map(|(rank, hello)| (*rank, hello.capacity)).collect(),
                    shape,
                    outstanding: 0,
                    held: vec![0; job.templates.len()],
                    last_heard: now,
                    want: 0,
                    idle: false,
                    taken: 0,
                    sent: 0,
                    in_flight: VecDeque::new(),
                    lost: false,
                }
            })
            .collect();
        let unfilled =
            (0..job.templates.len()).map(|t| states.iter().map(|n| u64::from(waves[n.shape][t])).sum()).collect();
        let mut broker = Broker {
            deps: Deps::new(&tasks),
            queue: Queue::new(job.templates.len()),
            places: vec![Place::Aside; tasks.len()],
            position_of: vec![NONE; tasks.len()],
            task_at: Vec::new(),
            unsettled: states.len(),
            wanting: vec![0; waves.len()],
            nodes: states,
            node_of,
            time_needed: job.templates.iter().map(|t| t.time_needed()).collect(),
            time_left: None,
            late: vec![false; job.templates.len()],
            unfilled,
            lost_workers: BTreeSet::new(),
            cancels_sent: HashSet::new(),
            runnable: (0..job.templates.len()).map(|t| waves.iter().any(|w| w[t] > 0)).collect(),
            waves,
            hungry: BTreeSet::new(),
            released: false,
            leased_unstarted: 0,
            lost: BTreeSet::new(),
            stopping: None,
            effects: Vec::new(),
            ledger,
            job,
            tasks,
        };
        broker.record(run_started);
        for (rank, hello) in nodes.iter().flat_map(|n| &n.workers) {
            broker.record(Event::WorkerJoined { rank: *rank, host: hello.host.clone(), capacity: hello.capacity });
        }
        broker.ledger.reserve(resume.defined.len());
        let (job, tasks) = (Arc::clone(&broker.job), Arc::clone(&broker.tasks));
        for event in definitions(&job, &tasks, resume) {
            broker.record(event);
        }
        for task in tasks.iter() {
            let position = broker.ledger.position_at_or_find(task.index, &task.id);
            let position = position.unwrap_or_else(|| broker.ledger.index(&task.id));
            broker.position_of[task.index] = position as u32;
            if broker.task_at.len() <= position {
                broker.task_at.resize(position + 1, NONE);
            }
            broker.task_at[position] = task.index as u32;
        }
        let resumed = broker.deps.resume(&tasks, &broker.ledger, resume);
        for event in resumed.skipped {
            broker.record(event);
        }
        for index in resumed.queue {
            broker.enqueue(index);
        }
        Ok(broker)
    }

    /// An event leader `leader` journaled (the shell appends its line to the journal): applied
    /// to the ledger; a task it settles releases or skips the tasks waiting for it.
    pub fn from_node(&mut self, leader: u32, event: &Event) {
        let Some(id) = subject(event) else {
            if let Event::WorkerLost { rank, .. } = event {
                self.worker_lost(leader, *rank);
            }
            self.ledger.apply(event);
            return;
        };
        let Some(position) = self.ledger.position(id) else {
            log::warn!("node leader rank {leader} journaled an event of {id}, a task this job does not have");
            self.ledger.apply(event);
            return;
        };
        self.ledger.apply_at(position, event);
        let Some(&task) = self.task_at.get(position).filter(|&&task| task != NONE) else {
            return;
        };
        let index = task as usize;
        match (event, self.places[index]) {
            (Event::AttemptStarted { .. }, Place::Leased(node)) => {
                self.places[index] = Place::Started(node);
                self.leased_unstarted -= 1;
            }
            (Event::AttemptEnded { .. } | Event::TaskCancelled { .. }, Place::Leased(_) | Place::Started(_)) => {
                let why = match self.ledger.at(position).status {
                    TaskStatus::Succeeded => None,
                    TaskStatus::Failed => Some(Blocked::Failed),
                    TaskStatus::Cancelled => Some(Blocked::Cancelled),
                    // Retried at its node, or interrupted (it runs again on resume).
                    _ => return,
                };
                self.off_node(index);
                self.places[index] = Place::Aside;
                match why {
                    None => self.release_dependents(index),
                    Some(why) => self.skip_dependents(index, why),
                }
            }
            _ => {}
        }
    }

    /// The rest of a leader's `Up::Batch`, after its lines went through `from_node`: what it
    /// wants, the last lease it took in, whether it is idle, and why it stopped on its own.
    /// Leases it tasks if it wants any.
    pub fn node_said(
        &mut self,
        leader: u32,
        want: u32,
        leases: u32,
        idle: bool,
        stopping: Option<String>,
        now: Instant,
    ) {
        let Some(node) = self.node_index(leader) else {
            log::warn!("rank {leader} sent a batch, but leads no node of this run");
            return;
        };
        self.nodes[node].last_heard = now;
        if self.nodes[node].lost {
            log::debug!("node leader rank {leader} spoke after it was given up; ignored");
            return;
        }
        self.update(node, |n| {
            n.want = want;
            n.idle = idle;
            n.taken = leases;
            while n.in_flight.front().is_some_and(|&(lease, _)| lease <= leases) {
                n.in_flight.pop_front();
            }
        });
        if let Some(reason) = stopping {
            self.stop(&reason);
        }
        self.lease(node);
        if std::mem::take(&mut self.released) {
            let hungry: Vec<usize> = self.hungry.iter().copied().collect();
            for other in hungry {
                self.lease(other);
            }
        }
    }

    /// Tasks a leader hands back, leased to it and not started, that it can no longer run (it
    /// lost the workers they need): queued again ahead of the rest, for any node they fit; a
    /// task whose cancel crossed its way back is cancelled here; one no node can run any more
    /// fails, as in the flat layout.
    pub fn handed_back(&mut self, leader: u32, tasks: &[u32], now: SystemTime) {
        let Some(node) = self.node_index(leader) else { return };
        // Each goes to the front: the last first, so that they keep their order.
        for &task in tasks.iter().rev() {
            let index = task as usize;
            let place = self.places.get(index).copied();
            if !matches!(place, Some(Place::Leased(n) | Place::Started(n)) if n as usize == node) {
                log::warn!("node leader rank {leader} handed back task {task}, which it does not hold");
                continue;
            }
            self.off_node(index);
            let template = self.tasks[index].template;
            if self.cancels_sent.remove(&index) {
                self.places[index] = Place::Aside;
                self.cancelled(index, now);
            } else if !self.runnable[template] {
                self.fail(index);
            } else {
                self.places[index] = Place::Queued;
                self.queue.push_front(template, index);
                self.released = true;
            }
        }
    }

    /// How long the allocation has left, if known: tasks that need longer are not leased
    /// (they stay queued, not started, for a later allocation).
    pub fn set_time_left(&mut self, left: Option<Duration>) {
        self.time_left = left;
    }

    /// Templates a node found late by its clock (`Batch::late`): none of their tasks is
    /// leased again in this run, whatever rank 0's clock says, or a clock behind the node's
    /// would lease each one back as fast as the node hands it back.
    pub fn late_at_node(&mut self, templates: &[u32]) {
        for &template in templates {
            if let Some(late) = self.late.get_mut(template as usize) {
                *late = true;
            }
        }
    }

    /// Worker ranks given up on (their leader's lines say so, or their leader was lost): the
    /// MPI job ends with `MPI_Abort`, as `MPI_Finalize` would wait for them.
    pub fn lost_workers(&self) -> &BTreeSet<u32> {
        &self.lost_workers
    }

    /// Leader `leader` gave up its worker `rank`: its node is leased only what its other
    /// workers hold.
    fn worker_lost(&mut self, leader: u32, rank: u32) {
        self.lost_workers.insert(rank);
        let Some(node) = self.node_index(leader) else { return };
        let mut workers = self.nodes[node].workers.clone();
        workers.retain(|(r, _)| *r != rank);
        let capacities: Vec<Capacity> = workers.iter().map(|(_, c)| *c).collect();
        self.waves.push(waves_of(&self.job, &capacities));
        self.wanting.push(0);
        let shape = self.waves.len() - 1;
        self.update(node, |n| {
            n.workers = workers;
            n.shape = shape;
        });
        self.fail_unrunnable();
    }

    /// Queued tasks that no node left can run (nodes lost workers): they fail, as in the flat
    /// layout, and what waits for them is skipped; so do tasks queued later (`enqueue`). Asked
    /// when a node's shape changes.
    fn fail_unrunnable(&mut self) {
        for template in 0..self.queue.lists.len() {
            let runnable = self.nodes.iter().any(|n| !n.lost && self.waves[n.shape][template] > 0);
            self.runnable[template] = runnable;
            if runnable || self.queue.live[template] == 0 {
                continue;
            }
            let list = std::mem::take(&mut self.queue.lists[template]);
            for (_, task) in list {
                let index = task as usize;
                if self.places[index] == Place::Queued {
                    self.queue.forget(template);
                    self.fail(index);
                }
            }
        }
    }

    /// `index`, not running, fails for good: no healthy worker left can run it.
    fn fail(&mut self, index: usize) {
        self.places[index] = Place::Aside;
        let record = self.ledger.at(self.position_of[index] as usize);
        let event = Event::AttemptEnded {
            task: record.id.clone(),
            attempt: record.attempts,
            status: AttemptStatus::Failed,
            reason: "no healthy worker left can run it".into(),
            retry: false,
            processes: vec![],
        };
        self.record(event);
        self.skip_dependents(index, Blocked::Failed);
    }

    /// Any message from a leader shows it is alive.
    pub fn heard_from(&mut self, leader: u32, now: Instant) {
        match self.node_index(leader) {
            Some(node) => self.nodes[node].last_heard = now,
            None => log::debug!("rank {leader} leads no node of this run"),
        }
    }

    /// Gives up leaders silent for longer than `heartbeat_timeout`, and stops the run: their
    /// tasks stay as the ledger has them, and run again when it is resumed.
    pub fn check_health(&mut self, now: Instant) {
        let timeout = self.job.heartbeat_timeout;
        let silent: Vec<(usize, Duration)> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| !n.lost)
            .map(|(i, n)| (i, now.saturating_duration_since(n.last_heard)))
            .filter(|&(_, silence)| silence > timeout)
            .collect();
        for (node, silence) in silent {
            self.node_lost(node, silence);
        }
    }

    fn node_lost(&mut self, node: usize, silence: Duration) {
        self.update(node, |n| n.lost = true);
        let n = &self.nodes[node];
        let (leader, host, workers) = (n.leader, n.host.clone(), n.workers.clone());
        self.lost.insert(leader);
        self.hungry.remove(&node);
        let reason = format!(
            "node leader rank {leader} on {host} sent nothing for {} (heartbeat_timeout is {}): its node is lost; resume the run to run its unfinished tasks again",
            format_duration(silence),
            format_duration(self.job.heartbeat_timeout)
        );
        log::error!("{reason}");
        for (rank, _) in workers {
            self.lost_workers.insert(rank);
            self.record(Event::WorkerLost { rank, host: host.clone(), reason: reason.clone() });
        }
        self.stop(&reason);
    }

    /// Cancels tasks at a user's request (`dlaunch cancel`): queued and waiting ones here,
    /// recorded as cancelled (the tasks waiting for them are skipped); leased ones where their
    /// node has them, which journals what becomes of them. Finished tasks and ids this job
    /// does not have are left alone (the request may predate a change of the job file).
    pub fn cancel(&mut self, ids: &[String], now: SystemTime) {
        let mut forward: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for id in ids {
            let task = self.ledger.position(id).and_then(|p| self.task_at.get(p)).filter(|&&t| t != NONE);
            let Some(&task) = task else {
                log::warn!("cancel: this job has no task {id}");
                continue;
            };
            let index = task as usize;
            match self.places[index] {
                Place::Queued => {
                    self.queue.forget(self.tasks[index].template);
                    self.places[index] = Place::Aside;
                    self.cancelled(index, now);
                }
                Place::Aside if self.deps.remove(index) => self.cancelled(index, now),
                Place::Leased(node) | Place::Started(node) if !self.nodes[node as usize].lost => {
                    log::info!("cancelling {id} at node leader rank {}", self.nodes[node as usize].leader);
                    forward.entry(node as usize).or_default().push(id.clone());
                    self.cancels_sent.insert(index);
                }
                Place::Leased(node) | Place::Started(node) => {
                    log::info!("cancel: {id} was leased to rank {}, which is lost", self.nodes[node as usize].leader);
                }
                Place::Aside => log::info!("cancel: {id} is neither queued nor running; left as it is"),
            }
        }
        for (node, tasks) in forward {
            self.send(self.nodes[node].leader, Down::Cancel { tasks });
        }
    }

    /// Stops leasing for good and asks every leader not lost to stop dispatching and
    /// interrupt what runs.
    pub fn stop(&mut self, reason: &str) {
        if self.stopping.is_some() {
            return;
        }
        log::warn!("stopping: {reason}");
        self.stopping = Some(reason.to_string());
        self.hungry.clear();
        let leaders: Vec<u32> = self.nodes.iter().filter(|n| !n.lost).map(|n| n.leader).collect();
        for leader in leaders {
            self.send(leader, Down::Stop { reason: reason.to_string() });
        }
    }

    /// Done: every node not lost is idle and has taken in every lease sent to it, and either
    /// leasing stopped or no node that wants tasks can take any queued one. Tasks waiting for
    /// others then wait for tasks that will not run in this run (`not_started` counts them).
    pub fn finished(&self) -> bool {
        self.unsettled == 0 && (self.stopping.is_some() || !self.leasable())
    }

    /// Whether a queued task fits a node that wants tasks.
    fn leasable(&self) -> bool {
        let wanted =
            |t: usize| self.waves.iter().zip(&self.wanting).any(|(waves, &wanting)| wanting > 0 && waves[t] > 0);
        self.queue.live.iter().enumerate().any(|(t, &live)| live > 0 && self.in_time(t) && wanted(t))
    }

    /// Whether `template`'s tasks can finish in the time the allocation has left.
    fn in_time(&self, template: usize) -> bool {
        !self.late[template]
            && !matches!((self.time_needed[template], self.time_left), (Some(needed), Some(left)) if needed > left)
    }

    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// Rank 0's own events (a dataset staged, the run's end): applied and queued for the
    /// journal, after what is already queued.
    pub fn record(&mut self, event: Event) {
        self.ledger.apply(&event);
        self.effects.push(Effect::Record(event));
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Why leasing stopped early, if it did.
    pub fn stopping(&self) -> Option<&str> {
        self.stopping.as_deref()
    }

    /// Tasks to run that never started: queued or waiting here, or leased and not started.
    pub fn not_started(&self) -> usize {
        // A task that ran at its node and waits there to run again (a retry, held back by the
        // time left) is not started in this sense either; asked once, at the end.
        let again = (self.places.iter().zip(&self.position_of))
            .filter(|(place, _)| matches!(place, Place::Started(_)))
            .filter(|(_, at)| {
                matches!(self.ledger.at(**at as usize).status, TaskStatus::Pending | TaskStatus::Interrupted)
            })
            .count();
        self.queue.len + self.deps.waiting() + self.leased_unstarted + again
    }

    /// Every leader rank of the run, lost ones too.
    pub fn leaders(&self) -> impl Iterator<Item = u32> + '_ {
        self.nodes.iter().map(|n| n.leader)
    }

    /// Leader ranks given up on (silent).
    pub fn lost_leaders(&self) -> &BTreeSet<u32> {
        &self.lost
    }

    pub fn heartbeat_timeout(&self) -> Duration {
        self.job.heartbeat_timeout
    }

    fn node_index(&self, leader: u32) -> Option<usize> {
        self.node_of.get(leader as usize).filter(|&&n| n != NONE).map(|&n| n as usize)
    }

    fn send(&mut self, rank: u32, down: Down) {
        self.effects.push(Effect::Send { rank, down });
    }

    /// Changes node `node` keeping the counts of settled and wanting nodes, and what all
    /// nodes lack of their first wave.
    fn update(&mut self, node: usize, change: impl FnOnce(&mut NodeState)) {
        let lacks = |n: &NodeState, waves: &[Vec<u32>], t: usize| {
            if n.lost { 0 } else { u64::from(waves[n.shape][t].saturating_sub(n.outstanding)) }
        };
        let n = &mut self.nodes[node];
        let (settled, wanting, shape) = (n.settled(), n.wanting(), n.shape);
        for (t, unfilled) in self.unfilled.iter_mut().enumerate() {
            *unfilled -= lacks(n, &self.waves, t);
        }
        change(n);
        for (t, unfilled) in self.unfilled.iter_mut().enumerate() {
            *unfilled += lacks(n, &self.waves, t);
        }
        match (settled, n.settled()) {
            (true, false) => self.unsettled += 1,
            (false, true) => self.unsettled -= 1,
            _ => {}
        }
        if wanting {
            self.wanting[shape] -= 1;
        }
        if n.wanting() {
            self.wanting[n.shape] += 1;
        }
    }

    /// Task `index`, leased, is no longer held at its node (settled, or handed back): the
    /// node's counts go down. Its place is the caller's to set.
    fn off_node(&mut self, index: usize) {
        let (Place::Leased(node) | Place::Started(node)) = self.places[index] else { return };
        if matches!(self.places[index], Place::Leased(_)) {
            self.leased_unstarted -= 1;
        }
        let template = self.tasks[index].template;
        self.update(node as usize, |n| {
            n.outstanding -= 1;
            n.held[template] -= 1;
        });
    }

    fn enqueue(&mut self, index: usize) {
        let template = self.tasks[index].template;
        if !self.runnable[template] {
            return self.fail(index);
        }
        self.places[index] = Place::Queued;
        self.queue.push(template, index);
    }

    /// Of tasks that nothing limits (an unbounded wave), what one lease takes: an even share of
    /// those queued among the nodes that fit them, as the flat layout spreads them over its
    /// workers, where the first node to ask would take them all.
    fn share(&self, template: usize, queued: usize) -> u32 {
        let nodes = self.nodes.iter().filter(|n| !n.lost && self.waves[n.shape][template] > 0).count();
        queued.div_ceil(nodes.max(1)) as u32
    }

    /// Leases node `node` queued tasks that fit it, oldest first, as many as it has room for:
    /// at most `STOCK_WAVES` waves of what it runs at once, beyond the first only while more
    /// tasks of the kind are queued than other nodes lack of their first wave (a node that
    /// asks first must not hold tasks it cannot start while another node's slots are empty).
    /// A node that is idle with tasks in hand takes what it asks for: none of those can start.
    fn lease(&mut self, node: usize) {
        if self.stopping.is_some() || self.nodes[node].lost {
            return;
        }
        let room = self.nodes[node].room() as usize;
        if room == 0 {
            self.hungry.remove(&node);
            return;
        }
        let n = &self.nodes[node];
        let (shape, held_before) = (n.shape, n.outstanding);
        // Idle with tasks in hand and every lease taken in: none of those can start.
        let stuck = n.idle && held_before > 0 && n.taken >= n.sent;
        let mut held_of = n.held.clone();
        let mut shares: Vec<Option<u32>> = vec![None; held_of.len()];
        let mut heads: BinaryHeap<Reverse<(u32, usize)>> = BinaryHeap::new();
        for template in 0..self.waves[shape].len() {
            if self.waves[shape][template] == 0 || self.queue.live[template] == 0 || !self.in_time(template) {
                continue;
            }
            heads.extend(self.queue.head(template, &self.places).map(|seq| Reverse((seq, template))));
        }
        let mut leased = Vec::with_capacity(room.min(self.queue.len));
        while leased.len() < room
            && let Some(Reverse((_, template))) = heads.pop()
        {
            // A template's first wave goes to any node that fits it, however many tasks of
            // other kinds it holds: its own queue then keeps room for it (bounded backfill),
            // where counting those would let small tasks overtake a big one without end.
            let wave = self.waves[shape][template];
            let held = held_before + leased.len() as u32;
            let lacking_elsewhere = self.unfilled[template] - u64::from(wave.saturating_sub(held_before));
            let beyond_first = self.queue.live[template] as u64 > lacking_elsewhere;
            // Only while no other node lacks a first wave of its own: else it goes there.
            let first = held_of[template] < wave && (held < wave || lacking_elsewhere == 0);
            if !(stuck || first || beyond_first && held < STOCK_WAVES.saturating_mul(wave)) {
                continue;
            }
            if wave == u32::MAX {
                let queued = self.queue.live[template];
                let share = *shares[template].get_or_insert_with(|| self.share(template, queued));
                if held_of[template] - self.nodes[node].held[template] >= share {
                    continue;
                }
            }
            held_of[template] += 1;
            let Some((_, task)) = self.queue.lists[template].pop_front() else { continue };
            self.queue.forget(template);
            self.places[task as usize] = Place::Leased(node as u32);
            let attempt = self.ledger.at(self.position_of[task as usize] as usize).attempts;
            leased.push(Leased { task, attempt });
            heads.extend(self.queue.head(template, &self.places).map(|seq| Reverse((seq, template))));
        }
        if leased.len() < room {
            self.hungry.insert(node);
        } else {
            self.hungry.remove(&node);
        }
        if leased.is_empty() {
            return;
        }
        self.leased_unstarted += leased.len();
        let count = leased.len() as u32;
        let mut lease = 0;
        self.update(node, |n| {
            n.sent += 1;
            lease = n.sent;
            n.in_flight.push_back((lease, count));
            n.outstanding += count;
            n.held = held_of;
        });
        self.send(self.nodes[node].leader, Down::Lease { lease, tasks: leased });
    }

    fn release_dependents(&mut self, index: usize) {
        for next in self.deps.released(&self.tasks, &self.ledger, index) {
            self.enqueue(next);
            self.released = true;
        }
    }

    fn skip_dependents(&mut self, index: usize, why: Blocked) {
        for event in self.deps.skipped(&self.tasks, index, why) {
            self.record(event);
        }
    }

    /// Records `index` cancelled before it was leased, and skips what waits for it.
    fn cancelled(&mut self, index: usize, now: SystemTime) {
        self.record(Event::TaskCancelled { task: self.tasks[index].id.clone(), time: now });
        self.skip_dependents(index, Blocked::Cancelled);
    }
}

/// The distinct shapes of the nodes (the capacities of their workers, in any order; 10,000
/// nodes are few shapes), each with a node of it, and each node's shape.
fn shapes(nodes: &[Node]) -> (Vec<usize>, Vec<usize>) {
    let mut index: HashMap<Vec<(u32, u32, u32, u64)>, usize> = HashMap::new();
    let mut examples = Vec::new();
    let shape_of = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let mut key: Vec<_> = node
                .workers
                .iter()
                .map(|(_, h)| (h.capacity.slots, h.capacity.cpus, h.capacity.gpus, h.capacity.memory))
                .collect();
            key.sort_unstable();
            *index.entry(key).or_insert_with(|| {
                examples.push(i);
                examples.len() - 1
            })
        })
        .collect();
    (examples, shape_of)
}

/// Per shape (by its example node), per template: how many of the template's tasks a node of
/// the shape runs at once (`waves_of`). A task that runs and fits no node is refused.
fn check_fit(
    job: &Job,
    tasks: &[Task],
    nodes: &[Node],
    shapes: &[usize],
    resume: &Resume,
) -> Result<Vec<Vec<u32>>, Unfit> {
    let mut runs = vec![false; job.templates.len()];
    for &index in &resume.to_run {
        runs[tasks[index].template] = true;
    }
    let waves: Vec<Vec<u32>> = shapes
        .iter()
        .map(|&example| {
            let capacities: Vec<Capacity> = nodes[example].workers.iter().map(|(_, hello)| hello.capacity).collect();
            waves_of(job, &capacities)
        })
        .collect();
    let Some(t) = (0..runs.len()).find(|&t| runs[t] && !waves.iter().any(|w| w[t] > 0)) else {
        return Ok(waves);
    };
    let template = &job.templates[t];
    Err(Unfit::Node {
        task: template.name.clone(),
        need: need_of(template),
        processes: template.processes,
        largest: largest_node(nodes, shapes),
    })
}

/// Tasks a leader asks to hold queued, beyond those it runs: two waves of the template it runs
/// most of at once (`STOCK_WAVES` less the running one), at least 4, at most 4,096.
pub fn node_stock(job: &Job, capacities: &[Capacity]) -> u32 {
    let most = waves_of(job, capacities).into_iter().max().unwrap_or(0);
    most.saturating_mul(STOCK_WAVES - 1).clamp(4, 4096)
}

/// Per template: how many of its tasks a node of workers with `capacities` runs at once, as
/// far as leasing needs to know (0: they do not fit it; `u32::MAX`: nothing limits them, a
/// task that asks for no CPU, GPU or memory on workers without a slot limit). Whether one
/// fits is the scheduler's answer; how many is counted per worker from what each process
/// asks.
fn waves_of(job: &Job, capacities: &[Capacity]) -> Vec<u32> {
    let mut sched = Scheduler::new(0);
    for (rank, capacity) in capacities.iter().enumerate() {
        sched.add_worker(rank as u32, 0, *capacity);
    }
    // What a process does not ask for does not limit how many run.
    let at_once = |c: &Capacity, each: &Resources| {
        let slots = if c.slots == u32::MAX { u64::MAX } else { u64::from(c.slots) };
        let by = |has: u64, asks: u64| has.checked_div(asks).unwrap_or(u64::MAX);
        let cpus = by(u64::from(c.cpus), u64::from(each.cpus));
        let gpus = by(u64::from(c.gpus), u64::from(each.gpus));
        slots.min(cpus).min(gpus).min(by(c.memory, each.memory))
    };
    job.templates
        .iter()
        .map(|template| {
            let demand = demand(template);
            if capacities.is_empty() || !sched.fits_when_idle(&demand) {
                return 0;
            }
            let each = demand.per_process().fold(Resources::default(), |most, r| Resources {
                cpus: most.cpus.max(r.cpus),
                gpus: most.gpus.max(r.gpus),
                memory: most.memory.max(r.memory),
            });
            let processes = demand.per_process().count().max(1) as u64;
            let processes_at_once = capacities.iter().fold(0u64, |sum, c| sum.saturating_add(at_once(c, &each)));
            let tasks = processes_at_once / processes;
            tasks.clamp(1, u64::from(u32::MAX)) as u32
        })
        .collect()
}

/// The node with the most GPUs, then CPUs, then memory, for a task that fits no node.
fn largest_node(nodes: &[Node], shapes: &[usize]) -> String {
    let total = |node: &Node| node.workers.iter().fold(Capacity::EMPTY, |sum, (_, h)| sum.more(&h.capacity));
    let largest = shapes.iter().map(|&example| &nodes[example]).max_by_key(|node| {
        let t = total(node);
        (t.gpus, t.cpus, t.memory)
    });
    largest.map_or_else(
        || "no nodes at all".to_string(),
        |node| {
            let t = total(node);
            let host = node.workers.first().map_or("", |(_, h)| h.host.as_str());
            format!(
                "{} workers with {} CPUs, {} GPUs, {} in all (leader rank {} on {host})",
                node.workers.len(),
                t.cpus,
                t.gpus,
                format_size(t.memory),
                node.leader
            )
        },
    )
}

#[cfg(test)]
mod tests;
