//! End to end on a real multi-node SLURM cluster: `sbatch slurm/dlaunch.sbatch job.toml` with
//! dlaunch's ranks on three "nodes" (network, UTS and mount namespaces of this machine, started
//! by scripts/slurm-cluster/start.sh), real TCP between them, fake gres GPUs.
//!
//! The cluster's `env.sh` is named by DLAUNCH_SLURM_ENV. scripts/test.sh starts a cluster, sets
//! DLAUNCH_SLURM_ENV and DLAUNCH_REQUIRE_SLURM=1, runs these tests and stops the cluster again;
//! without DLAUNCH_SLURM_ENV a bare `cargo test` says they skipped. The cluster has 3 nodes × 4
//! CPUs: the tests take turns (one lock), and each leaves the queue empty.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;

const TEMPLATE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/slurm/dlaunch.sbatch");
const START: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/slurm/dlaunch-start.sh");
const RENDEZVOUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gang/rendezvous.py");

/// One scenario at a time: the cluster is small, and each test expects an idle queue.
static TURN: Mutex<()> = Mutex::new(());

/// The running test cluster, held for one test. Dropping it cancels whatever jobs are left
/// (also the follow-up jobs the template submitted), so a failed test cannot disturb the next.
/// The test cluster whole: three nodes, two ranks and two GPUs on each.
const THREE_NODES: [&str; 5] = ["-N", "3", "--ntasks-per-node=2", "--gpus-per-node=2", "--time=10"];

struct Cluster {
    env: BTreeMap<String, String>,
    _turn: MutexGuard<'static, ()>,
}

/// The cluster, or None (test skipped) when none is configured. With DLAUNCH_REQUIRE_SLURM=1
/// a missing or dead cluster fails the test instead.
fn cluster() -> Option<Cluster> {
    let turn = TURN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let required = std::env::var("DLAUNCH_REQUIRE_SLURM").is_ok_and(|v| v == "1");
    let unavailable = |why: String| {
        assert!(!required, "a SLURM cluster is required here (DLAUNCH_REQUIRE_SLURM=1) but {why}: run scripts/test.sh");
        eprintln!("skipped: {why} (scripts/test.sh starts a test cluster)");
    };
    let Some(path) = std::env::var_os("DLAUNCH_SLURM_ENV") else {
        unavailable("DLAUNCH_SLURM_ENV is not set".into());
        return None;
    };
    let Some(env) = source_env(Path::new(&path)) else {
        unavailable(format!("{} cannot be read", Path::new(&path).display()));
        return None;
    };
    let cluster = Cluster { env, _turn: turn };
    let ping = cluster.command("scontrol").arg("ping").output();
    if !ping.as_ref().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("UP")) {
        unavailable(format!("slurmctld does not answer `scontrol ping` ({ping:?})"));
        return None;
    }
    cluster.wait_for_empty_queue();
    Some(cluster)
}

/// The variables `. env.sh` sets or changes.
fn source_env(path: &Path) -> Option<BTreeMap<String, String>> {
    let out = Command::new("bash").args(["-c", ". \"$1\" >/dev/null && env -0", "env.sh"]).arg(path).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let env: BTreeMap<String, String> = text
        .split('\0')
        .filter_map(|entry| entry.split_once('='))
        .filter(|(key, value)| std::env::var(key).ok().as_deref() != Some(value))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect();
    env.contains_key("SLURM_CONF").then_some(env)
}

/// What `scontrol show job` says about a job: KEY=VALUE words; Command, WorkDir, StdOut and
/// StdErr to the end of their line (they may hold spaces).
type JobInfo = BTreeMap<String, String>;

const TERMINAL_STATES: &[&str] = &[
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
];

impl Cluster {
    fn var(&self, name: &str) -> String {
        self.env.get(name).cloned().unwrap_or_else(|| panic!("{name} is not in the cluster's env.sh"))
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.envs(&self.env);
        command
    }

    /// Runs a SLURM client command and returns its stdout; panics when it fails.
    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.command(program).args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(out.status.success(), "{program} {args:?} failed: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `sbatch --parsable <args> slurm/dlaunch.sbatch <script_args>` in `dir`; the job id.
    fn submit(&self, dir: &Path, args: &[&str], script_args: &[&str], env: &[(&str, &str)]) -> String {
        let mut all: Vec<&str> = args.to_vec();
        all.push(TEMPLATE);
        all.extend_from_slice(script_args);
        self.sbatch(dir, &all, env)
    }

    /// `sbatch --parsable <args>` in `dir`; the job id (of the first component of a
    /// heterogeneous job).
    fn sbatch(&self, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> String {
        let mut command = self.command("sbatch");
        command.current_dir(dir).arg("--parsable").args(args).envs(env.iter().copied());
        let out = command.output().expect("sbatch");
        assert!(out.status.success(), "sbatch failed: {}", text(&out));
        let id = String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap_or_default().to_string();
        assert!(id.parse::<u64>().is_ok(), "sbatch printed no job id: {}", text(&out));
        id
    }

    /// The job as slurmctld knows it (finished jobs stay known for MinJobAge, 300 s); of a
    /// heterogeneous job, the first component's record.
    fn job(&self, id: &str) -> Option<JobInfo> {
        let out = self.command("scontrol").args(["show", "job", id]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        let mut info = JobInfo::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let line = line.trim();
            let whole = ["Command=", "WorkDir=", "StdOut=", "StdErr="].iter().any(|k| line.starts_with(k));
            if whole {
                if let Some((key, value)) = line.split_once('=') {
                    info.entry(key.to_string()).or_insert_with(|| value.to_string());
                }
                continue;
            }
            for word in line.split_whitespace() {
                if let Some((key, value)) = word.split_once('=') {
                    info.entry(key.to_string()).or_insert_with(|| value.to_string());
                }
            }
        }
        Some(info)
    }

    /// Polls `scontrol show job` (sbatch --wait answers ~10 s late) until `done` holds.
    fn wait_job(&self, id: &str, limit: Duration, what: &str, done: impl Fn(&JobInfo) -> bool) -> JobInfo {
        let start = Instant::now();
        loop {
            let info = self.job(id);
            if let Some(info) = info.as_ref().filter(|i| done(i)) {
                return info.clone();
            }
            if start.elapsed() > limit {
                panic!("job {id}: {what} not within {limit:?}\n{info:#?}\n{}", self.job_output(id));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn wait_end(&self, id: &str, limit: Duration) -> JobInfo {
        self.wait_job(id, limit, "end", |i| TERMINAL_STATES.contains(&i["JobState"].as_str()))
    }

    /// The batch script's output (stdout and stderr: the template has no separate --error).
    fn job_output(&self, id: &str) -> String {
        let path = self.job(id).and_then(|i| i.get("StdOut").cloned()).unwrap_or_default();
        let body = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("({e})"));
        format!("----- output of job {id} ({path}):\n{body}-----")
    }

    /// Runs the job in `dir` on all three nodes, two ranks each, and waits for it to complete
    /// with exit 0; its id and output.
    fn complete_on_three_nodes(&self, dir: &Path, dlaunch: &str) -> (String, String) {
        let id = self.submit(dir, &THREE_NODES, &["job.toml"], &[("DLAUNCH", dlaunch)]);
        let end = self.wait_end(&id, Duration::from_secs(240));
        let output = self.job_output(&id);
        assert_eq!((end["JobState"].as_str(), end["ExitCode"].as_str()), ("COMPLETED", "0:0"), "{output}");
        (id, output)
    }

    fn queue(&self) -> Vec<String> {
        self.run("squeue", &["-h", "-o", "%i"]).split_whitespace().map(str::to_string).collect()
    }

    fn wait_for_empty_queue(&self) {
        let idle = eventually(Duration::from_secs(60), || self.queue().is_empty());
        assert!(idle, "the test cluster's queue is not empty: {:?}", self.queue());
    }

    /// Node name → address, from env.sh.
    fn node_addrs(&self) -> BTreeMap<String, String> {
        let names = self.var("DLAUNCH_SLURM_NODE_NAMES");
        let addrs = self.var("DLAUNCH_SLURM_NODE_ADDRS");
        names.split_whitespace().map(str::to_string).zip(addrs.split_whitespace().map(str::to_string)).collect()
    }

    /// "192.168.77.0/24" → "192.168.77." (env.sh's subnet is always a /24).
    fn subnet_prefix(&self) -> String {
        let cidr = self.var("DLAUNCH_SLURM_SUBNET_CIDR");
        let net = cidr.strip_suffix(".0/24").unwrap_or_else(|| panic!("unexpected subnet {cidr}"));
        format!("{net}.")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let Ok(out) = self.command("squeue").args(["-h", "-o", "%i"]).output() else { return };
        let left: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_string).collect();
        if left.is_empty() {
            return;
        }
        eprintln!("cancelling jobs left by this test: {left:?}");
        let _ = self.command("scancel").args(&left).status();
        eventually(Duration::from_secs(60), || {
            self.command("squeue").args(["-h", "-o", "%i"]).output().is_ok_and(|o| o.stdout.is_empty())
        });
    }
}

fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" }
}

/// "0,1" or "0-1" → {"0", "1"}.
fn id_set(list: &str) -> BTreeSet<String> {
    parse_cpu_list(list).into_iter().map(|id| id.to_string()).collect()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

/// Scenario 1: 3 nodes × 2 ranks × 2 GPUs. Single-GPU tasks spread over all nodes, each within
/// the GPUs SLURM granted its rank; a 6-process gang across the nodes meets at MASTER_ADDR over
/// real TCP between the namespaces; OpenMPI's interface settings reach dlaunch, and none of
/// dlaunch's descriptors reaches a task.
#[test]
fn spread_over_nodes_with_granted_gpus_and_a_gang_across_nodes() {
    let Some(cluster) = cluster() else { return };
    let started = Instant::now();
    let dir = JobDir::new("");
    let path = dir.path();
    let barrier_dir = path.join("barrier");
    let ranks_dir = path.join("ranks");
    std::fs::create_dir_all(&barrier_dir).unwrap();
    std::fs::create_dir_all(&ranks_dir).unwrap();
    // The six single-GPU tasks wait for each other: they provably hold their GPUs at once.
    let gpu_command = format!(
        "ls /proc/$$/fd; env > $DLAUNCH_TASK_DIR/env; {}; [ $(ls {} | wc -l) -ge 6 ]",
        barrier(&barrier_dir, 6),
        barrier_dir.display()
    );
    let job = format!(
        "[job]\nname = \"spread\"\n\n[[tasks]]\nname = \"gpu\"\ncommand = '{gpu_command}'\nmatrix = {{ i = [1, 2, 3, 4, 5, 6] }}\ngpus = 1\ntimeout = \"3m\"\n\n[[tasks]]\nname = \"gang\"\ncommand = \"{} {RENDEZVOUS}\"\nprocesses = 6\nprocesses_per_node = 2\ngpus = 1\ntimeout = \"3m\"\n",
        python()
    );
    std::fs::write(dir.job(), job).unwrap();
    // DLAUNCH may be a wrapper that execs dlaunch: this one writes down what SLURM gave each
    // rank (dlaunch removes the step's variables from tasks), and the job's gres per node.
    let wrapper = path.join("record-rank");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nout={r}/$SLURM_PROCID.env\n{{ echo \"HOST=$(hostname)\"; env | grep -E '^(SLURM_[A-Z_]+|CUDA_VISIBLE_DEVICES|GPU_DEVICE_ORDINAL|OMPI_MCA_[a-z_]+)='; }} > $out.tmp && mv $out.tmp $out\n[ \"$SLURM_PROCID\" = 0 ] && scontrol show job -d \"$SLURM_JOB_ID\" > {r}/job-detail.txt\nexec {DLAUNCH} \"$@\"\n",
            r = ranks_dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let (id, output) = cluster.complete_on_three_nodes(path, wrapper.to_str().unwrap());
    // MpiDefault is pmix on the test cluster: the template adds no --mpi.
    assert!(output.contains(&format!("dlaunch.sbatch: srun {} job.toml", wrapper.display())), "{output}");
    assert!(!output.contains("resubmitting"), "{output}");

    let summary = dir.summary("spread");
    assert_eq!(summary["exit_code"], 0);
    assert_eq!(summary["slurm_job_id"], id.as_str());
    assert_eq!(summary["counts"]["succeeded"], 7, "{summary:#}");

    // What SLURM gave each of the 6 ranks: 2 per node, the node's 2 GPUs, and env.sh's
    // OpenMPI interface settings (the private subnet, never the machine's own interface).
    let subnet = cluster.var("DLAUNCH_SLURM_SUBNET_CIDR");
    let ranks: BTreeMap<u32, BTreeMap<String, String>> =
        (0..6).map(|r| (r, read_env(&ranks_dir.join(format!("{r}.env"))))).collect();
    let mut ranks_per_host: BTreeMap<String, usize> = BTreeMap::new();
    for env in ranks.values() {
        *ranks_per_host.entry(env["HOST"].clone()).or_default() += 1;
        assert_eq!(env["OMPI_MCA_btl_tcp_if_include"], subnet, "{env:?}");
        assert_eq!(env["OMPI_MCA_oob_tcp_if_include"], subnet, "{env:?}");
    }
    let nodes: BTreeSet<String> = cluster.node_addrs().into_keys().collect();
    assert_eq!(ranks_per_host.keys().cloned().collect::<BTreeSet<_>>(), nodes);
    assert!(ranks_per_host.values().all(|&n| n == 2), "{ranks_per_host:?}");
    // The job's gres per node, as slurmctld recorded it: "Nodes=node[1-3] ... GRES=gpu:2(IDX:0-1)".
    let detail = std::fs::read_to_string(ranks_dir.join("job-detail.txt")).unwrap();
    let mut gres: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in detail.lines().map(str::trim).filter(|l| l.starts_with("Nodes=")) {
        let field = |key: &str| line.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap_or_default();
        let idx = field("GRES=").split("IDX:").nth(1).and_then(|s| s.split(')').next()).unwrap_or_default();
        for node in cluster.run("scontrol", &["show", "hostnames", field("Nodes=")]).split_whitespace() {
            gres.insert(node.to_string(), id_set(idx));
        }
    }
    assert_eq!(gres.keys().cloned().collect::<BTreeSet<_>>(), nodes, "{detail}");
    for env in ranks.values() {
        assert_eq!(id_set(&env["CUDA_VISIBLE_DEVICES"]), gres[&env["HOST"]], "rank's grant vs gres: {env:?}");
    }

    // dlaunch's view of its ranks: every worker advertised an address in the private subnet.
    let prefix = cluster.subnet_prefix();
    let hellos: Vec<&str> = output.lines().filter(|l| l.contains("INFO: rank ") && l.contains(" on node")).collect();
    assert_eq!(hellos.len(), 5, "{output}");
    assert!(hellos.iter().all(|l| l.contains(&format!("({prefix}"))), "{output}");

    // Six single-GPU tasks on three nodes, two per node; each task's GPU within its rank's
    // grant, no GPU given twice on a node, the launcher's step variables gone.
    let tasks = tasks_by_id(&summary);
    let mut gpus_per_host: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for i in 1..=6 {
        let task = &tasks[&format!("gpu[i={i}]")];
        let host = task["host"].as_str().unwrap().to_string();
        let env = read_env(&dir.output("spread").join(format!("tasks/gpu[i={i}]/env")));
        let rank: u32 = env["DLAUNCH_WORKER_RANK"].parse().unwrap();
        assert_eq!(env["DLAUNCH_HOST"], host);
        assert_eq!(ranks[&rank]["HOST"], host, "task ran on its rank's host");
        let granted = id_set(&ranks[&rank]["CUDA_VISIBLE_DEVICES"]);
        let gpu = env["CUDA_VISIBLE_DEVICES"].clone();
        assert!(granted.contains(&gpu) && !gpu.contains(','), "task GPU {gpu} not one of rank {rank}'s {granted:?}");
        assert_eq!(id_set(&env["SLURM_JOB_GPUS"]), gres[&host], "SLURM_JOB_GPUS stays, as the gres");
        for step_var in ["SLURM_PROCID", "SLURM_STEP_GPUS", "GPU_DEVICE_ORDINAL", "SLURM_NTASKS", "PMIX_RANK"] {
            assert!(!env.contains_key(step_var), "{step_var} reached a task: {env:?}");
        }
        // Nothing of dlaunch's own (its TCP connections to the other nodes, the PMIx socket
        // to slurmstepd) leaks into the task.
        // (Listed to stdout: dash keeps a copy of stdout, fd 10, while a redirection is active.)
        let fds =
            std::fs::read_to_string(dir.output("spread").join(format!("tasks/gpu[i={i}]/attempt-0/stdout"))).unwrap();
        assert_eq!(fds.split_whitespace().collect::<Vec<_>>(), ["0", "1", "2"], "descriptors of gpu[i={i}]");
        gpus_per_host.entry(host).or_default().push(gpu);
    }
    assert_eq!(gpus_per_host.keys().cloned().collect::<BTreeSet<_>>(), nodes, "{gpus_per_host:?}");
    for (host, gpus) in &gpus_per_host {
        let distinct: BTreeSet<&String> = gpus.iter().collect();
        assert_eq!((gpus.len(), distinct.len()), (2, 2), "{host}: {gpus:?}");
    }

    // The gang: 6 processes with a GPU each, 2 on each node (on node2 and node3 across two
    // dlaunch ranks), met at MASTER_ADDR:MASTER_PORT over TCP between the namespaces.
    let addrs = cluster.node_addrs();
    let gang: Vec<serde_json::Value> = (0..6)
        .map(|k| {
            let stdout = dir.output("spread").join(format!("tasks/gang/attempt-0/rank-{k}/stdout"));
            let text = std::fs::read_to_string(&stdout).unwrap_or_else(|e| panic!("{}: {e}", stdout.display()));
            serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap()
        })
        .collect();
    let hosts: Vec<String> = gang.iter().map(|p| p["host"].as_str().unwrap().to_string()).collect();
    let mut node_order: Vec<&String> = Vec::new();
    for (k, process) in gang.iter().enumerate() {
        assert_eq!(process["rank"], k);
        assert_eq!(process["world"], 6);
        assert_eq!(process["sum_of_ranks"], 15, "every process reached process 0: {process}");
        if !node_order.contains(&&hosts[k]) {
            node_order.push(&hosts[k]);
        }
        let local_rank = hosts[..k].iter().filter(|h| **h == hosts[k]).count();
        assert_eq!(process["local_rank"], local_rank, "{process}");
        assert_eq!(process["local_world"], 2, "{process}");
        assert_eq!(process["node_rank"], node_order.iter().position(|h| **h == hosts[k]).unwrap(), "{process}");
        let master = process["master"].as_str().unwrap();
        let (addr, _port) = master.rsplit_once(':').unwrap();
        assert_eq!(addr, addrs[&hosts[0]], "MASTER_ADDR is process 0's node: {process}");
        assert!(addr.starts_with(&prefix), "{process}");
    }
    assert_eq!(node_order.len(), 3, "the gang spans the three nodes: {hosts:?}");
    eprintln!("scenario spread/gpus/gang: {:.1} s", started.elapsed().as_secs_f64());
}

/// Scenario 2: the walltime warning (`--signal=B:USR1@…`, sent here at once with
/// `scancel -b --signal=USR1`) drains the job: running tasks get the job's stop_signal from
/// dlaunch (and never SLURM's SIGUSR1), are recorded as interrupted, the summary is written,
/// exit 3; a task whose walltime exceeds the time left is not started. The template submits a
/// follow-up with the same geometry, which finishes the rest and reruns nothing that finished.
#[test]
fn drained_job_resubmits_itself_and_the_follow_up_finishes_the_rest() {
    let Some(cluster) = cluster() else { return };
    let started = Instant::now();
    let dir = JobDir::new("");
    let path = dir.path();
    let markers = path.join("markers");
    std::fs::create_dir_all(&markers).unwrap();
    let m = markers.display();
    // long: the first attempt runs until stopped and notes which signals reached it.
    let long = format!(
        "echo \"$SLURM_JOB_ID start $DLAUNCH_ATTEMPT\" >> {m}/long.$DLAUNCH_PARAM_I; if [ $DLAUNCH_ATTEMPT = 0 ]; then trap \"echo $SLURM_JOB_ID USR1 >> {m}/long.$DLAUNCH_PARAM_I\" USR1; trap \"echo $SLURM_JOB_ID TERM >> {m}/long.$DLAUNCH_PARAM_I; exit 143\" TERM; while :; do sleep 0.2; done; fi"
    );
    let job = format!(
        "[job]\nname = \"drain\"\n\n[[tasks]]\nname = \"quick\"\ncommand = 'echo $SLURM_JOB_ID >> {m}/quick.$DLAUNCH_PARAM_I'\nmatrix = {{ i = [1, 2, 3] }}\n\n[[tasks]]\nname = \"long\"\ncommand = '{long}'\nmatrix = {{ i = [1, 2] }}\n\n[[tasks]]\nname = \"later\"\ncommand = 'echo $SLURM_JOB_ID >> {m}/later'\nwalltime = \"1h\"\n"
    );
    std::fs::write(dir.job(), job).unwrap();
    let geometry = THREE_NODES;
    // --hold: the follow-up waits for this test to look at the first job's results.
    let env = [("DLAUNCH", DLAUNCH), ("DLAUNCH_RESUBMIT_ARGS", "--hold")];
    let first = cluster.submit(path, &geometry, &["job.toml"], &env);

    // Drain once the quick tasks are done and both long ones run.
    let running = eventually(Duration::from_secs(120), || {
        (1..=3).all(|i| markers.join(format!("quick.{i}")).exists())
            && (1..=2).all(|i| markers.join(format!("long.{i}")).exists())
            && dir.journal("drain").iter().filter(|e| e["event"] == "attempt_ended").count() == 3
    });
    assert!(running, "tasks did not start\n{}", cluster.job_output(&first));
    let drain_started = Instant::now();
    cluster.run("scancel", &["--batch", "--signal=USR1", &first]);
    let end = cluster.wait_end(&first, Duration::from_secs(120));
    let drain_seconds = drain_started.elapsed().as_secs_f64();
    let output = cluster.job_output(&first);
    assert_eq!((end["JobState"].as_str(), end["ExitCode"].as_str()), ("FAILED", "3:0"), "{output}");
    assert!(output.contains("asking dlaunch's coordinator"), "{output}");

    let summary = dir.summary("drain");
    assert_eq!(summary["exit_code"], 3, "{summary:#}");
    assert_eq!(summary["slurm_job_id"], first.as_str());
    assert!(summary["stopped"].as_str().unwrap().contains("SIGUSR1"), "{summary:#}");
    assert_eq!((summary["counts"]["succeeded"].as_u64(), summary["counts"]["not_run"].as_u64()), (Some(3), Some(3)));
    let tasks = tasks_by_id(&summary);
    for i in 1..=2 {
        assert_eq!(tasks[&format!("long[i={i}]")]["status"], "interrupted", "{summary:#}");
        let seen = lines(&markers.join(format!("long.{i}")));
        assert_eq!(seen, [format!("{first} start 0"), format!("{first} TERM")], "stop_signal only, no SIGUSR1");
    }
    assert_eq!(tasks["later"]["attempts"], 0, "walltime 1h > time left: not started\n{summary:#}");
    assert!(!markers.join("later").exists());

    // The follow-up: queued behind the first job, with its geometry and the same arguments.
    let queue = cluster.queue();
    assert_eq!(queue.len(), 1, "one follow-up job: {queue:?}\n{output}");
    let second = queue[0].clone();
    let info = cluster.job(&second).unwrap();
    assert!(info["Dependency"].starts_with(&format!("afterany:{first}")), "{info:#?}");
    assert_eq!(info["Reason"], "JobHeldUser");
    assert_eq!(info["NumNodes"], "3-3");
    assert_eq!(info["NumTasks"], "6");
    assert!(info["NtasksPerN:B:S:C"].starts_with("2:"), "{info:#?}");
    assert_eq!(info["TresPerNode"], "gres:gpu:2");
    assert_eq!(info["TimeLimit"], "00:10:00");
    assert_eq!(info["Partition"], end["Partition"]);
    assert_eq!(info["Command"], format!("{TEMPLATE} job.toml"));
    assert_eq!(Path::new(&info["WorkDir"]), path);

    // More time for the follow-up, so that `later` fits, then let it run.
    cluster.run("scontrol", &["update", &format!("JobId={second}"), "TimeLimit=120"]);
    cluster.run("scontrol", &["release", &second]);
    let end = cluster.wait_end(&second, Duration::from_secs(180));
    let output = cluster.job_output(&second);
    assert_eq!((end["JobState"].as_str(), end["ExitCode"].as_str()), ("COMPLETED", "0:0"), "{output}");
    assert!(output.contains("follow-up 1 of at most 3"), "{output}");
    assert!(cluster.queue().is_empty(), "no third job");

    let summary = dir.summary("drain");
    assert_eq!(summary["exit_code"], 0, "{summary:#}");
    assert_eq!(summary["run"], 1);
    assert_eq!(summary["slurm_job_id"], second.as_str());
    assert_eq!(summary["counts"]["succeeded"], 6, "{summary:#}");
    for i in 1..=3 {
        assert_eq!(lines(&markers.join(format!("quick.{i}"))), vec![first.clone()], "finished tasks are not run again");
    }
    for i in 1..=2 {
        let seen = lines(&markers.join(format!("long.{i}")));
        assert_eq!(seen, [format!("{first} start 0"), format!("{first} TERM"), format!("{second} start 1")]);
    }
    assert_eq!(lines(&markers.join("later")), vec![second.clone()]);
    eprintln!(
        "scenario drain/resubmit/walltime: {:.1} s (drain to end of the first job {drain_seconds:.1} s)",
        started.elapsed().as_secs_f64()
    );
}

/// Exit 3 resubmits only up to DLAUNCH_MAX_RESUBMITS follow-ups (counted in an exported
/// variable); a task that never fits the allocation's time makes every run exit 3.
#[test]
fn resubmission_stops_at_the_cap() {
    let Some(cluster) = cluster() else { return };
    let started = Instant::now();
    let dir =
        JobDir::new("[job]\nname = \"cap\"\n\n[[tasks]]\nname = \"never\"\ncommand = \"true\"\nwalltime = \"2days\"\n");
    let env = [("DLAUNCH", DLAUNCH), ("DLAUNCH_MAX_RESUBMITS", "1")];
    let first = cluster.submit(
        dir.path(),
        &["-N", "1", "--ntasks-per-node=2", "--gpus-per-node=2", "--time=5"],
        &["job.toml"],
        &env,
    );
    let end = cluster.wait_end(&first, Duration::from_secs(120));
    let output = cluster.job_output(&first);
    assert_eq!(end["ExitCode"], "3:0", "{output}");
    let second = output
        .lines()
        .find_map(|l| l.strip_prefix("dlaunch.sbatch: follow-up job "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no follow-up job\n{output}"))
        .to_string();
    let end = cluster.wait_end(&second, Duration::from_secs(120));
    let output = cluster.job_output(&second);
    assert_eq!(end["ExitCode"], "3:0", "{output}");
    assert!(output.contains("1 follow-up job(s) already ran (DLAUNCH_MAX_RESUBMITS=1): not resubmitting"), "{output}");
    assert!(cluster.queue().is_empty(), "no third job: {:?}", cluster.queue());
    let summary = dir.summary("cap");
    assert_eq!((summary["run"].as_u64(), summary["slurm_job_id"].as_str()), (Some(1), Some(second.as_str())));
    assert!(summary["stopped"].as_str().unwrap().contains("more time than is left"), "{summary:#}");
    eprintln!("scenario cap: {:.1} s", started.elapsed().as_secs_f64());
}

/// Exit 2 (a bad job file) passes through and never resubmits; neither does a job cancelled
/// with scancel, although dlaunch leaves work (exit 3): its task, signalled by SLURM directly
/// too, is recorded as interrupted.
#[test]
fn bad_job_files_and_cancelled_jobs_are_not_resubmitted() {
    let Some(cluster) = cluster() else { return };
    let started = Instant::now();
    let dir = JobDir::new("[job]\nname = \"bad\"\nnot_a_key = 1\n");
    let env = [("DLAUNCH", DLAUNCH)];
    let geometry = ["-N", "1", "--ntasks-per-node=2", "--gpus-per-node=2", "--time=5"];
    let bad = cluster.submit(dir.path(), &geometry, &["job.toml"], &env);
    let end = cluster.wait_end(&bad, Duration::from_secs(120));
    let output = cluster.job_output(&bad);
    assert_eq!(end["ExitCode"], "2:0", "{output}");
    assert!(output.contains("not_a_key"), "{output}");
    assert!(cluster.queue().is_empty(), "{output}");

    let marker: PathBuf = dir.path().join("started");
    std::fs::write(
        dir.job(),
        format!(
            "[job]\nname = \"cancel\"\n\n[[tasks]]\nname = \"long\"\ncommand = \"touch {}; sleep 600\"\n",
            marker.display()
        ),
    )
    .unwrap();
    let job = cluster.submit(dir.path(), &geometry, &["job.toml"], &env);
    assert!(eventually(Duration::from_secs(120), || marker.exists()), "{}", cluster.job_output(&job));
    cluster.run("scancel", &[&job]);
    let end = cluster.wait_end(&job, Duration::from_secs(120));
    let output = cluster.job_output(&job);
    assert_eq!(end["JobState"], "CANCELLED", "{output}");
    // A cancelled job is CANCELLED at once, while its script still runs: wait until it has
    // left the queue (any follow-up would be queued by then).
    let gone = eventually(Duration::from_secs(60), || !cluster.queue().contains(&job));
    let output = cluster.job_output(&job);
    assert!(gone && output.contains("the job was cancelled"), "{output}");
    assert!(output.contains("dlaunch exited with 3"), "{output}");
    assert!(cluster.queue().is_empty(), "{output}");
    // SLURM sent SIGTERM to the task as well as to dlaunch: still interrupted, not failed.
    let summary = dir.summary("cancel");
    assert_eq!(summary["tasks"][0]["status"], "interrupted", "{summary:#}");
    eprintln!("scenario exit 2 / scancel: {:.1} s", started.elapsed().as_secs_f64());
}

/// Six single-GPU tasks named `name`, for the layout tests.
fn gpu_job(name: &str, extra: &str) -> String {
    format!(
        "[job]\nname = \"{name}\"\n\n[[tasks]]\nname = \"gpu\"\ncommand = \"true\"\nmatrix = {{ i = [1, 2, 3, 4, 5, 6] }}\ngpus = 1\n{extra}"
    )
}

/// Per task of a summary: (host, rank, CUDA_VISIBLE_DEVICES as recorded in its stdout).
fn placements(dir: &JobDir, name: &str) -> Vec<(String, u64, String)> {
    let summary = dir.summary(name);
    assert_eq!(summary["exit_code"], 0, "{summary:#}");
    summary["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let log = Path::new(t["log_dir"].as_str().unwrap()).join("stdout");
            let gpu = std::fs::read_to_string(&log).unwrap_or_default().trim().to_string();
            (t["host"].as_str().unwrap().to_string(), t["rank"].as_u64().unwrap(), gpu)
        })
        .collect()
}

/// slurm/dlaunch-start.sh in an allocation of one task per node: --rank-per-node starts one
/// worker per node holding both its GPUs (plus the coordinator on node1), --rank-per-gpu one
/// worker per GPU; both print the srun command they run.
#[test]
fn start_script_places_one_rank_per_node_or_per_gpu() {
    let Some(cluster) = cluster() else { return };
    let started = Instant::now();
    let dir = JobDir::new("");
    let show_gpu = "command = \"echo $CUDA_VISIBLE_DEVICES\"\n";
    std::fs::write(dir.path().join("per-node.toml"), gpu_job("per-node", "").replace("command = \"true\"\n", show_gpu))
        .unwrap();
    std::fs::write(dir.path().join("per-gpu.toml"), gpu_job("per-gpu", "").replace("command = \"true\"\n", show_gpu))
        .unwrap();
    let wrap = format!("{START} --rank-per-node per-node.toml && {START} --rank-per-gpu per-gpu.toml");
    let id = cluster.sbatch(
        dir.path(),
        &["-N", "3", "--ntasks-per-node=1", "--gpus-per-node=2", "--time=5", "-o", "start-%j.out", "--wrap", &wrap],
        &[("DLAUNCH", DLAUNCH)],
    );
    let end = cluster.wait_end(&id, Duration::from_secs(180));
    let output = cluster.job_output(&id);
    assert_eq!((end["JobState"].as_str(), end["ExitCode"].as_str()), ("COMPLETED", "0:0"), "{output}");
    for (layout, list) in
        [("per-node", "node1,node1,node2,node3"), ("per-gpu", "node1,node1,node1,node2,node2,node3,node3")]
    {
        let ranks = list.split(',').count();
        let srun = format!(
            "dlaunch-start.sh: srun --nodes=3 --ntasks={ranks} --distribution=arbitrary --nodelist={list} --overcommit {DLAUNCH} {layout}.toml"
        );
        assert!(output.contains(&srun), "{srun}\n{output}");
    }

    let nodes: BTreeSet<String> = cluster.node_addrs().into_keys().collect();
    for (name, workers_per_node) in [("per-node", 1), ("per-gpu", 2)] {
        let placed = placements(&dir, name);
        let mut per_host: BTreeMap<&str, (BTreeSet<u64>, BTreeSet<&str>)> = BTreeMap::new();
        for (host, rank, gpu) in &placed {
            let entry = per_host.entry(host).or_default();
            entry.0.insert(*rank);
            entry.1.insert(gpu);
        }
        assert_eq!(per_host.keys().map(|h| h.to_string()).collect::<BTreeSet<_>>(), nodes, "{name}: {placed:?}");
        for (host, (ranks, gpus)) in &per_host {
            assert_eq!(ranks.len(), workers_per_node, "{name}: worker ranks on {host}: {placed:?}");
            assert_eq!(gpus.len(), 2, "{name}: two tasks, two GPUs on {host}: {placed:?}");
        }
    }
    eprintln!("scenario start-script layouts: {:.1} s", started.elapsed().as_secs_f64());
}

/// `layout = "nodes"` over three nodes of two ranks: rank 0 leases tasks to one leader per
/// node (ranks 1, 2 and 4), each runs them on its node's workers, and rank 0 writes the one
/// journal from the lines they send up.
#[test]
fn node_leaders_run_the_tasks_rank_0_leases_them_on_every_node() {
    let Some(cluster) = cluster() else { return };
    let started = Instant::now();
    let values: Vec<String> = (0..60).map(|i| i.to_string()).collect();
    let dir = JobDir::new(&format!(
        "[job]\nname = \"leased\"\nlayout = \"nodes\"\nslots_per_worker = 2\n[[tasks]]\nname = \"t\"\ncommand = \"echo $(hostname) $DLAUNCH_WORKER_RANK > $DLAUNCH_TASK_DIR/where; sleep 0.1\"\nmatrix = {{ i = [{}] }}\ncpus = 0\n",
        values.join(", ")
    ));
    let (_, output) = cluster.complete_on_three_nodes(dir.path(), DLAUNCH);
    assert!(output.contains("layout = \"nodes\": 3 node leaders lease tasks from rank 0"), "{output}");
    let summary = dir.summary("leased");
    assert_eq!(summary["counts"]["succeeded"], 60, "{summary:#}");
    let mut ranks_by_host: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for task in summary["tasks"].as_array().unwrap() {
        let path = dir.output("leased").join("tasks").join(task["id"].as_str().unwrap()).join("where");
        let text = std::fs::read_to_string(path).unwrap();
        let (host, rank) = text.trim().split_once(' ').unwrap();
        ranks_by_host.entry(host.to_string()).or_default().insert(rank.to_string());
    }
    let nodes: BTreeSet<String> = cluster.node_addrs().into_keys().collect();
    assert_eq!(ranks_by_host.keys().cloned().collect::<BTreeSet<_>>(), nodes, "{ranks_by_host:?}");
    let ranks: BTreeSet<String> = ranks_by_host.values().flatten().cloned().collect();
    assert!(!ranks.contains("0"), "rank 0 runs none: {ranks_by_host:?}");
    let journal = dir.journal("leased");
    let joined = journal.iter().filter(|e| e["event"] == "worker_joined").count();
    assert_eq!(joined, 5, "every rank but 0 is a worker");
    assert_eq!(journal.iter().filter(|e| e["event"] == "attempt_ended").count(), 60);
    eprintln!("scenario node layout: {:.1} s", started.elapsed().as_secs_f64());
}

/// A heterogeneous job - one CPU-only node, two GPU nodes with a longer time limit - started
/// with dlaunch-start.sh and srun --het-group: one dlaunch run over both components, GPU
/// tasks only where the GPUs are, and the time left is that of the component ending first.
#[test]
fn heterogeneous_job_runs_gpu_tasks_on_gpu_nodes_within_the_shorter_time_limit() {
    let Some(cluster) = cluster() else { return };
    let started = Instant::now();
    let later = "\n[[tasks]]\nname = \"cpu\"\ncommand = \"true\"\nmatrix = { i = [1, 2] }\n\n[[tasks]]\nname = \"later\"\ncommand = \"true\"\nwalltime = \"6m\"\n";
    let dir = JobDir::new(&gpu_job("het", later));
    let wrap = format!("{START} job.toml");
    let id = cluster.sbatch(
        dir.path(),
        &[
            "-o",
            "het-%j.out",
            "--time=5",
            "-N",
            "1",
            "--ntasks-per-node=2",
            ":",
            "-N",
            "2",
            "--ntasks-per-node=1",
            "--gpus-per-node=2",
            "--time=8",
            "--wrap",
            &wrap,
        ],
        &[("DLAUNCH", DLAUNCH), ("DLAUNCH_SRUN_ARGS", "--het-group=0,1")],
    );
    // SLURM 22.05's srun does not always return from a heterogeneous --mpi=pmix step: when
    // its tasks end at different times, about 1 in 10 srun waits forever in the PMIx plugin's
    // abort agent (plain steps never did; see slurm/README.md). So wait for the step to end
    // and dlaunch's summary, and end the job here if srun hangs.
    let summary_path = dir.output("het").join("summary.json");
    let step_done = |c: &Cluster| {
        let steps = c.run("squeue", &["-h", "-s", "-j", &id, "-o", "%i"]);
        summary_path.exists() && steps.split_whitespace().all(|s| s.ends_with(".batch"))
    };
    assert!(eventually(Duration::from_secs(180), || step_done(&cluster)), "{}", cluster.job_output(&id));
    let ended = eventually(Duration::from_secs(20), || {
        cluster.job(&id).is_some_and(|i| TERMINAL_STATES.contains(&i["JobState"].as_str()))
    });
    let output = cluster.job_output(&id);
    // `later` (walltime 6m) fits the GPU component's 8 minutes but not the CPU one's 5.
    if ended {
        assert_eq!(cluster.job(&id).unwrap()["ExitCode"], "3:0", "{output}");
    } else {
        eprintln!("job {id}: srun did not return after its heterogeneous step ended (SLURM 22.05); cancelled");
        cluster.run("scancel", &[&id]);
        // The hung srun outlives its job: end it (it is ours, by its job id).
        let job_var = format!("SLURM_JOB_ID={id}");
        for pid in processes_matching("srun --het-group=0,1") {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            if environ.split(|&b| b == 0).any(|v| v == job_var.as_bytes()) {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
        assert!(output.contains("srun: error: node1: task 0: Exited with exit code 3"), "{output}");
    }
    assert!(output.contains("dlaunch-start.sh: srun --het-group=0,1 "), "{output}");
    let left = output.lines().find(|l| l.contains("INFO: SLURM job")).unwrap_or_default();
    assert!(left.contains(" 4m ") && left.ends_with(" left"), "time left of the first component: {output}");
    assert!(output.contains("rank 1 on node1 (") && output.contains("0 GPUs"), "{output}");

    let summary = dir.summary("het");
    assert_eq!(summary["counts"]["succeeded"], 8, "{summary:#}");
    let tasks = tasks_by_id(&summary);
    assert_eq!(tasks["later"]["attempts"], 0, "{summary:#}");
    assert!(summary["stopped"].as_str().unwrap().contains("more time than is left"), "{summary:#}");
    let gpu_hosts: BTreeSet<&str> = (1..=6).map(|i| tasks[&format!("gpu[i={i}]")]["host"].as_str().unwrap()).collect();
    assert_eq!(gpu_hosts, BTreeSet::from(["node2", "node3"]), "GPU tasks on the GPU nodes only");
    eprintln!("scenario heterogeneous job: {:.1} s", started.elapsed().as_secs_f64());
}

/// `cksum` of a file, or of every file below a directory (sorted), as a task prints it.
fn cksums(path: &Path) -> String {
    let script = "if [ -d \"$1\" ]; then cd \"$1\" && find . -type f -exec cksum {} + | sort; else cksum < \"$1\"; fi";
    let out = Command::new("sh").args(["-c", script, "cksums"]).arg(path).output().expect("cksum");
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Scenario 3: datasets staged across nodes. Rank 0 reads each source once and broadcasts it
/// over MPI (TCP between the namespaces) to one leader per node; every node's tasks read
/// their node's own verified copy through DLAUNCH_DATASET_<NAME>. The next allocation finds
/// the copies and sends nothing.
#[test]
fn datasets_are_staged_to_every_node_and_kept_for_the_next_allocation() {
    let Some(cluster) = cluster() else { return };
    let started = Instant::now();
    let dir = JobDir::new("");
    let path = dir.path();
    std::fs::write(path.join("big.bin"), pattern((20 << 20) + 3, 7)).unwrap();
    std::fs::create_dir_all(path.join("tree/sub")).unwrap();
    std::fs::write(path.join("tree/a.txt"), "a\n").unwrap();
    std::fs::write(path.join("tree/sub/b.bin"), pattern(100_000, 8)).unwrap();
    let stage = path.join("stage");
    let read = "cksum < $DLAUNCH_DATASET_BIG > $DLAUNCH_TASK_DIR/big; (cd $DLAUNCH_DATASET_TREE && find . -type f -exec cksum {} + | sort) > $DLAUNCH_TASK_DIR/tree; echo $DLAUNCH_DATASET_BIG > $DLAUNCH_TASK_DIR/where";
    let job = format!(
        "[job]\nname = \"staged\"\nstage_dir = \"{}\"\n\n[datasets.big]\nsource = \"big.bin\"\n\n[datasets.tree]\nsource = \"tree\"\n\n[[tasks]]\nname = \"read\"\ncommand = '{read}'\nmatrix = {{ i = [1, 2, 3, 4, 5, 6] }}\ngpus = 1\ndatasets = [\"big\", \"tree\"]\n",
        stage.display()
    );
    std::fs::write(dir.job(), job).unwrap();
    let geometry = THREE_NODES;
    let env = [("DLAUNCH", DLAUNCH)];

    let id = cluster.submit(path, &geometry, &["job.toml"], &env);
    let end = cluster.wait_end(&id, Duration::from_secs(240));
    let output = cluster.job_output(&id);
    assert_eq!((end["JobState"].as_str(), end["ExitCode"].as_str()), ("COMPLETED", "0:0"), "{output}");
    let summary = dir.summary("staged");
    assert_eq!(summary["counts"]["succeeded"], 6, "{summary:#}");
    for report in summary["datasets"].as_array().unwrap() {
        assert_eq!((report["nodes"].as_u64(), report["kept_nodes"].as_u64()), (Some(3), Some(0)), "{report}");
    }

    // Every node's tasks read their own node's copy, and it is the source, byte for byte.
    let (big, tree) = (cksums(&path.join("big.bin")), cksums(&path.join("tree")));
    let mut hosts = BTreeSet::new();
    for (id, task) in tasks_by_id(&summary) {
        let host = task["host"].as_str().unwrap().to_string();
        let task_dir = dir.output("staged").join("tasks").join(&id);
        let read = |name: &str| std::fs::read_to_string(task_dir.join(name)).unwrap();
        assert_eq!(read("where").trim(), stage.join(&host).join("big/big.bin").to_str().unwrap(), "{id}");
        assert_eq!(read("big"), big, "{id} on {host}");
        assert_eq!(read("tree"), tree, "{id} on {host}");
        hosts.insert(host);
    }
    let nodes: BTreeSet<String> = cluster.node_addrs().into_keys().collect();
    assert_eq!(hosts, nodes, "tasks on every node");
    let copies: BTreeSet<String> =
        std::fs::read_dir(&stage).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(copies, nodes, "one copy per node, each under its own name");
    let first = started.elapsed().as_secs_f64();

    // A new allocation (nothing left to run) checks the copies and sends nothing.
    let id = cluster.submit(path, &geometry, &["job.toml"], &env);
    let end = cluster.wait_end(&id, Duration::from_secs(240));
    assert_eq!(end["ExitCode"], "0:0", "{}", cluster.job_output(&id));
    let summary = dir.summary("staged");
    assert_eq!(summary["run"], 1);
    for report in summary["datasets"].as_array().unwrap() {
        assert_eq!((report["nodes"].as_u64(), report["kept_nodes"].as_u64()), (Some(0), Some(3)), "{report}");
    }
    eprintln!(
        "scenario dataset staging: {first:.1} s, then {:.1} s with the copies kept",
        started.elapsed().as_secs_f64() - first
    );
}

/// The DAPHNE example's roles over the three nodes: one worker per node
/// (`processes_per_node = 1`) listening on its node's address, and the coordinator, started
/// once all three accept connections (`wait_for`, probing across the namespaces), reaches each
/// at the address `DLAUNCH_ROLE_WORKER_HOSTS` gives.
#[test]
fn roles_spread_over_nodes_reach_each_other_by_their_host_lists() {
    let Some(cluster) = cluster() else { return };
    let started = Instant::now();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/daphne");
    let job = std::fs::read_to_string(example.join("daphne.toml"))
        .unwrap()
        .replace("processes = 3\n", "processes = 3\nprocesses_per_node = 1\n")
        .replace("python3 ", &format!("{} ", python()));
    let dir = JobDir::new(&job);
    std::fs::copy(example.join("daphne.py"), dir.path().join("daphne.py")).unwrap();
    let (_, output) = cluster.complete_on_three_nodes(dir.path(), DLAUNCH);

    let task = &dir.summary("daphne")["tasks"][0];
    assert_eq!(task["status"], "succeeded", "{task:#}\n{output}");
    let processes = task["processes"].as_array().unwrap();
    let hosts: Vec<&str> = processes.iter().map(|p| p["host"].as_str().unwrap()).collect();
    let nodes: BTreeSet<String> = cluster.node_addrs().into_keys().collect();
    assert_eq!(
        hosts[..3].iter().map(|h| h.to_string()).collect::<BTreeSet<_>>(),
        nodes,
        "a worker per node: {hosts:?}"
    );
    let stdout = dir.output("daphne").join("tasks/daphne/attempt-0/rank-3/stdout");
    let text = std::fs::read_to_string(&stdout).unwrap_or_else(|e| panic!("{}: {e}", stdout.display()));
    let coordinator: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(coordinator["sum"], coordinator["expected"], "{coordinator}");
    let addrs = cluster.node_addrs();
    let reached: Vec<&str> = coordinator["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().rsplit_once(':').unwrap().0)
        .collect();
    let expected: Vec<&str> = hosts[..3].iter().map(|h| addrs[*h].as_str()).collect();
    assert_eq!(reached, expected, "each worker at its node's address in the private subnet");
    eprintln!("scenario roles across nodes: {:.1} s", started.elapsed().as_secs_f64());
}

/// Observing from outside (issue 13): while the job runs in the cluster's namespaces, `status`
/// from this machine's root namespace sees it running on node1..node3 through the shared
/// output directory alone; `cancel` of one task from here reaches rank 0 (a request file, no
/// signal); `--explain` names the allocation's time left as what holds a task back; after the
/// end `status` shows it ended and `report` writes report.html.
#[test]
fn status_cancel_and_report_from_outside_the_allocation() {
    let Some(cluster) = cluster() else { return };
    let started = Instant::now();
    let dir = JobDir::new("");
    let path = dir.path();
    let go = path.join("go");
    // Five workers with one slot each: four holders and the victim occupy them all.
    let job = format!(
        "[job]\nname = \"watched\"\nslots_per_worker = 1\ngrace = \"2s\"\n\n[[tasks]]\nname = \"hold\"\ncommand = 'while [ ! -e {go} ]; do sleep 0.2; done'\nmatrix = {{ i = [1, 2, 3, 4] }}\ncpus = 0\n\n[[tasks]]\nname = \"victim\"\ncommand = \"sleep 600\"\ncpus = 0\n\n[[tasks]]\nname = \"later\"\ncommand = \"true\"\ncpus = 0\nwalltime = \"1h\"\n",
        go = go.display()
    );
    std::fs::write(dir.job(), job).unwrap();
    let output_dir = dir.output("watched");
    let out = output_dir.to_str().unwrap();
    let id = cluster.submit(
        path,
        &THREE_NODES,
        &["job.toml"],
        // `later` never fits the 10 minutes: the run ends with work left (exit 3), no follow-up.
        &[("DLAUNCH", DLAUNCH), ("DLAUNCH_MAX_RESUBMITS", "0")],
    );
    let status = || json(&dlaunch(path, &["status", out, "--json"]));

    let mut seen = serde_json::Value::Null;
    let all_running = eventually(Duration::from_secs(120), || {
        seen = if output_dir.join("journal.jsonl").exists() { status() } else { serde_json::Value::Null };
        seen["state"] == "running" && seen["counts"]["running"] == 5
    });
    assert!(all_running, "{seen:#}\n{}", cluster.job_output(&id));
    assert_eq!(seen["slurm_job_id"], id.as_str());
    let hosts: BTreeSet<&str> = seen["running"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|t| t["processes"].as_array().unwrap())
        .map(|p| p["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, BTreeSet::from(["node1", "node2", "node3"]), "{seen:#}");

    let job_file = dir.job();
    let why = json(&dlaunch(path, &["status", job_file.to_str().unwrap(), "--explain", "later", "--json"]));
    let reasons: Vec<&str> = why["reasons"].as_array().unwrap().iter().filter_map(|r| r.as_str()).collect();
    assert!(reasons[0].starts_with("walltime: it needs 1h of allocation time"), "{why:#}");

    let cancel = json(&dlaunch(path, &["cancel", out, "victim", "--json"]));
    assert_eq!(cancel["action"], "requested", "{cancel:#}");
    let cancelled = eventually(Duration::from_secs(30), || {
        seen = status();
        seen["counts"]["cancelled"] == 1 && seen["counts"]["running"] == 4
    });
    assert!(cancelled, "{seen:#}\n{}", cluster.job_output(&id));

    std::fs::write(&go, "").unwrap();
    let end = cluster.wait_end(&id, Duration::from_secs(120));
    let output = cluster.job_output(&id);
    assert_eq!((end["JobState"].as_str(), end["ExitCode"].as_str()), ("FAILED", "3:0"), "{output}");
    let after = status();
    assert_eq!((after["state"].as_str(), after["exit_code"].as_i64()), (Some("ended"), Some(3)), "{after:#}");
    assert_eq!(after["next_run"]["to_run"], 1, "later is left for a longer allocation: {after:#}");
    assert_eq!((after["counts"]["succeeded"].as_u64(), after["counts"]["cancelled"].as_u64()), (Some(4), Some(1)));

    let report = json(&dlaunch(path, &["report", out, "--json"]));
    let page = std::fs::read_to_string(report["report"].as_str().unwrap()).unwrap();
    assert_eq!(Path::new(report["report"].as_str().unwrap()), output_dir.join("report.html"));
    for host in ["node1", "node2", "node3"] {
        assert!(page.contains(&format!("data-host=\"{host}\"")), "{host} has lanes on the timeline");
    }
    eprintln!("scenario observe from outside: {:.1} s", started.elapsed().as_secs_f64());
}

/// A directory each node has its own copy of: a tmpfs mounted over `path` in every node's
/// mount namespace (entered through its slurmd, whose jobs share it), so no node sees what
/// another writes there, nor does this namespace. Unmounted when dropped.
struct PrivatePerNode {
    path: PathBuf,
    /// Node name → the pid of its slurmd.
    nodes: BTreeMap<String, String>,
}

impl PrivatePerNode {
    fn mount(cluster: &Cluster, path: &Path) -> PrivatePerNode {
        std::fs::create_dir_all(path).unwrap();
        let run = Path::new(&cluster.var("DLAUNCH_SLURM_BASE")).join("run");
        let mut nodes = BTreeMap::new();
        for node in cluster.node_addrs().into_keys() {
            let pidfile = run.join(format!("slurmd.{node}.pid"));
            let pid = std::fs::read_to_string(&pidfile).unwrap_or_else(|e| panic!("{}: {e}", pidfile.display()));
            let pid = pid.trim().to_string();
            let out = Command::new("nsenter")
                .args(["-t", &pid, "-m", "mount", "-t", "tmpfs", "-o", "size=256m,mode=0700", "tmpfs"])
                .arg(path)
                .output()
                .expect("nsenter");
            assert!(out.status.success(), "tmpfs in {node}'s mount namespace: {}", text(&out));
            nodes.insert(node, pid);
        }
        PrivatePerNode { path: path.to_path_buf(), nodes }
    }

    /// A copy of what `node` has there, in `to`.
    fn copy_out(&self, node: &str, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        let script = "nsenter -t \"$1\" -m tar -C \"$2\" -cf - . | tar -xf - -C \"$3\"";
        let out = Command::new("sh")
            .args(["-c", script, "copy", &self.nodes[node]])
            .arg(&self.path)
            .arg(to)
            .output()
            .expect("tar");
        assert!(out.status.success(), "copying {node}'s {}: {}", self.path.display(), text(&out));
    }
}

impl Drop for PrivatePerNode {
    fn drop(&mut self) {
        for pid in self.nodes.values() {
            let _ = Command::new("nsenter").args(["-t", pid, "-m", "umount", "-l"]).arg(&self.path).status();
        }
    }
}

/// Issue 17 without a shared filesystem: every node has its own `output_dir` (a private tmpfs),
/// so `output = "auto"` finds that the other nodes do not see rank 0's marker and runs in
/// returned mode. Every task's logs and declared outputs end up in rank 0's node's copy, with
/// the checksums the tasks computed themselves; the other nodes' copies hold no task files.
#[test]
fn without_a_shared_output_dir_auto_returns_every_tasks_files_to_rank_0() {
    let Some(cluster) = cluster() else { return };
    let started = Instant::now();
    let command = "echo \"on $(hostname)\"; echo err-{i} >&2; mkdir -p $DLAUNCH_TASK_DIR/out; \
        head -c $((100000 * {i} + 7)) /dev/urandom > $DLAUNCH_TASK_DIR/out/data.bin; \
        cksum < $DLAUNCH_TASK_DIR/out/data.bin";
    let dir = JobDir::new(&format!(
        "[job]\nname = \"private\"\n\n[[tasks]]\nname = \"w\"\ncommand = '{command}'\n\
         matrix = {{ i = [1, 2, 3, 4, 5, 6] }}\ngpus = 1\noutputs = [\"out/*.bin\"]\n"
    ));
    let private = PrivatePerNode::mount(&cluster, &dir.path().join("runs"));
    let (_, output) = cluster.complete_on_three_nodes(dir.path(), DLAUNCH);
    assert!(output.contains("some nodes do not see") && output.contains("returned mode"), "{output}");
    assert!(!dir.output("private").exists(), "this namespace sees none of the nodes' copies");

    let copies = dir.path().join("copies");
    let mut rank0 = Vec::new();
    for node in cluster.node_addrs().into_keys() {
        private.copy_out(&node, &copies.join(&node));
        if copies.join(&node).join("private/summary.json").exists() {
            rank0.push(node);
        } else {
            let left = std::fs::read_dir(copies.join(&node)).unwrap().count();
            assert_eq!(left, 0, "nothing of the run on {node}'s own copy");
        }
    }
    assert_eq!(rank0.len(), 1, "one node has the run: {rank0:?}");
    let run = copies.join(&rank0[0]).join("private");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["counts"]["succeeded"], 6, "{summary:#}\n{output}");
    let journal: Vec<serde_json::Value> = std::fs::read_to_string(run.join("journal.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let mut hosts = BTreeSet::new();
    for (id, task) in tasks_by_id(&summary) {
        let host = task["host"].as_str().unwrap();
        let attempt = run.join("tasks").join(&id).join("attempt-0");
        let stdout = std::fs::read_to_string(attempt.join("stdout")).unwrap_or_else(|e| panic!("{id}: {e}"));
        let (on, cksum) = stdout.split_once('\n').unwrap();
        assert_eq!(on, format!("on {host}"), "{id}");
        let i = id.trim_start_matches("w[i=").trim_end_matches(']');
        assert_eq!(std::fs::read_to_string(attempt.join("stderr")).unwrap(), format!("err-{i}\n"));
        let data = attempt.join("outputs/out/data.bin");
        assert_eq!(cksums(&data), cksum, "{id}: the output as the task wrote it on {host}");
        let bytes = std::fs::read(&data).unwrap();
        assert_eq!(bytes.len(), 100_000 * i.parse::<usize>().unwrap() + 7);
        let returned = journal
            .iter()
            .find(|e| e["event"] == "output_returned" && e["task"] == id.as_str())
            .unwrap_or_else(|| panic!("no output_returned for {id}"));
        assert_eq!(returned["blake3"], blake3::hash(&bytes).to_hex().to_string(), "{id}");
        hosts.insert(host.to_string());
    }
    let nodes: BTreeSet<String> = cluster.node_addrs().into_keys().collect();
    assert_eq!(hosts, nodes, "tasks on every node, each node writing only its own copy");
    eprintln!("scenario returned output without a shared filesystem: {:.1} s", started.elapsed().as_secs_f64());
}
