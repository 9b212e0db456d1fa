//! `dlaunch report`: writes `report.html` into the output directory, or CSV to stdout.

use std::collections::HashMap;
use std::path::Path;
use std::time::SystemTime;

use super::{ObserveError, locate, read_events, stderr_tail};
use dlaunch_core::layout;
use dlaunch_core::ledger::TaskStatus;
use dlaunch_core::report::{self, MAX_FAILURES};

const STDERR_LINES: usize = 20;

pub fn report(target: &Path, csv: bool, json: bool) -> Result<i32, ObserveError> {
    let output_dir = locate(target)?.output_dir;
    let events = read_events(&output_dir)?;
    let gathered = report::gather(&events);
    let now = SystemTime::now();
    if csv {
        print!("{}", report::csv(&gathered, now));
        return Ok(0);
    }
    let mut tails = HashMap::new();
    let failed = gathered
        .task_order
        .iter()
        .filter_map(|t| gathered.ledger.get(t))
        .filter(|r| r.status == TaskStatus::Failed)
        .take(MAX_FAILURES);
    for record in failed {
        let decider = record.processes.iter().find(|p| !p.ending.succeeded()).or(record.processes.first());
        let processes = record.processes.len().max(1) as u32;
        let attempt = record.attempts.saturating_sub(1);
        let process = decider.map_or(0, |p| p.process);
        let lines = stderr_tail(&output_dir, &record.id, attempt, process, processes, STDERR_LINES);
        if !lines.is_empty() {
            tails.insert(record.id.clone(), lines);
        }
    }
    let title =
        output_dir.file_name().map_or_else(|| output_dir.display().to_string(), |n| n.to_string_lossy().into_owned());
    let page = report::html(&gathered, &title, &tails, now);
    let path = layout::report(&output_dir);
    std::fs::write(&path, &page).map_err(ObserveError::io(&path))?;
    if json {
        println!("{}", serde_json::json!({ "report": path, "bytes": page.len(), "attempts": gathered.attempts.len() }));
    } else {
        println!(
            "wrote {} ({} attempts, {})",
            path.display(),
            gathered.attempts.len(),
            dlaunch_core::spec::format_size(page.len() as u64)
        );
    }
    Ok(0)
}
