//! The end of a run: `summary.json` for programs, a few lines for people.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::events::{Ending, Event, ProcessResult};
use crate::exit_code;
use crate::layout;
use crate::ledger::{Counts, Ledger, TaskStatus};
use crate::plan::{Task, TypedValues};
use crate::spec::{Job, LogMode, format_duration};
use crate::substitute::shell_quote;
use crate::view::stderr_hint;

/// How staging one dataset went, for the log, the journal and summary.json.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageReport {
    pub dataset: String,
    /// The dataset's size.
    pub bytes: u64,
    /// From the manifest's broadcast to the last node's verified copy.
    pub seconds: f64,
    /// `bytes / seconds` when anything was sent, else 0.
    pub gb_per_s: f64,
    /// Nodes that received it.
    pub nodes: u32,
    /// Nodes that already held a verified copy and skipped the transfer.
    pub kept_nodes: u32,
}

impl StageReport {
    pub fn event(&self) -> Event {
        Event::DatasetStaged {
            dataset: self.dataset.clone(),
            bytes: self.bytes,
            seconds: self.seconds,
            nodes: self.nodes,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Summary {
    pub job: String,
    pub run: u32,
    pub slurm_job_id: Option<String>,
    #[serde(with = "crate::events::time_format")]
    pub started: SystemTime,
    #[serde(with = "crate::events::time_format")]
    pub ended: SystemTime,
    pub wall_seconds: f64,
    pub exit_code: i32,
    /// Why the run ended early, when it did.
    pub stopped: Option<String>,
    pub counts: Counts,
    pub tasks: Vec<TaskSummary>,
    /// Datasets staged at the start of this run.
    pub datasets: Vec<StageReport>,
}

#[derive(Debug, Serialize)]
pub struct TaskSummary {
    pub id: String,
    pub name: String,
    pub params: serde_json::Map<String, serde_json::Value>,
    pub status: TaskStatus,
    pub attempts: u32,
    /// Why the last attempt failed or was interrupted.
    pub reason: String,
    /// Of the process that decided the outcome (process 0 when all succeeded).
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub host: Option<String>,
    pub rank: Option<u32>,
    #[serde(with = "crate::events::time_format::option")]
    pub start: Option<SystemTime>,
    #[serde(with = "crate::events::time_format::option")]
    pub end: Option<SystemTime>,
    /// Seconds the last attempt took, from its start to its last process's end.
    pub seconds: Option<f64>,
    /// Logs of the last attempt (of process 0 for gangs; see `processes` for the others):
    /// where they are or would be, as a process that wrote nothing has no log files.
    pub log_dir: Option<PathBuf>,
    /// Where people read the deciding process's stderr: its file, shell-quoted, or the
    /// `dlaunch logs` command when logs are framed.
    #[serde(skip)]
    pub stderr: Option<String>,
    pub processes: Vec<ProcessResult>,
}

pub struct RunInfo {
    pub run: u32,
    pub slurm_job_id: Option<String>,
    pub started: SystemTime,
    pub ended: SystemTime,
    pub stopped: Option<String>,
    pub datasets: Vec<StageReport>,
}

pub fn build(job: &Job, tasks: &[Task], ledger: &Ledger, info: RunInfo) -> Summary {
    let counts = ledger.counts(tasks);
    let mut summaries = Vec::with_capacity(tasks.len());
    let typed: Vec<TypedValues> = job.templates.iter().map(TypedValues::new).collect();
    for task in tasks {
        let template = &job.templates[task.template];
        let record = ledger.get(&task.id);
        let status = record.map_or(TaskStatus::Pending, |r| r.status);
        let processes = record.map(|r| r.processes.clone()).unwrap_or_default();
        let deciding = processes
            .iter()
            .find(|p| !p.ending.succeeded() && p.ending != Ending::Stopped)
            .or_else(|| processes.first());
        let (exit_code, signal) = match deciding.map(|p| &p.ending) {
            Some(Ending::Exited { code }) => (Some(*code), None),
            Some(Ending::Signaled { signal, .. }) => (None, Some(*signal)),
            _ => (None, None),
        };
        let attempts = record.map_or(0, |r| r.attempts);
        let start = record.and_then(|r| r.started);
        let end = processes.iter().map(|p| p.end).max();
        let seconds = start.zip(end).map(|(s, e)| e.duration_since(s).unwrap_or_default().as_secs_f64());
        summaries.push(TaskSummary {
            id: task.id.clone(),
            name: template.name.clone(),
            params: typed[task.template].of(task),
            status,
            attempts,
            reason: record.map(|r| r.reason.clone()).unwrap_or_default(),
            exit_code,
            signal,
            host: deciding.map(|p| p.host.clone()),
            rank: deciding.map(|p| p.rank),
            start,
            end,
            seconds,
            log_dir: (attempts > 0).then(|| {
                let process = deciding.map_or(0, |p| p.process);
                layout::log_dir(&job.output_dir, &task.id, attempts - 1, process, template.processes)
            }),
            stderr: (attempts > 0).then(|| {
                let process = deciding.map_or(0, |p| p.process);
                let hint = stderr_hint(&job.output_dir, job.logs, &task.id, attempts - 1, process, template.processes);
                match job.logs {
                    LogMode::Files => shell_quote(&hint).into_owned(),
                    LogMode::Framed => hint,
                }
            }),
            processes,
        });
    }
    let exit_code = if counts.not_run > 0 {
        exit_code::INCOMPLETE
    } else if counts.failed > 0 || counts.skipped > 0 {
        exit_code::TASKS_FAILED
    } else {
        exit_code::SUCCESS
    };
    Summary {
        job: job.name.clone(),
        run: info.run,
        slurm_job_id: info.slurm_job_id,
        started: info.started,
        ended: info.ended,
        wall_seconds: info.ended.duration_since(info.started).unwrap_or_default().as_secs_f64(),
        exit_code,
        stopped: info.stopped,
        counts,
        tasks: summaries,
        datasets: info.datasets,
    }
}

/// What people read at the end: counts, wall time, the failures with where to look.
pub fn render(summary: &Summary, summary_path: &Path) -> String {
    const SHOWN_FAILURES: usize = 10;
    let c = &summary.counts;
    let wall = format_duration(Duration::from_secs_f64(summary.wall_seconds));
    let skipped = if c.skipped > 0 { format!(", {} skipped (dependency failed)", c.skipped) } else { String::new() };
    let cancelled = if c.cancelled > 0 { format!(", {} cancelled", c.cancelled) } else { String::new() };
    let mut out = format!(
        "dlaunch: {}: {} tasks: {} succeeded, {} failed{skipped}{cancelled}, {} not run ({wall})\n",
        summary.job, c.total, c.succeeded, c.failed, c.not_run
    );
    if let Some(reason) = &summary.stopped {
        out.push_str(&format!("stopped early: {reason}; run the same command again to finish\n"));
    }
    let failed: Vec<&TaskSummary> = summary.tasks.iter().filter(|t| t.status == TaskStatus::Failed).collect();
    for task in failed.iter().take(SHOWN_FAILURES) {
        let attempts = if task.attempts == 1 { "1 attempt".to_string() } else { format!("{} attempts", task.attempts) };
        out.push_str(&format!("  failed: {} ({}, {attempts})", task.id, task.reason));
        if let Some(stderr) = &task.stderr {
            out.push_str(&format!("  {stderr}"));
        }
        out.push('\n');
    }
    if failed.len() > SHOWN_FAILURES {
        out.push_str(&format!("  ... and {} more failures\n", failed.len() - SHOWN_FAILURES));
    }
    out.push_str(&format!("summary: {}\n", summary_path.display()));
    out
}
