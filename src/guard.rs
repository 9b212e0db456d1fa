//! A watchdog for task process groups, forked before MPI starts.
//!
//! PR_SET_PDEATHSIG only reaches a task's direct child (`sh`), not what the task spawns. If a
//! rank dies abruptly (SIGKILL, MPI abort, node trouble), the guard notices its pipe closing and
//! kills every process group it was told about, so no task runs on unsupervised.
//!
//! Processes that left their task's group (`setsid`, daemons) are found by their environment:
//! every task starts with `DLAUNCH_GUARD=<this guard's pid>` (`worker::GUARD_VARIABLE`), which
//! its descendants inherit, and no other process on the host can carry that pid while the guard
//! lives. An environment works without privileges and on any kernel, where a cgroup per task
//! needs a delegated cgroup v2 tree that batch systems rarely hand to jobs; a process that
//! clears its environment (`env -i`) is not found this way.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;

use nix::fcntl::OFlag;
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::unistd::{ForkResult, Pid, fork};

pub struct Guard {
    pipe: Option<File>,
    pid: Pid,
}

impl Guard {
    /// Forks the guard. Call while the process is still single-threaded (before MPI starts).
    pub fn start() -> nix::Result<Guard> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        // Safety: single-threaded here; the child only reads a pipe and sends signals.
        match unsafe { fork() }? {
            ForkResult::Child => {
                drop(write);
                watch(read)
            }
            ForkResult::Parent { child } => {
                drop(read);
                Ok(Guard { pipe: Some(File::from(write)), pid: child })
            }
        }
    }

    /// The guard process, while it is alive as far as we know.
    pub fn pid(&self) -> Option<Pid> {
        self.pipe.as_ref().map(|_| self.pid)
    }

    pub fn watch(&mut self, pgid: Pid) {
        self.tell(&format!("+{pgid}\n"));
    }

    pub fn forget(&mut self, pgid: Pid) {
        self.tell(&format!("-{pgid}\n"));
    }

    fn tell(&mut self, line: &str) {
        if let Some(pipe) = self.pipe.as_mut()
            && let Err(e) = pipe.write_all(line.as_bytes())
        {
            log::warn!("the task guard is gone ({e}): tasks may outlive an abrupt end of this rank");
            self.pipe = None;
        }
    }
}

/// The guard's life: follow the list of groups until the pipe closes, then kill what is left.
fn watch(read: OwnedFd) -> ! {
    // Leave the rank's session, so a launcher killing the rank's process group spares the guard.
    let _ = nix::unistd::setsid();
    // The guard says nothing, and the rank's output is not its to hold: mpirun (or srun)
    // waits for the end of a rank's stdout and stderr, which the guard would otherwise keep
    // open through its last sweep of /proc after the rank has gone.
    if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
        let _ = (nix::unistd::dup2_stdin(&null), nix::unistd::dup2_stdout(&null), nix::unistd::dup2_stderr(&null));
    }
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGUSR1, Signal::SIGUSR2, Signal::SIGHUP] {
        // Safety: setting a signal to be ignored has no handler to be unsound.
        let _ = unsafe { signal(sig, SigHandler::SigIgn) };
    }
    let mut groups: Vec<i32> = Vec::new();
    for line in BufReader::new(File::from(read)).lines() {
        let Ok(line) = line else { break };
        let (op, pgid) = line.split_at(line.len().min(1));
        let Ok(pgid) = pgid.parse::<i32>() else { continue };
        match op {
            "+" => groups.push(pgid),
            "-" => groups.retain(|&g| g != pgid),
            _ => {}
        }
    }
    for pgid in groups {
        let _ = nix::sys::signal::killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
    sweep_marked();
    // Skip Rust and C exit handlers: they belong to the parent's state, copied by fork.
    unsafe { nix::libc::_exit(0) }
}

/// Kills every process that carries this guard's mark, until a look finds none left (one may
/// fork while the last look runs), or gives up after a few looks.
fn sweep_marked() {
    let mark = format!("{}={}", crate::worker::GUARD_VARIABLE, std::process::id()).into_bytes();
    for _ in 0..10 {
        let mut found = false;
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            if environ.split(|&b| b == 0).any(|var| var == mark) {
                found = true;
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if !found {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
