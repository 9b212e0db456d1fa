//! `dlaunch logs`: a task's stdout or stderr without knowing the directory layout.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{ObserveError, load_view, locate};
use dlaunch_core::layout;

pub struct LogsOptions {
    pub target: PathBuf,
    pub task: String,
    /// Default: the latest attempt.
    pub attempt: Option<u32>,
    /// Process (gang rank) K; default 0.
    pub rank: u32,
    pub stderr: bool,
    pub follow: bool,
}

/// How often `--follow` looks for new output, and whether the attempt ended.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);

pub fn logs(options: &LogsOptions) -> Result<i32, ObserveError> {
    let output_dir = locate(&options.target)?.output_dir;
    let task_dir = layout::task_dir(&output_dir, &options.task);
    let attempt = match options.attempt {
        Some(n) => n,
        None => latest_attempt(&task_dir).ok_or_else(|| ObserveError::NoSuchTask {
            path: output_dir.clone(),
            task: options.task.clone(),
            hint: " that has started (no attempt-N directory under tasks/)".into(),
        })?,
    };
    let attempt_dir = task_dir.join(format!("attempt-{attempt}"));
    // Gangs keep one rank-K directory per process; single tasks write in the attempt directory.
    let gang_dir = attempt_dir.join(format!("rank-{}", options.rank));
    let dir = if gang_dir.is_dir() {
        gang_dir
    } else if options.rank == 0 {
        attempt_dir
    } else {
        return Err(ObserveError::Usage(format!(
            "{} has no rank-{} directory: --rank is for gangs (processes > 1)",
            attempt_dir.display(),
            options.rank
        )));
    };
    let path = dir.join(if options.stderr { "stderr" } else { "stdout" });
    let mut file = File::open(&path).map_err(ObserveError::io(&path))?;
    let mut out = std::io::stdout().lock();
    copy(&mut file, &mut out, &path)?;
    if !options.follow {
        return Ok(0);
    }
    loop {
        let ended = !still_running(&output_dir, &options.task, attempt)?;
        std::thread::sleep(FOLLOW_EVERY);
        copy(&mut file, &mut out, &path)?;
        if ended {
            return Ok(0);
        }
    }
}

fn copy(file: &mut File, out: &mut impl Write, path: &Path) -> Result<(), ObserveError> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(ObserveError::io(path))?;
    // A closed pipe (`| head`) ends the command quietly.
    let _ = out.write_all(&bytes).and_then(|_| out.flush());
    Ok(())
}

fn still_running(output_dir: &Path, task: &str, attempt: u32) -> Result<bool, ObserveError> {
    let (view, loaded) = load_view(output_dir)?;
    Ok(loaded.running && view.running.get(task).is_some_and(|r| r.attempt == attempt))
}

fn latest_attempt(task_dir: &Path) -> Option<u32> {
    std::fs::read_dir(task_dir)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("attempt-")?.parse::<u32>().ok())
        .max()
}
