//! The coordinator's decisions, free of MPI and processes: given what workers report and how
//! much time is left, what to start, stop, retry and record. The shell (`coordinator`) feeds it
//! messages and carries out its effects; tests drive it directly.

mod ending;
mod faults;
mod prefetch;
mod waiting;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::deps::Deps;
use crate::env::{AttemptEnv, Entry, Site, by_name, owned, wait_line};
use crate::events::{Assigned, AttemptKey, AttemptStatus, Ending, Event, ProcessResult};
use crate::layout;
use crate::ledger::{Ledger, Resume};
use crate::plan::Task;
use crate::sched::{Capacity, Demand, PortBook, Scheduler, first_port};
use crate::spec::{GangSuccess, GpuVisibility, Job, Resources, TaskTemplate};
use crate::wire::{Launch, Leased, Order, ProcessEnd, TemplateRecord, WorkerHello};

/// Something the shell must do.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    Send { rank: u32, order: Order },
    Record(Event),
}

/// A task that the workers of this allocation could never run.
#[derive(Debug, thiserror::Error)]
pub enum Unfit {
    /// `layout = "flat"`: no set of workers has room for it.
    #[error(
        "task {task} needs {need} per process ({processes} processes), but no worker set of this allocation has room for it; the largest worker has {largest}"
    )]
    Flat { task: String, need: String, processes: u32, largest: String },
    /// `layout = "nodes"`: no one node has room for all of its processes.
    #[error(
        "task {task} needs {need} per process ({processes} processes), but no node of this allocation has room for all of them: layout = \"nodes\" runs each task within one node, and the largest node has {largest}; use layout = \"flat\" for tasks that span nodes"
    )]
    Node { task: String, need: String, processes: u32, largest: String },
}

/// What each process of `template`'s tasks needs, for [`Unfit`]: "4 CPUs, 1 GPUs, 16 GiB".
pub(crate) fn need_of(template: &TaskTemplate) -> String {
    let r = &template.resources;
    format!("{} CPUs, {} GPUs, {}", r.cpus, r.gpus, crate::spec::format_size(r.memory))
}

/// How often a task may lose its worker before it counts as failed: a task that kills its
/// worker (e.g. by exhausting the node's memory) must not take down one worker after another.
const MAX_WORKER_LOSSES: u32 = 2;

/// How often an attempt may find its port taken by another program before the task fails: the
/// next attempt gets the next ports of the range, so only a range taken all over gets there.
const MAX_PORT_CONFLICTS: u32 = 8;

/// Time beyond the grace period for workers to report interrupted processes.
const STOP_SLACK: Duration = Duration::from_secs(30);

/// How often a queued task may be overtaken by later ones that fit (`sched`).
fn backfill_limit(workers: usize) -> u32 {
    (2 * workers as u32).max(8)
}

/// A started attempt of a task: where each of its processes runs, and how they have ended.
#[derive(Debug)]
struct Attempt {
    sites: Vec<Site>,
    results: Vec<Option<ProcessResult>>,
    host_of: Vec<usize>,
    successes: u32,
    completed: bool,
    /// The first process failure: (process, ending).
    failure: Option<(u32, Ending)>,
    /// Stopped at a user's request: recorded as cancelled however its processes end.
    cancelled: bool,
    /// Processes that see each other's GPUs across worker ranks of one host (one group per
    /// host), held after placement until every one of the group reported its GPUs.
    held: Vec<Vec<u32>>,
    /// The GPUs each held process was placed on, as reported.
    placed: BTreeMap<u32, Vec<String>>,
    /// Where its task's record is in the ledger, looked up once when it started.
    ledger_at: Option<usize>,
}

pub struct Control {
    job: Arc<Job>,
    tasks: Arc<Vec<Task>>,
    demands: Vec<Demand>,
    sched: Scheduler,
    ports: PortBook,
    host_names: Vec<Arc<str>>,
    /// rank → (host index, address).
    workers: BTreeMap<u32, (usize, Arc<str>)>,
    last_heard: HashMap<u32, Instant>,
    lost: BTreeSet<u32>,
    ledger: Ledger,
    running: BTreeMap<AttemptKey, Attempt>,
    /// Prefetched attempts (`[job] prefetch`): sent, held by their worker, not started yet.
    held: BTreeMap<AttemptKey, prefetch::Held>,
    /// Per worker rank, how many prefetched attempts it holds.
    held_on: prefetch::HeldBy,
    /// How long rank 0 may leave reports unread (`prefetch::Pace`).
    pace: prefetch::Pace,
    /// Per worker rank, what prefetched processes it started hold that the scheduler could not
    /// count yet: the end that freed their room is still on its way (see `prefetch::settle`).
    owed: HashMap<u32, Capacity>,
    /// Tasks that wait for others to succeed, and who waits for whom.
    deps: Deps,
    worker_losses: HashMap<usize, u32>,
    port_conflicts: HashMap<usize, u32>,
    stopping: Option<String>,
    /// Dispatching stopped because dlaunch itself failed (a full disk): what runs may finish.
    halted: Option<String>,
    /// Said once: the port range ran out on some host.
    ports_exhausted: bool,
    /// The queued task last recorded as holding the queue (its backfill budget used up).
    queue_held: Option<usize>,
    /// Workers that have not reported their interrupted processes by then are given up on.
    stop_deadline: Option<Instant>,
    /// Set when nothing runs and nothing queued can start in the time left.
    stalled: bool,
    /// A node's leader (`for_node`): the leased tasks no worker of its node can run any more,
    /// to hand back to rank 0 instead of failing them; `None` for the flat coordinator.
    handed_back: Option<Vec<u32>>,
    /// A node's leader: per template, whether its tasks need more than the time left, as last
    /// seen (`hand_back_late`).
    late: Vec<bool>,
    /// Templates `late` came to set since rank 0 was last told (`take_newly_late`).
    newly_late: Vec<u32>,
    /// Per template, what its orders share (made from its first order), once one started.
    records: Vec<Option<Arc<TemplateRecord>>>,
    /// Per template, the permutation that sorted its last process environment by name
    /// (`env::by_name`).
    name_orders: Vec<Vec<usize>>,
    /// Per template, its matrix parameters' variable names (`env::param_names`).
    param_names: Arc<Vec<Vec<String>>>,
    /// Per template, a bit per worker rank that got its record: workers keep them for the
    /// whole run. Bits rather than a set of pairs: this is asked for every process started.
    recorded: Vec<Vec<u64>>,
    effects: Vec<Effect>,
}

impl Control {
    /// Sets up a run: checks every task fits somewhere, records the run's start and queues
    /// `resume.to_run`. `ledger` holds what earlier runs recorded (empty for a fresh run).
    pub fn new(
        job: Arc<Job>,
        tasks: Arc<Vec<Task>>,
        workers: &[(u32, WorkerHello)],
        ledger: Ledger,
        resume: &Resume,
        mut run_started: Event,
        now: Instant,
    ) -> Result<Self, Unfit> {
        let mut control = Control::with_workers(job, tasks, workers, ledger, now);
        // Recorded so that `status --explain` can tell when a task holds the queue.
        if let Event::RunStarted { backfill_limit: recorded, .. } = &mut run_started {
            *recorded = Some(backfill_limit(workers.len()));
        }
        control.sched.reserve(control.tasks.len());
        control.check_fit(resume)?;
        control.record(run_started);
        for (rank, hello) in workers {
            control.record(Event::WorkerJoined { rank: *rank, host: hello.host.clone(), capacity: hello.capacity });
        }
        control.ledger.reserve(resume.defined.len());
        let (job, tasks) = (Arc::clone(&control.job), Arc::clone(&control.tasks));
        for event in crate::ledger::definitions(&job, &tasks, resume) {
            control.record(event);
        }
        control.queue_resumed(resume);
        Ok(control)
    }

    /// A node's leader in `layout = "nodes"`: coordinates that node's `workers` over the tasks
    /// rank 0 leases it (`Control::lease`). Rank 0 records the run, its workers and its tasks,
    /// checks that each fits a node and holds the dependencies; this records attempts only.
    pub fn for_node(job: Arc<Job>, tasks: Arc<Vec<Task>>, workers: &[(u32, WorkerHello)], now: Instant) -> Self {
        let mut control = Control::with_workers(job, tasks, workers, Ledger::default(), now);
        control.handed_back = Some(Vec::new());
        control
    }

    /// A node's leader: leased tasks that no worker of the node can run any more (it lost the
    /// ones they need), taken out of its queue, for rank 0 to lease elsewhere.
    pub fn take_handed_back(&mut self) -> Vec<u32> {
        self.handed_back.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Runs `leased`, after what is queued: each task's attempts go on from the number given
    /// (rank 0 holds the journal of earlier runs).
    /// A lease that crossed the loss of a worker its tasks need hands them back at once.
    pub fn lease(&mut self, leased: &[Leased]) {
        let tasks = Arc::clone(&self.tasks);
        for &Leased { task, attempt } in leased {
            let Some(t) = tasks.get(task as usize) else {
                log::warn!("rank 0 leased task {task}, which this job does not have");
                continue;
            };
            self.ledger.continue_after(&t.id, attempt);
            self.queue(t.index, t.template);
        }
    }

    /// Queues `index` to run (again). A node's leader hands back instead what its node can no
    /// longer run or finish in the time left: rank 0 has other nodes, or a later allocation.
    fn queue(&mut self, index: usize, template: usize) {
        if let Some(back) = self.handed_back.as_mut()
            && (self.late[template] || !self.sched.fits_when_idle(&self.demands[template]))
        {
            back.push(index as u32);
            return;
        }
        self.sched.enqueue(index, template);
    }

    /// A node's leader: the templates whose tasks came to need more than the time left since
    /// last asked, for rank 0, whose clock may be behind, to lease no more of them.
    pub fn take_newly_late(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.newly_late)
    }

    /// A node's leader: whether there are tasks handed back or templates found late that rank
    /// 0 has not been told of (`take_handed_back`, `take_newly_late`).
    pub fn has_news_for_rank_0(&self) -> bool {
        self.handed_back.as_ref().is_some_and(|back| !back.is_empty()) || !self.newly_late.is_empty()
    }

    /// A node's leader: hands back the queued tasks of the templates `back` names (no longer
    /// fitting the node, or the time left), leaving the queue's order and holds as they are.
    /// True when it handed back any.
    fn hand_back(&mut self, back: impl Fn(usize) -> bool) -> bool {
        let Some(handed) = self.handed_back.as_mut() else { return false };
        let tasks: Vec<usize> = self.sched.queued().filter(|&i| back(self.tasks[i].template)).collect();
        for &index in &tasks {
            self.sched.remove(index);
            handed.push(index as u32);
        }
        !tasks.is_empty()
    }

    /// A node's leader: hands back queued tasks that can no longer finish in the time left
    /// (rank 0 leases no more of them), once per template that comes to need more.
    fn hand_back_late(&mut self, time_left: Option<Duration>) {
        let Some(left) = time_left else { return };
        let late: Vec<bool> = self.demands.iter().map(|d| d.time_needed.is_some_and(|needed| needed > left)).collect();
        if self.handed_back.is_none() || late == self.late {
            return;
        }
        self.hand_back(|template| late[template]);
        let newly = late.iter().zip(&self.late).enumerate().filter(|(_, (now, before))| **now && !**before);
        self.newly_late.extend(newly.map(|(template, _)| template as u32));
        self.late = late;
    }

    /// Tasks queued here, not started (nor sent ahead to a worker).
    pub fn queued(&self) -> usize {
        self.sched.queue_len()
    }

    /// The state every run starts from: `workers` known and healthy, nothing recorded or queued.
    fn with_workers(
        job: Arc<Job>,
        tasks: Arc<Vec<Task>>,
        workers: &[(u32, WorkerHello)],
        ledger: Ledger,
        now: Instant,
    ) -> Self {
        let demands: Vec<Demand> = job.templates.iter().map(demand).collect();
        let mut control = Control {
            demands,
            sched: Scheduler::new(backfill_limit(workers.len())),
            ports: PortBook::new(job.master_ports, first_port(job.master_ports, &job.output_dir.to_string_lossy())),
            host_names: Vec::new(),
            workers: BTreeMap::new(),
            last_heard: HashMap::new(),
            lost: BTreeSet::new(),
            ledger,
            running: BTreeMap::new(),
            held: BTreeMap::new(),
            held_on: prefetch::HeldBy::default(),
            pace: prefetch::Pace::default(),
            owed: HashMap::new(),
            deps: Deps::new(&tasks),
            worker_losses: HashMap::new(),
            port_conflicts: HashMap::new(),
            stopping: None,
            halted: None,
            ports_exhausted: false,
            queue_held: None,
            stop_deadline: None,
            stalled: false,
            handed_back: None,
            late: vec![false; job.templates.len()],
            newly_late: Vec::new(),
            records: vec![None; job.templates.len()],
            name_orders: vec![Vec::new(); job.templates.len()],
            param_names: Arc::new(job.templates.iter().map(crate::env::param_names).collect()),
            recorded: vec![Vec::new(); job.templates.len()],
            effects: Vec::new(),
            job,
            tasks,
        };
        let mut host_index: HashMap<&str, usize> = HashMap::new();
        for (rank, hello) in workers {
            let host = *host_index.entry(&hello.host).or_insert_with(|| {
                control.host_names.push(Arc::from(hello.host.as_str()));
                control.host_names.len() - 1
            });
            control.workers.insert(*rank, (host, Arc::from(hello.addr.as_str())));
            control.last_heard.insert(*rank, now);
            control.sched.add_worker(*rank, host, hello.capacity);
            control.held_on.add_worker(*rank);
        }
        control
    }

    fn check_fit(&self, resume: &Resume) -> Result<(), Unfit> {
        let mut checked = BTreeSet::new();
        for &index in &resume.to_run {
            let template = self.tasks[index].template;
            if !checked.insert(template) || self.sched.fits_when_idle(&self.demands[template]) {
                continue;
            }
            let t = &self.job.templates[template];
            let largest = self.sched.largest_worker().map_or("no workers at all".to_string(), |w| {
                format!(
                    "{} slots, {} CPUs, {} GPUs, {} (rank {})",
                    if w.capacity.slots == u32::MAX { "unlimited".to_string() } else { w.capacity.slots.to_string() },
                    w.capacity.cpus,
                    w.capacity.gpus,
                    crate::spec::format_size(w.capacity.memory),
                    w.rank
                )
            });
            return Err(Unfit::Flat { task: t.name.clone(), need: need_of(t), processes: t.processes, largest });
        }
        Ok(())
    }

    /// Every worker rank of the run, lost ones too.
    pub fn worker_ranks(&self) -> impl Iterator<Item = u32> + '_ {
        self.workers.keys().copied()
    }

    pub fn heartbeat_timeout(&self) -> Duration {
        self.job.heartbeat_timeout
    }

    /// Worker ranks given up on (silent or dead).
    pub fn lost_workers(&self) -> &BTreeSet<u32> {
        &self.lost
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// Why dispatching stopped early, if it did.
    pub fn stopping(&self) -> Option<&str> {
        self.stopping.as_deref().or(self.halted.as_deref())
    }

    /// Done: nothing runs, and either dispatching stopped or nothing queued can start.
    pub fn finished(&self) -> bool {
        self.running.is_empty()
            && self.held.is_empty()
            && (self.stopping().is_some() || (self.sched.queue_len() == 0 && self.deps.waiting() == 0) || self.stalled)
    }

    /// Queued tasks that did not run (interrupted runs, walltime), and those waiting for them.
    pub fn not_started(&self) -> usize {
        self.sched.queue_len() + self.deps.waiting()
    }

    /// Applies `event` and queues it for the journal, after what is already queued.
    pub fn record(&mut self, event: Event) {
        self.ledger.apply(&event);
        self.effects.push(Effect::Record(event));
    }

    /// [`Control::record`] for an event about the task whose ledger record is at `at`, when
    /// it had one: an attempt looks its task up once, not once per event.
    fn record_at(&mut self, at: Option<usize>, event: Event) {
        match at {
            Some(at) => self.ledger.apply_at(at, &event),
            None => self.ledger.apply(&event),
        }
        self.effects.push(Effect::Record(event));
    }

    fn send(&mut self, rank: u32, order: Order) {
        self.effects.push(Effect::Send { rank, order });
    }

    /// Starts what fits now. `time_left`: the allocation's remaining time, when known.
    pub fn dispatch(&mut self, time_left: Option<Duration>, now: SystemTime) {
        if self.stopping().is_some() {
            return;
        }
        self.hand_back_late(time_left);
        let started = self.start_what_fits(time_left, now);
        self.prefetch(time_left, now);
        // Failing what can never run (a gang that lost its room) may free the queue for the rest.
        self.stalled = !started
            && self.running.is_empty()
            && self.held.is_empty()
            && (self.sched.queue_len() > 0 || self.deps.waiting() > 0)
            && !(self.fail_unrunnable() && self.start_what_fits(time_left, now));
        self.note_queue_hold(now);
    }

    /// Records the task that came to hold the queue, once per time it does.
    fn note_queue_hold(&mut self, now: SystemTime) {
        let holder = self.sched.holder();
        if holder.map(|(task, _)| task) == self.queue_held {
            return;
        }
        self.queue_held = holder.map(|(task, _)| task);
        if let Some((index, overtaken)) = holder {
            let task = self.tasks[index].id.clone();
            self.record(Event::QueueHeld { task, overtaken, time: now });
        }
    }

    fn start_what_fits(&mut self, time_left: Option<Duration>, now: SystemTime) -> bool {
        self.recall_stuck();
        let dispatches = self.sched.dispatch(&self.demands, time_left);
        let mut started = false;
        for dispatch in dispatches {
            started |= self.start(dispatch.task, &dispatch.ranks, now, false);
        }
        started
    }

    /// Starts an attempt on `ranks`, or with `prefetched` sends it to be held on `ranks[0]`
    /// (see `prefetch`); false when it has to wait for ports after all.
    fn start(&mut self, index: usize, ranks: &[u32], now: SystemTime, prefetched: bool) -> bool {
        let (job, tasks) = (Arc::clone(&self.job), Arc::clone(&self.tasks));
        let task = &tasks[index];
        let template = &job.templates[task.template];
        let ledger_at = self.ledger.position_at_or_find(index, &task.id);
        let attempt = ledger_at.map_or(0, |at| self.ledger.at(at).attempts);
        let Some(ports) = self.reserve_ports(ranks, template) else {
            if !self.ports_exhausted {
                log::warn!("master_ports has no free port left on a host; tasks wait until ports free up");
                self.ports_exhausted = true;
            }
            // A prefetched attempt took no room: the scheduler never counted it.
            for (process, &rank) in ranks.iter().enumerate().filter(|_| !prefetched) {
                self.sched.release(rank, &template.resources_of(process as u32));
            }
            self.sched.requeue_front(index, task.template);
            return false;
        };
        let host_of: Vec<usize> = ports.iter().map(|(host, _)| *host).collect();
        let sites: Vec<Site> = ranks
            .iter()
            .zip(ports)
            .map(|(&rank, (host, mut reserved))| {
                let addr = self.workers.get(&rank).map_or_else(|| Arc::from(""), |(_, a)| Arc::clone(a));
                let port = reserved.remove(0);
                Site { rank, host: Arc::clone(&self.host_names[host]), addr, port, labelled: reserved }
            })
            .collect();
        let key = AttemptKey { task: index as u32, attempt };
        let processes: Vec<Assigned> = sites
            .iter()
            .map(|s| Assigned {
                rank: s.rank,
                host: String::from(&*s.host),
                resources: template.resources,
                ports: std::iter::once(s.port).chain(s.labelled.iter().copied()).collect(),
            })
            .collect();
        // A prefetched attempt goes on record when its worker starts it (`prefetch::started`).
        let assigned = if prefetched {
            processes
        } else {
            self.record_at(ledger_at, Event::AttemptStarted { task: task.id.clone(), attempt, time: now, processes });
            Vec::new()
        };
        let groups = gpu_groups(template, &sites);
        let names = Arc::clone(&self.param_names);
        let contract = AttemptEnv::new(&job, task, template, &names[task.template], attempt, &sites);
        let env_of = |process: usize| -> Vec<Entry<'_>> {
            let mut env = contract.process(process);
            env.extend(crate::compat::all(&job, task, template, &sites, process).into_iter().map(owned));
            env
        };
        // The template's first attempt makes its record: only then are all of its processes'
        // environments needed at once (a 512-process gang's hold megabytes of `TF_CONFIG`).
        let record = Arc::clone(self.records[task.template].get_or_insert_with(|| {
            let envs: Vec<_> = (0..sites.len()).map(env_of).collect();
            Arc::new(TemplateRecord::new(task.template as u32, &envs))
        }));
        let mut name_order = std::mem::take(&mut self.name_orders[task.template]);
        for (process, site) in sites.iter().enumerate() {
            let p = process as u32;
            let (gpu_mates, hold) = gpu_mates(&groups, &sites, p);
            let log_dir = contract.log_dir(p);
            let mut command = task.command_of(template, p).to_string();
            if let Some(role) = template.role_of(p).map(|r| &template.roles[r])
                && let Some(waited) = role.wait_for
            {
                command = format!(
                    "{}{command}",
                    wait_line(
                        &template.roles[waited],
                        role.wait_timeout,
                        &layout::log_dir_in_task(attempt, p, template.processes),
                    )
                );
            }
            // Before the worker's first order of the template, in the same batch at the latest:
            // MPI keeps the order of messages between two ranks.
            if self.note_recorded(site.rank, task.template) {
                self.send(site.rank, Order::Template(TemplateRecord::clone(&record)));
            }
            let mut full = env_of(process);
            let (env, unset) = record.split(by_name(&mut full, &mut name_order));
            let launch = Launch {
                key,
                template: task.template as u32,
                task_id: task.id.clone(),
                process: p,
                command,
                workdir: template.workdir.clone(),
                env,
                unset,
                resources: template.resources_of(p),
                timeout: template.timeout,
                log_dir,
                datasets: template.datasets.clone(),
                ports: [site.port].into_iter().chain(site.labelled.iter().copied()).collect(),
                gpu_mates,
                hold,
                outputs: if p == 0 { template.outputs.clone() } else { Vec::new() },
                prefetched,
            };
            self.effects.push(Effect::Send { rank: site.rank, order: Order::Launch(Box::new(launch)) });
        }
        self.name_orders[task.template] = name_order;
        let n = sites.len();
        let held = groups.into_iter().filter(|g| !on_one_rank(&sites, g)).collect();
        let run = Attempt {
            sites,
            results: vec![None; n],
            host_of,
            successes: 0,
            completed: false,
            failure: None,
            cancelled: false,
            held,
            placed: BTreeMap::new(),
            ledger_at,
        };
        if prefetched {
            self.hold(key, ranks[0], run, assigned);
        } else {
            self.running.insert(key, run);
        }
        true
    }

    /// Notes that worker `rank` has `template`'s record; false when it had it already.
    fn note_recorded(&mut self, rank: u32, template: usize) -> bool {
        let ranks = &mut self.recorded[template];
        let (word, bit) = (rank as usize / 64, 1u64 << (rank % 64));
        if ranks.len() <= word {
            ranks.resize(word + 1, 0);
        }
        let new = ranks[word] & bit == 0;
        ranks[word] |= bit;
        new
    }

    /// For each process, on its worker's host: its port, then one per label of its role's
    /// `ports`. All or none.
    fn reserve_ports(&mut self, ranks: &[u32], template: &TaskTemplate) -> Option<Vec<(usize, Vec<u16>)>> {
        let mut reserved: Vec<(usize, Vec<u16>)> = Vec::with_capacity(ranks.len());
        for (process, &rank) in ranks.iter().enumerate() {
            let host = self.workers.get(&rank).map_or(0, |(h, _)| *h);
            let labels = template.role_of(process as u32).map_or(0, |r| template.roles[r].ports.len());
            let mut mine = Vec::with_capacity(1 + labels);
            while mine.len() <= labels {
                match self.ports.take(host) {
                    Some(port) => mine.push(port),
                    None => {
                        reserved.push((host, mine));
                        for (h, ports) in reserved {
                            ports.into_iter().for_each(|p| self.ports.give(h, p));
                        }
                        return None;
                    }
                }
            }
            reserved.push((host, mine));
        }
        Some(reserved)
    }

    /// Final counts over the tasks of this job file: (succeeded, failed, not run).
    pub fn counts(&self) -> (usize, usize, usize) {
        let c = self.ledger.counts(&self.tasks);
        (c.succeeded, c.failed, c.not_run)
    }
}

pub(crate) fn demand(template: &TaskTemplate) -> Demand {
    Demand { groups: template.groups(), time_needed: template.time_needed() }
}

/// With `gpu_visibility = "task"`: per host, the processes of the attempt there that have
/// GPUs, in rank order, where there are several.
fn gpu_groups(template: &TaskTemplate, sites: &[Site]) -> Vec<Vec<u32>> {
    if template.gpu_visibility != GpuVisibility::Task {
        return Vec::new();
    }
    let mut groups: Vec<(&str, Vec<u32>)> = Vec::new();
    for p in (0..sites.len() as u32).filter(|&p| template.resources_of(p).gpus > 0) {
        let host = &*sites[p as usize].host;
        match groups.iter_mut().find(|(h, _)| *h == host) {
            Some((_, group)) => group.push(p),
            None => groups.push((host, vec![p])),
        }
    }
    groups.into_iter().map(|(_, group)| group).filter(|g| g.len() > 1).collect()
}

fn on_one_rank(sites: &[Site], group: &[u32]) -> bool {
    group.iter().all(|&p| sites[p as usize].rank == sites[group[0] as usize].rank)
}

/// What `process`'s worker is told about the processes it shares GPUs with: those of its
/// host's group on the same worker rank (placed together there), and whether others of the
/// group run on other ranks of the host, so that it has to wait for their GPUs (`hold`).
fn gpu_mates(groups: &[Vec<u32>], sites: &[Site], process: u32) -> (Vec<u32>, bool) {
    let Some(group) = groups.iter().find(|g| g.contains(&process)) else {
        return (Vec::new(), false);
    };
    let rank = sites[process as usize].rank;
    let local: Vec<u32> = group.iter().copied().filter(|&p| sites[p as usize].rank == rank).collect();
    let hold = local.len() < group.len();
    (if local.len() > 1 { local } else { Vec::new() }, hold)
}

#[cfg(test)]
mod tests;
