//! `dlaunch logs`: a task's stdout or stderr without knowing the directory layout or the log
//! mode (files or framed).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{LogReader, ObserveError, load_view, locate, read_events};
use dlaunch_core::events::Event;
use dlaunch_core::frame::{Origin, Stream};

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
    let (attempt, processes) = attempt_of(&output_dir, &options.task, options.attempt)?;
    if options.rank >= processes {
        return Err(ObserveError::Usage(format!(
            "attempt {attempt} of {} has {processes} process(es): --rank is for gangs, 0 to {}",
            options.task,
            processes - 1
        )));
    }
    let stream = if options.stderr { Stream::Stderr } else { Stream::Stdout };
    let origin = Origin { task: options.task.clone(), attempt, process: options.rank, stream };
    let mut reader = LogReader::new(&output_dir, origin, processes);
    let mut out = std::io::stdout().lock();
    let mut ended = !options.follow || !still_running(&output_dir, &options.task, attempt)?;
    loop {
        let mut bytes = Vec::new();
        reader.read_new(&mut bytes, ended)?;
        // A closed pipe (`| head`) ends the command quietly.
        let _ = out.write_all(&bytes).and_then(|_| out.flush());
        if ended {
            return Ok(0);
        }
        std::thread::sleep(FOLLOW_EVERY);
        ended = !still_running(&output_dir, &options.task, attempt)?;
    }
}

fn still_running(output_dir: &Path, task: &str, attempt: u32) -> Result<bool, ObserveError> {
    let (view, loaded) = load_view(output_dir)?;
    Ok(loaded.running && view.running.get(task).is_some_and(|r| r.attempt == attempt))
}

/// The attempt asked for (default: the latest started) and its number of processes, from the
/// journal: a log directory exists only once a process wrote output, so it cannot tell.
fn attempt_of(output_dir: &Path, task: &str, asked: Option<u32>) -> Result<(u32, u32), ObserveError> {
    let mut started = read_events(output_dir)?.into_iter().filter_map(|event| match event {
        Event::AttemptStarted { task: t, attempt, processes, .. } if t == task => Some((attempt, processes.len())),
        _ => None,
    });
    let found = match asked {
        Some(asked) => started.rfind(|&(attempt, _)| attempt == asked),
        None => started.max_by_key(|&(attempt, _)| attempt),
    };
    found.map(|(attempt, processes)| (attempt, processes.max(1) as u32)).ok_or_else(|| ObserveError::NoSuchTask {
        path: output_dir.to_path_buf(),
        task: task.to_string(),
        hint: match asked {
            Some(attempt) => format!(" with a started attempt {attempt} (see `dlaunch status`)"),
            None => " that has started (no attempt in the journal)".into(),
        },
    })
}
