//! The queue and the dispatch decision: which queued task goes to which workers, now.
//!
//! FIFO with bounded backfill: a task that does not fit may be overtaken by later tasks that do,
//! but only `backfill_limit` times; after that nothing behind it starts until it does, so big
//! gangs are never starved by a stream of small tasks, and small tasks still use the gaps.

mod capacity;
mod ports;

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

pub use capacity::Capacity;
pub(crate) use ports::PortBook;
pub use ports::first_port;

use crate::spec::{ProcessGroup, Resources};

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

#[derive(Clone, Copy, Debug)]
struct Queued {
    task: usize,
    template: usize,
    bypassed: u32,
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
    queue: VecDeque<Queued>,
    backfill_limit: u32,
}

impl Scheduler {
    pub fn new(backfill_limit: u32) -> Self {
        Scheduler { workers: Vec::new(), queue: VecDeque::new(), backfill_limit }
    }

    pub(crate) fn add_worker(&mut self, rank: u32, host: usize, capacity: Capacity) {
        self.workers.push(WorkerRoom { rank, host, capacity, free: capacity, healthy: true });
    }

    pub fn workers(&self) -> &[WorkerRoom] {
        &self.workers
    }

    pub(crate) fn enqueue(&mut self, task: usize, template: usize) {
        self.queue.push_back(Queued { task, template, bypassed: 0 });
    }

    /// Puts a task back at the head: it was chosen but could not start, through no fault of its own.
    pub(crate) fn requeue_front(&mut self, task: usize, template: usize) {
        self.queue.push_front(Queued { task, template, bypassed: 0 });
    }

    pub fn queued(&self) -> impl Iterator<Item = usize> + '_ {
        self.queue.iter().map(|q| q.task)
    }

    pub(crate) fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// The first queued task overtaken as often as the backfill budget allows, with how often:
    /// while it waits, nothing behind it starts.
    pub fn holder(&self) -> Option<(usize, u32)> {
        self.queue.iter().find(|q| q.bypassed >= self.backfill_limit).map(|q| (q.task, q.bypassed))
    }

    /// Takes `task` off the queue; false when it was not queued.
    pub fn remove(&mut self, task: usize) -> bool {
        let before = self.queue.len();
        self.queue.retain(|q| q.task != task);
        self.queue.len() < before
    }

    /// Removes every queued task, e.g. when dispatching stops for good.
    pub(crate) fn drain_queue(&mut self) -> Vec<usize> {
        self.queue.drain(..).map(|q| q.task).collect()
    }

    pub(crate) fn set_unhealthy(&mut self, rank: u32) {
        if let Some(w) = self.workers.iter_mut().find(|w| w.rank == rank) {
            w.healthy = false;
        }
    }

    /// Returns resources a process held on `rank`.
    pub fn release(&mut self, rank: u32, each: &Resources) {
        if let Some(w) = self.workers.iter_mut().find(|w| w.rank == rank) {
            w.free.give(each, &w.capacity);
        }
    }

    /// Counts a process as holding `each` on `rank` that did not start through `dispatch`: a
    /// prefetched order its worker started in room a process that ended there freed.
    pub(crate) fn take(&mut self, rank: u32, each: &Resources) {
        if let Some(w) = self.workers.iter_mut().find(|w| w.rank == rank) {
            w.free.take(each);
        }
    }

    /// Can `demand` ever run here, with every healthy worker idle?
    pub(crate) fn fits_when_idle(&self, demand: &Demand) -> bool {
        let idle: Vec<WorkerRoom> = self.workers.iter().map(|w| WorkerRoom { free: w.capacity, ..w.clone() }).collect();
        choose_workers(&idle, demand).is_some()
    }

    /// The worker with the most capacity, for error messages about tasks that never fit.
    pub(crate) fn largest_worker(&self) -> Option<&WorkerRoom> {
        self.workers.iter().filter(|w| w.healthy).max_by_key(|w| (w.capacity.gpus, w.capacity.cpus, w.capacity.memory))
    }

    /// Decides what starts now. `demands[q.template]` is the demand of a queued task; with
    /// `time_left`, tasks that need longer are left in the queue for a later allocation.
    pub fn dispatch(&mut self, demands: &[Demand], time_left: Option<Duration>) -> Vec<Dispatch> {
        let mut started = Vec::new();
        let mut waiting: Vec<usize> = Vec::new();
        let mut failed_templates: HashSet<usize> = HashSet::new();
        let mut i = 0;
        while i < self.queue.len() && failed_templates.len() < demands.len() {
            if !self.workers.iter().any(|w| w.healthy && w.free.slots > 0) {
                break;
            }
            let entry = self.queue[i];
            let Some(demand) = demands.get(entry.template) else {
                i += 1;
                continue;
            };
            if let (Some(needed), Some(left)) = (demand.time_needed, time_left)
                && needed > left
            {
                i += 1;
                continue;
            }
            let chosen =
                if failed_templates.contains(&entry.template) { None } else { choose_workers(&self.workers, demand) };
            let Some(chosen) = chosen else {
                failed_templates.insert(entry.template);
                if entry.bypassed >= self.backfill_limit {
                    break;
                }
                waiting.push(i);
                i += 1;
                continue;
            };
            for (&w, each) in chosen.iter().zip(demand.per_process()) {
                self.workers[w].free.take(&each);
            }
            for &w in &waiting {
                self.queue[w].bypassed += 1;
            }
            started.push(Dispatch { task: entry.task, ranks: chosen.iter().map(|&w| self.workers[w].rank).collect() });
            self.queue.remove(i);
            if waiting.iter().any(|&w| self.queue[w].bypassed >= self.backfill_limit) {
                break;
            }
        }
        started
    }
}

/// Picks a worker for each process of a task (in rank order), or None when it does not fit
/// now. Groups (roles) are placed one after the other on what the ones before left free.
fn choose_workers(workers: &[WorkerRoom], demand: &Demand) -> Option<Vec<usize>> {
    if let [group] = demand.groups.as_slice() {
        return choose_group(workers, group);
    }
    let mut scratch = workers.to_vec();
    let mut chosen = Vec::new();
    for group in &demand.groups {
        let placed = choose_group(&scratch, group)?;
        for &w in &placed {
            scratch[w].free.take(&group.each);
        }
        chosen.extend(placed);
    }
    Some(chosen)
}

/// One group of like processes. One process: the worker with the most room for it (spreads
/// load). A gang: as few hosts as possible — the tightest single host that holds it all, else
/// the roomiest hosts first.
fn choose_group(workers: &[WorkerRoom], demand: &ProcessGroup) -> Option<Vec<usize>> {
    let rooms: Vec<u32> = workers.iter().map(|w| if w.healthy { w.free.room_for(&demand.each) } else { 0 }).collect();
    let n = demand.processes;
    if n == 1 && demand.per_node.is_none() {
        let best = (0..workers.len()).filter(|&w| rooms[w] > 0).max_by_key(|&w| (rooms[w], std::cmp::Reverse(w)))?;
        return Some(vec![best]);
    }
    let mut hosts: Vec<(usize, u64)> = Vec::new();
    for (w, worker) in workers.iter().enumerate() {
        match hosts.iter_mut().find(|(host, _)| *host == worker.host) {
            Some((_, total)) => *total += u64::from(rooms[w]),
            None => hosts.push((worker.host, u64::from(rooms[w]))),
        }
    }
    let plan: Vec<(usize, u32)> = match demand.per_node {
        Some(per_node) => {
            hosts.retain(|&(_, total)| total >= u64::from(per_node));
            hosts.sort_by_key(|&(host, total)| (total, host));
            let needed = (n / per_node.max(1)) as usize;
            if hosts.len() < needed {
                return None;
            }
            hosts.iter().take(needed).map(|&(host, _)| (host, per_node)).collect()
        }
        None => {
            if let Some(&(host, _)) =
                hosts.iter().filter(|&&(_, t)| t >= u64::from(n)).min_by_key(|&&(host, t)| (t, host))
            {
                vec![(host, n)]
            } else {
                hosts.sort_by_key(|&(host, total)| (std::cmp::Reverse(total), host));
                let mut left = n;
                let mut plan = Vec::new();
                for &(host, total) in &hosts {
                    if left == 0 || total == 0 {
                        break;
                    }
                    let here = left.min(total.min(u64::from(u32::MAX)) as u32);
                    plan.push((host, here));
                    left -= here;
                }
                if left > 0 {
                    return None;
                }
                plan
            }
        }
    };
    let mut chosen = Vec::with_capacity(n as usize);
    for (host, count) in plan {
        let mut on_host: Vec<usize> = (0..workers.len()).filter(|&w| workers[w].host == host && rooms[w] > 0).collect();
        on_host.sort_by_key(|&w| (std::cmp::Reverse(rooms[w]), w));
        let mut left = count;
        for w in on_host {
            let here = left.min(rooms[w]);
            chosen.extend(std::iter::repeat_n(w, here as usize));
            left -= here;
        }
        if left > 0 {
            return None;
        }
    }
    Some(chosen)
}

#[cfg(test)]
mod tests;
