//! `dlaunch run`: start-up across ranks, then the coordinator or worker loop, then the summary.
//!
//! Start-up, in order: rank 0 reads the job file and prepares the output directory, and
//! broadcasts the job (or the news that there is none); every worker rank learns its node's
//! hardware and its share of it; the datasets are staged on every node; every worker says
//! hello with its capacity; rank 0 plans the run.

mod coordinator;
mod local;
mod output;
mod progress;
#[cfg(test)]
mod testing;
mod worker_rank;

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use crate::guard::Guard;
use crate::signals::{self, Waker};
use crate::transport::{MpiTransport, Transport};
use crate::worker::Worker;
use crate::{discover, host, proc, stage};
use coordinator::Coordinator;
use dlaunch_core::control::Control;
use dlaunch_core::events::{Event, JobIdentity};
use dlaunch_core::ledger::{Ledger, Rerun, plan_resume};
use dlaunch_core::spec::{self, Job};
use dlaunch_core::summary::{self, RunInfo};
use dlaunch_core::topo::{NodeMates, NodeTopology};
use dlaunch_core::wire::{Report, WorkerHello};
use dlaunch_core::{exit_code, plan, topo};
use local::WithLocalWorker;
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
    // A singleton MPI start creates its session directory under TMPDIR, missing parents and all.
    if let Err(e) = host::check_temp_dir() {
        eprintln!("dlaunch: {e}");
        return exit_code::BAD_INPUT;
    }
    let waker = match signals::install() {
        Ok(waker) => waker,
        Err(e) => {
            eprintln!("dlaunch: cannot install signal handlers: {e}");
            return exit_code::INTERNAL;
        }
    };
    proc::become_subreaper();
    let guard = match Guard::start() {
        Ok(guard) => Some(guard),
        Err(e) => {
            log::warn!("cannot start the task guard ({e}): tasks may outlive an abrupt end of this rank");
            None
        }
    };
    // Staging reads and writes on threads of its own; only the main thread calls MPI.
    let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
        eprintln!("dlaunch: MPI was already initialized");
        return exit_code::INTERNAL;
    };
    let world = universe.world();
    let rank = world.rank() as u32;
    let size = world.size() as u32;
    crate::logging::set_rank(rank);

    let prepared = if rank == 0 { prepare(options) } else { Err(exit_code::BAD_INPUT) };
    let job = match share_job(&world, prepared.as_ref().ok().map(|p| &p.job)) {
        Some(job) => Arc::new(job),
        None => return if rank == 0 { prepared.err().unwrap_or(exit_code::BAD_INPUT) } else { exit_code::SUCCESS },
    };
    let local_slots = coordinator_slots(&job, size);
    let is_worker = |r: u32| r != 0 || local_slots.is_some();
    let discovered = is_worker(rank).then(discover::discover);
    let mates = node_mates(&world, is_worker, discovered.as_ref().and_then(|d| d.as_ref().ok()));
    let mut worker = match discovered {
        Some(Ok(topology)) => {
            let slots = if rank == 0 { local_slots.flatten() } else { job.slots_per_worker };
            Some(make_worker(rank, &job, &topology, mates, slots, guard))
        }
        Some(Err(e)) => {
            eprintln!("dlaunch: rank {rank}: {e}");
            world.abort(exit_code::INTERNAL);
        }
        None => None,
    };
    crate::returned::start(&world, &job, worker.as_mut());
    let sources = prepared.as_ref().ok().map(|p| p.sources.as_slice());
    let staged = match stage::stage(&world, &job, sources, is_worker(rank)) {
        Ok(staged) => staged,
        // Every rank gets here together; rank 0 has the whole story and the exit code.
        Err(e) if rank == 0 => {
            eprintln!("dlaunch: staging failed, stopping:\n{e}");
            return exit_code::INTERNAL;
        }
        Err(_) => return exit_code::SUCCESS,
    };
    if let Some(worker) = worker.as_mut() {
        worker.set_datasets(staged.paths);
    }
    let host = host::hostname();
    // Alone, every process of every task runs on this host: loopback reaches them all.
    let addr = if size == 1 { "127.0.0.1".to_string() } else { host::advertised_address(&host) };
    let transport = MpiTransport::new(world);
    let settings = |heartbeat_timeout| PeerSettings {
        heartbeat_every: coordinator::heartbeat_every(job.heartbeat_timeout),
        heartbeat_timeout,
        grace: job.grace,
    };
    if rank != 0 {
        let Some(worker) = worker else { return exit_code::INTERNAL };
        let hello = Report::Hello(worker.hello(addr));
        let mut peer =
            WorkerPeer::start(transport, worker, hello, settings(Some(job.heartbeat_timeout)), Instant::now());
        if let Err(silence) = worker_rank::run(&mut peer, &waker) {
            eprintln!(
                "dlaunch: rank {rank}: no word from the coordinator (rank 0) for {}, longer than heartbeat_timeout: \
                 it is gone. This rank stopped its tasks and exits; run the job again to resume.",
                spec::format_duration(silence)
            );
            // Not through MPI_Finalize: it would wait for rank 0 forever.
            std::process::exit(exit_code::INTERNAL);
        }
        return exit_code::SUCCESS;
    }
    let Ok(mut prepared) = prepared else { return exit_code::INTERNAL };
    prepared.staged = staged.reports;
    let worker_ranks: Vec<u32> = (u32::from(worker.is_none())..size).collect();
    let start = Coordination { options, prepared, job: Arc::clone(&job), world_size: size, worker_ranks };
    let outcome = match worker {
        Some(worker) => {
            let hello = Report::Hello(worker.hello(addr));
            coordinate(start, WithLocalWorker::new(transport, worker, hello, settings(None)), &waker)
        }
        None => coordinate(start, transport, &waker),
    };
    match outcome {
        Outcome::Exit(code) => code,
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

/// What rank 0 has before the workers join: the job, the journal, and earlier runs' events.
struct Prepared {
    job: Job,
    identity: JobIdentity,
    journal: crate::journal::Journal,
    history: Vec<Event>,
    attempts_on_disk: BTreeMap<String, u32>,
    /// The datasets' sources, scanned: an unreadable one fails the start here.
    sources: Vec<stage::Source>,
    staged: Vec<summary::StageReport>,
}

fn prepare(options: &RunOptions) -> Result<Prepared, i32> {
    let job = crate::jobfile::load(&options.job_file).map_err(|e| {
        eprintln!("{e}");
        exit_code::BAD_INPUT
    })?;
    job.warnings.iter().for_each(|warning| log::warn!("{warning}"));
    let sources = stage::scan_sources(&job).map_err(|e| {
        eprintln!("dlaunch: {e}");
        exit_code::BAD_INPUT
    })?;
    let output = output::identity(&job)
        .and_then(|identity| Ok((output::prepare(&job, &identity, options.fresh, options.adopt)?, identity)));
    let (output::Output { journal, history, attempts_on_disk }, identity) = output.map_err(|e| {
        eprintln!("dlaunch: {e}");
        exit_code::BAD_INPUT
    })?;
    Ok(Prepared { job, identity, journal, history, attempts_on_disk, sources, staged: Vec::new() })
}

/// Rank 0 broadcasts the job (or nothing, when it could not read one); everyone returns it.
fn share_job(world: &SimpleCommunicator, job: Option<&Job>) -> Option<Job> {
    let root = world.process_at_rank(0);
    let serialized = job.map(serde_json::to_vec).transpose().unwrap_or_else(|e| {
        // The other ranks learn only that there is no job; say why here, where it is known.
        eprintln!("dlaunch: cannot send the job to the other ranks: {e}");
        None
    });
    let mut bytes = serialized.unwrap_or_default();
    let mut len = bytes.len() as u64;
    root.broadcast_into(&mut len);
    if len == 0 {
        return None;
    }
    bytes.resize(len as usize, 0);
    root.broadcast_into(&mut bytes[..]);
    match serde_json::from_slice(&bytes) {
        Ok(job) => Some(job),
        Err(e) => {
            eprintln!("dlaunch: cannot read the job sent by rank 0: {e}");
            None
        }
    }
}

/// Rank 0's own worker: `Some(slots)` when it runs tasks itself (`Some(None)`: unlimited slots).
/// By default only when rank 0 is alone; with workers it is busy coordinating.
fn coordinator_slots(job: &Job, world_size: u32) -> Option<Option<u32>> {
    match job.coordinator_slots {
        Some(0) => None,
        Some(n) => Some(Some(n)),
        None if world_size == 1 => Some(job.slots_per_worker),
        None => None,
    }
}

/// This rank's place among the worker ranks of its node, and whether they all see the same
/// CPUs and GPUs (compared by a hash of each rank's view; `view` is None on rank 0 when it
/// runs no tasks). Every rank of the node takes part: it is a collective.
fn node_mates(world: &SimpleCommunicator, is_worker: impl Fn(u32) -> bool, view: Option<&NodeTopology>) -> NodeMates {
    // One gather of [world rank, CPU view, GPU view] per rank of the node.
    let rank = u64::from(world.rank() as u32);
    let mine = view.map_or([rank, 0, 0], |t| {
        let gpu_ids: Vec<&str> = t.gpus.iter().map(|g| g.id.as_str()).collect();
        [rank, fingerprint(&t.allowed_cpus), fingerprint(&gpu_ids)]
    });
    let local = world.split_shared(world.rank());
    let mut all = vec![0u64; 3 * local.size() as usize];
    local.all_gather_into(&mine[..], &mut all[..]);
    let workers: Vec<&[u64]> = all.chunks(3).filter(|v| is_worker(v[0] as u32)).collect();
    let all_alike = |i: usize| workers.iter().all(|v| v[i] == mine[i]);
    NodeMates {
        index: workers.iter().position(|v| v[0] == rank).unwrap_or(0),
        count: workers.len().max(1),
        same_cpus: all_alike(1),
        same_gpus: all_alike(2),
    }
}

/// The same on every rank for the same value (DefaultHasher::new has fixed keys).
fn fingerprint(value: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

fn make_worker(
    rank: u32,
    job: &Arc<Job>,
    topology: &NodeTopology,
    mates: NodeMates,
    slots: Option<u32>,
    guard: Option<Guard>,
) -> Worker {
    if !mates.same_cpus {
        log::info!(
            "rank {rank}: the launcher bound this rank to CPUs {}: using them as they are",
            topo::cpu_list(&topology.allowed_cpus)
        );
    }
    if !mates.same_gpus {
        log::info!("rank {rank}: the launcher gave this rank GPUs of its own: using them as they are");
    }
    // The node's memory, or less where SLURM's --mem or a cgroup says so, is split among the
    // node's workers: each admitting tasks up to all of it would over-commit the node.
    let node_memory = host::memory_limit().unwrap_or_else(|| topology.numa_nodes.iter().map(|n| n.memory).sum());
    let memory_cap = (node_memory > 0).then(|| node_memory / mates.count as u64);
    let topology = topo::divide(topology, mates);
    Worker::new(rank, host::hostname(), Arc::clone(job), topology, slots, memory_cap, guard)
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
    prepared: Prepared,
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

fn coordinate<T: Transport>(start: Coordination, mut transport: T, waker: &Waker) -> Outcome {
    let Coordination { options, prepared, job, world_size, worker_ranks } = start;
    let every = coordinator::heartbeat_every(job.heartbeat_timeout);
    let hellos = match coordinator::collect_hellos(&mut transport, worker_ranks.len(), HELLO_TIMEOUT, every) {
        Ok(hellos) => hellos,
        Err(missing) => {
            eprintln!("dlaunch: no hello from {missing} worker rank(s) within {}s", HELLO_TIMEOUT.as_secs());
            return Outcome::Abort(exit_code::INTERNAL);
        }
    };
    log_workers(&hellos);
    let started = SystemTime::now();
    let tasks = match plan::expand(&job) {
        Ok(tasks) => Arc::new(tasks),
        // Validation tried every value that could be refused: reaching this is a bug.
        Err(e) => {
            eprintln!("dlaunch: {}: {e}", job.file.display());
            coordinator::dismiss(&mut transport, &worker_ranks);
            return Outcome::Exit(exit_code::INTERNAL);
        }
    };
    let mut ledger = Ledger::default();
    prepared.history.iter().for_each(|e| ledger.apply(e));
    let resume = plan_resume(&ledger, &tasks, options.rerun);
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
    for (task, next) in &prepared.attempts_on_disk {
        ledger.continue_after(task, *next);
    }
    let run = ledger.runs();
    let slurm = crate::slurm::job();
    let deadline = slurm.as_ref().and_then(allocation_deadline(&job));
    let run_started = Event::RunStarted {
        run,
        time: started,
        version: env!("CARGO_PKG_VERSION").to_string(),
        world_size,
        tasks: tasks.len(),
        slurm_job_id: slurm.as_ref().map(|s| s.id.clone()),
        job: Some(prepared.identity.clone()),
        kept: resume.kept,
    };
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
    prepared.staged.iter().for_each(|report| control.record(report.event()));
    let every = options.progress_every.unwrap_or(job.progress_every);
    let mut coordinator = Coordinator::new(control, transport, prepared.journal, deadline, Instant::now());
    coordinator.progress = Some(progress::Progress::new(job.output_dir.clone(), &prepared.history, every));
    coordinator.receiver = Some((crate::returned::Receiver::new(&job), Arc::clone(&tasks), Arc::clone(&job)));
    prepared.history.iter().for_each(|event| coordinator.checkpoints.note(event));
    let outcome = coordinator.run(waker);
    coordinator::dismiss(&mut coordinator.transport, &worker_ranks);
    if let Err(e) = outcome {
        eprintln!("dlaunch: the journal failed, stopping: {e}");
        return Outcome::Exit(exit_code::INTERNAL);
    }
    let counts = coordinator.control.ledger().counts(&tasks);
    let (succeeded, failed, not_run) = (counts.succeeded, counts.failed, counts.not_run);
    let (skipped, cancelled) = (counts.skipped, counts.cancelled);
    let stopped = coordinator.control.stopping().map(str::to_string).or_else(|| {
        (not_run > 0).then(|| {
            format!("{} tasks need more time than is left in the allocation", coordinator.control.not_started())
        })
    });
    let ended = SystemTime::now();
    let reason = stopped.clone().unwrap_or_default();
    let end_event = Event::RunEnded { time: ended, succeeded, failed, cancelled, not_run, skipped, reason };
    let journal_ok = coordinator.journal.append(&end_event).and_then(|_| coordinator.journal.flush(true));
    if let Err(e) = journal_ok {
        eprintln!("dlaunch: {e}");
    }
    if let Some(progress) = coordinator.progress.as_mut() {
        progress.record(&end_event);
        progress.finish(coordinator.journal.len());
    }
    let slurm_job_id = slurm.map(|s| s.id);
    let info = RunInfo { run, started, ended, stopped, slurm_job_id, datasets: prepared.staged };
    let summary = summary::build(&job, &tasks, coordinator.control.ledger(), info);
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
    let lost = coordinator.control.lost_workers();
    if lost.is_empty() {
        return Outcome::Exit(code);
    }
    let ranks: Vec<String> = lost.iter().map(u32::to_string).collect();
    eprintln!("dlaunch: worker rank(s) {} were lost; ending the MPI job with MPI_Abort", ranks.join(", "));
    Outcome::Abort(code)
}
