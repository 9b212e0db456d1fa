//! Shared helpers for the integration tests: real `mpirun`, real processes, real files.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const DLAUNCH: &str = env!("CARGO_BIN_EXE_dlaunch");

/// OpenMPI as root, on loopback only (this machine's network rule), more ranks than cores.
pub const MPI_ENV: &[(&str, &str)] = &[
    ("OMPI_ALLOW_RUN_AS_ROOT", "1"),
    ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"),
    ("OMPI_MCA_btl_tcp_if_include", "lo"),
    ("OMPI_MCA_oob_tcp_if_include", "lo"),
    ("OMPI_MCA_rmaps_base_oversubscribe", "1"),
];

/// The same settings as a job file `env` table, for tasks that run MPI themselves: dlaunch
/// removes its own launcher's OMPI_* variables from tasks.
pub const MPI_ENV_TOML: &str = "OMPI_ALLOW_RUN_AS_ROOT = \"1\", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM = \"1\", OMPI_MCA_btl_tcp_if_include = \"lo\", OMPI_MCA_oob_tcp_if_include = \"lo\", OMPI_MCA_rmaps_base_oversubscribe = \"1\"";

/// `dlaunch <args>` in `dir` (an observing subcommand: status, cancel, logs, report).
pub fn dlaunch(dir: &Path, args: &[&str]) -> Output {
    let mut command = Command::new(DLAUNCH);
    command.args(args).current_dir(dir).stdout(Stdio::piped()).stderr(Stdio::piped());
    wait_with_limit(command.spawn().expect("spawn dlaunch"), Duration::from_secs(60))
}

/// The JSON a successful `--json` command printed.
pub fn json(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "{}", text(output));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(output)))
}

/// A directory with a job file in it.
pub struct JobDir {
    pub dir: tempfile::TempDir,
}

impl JobDir {
    pub fn new(job_toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("job.toml"), job_toml).expect("write job");
        JobDir { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn job(&self) -> PathBuf {
        self.path().join("job.toml")
    }

    pub fn output(&self, name: &str) -> PathBuf {
        self.path().join("runs").join(name)
    }

    /// `mpirun -n ranks dlaunch <args> job.toml`, waited for with a generous limit.
    pub fn mpirun(&self, ranks: u32, args: &[&str]) -> Output {
        wait_with_limit(self.mpirun_command(ranks, args).spawn().expect("spawn mpirun"), Duration::from_secs(300))
    }

    pub fn mpirun_command(&self, ranks: u32, args: &[&str]) -> Command {
        self.mpirun_command_with(ranks, &[], args)
    }

    /// `mpirun -n ranks <mpirun_options> dlaunch <args> job.toml`.
    pub fn mpirun_command_with(&self, ranks: u32, mpirun_options: &[&str], args: &[&str]) -> Command {
        let mut command = Command::new("mpirun");
        command.arg("-n").arg(ranks.to_string()).arg("--oversubscribe").args(mpirun_options).arg(DLAUNCH);
        command.args(args).arg(self.job()).current_dir(self.path()).envs(MPI_ENV.iter().copied());
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        command
    }

    /// `dlaunch <args> job.toml` without mpirun.
    pub fn alone(&self, args: &[&str]) -> Output {
        let mut command = Command::new(DLAUNCH);
        command.args(args).arg(self.job()).current_dir(self.path());
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        wait_with_limit(command.spawn().expect("spawn dlaunch"), Duration::from_secs(300))
    }

    pub fn summary(&self, name: &str) -> serde_json::Value {
        let text = std::fs::read_to_string(self.output(name).join("summary.json")).expect("summary.json");
        serde_json::from_str(&text).expect("summary is JSON")
    }

    pub fn journal(&self, name: &str) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.output(name).join("journal.jsonl")).unwrap_or_default();
        text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }
}

/// Waits for a child, killing it (and failing the test) if it runs past `limit`: a hung
/// launcher must fail a test, not hang CI. Its output is read meanwhile, so that a child
/// writing more than a pipe holds does not wait for the test forever.
pub fn wait_with_limit(child: Child, limit: Duration) -> Output {
    let (out, timed_out) = wait_or_kill(child, limit);
    if timed_out {
        panic!(
            "timed out after {limit:?}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Waits for a child, killing it if it runs past `limit`; true when it had to be killed.
pub fn wait_or_kill(mut child: Child, limit: Duration) -> (Output, bool) {
    fn drain(pipe: Option<impl std::io::Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    }
    let (stdout, stderr) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let start = Instant::now();
    let (status, timed_out) = loop {
        match child.try_wait() {
            Ok(Some(status)) => break (status, false),
            Ok(None) if start.elapsed() > limit => {
                let snapshot = processes_under(child.id());
                let _ = child.kill();
                let status = child.wait().expect("wait");
                let mut out =
                    Output { status, stdout: stdout.join().expect("stdout"), stderr: stderr.join().expect("stderr") };
                out.stderr.extend(format!("\n--- what ran under the child at the time limit ---\n{snapshot}").bytes());
                return (out, true);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("wait: {e}"),
        }
    };
    let out = Output { status, stdout: stdout.join().expect("stdout"), stderr: stderr.join().expect("stderr") };
    (out, timed_out)
}

/// Each process descended from `root`: state, kernel wait channel, command line and open files,
/// so that a hang in CI says where it hung.
fn processes_under(root: u32) -> String {
    let field = |pid: u32, name: &str| std::fs::read_to_string(format!("/proc/{pid}/{name}")).unwrap_or_default();
    let stat = |pid: u32| {
        let stat = field(pid, "stat");
        // After the command name in parentheses: state, ppid, pgid, session.
        let rest = stat.rsplit_once(')').map(|(_, rest)| rest.to_string()).unwrap_or_default();
        rest.split_whitespace().take(4).map(String::from).collect::<Vec<_>>()
    };
    // Each process's stat read once; the tree grown from it, parents before children.
    let stats: std::collections::HashMap<u32, Vec<String>> = std::fs::read_dir("/proc")
        .map(|dir| dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).map(|pid| (pid, stat(pid))).collect())
        .unwrap_or_default();
    let mut tree = vec![root];
    let mut at = 0;
    while let Some(&parent) = tree.get(at) {
        let parent = parent.to_string();
        tree.extend(stats.iter().filter(|(_, s)| s.get(1) == Some(&parent)).map(|(&pid, _)| pid));
        at += 1;
    }
    let mut report = String::new();
    for pid in tree {
        let s = stats.get(&pid).cloned().unwrap_or_default();
        let files: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|dir| {
                dir.filter_map(|e| {
                    let e = e.ok()?;
                    Some(format!("{}={}", e.file_name().to_str()?, std::fs::read_link(e.path()).ok()?.display()))
                })
                .collect()
            })
            .unwrap_or_default();
        report += &format!(
            "{pid} state {} ppid {} pgid {} sid {} wchan {} : {}\n    fds {}\n",
            s.first().map_or("?", |x| x),
            s.get(1).map_or("?", |x| x),
            s.get(2).map_or("?", |x| x),
            s.get(3).map_or("?", |x| x),
            field(pid, "wchan"),
            field(pid, "cmdline").replace('\0', " "),
            files.join(" ")
        );
    }
    report
}

pub fn text(output: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Reads `KEY=VALUE` lines (as written by `env > file`) into a map.
pub fn read_env(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().filter_map(|l| l.split_once('=')).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Tasks in summary.json by id.
pub fn tasks_by_id(summary: &serde_json::Value) -> BTreeMap<String, serde_json::Value> {
    summary["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| (t["id"].as_str().unwrap().to_string(), t.clone()))
        .collect()
}

/// Compiles tests/fixtures/mpi_hello.c once per test binary; returns the executable.
pub fn mpi_hello() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = std::env::temp_dir().join(format!("dlaunch-mpi-hello-{}", std::process::id()));
            let status = Command::new("mpicc")
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mpi_hello.c"))
                .arg("-o")
                .arg(&out)
                .status()
                .expect("mpicc");
            assert!(status.success(), "mpicc failed");
            out
        })
        .clone()
}

/// Processes whose command line contains `needle` (e.g. a marker in a test's task command).
pub fn processes_matching(needle: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && pid != std::process::id() {
            pids.push(pid);
        }
    }
    pids
}

/// Polls `condition` every 50 ms for up to `limit`.
pub fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    condition()
}

/// "0-3,8,10-11" → [0, 1, 2, 3, 8, 10, 11].
pub fn parse_cpu_list(list: &str) -> Vec<u32> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<u32>().unwrap()..=b.parse::<u32>().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// Shell snippet: wait until `n` tasks have reached this point (files in a shared directory),
/// proving they run at the same time. Gives up after a minute.
pub fn barrier(dir: &Path, n: usize) -> String {
    format!(
        "touch {d}/$DLAUNCH_TASK_INDEX.$RANK; i=0; while [ $(ls {d} | wc -l) -lt {n} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done",
        d = dir.display()
    )
}

/// A variable of a process's environment, from /proc.
pub fn env_of(pid: u32, name: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{name}=");
    environ
        .split(|&b| b == 0)
        .find_map(|v| Some(String::from_utf8_lossy(v.strip_prefix(prefix.as_bytes())?).into_owned()))
}

/// The fields of a process's /proc stat after its command (the state is the first), parsed
/// as numbers where they are.
fn stat_after_command(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(stat[stat.rfind(')')? + 2..].split_whitespace().map(str::to_string).collect())
}

/// The parent of a process, from /proc.
pub fn parent_of(pid: u32) -> Option<u32> {
    stat_after_command(pid)?.get(1)?.parse().ok()
}

/// CPU time (utime + stime, in clock ticks) a process has used, from /proc: fields 14 and 15
/// of stat(5), counted from the pid; 11 and 12 after the command.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let fields = stat_after_command(pid)?;
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// How many times a process has gone to sleep (voluntary context switches), from /proc.
pub fn wakeups(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("voluntary_ctxt_switches:")?.trim().parse().ok())
}

/// `kill -SIGNAL -- TARGET`: a pid, or `-pgid` for a process group.
pub fn send_signal(target: &str, signal: &str) {
    let status = Command::new("kill").arg(format!("-{signal}")).arg("--").arg(target).status().expect("kill");
    assert!(status.success(), "kill -{signal} {target}");
}

/// Bytes that differ from chunk to chunk (dataset staging sends 8 MiB chunks), so a misplaced
/// or repeated chunk changes the checksum.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A tmpfs mounted over a path for a test (root only), unmounted when dropped.
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    pub fn mount(at: &std::path::Path, options: &str) -> Option<Tmpfs> {
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

/// Runs job `full` (a task `big` writing 1 MB, then a task `after`) with a 64 KiB tmpfs over
/// its `tasks/`: the attempt is dlaunch's failure, not the task's, nothing more starts, and once
/// the tmpfs is gone a plain rerun (no --retry-failed) runs everything. None: no tmpfs (not root).
pub fn full_disk_then_rerun(job: &str) -> Option<JobDir> {
    let dir = JobDir::new(job);
    let Some(tmpfs) = Tmpfs::mount(&dir.output("full").join("tasks"), "size=64k") else {
        eprintln!("skipped: cannot mount a tmpfs (needs root)");
        return None;
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
    Some(dir)
}

/// The dlaunch process of MPI rank `rank` of the run whose command line contains `needle`:
/// the rank itself, not its guard (a fork with the same command line and environment).
pub fn rank_process(needle: &str, rank: u32) -> Option<u32> {
    processes_matching(needle).into_iter().find(|&pid| {
        env_of(pid, "OMPI_COMM_WORLD_RANK") == Some(rank.to_string())
            && parent_of(pid).is_some_and(|p| env_of(p, "OMPI_COMM_WORLD_RANK").is_none())
    })
}
