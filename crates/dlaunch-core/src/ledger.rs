//! The state of every task, folded from events. The live coordinator and a resumed run build it
//! the same way — the journal is just the events written down — so they cannot disagree.

use std::collections::HashMap;
use std::collections::hash_map::{DefaultHasher, Entry};
use std::time::SystemTime;

use serde::Serialize;

use crate::events::{AttemptStatus, Event, ProcessResult};
use crate::plan::{Task, TypedValues};
use crate::spec::Job;

/// How the tasks of one job file stand: the figures of the summary and of the run's last event.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Counts {
    pub total: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Cancelled with `dlaunch cancel`: not run again unless asked.
    pub cancelled: usize,
    pub not_run: usize,
    /// Not run because a dependency failed or was cancelled.
    pub skipped: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Waiting to run (new, changed, or failed with retries left).
    Pending,
    Running,
    Succeeded,
    /// Failed with no retries left.
    Failed,
    /// Stopped from outside (signal, walltime, crash of dlaunch): runs again on resume.
    Interrupted,
    /// Not run: a task it runs after finally failed or was cancelled (the reason names it). Considered again
    /// on resume.
    Skipped,
    /// Cancelled with `dlaunch cancel`: not retried, and not run again on resume unless asked.
    Cancelled,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TaskRecord {
    pub id: String,
    pub digest: Option<String>,
    pub status: TaskStatus,
    /// Attempts started over all runs: the next attempt's number.
    pub attempts: u32,
    /// Failed attempts in the current run, counted against `retries`.
    pub failures: u32,
    pub reason: String,
    #[serde(with = "crate::events::time_format::option")]
    pub started: Option<SystemTime>,
    pub processes: Vec<ProcessResult>,
}

impl TaskRecord {
    fn new(id: &str) -> Self {
        TaskRecord {
            id: id.to_string(),
            digest: None,
            status: TaskStatus::Pending,
            attempts: 0,
            failures: 0,
            reason: String::new(),
            started: None,
            processes: Vec::new(),
        }
    }
}

#[derive(Debug)]
pub struct Ledger {
    records: Vec<TaskRecord>,
    /// Record by a 64-bit hash of its id, so that a million ids are not held twice; an id
    /// whose hash an earlier id has is found in `colliding` instead.
    by_hash: HashMap<u64, usize>,
    colliding: HashMap<String, usize>,
    hash: fn(&str) -> u64,
    runs: u32,
}

impl Default for Ledger {
    fn default() -> Self {
        Ledger {
            records: Vec::new(),
            by_hash: HashMap::new(),
            colliding: HashMap::new(),
            hash: |id| std::hash::BuildHasher::hash_one(&std::hash::BuildHasherDefault::<DefaultHasher>::default(), id),
            runs: 0,
        }
    }
}

impl Ledger {
    pub fn get(&self, id: &str) -> Option<&TaskRecord> {
        self.position(id).map(|i| &self.records[i])
    }

    /// Where `id`'s record is, for [`Ledger::at`] and [`Ledger::apply_at`]: records never move,
    /// so the coordinator looks a task up once per attempt instead of once per event (a
    /// lookup by id hashes it and compares it with the record's, two cache misses at a
    /// million tasks).
    pub(crate) fn position(&self, id: &str) -> Option<usize> {
        match self.by_hash.get(&(self.hash)(id)) {
            Some(&i) if self.records[i].id == id => Some(i),
            Some(_) => self.colliding.get(id).copied(),
            None => None,
        }
    }

    /// Makes room for `more` tasks at once (a run defining a million tasks does not leave
    /// the table up to twice their size).
    pub(crate) fn reserve(&mut self, more: usize) {
        self.records.reserve_exact(more);
        self.by_hash.reserve(more);
    }

    /// Counts over `tasks`, the tasks of this job file (the ledger may know others from an
    /// earlier version of it).
    pub fn counts(&self, tasks: &[Task]) -> Counts {
        let mut counts = Counts { total: tasks.len(), ..Counts::default() };
        for task in tasks {
            match self.get(&task.id).map(|r| r.status) {
                Some(TaskStatus::Succeeded) => counts.succeeded += 1,
                Some(TaskStatus::Failed) => counts.failed += 1,
                Some(TaskStatus::Skipped) => counts.skipped += 1,
                Some(TaskStatus::Cancelled) => counts.cancelled += 1,
                _ => counts.not_run += 1,
            }
        }
        counts
    }

    /// Makes `id`'s next attempt number at least `next`: attempt directories that the journal
    /// does not know (its last lines lost with the machine) are never written into again.
    pub fn continue_after(&mut self, id: &str, next: u32) {
        let record = self.record(id);
        record.attempts = record.attempts.max(next);
    }

    /// Runs recorded so far (a resumed run is number `runs()`).
    pub fn runs(&self) -> u32 {
        self.runs
    }

    fn record(&mut self, id: &str) -> &mut TaskRecord {
        let index = self.index(id);
        &mut self.records[index]
    }

    /// Where `id`'s record is, made (pending) if there is none.
    pub(crate) fn index(&mut self, id: &str) -> usize {
        match self.position(id) {
            Some(i) => i,
            None => {
                let i = self.records.len();
                self.records.push(TaskRecord::new(id));
                match self.by_hash.entry((self.hash)(id)) {
                    Entry::Vacant(slot) => {
                        slot.insert(i);
                    }
                    Entry::Occupied(_) => {
                        self.colliding.insert(id.to_string(), i);
                    }
                }
                i
            }
        }
    }

    /// [`Ledger::position`], looking at `hint` first: a run that defined its tasks in the job
    /// file's order (every fresh run) holds task i's record at position i, and one comparison
    /// of ids there spares hashing the id and a probe of the table.
    pub(crate) fn position_at_or_find(&self, hint: usize, id: &str) -> Option<usize> {
        match self.records.get(hint) {
            Some(record) if record.id == id => Some(hint),
            _ => self.position(id),
        }
    }

    /// The record at `position` (from [`Ledger::position`]).
    pub(crate) fn at(&self, position: usize) -> &TaskRecord {
        &self.records[position]
    }

    pub fn apply(&mut self, event: &Event) {
        if let Event::RunStarted { .. } = event {
            self.runs += 1;
            for record in &mut self.records {
                record.failures = 0;
                if record.status == TaskStatus::Running {
                    record.status = TaskStatus::Interrupted;
                    record.reason = "dlaunch stopped while it ran".into();
                }
            }
        } else if let Some(task) = subject(event) {
            let position = self.index(task);
            self.apply_at(position, event);
        }
    }

    /// [`Ledger::apply`] for an event about the task whose record is at `position` (from
    /// [`Ledger::position`]), without looking it up by id.
    pub(crate) fn apply_at(&mut self, position: usize, event: &Event) {
        let record = &mut self.records[position];
        match event {
            Event::TaskDefined { task, digest, .. } => {
                debug_assert_eq!(&record.id, task);
                if record.digest.as_ref() != Some(digest) {
                    record.digest = Some(digest.clone());
                    record.status = TaskStatus::Pending;
                }
            }
            Event::AttemptStarted { task, attempt, time, .. } => {
                debug_assert_eq!(&record.id, task);
                record.status = TaskStatus::Running;
                record.attempts = record.attempts.max(attempt + 1);
                record.started = Some(*time);
                record.processes.clear();
            }
            Event::AttemptEnded { task, status, reason, retry, processes, .. } => {
                debug_assert_eq!(&record.id, task);
                record.reason = reason.clone();
                record.processes = processes.clone();
                record.status = match status {
                    AttemptStatus::Succeeded => TaskStatus::Succeeded,
                    AttemptStatus::Interrupted => TaskStatus::Interrupted,
                    AttemptStatus::Cancelled => TaskStatus::Cancelled,
                    AttemptStatus::Failed => {
                        record.failures += 1;
                        if *retry { TaskStatus::Pending } else { TaskStatus::Failed }
                    }
                };
            }
            Event::TaskSkipped { task, reason } => {
                debug_assert_eq!(&record.id, task);
                record.status = TaskStatus::Skipped;
                record.reason = reason.clone();
                record.processes.clear();
            }
            Event::TaskCancelled { task, .. } => {
                debug_assert_eq!(&record.id, task);
                record.status = TaskStatus::Cancelled;
                record.reason = "cancelled".into();
            }
            _ => {}
        }
    }
}

/// What a new run does with each task of the job file, given what earlier runs recorded.
#[derive(Debug, Default, PartialEq)]
pub struct Resume {
    /// Task indices to queue, in FIFO order.
    pub to_run: Vec<usize>,
    /// Tasks whose definition is new or changed: `TaskDefined` events to record.
    pub defined: Vec<usize>,
    /// Tasks that already succeeded and are kept.
    pub kept: usize,
    /// Tasks that finally failed before and are not retried (no `--retry-failed`).
    pub failed_before: usize,
    /// Tasks cancelled before and not run again (no `--retry-cancelled`).
    pub cancelled_before: usize,
    /// Tasks whose definition changed since they last ran.
    pub changed: Vec<usize>,
}

/// The `TaskDefined` events a run records first, for the tasks `resume` found new or changed.
pub(crate) fn definitions<'a>(job: &'a Job, tasks: &'a [Task], resume: &'a Resume) -> impl Iterator<Item = Event> + 'a {
    let typed: Vec<TypedValues> = job.templates.iter().map(TypedValues::new).collect();
    resume.defined.iter().map(move |&index| {
        let task = &tasks[index];
        let params = typed[task.template].of(task);
        Event::TaskDefined { task: task.id.clone(), digest: task.digest.to_string(), params }
    })
}

/// The task whose record `event` changes, if it changes one.
pub(crate) fn subject(event: &Event) -> Option<&str> {
    match event {
        Event::TaskDefined { task, .. }
        | Event::AttemptStarted { task, .. }
        | Event::AttemptEnded { task, .. }
        | Event::TaskSkipped { task, .. }
        | Event::TaskCancelled { task, .. } => Some(task),
        Event::RunStarted { .. }
        | Event::WorkerJoined { .. }
        | Event::QueueHeld { .. }
        | Event::WorkerLost { .. }
        | Event::DatasetStaged { .. }
        | Event::OutputReturned { .. }
        | Event::OutputMissing { .. }
        | Event::RunEnded { .. } => None,
    }
}

/// Which finished-but-unsuccessful tasks a resumed run runs again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rerun {
    pub failed: bool,
    pub cancelled: bool,
}

/// Tasks are considered in dependency order: a task that runs again makes every task after
/// it run again too, even one that succeeded (its input is being redone).
pub fn decide_resume(ledger: &Ledger, tasks: &[Task], rerun: Rerun) -> Resume {
    let mut resume = Resume::default();
    let mut runs = vec![false; tasks.len()];
    let after: Vec<Vec<usize>> = tasks.iter().map(|t| t.after.to_vec()).collect();
    for index in crate::graph::topological_order(&after) {
        let task = &tasks[index];
        let record = ledger.get(&task.id);
        let same = record.is_some_and(|r| r.digest.as_deref().is_some_and(|d| task.digest.is(d)));
        if !same {
            resume.defined.push(task.index);
            if record.is_some_and(|r| r.attempts > 0) {
                resume.changed.push(task.index);
            }
            runs[index] = true;
            continue;
        }
        let dependency_reruns = task.after.iter().any(|&d| runs[d]);
        match record.map(|r| r.status) {
            _ if dependency_reruns => runs[index] = true,
            Some(TaskStatus::Succeeded) => resume.kept += 1,
            Some(TaskStatus::Failed) if !rerun.failed => resume.failed_before += 1,
            Some(TaskStatus::Cancelled) if !rerun.cancelled => resume.cancelled_before += 1,
            _ => runs[index] = true,
        }
    }
    resume.defined.sort_unstable();
    resume.changed.sort_unstable();
    resume.to_run = (0..tasks.len()).filter(|&i| runs[i]).collect();
    resume
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Digest;
    use crate::testing::{ended, run_started, started};

    /// Digests in tests are small numbers: `"1"` is `Digest(1)`, written `0000000000000001`.
    fn digest_of(number: &str) -> Digest {
        Digest(number.parse().unwrap_or_default())
    }

    fn task(index: usize, id: &str, digest: &str) -> Task {
        Task {
            id: id.into(),
            index,
            template: 0,
            values: Box::default(),
            command: "true".into(),
            digest: digest_of(digest),
            after: Box::default(),
            role_commands: Box::default(),
        }
    }

    fn defined(id: &str, digest: &str) -> Event {
        Event::TaskDefined { task: id.into(), digest: digest_of(digest).to_string(), params: Default::default() }
    }

    /// The coordinator finds a record once per attempt, at the task's index when the ledger
    /// holds it there, and applies the attempt's events to it there: as `apply` by id would.
    #[test]
    fn a_record_found_once_takes_events_as_by_its_id() {
        let (mut by_id, mut by_position) = (Ledger::default(), Ledger::default());
        for ledger in [&mut by_id, &mut by_position] {
            // Out of order, as after an earlier version of the job file.
            [defined("b", "1"), defined("a", "1"), defined("c", "1")].iter().for_each(|e| ledger.apply(e));
        }
        assert_eq!(by_position.position_at_or_find(2, "c"), Some(2), "where the hint says");
        assert_eq!(by_position.position_at_or_find(0, "a"), Some(1), "elsewhere: looked up by id");
        assert_eq!(by_position.position_at_or_find(7, "a"), Some(1), "past the end: looked up by id");
        assert_eq!(by_position.position_at_or_find(0, "z"), None);
        let events = [started("a", 0), ended("a", 0, AttemptStatus::Failed, true), started("a", 1)];
        for event in &events {
            by_id.apply(event);
            by_position.apply_at(1, event);
        }
        assert_eq!(by_position.get("a"), by_id.get("a"));
        assert_eq!(by_position.at(1).attempts, 2);
    }

    #[test]
    fn statuses_follow_attempts() {
        let mut ledger = Ledger::default();
        for event in [
            run_started(),
            defined("a", "1"),
            defined("b", "1"),
            defined("c", "1"),
            defined("d", "1"),
            started("a", 0),
            ended("a", 0, AttemptStatus::Failed, true),
            started("a", 1),
            ended("a", 1, AttemptStatus::Succeeded, false),
            started("b", 0),
            ended("b", 0, AttemptStatus::Failed, false),
            started("c", 0),
        ] {
            ledger.apply(&event);
        }
        let a = ledger.get("a").unwrap();
        assert_eq!((a.status, a.attempts, a.failures), (TaskStatus::Succeeded, 2, 1));
        assert_eq!(ledger.get("b").unwrap().status, TaskStatus::Failed);
        assert_eq!(ledger.get("c").unwrap().status, TaskStatus::Running);
        assert_eq!(ledger.get("d").unwrap().status, TaskStatus::Pending);
        ledger.apply(&run_started());
        let c = ledger.get("c").unwrap();
        assert_eq!((c.status, c.attempts), (TaskStatus::Interrupted, 1), "running at a crash means interrupted");
        assert_eq!(ledger.get("a").unwrap().failures, 0, "each run has its own retry budget");
        assert_eq!(ledger.runs(), 2);
    }

    #[test]
    fn ids_whose_hashes_collide_keep_records_of_their_own() {
        let mut ledger = Ledger { hash: |id| (id.len() % 2) as u64, ..Ledger::default() };
        for event in [defined("a", "1"), defined("b", "2"), defined("cc", "3"), started("b", 0), defined("d", "4")] {
            ledger.apply(&event);
        }
        let digest = |id| ledger.get(id).and_then(|r| r.digest.clone());
        assert_eq!(
            [digest("a"), digest("b"), digest("cc"), digest("d")],
            ["1", "2", "3", "4"].map(|d| Some(digest_of(d).to_string()))
        );
        assert_eq!(ledger.get("b").map(|r| r.status), Some(TaskStatus::Running));
        assert_eq!(ledger.get("a").map(|r| r.status), Some(TaskStatus::Pending));
        assert!(ledger.get("e").is_none() && ledger.get("ee").is_none());
        assert_eq!(ledger.colliding.len(), 2, "b and d share a's hash");
    }

    #[test]
    fn resume_keeps_successes_reruns_the_rest_and_notices_changes() {
        let mut ledger = Ledger::default();
        for event in [
            run_started(),
            defined("ok", "1"),
            defined("bad", "1"),
            defined("cut", "1"),
            defined("edited", "1"),
            started("ok", 0),
            ended("ok", 0, AttemptStatus::Succeeded, false),
            started("bad", 0),
            ended("bad", 0, AttemptStatus::Failed, false),
            started("cut", 0),
            ended("cut", 0, AttemptStatus::Interrupted, false),
            started("edited", 0),
            ended("edited", 0, AttemptStatus::Succeeded, false),
        ] {
            ledger.apply(&event);
        }
        let tasks =
            [task(0, "ok", "1"), task(1, "bad", "1"), task(2, "cut", "1"), task(3, "edited", "2"), task(4, "new", "1")];
        let plan = decide_resume(&ledger, &tasks, Rerun::default());
        assert_eq!(plan.to_run, [2, 3, 4]);
        assert_eq!(plan.defined, [3, 4]);
        assert_eq!(plan.changed, [3]);
        assert_eq!((plan.kept, plan.failed_before), (1, 1));
        assert_eq!(decide_resume(&ledger, &tasks, Rerun { failed: true, cancelled: false }).to_run, [1, 2, 3, 4]);
        // A task after one that runs again runs again too, even when it succeeded.
        let mut chained = tasks.to_vec();
        chained[0].after = Box::new([2]);
        let plan = decide_resume(&ledger, &chained, Rerun::default());
        assert_eq!(plan.to_run, [0, 2, 3, 4], "ok reruns after cut; bad failed before and stays");
        let retry = Rerun { failed: true, cancelled: false };
        assert_eq!(decide_resume(&ledger, &chained, retry).to_run, [0, 1, 2, 3, 4]);
        // Cancelled tasks stay cancelled on resume unless asked.
        ledger.apply(&Event::TaskCancelled { task: "cut".into(), time: SystemTime::UNIX_EPOCH });
        let plan = decide_resume(&ledger, &tasks, Rerun::default());
        assert_eq!((plan.to_run.as_slice(), plan.cancelled_before), ([3, 4].as_slice(), 1));
        assert_eq!(decide_resume(&ledger, &tasks, Rerun { failed: false, cancelled: true }).to_run, [2, 3, 4]);
        // A fresh ledger (no journal) runs and defines everything.
        let fresh = decide_resume(&Ledger::default(), &tasks, Rerun::default());
        assert_eq!((fresh.to_run.len(), fresh.defined.len(), fresh.changed.len()), (5, 5, 0));
    }
}
