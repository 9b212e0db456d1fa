//! `dlaunch report`: the journal as a self-contained HTML page (inline SVG timeline, no
//! network) and as CSV, one row per attempt. Pure: events and stderr tails in, text out.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::SystemTime;

use crate::events::{Assigned, AttemptStatus, Ending, Event, ProcessResult};
use crate::ledger::{Ledger, TaskStatus};
use crate::view::{RunView, cpu_count};

mod charts;

use charts::{assign_lanes, axis, bars, binned_lanes, curve, esc, legend, secs, time_text};

/// Beyond this many process bars the timeline draws binned lanes instead (a browser stays quick).
pub const MAX_BARS: usize = 20_000;
/// Rows of the task table in the page; the CSV has them all.
pub const MAX_TABLE_ROWS: usize = 5_000;
pub const MAX_FAILURES: usize = 50;

const PLOT_WIDTH: f64 = 1100.0;
const LABEL_WIDTH: f64 = 190.0;
const LANE_HEIGHT: f64 = 12.0;
const HOST_GAP: f64 = 8.0;
const BINS: usize = 1000;
const CURVE_POINTS: usize = 400;
const CURVE_HEIGHT: f64 = 120.0;

/// One attempt of one task, from its start and end events.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub run: u32,
    pub task: String,
    pub attempt: u32,
    pub start: SystemTime,
    pub assigned: Vec<Assigned>,
    /// None while it runs.
    pub end: Option<AttemptEnd>,
}

#[derive(Clone, Debug)]
pub struct AttemptEnd {
    pub status: AttemptStatus,
    pub retry: bool,
    pub reason: String,
    pub processes: Vec<ProcessResult>,
}

impl Attempt {
    /// "succeeded", "failed", "retried" (failed, then retried), "interrupted", "cancelled", "running".
    pub fn outcome(&self) -> &'static str {
        match &self.end {
            None => "running",
            Some(e) => match e.status {
                AttemptStatus::Succeeded => "succeeded",
                AttemptStatus::Failed if e.retry => "retried",
                AttemptStatus::Failed => "failed",
                AttemptStatus::Interrupted => "interrupted",
                AttemptStatus::Cancelled => "cancelled",
            },
        }
    }

    pub fn end_time(&self, now: SystemTime) -> SystemTime {
        self.end.as_ref().and_then(|e| e.processes.iter().map(|p| p.end).max()).unwrap_or(now).max(self.start)
    }

    fn seconds(&self, now: SystemTime) -> f64 {
        self.end_time(now).duration_since(self.start).unwrap_or_default().as_secs_f64()
    }
}

/// Everything the report shows, gathered from the journal once.
pub struct Gathered {
    pub attempts: Vec<Attempt>,
    /// Typed matrix values by task id.
    pub params: HashMap<String, serde_json::Map<String, serde_json::Value>>,
    /// Matrix keys in the order first seen: the table's and CSV's columns.
    pub keys: Vec<String>,
    pub ledger: Ledger,
    /// Task ids in the order the journal first names them.
    pub task_order: Vec<String>,
    pub view: RunView,
    pub job_run: u32,
}

pub fn gather(events: &[Event]) -> Gathered {
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut open: HashMap<(String, u32), usize> = HashMap::new();
    let mut params = HashMap::new();
    let mut keys: Vec<String> = Vec::new();
    let mut ledger = Ledger::default();
    let mut view = RunView::default();
    let mut task_order = Vec::new();
    let mut run = 0;
    for event in events {
        ledger.apply(event);
        view.apply(event);
        match event {
            Event::RunStarted { run: r, .. } => run = *r,
            Event::TaskDefined { task, params: p, .. } => {
                if !params.contains_key(task) {
                    task_order.push(task.clone());
                }
                for key in p.keys() {
                    if !keys.contains(key) {
                        keys.push(key.clone());
                    }
                }
                params.insert(task.clone(), p.clone());
            }
            Event::AttemptStarted { task, attempt, time, processes } => {
                open.insert((task.clone(), *attempt), attempts.len());
                attempts.push(Attempt {
                    run,
                    task: task.clone(),
                    attempt: *attempt,
                    start: *time,
                    assigned: processes.clone(),
                    end: None,
                });
            }
            Event::AttemptEnded { task, attempt, status, reason, retry, processes } => {
                if let Some(&i) = open.get(&(task.clone(), *attempt)) {
                    attempts[i].end = Some(AttemptEnd {
                        status: status.clone(),
                        retry: *retry,
                        reason: reason.clone(),
                        processes: processes.clone(),
                    });
                }
            }
            _ => {}
        }
    }
    Gathered { attempts, params, keys, ledger, task_order, view, job_run: run }
}

/// The page. `stderr_tails`: the last lines of each failed task's stderr, by task id.
pub fn html(g: &Gathered, title: &str, stderr_tails: &HashMap<String, Vec<String>>, now: SystemTime) -> String {
    let run_attempts: Vec<&Attempt> = g.attempts.iter().filter(|a| a.run == g.job_run).collect();
    let bars = bars(&run_attempts, now);
    let t0 = g.view.started.into_iter().chain(bars.iter().map(|b| b.start)).min().unwrap_or(now);
    let t1 = g.view.ended.as_ref().map(|e| e.time).into_iter().chain(bars.iter().map(|b| b.end)).max().unwrap_or(now);
    let span = t1.duration_since(t0).unwrap_or_default().as_secs_f64().max(1e-3);
    let x = |t: SystemTime| LABEL_WIDTH + t.duration_since(t0).unwrap_or_default().as_secs_f64() / span * PLOT_WIDTH;

    let mut out = String::with_capacity(64 * 1024 + bars.len() * 200);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>dlaunch report: {t}</title>\n<style>{STYLE}</style></head><body>\n<h1>dlaunch report: {t}</h1>\n",
        t = esc(title)
    );
    summary_section(&mut out, g, &run_attempts, t0, t1, now);

    let (lane_of, labels) = assign_lanes(&bars);
    let mut lane_y = Vec::with_capacity(labels.len());
    let mut y = 20.0;
    let mut host_rows: Vec<(String, f64)> = Vec::new();
    for (i, (_, host)) in labels.iter().enumerate() {
        if i == 0 || labels[i - 1].1 != *host {
            if i > 0 {
                y += HOST_GAP;
            }
            host_rows.push((host.clone(), y));
            y += LANE_HEIGHT;
        }
        lane_y.push(y);
        y += LANE_HEIGHT;
    }
    let height = y + 24.0;
    let binned = bars.len() > MAX_BARS;
    let _ = write!(
        out,
        "<h2>Timeline</h2>\n<p class=\"note\">One lane per worker slot, grouped by host; bars are task processes coloured by outcome{}; a gang's processes are joined by a line. {}</p>\n",
        legend(),
        if binned {
            format!(
                "{} processes are too many to draw one by one: each lane shows what it ran in {BINS} time bins.",
                bars.len()
            )
        } else {
            "Hover over a bar for the task, attempt, times and exit.".into()
        }
    );
    let _ = writeln!(
        out,
        "<svg id=\"timeline\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{height}\" data-binned=\"{binned}\" data-lanes=\"{lanes}\">",
        w = LABEL_WIDTH + PLOT_WIDTH + 10.0,
        lanes = labels.len()
    );
    axis(&mut out, t0, span, height - 18.0);
    for (host, hy) in &host_rows {
        let _ = writeln!(out, "<text class=\"host\" x=\"2\" y=\"{}\">{}</text>", hy + LANE_HEIGHT - 2.0, esc(host));
    }
    for (i, (label, host)) in labels.iter().enumerate() {
        let _ = writeln!(
            out,
            "<g class=\"lane\" data-host=\"{}\"><text class=\"lane-label\" x=\"12\" y=\"{:.1}\">{}</text><line class=\"lane-line\" x1=\"{LABEL_WIDTH}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\"/></g>",
            esc(host),
            lane_y[i] + LANE_HEIGHT - 3.0,
            esc(label),
            LABEL_WIDTH + PLOT_WIDTH,
            lane_y[i] + LANE_HEIGHT,
            lane_y[i] + LANE_HEIGHT
        );
    }
    if binned {
        binned_lanes(&mut out, &bars, &lane_of, &lane_y, t0, span);
    } else {
        let mut gang_extent: BTreeMap<usize, (f64, f64, f64)> = BTreeMap::new();
        for (i, bar) in bars.iter().enumerate() {
            let (x0, x1) = (x(bar.start), x(bar.end));
            let by = lane_y[lane_of[i]] + 1.0;
            let a = bar.attempt;
            let _ = writeln!(
                out,
                "<rect class=\"bar o-{}\" data-task=\"{}\" data-attempt=\"{}\" x=\"{x0:.2}\" y=\"{by:.1}\" width=\"{:.2}\" height=\"{:.1}\"><title>{} attempt {} ({} of {})\n{} → {} ({})\n{} rank {}{}\n{}</title></rect>",
                bar.class,
                esc(&a.task),
                a.attempt,
                (x1 - x0).max(0.8),
                LANE_HEIGHT - 2.0,
                esc(&a.task),
                a.attempt,
                bar.class,
                a.assigned.len().max(1),
                time_text(bar.start),
                time_text(bar.end),
                secs(bar.end.duration_since(bar.start).unwrap_or_default().as_secs_f64()),
                esc(&bar.host),
                bar.rank,
                if bar.gpus.is_empty() { String::new() } else { format!(", GPUs {}", esc(&bar.gpus)) },
                esc(&bar.ending),
            );
            if a.assigned.len() > 1 || a.end.as_ref().is_some_and(|e| e.processes.len() > 1) {
                let e = gang_extent.entry(bar.index).or_insert((x0, by, by));
                e.1 = e.1.min(by);
                e.2 = e.2.max(by);
            }
        }
        for (index, (gx, top, bottom)) in gang_extent {
            let _ = writeln!(
                out,
                "<line class=\"gang\" data-task=\"{}\" x1=\"{gx:.2}\" x2=\"{gx:.2}\" y1=\"{top:.1}\" y2=\"{:.1}\"/>",
                esc(&run_attempts[index].task),
                bottom + LANE_HEIGHT - 2.0
            );
        }
    }
    out.push_str("</svg>\n");
    curve(&mut out, g, &bars, t0, span);
    table(&mut out, g, now);
    failures(&mut out, g, stderr_tails);
    let _ = write!(out, "<script>{SCRIPT}</script>\n</body></html>\n");
    out
}

fn summary_section(
    out: &mut String,
    g: &Gathered,
    attempts: &[&Attempt],
    t0: SystemTime,
    t1: SystemTime,
    now: SystemTime,
) {
    let c = g.view.counts();
    let usage = g.view.utilisation(now);
    let weighted = |pick: fn(&crate::view::Utilisation, &crate::sched::Capacity) -> Option<(f64, u32)>| {
        let (mut used, mut cap) = (0.0, 0.0);
        for u in &usage {
            if let Some((fraction, of)) = g.view.workers.get(&u.rank).and_then(|w| pick(u, &w.capacity)) {
                used += fraction * f64::from(of);
                cap += f64::from(of);
            }
        }
        (cap > 0.0).then(|| used / cap)
    };
    let slots = weighted(|u, c| u.slots.map(|f| (f, c.slots)));
    let cpus = weighted(|u, c| u.cpus.map(|f| (f, c.cpus)));
    let gpus = weighted(|u, c| u.gpus.map(|f| (f, c.gpus)));
    let lost: f64 = attempts
        .iter()
        .filter(|a| matches!(a.outcome(), "failed" | "retried" | "interrupted"))
        .map(|a| a.seconds(now) * a.assigned.len().max(1) as f64)
        .sum();
    let percent = |f: Option<f64>| f.map_or("–".into(), |f| format!("{:.1}%", f * 100.0));
    let state = match &g.view.ended {
        Some(e) if e.reason.is_empty() => format!("ended, exit code {}", e.exit_code),
        Some(e) => format!("ended, exit code {} (stopped early: {})", e.exit_code, esc(&e.reason)),
        None => "not ended (running, or killed)".into(),
    };
    let _ = write!(
        out,
        "<h2>Summary</h2>\n<table class=\"summary\" id=\"summary\">\n<tr><th>run</th><td>{run} — {state}</td></tr>\n<tr><th>tasks</th><td>{total} total: {ok} succeeded, {failed} failed, {cancelled} cancelled, {running} running, {queued} not run; {retried} attempts retried</td></tr>\n<tr><th>makespan</th><td>{makespan} (from {from} to {to})</td></tr>\n<tr><th>utilisation</th><td>slots {slots}, CPUs {cpus}, GPUs {gpus}</td></tr>\n<tr><th>lost to failures and retries</th><td>{lost} of process time</td></tr>\n",
        run = g.job_run,
        total = c.total,
        ok = c.succeeded,
        failed = c.failed,
        cancelled = c.cancelled,
        running = c.running,
        queued = c.queued,
        retried = g.view.retried,
        makespan = secs(t1.duration_since(t0).unwrap_or_default().as_secs_f64()),
        from = time_text(t0),
        to = time_text(t1),
        slots = percent(slots),
        cpus = percent(cpus),
        gpus = percent(gpus),
        lost = secs(lost),
    );
    for d in &g.view.datasets {
        let rate = if d.seconds > 0.0 { d.bytes as f64 / d.seconds / 1e9 } else { 0.0 };
        let _ = writeln!(
            out,
            "<tr><th>staged {}</th><td>{} to {} node(s) in {:.1}s ({rate:.2} GB/s)</td></tr>",
            esc(&d.dataset),
            crate::spec::format_size(d.bytes),
            d.nodes,
            d.seconds
        );
    }
    out.push_str("</table>\n");
}

fn table(out: &mut String, g: &Gathered, now: SystemTime) {
    let mut last: HashMap<&str, &Attempt> = HashMap::new();
    for a in &g.attempts {
        last.insert(a.task.as_str(), a);
    }
    let _ = write!(
        out,
        "<h2>Tasks</h2>\n<p class=\"note\">Click a column to sort.{}</p>\n<table class=\"tasks sortable\" id=\"tasks\"><thead><tr><th>task</th>",
        if g.task_order.len() > MAX_TABLE_ROWS {
            format!(
                " The first {MAX_TABLE_ROWS} of {} tasks; <code>dlaunch report --csv</code> has them all.",
                g.task_order.len()
            )
        } else {
            String::new()
        }
    );
    for key in &g.keys {
        let _ = write!(out, "<th>{}</th>", esc(key));
    }
    out.push_str(
        "<th>status</th><th>attempts</th><th>duration (s)</th><th>host</th><th>reason</th></tr></thead><tbody>\n",
    );
    for task in g.task_order.iter().take(MAX_TABLE_ROWS) {
        let record = g.ledger.get(task);
        let status = record.map_or(TaskStatus::Pending, |r| r.status);
        let a = last.get(task.as_str());
        let _ = write!(out, "<tr><td>{}</td>", esc(task));
        for key in &g.keys {
            let value = g.params.get(task).and_then(|p| p.get(key));
            let (sort, shown) = match value {
                Some(serde_json::Value::String(s)) => (s.clone(), s.clone()),
                Some(v) => (v.to_string(), v.to_string()),
                None => (String::new(), String::new()),
            };
            let _ = write!(out, "<td data-sort=\"{}\">{}</td>", esc(&sort), esc(&shown));
        }
        let _ = writeln!(
            out,
            "<td class=\"s-{s}\">{s}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            record.map_or(0, |r| r.attempts),
            a.map_or(String::new(), |a| format!("{:.1}", a.seconds(now))),
            a.and_then(|a| a.assigned.first()).map_or(String::new(), |p| esc(&p.host)),
            esc(&record.map(|r| r.reason.clone()).unwrap_or_default()),
            s = serde_json::to_value(status).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
        );
    }
    out.push_str("</tbody></table>\n");
}

fn failures(out: &mut String, g: &Gathered, stderr_tails: &HashMap<String, Vec<String>>) {
    let failed: Vec<&String> =
        g.task_order.iter().filter(|t| g.ledger.get(t).is_some_and(|r| r.status == TaskStatus::Failed)).collect();
    let _ = writeln!(out, "<h2>Failures ({})</h2>", failed.len());
    if failed.is_empty() {
        out.push_str("<p>None.</p>\n");
        return;
    }
    out.push_str("<div id=\"failures\">\n");
    for task in failed.iter().take(MAX_FAILURES) {
        let reason = g.ledger.get(task).map(|r| r.reason.clone()).unwrap_or_default();
        let tail = stderr_tails.get(*task).map(|l| l.join("\n")).unwrap_or_default();
        let _ = writeln!(
            out,
            "<div class=\"failure\"><h3>{}</h3><p>{}</p><pre>{}</pre></div>",
            esc(task),
            esc(&reason),
            esc(&tail)
        );
    }
    if failed.len() > MAX_FAILURES {
        let _ = writeln!(out, "<p>... and {} more; see summary.json.</p>", failed.len() - MAX_FAILURES);
    }
    out.push_str("</div>\n");
}

/// One row per attempt, matrix values as typed columns (numbers bare, strings quoted).
pub fn csv(g: &Gathered, now: SystemTime) -> String {
    let mut out = String::from("run,task,attempt");
    for key in &g.keys {
        out.push(',');
        out.push_str(&csv_text(key));
    }
    out.push_str(",outcome,reason,processes,hosts,ranks,start,end,duration_s,exit_code,signal,cpus,gpus\n");
    for a in &g.attempts {
        let _ = write!(out, "{},{},{}", a.run, csv_text(&a.task), a.attempt);
        for key in &g.keys {
            out.push(',');
            match g.params.get(&a.task).and_then(|p| p.get(key)) {
                Some(serde_json::Value::String(s)) => out.push_str(&csv_text(s)),
                Some(v) => out.push_str(&v.to_string()),
                None => {}
            }
        }
        let processes = a.end.as_ref().map(|e| e.processes.as_slice()).unwrap_or_default();
        let deciding =
            processes.iter().find(|p| !p.ending.succeeded() && p.ending != Ending::Stopped).or(processes.first());
        let (exit, signal) = match deciding.map(|p| &p.ending) {
            Some(Ending::Exited { code }) => (code.to_string(), String::new()),
            Some(Ending::Signaled { signal, .. }) => (String::new(), signal.to_string()),
            _ => (String::new(), String::new()),
        };
        let mut hosts: Vec<&str> = a.assigned.iter().map(|p| p.host.as_str()).collect();
        hosts.dedup();
        let ranks: Vec<String> = a.assigned.iter().map(|p| p.rank.to_string()).collect();
        let cpus: usize = processes.iter().map(|p| cpu_count(&p.cpus)).sum();
        let gpus: usize = processes.iter().map(|p| p.gpus.len()).sum();
        let _ = writeln!(
            out,
            ",{},{},{},{},{},{},{},{:.3},{exit},{signal},{cpus},{gpus}",
            a.outcome(),
            csv_text(&a.end.as_ref().map(|e| e.reason.clone()).unwrap_or_default()),
            a.assigned.len(),
            csv_text(&hosts.join(";")),
            csv_text(&ranks.join(";")),
            time_text(a.start),
            a.end.as_ref().map(|_| time_text(a.end_time(now))).unwrap_or_default(),
            a.seconds(now),
        );
    }
    out
}

/// A CSV field: quoted when it holds a separator, a quote or a line break (RFC 4180).
fn csv_text(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) { format!("\"{}\"", text.replace('"', "\"\"")) } else { text.to_string() }
}

const STYLE: &str = r#"
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.note { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; } td, th { padding: 2px 8px; border-bottom: 1px solid #ddd; text-align: left; }
table.summary th { width: 14em; }
table.tasks th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
svg text { font: 10px sans-serif; fill: #333; } svg .host { font-weight: bold; }
.lane-line { stroke: #eee; } .tick { stroke: #ddd; } .frame { fill: none; stroke: #ccc; }
.bar, .bin { stroke: none; } .bar:hover { stroke: #000; stroke-width: 1; }
.gang { stroke: #333; stroke-width: 1.5; stroke-dasharray: 2 1; }
.o-succeeded { fill: #4caf50; background: #4caf50; } .o-failed { fill: #e53935; background: #e53935; }
.o-retried { fill: #fb8c00; background: #fb8c00; } .o-interrupted { fill: #9e9e9e; background: #9e9e9e; }
.o-cancelled { fill: #8e24aa; background: #8e24aa; } .o-stopped { fill: #a5d6a7; background: #a5d6a7; }
.o-running { fill: #1e88e5; background: #1e88e5; }
.key { color: #fff; padding: 0 4px; border-radius: 3px; font-size: 0.85em; }
.curve { fill: none; stroke-width: 1.5; } .c-cpu { stroke: #1e88e5; background: #1e88e5; }
.c-gpu { stroke: #e53935; background: #e53935; } .c-proc { stroke: #555; background: #555; }
.s-failed { color: #c62828; font-weight: bold; } .s-succeeded { color: #2e7d32; }
pre { background: #f7f7f7; padding: 6px; overflow-x: auto; max-height: 12em; }
"#;

/// Sorting the task table by a click on a column header: numbers as numbers, the rest as text.
const SCRIPT: &str = r#"
document.querySelectorAll("table.sortable th").forEach(function (th, column) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var up = th.getAttribute("data-order") !== "up";
    th.setAttribute("data-order", up ? "up" : "down");
    var key = function (row) {
      var cell = row.cells[column];
      var text = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent;
      var n = parseFloat(text);
      return isNaN(n) || String(n) !== text.trim() ? text : n;
    };
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      // Text compares numerically where digits are (node2 before node10), like the timeline.
      var c = typeof x !== typeof y ? (typeof x === "number" ? -1 : 1)
        : typeof x === "number" ? x - y : x.localeCompare(y, "en", { numeric: true });
      return up ? c : -c;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  });
});
"#;

#[cfg(test)]
mod tests;
