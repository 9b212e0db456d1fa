//! The output directory on rank 0: created owner-only, set aside with `--fresh`, and holding
//! the journal a resumed run starts from.

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::journal::{Journal, JournalError};
use dlaunch_core::events::Event;
use dlaunch_core::layout;
use dlaunch_core::summary::Summary;

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
    Ok(Journal::open(&dlaunch_core::layout::journal(dir))?)
}

/// Writes `summary.json` under a temporary name first: a reader never sees half of it.
pub fn write_summary(summary: &Summary, output_dir: &Path) -> std::io::Result<PathBuf> {
    let path = layout::summary(output_dir);
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(summary).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}
