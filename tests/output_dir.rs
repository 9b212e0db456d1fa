//! The output directory is dlaunch's alone: links in it are never followed, what dlaunch
//! writes there is owner-only (or group-readable on request), a directory others can write to
//! is refused, and so are a missing temporary directory and another job's results.

mod common;

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

/// `dlaunch <args> <job>` run alone under umask 000: only the modes dlaunch asks for count.
fn run_with_umask_000(dir: &JobDir, job: &Path, args: &[&str]) -> std::process::Output {
    let mut command = Command::new("sh");
    command.arg("-c").arg("umask 000; exec \"$@\"").arg("sh").arg(DLAUNCH).args(args).arg(job);
    command.current_dir(dir.path()).stdout(Stdio::piped()).stderr(Stdio::piped());
    wait_with_limit(command.spawn().unwrap(), Duration::from_secs(120))
}

#[test]
fn links_a_task_plants_in_the_output_directory_are_not_followed() {
    let victims = tempfile::tempdir().unwrap();
    let (log_victim, summary_victim) = (victims.path().join("log"), victims.path().join("summary"));
    std::fs::write(&log_victim, "precious\n").unwrap();
    std::fs::write(&summary_victim, "precious\n").unwrap();
    // Attempt 0 prepares attempt 1's log directory with links in it, and a link where the
    // summary is written, then fails; attempt 1 is a retry.
    let plant = format!(
        "if [ $DLAUNCH_ATTEMPT = 0 ]; then a=$DLAUNCH_TASK_DIR/attempt-1; mkdir $a; ln -s {log} $a/stdout; ln -s {log} $a/stderr; ln -s {summary} $DLAUNCH_TASK_DIR/../../summary.json.tmp; exit 1; fi; echo overwritten",
        log = log_victim.display(),
        summary = summary_victim.display()
    );
    let dir =
        JobDir::new(&format!("[job]\nname = \"links\"\n[[tasks]]\nname = \"t\"\ncommand = '{plant}'\nretries = 1\n"));
    let out = dir.alone(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&log_victim).unwrap(), "precious\n", "a log was written through a link");
    assert_eq!(std::fs::read_to_string(&summary_victim).unwrap(), "precious\n", "the summary went through a link");
    let output = dir.output("links");
    assert!(std::fs::symlink_metadata(output.join("summary.json")).unwrap().is_file());
    let task = &tasks_by_id(&dir.summary("links"))["t"];
    assert_eq!(task["attempts"], 2, "{task:#}");
    let reason = task["reason"].as_str().unwrap();
    assert!(reason.contains("attempt-1 exists already"), "{reason}");
}

#[test]
fn a_linked_journal_or_tasks_directory_is_refused() {
    for planted in ["journal.jsonl", "tasks"] {
        let victim = tempfile::tempdir().unwrap();
        let target = victim.path().join("target");
        if planted == "tasks" {
            std::fs::create_dir(&target).unwrap();
        } else {
            std::fs::write(&target, "precious\n").unwrap();
        }
        let dir = JobDir::new("[job]\nname = \"planted\"\n[[tasks]]\nname = \"t\"\ncommand = \"echo hi\"\n");
        let output = dir.output("planted");
        std::fs::create_dir_all(&output).unwrap();
        std::fs::set_permissions(&output, std::fs::Permissions::from_mode(0o700)).unwrap();
        symlink(&target, output.join(planted)).unwrap();
        let out = dir.alone(&[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{planted}: {}", text(&out));
        assert!(stderr.contains(planted), "{planted}: {stderr}");
        if planted == "tasks" {
            assert!(stderr.contains("does not follow links"), "{stderr}");
            assert_eq!(std::fs::read_dir(&target).unwrap().count(), 0, "nothing written through the link");
        } else {
            assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
        }
    }
}

/// Every directory and file of a run: the output directory, the task's, the attempt's, the
/// log the task wrote (stdout; its stderr stays empty, so it has no file), the journal and the
/// summary.
fn written(output: &Path) -> (Vec<std::path::PathBuf>, Vec<std::path::PathBuf>) {
    let attempt = output.join("tasks/t/attempt-0");
    let dirs = vec![output.to_path_buf(), output.join("tasks"), output.join("tasks/t"), attempt.clone()];
    let files = vec![attempt.join("stdout"), output.join("journal.jsonl"), output.join("summary.json")];
    (dirs, files)
}

#[test]
fn what_dlaunch_writes_is_owner_only_under_any_umask_and_group_readable_on_request() {
    for (share, dir_mode, file_mode) in [("", 0o700, 0o600), ("share = \"group\"\n", 0o750, 0o640)] {
        let dir =
            JobDir::new(&format!("[job]\nname = \"modes\"\n{share}[[tasks]]\nname = \"t\"\ncommand = \"echo hi\"\n"));
        let out = run_with_umask_000(&dir, &dir.job(), &[]);
        assert!(out.status.success(), "{}", text(&out));
        let (dirs, files) = written(&dir.output("modes"));
        for path in dirs {
            assert_eq!(mode(&path), dir_mode, "{share}{}", path.display());
        }
        for path in files {
            assert_eq!(mode(&path), file_mode, "{share}{}", path.display());
        }
    }
}

#[test]
fn an_output_directory_others_can_write_is_refused_with_the_fix() {
    let dir = JobDir::new("[job]\nname = \"open\"\n[[tasks]]\nname = \"t\"\ncommand = \"echo hi\"\n");
    let output = dir.output("open");
    std::fs::create_dir_all(&output).unwrap();
    for open in [0o777, 0o770] {
        std::fs::set_permissions(&output, std::fs::Permissions::from_mode(open)).unwrap();
        let out = dir.alone(&[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(stderr.contains(&format!("{} can be written by", output.display())), "{stderr}");
        assert!(stderr.contains("chmod go-w"), "{stderr}");
        assert!(!output.join("journal.jsonl").exists(), "nothing written in it");
    }
}

#[test]
fn a_missing_temporary_directory_is_named_and_never_created() {
    let scratch = tempfile::tempdir().unwrap();
    let missing = scratch.path().join("missing");
    let dir = JobDir::new("[job]\nname = \"tmp\"\n[[tasks]]\nname = \"t\"\ncommand = \"echo hi\"\n");
    for var in ["TMPDIR", "TMP"] {
        let mut command = Command::new(DLAUNCH);
        command.arg(dir.job()).current_dir(dir.path()).env_remove("TMPDIR").env_remove("TEMP").env_remove("TMP");
        command.env(var, missing.join("tmp")).stdout(Stdio::piped()).stderr(Stdio::piped());
        let out = wait_with_limit(command.spawn().unwrap(), Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {}", text(&out));
        assert!(stderr.contains(&format!("{var}={}/tmp: no such directory", missing.display())), "{stderr}");
        assert!(!missing.exists(), "{var}: {} was created", missing.display());
    }
}

#[test]
fn a_stage_dir_whose_parent_is_missing_is_not_created() {
    let dir = JobDir::new(
        "[job]\nname = \"stage\"\nstage_dir = \"nowhere/stage\"\n[datasets.d]\nsource = \"data\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\ndatasets = [\"d\"]\n",
    );
    std::fs::write(dir.path().join("data"), "x").unwrap();
    let out = dir.alone(&[]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("its parent directory does not exist (stage_dir)"), "{stderr}");
    assert!(!dir.path().join("nowhere").exists());
}

#[test]
fn another_job_is_refused_in_a_used_output_directory_unless_it_adopts_the_results() {
    let dir = JobDir::new("");
    let job = |name: &str| {
        let path = dir.path().join(format!("{name}.toml"));
        let text = format!(
            "[job]\nname = \"{name}\"\noutput_dir = \"shared\"\n[[tasks]]\nname = \"t\"\ncommand = \"echo {name}\"\n"
        );
        std::fs::write(&path, text).unwrap();
        path
    };
    let (a, b) = (job("a"), job("b"));
    let output = dir.path().join("shared");
    let run = |job: &Path, args: &[&str]| {
        let mut command = Command::new(DLAUNCH);
        command.args(args).arg(job).current_dir(dir.path()).stdout(Stdio::piped()).stderr(Stdio::piped());
        wait_with_limit(command.spawn().unwrap(), Duration::from_secs(120))
    };
    assert!(run(&a, &[]).status.success());
    let summary_of_a = std::fs::read(output.join("summary.json")).unwrap();
    let out = run(&b, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(stderr.contains("holds the results of job \"a\"") && stderr.contains("--adopt"), "{stderr}");
    assert_eq!(std::fs::read(output.join("summary.json")).unwrap(), summary_of_a, "a's summary untouched");
    // The same job again, through another path to its file, is the same job.
    let alias = dir.path().join("alias.toml");
    symlink(&a, &alias).unwrap();
    assert!(run(&alias, &[]).status.success());
    let out = run(&b, &["--adopt"]);
    assert!(out.status.success(), "{}", text(&out));
    let journal = std::fs::read_to_string(output.join("journal.jsonl")).unwrap();
    let events: Vec<serde_json::Value> = journal.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let identities: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["event"] == "run_started").map(|e| &e["job"]).collect();
    assert_eq!(identities.len(), 3);
    assert_eq!(identities[0]["name"], "a");
    assert_eq!(identities[0]["file"], std::fs::canonicalize(&a).unwrap().to_str().unwrap());
    assert_eq!(identities[0]["digest"].as_str().map(str::len), Some(64));
    assert_eq!(identities[2]["name"], "b");
}

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
