//! `dlaunch check` and `dlaunch topo`: look before you run, without MPI.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::{console, discover, stage};
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
    /// Empty: every process runs `command` with the resources above.
    roles: Vec<CheckedRole<'a>>,
}

#[derive(Serialize)]
struct CheckedRole<'a> {
    name: &'a str,
    processes: u32,
    command: &'a str,
    cpus: u32,
    gpus: u32,
    memory: u64,
    /// Labels of its extra ports (`DLAUNCH_PORT_<LABEL>`).
    ports: &'a [String],
    /// The role whose processes must accept connections before this one starts.
    wait_for: Option<&'a str>,
    wait_timeout_s: Option<u64>,
}

pub fn check(file: &Path, json: bool) -> i32 {
    let job = match crate::jobfile::load(file) {
        Ok(job) => job,
        Err(errors) => {
            console::error(errors);
            return exit_code::BAD_INPUT;
        }
    };
    for warning in &job.warnings {
        console::error(format_args!("warning: {warning}"));
    }
    if let Some(problem) = output_dir_problem(&job.output_dir) {
        let (file, dir) = (job.file.display(), job.output_dir.display());
        console::error(format_args!("{file}: job.output_dir: {dir} cannot be created or written: {problem}"));
        return exit_code::BAD_INPUT;
    }
    // What `run` reads on rank 0 at start-up: an unreadable file fails here too, by name.
    let sources = match stage::scan_sources(&job) {
        Ok(sources) => sources,
        Err(e) => {
            console::error(format_args!("dlaunch: {e}"));
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
    let tasks = match plan::expand(&job) {
        Ok(tasks) => tasks,
        Err(e) => {
            console::error(format_args!("dlaunch: {}: {e}", job.file.display()));
            return exit_code::INTERNAL;
        }
    };
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
                roles: t
                    .roles
                    .iter()
                    .zip(&task.role_commands)
                    .map(|(role, command)| {
                        let waited = role.wait_for.map(|w| t.roles[w].name.as_str());
                        CheckedRole {
                            name: &role.name,
                            processes: role.processes,
                            command,
                            cpus: role.resources.cpus,
                            gpus: role.resources.gpus,
                            memory: role.resources.memory,
                            ports: &role.ports,
                            wait_for: waited,
                            wait_timeout_s: waited.map(|_| role.wait_timeout.as_secs()),
                        }
                    })
                    .collect(),
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
        let text = format!("{}\n", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return console::print_result(&text, exit_code::SUCCESS, exit_code::INTERNAL);
    }
    // Writing to a String cannot fail; the one write to stdout below can.
    let mut text = String::new();
    let _ = writeln!(
        text,
        "{}: job {}, {} tasks from {} templates, output {}",
        job.file.display(),
        job.name,
        tasks.len(),
        job.templates.len(),
        job.output_dir.display()
    );
    for source in &sources {
        let _ = writeln!(
            text,
            "  dataset {}: {} ({})",
            source.dataset,
            source.scan.manifest.describe(),
            source.scan.root.display()
        );
    }
    let width = rows.iter().map(|r| r.id.len()).max().unwrap_or(0).min(60);
    for row in &rows {
        let mut needs = if row.roles.is_empty() {
            per_process(row.processes, row.cpus, row.gpus, row.memory)
        } else {
            format!("{} processes in {} roles", row.processes, row.roles.len())
        };
        if let Some(t) = row.timeout_s {
            needs.push_str(&format!(", timeout {}", format_duration(std::time::Duration::from_secs(t))));
        }
        if row.roles.is_empty() {
            let _ = writeln!(text, "  {:width$}  {needs}  $ {}", row.id, row.command);
            continue;
        }
        let _ = writeln!(text, "  {:width$}  {needs}", row.id);
        for role in &row.roles {
            let mut needs = per_process(role.processes, role.cpus, role.gpus, role.memory);
            if !role.ports.is_empty() {
                needs.push_str(&format!(", ports {}", role.ports.join(",")));
            }
            if let (Some(waited), Some(t)) = (role.wait_for, role.wait_timeout_s) {
                let t = format_duration(std::time::Duration::from_secs(t));
                needs.push_str(&format!(", waits for {waited} (up to {t})"));
            }
            let _ = writeln!(text, "    role {}: {needs}  $ {}", role.name, role.command);
        }
    }
    if layers.len() > 1 {
        let _ = writeln!(text, "order (each layer runs after the ones above it):");
        for (i, layer) in layers.iter().enumerate() {
            let _ = writeln!(text, "  {}. {}", i + 1, layer.join(", "));
        }
    }
    console::print_result(&text, exit_code::SUCCESS, exit_code::INTERNAL)
}

/// What one process needs, times `processes`: "2 × (1 cpu, 1 gpu, 4 GiB)".
fn per_process(processes: u32, cpus: u32, gpus: u32, memory: u64) -> String {
    let mut needs = format!("{cpus} cpu");
    if gpus > 0 {
        needs.push_str(&format!(", {gpus} gpu"));
    }
    if memory > 0 {
        needs.push_str(&format!(", {}", format_size(memory)));
    }
    if processes > 1 { format!("{processes} × ({needs})") } else { needs }
}

/// `run` creates the output directory on rank 0, possibly after hours in a queue: find out now
/// whether it could. Permission bits do not tell (root, read-only mounts, /proc), so the nearest
/// existing directory is asked for a new entry: a probe directory, removed at once.
fn output_dir_problem(dir: &Path) -> Option<String> {
    let mut existing = dir;
    loop {
        match std::fs::metadata(existing) {
            Ok(meta) if meta.is_dir() => break,
            Ok(_) => return Some(format!("{} is not a directory", existing.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => existing = existing.parent()?,
            Err(e) => return Some(format!("{}: {e}", existing.display())),
        }
    }
    let probe = existing.join(format!(".dlaunch-check-{}", std::process::id()));
    match std::fs::create_dir(&probe) {
        Ok(()) => {
            let _ = std::fs::remove_dir(&probe);
            None
        }
        Err(e) => Some(format!("cannot create entries in {}: {e}", existing.display())),
    }
}

pub fn topo(json: bool) -> i32 {
    match discover::discover() {
        Ok(topology) if json => {
            let text = format!("{}\n", serde_json::to_string_pretty(&topology).unwrap_or_default());
            console::print_result(&text, exit_code::SUCCESS, exit_code::INTERNAL)
        }
        Ok(topology) => console::print_result(&topo::render_text(&topology), exit_code::SUCCESS, exit_code::INTERNAL),
        Err(e) => {
            console::error(format_args!("dlaunch: {e}"));
            exit_code::INTERNAL
        }
    }
}
