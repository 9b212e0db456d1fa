//! Watching and steering a run from another shell, with files only: `status`, `cancel`,
//! `logs`, `report`. Nothing here talks to the ranks; everything goes through the output
//! directory (journal, view snapshot, cancel requests, logs), so a login node that cannot
//! reach the compute nodes works as well as the node running rank 0.

pub mod cancel;
pub mod logs;
pub mod report;
pub mod status;

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use dlaunch_core::events::Event;
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

/// The last `lines` lines of a file (reading at most its last 16 KiB).
pub fn tail_lines(path: &Path, lines: usize) -> Option<Vec<String>> {
    const WINDOW: u64 = 16 * 1024;
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(WINDOW))).ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    Some(all[all.len().saturating_sub(lines)..].iter().map(|l| l.to_string()).collect())
}

/// Where the stderr of process `process` of an attempt of a `processes`-process task is.
pub fn stderr_path(output_dir: &Path, task: &str, attempt: u32, process: u32, processes: u32) -> PathBuf {
    layout::log_dir(output_dir, task, attempt, process, processes).join("stderr")
}
