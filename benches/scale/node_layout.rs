//! Rank 0 of the node layout at scale (`--nodes`): `lease::Broker` fed what the leaders of
//! simulated nodes send, as rank 0's loop feeds it: journal lines decoded one by one, then the
//! rest of the batch. The leaders themselves are simulated outside the timed part.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use dlaunch_core::events::{Assigned, AttemptStatus, Ending, Event, ProcessResult};
use dlaunch_core::lease::{Broker, Effect, Node};
use dlaunch_core::ledger::{Ledger, decide_resume};
use dlaunch_core::plan::Task;
use dlaunch_core::sched::Capacity;
use dlaunch_core::spec::Resources;
use dlaunch_core::wire::{Down, Leased, WorkerHello};

use super::{LIVE, Rng, SEED, Settings, WORKERS_PER_NODE, cpu_time, parse_job};

/// A node asks for this many tasks at a time, when it holds fewer than `LOW` unstarted.
const WANT: u32 = 16;
const LOW: usize = 8;

/// A simulated node: its leader's view of what it holds and what it has to send.
#[derive(Default)]
struct Sim {
    /// Leased tasks not started yet, in lease order.
    held: VecDeque<Leased>,
    running: usize,
    /// The last lease taken in.
    taken: u32,
    /// Journal lines of the batch being gathered, and the ends in it.
    lines: Vec<u8>,
    ends: usize,
}

impl Sim {
    fn want(&self) -> u32 {
        if self.held.len() < LOW { WANT } else { 0 }
    }

    fn idle(&self) -> bool {
        self.running == 0 && self.held.is_empty()
    }
}

/// What a leader journals, encoded as the journal writes it: JSON and a newline.
fn journal(lines: &mut Vec<u8>, event: &Event) {
    if serde_json::to_writer(&mut *lines, event).is_ok() {
        lines.push(b'\n');
    }
}

struct Run<'a> {
    tasks: &'a [Task],
    nodes: Vec<Sim>,
    /// (node, task, attempt) of every task running anywhere.
    running: Vec<(usize, u32, u32)>,
    rank0: Duration,
    /// Of `rank0`, decoding the lines.
    decode: Duration,
    batches: usize,
    leases: usize,
    leased: usize,
}

impl Run<'_> {
    /// Node `n` starts what it holds on its free workers, journaling each start.
    fn start(&mut self, n: usize) {
        let sim = &mut self.nodes[n];
        while sim.running < WORKERS_PER_NODE as usize
            && let Some(Leased { task, attempt }) = sim.held.pop_front()
        {
            let rank = 1 + n as u32 * WORKERS_PER_NODE + sim.running as u32;
            let processes = vec![Assigned {
                rank,
                host: format!("node{n:05}"),
                resources: Resources { cpus: 8, gpus: 1, memory: 32 << 30 },
                ports: vec![],
            }];
            let id = self.tasks[task as usize].id.clone();
            journal(&mut sim.lines, &Event::AttemptStarted { task: id, attempt, time: SystemTime::now(), processes });
            sim.running += 1;
            self.running.push((n, task, attempt));
        }
    }

    /// Node `n` sends its batch; rank 0 takes it in (timed), and the node takes in the leases
    /// rank 0 sent it.
    fn send(&mut self, broker: &mut Broker, n: usize) {
        let sim = &mut self.nodes[n];
        let lines = std::mem::take(&mut sim.lines);
        let (want, taken, idle) = (sim.want(), sim.taken, sim.idle());
        sim.ends = 0;
        let leader = 1 + n as u32 * WORKERS_PER_NODE;
        // Decoded apart from the broker's part, to tell the two costs apart.
        let t0 = cpu_time();
        let events: Vec<Event> = lines
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|line| dlaunch_core::journal::event_of(line).map_err(|e| eprintln!("a line: {e}")).ok())
            .collect();
        let t1 = cpu_time();
        for event in &events {
            broker.from_node(leader, event);
        }
        broker.node_said(leader, want, taken, idle, None, Instant::now());
        let effects = broker.take_effects();
        let t2 = cpu_time();
        drop(events);
        self.decode += t1.saturating_sub(t0);
        self.rank0 += t2.saturating_sub(t0);
        self.batches += 1;
        for effect in effects {
            if let Effect::Send { rank, down: Down::Lease { lease, tasks } } = effect {
                let to = ((rank - 1) / WORKERS_PER_NODE) as usize;
                self.leases += 1;
                self.leased += tasks.len();
                self.nodes[to].held.extend(tasks);
                self.nodes[to].taken = lease;
                self.start(to);
            }
        }
    }

    /// A running task, chosen at random, ends at its node, which starts the next it holds.
    fn end_one(&mut self, rng: &mut Rng) -> usize {
        let (n, task, attempt) = self.running.swap_remove(rng.below(self.running.len()));
        let sim = &mut self.nodes[n];
        sim.running -= 1;
        sim.ends += 1;
        let event = Event::AttemptEnded {
            task: self.tasks[task as usize].id.clone(),
            attempt,
            status: AttemptStatus::Succeeded,
            reason: String::new(),
            retry: false,
            processes: vec![ProcessResult {
                process: 0,
                rank: 1 + n as u32 * WORKERS_PER_NODE,
                host: format!("node{n:05}"),
                cpus: "0-7".into(),
                gpus: vec!["0".into()],
                ending: Ending::Exited { code: 0 },
                start: Some(SystemTime::now()),
                end: SystemTime::now(),
            }],
        };
        journal(&mut sim.lines, &event);
        self.start(n);
        n
    }
}

pub(super) fn simulate(node_count: u32, n: usize, run: Settings, out: &mpsc::Sender<Option<String>>) {
    let say = |line: String| {
        let _ = out.send(Some(line));
    };
    let workers = node_count * WORKERS_PER_NODE;
    let label = format!("{node_count} nodes ({workers} workers), {n} tasks");
    let text = format!(
        "[job]\nname = \"scale-nodes\"\nlayout = \"nodes\"\n[[tasks]]\nname = \"single\"\ncommand = \"python train.py --seed {{seed}}\"\nmatrix = {{ seed = [{}] }}\ngpus = 1\ncpus = 8\nmemory = \"32GiB\"\n",
        (0..n).map(|i| i.to_string()).collect::<Vec<_>>().join(",")
    );
    let live_before = LIVE.load(Ordering::Relaxed);
    let job = match parse_job(&text) {
        Ok(job) => job,
        Err(e) => return say(format!("{label}: the generated job file is invalid: {e}")),
    };
    drop(text);
    let tasks = Arc::new(dlaunch_core::plan::expand(&job).expect("the scale job expands"));
    let live_planned = LIVE.load(Ordering::Relaxed);
    let nodes: Vec<Node> = (0..node_count)
        .map(|i| Node {
            leader: 1 + i * WORKERS_PER_NODE,
            workers: (0..WORKERS_PER_NODE)
                .map(|w| {
                    let hello = WorkerHello {
                        host: format!("node{i:05}"),
                        addr: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                        capacity: Capacity { slots: 1, cpus: 8, gpus: 1, memory: 64 << 30 },
                        description: String::new(),
                    };
                    (1 + i * WORKERS_PER_NODE + w, hello)
                })
                .collect(),
        })
        .collect();
    let plan = decide_resume(&Ledger::default(), &tasks, Default::default());
    let started = super::common::run_started(workers + 1, n);
    let live_nodes = LIVE.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let mut broker = match Broker::new(
        Arc::clone(&job),
        Arc::clone(&tasks),
        nodes,
        Ledger::default(),
        &plan,
        started,
        Instant::now(),
    ) {
        Ok(broker) => broker,
        Err(e) => return say(format!("{label}: {e}")),
    };
    drop(broker.take_effects());
    drop(plan);
    let set_up = t0.elapsed();
    let live_queued = LIVE.load(Ordering::Relaxed);
    let (plan_bytes, broker_bytes) = (live_planned - live_before, live_queued.saturating_sub(live_nodes));
    say(format!("{label}: set up in {:.1} s", set_up.as_secs_f64()));
    say(format!(
        "  memory per queued task: {} B ({} B the expanded tasks, {} B rank 0: ledger, queue, tables)",
        (plan_bytes + broker_bytes) / n.max(1),
        plan_bytes / n.max(1),
        broker_bytes / n.max(1)
    ));

    let mut sim = Run {
        tasks: &tasks,
        nodes: (0..node_count).map(|_| Sim::default()).collect(),
        running: Vec::new(),
        rank0: Duration::ZERO,
        decode: Duration::ZERO,
        batches: 0,
        leases: 0,
        leased: 0,
    };
    let mut rng = Rng(SEED);
    let start = Instant::now();
    // Every node says hello with what it wants: the fill.
    for node in 0..node_count as usize {
        sim.send(&mut broker, node);
    }
    let fill = (sim.rank0, sim.leased);
    while !broker.finished() && start.elapsed() < run.budget {
        if sim.running.is_empty() {
            // Nothing runs: every node sends what it has left (it is idle now).
            for node in 0..node_count as usize {
                sim.send(&mut broker, node);
            }
            continue;
        }
        let node = sim.end_one(&mut rng);
        if sim.nodes[node].ends >= run.batch || (sim.nodes[node].held.len() < LOW && sim.nodes[node].ends > 0) {
            sim.send(&mut broker, node);
        }
    }
    let wall = start.elapsed();
    let counts = broker.ledger().counts(&tasks);
    let per = |d: Duration, k: usize| {
        if k == 0 { "—".to_string() } else { format!("{:.2} µs", d.as_secs_f64() * 1e6 / k as f64) }
    };
    say(format!(
        "  {} in {:.1} s of wall time",
        if broker.finished() {
            format!("all done ({} succeeded)", counts.succeeded)
        } else {
            format!("budget reached, {} of {n} tasks done", counts.succeeded)
        },
        wall.as_secs_f64()
    ));
    say(format!(
        "  rank 0 per finished task: {} ({} decoding its 2 journal lines, {} in from_node, node_said and leasing), {:.2} s in all; the fill ({} tasks leased to {node_count} nodes): {}",
        per(sim.rank0, counts.succeeded),
        per(sim.decode, counts.succeeded),
        per(sim.rank0.saturating_sub(sim.decode), counts.succeeded),
        sim.rank0.as_secs_f64(),
        fill.1,
        per(fill.0, fill.1)
    ));
    say(format!(
        "  messages at rank 0: {} batches in, {} leases out ({:.1} tasks each): {:.2} per task",
        sim.batches,
        sim.leases,
        sim.leased as f64 / sim.leases.max(1) as f64,
        (sim.batches + sim.leases) as f64 / counts.succeeded.max(1) as f64
    ));
}
