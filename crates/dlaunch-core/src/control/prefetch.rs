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

/// What each worker holds, in the order it got them (the order it starts them in), and the
/// workers ordered by how much: the least loaded is found without a scan of the cluster, and
/// what a worker holds without a scan of all held orders.
#[derive(Debug, Default)]
pub(super) struct HeldBy {
    of: HashMap<u32, VecDeque<AttemptKey>>,
    by_count: BTreeSet<(usize, u32)>,
    /// Per worker, how many recalled orders' room it keeps.
    pub(super) keeping: HashMap<u32, u32>,
    /// Per kind of process, the most such orders any worker may hold.
    largest: Vec<(Resources, u32)>,
}

impl HeldBy {
    pub(super) fn add_worker(&mut self, rank: u32) {
        self.of.insert(rank, VecDeque::new());
        self.by_count.insert((0, rank));
    }

    /// Adds (`holds`) or removes `key` from what `rank` holds.
    fn change(&mut self, rank: u32, key: AttemptKey, holds: bool) {
        let Some(keys) = self.of.get_mut(&rank) else { return };
        self.by_count.remove(&(keys.len(), rank));
        if holds {
            keys.push_back(key);
        } else if let Some(at) = keys.iter().position(|k| *k == key) {
            keys.remove(at);
        }
        self.by_count.insert((keys.len(), rank));
    }

    /// Counts room kept on `rank` for one more recalled order (`more`), or one less.
    fn kept(&mut self, rank: u32, more: bool) {
        let count = self.keeping.entry(rank).or_default();
        *count = if more { *count + 1 } else { count.saturating_sub(1) };
        if *count == 0 {
            self.keeping.remove(&rank);
        }
    }

    /// A lost worker is offered nothing more; what it held, in the order it got them.
    fn remove_worker(&mut self, rank: u32) -> Vec<AttemptKey> {
        let keys = self.of.remove(&rank).unwrap_or_default();
        self.by_count.remove(&(keys.len(), rank));
        keys.into_iter().collect()
    }
}

/// How long rank 0 may leave reports unread: not at all while something it does could start a
/// task sooner, but while every worker holds all it may of the queue's head, the next thing
/// to do is to refill a worker that started what it held, and the process it started gives
/// that much time. Polling every 200 µs meanwhile woke rank 0 over 3,000 times a second
/// while tasks of a third of a second ran.
#[derive(Debug, Default)]
pub(super) struct Pace {
    /// The last `prefetch` call stopped because no worker could hold the head of the queue.
    full: bool,
    /// How long the latest processes ran, newest last.
    lengths: VecDeque<Duration>,
}

impl Pace {
    /// Processes whose lengths are kept: enough that one long task does not hide short ones.
    const KEPT: usize = 32;
    /// The longest slack: how late rank 0 may hear anything else (a report it must pass on).
    const MOST: Duration = Duration::from_millis(5);

    pub(super) fn ended(&mut self, end: &ProcessEnd) {
        let Some(length) = end.start.and_then(|start| end.end.duration_since(start).ok()) else { return };
        if self.lengths.len() == Self::KEPT {
            self.lengths.pop_front();
        }
        self.lengths.push_back(length);
    }

    /// A quarter of the shortest recent process, at most `MOST`: room for the report to come
    /// and the refill to go before even the quickest process ends.
    fn slack(&self) -> Option<Duration> {
        let shortest = self.lengths.iter().min().filter(|_| self.full)?;
        Some((*shortest / 4).min(Self::MOST))
    }
}

/// An attempt sent to `rank` to be held there.
#[derive(Debug)]
pub(super) struct Held {
    rank: u32,
    run: Attempt,
    /// Its `AttemptStarted` line, written when it starts.
    assigned: Vec<Assigned>,
    /// Room on `rank` the scheduler counts as taken for it (`keep_for_held`): what it needs, or
    /// all that was free when it needs more.
    kept: Option<Resources>,
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
        self.pace.full = false;
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
            let each = group.each;
            let Some(rank) = self.prefetch_worker(&each) else {
                self.pace.full = true;
                return;
            };
            log::debug!("{} sent ahead to rank {rank}", self.tasks[index].id);
            self.sched.remove(index);
            if !self.start(index, &[rank], now, true) {
                return;
            }
        }
    }

    /// How long rank 0 may sleep before it reads reports again (`Pace`); None: poll as usual.
    pub fn refill_slack(&self) -> Option<Duration> {
        if self.stopping().is_some() {
            return None;
        }
        self.pace.slack()
    }

    /// The healthy worker holding the fewest orders, below its bound, whose capacity fits
    /// `each`; the lowest rank among equals. Workers come in order of what they hold, so the
    /// walk ends at the first holding as much as the largest bound: in a busy allocation,
    /// where every worker holds its share, that is the first.
    fn prefetch_worker(&mut self, each: &Resources) -> Option<u32> {
        let largest = self.largest_bound(each);
        for &(held, rank) in &self.held_on.by_count {
            let held = u32::try_from(held).unwrap_or(u32::MAX);
            if held >= largest {
                return None;
            }
            // Its free room waits for a recalled order: one sent there would start in it.
            if self.held_on.keeping.contains_key(&rank) {
                continue;
            }
            let Some(w) = self.sched.worker(rank).filter(|w| w.healthy) else { continue };
            if held < w.capacity.room_for(each).saturating_mul(self.job.prefetch) {
                return Some(rank);
            }
        }
        None
    }

    /// The most orders needing `each` any worker may hold, found once per kind of process
    /// (capacities do not change during a run).
    fn largest_bound(&mut self, each: &Resources) -> u32 {
        if let Some(&(_, bound)) = self.held_on.largest.iter().find(|(need, _)| need == each) {
            return bound;
        }
        let most = self.sched.workers().iter().map(|w| w.capacity.room_for(each)).max().unwrap_or(0);
        let bound = most.saturating_mul(self.job.prefetch);
        self.held_on.largest.push((*each, bound));
        bound
    }

    pub(super) fn hold(&mut self, key: AttemptKey, rank: u32, run: Attempt, assigned: Vec<Assigned>) {
        self.held_on.change(rank, key, true);
        self.held.insert(key, Held { rank, run, assigned, kept: None, recall: None });
        self.keep_for_held(rank);
    }

    /// Takes a held attempt off the books (it started, came back or its worker is gone) with
    /// the room kept for it, which goes to what else its worker (and a recall's) holds.
    fn unhold(&mut self, key: AttemptKey) -> Option<Held> {
        let held = self.held.remove(&key)?;
        self.held_on.change(held.rank, key, false);
        if let Some(kept) = held.kept {
            self.sched.release(held.rank, &kept);
        }
        if let Some((target, each)) = held.recall {
            self.sched.release(target, &each);
            self.held_on.kept(target, false);
            self.keep_for_held(target);
        }
        Some(held)
    }

    /// Room free on a worker that holds orders is theirs: the worker starts them in it without
    /// asking (their start may be on its way), so the scheduler must count it as taken. Called
    /// wherever room frees on a worker, it keeps room for what the worker holds, first come
    /// first: the whole of what one needs, or, for the first that needs more than is free, all
    /// that is free (out of the queue no backfill budget protects it, and smaller tasks could
    /// take that room forever); the ones after that wait behind it, as on the worker.
    pub(super) fn keep_for_held(&mut self, rank: u32) {
        // By position: nothing here changes what the worker holds, and every process end on a
        // holder comes through here.
        for at in 0.. {
            let Some(&key) = self.held_on.of.get(&rank).and_then(|keys| keys.get(at)) else { return };
            let Some(held) = self.held.get_mut(&key) else { continue };
            let each = self.job.templates[self.tasks[key.task as usize].template].resources_of(0);
            if held.kept == Some(each) {
                continue;
            }
            if let Some(partial) = held.kept.take() {
                self.sched.release(rank, &partial);
            }
            // Without a free slot nothing can be kept (a slot taken from none would be given
            // back as one more).
            let Some(free) = self.sched.worker(rank).map(|w| w.free).filter(|free| free.slots > 0) else { return };
            let fits = free.room_for(&each) > 0;
            let kept = if fits { each } else { Resources { cpus: free.cpus, gpus: free.gpus, memory: free.memory } };
            self.sched.take(rank, &kept);
            held.kept = Some(kept);
            if !fits {
                return;
            }
        }
    }

    /// Recalls held orders that cannot start where they are held while another worker has room
    /// for them, first come first, and keeps that room for them. Nothing is looked at while no
    /// worker has a free slot, the usual state of a busy allocation.
    pub(super) fn recall_stuck(&mut self) {
        let mut recalls = Vec::new();
        for (&key, held) in &self.held {
            if !self.sched.anything_free() {
                break;
            }
            let each = self.job.templates[self.tasks[key.task as usize].template].resources_of(0);
            if held.recall.is_some() || held.run.cancelled || held.kept == Some(each) {
                continue;
            }
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
        let owed = self.owed.entry(rank).or_insert(Capacity::EMPTY);
        *owed = owed.more(&Capacity::of_one(&template.resources_of(0)));
        self.settle(rank);
        self.keep_for_held(rank);
        let event = Event::AttemptStarted { task: task.id.clone(), attempt: key.attempt, time, processes: assigned };
        self.record_at(run.ledger_at, event);
        self.running.insert(key, run);
    }

    /// Counts what prefetched processes that started on `rank` hold, as far as the scheduler
    /// has the room: the end of the process whose room they took may come after their start
    /// (in returned mode a worker holds ends back until the logs are sent; an end that looks
    /// like an outside stop signal is held back a moment), and until it does the scheduler sees
    /// that room as taken by the process that ended. What is free is taken at once, each of
    /// slots, CPUs, GPUs and memory apart: a started process may need more than the one that
    /// ended freed (it took what was free besides), and what it uses must not go to another.
    pub(super) fn settle(&mut self, rank: u32) {
        let Some(owed) = self.owed.get(&rank) else { return };
        let left = self.sched.take_owed(rank, owed);
        if left == Capacity::EMPTY {
            self.owed.remove(&rank);
        } else {
            self.owed.insert(rank, left);
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
    /// free again, or, cancelled meanwhile, is recorded as cancelled. A recalled one starts at
    /// once in the room kept for it: back in the queue, held orders recalled after it (before
    /// the queue, in each dispatch) would take that room, and the two would be recalled in turn.
    fn give_back(&mut self, key: AttemptKey, now: SystemTime) {
        let dispatching = self.stopping().is_none();
        let Some(held) = self.held.get_mut(&key) else { return };
        let healthy = |rank: u32| self.sched.worker(rank).is_some_and(|w| w.healthy);
        // Taken out of the held order, the kept room stays taken when it is unheld.
        let moved_to = held.recall.filter(|&(target, _)| dispatching && !held.run.cancelled && healthy(target));
        if let Some((target, _)) = moved_to {
            held.recall = None;
            self.held_on.kept(target, false);
        }
        let Some(held) = self.unhold(key) else { return };
        for (site, &host) in held.run.sites.iter().zip(&held.run.host_of) {
            for &port in [site.port].iter().chain(&site.labelled) {
                self.ports.give(host, port);
            }
        }
        self.keep_for_held(held.rank);
        let index = key.task as usize;
        if held.run.cancelled {
            self.cancelled(index, now);
        } else if let Some((target, _)) = moved_to {
            // The kept room is what `start` expects a dispatch to have taken; short of ports it
            // gives the room back and queues the task at the head.
            self.start(index, &[target], now, false);
        } else {
            self.sched.requeue_front(index, self.tasks[index].template);
        }
    }

    /// dlaunch itself failed (`halted`): nothing more starts, so every worker holding orders is
    /// asked for them back. One started already runs on, as what runs may finish.
    pub(super) fn recall_all_held(&mut self) {
        let holders: Vec<(u32, AttemptKey)> =
            self.held.iter().filter(|(_, h)| h.recall.is_none()).map(|(&key, h)| (h.rank, key)).collect();
        for (rank, key) in holders {
            self.send(rank, Order::Recall { key });
        }
    }

    /// Worker `rank` is lost: what it held goes back to the head of the queue, in the order
    /// it was taken from there.
    pub(super) fn give_back_held_on(&mut self, rank: u32, now: SystemTime) {
        self.owed.remove(&rank);
        let keys = self.held_on.remove_worker(rank);
        // Each goes to the front: the last first, so that they stay in order.
        for key in keys.into_iter().rev() {
            self.give_back(key, now);
        }
    }

    /// Cancels the held attempt of task `index`, if there is one: its worker is told to drop
    /// it (or to stop it, if it started meanwhile). True when there was one.
    pub(super) fn cancel_held(&mut self, index: usize) -> bool {
        let task = index as u32;
        let from = AttemptKey { task, attempt: 0 };
        let Some((&key, held)) = self.held.range_mut(from..).next().filter(|(key, _)| key.task == task) else {
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
