//! `dlaunch cancel`: a request file in the output directory, which rank 0 takes on its
//! once-a-second health check — it works from a login node that cannot signal compute nodes.
//! When no dlaunch runs, cancelled tasks are written to the journal directly, so the next run
//! does not start them.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{ObserveError, locate};
use dlaunch_core::events::Event;
use dlaunch_core::layout;
use dlaunch_core::ledger::{Ledger, TaskStatus};

/// One request: these tasks, or (empty) the whole run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRequest {
    pub tasks: Vec<String>,
}

/// What `cancel` did, for `--json`.
#[derive(Serialize)]
pub struct CancelOutcome {
    pub output_dir: PathBuf,
    /// "requested": the running dlaunch takes it within a second or two; "recorded": no dlaunch
    /// runs, the tasks are marked cancelled in the journal; "nothing": nothing to cancel.
    pub action: &'static str,
    pub tasks: Vec<String>,
    pub message: String,
}

pub fn cancel(target: &Path, tasks: &[String], json: bool) -> Result<i32, ObserveError> {
    let output_dir = locate(target)?.output_dir;
    let (_, loaded) = super::load_view(&output_dir)?;
    let events = if tasks.is_empty() { Vec::new() } else { super::read_events(&output_dir)? };
    let mut ledger = Ledger::default();
    events.iter().for_each(|e| ledger.apply(e));
    for task in tasks {
        if ledger.get(task).is_none() {
            return Err(ObserveError::NoSuchTask {
                path: layout::journal(&output_dir),
                task: task.clone(),
                hint: " (task ids are as in `dlaunch check` and summary.json)".into(),
            });
        }
    }
    let outcome = if loaded.running {
        request(&output_dir, &CancelRequest { tasks: tasks.to_vec() })?;
        let what = if tasks.is_empty() { "the whole run (drain, then exit 3)".into() } else { tasks.join(", ") };
        CancelOutcome {
            output_dir,
            action: "requested",
            tasks: tasks.to_vec(),
            message: format!("cancel requested for {what}; rank 0 acts on it within a few seconds"),
        }
    } else if tasks.is_empty() {
        CancelOutcome {
            output_dir,
            action: "nothing",
            tasks: vec![],
            message: "no dlaunch is running with this output directory: nothing to stop".into(),
        }
    } else {
        record(&output_dir, tasks, &ledger)?
    };
    if json {
        println!("{}", serde_json::to_string(&outcome).unwrap_or_default());
    } else {
        println!("{}", outcome.message);
    }
    Ok(0)
}

/// Writes a request file atomically (temporary name, then rename), so rank 0 never reads half.
pub fn request(output_dir: &Path, request: &CancelRequest) -> Result<PathBuf, ObserveError> {
    let dir = layout::cancel_requests(output_dir);
    std::fs::create_dir_all(&dir).map_err(ObserveError::io(&dir))?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
    let name = format!("{stamp}-{}.json", std::process::id());
    let tmp = dir.join(format!(".{name}.tmp"));
    let path = dir.join(name);
    let bytes = serde_json::to_vec(request).map_err(|e| ObserveError::Usage(e.to_string()))?;
    std::fs::write(&tmp, bytes).map_err(ObserveError::io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(ObserveError::io(&path))?;
    Ok(path)
}

/// Takes (reads and deletes) the pending requests, oldest first. Rank 0 calls it once a
/// second; with no `cancel/` directory it costs one failed `opendir`.
pub fn take_requests(output_dir: &Path) -> Vec<CancelRequest> {
    let Ok(entries) = std::fs::read_dir(layout::cancel_requests(output_dir)) else { return Vec::new() };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "json")
                && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
        })
        .collect();
    paths.sort();
    let mut requests = Vec::new();
    for path in paths {
        let parsed = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice::<CancelRequest>(&bytes).map_err(|e| e.to_string()));
        match parsed {
            Ok(request) => requests.push(request),
            Err(e) => log::warn!("{}: ignoring an unreadable cancel request: {e}", path.display()),
        }
        if let Err(e) = std::fs::remove_file(&path) {
            log::warn!("{}: cannot remove the cancel request ({e}); it may be applied again", path.display());
        }
    }
    requests
}

/// No dlaunch runs: marks the tasks cancelled in the journal (locking it like a run would).
fn record(output_dir: &Path, tasks: &[String], ledger: &Ledger) -> Result<CancelOutcome, ObserveError> {
    let path = layout::journal(output_dir);
    // The journal keeps the mode its run gave it (`share`).
    let mode = std::fs::symlink_metadata(&path)
        .map_or(0o600, |m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    let (mut journal, _) =
        crate::journal::Journal::open(&path, mode).map_err(|e| ObserveError::Usage(format!("cannot cancel: {e}")))?;
    let mut cancelled = Vec::new();
    for task in tasks {
        if matches!(ledger.get(task).map(|r| r.status), Some(TaskStatus::Succeeded | TaskStatus::Cancelled)) {
            continue;
        }
        let event = Event::TaskCancelled { task: task.clone(), time: SystemTime::now() };
        journal.append(&event).and_then(|_| journal.flush(true)).map_err(|e| ObserveError::Usage(e.to_string()))?;
        cancelled.push(task.clone());
    }
    let message = if cancelled.is_empty() {
        "no dlaunch is running, and those tasks already succeeded or were cancelled: nothing to do".into()
    } else {
        format!(
            "no dlaunch is running: recorded {} as cancelled; the next run skips them (--retry-cancelled runs them)",
            cancelled.join(", ")
        )
    };
    Ok(CancelOutcome { output_dir: output_dir.to_path_buf(), action: "recorded", tasks: cancelled, message })
}
