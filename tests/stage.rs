//! Dataset staging under real mpirun: what tasks see, resumed runs, bad sources, a node whose
//! disk refuses the data.
//!
//! On one machine every rank shares a node, so most tests set `DLAUNCH_STAGE_RANK_IS_NODE=1`:
//! each rank is then a node of its own, the broadcast is real (rank 0 to three leaders) and
//! the four "nodes" share one filesystem, as the SLURM test cluster's nodes do.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// Prints what a task sees of the datasets: a checksum per file (coreutils `cksum`), and the
/// tree's shape: directories and files with their modes, links with their targets.
const DESCRIBE: &str = r#"#!/bin/sh
for name in EMPTY ONE MID BIG; do
    eval path=\$DLAUNCH_DATASET_$name
    echo "$name $(cksum < "$path")"
done
cd "$DLAUNCH_DATASET_TREE" || exit 1
find . -type d -printf 'dir %p %m\n' | sort
find . -type f -printf 'file %p %m %s\n' | sort
find . -type l -printf 'link %p -> %l\n' | sort
find . -type f -exec cksum {} + | sort
cat link_to_exe_dir/tool.sh
"#;

/// Sources: 0 B, 1 B, 3 MiB, and more than two 8 MiB chunks; a tree with a subdirectory, an
/// executable, a relative link inside and one leading out.
fn make_sources(dir: &Path) {
    std::fs::write(dir.join("empty.bin"), b"").unwrap();
    std::fs::write(dir.join("one.bin"), b"x").unwrap();
    std::fs::write(dir.join("mid.bin"), pattern(3 << 20, 1)).unwrap();
    std::fs::write(dir.join("big.bin"), pattern((20 << 20) + 3, 2)).unwrap();
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("bin/empty_dir")).unwrap();
    std::fs::write(tree.join("bin/tool.sh"), "#!/bin/sh\necho tool\n").unwrap();
    set_mode(&tree.join("bin/tool.sh"), 0o750);
    std::fs::write(tree.join("readme"), "read me\n").unwrap();
    std::fs::write(tree.join("bin/data"), pattern(100_000, 3)).unwrap();
    std::os::unix::fs::symlink("bin", tree.join("link_to_exe_dir")).unwrap();
    std::os::unix::fs::symlink("../../outside", tree.join("bin/outside")).unwrap();
    std::fs::write(dir.join("describe.sh"), DESCRIBE).unwrap();
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

const DATASETS: &str = "[datasets.empty]\nsource = \"empty.bin\"\n[datasets.one]\nsource = \"one.bin\"\n[datasets.mid]\nsource = \"mid.bin\"\n[datasets.big]\nsource = \"big.bin\"\n[datasets.tree]\nsource = \"tree\"\n";

fn job(name: &str, extra_job: &str, tasks: usize) -> String {
    let values: Vec<String> = (0..tasks).map(|i| i.to_string()).collect();
    format!(
        "[job]\nname = \"{name}\"\n{extra_job}\n{DATASETS}[[tasks]]\nname = \"see\"\ncommand = \"sh describe.sh > $DLAUNCH_TASK_DIR/seen; echo $DLAUNCH_DATASET_BIG > $DLAUNCH_TASK_DIR/where\"\ndatasets = [\"empty\", \"one\", \"mid\", \"big\", \"tree\"]\nmatrix = {{ i = [{}] }}\ncpus = 0\n",
        values.join(", ")
    )
}

/// What `describe.sh` prints for the sources themselves, less the link that is not staged.
fn expected(dir: &Path) -> String {
    let mut command = Command::new("sh");
    command.arg(dir.join("describe.sh")).current_dir(dir);
    for (var, file) in
        [("EMPTY", "empty.bin"), ("ONE", "one.bin"), ("MID", "mid.bin"), ("BIG", "big.bin"), ("TREE", "tree")]
    {
        command.env(format!("DLAUNCH_DATASET_{var}"), dir.join(file));
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| !l.contains("outside"))
        .map(|l| format!("{l}\n"))
        .collect()
}

fn mpirun_env(dir: &JobDir, ranks: u32, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = dir.mpirun_command(ranks, args);
    command.envs(env.iter().copied());
    wait_with_limit(command.spawn().unwrap(), Duration::from_secs(300))
}

const RANK_IS_NODE: (&str, &str) = ("DLAUNCH_STAGE_RANK_IS_NODE", "1");

/// Each task's view, by task id: (what describe.sh printed, the big dataset's path).
fn seen(dir: &JobDir, name: &str) -> Vec<(String, PathBuf)> {
    let summary = dir.summary(name);
    assert_eq!(summary["counts"]["failed"], 0, "{summary:#}");
    tasks_by_id(&summary)
        .keys()
        .map(|id| {
            let task_dir = dir.output(name).join("tasks").join(id);
            let seen = std::fs::read_to_string(task_dir.join("seen")).unwrap();
            let where_ = std::fs::read_to_string(task_dir.join("where")).unwrap();
            (seen, PathBuf::from(where_.trim()))
        })
        .collect()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn every_task_on_every_node_sees_exactly_the_source() {
    let dir = JobDir::new(&job("bcast", "stage_dir = \"stage\"\nslots_per_worker = 2", 6));
    make_sources(dir.path());
    let out = mpirun_env(&dir, 4, &[], &[RANK_IS_NODE]);
    assert!(out.status.success(), "{}", text(&out));
    let expect = expected(dir.path());
    assert!(expect.contains("file ./bin/tool.sh 750 20"), "{expect}");
    assert!(expect.contains("link ./link_to_exe_dir -> bin"), "{expect}");
    let views = seen(&dir, "bcast");
    assert_eq!(views.len(), 6);
    let mut nodes = std::collections::BTreeSet::new();
    for (view, big) in &views {
        assert_eq!(view, &expect, "a task saw something else than the source");
        assert!(big.starts_with(dir.path().join("stage")), "{}", big.display());
        assert!(big.ends_with("big/big.bin"), "{}", big.display());
        nodes.insert(big.parent().unwrap().parent().unwrap().to_path_buf());
    }
    // Each rank is a node of its own here, on one shared filesystem: one directory per node.
    let keys: Vec<String> = nodes.iter().map(|n| n.file_name().unwrap().to_string_lossy().into()).collect();
    assert!(keys.len() >= 2 && keys.iter().all(|k| k.contains('@')), "{keys:?}");
    let log = stderr(&out);
    assert!(log.contains("dataset big: 1 file, 20.0 MiB: staged to 3 node(s) in"), "{log}");
    assert!(log.contains("leaving out the link") && log.contains("bin/outside -> ../../outside"), "{log}");
    let summary = dir.summary("bcast");
    let datasets = summary["datasets"].as_array().unwrap();
    let big = datasets.iter().find(|d| d["dataset"] == "big").unwrap();
    assert_eq!(big["bytes"], (20 << 20) + 3);
    assert_eq!(big["nodes"], 3, "three worker ranks, three nodes; rank 0's node runs no tasks");
    assert!(big["gb_per_s"].as_f64().unwrap() > 0.0, "{big}");
    let journal = dir.journal("bcast");
    let staged: Vec<&serde_json::Value> = journal.iter().filter(|e| e["event"] == "dataset_staged").collect();
    assert_eq!(staged.len(), 5);
    let position = |kind: &str| journal.iter().position(|e| e["event"] == kind).unwrap();
    assert!(position("run_started") < position("dataset_staged"));
    assert!(position("dataset_staged") < position("attempt_started"), "staged before any task starts");
}

#[test]
fn on_one_node_all_ranks_share_one_copy_under_tmpdir() {
    let dir = JobDir::new(&job("shared", "", 3));
    make_sources(dir.path());
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let out = mpirun_env(&dir, 4, &[], &[("TMPDIR", tmp.to_str().unwrap())]);
    assert!(out.status.success(), "{}", text(&out));
    let expect = expected(dir.path());
    let views = seen(&dir, "shared");
    let paths: std::collections::BTreeSet<&PathBuf> = views.iter().map(|(_, p)| p).collect();
    assert_eq!(paths.len(), 1, "one node, one copy: {paths:?}");
    let path = *paths.iter().next().unwrap();
    assert!(path.starts_with(tmp.join(format!("dlaunch-{}", nix_uid()))), "{}", path.display());
    for (view, _) in &views {
        assert_eq!(view, &expect);
    }
    use std::os::unix::fs::PermissionsExt;
    let job_stage = path.ancestors().nth(3).unwrap();
    assert_eq!(std::fs::metadata(job_stage).unwrap().permissions().mode() & 0o777, 0o700, "{}", job_stage.display());
    assert!(stderr(&out).contains("staged to 1 node(s)"), "{}", stderr(&out));
}

fn nix_uid() -> String {
    String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap().trim().to_string()
}

#[test]
fn a_resumed_run_skips_verified_copies_and_restages_a_changed_one() {
    let dir = JobDir::new(&job("again", "stage_dir = \"stage\"", 3));
    make_sources(dir.path());
    let out = mpirun_env(&dir, 4, &[], &[RANK_IS_NODE]);
    assert!(out.status.success(), "{}", text(&out));
    let out = mpirun_env(&dir, 4, &[], &[RANK_IS_NODE]);
    assert!(out.status.success(), "{}", text(&out));
    let log = stderr(&out);
    assert!(
        log.contains("dataset big: 1 file, 20.0 MiB: all 3 node(s) already hold a verified copy: transfer skipped"),
        "{log}"
    );
    let run = |events: &[serde_json::Value], run: u64| -> Vec<serde_json::Value> {
        let start = events.iter().position(|e| e["event"] == "run_started" && e["run"] == run).unwrap();
        events[start + 1..].iter().take_while(|e| e["event"] != "run_started").cloned().collect()
    };
    let second = run(&dir.journal("again"), 1);
    let big = second.iter().find(|e| e["event"] == "dataset_staged" && e["dataset"] == "big").unwrap();
    assert_eq!(big["nodes"], 0, "nothing sent: {big}");

    // A task changed a byte of one node's copy (same size): only that node receives it again.
    let node = std::fs::read_dir(dir.path().join("stage"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("big").exists())
        .unwrap();
    let copy = node.join("big/big.bin");
    let mut bytes = std::fs::read(&copy).unwrap();
    bytes[12345] ^= 1;
    std::fs::write(&copy, &bytes).unwrap();
    let out = mpirun_env(&dir, 4, &["run", "--fresh"], &[RANK_IS_NODE]);
    assert!(out.status.success(), "{}", text(&out));
    let log = stderr(&out);
    assert!(log.contains("dataset big: 1 file, 20.0 MiB: staged to 1 node(s) in"), "{log}");
    assert!(log.contains("2 node(s) already held a verified copy and skipped the transfer"), "{log}");
    assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(dir.path().join("big.bin")).unwrap());
    for (view, _) in seen(&dir, "again") {
        assert_eq!(view, expected(dir.path()));
    }
}

#[test]
fn bad_sources_fail_check_and_start_with_their_path() {
    let task = "[[tasks]]\nname = \"t\"\ncommand = \"true\"\ndatasets = [\"d\"]\n";
    let missing = JobDir::new(&format!("[job]\nname = \"m\"\n[datasets.d]\nsource = \"nope.tar\"\n{task}"));
    for out in [missing.alone(&["check"]), missing.mpirun(3, &[])] {
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(stderr(&out).contains("datasets.d.source: cannot read"), "{}", stderr(&out));
        assert!(stderr(&out).contains("nope.tar"), "{}", stderr(&out));
    }
    // Inside a directory: something that cannot be staged, found before anything is sent.
    let special = JobDir::new(&format!("[job]\nname = \"s\"\n[datasets.d]\nsource = \"tree\"\n{task}"));
    std::fs::create_dir_all(special.path().join("tree/sub")).unwrap();
    std::fs::write(special.path().join("tree/ok"), b"fine").unwrap();
    let fifo = special.path().join("tree/sub/pipe");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    for out in [special.alone(&["check"]), special.mpirun(3, &[])] {
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        let expect = format!("dataset d: {} is a named pipe", fifo.display());
        assert!(stderr(&out).contains(&expect), "{}", stderr(&out));
    }
    assert!(!special.output("s").exists(), "nothing started");
    let dangling = JobDir::new(&format!("[job]\nname = \"l\"\n[datasets.d]\nsource = \"gone\"\n{task}"));
    std::os::unix::fs::symlink("nowhere", dangling.path().join("gone")).unwrap();
    let out = dangling.alone(&["check"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn check_lists_the_datasets() {
    let dir = JobDir::new(&job("listed", "", 1));
    make_sources(dir.path());
    let out = dir.alone(&["check"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("dataset tree: 3 files in 3 directories, 1 link, "), "{stdout}");
    assert!(stderr(&out).contains("leaving out the link"), "{}", stderr(&out));
}

#[test]
fn a_node_that_cannot_write_fails_the_start_on_every_rank() {
    let dir = JobDir::new(&job("full", "stage_dir = \"stage\"", 3));
    make_sources(dir.path());
    // Rank 2's "disk" takes 10 MiB per file (RLIMIT_FSIZE): write(2) fails with EFBIG halfway
    // through the big dataset, while the others go on.
    let wrapper = dir.path().join("limited.sh");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\ntrap '' XFSZ\n[ \"$OMPI_COMM_WORLD_RANK\" = 2 ] && ulimit -f 10240\nexec \"$@\"\n",
    )
    .unwrap();
    set_mode(&wrapper, 0o755);
    let mut command = Command::new("mpirun");
    command.args(["-n", "4", "--oversubscribe"]).arg(&wrapper).arg(DLAUNCH).arg(dir.job());
    command.current_dir(dir.path()).envs(MPI_ENV.iter().copied()).env(RANK_IS_NODE.0, RANK_IS_NODE.1);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = wait_with_limit(command.spawn().unwrap(), Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let log = stderr(&out);
    let node = std::fs::read_dir(dir.path().join("stage"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with("@2"))
        .unwrap();
    let partial = node.join(".big.partial/big.bin");
    let expect = format!(
        "dataset big: node {} (rank 2): cannot write {}: File too large",
        node.file_name().unwrap().to_string_lossy(),
        partial.display()
    );
    assert!(log.contains("dlaunch: staging failed, stopping:"), "{log}");
    assert!(log.contains(&expect), "{log}");
    let left: Vec<String> =
        std::fs::read_dir(&node).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into()).collect();
    assert!(
        !left.iter().any(|name| name.contains("big")),
        "neither a partial nor a final copy on the failed node: {left:?}"
    );
    assert!(!dir.output("full").join("tasks").exists(), "no task started");
}

/// A sysfs file claims 4096 bytes and holds a few: to rank 0 it is a source that shrinks
/// between the scan and the stream, and the stream stops on every rank.
#[test]
fn a_source_that_changes_while_it_is_sent_stops_every_rank() {
    let source = Path::new("/sys/devices/system/cpu/online");
    if std::fs::metadata(source).map(|m| m.len()).unwrap_or(0) != 4096 {
        eprintln!("skipped: {} is not a 4096-byte sysfs file here", source.display());
        return;
    }
    let dir = JobDir::new(&format!(
        "[job]\nname = \"shrinks\"\nstage_dir = \"stage\"\n[datasets.cpus]\nsource = \"{}\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\ndatasets = [\"cpus\"]\n",
        source.display()
    ));
    let out = mpirun_env(&dir, 4, &[], &[RANK_IS_NODE]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let log = stderr(&out);
    let expect = "dataset cpus: cannot stage the source: /sys/devices/system/cpu/online changed while it was being staged (it had 4096 bytes)";
    assert!(log.contains(expect), "{log}");
    let copies: Vec<PathBuf> = std::fs::read_dir(dir.path().join("stage"))
        .unwrap()
        .flatten()
        .flat_map(|node| std::fs::read_dir(node.path()).unwrap().flatten().map(|e| e.path()))
        .collect();
    assert!(copies.is_empty(), "no copy, partial or final, on any node: {copies:?}");
}
