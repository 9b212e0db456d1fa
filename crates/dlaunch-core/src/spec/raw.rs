//! The job file exactly as serde reads it. Fields whose type users get creative with
//! (durations, sizes, env values, matrix values) stay `toml::Value` here so the validator can
//! say what is wrong in its own words.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::{Table, Value};

use super::model::Share;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFile {
    pub job: RawJob,
    #[serde(default)]
    pub tasks: Vec<RawTask>,
    #[serde(default)]
    pub datasets: BTreeMap<String, RawDataset>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawJob {
    pub name: String,
    pub output_dir: Option<String>,
    pub stage_dir: Option<String>,
    pub slots_per_worker: Option<i64>,
    pub coordinator_slots: Option<i64>,
    pub prefetch: Option<i64>,
    pub retries: Option<i64>,
    pub timeout: Option<Value>,
    pub stop_signal: Option<String>,
    pub grace: Option<Value>,
    pub heartbeat_timeout: Option<Value>,
    pub progress_every: Option<Value>,
    pub log_limit: Option<Value>,
    pub master_ports: Option<String>,
    pub strict_placeholders: Option<bool>,
    pub share: Option<Share>,
    pub output: Option<super::OutputMode>,
    pub output_limit: Option<Value>,
    pub logs: Option<super::LogMode>,
    pub layout: Option<super::Layout>,
    pub task_dir: Option<bool>,
    pub env: Option<Table>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTask {
    pub name: String,
    /// Optional only when every role has a command of its own.
    pub command: Option<String>,
    pub matrix: Option<Table>,
    pub workdir: Option<String>,
    pub retries: Option<i64>,
    pub timeout: Option<Value>,
    pub walltime: Option<Value>,
    pub env: Option<Table>,
    pub cpus: Option<i64>,
    pub gpus: Option<i64>,
    pub memory: Option<Value>,
    pub processes: Option<i64>,
    pub processes_per_node: Option<i64>,
    pub success: Option<Value>,
    pub datasets: Option<Vec<String>>,
    pub outputs: Option<Vec<String>>,
    pub task_dir: Option<bool>,
    pub after: Option<Vec<String>>,
    pub roles: Option<Vec<RawRole>>,
    pub gpu_visibility: Option<String>,
    pub compat: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRole {
    pub name: String,
    pub processes: Option<i64>,
    pub command: Option<String>,
    pub cpus: Option<i64>,
    pub gpus: Option<i64>,
    pub memory: Option<Value>,
    pub processes_per_node: Option<i64>,
    pub ports: Option<Vec<String>>,
    pub wait_for: Option<String>,
    pub wait_timeout: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDataset {
    pub source: String,
    pub stage_dir: Option<String>,
    pub verify: Option<bool>,
}
