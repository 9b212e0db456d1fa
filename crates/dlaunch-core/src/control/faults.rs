//! Lost workers, cancelled tasks, stopping early, and tasks that can no longer run.

use super::*;

impl Control {
    /// Marks workers as lost that have been silent for longer than `heartbeat_timeout`, or that
    /// still run processes well after an interruption's grace period. `wall` is `now` on the
    /// calendar, for the journal.
    pub fn check_health(&mut self, now: Instant, wall: SystemTime) {
        if self.stop_deadline.is_some_and(|deadline| now >= deadline) {
            let stuck: BTreeSet<u32> = self
                .running
                .values()
                .flat_map(|run| run.results.iter().zip(&run.sites).filter(|(r, _)| r.is_none()).map(|(_, s)| s.rank))
                .chain(self.ranks_holding())
                .collect();
            for rank in stuck {
                self.worker_lost(rank, "its tasks did not stop within the grace period", wall);
            }
        }
        let timeout = self.job.heartbeat_timeout;
        let silent: Vec<(u32, Duration)> = self
            .last_heard
            .iter()
            .filter(|(rank, _)| !self.lost.contains(rank))
            .map(|(&rank, &heard)| (rank, now.saturating_duration_since(heard)))
            .filter(|&(_, silence)| silence > timeout)
            .collect();
        for (rank, silence) in silent {
            let reason = format!("no heartbeat for {}", crate::spec::format_duration(silence));
            self.worker_lost(rank, &reason, wall);
        }
    }

    /// A worker is gone or hopeless: no more work for it; its processes count as lost and their
    /// tasks run again elsewhere.
    pub fn worker_lost(&mut self, rank: u32, reason: &str, now: SystemTime) {
        if !self.lost.insert(rank) {
            return;
        }
        let host = self.workers.get(&rank).map_or(String::new(), |(h, _)| String::from(&*self.host_names[*h]));
        log::warn!("worker rank {rank} on {host} lost ({reason}); its tasks will run elsewhere");
        self.sched.set_unhealthy(rank);
        self.record(Event::WorkerLost { rank, host: host.clone(), reason: reason.to_string() });
        self.send(rank, Order::GivenUp { reason: reason.to_string() });
        self.give_back_held_on(rank, now);
        let affected: Vec<(AttemptKey, u32)> = self
            .running
            .iter()
            .flat_map(|(key, run)| {
                run.results
                    .iter()
                    .zip(&run.sites)
                    .enumerate()
                    .filter(|(_, (result, site))| result.is_none() && site.rank == rank)
                    .map(|(p, _)| (*key, p as u32))
                    .collect::<Vec<_>>()
            })
            .collect();
        for (key, process) in affected {
            if let Some(run) = self.running.get_mut(&key) {
                run.results[process as usize] = Some(ProcessResult {
                    process,
                    rank,
                    host: host.clone(),
                    cpus: String::new(),
                    gpus: vec![],
                    ending: Ending::WorkerLost,
                    start: None,
                    end: now,
                });
            }
            self.after_process_end(key, process, &Ending::WorkerLost);
        }
        // A node's leader hands back at once what its node can no longer run, though other
        // tasks run there for hours: rank 0 has other nodes.
        if self.handed_back.is_some() {
            self.fail_unrunnable();
        }
    }

    /// Cancels tasks at a user's request (`dlaunch cancel`): queued and waiting ones leave the
    /// queue, running ones are stopped; all are recorded as cancelled and never retried, and
    /// the tasks waiting for them are skipped. Finished tasks and ids
    /// this job does not have are left alone (the request may predate a change of the job file).
    pub fn cancel(&mut self, ids: &[String], now: SystemTime) {
        for id in ids {
            let Some(index) = self.tasks.iter().position(|t| t.id == *id) else {
                log::warn!("cancel: this job has no task {id}");
                continue;
            };
            if self.sched.remove(index) || self.deps.remove(index) {
                log::info!("cancelled {id} before it started");
                self.cancelled(index, now);
                continue;
            }
            if self.cancel_held(index) {
                log::info!("cancelling {id}, sent ahead to a worker: it is to drop it");
                continue;
            }
            let Some((&key, run)) = self.running.iter_mut().find(|(key, _)| key.task as usize == index) else {
                log::info!("cancel: {id} is neither queued nor running; left as it is");
                continue;
            };
            log::info!("cancelling {id} (attempt {}): stopping its processes", key.attempt);
            run.cancelled = true;
            let ranks: BTreeSet<u32> = run
                .results
                .iter()
                .zip(&run.sites)
                .filter(|(r, s)| r.is_none() && !self.lost.contains(&s.rank))
                .map(|(_, s)| s.rank)
                .collect();
            for rank in ranks {
                self.send(rank, Order::Stop { key });
            }
        }
    }

    /// Stops dispatching for good and asks every worker to interrupt what it runs.
    pub fn stop(&mut self, reason: &str, now: Instant) {
        if self.stopping.is_some() {
            return;
        }
        if !self.running.is_empty() {
            log::warn!("stopping: {reason}; interrupting running tasks");
        }
        self.stopping = Some(reason.to_string());
        self.stop_deadline = Some(now + self.job.grace + STOP_SLACK);
        let ranks: Vec<u32> = self.workers.keys().copied().filter(|r| !self.lost.contains(r)).collect();
        for rank in ranks {
            self.send(rank, Order::Interrupt);
        }
    }

    /// Nothing runs and the queue cannot move: tasks that no healthy worker can run ever again
    /// fail now (workers were lost), or at a node's leader go back to rank 0; the rest stay
    /// queued. True when any left the queue.
    pub(super) fn fail_unrunnable(&mut self) -> bool {
        if self.handed_back.is_some() {
            // A node's leader: rank 0 has other nodes. Only what no longer fits leaves the
            // queue, which keeps its order and its holds.
            let fits: Vec<bool> = self.demands.iter().map(|d| self.sched.fits_when_idle(d)).collect();
            return self.hand_back(|template| !fits[template]);
        }
        let queued: Vec<usize> = self.sched.drain_queue();
        let mut failed_any = false;
        // Once per template, not per task: each check places the task on an idle cluster.
        let mut fits: HashMap<usize, bool> = HashMap::new();
        for index in queued {
            let task = &self.tasks[index];
            let template = task.template;
            if *fits.entry(template).or_insert_with(|| self.sched.fits_when_idle(&self.demands[template])) {
                self.sched.enqueue(index, task.template);
                continue;
            }
            let attempt = self.ledger.get(&task.id).map_or(0, |r| r.attempts);
            let event = Event::AttemptEnded {
                task: task.id.clone(),
                attempt,
                status: AttemptStatus::Failed,
                reason: "no healthy worker left can run it".into(),
                retry: false,
                processes: vec![],
            };
            self.record(event);
            self.skip_dependents(index, crate::deps::Blocked::Failed);
            failed_any = true;
        }
        failed_any
    }
}
