//! Starting, signalling and reaping task processes.
//!
//! Each task runs as `sh -c <command>` in its own process group, so one signal reaches the
//! whole tree it spawns. It is bound to its CPUs and NUMA memory in the child before exec
//! (see `spawn`).

mod spawn;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::events::Ending;

/// CPU and memory binding for a process.
#[derive(Clone, Debug, Default)]
pub struct Binding {
    pub cpus: Vec<u32>,
    /// NUMA nodes for MPOL_BIND; empty: leave memory policy alone.
    pub mem_nodes: Vec<u32>,
}

pub struct SpawnRequest<'a> {
    pub command: &'a str,
    /// The shell's `$0`, shown by `ps`: `dlaunch:<task id>`.
    pub name: &'a str,
    pub workdir: &'a Path,
    pub env: &'a BTreeMap<OsString, OsString>,
    pub log_dir: &'a Path,
    pub binding: Option<&'a Binding>,
}

/// Creates the log directory (owner-only), opens stdout and stderr and starts the process.
/// Returns its pid, which is also its process group id.
pub fn spawn(request: &SpawnRequest) -> io::Result<Pid> {
    DirBuilder::new().recursive(true).mode(0o700).create(request.log_dir)?;
    let stdio = spawn::Stdio {
        stdin: File::open("/dev/null")?,
        stdout: log_file(&request.log_dir.join("stdout"))?,
        stderr: log_file(&request.log_dir.join("stderr"))?,
    };
    let (cpus, mem_nodes) = request.binding.map_or((&[][..], &[][..]), |b| (&b.cpus[..], &b.mem_nodes[..]));
    spawn::spawn_shell(request.command, request.name, request.workdir, request.env, &stdio, cpus, mem_nodes)
}

fn log_file(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(path)
}

/// Sends `signal` to a task's whole process group; a group that is already gone is fine.
pub fn signal_group(pgid: Pid, signal: Signal) {
    match killpg(pgid, signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => log::warn!("cannot send {signal} to process group {pgid}: {e}"),
    }
}

/// Every child that has ended since the last call, with how it ended.
pub fn reap() -> Vec<(Pid, Ending)> {
    let mut ended = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => ended.push((pid, Ending::Exited { code })),
            Ok(WaitStatus::Signaled(pid, signal, core_dumped)) => {
                ended.push((pid, Ending::Signaled { signal: signal as i32, core_dumped }))
            }
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return ended,
            Ok(_) | Err(Errno::EINTR) => continue,
            Err(e) => {
                log::warn!("waitpid: {e}");
                return ended;
            }
        }
    }
}

/// Makes this process the reaper of orphaned descendants, so a task's daemonized children stay
/// in sight (and can be cleaned up) instead of escaping to init.
pub fn become_subreaper() {
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        log::warn!("cannot become a child subreaper ({e}): escaped task children may outlive their task");
    }
}

/// Direct children of this process (all its threads' children: OpenMPI runs threads too).
pub fn children() -> Vec<Pid> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").into_iter().flatten().flatten() {
        let list = std::fs::read_to_string(entry.path().join("children")).unwrap_or_default();
        pids.extend(list.split_whitespace().filter_map(|p| p.parse().ok()).map(Pid::from_raw));
    }
    pids
}

/// The task a process belongs to, from the `DLAUNCH_TASK_ID` and `DLAUNCH_ATTEMPT` it
/// inherited; None when it has none (or is gone).
pub fn task_of(pid: Pid) -> Option<(String, u32)> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let mut id = None;
    let mut attempt = None;
    for var in environ.split(|&b| b == 0) {
        if let Some(value) = var.strip_prefix(b"DLAUNCH_TASK_ID=") {
            id = Some(String::from_utf8_lossy(value).into_owned());
        } else if let Some(value) = var.strip_prefix(b"DLAUNCH_ATTEMPT=") {
            attempt = std::str::from_utf8(value).ok()?.parse().ok();
        }
    }
    Some((id?, attempt?))
}
