//! "Why is this task not running?" — an answer from the run's view and the task's template:
//! which resource is short on which worker, or what else holds it back.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::Serialize;

use crate::ledger::TaskStatus;
use crate::sched::Capacity;
use crate::spec::{PortRange, TaskTemplate, format_duration, format_size};
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

/// What is asked about a task, besides the run's view.
#[derive(Clone, Copy, Debug)]
pub struct Question<'a> {
    pub task: &'a str,
    pub template: &'a TaskTemplate,
    /// The job's `master_ports`: each process holds one of them on its host (and one more per
    /// label of its role) while it runs.
    pub master_ports: PortRange,
    /// The task's state in the ledger (None when the journal does not know it).
    pub status: Option<TaskStatus>,
    /// Queued tasks before it in FIFO order.
    pub ahead: usize,
    pub now: SystemTime,
}

pub fn explain(question: &Question, view: &RunView) -> Explanation {
    let task = question.task;
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
    } else if question.status == Some(TaskStatus::Succeeded) {
        reasons.push("it succeeded".into());
        "succeeded"
    } else if view.ended.is_some() {
        reasons.push("the run ended before it started; running the job again starts it".into());
        "queued"
    } else {
        queued_reasons(question, view, &mut reasons);
        "queued"
    };
    Explanation { task: task.to_string(), state: state.to_string(), reasons }
}

fn queued_reasons(question: &Question, view: &RunView, reasons: &mut Vec<String>) {
    let template = question.template;
    let needed = template.time_needed();
    let left = view.deadline.map(|d| d.duration_since(question.now).unwrap_or_default());
    if let (Some(needed), Some(left)) = (needed, left)
        && needed > left
    {
        // Nothing else matters in this allocation: the scheduler skips it until the next one.
        reasons.push(format!(
            "walltime: it needs {} of allocation time (its walltime or timeout) and the allocation has {} left \
             (less the grace period): it waits for a later allocation, where running the job again starts it",
            format_duration(needed),
            format_duration(left)
        ));
        return;
    }
    match &view.queue_held {
        Some(hold) if hold.task == question.task => reasons.push(format!(
            "backfill budget: tasks behind it were started {} times while it did not fit{}; nothing queued \
             behind it starts until it does",
            hold.overtaken,
            view.backfill_limit.map_or(String::new(), |limit| format!(", its budget of {limit}"))
        )),
        Some(hold) => reasons.push(format!(
            "backfill budget: task {} was overtaken {} times and holds the queue since {}: tasks queued behind it \
             do not start until it does",
            hold.task,
            hold.overtaken,
            humantime::format_rfc3339_seconds(hold.since)
        )),
        None => {}
    }
    resource_reasons(question, view, reasons);
    if let Some(needed) = needed {
        reasons.push(match left {
            Some(left) => format!(
                "it needs {} of allocation time (walltime or timeout); {} is left: enough",
                format_duration(needed),
                format_duration(left)
            ),
            None => format!(
                "it needs {} of allocation time (walltime or timeout): it does not start when less is left",
                format_duration(needed)
            ),
        });
    }
}

/// Which resource is short on which worker, ports of `master_ports` included.
fn resource_reasons(question: &Question, view: &RunView, reasons: &mut Vec<String>) {
    let template = question.template;
    let need = template.resources;
    let usage = view.utilisation(view.started.unwrap_or(std::time::UNIX_EPOCH));
    let ports = HostPorts::new(question, view);
    // Workers on one host share its ports: what one is counted to use, the next cannot.
    let mut port_room_left: BTreeMap<&str, u32> = BTreeMap::new();
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
        let port_room = port_room_left.entry(u.host.as_str()).or_insert_with(|| ports.room(&u.host));
        let room = free.room_for(&need).min(per_node).min(*port_room);
        *port_room -= room;
        room_total += u64::from(room);
        if cap.room_for(&need) == 0 {
            never.push(format!("{name}: {}", short(&cap, &cap, &need).join(", ")));
        } else if room == 0 {
            let mut short = short(&free, &cap, &need);
            if ports.room(&u.host) == 0 {
                short.push(ports.describe(&u.host));
            }
            shortages.push(format!("{name}: {}", short.join(", ")));
        }
    }
    let processes = template.processes;
    let held_by_other = view.queue_held.as_ref().is_some_and(|h| h.task != question.task);
    if usage.is_empty() {
        reasons.push("no worker has joined the run yet".into());
    } else if room_total >= u64::from(processes) {
        if !held_by_other {
            reasons.push(format!(
                "there is room for it now; it waits behind {} queued task(s) ahead of it (FIFO with bounded \
                 backfill) and starts at the next dispatch",
                question.ahead
            ));
        }
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
}

/// The ports of `master_ports` that running processes hold, per host, against what each
/// process of the asked-about task needs.
struct HostPorts<'a> {
    range: PortRange,
    in_use: BTreeMap<&'a str, u32>,
    /// Ports each process needs: its own and one per label of its role (the least any role needs).
    each: u32,
}

impl<'a> HostPorts<'a> {
    fn new(question: &Question, view: &'a RunView) -> Self {
        let mut in_use: BTreeMap<&str, u32> = BTreeMap::new();
        for p in view.running.values().flat_map(|r| &r.processes) {
            // Journals before ports were recorded: every process holds at least its own.
            *in_use.entry(p.host.as_str()).or_default() += p.ports.len().max(1) as u32;
        }
        let labels = question.template.roles.iter().map(|r| r.ports.len() as u32).min().unwrap_or(0);
        HostPorts { range: question.master_ports, in_use, each: 1 + labels }
    }

    fn span(&self) -> u32 {
        u32::from(self.range.last.saturating_sub(self.range.first)) + 1
    }

    fn free(&self, host: &str) -> u32 {
        self.span().saturating_sub(self.in_use.get(host).copied().unwrap_or(0))
    }

    /// How many more processes of the task the host's free ports allow.
    fn room(&self, host: &str) -> u32 {
        self.free(host) / self.each
    }

    fn describe(&self, host: &str) -> String {
        format!(
            "ports: needs {}, {} free of {} in master_ports {}-{} on {host}",
            self.each,
            self.free(host),
            self.span(),
            self.range.first,
            self.range.last
        )
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

#[cfg(test)]
mod tests;
