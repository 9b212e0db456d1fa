//! The command line as users meet it: `check`, `topo` and `run` in pipes, odd directories and
//! job files with mistakes. Real processes, real pipes, real files.

mod common;

use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const SWEEP: &str = "[job]\nname = \"cli\"\n[[tasks]]\nname = \"t\"\ncommand = \"echo {i}\"\nmatrix = { i = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9] }\n";

/// A pipe whose reading end is already closed: what `| head` does to a writer, without the
/// race of waiting for head to exit.
fn closed_pipe() -> Stdio {
    let (reader, writer) = nix::unistd::pipe().expect("pipe");
    drop(reader);
    Stdio::from(writer)
}

fn with_closed_stdout(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(DLAUNCH);
    command.args(args).envs(env.iter().copied()).stdout(closed_pipe()).stderr(Stdio::piped());
    wait_with_limit(command.spawn().expect("spawn dlaunch"), Duration::from_secs(60))
}

#[test]
fn a_closed_stdout_is_a_quiet_end_not_a_panic() {
    let dir = JobDir::new(SWEEP);
    let job = dir.job();
    let job = job.to_str().unwrap();
    let topology = fixture("topologies/16em64t-4s2c2t.xml");
    let xml = [("HWLOC_XMLFILE", topology.to_str().unwrap())];
    for (args, env) in [
        (vec!["check", job], &[][..]),
        (vec!["check", "--json", job], &[][..]),
        (vec!["topo"], &xml[..]),
        (vec!["topo", "--json"], &xml[..]),
    ] {
        let out = with_closed_stdout(&args, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "dlaunch {args:?}\n{stderr}");
        assert!(!stderr.contains("panicked"), "dlaunch {args:?}\n{stderr}");
    }
    // `2>&1 | head` on a job file with errors and warnings: they cannot be read, but the
    // exit code still says what was wrong (a panic would make it 101).
    let bad = JobDir::new(
        &SWEEP.replace("echo {i}", "echo {i} {x}").replace("name = \"cli\"", "name = \"cli\"\nretriez = 1"),
    );
    for args in [&["check"][..], &["check", "--json"][..]] {
        let out = Command::new(DLAUNCH).args(args).arg(bad.job()).stdout(closed_pipe()).stderr(closed_pipe()).status();
        assert_eq!(out.unwrap().code(), Some(2), "dlaunch {args:?}");
    }
    let warned = JobDir::new(&SWEEP.replace("echo {i}", "echo {i} {x}"));
    let out = Command::new(DLAUNCH).arg("check").arg(warned.job()).stdout(closed_pipe()).stderr(closed_pipe()).status();
    assert_eq!(out.unwrap().code(), Some(0));
}

#[test]
fn a_job_file_in_a_directory_whose_name_is_not_utf8_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let odd = dir.path().join(std::ffi::OsStr::from_bytes(b"runs-\xff"));
    std::fs::create_dir(&odd).unwrap();
    std::fs::write(odd.join("job.toml"), SWEEP).unwrap();
    for args in [&["check"][..], &[][..]] {
        let out = Command::new(DLAUNCH).args(args).arg(odd.join("job.toml")).current_dir(&odd).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "dlaunch {args:?}\n{}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("not valid UTF-8"), "dlaunch {args:?}\n{}", text(&out));
    }
}

#[test]
fn check_fails_on_an_output_dir_that_cannot_be_created() {
    let blocker = tempfile::NamedTempFile::new().unwrap();
    for (output_dir, why) in [
        (blocker.path().join("out").display().to_string(), "Not a directory"),
        ("/proc/dlaunch-check/out".to_string(), "cannot create entries in /proc"),
    ] {
        let dir =
            JobDir::new(&SWEEP.replace("name = \"cli\"", &format!("name = \"cli\"\noutput_dir = {output_dir:?}")));
        let out = dir.alone(&["check"]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("job.output_dir") && stderr.contains(why), "{}", text(&out));
    }
    // A directory that does not exist yet but can be made is fine, and check leaves no trace.
    let dir = JobDir::new(SWEEP);
    let out = dir.alone(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(entries, ["job.toml"]);
}

/// The attack of issue 12, run for real: values reach the task byte for byte and never run.
#[test]
fn matrix_values_in_here_documents_and_comments_never_run() {
    let marks = tempfile::tempdir().unwrap();
    let mark = marks.path().join("pwned");
    let mark = mark.to_str().unwrap();
    let values = [format!("$(touch {mark})"), format!("x\nEOF\ntouch {mark}"), "a}b\\".to_string()];
    let toml_list = |values: &[String]| values.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(", ");
    let job = format!(
        "[job]\nname = \"inject\"\n[[tasks]]\nname = \"here\"\ncommand = \"cat <<EOF\\nlr = {{v}}\\nEOF\"\nmatrix = {{ v = [{}] }}\n\
         [[tasks]]\nname = \"comment\"\ncommand = \"echo run {{w}}  # seed {{w}}\"\nmatrix = {{ w = [{}] }}\n",
        toml_list(&values),
        toml_list(&[format!("1\ntouch {mark} #")]),
    );
    let dir = JobDir::new(&job);
    let out = dir.alone(&[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!std::path::Path::new(mark).exists(), "a matrix value ran as code");
    let summary = dir.summary("inject");
    let mut seen = Vec::new();
    for task in summary["tasks"].as_array().unwrap() {
        let stdout = std::fs::read_to_string(format!("{}/stdout", task["log_dir"].as_str().unwrap())).unwrap();
        let value = task["params"].as_object().unwrap().values().next().unwrap().as_str().unwrap().to_string();
        let expected = if task["name"] == "here" { format!("lr = {value}\n") } else { format!("run {value}\n") };
        assert_eq!(stdout, expected, "{}", task["id"]);
        seen.push(value);
    }
    assert_eq!(seen.len(), 4);
}

/// What docs/exit-codes.md promises under mpirun: SIGUSR1 to mpirun is forwarded and dlaunch's
/// 3 comes back; Ctrl-C makes mpirun exit with a code of its own, and summary.json still says
/// 3 with the work left counted.
#[test]
fn under_mpirun_summary_json_tells_the_work_left_whatever_mpirun_exits_with() {
    for (signal, mpirun_code) in
        [(nix::sys::signal::Signal::SIGUSR1, Some(3)), (nix::sys::signal::Signal::SIGINT, None)]
    {
        let dir = JobDir::new(
            "[job]\nname = \"stop\"\ngrace = \"2s\"\n[[tasks]]\nname = \"s\"\ncommand = \"sleep {t}\"\nmatrix = { t = [60, 61, 62] }\n",
        );
        let child = dir.mpirun_command(3, &[]).spawn().expect("mpirun");
        let tasks = dir.output("stop").join("tasks");
        assert!(eventually(Duration::from_secs(60), || std::fs::read_dir(&tasks).is_ok_and(|d| d.count() >= 2)));
        std::thread::sleep(Duration::from_millis(500));
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
        let out = wait_with_limit(child, Duration::from_secs(60));
        let summary = dir.summary("stop");
        assert_eq!(summary["exit_code"], 3, "{signal}: {}", text(&out));
        assert_eq!(summary["counts"]["not_run"], 3, "{signal}: {summary:#}");
        match mpirun_code {
            Some(code) => assert_eq!(out.status.code(), Some(code), "{signal}: {}", text(&out)),
            None => assert_ne!(out.status.code(), Some(0), "{signal}: {}", text(&out)),
        }
    }
}
