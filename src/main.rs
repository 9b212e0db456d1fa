//! The `dlaunch` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use dlaunch::run::RunOptions;
use dlaunch_core::exit_code;

#[derive(Parser)]
#[command(name = "dlaunch", version, about = "MPI-native batch launcher: run a job file's tasks across an allocation")]
#[command(after_help = "Usage: `dlaunch job.toml` is short for `dlaunch run job.toml`; start it with \
    `srun dlaunch job.toml` or `mpirun -n N dlaunch job.toml`.\n\
    Exit codes: 0 all tasks succeeded, 1 some failed, 2 bad job file or usage, \
    3 stopped early with work left (run again to resume), 4 internal error.")]
struct Cli {
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
    },
    /// Validate a job file and list its tasks and what each asks for. Needs no MPI.
    Check {
        job: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show this node's hardware as dlaunch sees it (honours HWLOC_XMLFILE).
    Topo {
        #[arg(long)]
        json: bool,
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
        /// `host:port,host:port,...`
        hosts: String,
    },
}

const SUBCOMMANDS: &[&str] = &["run", "check", "topo", "wait-for", "help"];

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
    let code = match cli.command {
        Command::Run { job, fresh, retry_failed, adopt } => {
            dlaunch::run::run(&RunOptions { job_file: job, fresh, retry_failed, adopt })
        }
        Command::Check { job, json } => dlaunch::check::check(&job, json),
        Command::Topo { json } => dlaunch::check::topo(json),
        Command::WaitFor { role, timeout, hosts } => {
            dlaunch::wait_for::wait_for(&role, std::time::Duration::from_secs(timeout), &hosts)
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
