//! Tasks that wait for others (`after`), kept by `crate::deps`: queued once their dependencies
//! succeeded, skipped when one finally failed or was cancelled.

use super::*;
use crate::deps::Blocked;

impl Control {
    /// Queues what the resumed run runs, holds aside what waits, and skips what follows a
    /// dependency that finally failed before.
    pub(super) fn queue_resumed(&mut self, resume: &Resume) {
        let resumed = self.deps.resume(&self.tasks, &self.ledger, resume);
        for event in resumed.skipped {
            self.record(event);
        }
        for index in resumed.queue {
            self.sched.enqueue(index, self.tasks[index].template);
        }
    }

    /// `index` succeeded: tasks waiting only for it (and others that succeeded) are queued.
    pub(super) fn release_dependents(&mut self, index: usize) {
        for next in self.deps.released(&self.tasks, &self.ledger, index) {
            self.sched.enqueue(next, self.tasks[next].template);
        }
    }

    /// `index` cannot succeed in this run: everything waiting on it, directly or not, is skipped.
    pub(super) fn skip_dependents(&mut self, index: usize, why: Blocked) {
        for event in self.deps.skipped(&self.tasks, index, why) {
            self.record(event);
        }
    }

    /// Records `index` cancelled before it started, and skips what waits for it.
    pub(super) fn cancelled(&mut self, index: usize, now: SystemTime) {
        self.record(Event::TaskCancelled { task: self.tasks[index].id.clone(), time: now });
        self.skip_dependents(index, Blocked::Cancelled);
    }
}
