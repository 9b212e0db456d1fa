//! How fast the coordinator decides, without processes or MPI: the pure dispatch path
//! (scheduling, ports, environment contract, journal events, order encoding) for a large sweep
//! over a large allocation, with every process finishing at once.
//!     cargo bench --bench dispatch
mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use dlaunch_core::control::{Control, Effect};
use dlaunch_core::events::Ending;
use dlaunch_core::ledger::{Ledger, decide_resume};
use dlaunch_core::sched::Capacity;
use dlaunch_core::wire::{self, Order, ProcessEnd, WorkerHello};

fn main() {
    for (tasks, workers, slots) in [(100_000, 64, 8), (100_000, 512, 4), (20_000, 16, 64)] {
        let per_second = run(tasks, workers, slots);
        println!(
            "{tasks} tasks on {workers} workers × {slots} slots: {per_second:.0} tasks/s through the coordinator core"
        );
    }
}

fn run(n: usize, workers: u32, slots: u32) -> f64 {
    let text = format!(
        "[job]\nname = \"bench\"\n[[tasks]]\nname = \"t\"\ncommand = \"python train.py --lr {{lr}} --seed {{seed}}\"\nmatrix = {{ lr = [{}], seed = [1, 2, 3, 4] }}\ncpus = 1\n",
        (0..n / 4).map(|i| format!("{}", i as f64 / 1e4)).collect::<Vec<_>>().join(", ")
    );
    let job = Arc::new(
        dlaunch_core::spec::parse(Path::new("/tmp/bench/job.toml"), text.as_bytes(), &dlaunch::jobfile::FsProbe)
            .expect("job"),
    );
    let tasks = Arc::new(dlaunch_core::plan::expand(&job).expect("tasks"));
    let hellos: Vec<(u32, WorkerHello)> = (1..=workers)
        .map(|rank| {
            let hello = WorkerHello {
                host: format!("node{}", rank / 4),
                addr: format!("10.0.{}.{}", rank / 250, rank % 250),
                capacity: Capacity { slots, cpus: 64, gpus: 0, memory: u64::MAX },
                description: String::new(),
            };
            (rank, hello)
        })
        .collect();
    let plan = decide_resume(&Ledger::default(), &tasks, Default::default());
    let started = common::run_started(workers + 1, n);
    let start = Instant::now();
    let mut control =
        Control::new(Arc::clone(&job), Arc::clone(&tasks), &hellos, Ledger::default(), &plan, started, Instant::now())
            .expect("fits");
    let mut journal_bytes = 0usize;
    let mut message_bytes = 0usize;
    let mut rounds = 0;
    while !control.finished() {
        rounds += 1;
        control.dispatch(None, SystemTime::now());
        let mut ended = Vec::new();
        for effect in control.take_effects() {
            match effect {
                Effect::Record(event) => journal_bytes += serde_json::to_vec(&event).map_or(0, |v| v.len()),
                Effect::Send { rank, order } => {
                    message_bytes += wire::encode(std::slice::from_ref(&order)).len();
                    if let Order::Launch(launch) = order {
                        ended.push((rank, launch.key, launch.process, launch.prefetched));
                    }
                }
            }
        }
        for (rank, key, process, prefetched) in ended {
            // A held order starts (in the room of a process that ended) before it can end.
            if prefetched {
                control.started(rank, key, SystemTime::now());
            }
            let end = ProcessEnd {
                key,
                process,
                cpus: "0".into(),
                gpus: vec![],
                ending: Ending::Exited { code: 0 },
                start: None,
                end: SystemTime::now(),
            };
            control.process_ended(rank, end);
        }
    }
    let elapsed = start.elapsed();
    assert_eq!(control.counts().0, n);
    eprintln!(
        "  {rounds} rounds, {:.1} MB journal, {:.1} MB messages, {:.2} s",
        journal_bytes as f64 / 1e6,
        message_bytes as f64 / 1e6,
        elapsed.as_secs_f64()
    );
    n as f64 / elapsed.as_secs_f64()
}
