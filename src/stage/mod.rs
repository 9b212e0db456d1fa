//! Dataset staging: rank 0 reads each dataset once and broadcasts it to one leader rank per
//! node, which writes a node-local copy for the tasks of its node (docs/staging.md).
//!
//! Per dataset, among the leaders (world rank 0 is leader 0, and writes its own node's copy
//! from the bytes it reads):
//! 1. rank 0 sends the manifest (the tree: names, kinds, sizes, modes, link targets);
//! 2. each leader prepares its node's directory and checks for a verified copy left by an
//!    earlier run, and tells rank 0;
//! 3. rank 0 decides who receives (checksumming the source first only when some node has a
//!    copy to compare) or stops everybody when a node cannot stage;
//! 4. the stream goes to the receivers, each verifying the checksum before the copy gets its
//!    final name;
//! 5. rank 0 collects the outcomes and tells everybody whether to go on.
//!
//! Every leader goes through the same collectives whatever happens locally, so a failure on
//! one node ends the start-up on all ranks instead of leaving some waiting in a collective.
//! Finally each leader tells the other ranks of its node where the copies are.

mod broadcast;
pub mod manifest;
mod pipeline;
pub mod store;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use serde::{Deserialize, Serialize};

use broadcast::{Comms, broadcast_json, gather_json};
use manifest::{Checksum, ChunkPlan, Manifest, StreamReader};
pub use manifest::{Scan, ScanError};
use pipeline::Received;
use store::{Sums, Writer};

use dlaunch_core::spec::{Dataset, Job};
use dlaunch_core::summary::StageReport;

/// Set to `1` to treat every rank as a node of its own. For benchmarks and tests on one
/// machine only: it makes the broadcast real (one leader per rank) and puts a copy per rank
/// on the one disk.
pub const RANK_IS_NODE_VAR: &str = "DLAUNCH_STAGE_RANK_IS_NODE";

/// A dataset's source as rank 0 scanned it.
#[derive(Debug, Clone)]
pub struct Source {
    pub dataset: String,
    pub scan: Scan,
}

#[derive(Debug, thiserror::Error)]
#[error("dataset {dataset}: {source}")]
pub struct SourceError {
    pub dataset: String,
    #[source]
    pub source: ScanError,
}

/// The datasets some task lists, in job-file order: no other dataset is staged.
pub fn used_datasets(job: &Job) -> Vec<&Dataset> {
    job.datasets.iter().filter(|d| job.templates.iter().any(|t| t.datasets.contains(&d.name))).collect()
}

/// Scans the sources of the datasets tasks use (on rank 0 at start-up, and in `dlaunch check`),
/// warning about what is left out.
pub fn scan_sources(job: &Job) -> Result<Vec<Source>, SourceError> {
    let used = used_datasets(job);
    for dataset in job.datasets.iter().filter(|d| !used.contains(d)) {
        log::warn!("dataset {}: no task lists it: not staged", dataset.name);
    }
    used.into_iter()
        .map(|dataset| {
            let scan = manifest::scan(&dataset.source)
                .map_err(|source| SourceError { dataset: dataset.name.clone(), source })?;
            for (link, target) in &scan.skipped {
                log::warn!(
                    "dataset {}: leaving out the link {} -> {}: it points outside the dataset",
                    dataset.name,
                    link.display(),
                    target.display()
                );
            }
            Ok(Source { dataset: dataset.name.clone(), scan })
        })
        .collect()
}

/// What a rank takes from staging: where its node's copies are (dataset → path) and, on rank
/// 0, a report per dataset.
#[derive(Debug, Default)]
pub struct Staged {
    pub paths: BTreeMap<String, PathBuf>,
    pub reports: Vec<StageReport>,
}

/// Staging failed; the message (complete on rank 0) names the datasets, nodes and paths.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StageFailed(pub String);

/// Stages the datasets tasks use; every rank calls it. `sources`: rank 0's scans (it scans
/// what is missing itself). `is_worker`: this rank runs tasks, so its node needs the copies.
pub fn stage(
    world: &SimpleCommunicator,
    job: &Job,
    sources: Option<&[Source]>,
    is_worker: bool,
) -> Result<Staged, StageFailed> {
    let datasets = used_datasets(job);
    if datasets.is_empty() {
        return Ok(Staged::default());
    }
    let rank_is_node = std::env::var(RANK_IS_NODE_VAR).is_ok_and(|v| v == "1");
    let comms = Comms::new(world, rank_is_node);
    let needed = comms.node_has_workers(is_worker);
    let led = comms.leaders.as_ref().map(|leaders| {
        let leader = Leader::new(leaders, job, world.rank() as u32, needed);
        let mut staged = Staged::default();
        for dataset in &datasets {
            let source = sources.and_then(|all| all.iter().find(|s| s.dataset == dataset.name));
            let (path, report) = leader.stage(dataset, source)?;
            staged.paths.extend(path.map(|p| (dataset.name.clone(), p)));
            staged.reports.extend(report);
        }
        Ok::<_, String>(staged)
    });
    let shared: Result<BTreeMap<String, PathBuf>, String> =
        broadcast_json(&comms.node, led.as_ref().map(|r| r.as_ref().map(|s| &s.paths)));
    match (led, shared) {
        (Some(Ok(staged)), _) => Ok(staged),
        (_, Ok(paths)) => Ok(Staged { paths, reports: Vec::new() }),
        (_, Err(message)) => Err(StageFailed(message)),
    }
}

/// What a leader has of a dataset before the transfer.
#[derive(Debug, Serialize, Deserialize)]
enum Holding {
    /// No rank of this node runs tasks.
    NotNeeded,
    Nothing,
    /// A copy of this tree from an earlier run, with its checksum (when verified).
    Copy(Option<Checksum>),
    Failed(String),
}

/// Rank 0's decision: who receives (by leader rank), or why nobody does.
#[derive(Debug, Serialize, Deserialize)]
enum Plan {
    Transfer { receive: Vec<bool> },
    Stop(String),
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Outcome {
    NotNeeded,
    Kept,
    Staged,
    /// Rank 0 stopped the stream; its own outcome says why.
    Abandoned,
    Failed(String),
}

struct Leader<'a> {
    comm: &'a SimpleCommunicator,
    job: &'a Job,
    /// Where this node's copies go, under the stage root.
    key: String,
    /// This node in messages: "node n1 (rank 4)".
    who: String,
    needed: bool,
}

impl<'a> Leader<'a> {
    fn new(comm: &'a SimpleCommunicator, job: &'a Job, world_rank: u32, needed: bool) -> Self {
        let hosts = gather_json(comm, &(world_rank, crate::host::hostname()));
        let keys: Vec<String> = broadcast_json(comm, hosts.map(|h| store::node_keys(&h)).as_ref());
        let key = keys.get(comm.rank() as usize).cloned().unwrap_or_else(|| format!("rank{world_rank}"));
        let who = format!("node {key} (rank {world_rank})");
        Leader { comm, job, key, who, needed }
    }

    fn is_root(&self) -> bool {
        self.comm.rank() == 0
    }

    /// Stages one dataset; returns this node's path to it and, on rank 0, the report.
    fn stage(
        &self,
        dataset: &Dataset,
        source: Option<&Source>,
    ) -> Result<(Option<PathBuf>, Option<StageReport>), String> {
        let started = Instant::now();
        let scanned = self.is_root().then(|| match source {
            Some(source) => Ok(source.scan.clone()),
            None => manifest::scan(&dataset.source).map_err(|e| format!("dataset {}: {e}", dataset.name)),
        });
        let manifest: Result<Manifest, String> =
            broadcast_json(self.comm, scanned.as_ref().map(|r| r.as_ref().map(|s| &s.manifest)));
        let manifest = Arc::new(manifest?);
        let base = scanned.and_then(Result::ok).and_then(|s| s.root.parent().map(Path::to_path_buf));
        let (holding, node_dir) = self.look(dataset, &manifest);
        let holdings = gather_json(self.comm, &holding);
        let decided = holdings.map(|h| plan(dataset, &manifest, base.as_deref(), h));
        let plan: Plan = broadcast_json(self.comm, decided.as_ref().map(|(plan, _)| plan));
        let receive = match plan {
            Plan::Stop(why) => return Err(why),
            Plan::Transfer { receive } => receive,
        };
        let mut outcome = match holding {
            Holding::NotNeeded => Outcome::NotNeeded,
            _ => Outcome::Kept,
        };
        if receive.iter().any(|&r| r) {
            let mine = receive.get(self.comm.rank() as usize).copied().unwrap_or(false);
            let color = if mine || self.is_root() { Color::with_value(0) } else { Color::undefined() };
            if let Some(receivers) = self.comm.split_by_color(color) {
                let transfer =
                    Transfer { comm: &receivers, dataset, manifest: &manifest, node_dir: node_dir.as_deref() };
                outcome = match &base {
                    Some(base) => self.send(&transfer, base, mine, decided.and_then(|(_, sum)| sum)).unwrap_or(outcome),
                    None => self.receive(&transfer),
                };
            }
        }
        let outcomes = gather_json(self.comm, &outcome);
        let judged = outcomes.map(|o| judge(dataset, &manifest, started, &o));
        let verdict: Result<(), String> = broadcast_json(self.comm, judged.as_ref().map(|(verdict, _)| verdict));
        verdict?;
        let path = node_dir.map(|dir| dir.join(&dataset.name).join(manifest.root_name()));
        Ok((path, judged.map(|(_, report)| report)))
    }

    /// This node's directory for `dataset`, and what it holds of it.
    fn look(&self, dataset: &Dataset, manifest: &Manifest) -> (Holding, Option<PathBuf>) {
        if !self.needed {
            return (Holding::NotNeeded, None);
        }
        let dir = match store::node_dir(self.job, dataset, &self.key) {
            Ok(dir) => dir,
            Err(e) => return (Holding::Failed(self.failure(dataset, e)), None),
        };
        if let Err(e) = manifest.check() {
            return (Holding::Failed(self.failure(dataset, e)), None);
        }
        let holding = match store::existing_copy(&dir, &dataset.name, manifest, dataset.verify) {
            Some(copy) => Holding::Copy(copy.checksum),
            None => Holding::Nothing,
        };
        (holding, Some(dir))
    }

    fn failure(&self, dataset: &Dataset, error: impl std::fmt::Display) -> String {
        format!("dataset {}: {}: {error}", dataset.name, self.who)
    }

    /// Starts this node's copy when it receives one: the writer, or why there is none.
    fn writer(&self, transfer: &Transfer, mine: bool) -> (Option<Writer>, Option<String>) {
        let (Some(dir), true) = (transfer.node_dir, mine) else { return (None, None) };
        match Writer::begin(dir, &transfer.dataset.name, Arc::clone(transfer.manifest)) {
            Ok(writer) => (Some(writer), None),
            Err(e) => (None, Some(self.failure(transfer.dataset, e))),
        }
    }

    /// Rank 0: reads and sends the stream, and writes its own node's copy when `mine`; that
    /// copy is written from the very bytes rank 0 checksums, so it needs no check of its own.
    /// `checked`: the source's checksum from before, when the plan needed one. Returns `None`
    /// when rank 0 has nothing of its own to report.
    fn send(&self, transfer: &Transfer, base: &Path, mine: bool, checked: Option<Checksum>) -> Option<Outcome> {
        let Transfer { comm, dataset, manifest, .. } = *transfer;
        let (writer, unwritable) = self.writer(transfer, mine);
        let plan = ChunkPlan { total: manifest.total_bytes(), chunk: pipeline::CHUNK };
        let hasher = dataset.verify.then(|| manifest.hasher());
        let sent = pipeline::send(comm, plan, StreamReader::new(base, manifest), hasher, writer);
        log::debug!("dataset {}: {}: CPU seconds per step: {}", dataset.name, self.who, sent.cpu);
        let writer = sent.writer;
        let problem = match sent.read {
            Err(e) => Some(format!("dataset {}: cannot stage the source: {e}", dataset.name)),
            Ok(sum) if checked.is_some_and(|c| Some(c) != sum) => {
                Some(format!("dataset {}: the source changed while it was being staged", dataset.name))
            }
            Ok(_) => unwritable,
        };
        if let Some(problem) = problem {
            if let Some(writer) = writer {
                writer.abandon();
            }
            return Some(Outcome::Failed(problem));
        }
        mine.then(|| self.keep(dataset, writer, None))
    }

    /// A node: receives the stream and keeps the copy if it arrived whole and checks out.
    fn receive(&self, transfer: &Transfer) -> Outcome {
        let Transfer { comm, dataset, manifest, .. } = *transfer;
        let (writer, unwritable) = self.writer(transfer, true);
        let plan = ChunkPlan { total: manifest.total_bytes(), chunk: pipeline::CHUNK };
        let hasher = dataset.verify.then(|| manifest.hasher());
        let (received, writer, cpu) = pipeline::receive(comm, plan, hasher, writer);
        log::debug!("dataset {}: {}: CPU seconds per step: {cpu}", dataset.name, self.who);
        match (received, unwritable) {
            (_, Some(problem)) => Outcome::Failed(problem),
            (Received::Aborted, None) => {
                writer.into_iter().for_each(Writer::abandon);
                Outcome::Abandoned
            }
            (Received::Complete { sent: Some(sent), got: Some(got) }, None) => {
                self.keep(dataset, writer, Some(Sums { sent, got }))
            }
            (Received::Complete { sent: None, .. }, None) => self.keep(dataset, writer, None),
            (Received::Complete { got: None, .. }, None) => {
                writer.into_iter().for_each(Writer::abandon);
                Outcome::Failed(self.failure(dataset, "the thread checksumming the copy stopped"))
            }
        }
    }

    fn keep(&self, dataset: &Dataset, writer: Option<Writer>, sums: Option<Sums>) -> Outcome {
        let Some(writer) = writer else {
            return Outcome::Failed(self.failure(dataset, "the thread writing the copy stopped"));
        };
        match writer.finish(sums) {
            Ok(path) => {
                log::debug!("dataset {}: staged in {}", dataset.name, path.display());
                Outcome::Staged
            }
            Err(e) => Outcome::Failed(self.failure(dataset, e)),
        }
    }
}

/// One dataset's transfer, as a leader sees it.
struct Transfer<'t> {
    /// Rank 0 and the leaders that receive.
    comm: &'t SimpleCommunicator,
    dataset: &'t Dataset,
    manifest: &'t Arc<Manifest>,
    node_dir: Option<&'t Path>,
}

/// Rank 0: who receives, given what every node holds, and the source's checksum when it had
/// to be computed to compare old copies with. Checksumming first costs a read of the source,
/// so it happens only when some node has a copy to compare.
fn plan(
    dataset: &Dataset,
    manifest: &Manifest,
    base: Option<&Path>,
    holdings: Vec<Holding>,
) -> (Plan, Option<Checksum>) {
    if let Some(failures) = failures(&holdings, |h| match h {
        Holding::Failed(message) => Some(message),
        _ => None,
    }) {
        return (Plan::Stop(failures), None);
    }
    let Some(base) = base else {
        return (Plan::Stop(format!("dataset {}: rank 0 has no source to send", dataset.name)), None);
    };
    let compare = dataset.verify && holdings.iter().any(|h| matches!(h, Holding::Copy(Some(_))));
    let source_sum = match compare.then(|| manifest::checksum_tree(base, manifest)) {
        Some(Err(e)) => return (Plan::Stop(format!("dataset {}: cannot stage the source: {e}", dataset.name)), None),
        Some(Ok(sum)) => Some(sum),
        None => None,
    };
    let receive = holdings
        .iter()
        .map(|h| match h {
            Holding::Nothing => true,
            Holding::Copy(sum) => dataset.verify && *sum != source_sum,
            Holding::NotNeeded | Holding::Failed(_) => false,
        })
        .collect();
    (Plan::Transfer { receive }, source_sum)
}

/// What the leaders that failed said, one line each; `None` when none did.
fn failures<T>(answers: &[T], failed: impl Fn(&T) -> Option<&String>) -> Option<String> {
    let messages: Vec<&str> = answers.iter().filter_map(failed).map(String::as_str).collect();
    (!messages.is_empty()).then(|| messages.join("\n"))
}

/// Rank 0: whether everybody goes on, and the report (logged here).
fn judge(
    dataset: &Dataset,
    manifest: &Manifest,
    started: Instant,
    outcomes: &[Outcome],
) -> (Result<(), String>, StageReport) {
    let count = |which: Outcome| outcomes.iter().filter(|o| **o == which).count() as u32;
    let seconds = started.elapsed().as_secs_f64();
    let bytes = manifest.total_bytes();
    let nodes = count(Outcome::Staged);
    let kept_nodes = count(Outcome::Kept);
    let gb_per_s = if nodes > 0 && seconds > 0.0 { bytes as f64 / seconds / 1e9 } else { 0.0 };
    let report = StageReport { dataset: dataset.name.clone(), bytes, seconds, gb_per_s, nodes, kept_nodes };
    if let Some(failures) = failures(outcomes, |o| match o {
        Outcome::Failed(message) => Some(message),
        _ => None,
    }) {
        return (Err(failures), report);
    }
    let what = format!("dataset {}: {}", dataset.name, manifest.describe());
    match (nodes, kept_nodes) {
        (0, 0) => log::info!("{what}: no node runs tasks: nothing staged"),
        (0, kept) => log::info!(
            "{what}: all {kept} node(s) already hold a verified copy: transfer skipped ({seconds:.2} s to check)"
        ),
        (nodes, kept) => log::info!(
            "{what}: staged to {nodes} node(s) in {seconds:.2} s ({gb_per_s:.3} GB/s){}",
            if kept > 0 {
                format!("; {kept} node(s) already held a verified copy and skipped the transfer")
            } else {
                String::new()
            }
        ),
    }
    (Ok(()), report)
}

#[cfg(test)]
pub(crate) mod testing {
    use std::os::unix::fs::{PermissionsExt, symlink};

    /// `data/` with files of several sizes, an executable, an empty file in a subdirectory, a
    /// link inside the tree and two that leave it.
    pub fn tree() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("data");
        std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
        std::fs::write(root.join("b.txt"), b"bee").unwrap();
        std::fs::write(root.join("a.bin"), vec![7u8; 5000]).unwrap();
        std::fs::write(root.join("sub/run.sh"), b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(root.join("sub/run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(root.join("sub/deeper/empty"), b"").unwrap();
        symlink("../b.txt", root.join("sub/to_b")).unwrap();
        symlink("/etc/passwd", root.join("sub/absolute")).unwrap();
        symlink("../../outside", root.join("sub/climbs_out")).unwrap();
        dir
    }
}
