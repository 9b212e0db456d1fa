//! Starting, signalling and reaping task processes.
//!
//! Each task runs as `sh -c <command>` in its own process group, so one signal reaches the
//! whole tree it spawns. It is bound to its CPUs and NUMA memory in the child before exec
//! (see `spawn`).

mod relay;
mod sink;
mod spawn;

pub use relay::{Logs, Relay};
pub use sink::FramedLog;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::Pid;

use crate::beneath;
use dlaunch_core::events::Ending;
use dlaunch_core::frame::{Origin, Stream};
use dlaunch_core::layout;
use dlaunch_core::spec::Share;
use relay::Copy;
use sink::{LogDir, Sink};

/// CPU and memory binding for a process.
#[derive(Clone, Debug, Default)]
pub struct Binding {
    pub cpus: Vec<u32>,
    /// NUMA nodes for MPOL_BIND; empty: leave memory policy alone.
    pub mem_nodes: Vec<u32>,
}

pub struct SpawnRequest<'a> {
    pub task_id: &'a str,
    pub attempt: u32,
    pub process: u32,
    pub command: &'a str,
    /// The shell's `$0`, shown by `ps`: `dlaunch:<task id>`.
    pub name: &'a str,
    pub workdir: &'a Path,
    pub env: &'a BTreeMap<OsString, OsString>,
    /// The output directory, and the log directory within it.
    pub output_dir: &'a Path,
    pub log_dir: &'a Path,
    /// `logs = "framed"`: the rank's framed log, instead of files in `log_dir`.
    pub framed: Option<&'a Arc<FramedLog>>,
    pub share: Share,
    /// Bytes kept of each of stdout and stderr; None: all.
    pub log_limit: Option<u64>,
    pub binding: Option<&'a Binding>,
}

/// A started process: its pid, which is also its process group id, and the copies of its output.
pub struct Spawned {
    pub pid: Pid,
    pub logs: Logs,
}

/// Why a process did not start.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The task's own doing: a wrong working directory, or something it left where this
    /// attempt's logs go (only a task writes into the output directory besides dlaunch).
    #[error("{0}")]
    Task(io::Error),
    /// dlaunch could not do its part: the log directory or files, pipes, the system calls
    /// that start and bind the process.
    #[error("{0}")]
    Infrastructure(io::Error),
}

/// The output directory and its `tasks/`, kept open by a rank: a task's directory is then a
/// look at `tasks/` by its path and one `mkdirat`, where walking down from the output directory
/// took eight system calls a task. The look keeps the directory the one `DLAUNCH_TASK_DIR`
/// names: `tasks/` removed or renamed during the run (a user archiving, a task cleaning up) is
/// made or opened again, as before it was kept open.
pub struct OutputDirs {
    path: PathBuf,
    /// `path`'s `tasks/`, looked at before each task directory.
    tasks_path: PathBuf,
    root: OwnedFd,
    /// `tasks/`, and its device and inode when it was opened.
    tasks: Option<(OwnedFd, (u64, u64))>,
}

impl OutputDirs {
    /// The cached directories of `output_dir`, opened now if `cache` holds none or another's.
    fn of<'c>(cache: &'c mut Option<OutputDirs>, output_dir: &Path) -> io::Result<&'c mut OutputDirs> {
        if cache.as_ref().is_some_and(|dirs| dirs.path != output_dir) {
            *cache = None;
        }
        match cache {
            Some(dirs) => Ok(dirs),
            None => {
                let root = beneath::open_root(output_dir)?;
                let (path, tasks_path) = (output_dir.to_path_buf(), layout::tasks(output_dir));
                Ok(cache.insert(OutputDirs { path, tasks_path, root, tasks: None }))
            }
        }
    }

    /// True when the directory is new, made now.
    fn make_task_dir(&mut self, task_id: &str, mode: u32) -> io::Result<bool> {
        let named = nix::sys::stat::lstat(&self.tasks_path).ok().map(|st| (st.st_dev, st.st_ino));
        if self.tasks.as_ref().is_some_and(|(_, id)| Some(*id) != named) {
            self.tasks = None;
        }
        let (tasks, _) = match &mut self.tasks {
            Some(kept) => kept,
            None => {
                // The output directory itself may have moved too: everything from the top again.
                self.root = beneath::open_root(&self.path)?;
                let tasks = beneath::make_dirs(&self.root, &layout::tasks(Path::new("")), mode, false)?;
                let st = nix::sys::stat::fstat(&tasks)?;
                self.tasks.insert((tasks, (st.st_dev, st.st_ino)))
            }
        };
        beneath::ensure_dirs(tasks, Path::new(task_id), mode, &self.tasks_path)
    }
}

/// Creates the task's directory (`DLAUNCH_TASK_DIR`, maybe the working directory) and starts
/// the process with its stdout and stderr copied by `relay` to their sinks, which create the
/// log directory and files on the first byte.
pub fn spawn(request: &SpawnRequest, relay: &mut Relay, dirs: &mut Option<OutputDirs>) -> Result<Spawned, SpawnError> {
    let infra = |what: &str, path: &Path| {
        let what = format!("{what} {}", path.display());
        move |e: io::Error| SpawnError::Infrastructure(io::Error::new(e.kind(), format!("{what}: {e}")))
    };
    let [stdout_sink, stderr_sink] = sinks(request, dirs).map_err(|e| match e.kind() {
        io::ErrorKind::AlreadyExists => SpawnError::Task(e),
        _ => infra("cannot create the task directory for the logs in", request.log_dir)(e),
    })?;
    let open = |sink: Sink| {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
            .map_err(|e| SpawnError::Infrastructure(io::Error::other(format!("cannot create a pipe: {e}"))))?;
        Ok((Copy { pipe: File::from(read), sink }, File::from(write)))
    };
    let (stdout, stdout_writer) = open(stdout_sink)?;
    let (stderr, stderr_writer) = open(stderr_sink)?;
    let stdin = File::open("/dev/null").map_err(infra("cannot open", Path::new("/dev/null")))?;
    let stdio = spawn::Stdio { stdin, stdout: stdout_writer, stderr: stderr_writer };
    let (cpus, mem_nodes) = request.binding.map_or((&[][..], &[][..]), |b| (&b.cpus[..], &b.mem_nodes[..]));
    let pid = spawn::spawn_shell(request.command, request.name, request.workdir, request.env, &stdio, cpus, mem_nodes)
        .map_err(|e| if e.workdir { SpawnError::Task(e.error) } else { SpawnError::Infrastructure(e.error) })?;
    // The task holds the pipes' write ends now; ours would keep the copies from ever ending.
    drop(stdio);
    match relay.copy(stdout, stderr, request.log_limit) {
        Ok(logs) => Ok(Spawned { pid, logs }),
        Err(e) => {
            signal_group(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            Err(SpawnError::Infrastructure(io::Error::new(e.kind(), format!("cannot start copying the logs: {e}"))))
        }
    }
}

/// The task's directory, made now (never through a link) when the task has one (it is named
/// by `DLAUNCH_TASK_DIR`; `task_dir = false` leaves it out), and where stdout and stderr will
/// go. With files, the attempt's log directory must not exist yet: an attempt's logs never mix
/// with anything written before (a task can make directories in its own directory).
fn sinks(request: &SpawnRequest, dirs: &mut Option<OutputDirs>) -> io::Result<[Sink; 2]> {
    let beneath_output = |path: &'_ Path| {
        path.strip_prefix(request.output_dir).map(Path::to_path_buf).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not in the output directory {}", path.display(), request.output_dir.display()),
            )
        })
    };
    let dirs = OutputDirs::of(dirs, request.output_dir)?;
    let made = match request.env.contains_key(std::ffi::OsStr::new("DLAUNCH_TASK_DIR")) {
        true => dirs.make_task_dir(request.task_id, request.share.dir_mode())?,
        false => false,
    };
    if let Some(log) = request.framed {
        let origin = |stream| Origin {
            task: request.task_id.to_string(),
            attempt: request.attempt,
            process: request.process,
            stream,
        };
        return Ok([Stream::Stdout, Stream::Stderr].map(|s| Sink::Framed { log: Arc::clone(log), origin: origin(s) }));
    }
    let log_dir = beneath_output(request.log_dir)?;
    // Nothing can be in a task directory made just now: no need to look.
    let fresh = made && request.log_dir.starts_with(layout::task_dir(request.output_dir, request.task_id));
    if !fresh && nix::sys::stat::fstatat(&dirs.root, &log_dir, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists already: dlaunch never writes into an earlier directory", log_dir.display()),
        ));
    }
    let dir = LogDir::new(request.output_dir, &log_dir, request.share);
    Ok(["stdout", "stderr"].map(|name| Sink::File { dir: Arc::clone(&dir), name, file: None }))
}

/// Whether a program listens on `port` of this host, on any address of either family: a bind
/// test, as a task's own bind would see it. One dual-stack bind to `[::]` clashes with a
/// listener on any IPv4 or IPv6 address (`0.0.0.0`, `127.0.0.1`, `[::1]`, `[::]` with or
/// without IPV6_V6ONLY); a host without IPv6 gets the IPv4 bind to `0.0.0.0`. With
/// SO_REUSEADDR (as std and the frameworks set it) connections in TIME_WAIT do not count. A
/// bind without `listen` answers the same, and closing the socket then costs the kernel less.
pub fn port_in_use(port: u16) -> bool {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, setsockopt, socket, sockopt,
    };
    let clashes = |socket: &OwnedFd, address: &dyn nix::sys::socket::SockaddrLike| {
        let _ = setsockopt(socket, sockopt::ReuseAddr, &true);
        bind(socket.as_raw_fd(), address) == Err(Errno::EADDRINUSE)
    };
    if let Ok(socket) = socket(AddressFamily::Inet6, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        && setsockopt(&socket, sockopt::Ipv6V6Only, &false).is_ok()
    {
        let any = std::net::SocketAddrV6::new(std::net::Ipv6Addr::UNSPECIFIED, port, 0, 0);
        return clashes(&socket, &SockaddrIn6::from(any));
    }
    match socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None) {
        Ok(socket) => clashes(&socket, &SockaddrIn::new(0, 0, 0, 0, port)),
        Err(_) => false,
    }
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

/// Children of this process that can be a task's: those of the calling thread, which starts
/// the tasks, and those of the main thread, which the kernel gives the orphans of a subreaper
/// (the first of its threads still alive). OpenMPI's own threads' children are not looked at:
/// reading every thread's list cost five more files per ended task. Each list is read again
/// from a file kept open (procfs makes it anew on every read from the start): one system
/// call a look, where opening it each time took five.
#[derive(Default)]
pub struct Children {
    lists: Vec<(u32, File)>,
    buffer: Vec<u8>,
}

impl Children {
    pub fn list(&mut self) -> Vec<Pid> {
        let process = std::process::id();
        let caller = nix::unistd::gettid().as_raw() as u32;
        let threads = if caller == process { vec![process] } else { vec![process, caller] };
        let mut children = Vec::new();
        for tid in threads {
            let at = match self.lists.iter().position(|(t, _)| *t == tid) {
                Some(at) => at,
                None => match File::open(format!("/proc/{process}/task/{tid}/children")) {
                    Ok(file) => {
                        self.lists.push((tid, file));
                        self.lists.len() - 1
                    }
                    Err(_) => continue,
                },
            };
            if read_from_start(&self.lists[at].1, &mut self.buffer).is_err() {
                continue;
            }
            let text = String::from_utf8_lossy(&self.buffer);
            children.extend(text.split_whitespace().filter_map(|p| p.parse().ok()).map(Pid::from_raw));
        }
        children
    }
}

/// The whole of `file` from its start, into `buffer`.
fn read_from_start(file: &File, buffer: &mut Vec<u8>) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    buffer.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = file.read_at(&mut chunk, buffer.len() as u64)?;
        if n == 0 {
            return Ok(());
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
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
    use super::{Children, port_in_use};

    /// The lists are read again from their start on every look: a child shows while it lives.
    #[test]
    fn children_are_listed_on_every_look_from_files_kept_open() {
        let mut children = Children::default();
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        assert!(children.list().contains(&pid));
        assert!(children.list().contains(&pid), "a second look");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!children.list().contains(&pid), "reaped");
    }

    /// A program listening on the port, on any one address or all of them, holds it; a port
    /// whose listener has closed is free again at once.
    #[test]
    fn a_port_is_in_use_while_a_program_listens_on_it() {
        let ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
        let addresses = ["127.0.0.1", "0.0.0.0", "::1", "::"];
        for address in addresses.into_iter().filter(|a| ipv6 || !a.contains(':')) {
            let listener = std::net::TcpListener::bind((address, 0)).unwrap();
            let port = listener.local_addr().unwrap().port();
            assert!(port_in_use(port), "listening on {address}:{port}");
            drop(listener);
            assert!(!port_in_use(port), "{address}:{port} closed");
        }
    }
}
