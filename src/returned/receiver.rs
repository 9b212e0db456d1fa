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

use crate::proc::FramedLog;
use dlaunch_core::events::Event;
use dlaunch_core::frame::{self, Origin, Stream};
use dlaunch_core::layout;
use dlaunch_core::plan::Task;
use dlaunch_core::returned::{CHUNK, Checkpoints, FileKey, Inbox, OUTPUTS_DIR};
use dlaunch_core::spec::{Job, LogMode};
use dlaunch_core::wire::{Chunk, Launch, Order, Restore};

use crate::beneath;

/// A file being written.
struct Open {
    dir: OwnedFd,
    file: File,
    /// The temporary name, and the final one (outputs only).
    names: (String, String),
    hasher: blake3::Hasher,
    bytes: u64,
}

pub struct Receiver {
    output_dir: PathBuf,
    dir_mode: u32,
    file_mode: u32,
    limit: Option<u64>,
    inbox: Inbox,
    open: BTreeMap<FileKey, Open>,
    /// `logs = "framed"`: logs received are appended here instead of written as files.
    framed: Option<Arc<FramedLog>>,
}

/// What a chunk came to.
pub enum Received {
    /// Written; the event to record once the file is complete.
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
            framed: (job.logs == LogMode::Framed)
                .then(|| FramedLog::new(&job.output_dir, "returned".into(), job.share)),
        }
    }

    /// Writes a chunk of `task`'s files. Err: rank 0 cannot write (a full disk): dispatching
    /// must stop.
    pub fn take(&mut self, chunk: Chunk, task: &Task, processes: u32) -> Result<Received, String> {
        let Chunk { file, offset, bytes, last } = chunk;
        let missing = |reason: String| Event::OutputMissing {
            task: task.id.clone(),
            attempt: file.key.attempt,
            path: file.name.clone(),
            reason,
        };
        let relative = match self.inbox.accept(&file, offset, bytes.len() as u64, self.limit) {
            Ok(relative) => relative,
            Err(refused) => {
                self.abandon(&file);
                return Ok(Received::Failed(missing(refused.to_string())));
            }
        };
        let log_dir = layout::log_dir(&self.output_dir, &task.id, file.key.attempt, file.process, processes);
        // Like a worker, rank 0 creates a log file only on its first byte; framed, none at all.
        let log = !file.name.starts_with(OUTPUTS_DIR);
        if log && (self.framed.is_some() || (bytes.is_empty() && !self.open.contains_key(&file))) {
            self.append_framed(&file, task, &bytes)?;
            if last.is_some() {
                self.inbox.finish(&file);
            }
            return Ok(Received::Written(None));
        }
        if offset == 0 {
            let open = self.open_file(&log_dir, &relative).map_err(|e| format!("{}: {e}", log_dir.display()))?;
            self.open.insert(file.clone(), open);
        }
        let Some(open) = self.open.get_mut(&file) else {
            return Ok(Received::Failed(missing("its first chunk never came".into())));
        };
        open.file.write_all(&bytes).map_err(|e| format!("cannot write {}: {e}", log_dir.join(&relative).display()))?;
        open.hasher.update(&bytes);
        open.bytes += bytes.len() as u64;
        let Some(sent_digest) = last else { return Ok(Received::Written(None)) };
        self.inbox.finish(&file);
        let Some(open) = self.open.remove(&file) else { return Ok(Received::Written(None)) };
        let digest = open.hasher.finalize().to_hex().to_string();
        if !file.name.starts_with(OUTPUTS_DIR) {
            return Ok(Received::Written(None));
        }
        if digest != sent_digest {
            let _ = nix::unistd::unlinkat(&open.dir, open.names.0.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
            return Ok(Received::Failed(missing(format!("its digest {digest} is not the one sent ({sent_digest})"))));
        }
        open.file.sync_all().map_err(|e| format!("cannot write {}: {e}", log_dir.join(&relative).display()))?;
        nix::fcntl::renameat(&open.dir, open.names.0.as_str(), &open.dir, open.names.1.as_str())
            .map_err(|e| format!("cannot rename into {}: {e}", log_dir.join(&relative).display()))?;
        Ok(Received::Written(Some(Event::OutputReturned {
            task: task.id.clone(),
            attempt: file.key.attempt,
            path: file.name,
            bytes: open.bytes,
            blake3: digest,
        })))
    }

    /// The orders that put back, before `launch` starts, what its task's last attempt returned:
    /// each file in chunks, read from the output directory. A file that cannot be read is left
    /// out (the task starts without it, as from scratch).
    pub fn restore(&self, launch: &Launch, checkpoints: &Checkpoints, tasks: &[Task], job: &Job) -> Vec<Order> {
        let Some((attempt, paths)) = checkpoints.latest(&launch.task_id) else { return Vec::new() };
        let processes =
            tasks.get(launch.key.task as usize).and_then(|t| job.templates.get(t.template)).map_or(1, |t| t.processes);
        let outputs = layout::log_dir(&self.output_dir, &launch.task_id, attempt, 0, processes).join(OUTPUTS_DIR);
        let mut orders = Vec::new();
        for path in paths {
            let bytes = match std::fs::read(outputs.join(path)) {
                Ok(bytes) => bytes,
                Err(e) => {
                    log::warn!("cannot restore {} for {}: {e}", outputs.join(path).display(), launch.task_id);
                    continue;
                }
            };
            let pieces: Vec<&[u8]> = if bytes.is_empty() { vec![&[]] } else { bytes.chunks(CHUNK as usize).collect() };
            let count = pieces.len();
            orders.extend(pieces.into_iter().enumerate().map(|(i, piece)| {
                Order::Restore(Restore {
                    task_id: launch.task_id.clone(),
                    path: path.clone(),
                    offset: (i as u64) * CHUNK,
                    bytes: piece.to_vec(),
                    last: i + 1 == count,
                })
            }));
        }
        if !orders.is_empty() {
            log::info!("restoring {} output(s) of attempt {attempt} for {}", paths.len(), launch.task_id);
        }
        orders
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

    fn abandon(&mut self, file: &FileKey) {
        self.inbox.finish(file);
        if let Some(open) = self.open.remove(file)
            && open.names.0 != open.names.1
        {
            let _ = nix::unistd::unlinkat(&open.dir, open.names.0.as_str(), nix::unistd::UnlinkatFlags::NoRemoveDir);
        }
    }

    /// Creates the file's directories and the file itself: new, never through a link.
    fn open_file(&self, log_dir: &Path, relative: &Path) -> std::io::Result<Open> {
        let within = log_dir.strip_prefix(&self.output_dir).map_err(std::io::Error::other)?.join(relative);
        let parent = within.parent().unwrap_or(Path::new(""));
        let name = within.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let root = beneath::open_root(&self.output_dir)?;
        let dir = beneath::make_dirs(&root, parent, self.dir_mode, false)?;
        let temporary =
            if relative.starts_with(OUTPUTS_DIR) { format!(".{name}.dlaunch-partial") } else { name.clone() };
        let file = beneath::create_new(&dir, &temporary, self.file_mode)?;
        Ok(Open { dir, file, names: (temporary, name), hasher: blake3::Hasher::new(), bytes: 0 })
    }
}
