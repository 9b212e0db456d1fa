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
//! ```

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

/// The attempt number of an attempt directory's name (`attempt-3` → 3).
pub fn attempt_of(dir_name: &str) -> Option<u32> {
    let digits = dir_name.strip_prefix("attempt-")?;
    if digits.starts_with('+') { None } else { digits.parse().ok() }
}

/// The directory holding stdout and stderr of process `process` of a `processes`-process task.
pub fn log_dir(output_dir: &Path, task_id: &str, attempt: u32, process: u32, processes: u32) -> PathBuf {
    let attempt_dir = task_dir(output_dir, task_id).join(format!("attempt-{attempt}"));
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
