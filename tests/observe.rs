//! Watching and steering a real run under `mpirun -n 4` from another process, with files only:
//! `status`, `--explain`, `cancel` (tasks, then the whole run), `logs`, `report` (checked in
//! headless Chromium) and `report --csv`.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Three workers with one slot each: a gang, quick tasks, a failure, then four long sleepers of
/// which three run and one waits.
const JOB: &str = r#"
[job]
name = "obs"
slots_per_worker = 1
grace = "2s"
progress_every = "1s"

[[tasks]]
name = "gang"
command = "echo rank $RANK"
processes = 2
cpus = 0

[[tasks]]
name = "quick"
command = "echo out-{i}; echo err-{i} >&2; sleep 0.2"
matrix = { i = [1, 2, 3, 4] }
cpus = 0

[[tasks]]
name = "bad"
command = "echo boom-line >&2; exit 3"
cpus = 0

[[tasks]]
name = "long"
command = "sleep 120"
matrix = { n = [1, 2, 3, 4] }
cpus = 0
"#;

#[test]
fn status_cancel_logs_and_report_during_and_after_a_run() {
    let job = JobDir::new(JOB);
    let out = job.output("obs");
    let out_s = out.to_str().unwrap().to_string();
    let job_s = job.job().to_str().unwrap().to_string();
    // A whole-run cancel left over from an earlier run must not stop this one.
    std::fs::create_dir_all(out.join("cancel")).unwrap();
    std::fs::write(out.join("cancel/1-1.json"), r#"{"tasks":[]}"#).unwrap();
    let run = job.mpirun_command(4, &[]).spawn().expect("mpirun");

    // While it runs: three sleepers hold every slot, the fourth waits.
    let mut status = serde_json::Value::Null;
    let settled = eventually(Duration::from_secs(60), || {
        // Until rank 0 has created the journal, there is no run to look at.
        let output = dlaunch(job.path(), &["status", &out_s, "--json"]);
        status = serde_json::from_slice(&output.stdout).unwrap_or_default();
        // The short tasks done too: one still running would free a slot for the fourth.
        let counts = &status["counts"];
        counts["running"] == 3 && counts["queued"] == 1 && counts["succeeded"] == 5 && counts["failed"] == 1
    });
    assert!(settled, "{status:#}");
    assert_documented("status", &status);
    assert_eq!(status["state"], "running");
    assert_eq!(status["counts"]["succeeded"], 5, "{status:#}");
    assert_eq!(status["counts"]["failed"], 1);
    let failed = &status["failed"][0];
    assert_eq!(failed["task"], "bad");
    assert_eq!(failed["stderr_tail"][0], "boom-line", "{failed:#}");
    let running = status["running"].as_array().unwrap();
    assert!(
        running.iter().all(|r| r["processes"][0]["host"].is_string() && r["processes"][0]["rank"].as_u64() > Some(0))
    );
    assert_eq!(status["workers"].as_array().unwrap().len(), 3, "capacities come from the journal");
    // People get the same in text, and the task processes carry their task in `ps`.
    let text_status = dlaunch(job.path(), &["status", &job_s]);
    assert!(String::from_utf8_lossy(&text_status.stdout).contains("state: running"), "{}", text(&text_status));
    assert!(!processes_matching("dlaunch:long[n=").is_empty(), "the shell's $0 names the task");

    // Why does the fourth sleeper wait? Every worker's only slot is busy. Which one waits is
    // not always long[n=4]: a worker that was sent one ahead (prefetch) starts it the moment
    // its slot frees, while an earlier one may be held behind a sleeper elsewhere.
    let running_ids: BTreeSet<&str> = running.iter().filter_map(|r| r["task"].as_str()).collect();
    let waiting = (1..=4)
        .map(|n| format!("long[n={n}]"))
        .find(|id| !running_ids.contains(id.as_str()))
        .expect("one sleeper waits");
    let why = json(&dlaunch(job.path(), &["status", &job_s, "--explain", &waiting, "--json"]));
    assert_documented("status --explain", &why);
    assert_eq!(why["state"], "queued");
    let reasons = why["reasons"].to_string();
    assert!(reasons.contains("slots: all 1 busy"), "{why:#}");

    // Cancel one running and the queued sleeper: rank 0 takes the request within seconds.
    let running_victim = running[0]["task"].as_str().unwrap().to_string();
    let cancel = json(&dlaunch(job.path(), &["cancel", &out_s, &running_victim, &waiting, "--json"]));
    assert_documented("cancel", &cancel);
    assert_eq!(cancel["action"], "requested");
    let unknown = dlaunch(job.path(), &["cancel", &out_s, "long[n=9]"]);
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown));
    let cancelled = eventually(Duration::from_secs(30), || {
        status = json(&dlaunch(job.path(), &["status", &out_s, "--json"]));
        status["counts"]["cancelled"] == 2 && status["counts"]["running"] == 2
    });
    assert!(cancelled, "{status:#}");

    // Logs without knowing the layout: a single task, a gang's rank 1, stderr.
    let logs = dlaunch(job.path(), &["logs", &out_s, "quick[i=2]"]);
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "out-2\n", "{}", text(&logs));
    let logs = dlaunch(job.path(), &["logs", &out_s, "quick[i=2]", "--stderr"]);
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "err-2\n");
    let logs = dlaunch(job.path(), &["logs", &out_s, "gang", "--rank", "1"]);
    assert_eq!(String::from_utf8_lossy(&logs.stdout), "rank 1\n");

    // Cancel the whole run: it drains and exits 3, work left.
    let cancel = json(&dlaunch(job.path(), &["cancel", &job_s, "--json"]));
    assert_eq!(cancel["action"], "requested");
    let output = wait_with_limit(run, Duration::from_secs(60));
    assert_eq!(output.status.code(), Some(3), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("task bad failed on"), "one line per failure: {stderr}");
    assert!(stderr.contains("progress: "), "a progress line every second in a batch log: {stderr}");
    let summary = job.summary("obs");
    let tasks = tasks_by_id(&summary);
    assert_eq!(tasks[&running_victim]["status"], "cancelled");
    assert_eq!(tasks[&waiting]["status"], "cancelled");
    assert_eq!(tasks[&waiting]["attempts"], 0);
    assert_eq!(tasks["quick[i=3]"]["params"]["i"], 3, "matrix values keep their type");
    assert!(tasks["quick[i=3]"]["seconds"].as_f64().unwrap() > 0.1);

    // After the run: ended, exit 3, and what the next run would do.
    let after = json(&dlaunch(job.path(), &["status", &out_s, "--json"]));
    assert_eq!((after["state"].as_str(), after["exit_code"].as_i64()), (Some("ended"), Some(3)), "{after:#}");
    assert_eq!(after["next_run"], serde_json::json!({ "to_run": 2, "kept": 5, "failed": 1, "cancelled": 2 }));
    assert_documented("status", &after);

    // The report, as CSV (one row per attempt, typed matrix values) and as a page.
    let csv = dlaunch(job.path(), &["report", &out_s, "--csv"]);
    let csv = String::from_utf8_lossy(&csv.stdout).to_string();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    assert_eq!(header[..5], ["run", "task", "attempt", "i", "n"]);
    let attempts = job.journal("obs").iter().filter(|e| e["event"] == "attempt_started").count();
    assert_eq!(csv.lines().count(), attempts + 1);
    assert!(csv.lines().any(|l| l.starts_with("0,quick[i=3],0,3,,succeeded,")), "{csv}");
    let report = json(&dlaunch(job.path(), &["report", &out_s, "--json"]));
    assert_documented("report", &report);
    let page = Path::new(report["report"].as_str().unwrap()).to_path_buf();
    check_in_browser(&page, &job.journal("obs"));
}

const DOCS: &str = include_str!("../docs/observing.md");

/// `word` stands in `text` on its own, not as part of a longer name.
fn named_in(text: &str, word: &str) -> bool {
    let part_of_name = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-');
    text.match_indices(word).any(|(i, _)| {
        !part_of_name(text[..i].chars().next_back()) && !part_of_name(text[i + word.len()..].chars().next())
    })
}

fn keys<'a>(value: &'a serde_json::Value, out: &mut BTreeSet<&'a str>) {
    match value {
        serde_json::Value::Object(map) => map.iter().for_each(|(k, v)| {
            out.insert(k);
            keys(v, out);
        }),
        serde_json::Value::Array(items) => items.iter().for_each(|v| keys(v, out)),
        _ => {}
    }
}

/// Every field `command --json` printed, at any depth, is named in the page's JSON section.
fn assert_documented(command: &str, value: &serde_json::Value) {
    let section = &DOCS[DOCS.find("## JSON output").expect("docs/observing.md has a JSON section")..];
    let mut printed = BTreeSet::new();
    keys(value, &mut printed);
    let missing: Vec<&str> = printed.into_iter().filter(|k| !named_in(section, k)).collect();
    assert!(
        missing.is_empty(),
        "`dlaunch {command} --json` prints fields docs/observing.md does not name: {missing:?}"
    );
}

/// What `--help` says and what docs/observing.md says agree: every argument and option has a
/// description, and every option of the commands of that page is named on it; `check` and
/// `topo` print JSON the page describes.
#[test]
fn help_text_and_json_output_agree_with_the_docs() {
    for command in ["status", "cancel", "logs", "report", "check", "topo"] {
        let help = dlaunch(Path::new("."), &[command, "--help"]);
        assert!(help.status.success(), "{}", text(&help));
        let help = String::from_utf8_lossy(&help.stdout).to_string();
        for line in help.lines().filter(|l| l.starts_with("  ")) {
            let line = line.trim_start();
            let (name, description) = line.split_once("  ").map_or((line, ""), |(n, d)| (n.trim(), d.trim()));
            assert!(!description.is_empty(), "`dlaunch {command} --help`: {name} has no description\n{help}");
            let long = name.split_whitespace().find(|w| w.starts_with("--")).map(|w| w.trim_end_matches(','));
            if let Some(long) = long.filter(|&l| l != "--help") {
                assert!(named_in(DOCS, long), "`dlaunch {command} {long}` is not in docs/observing.md");
            }
        }
    }
    let job = JobDir::new(
        "[job]\nname = \"docs\"\n[datasets.d]\nsource = \"d.bin\"\n[[tasks]]\nname = \"a\"\ncommand = \"true {i}\"\nmatrix = { i = [1, 2] }\ndatasets = [\"d\"]\ntimeout = \"1m\"\n[[tasks]]\nname = \"b\"\ncommand = \"true\"\nafter = [\"a\"]\n",
    );
    std::fs::write(job.path().join("d.bin"), b"data").unwrap();
    let check = json(&dlaunch(job.path(), &["check", job.job().to_str().unwrap(), "--json"]));
    assert_eq!(check["tasks"].as_array().map(Vec::len), Some(3), "{check:#}");
    assert_eq!(check["datasets"][0]["name"], "d", "{check:#}");
    assert_documented("check", &check);
    let xml = fixture("topologies/nvidiaDGX2.xml");
    let mut topo = std::process::Command::new(DLAUNCH);
    topo.args(["topo", "--json"]).env("HWLOC_XMLFILE", &xml).stdout(Stdio::piped()).stderr(Stdio::piped());
    let topo = json(&wait_with_limit(topo.spawn().expect("spawn dlaunch"), Duration::from_secs(60)));
    assert_eq!(topo["gpus"].as_array().map(Vec::len), Some(16), "{topo:#}");
    assert_documented("topo", &topo);
}

/// Opens the page in headless Chromium: the DOM it built has one bar per process of every
/// attempt, one lane per worker slot used, a gang link, and no script errors on the console.
fn check_in_browser(page: &Path, journal: &[serde_json::Value]) {
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()))
        .expect("headless Chromium is needed for the report test: scripts/install-deps.sh installs it");
    let url = format!("file://{}", page.display());
    let profile = tempfile::tempdir().unwrap();
    let browse = |extra: &[&str]| {
        let mut command = Command::new(chromium);
        command
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(&url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        wait_with_limit(command.spawn().expect("chromium"), Duration::from_secs(120))
    };
    let dom = browse(&["--dump-dom"]);
    let html = String::from_utf8_lossy(&dom.stdout).to_string();
    let console = String::from_utf8_lossy(&dom.stderr);
    assert!(html.contains("id=\"timeline\""), "the browser rendered the page: {}", text(&dom));
    assert!(!console.contains("Uncaught") && !console.contains(":ERROR:CONSOLE"), "console errors: {console}");

    // Processes of the latest run's attempts: each ended one as reported, each running one as assigned.
    let processes: usize = journal
        .iter()
        .filter(|e| e["event"] == "attempt_ended")
        .map(|e| e["processes"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(html.matches("<rect class=\"bar ").count(), processes, "one bar per process of every attempt");
    let workers = journal.iter().filter(|e| e["event"] == "worker_joined").count();
    let lanes = html.matches("<g class=\"lane\"").count();
    assert_eq!(lanes, workers, "one slot per worker: one lane each");
    assert!(html.contains(&format!("data-lanes=\"{lanes}\"")));
    assert_eq!(html.matches("<line class=\"gang\"").count(), 1, "the gang's two processes are linked");
    assert!(html.contains("<polyline class=\"curve"), "a utilisation curve");
    assert!(html.contains("boom-line"), "failures show their stderr");

    let shot = page.with_file_name("report.png");
    let screenshot = browse(&[&format!("--screenshot={}", shot.display()), "--window-size=1400,1100"]);
    assert!(shot.metadata().is_ok_and(|m| m.len() > 10_000), "a screenshot was taken: {}", text(&screenshot));
    if let Ok(keep) = std::env::var("DLAUNCH_KEEP_SCREENSHOT") {
        std::fs::copy(&shot, keep).expect("keep the screenshot");
    }
}
