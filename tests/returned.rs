//! Returned output (issue 17) under `mpirun -n 4` with the mode forced: tasks write node-locally
//! and rank 0 gets their logs and declared outputs over MPI.

mod common;

use common::*;
use std::time::Duration;

const JOB: &str = r#"
[job]
name = "ret"
output = "returned"
output_limit = "1MiB"

[[tasks]]
name = "w"
matrix = { i = [1, 2, 3] }
command = """
echo "task dir $DLAUNCH_TASK_DIR"; echo err-{i} >&2
mkdir -p "$DLAUNCH_TASK_DIR/metrics"
echo '{"i": {i}}' > "$DLAUNCH_TASK_DIR/metrics/m.json"
head -c 300000 /dev/urandom > "$DLAUNCH_TASK_DIR/model.pt"
head -c 2000000 /dev/zero > "$DLAUNCH_TASK_DIR/big.pt"
test {i} != 3
"""
outputs = ["model.pt", "metrics/*.json", "big.pt"]
"#;

#[test]
fn logs_and_outputs_come_back_to_rank_0_failures_included_within_the_limit() {
    let dir = JobDir::new(JOB);
    let out = dir.mpirun(4, &["run"]);
    let log = text(&out);
    assert!(log.contains("returned mode"), "{log}");
    let output = dir.output("ret");
    let journal = dir.journal("ret");
    for i in 1..=3 {
        let attempt = output.join(format!("tasks/w[i={i}]/attempt-0"));
        let stdout = std::fs::read_to_string(attempt.join("stdout")).unwrap();
        let task_dir = stdout.trim().strip_prefix("task dir ").unwrap();
        assert!(!std::path::Path::new(task_dir).starts_with(&output), "the task ran node-locally: {task_dir}");
        assert_eq!(std::fs::read_to_string(attempt.join("stderr")).unwrap(), format!("err-{i}\n"));
        assert_eq!(
            std::fs::read_to_string(attempt.join("outputs/metrics/m.json")).unwrap(),
            format!("{{\"i\": {i}}}\n")
        );
        let model = std::fs::read(attempt.join("outputs/model.pt")).unwrap();
        assert_eq!(model.len(), 300000, "task {i}, failed or not, returned its model");
        let returned = journal
            .iter()
            .find(|e| {
                e["event"] == "output_returned" && e["task"] == format!("w[i={i}]") && e["path"] == "outputs/model.pt"
            })
            .unwrap_or_else(|| panic!("no output_returned for w[i={i}]: {journal:?}"));
        assert_eq!(returned["blake3"], blake3::hash(&model).to_hex().to_string());
        assert!(!attempt.join("outputs/big.pt").exists(), "past output_limit");
        assert!(journal.iter().any(|e| e["event"] == "output_missing"
            && e["task"] == format!("w[i={i}]")
            && e["reason"].as_str().unwrap().contains("output_limit")));
        let partial: Vec<_> = std::fs::read_dir(attempt.join("outputs"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().contains("partial"))
            .collect();
        assert!(partial.is_empty(), "nothing left under a temporary name: {partial:?}");
    }
    let summary = dir.summary("ret");
    let tasks = tasks_by_id(&summary);
    assert_eq!(tasks["w[i=3]"]["status"], "failed", "{summary}");
}

/// A task truncates its own log while the worker sends it: the log ends where it could be
/// read and the run ends (it used to wait for the rest of the log forever).
#[test]
fn a_log_the_task_truncates_while_it_is_sent_ends_there() {
    let dir = JobDir::new(
        "[job]\nname = \"cut\"\noutput = \"returned\"\n[[tasks]]\nname = \"a\"\n\
         command = 'head -c 30000000 /dev/zero; truncate -s 0 \"$DLAUNCH_TASK_DIR\"/attempt-0/stdout; sleep 1'\n\
         [[tasks]]\nname = \"b\"\ncommand = \"sleep 2; echo done\"\n",
    );
    let child = dir.mpirun_command(2, &[]).spawn().unwrap();
    let out = wait_with_limit(child, Duration::from_secs(90));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let tasks = tasks_by_id(&dir.summary("cut"));
    assert!(tasks.values().all(|t| t["status"] == "succeeded"), "{tasks:#?}");
}

/// Output names rank 0 must store under a temporary name first: one near NAME_MAX, and one
/// that looks like a temporary name. Both come back; neither stops the run.
#[test]
fn outputs_named_near_the_limit_or_like_a_temporary_name_come_back() {
    let long = format!("{}.json", "lr0.001_bs".repeat(24));
    let dir = JobDir::new(&format!(
        "[job]\nname = \"names\"\noutput = \"returned\"\n[[tasks]]\nname = \"t\"\n\
         command = 'cd \"$DLAUNCH_TASK_DIR\" && echo long > {long} && echo odd > .dlaunch-partial-1 && echo a > a'\n\
         outputs = [\"*\", \".*\"]\n"
    ));
    let out = dir.mpirun(2, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let outputs = dir.output("names").join("tasks/t/attempt-0/outputs");
    for (name, text) in [(long.as_str(), "long\n"), (".dlaunch-partial-1", "odd\n"), ("a", "a\n")] {
        assert_eq!(std::fs::read_to_string(outputs.join(name)).unwrap(), text, "{name}");
    }
}

#[test]
fn an_output_pattern_that_leaves_the_task_directory_is_refused_by_check() {
    let dir = JobDir::new(&JOB.replace(r#""big.pt"]"#, r#""../../etc/passwd"]"#));
    let out = dir.alone(&["check"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("job.toml:")
            && stderr.contains("tasks[0].outputs[2]")
            && stderr.contains("leaves DLAUNCH_TASK_DIR"),
        "{stderr}"
    );
}

#[test]
fn a_rerun_attempt_starts_from_the_checkpoint_its_last_attempt_returned() {
    let dir = JobDir::new(
        r#"
[job]
name = "ckpt"
output = "returned"

[[tasks]]
name = "train"
command = """
cd "$DLAUNCH_TASK_DIR"
if [ -f state/ckpt ]; then echo "resumed from $(cat state/ckpt)"; cksum < state/weights; exit 0; fi
echo "task dir $DLAUNCH_TASK_DIR"; mkdir -p state; echo step-7 > state/ckpt
head -c 3000000 /dev/urandom > state/weights; cksum < state/weights > state/sum; exit 1
"""
outputs = ["state/ckpt", "state/weights", "state/sum"]
"#,
    );
    let first = dir.mpirun(4, &["run"]);
    let output = dir.output("ckpt");
    let stdout = std::fs::read_to_string(output.join("tasks/train/attempt-0/stdout")).unwrap();
    let task_dir = stdout.trim().strip_prefix("task dir ").unwrap_or_else(|| panic!("{stdout}\n{}", text(&first)));
    // A new allocation: the node-local directory of the first is gone.
    std::fs::remove_dir_all(task_dir).unwrap();
    let second = dir.mpirun(4, &["run", "--retry-failed"]);
    // The weights span several turns of rank 0's loop (it sends a checkpoint 512 KiB a turn).
    let sum = std::fs::read_to_string(output.join("tasks/train/attempt-0/outputs/state/sum")).unwrap();
    let resumed = std::fs::read_to_string(output.join("tasks/train/attempt-1/stdout")).unwrap();
    assert_eq!(resumed, format!("resumed from step-7\n{sum}"), "{}", text(&second));
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
}

/// A worker rank stops (SIGSTOP) while it sends a large output; rank 0 gives it up after
/// `heartbeat_timeout`. The output it had finished sending keeps its name, the one under way
/// leaves no file behind and is journaled missing for that attempt, and the task runs again.
#[test]
fn a_worker_lost_mid_transfer_loses_only_what_was_still_under_way() {
    let dir = JobDir::new(
        r#"
[job]
name = "lost"
output = "returned"
heartbeat_timeout = "2s"

[[tasks]]
name = "t"
command = """
echo kept-$DLAUNCH_ATTEMPT > "$DLAUNCH_TASK_DIR/a.txt"
head -c $((300000000 / (1 + 999 * DLAUNCH_ATTEMPT))) /dev/zero > "$DLAUNCH_TASK_DIR/big.bin"
"""
outputs = ["a.txt", "big.bin"]
"#,
    );
    let child = dir.mpirun_command(3, &[]).spawn().unwrap();
    let first = dir.output("lost").join("tasks/t/attempt-0/outputs");
    let partial = || {
        std::fs::read_dir(&first).into_iter().flatten().flatten().any(|e| {
            e.file_name().to_str().is_some_and(|n| n.starts_with(".dlaunch-partial-"))
                && e.metadata().is_ok_and(|m| m.len() > 1_000_000)
        })
    };
    let streaming = eventually(Duration::from_secs(60), partial);
    let rank = dir
        .journal("lost")
        .iter()
        .find(|e| e["event"] == "attempt_started")
        .and_then(|e| e["processes"][0]["rank"].as_u64())
        .expect("attempt_started with a rank");
    let worker = rank_process(&dir.job().display().to_string(), rank as u32).expect("the worker rank");
    send_signal(&worker.to_string(), "STOP");
    let lost = eventually(Duration::from_secs(30), || {
        dir.journal("lost").iter().any(|e| e["event"] == "worker_lost" && e["rank"] == rank)
    });
    send_signal(&worker.to_string(), "CONT");
    let out = wait_with_limit(child, Duration::from_secs(120));
    assert!(streaming && lost, "stopped mid-transfer ({streaming}) and given up ({lost}): {}", text(&out));
    assert_eq!(std::fs::read_to_string(first.join("a.txt")).unwrap(), "kept-0\n", "a whole file stays");
    let names: Vec<String> =
        std::fs::read_dir(&first).unwrap().flatten().map(|e| e.file_name().into_string().unwrap()).collect();
    assert_eq!(names, ["a.txt"], "nothing partial is left, under any name");
    let journal = dir.journal("lost");
    let missing: Vec<_> = journal.iter().filter(|e| e["event"] == "output_missing").collect();
    assert_eq!(missing.len(), 1, "{missing:?}");
    assert_eq!((&missing[0]["path"], &missing[0]["attempt"]), (&"outputs/big.bin".into(), &0.into()));
    assert!(missing[0]["reason"].as_str().unwrap().contains(&format!("rank {rank} was lost")), "{missing:?}");
    let task = &tasks_by_id(&dir.summary("lost"))["t"];
    assert_eq!((&task["status"], &task["attempts"]), (&"succeeded".into(), &2.into()), "{}", text(&out));
    let second = dir.output("lost").join("tasks/t/attempt-1/outputs");
    assert_eq!(std::fs::read_to_string(second.join("a.txt")).unwrap(), "kept-1\n");
    assert_eq!(std::fs::metadata(second.join("big.bin")).unwrap().len(), 300000);
}

/// Rank 0's disk fills while a task's log comes back: the attempt is dlaunch's failure (as in
/// shared mode), nothing more starts, and a plain rerun runs what was left.
#[test]
fn a_full_disk_on_rank_0_stops_dispatching_and_the_attempt_is_rerun() {
    let job = "[job]\nname = \"full\"\noutput = \"returned\"\nslots_per_worker = 1\n\
        [[tasks]]\nname = \"big\"\ncommand = \"head -c 1000000 /dev/zero\"\n\
        [[tasks]]\nname = \"after\"\ncommand = \"echo later\"\nafter = [\"big\"]\n";
    let Some(dir) = full_disk_then_rerun(job) else { return };
    assert_eq!(std::fs::metadata(dir.output("full").join("tasks/big/attempt-1/stdout")).unwrap().len(), 1000000);
}
