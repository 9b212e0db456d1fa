//! What the worker needs from processes, as a trait: the machine decides, a launcher acts.
//! `ProcLauncher` is the real one (`proc/` and the guard); tests use a fake (`worker/tests.rs`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid as NixPid;

use crate::guard::Guard;
use crate::proc::{self, Binding, FramedLog, Logs, Relay, SpawnError, SpawnRequest};
use dlaunch_core::env::{WAIT_FAILED, WAIT_MARKER};
use dlaunch_core::events::Ending;
use dlaunch_core::worker::{Escaped, LogState, Pid, SpawnFailure, SpawnPlan};

pub trait Launcher {
    /// Starts a process in a process group of its own; its pid is the group's id.
    fn spawn(&mut self, plan: SpawnPlan) -> Result<Pid, SpawnFailure>;
    /// Every child that ended since the last call, with how it ended.
    fn reap(&mut self) -> Vec<(Pid, Ending)>;
    fn signal_group(&mut self, pid: Pid, signal: i32);
    /// Processes that left their task's group and came back to this worker, with their task.
    fn escaped(&mut self) -> Vec<Escaped>;
    /// Kills an escaped process and whatever shares its process group.
    fn kill_escaped(&mut self, pid: Pid);
    /// What the logs of a running process have done.
    fn logs(&self, pid: Pid) -> LogState;
    /// The process ended and its group was killed: finish its logs and stop watching it.
    fn release(&mut self, pid: Pid);
}

/// How long closing a task's logs waits for output still in the pipes. It returns at once
/// when every writer is gone, which is the rule: only a process that escaped its task and
/// survived the sweep (one without the task's environment) can hold a pipe open that long.
const LOG_DRAIN_WAIT: Duration = Duration::from_millis(500);

/// The variable that marks every process of this rank's tasks, and their descendants that
/// keep their environment, for the guard: the guard's pid, unique on the host while it lives.
pub const GUARD_VARIABLE: &str = "DLAUNCH_GUARD";

pub struct ProcLauncher {
    guard: Option<Guard>,
    logs: HashMap<Pid, Logs>,
    /// Where a failed `wait-for` of each running process would leave its marker.
    wait_markers: HashMap<Pid, PathBuf>,
    /// `logs = "framed"`: this rank's framed log, shared by every process's streams.
    framed: Option<Arc<FramedLog>>,
    /// Copies every process's output; started with the first process.
    relay: Option<Relay>,
    /// Opened with the first task directory.
    dirs: Option<proc::OutputDirs>,
    children: proc::Children,
}

impl ProcLauncher {
    pub fn new(guard: Option<Guard>) -> Self {
        ProcLauncher {
            guard,
            logs: HashMap::new(),
            wait_markers: HashMap::new(),
            framed: None,
            relay: None,
            dirs: None,
            children: proc::Children::default(),
        }
    }

    pub fn set_framed(&mut self, log: Arc<FramedLog>) {
        self.framed = Some(log);
    }
}

impl Launcher for ProcLauncher {
    fn spawn(&mut self, mut plan: SpawnPlan) -> Result<Pid, SpawnFailure> {
        if let Some(&port) = plan.ports.iter().find(|&&port| proc::port_in_use(port)) {
            return Err(SpawnFailure::PortInUse(port));
        }
        if let Some(guard) = self.guard.as_ref().and_then(Guard::pid) {
            plan.env.insert(GUARD_VARIABLE.into(), guard.to_string().into());
        }
        let binding = Binding { cpus: plan.cpus, mem_nodes: plan.mem_nodes };
        let name = format!("dlaunch:{}", plan.task_id);
        let request = SpawnRequest {
            task_id: &plan.task_id,
            attempt: plan.attempt,
            process: plan.process,
            command: &plan.command,
            name: &name,
            workdir: &plan.workdir,
            env: &plan.env,
            output_dir: &plan.output_dir,
            log_dir: &plan.log_dir,
            framed: self.framed.as_ref(),
            share: plan.share,
            log_limit: plan.log_limit,
            binding: (!binding.cpus.is_empty()).then_some(&binding),
        };
        let where_ = || format!("workdir {}, logs {}", plan.workdir.display(), plan.log_dir.display());
        let relay = match &mut self.relay {
            Some(relay) => relay,
            None => match Relay::start() {
                Ok(relay) => self.relay.insert(relay),
                Err(e) => return Err(SpawnFailure::Infrastructure(format!("cannot start the log relay: {e}"))),
            },
        };
        match proc::spawn(&request, relay, &mut self.dirs) {
            Ok(spawned) => {
                if let Some(guard) = self.guard.as_mut() {
                    guard.watch(spawned.pid);
                }
                let pid = spawned.pid.as_raw();
                self.logs.insert(pid, spawned.logs);
                self.wait_markers.insert(pid, plan.log_dir.join(WAIT_MARKER));
                Ok(pid)
            }
            Err(SpawnError::Task(e)) => Err(SpawnFailure::Task(format!("{e} ({})", where_()))),
            Err(SpawnError::Infrastructure(e)) => Err(SpawnFailure::Infrastructure(format!("{e} ({})", where_()))),
        }
    }

    fn reap(&mut self) -> Vec<(Pid, Ending)> {
        let reaped = proc::reap().into_iter().map(|(pid, ending)| (pid.as_raw(), ending));
        reaped
            .map(|(pid, ending)| {
                let marker = self.wait_markers.remove(&pid);
                // The shell's exit status alone cannot tell a failed wait from the command's own
                // exit 69; the marker `dlaunch wait-for` left can (not a link: only its own file).
                let waited = ending == Ending::Exited { code: WAIT_FAILED }
                    && marker.is_some_and(|m| std::fs::symlink_metadata(m).is_ok_and(|m| m.is_file()));
                (pid, if waited { Ending::WaitFailed } else { ending })
            })
            .collect()
    }

    fn signal_group(&mut self, pid: Pid, signal: i32) {
        let signal = Signal::try_from(signal).unwrap_or(Signal::SIGKILL);
        proc::signal_group(NixPid::from_raw(pid), signal);
    }

    fn escaped(&mut self) -> Vec<Escaped> {
        let guard = self.guard.as_ref().and_then(Guard::pid);
        self.children
            .list()
            .into_iter()
            // A running task's own process is known; only what it left behind is looked up.
            .filter(|&pid| Some(pid) != guard && !self.logs.contains_key(&pid.as_raw()))
            .filter_map(|pid| {
                let (task_id, attempt) = proc::task_of(pid)?;
                Some(Escaped { pid: pid.as_raw(), task_id, attempt })
            })
            .collect()
    }

    fn kill_escaped(&mut self, pid: Pid) {
        let pid = NixPid::from_raw(pid);
        proc::signal_group(pid, Signal::SIGKILL);
        let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
    }

    fn logs(&self, pid: Pid) -> LogState {
        let Some(logs) = self.logs.get(&pid) else { return LogState::default() };
        let (stdout, stderr, error) = logs.state();
        LogState { stdout, stderr, error }
    }

    fn release(&mut self, pid: Pid) {
        if let Some(guard) = self.guard.as_mut() {
            guard.forget(NixPid::from_raw(pid));
        }
        if let Some(logs) = self.logs.remove(&pid) {
            logs.close(LOG_DRAIN_WAIT);
        }
    }
}
