//! The FIFO of queued tasks, linked through a table indexed by task: a task leaves it from
//! anywhere (dispatched from the middle, cancelled) in O(1), a walk visits only queued tasks,
//! and the tasks that used up their backfill budget are kept in order, so the one holding the
//! queue is found without a walk.

use std::collections::BTreeSet;

/// No task: the end of the list.
const NONE: usize = usize::MAX;

#[derive(Clone, Copy, Debug)]
struct Entry {
    prev: usize,
    next: usize,
    /// The task's place in queue order: later tasks have larger ones, and a task put back at
    /// the head one below every other (orders `held`).
    seq: i64,
    template: usize,
    bypassed: u32,
    queued: bool,
}

const VACANT: Entry = Entry { prev: NONE, next: NONE, seq: 0, template: 0, bypassed: 0, queued: false };

#[derive(Debug)]
pub(super) struct Queue {
    /// Indexed by task; tasks never queued yet lie beyond its end.
    entries: Vec<Entry>,
    head: usize,
    tail: usize,
    len: usize,
    /// Queued tasks overtaken `limit` times or more, by `seq`: while the first waits, nothing
    /// behind it starts.
    held: BTreeSet<(i64, usize)>,
    limit: u32,
    /// Queued tasks per template, and how many templates have any: once every template in the
    /// queue failed to fit, a dispatch stops without walking the rest.
    per_template: Vec<usize>,
    templates: usize,
}

impl Queue {
    pub(super) fn new(limit: u32) -> Self {
        Queue {
            entries: Vec::new(),
            head: NONE,
            tail: NONE,
            len: 0,
            held: BTreeSet::new(),
            limit,
            per_template: Vec::new(),
            templates: 0,
        }
    }

    /// Makes room for tasks numbered below `tasks` at once, rather than doubling as ever
    /// higher numbers come (up to twice the table).
    pub(super) fn reserve(&mut self, tasks: usize) {
        self.entries.reserve_exact(tasks.saturating_sub(self.entries.len()));
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Templates with at least one queued task.
    pub(super) fn templates(&self) -> usize {
        self.templates
    }

    pub(super) fn push_back(&mut self, task: usize, template: usize) {
        let seq = self.entry_at(self.tail).map_or(0, |e| e.seq + 1);
        self.insert(task, template, seq);
        let entry = &mut self.entries[task];
        entry.prev = self.tail;
        match self.entries.get_mut(self.tail) {
            Some(last) => last.next = task,
            None => self.head = task,
        }
        self.tail = task;
    }

    pub(super) fn push_front(&mut self, task: usize, template: usize) {
        let seq = self.entry_at(self.head).map_or(0, |e| e.seq - 1);
        self.insert(task, template, seq);
        self.entries[task].next = self.head;
        match self.entries.get_mut(self.head) {
            Some(first) => first.prev = task,
            None => self.tail = task,
        }
        self.head = task;
    }

    /// Marks `task` queued, unlinked yet. A task is queued at most once: queuing it again
    /// moves it.
    fn insert(&mut self, task: usize, template: usize, seq: i64) {
        self.remove(task);
        if self.entries.len() <= task {
            self.entries.resize(task + 1, VACANT);
        }
        self.entries[task] = Entry { seq, template, queued: true, ..VACANT };
        self.len += 1;
        if self.per_template.len() <= template {
            self.per_template.resize(template + 1, 0);
        }
        self.per_template[template] += 1;
        if self.per_template[template] == 1 {
            self.templates += 1;
        }
    }

    /// Takes `task` off the queue; false when it was not queued.
    pub(super) fn remove(&mut self, task: usize) -> bool {
        let Some(&entry) = self.entry_at(task) else {
            return false;
        };
        match self.entries.get_mut(entry.prev) {
            Some(prev) => prev.next = entry.next,
            None => self.head = entry.next,
        }
        match self.entries.get_mut(entry.next) {
            Some(next) => next.prev = entry.prev,
            None => self.tail = entry.prev,
        }
        self.entries[task] = VACANT;
        self.len -= 1;
        self.held.remove(&(entry.seq, task));
        self.per_template[entry.template] -= 1;
        if self.per_template[entry.template] == 0 {
            self.templates -= 1;
        }
        true
    }

    /// The queued entry of `task`, if it is queued.
    fn entry_at(&self, task: usize) -> Option<&Entry> {
        self.entries.get(task).filter(|e| e.queued)
    }

    pub(super) fn first(&self) -> Option<usize> {
        self.entry_at(self.head).map(|_| self.head)
    }

    /// The task after `task` in queue order.
    pub(super) fn after(&self, task: usize) -> Option<usize> {
        self.entry_at(task).map(|e| e.next).filter(|&next| next != NONE)
    }

    pub(super) fn template(&self, task: usize) -> Option<usize> {
        self.entry_at(task).map(|e| e.template)
    }

    pub(super) fn bypassed(&self, task: usize) -> u32 {
        self.entry_at(task).map_or(0, |e| e.bypassed)
    }

    /// `task` was overtaken `times` more times.
    pub(super) fn overtaken(&mut self, task: usize, times: u32) {
        let Some(entry) = self.entries.get_mut(task).filter(|e| e.queued) else {
            return;
        };
        entry.bypassed = entry.bypassed.saturating_add(times);
        if entry.bypassed >= self.limit {
            self.held.insert((entry.seq, task));
        }
    }

    pub(super) fn limit(&self) -> u32 {
        self.limit
    }

    /// The first task overtaken as often as the budget allows, with how often.
    pub(super) fn holder(&self) -> Option<(usize, u32)> {
        self.held.first().map(|&(_, task)| (task, self.bypassed(task)))
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        std::iter::successors(self.first(), |&task| self.after(task))
    }

    /// Empties the queue, returning its tasks in order.
    pub(super) fn drain(&mut self) -> Vec<usize> {
        let tasks: Vec<usize> = self.iter().collect();
        *self = Queue::new(self.limit);
        tasks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removal_from_anywhere_keeps_the_order_and_counts() {
        let mut q = Queue::new(2);
        for task in [3, 1, 4, 0] {
            q.push_back(task, task % 2);
        }
        q.push_front(7, 5);
        assert_eq!(q.iter().collect::<Vec<_>>(), [7, 3, 1, 4, 0]);
        assert_eq!((q.len(), q.templates()), (5, 3));
        assert!(q.remove(1) && q.remove(7) && q.remove(0));
        assert!(!q.remove(1), "not queued any more");
        assert!(!q.remove(99), "never queued");
        assert_eq!(q.iter().collect::<Vec<_>>(), [3, 4]);
        assert_eq!((q.len(), q.templates()), (2, 2));
        q.push_back(1, 1);
        q.push_back(3, 1);
        assert_eq!(q.iter().collect::<Vec<_>>(), [4, 1, 3], "queued again: moved to the end");
        assert_eq!(q.template(3), Some(1));
        assert_eq!(q.drain(), [4, 1, 3]);
        assert_eq!((q.len(), q.templates(), q.first()), (0, 0, None));
    }

    #[test]
    fn the_first_held_task_in_queue_order_holds() {
        let mut q = Queue::new(2);
        for task in 0..4 {
            q.push_back(task, 0);
        }
        q.overtaken(2, 1);
        assert_eq!(q.holder(), None);
        q.overtaken(2, 1);
        assert_eq!(q.holder(), Some((2, 2)));
        q.push_front(9, 0);
        q.overtaken(9, 3);
        assert_eq!(q.holder(), Some((9, 3)), "put back at the head: ahead of task 2");
        q.remove(9);
        assert_eq!(q.holder(), Some((2, 2)));
        q.remove(2);
        assert_eq!(q.holder(), None);
        q.push_back(2, 0);
        assert_eq!(q.bypassed(2), 0, "queued again with a fresh budget");
    }
}
