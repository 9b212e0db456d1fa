//! Returned output (`[job] output = "returned"`): the decisions behind sending each task's logs
//! and declared outputs to rank 0 over MPI when the nodes share no filesystem with it.
//!
//! A worker runs its tasks in a node-local copy of the output directory's layout (`rebase`)
//! and sends each file as a sequence of chunks (`Outbox`): at most `CHUNK` bytes each and at
//! most `WINDOW` unacknowledged per worker, so that a chatty task costs rank 0 a bounded
//! amount of memory and its messages queue behind no more than that. Rank 0 checks every
//! chunk (`Inbox`) before writing it into the same `tasks/<id>/attempt-<n>/` layout as shared
//! mode. The shell does the reading, writing and checksumming.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::events::{AttemptKey, Event};
use crate::layout;
#[cfg(test)]
use crate::layout::check_pattern;
#[cfg(test)]
use crate::spec::OutputMode;

/// Bytes of one chunk at most.
pub const CHUNK: u64 = 64 << 10;

/// Chunks with bytes a worker may have sent and not yet seen acknowledged.
pub const WINDOW: u32 = 8;

/// Where an attempt's declared outputs go, beneath its log directory.
pub const OUTPUTS_DIR: &str = "outputs";

/// Whether a returned file is a declared output (under `outputs/`), not a log: by path
/// component, as `Inbox` checks it, so `outputsX` is not one.
pub fn is_output(name: &str) -> bool {
    Path::new(name).starts_with(OUTPUTS_DIR)
}

/// Whether `path` (relative, `/`-separated) matches `pattern`: `*` and `?` match within one
/// path component, so a pattern never reaches into a directory it does not name.
pub fn matches(pattern: &str, path: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('/').filter(|c| !c.is_empty()).collect();
    let path: Vec<&str> = path.split('/').collect();
    pattern.len() == path.len() && pattern.iter().zip(&path).all(|(p, n)| component_matches(p.as_bytes(), n.as_bytes()))
}

fn component_matches(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            component_matches(&pattern[1..], name) || (!name.is_empty() && component_matches(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => component_matches(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => component_matches(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// Files found, or kept: a path relative to `DLAUNCH_TASK_DIR` and its size.
pub type Found = Vec<(String, u64)>;

/// Files refused: the path and why.
pub type Refusals = Vec<(String, String)>;

/// What of the files matching a task's patterns is sent back: in path order, while the total
/// stays within `limit`. The rest is refused, each with the reason.
pub fn select_outputs(mut files: Found, limit: Option<u64>) -> (Found, Refusals) {
    files.sort();
    let mut total = 0u64;
    let mut kept = Vec::new();
    let mut refused = Vec::new();
    for (path, size) in files {
        match limit {
            Some(limit) if total.saturating_add(size) > limit => refused.push((
                path,
                format!("{size} bytes would take the attempt's outputs past output_limit ({limit} bytes)"),
            )),
            _ => {
                total += size;
                kept.push((path, size));
            }
        }
    }
    (kept, refused)
}

/// `path` moved from beneath `from` to the same place beneath `to`; other paths as they are.
pub fn rebase(path: &Path, from: &Path, to: &Path) -> PathBuf {
    match path.strip_prefix(from) {
        Ok(rest) if rest.as_os_str().is_empty() => to.to_path_buf(),
        Ok(rest) => to.join(rest),
        Err(_) => path.to_path_buf(),
    }
}

/// What one chunk is of: a process's log (`stdout`, `stderr`) or one of its outputs, named
/// relative to the process's log directory.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileKey {
    pub key: AttemptKey,
    pub process: u32,
    pub name: String,
}

/// A transfer the worker has under way.
#[derive(Debug)]
struct Transfer {
    /// Bytes sent so far.
    sent: u64,
    /// Bytes in the file as last seen.
    size: u64,
    growth: Growth,
    /// The last chunk went out.
    finished: bool,
}

/// Whether a file may still grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Growth {
    /// A log of a running process.
    Growing,
    /// Its process ended: the size read next is final.
    Ending,
    /// An output, or a log whose final size is known.
    Fixed,
}

/// The next piece of a file to read and send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkPlan {
    pub file: FileKey,
    pub offset: u64,
    pub len: u64,
    /// Nothing follows: rank 0 completes the file with this chunk.
    pub last: bool,
}

/// A worker's transfers and its credit with rank 0.
#[derive(Debug)]
pub struct Outbox {
    transfers: BTreeMap<FileKey, Transfer>,
    credits: u32,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox { transfers: BTreeMap::new(), credits: WINDOW }
    }
}

impl Outbox {
    /// A file to send: a log that may still grow, or an output of known size.
    pub fn add(&mut self, file: FileKey, size: u64, sealed: bool) {
        let growth = if sealed { Growth::Fixed } else { Growth::Growing };
        self.transfers.insert(file, Transfer { sent: 0, size, growth, finished: false });
    }

    /// The file has this many bytes now.
    pub fn grew(&mut self, file: &FileKey, size: u64) {
        if let Some(t) = self.transfers.get_mut(file) {
            t.size = t.size.max(size);
            if t.growth == Growth::Ending {
                t.growth = Growth::Fixed;
            }
        }
    }

    /// The files whose size the shell should look at: logs that may still grow, and those
    /// whose final size is still to be read.
    pub fn growing(&self) -> impl Iterator<Item = &FileKey> {
        self.transfers.iter().filter(|(_, t)| t.growth != Growth::Fixed).map(|(f, _)| f)
    }

    /// The process ended (and its logs were closed): its logs are complete once their size
    /// is read again.
    pub fn seal(&mut self, key: AttemptKey, process: u32) {
        for (_, t) in self.transfers.iter_mut().filter(|(f, _)| f.key == key && f.process == process) {
            if t.growth == Growth::Growing {
                t.growth = Growth::Ending;
            }
        }
    }

    /// Rank 0 wrote this many chunks.
    pub fn acknowledged(&mut self, chunks: u32) {
        self.credits = self.credits.saturating_add(chunks).min(WINDOW);
    }

    /// The chunks to send now, as many as the credit allows; each file's in order.
    pub fn next_chunks(&mut self) -> Vec<ChunkPlan> {
        let mut plans = Vec::new();
        for (file, t) in &mut self.transfers {
            while !t.finished {
                let len = (t.size - t.sent).min(CHUNK);
                let last = t.growth == Growth::Fixed && t.sent + len == t.size;
                // An empty last chunk carries no bytes: it needs no credit, and is not
                // acknowledged (thousands of short tasks with empty logs would otherwise wait
                // for round trips).
                if (len == 0 && !last) || (len > 0 && self.credits == 0) {
                    break;
                }
                plans.push(ChunkPlan { file: file.clone(), offset: t.sent, len, last });
                t.sent += len;
                t.finished = last;
                if len > 0 {
                    self.credits -= 1;
                }
            }
        }
        plans
    }

    /// The chunk could not be read as planned (the file shrank, vanished or became
    /// unreadable): the file ends here, whether it was a growing log or not, and the credit of
    /// the chunks planned for it that will not go out (`unsent`) comes back.
    pub fn cut(&mut self, file: &FileKey, at: u64, unsent: u32) {
        if let Some(t) = self.transfers.get_mut(file) {
            t.size = at;
            t.sent = at;
            t.growth = Growth::Fixed;
            t.finished = true;
        }
        self.credits = self.credits.saturating_add(unsent).min(WINDOW);
    }

    /// Whether every file of this process has gone out; its files are forgotten then.
    pub fn complete(&mut self, key: AttemptKey, process: u32) -> bool {
        let of = |f: &FileKey| f.key == key && f.process == process;
        if self.transfers.iter().any(|(f, t)| of(f) && !t.finished) {
            return false;
        }
        self.transfers.retain(|f, _| !of(f));
        true
    }
}

/// The outputs each task last returned (journal events, this run's and earlier runs'): what
/// a new attempt of the task gets back in its node-local directory before it starts.
#[derive(Debug, Default)]
pub struct Checkpoints {
    latest: BTreeMap<String, (u32, Vec<String>)>,
}

impl Checkpoints {
    pub fn note(&mut self, event: &Event) {
        let Event::OutputReturned { task, attempt, path, .. } = event else { return };
        let Some(within) = path.strip_prefix(OUTPUTS_DIR).and_then(|p| p.strip_prefix('/')) else { return };
        match self.latest.get_mut(task) {
            Some((last, paths)) if *last == *attempt => paths.push(within.to_string()),
            Some((last, _)) if *last > *attempt => {}
            _ => {
                self.latest.insert(task.clone(), (*attempt, vec![within.to_string()]));
            }
        }
    }

    /// The attempt whose outputs to restore for `task`, and their paths within the task's
    /// directory.
    pub fn latest(&self, task: &str) -> Option<(u32, &[String])> {
        self.latest.get(task).map(|(attempt, paths)| (*attempt, paths.as_slice()))
    }
}

/// Why rank 0 refuses a chunk.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0:?} is not a plain relative path")]
    Path(String),
    #[error("{name}: a chunk at byte {offset}, expected {expected}")]
    OutOfOrder { name: String, offset: u64, expected: u64 },
    #[error("{name}: the attempt's outputs would pass output_limit ({limit} bytes)")]
    Limit { name: String, limit: u64 },
}

/// Rank 0's account of the files under way: where each is, which rank sends it, what each
/// attempt's outputs add up to, and which outputs a worker announced and has not finished.
#[derive(Debug, Default)]
pub struct Inbox {
    /// Files under way, by the rank sending them, with the bytes received so far.
    under_way: BTreeMap<FileKey, (u32, u64)>,
    outputs: BTreeMap<AttemptKey, u64>,
    /// Files whose further chunks are ignored: refused, or rank 0 could not write them.
    dropped: BTreeSet<FileKey>,
    /// Ranks given up: what they still send is ignored.
    lost: BTreeSet<u32>,
}

/// What to do with a chunk rank 0 accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum Accepted {
    /// Write it, at this path beneath the process's log directory.
    Write(PathBuf),
    /// Nothing: its file was dropped, or its rank was given up.
    Ignore,
}

impl Inbox {
    /// Some file is under way: its sender waits for credit, so rank 0 must stay quick.
    pub fn receiving(&self) -> bool {
        !self.under_way.is_empty()
    }

    /// A worker's list of the outputs of a process it is about to send: until each is
    /// complete, losing the rank loses it.
    pub fn expect(&mut self, rank: u32, files: impl IntoIterator<Item = FileKey>) {
        if self.lost.contains(&rank) {
            return;
        }
        for file in files {
            self.under_way.entry(file).or_insert((rank, 0));
        }
    }

    /// Checks a chunk and counts it.
    pub fn accept(
        &mut self,
        rank: u32,
        file: &FileKey,
        offset: u64,
        len: u64,
        limit: Option<u64>,
    ) -> Result<Accepted, Refused> {
        if self.lost.contains(&rank) || self.dropped.contains(file) {
            return Ok(Accepted::Ignore);
        }
        let names = layout::plain_names(Path::new(&file.name)).ok_or_else(|| Refused::Path(file.name.clone()))?;
        let expected = self.under_way.get(file).map_or(0, |&(_, received)| received);
        if offset != expected {
            return Err(Refused::OutOfOrder { name: file.name.clone(), offset, expected });
        }
        if names.first() == Some(&OUTPUTS_DIR) {
            let total = self.outputs.entry(file.key).or_default();
            if let Some(limit) = limit
                && total.saturating_add(len) > limit
            {
                return Err(Refused::Limit { name: file.name.clone(), limit });
            }
            *total += len;
        }
        self.under_way.insert(file.clone(), (rank, offset + len));
        Ok(Accepted::Write(names.iter().collect()))
    }

    /// The file is complete: forget it.
    pub fn finish(&mut self, file: &FileKey) {
        self.under_way.remove(file);
        self.dropped.remove(file);
    }

    /// The file was refused or could not be written: the rest of its chunks are ignored, until
    /// its last.
    pub fn drop_file(&mut self, file: &FileKey, last: bool) {
        self.under_way.remove(file);
        if last {
            self.dropped.remove(file);
        } else {
            self.dropped.insert(file.clone());
        }
    }

    /// The rank was given up: the outputs it had announced or begun and not finished, with the
    /// bytes of each that came. Its logs are left as far as they came; nothing it sends from
    /// now on counts.
    /// Whether `rank` was given up: what it says now is ignored.
    pub fn is_lost(&self, rank: u32) -> bool {
        self.lost.contains(&rank)
    }

    pub fn lost(&mut self, rank: u32) -> Vec<(FileKey, u64)> {
        self.lost.insert(rank);
        let (gone, kept) = std::mem::take(&mut self.under_way).into_iter().partition(|(_, (r, _))| *r == rank);
        self.under_way = kept;
        gone.into_iter()
            .filter(|(file, _)| file.name.starts_with(&format!("{OUTPUTS_DIR}/")))
            .map(|(file, (_, received))| (file, received))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> FileKey {
        FileKey { key: AttemptKey { task: 1, attempt: 0 }, process: 0, name: name.into() }
    }

    #[test]
    fn outputs_are_told_from_logs_by_path_component() {
        assert!(is_output("outputs/model.pt"));
        assert!(!is_output("outputsX") && !is_output("stdout") && !is_output("outputs.txt"));
    }

    #[test]
    fn auto_asks_the_marker_and_fixed_modes_do_not() {
        assert_eq!(OutputMode::Auto.resolve(|| true), OutputMode::Shared);
        assert_eq!(OutputMode::Auto.resolve(|| false), OutputMode::Returned);
        assert_eq!(OutputMode::Returned.resolve(|| unreachable!()), OutputMode::Returned);
        assert_eq!(OutputMode::Shared.resolve(|| unreachable!()), OutputMode::Shared);
    }

    #[test]
    fn patterns_stay_inside_the_task_directory() {
        for good in ["model.pt", "metrics/*.json", "ckpt/step-??.pt"] {
            assert_eq!(check_pattern(good), Ok(()), "{good}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../b", "..", ".", "./x"] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wildcards_match_within_one_component() {
        assert!(matches("metrics/*.json", "metrics/a.json"));
        assert!(matches("*.pt", "model.pt"));
        assert!(matches("step-?", "step-1"));
        assert!(!matches("*.json", "metrics/a.json"), "a star does not cross a slash");
        assert!(!matches("metrics/*.json", "metrics/a.txt"));
        assert!(!matches("model.pt", "model.pt.tmp"));
        assert!(matches("*", "x") && !matches("?", ""));
    }

    #[test]
    fn outputs_past_the_limit_are_refused_in_path_order() {
        let files = vec![("b".to_string(), 60), ("a".to_string(), 50), ("c".to_string(), 40)];
        let (kept, refused) = select_outputs(files.clone(), Some(100));
        assert_eq!(kept, vec![("a".to_string(), 50), ("c".to_string(), 40)]);
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].0, "b");
        assert!(refused[0].1.contains("output_limit (100 bytes)"), "{}", refused[0].1);
        assert_eq!(select_outputs(files, None).0.len(), 3);
    }

    #[test]
    fn paths_under_the_output_directory_move_to_the_local_one() {
        let (from, to) = (Path::new("/shared/run"), Path::new("/tmp/local"));
        assert_eq!(rebase(Path::new("/shared/run/tasks/t"), from, to), Path::new("/tmp/local/tasks/t"));
        assert_eq!(rebase(from, from, to), to);
        assert_eq!(rebase(Path::new("/shared/runs"), from, to), Path::new("/shared/runs"));
        assert_eq!(rebase(Path::new("/home/x"), from, to), Path::new("/home/x"));
    }

    #[test]
    fn a_growing_log_cut_short_is_finished_and_its_unsent_chunks_give_their_credit_back() {
        let mut outbox = Outbox::default();
        let log = file("stdout");
        outbox.add(log.clone(), 0, false);
        outbox.grew(&log, 10 * CHUNK);
        let plans = outbox.next_chunks();
        assert_eq!(plans.len(), WINDOW as usize);
        assert!(outbox.next_chunks().is_empty(), "no credit left");
        // The first chunk read nothing (the task truncated its log): none of the 8 goes out.
        outbox.cut(&log, 0, WINDOW);
        assert!(outbox.complete(log.key, 0), "the log is finished: the process's end can go");
        let other = file("outputs/model.pt");
        outbox.add(other.clone(), CHUNK, true);
        assert_eq!(outbox.next_chunks().len(), 1, "the credit came back");
    }

    #[test]
    fn chunks_are_bounded_and_wait_for_credit() {
        let mut outbox = Outbox::default();
        let log = file("stdout");
        outbox.add(log.clone(), 0, false);
        assert!(outbox.next_chunks().is_empty(), "nothing written yet, nothing sent");
        outbox.grew(&log, 20 * CHUNK + 5);
        let first = outbox.next_chunks();
        assert_eq!(first.len(), WINDOW as usize, "no more than the window");
        assert!(first.iter().all(|c| c.len == CHUNK && !c.last));
        assert_eq!(first[1].offset, CHUNK);
        assert!(outbox.next_chunks().is_empty(), "no credit left");
        outbox.acknowledged(100);
        assert_eq!(outbox.next_chunks().len(), WINDOW as usize, "credit never exceeds the window");
        outbox.acknowledged(WINDOW);
        outbox.seal(log.key, 0);
        assert!(!outbox.complete(log.key, 0));
        let tail = outbox.next_chunks();
        assert_eq!(tail.len(), 5, "4 full chunks and the 5-byte tail");
        assert!(tail.iter().all(|c| !c.last), "the file may still have grown before it was closed");
        assert!(outbox.next_chunks().is_empty(), "nothing more until the final size is read");
        assert_eq!(outbox.growing().count(), 1, "the shell reads the final size");
        outbox.grew(&log, 20 * CHUNK + 9);
        let rest = outbox.next_chunks();
        assert_eq!(
            rest.iter().map(|c| (c.len, c.last)).collect::<Vec<_>>(),
            [(4, true)],
            "what came last, and the end"
        );
        assert!(outbox.complete(log.key, 0));
        assert!(outbox.growing().next().is_none(), "a complete process's files are forgotten");
    }

    #[test]
    fn the_latest_attempt_that_returned_outputs_is_restored() {
        let returned = |attempt: u32, path: &str| Event::OutputReturned {
            task: "t".into(),
            attempt,
            path: path.into(),
            bytes: 1,
            blake3: String::new(),
        };
        let mut checkpoints = Checkpoints::default();
        assert_eq!(checkpoints.latest("t"), None);
        for event in [
            returned(0, "outputs/a"),
            returned(1, "outputs/ckpt/b"),
            returned(1, "outputs/c"),
            returned(0, "outputs/d"),
        ] {
            checkpoints.note(&event);
        }
        let paths = vec!["ckpt/b".to_string(), "c".to_string()];
        assert_eq!(checkpoints.latest("t"), Some((1, paths.as_slice())), "attempt 1's set, not attempt 0's");
        assert_eq!(checkpoints.latest("other"), None);
    }

    #[test]
    fn an_empty_file_still_ends_with_a_chunk() {
        let mut outbox = Outbox::default();
        outbox.add(file("stderr"), 0, true);
        let mut full = file("stdout");
        full.key.task = 2;
        outbox.add(full, WINDOW as u64 * CHUNK, true);
        assert_eq!(outbox.next_chunks().len(), WINDOW as usize + 1, "the empty one needs no credit");
        outbox.add(file("other"), 0, true);
        let chunks = outbox.next_chunks();
        assert_eq!(chunks, vec![ChunkPlan { file: file("other"), offset: 0, len: 0, last: true }], "nor here");
    }

    #[test]
    fn rank_0_refuses_escaping_names_gaps_and_outputs_past_the_limit() {
        let mut inbox = Inbox::default();
        let write = |path: &str| Ok(Accepted::Write(PathBuf::from(path)));
        assert_eq!(inbox.accept(1, &file("stdout"), 0, 10, Some(5)), write("stdout"), "logs are not counted");
        assert!(matches!(inbox.accept(1, &file("stdout"), 20, 1, None), Err(Refused::OutOfOrder { expected: 10, .. })));
        for bad in ["../x", "/etc/x", "outputs/../../x", ""] {
            assert_eq!(inbox.accept(1, &file(bad), 0, 1, None), Err(Refused::Path(bad.into())), "{bad}");
        }
        assert!(inbox.accept(1, &file("outputs/a"), 0, 60, Some(100)).is_ok());
        assert!(matches!(inbox.accept(1, &file("outputs/b"), 0, 50, Some(100)), Err(Refused::Limit { .. })));
        inbox.finish(&file("stdout"));
        assert_eq!(inbox.accept(1, &file("stdout"), 0, 1, None), write("stdout"), "a finished file is forgotten");
    }

    #[test]
    fn a_dropped_file_is_ignored_until_its_last_chunk() {
        let mut inbox = Inbox::default();
        let big = file("outputs/big");
        assert!(inbox.accept(1, &big, 0, 10, None).is_ok());
        inbox.drop_file(&big, false);
        assert_eq!(inbox.accept(1, &big, 10, 10, None), Ok(Accepted::Ignore), "no error for every chunk that follows");
        inbox.drop_file(&big, true);
        assert_eq!(inbox.accept(1, &big, 0, 1, None), Ok(Accepted::Write("outputs/big".into())), "a new transfer");
    }

    #[test]
    fn a_lost_rank_loses_the_outputs_it_announced_or_began_and_nothing_already_complete() {
        let mut inbox = Inbox::default();
        let (done, half, announced, log) =
            (file("outputs/done"), file("outputs/half"), file("outputs/later"), file("stdout"));
        let mut elsewhere = file("outputs/elsewhere");
        elsewhere.key.task = 9;
        inbox.expect(1, [done.clone(), half.clone(), announced.clone()]);
        inbox.expect(2, [elsewhere.clone()]);
        assert!(inbox.accept(1, &log, 0, 5, None).is_ok());
        assert!(inbox.accept(1, &done, 0, 4, None).is_ok());
        inbox.finish(&done);
        assert!(inbox.accept(1, &half, 0, 7, None).is_ok());
        let mut lost = inbox.lost(1);
        lost.sort();
        assert_eq!(lost, vec![(half.clone(), 7), (announced, 0)], "outputs only: the log stays as far as it came");
        assert_eq!(inbox.accept(1, &half, 7, 1, None), Ok(Accepted::Ignore), "a lost rank's late chunks");
        inbox.expect(1, [file("outputs/x")]);
        assert!(inbox.lost(1).is_empty(), "nothing more is expected of it");
        assert_eq!(inbox.lost(3), vec![]);
        assert_eq!(inbox.lost(2), vec![(elsewhere, 0)]);
    }
}
