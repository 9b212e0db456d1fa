//! Starting, signalling and reaping task processes.
//!
//! Each task runs as `sh -c <command>` in its own process group, so one signal reaches the
//! whole tree it spawns. It is bound to its CPUs and NUMA memory in the child between fork and
//! exec; only async-signal-safe system calls run there, because OpenMPI's threads exist in the
//! parent and a fork of a multi-threaded process may not allocate or take locks.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::sched::CpuSet;
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
    pub workdir: &'a Path,
    pub env: &'a BTreeMap<OsString, OsString>,
    pub log_dir: &'a Path,
    pub binding: Option<&'a Binding>,
}

/// Creates the log directory (owner-only), opens stdout and stderr and starts the process.
/// Returns its pid, which is also its process group id.
pub fn spawn(request: &SpawnRequest) -> io::Result<Pid> {
    DirBuilder::new().recursive(true).mode(0o700).create(request.log_dir)?;
    let stdout = log_file(&request.log_dir.join("stdout"))?;
    let stderr = log_file(&request.log_dir.join("stderr"))?;
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(request.command)
        .current_dir(request.workdir)
        .env_clear()
        .envs(request.env)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0);
    let cpu_set = match request.binding {
        Some(b) if !b.cpus.is_empty() => Some(cpu_set(&b.cpus)?),
        _ => None,
    };
    let node_mask = request.binding.map(|b| node_mask(&b.mem_nodes)).unwrap_or_default();
    let highest_fd = highest_open_fd();
    let parent = nix::unistd::getpid();
    // Safety: the closure runs in the forked child and only makes system calls.
    unsafe {
        command.pre_exec(move || {
            // If dlaunch dies, the task dies with it rather than running on unsupervised.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            if nix::unistd::getppid() != parent {
                return Err(io::Error::other("dlaunch exited while starting the task"));
            }
            if let Some(set) = &cpu_set {
                nix::sched::sched_setaffinity(Pid::from_raw(0), set)?;
            }
            if !node_mask.is_empty() {
                set_mempolicy_bind(&node_mask)?;
            }
            close_on_exec_from_3(highest_fd);
            Ok(())
        });
    }
    let child = command.spawn()?;
    Ok(Pid::from_raw(child.id() as i32))
}

/// Marks every descriptor above stderr close-on-exec, in the forked child. OpenMPI does not
/// set FD_CLOEXEC on its sockets: without this every task inherited dlaunch's TCP connections
/// to the other ranks and its PMIx connection to srun's slurmstepd (or mpirun's orted), could
/// write into them, and kept them open after dlaunch ended. The task gets stdin, stdout and
/// stderr only. System calls only (see the module comment).
fn close_on_exec_from_3(highest_fd: Option<i32>) {
    match highest_fd {
        None => {
            close_range_cloexec(3);
        }
        // Kernels before 5.11: one descriptor at a time (closed ones answer EBADF, fine).
        Some(highest) => {
            for fd in 3..=highest {
                // Safety: a plain system call on a descriptor number.
                unsafe { nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC) };
            }
        }
    }
}

/// close_range(first, ~0, CLOSE_RANGE_CLOEXEC) (Linux 5.11); whether it worked.
fn close_range_cloexec(first: nix::libc::c_uint) -> bool {
    let (last, flags) = (nix::libc::c_uint::MAX, nix::libc::CLOSE_RANGE_CLOEXEC);
    // Safety: a plain system call on descriptor numbers; no memory is passed.
    unsafe { nix::libc::syscall(nix::libc::SYS_close_range, first, last, flags) == 0 }
}

/// None where close_range can mark the descriptors (asked once, on an empty range); else the
/// highest descriptor open now, read in the parent, where reading a directory is allowed.
fn highest_open_fd() -> Option<i32> {
    static CLOSE_RANGE_WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *CLOSE_RANGE_WORKS.get_or_init(|| close_range_cloexec(nix::libc::c_uint::MAX)) {
        return None;
    }
    let open = std::fs::read_dir("/proc/self/fd").map(|dir| {
        dir.flatten().filter_map(|entry| entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok())).max()
    });
    // Descriptors opened by other threads meanwhile are likely right above; without /proc,
    // the traditional default limit.
    Some(open.ok().flatten().map_or(1024, |max| max.saturating_add(64)))
}

fn log_file(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).write(true).truncate(true).mode(0o600).open(path)
}

fn cpu_set(cpus: &[u32]) -> io::Result<CpuSet> {
    let mut set = CpuSet::new();
    for &cpu in cpus {
        set.set(cpu as usize).map_err(|e| io::Error::other(format!("cannot bind to CPU {cpu}: {e}")))?;
    }
    Ok(set)
}

/// The nodemask for set_mempolicy: one bit per NUMA node, in machine words.
fn node_mask(nodes: &[u32]) -> Vec<nix::libc::c_ulong> {
    let bits = nix::libc::c_ulong::BITS;
    let Some(&max) = nodes.iter().max() else { return Vec::new() };
    let mut mask = vec![0; (max / bits) as usize + 1];
    for &node in nodes {
        mask[(node / bits) as usize] |= 1 << (node % bits);
    }
    mask
}

fn set_mempolicy_bind(mask: &[nix::libc::c_ulong]) -> io::Result<()> {
    const MPOL_BIND: nix::libc::c_long = 2;
    let max_node = (mask.len() * nix::libc::c_ulong::BITS as usize + 1) as nix::libc::c_ulong;
    // Safety: the mask outlives the call and max_node matches its size.
    let rc = unsafe { nix::libc::syscall(nix::libc::SYS_set_mempolicy, MPOL_BIND, mask.as_ptr(), max_node) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_masks() {
        assert_eq!(node_mask(&[]), Vec::<nix::libc::c_ulong>::new());
        assert_eq!(node_mask(&[0, 2]), vec![0b101]);
        assert_eq!(node_mask(&[65]).len(), 2);
    }
}
