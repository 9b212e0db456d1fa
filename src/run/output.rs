//! The output directory on rank 0: created owner-only, set aside with `--fresh`, and holding
//! the journal a resumed run starts from.

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::events::Event;
use crate::journal::{Journal, JournalError};

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("cannot create the output directory {path}: {source}")]
    Create { path: PathBuf, source: std::io::Error },
    #[error("cannot move the old output directory {path} aside to {aside}: {source}")]
    SetAside { path: PathBuf, aside: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Prepares `dir` and opens its journal; returns the journal and the events of earlier runs.
/// With `fresh`, an existing directory is renamed to `<dir>.<timestamp>` first: results are
/// never deleted silently.
pub fn prepare(dir: &Path, fresh: bool) -> Result<(Journal, Vec<Event>), OutputError> {
    if fresh && dir.exists() {
        let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string().replace(':', "");
        let mut aside = dir.as_os_str().to_owned();
        aside.push(format!(".{stamp}"));
        let aside = PathBuf::from(aside);
        std::fs::rename(dir, &aside).map_err(|source| OutputError::SetAside {
            path: dir.to_path_buf(),
            aside: aside.clone(),
            source,
        })?;
        log::info!("--fresh: moved the previous results to {}", aside.display());
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| OutputError::Create { path: dir.to_path_buf(), source })?;
    let opened = Journal::open(&crate::layout::journal(dir))?;
    // `dlaunch cancel` leaves requests only while a run holds the journal: any left now were
    // meant for a run that ended before taking them, not for this one.
    let stale = crate::observe::cancel::take_requests(dir);
    if !stale.is_empty() {
        log::warn!("ignoring {} cancel request(s) left by an earlier run", stale.len());
    }
    Ok(opened)
}
