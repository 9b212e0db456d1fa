//! A worker: runs the processes the coordinator sends, each pinned to its own CPUs, memory and
//! GPUs, enforces timeouts and log limits, and reports how each process ended. No MPI here: the
//! rank loop in `run::worker_rank` moves orders in and reports out (rank 0 runs one in-process).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::env::{compose, placement_env};
use crate::events::{AttemptKey, Ending};
use crate::guard::Guard;
use crate::proc::{self, Binding, SpawnRequest};
use crate::sched::Capacity;
use crate::spec::{Job, format_size};
use crate::topo::{GpuVendor, NodeTopology, Placement, Placer, cpu_list};
use crate::wire::{Launch, Order, ProcessEnd, Report, WorkerHello};

/// Log sizes are checked this often: a stat per process is cheap, and a task writing 1 GB/s
/// overshoots its limit by at most ~100 MB.
const LOG_CHECK_INTERVAL: Duration = Duration::from_millis(100);

/// Escaped descendants of finished tasks are looked for this often.
const ORPHAN_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How long the end of a process that died of a stop signal dlaunch did not send is held back.
/// SLURM signals every process of a job step at once (scancel, the time limit, `--signal`
/// without `B:`): a task may die of the signal a moment before its rank learns that it has to
/// stop. Held, its end is reported as interrupted (run again on resume) when the stop comes
/// within this time, and as the failure it looks like otherwise.
const OUTSIDE_STOP_WINDOW: Duration = Duration::from_secs(2);

struct Running {
    key: AttemptKey,
    task_id: String,
    process: u32,
    placement: Option<Placement>,
    cpus: String,
    gpus: Vec<String>,
    start: SystemTime,
    deadline: Option<Instant>,
    timeout: Option<Duration>,
    log_dir: PathBuf,
    kill: Option<Kill>,
}

/// dlaunch is ending this process: why, and when SIGKILL follows the polite signal.
struct Kill {
    ending: Ending,
    hard_at: Instant,
    hard_sent: bool,
}

pub struct Worker {
    rank: u32,
    host: String,
    job: Arc<Job>,
    placer: Placer,
    slots: Option<u32>,
    /// The memory this worker may hand out when a limit (SLURM, cgroup) is below its share.
    memory_cap: Option<u64>,
    /// False when the topology is not this machine's (loaded from XML): place, but do not bind.
    bind: bool,
    inherited: Vec<(OsString, OsString)>,
    datasets: BTreeMap<String, PathBuf>,
    running: HashMap<Pid, Running>,
    /// Ends held back until this instant (see `OUTSIDE_STOP_WINDOW`).
    held: Vec<(ProcessEnd, Instant)>,
    reports: Vec<Report>,
    last_log_check: Instant,
    last_orphan_check: Instant,
    guard: Option<Guard>,
}

impl Worker {
    pub fn new(
        rank: u32,
        host: String,
        job: Arc<Job>,
        topology: NodeTopology,
        slots: Option<u32>,
        memory_cap: Option<u64>,
        guard: Option<Guard>,
    ) -> Self {
        let bind = topology.is_this_system;
        if !bind {
            log::warn!(
                "rank {rank}: the topology is not this machine's (HWLOC_XMLFILE): tasks are placed but not bound"
            );
        }
        Worker {
            rank,
            host,
            job,
            placer: Placer::new(topology),
            slots,
            memory_cap,
            bind,
            inherited: std::env::vars_os().collect(),
            datasets: BTreeMap::new(),
            running: HashMap::new(),
            held: Vec::new(),
            reports: Vec::new(),
            last_log_check: Instant::now(),
            last_orphan_check: Instant::now(),
            guard,
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
        !self.running.is_empty() || !self.held.is_empty()
    }

    pub fn take_reports(&mut self) -> Vec<Report> {
        std::mem::take(&mut self.reports)
    }

    /// Carries out an order; returns false on `Exit`.
    pub fn handle(&mut self, order: Order, now: Instant) -> bool {
        match order {
            Order::Launch(launch) => self.launch(*launch, now),
            Order::Stop { key } => self.kill_where(|r| r.key == key, Ending::Stopped, now),
            Order::Interrupt => self.interrupt(now),
            Order::Exit => return false,
        }
        true
    }

    /// Stops every process: dlaunch is shutting down early. Processes that just died of the
    /// same stop, sent to them directly, count as interrupted too.
    pub fn interrupt(&mut self, now: Instant) {
        self.kill_where(|_| true, Ending::Interrupted, now);
        for (mut end, _) in self.held.drain(..) {
            end.ending = Ending::Interrupted;
            self.reports.push(Report::Ended(end));
        }
    }

    fn launch(&mut self, launch: Launch, now: Instant) {
        let start = SystemTime::now();
        let want = launch.resources;
        let Some(placement) = self.placer.place(want.cpus, want.gpus) else {
            let (free_cpus, free_gpus) = self.placer.free();
            let error = format!(
                "rank {} has {free_cpus} free CPUs and {free_gpus} free GPUs, the task needs {} and {}",
                self.rank, want.cpus, want.gpus
            );
            self.report_end(&launch, String::new(), vec![], Ending::LaunchFailed { error }, None);
            return;
        };
        let gpus = self.placer.gpu_ids(&placement);
        let cpus = cpu_list(&placement.cpus);
        let amd = placement.gpus.iter().any(|&g| self.placer.topology().gpus[g].vendor == GpuVendor::Amd);
        let placed = placement_env(&cpus, &cpu_list(&placement.numa_nodes), &gpus, amd, want.cpus);
        let datasets: Vec<(String, String)> = launch
            .datasets
            .iter()
            .filter_map(|name| {
                let path = self.datasets.get(name)?;
                Some((crate::spec::dataset_env_var(name), path.to_string_lossy().into_owned()))
            })
            .collect();
        let env = compose(self.inherited.iter().cloned(), &[&placed, &datasets, &launch.env]);
        let binding = Binding {
            cpus: placement.cpus.clone(),
            mem_nodes: if self.placer.topology().numa_nodes.len() > 1 { placement.numa_nodes.clone() } else { vec![] },
        };
        let name = format!("dlaunch:{}", launch.task_id);
        let request = SpawnRequest {
            command: &launch.command,
            name: &name,
            workdir: &launch.workdir,
            env: &env,
            log_dir: &launch.log_dir,
            binding: (self.bind && !binding.cpus.is_empty()).then_some(&binding),
        };
        match proc::spawn(&request) {
            Ok(pid) => {
                if let Some(guard) = self.guard.as_mut() {
                    guard.watch(pid);
                }
                log::debug!(
                    "rank {}: started {} process {} as pid {pid} on CPUs {cpus}",
                    self.rank,
                    launch.task_id,
                    launch.process
                );
                self.running.insert(
                    pid,
                    Running {
                        key: launch.key,
                        task_id: launch.task_id.clone(),
                        process: launch.process,
                        placement: Some(placement),
                        cpus,
                        gpus,
                        start,
                        deadline: launch.timeout.map(|t| now + t),
                        timeout: launch.timeout,
                        log_dir: launch.log_dir,
                        kill: None,
                    },
                );
            }
            Err(e) => {
                self.placer.release(&placement);
                let error = format!("{e} (workdir {}, logs {})", launch.workdir.display(), launch.log_dir.display());
                self.report_end(&launch, cpus, gpus, Ending::LaunchFailed { error }, Some(start));
            }
        }
    }

    fn report_end(
        &mut self,
        launch: &Launch,
        cpus: String,
        gpus: Vec<String>,
        ending: Ending,
        start: Option<SystemTime>,
    ) {
        self.reports.push(Report::Ended(ProcessEnd {
            key: launch.key,
            process: launch.process,
            cpus,
            gpus,
            ending,
            start,
            end: SystemTime::now(),
        }));
    }

    fn kill_where(&mut self, matches: impl Fn(&Running) -> bool, ending: Ending, now: Instant) {
        let signal = Signal::try_from(self.job.stop_signal.number).unwrap_or(Signal::SIGTERM);
        let hard_at = now + self.job.grace;
        for (&pid, running) in self.running.iter_mut() {
            if matches(running) && running.kill.is_none() {
                proc::signal_group(pid, signal);
                running.kill = Some(Kill { ending: ending.clone(), hard_at, hard_sent: false });
            }
        }
    }

    /// Reaps ended processes and enforces deadlines, grace periods and log limits.
    pub fn poll(&mut self, now: Instant) {
        let reaped = proc::reap();
        let task_ended = reaped.iter().any(|(pid, _)| self.running.contains_key(pid));
        for (pid, ending) in reaped {
            let Some(running) = self.running.remove(&pid) else {
                log::debug!("rank {}: reaped pid {pid}, not a task (an orphaned descendant)", self.rank);
                continue;
            };
            // Whatever the task left behind in its process group goes with it.
            proc::signal_group(pid, Signal::SIGKILL);
            if let Some(guard) = self.guard.as_mut() {
                guard.forget(pid);
            }
            if let Some(placement) = &running.placement {
                self.placer.release(placement);
            }
            let outside_stop = running.kill.is_none() && died_of_a_stop_signal(&ending);
            let end = ProcessEnd {
                key: running.key,
                process: running.process,
                cpus: running.cpus,
                gpus: running.gpus,
                ending: running.kill.map_or(ending, |k| k.ending),
                start: Some(running.start),
                end: SystemTime::now(),
            };
            if outside_stop {
                self.held.push((end, now + OUTSIDE_STOP_WINDOW));
            } else {
                self.reports.push(Report::Ended(end));
            }
        }
        let (due, held): (Vec<_>, Vec<_>) = self.held.drain(..).partition(|(_, until)| now >= *until);
        self.held = held;
        self.reports.extend(due.into_iter().map(|(end, _)| Report::Ended(end)));
        let signal = Signal::try_from(self.job.stop_signal.number).unwrap_or(Signal::SIGTERM);
        let check_logs = now.duration_since(self.last_log_check) >= LOG_CHECK_INTERVAL;
        if check_logs {
            self.last_log_check = now;
        }
        if task_ended || now.duration_since(self.last_orphan_check) >= ORPHAN_CHECK_INTERVAL {
            self.last_orphan_check = now;
            self.kill_escaped();
        }
        for (&pid, running) in self.running.iter_mut() {
            match &mut running.kill {
                Some(kill) if !kill.hard_sent && now >= kill.hard_at => {
                    proc::signal_group(pid, Signal::SIGKILL);
                    kill.hard_sent = true;
                }
                Some(_) => {}
                None => {
                    let ending = if running.deadline.is_some_and(|d| now >= d) {
                        Some(Ending::TimedOut { after_s: running.timeout.unwrap_or_default().as_secs() })
                    } else if check_logs {
                        self.job.log_limit.and_then(|limit| log_overflow(&running.log_dir, limit))
                    } else {
                        None
                    };
                    if let Some(ending) = ending {
                        proc::signal_group(pid, signal);
                        running.kill = Some(Kill { ending, hard_at: now + self.job.grace, hard_sent: false });
                    }
                }
            }
        }
    }

    /// Processes that left their task's process group (setsid, daemons) are reparented to this
    /// worker, a subreaper; those that belong to a task that has ended are killed. Children
    /// without a task's `DLAUNCH_TASK_ID` are not ours to judge: OpenMPI forks helpers too.
    pub fn kill_escaped(&mut self) {
        let guard = self.guard.as_ref().and_then(Guard::pid);
        for pid in proc::children() {
            if self.running.contains_key(&pid) || Some(pid) == guard {
                continue;
            }
            let Some((id, attempt)) = proc::task_of(pid) else { continue };
            if !self.running.values().any(|r| r.task_id == id && r.key.attempt == attempt) {
                log::info!("rank {}: killing pid {pid}, left behind by task {id} (attempt {attempt})", self.rank);
                proc::signal_group(pid, Signal::SIGKILL);
                let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            }
        }
    }
}

fn log_overflow(log_dir: &std::path::Path, limit: u64) -> Option<Ending> {
    ["stdout", "stderr"].into_iter().find_map(|stream| {
        let size = std::fs::metadata(log_dir.join(stream)).map(|m| m.len()).unwrap_or(0);
        (size > limit).then(|| Ending::LogLimit { stream: stream.to_string(), limit })
    })
}

/// Killed by one of the signals that stop dlaunch, or a shell's exit status for that (128+n).
fn died_of_a_stop_signal(ending: &Ending) -> bool {
    let stop = |n: i32| crate::signals::STOP_SIGNALS.iter().any(|&s| s as i32 == n);
    match ending {
        Ending::Signaled { signal, .. } => stop(*signal),
        Ending::Exited { code } => *code > 128 && stop(*code - 128),
        _ => false,
    }
}
