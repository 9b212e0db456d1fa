//! `dlaunch run`: start-up across ranks (`startup`: read → shared → placed → staged), then the
//! coordinator or worker loop, then the summary. Every worker says hello with its capacity;
//! rank 0 plans the run and coordinates it.

mod coordinator;
mod local;
mod node;
mod output;
mod progress;
mod root;
mod startup;
#[cfg(test)]
mod testing;
mod worker_rank;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mpi::traits::*;

use crate::guard::Guard;
use crate::signals::{self, Waker};
use crate::transport::{MpiTransport, Transport};
use crate::{host, proc};
use coordinator::Coordinator;
use dlaunch_core::control::Control;
use dlaunch_core::events::Event;
use dlaunch_core::lease::{Broker, Node};
use dlaunch_core::ledger::{Ledger, Rerun, decide_resume};
use dlaunch_core::spec::{self, Job, Layout, LogMode};
use dlaunch_core::summary::{self, RunInfo, StageReport};
use dlaunch_core::wire::{self, Down, Report, Up, WorkerHello};
use dlaunch_core::{exit_code, plan};
use local::WithLocalWorker;
use startup::{Role, StartError};
use worker_rank::{PeerSettings, WorkerPeer};

pub struct RunOptions {
    pub job_file: PathBuf,
    pub fresh: bool,
    pub rerun: Rerun,
    /// Continue the results another job left in the output directory as this job's.
    pub adopt: bool,
    /// Seconds between progress lines in batch logs; `None`: the job file's `progress_every`.
    pub progress_every: Option<Duration>,
}

/// How long rank 0 waits for every worker's hello before giving up on the start.
const HELLO_TIMEOUT: Duration = Duration::from_secs(600);

pub fn run(options: &RunOptions) -> i32 {
    match start(options) {
        Ok(code) => code,
        Err(e) => {
            if !e.is_quiet() {
                eprintln!("dlaunch: {e}");
            }
            e.exit_code()
        }
    }
}

/// The phases of `startup` in order, then this rank's loop. Errors of the phases end the rank
/// through `run`, which prints them; what comes after returns exit codes of its own.
fn start(options: &RunOptions) -> Result<i32, StartError> {
    // A singleton MPI start creates its session directory under TMPDIR, missing parents and all.
    host::check_temp_dir()?;
    let waker = signals::install().map_err(StartError::Signals)?;
    proc::become_subreaper();
    let guard = match Guard::start() {
        Ok(guard) => Some(guard),
        Err(e) => {
            log::warn!("cannot start the task guard ({e}): tasks may outlive an abrupt end of this rank");
            None
        }
    };
    // The CUDA driver's slow start overlaps MPI's; a fork that fails costs only that.
    let probe = crate::discover::CudaProbe::start()
        .map_err(|e| log::debug!("cannot fork the CUDA probe ({e}): asking the driver after MPI starts"))
        .ok();
    // Staging reads and writes on threads of its own; only the main thread calls MPI.
    let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled).ok_or(StartError::MpiInitialized)?;
    let world = universe.world();
    let rank = world.rank() as u32;
    let size = world.size() as u32;
    crate::logging::set_rank(rank);

    let read = (rank == 0).then(|| startup::read(options));
    let shared = match startup::share(&world, read.as_ref().and_then(|r| r.as_ref().ok()).map(|r| &r.job)) {
        Ok(shared) => shared,
        // Rank 0's own reason comes first: the others only heard that there is no job.
        Err(e) => return Err(read.and_then(Result::err).unwrap_or(e)),
    };
    let mut placed = match startup::place(&world, &shared, guard, probe) {
        Ok(placed) => placed,
        // The other ranks are on their way into the staging collective: end them all.
        Err(e) => {
            eprintln!("dlaunch: {e}");
            world.abort(e.exit_code())
        }
    };
    let role = startup::role(&world, &shared);
    let returned = crate::returned::start(&world, &shared.job, placed.as_mut());
    if returned && shared.job.layout == Layout::Nodes && size > 1 {
        return Err(StartError::NodesWithoutSharedOutput { dir: shared.job.output_dir.clone(), rank });
    }
    if let (Some(worker), LogMode::Framed) = (placed.as_mut(), shared.job.logs) {
        let job = &shared.job;
        worker.set_framed_logs(proc::FramedLog::new(&job.output_dir, format!("rank-{rank}"), job.share));
    }
    let sources = read.as_ref().and_then(|r| r.as_ref().ok()).map(|r| r.sources.as_slice());
    let staged = startup::stage(&world, &shared, sources, &mut placed)?;
    let host = host::hostname();
    // Alone, every process of every task runs on this host: loopback reaches them all.
    let addr = if size == 1 { "127.0.0.1".to_string() } else { host::advertised_address(&host) };
    let job = shared.job;
    let transport = MpiTransport::new(world);
    let settings = |coordinator, heartbeat_timeout| PeerSettings {
        coordinator,
        heartbeat_every: coordinator::heartbeat_every(job.heartbeat_timeout),
        heartbeat_timeout,
        grace: job.grace,
    };
    let local = |worker: Option<crate::worker::Worker>| match worker {
        Some(worker) => Ok(worker),
        None => {
            eprintln!("dlaunch: rank {rank}: a worker rank without a worker (a bug in dlaunch)");
            Err(exit_code::INTERNAL)
        }
    };
    let leaders = match role {
        Role::Worker { coordinator } => {
            let worker = match local(placed) {
                Ok(worker) => worker,
                Err(code) => return Ok(code),
            };
            let hello = Report::Hello(worker.hello(addr));
            let settings = settings(coordinator, Some(job.heartbeat_timeout));
            let mut peer = WorkerPeer::start(transport, worker, hello, settings, Instant::now());
            if let Err(silence) = worker_rank::run(&mut peer, &waker) {
                let who = if coordinator == 0 {
                    "rank 0".to_string()
                } else {
                    format!("rank {coordinator}, its node's leader")
                };
                eprintln!(
                    "dlaunch: rank {rank}: no word from the coordinator ({who}) for {}, longer than heartbeat_timeout: \
                     it is gone. This rank stopped its tasks and exits; run the job again to resume.",
                    spec::format_duration(silence)
                );
                // Not through MPI_Finalize: it would wait for rank 0 forever.
                std::process::exit(exit_code::INTERNAL);
            }
            return Ok(exit_code::SUCCESS);
        }
        Role::Leader { workers } => {
            let worker = match local(placed) {
                Ok(worker) => worker,
                Err(code) => return Ok(code),
            };
            let hello = Report::Hello(worker.hello(addr));
            let transport = WithLocalWorker::new(transport, worker, hello, settings(rank, None));
            return Ok(node::lead(transport, rank, &workers, job, &waker));
        }
        Role::Root { leaders } => Some(leaders),
        Role::Coordinator => None,
    };
    let Some(Ok(read)) = read else {
        eprintln!("dlaunch: rank 0 went on without its job file (a bug in dlaunch)");
        return Ok(exit_code::INTERNAL);
    };
    let worker_ranks: Vec<u32> = (u32::from(placed.is_none())..size).collect();
    let start = Coordination { options, read, staged, job: Arc::clone(&job), world_size: size, worker_ranks };
    let outcome = match (leaders, placed) {
        (Some(leaders), _) => lead_nodes(start, transport, leaders, &waker),
        (None, Some(worker)) => {
            let hello = Report::Hello(worker.hello(addr));
            coordinate(start, WithLocalWorker::new(transport, worker, hello, settings(0, None)), &waker)
        }
        (None, None) => coordinate(start, transport, &waker),
    };
    match outcome {
        Outcome::Exit(code) => Ok(code),
        Outcome::Abort(code) => {
            use std::io::Write;
            let _ = std::io::stdout().flush();
            universe.world().abort(code)
        }
    }
}

/// One line per worker for small runs; a total for large ones (details with RUST_LOG=debug).
fn log_workers(hellos: &[(u32, WorkerHello)]) {
    const LISTED: usize = 8;
    for (rank, hello) in hellos {
        let line = format!("rank {rank} on {} ({}): {}", hello.host, hello.addr, hello.description);
        if hellos.len() <= LISTED {
            log::info!("{line}");
        } else {
            log::debug!("{line}");
        }
    }
    if hellos.len() > LISTED {
        let hosts: std::collections::BTreeSet<&str> = hellos.iter().map(|(_, h)| h.host.as_str()).collect();
        let cpus: u64 = hellos.iter().map(|(_, h)| u64::from(h.capacity.cpus)).sum();
        let gpus: u64 = hellos.iter().map(|(_, h)| u64::from(h.capacity.gpus)).sum();
        log::info!("{} workers on {} hosts: {cpus} CPUs, {gpus} GPUs", hellos.len(), hosts.len());
    }
}

/// Tasks are started only if they can finish this long before the allocation ends: the
/// grace period of the last ones, and time to write the summary.
const SHUTDOWN_MARGIN: Duration = Duration::from_secs(10);

/// The last moment a task may still be running, from the SLURM job's end time.
fn allocation_deadline(job: &Job) -> impl Fn(&crate::slurm::SlurmJob) -> Option<SystemTime> + '_ {
    move |slurm| {
        let end = crate::slurm::end_time(slurm);
        let left = end.and_then(|e| e.duration_since(SystemTime::now()).ok());
        log::info!(
            "SLURM job {}{} on {}: {}",
            slurm.id,
            slurm.name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default(),
            slurm.nodes.as_deref().unwrap_or("?"),
            left.map_or("no time limit known".to_string(), |l| format!("{} left", spec::format_duration(l)))
        );
        end.and_then(|e| e.checked_sub(job.grace + SHUTDOWN_MARGIN))
    }
}

/// What rank 0 coordinates with, once the workers are ready to say hello.
struct Coordination<'a> {
    options: &'a RunOptions,
    read: startup::Read,
    /// How staging each dataset went.
    staged: Vec<StageReport>,
    job: Arc<Job>,
    world_size: u32,
    /// The ranks that run tasks: 1.., and 0 when rank 0 runs tasks itself.
    worker_ranks: Vec<u32>,
}

/// How rank 0 ends: with an exit code, or by ending the whole MPI job with it.
enum Outcome {
    Exit(i32),
    /// MPI_Finalize waits for every rank, and one may never come (a lost worker).
    Abort(i32),
}

/// What rank 0 decided before its loop, in either layout.
struct Planned {
    tasks: Arc<Vec<plan::Task>>,
    ledger: Ledger,
    resume: dlaunch_core::ledger::Resume,
    run: u32,
    started: SystemTime,
    slurm: Option<crate::slurm::SlurmJob>,
    deadline: Option<SystemTime>,
    run_started: Event,
}

/// Expands the job, folds the journal of earlier runs and decides what this run runs. Err: the
/// exit code, once said why (the caller dismisses the other ranks).
fn plan_run(start: &Coordination) -> Result<Planned, i32> {
    let Coordination { options, read, job, world_size, .. } = start;
    let started = SystemTime::now();
    let tasks = match plan::expand(job) {
        Ok(tasks) => Arc::new(tasks),
        // Validation tried every value that could be refused: reaching this is a bug.
        Err(e) => {
            eprintln!("dlaunch: {}: {e}", job.file.display());
            return Err(exit_code::INTERNAL);
        }
    };
    let mut ledger = Ledger::default();
    read.history.iter().for_each(|e| ledger.apply(e));
    let resume = decide_resume(&ledger, &tasks, options.rerun);
    if ledger.runs() > 0 {
        log::info!(
            "resuming {}: {} tasks done before, {} to run{}{}{}",
            job.output_dir.display(),
            resume.kept,
            resume.to_run.len(),
            if resume.failed_before > 0 {
                format!(", {} failed before (use --retry-failed)", resume.failed_before)
            } else {
                String::new()
            },
            if resume.cancelled_before > 0 {
                format!(", {} cancelled before (use --retry-cancelled)", resume.cancelled_before)
            } else {
                String::new()
            },
            if resume.changed.is_empty() {
                String::new()
            } else {
                format!(", {} changed in the job file", resume.changed.len())
            },
        );
        for &index in resume.changed.iter().take(10) {
            log::info!("definition changed: {}", tasks[index].id);
        }
    }
    for (task, next) in &read.attempts_on_disk {
        ledger.continue_after(task, *next);
    }
    let run = ledger.runs();
    let slurm = crate::slurm::job();
    let deadline = slurm.as_ref().and_then(allocation_deadline(job));
    let run_started = Event::RunStarted {
        run,
        time: started,
        version: env!("CARGO_PKG_VERSION").to_string(),
        world_size: *world_size,
        tasks: tasks.len(),
        slurm_job_id: slurm.as_ref().map(|s| s.id.clone()),
        job: Some(read.identity.clone()),
        kept: resume.kept,
        deadline,
        // Control knows the budget and records it.
        backfill_limit: None,
    };
    Ok(Planned { tasks, ledger, resume, run, started, slurm, deadline, run_started })
}

fn coordinate<T: Transport>(start: Coordination, mut transport: T, waker: &Waker) -> Outcome {
    let every = coordinator::heartbeat_every(start.job.heartbeat_timeout);
    let hellos = match coordinator::collect_hellos(&mut transport, start.worker_ranks.len(), HELLO_TIMEOUT, every) {
        Ok(hellos) => hellos,
        Err(missing) => {
            eprintln!("dlaunch: no hello from {missing} worker rank(s) within {}s", HELLO_TIMEOUT.as_secs());
            return Outcome::Abort(exit_code::INTERNAL);
        }
    };
    log_workers(&hellos);
    let planned = match plan_run(&start) {
        Ok(planned) => planned,
        Err(code) => {
            coordinator::dismiss(&mut transport, &start.worker_ranks);
            return Outcome::Exit(code);
        }
    };
    let Coordination { options, read, staged, job, worker_ranks, .. } = start;
    let Planned { tasks, ledger, resume, run, started, slurm, deadline, run_started } = planned;
    let mut control =
        match Control::new(Arc::clone(&job), Arc::clone(&tasks), &hellos, ledger, &resume, run_started, Instant::now())
        {
            Ok(control) => control,
            Err(unfit) => {
                eprintln!("dlaunch: {}: {unfit}", job.file.display());
                coordinator::dismiss(&mut transport, &worker_ranks);
                return Outcome::Exit(exit_code::BAD_INPUT);
            }
        };
    staged.iter().for_each(|report| control.record(report.event()));
    let every = options.progress_every.unwrap_or(job.progress_every);
    let mut coordinator = Coordinator::new(control, transport, read.journal, deadline, Instant::now());
    coordinator.progress = Some(progress::Progress::new(job.output_dir.clone(), job.logs, &read.history, every));
    coordinator.receiver = Some((crate::returned::Receiver::new(&job), Arc::clone(&tasks), Arc::clone(&job)));
    read.history.iter().for_each(|event| coordinator.checkpoints.note(event));
    let outcome = coordinator.run(waker);
    coordinator::dismiss(&mut coordinator.transport, &worker_ranks);
    if let Err(e) = outcome {
        eprintln!("dlaunch: the journal failed, stopping: {e}");
        return Outcome::Exit(exit_code::INTERNAL);
    }
    let control = &coordinator.control;
    let end = Ended {
        ledger: control.ledger(),
        stopping: control.stopping(),
        not_started: control.not_started(),
        lost: control.lost_workers().iter().map(|rank| format!("worker rank {rank}")).collect(),
    };
    let info =
        |ended, stopped| RunInfo { run, started, ended, stopped, slurm_job_id: slurm.map(|s| s.id), datasets: staged };
    conclude(&job, &tasks, end, &mut coordinator.journal, coordinator.progress.as_mut(), info)
}

/// Rank 0 in `layout = "nodes"`: leases tasks to `leaders`, one per node.
fn lead_nodes<T: Transport>(start: Coordination, mut transport: T, leaders: Vec<u32>, waker: &Waker) -> Outcome {
    let every = coordinator::heartbeat_every(start.job.heartbeat_timeout);
    let beat = (every, &wire::encode(&[Down::Heartbeat])[..]);
    let said = |up| match up {
        Up::Hello { workers } => Some(workers),
        Up::Batch(_) => None,
    };
    let nodes = match coordinator::collect(&mut transport, leaders.len(), HELLO_TIMEOUT, beat, said) {
        Ok(nodes) => nodes,
        Err(missing) => {
            eprintln!("dlaunch: no hello from {missing} node leader(s) within {}s", HELLO_TIMEOUT.as_secs());
            return Outcome::Abort(exit_code::INTERNAL);
        }
    };
    let hellos: Vec<(u32, WorkerHello)> = nodes.iter().flat_map(|(_, workers)| workers.iter().cloned()).collect();
    log_workers(&hellos);
    log::info!("layout = \"nodes\": {} node leaders lease tasks from rank 0", nodes.len());
    let planned = match plan_run(&start) {
        Ok(planned) => planned,
        Err(code) => {
            root::dismiss(&mut transport, &leaders);
            return Outcome::Exit(code);
        }
    };
    let Coordination { options, read, staged, job, .. } = start;
    let Planned { tasks, ledger, resume, run, started, slurm, deadline, run_started } = planned;
    let nodes: Vec<Node> = nodes.into_iter().map(|(leader, workers)| Node { leader, workers }).collect();
    let now = Instant::now();
    let mut broker = match Broker::new(Arc::clone(&job), Arc::clone(&tasks), nodes, ledger, &resume, run_started, now) {
        Ok(broker) => broker,
        Err(unfit) => {
            eprintln!("dlaunch: {}: {unfit}", job.file.display());
            root::dismiss(&mut transport, &leaders);
            return Outcome::Exit(exit_code::BAD_INPUT);
        }
    };
    staged.iter().for_each(|report| broker.record(report.event()));
    let every = options.progress_every.unwrap_or(job.progress_every);
    let progress = progress::Progress::new(job.output_dir.clone(), job.logs, &read.history, every);
    let mut root = root::Root::new(broker, transport, read.journal, progress, deadline, now);
    let outcome = root.run(waker);
    root::dismiss(&mut root.transport, &leaders);
    if let Err(e) = outcome {
        eprintln!("dlaunch: the journal failed, stopping: {e}");
        return Outcome::Exit(exit_code::INTERNAL);
    }
    let broker = &root.broker;
    let end = Ended {
        ledger: broker.ledger(),
        stopping: broker.stopping(),
        not_started: broker.not_started(),
        lost: broker
            .lost_workers()
            .iter()
            .map(|rank| match broker.lost_leaders().contains(rank) {
                true => format!("node leader rank {rank}"),
                false => format!("worker rank {rank}"),
            })
            .collect(),
    };
    let info =
        |ended, stopped| RunInfo { run, started, ended, stopped, slurm_job_id: slurm.map(|s| s.id), datasets: staged };
    conclude(&job, &tasks, end, &mut root.journal, Some(&mut root.progress), info)
}

/// How rank 0's loop left the run, in either layout.
struct Ended<'a> {
    ledger: &'a Ledger,
    stopping: Option<&'a str>,
    not_started: usize,
    /// Ranks given up on, as a person reads them.
    lost: Vec<String>,
}

/// The run's last journal line, the summary and its exit code.
fn conclude<J: coordinator::JournalSink>(
    job: &Job,
    tasks: &[plan::Task],
    end: Ended,
    journal: &mut J,
    progress: Option<&mut progress::Progress>,
    info: impl FnOnce(SystemTime, Option<String>) -> RunInfo,
) -> Outcome {
    let counts = end.ledger.counts(tasks);
    let (succeeded, failed, not_run) = (counts.succeeded, counts.failed, counts.not_run);
    let (skipped, cancelled) = (counts.skipped, counts.cancelled);
    let stopped = end.stopping.map(str::to_string).or_else(|| {
        (not_run > 0).then(|| format!("{} tasks need more time than is left in the allocation", end.not_started))
    });
    let ended = SystemTime::now();
    let reason = stopped.clone().unwrap_or_default();
    let end_event = Event::RunEnded { time: ended, succeeded, failed, cancelled, not_run, skipped, reason };
    let journal_ok = journal.append(&end_event).and_then(|_| journal.flush(true));
    if let Err(e) = journal_ok {
        eprintln!("dlaunch: {e}");
    }
    if let Some(progress) = progress {
        progress.record(&end_event);
        progress.finish(journal.len());
    }
    let summary = summary::build(job, tasks, end.ledger, info(ended, stopped));
    let code = match output::write_summary(&summary, &job.output_dir, job.share.file_mode()) {
        Ok(path) => {
            if let Err(e) = crate::console::print(&summary::render(&summary, &path)) {
                log::warn!("cannot print the summary ({e}); it is in {}", path.display());
            }
            summary.exit_code
        }
        Err(e) => {
            eprintln!("dlaunch: cannot write the summary in {}: {e}", job.output_dir.display());
            exit_code::INTERNAL
        }
    };
    if end.lost.is_empty() {
        return Outcome::Exit(code);
    }
    eprintln!("dlaunch: {} were lost; ending the MPI job with MPI_Abort", end.lost.join(", "));
    Outcome::Abort(code)
}
