//! `dlaunch check` and `dlaunch topo`: look before you run, without MPI.

use std::path::Path;

use serde::Serialize;

use crate::{discover, stage};
use dlaunch_core::exit_code;
use dlaunch_core::spec::{format_duration, format_size};
use dlaunch_core::{graph, plan, topo};

#[derive(Serialize)]
struct CheckedTask<'a> {
    id: &'a str,
    command: &'a str,
    cpus: u32,
    gpus: u32,
    memory: u64,
    processes: u32,
    timeout_s: Option<u64>,
    retries: u32,
    datasets: &'a [String],
    /// Ids of the tasks it runs after.
    after: Vec<&'a str>,
}

pub fn check(file: &Path, json: bool) -> i32 {
    let job = match crate::jobfile::load(file) {
        Ok(job) => job,
        Err(errors) => {
            eprintln!("{errors}");
            return exit_code::BAD_INPUT;
        }
    };
    // What `run` reads on rank 0 at start-up: an unreadable file fails here too, by name.
    let sources = match stage::scan_sources(&job) {
        Ok(sources) => sources,
        Err(e) => {
            eprintln!("dlaunch: {e}");
            return exit_code::BAD_INPUT;
        }
    };
    let datasets: Vec<serde_json::Value> = sources
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.dataset,
                "source": s.scan.root,
                "bytes": s.scan.manifest.total_bytes(),
                "summary": s.scan.manifest.describe(),
            })
        })
        .collect();
    let tasks = plan::expand(&job);
    let rows: Vec<CheckedTask> = tasks
        .iter()
        .map(|task| {
            let t = &job.templates[task.template];
            CheckedTask {
                id: &task.id,
                command: &task.command,
                cpus: t.resources.cpus,
                gpus: t.resources.gpus,
                memory: t.resources.memory,
                processes: t.processes,
                timeout_s: t.timeout.map(|d| d.as_secs()),
                retries: t.retries,
                datasets: &t.datasets,
                after: task.after.iter().map(|&d| tasks[d].id.as_str()).collect(),
            }
        })
        .collect();
    let edges: Vec<Vec<usize>> = job.templates.iter().map(|t| t.after.clone()).collect();
    let layers: Vec<Vec<&str>> = graph::layers(&edges)
        .iter()
        .map(|layer| layer.iter().map(|&t| job.templates[t].name.as_str()).collect())
        .collect();
    if json {
        let doc = serde_json::json!({
            "job": job.name,
            "output_dir": job.output_dir,
            "datasets": datasets,
            "layers": layers,
            "tasks": rows,
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return exit_code::SUCCESS;
    }
    println!(
        "{}: job {}, {} tasks from {} templates, output {}",
        job.file.display(),
        job.name,
        tasks.len(),
        job.templates.len(),
        job.output_dir.display()
    );
    for source in &sources {
        println!("  dataset {}: {} ({})", source.dataset, source.scan.manifest.describe(), source.scan.root.display());
    }
    let width = rows.iter().map(|r| r.id.len()).max().unwrap_or(0).min(60);
    for row in &rows {
        let mut needs = format!("{} cpu", row.cpus);
        if row.gpus > 0 {
            needs.push_str(&format!(", {} gpu", row.gpus));
        }
        if row.memory > 0 {
            needs.push_str(&format!(", {}", format_size(row.memory)));
        }
        if row.processes > 1 {
            needs = format!("{} × ({needs})", row.processes);
        }
        if let Some(t) = row.timeout_s {
            needs.push_str(&format!(", timeout {}", format_duration(std::time::Duration::from_secs(t))));
        }
        println!("  {:width$}  {needs}  $ {}", row.id, row.command);
    }
    if layers.len() > 1 {
        println!("order (each layer runs after the ones above it):");
        for (i, layer) in layers.iter().enumerate() {
            println!("  {}. {}", i + 1, layer.join(", "));
        }
    }
    exit_code::SUCCESS
}

pub fn topo(json: bool) -> i32 {
    match discover::discover() {
        Ok(topology) if json => {
            println!("{}", serde_json::to_string_pretty(&topology).unwrap_or_default());
            exit_code::SUCCESS
        }
        Ok(topology) => {
            print!("{}", topo::render_text(&topology));
            exit_code::SUCCESS
        }
        Err(e) => {
            eprintln!("dlaunch: {e}");
            exit_code::INTERNAL
        }
    }
}
