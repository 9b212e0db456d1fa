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
    let environ = std::fs::read(format!("/proc/{shell}/environ")).expect("the task's environment");
    let stopped_rank: u64 = environ
        .split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(b"DLAUNCH_WORKER_RANK="))
        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        .expect("DLAUNCH_WORKER_RANK");
    send_signal(&worker.to_string(), "STOP");
    let out = wait_with_limit(child, Duration::from_secs(120));
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
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &std::path::Path, options: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let status = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", options, "tmpfs"]).arg(at).status();
        status.is_ok_and(|s| s.success()).then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The task logs on a full disk: dlaunch could not keep its output, which is not the task's
/// fault. The task is recorded interrupted with the reason, nothing more starts, the exit code
/// says work is left, and a plain rerun (no --retry-failed) runs both tasks.
#[test]
fn a_full_disk_is_dlaunchs_failure_and_its_tasks_run_on_resume() {
    let job = "[job]\nname = \"full\"\nslots_per_worker = 1\n\
        [[tasks]]\nname = \"big\"\ncommand = \"head -c 1000000 /dev/zero\"\n\
        [[tasks]]\nname = \"after\"\ncommand = \"echo later\"\n";
    let dir = JobDir::new(job);
    let Some(tmpfs) = Tmpfs::mount(&dir.output("full").join("tasks"), "size=64k") else {
        eprintln!("skipped: cannot mount a tmpfs (needs root)");
        return;
    };
    let out = dir.mpirun(2, &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    let tasks = tasks_by_id(&dir.summary("full"));
    assert_eq!(tasks["big"]["status"], "interrupted", "{tasks:#?}");
    let reason = tasks["big"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("dlaunch failed, not the task: cannot write"), "{reason}");
    assert!(reason.contains("No space left on device"), "{reason}");
    assert_ne!(tasks["after"]["status"], "succeeded", "nothing starts while the disk is full: {tasks:#?}");
    drop(tmpfs);
    let out = dir.mpirun(2, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let tasks = tasks_by_id(&dir.summary("full"));
    assert!(tasks.values().all(|t| t["status"] == "succeeded"), "{tasks:#?}");
}
