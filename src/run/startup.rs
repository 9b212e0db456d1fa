//! Start-up as typed phases, each returning what the next one needs:
//!
//! read (rank 0: the job file, the output directory, the datasets' sources) → shared (every
//! rank: the job) → placed (worker ranks: the node's hardware and this rank's share of it) →
//! staged (datasets on every node). The collectives run in the same order on every rank, so a
//! rank that fails a phase does so where the others can still end cleanly.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::RunOptions;
use super::output;
use crate::discover::{self, TopoError};
use crate::guard::Guard;
use crate::journal::Journal;
use crate::worker::Worker;
use crate::{host, stage};
use dlaunch_core::events::{Event, JobIdentity};
use dlaunch_core::exit_code;
use dlaunch_core::spec::{Job, Layout, SpecErrors};
use dlaunch_core::summary::StageReport;
use dlaunch_core::topo::{self, NodeMates, NodeTopology};
use dlaunch_core::worker::Setup;

/// Why a run could not start (or, on rank 0, finish); each kind has its exit code here, and
/// the message is printed once, by `run`.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    TempDir(#[from] host::MissingTempDir),
    #[error("cannot install signal handlers: {0}")]
    Signals(nix::Error),
    #[error("MPI was already initialized")]
    MpiInitialized,
    /// Printed as they are: every error names the file, line and field.
    #[error("{0}")]
    JobFile(#[from] SpecErrors),
    #[error(transparent)]
    Sources(#[from] stage::SourceError),
    #[error(transparent)]
    Output(#[from] output::OutputError),
    #[error("cannot send the job to the other ranks: {0}")]
    Share(String),
    /// Rank 0 could not read the job and has said why: the other ranks end quietly.
    #[error("no job from rank 0")]
    NoJob,
    #[error("rank {rank}: {source}")]
    Hardware { rank: u32, source: TopoError },
    #[error("staging failed, stopping:\n{0}")]
    Staging(String),
    /// Staging failed on another rank; rank 0 tells the story.
    #[error("staging failed")]
    StagingElsewhere,
    /// Every rank knows it; rank 0 says it.
    #[error(
        "layout = \"nodes\" needs an output directory that every node shares, and some nodes do not see {}: \
         a node's leader sends its journal lines to rank 0, but each task writes its logs where it runs. \
         Put output_dir on a shared filesystem, or use layout = \"flat\" (its logs and outputs travel to rank 0 over MPI)",
        dir.display()
    )]
    NodesWithoutSharedOutput { dir: std::path::PathBuf, rank: u32 },
}

impl StartError {
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::TempDir(_) | StartError::JobFile(_) | StartError::Sources(_) | StartError::Output(_) => {
                exit_code::BAD_INPUT
            }
            StartError::NoJob | StartError::StagingElsewhere => exit_code::SUCCESS,
            StartError::NodesWithoutSharedOutput { .. } => exit_code::BAD_INPUT,
            StartError::Signals(_)
            | StartError::MpiInitialized
            | StartError::Share(_)
            | StartError::Hardware { .. }
            | StartError::Staging(_) => exit_code::INTERNAL,
        }
    }

    /// Said by another rank already, or nothing to say.
    pub fn is_quiet(&self) -> bool {
        matches!(
            self,
            StartError::NoJob | StartError::StagingElsewhere | StartError::NodesWithoutSharedOutput { rank: 1.., .. }
        )
    }
}

/// What rank 0 has before the workers join: the job, the journal, and earlier runs' events.
pub struct Read {
    pub job: Job,
    pub identity: JobIdentity,
    pub journal: Journal,
    pub history: Vec<Event>,
    pub attempts_on_disk: BTreeMap<String, u32>,
    /// The datasets' sources, scanned: an unreadable one fails the start here.
    pub sources: Vec<stage::Source>,
}

/// Rank 0: the job file, validated; the output directory, prepared; the sources, scanned.
pub fn read(options: &RunOptions) -> Result<Read, StartError> {
    let job = crate::jobfile::load(&options.job_file)?;
    job.warnings.iter().for_each(|warning| log::warn!("{warning}"));
    let sources = stage::scan_sources(&job)?;
    let identity = output::identity(&job)?;
    let output::Output { journal, history, attempts_on_disk } =
        output::prepare(&job, &identity, options.fresh, options.adopt)?;
    Ok(Read { job, identity, journal, history, attempts_on_disk, sources })
}

/// Every rank: the job, and whether rank 0 runs tasks too.
pub struct Shared {
    pub job: Arc<Job>,
    /// Rank 0's own worker: `Some(slots)` when it runs tasks itself (`Some(None)`: unlimited).
    pub local_slots: Option<Option<u32>>,
}

impl Shared {
    pub fn is_worker(&self, rank: u32) -> bool {
        rank != 0 || self.local_slots.is_some()
    }
}

/// Rank 0 broadcasts the job (or nothing, when it could not read one); every rank gets it.
pub fn share(world: &SimpleCommunicator, job: Option<&Job>) -> Result<Shared, StartError> {
    let root = world.process_at_rank(0);
    // An unserializable job is sent as none: the others end quietly, rank 0 says why.
    let serialized = job.map(serde_json::to_vec).transpose();
    let mut bytes = serialized.as_ref().ok().cloned().flatten().unwrap_or_default();
    let mut len = bytes.len() as u64;
    root.broadcast_into(&mut len);
    if let Err(e) = serialized {
        return Err(StartError::Share(e.to_string()));
    }
    if len == 0 {
        return Err(StartError::NoJob);
    }
    bytes.resize(len as usize, 0);
    root.broadcast_into(&mut bytes[..]);
    let job: Job = serde_json::from_slice(&bytes)
        .map_err(|e| StartError::Share(format!("cannot read the job sent by rank 0: {e}")))?;
    let local_slots = coordinator_slots(&job, world.size() as u32);
    Ok(Shared { job: Arc::new(job), local_slots })
}

/// Rank 0's own worker: by default only when rank 0 is alone; with workers it is busy
/// coordinating.
fn coordinator_slots(job: &Job, world_size: u32) -> Option<Option<u32>> {
    match job.coordinator_slots {
        Some(0) => None,
        Some(n) => Some(Some(n)),
        None if world_size == 1 => Some(job.slots_per_worker),
        None => None,
    }
}

/// A worker rank's hardware share, ready to run tasks; None on rank 0 when it runs none.
pub type Placed = Option<Worker>;

/// Worker ranks learn their node and split it with their node-mates (a collective of every
/// rank of the node: rank 0 takes part either way).
pub fn place(
    world: &SimpleCommunicator,
    shared: &Shared,
    guard: Option<Guard>,
    probe: Option<discover::CudaProbe>,
) -> Result<Placed, StartError> {
    let rank = world.rank() as u32;
    let cuda = || probe.map_or_else(discover::CudaAnswer::ask, discover::CudaProbe::answer);
    let discovered = shared.is_worker(rank).then(|| discover::discover_with(cuda));
    let view = discovered.as_ref().and_then(|d| d.as_ref().ok());
    let mates = node_mates(world, |r| shared.is_worker(r), view);
    match discovered {
        Some(Ok(topology)) => {
            let slots = if rank == 0 { shared.local_slots.flatten() } else { shared.job.slots_per_worker };
            Ok(Some(make_worker(rank, &shared.job, &topology, mates, slots, guard)))
        }
        Some(Err(source)) => Err(StartError::Hardware { rank, source }),
        None => Ok(None),
    }
}

/// Datasets on every node; rank 0 learns how staging went, for the journal and summary.
pub fn stage(
    world: &SimpleCommunicator,
    shared: &Shared,
    sources: Option<&[stage::Source]>,
    placed: &mut Placed,
) -> Result<Vec<StageReport>, StartError> {
    let rank = world.rank() as u32;
    match stage::stage(world, &shared.job, sources, shared.is_worker(rank)) {
        Ok(staged) => {
            if let Some(worker) = placed.as_mut() {
                worker.set_datasets(staged.paths);
            }
            Ok(staged.reports)
        }
        // Every rank gets here together; rank 0 has the whole story.
        Err(e) if rank == 0 => Err(StartError::Staging(e.to_string())),
        Err(_) => Err(StartError::StagingElsewhere),
    }
}

/// Who coordinates whom (`[job] layout`).
#[derive(Debug)]
pub enum Role {
    /// Rank 0 in the flat layout: coordinates every worker rank.
    Coordinator,
    /// Rank 0 in the node layout: leases tasks to these leaders, one per node.
    Root { leaders: Vec<u32> },
    /// The node layout's coordinator of these worker ranks of its node, itself among them.
    Leader { workers: Vec<u32> },
    /// Runs what `coordinator` orders.
    Worker { coordinator: u32 },
}

/// Every rank's role, decided with every rank (a collective in the node layout): a node's
/// leader is its lowest worker rank. Alone, rank 0 is the flat coordinator whatever the layout.
pub fn role(world: &SimpleCommunicator, shared: &Shared) -> Role {
    let rank = world.rank() as u32;
    if shared.job.layout == Layout::Flat || world.size() == 1 {
        if rank == 0 && shared.job.layout == Layout::Nodes {
            log::info!("layout = \"nodes\" with a single rank: it runs the tasks itself");
        }
        return if rank == 0 { Role::Coordinator } else { Role::Worker { coordinator: 0 } };
    }
    let local = world.split_shared(world.rank());
    let mut mates = vec![0u32; local.size() as usize];
    local.all_gather_into(&rank, &mut mates[..]);
    let workers: Vec<u32> = mates.into_iter().filter(|&r| shared.is_worker(r)).collect();
    let leader = workers.iter().min().copied();
    let mine = leader.filter(|_| shared.is_worker(rank)).unwrap_or(NO_LEADER);
    let mut all = vec![0u32; world.size() as usize];
    world.all_gather_into(&mine, &mut all[..]);
    match leader {
        _ if rank == 0 => {
            let leaders: BTreeSet<u32> = all.into_iter().filter(|&l| l != NO_LEADER).collect();
            Role::Root { leaders: leaders.into_iter().collect() }
        }
        Some(leader) if leader == rank => Role::Leader { workers },
        Some(leader) => Role::Worker { coordinator: leader },
        // Rank 0 runs no tasks in this layout: every other rank is a worker with a leader.
        None => Role::Worker { coordinator: 0 },
    }
}

/// What a rank that leads no node says it is led by, in the gather of leaders.
const NO_LEADER: u32 = u32::MAX;

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
    } else if mates.count == 1 && topology.binding_restricted {
        // mpirun binds each of up to two ranks to a core, srun each rank to the CPUs it asked
        // for (one by default): the node's one worker would run every task there while the
        // CPUs the job was given beside them stay idle.
        log::warn!(
            "rank {rank}: the launcher bound this rank to CPUs {}, fewer than this job may use on \
             its node, and no other worker rank of the node uses the rest: every task here runs \
             on those. To give dlaunch the node: mpirun --bind-to none, srun --cpu-bind=none",
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
    let setup = Setup { rank, host: host::hostname(), job: Arc::clone(job), topology, slots, memory_cap };
    Worker::new(setup, guard)
}
