//! The job shapes users bring from other systems, run from `examples/` under real mpirun:
//! task roles (OpenPAI, DAPHNE, Backend.AI), a queue with 2 slots per worker (H2O), a
//! pipeline with `after`, and GPUs a gang's `LOCAL_RANK` can index.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");

/// The example's job file (and its scripts) copied into a fresh directory, output and all.
fn example(dir: &str, toml: &str) -> JobDir {
    let source = Path::new(EXAMPLES).join(dir);
    let job = JobDir::new(&std::fs::read_to_string(source.join(toml)).unwrap());
    for entry in std::fs::read_dir(&source).unwrap().flatten() {
        if entry.path().extension().is_some_and(|e| e == "py") {
            std::fs::copy(entry.path(), job.path().join(entry.file_name())).unwrap();
        }
    }
    job
}

/// The last stdout line of process `k` of a task's attempt, as JSON.
fn output_of(dir: &JobDir, name: &str, task: &str, k: u32) -> serde_json::Value {
    let path = dir.output(name).join(format!("tasks/{task}/attempt-0/rank-{k}/stdout"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn endings(task: &serde_json::Value) -> Vec<String> {
    task["processes"].as_array().unwrap().iter().map(|p| p["ending"]["how"].as_str().unwrap().to_string()).collect()
}

#[test]
fn openpai_parameter_servers_and_workers_end_when_the_workers_succeed() {
    let dir = example("openpai", "ps_worker.toml");
    let out = dir.mpirun(5, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let task = &dir.summary("openpai-ps-worker")["tasks"][0];
    assert_eq!(task["status"], "succeeded");
    assert_eq!(endings(task), ["stopped", "stopped", "exited", "exited"], "the servers were stopped");
    let ps0 = output_of(&dir, "openpai-ps-worker", "tf", 0);
    for k in [2, 3] {
        let worker = output_of(&dir, "openpai-ps-worker", "tf", k);
        assert_eq!(worker["role"], "worker");
        assert_eq!(worker["index"], k - 2);
        assert_eq!(worker["answers"].as_array().unwrap().len(), 6, "3 steps × 2 parameter servers");
        assert_eq!(worker["tf_config"]["task"], serde_json::json!({ "type": "worker", "index": k - 2 }));
        assert_eq!(worker["tf_config"]["cluster"]["ps"], worker["ps"]);
        assert_eq!(worker["tf_config"]["cluster"]["worker"].as_array().unwrap().len(), 2);
        assert!(worker["http_port"].is_null(), "workers have no http port");
    }
    assert!(ps0["http_port"].as_str().unwrap().parse::<u16>().is_ok());
}

#[test]
fn a_daphne_coordinator_starts_when_its_three_workers_listen() {
    let dir = example("daphne", "daphne.toml");
    let out = dir.mpirun(5, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let task = &dir.summary("daphne")["tasks"][0];
    assert_eq!(endings(task), ["stopped", "stopped", "stopped", "exited"]);
    let coordinator = output_of(&dir, "daphne", "daphne", 3);
    assert_eq!(coordinator["sum"], coordinator["expected"]);
    assert_eq!(coordinator["workers"].as_array().unwrap().len(), 3);
}

#[test]
fn a_backendai_session_sees_its_cluster_variables() {
    let dir = example("backendai", "session.toml");
    let out = dir.mpirun(5, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let main = output_of(&dir, "backendai", "session", 0);
    assert_eq!(main["main"]["BACKENDAI_CLUSTER_ROLE"], "main");
    assert_eq!(main["main"]["BACKENDAI_CLUSTER_IDX"], "1");
    assert_eq!(main["main"]["BACKENDAI_CLUSTER_SIZE"], "4");
    assert_eq!(main["main"]["BACKENDAI_CLUSTER_REPLICAS"], "main:1,sub:3");
    let ranks: Vec<&str> =
        main["subs"].as_array().unwrap().iter().map(|s| s["BACKENDAI_CLUSTER_LOCAL_RANK"].as_str().unwrap()).collect();
    assert_eq!(ranks, ["1", "2", "3"]);
}

#[test]
fn an_h2o_queue_runs_at_most_two_experiments_per_worker() {
    let dir = example("h2o", "queue.toml");
    let out = dir.mpirun(3, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(dir.summary("h2o-queue")["counts"]["succeeded"], 8);
    let timeline = std::fs::read_to_string(dir.output("h2o-queue").join("timeline")).unwrap();
    let mut events: Vec<(f64, String, i32)> = timeline
        .lines()
        .map(|l| {
            let parts: Vec<&str> = l.split(' ').collect();
            (parts[1].parse().unwrap(), parts[0].to_string(), if parts[2] == "start" { 1 } else { -1 })
        })
        .collect();
    // Ends before starts at the same instant: a slot is free again when its task ended.
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.2.cmp(&b.2)));
    let mut running: BTreeMap<String, i32> = BTreeMap::new();
    let mut most = 0;
    for (_, rank, delta) in events {
        let n = running.entry(rank).or_default();
        *n += delta;
        most = most.max(*n);
    }
    assert_eq!(most, 2, "two at once per worker, never more: {timeline}");
}

#[test]
fn a_pipeline_runs_in_dependency_order_skips_after_a_failure_and_reruns_through_the_graph() {
    let dir = example("pipeline", "pipeline.toml");
    let out = dir.mpirun(5, &[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(dir.output("pipeline").join("report")).unwrap(), "0.1\n0.01\n0.1\n0.01\n");
    let journal = dir.journal("pipeline");
    let at = |event: &str, task: &str| {
        journal
            .iter()
            .position(|e| e["event"] == event && e["task"] == task)
            .unwrap_or_else(|| panic!("{event} {task}"))
    };
    for seed in [1, 2] {
        for lr in ["0.1", "0.01"] {
            let train = format!("train[lr={lr},seed={seed}]");
            assert!(at("attempt_ended", "prepare") < at("attempt_started", &train));
            assert!(at("attempt_ended", &train) < at("attempt_started", &format!("evaluate[seed={seed}]")));
        }
    }

    // One training run fails: what comes after it is skipped, the rest runs; exit code 1.
    let failing = dir.path().join("fail");
    let job = std::fs::read_to_string(dir.job()).unwrap().replace(
        "test -s $DLAUNCH_OUTPUT_DIR/data/train.txt",
        &format!("test ! -e {}-{{seed}}-{{lr}} && test -s $DLAUNCH_OUTPUT_DIR/data/train.txt", failing.display()),
    );
    std::fs::write(dir.job(), job).unwrap();
    std::fs::write(format!("{}-2-0.01", failing.display()), "").unwrap();
    let out = dir.mpirun(5, &["--fresh"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("2 skipped (dependency failed)"), "{}", text(&out));
    let summary = dir.summary("pipeline");
    assert_eq!(summary["counts"]["skipped"], 2);
    let tasks = tasks_by_id(&summary);
    assert_eq!(tasks["evaluate[seed=2]"]["status"], "skipped");
    assert_eq!(tasks["evaluate[seed=2]"]["reason"], "dependency failed: train[lr=0.01,seed=2]");
    assert_eq!(tasks["report"]["status"], "skipped");
    assert_eq!(tasks["evaluate[seed=1]"]["status"], "succeeded");

    // Fixed and retried: the failed task runs again and so does everything after it.
    std::fs::remove_file(format!("{}-2-0.01", failing.display())).unwrap();
    let out = dir.mpirun(5, &["--retry-failed"]);
    assert!(out.status.success(), "{}", text(&out));
    let journal = dir.journal("pipeline");
    let run_start = journal.iter().rposition(|e| e["event"] == "run_started").unwrap();
    let mut rerun: Vec<&str> = journal[run_start..]
        .iter()
        .filter(|e| e["event"] == "attempt_started")
        .map(|e| e["task"].as_str().unwrap())
        .collect();
    rerun.sort();
    assert_eq!(rerun, ["evaluate[seed=2]", "report", "train[lr=0.01,seed=2]"]);
}

#[test]
fn check_lists_each_role_with_its_processes_command_resources_ports_and_wait() {
    let dir = example("openpai", "ps_worker.toml");
    let out = dir.alone(&["check"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("  tf  4 processes in 2 roles, timeout 5m\n"), "{stdout}");
    assert!(stdout.contains("\n    role ps: 2 × (1 cpu), ports http  $ python3 ps_worker.py\n"), "{stdout}");
    assert!(
        stdout.contains("\n    role worker: 2 × (1 cpu), waits for ps (up to 1m)  $ python3 ps_worker.py\n"),
        "{stdout}"
    );
    let out = dir.alone(&["check", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let roles = &doc["tasks"][0]["roles"];
    assert_eq!(
        roles[0],
        serde_json::json!({ "name": "ps", "processes": 2, "command": "python3 ps_worker.py", "cpus": 1, "gpus": 0,
            "memory": 0, "ports": ["http"], "wait_for": null, "wait_timeout_s": null })
    );
    assert_eq!(
        (&roles[1]["name"], &roles[1]["wait_for"], &roles[1]["wait_timeout_s"]),
        (&"worker".into(), &"ps".into(), &60.into())
    );
}

#[test]
fn check_refuses_a_dependency_cycle_with_its_line() {
    let dir = JobDir::new(
        "[job]\nname = \"c\"\n[[tasks]]\nname = \"a\"\ncommand = \"true\"\nafter = [\"b\"]\n[[tasks]]\nname = \"b\"\ncommand = \"true\"\nafter = [\"a\"]\n",
    );
    let out = dir.alone(&["check"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("job.toml:6:10: tasks[0].after[0]: dependency cycle: a → b → a"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_role_that_never_listens_fails_the_waiting_role_with_a_clear_reason() {
    wait_for_a_role_that_never_listens("shared");
}

/// Returned mode: the marker goes in the node-local log directory, where the worker looks.
#[test]
fn a_failed_wait_is_told_apart_in_returned_mode_too() {
    wait_for_a_role_that_never_listens("returned");
}

fn wait_for_a_role_that_never_listens(output: &str) {
    let dir = JobDir::new(&format!(
        "[job]\nname = \"w\"\ngrace = \"1s\"\noutput = \"{output}\"\n[[tasks]]\nname = \"t\"\ncommand = \"sleep 300\"\n\
         [[tasks.roles]]\nname = \"server\"\n[[tasks.roles]]\nname = \"client\"\ncommand = \"echo never\"\nwait_for = \"server\"\nwait_timeout = \"1s\"\n",
    ));
    let out = dir.mpirun(3, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let task = &dir.summary("w")["tasks"][0];
    let reason = task["reason"].as_str().unwrap();
    assert_eq!(reason, "process 1 (client 0): wait_for: role server did not accept connections in time");
    assert_eq!(endings(task), ["stopped", "wait_failed"]);
    let stderr = std::fs::read_to_string(dir.output("w").join("tasks/t/attempt-0/rank-1/stderr")).unwrap();
    assert!(stderr.contains("role server did not accept connections within 1s at 127.0.0.1:"), "{stderr}");
    assert!(!dir.output("w").join("tasks/t/attempt-0/rank-1/stdout").exists(), "a log never written is never created");
}

/// A waiting role's command that itself exits 69 (EX_UNAVAILABLE is common) fails as what it
/// is, not as a failed wait.
#[test]
fn a_waiting_roles_own_exit_69_is_not_taken_for_a_failed_wait() {
    let serve = "python3 -c 'import os, socket, time; s = socket.create_server((\"0.0.0.0\", int(os.environ[\"DLAUNCH_PORT\"]))); s.listen(); time.sleep(300)'";
    let dir = JobDir::new(&format!(
        "[job]\nname = \"w\"\ngrace = \"1s\"\n[[tasks]]\nname = \"t\"\ncommand = \"{}\"\n\
         [[tasks.roles]]\nname = \"server\"\n[[tasks.roles]]\nname = \"client\"\ncommand = \"exit 69\"\nwait_for = \"server\"\nwait_timeout = \"1m\"\n",
        serve.replace('\\', "\\\\").replace('"', "\\\"")
    ));
    let out = dir.mpirun(3, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let task = &dir.summary("w")["tasks"][0];
    assert_eq!(task["reason"], "process 1 (client 0): exit 69", "{task:#}");
    assert_eq!(endings(task), ["stopped", "exited"]);
}

/// With `cpus = 0` one worker rank (4 of the DGX-2's 16 GPUs) holds the whole gang; task
/// visibility within one worker rank.
/// Each process checks inside the task that the GPU it was placed on is the one
/// `torch.cuda.set_device(LOCAL_RANK)` would pick (task visibility), or `cuda:0` (process).
const GPU_CHECK: &str = "own=$DLAUNCH_GPUS; \
    if [ \\\"$VIS\\\" = task ]; then i=$((LOCAL_RANK + 1)); else i=1; fi; \
    picked=$(echo $CUDA_VISIBLE_DEVICES | awk -F, -v i=$i '{print $i}'); \
    echo \\\"$RANK $LOCAL_RANK $CUDA_VISIBLE_DEVICES $own\\\" > $DLAUNCH_TASK_DIR/gpus.$RANK; \
    [ \\\"$picked\\\" = \\\"$own\\\" ]";

#[test]
fn gang_processes_find_their_gpu_at_local_rank_or_at_zero() {
    for visibility in ["task", "process"] {
        let job = format!(
            "[job]\nname = \"v\"\n[[tasks]]\nname = \"g\"\ncommand = \"{GPU_CHECK}\"\nprocesses = 4\ngpus = 1\ncpus = 0\ngpu_visibility = \"{visibility}\"\nenv = {{ VIS = \"{visibility}\" }}\n"
        );
        let dir = JobDir::new(&job);
        let mut command = dir.mpirun_command(5, &[]);
        command.env("HWLOC_XMLFILE", fixture("topologies/nvidiaDGX2.xml"));
        let out = wait_with_limit(command.spawn().unwrap(), std::time::Duration::from_secs(300));
        assert!(out.status.success(), "{visibility}: {}", text(&out));
        let seen: Vec<Vec<String>> = (0..4)
            .map(|k| {
                let line = std::fs::read_to_string(dir.output("v").join(format!("tasks/g/gpus.{k}"))).unwrap();
                line.split_whitespace().map(str::to_string).collect()
            })
            .collect();
        let owns: std::collections::BTreeSet<&str> = seen.iter().map(|s| s[3].as_str()).collect();
        assert_eq!(owns.len(), 4, "{visibility}: each its own GPU: {seen:?}");
        for s in &seen {
            if visibility == "task" {
                assert_eq!(s[2].split(',').count(), 4, "sees the gang's 4 GPUs: {seen:?}");
                assert_eq!(s[2], seen[0][2], "in the same order for all: {seen:?}");
            } else {
                assert_eq!(s[2], s[3], "sees only its own: {seen:?}");
            }
        }
    }
}

/// Each process needs 3 GPUs and each of the 4 worker ranks of the DGX-2 holds 4 of its 16:
/// the gang's processes land on 4 ranks of one host. Each still sees the 12 GPUs of the gang
/// on that node, the same list for all, its own 3 from index `LOCAL_RANK × 3`.
#[test]
fn gang_processes_on_several_ranks_of_a_node_see_each_others_gpus() {
    let check = "echo \\\"$LOCAL_RANK $CUDA_VISIBLE_DEVICES $DLAUNCH_GPUS\\\" > $DLAUNCH_TASK_DIR/gpus.$RANK; \
        i=$((LOCAL_RANK * 3 + 1)); \
        picked=$(echo $CUDA_VISIBLE_DEVICES | cut -d, -f$i-$((i + 2))); \
        [ \\\"$picked\\\" = \\\"$DLAUNCH_GPUS\\\" ]";
    let job = format!(
        "[job]\nname = \"v\"\n[[tasks]]\nname = \"g\"\ncommand = \"{check}\"\nprocesses = 4\ngpus = 3\ncpus = 1\n"
    );
    let dir = JobDir::new(&job);
    let mut command = dir.mpirun_command(5, &[]);
    command.env("HWLOC_XMLFILE", fixture("topologies/nvidiaDGX2.xml"));
    let out = wait_with_limit(command.spawn().unwrap(), std::time::Duration::from_secs(300));
    let seen: Vec<Vec<String>> = (0..4)
        .map(|k| {
            let line = std::fs::read_to_string(dir.output("v").join(format!("tasks/g/gpus.{k}"))).unwrap_or_default();
            line.split_whitespace().map(str::to_string).collect()
        })
        .collect();
    assert!(out.status.success(), "{seen:?}\n{}", text(&out));
    let ranks: std::collections::BTreeSet<u64> = dir.summary("v")["tasks"][0]["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["rank"].as_u64().unwrap())
        .collect();
    assert_eq!(ranks.len(), 4, "one process per worker rank: {ranks:?}");
    for s in &seen {
        assert_eq!(s[1].split(',').count(), 12, "sees the gang's 12 GPUs: {seen:?}");
        assert_eq!(s[1], seen[0][1], "in the same order for all: {seen:?}");
    }
}
