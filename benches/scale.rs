//! The coordinator's core at cluster scale, without MPI or processes: simulated workers (one
//! GPU each, 8 to a node) say hello, a long queue of tasks (1-GPU single processes, 8-process
//! gangs with `processes_per_node = 8`, a few 512-process gangs) is dispatched, and processes
//! end one at a time in random order, each end followed by a dispatch, as rank 0's loop does
//! when reports trickle in. Reports time per scheduling decision (a task started), per finished
//! task (both in CPU time of the simulating thread), memory per queued task (a counting
//! allocator) and bytes per Launch order; then the
//! same queue and workers through `sched::Scheduler` alone, the decision without the orders,
//! environments and journal events `Control` builds for it.
//!
//!     cargo bench --bench scale -- [WORKERS:TASKS ...] [--budget SECONDS] [--batch ENDS] [--prefetch K]
//!     cargo bench --bench scale -- --nodes [NODES:TASKS ...] [--budget SECONDS] [--batch ENDS]
//!
//! `--nodes` measures rank 0 in the node layout (`layout = "nodes"`, `lease::Broker`) instead:
//! NODES nodes of 8 one-GPU workers, TASKS one-GPU tasks; each node's leader asks for 16 tasks
//! when it holds fewer than 8 unstarted, and sends the journal lines of its attempts (encoded
//! as the journal writes them) in a batch every `--batch` ends (default 8); tasks end in random
//! order across all nodes. Rank 0's CPU per task: decoding the lines, `from_node`, `node_said`
//! and the leases it makes. Default sizes: 1000:1000000 10000:1000000.
//!
//! `--prefetch K` is the job's `prefetch` (default 2, as in a job file): the simulated workers
//! hold the orders sent ahead and start the first the moment one of their processes ends.
//!
//! Default sizes: 1000:100000 10000:1000000 100000:1000000, 60 s each. A size stops at its
//! budget and reports what it reached; a single dispatch call that runs past it (the first
//! one fills every worker) is reported as stuck and the bench moves on to the next size.
mod common;
#[path = "scale/node_layout.rs"]
mod node_layout;

/// A job file the bench generated, as dlaunch reads it.
fn parse_job(text: &str) -> Result<Arc<dlaunch_core::spec::Job>, dlaunch_core::spec::SpecErrors> {
    let job = dlaunch_core::spec::parse(Path::new("/tmp/scale/job.toml"), text.as_bytes(), &dlaunch::jobfile::FsProbe)?;
    Ok(Arc::new(job))
}

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use dlaunch_core::control::{Control, Effect};
use dlaunch_core::events::{AttemptKey, Ending};
use dlaunch_core::ledger::{Ledger, decide_resume};
use dlaunch_core::plan::Task;
use dlaunch_core::sched::{Capacity, Demand, Scheduler};
use dlaunch_core::spec::{DEFAULT_PREFETCH, Job, Resources};
use dlaunch_core::wire::{self, Order, ProcessEnd, TemplateRecord, WorkerHello};

/// Counts live heap bytes and allocations, for memory per queued task.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const WORKERS_PER_NODE: u32 = 8;
/// Silence beyond the budget after which a size counts as stuck.
const GRACE: Duration = Duration::from_secs(300);
/// Launch orders encoded per task class to measure bytes per order (encoding all would time JSON).
const ORDER_SAMPLES: usize = 64;
const CLASSES: [&str; 3] = ["1 process", "8-process gang", "512-process gang"];

struct Args {
    sizes: Vec<(u32, usize)>,
    run: Settings,
    /// Rank 0 of the node layout; sizes are NODES:TASKS.
    nodes: bool,
}

#[derive(Clone, Copy)]
struct Settings {
    budget: Duration,
    batch: usize,
    prefetch: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        sizes: Vec::new(),
        run: Settings { budget: Duration::from_secs(60), batch: 0, prefetch: u64::from(DEFAULT_PREFETCH) },
        nodes: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let number = |value: Option<String>, what: &str| -> Result<u64, String> {
            value.and_then(|v| v.parse().ok()).ok_or(format!("{what} needs a whole number"))
        };
        match arg.as_str() {
            "--budget" => args.run.budget = Duration::from_secs(number(it.next(), "--budget")?),
            "--batch" => args.run.batch = number(it.next(), "--batch")?.max(1) as usize,
            "--prefetch" => args.run.prefetch = number(it.next(), "--prefetch")?,
            "--nodes" => args.nodes = true,
            // What cargo bench passes to every bench target.
            "--bench" => {}
            size => {
                let (w, t) = size.split_once(':').ok_or(format!("'{size}': expected WORKERS:TASKS"))?;
                let w: u32 = w.parse().map_err(|_| format!("'{size}': WORKERS is not a number"))?;
                let t: usize = t.parse().map_err(|_| format!("'{size}': TASKS is not a number"))?;
                if w < WORKERS_PER_NODE && !args.nodes {
                    return Err(format!("'{size}': at least {WORKERS_PER_NODE} workers (one node)"));
                }
                args.sizes.push((w, t));
            }
        }
    }
    if args.sizes.is_empty() {
        args.sizes = if args.nodes {
            vec![(1_000, 1_000_000), (10_000, 1_000_000)]
        } else {
            vec![(1_000, 100_000), (10_000, 1_000_000), (100_000, 1_000_000)]
        };
    }
    if args.run.batch == 0 {
        args.run.batch = if args.nodes { 8 } else { 1 };
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("scale: {e}");
            std::process::exit(2);
        }
    };
    if args.nodes {
        println!(
            "node layout: budget {} s per size; a batch of journal lines every {} ends per node; nodes of {WORKERS_PER_NODE} workers with 1 slot, 1 GPU, 8 CPUs",
            args.run.budget.as_secs(),
            args.run.batch
        );
    } else {
        println!(
            "budget {} s per size; {} process end(s) per dispatch; prefetch {}; workers have 1 slot, 1 GPU, 8 CPUs, {WORKERS_PER_NODE} to a node",
            args.run.budget.as_secs(),
            args.run.batch,
            args.run.prefetch
        );
    }
    // Each timed call (a dispatch, a process end) counts about one reading of the clock: on a
    // virtual machine it is a system call of a microsecond or more, not negligible per task.
    const READINGS: u32 = 100_000;
    let t0 = cpu_time();
    for _ in 0..READINGS {
        let _ = std::hint::black_box(cpu_time());
    }
    println!(
        "the clock (CPU time of this thread): {:.2} µs per reading, included about once in each timed call",
        (cpu_time() - t0).as_secs_f64() * 1e6 / f64::from(READINGS)
    );
    for &(workers, tasks) in &args.sizes {
        // In a thread of its own: a dispatch call that outlasts the budget cannot be interrupted.
        let (tx, rx) = mpsc::channel();
        let (run, nodes) = (args.run, args.nodes);
        std::thread::spawn(move || {
            if nodes {
                node_layout::simulate(workers, tasks, run, &tx);
            } else {
                simulate(workers, tasks, run, &tx);
            }
            let _ = tx.send(None);
        });
        // Lines come after each step of the set-up and at the end: a silence longer than the
        // budget and a grace period means one call is still running (on a shared machine a
        // step of a million-task set-up can take minutes, hence the long grace).
        loop {
            match rx.recv_timeout(args.run.budget + GRACE) {
                Ok(Some(line)) => println!("{line}"),
                Ok(None) => break,
                Err(_) => {
                    println!(
                        "  one call ran past the budget + {} s (the first dispatch fills every worker); stopped",
                        GRACE.as_secs()
                    );
                    // The stuck thread holds the CPU; later sizes would be measured against it.
                    std::process::exit(0);
                }
            }
        }
    }
}

/// The job file: singles, 8-process gangs and a few 512-process gangs, one GPU per process.
fn job_text(tasks: usize, workers: u32, prefetch: u64) -> (String, [usize; 3]) {
    let big = if workers >= 512 { (tasks / 250_000).max(1) } else { 0 };
    let gangs = tasks / 10;
    let singles = tasks - gangs - big;
    let values = |n: usize| (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let template = |name: &str, n: usize, shape: &str| {
        if n == 0 {
            return String::new();
        }
        format!(
            "[[tasks]]\nname = \"{name}\"\ncommand = \"python train.py --config configs/{name}.yaml --seed {{seed}}\"\nmatrix = {{ seed = [{}] }}\ngpus = 1\ncpus = 8\nmemory = \"32GiB\"\n{shape}",
            values(n)
        )
    };
    let text = format!(
        "[job]\nname = \"scale\"\nprefetch = {prefetch}\nenv = {{ OMP_NUM_THREADS = \"8\", NCCL_DEBUG = \"WARN\" }}\n{}{}{}",
        template("single", singles, ""),
        template("gang", gangs, "processes = 8\nprocesses_per_node = 8\n"),
        template("big", big, "processes = 512\nprocesses_per_node = 8\n"),
    );
    (text, [singles, gangs, big])
}

/// CPU time of this thread: the machine is shared, and wall time would count the turns of
/// other processes as scheduling time.
fn cpu_time() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

/// xorshift64*: a fixed, dependency-free random order for the simulation.
struct Rng(u64);

const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// Fisher-Yates: a queue that mixes the three kinds, as a real sweep of sweeps would.
fn shuffle(order: &mut [usize], rng: &mut Rng) {
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
}

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n as u64) as usize
    }
}

#[derive(Default)]
struct Tally {
    decisions: usize,
    dispatch_calls: usize,
    dispatch_time: Duration,
    fill_decisions: usize,
    fill_time: Duration,
    ends: usize,
    end_time: Duration,
    /// Per class, bytes and count of sampled Launch orders: of the first attempt of their
    /// template (what its record was made from), then of later ones.
    order_bytes: [[(usize, usize); 2]; 3],
    /// Per gang class, the bytes of the entries every process of a sampled gang has alike
    /// (which a record per gang and worker could send once where processes share a worker),
    /// and the gangs counted.
    gang_shared: [(usize, usize); 3],
    /// Template records sent (`Order::Template`, once per worker and template) and their bytes.
    records: (usize, usize),
    launches: usize,
}

fn simulate(workers: u32, n: usize, run: Settings, out: &mpsc::Sender<Option<String>>) {
    let Settings { budget, batch, prefetch } = run;
    let say = |line: String| {
        let _ = out.send(Some(line));
    };
    let nodes = workers / WORKERS_PER_NODE;
    let (text, mix) = job_text(n, workers, prefetch);
    let live_before = LIVE.load(Ordering::Relaxed);
    let job = match parse_job(&text) {
        Ok(job) => job,
        Err(e) => return say(format!("{workers} workers, {n} tasks: the generated job file is invalid: {e}")),
    };
    drop(text);
    say(format!("{workers} workers, {n} tasks: job parsed"));
    let tasks = Arc::new(dlaunch_core::plan::expand(&job).expect("the scale job expands"));
    say(format!("{workers} workers, {n} tasks: tasks expanded"));
    let live_planned = LIVE.load(Ordering::Relaxed);
    let hellos: Vec<(u32, WorkerHello)> = (1..=workers)
        .map(|rank| {
            let node = (rank - 1) / WORKERS_PER_NODE;
            let hello = WorkerHello {
                host: format!("node{node:05}"),
                addr: format!("10.{}.{}.{}", node >> 16, (node >> 8) & 255, node & 255),
                capacity: Capacity { slots: 1, cpus: 8, gpus: 1, memory: 64 << 30 },
                description: String::new(),
            };
            (rank, hello)
        })
        .collect();
    let mut plan = decide_resume(&Ledger::default(), &tasks, Default::default());
    let mut rng = Rng(SEED);
    shuffle(&mut plan.to_run, &mut rng);
    let started = common::run_started(workers + 1, n);
    let live_hellos = LIVE.load(Ordering::Relaxed);
    let mut control = match Control::new(
        Arc::clone(&job),
        Arc::clone(&tasks),
        &hellos,
        Ledger::default(),
        &plan,
        started,
        Instant::now(),
    ) {
        Ok(control) => control,
        Err(e) => return say(format!("{workers} workers, {n} tasks: {e}")),
    };
    drop(control.take_effects());
    drop(plan);
    let live_queued = LIVE.load(Ordering::Relaxed);
    let plan_bytes = live_planned.saturating_sub(live_before);
    let control_bytes = live_queued.saturating_sub(live_hellos);
    say(format!(
        "{workers} workers on {nodes} nodes, {n} tasks ({} single, {} 8-gangs, {} 512-gangs)",
        mix[0], mix[1], mix[2]
    ));
    say(format!(
        "  memory per queued task: {} B ({} B the expanded tasks, {} B the coordinator: queue, ledger)",
        (plan_bytes + control_bytes) / n.max(1),
        plan_bytes / n.max(1),
        control_bytes / n.max(1)
    ));

    let mut tally = Tally::default();
    let mut running: Vec<(u32, AttemptKey, u32)> = Vec::new();
    // Per worker, the orders it holds (prefetch), started in order as its processes end.
    let mut holding: HashMap<u32, VecDeque<AttemptKey>> = HashMap::new();
    let mut samples = [[0usize; 2]; 3];
    let mut first_attempt: [Option<AttemptKey>; 3] = [None; 3];
    let mut records: HashMap<(u32, u32), TemplateRecord> = HashMap::new();
    let start = Instant::now();
    let mut ended = Vec::new();
    while !control.finished() && start.elapsed() < budget {
        let t0 = cpu_time();
        control.dispatch(None, SystemTime::now());
        let spent = cpu_time().saturating_sub(t0);
        let mut decided = 0;
        let mut gangs: HashMap<AttemptKey, (usize, BTreeMap<String, String>)> = HashMap::new();
        for effect in control.take_effects() {
            if let Effect::Send { rank, order: order @ Order::Template(record) } = &effect {
                tally.records.0 += 1;
                tally.records.1 += wire::encode(std::slice::from_ref(order)).len();
                records.insert((*rank, record.template), record.clone());
            }
            if let Effect::Send { rank, order: Order::Launch(launch) } = effect {
                tally.launches += 1;
                let class = tasks[launch.key.task as usize].template;
                let class = job.templates[class].processes.min(512);
                let class = usize::from(class > 1) + usize::from(class > 8);
                // The first attempt of a template is what its record was made from: its orders
                // are smaller than any later one's, so it is counted apart.
                let later = usize::from(*first_attempt[class].get_or_insert(launch.key) != launch.key);
                if samples[class][later] < ORDER_SAMPLES {
                    samples[class][later] += 1;
                    let order = Order::Launch(launch.clone());
                    tally.order_bytes[class][later].0 += wire::encode(std::slice::from_ref(&order)).len();
                    tally.order_bytes[class][later].1 += 1;
                    if let (true, Some(record)) = (class > 0, records.get(&(rank, launch.template))) {
                        let env: BTreeMap<String, String> =
                            record.merge(&launch.env, &launch.unset).into_iter().collect();
                        let (_, shared) = gangs.entry(launch.key).or_insert_with(|| (class, env.clone()));
                        shared.retain(|k, v| env.get(k) == Some(v));
                    }
                }
                if launch.process == 0 {
                    decided += 1;
                }
                if launch.prefetched {
                    holding.entry(rank).or_default().push_back(launch.key);
                } else {
                    running.push((rank, launch.key, launch.process));
                }
            }
        }
        for (class, shared) in gangs.into_values() {
            let shared: Vec<(String, String)> = shared.into_iter().collect();
            tally.gang_shared[class].0 += serde_json::to_vec(&shared).map_or(0, |b| b.len());
            tally.gang_shared[class].1 += 1;
        }
        if tally.dispatch_calls == 0 {
            tally.fill_decisions = decided;
            tally.fill_time = spent;
        }
        tally.dispatch_calls += 1;
        tally.decisions += decided;
        tally.dispatch_time += spent;
        ended.clear();
        for _ in 0..batch.min(running.len()) {
            let i = rng.below(running.len());
            ended.push(running.swap_remove(i));
        }
        for &(rank, key, process) in &ended {
            let end = ProcessEnd {
                key,
                process,
                cpus: "0-7".into(),
                gpus: vec!["0".into()],
                ending: Ending::Exited { code: 0 },
                start: None,
                end: SystemTime::now(),
            };
            let t0 = cpu_time();
            control.process_ended(rank, end);
            // The worker starts what it holds in the same turn and reports it after the end.
            if let Some(next) = holding.get_mut(&rank).and_then(VecDeque::pop_front) {
                control.started(rank, next, SystemTime::now());
                running.push((rank, next, 0));
            }
            tally.end_time += cpu_time().saturating_sub(t0);
        }
        tally.ends += ended.len();
        drop(control.take_effects());
    }
    let wall = start.elapsed();
    let (finished, failed, _) = control.counts();
    let per = |d: Duration, k: usize| {
        if k == 0 { "—".to_string() } else { format!("{:.1} µs", d.as_secs_f64() * 1e6 / k as f64) }
    };
    say(format!(
        "  {} in {:.1} s",
        if control.finished() {
            "all done".to_string()
        } else {
            format!("budget reached, {finished} of {n} tasks done")
        },
        wall.as_secs_f64()
    ));
    say(format!(
        "  decision (a task started): {} over {} decisions in {} dispatch calls; the first call (filling the workers): {} decisions in {:.2} s = {}",
        per(tally.dispatch_time, tally.decisions),
        tally.decisions,
        tally.dispatch_calls,
        tally.fill_decisions,
        tally.fill_time.as_secs_f64(),
        per(tally.fill_time, tally.fill_decisions)
    ));
    say(format!(
        "  finished task: {} in process_ended ({} process ends, {finished} tasks succeeded, {failed} failed); {} of wall time per finished task",
        per(tally.end_time, finished),
        tally.ends,
        per(wall, finished)
    ));
    let average = |(b, k): (usize, usize)| b.checked_div(k).map_or("—".to_string(), |a| format!("{a} B"));
    let bytes: Vec<String> = CLASSES
        .iter()
        .zip(tally.order_bytes)
        .zip(tally.gang_shared)
        .filter(|((_, [first, later]), _)| first.1 + later.1 > 0)
        .map(|((name, [first, later]), shared)| {
            let gang =
                if shared.1 == 0 { String::new() } else { format!(", alike in all its gang {}", average(shared)) };
            format!("{name} {} (its template's first attempt: {}{gang})", average(later), average(first))
        })
        .collect();
    say(format!("  bytes per Launch order (as wire::encode sends it, one process): {}", bytes.join("; ")));
    let (records, record_bytes) = tally.records;
    say(format!(
        "  template records (once per worker and template): {records} sent, {} B each, {:.1} B per Launch order over the {} sent",
        record_bytes / records.max(1),
        record_bytes as f64 / tally.launches.max(1) as f64,
        tally.launches
    ));
    drop(control);
    say(scheduler_alone(&job, &tasks, workers, budget));
}

/// The same queue and workers through the real `Scheduler` alone (what `Control::dispatch`
/// calls first), to tell the decision from the orders, environments and events built after it.
fn scheduler_alone(job: &Job, tasks: &[Task], workers: u32, budget: Duration) -> String {
    let mut sched = Scheduler::new((2 * workers).max(8));
    for rank in 1..=workers {
        let node = ((rank - 1) / WORKERS_PER_NODE) as usize;
        sched.add_worker(rank, node, Capacity { slots: 1, cpus: 8, gpus: 1, memory: 64 << 30 });
    }
    let demands: Vec<Demand> = job.templates.iter().map(|t| Demand { groups: t.groups(), time_needed: None }).collect();
    let mut order: Vec<usize> = (0..tasks.len()).collect();
    let mut rng = Rng(SEED);
    shuffle(&mut order, &mut rng);
    for index in order {
        sched.enqueue(index, tasks[index].template);
    }
    let mut running: Vec<(u32, Resources)> = Vec::new();
    let (mut decisions, mut calls, mut spent, mut fill) = (0usize, 0usize, Duration::ZERO, (0, Duration::ZERO));
    let start = Instant::now();
    while start.elapsed() < budget && (sched.queue_len() > 0 || !running.is_empty()) {
        let t0 = cpu_time();
        let started = sched.dispatch(&demands, None);
        let took = cpu_time().saturating_sub(t0);
        if calls == 0 {
            fill = (started.len(), took);
        }
        calls += 1;
        decisions += started.len();
        spent += took;
        for dispatch in started {
            let each = demands[tasks[dispatch.task].template]
                .groups
                .iter()
                .flat_map(|g| std::iter::repeat_n(g.each, g.processes as usize));
            running.extend(dispatch.ranks.iter().copied().zip(each));
        }
        if !running.is_empty() {
            let (rank, each) = running.swap_remove(rng.below(running.len()));
            sched.release(rank, &each);
        }
    }
    // After the fill: where waiting gangs pile up at the head of the queue.
    let steady = (spent.saturating_sub(fill.1), decisions - fill.0);
    format!(
        "  the scheduler alone (sched::Scheduler::dispatch, same queue and workers): {:.2} µs per decision over {decisions} decisions in {calls} calls, {} left queued; the first call: {} decisions in {:.3} s; after it (steady state): {:.2} µs per decision",
        spent.as_secs_f64() * 1e6 / decisions.max(1) as f64,
        sched.queue_len(),
        fill.0,
        fill.1.as_secs_f64(),
        steady.0.as_secs_f64() * 1e6 / steady.1.max(1) as f64
    )
}
