//! How attempts end: process ends and placements reported by workers, an attempt's outcome, retries.

use super::*;
use crate::deps::Blocked;

impl Control {
    /// Any message from a worker shows it is alive.
    pub fn heard_from(&mut self, rank: u32, now: Instant) {
        self.last_heard.insert(rank, now);
    }

    /// A worker placed processes held for their GPU mates on other ranks of the host: once
    /// every process of a host's group is placed, each worker of the group is told to start
    /// its own, seeing the GPUs of all. An attempt already ending sent its Stop instead.
    pub fn placed(&mut self, rank: u32, key: AttemptKey, gpus: Vec<(u32, Vec<String>)>) {
        let Some(run) = self.running.get_mut(&key) else {
            log::debug!("late placement from rank {rank} for finished attempt {key:?}");
            return;
        };
        if run.completed || run.failure.is_some() || run.cancelled {
            return;
        }
        run.placed.extend(gpus);
        let (ready, waiting): (Vec<Vec<u32>>, Vec<Vec<u32>>) =
            std::mem::take(&mut run.held).into_iter().partition(|g| g.iter().all(|p| run.placed.contains_key(p)));
        run.held = waiting;
        let mut starts = Vec::new();
        for group in ready {
            let visible: Vec<String> = group.iter().flat_map(|p| run.placed[p].iter().cloned()).collect();
            let ranks: BTreeSet<u32> = group.iter().map(|&p| run.sites[p as usize].rank).collect();
            starts.extend(ranks.into_iter().map(|rank| (rank, Order::Start { key, visible: visible.clone() })));
        }
        for (rank, order) in starts {
            self.send(rank, order);
        }
    }

    pub fn process_ended(&mut self, rank: u32, end: ProcessEnd) {
        self.pace.ended(&end);
        let Some(run) = self.running.get_mut(&end.key) else {
            log::debug!("late report from rank {rank} for finished attempt {:?}", end.key);
            return;
        };
        let slot = end.process as usize;
        if slot >= run.results.len() || run.results[slot].is_some() {
            log::warn!("rank {rank} reported process {} of {:?} twice or out of range", end.process, end.key);
            return;
        }
        // An order given back unstarted (its worker lost) runs again under the same key: a
        // late report from the worker that held it is not about this copy.
        if run.sites[slot].rank != rank {
            log::warn!(
                "rank {rank} reported process {} of {:?}, which runs on rank {}",
                end.process,
                end.key,
                run.sites[slot].rank
            );
            return;
        }
        let template = &self.job.templates[self.tasks[end.key.task as usize].template];
        self.sched.release(rank, &template.resources_of(end.process));
        let site = &run.sites[slot];
        run.results[slot] = Some(ProcessResult {
            process: end.process,
            rank,
            host: String::from(&*site.host),
            cpus: end.cpus,
            gpus: end.gpus,
            ending: end.ending.clone(),
            start: end.start,
            end: end.end,
        });
        self.settle(rank);
        self.keep_for_held(rank);
        self.after_process_end(end.key, end.process, &end.ending);
    }

    pub(super) fn after_process_end(&mut self, key: AttemptKey, process: u32, ending: &Ending) {
        let job = Arc::clone(&self.job);
        let template = &job.templates[self.tasks[key.task as usize].template];
        let success = template.success;
        let processes = template.processes;
        let Some(run) = self.running.get_mut(&key) else {
            return;
        };
        let mut stop_rest = false;
        if ending.succeeded() {
            run.successes += 1;
            let done = match success {
                GangSuccess::All => run.successes == processes,
                GangSuccess::Rank0 => process == 0,
                GangSuccess::Count(k) => run.successes >= k,
                GangSuccess::Role(role) => run.results.iter().enumerate().all(|(p, result)| {
                    template.role_of(p as u32) != Some(role as usize)
                        || result.as_ref().is_some_and(|r| r.ending.succeeded())
                }),
            };
            if done && !run.completed && run.failure.is_none() {
                run.completed = true;
                stop_rest = true;
            }
        } else if *ending != Ending::Stopped && !run.completed && run.failure.is_none() {
            run.failure = Some((process, ending.clone()));
            stop_rest = true;
        }
        if stop_rest {
            let ranks: BTreeSet<u32> =
                run.results.iter().zip(&run.sites).filter(|(r, _)| r.is_none()).map(|(_, s)| s.rank).collect();
            for rank in ranks {
                if !self.lost.contains(&rank) {
                    self.send(rank, Order::Stop { key });
                }
            }
        }
        if self.running.get(&key).is_some_and(|r| r.results.iter().all(Option::is_some)) {
            self.finish_attempt(key);
        }
    }

    pub(super) fn finish_attempt(&mut self, key: AttemptKey) {
        let Some(run) = self.running.remove(&key) else {
            return;
        };
        for (site, &host) in run.sites.iter().zip(&run.host_of) {
            for &port in [site.port].iter().chain(&site.labelled) {
                self.ports.give(host, port);
            }
        }
        let index = key.task as usize;
        let halted_before = self.halted.is_some();
        let task = &self.tasks[index];
        let template = &self.job.templates[task.template];
        let describe = |process: u32, ending: &Ending| explain(template, process, ending);
        let (status, reason, retry) = match &run.failure {
            _ if run.completed => (AttemptStatus::Succeeded, String::new(), false),
            _ if run.cancelled => (AttemptStatus::Cancelled, "cancelled".into(), false),
            Some((p, ending @ Ending::WorkerLost)) => {
                let losses = self.worker_losses.entry(index).or_default();
                *losses += 1;
                if *losses > MAX_WORKER_LOSSES {
                    (AttemptStatus::Failed, format!("{} {} times", describe(*p, ending), losses), false)
                } else {
                    (AttemptStatus::Interrupted, describe(*p, ending), self.stopping().is_none())
                }
            }
            Some((p, ending @ Ending::Interrupted)) => (AttemptStatus::Interrupted, describe(*p, ending), false),
            Some((p, ending @ Ending::Infrastructure { .. })) => {
                let reason = describe(*p, ending);
                if self.halted.is_none() {
                    log::error!("{reason}: no more tasks start in this run; they run on resume");
                    self.halted = Some(reason.clone());
                }
                (AttemptStatus::Interrupted, reason, false)
            }
            Some((p, ending @ Ending::PortInUse { .. })) => {
                let conflicts = self.port_conflicts.entry(index).or_default();
                *conflicts += 1;
                if *conflicts > MAX_PORT_CONFLICTS {
                    (AttemptStatus::Failed, format!("{} ({} times)", describe(*p, ending), conflicts), false)
                } else {
                    (AttemptStatus::Interrupted, describe(*p, ending), self.stopping().is_none())
                }
            }
            Some((p, ending)) => {
                let failures = run.ledger_at.map_or_else(
                    || self.ledger.get(&task.id).map_or(0, |r| r.failures),
                    |at| self.ledger.at(at).failures,
                );
                (AttemptStatus::Failed, describe(*p, ending), failures < template.retries)
            }
            None => (AttemptStatus::Failed, "all processes were stopped".into(), false),
        };
        // Sized up front: collected from `flatten`, a gang's results would be copied as the
        // vector grows.
        let mut processes: Vec<ProcessResult> = Vec::with_capacity(run.results.len());
        processes.extend(run.results.into_iter().flatten());
        let task_id = task.id.clone();
        let template = task.template;
        let requeue = retry && self.stopping().is_none();
        let halts = !halted_before && self.halted.is_some();
        let blocked = match status {
            AttemptStatus::Failed if !retry => Some(Blocked::Failed),
            AttemptStatus::Cancelled => Some(Blocked::Cancelled),
            _ => None,
        };
        let succeeded = status == AttemptStatus::Succeeded;
        let event = Event::AttemptEnded { task: task_id, attempt: key.attempt, status, reason, retry, processes };
        self.record_at(run.ledger_at, event);
        if requeue {
            self.queue(index, template);
        }
        if halts {
            self.recall_all_held();
        }
        if succeeded {
            self.release_dependents(index);
        } else if let Some(why) = blocked {
            self.skip_dependents(index, why);
        }
    }
}

/// How a process ended, for an attempt's reason: "process 2 (worker 1): exit 1".
pub(super) fn explain(template: &TaskTemplate, process: u32, ending: &Ending) -> String {
    let index = template.role_of(process);
    let role = index.map(|r| &template.roles[r]);
    let what = match (role.and_then(|r| r.wait_for), ending) {
        (Some(waited), Ending::WaitFailed) => {
            format!("wait_for: role {} did not accept connections in time", template.roles[waited].name)
        }
        _ => ending.describe(),
    };
    match role {
        Some(role) => {
            let first: u32 = template.roles[..index.unwrap_or(0)].iter().map(|r| r.processes).sum();
            format!("process {process} ({} {}): {what}", role.name, process - first)
        }
        None if template.processes > 1 => format!("process {process}: {what}"),
        None => what,
    }
}
