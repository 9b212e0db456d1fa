//! Tasks that wait for others (`after`): held aside until their dependencies succeeded, skipped
//! when one finally failed or was cancelled. Both coordinators keep their waiting tasks here
//! (the flat `control::Control` and the node layout's `lease::Broker`); each owns its queue,
//! so this says which tasks to queue and what to record, and queues nothing itself.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::events::Event;
use crate::ledger::{Ledger, Resume, TaskStatus};
use crate::plan::Task;

/// How a task ended that others wait for, when they cannot run any more.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Blocked {
    /// It finally failed (or was skipped itself).
    Failed,
    /// It was cancelled (`dlaunch cancel`).
    Cancelled,
}

#[derive(Debug, Default)]
pub(crate) struct Deps {
    /// Tasks to run that wait for tasks they run `after`; in no queue, so they hold nothing back.
    waiting: BTreeSet<usize>,
    /// For the tasks others run after, those others (most jobs have none: no entry per task).
    dependents: HashMap<usize, Vec<usize>>,
}

/// What a resumed run does first: the tasks to queue, in FIFO order, and the `TaskSkipped`
/// events of those after a dependency that finally failed before.
pub(crate) struct Resumed {
    pub(crate) queue: Vec<usize>,
    pub(crate) skipped: Vec<Event>,
}

impl Deps {
    pub(crate) fn new(tasks: &[Task]) -> Self {
        let mut dependents: HashMap<usize, Vec<usize>> = HashMap::new();
        for task in tasks {
            for &d in &task.after {
                dependents.entry(d).or_default().push(task.index);
            }
        }
        Deps { waiting: BTreeSet::new(), dependents }
    }

    /// Sorts what the resumed run runs: tasks whose dependencies all succeeded are to be
    /// queued, those with dependencies still to run wait, and those after a dependency that
    /// finally failed or was cancelled (and is not run again) are skipped.
    pub(crate) fn resume(&mut self, tasks: &[Task], ledger: &Ledger, resume: &Resume) -> Resumed {
        let to_run: BTreeSet<usize> = resume.to_run.iter().copied().collect();
        let after: Vec<Vec<usize>> = tasks.iter().map(|t| t.after.to_vec()).collect();
        // Skipped so far, each with the word of the chain it is in.
        let mut skipped: BTreeMap<usize, Blocked> = BTreeMap::new();
        let mut events = Vec::new();
        for index in crate::graph::topological_order(&after) {
            if !to_run.contains(&index) {
                continue;
            }
            let task = &tasks[index];
            let status = |d: usize| ledger.get(&tasks[d].id).map(|r| r.status);
            let blocked = task.after.iter().find_map(|&d| match skipped.get(&d) {
                Some(&why) => Some((d, why)),
                None if to_run.contains(&d) => None,
                None => match status(d) {
                    Some(TaskStatus::Succeeded) => None,
                    Some(TaskStatus::Cancelled) => Some((d, Blocked::Cancelled)),
                    _ => Some((d, Blocked::Failed)),
                },
            });
            if let Some((d, why)) = blocked {
                skipped.insert(index, why);
                events.push(skip(tasks, index, d, why));
            } else if task.after.iter().any(|d| to_run.contains(d)) {
                self.waiting.insert(index);
            }
        }
        let queue =
            resume.to_run.iter().copied().filter(|i| !skipped.contains_key(i) && !self.waiting.contains(i)).collect();
        Resumed { queue, skipped: events }
    }

    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Takes `index` out of the waiting tasks (cancelled); false when it was not waiting.
    pub(crate) fn remove(&mut self, index: usize) -> bool {
        self.waiting.remove(&index)
    }

    /// `index` succeeded: the tasks waiting only for it (and others that succeeded), to queue.
    /// Allocates nothing for a task no other runs after.
    pub(crate) fn released(&mut self, tasks: &[Task], ledger: &Ledger, index: usize) -> Vec<usize> {
        let Some(dependents) = self.dependents.get(&index) else {
            return Vec::new();
        };
        let succeeded = |d: &usize| ledger.get(&tasks[*d].id).is_some_and(|r| r.status == TaskStatus::Succeeded);
        let ready: Vec<usize> = dependents
            .iter()
            .copied()
            .filter(|&next| self.waiting.contains(&next) && tasks[next].after.iter().all(succeeded))
            .collect();
        for next in &ready {
            self.waiting.remove(next);
        }
        ready
    }

    /// `index` cannot succeed in this run: everything waiting on it, directly or not, is
    /// skipped; their `TaskSkipped` events, each naming the dependency it waited for.
    pub(crate) fn skipped(&mut self, tasks: &[Task], index: usize, why: Blocked) -> Vec<Event> {
        let mut events = Vec::new();
        let mut blocked = vec![index];
        while let Some(done) = blocked.pop() {
            let dependents = self.dependents.get(&done).into_iter().flatten();
            let next: Vec<usize> = dependents.copied().filter(|n| self.waiting.contains(n)).collect();
            for n in next {
                self.waiting.remove(&n);
                events.push(skip(tasks, n, done, why));
                blocked.push(n);
            }
        }
        events
    }
}

/// `index` is not run because of `because`: the reason names the dependency, and whether the
/// chain it stands in began with a failure or a cancellation.
fn skip(tasks: &[Task], index: usize, because: usize, why: Blocked) -> Event {
    let word = match why {
        Blocked::Failed => "failed",
        Blocked::Cancelled => "cancelled",
    };
    let reason = format!("dependency {word}: {}", tasks[because].id);
    Event::TaskSkipped { task: tasks[index].id.clone(), reason }
}
