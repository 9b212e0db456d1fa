//! Tasks and ranks misbehaving: crashes, memory exhaustion, runaway logs, escaped children,
//! silent workers. Each is recorded with a clear reason, cleaned up, and the run goes on.

mod common;

use std::time::Duration;

use common::*;

fn reason_of(dir: &JobDir, name: &str, id: &str) -> String {
    tasks_by_id(&dir.summary(name))[id]["reason"].as_str().unwrap().to_string()
}

#[test]
fn crashes_and_runaway_logs_are_recorded_and_the_worker_goes_on() {
    let job = "[job]\nname = \"bad\"\nlog_limit = \"1MiB\"\n\
        [[tasks]]\nname = \"segv\"\ncommand = \"kill -SEGV $$\"\n\
        [[tasks]]\nname = \"chatty\"\ncommand = \"yes 'all work and no play'\"\n\
        [[tasks]]\nname = \"fine\"\ncommand = \"echo ok\"\n";
    let dir = JobDir::new(job);
    let out = dir.mpirun(2, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(reason_of(&dir, "bad", "segv").starts_with("killed by SIGSEGV"), "{}", reason_of(&dir, "bad", "segv"));
    assert_eq!(reason_of(&dir, "bad", "chatty"), "stopped: stdout exceeded log_limit (1 MiB)");
    let size = std::fs::metadata(dir.output("bad").join("tasks/chatty/attempt-0/stdout")).unwrap().len();
    assert!(size < 512 << 20, "the log was cut off in time: {size} bytes");
    assert_eq!(tasks_by_id(&dir.summary("bad"))["fine"]["status"], "succeeded", "the same worker went on");
}

#[test]
fn an_out_of_memory_kill_is_recorded_with_its_likely_cause() {
    let cgroup = std::path::Path::new("/sys/fs/cgroup/memory");
    if !cgroup.join("tasks").exists() {
        eprintln!("skipped: no cgroup v1 memory controller to confine the test's allocation");
        return;
    }
    let group = cgroup.join(format!("dlaunch-oom-{}", std::process::id()));
    // The task confines itself to 32 MiB and then allocates 512 MiB: the kernel's OOM killer ends it.
    let job = format!(
        "[job]\nname = \"oom\"\n[[tasks]]\nname = \"hog\"\ncommand = \"mkdir -p {g} && echo 33554432 > {g}/memory.limit_in_bytes && echo $$ > {g}/tasks && exec python3 -c 'x = bytearray(512 << 20); x[::4096] = b\\\"x\\\" * len(x[::4096])'\"\n",
        g = group.display()
    );
    let dir = JobDir::new(&job);
    let out = dir.mpirun(2, &[]);
    let _ = std::fs::remove_dir(&group);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let reason = reason_of(&dir, "oom", "hog");
    assert_eq!(reason, "killed by SIGKILL (out of memory, or killed from outside)");
}

#[test]
fn children_that_escape_their_task_are_cleaned_up() {
    let marker = format!("dlaunch-escape-{}", std::process::id());
    let job = format!(
        "[job]\nname = \"escape\"\n[[tasks]]\nname = \"daemon\"\ncommand = \"setsid sh -c 'sleep 300; : {marker}' & sleep 0.5; echo launched\"\n"
    );
    let dir = JobDir::new(&job);
    let child = dir.mpirun_command(2, &[]).spawn().unwrap();
    assert!(eventually(Duration::from_secs(60), || !processes_matching(&marker).is_empty()), "the daemon started");
    assert!(
        eventually(Duration::from_secs(20), || processes_matching(&marker).is_empty()),
        "the escaped process outlived its task"
    );
    let out = wait_with_limit(child, Duration::from_secs(60));
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_silent_worker_is_given_up_and_its_tasks_run_elsewhere() {
    let marker = format!("dlaunch-silent-{}", std::process::id());
    let job = format!(
        "[job]\nname = \"silent\"\nheartbeat_timeout = \"2s\"\n[[tasks]]\nname = \"t\"\ncommand = \"sleep 4; : {marker}\"\nmatrix = {{ i = [1, 2, 3, 4] }}\n"
    );
    let dir = JobDir::new(&job);
    let child = dir.mpirun_command(3, &[]).spawn().unwrap();
    assert!(eventually(Duration::from_secs(60), || processes_matching(&marker).len() >= 2), "tasks running");
    let shell = processes_matching(&marker)[0];
    let worker = parent_of(shell).expect("a worker rank");
    let stopped_rank: u64 =
        env_of(shell, "DLAUNCH_WORKER_RANK").and_then(|r| r.parse().ok()).expect("DLAUNCH_WORKER_RANK");
    send_signal(&worker.to_string(), "STOP");
    let (out, hung) = wait_or_kill(child, Duration::from_secs(120));
    // Rank 0 ends a run that lost a rank with MPI_Abort, and OpenMPI's mpirun then kills every
    // rank. Under load it has twice hung there instead, after dlaunch's part was done
    // (`ORTE_ERROR_LOG: Out of resource in show_help.c`); dlaunch's part is what is checked.
    let aborted = String::from_utf8_lossy(&out.stderr).contains("ending the MPI job with MPI_Abort");
    assert!(!hung || aborted, "mpirun hung before rank 0 was done:\n{}", text(&out));
    let summary = dir.summary("silent");
    assert_eq!(summary["counts"]["succeeded"], 4, "{summary:#}\n{}", text(&out));
    let journal = dir.journal("silent");
    let lost = journal.iter().find(|e| e["event"] == "worker_lost").expect("worker_lost recorded");
    assert_eq!(lost["rank"], stopped_rank, "the rank given up on is the one stopped: {lost}");
    assert!(lost["reason"].as_str().unwrap().starts_with("no heartbeat for"), "{lost}");
    let moved = journal.iter().filter(|e| e["event"] == "attempt_ended" && e["reason"] == "worker lost").count();
    assert!(moved >= 1, "its tasks were re-queued");
    assert!(String::from_utf8_lossy(&out.stderr).contains("were lost"), "{}", text(&out));
}

/// `log_limit` holds whatever the task does: `yes` at full speed, and a writer that ignores the
/// stop signal and keeps writing through the grace period. A log gets the limit and a one-line
/// note (docs/job-file.md: at most 100 bytes over), never more.
#[test]
fn log_limit_holds_against_fast_writers_and_ones_that_ignore_the_stop_signal() {
    const LIMIT: u64 = 1 << 20;
    let job = "[job]\nname = \"cap\"\nlog_limit = \"1MiB\"\ngrace = \"3s\"\n\
        [[tasks]]\nname = \"yes\"\ncommand = \"yes\"\n\
        [[tasks]]\nname = \"stubborn\"\ncommand = \"trap '' TERM; yes 'ignore that' >&2\"\n";
    let dir = JobDir::new(job);
    let out = dir.mpirun(2, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    for (task, stream) in [("yes", "stdout"), ("stubborn", "stderr")] {
        assert_eq!(reason_of(&dir, "cap", task), format!("stopped: {stream} exceeded log_limit (1 MiB)"));
        let log = dir.output("cap").join(format!("tasks/{task}/attempt-0/{stream}"));
        let size = std::fs::metadata(&log).unwrap().len();
        assert!((LIMIT..=LIMIT + 100).contains(&size), "{task}: {size} bytes against a limit of {LIMIT}");
        let tail = std::fs::read(&log).unwrap();
        assert!(String::from_utf8_lossy(&tail[tail.len() - 100..]).contains("log_limit reached"), "{task}: no note");
    }
}

/// A mount of a tiny tmpfs, removed when dropped (also when a test fails).
/// The task logs on a full disk: dlaunch could not keep its output, which is not the task's
/// fault. The task is recorded interrupted with the reason, nothing more starts, the exit code
/// says work is left, and a plain rerun (no --retry-failed) runs both tasks.
#[test]
fn a_full_disk_is_dlaunchs_failure_and_its_tasks_run_on_resume() {
    let job = "[job]\nname = \"full\"\nslots_per_worker = 1\n\
        [[tasks]]\nname = \"big\"\ncommand = \"head -c 1000000 /dev/zero\"\n\
        [[tasks]]\nname = \"after\"\ncommand = \"echo later\"\n";
    full_disk_then_rerun(job);
}

#[test]
fn a_stopped_worker_given_up_kills_its_tasks_as_soon_as_it_runs_again() {
    // The task ignores SIGTERM (as one that checkpoints for its whole grace would keep running):
    // only an immediate SIGKILL ends the old copy before the new one has run for long.
    let marker = format!("dlaunch-resumed-{}", std::process::id());
    let job = format!(
        "[job]\nname = \"resumed\"\nheartbeat_timeout = \"2s\"\ngrace = \"60s\"\n[[tasks]]\nname = \"t\"\ncommand = \"trap '' TERM; echo $DLAUNCH_ATTEMPT | tee -a $DLAUNCH_TASK_DIR/started; sleep $((30 - 24 * DLAUNCH_ATTEMPT)); : {marker}\"\n"
    );
    let dir = JobDir::new(&job);
    let child = dir.mpirun_command(3, &[]).spawn().unwrap();
    assert!(eventually(Duration::from_secs(60), || processes_matching(&marker).len() == 1), "the task runs");
    let first = processes_matching(&marker)[0];
    let worker = parent_of(first).expect("a worker rank");
    let rank: u64 = env_of(first, "DLAUNCH_WORKER_RANK").and_then(|r| r.parse().ok()).expect("DLAUNCH_WORKER_RANK");
    send_signal(&worker.to_string(), "STOP");
    let given_up = eventually(Duration::from_secs(30), || {
        dir.journal("resumed").iter().any(|e| e["event"] == "worker_lost" && e["rank"] == rank)
    });
    send_signal(&worker.to_string(), "CONT");
    assert!(given_up, "the stopped worker was given up");
    let gone = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "));
    assert!(
        eventually(Duration::from_millis(1500), || gone(first)),
        "the old copy still runs after its worker woke up: two copies at once"
    );
    let out = wait_with_limit(child, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("no word from the coordinator"), "its own stop is not rank 0's silence: {stderr}");
    let task = &tasks_by_id(&dir.summary("resumed"))["t"];
    assert_eq!(task["status"], "succeeded", "{}", text(&out));
    assert_eq!(task["attempts"], 2);
    let task_dir = dir.output("resumed").join("tasks/t");
    for attempt in 0..2 {
        let stdout = std::fs::read_to_string(task_dir.join(format!("attempt-{attempt}/stdout")));
        assert_eq!(stdout.unwrap(), format!("{attempt}\n"), "each attempt has its own logs");
    }
    let started = std::fs::read_to_string(task_dir.join("started")).unwrap();
    assert_eq!(started, "0\n1\n", "DLAUNCH_TASK_DIR is the same for both attempts");
}

#[test]
fn workers_stop_their_tasks_and_exit_when_rank_0_is_killed() {
    // `--enable-recovery`: mpirun keeps the other ranks alive when one dies (OpenMPI 4.1).
    let marker = format!("dlaunch-orphan-{}", std::process::id());
    let job = format!(
        "[job]\nname = \"orphan\"\nheartbeat_timeout = \"2s\"\ngrace = \"10s\"\n[[tasks]]\nname = \"t\"\ncommand = \"trap 'echo stopped > $DLAUNCH_TASK_DIR/term; exit 3' TERM; sleep 60 & wait; : {marker}\"\nmatrix = {{ i = [1, 2] }}\n"
    );
    let dir = JobDir::new(&job);
    let child = dir.mpirun_command_with(3, &["--enable-recovery"], &[]).spawn().unwrap();
    assert!(eventually(Duration::from_secs(60), || processes_matching(&marker).len() == 2), "tasks running");
    let job_path = dir.job().display().to_string();
    let rank0 = rank_process(&job_path, 0).expect("rank 0");
    send_signal(&rank0.to_string(), "KILL");
    let out = wait_with_limit(child, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.matches("no word from the coordinator (rank 0)").count(), 2, "{}", text(&out));
    assert!(processes_matching(&marker).is_empty(), "no task is left running");
    for i in [1, 2] {
        let term = dir.output("orphan").join(format!("tasks/t[i={i}]/term"));
        assert!(term.exists(), "task {i} was stopped with its stop signal first, so it could checkpoint");
    }
}
