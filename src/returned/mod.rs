//! Returned output: the shell around `dlaunch_core::returned`. Start-up decides the mode
//! (`detect`); a worker runs its tasks in a node-local directory and sends their files
//! (`Sender`); rank 0 writes them into the output directory (`Receiver`).

pub mod receiver;
mod restore;
mod sender;

pub use receiver::Receiver;
pub use restore::{Restores, Source};
pub use sender::Sender;

use std::path::PathBuf;

use mpi::collective::SystemOperation;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use crate::beneath;
use crate::stage::store;
use crate::worker::Worker;
use dlaunch_core::layout;
use dlaunch_core::spec::{Job, OutputMode};

/// Where this node's tasks write in returned mode, beneath the job's stage directory.
const LOCAL_DIR: &str = "output";

/// Start-up's part (every rank): decides the mode and, in returned mode, sets this rank's
/// worker up to write node-locally and send its tasks' files to rank 0. True in returned mode.
pub fn start(world: &SimpleCommunicator, job: &Job, worker: Option<&mut Worker>) -> bool {
    match detect(world, job) {
        Ok(Some(local)) => {
            if let Some(worker) = worker {
                worker.set_returned(local, job.output_limit);
            }
            true
        }
        Ok(None) => false,
        Err(e) => {
            eprintln!("dlaunch: rank {}: cannot prepare the node-local output directory: {e}", world.rank());
            world.abort(dlaunch_core::exit_code::INTERNAL);
        }
    }
}

/// The mode the job runs in, decided with every rank (a collective): `Some(dir)` in returned
/// mode, with the node-local directory standing in for `output_dir` on this node.
fn detect(world: &SimpleCommunicator, job: &Job) -> Result<Option<PathBuf>, String> {
    let mode = job.output.resolve(|| every_node_sees_marker(world, job));
    if world.rank() == 0 {
        match (job.output, mode) {
            (OutputMode::Auto, OutputMode::Shared) => {
                log::info!("output: every node sees {}: tasks write there", job.output_dir.display())
            }
            (OutputMode::Auto, _) => log::info!(
                "output: some nodes do not see {}: tasks write node-locally and their logs and outputs \
                 are sent to rank 0 (returned mode)",
                job.output_dir.display()
            ),
            (_, OutputMode::Returned) => log::info!("output: returned mode (output = \"returned\")"),
            _ => {}
        }
    }
    if mode != OutputMode::Returned {
        return Ok(None);
    }
    let root = match &job.stage_dir {
        Some(dir) => dir.clone(),
        None => store::default_root(&store::node_tmp().map_err(|e| e.to_string())?, job),
    };
    let local = root.join(LOCAL_DIR);
    // Under a shared /tmp, another user could have made the per-user directory first.
    let user_dir = job.stage_dir.is_none().then(|| root.parent()).flatten();
    for dir in user_dir.into_iter().chain([root.as_path(), local.as_path()]) {
        store::ensure_private_dir(dir).map_err(|e| e.to_string())?;
    }
    // An earlier run's attempt directories would stop this run's attempts of the same number
    // from starting, and nothing here needs to outlive a run: rank 0 has every file, and sends
    // checkpoints back itself. No task runs yet: staging, a collective, comes first.
    // Several ranks of a node clear it at once: what one removed, another finds gone.
    let tasks = layout::tasks(&local);
    if let Err(e) = std::fs::remove_dir_all(&tasks)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        log::warn!("cannot clear {} ({e}): attempts whose directory is left there will not start", tasks.display());
    }
    Ok(Some(local))
}

/// Rank 0 writes a marker in the output directory; each node's leader looks for it there.
fn every_node_sees_marker(world: &SimpleCommunicator, job: &Job) -> bool {
    let root = world.process_at_rank(0);
    let mut name = if world.rank() == 0 { write_marker(job) } else { Vec::new() };
    let mut len = name.len() as u64;
    root.broadcast_into(&mut len);
    name.resize(len as usize, 0);
    root.broadcast_into(&mut name[..]);
    let node = world.split_shared(world.rank());
    let marker = job.output_dir.join(String::from_utf8_lossy(&name).as_ref());
    // A marker rank 0 could not write counts as unseen: returned mode needs nothing of it.
    let blind = u32::from(node.rank() == 0 && (name.is_empty() || !marker.is_file()));
    let mut blind_nodes = 0u32;
    world.all_reduce_into(&blind, &mut blind_nodes, SystemOperation::sum());
    if world.rank() == 0 && !name.is_empty() {
        let _ = std::fs::remove_file(&marker);
    }
    blind_nodes == 0
}

fn write_marker(job: &Job) -> Vec<u8> {
    let name = format!(".dlaunch-marker-{}-{}", std::process::id(), nanos());
    let written = beneath::open_root(&job.output_dir).and_then(|dir| beneath::create_new(&dir, &name, 0o600));
    match written {
        Ok(_) => name.into_bytes(),
        Err(e) => {
            log::warn!("cannot write a marker in {}: {e}", job.output_dir.display());
            Vec::new()
        }
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}
