//! A run as seen from outside, folded from journal events: counts, what runs where, what
//! failed and why, how busy each worker was, rate and ETA. `dlaunch status`, the live progress
//! line and the snapshot beside the journal are all this one fold, so they cannot disagree.
//!
//! The view is compact on purpose: it keeps no per-task record for queued or succeeded tasks
//! (counts only), so a snapshot of a run with a million tasks stays small and `status` reads
//! the snapshot plus the journal lines after it instead of the whole journal.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::events::{Assigned, AttemptStatus, Event, ProcessResult};
use crate::sched::Capacity;
use crate::spec::{LogMode, Resources};
use crate::substitute::shell_quote;

/// The folded state of the journal's latest run (and what earlier runs left behind).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunView {
    /// The latest run's number (0 for the first).
    pub run: u32,
    #[serde(with = "crate::events::time_format::option")]
    pub started: Option<SystemTime>,
    pub world_size: u32,
    pub slurm_job_id: Option<String>,
    /// Tasks in the job file of the latest run.
    pub total: usize,
    /// Succeeded: kept from earlier runs plus those of this run.
    pub succeeded: usize,
    /// Tasks settled in this run (succeeded, finally failed, cancelled): the rate's numerator.
    pub settled_this_run: usize,
    /// Failed attempts that were retried in this run.
    pub retried: usize,
    pub running: BTreeMap<String, RunningTask>,
    /// Finally failed tasks, the last failure of each.
    pub failed: BTreeMap<String, Failure>,
    pub cancelled: BTreeSet<String>,
    /// Not run because a task they run after finally failed: task → reason.
    pub skipped: BTreeMap<String, String>,
    pub workers: BTreeMap<u32, WorkerUse>,
    pub datasets: Vec<Staged>,
    /// The latest run's end, once it ended.
    pub ended: Option<RunEnd>,
    /// The last moment a task may still be running in this allocation, when it has a limit.
    #[serde(default, with = "crate::events::time_format::option")]
    pub deadline: Option<SystemTime>,
    #[serde(default)]
    pub backfill_limit: Option<u32>,
    /// The queued task that used up its backfill budget: nothing behind it starts until it does.
    #[serde(default)]
    pub queue_held: Option<QueueHold>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueHold {
    pub task: String,
    pub overtaken: u32,
    #[serde(with = "crate::events::time_format")]
    pub since: SystemTime,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunningTask {
    pub attempt: u32,
    #[serde(with = "crate::events::time_format")]
    pub start: SystemTime,
    pub processes: Vec<Assigned>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub attempt: u32,
    pub reason: String,
    pub processes: Vec<ProcessResult>,
}

/// One worker's capacity and what its tasks used of it in this run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerUse {
    pub host: String,
    pub capacity: Capacity,
    /// Process-seconds of finished processes (slot use).
    pub process_seconds: f64,
    pub cpu_seconds: f64,
    pub gpu_seconds: f64,
    /// Why it was given up on, if it was.
    pub lost: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Staged {
    pub dataset: String,
    pub bytes: u64,
    pub seconds: f64,
    pub nodes: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunEnd {
    #[serde(with = "crate::events::time_format")]
    pub time: SystemTime,
    pub exit_code: i32,
    /// Why it stopped early; empty when it did not.
    pub reason: String,
}

/// Counts per state, over the tasks of the latest run's job file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct StateCounts {
    pub total: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub cancelled: usize,
    pub skipped: usize,
    pub running: usize,
    /// Not started yet (new, retried, interrupted).
    pub queued: usize,
}

/// How much of a worker was busy, as fractions (None where it has none of that resource).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Utilisation {
    pub rank: u32,
    pub host: String,
    pub slots: Option<f64>,
    pub cpus: Option<f64>,
    pub gpus: Option<f64>,
    /// Resources held by running tasks now.
    pub busy_now: Resources,
    pub processes_now: u32,
    pub lost: Option<String>,
}

impl RunView {
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::RunStarted {
                run, time, world_size, tasks, slurm_job_id, kept, deadline, backfill_limit, ..
            } => {
                // What ran when the last run ended abruptly is interrupted, and queued again.
                self.running.clear();
                self.workers.clear();
                self.datasets.clear();
                self.run = *run;
                self.started = Some(*time);
                self.world_size = *world_size;
                self.slurm_job_id = slurm_job_id.clone();
                self.total = *tasks;
                self.succeeded = *kept;
                self.settled_this_run = 0;
                self.retried = 0;
                self.ended = None;
                self.deadline = *deadline;
                self.backfill_limit = *backfill_limit;
                self.queue_held = None;
            }
            Event::WorkerJoined { rank, host, capacity } => {
                let worker = WorkerUse {
                    host: host.clone(),
                    capacity: *capacity,
                    process_seconds: 0.0,
                    cpu_seconds: 0.0,
                    gpu_seconds: 0.0,
                    lost: None,
                };
                self.workers.insert(*rank, worker);
            }
            Event::TaskDefined { task, .. } => {
                self.failed.remove(task);
                self.cancelled.remove(task);
                self.skipped.remove(task);
            }
            Event::AttemptStarted { task, attempt, time, processes } => {
                self.release_queue(task);
                self.failed.remove(task);
                self.cancelled.remove(task);
                self.skipped.remove(task);
                let running = RunningTask { attempt: *attempt, start: *time, processes: processes.clone() };
                self.running.insert(task.clone(), running);
            }
            Event::AttemptEnded { task, attempt, status, reason, retry, processes } => {
                let started = self.running.remove(task);
                for p in processes {
                    let start = p.start.or(started.as_ref().map(|r| r.start)).unwrap_or(p.end);
                    let seconds = p.end.duration_since(start).unwrap_or_default().as_secs_f64();
                    if let Some(worker) = self.workers.get_mut(&p.rank) {
                        worker.process_seconds += seconds;
                        worker.cpu_seconds += seconds * cpu_count(&p.cpus) as f64;
                        worker.gpu_seconds += seconds * p.gpus.len() as f64;
                    }
                }
                match status {
                    AttemptStatus::Succeeded => {
                        self.succeeded += 1;
                        self.settled_this_run += 1;
                    }
                    AttemptStatus::Failed if *retry => self.retried += 1,
                    AttemptStatus::Failed => {
                        let failure =
                            Failure { attempt: *attempt, reason: reason.clone(), processes: processes.clone() };
                        self.failed.insert(task.clone(), failure);
                        self.settled_this_run += 1;
                    }
                    AttemptStatus::Cancelled => {
                        self.cancelled.insert(task.clone());
                        self.settled_this_run += 1;
                    }
                    AttemptStatus::Interrupted => {}
                }
            }
            Event::QueueHeld { task, overtaken, time } => {
                self.queue_held = Some(QueueHold { task: task.clone(), overtaken: *overtaken, since: *time });
            }
            Event::TaskCancelled { task, .. } => {
                self.release_queue(task);
                self.cancelled.insert(task.clone());
                self.settled_this_run += 1;
            }
            Event::TaskSkipped { task, reason } => {
                self.release_queue(task);
                self.skipped.insert(task.clone(), reason.clone());
                self.settled_this_run += 1;
            }
            Event::WorkerLost { rank, reason, .. } => {
                if let Some(worker) = self.workers.get_mut(rank) {
                    worker.lost = Some(reason.clone());
                }
            }
            // The files are in the output directory; `logs` and `report` find them there.
            Event::OutputReturned { .. } | Event::OutputMissing { .. } => {}
            Event::DatasetStaged { dataset, bytes, seconds, nodes } => {
                self.datasets.push(Staged { dataset: dataset.clone(), bytes: *bytes, seconds: *seconds, nodes: *nodes })
            }
            Event::RunEnded { time, failed, skipped, not_run, reason, .. } => {
                let exit_code = if *not_run > 0 {
                    crate::exit_code::INCOMPLETE
                } else if *failed > 0 || *skipped > 0 {
                    crate::exit_code::TASKS_FAILED
                } else {
                    crate::exit_code::SUCCESS
                };
                self.running.clear();
                self.queue_held = None;
                self.ended = Some(RunEnd { time: *time, exit_code, reason: reason.clone() });
            }
        }
    }

    /// `task` left the queue: if it held it, the queue moves again.
    fn release_queue(&mut self, task: &str) {
        if self.queue_held.as_ref().is_some_and(|h| h.task == task) {
            self.queue_held = None;
        }
    }

    pub fn counts(&self) -> StateCounts {
        let (failed, cancelled, running) = (self.failed.len(), self.cancelled.len(), self.running.len());
        let skipped = self.skipped.len();
        StateCounts {
            total: self.total,
            succeeded: self.succeeded,
            failed,
            cancelled,
            skipped,
            running,
            queued: self.total.saturating_sub(self.succeeded + failed + cancelled + skipped + running),
        }
    }

    /// Tasks settled per second in this run, and the time the rest would take at that rate.
    pub fn rate_and_eta(&self, now: SystemTime) -> (Option<f64>, Option<Duration>) {
        let Some(started) = self.started else { return (None, None) };
        let end = self.ended.as_ref().map_or(now, |e| e.time);
        let elapsed = end.duration_since(started).unwrap_or_default().as_secs_f64();
        if self.settled_this_run == 0 || elapsed <= 0.0 {
            return (None, None);
        }
        let rate = self.settled_this_run as f64 / elapsed;
        let c = self.counts();
        let left = (c.queued + c.running) as f64;
        let eta = (self.ended.is_none() && left > 0.0).then(|| Duration::from_secs_f64(left / rate));
        (Some(rate), eta)
    }

    /// Per worker: the busy fraction of its slots, CPUs and GPUs since the run started,
    /// counting running processes up to `now`.
    pub fn utilisation(&self, now: SystemTime) -> Vec<Utilisation> {
        let Some(started) = self.started else { return Vec::new() };
        let end = self.ended.as_ref().map_or(now, |e| e.time);
        let elapsed = end.duration_since(started).unwrap_or_default().as_secs_f64();
        let mut rows: Vec<Utilisation> = Vec::with_capacity(self.workers.len());
        for (&rank, w) in &self.workers {
            let (mut seconds, mut cpu, mut gpu) = (w.process_seconds, w.cpu_seconds, w.gpu_seconds);
            let mut busy_now = Resources::default();
            let mut processes_now = 0;
            for task in self.running.values() {
                let running_for = end.duration_since(task.start).unwrap_or_default().as_secs_f64();
                for p in task.processes.iter().filter(|p| p.rank == rank) {
                    seconds += running_for;
                    cpu += running_for * f64::from(p.resources.cpus);
                    gpu += running_for * f64::from(p.resources.gpus);
                    busy_now.cpus += p.resources.cpus;
                    busy_now.gpus += p.resources.gpus;
                    busy_now.memory += p.resources.memory;
                    processes_now += 1;
                }
            }
            let fraction = |used: f64, of: u32| {
                (of > 0 && of != u32::MAX && elapsed > 0.0).then(|| (used / (f64::from(of) * elapsed)).min(1.0))
            };
            rows.push(Utilisation {
                rank,
                host: w.host.clone(),
                slots: fraction(seconds, w.capacity.slots),
                cpus: fraction(cpu, w.capacity.cpus),
                gpus: fraction(gpu, w.capacity.gpus),
                busy_now,
                processes_now,
                lost: w.lost.clone(),
            });
        }
        rows
    }
}

/// Logical CPUs in a list like "0-3,8" (what workers report); 0 for an unpinned process.
pub(crate) fn cpu_count(list: &str) -> usize {
    list.split(',')
        .filter(|part| !part.is_empty())
        .map(|part| match part.split_once('-') {
            Some((a, b)) => match (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => 1,
        })
        .sum()
}

/// What a resumed run would do, from the view of an ended (or dead) run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NextRun {
    /// Queued, interrupted and running-when-it-stopped tasks: run again.
    pub to_run: usize,
    pub kept: usize,
    /// Failed tasks, rerun only with `--retry-failed`.
    pub failed: usize,
    /// Cancelled tasks, rerun only with `--retry-cancelled`.
    pub cancelled: usize,
}

impl RunView {
    pub fn next_run(&self) -> NextRun {
        let c = self.counts();
        NextRun { to_run: c.queued + c.running, kept: c.succeeded, failed: c.failed, cancelled: c.cancelled }
    }
}

/// Where people find a process's stderr: its file, or with framed logs the `dlaunch logs`
/// command that reads it from the records.
pub fn stderr_hint(output_dir: &Path, logs: LogMode, task: &str, attempt: u32, process: u32, processes: u32) -> String {
    match logs {
        LogMode::Files => {
            crate::layout::log_dir(output_dir, task, attempt, process, processes).join("stderr").display().to_string()
        }
        LogMode::Framed => {
            let rank = if processes > 1 { format!(" --rank {process}") } else { String::new() };
            let dir = output_dir.to_string_lossy();
            format!("dlaunch logs {} {} --attempt {attempt}{rank} --stderr", shell_quote(&dir), shell_quote(task))
        }
    }
}

/// One line for a log, for events people should hear about as they happen; None for routine ones.
/// `stderr(task, attempt, process, processes)` says where a process's stderr is (see
/// `stderr_hint`).
pub fn noteworthy(event: &Event, stderr: impl Fn(&str, u32, u32, u32) -> String) -> Option<String> {
    match event {
        Event::AttemptEnded { task, attempt, status, reason, retry, processes } => {
            let failed = processes.iter().find(|p| !p.ending.succeeded() && p.ending != crate::events::Ending::Stopped);
            let logs = failed
                .map_or(String::new(), |p| format!(" — {}", stderr(task, *attempt, p.process, processes.len() as u32)));
            let on = failed.map_or(String::new(), |p| format!(" on {} (rank {})", p.host, p.rank));
            match status {
                AttemptStatus::Failed if *retry => {
                    Some(format!("task {task} attempt {attempt} failed{on}: {reason}; retrying{logs}"))
                }
                AttemptStatus::Failed => Some(format!("task {task} failed{on}: {reason}{logs}")),
                AttemptStatus::Cancelled => Some(format!("task {task} cancelled")),
                AttemptStatus::Interrupted if *retry => {
                    Some(format!("task {task} attempt {attempt} {reason}; running it again elsewhere"))
                }
                AttemptStatus::Succeeded | AttemptStatus::Interrupted => None,
            }
        }
        Event::TaskCancelled { task, .. } => Some(format!("task {task} cancelled before it started")),
        Event::DatasetStaged { dataset, bytes, seconds, nodes } => Some(format!(
            "dataset {dataset} staged to {nodes} node(s): {} in {seconds:.1}s ({:.2} GB/s)",
            crate::spec::format_size(*bytes),
            if *seconds > 0.0 { *bytes as f64 / seconds / 1e9 } else { 0.0 }
        )),
        Event::WorkerLost { rank, host, reason } => Some(format!("worker rank {rank} on {host} lost: {reason}")),
        Event::QueueHeld { task, overtaken, .. } => Some(format!(
            "task {task} was overtaken {overtaken} times, its backfill budget: nothing queued behind it starts until it does"
        )),
        Event::OutputMissing { task, attempt, path, reason } => {
            Some(format!("task {task} attempt {attempt}: output {path} not returned: {reason}"))
        }
        _ => None,
    }
}

/// One compact progress line: "12/30 done (1 failed), 4 running, 14 queued, 0.8/s, ETA 18s".
pub fn progress_line(view: &RunView, now: SystemTime) -> String {
    let c = view.counts();
    let (rate, eta) = view.rate_and_eta(now);
    let mut line = format!("{}/{} done", c.succeeded + c.failed + c.cancelled, c.total);
    let mut extra = Vec::new();
    if c.failed > 0 {
        extra.push(format!("{} failed", c.failed));
    }
    if c.cancelled > 0 {
        extra.push(format!("{} cancelled", c.cancelled));
    }
    if view.retried > 0 {
        extra.push(format!("{} retried", view.retried));
    }
    if !extra.is_empty() {
        line.push_str(&format!(" ({})", extra.join(", ")));
    }
    line.push_str(&format!(", {} running, {} queued", c.running, c.queued));
    if let Some(rate) = rate {
        line.push_str(&format!(", {}", format_rate(rate)));
    }
    if let Some(eta) = eta {
        line.push_str(&format!(", ETA {}", crate::spec::format_duration(Duration::from_secs(eta.as_secs()))));
    }
    line
}

pub fn format_rate(per_second: f64) -> String {
    if per_second >= 1.0 { format!("{per_second:.1}/s") } else { format!("{:.1}/min", per_second * 60.0) }
}

#[cfg(test)]
mod tests;
