//! Attacks on the rank's cached output directories, the port check, the children lists and
//! prefetch's default of 2. Each test says whether it shows a defect (it fails until fixed)
//! or covers a risk that held up (it passes).

mod common;

use std::time::Duration;

use common::*;

/// Task `a` does something to the run's `tasks/` directory, then `b` (after `a`, same rank:
/// one worker, one slot) writes into its own `DLAUNCH_TASK_DIR`, which must exist before it
/// starts, at the path the variable names.
fn tasks_dir_changed_mid_run(name: &str, change: &str) -> JobDir {
    let dir = JobDir::new(&format!(
        "[job]\nname = \"{name}\"\nslots_per_worker = 1\n\
         [[tasks]]\nname = \"a\"\ncommand = 'cd \"$(dirname \"$DLAUNCH_TASK_DIR\")/..\" && {change}'\n\
         [[tasks]]\nname = \"b\"\nafter = [\"a\"]\ncommand = 'echo result > \"$DLAUNCH_TASK_DIR/result\"'\n"
    ));
    let out = dir.mpirun(2, &[]);
    let summary = dir.summary(name);
    let tasks = tasks_by_id(&summary);
    assert_eq!(tasks["a"]["status"], "succeeded", "{summary:#}\n{}", text(&out));
    assert_eq!(
        tasks["b"]["status"],
        "succeeded",
        "b could not use its task directory: {:#}\n{}",
        tasks["b"],
        text(&out)
    );
    let result = dir.output(name).join("tasks/b/result");
    assert_eq!(std::fs::read_to_string(&result).unwrap_or_default(), "result\n", "{}", result.display());
    dir
}

/// `tasks/` removed while the run goes on (a user freeing space, a task cleaning up): the
/// next task's directory is made again, as it was before `tasks/` was opened once per rank.
#[test]
fn a_task_directory_is_made_after_tasks_was_removed_mid_run() {
    tasks_dir_changed_mid_run("removed", "rm -rf tasks");
}

/// `tasks/` renamed while the run goes on (archived): the next task's directory must be made
/// where `DLAUNCH_TASK_DIR` points, not in the renamed directory the rank still holds open.
#[test]
fn a_task_directory_is_made_where_its_variable_points_after_tasks_was_renamed() {
    let dir = tasks_dir_changed_mid_run("renamed", "mv tasks tasks.archived");
    let stray = dir.output("renamed").join("tasks.archived/b");
    assert!(!stray.exists(), "b's directory was made in the archived one: {}", stray.display());
}

/// A program listening on IPv6 only ([::1], or [::] with IPV6_V6ONLY) holds the port for a
/// task that binds [::] as dual-stack programs do (Python's `socket.create_server(...,
/// dualstack_ipv6=True)`, servers that bind "::" on hosts with IPv6): the documented check
/// ("one that another program listens on runs the attempt again at once on other ports") must
/// see it, or the attempt fails with "Address already in use". The check binds 0.0.0.0 only.
#[test]
fn a_port_a_program_listens_on_over_ipv6_only_is_in_use() {
    let Ok(listener) = std::net::TcpListener::bind("[::1]:0") else {
        eprintln!("no IPv6 loopback here: nothing to check");
        return;
    };
    let port = listener.local_addr().unwrap().port();
    let task_bind = std::net::TcpListener::bind(("::", port));
    assert!(task_bind.is_err(), "a task binding [::]:{port} would not clash: no defect to show");
    assert!(dlaunch::proc::port_in_use(port), "[::1]:{port} listened on, yet the worker finds the port free");
}

/// Prefetch's default (2) lets a worker hold two orders behind a task that runs until the
/// second of them has run. Both must be recalled in turn to the rank whose slot frees, or the
/// run waits on itself: the recall test in prefetch.rs holds one order (`prefetch = 1`).
/// Covers a risk, not a defect found: it passes.
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

/// A task that leaves a link (or a file) where its own directory was, then fails, is at fault
/// for its retry not starting, as it is for a planted `attempt-<n>` (output_dir.rs): the task
/// fails with the reason. dlaunch must not call it its own failure, halt the run with every
/// other task left "not run", and halt again on every resume (exit 3, "run the same command
/// again to finish").
#[test]
fn a_link_a_task_leaves_for_its_own_directory_fails_the_task_not_the_run() {
    let victim = tempfile::tempdir().unwrap();
    let dir = JobDir::new(&format!(
        "[job]\nname = \"own-link\"\nslots_per_worker = 1\n\
         [[tasks]]\nname = \"t\"\nretries = 1\n\
         command = 'rm -rf \"$DLAUNCH_TASK_DIR\" && ln -s {victim} \"$DLAUNCH_TASK_DIR\"; exit 1'\n\
         [[tasks]]\nname = \"other\"\ncommand = 'true'\n",
        victim = victim.path().display()
    ));
    let out = dir.alone(&[]);
    let summary = dir.summary("own-link");
    let tasks = tasks_by_id(&summary);
    assert_eq!(summary["stopped"], serde_json::Value::Null, "the run halted: {summary:#}");
    assert_eq!(tasks["other"]["status"], "succeeded", "{summary:#}");
    assert_eq!(tasks["t"]["status"], "failed", "{summary:#}");
    assert!(tasks["t"]["reason"].as_str().unwrap_or("").contains("link"), "{:#}", tasks["t"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(std::fs::read_dir(victim.path()).unwrap().count(), 0, "nothing made through the link");
}

/// A worker holding two orders (prefetch's default) is stopped while its task runs, given up,
/// and woken once its task has ended meanwhile: it must not start what it held, which runs
/// elsewhere now. Every run of a task shows in its `ran` marker and in the journal alike.
/// Covers a risk, not a defect found: it passes.
#[test]
fn orders_held_by_a_worker_given_up_run_elsewhere_exactly_once() {
    let marker = format!("dlaunch-attack6-held-{}", std::process::id());
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

/// A daemon a finished task left behind (setsid, double fork: the rank, a child subreaper,
/// inherits it) is killed while the run goes on, not only when it ends: alone (tasks started
/// by a thread other than the main one, orphans given to the main one) and under mpirun.
/// Covers a risk of reading the children lists from files kept open, not a defect found.
#[test]
fn a_daemon_a_finished_task_left_is_killed_while_the_run_goes_on() {
    for ranks in [1, 2] {
        let marker = format!("dlaunch-attack6-daemon-{}-{ranks}", std::process::id());
        let dir = JobDir::new(&format!(
            "[job]\nname = \"daemon\"\nslots_per_worker = 2\n\
             [[tasks]]\nname = \"leaves\"\ncommand = \"setsid sh -c 'sleep 300; : {marker}' >/dev/null 2>&1 & sleep 1\"\n\
             [[tasks]]\nname = \"goes-on\"\nafter = [\"leaves\"]\ncommand = \"sleep 10\"\n"
        ));
        let child = match ranks {
            1 => {
                let mut command = std::process::Command::new(DLAUNCH);
                command.arg(dir.job()).current_dir(dir.path());
                command.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
                command.spawn().unwrap()
            }
            _ => dir.mpirun_command(ranks, &[]).spawn().unwrap(),
        };
        assert!(eventually(Duration::from_secs(60), || !processes_matching(&marker).is_empty()), "the daemon started");
        let killed = eventually(Duration::from_secs(5), || processes_matching(&marker).is_empty());
        let running = dir.journal("daemon").iter().all(|e| e["event"] != "run_ended");
        let out = wait_with_limit(child, Duration::from_secs(60));
        assert!(
            killed && running,
            "{ranks} rank(s): the daemon outlived its task while the run went on\n{}",
            text(&out)
        );
        assert!(out.status.success(), "{}", text(&out));
    }
}
