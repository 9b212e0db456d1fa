//! Prefetch (`[job] prefetch`): orders sent ahead of room. Without it a slot whose process
//! ended stays empty for a round trip through rank 0 (the end reported, the next order sent);
//! with it the worker already holds its next order and starts it at once, then says so.
//!
//! The coordinator still decides everything: which task (the head of the queue, in order),
//! where (a worker whose capacity fits it), with what ports and environment. A held order is
//! not running: it is not on record until its worker reports it started, and it goes back to
//! the head of the queue when its worker is lost or hands it back (dispatching stopped, or it
//! was cancelled).
//!
//! A held order waits for room on its own worker, which may be busy for hours with a long task
//! while room frees elsewhere (at the end of a run, nothing else may be left to take that
//! room). Such an order is recalled: the room it fits is kept for it while its worker hands it
//! back, then it starts there from the head of the queue, ahead of what was queued after it.

use super::*;

/// How many prefetched attempts each worker holds, and the workers ordered by that count: the
/// least loaded is found without a scan of the cluster.
#[derive(Debug, Default)]
pub(super) struct HeldCounts {
    of: HashMap<u32, u32>,
    by_count: BTreeSet<(u32, u32)>,
    /// Per worker, how many recalled orders' room it keeps.
    keeping: HashMap<u32, u32>,
}

impl HeldCounts {
    pub(super) fn add_worker(&mut self, rank: u32) {
        self.of.insert(rank, 0);
        self.by_count.insert((0, rank));
    }

    fn change(&mut self, rank: u32, by: impl Fn(u32) -> u32) {
        if let Some(count) = self.of.get_mut(&rank) {
            self.by_count.remove(&(*count, rank));
            *count = by(*count);
            self.by_count.insert((*count, rank));
        }
    }

    /// Counts room kept on `rank` for one more recalled order (`more`), or one less.
    fn kept(&mut self, rank: u32, more: bool) {
        let count = self.keeping.entry(rank).or_default();
        *count = if more { *count + 1 } else { count.saturating_sub(1) };
        if *count == 0 {
            self.keeping.remove(&rank);
        }
    }

    /// A lost worker is offered nothing more.
    fn remove_worker(&mut self, rank: u32) {
        if let Some(count) = self.of.remove(&rank) {
            self.by_count.remove(&(count, rank));
        }
    }

    /// Workers holding something, with how much.
    fn holding(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        self.of.iter().filter(|(_, n)| **n > 0).map(|(&rank, &n)| (rank, n))
    }
}

/// An attempt sent to `rank` to be held there.
#[derive(Debug)]
pub(super) struct Held {
    rank: u32,
    run: Attempt,
    /// Its `AttemptStarted` line, written when it starts.
    assigned: Vec<Assigned>,
    /// Recalled: the worker and the room kept for it until it is back (or started after all).
    recall: Option<(u32, Resources)>,
}

impl Control {
    /// Once what fits now has started: the tasks at the head of the queue are sent ahead to
    /// workers that can run them once room frees there, each holding at most `prefetch` per
    /// process its capacity fits. Only one-process tasks, and only from the head, so that no
    /// task overtakes another that way; and none that needs time when the allocation's end is
    /// near (a held order starts later than now).
    pub(super) fn prefetch(&mut self, time_left: Option<Duration>, now: SystemTime) {
        if self.job.prefetch == 0 {
            return;
        }
        loop {
            let Some(index) = self.sched.queued().next() else { return };
            let demand = &self.demands[self.tasks[index].template];
            let [group] = demand.groups.as_slice() else { return };
            if group.processes != 1 || group.per_node.is_some() || (time_left.is_some() && demand.time_needed.is_some())
            {
                return;
            }
            let Some(rank) = self.prefetch_worker(&group.each) else { return };
            log::debug!("{} sent ahead to rank {rank}", self.tasks[index].id);
            self.sched.remove(index);
            if !self.start(index, &[rank], now, true) {
                return;
            }
        }
    }

    /// The healthy worker holding the fewest orders, below its bound, whose capacity fits
    /// `each`; the lowest rank among equals.
    fn prefetch_worker(&self, each: &Resources) -> Option<u32> {
        self.held_on.by_count.iter().find_map(|&(held, rank)| {
            // Its free room waits for a recalled order: one sent there would start in it.
            if self.held_on.keeping.contains_key(&rank) {
                return None;
            }
            let w = self.sched.worker(rank).filter(|w| w.healthy)?;
            (held < w.capacity.room_for(each).saturating_mul(self.job.prefetch)).then_some(rank)
        })
    }

    pub(super) fn hold(&mut self, key: AttemptKey, rank: u32, run: Attempt, assigned: Vec<Assigned>) {
        self.held_on.change(rank, |n| n + 1);
        self.held.insert(key, Held { rank, run, assigned, recall: None });
    }

    /// Takes a held attempt off the books (it started, came back or its worker is gone), and
    /// the room kept for it if it was recalled.
    fn unhold(&mut self, key: AttemptKey) -> Option<Held> {
        let held = self.held.remove(&key)?;
        self.held_on.change(held.rank, |n| n.saturating_sub(1));
        if let Some((target, each)) = held.recall {
            self.sched.release(target, &each);
            self.held_on.kept(target, false);
        }
        Some(held)
    }

    /// Recalls held orders that cannot start where they are held while another worker has room
    /// for them, first come first, and keeps that room for them. Called after
    /// `reserve_for_held`, which says which held orders start now (`starting`, in key order):
    /// the room their holders are about to start them in is not taken.
    pub(super) fn recall_stuck(&mut self, starting: &[AttemptKey]) {
        let mut recalls = Vec::new();
        for (&key, held) in &self.held {
            if held.recall.is_some() || held.run.cancelled || starting.binary_search(&key).is_ok() {
                continue;
            }
            let each = self.job.templates[self.tasks[key.task as usize].template].resources_of(0);
            let Some(target) = self.sched.take_any(&each) else { continue };
            if target == held.rank {
                self.sched.release(target, &each);
                continue;
            }
            recalls.push((key, held.rank, target, each));
        }
        for (key, holder, target, each) in recalls {
            log::debug!(
                "{} recalled from rank {holder}: rank {target} has room for it now",
                self.tasks[key.task as usize].id
            );
            if let Some(held) = self.held.get_mut(&key) {
                held.recall = Some((target, each));
            }
            self.held_on.kept(target, true);
            self.send(holder, Order::Recall { key });
        }
    }

    /// Worker `rank` started the prefetched attempt `key` at `time`: it runs from now on, in
    /// room a process that ended there freed.
    pub fn started(&mut self, rank: u32, key: AttemptKey, time: SystemTime) {
        match self.held.get(&key) {
            Some(held) if held.rank == rank => {}
            _ => {
                log::warn!("rank {rank} started {key:?}, which it was not holding");
                return;
            }
        }
        let Some(Held { run, assigned, .. }) = self.unhold(key) else { return };
        let (job, tasks) = (Arc::clone(&self.job), Arc::clone(&self.tasks));
        let task = &tasks[key.task as usize];
        let template = &job.templates[task.template];
        let owed = self.owed.entry(rank).or_default();
        owed.extend((0..template.processes).map(|p| template.resources_of(p)));
        self.settle(rank);
        let event = Event::AttemptStarted { task: task.id.clone(), attempt: key.attempt, time, processes: assigned };
        self.record(event);
        self.running.insert(key, run);
    }

    /// Room free on a worker that holds orders is theirs: the worker starts them in it without
    /// asking (their start may be on its way), so it must not go to anyone else. And a held
    /// order that needs more than is free keeps what is free too: out of the queue, no backfill
    /// budget protects it, and smaller tasks could take that room forever. Taken from the
    /// scheduler for one dispatch; the caller gives it back after. Also returns the held
    /// orders that got all the room they need, in key order: they start now.
    pub(super) fn reserve_for_held(&mut self) -> (Vec<(u32, Resources)>, Vec<AttemptKey>) {
        if self.held.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let mut free: HashMap<u32, crate::sched::Capacity> =
            self.held_on.holding().filter_map(|(rank, _)| Some((rank, self.sched.worker(rank)?.free))).collect();
        let mut reserved = Vec::new();
        let mut starting = Vec::new();
        for (&key, held) in &self.held {
            let template = &self.job.templates[self.tasks[key.task as usize].template];
            let each = template.resources_of(0);
            let Some(room) = free.get_mut(&held.rank) else { continue };
            // Without a free slot nothing can be placed there anyway (and a slot taken from
            // none would be given back as one more).
            if room.slots == 0 {
                continue;
            }
            let kept = if room.room_for(&each) > 0 {
                starting.push(key);
                each
            } else {
                Resources { cpus: room.cpus, gpus: room.gpus, memory: room.memory }
            };
            room.take(&kept);
            reserved.push((held.rank, kept));
        }
        for (rank, each) in &reserved {
            self.sched.take(*rank, each);
        }
        (reserved, starting)
    }

    /// Counts what prefetched processes that started on `rank` hold, as far as the scheduler
    /// has the room: the end of the process whose room they took may come after their start
    /// (in returned mode a worker holds ends back until the logs are sent), and until it does
    /// the scheduler sees that room as taken by the process that ended.
    pub(super) fn settle(&mut self, rank: u32) {
        let Some(owed) = self.owed.get_mut(&rank) else { return };
        while let Some(each) = owed.front() {
            let free = self.sched.worker(rank).map(|w| w.free);
            if free.is_none_or(|free| free.room_for(each) == 0) {
                return;
            }
            self.sched.take(rank, each);
            owed.pop_front();
        }
    }

    /// Worker `rank` gave the held attempt `key` back unstarted.
    pub fn returned(&mut self, rank: u32, key: AttemptKey, now: SystemTime) {
        if self.held.get(&key).is_none_or(|h| h.rank != rank) {
            log::debug!("rank {rank} gave back {key:?}, which it was not holding");
            return;
        }
        self.give_back(key, now);
    }

    /// A held attempt that did not start goes back to the head of the queue with its ports
    /// free again, or, cancelled meanwhile, is recorded as cancelled.
    fn give_back(&mut self, key: AttemptKey, now: SystemTime) {
        let Some(held) = self.unhold(key) else { return };
        for (site, &host) in held.run.sites.iter().zip(&held.run.host_of) {
            for &port in [site.port].iter().chain(&site.labelled) {
                self.ports.give(host, port);
            }
        }
        let index = key.task as usize;
        if held.run.cancelled {
            self.record(Event::TaskCancelled { task: self.tasks[index].id.clone(), time: now });
        } else {
            self.sched.requeue_front(index, self.tasks[index].template);
        }
    }

    /// Worker `rank` is lost: what it held goes back to the head of the queue, in task order.
    pub(super) fn give_back_held_on(&mut self, rank: u32, now: SystemTime) {
        self.owed.remove(&rank);
        let keys: Vec<AttemptKey> = self.held.iter().filter(|(_, h)| h.rank == rank).map(|(k, _)| *k).collect();
        // Each goes to the front: the last first, so that they stay in order.
        for key in keys.into_iter().rev() {
            self.give_back(key, now);
        }
        self.held_on.remove_worker(rank);
    }

    /// Cancels the held attempt of task `index`, if there is one: its worker is told to drop
    /// it (or to stop it, if it started meanwhile). True when there was one.
    pub(super) fn cancel_held(&mut self, index: usize) -> bool {
        let Some((&key, held)) = self.held.iter_mut().find(|(key, _)| key.task as usize == index) else {
            return false;
        };
        held.run.cancelled = true;
        let rank = held.rank;
        self.send(rank, Order::Stop { key });
        true
    }

    /// Worker ranks holding prefetched attempts.
    pub(super) fn ranks_holding(&self) -> impl Iterator<Item = u32> + '_ {
        self.held.values().map(|h| h.rank)
    }
}
