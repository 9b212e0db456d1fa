//! Tasks that wait for others (`after`): queued once their dependencies succeeded, skipped when one finally failed.

use super::*;

impl Control {
    /// Queues what the resumed run runs: tasks whose dependencies all succeeded go to the scheduler,
    /// those with dependencies still to run wait, and those after a dependency that finally
    /// failed (and is not run again) are skipped.
    pub(super) fn queue_resumed(&mut self, resume: &Resume) {
        let to_run: BTreeSet<usize> = resume.to_run.iter().copied().collect();
        let tasks = Arc::clone(&self.tasks);
        let after: Vec<Vec<usize>> = tasks.iter().map(|t| t.after.to_vec()).collect();
        let mut skipped: BTreeSet<usize> = BTreeSet::new();
        for index in crate::graph::topological_order(&after) {
            if !to_run.contains(&index) {
                continue;
            }
            let task = &tasks[index];
            let blocker = task.after.iter().find(|&&d| {
                skipped.contains(&d)
                    || (!to_run.contains(&d)
                        && self.ledger.get(&tasks[d].id).map(|r| r.status) != Some(TaskStatus::Succeeded))
            });
            if let Some(&d) = blocker {
                skipped.insert(index);
                self.skip(index, d);
            } else if task.after.iter().any(|d| to_run.contains(d)) {
                self.waiting.insert(index);
            }
        }
        for &index in &resume.to_run {
            if !skipped.contains(&index) && !self.waiting.contains(&index) {
                self.sched.enqueue(index, self.tasks[index].template);
            }
        }
    }

    pub(super) fn skip(&mut self, index: usize, because: usize) {
        let reason = format!("dependency failed: {}", self.tasks[because].id);
        self.record(Event::TaskSkipped { task: self.tasks[index].id.clone(), reason });
    }

    /// `index` succeeded: tasks waiting only for it (and others that succeeded) are queued.
    pub(super) fn release_dependents(&mut self, index: usize) {
        let tasks = Arc::clone(&self.tasks);
        for &next in self.dependents.get(&index).into_iter().flatten() {
            let ready = self.waiting.contains(&next)
                && tasks[next]
                    .after
                    .iter()
                    .all(|d| self.ledger.get(&tasks[*d].id).is_some_and(|r| r.status == TaskStatus::Succeeded));
            if ready {
                self.waiting.remove(&next);
                self.sched.enqueue(next, tasks[next].template);
            }
        }
    }

    /// `index` finally failed: everything waiting on it, directly or not, is skipped.
    pub(super) fn skip_dependents(&mut self, index: usize) {
        let mut failed = vec![index];
        while let Some(done) = failed.pop() {
            let dependents = self.dependents.get(&done).into_iter().flatten();
            let next: Vec<usize> = dependents.copied().filter(|n| self.waiting.contains(n)).collect();
            for n in next {
                self.waiting.remove(&n);
                self.skip(n, done);
                failed.push(n);
            }
        }
    }
}
