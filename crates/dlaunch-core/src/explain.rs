//! "Why is this task not running?" — an answer from the run's view and the task's template:
//! which resource is short on which worker, or what else holds it back.

use serde::Serialize;

use crate::ledger::TaskStatus;
use crate::sched::Capacity;
use crate::spec::{TaskTemplate, format_duration, format_size};
use crate::view::RunView;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Explanation {
    pub task: String,
    /// "queued", "running", "succeeded", ...
    pub state: String,
    /// One reason per line, most important first.
    pub reasons: Vec<String>,
}

/// Workers listed by name; beyond that they are counted.
const LISTED_WORKERS: usize = 8;

/// `status`: the task's state in the ledger (None when the journal does not know it); `ahead`:
/// queued tasks before it in FIFO order.
pub fn explain(
    task: &str,
    template: &TaskTemplate,
    view: &RunView,
    status: Option<TaskStatus>,
    ahead: usize,
) -> Explanation {
    let mut reasons = Vec::new();
    let state = if let Some(running) = view.running.get(task) {
        let on: Vec<String> = running.processes.iter().map(|p| format!("rank {} on {}", p.rank, p.host)).collect();
        reasons.push(format!(
            "attempt {} is running since {} on {}",
            running.attempt,
            humantime::format_rfc3339_seconds(running.start),
            on.join(", ")
        ));
        "running"
    } else if let Some(failure) = view.failed.get(task) {
        reasons.push(format!("it failed (attempt {}): {}; rerun with --retry-failed", failure.attempt, failure.reason));
        "failed"
    } else if view.cancelled.contains(task) {
        reasons.push("it was cancelled; rerun with --retry-cancelled".into());
        "cancelled"
    } else if status == Some(TaskStatus::Succeeded) {
        reasons.push("it succeeded".into());
        "succeeded"
    } else if view.ended.is_some() {
        reasons.push("the run ended before it started; running the job again starts it".into());
        "queued"
    } else {
        queued_reasons(template, view, ahead, &mut reasons);
        "queued"
    };
    Explanation { task: task.to_string(), state: state.to_string(), reasons }
}

fn queued_reasons(template: &TaskTemplate, view: &RunView, ahead: usize, reasons: &mut Vec<String>) {
    let need = template.resources;
    let usage = view.utilisation(view.started.unwrap_or(std::time::UNIX_EPOCH));
    let mut room_total: u64 = 0;
    let mut shortages: Vec<String> = Vec::new();
    let mut never: Vec<String> = Vec::new();
    for u in &usage {
        let Some(worker) = view.workers.get(&u.rank) else { continue };
        let cap = worker.capacity;
        let name = format!("rank {} on {}", u.rank, u.host);
        if let Some(lost) = &u.lost {
            shortages.push(format!("{name}: lost ({lost})"));
            continue;
        }
        let free = Capacity {
            slots: cap.slots.saturating_sub(u.processes_now),
            cpus: cap.cpus.saturating_sub(u.busy_now.cpus),
            gpus: cap.gpus.saturating_sub(u.busy_now.gpus),
            memory: cap.memory.saturating_sub(u.busy_now.memory),
        };
        let per_node = template.processes_per_node.unwrap_or(u32::MAX);
        let room = free.room_for(&need).min(per_node);
        room_total += u64::from(room);
        if cap.room_for(&need) == 0 {
            never.push(format!("{name}: {}", short(&cap, &cap, &need).join(", ")));
        } else if room == 0 {
            shortages.push(format!("{name}: {}", short(&free, &cap, &need).join(", ")));
        }
    }
    let processes = template.processes;
    if usage.is_empty() {
        reasons.push("no worker has joined the run yet".into());
    } else if room_total >= u64::from(processes) {
        reasons.push(format!(
            "there is room for it now; it waits behind {ahead} queued task(s) ahead of it (FIFO with bounded backfill) and starts at the next dispatch"
        ));
    } else {
        let each = format!(
            "{} CPU(s), {} GPU(s), {}",
            need.cpus,
            need.gpus,
            if need.memory > 0 { format_size(need.memory) } else { "no memory limit".into() }
        );
        if processes > 1 {
            reasons.push(format!(
                "it is a gang of {processes} processes, each needing {each}: the workers have room for {room_total} now{}",
                template.processes_per_node.map_or(String::new(), |n| format!(" ({n} per node)"))
            ));
        } else {
            reasons.push(format!("it needs {each}, and no worker has that free now"));
        }
        for line in shortages.iter().take(LISTED_WORKERS) {
            reasons.push(line.clone());
        }
        if shortages.len() > LISTED_WORKERS {
            reasons.push(format!("... and {} more workers short", shortages.len() - LISTED_WORKERS));
        }
        if !never.is_empty() {
            reasons.push(format!("{} worker(s) could never hold one process of it:", never.len()));
            reasons.extend(never.into_iter().take(LISTED_WORKERS));
        }
    }
    if let Some(needed) = template.time_needed() {
        reasons.push(format!(
            "it needs {} of allocation time (walltime or timeout): it does not start when less is left",
            format_duration(needed)
        ));
    }
}

/// "CPUs: needs 4, 1 free of 8" for each resource that is short.
fn short(free: &Capacity, capacity: &Capacity, need: &crate::spec::Resources) -> Vec<String> {
    let mut out = Vec::new();
    if free.slots == 0 {
        out.push(format!("slots: all {} busy", capacity.slots));
    }
    if need.cpus > free.cpus {
        out.push(format!("CPUs: needs {}, {} free of {}", need.cpus, free.cpus, capacity.cpus));
    }
    if need.gpus > free.gpus {
        out.push(format!("GPUs: needs {}, {} free of {}", need.gpus, free.gpus, capacity.gpus));
    }
    if need.memory > free.memory {
        out.push(format!(
            "memory: needs {}, {} free of {}",
            format_size(need.memory),
            format_size(free.memory),
            format_size(capacity.memory)
        ));
    }
    out
}
