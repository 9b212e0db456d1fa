//! The output directory on rank 0: created owner-only (or group-readable with `share =
//! "group"`), refused when others could write to it, set aside with `--fresh`, and holding the
//! journal a resumed run starts from. It is never taken over silently: not while another
//! dlaunch runs in it, not when its journal is gone, not by another job.

use std::collections::BTreeMap;
use std::fs::{DirBuilder, Permissions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::journal::{self, Journal, JournalError};
use dlaunch_core::events::{Event, JobIdentity, last_job};
use dlaunch_core::layout;
use dlaunch_core::spec::Job;
use dlaunch_core::summary::Summary;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot create the output directory {path}: {source}")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("cannot move the old output directory {path} aside to {aside}: {source}")]
    SetAside { path: PathBuf, aside: PathBuf, source: std::io::Error },
    #[error(
        "--fresh: another dlaunch is running with {path} (its journal is locked); its results were left where they are: wait for it to end or stop it first"
    )]
    Live { path: PathBuf },
    #[error(
        "the output directory {path} {why}; dlaunch keeps results only where nobody else can change them (as OpenSSH refuses a group-writable ~/.ssh): {fix}"
    )]
    Unsafe { path: PathBuf, why: String, fix: String },
    #[error(
        "{path} is a symbolic link or not a directory: dlaunch does not follow links in the output directory; remove it (or move it away) and run again"
    )]
    Link { path: PathBuf },
    #[error(
        "{path} holds task results ({found}) but no journal ({journal} is missing or empty): dlaunch cannot tell what ran, nor for which job, and would write over them; run with --fresh to move them aside and start over, or set another output_dir"
    )]
    NoJournal { path: PathBuf, found: String, journal: PathBuf },
    #[error(
        "{path} holds the results of job \"{}\" ({}), and this is job \"{}\" ({}); set another output_dir, run with --fresh to move those results aside, or with --adopt to continue them as this job's",
        theirs.name, theirs.file, ours.name, ours.file
    )]
    OtherJob { path: PathBuf, theirs: Box<JobIdentity>, ours: Box<JobIdentity> },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// What earlier runs left in the output directory, and the journal to continue.
pub struct Output {
    pub journal: Journal,
    pub history: Vec<Event>,
    /// For each task with attempt directories on disk: the number after the highest.
    pub attempts_on_disk: BTreeMap<String, u32>,
}

/// The job as the journal records it: its name, its job file (links resolved, so that two
/// paths to one file are one job) and a digest of the file's bytes.
pub fn identity(job: &Job) -> Result<JobIdentity, OutputError> {
    let read_error = |source| OutputError::Read { path: job.file.clone(), source };
    let file = std::fs::canonicalize(&job.file).map_err(read_error)?;
    let bytes = std::fs::read(&file).map_err(read_error)?;
    Ok(JobIdentity {
        name: job.name.clone(),
        file: file.to_string_lossy().into_owned(),
        digest: blake3::hash(&bytes).to_hex().to_string(),
    })
}

/// Prepares the job's output directory and opens its journal. With `fresh`, an existing
/// directory is renamed to `<dir>.<timestamp>` first (results are never deleted); with
/// `adopt`, another job's results are continued as this job's.
pub fn prepare(job: &Job, identity: &JobIdentity, fresh: bool, adopt: bool) -> Result<Output, OutputError> {
    let dir = job.output_dir.as_path();
    if fresh && dir.exists() {
        let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string().replace(':', "");
        let aside = set_aside(dir, &stamp)?;
        log::info!("--fresh: moved the previous results to {}", aside.display());
    }
    let mode = job.share.dir_mode();
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|source| OutputError::Create { path: dir.to_path_buf(), source })?;
    check_ownership(dir, mode)?;
    let tasks = layout::tasks(dir);
    if std::fs::symlink_metadata(&tasks).is_ok_and(|m| !m.is_dir()) {
        return Err(OutputError::Link { path: tasks });
    }
    let journal_path = layout::journal(dir);
    let (journal, history) = Journal::open(&journal_path, job.share.file_mode())?;
    if history.is_empty() {
        let found = results_found(dir);
        if !found.is_empty() {
            return Err(OutputError::NoJournal {
                path: dir.to_path_buf(),
                found: found.join(", "),
                journal: journal_path,
            });
        }
    }
    if let Some(theirs) = last_job(&history)
        && !theirs.same_job(identity)
    {
        if !adopt {
            return Err(OutputError::OtherJob {
                path: dir.to_path_buf(),
                theirs: Box::new(theirs.clone()),
                ours: Box::new(identity.clone()),
            });
        }
        log::info!("--adopt: continuing the results of job \"{}\" ({}) as this job's", theirs.name, theirs.file);
    }
    let attempts_on_disk = attempts_on_disk(&tasks)?;
    // `dlaunch cancel` leaves requests only while a run holds the journal: any left now were
    // meant for a run that ended before taking them, not for this one.
    let stale = crate::observe::cancel::take_requests(dir);
    if !stale.is_empty() {
        log::warn!("ignoring {} cancel request(s) left by an earlier run", stale.len());
    }
    Ok(Output { journal, history, attempts_on_disk })
}

/// Renames `dir` to `<dir>.<stamp>`, or `<dir>.<stamp>.<n>` when that is taken (two `--fresh`
/// within a second). A dlaunch running in `dir` holds its journal's lock; so does this, while
/// it moves the directory, so no run starts there meanwhile.
fn set_aside(dir: &Path, stamp: &str) -> Result<PathBuf, OutputError> {
    let _lock = journal::lock_existing(&layout::journal(dir)).map_err(|e| match e {
        JournalError::Locked { .. } => OutputError::Live { path: dir.to_path_buf() },
        other => OutputError::Journal(other),
    })?;
    const TRIES: u32 = 1000;
    let mut last_error = None;
    for n in 0..TRIES {
        let mut aside = dir.as_os_str().to_owned();
        aside.push(if n == 0 { format!(".{stamp}") } else { format!(".{stamp}.{n}") });
        let aside = PathBuf::from(aside);
        if std::fs::symlink_metadata(&aside).is_ok() {
            continue;
        }
        // Another `--fresh` may have taken the name since: then rename finds a non-empty
        // directory there and fails, and the next name is tried.
        match std::fs::rename(dir, &aside) {
            Ok(()) => return Ok(aside),
            Err(e) if matches!(e.kind(), ErrorKind::DirectoryNotEmpty | ErrorKind::AlreadyExists) => {
                last_error = Some(e)
            }
            Err(source) => return Err(OutputError::SetAside { path: dir.to_path_buf(), aside, source }),
        }
    }
    let source = last_error.unwrap_or_else(|| std::io::Error::other(format!("{TRIES} names taken")));
    Err(OutputError::SetAside {
        path: dir.to_path_buf(),
        aside: PathBuf::from(format!("{}.{stamp}.*", dir.display())),
        source,
    })
}

/// Refuses a directory of another user or one that others can write to (there, anyone could
/// swap the journal or plant links); gives it the job's mode otherwise.
fn check_ownership(dir: &Path, mode: u32) -> Result<(), OutputError> {
    let meta = std::fs::metadata(dir).map_err(|source| OutputError::Create { path: dir.to_path_buf(), source })?;
    let unsafe_because = |why: String, fix: String| OutputError::Unsafe { path: dir.to_path_buf(), why, fix };
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(unsafe_because(
            format!("belongs to user {}, not to you (user {me})", meta.uid()),
            "set an output_dir of your own".into(),
        ));
    }
    let bits = meta.mode() & 0o777;
    if bits & 0o022 != 0 {
        let who = if bits & 0o020 != 0 { "its group" } else { "every user" };
        return Err(unsafe_because(
            format!("can be written by {who} (mode {bits:o})"),
            format!("run `chmod go-w {}`", dlaunch_core::plan::shell_quote(&dir.to_string_lossy())),
        ));
    }
    if bits != mode {
        std::fs::set_permissions(dir, Permissions::from_mode(mode))
            .map_err(|source| OutputError::Create { path: dir.to_path_buf(), source })?;
    }
    Ok(())
}

/// What in `dir` only a run can have written (besides the journal).
fn results_found(dir: &Path) -> Vec<&'static str> {
    let mut found = Vec::new();
    if std::fs::read_dir(layout::tasks(dir)).is_ok_and(|mut entries| entries.next().is_some()) {
        found.push("tasks/");
    }
    if std::fs::symlink_metadata(layout::summary(dir)).is_ok() {
        found.push("summary.json");
    }
    found
}

/// For each task directory: the number after its highest attempt directory. Links are not
/// followed (a task's own directory is the task's to write in).
fn attempts_on_disk(tasks: &Path) -> Result<BTreeMap<String, u32>, OutputError> {
    let scan_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| OutputError::Read { path, source }
    };
    let mut next = BTreeMap::new();
    let entries = match std::fs::read_dir(tasks) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(next),
        Err(e) => return Err(scan_error(tasks)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(scan_error(tasks))?;
        if !entry.file_type().map_err(scan_error(&entry.path()))?.is_dir() {
            continue;
        }
        let highest = std::fs::read_dir(entry.path())
            .map_err(scan_error(&entry.path()))?
            .filter_map(|e| layout::attempt_of(&e.ok()?.file_name().to_string_lossy()))
            .max();
        if let Some(highest) = highest {
            next.insert(entry.file_name().to_string_lossy().into_owned(), highest.saturating_add(1));
        }
    }
    Ok(next)
}

/// Writes `summary.json` (with `mode`) through a new temporary file renamed over it: a reader
/// never sees half of it, and neither name is ever written through a link.
pub fn write_summary(summary: &Summary, output_dir: &Path, mode: u32) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = layout::summary(output_dir);
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(summary).map_err(std::io::Error::other)?;
    // Left by a dlaunch killed while writing; removing a link removes the link only.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
    file.write_all(&text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_set_aside_in_the_same_second_gets_its_own_name() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("out");
        let mut asides = Vec::new();
        for round in 0..3 {
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("summary.json"), round.to_string()).unwrap();
            asides.push(set_aside(&dir, "2026-01-01T000000Z").unwrap());
        }
        let names: Vec<String> = asides.iter().map(|a| a.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["out.2026-01-01T000000Z", "out.2026-01-01T000000Z.1", "out.2026-01-01T000000Z.2"]);
        for (round, aside) in asides.iter().enumerate() {
            assert_eq!(std::fs::read_to_string(aside.join("summary.json")).unwrap(), round.to_string());
        }
    }

    #[test]
    fn attempts_on_disk_are_counted_without_following_links() {
        let out = tempfile::tempdir().unwrap();
        let tasks = out.path().join("tasks");
        for dir in ["a/attempt-0", "a/attempt-4/rank-1", "b/attempt-x", "c"] {
            std::fs::create_dir_all(tasks.join(dir)).unwrap();
        }
        let elsewhere = tempfile::tempdir().unwrap();
        std::fs::create_dir(elsewhere.path().join("attempt-7")).unwrap();
        std::os::unix::fs::symlink(elsewhere.path(), tasks.join("d")).unwrap();
        let next = attempts_on_disk(&tasks).unwrap();
        assert_eq!(next.into_iter().collect::<Vec<_>>(), [("a".to_string(), 5)]);
    }
}
