//! Where a run keeps its files, in one place:
//!
//! ```text
//! <output_dir>/journal.jsonl       every state change, appended
//! <output_dir>/summary.json        the final state, per task
//! <output_dir>/view.json           the run's state folded up to a journal offset (for `status`)
//! <output_dir>/cancel/             requests from `dlaunch cancel`, taken by rank 0
//! <output_dir>/report.html         written by `dlaunch report`
//! <output_dir>/tasks/<id>/         the task's own directory (DLAUNCH_TASK_DIR), kept across attempts
//! <output_dir>/tasks/<id>/attempt-<n>/stdout, stderr             single-process tasks
//! <output_dir>/tasks/<id>/attempt-<n>/rank-<k>/stdout, stderr    gangs, one directory per process
//! <output_dir>/logs/rank-<r>[.<k>].log   `logs = "framed"`: every task's output on worker rank r
//! ```
//!
//! A task's directory exists before it starts; its attempt's log directory and each log file
//! only once the process writes its first byte there (or `dlaunch wait-for` leaves a marker):
//! a task that prints nothing costs one directory, and readers take a missing log as empty.

use std::path::{Component, Path, PathBuf};

pub fn journal(output_dir: &Path) -> PathBuf {
    output_dir.join("journal.jsonl")
}

pub fn summary(output_dir: &Path) -> PathBuf {
    output_dir.join("summary.json")
}

/// The directory holding every task's directory.
pub fn tasks(output_dir: &Path) -> PathBuf {
    output_dir.join("tasks")
}

/// A snapshot of the run's view: `dlaunch status` reads it and the journal lines after it.
pub fn view_snapshot(output_dir: &Path) -> PathBuf {
    output_dir.join("view.json")
}

/// One file per `dlaunch cancel` request; rank 0 takes (deletes) them as it acts on them.
pub fn cancel_requests(output_dir: &Path) -> PathBuf {
    output_dir.join("cancel")
}

pub fn report(output_dir: &Path) -> PathBuf {
    output_dir.join("report.html")
}

pub fn task_dir(output_dir: &Path, task_id: &str) -> PathBuf {
    tasks(output_dir).join(task_id)
}

/// The directory of the framed logs (`logs = "framed"`).
pub fn framed_logs(output_dir: &Path) -> PathBuf {
    output_dir.join("logs")
}

/// The name of a framed log: `stem` (`rank-<r>`, or `returned` for what rank 0 receives) for
/// the first run that writes one, `stem.<k>` after it, so that a run never appends to a file
/// an earlier one may have left cut short.
pub fn framed_log_name(stem: &str, run: u32) -> String {
    if run == 0 { format!("{stem}.log") } else { format!("{stem}.{run}.log") }
}

/// Whether a file in the framed logs' directory is a framed log.
pub fn is_framed_log(name: &str) -> bool {
    name.ends_with(".log") && !name.starts_with('.')
}

/// The attempt number of an attempt directory's name (`attempt-3` → 3).
pub fn attempt_of(dir_name: &str) -> Option<u32> {
    let digits = dir_name.strip_prefix("attempt-")?;
    if digits.starts_with('+') { None } else { digits.parse().ok() }
}

/// The directory holding stdout and stderr of process `process` of a `processes`-process task.
pub fn log_dir(output_dir: &Path, task_id: &str, attempt: u32, process: u32, processes: u32) -> PathBuf {
    task_dir(output_dir, task_id).join(log_dir_in_task(attempt, process, processes))
}

/// [`log_dir`] relative to the task's directory (`DLAUNCH_TASK_DIR`), which is node-local in
/// returned mode.
pub fn log_dir_in_task(attempt: u32, process: u32, processes: u32) -> PathBuf {
    let attempt_dir = PathBuf::from(format!("attempt-{attempt}"));
    if processes == 1 { attempt_dir } else { attempt_dir.join(format!("rank-{process}")) }
}

/// Why a declared output pattern is refused: it could name a file outside `DLAUNCH_TASK_DIR`.
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("the pattern is empty".into());
    }
    if pattern.contains('\0') {
        return Err("the pattern contains a NUL byte".into());
    }
    match plain_names(Path::new(pattern)) {
        Some(_) => Ok(()),
        None => Err(format!(
            "{pattern:?} leaves DLAUNCH_TASK_DIR: use a relative path without `..` (like \"model.pt\" or \"metrics/*.json\")"
        )),
    }
}

/// The path as plain names only (no root, no `.`, no `..`); None otherwise.
pub fn plain_names(path: &Path) -> Option<Vec<&str>> {
    let names: Option<Vec<&str>> = path
        .components()
        .map(|c| match c {
            Component::Normal(name) => name.to_str(),
            _ => None,
        })
        .collect();
    names.filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let out = Path::new("/runs/j");
        assert_eq!(log_dir(out, "t[a=1]", 0, 0, 1), Path::new("/runs/j/tasks/t[a=1]/attempt-0"));
        assert_eq!(log_dir(out, "g", 2, 3, 4), Path::new("/runs/j/tasks/g/attempt-2/rank-3"));
        assert_eq!(journal(out), Path::new("/runs/j/journal.jsonl"));
        assert_eq!(framed_logs(out).join(framed_log_name("rank-3", 0)), Path::new("/runs/j/logs/rank-3.log"));
        assert_eq!(framed_log_name("rank-3", 2), "rank-3.2.log");
        assert!(is_framed_log(&framed_log_name("returned", 1)) && !is_framed_log(".x.log"));
    }

    #[test]
    fn attempt_numbers_are_read_back_from_directory_names() {
        let name = log_dir(Path::new("/o"), "t", 12, 0, 1);
        assert_eq!(attempt_of(&name.file_name().unwrap().to_string_lossy()), Some(12));
        for other in ["attempt-", "attempt-x", "attempt-+1", "rank-1", "attempt-99999999999"] {
            assert_eq!(attempt_of(other), None, "{other}");
        }
    }
}
