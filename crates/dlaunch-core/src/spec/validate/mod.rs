//! From what serde read to a `Job`: check every value, fill in defaults, resolve paths.
//! All problems are collected, so a user fixes a broken file in one round.

mod placeholders;
mod shape;
mod values;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

use super::error::SpecError;
use super::model::*;
use super::raw::{RawDataset, RawFile, RawRole, RawTask};
use super::source::{FieldPath, SourceMap, field};
use super::units::{parse_duration, parse_size};
use super::{PathKind, Probe};
use crate::substitute::{self, Refused, is_identifier};

/// More tasks than this is almost certainly a mistake (or an attack), and expanding it would
/// exhaust memory before anything useful happens.
pub const MAX_TASKS: u64 = 1_000_000;
const MAX_RETRIES: i64 = 1_000;
/// Held orders per slot: beyond a few, they only take tasks other workers could start sooner.
const MAX_PREFETCH: i64 = 64;
const NAME_RULE: &str = "use letters, digits, '.', '_' and '-' (at most 100), not starting with '.'";
const DEFAULT_GRACE: Duration = Duration::from_secs(10);
const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_PROGRESS_EVERY: Duration = Duration::from_secs(60);
const DEFAULT_LOG_LIMIT: u64 = 1 << 30;
const DEFAULT_MASTER_PORTS: PortRange = PortRange { first: 29500, last: 30499 };
const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(300);

/// The longest duration accepted anywhere: deadlines are instants, and a longer span could
/// not be added to one.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// What `[job]` sets for tasks that do not set it themselves, validated once.
struct TaskDefaults {
    retries: u32,
    timeout: Option<Duration>,
    task_dir: bool,
}

/// Variables dlaunch sets itself; a job file setting them would silently lose.
const RESERVED_ENV: &[&str] = &[
    "WORLD_SIZE",
    "WORLD_RANK",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TF_CONFIG",
    "CUDA_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
];

const SIGNALS: &[(&str, i32)] =
    &[("HUP", 1), ("INT", 2), ("QUIT", 3), ("KILL", 9), ("USR1", 10), ("USR2", 12), ("TERM", 15)];

pub fn validate(file: &Path, map: &SourceMap, raw: RawFile, probe: &dyn Probe) -> Result<Job, Vec<SpecError>> {
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut v =
        Validator { file, map, base, probe, strict_placeholders: false, errors: Vec::new(), warnings: Vec::new() };
    if file.to_str().is_none() {
        // Every path dlaunch derives from the file's directory would be the same.
        v.errors.push(SpecError::whole_file(
            file,
            "the path of the job file is not valid UTF-8: dlaunch records paths in its journal and \
             summary.json, which are JSON and hold only UTF-8; rename the directory or move the file",
        ));
    }
    let mut job = v.job(raw);
    if v.errors.is_empty() {
        job.warnings = v.warnings;
        Ok(job)
    } else {
        v.errors.sort_by_key(|e| e.position);
        Err(v.errors)
    }
}

struct Validator<'a> {
    file: &'a Path,
    map: &'a SourceMap<'a>,
    /// Relative paths in the job file are relative to the file's own directory.
    base: PathBuf,
    probe: &'a dyn Probe,
    /// `[job] strict_placeholders`: a `{name}` that is no matrix key is an error, not a warning.
    strict_placeholders: bool,
    errors: Vec<SpecError>,
    warnings: Vec<SpecError>,
}

impl Validator<'_> {
    fn error(&mut self, path: &FieldPath, message: impl Into<String>) {
        self.errors.push(SpecError::at(self.file, self.map, path, message));
    }

    fn job(&mut self, raw: RawFile) -> Job {
        let RawFile { job, tasks, datasets } = raw;
        let at = field(&["job"]);
        self.name(&job.name, &at.key("name"));
        let output_dir = match &job.output_dir {
            Some(dir) => self.path(dir, &at.key("output_dir")),
            None => self.base.join("runs").join(&job.name),
        };
        let stage_dir = job.stage_dir.as_ref().map(|dir| self.path(dir, &at.key("stage_dir")));
        let slots_per_worker = job.slots_per_worker.map(|n| self.count(n, &at.key("slots_per_worker"), 1));
        let coordinator_slots = job.coordinator_slots.map(|n| self.count(n, &at.key("coordinator_slots"), 0));
        if job.layout == Some(Layout::Nodes) && coordinator_slots.is_some_and(|n| n > 0) {
            let why = "rank 0 runs no tasks with layout = \"nodes\": it leases them to each node's leader. \
                       Remove coordinator_slots, or use layout = \"flat\"";
            self.error(&at.key("coordinator_slots"), why);
        }
        let prefetch = job.prefetch.map_or(DEFAULT_PREFETCH, |n| self.bounded(n, &at.key("prefetch"), 0, MAX_PREFETCH));
        let stop_signal = self.signal(job.stop_signal.as_deref(), &at.key("stop_signal"));
        let grace = self.duration_or(job.grace.as_ref(), &at.key("grace"), DEFAULT_GRACE);
        let heartbeat_timeout =
            self.duration_or(job.heartbeat_timeout.as_ref(), &at.key("heartbeat_timeout"), DEFAULT_HEARTBEAT_TIMEOUT);
        let progress_every =
            self.duration_or(job.progress_every.as_ref(), &at.key("progress_every"), DEFAULT_PROGRESS_EVERY);
        let log_limit = self.log_limit(job.log_limit.as_ref(), &at.key("log_limit"));
        let master_ports = self.port_range(job.master_ports.as_deref(), &at.key("master_ports"));
        let job_env = self.env(job.env.as_ref(), &at.key("env"));
        self.strict_placeholders = job.strict_placeholders.unwrap_or(false);
        let defaults = TaskDefaults {
            retries: job.retries.map_or(0, |n| self.bounded(n, &at.key("retries"), 0, MAX_RETRIES)),
            timeout: job.timeout.as_ref().and_then(|t| self.duration(t, &at.key("timeout"))),
            task_dir: job.task_dir.unwrap_or(true),
        };

        let datasets: Vec<Dataset> =
            datasets.iter().map(|(name, raw)| self.dataset(name, raw, &field(&["datasets"]).key(name))).collect();
        let templates = self.templates(&defaults, &tasks, &job_env, &datasets);
        self.ports_suffice(&templates, master_ports);
        Job {
            name: job.name,
            file: self.file.to_path_buf(),
            output_dir,
            stage_dir,
            slots_per_worker,
            coordinator_slots,
            prefetch,
            stop_signal,
            grace,
            heartbeat_timeout,
            progress_every,
            log_limit,
            master_ports,
            share: job.share.unwrap_or_default(),
            output: job.output.unwrap_or_default(),
            output_limit: job.output_limit.as_ref().and_then(|v| self.size(v, &at.key("output_limit"))),
            logs: job.logs.unwrap_or_default(),
            layout: job.layout.unwrap_or_default(),
            templates,
            datasets,
            warnings: Vec::new(),
        }
    }

    fn templates(
        &mut self,
        defaults: &TaskDefaults,
        tasks: &[RawTask],
        job_env: &[(String, String)],
        datasets: &[Dataset],
    ) -> Vec<TaskTemplate> {
        if tasks.is_empty() {
            self.error(&field(&["tasks"]), "no tasks: add at least one [[tasks]] entry with a name and a command");
        }
        let mut seen = HashSet::new();
        let mut total: u64 = 0;
        let mut templates = Vec::with_capacity(tasks.len());
        for (i, task) in tasks.iter().enumerate() {
            let at = field(&["tasks"]).index(i);
            if !seen.insert(task.name.as_str()) {
                self.error(&at.key("name"), format!("duplicate task name {:?}: task names must be unique", task.name));
            }
            let template = self.template(defaults, task, &at, job_env, datasets);
            let count = template.matrix.iter().fold(1u64, |n, axis| n.saturating_mul(axis.values.len() as u64));
            total = total.saturating_add(count);
            if total > MAX_TASKS {
                self.error(
                    &at.key("matrix"),
                    format!("the job expands to more than {MAX_TASKS} tasks; split it into several jobs"),
                );
                break;
            }
            templates.push(template);
        }
        self.dependencies(tasks, &mut templates);
        templates
    }

    fn template(
        &mut self,
        defaults: &TaskDefaults,
        task: &RawTask,
        at: &FieldPath,
        job_env: &[(String, String)],
        datasets: &[Dataset],
    ) -> TaskTemplate {
        self.name(&task.name, &at.key("name"));
        let command = task.command.clone().unwrap_or_default();
        // With roles, a role without a command of its own says so itself.
        if task.command.is_none() && task.roles.is_none() {
            self.error(at, "missing key `command`");
        } else if task.command.is_some() && command.trim().is_empty() {
            self.error(&at.key("command"), "the command is empty");
        } else if command.contains('\0') {
            self.error(&at.key("command"), "the command contains a NUL byte");
        }
        let matrix = task.matrix.as_ref().map(|m| self.matrix(m, &at.key("matrix"))).unwrap_or_default();
        let workdir = match &task.workdir {
            Some(dir) => self.existing_dir(dir, &at.key("workdir")),
            None => self.base.clone(),
        };
        let retries = task.retries.map_or(defaults.retries, |n| self.bounded(n, &at.key("retries"), 0, MAX_RETRIES));
        let timeout = match &task.timeout {
            Some(t) => self.duration(t, &at.key("timeout")),
            None => defaults.timeout,
        };
        let walltime = task.walltime.as_ref().and_then(|t| self.duration(t, &at.key("walltime")));
        let mut env = job_env.to_vec();
        for (key, value) in self.env(task.env.as_ref(), &at.key("env")) {
            env.retain(|(k, _)| *k != key);
            env.push((key, value));
        }
        let resources = Resources {
            cpus: task.cpus.map_or(1, |n| self.count(n, &at.key("cpus"), 0)),
            gpus: task.gpus.map_or(0, |n| self.count(n, &at.key("gpus"), 0)),
            memory: task.memory.as_ref().map_or(0, |m| self.size(m, &at.key("memory")).unwrap_or(0)),
        };
        let roles = match &task.roles {
            Some(raw) => self.roles(raw, &at.key("roles"), resources, task.command.is_some()),
            None => Vec::new(),
        };
        if !roles.is_empty() {
            for (key, set) in
                [("processes", task.processes.is_some()), ("processes_per_node", task.processes_per_node.is_some())]
            {
                if set {
                    self.error(&at.key(key), format!("with [[tasks.roles]], set {key} on each role"));
                }
            }
        }
        let processes = if roles.is_empty() {
            task.processes.map_or(1, |n| self.count(n, &at.key("processes"), 1))
        } else {
            roles.iter().fold(0u32, |n, r| n.saturating_add(r.processes))
        };
        let processes_per_node = match roles.is_empty() {
            true => task.processes_per_node.map(|n| self.count(n, &at.key("processes_per_node"), 1)),
            false => None,
        };
        self.whole_hosts(processes, processes_per_node, at);
        let success = self.success(task.success.as_ref(), processes, &roles, &at.key("success"));
        let gpu_visibility = match task.gpu_visibility.as_deref() {
            None | Some("task") => GpuVisibility::Task,
            Some("process") => GpuVisibility::Process,
            Some(other) => {
                self.error(
                    &at.key("gpu_visibility"),
                    format!("invalid value {other:?}: expected \"task\" or \"process\""),
                );
                GpuVisibility::Task
            }
        };
        let compat = self.compat(task.compat.as_deref(), !roles.is_empty(), &at.key("compat"));
        let task_datasets = task.datasets.clone().unwrap_or_default();
        for (j, name) in task_datasets.iter().enumerate() {
            if !datasets.iter().any(|d| &d.name == name) {
                let known: Vec<&str> = datasets.iter().map(|d| d.name.as_str()).collect();
                self.error(
                    &at.key("datasets").index(j),
                    format!("unknown dataset {name:?}{}", one_of(&known, "; define it as [datasets.NAME]")),
                );
            }
        }
        let outputs = task.outputs.clone().unwrap_or_default();
        for (j, pattern) in outputs.iter().enumerate() {
            if let Err(message) = crate::layout::check_pattern(pattern) {
                self.error(&at.key("outputs").index(j), message);
            }
        }
        let task_dir = task.task_dir.unwrap_or(defaults.task_dir);
        self.without_task_dir(task_dir, &outputs, &roles, at);
        let template = TaskTemplate {
            name: task.name.clone(),
            command,
            matrix,
            workdir,
            retries,
            timeout,
            walltime,
            env,
            resources,
            processes,
            processes_per_node,
            success,
            datasets: task_datasets,
            after: Vec::new(),
            roles,
            gpu_visibility,
            compat,
            outputs,
            task_dir,
        };
        self.placeholders(&template, &template.command, &at.key("command"));
        for (i, role) in template.roles.iter().enumerate() {
            if let Some(command) = &role.command {
                self.placeholders(&template, command, &at.key("roles").index(i).key("command"));
            }
        }
        template
    }

    /// `task_dir = false` leaves what lives in the task's directory nowhere to go: declared
    /// outputs (found there) and a role's `wait_for` (it leaves its marker there).
    fn without_task_dir(&mut self, task_dir: bool, outputs: &[String], roles: &[Role], at: &FieldPath) {
        if task_dir {
            return;
        }
        if !outputs.is_empty() {
            self.error(
                &at.key("outputs"),
                "outputs are found in the task's directory, and task_dir = false leaves it out: \
                 set task_dir = true or drop outputs",
            );
        }
        if let Some(i) = roles.iter().position(|r| r.wait_for.is_some()) {
            self.error(
                &at.key("roles").index(i).key("wait_for"),
                "wait_for leaves its marker in the task's directory, and task_dir = false leaves it out: \
                 set task_dir = true",
            );
        }
    }

    /// `processes_per_node` fills whole hosts: `processes` must be a multiple of it.
    fn whole_hosts(&mut self, processes: u32, per_node: Option<u32>, at: &FieldPath) {
        if let Some(per_node) = per_node
            && per_node > 0
            && !processes.is_multiple_of(per_node)
        {
            self.error(
                &at.key("processes_per_node"),
                format!("processes = {processes} is not a multiple of processes_per_node = {per_node}"),
            );
        }
    }

    fn matrix(&mut self, table: &Table, at: &FieldPath) -> Vec<MatrixAxis> {
        let mut axes = Vec::with_capacity(table.len());
        for (key, value) in table {
            let at = at.key(key);
            if !is_identifier(key) {
                self.error(&at, format!("matrix key {key:?} must be an identifier (letters, digits, '_')"));
            } else if let Some(other) = table.keys().find(|k| *k != key && k.eq_ignore_ascii_case(key)) {
                let variable = key.to_ascii_uppercase();
                self.error(&at, format!("matrix keys {other} and {key} would both set DLAUNCH_PARAM_{variable}"));
            }
            let Value::Array(items) = value else {
                self.error(&at, format!("expected a list of values, e.g. {key} = [1, 2, 3]"));
                continue;
            };
            if items.is_empty() {
                self.error(&at, "the list is empty: it would expand to no tasks");
            }
            let mut values: Vec<String> = Vec::with_capacity(items.len());
            let mut typed = Vec::with_capacity(items.len());
            let mut seen = HashSet::with_capacity(items.len());
            for (j, item) in items.iter().enumerate() {
                match substitutable(item, "matrix values") {
                    Ok(text) if !seen.insert(text.clone()) => {
                        self.error(&at.index(j), format!("duplicate value {text}: it would make two identical tasks"))
                    }
                    Ok(text) => {
                        typed.push(typed_scalar(item, &text));
                        values.push(text);
                    }
                    Err(message) => self.error(&at.index(j), message),
                }
            }
            axes.push(MatrixAxis { key: key.clone(), values, typed });
        }
        axes
    }

    fn dataset(&mut self, name: &str, raw: &RawDataset, at: &FieldPath) -> Dataset {
        self.name(name, at);
        let source = self.path(&raw.source, &at.key("source"));
        match self.probe.kind(&source) {
            Ok(PathKind::File | PathKind::Directory) => {}
            Ok(PathKind::Other) => {
                self.error(&at.key("source"), format!("{} is neither a file nor a directory", source.display()))
            }
            Err(e) => self.error(&at.key("source"), format!("cannot read {}: {e}", source.display())),
        }
        let stage_dir = raw.stage_dir.as_ref().map(|dir| self.path(dir, &at.key("stage_dir")));
        Dataset { name: name.to_string(), source, stage_dir, verify: raw.verify.unwrap_or(true) }
    }
}

/// A value that goes into commands and environments (`what` they are, for the error).
fn substitutable(value: &Value, what: &str) -> Result<String, String> {
    match value {
        Value::String(s) if s.contains('\0') => Err(format!("{what} cannot contain NUL bytes")),
        _ => scalar(value).ok_or_else(|| format!("{what} must be strings, numbers or booleans")),
    }
}

/// A scalar as it is substituted into commands and environments. Floats use Rust's shortest
/// round-trip form, so `0.1` stays `0.1` and `1.0` stays `1.0`, as written.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Integer(n) => Some(n.to_string()),
        Value::Float(x) => Some(format!("{x:?}")),
        Value::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A scalar as JSON, keeping its type; a float JSON cannot hold (nan, inf) stays `text`.
fn typed_scalar(value: &Value, text: &str) -> serde_json::Value {
    match value {
        Value::Integer(n) => (*n).into(),
        Value::Float(x) => serde_json::Number::from_f64(*x).map_or_else(|| text.into(), serde_json::Value::Number),
        Value::Boolean(b) => (*b).into(),
        _ => text.into(),
    }
}

/// ": expected one of a, b" or the fallback when there is nothing to choose from.
fn one_of(known: &[&str], fallback: &str) -> String {
    if known.is_empty() { fallback.to_string() } else { format!(": expected one of {}", known.join(", ")) }
}
