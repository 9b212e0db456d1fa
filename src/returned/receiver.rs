//! Rank 0's side: chunks are checked (`Inbox`) and written into the output directory through
//! `beneath`, never through a link. Logs are written under their own names as they come, so
//! that `dlaunch logs --follow` sees them grow; an output is written under a temporary name
//! and renamed once whole and its digest matches, so that nothing partial ever has its name.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use dlaunch_core::events::AttemptKey;
use dlaunch_core::events::Event;
use dlaunch_core::frame::{self, Origin, Stream};
use dlaunch_core::layout;
use dlaunch_core::plan::Task;
use dlaunch_core::returned::{self, Accepted, Checkpoints, FileKey, Inbox, OUTPUTS_DIR};
use dlaunch_core::spec::{Job, LogMode};
use dlaunch_core::wire::{Chunk, Launch};
use nix::unistd::UnlinkatFlags;

use crate::beneath;
use crate::proc::FramedLog;
use crate::returned::Source;

/// Whether a write failed for every file rank 0 writes (a full disk, a quota, a read-only or
/// failing filesystem, no descriptors), not only for this one.
fn rank_0_cannot_write(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    let errno = e.raw_os_error().map(Errno::from_raw);
    matches!(
        errno,
        Some(
            Errno::ENOSPC
                | Errno::EDQUOT
                | Errno::EROFS
                | Errno::EIO
                | Errno::EACCES
                | Errno::EPERM
                | Errno::EMFILE
                | Errno::ENFILE
                | Errno::ENOMEM
        )
    ) || errno.is_none()
}

/// A file being written.
struct Open {
    /// The rank sending it.
    rank: u32,
    dir: OwnedFd,
    file: File,
    /// The temporary name, and the final one (outputs only).
    names: (String, String),
    /// Outputs only (logs come without a digest).
    hasher: Option<blake3::Hasher>,
    bytes: u64,
}

pub struct Receiver {
    output_dir: PathBuf,
    dir_mode: u32,
    file_mode: u32,
    limit: Option<u64>,
    inbox: Inbox,
    open: BTreeMap<FileKey, Open>,
    /// Processes whose files rank 0 could not write, and why: their attempts end as dlaunch's
    /// failure, not the task's.
    failures: BTreeMap<(AttemptKey, u32), String>,
    /// `logs = "framed"`: logs received are appended here instead of written as files.
    framed: Option<Arc<FramedLog>>,
    /// Temporary names given so far (`.dlaunch-partial-<n>`).
    partials: u64,
}

/// What a chunk came to.
pub enum Received {
    /// Written (or ignored: its file was dropped, its rank given up); the event to record
    /// once the file is complete.
    Written(Option<Event>),
    /// Refused or unwritable, the event says why; the rest of the file is ignored.
    Failed(Event),
}

impl Receiver {
    pub fn new(job: &Job) -> Self {
        Receiver {
            output_dir: job.output_dir.clone(),
            dir_mode: job.share.dir_mode(),
            file_mode: job.share.file_mode(),
            limit: job.output_limit,
            inbox: Inbox::default(),
            open: BTreeMap::new(),
            failures: BTreeMap::new(),
            framed: (job.logs == LogMode::Framed)
                .then(|| FramedLog::new(&job.output_dir, "returned".into(), job.share)),
            partials: 0,
        }
    }

    /// Some file is under way (a file open here always is: it leaves `open` where it leaves
    /// the inbox's files under way).
    pub fn receiving(&self) -> bool {
        self.inbox.receiving()
    }

    /// The outputs `rank` announced for a process, before their chunks.
    pub fn expect(&mut self, rank: u32, key: AttemptKey, process: u32, files: Vec<String>) {
        self.inbox.expect(rank, files.into_iter().map(|name| FileKey { key, process, name }));
    }

    /// Writes a chunk of `task`'s files, sent by `rank`. Err: rank 0 cannot write (a full
    /// disk): dispatching must stop, and the process's end is dlaunch's failure
    /// (`take_failure`).
    pub fn take(&mut self, rank: u32, chunk: Chunk, task: &Task, processes: u32) -> Result<Received, String> {
        let Chunk { file, offset, bytes, last } = chunk;
        let missing = |reason: String| Event::OutputMissing {
            task: task.id.clone(),
            attempt: file.key.attempt,
            path: file.name.clone(),
            reason,
        };
        let relative = match self.inbox.accept(rank, &file, offset, bytes.len() as u64, self.limit) {
            Ok(Accepted::Write(relative)) => relative,
            Ok(Accepted::Ignore) => {
                if last.is_some() {
                    self.inbox.drop_file(&file, true);
                }
                return Ok(Received::Written(None));
            }
            Err(refused) => {
                self.abandon(&file, last.is_some());
                return Ok(Received::Failed(missing(refused.to_string())));
            }
        };
        let log_dir = layout::log_dir(&self.output_dir, &task.id, file.key.attempt, file.process, processes);
        let is_last = last.is_some();
        // Like a worker, rank 0 creates a log file only on its first byte; framed, none at all.
        let log = !returned::is_output(&file.name);
        if log && (self.framed.is_some() || (bytes.is_empty() && !self.open.contains_key(&file))) {
            if let Err(error) = self.append_framed(&file, task, &bytes) {
                return Err(self.fail(&file, is_last, error));
            }
            if is_last {
                self.inbox.finish(&file);
            }
            return Ok(Received::Written(None));
        }
        match self.write(rank, &file, &log_dir, &relative, &bytes, last) {
            Ok(Some((open, digest))) => Ok(self.complete(&file, open, digest, &log_dir, &relative, task)),
            Ok(None) => Ok(Received::Written(None)),
            Err(e) => {
                let error = format!("cannot write {}: {e}", log_dir.join(&relative).display());
                if rank_0_cannot_write(&e) {
                    return Err(self.fail(&file, is_last, error));
                }
                // This one file (a name too long, a name taken): it is missing, the run goes on.
                self.abandon(&file, is_last);
                Ok(Received::Failed(missing(error)))
            }
        }
    }

    /// Rank 0 could not write a process's file: the rest of it is ignored and the attempt
    /// ends as dlaunch's failure.
    fn fail(&mut self, file: &FileKey, is_last: bool, error: String) -> String {
        self.abandon(file, is_last);
        self.failures.entry((file.key, file.process)).or_insert_with(|| error.clone());
        error
    }

    /// `logs = "framed"`: a piece of a log, as one record of rank 0's framed log.
    fn append_framed(&self, file: &FileKey, task: &Task, bytes: &[u8]) -> Result<(), String> {
        let Some(framed) = self.framed.as_ref().filter(|_| !bytes.is_empty()) else { return Ok(()) };
        let stream = if file.name == "stderr" { Stream::Stderr } else { Stream::Stdout };
        let origin = Origin { task: task.id.clone(), attempt: file.key.attempt, process: file.process, stream };
        framed
            .append(&frame::encode(&origin, &[bytes]))
            .map_err(|e| format!("cannot write {}: {e}", framed.path().display()))
    }

    /// Writes a chunk's bytes; on the last chunk, the file and the digest the worker sent.
    fn write(
        &mut self,
        rank: u32,
        file: &FileKey,
        log_dir: &Path,
        relative: &Path,
        bytes: &[u8],
        last: Option<String>,
    ) -> std::io::Result<Option<(Open, String)>> {
        if !self.open.contains_key(file) {
            let open = self.open_file(rank, log_dir, relative)?;
            self.open.insert(file.clone(), open);
        }
        let open = self.open.get_mut(file).ok_or_else(|| std::io::Error::other("not open"))?;
        open.file.write_all(bytes)?;
        if let Some(hasher) = open.hasher.as_mut() {
            hasher.update(bytes);
        }
        open.bytes += bytes.len() as u64;
        let Some(sent_digest) = last else { return Ok(None) };
        // Before the rename: a name never stands for bytes a crash could still lose.
        if relative.starts_with(OUTPUTS_DIR) {
            open.file.sync_all()?;
        }
        self.inbox.finish(file);
        Ok(self.open.remove(file).map(|open| (open, sent_digest)))
    }

    /// A whole file came: an output gets its name if its digest matches.
    fn complete(
        &mut self,
        file: &FileKey,
        open: Open,
        sent_digest: String,
        log_dir: &Path,
        relative: &Path,
        task: &Task,
    ) -> Received {
        let Some(hasher) = open.hasher else { return Received::Written(None) };
        let digest = hasher.finalize().to_hex().to_string();
        let reason = if digest != sent_digest {
            Some(format!("its digest {digest} is not the one sent ({sent_digest})"))
        } else {
            nix::fcntl::renameat(&open.dir, open.names.0.as_str(), &open.dir, open.names.1.as_str())
                .err()
                .map(|e| format!("cannot rename it into {}: {e}", log_dir.join(relative).display()))
        };
        let attempt = file.key.attempt;
        match reason {
            Some(reason) => {
                let _ = nix::unistd::unlinkat(&open.dir, open.names.0.as_str(), UnlinkatFlags::NoRemoveDir);
                let path = file.name.clone();
                Received::Failed(Event::OutputMissing { task: task.id.clone(), attempt, path, reason })
            }
            None => Received::Written(Some(Event::OutputReturned {
                task: task.id.clone(),
                attempt,
                path: file.name.clone(),
                bytes: open.bytes,
                blake3: digest,
            })),
        }
    }

    /// Why rank 0 could not write a file of this process, once.
    pub fn take_failure(&mut self, key: AttemptKey, process: u32) -> Option<String> {
        self.failures.remove(&(key, process))
    }

    /// `rank` was given up: the outputs it had not finished sending are missing (what was
    /// received of them is removed; nothing partial keeps a name), one event each. Its logs
    /// stay as far as they came.
    pub fn lost(&mut self, rank: u32, tasks: &[Task]) -> Vec<Event> {
        let mut events = Vec::new();
        for (file, received) in self.inbox.lost(rank) {
            if let Some(task) = tasks.get(file.key.task as usize) {
                events.push(Event::OutputMissing {
                    task: task.id.clone(),
                    attempt: file.key.attempt,
                    reason: format!("rank {rank} was lost with {received} bytes of it received"),
                    path: file.name.clone(),
                });
            }
            self.remove_partial(&file);
        }
        self.open.retain(|_, open| open.rank != rank);
        events
    }

    /// What puts back, before `launch` starts, what its task's last attempt returned: each
    /// file, opened in the output directory (`Restores` sends it in pieces). A file that cannot
    /// be opened is left out (the task starts without it, as from scratch).
    pub fn restore(&self, launch: &Launch, checkpoints: &Checkpoints, tasks: &[Task], job: &Job) -> Vec<Source> {
        let Some((attempt, paths)) = checkpoints.latest(&launch.task_id) else { return Vec::new() };
        let processes =
            tasks.get(launch.key.task as usize).and_then(|t| job.templates.get(t.template)).map_or(1, |t| t.processes);
        let outputs = layout::log_dir(Path::new(""), &launch.task_id, attempt, 0, processes).join(OUTPUTS_DIR);
        let root = match beneath::open_root(&self.output_dir) {
            Ok(root) => root,
            Err(e) => {
                log::warn!("cannot restore the outputs of {}: {}: {e}", launch.task_id, self.output_dir.display());
                return Vec::new();
            }
        };
        let sources: Vec<Source> = paths
            .iter()
            .filter_map(|path| {
                let relative = outputs.join(path);
                Source::open(&launch.task_id, path, &root, &relative)
                    .inspect_err(|e| {
                        let full = self.output_dir.join(&relative);
                        log::warn!("cannot restore {} for {}: {e}", full.display(), launch.task_id)
                    })
                    .ok()
            })
            .collect();
        if !sources.is_empty() {
            log::info!("restoring {} output(s) of attempt {attempt} for {}", sources.len(), launch.task_id);
        }
        sources
    }

    /// Worker `rank` will not send the rest of `file` (it could not read it to its end): what
    /// came of it goes. False when the rank was given up: its word no longer counts (what it
    /// had under way is missing already).
    pub fn refused(&mut self, rank: u32, file: &FileKey) -> bool {
        if self.inbox.is_lost(rank) {
            return false;
        }
        self.abandon(file, true);
        true
    }

    fn abandon(&mut self, file: &FileKey, last: bool) {
        self.inbox.drop_file(file, last);
        self.remove_partial(file);
    }

    /// Closes a file being written, and removes it if it is an output (a temporary name).
    fn remove_partial(&mut self, file: &FileKey) {
        if let Some(open) = self.open.remove(file)
            && open.names.0 != open.names.1
        {
            let _ = nix::unistd::unlinkat(&open.dir, open.names.0.as_str(), UnlinkatFlags::NoRemoveDir);
        }
    }

    /// Creates the file's directories and the file itself: new, never through a link.
    fn open_file(&mut self, rank: u32, log_dir: &Path, relative: &Path) -> std::io::Result<Open> {
        let within = log_dir.strip_prefix(&self.output_dir).map_err(std::io::Error::other)?.join(relative);
        let parent = within.parent().unwrap_or(Path::new(""));
        let name = within.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let root = beneath::open_root(&self.output_dir)?;
        let dir = beneath::make_dirs(&root, parent, self.dir_mode, false)?;
        let output = relative.starts_with(OUTPUTS_DIR);
        if !output {
            let file = beneath::create_new(&dir, &name, self.file_mode)?;
            return Ok(Open { rank, dir, file, names: (name.clone(), name), hasher: None, bytes: 0 });
        }
        // A temporary name of its own length, whatever the output's: a name the task chose
        // near NAME_MAX still has one. The task may have named a file like it: the next one.
        loop {
            self.partials += 1;
            let temporary = format!(".dlaunch-partial-{}", self.partials);
            match beneath::create_new(&dir, &temporary, self.file_mode) {
                Ok(file) => {
                    let hasher = Some(blake3::Hasher::new());
                    return Ok(Open { rank, dir, file, names: (temporary, name), hasher, bytes: 0 });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }
}
