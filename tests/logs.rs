//! What a task costs the filesystem, and reading its output back, under `mpirun` with real
//! tasks: with `logs = "files"` nothing is created before the first byte; with `logs =
//! "framed"` no task has log files at all, and `dlaunch logs`, `status` and `report` read the
//! records back byte for byte.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::*;
use dlaunch_core::frame::{self, Origin, Stream};

/// `dlaunch logs <output> <task> <extra...>`: its exit code, stdout bytes and stderr text.
fn logs(dir: &JobDir, output: &Path, task: &str, extra: &[&str]) -> (Option<i32>, Vec<u8>, String) {
    let mut args = vec!["logs", output.to_str().unwrap(), task];
    args.extend_from_slice(extra);
    let out = dlaunch(dir.path(), &args);
    (out.status.code(), out.stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Every file and directory beneath `dir`, relative, sorted (none if it does not exist).
fn tree(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
            found.push(entry.path().strip_prefix(dir).unwrap().to_string_lossy().into_owned());
            if entry.file_type().unwrap().is_dir() {
                pending.push(entry.path());
            }
        }
    }
    found.sort();
    found
}

#[test]
fn a_log_file_exists_only_once_its_task_wrote_to_it() {
    let dir = JobDir::new(
        "[job]\nname = \"lazy\"\n\
         [[tasks]]\nname = \"silent\"\ncommand = \"true\"\n\
         [[tasks]]\nname = \"complains\"\ncommand = \"echo oops >&2\"\n\
         [[tasks]]\nname = \"gang\"\ncommand = \"[ $RANK = 0 ] || echo rank $RANK\"\nprocesses = 2\ncpus = 0\n\
         [[tasks]]\nname = \"bad\"\ncommand = \"exit 3\"\n",
    );
    let out = dir.mpirun(3, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let output = dir.output("lazy");
    let tasks: Vec<String> = tree(&output.join("tasks"));
    assert_eq!(
        tasks,
        [
            "bad",
            "complains",
            "complains/attempt-0",
            "complains/attempt-0/stderr",
            "gang",
            "gang/attempt-0",
            "gang/attempt-0/rank-1",
            "gang/attempt-0/rank-1/stdout",
            "silent",
        ],
        "a task's directory, and a log only where there was output"
    );
    assert_eq!(std::fs::read_to_string(output.join("tasks/complains/attempt-0/stderr")).unwrap(), "oops\n");
    for (task, extra) in [("silent", &[][..]), ("silent", &["--stderr"]), ("complains", &[]), ("gang", &[])] {
        assert_eq!(logs(&dir, &output, task, extra), (Some(0), vec![], String::new()), "{task} {extra:?}");
    }
    assert_eq!(logs(&dir, &output, "complains", &["--stderr"]).1, b"oops\n");
    assert_eq!(logs(&dir, &output, "gang", &["--rank", "1"]).1, b"rank 1\n");
    let (code, _, stderr) = logs(&dir, &output, "gang", &["--rank", "2"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("has 2 process(es)"), "{stderr}");
    // A failure without output is shown without a tail, and the report is written.
    let status = json(&dlaunch(dir.path(), &["status", output.to_str().unwrap(), "--json"]));
    assert_eq!(status["failed"][0]["task"], "bad");
    assert_eq!(status["failed"][0]["stderr_tail"], serde_json::json!([]));
    assert!(dlaunch(dir.path(), &["report", output.to_str().unwrap()]).status.success());
}

/// `task_dir = false`: no task gets a directory up front, nor `DLAUNCH_TASK_DIR`; with log
/// files a task that prints still gets its own, and with framed logs no task creates anything.
#[test]
fn without_task_dirs_a_silent_task_creates_nothing_at_all() {
    for mode in ["files", "framed"] {
        let dir = JobDir::new(&format!(
            "[job]\nname = \"bare\"\ntask_dir = false\nlogs = \"{mode}\"\n\
             [[tasks]]\nname = \"silent\"\ncommand = \"test -z \\\"$DLAUNCH_TASK_DIR\\\"\"\n\
             [[tasks]]\nname = \"talks\"\ncommand = \"echo said-{{i}}\"\nmatrix = {{ i = [1, 2] }}\n\
             [[tasks]]\nname = \"own\"\ncommand = \"touch $DLAUNCH_TASK_DIR/mine\"\ntask_dir = true\n"
        ));
        let out = dir.mpirun(3, &[]);
        assert_eq!(out.status.code(), Some(0), "{mode}: {}", text(&out));
        let output = dir.output("bare");
        let expected: &[&str] = match mode {
            "files" => &[
                "own",
                "own/mine",
                "talks[i=1]",
                "talks[i=1]/attempt-0",
                "talks[i=1]/attempt-0/stdout",
                "talks[i=2]",
                "talks[i=2]/attempt-0",
                "talks[i=2]/attempt-0/stdout",
            ],
            _ => &["own", "own/mine"],
        };
        assert_eq!(tree(&output.join("tasks")), expected, "{mode}");
        assert_eq!(logs(&dir, &output, "talks[i=2]", &[]).1, b"said-2\n", "{mode}");
        assert_eq!(logs(&dir, &output, "silent", &[]), (Some(0), vec![], String::new()), "{mode}");
    }
}

const LIMIT: usize = 100 * 1024;

/// Tasks on three worker ranks: printable and binary output on both streams, more than one
/// pipe buffer of it, a retried task, a gang, one cut at `log_limit` (`LIMIT`) and a failure.
const FRAMED_JOB: &str = "[job]\nname = \"fr\"\nlogs = \"framed\"\nlog_limit = \"100KiB\"\nslots_per_worker = 2\n\
     [[tasks]]\nname = \"t\"\ncommand = \"printf 'out-{i}\\\\000\\\\377\\\\n'; printf 'err-{i}' >&2; seq {i}000\"\n\
     matrix = { i = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12] }\ncpus = 0\n\
     [[tasks]]\nname = \"flaky\"\ncommand = \"echo try $DLAUNCH_ATTEMPT; [ $DLAUNCH_ATTEMPT = 1 ]\"\nretries = 1\ncpus = 0\n\
     [[tasks]]\nname = \"gang\"\ncommand = \"echo rank $RANK\"\nprocesses = 2\ncpus = 0\n\
     [[tasks]]\nname = \"big\"\ncommand = \"yes\"\ncpus = 0\n\
     [[tasks]]\nname = \"bad\"\ncommand = \"echo boom-line >&2; exit 3\"\ncpus = 0\n";

/// What task `t[i=<i>]` prints on stdout.
fn expected_stdout(i: u32) -> Vec<u8> {
    let mut bytes = format!("out-{i}").into_bytes();
    bytes.extend_from_slice(&[0, 0xff, b'\n']);
    for n in 1..=i * 1000 {
        writeln!(bytes, "{n}").unwrap();
    }
    bytes
}

fn framed_logs(output: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(output.join("logs")).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    files
}

#[test]
fn framed_logs_read_back_byte_for_byte_whatever_rank_wrote_them() {
    let dir = JobDir::new(FRAMED_JOB);
    let out = dir.mpirun(4, &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).matches(" bad --attempt 0 --stderr").count() >= 2,
        "the failure's log line and the summary name the command that shows its stderr: {}",
        text(&out)
    );
    let output = dir.output("fr");
    let files = framed_logs(&output);
    assert!(files.len() >= 2, "one file per worker rank that ran tasks: {files:?}");
    assert!(files.iter().all(|f| f.file_name().unwrap().to_str().unwrap().starts_with("rank-")), "{files:?}");
    let task_files: Vec<String> = tree(&output.join("tasks")).into_iter().filter(|p| p.contains('/')).collect();
    assert_eq!(task_files, Vec::<String>::new(), "no task has a log directory or file of its own");

    for i in 1..=12 {
        let task = format!("t[i={i}]");
        let (code, stdout, stderr) = logs(&dir, &output, &task, &[]);
        assert_eq!(code, Some(0), "{stderr}");
        assert!(
            stdout == expected_stdout(i),
            "{task}: {} bytes, not the {} printed",
            stdout.len(),
            expected_stdout(i).len()
        );
        assert_eq!(logs(&dir, &output, &task, &["--stderr"]).1, format!("err-{i}").into_bytes());
    }
    assert_eq!(logs(&dir, &output, "flaky", &[]).1, b"try 1\n", "the latest attempt by default");
    assert_eq!(logs(&dir, &output, "flaky", &["--attempt", "0"]).1, b"try 0\n");
    assert_eq!(logs(&dir, &output, "gang", &["--rank", "1"]).1, b"rank 1\n");
    assert_eq!(logs(&dir, &output, "gang", &[]).1, b"rank 0\n");
    let big = logs(&dir, &output, "big", &[]).1;
    let note = "\n[dlaunch: log_limit reached, later output discarded]\n";
    assert_eq!(big.len(), LIMIT + note.len(), "log_limit holds per task");
    assert!(big.ends_with(note.as_bytes()) && big.starts_with(b"y\ny\n"));

    // status and report find a failure's stderr in the records.
    let status = json(&dlaunch(dir.path(), &["status", output.to_str().unwrap(), "--json"]));
    let bad = status["failed"].as_array().unwrap().iter().find(|f| f["task"] == "bad").unwrap().clone();
    assert_eq!(bad["stderr_tail"], serde_json::json!(["boom-line"]), "{status:#}");
    assert!(dlaunch(dir.path(), &["report", output.to_str().unwrap()]).status.success());
    let page = std::fs::read_to_string(output.join("report.html")).unwrap();
    assert!(page.contains("boom-line"), "the report shows the failure's stderr");

    // A crash in the middle of a record: what came before reads as before, the rest is
    // ignored with a warning.
    let origin = Origin { task: "t[i=1]".into(), attempt: 0, process: 0, stream: Stream::Stdout };
    let record = frame::encode(&origin, &[b"never whole"]);
    let mut file = std::fs::OpenOptions::new().append(true).open(&files[0]).unwrap();
    file.write_all(&record[..record.len() - 3]).unwrap();
    drop(file);
    for i in 1..=12 {
        let (code, stdout, stderr) = logs(&dir, &output, &format!("t[i={i}]"), &[]);
        assert_eq!(code, Some(0), "{stderr}");
        assert!(stdout == expected_stdout(i), "t[i={i}] after the cut record");
        assert!(stderr.contains("cut short"), "{stderr}");
    }
}

/// Returned mode: tasks run node-locally, and rank 0 writes what it receives, a log file only
/// on its first byte (so nothing at all for a silent task); framed, as records of its own
/// `logs/returned.log`.
#[test]
fn returned_logs_cost_rank_0_no_more_files_than_the_task_wrote() {
    for (mode, name) in [("files", "rf"), ("framed", "rr")] {
        let dir = JobDir::new(&format!(
            "[job]\nname = \"{name}\"\noutput = \"returned\"\nlogs = \"{mode}\"\n\
             [[tasks]]\nname = \"silent\"\ncommand = \"true\"\n\
             [[tasks]]\nname = \"w\"\ncommand = \"echo out-{{i}}; printf 'err-{{i}}' >&2\"\nmatrix = {{ i = [1, 2] }}\n\
             [[tasks]]\nname = \"quiet\"\ncommand = \"echo only-out\"\n"
        ));
        let out = dir.mpirun(3, &[]);
        assert!(out.status.success(), "{mode}: {}", text(&out));
        let output = dir.output(name);
        let tasks: Vec<String> = tree(&output.join("tasks"));
        let expected: &[&str] = match mode {
            "files" => &[
                "quiet",
                "quiet/attempt-0",
                "quiet/attempt-0/stdout",
                "w[i=1]",
                "w[i=1]/attempt-0",
                "w[i=1]/attempt-0/stderr",
                "w[i=1]/attempt-0/stdout",
                "w[i=2]",
                "w[i=2]/attempt-0",
                "w[i=2]/attempt-0/stderr",
                "w[i=2]/attempt-0/stdout",
            ],
            _ => &[],
        };
        assert_eq!(tasks, expected, "{mode}");
        if mode == "framed" {
            assert_eq!(tree(&output.join("logs")), ["returned.log"]);
        }
        for i in 1..=2 {
            assert_eq!(logs(&dir, &output, &format!("w[i={i}]"), &[]).1, format!("out-{i}\n").into_bytes(), "{mode}");
            assert_eq!(logs(&dir, &output, &format!("w[i={i}]"), &["--stderr"]).1, format!("err-{i}").into_bytes());
        }
        assert_eq!(logs(&dir, &output, "quiet", &[]).1, b"only-out\n", "{mode}");
        assert_eq!(logs(&dir, &output, "quiet", &["--stderr"]), (Some(0), vec![], String::new()), "{mode}");
        assert_eq!(logs(&dir, &output, "silent", &[]), (Some(0), vec![], String::new()), "{mode}");
    }
}

/// `--follow` on framed logs: it prints each record as it comes, and ends with the attempt.
#[test]
fn following_a_framed_log_prints_output_as_it_comes_and_ends_with_the_attempt() {
    let dir = JobDir::new(
        "[job]\nname = \"fo\"\nlogs = \"framed\"\n[[tasks]]\nname = \"slow\"\n\
         command = \"for i in 1 2 3; do echo line-$i; sleep 1; done; printf end\"\n",
    );
    let run = dir.mpirun_command(2, &[]).spawn().unwrap();
    let output = dir.output("fo");
    let started = eventually(std::time::Duration::from_secs(60), || {
        dlaunch(dir.path(), &["logs", output.to_str().unwrap(), "slow"]).stdout.starts_with(b"line-1\n")
    });
    assert!(started, "the task's first line is readable while it runs");
    let (code, stdout, stderr) = logs(&dir, &output, "slow", &["--follow"]);
    assert_eq!((code, String::from_utf8_lossy(&stdout).as_ref()), (Some(0), "line-1\nline-2\nline-3\nend"), "{stderr}");
    let out = wait_with_limit(run, std::time::Duration::from_secs(60));
    assert!(out.status.success(), "{}", text(&out));
}

/// Every running process's output is copied by its rank's one relay thread, not by threads of
/// its own: three tasks running at once on one worker rank each find one `dlaunch-log` thread
/// in it (before, each found up to six: two per task).
#[test]
fn one_relay_thread_copies_the_output_of_every_task_of_a_rank() {
    let together = tempfile::tempdir().unwrap();
    let count =
        "n=0; for t in /proc/$PPID/task/*; do [ \"$(cat $t/comm)\" = dlaunch-log ] && n=$((n+1)); done; echo relays=$n";
    let dir = JobDir::new(&format!(
        "[job]\nname = \"relay\"\nslots_per_worker = 3\n\
         [[tasks]]\nname = \"t\"\ncommand = '{}; {count}; echo done >&2'\ncpus = 0\nmatrix = {{ i = [1, 2, 3] }}\n",
        barrier(together.path(), 3)
    ));
    let out = dir.mpirun(2, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let output = dir.output("relay");
    for i in 1..=3 {
        let task = format!("t[i={i}]");
        assert_eq!(logs(&dir, &output, &task, &[]).1, b"relays=1\n", "{task}");
        assert_eq!(logs(&dir, &output, &task, &["--stderr"]).1, b"done\n", "{task}");
    }
}
