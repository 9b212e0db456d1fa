//! The queue and the dispatch decision: which queued task goes to which workers, now.
//!
//! FIFO with bounded backfill: a task that does not fit may be overtaken by later tasks that do,
//! but only `backfill_limit` times; after that nothing behind it starts until it does, so big
//! gangs are never starved by a stream of small tasks, and small tasks still use the gaps.

mod capacity;
mod ports;
mod queue;
mod room;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

pub use capacity::Capacity;
pub(crate) use ports::PortBook;
pub use ports::first_port;

use crate::spec::{ProcessGroup, Resources};
use queue::Queue;
use room::Rooms;

/// What every task of one template needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Demand {
    /// Its processes in rank order, as groups of like ones (one group, or one per role); all
    /// groups are placed together or none is.
    pub groups: Vec<ProcessGroup>,
    /// Not started when the allocation has less time left.
    pub time_needed: Option<Duration>,
}

impl Demand {
    /// What each process needs, in rank order.
    pub(crate) fn per_process(&self) -> impl Iterator<Item = Resources> + '_ {
        self.groups.iter().flat_map(|g| std::iter::repeat_n(g.each, g.processes as usize))
    }
}

/// The room a worker rank has, as the scheduler counts it (the worker itself places processes
/// on its cores and GPUs).
#[derive(Clone, Debug)]
pub struct WorkerRoom {
    pub rank: u32,
    /// Index of the worker's host in the coordinator's host table.
    pub host: usize,
    pub capacity: Capacity,
    pub free: Capacity,
    pub healthy: bool,
}

/// A decision: start `task` with process k on worker rank `ranks[k]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dispatch {
    pub task: usize,
    pub ranks: Vec<u32>,
}

#[derive(Debug)]
pub struct Scheduler {
    workers: Vec<WorkerRoom>,
    /// The index of free room over `workers`, made when first needed after the last worker
    /// joined (workers all join before the first dispatch).
    rooms: Option<Rooms>,
    queue: Queue,
    /// Dispatch calls so far, and per template the last call in which it failed to fit or
    /// could not start at all: a look-up per queued task without a set made and hashed per call.
    calls: u64,
    failed_in: Vec<u64>,
    blocked_in: Vec<u64>,
}

/// Marks `template` in call `call`; true when it was not marked yet.
fn mark(marks: &mut Vec<u64>, template: usize, call: u64) -> bool {
    if marks.len() <= template {
        marks.resize(template + 1, 0);
    }
    std::mem::replace(&mut marks[template], call) != call
}

impl Scheduler {
    pub fn new(backfill_limit: u32) -> Self {
        Scheduler {
            workers: Vec::new(),
            rooms: None,
            queue: Queue::new(backfill_limit),
            calls: 0,
            failed_in: Vec::new(),
            blocked_in: Vec::new(),
        }
    }

    pub fn add_worker(&mut self, rank: u32, host: usize, capacity: Capacity) {
        self.workers.push(WorkerRoom { rank, host, capacity, free: capacity, healthy: true });
        self.rooms = None;
    }

    pub fn workers(&self) -> &[WorkerRoom] {
        &self.workers
    }

    /// The index and the workers it indexes, the index made if need be.
    fn rooms(&mut self) -> (&mut Rooms, &mut [WorkerRoom]) {
        let rooms = self.rooms.get_or_insert_with(|| Rooms::new(&self.workers));
        (rooms, &mut self.workers)
    }

    /// Prepares for tasks numbered below `tasks` (a run's whole plan).
    pub fn reserve(&mut self, tasks: usize) {
        self.queue.reserve(tasks);
    }

    pub fn enqueue(&mut self, task: usize, template: usize) {
        self.queue.push_back(task, template);
    }

    /// Puts a task back at the head: it was chosen but could not start, through no fault of its own.
    pub(crate) fn requeue_front(&mut self, task: usize, template: usize) {
        self.queue.push_front(task, template);
    }

    pub fn queued(&self) -> impl Iterator<Item = usize> + '_ {
        self.queue.iter()
    }

    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// The first queued task overtaken as often as the backfill budget allows, with how often:
    /// while it waits, nothing behind it starts.
    pub fn holder(&self) -> Option<(usize, u32)> {
        self.queue.holder()
    }

    /// Takes `task` off the queue; false when it was not queued.
    pub fn remove(&mut self, task: usize) -> bool {
        self.queue.remove(task)
    }

    /// Removes every queued task, e.g. when dispatching stops for good.
    pub(crate) fn drain_queue(&mut self) -> Vec<usize> {
        self.queue.drain()
    }

    pub(crate) fn set_unhealthy(&mut self, rank: u32) {
        let (rooms, workers) = self.rooms();
        if let Some(w) = rooms.position(rank) {
            rooms.set_unhealthy(workers, w);
        }
    }

    /// Returns resources a process held on `rank`.
    pub fn release(&mut self, rank: u32, each: &Resources) {
        let (rooms, workers) = self.rooms();
        if let Some(w) = rooms.position(rank) {
            rooms.give(workers, w, each);
        }
    }

    /// Counts a process as holding `each` on `rank` that did not start through `dispatch`: a
    /// prefetched order its worker started in room a process that ended there freed.
    pub(crate) fn take(&mut self, rank: u32, each: &Resources) {
        let (rooms, workers) = self.rooms();
        if let Some(w) = rooms.position(rank) {
            rooms.take(workers, w, each);
        }
    }

    /// Takes as much of `owed` on `rank` as is free, and returns what is still owed: room
    /// that processes running there hold, which the scheduler could not count yet (see
    /// `Control::settle`).
    pub(crate) fn take_owed(&mut self, rank: u32, owed: &Capacity) -> Capacity {
        let (rooms, workers) = self.rooms();
        let Some(w) = rooms.position(rank) else { return Capacity::EMPTY };
        let part = workers[w].free.least(owed);
        rooms.take_part(workers, w, &part);
        owed.less(&part)
    }

    /// Whether any healthy worker has a free slot (a counter, no scan).
    pub(crate) fn anything_free(&self) -> bool {
        self.rooms.as_ref().is_none_or(Rooms::anything_free)
    }

    /// Takes room for one process needing `each` outside `dispatch`, on the worker with the
    /// most room for it (one look-up in the index); its rank, or None when no worker has room.
    pub(crate) fn take_any(&mut self, each: &Resources) -> Option<u32> {
        if !self.anything_free() {
            return None;
        }
        let one =
            Demand { groups: vec![ProcessGroup { each: *each, processes: 1, per_node: None }], time_needed: None };
        let (rooms, workers) = self.rooms();
        let chosen = rooms.choose(workers, &one)?;
        Some(workers[chosen[0]].rank)
    }

    /// The worker rank `rank`, found through the index.
    pub(crate) fn worker(&self, rank: u32) -> Option<&WorkerRoom> {
        match &self.rooms {
            Some(rooms) => rooms.position(rank).map(|w| &self.workers[w]),
            None => self.workers.iter().find(|w| w.rank == rank),
        }
    }

    /// Can `demand` ever run here, with every healthy worker idle?
    pub(crate) fn fits_when_idle(&self, demand: &Demand) -> bool {
        let mut idle: Vec<WorkerRoom> =
            self.workers.iter().map(|w| WorkerRoom { free: w.capacity, ..w.clone() }).collect();
        Rooms::new(&idle).choose(&mut idle, demand).is_some()
    }

    /// The worker with the most capacity, for error messages about tasks that never fit.
    pub(crate) fn largest_worker(&self) -> Option<&WorkerRoom> {
        self.workers.iter().filter(|w| w.healthy).max_by_key(|w| (w.capacity.gpus, w.capacity.cpus, w.capacity.memory))
    }

    /// Decides what starts now. `demands[template]` is the demand of a queued task; with
    /// `time_left`, tasks that need longer are left in the queue for a later allocation.
    ///
    /// Walks the queue from its head and stops as soon as nothing more can start: no worker
    /// has a free slot, every template still queued failed to fit (or needs more time than is
    /// left) in this call, or a task used up its backfill budget.
    pub fn dispatch(&mut self, demands: &[Demand], time_left: Option<Duration>) -> Vec<Dispatch> {
        let mut started = Vec::new();
        // The place in queue order of each task started, for the counts of those it overtook.
        let mut places: Vec<i64> = Vec::new();
        // Tasks put back at the head that waited in this call, and per template that failed
        // its first other task that waited, each with how many had started when it was passed:
        // it is overtaken by every start after that, counted once at the end rather than per
        // start (a fill starting thousands of tasks past thousands of waiting gangs).
        let mut waiting: Vec<(usize, usize)> = Vec::new();
        let mut waiting_runs: Vec<(usize, usize)> = Vec::new();
        // The number of starts at which the first waiting task uses up its budget.
        let mut held_at = usize::MAX;
        self.calls += 1;
        let call = self.calls;
        // Templates none of whose tasks can start in this call (failed, or needing more time).
        let mut blocked = 0;
        let rooms = self.rooms.get_or_insert_with(|| Rooms::new(&self.workers));
        // The queue walked in order as the merge of the templates' lists: a template leaves the
        // merge once its tasks cannot start in this call, so the walk does not pass them.
        let queue = &mut self.queue;
        let place = |queue: &Queue, task: usize| queue.seq(task).map(|seq| Reverse((seq, task)));
        let mut next: BinaryHeap<Reverse<(i64, usize)>> = queue.heads().filter_map(|t| place(queue, t)).collect();
        while let Some(Reverse((seq, task))) = next.pop() {
            if !rooms.anything_free() || blocked >= queue.templates() {
                break;
            }
            let after = queue.after(task);
            let Some(template) = queue.template(task) else {
                continue;
            };
            let Some(demand) = demands.get(template) else {
                blocked += usize::from(mark(&mut self.blocked_in, template, call));
                continue;
            };
            if let (Some(needed), Some(left)) = (demand.time_needed, time_left)
                && needed > left
            {
                blocked += usize::from(mark(&mut self.blocked_in, template, call));
                continue;
            }
            let failed = self.failed_in.get(template) == Some(&call);
            let chosen = if failed { None } else { rooms.choose(&mut self.workers, demand) };
            let Some(chosen) = chosen else {
                mark(&mut self.failed_in, template, call);
                blocked += usize::from(mark(&mut self.blocked_in, template, call));
                let budget_left = queue.limit().saturating_sub(queue.bypassed(task));
                if budget_left == 0 {
                    break;
                }
                held_at = held_at.min(started.len() + budget_left as usize);
                // Past the tasks put back at the head, the first waiting task of a template
                // stands for the rest: none of them was overtaken more, nor is passed sooner.
                if queue.put_back(task) {
                    waiting.push((task, started.len()));
                    next.extend(after.and_then(|a| place(queue, a)));
                } else {
                    waiting_runs.push((task, started.len()));
                }
                continue;
            };
            started.push(Dispatch { task, ranks: chosen.iter().map(|&w| self.workers[w].rank).collect() });
            places.push(seq);
            queue.remove(task);
            next.extend(after.and_then(|a| place(queue, a)));
            if started.len() >= held_at {
                break;
            }
        }
        for (task, since) in waiting {
            queue.overtaken(task, started.len() - since);
        }
        for (task, since) in waiting_runs {
            queue.overtaken_from(task, &places[since..]);
        }
        started
    }
}

#[cfg(test)]
mod tests;
