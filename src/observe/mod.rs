//! Watching and steering a run from another shell, with files only: `status`, `cancel`,
//! `logs`, `report`. Nothing here talks to the ranks; everything goes through the output
//! directory (journal, view snapshot, cancel requests, logs), so a login node that cannot
//! reach the compute nodes works as well as the node running rank 0.

pub mod cancel;
pub mod logs;
pub mod report;
pub mod status;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use dlaunch_core::events::Event;
use dlaunch_core::frame::{self, Next, Origin, Stream};
use dlaunch_core::layout;
use dlaunch_core::spec::{self, Job};
use dlaunch_core::view::RunView;

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Spec(#[from] spec::SpecErrors),
    #[error("{path} is neither a job file nor an output directory with a journal.jsonl")]
    NotARun { path: PathBuf },
    #[error("{path} has no task {task}{hint}")]
    NoSuchTask { path: PathBuf, task: String, hint: String },
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
}

impl ObserveError {
    pub fn io(path: &Path) -> impl FnOnce(io::Error) -> ObserveError + '_ {
        move |source| ObserveError::Io { path: path.to_path_buf(), source }
    }

    /// The exit code: 2 for what the user gave, 4 for what went wrong on the way.
    pub fn exit_code(&self) -> i32 {
        match self {
            ObserveError::Io { .. } => dlaunch_core::exit_code::INTERNAL,
            _ => dlaunch_core::exit_code::BAD_INPUT,
        }
    }
}

/// What `dlaunch status job.toml` or `dlaunch status runs/x` points at.
pub struct Target {
    pub output_dir: PathBuf,
    /// The job, when a job file was given (`--explain` needs the tasks' demands).
    pub job: Option<Job>,
}

pub fn locate(path: &Path) -> Result<Target, ObserveError> {
    if path.is_dir() {
        if !layout::journal(path).is_file() {
            return Err(ObserveError::NotARun { path: path.to_path_buf() });
        }
        return Ok(Target { output_dir: path.to_path_buf(), job: None });
    }
    if !path.is_file() {
        return Err(ObserveError::NotARun { path: path.to_path_buf() });
    }
    let job = crate::jobfile::load(path)?;
    Ok(Target { output_dir: job.output_dir.clone(), job: Some(job) })
}

/// The view as of `journal_offset`, written by rank 0 once a second when it changed.
#[derive(Deserialize)]
pub struct Snapshot {
    pub journal_offset: u64,
    pub view: RunView,
}

/// Writes the snapshot atomically (a reader sees the old one or the new one, never half).
pub fn write_snapshot(output_dir: &Path, journal_offset: u64, view: &RunView) -> io::Result<()> {
    #[derive(Serialize)]
    struct Borrowed<'a> {
        journal_offset: u64,
        view: &'a RunView,
    }
    let path = layout::view_snapshot(output_dir);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&Borrowed { journal_offset, view }).map_err(io::Error::other)?)?;
    std::fs::rename(&tmp, &path)
}

/// Journal bytes beyond the snapshot worth saving a new one for.
const SNAPSHOT_WORTH: u64 = 1 << 20;

/// How the view was obtained, for `--json` readers who care about freshness and cost.
#[derive(Clone, Debug, Serialize)]
pub struct Loaded {
    /// Journal bytes folded on top of the snapshot (all of it without one).
    pub journal_bytes_read: u64,
    pub from_snapshot: bool,
    /// A dlaunch holds the journal's lock: the run is alive.
    pub running: bool,
}

/// The run's view: the snapshot, if it matches the journal, plus the journal lines after it.
pub fn load_view(output_dir: &Path) -> Result<(RunView, Loaded), ObserveError> {
    let journal_path = layout::journal(output_dir);
    let mut file = File::open(&journal_path).map_err(ObserveError::io(&journal_path))?;
    let len = file.metadata().map_err(ObserveError::io(&journal_path))?.len();
    let snapshot = std::fs::read(layout::view_snapshot(output_dir))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Snapshot>(&bytes).ok())
        .filter(|s| s.journal_offset <= len);
    let from_snapshot = snapshot.is_some();
    let (mut view, offset) = snapshot.map_or((RunView::default(), 0), |s| (s.view, s.journal_offset));
    file.seek(SeekFrom::Start(offset)).map_err(ObserveError::io(&journal_path))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail).map_err(ObserveError::io(&journal_path))?;
    crate::journal::parse(&tail, &journal_path)?.events.iter().for_each(|e| view.apply(e));
    let running = is_locked(file);
    // No dlaunch keeps the snapshot of an ended or killed run fresh: the next reader saves
    // the fold it just did, so only the first `status` after a run reads the whole journal.
    if !running
        && tail.len() as u64 > SNAPSHOT_WORTH
        && let Err(e) = write_snapshot(output_dir, len, &view)
    {
        log::debug!("cannot save the status snapshot: {e}");
    }
    Ok((view, Loaded { journal_bytes_read: tail.len() as u64, from_snapshot, running }))
}

/// Whether a dlaunch holds the journal (it keeps an exclusive lock for the whole run).
fn is_locked(file: File) -> bool {
    Flock::lock(file, FlockArg::LockSharedNonblock).is_err()
}

/// Every event of the journal (for what needs per-task detail: explain, report, cancel).
pub fn read_events(output_dir: &Path) -> Result<Vec<Event>, ObserveError> {
    let path = layout::journal(output_dir);
    Ok(crate::journal::read(&path)?)
}

/// The last `lines` lines of a process's stderr (of at most its last 16 KiB): none when it
/// wrote nothing.
pub fn stderr_tail(
    output_dir: &Path,
    task: &str,
    attempt: u32,
    process: u32,
    processes: u32,
    lines: usize,
) -> Vec<String> {
    const WINDOW: usize = 16 * 1024;
    let origin = Origin { task: task.to_string(), attempt, process, stream: Stream::Stderr };
    let mut reader = LogReader::new(output_dir, origin, processes);
    let mut bytes = Vec::new();
    if let Err(e) = reader.read_new(&mut bytes, true) {
        log::debug!("cannot read the stderr of {task}: {e}");
    }
    let text = String::from_utf8_lossy(&bytes[bytes.len().saturating_sub(WINDOW)..]);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].iter().map(|l| l.to_string()).collect()
}

/// Where the stderr of process `process` of an attempt of a `processes`-process task is.
pub fn stderr_path(output_dir: &Path, task: &str, attempt: u32, process: u32, processes: u32) -> PathBuf {
    layout::log_dir(output_dir, task, attempt, process, processes).join("stderr")
}

/// One stream of one process, read back from wherever it went: its own file (`logs =
/// "files"`), or its records in the framed logs. A log never written (no output: nothing was
/// created) reads as empty. It keeps its place, so that `--follow` reads only what is new.
pub struct LogReader {
    origin: Origin,
    path: PathBuf,
    file: Option<File>,
    framed_dir: PathBuf,
    /// Framed logs read so far, and how far: up to the last whole record.
    framed: BTreeMap<PathBuf, u64>,
}

impl LogReader {
    pub fn new(output_dir: &Path, origin: Origin, processes: u32) -> Self {
        let name = match origin.stream {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        };
        let path = layout::log_dir(output_dir, &origin.task, origin.attempt, origin.process, processes).join(name);
        LogReader { origin, path, file: None, framed_dir: layout::framed_logs(output_dir), framed: BTreeMap::new() }
    }

    /// Appends to `out` what was written since the last call. `ended`: nothing more will be
    /// written, so a record cut short (a crash while writing) is reported and left out.
    pub fn read_new(&mut self, out: &mut Vec<u8>, ended: bool) -> Result<(), ObserveError> {
        if self.file.is_none() && self.framed.is_empty() {
            match File::open(&self.path) {
                Ok(file) => self.file = Some(file),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(ObserveError::io(&self.path)(e)),
            }
        }
        if let Some(file) = self.file.as_mut() {
            file.read_to_end(out).map_err(ObserveError::io(&self.path))?;
            return Ok(());
        }
        self.read_framed(out, ended)
    }

    fn read_framed(&mut self, out: &mut Vec<u8>, ended: bool) -> Result<(), ObserveError> {
        let entries = match std::fs::read_dir(&self.framed_dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(ObserveError::io(&self.framed_dir)(e)),
        };
        let mut paths: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_str().is_some_and(layout::is_framed_log))
            .map(|e| e.path())
            .collect();
        paths.sort();
        for path in paths {
            let read = self.framed.entry(path.clone()).or_insert(0);
            if *read == u64::MAX {
                continue;
            }
            let mut file = File::open(&path).map_err(ObserveError::io(&path))?;
            file.seek(SeekFrom::Start(*read)).map_err(ObserveError::io(&path))?;
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes).map_err(ObserveError::io(&path))?;
            let (records, stop, whole) = frame::records(&bytes);
            records.iter().filter(|r| r.is_from(&self.origin)).for_each(|r| out.extend_from_slice(r.data));
            let at = *read + whole as u64;
            *read = at;
            match stop {
                Next::Incomplete if ended => {
                    log::warn!(
                        "{}: the last record, at byte {at}, is cut short (a crash while writing?): ignored",
                        path.display()
                    );
                }
                Next::Corrupt(reason) => {
                    log::warn!("{}: byte {at}: {reason}; the rest of the file is ignored", path.display());
                    *read = u64::MAX;
                }
                _ => {}
            }
        }
        Ok(())
    }
}
