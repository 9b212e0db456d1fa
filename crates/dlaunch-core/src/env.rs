//! The environment contract: what every task process sees. Documented for users in
//! docs/environment.md; keep the two in step.
//!
//! Layers, later wins: the worker's own environment minus the MPI launcher's and the SLURM
//! step's variables → placement (GPUs, CPUs, threads) → the job's and task's `env` → the
//! contract variables (ranks, rendezvous, `DLAUNCH_*`), which nothing may override.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::plan::Task;
use crate::spec::{Job, Role, TaskTemplate};

/// Where one process of an attempt runs, as the coordinator assigned it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    pub rank: u32,
    /// Host name, for people and `DLAUNCH_HOSTS`; also what makes two processes node-mates.
    /// Shared with the coordinator's table of workers: an attempt's sites copy no names.
    pub host: Arc<str>,
    /// An address other nodes reach this host at.
    pub addr: Arc<str>,
    /// A port reserved for this process on its host.
    pub port: u16,
    /// Ports reserved for its role's `ports` labels, in their order.
    pub labelled: Vec<u16>,
}

/// Variables of the launcher that started dlaunch. A task must not see them: a nested `mpirun`
/// would join dlaunch's MPI job, and frameworks' auto-detection (Lightning, Horovod, DeepSpeed)
/// would read dlaunch's rank layout instead of the task's.
pub(crate) fn is_launcher_variable(name: &str) -> bool {
    const PREFIXES: &[&str] =
        &["OMPI_", "PMIX_", "PMI_", "SLURM_STEP_", "SLURM_CPU_BIND", "SLURM_SRUN_COMM_", "SLURM_PMIX"];
    const NAMES: &[&str] = &[
        "SLURM_PROCID",
        "SLURM_LOCALID",
        "SLURM_NODEID",
        "SLURM_NTASKS",
        "SLURM_NPROCS",
        "SLURM_NTASKS_PER_NODE",
        "SLURM_TASKS_PER_NODE",
        "SLURM_STEPID",
        "SLURM_TASK_PID",
        "SLURM_GTIDS",
        "SLURM_DISTRIBUTION",
        "SLURM_LAUNCH_NODE_IPADDR",
        "SLURM_PRIO_PROCESS",
        "SLURM_MPI_TYPE",
        "SLURM_TOPOLOGY_ADDR",
        "SLURM_TOPOLOGY_ADDR_PATTERN",
        "GPU_DEVICE_ORDINAL",
        "MPI_LOCALNRANKS",
        "MPI_LOCALRANKID",
    ];
    PREFIXES.iter().any(|p| name.starts_with(p)) || NAMES.contains(&name)
}

/// One variable of a process's environment as rank 0 builds it: names, and values that all
/// processes of an attempt share, are lent from the job and the attempt; only what differs per
/// process is owned. Most of them equal the template's record and never leave rank 0
/// (`TemplateRecord::split`), so most are never copied.
pub(crate) type Entry<'a> = (Cow<'a, str>, Cow<'a, str>);

/// The environment of an attempt's processes: the job's and task's `env`, then the contract
/// variables, later wins (other launchers' names, `compat::all`, go after them). What the processes share is
/// worked out once per attempt and what differs per process (ranks, ports, `TF_CONFIG`'s
/// index) per process: rank 0 builds this for every process it starts, so a gang does not
/// list its hosts once per process.
pub(crate) struct AttemptEnv<'a> {
    job: &'a Job,
    task: &'a Task,
    template: &'a TaskTemplate,
    sites: &'a [Site],
    /// Per process, its host's position among the attempt's hosts (`NODE_RANK`) and its own
    /// among the processes of that host (`LOCAL_RANK`).
    node_rank: Vec<usize>,
    local_rank: Vec<usize>,
    /// Per host, the attempt's processes there (`LOCAL_WORLD_SIZE`).
    local_world: Vec<usize>,
    index: String,
    attempt: u32,
    task_dir: PathBuf,
    /// `DLAUNCH_TASK_DIR`, when the template has one.
    task_dir_text: Option<String>,
    output_dir: Cow<'a, str>,
    hosts: String,
    params: Vec<(&'a str, &'a str)>,
    world: Cow<'a, str>,
    master_port: String,
    coordinator: String,
    /// `TF_CONFIG` of a task without roles up to the process's own index.
    tf_config: Option<String>,
}

impl<'a> AttemptEnv<'a> {
    /// `param_names`: the template's [`param_names`].
    pub(crate) fn new(
        job: &'a Job,
        task: &'a Task,
        template: &'a TaskTemplate,
        param_names: &'a [String],
        attempt: u32,
        sites: &'a [Site],
    ) -> Self {
        let mut hosts: Vec<&str> = Vec::new();
        let (mut node_rank, mut local_rank) = (Vec::with_capacity(sites.len()), Vec::with_capacity(sites.len()));
        let mut local_world: Vec<usize> = Vec::new();
        for site in sites {
            // A gang's processes come host by host: the last host is the likely one.
            let known = match hosts.last() {
                Some(last) if *last == &*site.host => Some(hosts.len() - 1),
                _ => hosts.iter().position(|h| *h == &*site.host),
            };
            let node = known.unwrap_or_else(|| {
                hosts.push(&site.host);
                local_world.push(0);
                hosts.len() - 1
            });
            node_rank.push(node);
            local_rank.push(local_world[node]);
            local_world[node] += 1;
        }
        let (master_addr, master_port) = sites.first().map_or(("", 0), |s| (&*s.addr, s.port));
        let tf_config = template
            .roles
            .is_empty()
            .then(|| tf_config_prefix(sites.iter().map(|s| host_port(&s.addr, s.port)).collect()));
        let task_dir = crate::layout::task_dir(&job.output_dir, &task.id);
        AttemptEnv {
            job,
            task,
            template,
            sites,
            node_rank,
            local_rank,
            local_world,
            index: task.index.to_string(),
            attempt,
            task_dir_text: template.task_dir.then(|| path_text(&task_dir)),
            task_dir,
            output_dir: job.output_dir.to_string_lossy(),
            hosts: hosts.join(","),
            params: param_names.iter().map(String::as_str).zip(task.params(template).map(|(_, value)| value)).collect(),
            world: number(sites.len()),
            master_port: master_port.to_string(),
            coordinator: host_port(master_addr, master_port),
            tf_config,
        }
    }

    /// Where process `process` writes its stdout and stderr (`layout::log_dir`).
    pub(crate) fn log_dir(&self, process: u32) -> PathBuf {
        self.task_dir.join(crate::layout::log_dir_in_task(self.attempt, process, self.template.processes))
    }

    /// The whole environment of process `process`, in the order of its layers (a name given
    /// twice counts as its last entry).
    pub(crate) fn process<'s>(&'s self, process: usize) -> Vec<Entry<'s>> {
        let at = process.min(self.sites.len().saturating_sub(1));
        let Some(site) = self.sites.get(at) else { return Vec::new() };
        let node = self.node_rank[at];
        let mut env: Vec<Entry<'s>> = Vec::with_capacity(self.template.env.len() + self.params.len() + 24);
        env.extend(self.template.env.iter().map(|(k, v)| (Cow::from(k.as_str()), Cow::from(v.as_str()))));
        let mut set = |name: &'static str, value: Cow<'s, str>| env.push((Cow::Borrowed(name), value));
        set("DLAUNCH_JOB_NAME", Cow::from(self.job.name.as_str()));
        set("DLAUNCH_TASK_ID", Cow::from(self.task.id.as_str()));
        set("DLAUNCH_TASK_NAME", Cow::from(self.template.name.as_str()));
        set("DLAUNCH_TASK_INDEX", Cow::from(self.index.as_str()));
        set("DLAUNCH_ATTEMPT", number(self.attempt as usize));
        if let Some(task_dir) = &self.task_dir_text {
            set("DLAUNCH_TASK_DIR", Cow::from(task_dir.as_str()));
        }
        set("DLAUNCH_OUTPUT_DIR", Cow::from(&*self.output_dir));
        set("DLAUNCH_WORKER_RANK", Cow::Owned(site.rank.to_string()));
        set("DLAUNCH_HOST", Cow::from(&*site.host));
        set("DLAUNCH_HOSTS", Cow::from(self.hosts.as_str()));
        set("DLAUNCH_PORT", Cow::Owned(site.port.to_string()));
        env.extend(self.params.iter().map(|&(key, value)| (Cow::from(key), Cow::from(value))));
        let mut set = |name: &'static str, value: Cow<'s, str>| env.push((Cow::Borrowed(name), value));
        set("WORLD_SIZE", Cow::from(&*self.world));
        set("WORLD_RANK", number(process));
        set("RANK", number(process));
        set("LOCAL_RANK", number(self.local_rank[at]));
        set("LOCAL_WORLD_SIZE", number(self.local_world[node]));
        set("NODE_RANK", number(node));
        set("GROUP_RANK", number(node));
        set("MASTER_ADDR", self.sites.first().map_or(Cow::Borrowed(""), |m| Cow::from(&*m.addr)));
        set("MASTER_PORT", Cow::from(self.master_port.as_str()));
        set("DLAUNCH_COORDINATOR_ADDRESS", Cow::from(self.coordinator.as_str()));
        match &self.tf_config {
            Some(prefix) => set("TF_CONFIG", Cow::Owned(tf_config_of(prefix, process))),
            None => env.extend(role_env(self.template, self.sites, process).into_iter().map(owned)),
        }
        env
    }
}

/// The job's and task's `env`, then the contract variables of process `process` of `task`,
/// computed for that process alone, as first written: the reference [`AttemptEnv`] is checked
/// against.
#[cfg(test)]
pub(crate) fn task_env(
    job: &Job,
    task: &Task,
    template: &TaskTemplate,
    attempt: u32,
    sites: &[Site],
    process: usize,
) -> Vec<(String, String)> {
    let mut env = template.env.clone();
    let site = &sites[process.min(sites.len().saturating_sub(1))];
    let mut hosts: Vec<&str> = Vec::new();
    for s in sites {
        if !hosts.contains(&&*s.host) {
            hosts.push(&s.host);
        }
    }
    let node_rank = hosts.iter().position(|h| *h == &*site.host).unwrap_or(0);
    let local_rank = sites[..process].iter().filter(|s| s.host == site.host).count();
    let local_world = sites.iter().filter(|s| s.host == site.host).count();
    let master = &sites[0];
    let task_dir = crate::layout::task_dir(&job.output_dir, &task.id);
    let mut set = |key: &str, value: String| env.push((key.to_string(), value));
    set("DLAUNCH_JOB_NAME", job.name.clone());
    set("DLAUNCH_TASK_ID", task.id.clone());
    set("DLAUNCH_TASK_NAME", template.name.clone());
    set("DLAUNCH_TASK_INDEX", task.index.to_string());
    set("DLAUNCH_ATTEMPT", attempt.to_string());
    if template.task_dir {
        set("DLAUNCH_TASK_DIR", path_text(&task_dir));
    }
    set("DLAUNCH_OUTPUT_DIR", path_text(&job.output_dir));
    set("DLAUNCH_WORKER_RANK", site.rank.to_string());
    set("DLAUNCH_HOST", String::from(&*site.host));
    set("DLAUNCH_HOSTS", hosts.join(","));
    set("DLAUNCH_PORT", site.port.to_string());
    for (key, value) in task.params(template) {
        set(&format!("DLAUNCH_PARAM_{}", key.to_ascii_uppercase()), value.to_string());
    }
    set("WORLD_SIZE", sites.len().to_string());
    set("WORLD_RANK", process.to_string());
    set("RANK", process.to_string());
    set("LOCAL_RANK", local_rank.to_string());
    set("LOCAL_WORLD_SIZE", local_world.to_string());
    set("NODE_RANK", node_rank.to_string());
    set("GROUP_RANK", node_rank.to_string());
    set("MASTER_ADDR", String::from(&*master.addr));
    set("MASTER_PORT", master.port.to_string());
    set("DLAUNCH_COORDINATOR_ADDRESS", host_port(&master.addr, master.port));
    if template.roles.is_empty() {
        let workers: Vec<String> = sites.iter().map(|s| host_port(&s.addr, s.port)).collect();
        let tf =
            serde_json::json!({ "cluster": { "worker": workers }, "task": { "type": "worker", "index": process } });
        set("TF_CONFIG", tf.to_string());
    } else {
        env.extend(role_env(template, sites, process));
    }
    env
}

/// The names of a template's matrix parameters as variables (`DLAUNCH_PARAM_<KEY>`), in
/// matrix order: made once per template, not once per attempt.
pub(crate) fn param_names(template: &TaskTemplate) -> Vec<String> {
    template.matrix.iter().map(|axis| format!("DLAUNCH_PARAM_{}", axis.key.to_ascii_uppercase())).collect()
}

/// The entries of `env` sorted by name, stably, as `TemplateRecord::split` takes them, taken
/// out of `env` (no second vector: a process's environment is over a kilobyte, which glibc's
/// allocator serves slowly). `order` is the permutation that sorted the template's last
/// environment: its processes list the same names in the same order (unless roles or other
/// launchers' names tell them apart), so that order is checked, one comparison per entry,
/// before the names are sorted anew.
pub(crate) fn by_name<'e, 's>(
    env: &'e mut [Entry<'s>],
    order: &'e mut Vec<usize>,
) -> impl Iterator<Item = Entry<'s>> + 'e {
    // Increasing by (name, position) is the one order a stable sort by name gives.
    let still = order.len() == env.len()
        && order.windows(2).all(|pair| (&env[pair[0]].0, pair[0]) < (&env[pair[1]].0, pair[1]));
    if !still {
        order.clear();
        order.extend(0..env.len());
        order.sort_by(|&a, &b| env[a].0.cmp(&env[b].0));
    }
    order.iter().map(|&at| std::mem::take(&mut env[at]))
}

/// An entry built as owned strings.
pub(crate) fn owned<'a>((name, value): (String, String)) -> Entry<'a> {
    (Cow::Owned(name), Cow::Owned(value))
}

/// A number as text, without an allocation for the small ones: ranks and sizes within a node
/// or a small gang are most of the numbers in an environment.
fn number<'a>(n: usize) -> Cow<'a, str> {
    const SMALL: [&str; 16] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15"];
    SMALL.get(n).map_or_else(|| Cow::Owned(n.to_string()), |text| Cow::Borrowed(*text))
}

/// Where the processes of one role run, in role order: (role, its sites).
pub(crate) fn sites_by_role<'s>(template: &'s TaskTemplate, sites: &'s [Site]) -> Vec<(&'s Role, &'s [Site])> {
    let mut first = 0;
    template
        .roles
        .iter()
        .map(|role| {
            let end = (first + role.processes as usize).min(sites.len());
            let part = (role, &sites[first.min(end)..end]);
            first = end;
            part
        })
        .collect()
}

/// The role variables of a task with roles: who this process is, where every role runs, and
/// `TF_CONFIG` with the roles as TensorFlow's task types.
fn role_env(template: &TaskTemplate, sites: &[Site], process: usize) -> Vec<(String, String)> {
    let mut env = Vec::new();
    let by_role = sites_by_role(template, sites);
    let mut first = 0;
    let mut cluster = serde_json::Map::new();
    let mut me = None;
    for (role, part) in &by_role {
        let hosts: Vec<String> = part.iter().map(|s| host_port(&s.addr, s.port)).collect();
        env.push((format!("DLAUNCH_ROLE_{}_HOSTS", role.name.to_ascii_uppercase()), hosts.join(",")));
        if (first..first + part.len()).contains(&process) {
            me = Some((*role, process - first));
        }
        cluster.insert(role.name.clone(), hosts.into());
        first += part.len();
    }
    let roles: Vec<String> = by_role.iter().map(|(r, part)| format!("{}:{}", r.name, part.len())).collect();
    env.push(("DLAUNCH_ROLES".into(), roles.join(",")));
    if let Some((role, index)) = me {
        env.push(("DLAUNCH_ROLE".into(), role.name.clone()));
        env.push(("DLAUNCH_ROLE_INDEX".into(), index.to_string()));
        env.push(("DLAUNCH_ROLE_SIZE".into(), role.processes.to_string()));
        for (label, port) in role.ports.iter().zip(&sites[process].labelled) {
            env.push((format!("DLAUNCH_PORT_{}", label.to_ascii_uppercase()), port.to_string()));
        }
        let tf = serde_json::json!({ "cluster": cluster, "task": { "type": role.name, "index": index } });
        env.push(("TF_CONFIG".into(), tf.to_string()));
    }
    env
}

/// The shell line that holds a role's command back until every process of the role it
/// waits for accepts connections on its port. `dlaunch wait-for` (the worker's own binary,
/// `DLAUNCH_EXE`) connects to each address of `DLAUNCH_ROLE_<NAME>_HOSTS` until all answer;
/// when they do not within the timeout it explains on stderr, leaves [`WAIT_MARKER`] in the
/// process's log directory and exits [`WAIT_FAILED`]: the worker reads that pair as
/// `Ending::WaitFailed`, and the command's own exit 69 stays an exit 69. The log directory is
/// named through `$DLAUNCH_TASK_DIR` (`log_dir_in_task` is relative to it), which the worker
/// moves to its node-local directory in returned mode, as it moves the log directory itself.
pub fn wait_line(waited: &Role, timeout: std::time::Duration, log_dir_in_task: &std::path::Path) -> String {
    format!(
        "\"$DLAUNCH_EXE\" wait-for --role {name} --timeout {secs} --marker \"$DLAUNCH_TASK_DIR\"/{marker} \"$DLAUNCH_ROLE_{upper}_HOSTS\" || exit {WAIT_FAILED}\n",
        name = waited.name,
        secs = timeout.as_secs().max(1),
        marker = crate::substitute::shell_quote(&log_dir_in_task.join(WAIT_MARKER).to_string_lossy()),
        upper = waited.name.to_ascii_uppercase(),
    )
}

/// Reads what `DLAUNCH_ROLE_<NAME>_HOSTS` holds: `host:port` or `[v6]:port`, comma-separated.
pub fn parse_host_list(text: &str) -> Result<Vec<(String, u16)>, String> {
    text.split(',')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let (host, port) = part.rsplit_once(':').ok_or_else(|| format!("{part:?} is not host:port"))?;
            let port = port.parse().map_err(|_| format!("{part:?}: {port:?} is not a port"))?;
            let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
            Ok((host.to_string(), port))
        })
        .collect()
}

/// The exit status of a process whose `wait_for` timed out (EX_UNAVAILABLE: a service needed
/// did not answer).
pub const WAIT_FAILED: i32 = 69;

/// The file a failed `dlaunch wait-for` leaves in the process's log directory.
pub const WAIT_MARKER: &str = "wait-for-failed";

/// `CUDA_VISIBLE_DEVICES` for one of several processes of a task on one worker that see each
/// other's GPUs (`gpu_visibility = "task"`): all their GPUs, each process's in the order of
/// the processes, so process k of them finds its own from index `k × gpus`. Returns the list
/// and where `own` starts in it.
pub(crate) fn task_visible_gpus(mates: &[Vec<String>], own: usize) -> (Vec<String>, usize) {
    let offset = mates[..own.min(mates.len())].iter().map(Vec::len).sum();
    (mates.concat(), offset)
}

/// What placement decided, as variables: devices, threads, and the binding for the curious.
/// `visible`: the GPUs the process sees (its own, or with `gpu_visibility = "task"` those of
/// its gang on this worker) and the index of its first own GPU in that list (see
/// [`task_visible_gpus`]).
pub(crate) fn placement_env(
    cpu_list: &str,
    numa_list: &str,
    gpu_ids: &[String],
    (visible, offset): (&[String], usize),
    amd: bool,
    cpus: u32,
) -> Vec<(String, String)> {
    let visible = visible.join(",");
    let mut env = vec![
        ("CUDA_VISIBLE_DEVICES".to_string(), if amd { String::new() } else { visible.clone() }),
        ("OMP_NUM_THREADS".to_string(), cpus.max(1).to_string()),
        ("DLAUNCH_CPUS".to_string(), cpu_list.to_string()),
        ("DLAUNCH_NUMA_NODES".to_string(), numa_list.to_string()),
        ("DLAUNCH_GPUS".to_string(), gpu_ids.join(",")),
        ("DLAUNCH_GPU_OFFSET".to_string(), offset.to_string()),
    ];
    if amd {
        env.push(("ROCR_VISIBLE_DEVICES".to_string(), visible.clone()));
        env.push(("HIP_VISIBLE_DEVICES".to_string(), visible));
    }
    env
}

/// What every task of a worker inherits: its own environment minus the launcher's variables.
/// Filtered once per worker: doing it per process cloned and sorted every variable, OMPI_*
/// ones too, for each of them (about 7 % of a worker's CPU for a `true` task).
pub(crate) fn inheritable(inherited: impl IntoIterator<Item = (OsString, OsString)>) -> BTreeMap<OsString, OsString> {
    inherited.into_iter().filter(|(k, _)| !k.to_str().is_some_and(is_launcher_variable)).collect()
}

/// The final environment: the inheritable one, then each layer in order.
pub(crate) fn compose(
    inheritable: &BTreeMap<OsString, OsString>,
    layers: &[&[(String, String)]],
) -> BTreeMap<OsString, OsString> {
    let mut env = inheritable.clone();
    for layer in layers {
        for (key, value) in layer.iter() {
            env.insert(key.into(), value.into());
        }
    }
    env
}

/// `TF_CONFIG` for MultiWorkerMirroredStrategy, every process a worker at its host:port, up to
/// the process's index: `{"cluster":{"worker":[...]},"task":{"index":`. Written as
/// `serde_json` writes the whole object (keys sorted), which a test checks, so that a gang's
/// address list is encoded once, not once per process.
fn tf_config_prefix(workers: Vec<String>) -> String {
    let list = serde_json::Value::from(workers).to_string();
    format!("{{\"cluster\":{{\"worker\":{list}}},\"task\":{{\"index\":")
}

/// `TF_CONFIG` of process `process`, from [`tf_config_prefix`].
fn tf_config_of(prefix: &str, process: usize) -> String {
    format!("{prefix}{process},\"type\":\"worker\"}}}}")
}

pub(crate) fn host_port(addr: &str, port: u16) -> String {
    if addr.contains(':') { format!("[{addr}]:{port}") } else { format!("{addr}:{port}") }
}

fn path_text(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process that sees exactly its own GPUs.
    fn own_only(cpus: &str, numa: &str, gpus: &[String], amd: bool, n: u32) -> Vec<(String, String)> {
        placement_env(cpus, numa, gpus, (gpus, 0), amd, n)
    }

    fn job_and_task() -> (tempfile::TempDir, Job, Task) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job.toml");
        std::fs::write(
            &file,
            "[job]\nname = \"j\"\nenv = { A = \"job\" }\n[[tasks]]\nname = \"t\"\ncommand = \"run {lr}\"\nmatrix = { lr = [0.5] }\nenv = { B = \"task\" }\n",
        )
        .unwrap();
        let job = crate::spec::load(&file).unwrap();
        let task = crate::plan::expand(&job).unwrap().remove(0);
        (dir, job, task)
    }

    fn site(rank: u32, host: &str, port: u16) -> Site {
        Site { rank, host: host.into(), addr: format!("10.0.0.{}", &host[4..]).into(), port, labelled: vec![] }
    }

    /// What rank 0 sends for process `process`, before the record takes its share.
    fn built(
        job: &Job,
        task: &Task,
        template: &TaskTemplate,
        attempt: u32,
        sites: &[Site],
        process: usize,
    ) -> Vec<(String, String)> {
        let names = param_names(template);
        let attempt = AttemptEnv::new(job, task, template, &names, attempt, sites);
        attempt.process(process).into_iter().map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
    }

    fn lookup<'a>(env: &'a [(String, String)], key: &str) -> &'a str {
        env.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("{key} missing"))
    }

    #[test]
    fn single_process_contract() {
        let (_dir, job, task) = job_and_task();
        let env = built(&job, &task, &job.templates[0], 2, &[site(3, "node1", 29500)], 0);
        for (key, value) in [
            ("A", "job"),
            ("B", "task"),
            ("DLAUNCH_JOB_NAME", "j"),
            ("DLAUNCH_TASK_ID", "t[lr=0.5]"),
            ("DLAUNCH_TASK_NAME", "t"),
            ("DLAUNCH_TASK_INDEX", "0"),
            ("DLAUNCH_ATTEMPT", "2"),
            ("DLAUNCH_WORKER_RANK", "3"),
            ("DLAUNCH_HOST", "node1"),
            ("DLAUNCH_PARAM_LR", "0.5"),
            ("WORLD_SIZE", "1"),
            ("WORLD_RANK", "0"),
            ("RANK", "0"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "1"),
            ("NODE_RANK", "0"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "29500"),
        ] {
            assert_eq!(lookup(&env, key), value, "{key}");
        }
        assert!(lookup(&env, "DLAUNCH_TASK_DIR").ends_with("runs/j/tasks/t[lr=0.5]"));
        // `task_dir = false`: no directory, so no name for one.
        let mut without = job.templates[0].clone();
        without.task_dir = false;
        let env = built(&job, &task, &without, 2, &[site(3, "node1", 29500)], 0);
        assert!(env.iter().all(|(k, _)| k != "DLAUNCH_TASK_DIR"), "{env:?}");
    }

    #[test]
    fn gang_ranks_locality_and_rendezvous() {
        let (_dir, job, task) = job_and_task();
        let sites =
            [site(1, "node1", 29500), site(1, "node1", 29501), site(2, "node2", 29500), site(2, "node2", 29501)];
        let envs: Vec<Vec<(String, String)>> =
            (0..4).map(|p| built(&job, &task, &job.templates[0], 0, &sites, p)).collect();
        let get = |p: usize, key: &str| lookup(&envs[p], key).to_string();
        assert_eq!((0..4).map(|p| get(p, "RANK")).collect::<Vec<_>>(), ["0", "1", "2", "3"]);
        assert_eq!((0..4).map(|p| get(p, "LOCAL_RANK")).collect::<Vec<_>>(), ["0", "1", "0", "1"]);
        assert_eq!((0..4).map(|p| get(p, "NODE_RANK")).collect::<Vec<_>>(), ["0", "0", "1", "1"]);
        assert!((0..4).all(|p| get(p, "WORLD_SIZE") == "4" && get(p, "LOCAL_WORLD_SIZE") == "2"));
        assert!((0..4).all(|p| get(p, "MASTER_ADDR") == "10.0.0.1" && get(p, "MASTER_PORT") == "29500"));
        assert_eq!(get(3, "DLAUNCH_HOSTS"), "node1,node2");
        assert_eq!(get(2, "DLAUNCH_COORDINATOR_ADDRESS"), "10.0.0.1:29500");
        let tf: serde_json::Value = serde_json::from_str(&get(2, "TF_CONFIG")).unwrap();
        assert_eq!(tf["cluster"]["worker"][3], "10.0.0.2:29501");
        assert_eq!(tf["task"]["index"], 2);
        assert_eq!(tf["task"]["type"], "worker");
    }

    /// Built once per attempt, each process's environment is the one computed for it alone,
    /// entry for entry and in the same order (so the same entry of a name given twice wins):
    /// singles, gangs over hosts in any order, large ranks and attempts, IPv6 addresses,
    /// roles with ports, no task directory.
    #[test]
    fn an_attempts_environments_are_each_processs_own() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job.toml");
        std::fs::write(
            &file,
            "[job]\nname = \"j\"\nenv = { A = \"job\", B = \"job\" }\n\
             [[tasks]]\nname = \"t\"\ncommand = \"run {lr} {m}\"\nmatrix = { lr = [0.5, 1], m = [\"x y\"] }\nenv = { B = \"task\" }\n\
             [[tasks]]\nname = \"g\"\ncommand = \"run\"\nprocesses = 20\ntask_dir = false\n\
             [[tasks]]\nname = \"r\"\ncommand = \"serve\"\n\
             [[tasks.roles]]\nname = \"ps\"\nports = [\"http\", \"grpc\"]\n\
             [[tasks.roles]]\nname = \"worker\"\nprocesses = 3\n",
        )
        .unwrap();
        let job = crate::spec::load(&file).unwrap();
        let tasks = crate::plan::expand(&job).unwrap();
        let at = |rank: u32, host: &str, addr: &str, port: u16, labelled: &[u16]| Site {
            rank,
            host: host.into(),
            addr: addr.into(),
            port,
            labelled: labelled.to_vec(),
        };
        let shapes: Vec<Vec<Site>> = vec![
            vec![at(3, "a", "10.0.0.1", 29500, &[])],
            (0..20)
                .map(|p| at(p % 7 + 1, ["a", "b", "c"][(p * 5 % 3) as usize], "10.0.0.2", 29500 + p as u16, &[]))
                .collect(),
            (0..4)
                .map(|p| at(40 + p, ["h1", "h2"][(p / 2) as usize], "::1", 31000 + p as u16, &[32000, 32001]))
                .collect(),
        ];
        let mut compared = 0;
        for task in &tasks {
            let template = &job.templates[task.template];
            for sites in shapes.iter().filter(|s| s.len() == 1 || s.len() as u32 == template.processes) {
                for attempt in [0, 17] {
                    let names = param_names(template);
                    let each = AttemptEnv::new(&job, task, template, &names, attempt, sites);
                    for p in 0..sites.len() {
                        let reference = task_env(&job, task, template, attempt, sites, p);
                        let got: Vec<(String, String)> =
                            each.process(p).into_iter().map(|(k, v)| (k.into_owned(), v.into_owned())).collect();
                        assert_eq!(got, reference, "{} process {p} of {}", task.id, sites.len());
                        compared += 1;
                    }
                }
            }
        }
        assert_eq!(compared, 2 * (2 + 21 + 5), "every shape of every template");
    }

    /// A template's last order is reused only where it sorts as a stable sort would, names
    /// given twice included (the last of a name is the one a process gets).
    #[test]
    fn environments_sort_by_name_stably_with_the_last_order_or_a_new_one() {
        let entries = |names: &[&'static str]| -> Vec<Entry<'static>> {
            names.iter().enumerate().map(|(i, name)| (Cow::Borrowed(*name), Cow::Owned(i.to_string()))).collect()
        };
        let mut order = Vec::new();
        let mut reused = 0;
        for names in [
            &["B", "A", "C", "A"][..],
            &["B", "A", "C", "A"],
            &["D", "A", "E", "A"],
            &["A", "A", "B", "C"],
            &["B", "A"],
            // The last order, [1, 0], sorts these names but puts the later "A" first.
            &["A", "A"],
            &[],
        ] {
            let mut env = entries(names);
            let mut stable = env.clone();
            stable.sort_by(|a, b| a.0.cmp(&b.0));
            let before = order.clone();
            assert_eq!(by_name(&mut env, &mut order).collect::<Vec<_>>(), stable, "{names:?}");
            reused += usize::from(!before.is_empty() && before == order);
        }
        assert_eq!(reused, 2, "the same names twice, and other names in the same order");
    }

    #[test]
    fn launcher_variables_are_removed_and_layers_override() {
        let inherited = [
            ("PATH", "/bin"),
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("PMIX_RANK", "3"),
            ("PMI_FD", "5"),
            ("SLURM_PROCID", "3"),
            ("SLURM_STEP_GPUS", "0"),
            ("SLURM_JOB_ID", "42"),
            ("CUDA_VISIBLE_DEVICES", "0,1"),
            ("OMP_NUM_THREADS", "64"),
            ("MY_SETTING", "kept"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        let placement = own_only("0-3", "0", &["1".to_string()], false, 4);
        let user = [("OMP_NUM_THREADS".to_string(), "2".to_string())];
        let contract = [("RANK".to_string(), "0".to_string())];
        let env = compose(&inheritable(inherited), &[&placement, &user, &contract]);
        let get = |k: &str| env.get(&OsString::from(k)).map(|v| v.to_string_lossy().into_owned());
        for gone in ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_FD", "SLURM_PROCID", "SLURM_STEP_GPUS"] {
            assert_eq!(get(gone), None, "{gone}");
        }
        assert_eq!(get("SLURM_JOB_ID").as_deref(), Some("42"), "job-level SLURM variables stay");
        assert_eq!(get("MY_SETTING").as_deref(), Some("kept"));
        assert_eq!(get("CUDA_VISIBLE_DEVICES").as_deref(), Some("1"), "placement replaces the inherited GPUs");
        assert_eq!(get("OMP_NUM_THREADS").as_deref(), Some("2"), "the user may tune threads");
        assert_eq!(get("DLAUNCH_CPUS").as_deref(), Some("0-3"));
    }

    #[test]
    fn gang_mates_see_all_their_gpus_with_their_own_at_their_index() {
        let mates = vec![vec!["8".to_string()], vec!["9".to_string()], vec!["12".to_string()]];
        let (visible, offset) = task_visible_gpus(&mates, 2);
        assert_eq!((visible.join(","), offset), ("8,9,12".to_string(), 2));
        let env = placement_env("0", "0", &mates[2], (&visible, offset), false, 1);
        assert!(env.contains(&("CUDA_VISIBLE_DEVICES".into(), "8,9,12".into())));
        assert!(env.contains(&("DLAUNCH_GPUS".into(), "12".into())));
        assert!(env.contains(&("DLAUNCH_GPU_OFFSET".into(), "2".into())));
        assert_eq!(parse_host_list("a:1,[::1]:2").unwrap(), [("a".to_string(), 1), ("::1".to_string(), 2)]);
        assert!(parse_host_list("a").is_err());
    }

    #[test]
    fn cpu_only_tasks_see_no_gpus_and_amd_gets_rocm_variables() {
        let env = own_only("", "", &[], false, 0);
        assert!(env.contains(&("CUDA_VISIBLE_DEVICES".into(), String::new())));
        assert!(env.contains(&("OMP_NUM_THREADS".into(), "1".into())));
        let env = own_only("0", "0", &["2".into(), "3".into()], true, 1);
        assert!(env.contains(&("ROCR_VISIBLE_DEVICES".into(), "2,3".into())));
        assert!(env.contains(&("HIP_VISIBLE_DEVICES".into(), "2,3".into())));
    }
}
