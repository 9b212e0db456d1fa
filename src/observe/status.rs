//! `dlaunch status`: where a run stands, for people and (`--json`) for programs.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::{Loaded, ObserveError, Target, load_view, locate, stderr_path, stderr_tail};
use dlaunch_core::explain::{Explanation, Question, explain};
use dlaunch_core::ledger::{Ledger, TaskStatus};
use dlaunch_core::spec::format_duration;
use dlaunch_core::view::{NextRun, RunView, StateCounts, Utilisation, format_rate};

/// Failed tasks shown with their stderr; the JSON lists them all.
const SHOWN_FAILURES: usize = 10;
const STDERR_LINES: usize = 5;
const SHOWN_RUNNING: usize = 20;

pub struct StatusOptions {
    pub target: PathBuf,
    pub json: bool,
    /// Print again every this often until the run ends.
    pub watch: Option<Duration>,
    pub explain: Option<String>,
}

/// The `--json` document (schema in docs/observing.md).
#[derive(Serialize)]
pub struct StatusReport {
    pub output_dir: PathBuf,
    pub run: u32,
    /// "running", "ended", or "stopped" (no dlaunch holds the journal, and it did not end).
    pub state: &'static str,
    pub exit_code: Option<i32>,
    pub stopped_reason: Option<String>,
    #[serde(with = "dlaunch_core::events::time_format::option")]
    pub started: Option<SystemTime>,
    pub elapsed_seconds: Option<f64>,
    pub slurm_job_id: Option<String>,
    pub counts: StateCounts,
    pub retried: usize,
    pub rate_per_second: Option<f64>,
    pub eta_seconds: Option<f64>,
    pub running: Vec<RunningRow>,
    pub failed: Vec<FailedRow>,
    pub workers: Vec<Utilisation>,
    /// What running the job again would do (once the run ended or stopped).
    pub next_run: Option<NextRun>,
    pub source: Loaded,
}

#[derive(Serialize)]
pub struct RunningRow {
    pub task: String,
    pub attempt: u32,
    pub elapsed_seconds: f64,
    pub processes: Vec<dlaunch_core::events::Assigned>,
}

#[derive(Serialize)]
pub struct FailedRow {
    pub task: String,
    pub attempt: u32,
    pub reason: String,
    pub host: Option<String>,
    pub rank: Option<u32>,
    pub stderr: Option<PathBuf>,
    pub stderr_tail: Vec<String>,
}

pub fn status(options: &StatusOptions) -> Result<i32, ObserveError> {
    let target = locate(&options.target)?;
    if let Some(task) = &options.explain {
        let explanation = explain_task(&target, task, &options.target)?;
        print_explanation(&explanation, options.json);
        return Ok(0);
    }
    loop {
        let report = build(&target.output_dir, SystemTime::now())?;
        let done = report.state != "running";
        if options.json {
            println!("{}", serde_json::to_string(&report).map_err(|e| ObserveError::Usage(e.to_string()))?);
        } else {
            if options.watch.is_some() && std::io::stdout().is_terminal() {
                // Clear the screen and go home: the watch redraws in place.
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render(&report));
        }
        match options.watch {
            Some(every) if !done => std::thread::sleep(every),
            _ => return Ok(0),
        }
    }
}

pub fn build(output_dir: &Path, now: SystemTime) -> Result<StatusReport, ObserveError> {
    let (view, loaded) = load_view(output_dir)?;
    Ok(report_of(output_dir, &view, loaded, now))
}

fn report_of(output_dir: &Path, view: &RunView, source: Loaded, now: SystemTime) -> StatusReport {
    let state = match (&view.ended, source.running) {
        (Some(_), _) => "ended",
        (None, true) => "running",
        (None, false) => "stopped",
    };
    let clock = if state == "stopped" { view.started.unwrap_or(now) } else { now };
    let (rate, eta) = view.rate_and_eta(now);
    let running = view
        .running
        .iter()
        .map(|(task, r)| RunningRow {
            task: task.clone(),
            attempt: r.attempt,
            elapsed_seconds: now.duration_since(r.start).unwrap_or_default().as_secs_f64(),
            processes: r.processes.clone(),
        })
        .collect();
    let failed = view
        .failed
        .iter()
        .enumerate()
        .map(|(i, (task, f))| {
            let decider = f.processes.iter().find(|p| !p.ending.succeeded()).or(f.processes.first());
            let processes = f.processes.len().max(1) as u32;
            let stderr = decider.map(|p| stderr_path(output_dir, task, f.attempt, p.process, processes));
            // Reading every failed task's log would not stay fast on a big run: the first ones.
            let stderr_tail = decider
                .filter(|_| i < SHOWN_FAILURES)
                .map(|p| stderr_tail(output_dir, task, f.attempt, p.process, processes, STDERR_LINES))
                .unwrap_or_default();
            FailedRow {
                task: task.clone(),
                attempt: f.attempt,
                reason: f.reason.clone(),
                host: decider.map(|p| p.host.clone()),
                rank: decider.map(|p| p.rank),
                stderr,
                stderr_tail,
            }
        })
        .collect();
    let end = view.ended.as_ref().map_or(clock, |e| e.time);
    StatusReport {
        output_dir: output_dir.to_path_buf(),
        run: view.run,
        state,
        exit_code: view.ended.as_ref().map(|e| e.exit_code),
        stopped_reason: view.ended.as_ref().map(|e| e.reason.clone()).filter(|r| !r.is_empty()),
        started: view.started,
        elapsed_seconds: view.started.map(|s| end.duration_since(s).unwrap_or_default().as_secs_f64()),
        slurm_job_id: view.slurm_job_id.clone(),
        counts: view.counts(),
        retried: view.retried,
        rate_per_second: rate,
        eta_seconds: if state == "running" { eta.map(|e| e.as_secs_f64()) } else { None },
        running,
        failed,
        workers: view.utilisation(end),
        next_run: (state != "running").then(|| view.next_run()),
        source,
    }
}

fn percent(fraction: Option<f64>) -> String {
    fraction.map_or("-".into(), |f| format!("{:.0}%", f * 100.0))
}

fn seconds(s: f64) -> String {
    format_duration(Duration::from_secs(s as u64))
}

pub fn render(r: &StatusReport) -> String {
    let mut out = format!("{} (run {}", r.output_dir.display(), r.run);
    if let Some(id) = &r.slurm_job_id {
        out.push_str(&format!(", SLURM job {id}"));
    }
    out.push_str(")\n");
    let elapsed = r.elapsed_seconds.map(seconds).unwrap_or_default();
    match r.state {
        "running" => out.push_str(&format!("state: running for {elapsed}\n")),
        "ended" => {
            out.push_str(&format!("state: ended after {elapsed}, exit code {}", r.exit_code.unwrap_or(0)));
            if let Some(reason) = &r.stopped_reason {
                out.push_str(&format!(" (stopped early: {reason})"));
            }
            out.push('\n');
        }
        _ => out.push_str("state: not running, and it did not end: dlaunch was killed or crashed; work is left\n"),
    }
    let c = &r.counts;
    out.push_str(&format!(
        "tasks: {} total: {} succeeded, {} failed, {} cancelled, {} running, {} queued",
        c.total, c.succeeded, c.failed, c.cancelled, c.running, c.queued
    ));
    if c.skipped > 0 {
        out.push_str(&format!(", {} skipped (dependency failed)", c.skipped));
    }
    if r.retried > 0 {
        out.push_str(&format!("; {} attempts retried", r.retried));
    }
    if let Some(rate) = r.rate_per_second {
        out.push_str(&format!("; {}", format_rate(rate)));
    }
    if let Some(eta) = r.eta_seconds {
        out.push_str(&format!(", ETA {}", seconds(eta)));
    }
    out.push('\n');
    if !r.running.is_empty() {
        out.push_str("running:\n");
        for row in r.running.iter().take(SHOWN_RUNNING) {
            let places: Vec<String> = row
                .processes
                .iter()
                .map(|p| format!("{} rank {} ({} GPU, {} CPU)", p.host, p.rank, p.resources.gpus, p.resources.cpus))
                .collect();
            out.push_str(&format!(
                "  {}  attempt {}  {}  on {}\n",
                row.task,
                row.attempt,
                seconds(row.elapsed_seconds),
                places.join(", ")
            ));
        }
        if r.running.len() > SHOWN_RUNNING {
            out.push_str(&format!("  ... and {} more (--json lists all)\n", r.running.len() - SHOWN_RUNNING));
        }
    }
    if !r.failed.is_empty() {
        out.push_str("failed:\n");
        for row in r.failed.iter().take(SHOWN_FAILURES) {
            out.push_str(&format!("  {} (attempt {}): {}", row.task, row.attempt, row.reason));
            if let Some(host) = &row.host {
                out.push_str(&format!(" on {host}"));
            }
            out.push('\n');
            if let Some(path) = &row.stderr {
                out.push_str(&format!("    {}\n", path.display()));
            }
            for line in &row.stderr_tail {
                out.push_str(&format!("    | {line}\n"));
            }
        }
        if r.failed.len() > SHOWN_FAILURES {
            out.push_str(&format!("  ... and {} more failures (--json lists all)\n", r.failed.len() - SHOWN_FAILURES));
        }
    }
    if !r.workers.is_empty() {
        out.push_str("workers (busy since the start: slots, CPUs, GPUs; now):\n");
        for w in &r.workers {
            out.push_str(&format!(
                "  rank {} on {}: {} slots, {} CPUs, {} GPUs; {} running",
                w.rank,
                w.host,
                percent(w.slots),
                percent(w.cpus),
                percent(w.gpus),
                w.processes_now
            ));
            if let Some(lost) = &w.lost {
                out.push_str(&format!(" — lost: {lost}"));
            }
            out.push('\n');
        }
    }
    if let Some(next) = &r.next_run {
        out.push_str(&format!("next run: runs {}, keeps {} succeeded", next.to_run, next.kept));
        if next.failed > 0 {
            out.push_str(&format!(", skips {} failed (--retry-failed reruns them)", next.failed));
        }
        if next.cancelled > 0 {
            out.push_str(&format!(", skips {} cancelled (--retry-cancelled reruns them)", next.cancelled));
        }
        out.push('\n');
    }
    out
}

fn explain_task(target: &Target, task: &str, given: &Path) -> Result<Explanation, ObserveError> {
    let Some(job) = &target.job else {
        return Err(ObserveError::Usage(format!(
            "--explain needs the job file (to know what {task} asks for), not the output directory {}",
            given.display()
        )));
    };
    let tasks = dlaunch_core::plan::expand(job).map_err(|e| ObserveError::Usage(e.to_string()))?;
    let Some(found) = tasks.iter().find(|t| t.id == task) else {
        let close: Vec<&str> =
            tasks.iter().map(|t| t.id.as_str()).filter(|id| strsim::jaro_winkler(id, task) > 0.9).take(3).collect();
        let hint = if close.is_empty() { String::new() } else { format!(" (did you mean {}?)", close.join(", ")) };
        return Err(ObserveError::NoSuchTask { path: job.file.clone(), task: task.to_string(), hint });
    };
    let (view, _) = load_view(&target.output_dir)?;
    let mut ledger = Ledger::default();
    super::read_events(&target.output_dir)?.iter().for_each(|e| ledger.apply(e));
    let queued = |id: &str| {
        matches!(ledger.get(id).map(|r| r.status), None | Some(TaskStatus::Pending | TaskStatus::Interrupted))
    };
    let ahead = tasks[..found.index].iter().filter(|t| queued(&t.id) && !view.running.contains_key(&t.id)).count();
    let status = ledger.get(task).map(|r| r.status);
    let question = Question {
        task,
        template: &job.templates[found.template],
        master_ports: job.master_ports,
        status,
        ahead,
        now: SystemTime::now(),
    };
    Ok(explain(&question, &view))
}

fn print_explanation(e: &Explanation, json: bool) {
    if json {
        println!("{}", serde_json::to_string(e).unwrap_or_default());
        return;
    }
    println!("{}: {}", e.task, e.state);
    for reason in &e.reasons {
        println!("  {reason}");
    }
}
