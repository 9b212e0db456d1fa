//! Prefetch under real mpirun: workers hold their next orders and start them without a round
//! trip through rank 0, every task still runs exactly once, and with the environment it gets
//! without prefetch.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use common::*;

const TASKS: usize = 24;

/// Each task writes its environment and appends its rank to a marker (twice would show).
fn job(name: &str, prefetch: u32, command: &str) -> String {
    let values: Vec<String> = (0..TASKS).map(|i| i.to_string()).collect();
    format!(
        "[job]\nname = \"{name}\"\nslots_per_worker = 1\nprefetch = {prefetch}\n[[tasks]]\nname = \"t\"\n\
         command = \"env > $DLAUNCH_TASK_DIR/env; echo $DLAUNCH_WORKER_RANK >> $DLAUNCH_TASK_DIR/ran; {command}\"\n\
         cpus = 0\nmatrix = {{ i = [{}] }}\n",
        values.join(", ")
    )
}

fn ran(dir: &JobDir, name: &str) -> usize {
    let tasks = dir.output(name).join("tasks");
    std::fs::read_dir(tasks).into_iter().flatten().flatten().filter(|t| t.path().join("ran").exists()).count()
}

/// Every task ran once, on the rank the summary names; their environments by task id, with
/// the job's directory written as `<dir>`.
fn check_exactly_once(dir: &JobDir, name: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let summary = dir.summary(name);
    assert_eq!(summary["counts"]["succeeded"], TASKS, "{summary:#}");
    let root = dir.path().to_string_lossy().into_owned();
    let mut envs = BTreeMap::new();
    for task in summary["tasks"].as_array().unwrap() {
        let id = task["id"].as_str().unwrap();
        let task_dir = dir.output(name).join("tasks").join(id);
        let lines = std::fs::read_to_string(task_dir.join("ran")).unwrap();
        assert_eq!(lines.lines().count(), 1, "{id} ran {} times", lines.lines().count());
        assert_eq!(lines.trim(), task["rank"].to_string(), "summary names the rank that ran {id}");
        assert_eq!(task["attempts"], 1);
        let env = read_env(&task_dir.join("env"));
        envs.insert(id.to_string(), env.into_iter().map(|(k, v)| (k, v.replace(&root, "<dir>"))).collect());
    }
    let journal = dir.journal(name);
    let starts = journal.iter().filter(|e| e["event"] == "attempt_started").count();
    assert_eq!(starts, TASKS, "one attempt_started per task, none for an order only held");
    envs
}

/// The variables a task sees that depend on where and when it ran, not on prefetch.
fn placement_free(env: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    const WHERE_AND_WHEN: [&str; 8] = [
        "DLAUNCH_WORKER_RANK",
        "DLAUNCH_COORDINATOR_ADDRESS",
        "DLAUNCH_GUARD",
        "MASTER_PORT",
        "DLAUNCH_PORT",
        "TF_CONFIG",
        "PWD",
        "_",
    ];
    env.iter().filter(|(k, _)| !WHERE_AND_WHEN.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect()
}

#[test]
fn many_short_tasks_run_exactly_once_with_the_environment_they_get_without_prefetch() {
    let with = JobDir::new(&job("with", 2, "true"));
    let out = with.mpirun(3, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let with_envs = check_exactly_once(&with, "with");
    let without = JobDir::new(&job("with", 0, "true"));
    let out = without.mpirun(3, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let without_envs = check_exactly_once(&without, "with");
    for (id, env) in &with_envs {
        for name in ["RANK", "LOCAL_RANK", "WORLD_SIZE", "DLAUNCH_TASK_ID", "DLAUNCH_ATTEMPT", "DLAUNCH_TASK_DIR"] {
            assert!(env.contains_key(name), "{id} has no {name}");
        }
        assert_eq!(placement_free(env), placement_free(&without_envs[id]), "{id}");
    }
}

/// The pid of rank 0's dlaunch, once it runs.
fn rank_0(job: &Path) -> Option<u32> {
    let needle = job.to_string_lossy().into_owned();
    processes_matching(&needle).into_iter().find(|&pid| {
        env_of(pid, "OMPI_COMM_WORLD_RANK").as_deref() == Some("0") && env_of(pid, "DLAUNCH_TASK_ID").is_none()
    })
}

#[test]
fn workers_start_what_they_hold_while_rank_0_stands_still() {
    let dir = JobDir::new(&job("held", 2, "sleep 0.3"));
    let child = dir.mpirun_command(3, &[]).spawn().expect("spawn mpirun");
    assert!(eventually(Duration::from_secs(60), || ran(&dir, "held") >= 2), "tasks started");
    let pid = rank_0(&dir.job()).expect("rank 0's pid");
    send_signal(&pid.to_string(), "STOP");
    let before = ran(&dir, "held");
    std::thread::sleep(Duration::from_secs(2));
    let during = ran(&dir, "held") - before;
    send_signal(&pid.to_string(), "CONT");
    let out = wait_with_limit(child, Duration::from_secs(300));
    assert!(out.status.success(), "{}", text(&out));
    // Two workers, one slot and two held orders each: both held orders of each start while
    // rank 0 is stopped. Without prefetch, only an order already on its way could.
    assert!(during >= 3, "{during} tasks started while rank 0 stood still");
    check_exactly_once(&dir, "held");
}

#[test]
fn an_order_held_behind_a_long_task_is_recalled_and_runs_where_room_frees() {
    // `waits` runs until `releaser` has run. Rank 1 runs `waits` and is sent `releaser` ahead;
    // rank 2's short task ends first. Held on rank 1 for good, `releaser` could only run after
    // `waits` gave up: recalled, it runs on rank 2.
    let dir = JobDir::new("");
    let marker = dir.path().join("released");
    let marker = marker.to_string_lossy();
    let toml = format!(
        "[job]\nname = \"recall\"\nslots_per_worker = 1\nprefetch = 1\n\
         [[tasks]]\nname = \"waits\"\ncpus = 0\n\
         command = \"i=0; while [ ! -e {marker} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; test -e {marker}\"\n\
         [[tasks]]\nname = \"short\"\ncpus = 0\ncommand = \"sleep 0.5\"\n\
         [[tasks]]\nname = \"releaser\"\ncpus = 0\ncommand = \"touch {marker}\"\n"
    );
    std::fs::write(dir.job(), toml).unwrap();
    let out = dir.mpirun(3, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let tasks = tasks_by_id(&dir.summary("recall"));
    assert_eq!(tasks["waits"]["rank"], 1, "placement as this test expects it");
    assert_eq!(tasks["releaser"]["rank"], 2, "{:#}", tasks["releaser"]);
    assert_eq!(tasks["releaser"]["attempts"], 1);
}

/// A worker holding the next order of its one slot has nothing to do until its task ends,
/// which wakes it (SIGCHLD): it sleeps meanwhile instead of polling for orders every 200 µs.
/// Each task counts its worker rank's wake-ups (voluntary context switches of its main
/// thread) over a second: the first two run while the worker holds the next one (before:
/// over 3,000, like the third; now about 200, one per 5 ms sleep).
#[test]
fn a_worker_holding_its_next_order_sleeps_until_its_task_ends() {
    let count = "v() { awk '/^voluntary_ctxt_switches/ { print $2 }' /proc/$PPID/status; }; \
                 a=$(v); sleep 1; echo $(( $(v) - a )) > $DLAUNCH_TASK_DIR/wakeups";
    let dir = JobDir::new(&format!(
        "[job]\nname = \"held\"\nslots_per_worker = 1\n[[tasks]]\nname = \"t\"\ncommand = '''{count}'''\n\
         cpus = 0\nmatrix = {{ i = [1, 2, 3] }}\n"
    ));
    let out = dir.mpirun(2, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let tasks = dir.output("held").join("tasks");
    let wakeups: Vec<u64> = (1..=3)
        .map(|i| {
            let file = tasks.join(format!("t[i={i}]")).join("wakeups");
            std::fs::read_to_string(&file).unwrap().trim().parse().unwrap()
        })
        .collect();
    assert!(wakeups[..2].iter().all(|&n| n < 600), "wake-ups in each task's second: {wakeups:?}");
}

/// While every worker holds its next order, rank 0 has nothing to do until one starts what it
/// held, and that one's process gives it time to send the next: it sleeps meanwhile (a quarter
/// of the shortest recent process, at most 5 ms) instead of polling every 200 µs (before:
/// over 3,000 wake-ups of its main thread a second with tasks of 0.3 s; now about 200).
#[test]
fn rank_0_sleeps_while_every_worker_holds_its_next_order() {
    let dir = JobDir::new(&job("paced", 1, "sleep 0.4"));
    let child = dir.mpirun_command(3, &[]).spawn().expect("spawn mpirun");
    assert!(eventually(Duration::from_secs(60), || ran(&dir, "paced") >= 4), "tasks started");
    let pid = rank_0(&dir.job()).expect("rank 0's pid");
    let before = wakeups(pid).expect("rank 0 runs");
    std::thread::sleep(Duration::from_secs(1));
    let during = wakeups(pid).expect("rank 0 still runs") - before;
    let out = wait_with_limit(child, Duration::from_secs(300));
    assert!(out.status.success(), "{}", text(&out));
    assert!(during < 600, "rank 0 woke {during} times in a second");
    check_exactly_once(&dir, "paced");
}

/// Prefetch's default (2) lets a worker hold two orders behind a task that runs until the
/// second of them has run. Both must be recalled in turn to the rank whose slot frees, or the
/// run waits on itself: the recall test in prefetch.rs holds one order (`prefetch = 1`).
/// (Found in the sixth review: a risk that held.)
#[test]
fn both_orders_held_behind_a_long_task_are_recalled_in_turn() {
    let dir = JobDir::new("");
    let marker = dir.path().join("released");
    let marker = marker.to_string_lossy();
    // Orders go out as: waits and short start on ranks 1 and 2; then q1 (rank 1), q2 (rank 2)
    // and releaser (rank 1, the lowest rank holding the fewest) are held.
    let toml = format!(
        "[job]\nname = \"recall2\"\nslots_per_worker = 1\n\
         [[tasks]]\nname = \"waits\"\ncpus = 0\n\
         command = \"i=0; while [ ! -e {marker} ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; test -e {marker}\"\n\
         [[tasks]]\nname = \"short\"\ncpus = 0\ncommand = \"sleep 0.5\"\n\
         [[tasks]]\nname = \"q\"\ncpus = 0\ncommand = \"true\"\nmatrix = {{ i = [1, 2] }}\n\
         [[tasks]]\nname = \"releaser\"\ncpus = 0\ncommand = \"touch {marker}\"\n"
    );
    std::fs::write(dir.job(), toml).unwrap();
    let out = dir.mpirun(3, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let tasks = tasks_by_id(&dir.summary("recall2"));
    assert_eq!(tasks["waits"]["rank"], 1, "placement as this test expects it");
    assert_eq!(tasks["releaser"]["rank"], 2, "{:#}", tasks["releaser"]);
    assert!(tasks.values().all(|t| t["attempts"] == 1), "{tasks:#?}");
}

/// A worker holding two orders (prefetch's default) is stopped while its task runs, given up,
/// and woken once its task has ended meanwhile: it must not start what it held, which runs
/// elsewhere now. Every run of a task shows in its `ran` marker and in the journal alike.
/// (Found in the sixth review: a risk that held.)
#[test]
fn orders_held_by_a_worker_given_up_run_elsewhere_exactly_once() {
    let marker = format!("dlaunch-review6-held-{}", std::process::id());
    let dir = JobDir::new(&format!(
        "[job]\nname = \"held-lost\"\nslots_per_worker = 1\nheartbeat_timeout = \"2s\"\n[[tasks]]\nname = \"t\"\n\
         command = \"echo $DLAUNCH_WORKER_RANK >> $DLAUNCH_TASK_DIR/ran; sleep 3; : {marker}\"\n\
         cpus = 0\nmatrix = {{ i = [0, 1, 2, 3, 4, 5, 6, 7] }}\n"
    ));
    let child = dir.mpirun_command(3, &[]).spawn().unwrap();
    assert!(eventually(Duration::from_secs(60), || processes_matching(&marker).len() >= 2), "tasks running");
    let shell = processes_matching(&marker)[0];
    let worker = parent_of(shell).expect("a worker rank");
    let rank: u64 = env_of(shell, "DLAUNCH_WORKER_RANK").and_then(|r| r.parse().ok()).expect("DLAUNCH_WORKER_RANK");
    send_signal(&worker.to_string(), "STOP");
    let given_up = eventually(Duration::from_secs(30), || {
        dir.journal("held-lost").iter().any(|e| e["event"] == "worker_lost" && e["rank"] == rank)
    });
    // Its task has ended meanwhile: awake, the worker would start the next order it holds.
    assert!(eventually(Duration::from_secs(10), || !processes_matching(&marker).contains(&shell)));
    send_signal(&worker.to_string(), "CONT");
    assert!(given_up, "the stopped worker was given up");
    let (out, _hung) = wait_or_kill(child, Duration::from_secs(120));
    let summary = dir.summary("held-lost");
    assert_eq!(summary["counts"]["succeeded"], 8, "{summary:#}\n{}", text(&out));
    let journal = dir.journal("held-lost");
    for task in summary["tasks"].as_array().unwrap() {
        let id = task["id"].as_str().unwrap();
        let ran = std::fs::read_to_string(dir.output("held-lost").join("tasks").join(id).join("ran")).unwrap();
        let started = journal.iter().filter(|e| e["event"] == "attempt_started" && e["task"] == id).count();
        assert_eq!(ran.lines().count(), started, "{id} ran on ranks {ran:?}, the journal knows {started} starts");
    }
}
