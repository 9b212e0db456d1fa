//! The worker's decisions, free of processes, signals and clocks: given orders, the ends of
//! processes and what their logs did, when to start, signal, kill and report. Every input
//! carries the time; the answers are `Effect`s that the shell's driver (`dlaunch::worker::Worker`)
//! carries out through a `Launcher`; the shell's tests drive both through a fake launcher.

mod launch;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::env::{compose, inheritable, placement_env, task_visible_gpus};
use crate::events::{AttemptKey, Ending};
use crate::sched::Capacity;
use crate::spec::{Job, Share, format_size};
use crate::topo::{GpuVendor, NodeTopology, Placement, Placer, cpu_list};
use crate::wire::{Launch, Order, ProcessEnd, Report, TemplateRecord, WorkerHello};

/// A process id as the launcher hands it out; it is also the process group the task leads.
pub type Pid = i32;

pub const SIGKILL: i32 = 9;

/// Escaped descendants of finished tasks are looked for this often, and whenever a task ends.
const ORPHAN_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long the end of a process that died of a stop signal dlaunch did not send is held back.
/// SLURM signals every process of a job step at once (scancel, the time limit, `--signal`
/// without `B:`): a task may die of the signal a moment before its rank learns that it has to
/// stop. Held, its end is reported as interrupted (run again on resume) when the stop comes
/// within this time, and as the failure it looks like otherwise.
pub const OUTSIDE_STOP_WINDOW: Duration = Duration::from_secs(2);

/// Signals that ask dlaunch to stop (SIGINT, SIGTERM, SIGUSR1, SIGUSR2): drain, signal tasks,
/// write the summary. A task killed by one of them may have been stopped along with dlaunch.
pub const STOP_SIGNALS: [i32; 4] = [2, 15, 10, 12];

/// Everything a launcher needs to start one process, decided here.
#[derive(Clone, Debug, PartialEq)]
pub struct SpawnPlan {
    /// The task's id, shown by `ps` as the shell's `$0` (`dlaunch:<task id>`).
    pub task_id: String,
    /// The attempt, and the process within the task: what a framed log record names.
    pub attempt: u32,
    pub process: u32,
    pub command: String,
    pub workdir: PathBuf,
    pub env: BTreeMap<OsString, OsString>,
    /// The output directory, and the log directory within it where stdout and stderr go; the
    /// launcher creates the task's directory, and the log directory on the first byte of output,
    /// never through a link.
    pub output_dir: PathBuf,
    pub log_dir: PathBuf,
    /// Who may read the logs.
    pub share: Share,
    /// Bytes written to each log at most (`log_limit`); None: unlimited.
    pub log_limit: Option<u64>,
    /// CPUs to bind to; empty: leave the binding alone.
    pub cpus: Vec<u32>,
    /// NUMA nodes for memory; empty: leave the memory policy alone.
    pub mem_nodes: Vec<u32>,
    /// The ports the coordinator reserved for this process on this host: the launcher makes
    /// sure no other program listens on any of them before the task starts.
    pub ports: Vec<u16>,
    /// Declared outputs to send back in returned mode (process 0 only).
    pub outputs: Vec<String>,
}

/// A process's plan moved to `local`: its log directory, working directory and every variable
/// naming a place beneath the output directory (`DLAUNCH_TASK_DIR`, `DLAUNCH_OUTPUT_DIR`).
pub fn rebase_plan(plan: &mut SpawnPlan, local: &std::path::Path) {
    let from = plan.output_dir.clone();
    for value in plan.env.values_mut() {
        let path = std::path::Path::new(value.as_os_str());
        if path.is_absolute() && path.starts_with(&from) {
            *value = crate::returned::rebase(path, &from, local).into_os_string();
        }
    }
    plan.log_dir = crate::returned::rebase(&plan.log_dir, &from, local);
    plan.workdir = crate::returned::rebase(&plan.workdir, &from, local);
    plan.output_dir = local.to_path_buf();
}

/// Why a launcher could not start a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpawnFailure {
    /// The task's own doing (its workdir does not exist, ...): a failure of the task.
    Task(String),
    /// dlaunch could not do its part (create the log directory, fork, bind): not the task's fault.
    Infrastructure(String),
    /// Another program listens on the port reserved for the process.
    PortInUse(u16),
}

/// What a process's logs have done so far, as its launcher saw them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogState {
    /// Bytes the process wrote to stdout and stderr, counted whether or not they were kept.
    pub stdout: u64,
    pub stderr: u64,
    /// Writing a log failed (a full disk): the output is being lost.
    pub error: Option<String>,
}

/// A process that left its task's process group (setsid, a daemon), with the task and attempt
/// its environment names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Escaped {
    pub pid: Pid,
    pub task_id: String,
    pub attempt: u32,
}

/// Something the driver must do, in this order.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Start a process; answer with `Machine::spawned`.
    Spawn {
        key: AttemptKey,
        process: u32,
        plan: Box<SpawnPlan>,
    },
    /// Send `signal` to the process group `pid` leads.
    Signal {
        pid: Pid,
        signal: i32,
    },
    /// Look for escaped processes and kill those `Machine::strays` names.
    SweepEscaped,
    /// The process was reaped and its group killed: close its logs (after what is still in
    /// flight) and stop watching it.
    Release {
        pid: Pid,
    },
    Report(Report),
}

/// A process this worker started (a task's process of one attempt), until it is reaped.
struct Child {
    key: AttemptKey,
    task_id: String,
    process: u32,
    placement: Placement,
    cpus: String,
    gpus: Vec<String>,
    start: SystemTime,
    deadline: Option<Instant>,
    timeout: Option<Duration>,
    kill: Option<Kill>,
}

/// dlaunch is ending this process: why, and when SIGKILL follows the polite signal.
struct Kill {
    ending: Ending,
    hard_at: Instant,
    hard_sent: bool,
}

/// A process placed and handed to the launcher, not yet known to have started.
struct Starting {
    key: AttemptKey,
    process: u32,
    running: Child,
}

pub struct Machine {
    rank: u32,
    host: String,
    job: Arc<Job>,
    placer: Placer,
    slots: Option<u32>,
    /// The memory this worker may hand out when a limit (SLURM, cgroup) is below its share.
    memory_cap: Option<u64>,
    /// False when the topology is not this machine's (loaded from XML): place, but do not bind.
    bind: bool,
    /// The worker's environment as every task inherits it (`env::inheritable`).
    inherited: BTreeMap<OsString, OsString>,
    datasets: BTreeMap<String, PathBuf>,
    /// What the orders of each template share (`Order::Template`), by template: at most one
    /// per template of the job.
    records: HashMap<u32, TemplateRecord>,
    /// Launch orders of processes that see each other's GPUs, until all of them are here.
    gathering: HashMap<AttemptKey, Vec<Launch>>,
    /// Processes placed and waiting for `Order::Start` (`Launch::hold`), their GPUs reserved.
    holding: HashMap<AttemptKey, Vec<(Launch, Placement)>>,
    /// Orders sent ahead of room (`Launch::prefetched`), in the order they came: the first
    /// starts as soon as a slot and its CPUs and GPUs are free.
    prefetched: VecDeque<Launch>,
    starting: Vec<Starting>,
    running: HashMap<Pid, Child>,
    /// Ends held back until this instant (see `OUTSIDE_STOP_WINDOW`).
    held: Vec<(ProcessEnd, Instant)>,
    last_sweep: Instant,
    effects: Vec<Effect>,
}

/// Who a worker is and what it has: the same for the machine and for the driver that makes it.
pub struct Setup {
    pub rank: u32,
    pub host: String,
    pub job: Arc<Job>,
    /// This rank's share of its node.
    pub topology: NodeTopology,
    pub slots: Option<u32>,
    /// The memory this worker may hand out when a limit (SLURM, cgroup) is below its share.
    pub memory_cap: Option<u64>,
}

impl Machine {
    /// `inherited`: the worker's own environment, the base of every task's.
    pub fn new(setup: Setup, inherited: Vec<(OsString, OsString)>, now: Instant) -> Self {
        let Setup { rank, host, job, topology, slots, memory_cap } = setup;
        let bind = topology.is_this_system;
        if !bind {
            log::warn!(
                "rank {rank}: the topology is not this machine's (HWLOC_XMLFILE): tasks are placed but not bound"
            );
        }
        Machine {
            rank,
            host,
            job,
            placer: Placer::new(topology),
            slots,
            memory_cap,
            bind,
            inherited: inheritable(inherited),
            datasets: BTreeMap::new(),
            records: HashMap::new(),
            gathering: HashMap::new(),
            holding: HashMap::new(),
            prefetched: VecDeque::new(),
            starting: Vec::new(),
            running: HashMap::new(),
            held: Vec::new(),
            last_sweep: now,
            effects: Vec::new(),
        }
    }

    /// Datasets staged on this node: name → local path.
    pub fn set_datasets(&mut self, datasets: BTreeMap<String, PathBuf>) {
        self.datasets = datasets;
    }

    pub fn hello(&self, addr: String) -> WorkerHello {
        let (cpus, gpus, memory) = self.placer.capacity();
        let memory = self.memory_cap.map_or(memory, |cap| if memory == 0 { cap } else { memory.min(cap) });
        let topo = self.placer.topology();
        let gpu_ids: Vec<&str> = topo.gpus.iter().map(|g| g.id.as_str()).collect();
        let description = format!(
            "{} slots, {cpus} CPUs ({}), {gpus} GPUs{}, {}",
            self.slots.map_or("unlimited".to_string(), |s| s.to_string()),
            cpu_list(&topo.allowed_cpus),
            if gpu_ids.is_empty() { String::new() } else { format!(" ({})", gpu_ids.join(",")) },
            format_size(memory)
        );
        let memory = if memory == 0 { u64::MAX } else { memory };
        WorkerHello {
            host: self.host.clone(),
            addr,
            capacity: Capacity { slots: self.slots.unwrap_or(u32::MAX), cpus, gpus, memory },
            description,
        }
    }

    pub fn busy(&self) -> bool {
        !self.running.is_empty() || !self.held.is_empty() || !self.holding.is_empty()
    }

    /// Whether no order could start anything here before a running process ends: the next
    /// order of every slot is here already (held, `Launch::prefetched`) and no process waits
    /// for the rest of its gang or for `Order::Start`. The driver may then sleep until a child
    /// ends instead of polling for orders (a worker's share of the wake-ups in a sweep).
    pub fn waits_for_an_end(&self) -> bool {
        !self.prefetched.is_empty() && !self.running.is_empty() && self.holding.is_empty() && self.gathering.is_empty()
    }

    /// The processes running now, for the driver to ask their launcher about.
    pub fn pids(&self) -> Vec<Pid> {
        self.running.keys().copied().collect()
    }

    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// Takes an order; returns false on `Exit`.
    pub fn order(&mut self, order: Order, now: Instant, wall: SystemTime) -> bool {
        match order {
            Order::Template(record) => self.remember(record),
            Order::Launch(mut launch) => {
                if !self.complete(&mut launch) {
                    self.refuse(*launch, wall);
                } else if launch.prefetched {
                    self.prefetched.push_back(*launch);
                    self.start_prefetched(now, wall);
                } else {
                    self.launch(*launch, now, wall);
                }
            }
            Order::Start { key, visible } => self.start_held(key, &visible, now, wall),
            Order::Stop { key } => {
                self.return_prefetched(|k| k == key);
                self.release_held(|k| k == key, Ending::Stopped, wall);
                self.kill_where(|r| r.key == key, Ending::Stopped, now);
            }
            Order::Recall { key } => self.return_prefetched(|k| k == key),
            Order::Interrupt => self.interrupt(now, wall),
            Order::Exit => return false,
            // The rank's loop acts on these itself (`run::worker_rank`); nothing for the machine.
            Order::Heartbeat | Order::GivenUp { .. } | Order::Received { .. } | Order::Restore(_) => {}
        }
        true
    }

    /// Stops every process: dlaunch is shutting down early. Processes that just died of the
    /// same stop, sent to them directly, count as interrupted too.
    pub fn interrupt(&mut self, now: Instant, wall: SystemTime) {
        self.return_prefetched(|_| true);
        self.release_held(|_| true, Ending::Interrupted, wall);
        self.kill_where(|_| true, Ending::Interrupted, now);
        for (mut end, _) in self.held.drain(..) {
            end.ending = Ending::Interrupted;
            self.effects.push(Effect::Report(Report::Ended(end)));
        }
    }

    fn kill_where(&mut self, matches: impl Fn(&Child) -> bool, ending: Ending, now: Instant) {
        let signal = self.job.stop_signal.number;
        let hard_at = now + self.job.grace;
        for (&pid, running) in self.running.iter_mut() {
            if matches(running) && running.kill.is_none() {
                self.effects.push(Effect::Signal { pid, signal });
                running.kill = Some(Kill { ending: ending.clone(), hard_at, hard_sent: false });
            }
        }
    }

    /// What the logs of `pid` have done: past `log_limit`, or unwritable, the process is stopped.
    pub fn logs(&mut self, pid: Pid, state: &LogState, now: Instant) {
        let Some(running) = self.running.get_mut(&pid) else { return };
        if running.kill.is_some() {
            return;
        }
        let ending = if let Some(error) = &state.error {
            Ending::Infrastructure { error: error.clone() }
        } else {
            let over = |size: u64| self.job.log_limit.is_some_and(|limit| size > limit);
            let stream = if over(state.stdout) {
                "stdout"
            } else if over(state.stderr) {
                "stderr"
            } else {
                return;
            };
            Ending::LogLimit { stream: stream.to_string(), limit: self.job.log_limit.unwrap_or_default() }
        };
        self.effects.push(Effect::Signal { pid, signal: self.job.stop_signal.number });
        running.kill = Some(Kill { ending, hard_at: now + self.job.grace, hard_sent: false });
    }

    /// Children of the worker ended. Not every child is a task: escaped descendants of tasks
    /// come back to the worker (a subreaper) too. Called on every poll, with nothing reaped
    /// too: room a process that failed to start left free goes to the next prefetched order.
    pub fn ended(&mut self, reaped: Vec<(Pid, Ending)>, now: Instant, wall: SystemTime) {
        let mut ends = Vec::new();
        for (pid, ending) in reaped {
            let Some(running) = self.running.remove(&pid) else {
                log::debug!("rank {}: reaped pid {pid}, not a task (an orphaned descendant)", self.rank);
                continue;
            };
            // Whatever the task left behind in its process group goes with it.
            self.effects.push(Effect::Signal { pid, signal: SIGKILL });
            self.placer.release(&running.placement);
            let outside_stop = running.kill.is_none() && died_of_a_stop_signal(&ending);
            let ending = running.kill.map_or(ending, |k| k.ending);
            let (key, process, start) = (running.key, running.process, Some(running.start));
            ends.push((pid, ended(key, process, running.cpus, running.gpus, ending, start, wall), outside_stop));
        }
        if ends.is_empty() {
            self.start_prefetched(now, wall);
            return;
        }
        // Escaped processes may hold the task's logs open: they go before the logs are closed.
        self.effects.push(Effect::SweepEscaped);
        self.last_sweep = now;
        let fault = ends.iter().any(|(_, end, _)| matches!(end.ending, Ending::Infrastructure { .. }));
        for (pid, end, outside_stop) in ends {
            self.effects.push(Effect::Release { pid });
            if outside_stop {
                self.held.push((end, now + OUTSIDE_STOP_WINDOW));
            } else {
                self.effects.push(Effect::Report(Report::Ended(end)));
            }
        }
        if fault {
            self.return_prefetched_after_fault();
        }
        self.start_prefetched(now, wall);
    }

    /// Time passes: deadlines, grace periods, held ends and the look for escaped processes.
    pub fn tick(&mut self, now: Instant) {
        let (due, held): (Vec<_>, Vec<_>) = self.held.drain(..).partition(|(_, until)| now >= *until);
        self.held = held;
        self.effects.extend(due.into_iter().map(|(end, _)| Effect::Report(Report::Ended(end))));
        let signal = self.job.stop_signal.number;
        for (&pid, running) in self.running.iter_mut() {
            match &mut running.kill {
                Some(kill) if !kill.hard_sent && now >= kill.hard_at => {
                    self.effects.push(Effect::Signal { pid, signal: SIGKILL });
                    kill.hard_sent = true;
                }
                Some(_) => {}
                None if running.deadline.is_some_and(|d| now >= d) => {
                    let ending = Ending::TimedOut { after_s: running.timeout.unwrap_or_default().as_secs() };
                    self.effects.push(Effect::Signal { pid, signal });
                    running.kill = Some(Kill { ending, hard_at: now + self.job.grace, hard_sent: false });
                }
                None => {}
            }
        }
        if now.duration_since(self.last_sweep) >= ORPHAN_CHECK_INTERVAL {
            self.last_sweep = now;
            self.effects.push(Effect::SweepEscaped);
        }
    }

    /// Of the escaped processes found, those whose attempt no longer runs here: to be killed.
    /// Processes without a task's `DLAUNCH_TASK_ID` never get here: they are not ours to judge
    /// (OpenMPI forks helpers too).
    pub fn strays(&self, found: &[Escaped]) -> Vec<Pid> {
        found
            .iter()
            .filter(|e| !self.running.contains_key(&e.pid))
            .filter(|e| !self.running.values().any(|r| r.task_id == e.task_id && r.key.attempt == e.attempt))
            .inspect(|e| {
                log::info!(
                    "rank {}: killing pid {}, left behind by task {} (attempt {})",
                    self.rank,
                    e.pid,
                    e.task_id,
                    e.attempt
                )
            })
            .map(|e| e.pid)
            .collect()
    }
}

fn ended(
    key: AttemptKey,
    process: u32,
    cpus: String,
    gpus: Vec<String>,
    ending: Ending,
    start: Option<SystemTime>,
    end: SystemTime,
) -> ProcessEnd {
    ProcessEnd { key, process, cpus, gpus, ending, start, end }
}

/// Killed by one of the signals that stop dlaunch, or a shell's exit status for that (128+n).
fn died_of_a_stop_signal(ending: &Ending) -> bool {
    match ending {
        Ending::Signaled { signal, .. } => STOP_SIGNALS.contains(signal),
        Ending::Exited { code } => *code > 128 && STOP_SIGNALS.contains(&(*code - 128)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn a_plan_moves_to_the_local_directory_with_its_variables() {
        let mut plan = SpawnPlan {
            task_id: "t".into(),
            attempt: 0,
            process: 0,
            command: "true".into(),
            workdir: "/jobs".into(),
            env: [("DLAUNCH_TASK_DIR", "/out/tasks/t"), ("DLAUNCH_OUTPUT_DIR", "/out"), ("HOME", "/home/u")]
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            output_dir: "/out".into(),
            log_dir: "/out/tasks/t/attempt-0".into(),
            share: Default::default(),
            log_limit: None,
            cpus: vec![],
            mem_nodes: vec![],
            ports: vec![],
            outputs: vec![],
        };
        rebase_plan(&mut plan, Path::new("/tmp/l"));
        assert_eq!(plan.output_dir, Path::new("/tmp/l"));
        assert_eq!(plan.log_dir, Path::new("/tmp/l/tasks/t/attempt-0"));
        assert_eq!(plan.workdir, Path::new("/jobs"));
        let env = |k: &str| plan.env[std::ffi::OsStr::new(k)].clone();
        assert_eq!(
            (env("DLAUNCH_TASK_DIR"), env("DLAUNCH_OUTPUT_DIR"), env("HOME")),
            ("/tmp/l/tasks/t".into(), "/tmp/l".into(), "/home/u".into())
        );
    }
}
