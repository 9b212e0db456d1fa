//! Returned output (issue 17) under `mpirun -n 4` with the mode forced: tasks write node-locally
//! and rank 0 gets their logs and declared outputs over MPI.

mod common;

use common::*;

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
if [ -f "$DLAUNCH_TASK_DIR/state/ckpt" ]; then echo "resumed from $(cat "$DLAUNCH_TASK_DIR/state/ckpt")"; exit 0; fi
echo "task dir $DLAUNCH_TASK_DIR"; mkdir -p "$DLAUNCH_TASK_DIR/state"; echo step-7 > "$DLAUNCH_TASK_DIR/state/ckpt"; exit 1
"""
outputs = ["state/ckpt"]
"#,
    );
    let first = dir.mpirun(4, &["run"]);
    let output = dir.output("ckpt");
    let stdout = std::fs::read_to_string(output.join("tasks/train/attempt-0/stdout")).unwrap();
    let task_dir = stdout.trim().strip_prefix("task dir ").unwrap_or_else(|| panic!("{stdout}\n{}", text(&first)));
    // A new allocation: the node-local directory of the first is gone.
    std::fs::remove_dir_all(task_dir).unwrap();
    let second = dir.mpirun(4, &["run", "--retry-failed"]);
    let resumed = std::fs::read_to_string(output.join("tasks/train/attempt-1/stdout")).unwrap();
    assert_eq!(resumed, "resumed from step-7\n", "{}", text(&second));
    assert_eq!(second.status.code(), Some(0), "{}", text(&second));
}
