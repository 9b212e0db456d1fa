//! The `dlaunch` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use dlaunch::observe::{self, ObserveError, logs::LogsOptions, status::StatusOptions};
use dlaunch::run::RunOptions;
use dlaunch_core::exit_code;
use dlaunch_core::ledger::Rerun;

#[derive(Parser)]
#[command(name = "dlaunch", version, about = "MPI-native batch launcher: run a job file's tasks across an allocation")]
#[command(after_help = "Usage: `dlaunch job.toml` is short for `dlaunch run job.toml`; start it with \
    `srun dlaunch job.toml` or `mpirun -n N dlaunch job.toml`.\n\
    Exit codes: 0 all tasks succeeded (cancelled ones aside), 1 some failed, 2 bad job file or usage, \
    3 stopped early with work left (run again to resume), 4 internal error.")]
struct Cli {
    /// Print JSON for programs instead of text for people (every subcommand; see docs/observing.md).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job (under mpirun or srun; alone it runs everything itself).
    Run {
        job: PathBuf,
        /// Start over: move the old output directory aside instead of resuming from it.
        #[arg(long)]
        fresh: bool,
        /// When resuming, run tasks again that failed in earlier runs.
        #[arg(long)]
        retry_failed: bool,
        /// Use an output directory that holds another job's results, continuing them as this job's.
        #[arg(long)]
        adopt: bool,
        /// When resuming, run tasks again that were cancelled with `dlaunch cancel`.
        #[arg(long)]
        retry_cancelled: bool,
        /// Time between progress lines when stdout is not a terminal, e.g. "30s" (default: the
        /// job file's progress_every, 60s; "0s": none).
        #[arg(long, value_parser = humantime::parse_duration)]
        progress_every: Option<Duration>,
    },
    /// Validate a job file and list its tasks and what each asks for. Needs no MPI.
    Check {
        /// The job file.
        job: PathBuf,
    },
    /// Show this node's hardware as dlaunch sees it (honours HWLOC_XMLFILE).
    Topo,
    /// Where a run stands: counts, rate and ETA, running and failed tasks, worker use. Reads
    /// files only (works from a login node, during and after the run).
    Status {
        /// The job file or its output directory.
        target: PathBuf,
        /// Print again every SECS seconds (default 2) until the run ends.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<f64>,
        /// Why TASK is not running: which resource (slots, CPUs, GPUs, memory, ports) is short on
        /// which worker, the allocation's time left, the backfill budget (needs the job file).
        #[arg(long, value_name = "TASK")]
        explain: Option<String>,
    },
    /// Cancel the whole run (drain: stop signal, grace, summary, exit 3) or the given tasks
    /// (recorded as cancelled: not retried, not rerun on resume without --retry-cancelled).
    Cancel {
        /// The job file or its output directory.
        target: PathBuf,
        /// Task ids; none: the whole run.
        tasks: Vec<String>,
    },
    /// Print (or follow) a task's stdout or stderr without knowing the directory layout.
    Logs {
        /// The job file or its output directory.
        target: PathBuf,
        /// The task's id, as `status` and `check` print it, e.g. 'train[lr=0.1]'.
        task: String,
        /// Attempt N (default: the latest).
        #[arg(long, value_name = "N")]
        attempt: Option<u32>,
        /// Process K of a gang.
        #[arg(long, value_name = "K", default_value_t = 0)]
        rank: u32,
        /// stderr instead of stdout.
        #[arg(long)]
        stderr: bool,
        /// Keep printing what the task writes until its attempt ends.
        #[arg(long, short)]
        follow: bool,
    },
    /// Write a self-contained report.html (summary, timeline, utilisation, tasks, failures)
    /// into the output directory; with --csv print one row per attempt instead.
    Report {
        /// The job file or its output directory.
        target: PathBuf,
        /// Print one row per attempt as CSV (matrix values as typed columns) instead.
        #[arg(long)]
        csv: bool,
    },
    /// Wait until every `host:port` of a list accepts TCP connections (a role's `wait_for`).
    #[command(hide = true)]
    WaitFor {
        /// The role waited for, for messages.
        #[arg(long)]
        role: String,
        /// Seconds.
        #[arg(long)]
        timeout: u64,
        /// A file to create when the wait fails, so that the worker tells the failed wait from
        /// the command's own exit status.
        #[arg(long)]
        marker: Option<PathBuf>,
        /// `host:port,host:port,...`
        hosts: String,
    },
}

const SUBCOMMANDS: &[&str] = &["run", "check", "topo", "status", "cancel", "logs", "report", "wait-for", "help"];

fn main() -> ExitCode {
    dlaunch::logging::init();
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // `dlaunch [--fresh] job.toml` means `dlaunch run [--fresh] job.toml`.
    // A job path that is not UTF-8 is a job path too, not an unknown subcommand.
    if let Some(first) = args.get(1)
        && first
            .to_str()
            .is_none_or(|first| !SUBCOMMANDS.contains(&first) && !["-h", "--help", "-V", "--version"].contains(&first))
    {
        args.insert(1, "run".into());
    }
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit_code::BAD_INPUT as u8 } else { 0 });
        }
    };
    let json = cli.json;
    let observed = match cli.command {
        Command::Run { job, fresh, retry_failed, retry_cancelled, adopt, progress_every } => {
            let rerun = Rerun { failed: retry_failed, cancelled: retry_cancelled };
            Ok(dlaunch::run::run(&RunOptions { job_file: job, fresh, rerun, adopt, progress_every }))
        }
        Command::Check { job } => Ok(dlaunch::check::check(&job, json)),
        Command::Topo => Ok(dlaunch::check::topo(json)),
        Command::Status { target, watch, explain } => {
            match watch.map(|s| Duration::try_from_secs_f64(s.max(0.1))).transpose() {
                Ok(watch) => observe::status::status(&StatusOptions { target, json, watch, explain }),
                Err(_) => Err(ObserveError::Usage(format!("--watch {}: expected seconds", watch.unwrap_or(0.0)))),
            }
        }
        Command::Cancel { target, tasks } => observe::cancel::cancel(&target, &tasks, json),
        Command::Logs { target, task, attempt, rank, stderr, follow } => {
            observe::logs::logs(&LogsOptions { target, task, attempt, rank, stderr, follow })
        }
        Command::Report { target, csv } => observe::report::report(&target, csv, json),
        Command::WaitFor { role, timeout, marker, hosts } => {
            Ok(dlaunch::wait_for::wait_for(&role, Duration::from_secs(timeout), &hosts, marker.as_deref()))
        }
    };
    let code = observed.unwrap_or_else(|e| {
        eprintln!("dlaunch: {e}");
        e.exit_code()
    });
    ExitCode::from(code.clamp(0, 255) as u8)
}
