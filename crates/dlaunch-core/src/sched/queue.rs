//! The FIFO of queued tasks, as one list per template linked through a table indexed by task:
//! a task leaves it from anywhere (dispatched from the middle, cancelled) in O(1), a dispatch
//! visits a template only until it fails to fit, and queue order is the merge of the lists by
//! a sequence number.
//!
//! Overtake counts are kept lazily. Once a template fails in a dispatch call, every later task
//! of it fails too, so the tasks of a template that wait in a call are a prefix of its list,
//! and each is overtaken by the starts after it. A template's counts never increase along its
//! list (a later task waits only in calls where the earlier ones wait, and is passed by fewer
//! starts), so the prefix that waited before the call's first start past it gets the same
//! number: one counter per template (`lazy`) adds it to a run of tasks at once, and only the
//! tasks interleaved with the call's starts are counted one by one. Tasks put back at the head
//! (`push_front`) would break the order and are counted one by one, as are the held ones, whose
//! counts never change again: the walk stops at the first of them.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

/// A task in the lists: 32 bits, as tasks are numbered far below 4 billion (a coordinator
/// holds hundreds of bytes per task), for a smaller entry per queued task.
type Link = u32;

/// No task: the end of a list.
const NONE: Link = Link::MAX;

/// The link of `task`; NONE, which no entry has, for one beyond what links can name.
fn link(task: usize) -> Link {
    Link::try_from(task).unwrap_or(NONE)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Vacant,
    /// Queued; `count` is its overtake count.
    Counted,
    /// Queued in its template's lazy run; its overtake count is `count` plus the template's `lazy`.
    Lazy,
    /// Queued and overtaken as often as the budget allows; `count` is final.
    Held,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// The neighbours in the template's list.
    prev: Link,
    next: Link,
    /// The task's place in queue order: later tasks have larger ones, and a task put back at
    /// the head a negative one below every other.
    seq: i64,
    count: i64,
    template: u32,
    state: State,
}

const VACANT: Entry = Entry { prev: NONE, next: NONE, seq: 0, count: 0, template: 0, state: State::Vacant };

/// The queued tasks of one template, in queue order.
#[derive(Clone, Debug)]
struct Line {
    head: Link,
    tail: Link,
    len: usize,
    /// Overtakes added to every task of the lazy run since the template's first.
    lazy: i64,
    /// The first task after the lazy run, which ends at the tail when there is none. The run
    /// itself starts after the tasks put back at the head and the held ones.
    boundary: Link,
}

const EMPTY: Line = Line { head: NONE, tail: NONE, len: 0, lazy: 0, boundary: NONE };

#[derive(Debug)]
pub(super) struct Queue {
    /// Indexed by task; tasks never queued yet lie beyond its end.
    entries: Vec<Entry>,
    /// Indexed by template.
    lines: Vec<Line>,
    len: usize,
    /// Templates with at least one queued task: once every template in the queue failed to
    /// fit, a dispatch stops.
    templates: usize,
    /// The next sequence number at the tail, and at the head.
    back: i64,
    front: i64,
    /// Queued tasks overtaken `limit` times or more, by `seq`: while the first waits, nothing
    /// behind it starts.
    held: BTreeSet<(i64, usize)>,
    limit: u32,
}

impl Queue {
    pub(super) fn new(limit: u32) -> Self {
        Queue {
            entries: Vec::new(),
            lines: Vec::new(),
            len: 0,
            templates: 0,
            back: 0,
            front: -1,
            held: BTreeSet::new(),
            limit,
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
        let seq = self.back;
        self.back += 1;
        let Some(at) = self.insert(task, template, seq) else {
            return;
        };
        let line = &mut self.lines[template];
        self.entries[task].prev = line.tail;
        match self.entries.get_mut(line.tail as usize) {
            Some(last) => last.next = at,
            None => line.head = at,
        }
        line.tail = at;
        if line.boundary == NONE {
            line.boundary = at;
        }
    }

    pub(super) fn push_front(&mut self, task: usize, template: usize) {
        let seq = self.front;
        self.front -= 1;
        let Some(at) = self.insert(task, template, seq) else {
            return;
        };
        let line = &mut self.lines[template];
        self.entries[task].next = line.head;
        match self.entries.get_mut(line.head as usize) {
            Some(first) => first.prev = at,
            None => line.tail = at,
        }
        line.head = at;
    }

    /// Marks `task` queued, unlinked yet, and returns its link. A task is queued at most
    /// once: queuing it again moves it.
    fn insert(&mut self, task: usize, template: usize, seq: i64) -> Option<Link> {
        self.remove(task);
        let (at, Ok(template_number)) = (link(task), u32::try_from(template)) else {
            log::error!("template {template} is beyond what the queue can number; task {task} not queued");
            return None;
        };
        if at == NONE {
            log::error!("task {task} is beyond what the queue can number; not queued");
            return None;
        }
        if self.entries.len() <= task {
            self.entries.resize(task + 1, VACANT);
        }
        self.entries[task] = Entry { seq, template: template_number, state: State::Counted, ..VACANT };
        self.len += 1;
        if self.lines.len() <= template {
            self.lines.resize(template + 1, EMPTY);
        }
        let line = &mut self.lines[template];
        line.len += 1;
        if line.len == 1 {
            self.templates += 1;
        }
        Some(at)
    }

    /// Takes `task` off the queue; false when it was not queued.
    pub(super) fn remove(&mut self, task: usize) -> bool {
        let Some(&entry) = self.entry_at(task) else {
            return false;
        };
        let line = &mut self.lines[entry.template as usize];
        match self.entries.get_mut(entry.prev as usize) {
            Some(prev) => prev.next = entry.next,
            None => line.head = entry.next,
        }
        match self.entries.get_mut(entry.next as usize) {
            Some(next) => next.prev = entry.prev,
            None => line.tail = entry.prev,
        }
        if line.boundary == link(task) {
            line.boundary = entry.next;
        }
        line.len -= 1;
        if line.len == 0 {
            *line = EMPTY;
            self.templates -= 1;
        }
        self.entries[task] = VACANT;
        self.len -= 1;
        if entry.state == State::Held {
            self.held.remove(&(entry.seq, task));
        }
        true
    }

    /// The queued entry of `task`, if it is queued.
    fn entry_at(&self, task: usize) -> Option<&Entry> {
        self.entries.get(task).filter(|e| e.state != State::Vacant)
    }

    /// The first queued task of each template that has any.
    pub(super) fn heads(&self) -> impl Iterator<Item = usize> + '_ {
        self.lines.iter().filter(|line| line.head != NONE).map(|line| line.head as usize)
    }

    /// The task after `task` of the same template.
    pub(super) fn after(&self, task: usize) -> Option<usize> {
        self.entry_at(task).filter(|e| e.next != NONE).map(|e| e.next as usize)
    }

    /// The place of `task` in queue order.
    pub(super) fn seq(&self, task: usize) -> Option<i64> {
        self.entry_at(task).map(|e| e.seq)
    }

    /// Whether `task` was put back at the head, and so is counted on its own.
    pub(super) fn put_back(&self, task: usize) -> bool {
        self.entry_at(task).is_some_and(|e| e.seq < 0)
    }

    pub(super) fn template(&self, task: usize) -> Option<usize> {
        self.entry_at(task).map(|e| e.template as usize)
    }

    pub(super) fn bypassed(&self, task: usize) -> u32 {
        self.entry_at(task).map_or(0, |e| self.count(e))
    }

    fn count(&self, entry: &Entry) -> u32 {
        let count = match entry.state {
            State::Lazy => entry.count + self.lines[entry.template as usize].lazy,
            _ => entry.count,
        };
        u32::try_from(count.max(0)).unwrap_or(u32::MAX)
    }

    /// `task`, one put back at the head, was overtaken `times` more times.
    pub(super) fn overtaken(&mut self, task: usize, times: usize) {
        let Some(entry) = self.entries.get_mut(task).filter(|e| e.state == State::Counted) else {
            return;
        };
        entry.count = entry.count.saturating_add(times as i64);
        self.hold_if_due(task);
    }

    /// `first`, the first task of its template neither put back at the head nor held, and the
    /// rest of its template waited in a dispatch call in which `starts` (the places in queue
    /// order of the tasks that started after `first` was passed, in order) started: each is
    /// overtaken by the starts after it.
    pub(super) fn overtaken_from(&mut self, first: usize, starts: &[i64]) {
        let (Some(&next_start), Some(&entry)) = (starts.first(), self.entry_at(first)) else {
            return;
        };
        let template = entry.template as usize;
        let lazy = self.lines[template].lazy;
        // The lazy run ends at the first start: every task before it is passed by all of them.
        let mut boundary = self.lines[template].boundary;
        while let Some(e) = self.entries.get_mut(boundary as usize).filter(|e| e.seq < next_start) {
            e.count -= lazy;
            e.state = State::Lazy;
            boundary = e.next;
        }
        loop {
            let last = match self.entries.get(boundary as usize) {
                Some(e) => e.prev,
                None => self.lines[template].tail,
            };
            let Some(e) = self.entries.get_mut(last as usize).filter(|e| e.state == State::Lazy && e.seq > next_start)
            else {
                break;
            };
            e.count += lazy;
            e.state = State::Counted;
            boundary = last;
        }
        let line = &mut self.lines[template];
        line.boundary = boundary;
        line.lazy += starts.len() as i64;
        // The tasks interleaved with the starts, one by one.
        let mut passed = 0;
        let mut task = boundary;
        while let Some(e) = self.entries.get_mut(task as usize).filter(|e| e.state != State::Vacant) {
            while passed < starts.len() && starts[passed] < e.seq {
                passed += 1;
            }
            if passed == starts.len() {
                break;
            }
            e.count += (starts.len() - passed) as i64;
            task = e.next;
        }
        let mut task = first;
        while self.hold_if_due(task) {
            let line = &mut self.lines[template];
            let next = self.entries[task].next;
            // Held tasks leave the run, past its end too: theirs is the part before it.
            if self.entries.get(line.boundary as usize).is_some_and(|e| e.state == State::Held) {
                line.boundary = next;
            }
            task = next as usize;
        }
    }

    /// Moves `task` to the held ones if it is queued, not held yet and overtaken as often as
    /// the budget allows; true when it did.
    fn hold_if_due(&mut self, task: usize) -> bool {
        let Some(&entry) = self.entry_at(task).filter(|e| e.state != State::Held) else {
            return false;
        };
        let count = self.count(&entry);
        if count < self.limit {
            return false;
        }
        self.held.insert((entry.seq, task));
        self.entries[task].count = i64::from(count);
        self.entries[task].state = State::Held;
        true
    }

    pub(super) fn limit(&self) -> u32 {
        self.limit
    }

    /// The first task overtaken as often as the budget allows, with how often.
    pub(super) fn holder(&self) -> Option<(usize, u32)> {
        self.held.first().map(|&(_, task)| (task, self.bypassed(task)))
    }

    /// The queued tasks in queue order: the lists merged by place.
    pub(super) fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        let mut next: BinaryHeap<Reverse<(i64, usize)>> =
            self.heads().map(|task| Reverse((self.entries[task].seq, task))).collect();
        std::iter::from_fn(move || {
            let Reverse((_, task)) = next.pop()?;
            if let Some(after) = self.after(task) {
                next.push(Reverse((self.entries[after].seq, after)));
            }
            Some(task)
        })
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
        assert_eq!((q.len(), q.templates(), q.iter().next()), (0, 0, None));
    }

    #[test]
    fn a_waiting_template_is_overtaken_by_the_starts_after_each_task() {
        let mut q = Queue::new(3);
        // Gangs (template 1) and singles (template 0); the singles start, the gangs wait.
        for (task, template) in [(0, 1), (1, 1), (2, 0), (3, 1), (4, 0)] {
            q.push_back(task, template);
        }
        assert!(q.remove(2) && q.remove(4));
        q.overtaken_from(0, &[2, 4]);
        assert_eq!([0, 1, 3].map(|t| q.bypassed(t)), [2, 2, 1], "3 waits behind the first start");
        assert_eq!(q.holder(), None);
        q.push_back(5, 0);
        assert!(q.remove(5));
        q.overtaken_from(0, &[5]);
        assert_eq!([0, 1, 3].map(|t| q.bypassed(t)), [3, 3, 2]);
        assert_eq!(q.holder(), Some((0, 3)));
        q.remove(0);
        assert_eq!(q.holder(), Some((1, 3)), "held ones keep their counts");
        assert_eq!(q.iter().collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn an_entry_is_32_bytes() {
        // A million queued tasks: the entry is a good part of the memory per queued task.
        assert_eq!(std::mem::size_of::<Entry>(), 32);
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
