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
    pub stop_signal: StopSignal,
    /// Time between the stop signal and SIGKILL.
    pub grace: Duration,
    pub heartbeat_timeout: Duration,
    /// Time between progress lines in a batch log (not a terminal).
    pub progress_every: Duration,
    /// Largest stdout or stderr file one process may write; `None`: unlimited.
    pub log_limit: Option<u64>,
    pub master_ports: PortRange,
    pub templates: Vec<TaskTemplate>,
    pub datasets: Vec<Dataset>,
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
}

impl TaskTemplate {
    /// The time a task must have left in the allocation to be started.
    pub fn time_needed(&self) -> Option<Duration> {
        self.walltime.or(self.timeout)
    }
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
pub fn dataset_env_var(name: &str) -> String {
    let suffix: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("DLAUNCH_DATASET_{suffix}")
}
