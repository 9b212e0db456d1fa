//! A validated job: every value checked, every path absolute, every default filled in.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub name: String,
    /// The job file, absolute.
    pub file: PathBuf,
    pub output_dir: PathBuf,
    /// Node-local directory for staged datasets; `None`: a per-job directory under `$TMPDIR`.
    pub stage_dir: Option<PathBuf>,
    /// Tasks a worker rank runs at once; `None`: as many as its CPUs, GPUs and memory allow.
    pub slots_per_worker: Option<u32>,
    /// Tasks rank 0 runs itself; `None`: like a worker when it is alone, else none.
    pub coordinator_slots: Option<u32>,
    /// Orders of one-process tasks a worker may hold per slot beyond its free room, to start
    /// the moment a process ends instead of after a round trip to rank 0 (0: none).
    #[serde(default = "default_prefetch")]
    pub prefetch: u32,
    pub stop_signal: StopSignal,
    /// Time between the stop signal and SIGKILL.
    pub grace: Duration,
    pub heartbeat_timeout: Duration,
    /// Time between progress lines in a batch log (not a terminal).
    pub progress_every: Duration,
    /// Largest stdout or stderr file one process may write; `None`: unlimited.
    pub log_limit: Option<u64>,
    pub master_ports: PortRange,
    /// Who may read what dlaunch writes in the output directory.
    pub share: Share,
    /// Where tasks' logs and outputs are written (`[job] output`).
    #[serde(default)]
    pub output: OutputMode,
    /// Bytes of declared outputs one attempt may send back; `None`: unlimited.
    #[serde(default)]
    pub output_limit: Option<u64>,
    /// How tasks' stdout and stderr are kept (`[job] logs`).
    #[serde(default)]
    pub logs: LogMode,
    /// Who decides where each task runs (`[job] layout`).
    #[serde(default)]
    pub layout: Layout,
    pub templates: Vec<TaskTemplate>,
    pub datasets: Vec<Dataset>,
    /// Things that are probably mistakes but run as written (a `{name}` that is no matrix key);
    /// shown by `check` and logged by `run`, on rank 0 only.
    #[serde(skip)]
    pub warnings: Vec<super::SpecError>,
}

/// Two held orders per slot: a slot finds its next task waiting whenever its process ends, and
/// its worker, still holding one after starting it, sleeps until the next end while rank 0's
/// refill is on its way. With one it polled MPI for that refill after every start: W1 took
/// 10 % longer on 2 cores (performance.md).
pub const DEFAULT_PREFETCH: u32 = 2;

fn default_prefetch() -> u32 {
    DEFAULT_PREFETCH
}

/// One `[[tasks]]` entry; a matrix expands it into many tasks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskTemplate {
    pub name: String,
    pub command: String,
    pub matrix: Vec<MatrixAxis>,
    pub workdir: PathBuf,
    pub retries: u32,
    pub timeout: Option<Duration>,
    /// How long the task needs at most; it is not started when the allocation ends sooner.
    pub walltime: Option<Duration>,
    /// Job env overlaid with task env, in file order.
    pub env: Vec<(String, String)>,
    /// What each process of the task needs.
    pub resources: Resources,
    pub processes: u32,
    pub processes_per_node: Option<u32>,
    pub success: GangSuccess,
    pub datasets: Vec<String>,
    /// Templates (indices into `Job::templates`) whose tasks must succeed first; with shared
    /// matrix keys only the tasks with equal values (see `graph`).
    pub after: Vec<usize>,
    /// The task's roles, in rank order; empty for a homogeneous gang (then `resources`,
    /// `processes` and `processes_per_node` describe every process). With roles, `processes`
    /// is their total and `resources` is unused.
    pub roles: Vec<Role>,
    pub gpu_visibility: GpuVisibility,
    /// Other launchers whose variable names the task's processes also get.
    pub compat: Vec<Compat>,
    /// Files to send back after each attempt: patterns relative to `DLAUNCH_TASK_DIR`.
    #[serde(default)]
    pub outputs: Vec<String>,
    /// Whether each task gets `tasks/<id>/`, made before it starts and named by
    /// `DLAUNCH_TASK_DIR`; without it a task that prints nothing creates no file at all.
    #[serde(default = "with_task_dir")]
    pub task_dir: bool,
}

fn with_task_dir() -> bool {
    true
}

impl TaskTemplate {
    /// All combinations of matrix values; the first key varies slowest, like nested loops.
    pub(crate) fn combinations(&self) -> Vec<Vec<(String, String)>> {
        let mut combos: Vec<Vec<(String, String)>> = vec![Vec::new()];
        for axis in &self.matrix {
            combos = combos
                .into_iter()
                .flat_map(|prefix| {
                    axis.values.iter().map(move |value| {
                        let mut combo = prefix.clone();
                        combo.push((axis.key.clone(), value.clone()));
                        combo
                    })
                })
                .collect();
        }
        combos
    }

    /// The time a task must have left in the allocation to be started.
    pub(crate) fn time_needed(&self) -> Option<Duration> {
        self.walltime.or(self.timeout)
    }

    /// The role of process `process` (ranks run through the roles in order); None without roles.
    pub(crate) fn role_of(&self, process: u32) -> Option<usize> {
        let mut first = 0;
        for (index, role) in self.roles.iter().enumerate() {
            if process < first + role.processes {
                return Some(index);
            }
            first += role.processes;
        }
        None
    }

    /// What process `process` needs.
    pub(crate) fn resources_of(&self, process: u32) -> Resources {
        self.role_of(process).map_or(self.resources, |r| self.roles[r].resources)
    }

    /// Matrix keys of this template that `other` has too, in this template's order.
    pub(crate) fn shared_matrix_keys(&self, other: &TaskTemplate) -> Vec<String> {
        self.matrix.iter().filter(|x| other.matrix.iter().any(|y| y.key == x.key)).map(|x| x.key.clone()).collect()
    }

    /// The task as groups of like processes, in rank order: its roles, or one group.
    pub fn groups(&self) -> Vec<ProcessGroup> {
        if self.roles.is_empty() {
            return vec![ProcessGroup {
                each: self.resources,
                processes: self.processes,
                per_node: self.processes_per_node,
            }];
        }
        self.roles
            .iter()
            .map(|r| ProcessGroup { each: r.resources, processes: r.processes, per_node: r.processes_per_node })
            .collect()
    }
}

/// Processes with the same needs, placed together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessGroup {
    pub each: Resources,
    pub processes: u32,
    pub per_node: Option<u32>,
}

/// One `[[tasks.roles]]` entry: processes of a task with their own command, needs and ports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Role {
    /// Letters, digits and `_`; upper-cased in variable names.
    pub name: String,
    /// None: the task's command.
    pub command: Option<String>,
    pub resources: Resources,
    pub processes: u32,
    pub processes_per_node: Option<u32>,
    /// Labels of extra ports each process gets (`DLAUNCH_PORT_<LABEL>`).
    pub ports: Vec<String>,
    /// A role (index) whose processes must accept connections on their port before this
    /// role's commands start.
    pub wait_for: Option<usize>,
    /// How long to wait for them before the attempt fails.
    pub wait_timeout: Duration,
}

/// Which GPUs the processes of a gang see.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum GpuVisibility {
    /// Every process of a task on one node sees the GPUs of all the task's processes there,
    /// its own at index `LOCAL_RANK × gpus`: `torch.cuda.set_device(LOCAL_RANK)` works.
    #[default]
    Task,
    /// Each process sees only its own GPUs (`cuda:0` is its first).
    Process,
}

/// Launchers whose environment variable names can be exported as well.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compat {
    OpenPai,
    BackendAi,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatrixAxis {
    pub key: String,
    /// Values as they are substituted, formatted once (`0.1`, `true`, `resnet50`).
    pub values: Vec<String>,
    /// The same values with the type they have in the job file, for summaries and reports.
    pub typed: Vec<serde_json::Value>,
}

/// What one process needs from a worker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// Logical CPUs (PUs); 0: no dedicated CPUs, the process runs unpinned.
    pub cpus: u32,
    pub gpus: u32,
    /// Bytes, for admission only.
    pub memory: u64,
}

/// When a multi-process task (a gang) has succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GangSuccess {
    /// Every process exits 0.
    All,
    /// Process 0 exits 0; the others are then stopped.
    Rank0,
    /// This many processes exit 0; the others are then stopped.
    Count(u32),
    /// Every process of this role (index into `roles`) exits 0; the others are then stopped.
    Role(u32),
}

/// `[job] share`: who may read the output directory. Owner-only by default, as OpenSSH keeps
/// `~/.ssh`; `group` lets a team read each other's results. Nobody but the owner ever writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Share {
    #[default]
    Owner,
    Group,
}

impl Share {
    /// Mode of the directories dlaunch creates in the output directory.
    pub fn dir_mode(self) -> u32 {
        match self {
            Share::Owner => 0o700,
            Share::Group => 0o750,
        }
    }

    /// Mode of the files dlaunch writes there (journal, summary, logs).
    pub fn file_mode(self) -> u32 {
        match self {
            Share::Owner => 0o600,
            Share::Group => 0o640,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StopSignal {
    pub name: String,
    pub number: i32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dataset {
    pub name: String,
    pub source: PathBuf,
    /// Node-local directory for this dataset; `None`: the job's `stage_dir`.
    pub stage_dir: Option<PathBuf>,
    /// Checksum the data on rank 0 and check it on every node.
    pub verify: bool,
}

impl Dataset {
    pub fn env_var(&self) -> String {
        dataset_env_var(&self.name)
    }
}

/// `DLAUNCH_DATASET_<NAME>`: upper-cased, anything not alphanumeric becomes `_`.
pub(crate) fn dataset_env_var(name: &str) -> String {
    let suffix: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("DLAUNCH_DATASET_{suffix}")
}

/// `[job] logs`: how tasks' stdout and stderr are kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogMode {
    /// A file per stream and process, `tasks/<id>/attempt-<n>/stdout`, created on its first byte.
    #[default]
    Files,
    /// Records in one file per worker rank, `logs/rank-<r>.log` (see `frame`): no file per task.
    Framed,
}

/// `[job] layout`: who decides where each task runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Rank 0 places every process on every worker.
    #[default]
    Flat,
    /// One leader rank per node places that node's tasks on its workers; rank 0 leases each
    /// leader blocks of tasks and folds the leaders' journal lines into the one journal.
    Nodes,
}

/// `[job] output`: where tasks' logs and outputs are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputMode {
    /// Every node writes into `output_dir` itself (a shared filesystem).
    Shared,
    /// Tasks write node-locally; logs and outputs are sent to rank 0.
    Returned,
    /// Shared when every node sees rank 0's marker file in `output_dir`, else returned.
    #[default]
    Auto,
}

impl OutputMode {
    /// The mode to run in, given whether every node saw the marker (asked only for `Auto`).
    pub fn resolve(self, every_node_sees_marker: impl FnOnce() -> bool) -> OutputMode {
        match self {
            OutputMode::Auto if every_node_sees_marker() => OutputMode::Shared,
            OutputMode::Auto => OutputMode::Returned,
            fixed => fixed,
        }
    }
}
