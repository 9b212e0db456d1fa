//! The index of free room: for each kind of process the queue asks for (the `Resources` of a
//! process group — templates are few, so kinds are few), how many such processes each worker
//! and each host can take now, kept sorted. A one-process choice is one look-up, a gang's
//! O(hosts it uses · log n), "is anything free at all" a counter: nothing scans the cluster.
//!
//! A worker's room is computed from its free capacity in one place (`room_of`): a later
//! allowance of orders beyond free room (prefetch) is a per-worker counter added there.

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap};

use super::{Capacity, Demand, WorkerRoom};
use crate::spec::{ProcessGroup, Resources};

#[derive(Debug)]
pub(super) struct Rooms {
    by_rank: HashMap<u32, usize>,
    /// Host index → its workers, by position.
    on_host: Vec<Vec<usize>>,
    /// Healthy workers with a free slot.
    free_workers: usize,
    kinds: Vec<Kind>,
}

/// The room for one kind of process.
#[derive(Debug, PartialEq)]
struct Kind {
    need: Resources,
    /// Per worker: how many such processes it can take now.
    room: Vec<u32>,
    /// Workers with room, by (room, lowest position last among equals): the last has the most.
    workers: BTreeSet<(u32, Reverse<usize>)>,
    /// Per host: the sum of its workers' room.
    host_room: Vec<u64>,
    /// Hosts with room, by (room, lowest index last among equals).
    hosts: BTreeSet<(u64, Reverse<usize>)>,
}

fn room_of(worker: &WorkerRoom, need: &Resources) -> u32 {
    if worker.healthy { worker.free.room_for(need) } else { 0 }
}

fn has_free_slot(worker: &WorkerRoom) -> bool {
    worker.healthy && worker.free.slots > 0
}

impl Kind {
    fn new(workers: &[WorkerRoom], hosts: usize, need: Resources) -> Self {
        let mut kind = Kind {
            need,
            room: vec![0; workers.len()],
            workers: BTreeSet::new(),
            host_room: vec![0; hosts],
            hosts: BTreeSet::new(),
        };
        for (w, worker) in workers.iter().enumerate() {
            kind.set(w, worker.host, room_of(worker, &need));
        }
        kind
    }

    fn set(&mut self, w: usize, host: usize, room: u32) {
        let old = std::mem::replace(&mut self.room[w], room);
        if old == room {
            return;
        }
        if old > 0 {
            self.workers.remove(&(old, Reverse(w)));
        }
        if room > 0 {
            self.workers.insert((room, Reverse(w)));
        }
        let total = self.host_room[host];
        if total > 0 {
            self.hosts.remove(&(total, Reverse(host)));
        }
        let total = total - u64::from(old) + u64::from(room);
        self.host_room[host] = total;
        if total > 0 {
            self.hosts.insert((total, Reverse(host)));
        }
    }

    /// Up to `count` hosts with at least `least` room, fewest room first, lowest index first
    /// among equals.
    fn tightest_hosts(&self, least: u64, count: usize) -> Vec<usize> {
        let mut found = Vec::with_capacity(count);
        let mut from = Some(least);
        while let Some(least) = from
            && found.len() < count
        {
            let Some(&(total, _)) = self.hosts.range((least, Reverse(usize::MAX))..).next() else {
                break;
            };
            let equal = self.hosts.range((total, Reverse(usize::MAX))..=(total, Reverse(0))).rev();
            found.extend(equal.map(|&(_, Reverse(host))| host).take(count - found.len()));
            from = total.checked_add(1);
        }
        found
    }
}

impl Rooms {
    pub(super) fn new(workers: &[WorkerRoom]) -> Self {
        let hosts = workers.iter().map(|w| w.host + 1).max().unwrap_or(0);
        let mut on_host = vec![Vec::new(); hosts];
        let mut by_rank = HashMap::with_capacity(workers.len());
        for (w, worker) in workers.iter().enumerate() {
            on_host[worker.host].push(w);
            by_rank.insert(worker.rank, w);
        }
        let free_workers = workers.iter().filter(|w| has_free_slot(w)).count();
        Rooms { by_rank, on_host, free_workers, kinds: Vec::new() }
    }

    pub(super) fn position(&self, rank: u32) -> Option<usize> {
        self.by_rank.get(&rank).copied()
    }

    pub(super) fn anything_free(&self) -> bool {
        self.free_workers > 0
    }

    /// The index of `need`'s kind, made on first use.
    fn kind(&mut self, workers: &[WorkerRoom], need: Resources) -> usize {
        if let Some(k) = self.kinds.iter().position(|k| k.need == need) {
            return k;
        }
        self.kinds.push(Kind::new(workers, self.on_host.len(), need));
        self.kinds.len() - 1
    }

    /// Applies `change` to worker `w` and brings the index up to date.
    fn update(&mut self, workers: &mut [WorkerRoom], w: usize, change: impl FnOnce(&mut WorkerRoom)) {
        let had_slot = has_free_slot(&workers[w]);
        change(&mut workers[w]);
        let worker = &workers[w];
        match (had_slot, has_free_slot(worker)) {
            (false, true) => self.free_workers += 1,
            (true, false) => self.free_workers -= 1,
            _ => {}
        }
        for kind in &mut self.kinds {
            let room = room_of(worker, &kind.need);
            kind.set(w, worker.host, room);
        }
    }

    pub(super) fn take(&mut self, workers: &mut [WorkerRoom], w: usize, need: &Resources) {
        self.update(workers, w, |worker| worker.free.take(need));
    }

    pub(super) fn take_part(&mut self, workers: &mut [WorkerRoom], w: usize, part: &Capacity) {
        self.update(workers, w, |worker| worker.free = worker.free.less(part));
    }

    pub(super) fn give(&mut self, workers: &mut [WorkerRoom], w: usize, need: &Resources) {
        self.update(workers, w, |worker| worker.free.give(need, &worker.capacity));
    }

    pub(super) fn set_unhealthy(&mut self, workers: &mut [WorkerRoom], w: usize) {
        self.update(workers, w, |worker| worker.healthy = false);
    }

    /// Picks a worker for each process of a task (in rank order) and takes their room, or
    /// takes nothing and returns None when it does not fit now. Groups (roles) are placed one
    /// after the other on what the ones before left free.
    pub(super) fn choose(&mut self, workers: &mut [WorkerRoom], demand: &Demand) -> Option<Vec<usize>> {
        let mut chosen: Vec<usize> = Vec::new();
        for group in &demand.groups {
            let kind = self.kind(workers, group.each);
            let Some(placed) = self.choose_group(kind, group) else {
                for (&w, each) in chosen.iter().zip(demand.per_process()) {
                    self.give(workers, w, &each);
                }
                return None;
            };
            for &w in &placed {
                self.take(workers, w, &group.each);
            }
            chosen.extend(placed);
        }
        Some(chosen)
    }

    /// One group of like processes. One process: the worker with the most room for it
    /// (spreads load), the lowest position among equals. A gang: as few hosts as possible —
    /// the tightest single host that holds it all, else the roomiest hosts first; with
    /// `per_node`, the hosts with room for that many, fewest room first.
    fn choose_group(&self, kind: usize, group: &ProcessGroup) -> Option<Vec<usize>> {
        let kind = &self.kinds[kind];
        let n = group.processes;
        if n == 1 && group.per_node.is_none() {
            let &(_, Reverse(best)) = kind.workers.last()?;
            return Some(vec![best]);
        }
        let plan: Vec<(usize, u32)> = match group.per_node {
            Some(per_node) => {
                let needed = (n / per_node.max(1)) as usize;
                let hosts = kind.tightest_hosts(u64::from(per_node), needed);
                if hosts.len() < needed {
                    return None;
                }
                hosts.into_iter().map(|host| (host, per_node)).collect()
            }
            None => match kind.tightest_hosts(u64::from(n), 1).first() {
                Some(&host) => vec![(host, n)],
                None => {
                    let mut left = n;
                    let mut plan = Vec::new();
                    for &(total, Reverse(host)) in kind.hosts.iter().rev() {
                        if left == 0 {
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
            },
        };
        let mut chosen = Vec::with_capacity(n as usize);
        for (host, count) in plan {
            let mut on_host: Vec<usize> = self.on_host[host].iter().copied().filter(|&w| kind.room[w] > 0).collect();
            on_host.sort_by_key(|&w| (Reverse(kind.room[w]), w));
            let mut left = count;
            for w in on_host {
                let here = left.min(kind.room[w]);
                chosen.extend(std::iter::repeat_n(w, here as usize));
                left -= here;
            }
            if left > 0 {
                return None;
            }
        }
        Some(chosen)
    }

    /// Panics unless the index equals one made afresh from `workers`.
    #[cfg(test)]
    pub(super) fn assert_consistent(&self, workers: &[WorkerRoom]) {
        let mut fresh = Rooms::new(workers);
        for kind in &self.kinds {
            fresh.kind(workers, kind.need);
        }
        assert_eq!(self.free_workers, fresh.free_workers, "workers with a free slot");
        assert_eq!(self.kinds, fresh.kinds);
    }
}
