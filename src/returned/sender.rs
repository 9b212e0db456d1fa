//! A worker's side: tasks run in the node-local directory, and their logs, then their declared
//! outputs, go to rank 0 as chunks. A process's end is reported only after its last chunk, so
//! that rank 0 has every file of an attempt by the time it counts the attempt as ended.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use dlaunch_core::events::AttemptKey;
use dlaunch_core::layout;
use dlaunch_core::returned::{self, ChunkPlan, FileKey, OUTPUTS_DIR, Outbox};
use dlaunch_core::wire::{Chunk, Report, Restore};
use nix::unistd::UnlinkatFlags;

use crate::beneath;
use dlaunch_core::worker::SpawnPlan;

const LOGS: [&str; 2] = ["stdout", "stderr"];

/// Where a process's files are on this node.
struct Process {
    log_dir: PathBuf,
    task_dir: PathBuf,
    outputs: Vec<String>,
}

/// An open file being sent, and the digest of what was read so far (outputs only: rank 0
/// checks no log's, and hashing them cost both sides a tenth of their time while logs streamed).
struct Source {
    path: PathBuf,
    file: Option<File>,
    hasher: Option<blake3::Hasher>,
}

/// A restored file being written: under `temporary` in `dir` until whole, then `name`.
struct Restoring {
    dir: OwnedFd,
    file: File,
    temporary: String,
    name: String,
}

pub struct Sender {
    local: PathBuf,
    output_limit: Option<u64>,
    outbox: Outbox,
    processes: BTreeMap<(AttemptKey, u32), Process>,
    sources: BTreeMap<FileKey, Source>,
    /// Reports of ended processes whose files are still under way.
    held: Vec<(AttemptKey, u32, Report)>,
    /// Restored files being written, by path beneath `local`.
    restoring: BTreeMap<PathBuf, Restoring>,
    /// Temporary names given so far (`.dlaunch-restoring-<n>`).
    temporaries: u64,
}

impl Sender {
    pub fn new(local: PathBuf, output_limit: Option<u64>) -> Self {
        Sender {
            local,
            output_limit,
            outbox: Outbox::default(),
            processes: BTreeMap::new(),
            sources: BTreeMap::new(),
            held: Vec::new(),
            restoring: BTreeMap::new(),
            temporaries: 0,
        }
    }

    /// Moves a process's directories (and the variables naming them) to this node's copy.
    pub fn localize(&self, plan: &mut SpawnPlan) {
        dlaunch_core::worker::rebase_plan(plan, &self.local);
    }

    /// The process started: its logs are sent from now on.
    pub fn started(&mut self, key: AttemptKey, process: u32, plan: &SpawnPlan) {
        let task_dir = plan.env.get(std::ffi::OsStr::new("DLAUNCH_TASK_DIR")).map(PathBuf::from).unwrap_or_default();
        for name in LOGS {
            let file = FileKey { key, process, name: name.into() };
            let path = plan.log_dir.join(name);
            self.sources.insert(file.clone(), Source { path, file: None, hasher: None });
            self.outbox.add(file, 0, false);
        }
        let outputs = plan.outputs.clone();
        self.processes.insert((key, process), Process { log_dir: plan.log_dir.clone(), task_dir, outputs });
    }

    /// Holds back the end of a process whose files are not all sent yet; other reports pass.
    /// In its place: the list of the outputs that will follow, if any.
    pub fn hold(&mut self, report: Report) -> Option<Report> {
        let Report::Ended(end) = &report else { return Some(report) };
        let (key, process) = (end.key, end.process);
        let Some(tracked) = self.processes.remove(&(key, process)) else { return Some(report) };
        self.outbox.seal(key, process);
        let mut refusals = Vec::new();
        let (kept, refused) = returned::select_outputs(find(&tracked.task_dir, &tracked.outputs), self.output_limit);
        let mut files = Vec::new();
        for (path, size) in kept {
            let file = FileKey { key, process, name: format!("{OUTPUTS_DIR}/{path}") };
            let source = Source { path: tracked.task_dir.join(&path), file: None, hasher: Some(blake3::Hasher::new()) };
            self.sources.insert(file.clone(), source);
            files.push(file.name.clone());
            self.outbox.add(file, size, true);
        }
        for (path, reason) in refused {
            let file = FileKey { key, process, name: format!("{OUTPUTS_DIR}/{path}") };
            refusals.push(Report::OutputRefused { file, reason });
        }
        log::debug!("{} of attempt {key:?} ended; sending what is left of {}", process, tracked.log_dir.display());
        self.held.extend(refusals.into_iter().map(|r| (key, process, r)));
        self.held.push((key, process, report));
        (!files.is_empty()).then_some(Report::Outputs { key, process, files })
    }

    /// Writes a piece of a restored file into the task's node-local directory, replacing what
    /// an earlier attempt on this node left there. Written under a temporary name and renamed
    /// when whole: a restore cut short (a full node-local disk) leaves no file, and the task
    /// starts without it as from scratch, never from a checkpoint cut at a point nobody chose.
    pub fn restore(&mut self, piece: Restore) {
        let Restore { task_id, path, offset, bytes, last } = piece;
        let relative = layout::task_dir(Path::new(""), &task_id).join(&path);
        if offset > 0 && !self.restoring.contains_key(&relative) {
            log::debug!("restore of {} for {task_id} was given up: piece at {offset} ignored", relative.display());
            return;
        }
        let written = self.restore_piece(&relative, offset, &bytes, last);
        if let Err(e) = written {
            log::warn!("cannot restore {} for {task_id}: {e}", self.local.join(&relative).display());
            if let Some(partial) = self.restoring.remove(&relative) {
                let _ = nix::unistd::unlinkat(&partial.dir, partial.temporary.as_str(), UnlinkatFlags::NoRemoveDir);
            }
        }
    }

    fn restore_piece(&mut self, relative: &Path, offset: u64, bytes: &[u8], last: bool) -> std::io::Result<()> {
        if offset == 0 {
            if let Some(stale) = self.restoring.remove(relative) {
                let _ = nix::unistd::unlinkat(&stale.dir, stale.temporary.as_str(), UnlinkatFlags::NoRemoveDir);
            }
            let parent = relative.parent().unwrap_or(Path::new(""));
            let name = relative.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            let root = beneath::open_root(&self.local)?;
            let dir = beneath::make_dirs(&root, parent, 0o700, false)?;
            match nix::unistd::unlinkat(&dir, name.as_str(), UnlinkatFlags::NoRemoveDir) {
                Ok(()) | Err(nix::errno::Errno::ENOENT) => {}
                Err(e) => return Err(e.into()),
            }
            let (temporary, file) = loop {
                self.temporaries += 1;
                let temporary = format!(".dlaunch-restoring-{}", self.temporaries);
                match beneath::create_new(&dir, &temporary, 0o600) {
                    Ok(file) => break (temporary, file),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                }
            };
            self.restoring.insert(relative.to_path_buf(), Restoring { dir, file, temporary, name });
        }
        let partial =
            self.restoring.get_mut(relative).ok_or_else(|| std::io::Error::other("its first piece is missing"))?;
        partial.file.write_all(bytes)?;
        if last {
            let partial = self.restoring.remove(relative).ok_or_else(|| std::io::Error::other("gone"))?;
            let renamed =
                nix::fcntl::renameat(&partial.dir, partial.temporary.as_str(), &partial.dir, partial.name.as_str());
            if let Err(e) = renamed {
                let _ = nix::unistd::unlinkat(&partial.dir, partial.temporary.as_str(), UnlinkatFlags::NoRemoveDir);
                return Err(e.into());
            }
        }
        Ok(())
    }

    pub fn acknowledged(&mut self, chunks: u32) {
        self.outbox.acknowledged(chunks);
    }

    /// The chunks the credit allows now, then the reports of processes that are complete.
    pub fn pump(&mut self) -> Vec<Report> {
        let growing: Vec<FileKey> = self.outbox.growing().cloned().collect();
        for file in growing {
            let Some(source) = self.sources.get(&file) else { continue };
            // A log is created on its first byte: one the task never wrote to is empty. One the
            // task removed or made unreadable ends at what was seen of it.
            let size = std::fs::metadata(&source.path).map_or(0, |m| m.len());
            self.outbox.grew(&file, size);
        }
        let plans = self.outbox.next_chunks();
        let mut reports = Vec::with_capacity(plans.len());
        let mut cut: Vec<FileKey> = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
            // Planned before its file was found cut: not sent (`Outbox::cut` gave its credit back).
            if cut.contains(&plan.file) {
                continue;
            }
            let later = plans[i + 1..].iter().filter(|p| p.file == plan.file && p.len > 0).count() as u32;
            let (report, was_cut) = self.read(plan.clone(), later);
            if was_cut {
                cut.push(plan.file.clone());
            }
            reports.push(report);
        }
        let held = std::mem::take(&mut self.held);
        for (key, process, report) in held {
            if self.outbox.complete(key, process) {
                reports.push(report);
            } else {
                self.held.push((key, process, report));
            }
        }
        reports
    }

    /// One chunk, and whether its file was cut short: a log that shrank, vanished or became
    /// unreadable ends where it could be read; an output that did is refused, never sent as if
    /// whole. `later`: the chunks planned for the same file after this one.
    fn read(&mut self, plan: ChunkPlan, later: u32) -> (Report, bool) {
        let ChunkPlan { file, offset, len, last } = plan;
        let mut bytes = vec![0u8; len as usize];
        let read = match self.sources.get_mut(&file) {
            // A log the task never wrote to was never created: nothing to open.
            Some(source) if len > 0 => read_at(&self.local, source, offset, &mut bytes),
            _ => Ok(0),
        };
        let (got, error) = match read {
            Ok(got) => (got, None),
            Err(e) => (0, Some(e)),
        };
        bytes.truncate(got);
        let cut = got < len as usize;
        let output = returned::is_output(&file.name);
        if cut {
            let why = error.map_or_else(
                || format!("it shrank to {} bytes while being sent", offset + got as u64),
                |e| format!("it could not be read ({e})"),
            );
            log::warn!("{} of attempt {:?}: {why}", file.name, file.key);
            // Rank 0 acknowledges only chunks with bytes: the credit of one without comes back here.
            let unsent = later + u32::from(output || bytes.is_empty());
            self.outbox.cut(&file, offset + got as u64, unsent);
            if output {
                self.sources.remove(&file);
                return (Report::OutputRefused { file, reason: why }, true);
            }
        }
        if let Some(hasher) = self.sources.get_mut(&file).and_then(|s| s.hasher.as_mut()) {
            hasher.update(&bytes);
        }
        let digest = if last || cut {
            self.sources
                .remove(&file)
                .map(|source| source.hasher.map_or(String::new(), |h| h.finalize().to_hex().to_string()))
        } else {
            None
        };
        (Report::Chunk(Chunk { file, offset, bytes, last: digest }), cut)
    }
}

/// Reads from `offset`; the file is opened on the first read, beneath the node-local directory
/// `local` and through no link: a task that swapped an output for a link after the search
/// (which follows none) does not get the link's target sent.
fn read_at(local: &Path, source: &mut Source, offset: u64, buffer: &mut [u8]) -> std::io::Result<usize> {
    let file = match &mut source.file {
        Some(file) => file,
        slot => {
            let relative = source.path.strip_prefix(local).map_err(std::io::Error::other)?;
            slot.insert(beneath::open_read(&beneath::open_root(local)?, relative)?)
        }
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// The regular files beneath `dir` that match a pattern, relative, with their sizes. Links are
/// not followed: a task cannot send back what lies outside its directory.
fn find(dir: &Path, patterns: &[String]) -> Vec<(String, u64)> {
    let mut found = Vec::new();
    if patterns.is_empty() {
        return found;
    }
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, relative)) = pending.pop() {
        for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
            let Ok(name) = entry.file_name().into_string() else { continue };
            let Ok(kind) = entry.file_type() else { continue };
            let child = if relative.is_empty() { name } else { format!("{relative}/{name}") };
            if kind.is_dir() {
                pending.push((entry.path(), child));
            } else if kind.is_file() && patterns.iter().any(|p| returned::matches(p, &child)) {
                found.push((child, entry.metadata().map_or(0, |m| m.len())));
            }
        }
    }
    found
}
