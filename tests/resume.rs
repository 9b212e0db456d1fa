//! Nothing lost, nothing redone: resuming from the journal after interruptions, changed job
//! files, failures, and SIGKILL of the whole MPI job at random moments.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::time::Duration;

use common::*;

/// Each task appends its attempt number to a file in its own directory when it completes.
fn job(name: &str, n: usize, seconds: &str, slots: u32) -> String {
    let values: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    format!(
        "[job]\nname = \"{name}\"\ngrace = \"2s\"\nslots_per_worker = {slots}\n[[tasks]]\nname = \"t\"\ncommand = \"sleep {seconds}; echo $DLAUNCH_ATTEMPT >> $DLAUNCH_TASK_DIR/done; : {}\"\ncpus = 0\nmatrix = {{ i = [{}] }}\n",
        marker(name),
        values.join(", ")
    )
}

/// A string only this test's task command lines contain.
fn marker(name: &str) -> String {
    format!("dlaunch-resume-{name}-{}", std::process::id())
}

fn done_lines(dir: &JobDir, name: &str) -> BTreeMap<String, Vec<String>> {
    let tasks = dir.output(name).join("tasks");
    let mut lines = BTreeMap::new();
    for entry in std::fs::read_dir(tasks).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(entry.path().join("done")).unwrap_or_default();
        lines.insert(entry.file_name().to_string_lossy().into_owned(), text.lines().map(str::to_string).collect());
    }
    lines
}

#[test]
fn an_interrupted_run_resumes_without_redoing_finished_tasks() {
    // In the first run tasks 0-3 finish at once and the others hang, so the signal always
    // finds two of them running; the second run (the file `go` exists) finishes them.
    let mark = marker("res");
    let job = format!(
        "[job]\nname = \"res\"\ngrace = \"2s\"\nslots_per_worker = 1\n[[tasks]]\nname = \"t\"\ncommand = \"echo attempt $DLAUNCH_ATTEMPT; [ $DLAUNCH_PARAM_I -lt 4 ] || [ -e ../go ] || sleep 300; echo $DLAUNCH_ATTEMPT >> $DLAUNCH_TASK_DIR/done; : {mark}\"\nworkdir = \"work\"\ncpus = 0\nmatrix = {{ i = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] }}\n"
    );
    let dir = JobDir::new(&job);
    std::fs::create_dir(dir.path().join("work")).unwrap();
    let child = dir.mpirun_command(3, &[]).spawn().unwrap();
    let finished = || done_lines(&dir, "res").values().filter(|l| !l.is_empty()).count();
    assert!(eventually(Duration::from_secs(60), || finished() == 4), "the quick tasks finish first");
    assert!(eventually(Duration::from_secs(30), || processes_matching(&mark).len() >= 2), "two tasks hang");
    send_signal(&child.id().to_string(), "TERM");
    let first = wait_with_limit(child, Duration::from_secs(60));
    let summary = dir.summary("res");
    assert_eq!(summary["exit_code"], 3, "{}", text(&first));
    assert_eq!(summary["counts"]["succeeded"], 4);
    let interrupted: Vec<&str> = summary["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["status"] == "interrupted")
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(interrupted.len(), 2, "{summary:#}");
    std::fs::write(dir.path().join("go"), "").unwrap();
    let out = dir.mpirun(3, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("4 tasks done before, 6 to run"), "{stderr}");
    let summary = dir.summary("res");
    assert_eq!(summary["counts"]["succeeded"], 10);
    for (task, lines) in done_lines(&dir, "res") {
        assert_eq!(lines.len(), 1, "{task} completed {} times", lines.len());
    }
    // Interrupted tasks ran again as a new attempt, keeping the old attempt's logs.
    for id in interrupted {
        let task = tasks_by_id(&summary)[id].clone();
        assert_eq!(task["attempts"], 2, "{id}");
        assert!(dir.output("res").join("tasks").join(id).join("attempt-0/stdout").exists());
    }
}

#[test]
fn changed_tasks_rerun_failed_ones_only_on_request_and_fresh_sets_results_aside() {
    let job_text = "[job]\nname = \"chg\"\n[[tasks]]\nname = \"a\"\ncommand = \"echo a$DLAUNCH_PARAM_I >> $DLAUNCH_TASK_DIR/runs\"\nmatrix = { i = [1, 2] }\n[[tasks]]\nname = \"b\"\ncommand = \"echo b >> $DLAUNCH_TASK_DIR/runs\"\n[[tasks]]\nname = \"bad\"\ncommand = \"echo x >> $DLAUNCH_TASK_DIR/runs; exit 1\"\n";
    let dir = JobDir::new(job_text);
    assert_eq!(dir.alone(&[]).status.code(), Some(1));
    let runs = |id: &str| {
        std::fs::read_to_string(dir.output("chg").join("tasks").join(id).join("runs")).unwrap().lines().count()
    };
    std::fs::write(dir.job(), job_text.replace("echo b >>", "echo B >>")).unwrap();
    let out = dir.alone(&[]);
    assert_eq!(out.status.code(), Some(1), "the failure stands: {}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("1 changed in the job file") && stderr.contains("definition changed: b"), "{stderr}");
    assert!(stderr.contains("1 failed before (use --retry-failed)"), "{stderr}");
    assert_eq!((runs("a[i=1]"), runs("a[i=2]"), runs("b"), runs("bad")), (1, 1, 2, 1));
    assert_eq!(dir.alone(&["--retry-failed"]).status.code(), Some(1));
    assert_eq!((runs("a[i=1]"), runs("b"), runs("bad")), (1, 2, 2));
    let out = dir.alone(&["--fresh"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!((runs("a[i=1]"), runs("b"), runs("bad")), (1, 1, 1), "a fresh start");
    let aside: Vec<String> = std::fs::read_dir(dir.path().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("chg."))
        .collect();
    assert_eq!(aside.len(), 1, "the old results were kept aside: {aside:?}");
}

#[test]
fn output_is_owner_only_and_secrets_stay_out_of_the_journal() {
    let dir = JobDir::new(
        "[job]\nname = \"sec\"\nenv = { API_TOKEN = \"hunter2-token\", DB_PASSWORD = \"hunter2-pw\" }\n[[tasks]]\nname = \"t\"\ncommand = \"test -n \\\"$API_TOKEN\\\" && echo token set\"\n",
    );
    let out = dir.alone(&[]);
    assert!(out.status.success(), "{}", text(&out));
    for path in [dir.output("sec"), dir.output("sec").join("tasks/t"), dir.output("sec").join("tasks/t/attempt-0")] {
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", path.display());
    }
    for file in ["journal.jsonl", "summary.json"] {
        let content = std::fs::read_to_string(dir.output("sec").join(file)).unwrap();
        assert!(!content.contains("hunter2"), "{file} leaks a secret");
    }
}

/// The acceptance test of the journal: SIGKILL the whole MPI job (mpirun, every rank) at ten
/// random moments while hundreds of short tasks run, resuming each time; then finish.
#[test]
fn repeated_sigkill_of_the_whole_job_loses_nothing_and_redoes_nothing_finished() {
    let n = 300;
    let dir = JobDir::new(&job("kill", n, "0.05", 4));
    let mut seed = std::process::id() as u64;
    eprintln!("kill-point seed {seed}");
    for round in 0..10 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let delay = Duration::from_millis(300 + (seed >> 33) % 2500);
        let mut command = dir.mpirun_command(4, &[]);
        command.process_group(0);
        let child = command.spawn().unwrap();
        std::thread::sleep(delay);
        send_signal(&format!("-{}", child.id()), "KILL");
        let _ = wait_with_limit(child, Duration::from_secs(60));
        // Ranks notice their launcher is gone; make sure before the next round starts.
        let job_file = dir.job().to_string_lossy().into_owned();
        assert!(
            eventually(Duration::from_secs(30), || processes_matching(&job_file).is_empty()),
            "round {round}: ranks left"
        );
    }
    let out = dir.mpirun(4, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let summary = dir.summary("kill");
    assert_eq!(summary["counts"]["succeeded"], n, "{}", text(&out));
    // Nothing recorded as finished was started again.
    let journal = dir.journal("kill");
    let mut succeeded: BTreeMap<String, u64> = BTreeMap::new();
    let mut attempts: BTreeMap<String, u64> = BTreeMap::new();
    for event in &journal {
        let task = event["task"].as_str().unwrap_or_default().to_string();
        match event["event"].as_str() {
            Some("attempt_started") => {
                assert!(!succeeded.contains_key(&task), "{task} started again after it had succeeded");
                attempts.insert(task, event["attempt"].as_u64().unwrap() + 1);
            }
            Some("attempt_ended") if event["status"] == "succeeded" => {
                succeeded.insert(task, event["attempt"].as_u64().unwrap());
            }
            _ => {}
        }
    }
    let runs = journal.iter().filter(|e| e["event"] == "run_started").count();
    assert!(runs >= 2, "the kills happened while dlaunch ran: {runs} runs");
    // The summary agrees with the journal, and each task's own record agrees with both.
    let done = done_lines(&dir, "kill");
    for task in summary["tasks"].as_array().unwrap() {
        let id = task["id"].as_str().unwrap();
        assert_eq!(task["status"], "succeeded");
        assert_eq!(task["attempts"].as_u64(), attempts.get(id).copied(), "{id}");
        let last_done = done[id].last().expect("completed").parse::<u64>().unwrap();
        assert_eq!(Some(&last_done), succeeded.get(id), "{id}: the recorded success is the last completion");
    }
    // Every line of the journal is whole: a torn line from a kill was dropped on resume.
    let raw = std::fs::read_to_string(dir.output("kill").join("journal.jsonl")).unwrap();
    assert!(raw.lines().all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
}

#[test]
fn fresh_refuses_to_move_a_live_run_aside() {
    let mark = marker("live");
    let dir = JobDir::new(&format!(
        "[job]\nname = \"live\"\n[[tasks]]\nname = \"t\"\ncommand = \"while [ ! -e ../go ]; do sleep 0.1; done; echo done; : {mark}\"\nworkdir = \"work\"\ncpus = 0\n"
    ));
    std::fs::create_dir(dir.path().join("work")).unwrap();
    let live = dir.mpirun_command(2, &[]).spawn().unwrap();
    assert!(eventually(Duration::from_secs(60), || !processes_matching(&mark).is_empty()), "the task runs");
    let mut fresh = std::process::Command::new(DLAUNCH);
    fresh.arg("--fresh").arg(dir.job()).current_dir(dir.path());
    let mut fresh = fresh.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Without the lock the second run starts the task again, and it too waits for `go`.
    eventually(Duration::from_secs(30), || fresh.try_wait().unwrap().is_some());
    std::fs::write(dir.path().join("go"), "").unwrap();
    let out = wait_with_limit(fresh, Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = wait_with_limit(live, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(stderr.contains("another dlaunch is running with"), "{stderr}");
    assert!(first.status.success(), "the live run finished undisturbed: {}", text(&first));
    let runs: Vec<String> = std::fs::read_dir(dir.path().join("runs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(runs, ["live"], "nothing was moved aside");
    assert_eq!(dir.summary("live")["counts"]["succeeded"], 1);
    let stdout = std::fs::read_to_string(dir.output("live").join("tasks/t/attempt-0/stdout")).unwrap();
    assert_eq!(stdout, "done\n");
}

#[test]
fn results_without_a_journal_are_refused_and_no_attempt_directory_is_written_twice() {
    let dir =
        JobDir::new("[job]\nname = \"lost\"\n[[tasks]]\nname = \"t\"\ncommand = \"echo attempt $DLAUNCH_ATTEMPT\"\n");
    let output = dir.output("lost");
    assert!(dir.alone(&[]).status.success());
    let attempt0 = output.join("tasks/t/attempt-0/stdout");
    assert_eq!(std::fs::read_to_string(&attempt0).unwrap(), "attempt 0\n");
    // The journal's last lines are lost (the node went down before they reached the disk):
    // the attempt directory on disk is never written again.
    std::fs::write(&attempt0, "from the first run\n").unwrap();
    let journal = std::fs::read_to_string(output.join("journal.jsonl")).unwrap();
    let kept: String = journal.lines().filter(|l| !l.contains("\"attempt_")).map(|l| format!("{l}\n")).collect();
    std::fs::write(output.join("journal.jsonl"), kept).unwrap();
    let out = dir.alone(&[]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&attempt0).unwrap(), "from the first run\n", "attempt-0 was written again");
    let attempt1 = output.join("tasks/t/attempt-1/stdout");
    assert_eq!(std::fs::read_to_string(attempt1).unwrap(), "attempt 1\n");
    // The journal is deleted, the results stay: refused, nothing touched, --fresh sets them aside.
    let summary = std::fs::read(output.join("summary.json")).unwrap();
    std::fs::remove_file(output.join("journal.jsonl")).unwrap();
    let out = dir.alone(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(stderr.contains("but no journal") && stderr.contains("--fresh"), "{stderr}");
    assert_eq!(std::fs::read(output.join("summary.json")).unwrap(), summary);
    assert_eq!(std::fs::read_to_string(&attempt0).unwrap(), "from the first run\n");
    let out = dir.alone(&["--fresh"]);
    assert!(out.status.success(), "{}", text(&out));
    let aside: Vec<_> =
        std::fs::read_dir(dir.path().join("runs")).unwrap().flatten().filter(|e| e.file_name() != "lost").collect();
    assert_eq!(aside.len(), 1, "the old results were kept aside");
    assert!(aside[0].path().join("tasks/t/attempt-1/stdout").exists());
}
