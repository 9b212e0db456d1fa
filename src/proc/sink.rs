//! Where a task's output goes, created only once there is output: a log file of its own
//! (`logs = "files"`) or records in the rank's framed log (`logs = "framed"`).
//!
//! Nothing is created before the first byte: on Lustre or GPFS every create is a round trip
//! to the metadata server, and most tasks of a big sweep print nothing on at least one stream.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::beneath;
use dlaunch_core::frame::{self, Origin};
use dlaunch_core::layout;
use dlaunch_core::spec::Share;

/// A process's log directory, made by whichever of its streams writes first.
pub struct LogDir {
    output_dir: PathBuf,
    /// Beneath `output_dir`.
    relative: PathBuf,
    share: Share,
    opened: Mutex<Option<OwnedFd>>,
}

impl LogDir {
    pub fn new(output_dir: &Path, relative: &Path, share: Share) -> Arc<LogDir> {
        Arc::new(LogDir {
            output_dir: output_dir.to_path_buf(),
            relative: relative.to_path_buf(),
            share,
            opened: Mutex::new(None),
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.output_dir.join(&self.relative).join(name)
    }

    /// Creates the log `name`: new, never through a link (the directory may be one that the
    /// task made in its own directory, but no file of it is ever written into).
    fn create(&self, name: &str) -> io::Result<File> {
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        let dir = match opened.as_ref() {
            Some(dir) => dir,
            None => {
                let root = beneath::open_root(&self.output_dir)?;
                opened.insert(beneath::make_dirs(&root, &self.relative, self.share.dir_mode(), false)?)
            }
        };
        beneath::create_new(dir, name, self.share.file_mode())
    }
}

/// One file per worker rank holding every task's output as records (`dlaunch_core::frame`).
pub struct FramedLog {
    output_dir: PathBuf,
    stem: String,
    share: Share,
    file: Mutex<Option<(File, PathBuf)>>,
}

impl FramedLog {
    /// `stem`: `rank-<r>` for a worker rank, `returned` for what rank 0 receives.
    pub fn new(output_dir: &Path, stem: String, share: Share) -> Arc<FramedLog> {
        Arc::new(FramedLog { output_dir: output_dir.to_path_buf(), stem, share, file: Mutex::new(None) })
    }

    /// Appends one record with one write under the lock, so records of concurrent streams
    /// never interleave. The file is created on the first record.
    pub fn append(&self, record: &[u8]) -> io::Result<()> {
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let (file, _) = match file.as_mut() {
            Some(open) => open,
            None => file.insert(self.create()?),
        };
        file.write_all(record)
    }

    /// What messages name: the file once created, else where it would be.
    pub fn path(&self) -> PathBuf {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.as_ref().map_or_else(
            || layout::framed_logs(&self.output_dir).join(layout::framed_log_name(&self.stem, 0)),
            |(_, path)| path.clone(),
        )
    }

    /// A new file: the first name no earlier run took.
    fn create(&self) -> io::Result<(File, PathBuf)> {
        let root = beneath::open_root(&self.output_dir)?;
        let relative = layout::framed_logs(Path::new(""));
        let dir = beneath::make_dirs(&root, &relative, self.share.dir_mode(), false)?;
        for run in 0.. {
            let name = layout::framed_log_name(&self.stem, run);
            match beneath::create_new(&dir, &name, self.share.file_mode()) {
                Ok(file) => return Ok((file, layout::framed_logs(&self.output_dir).join(name))),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::other(format!("no free name for {} in {}", self.stem, relative.display())))
    }
}

/// Where one stream of one process goes.
pub enum Sink {
    File { dir: Arc<LogDir>, name: &'static str, file: Option<File> },
    Framed { log: Arc<FramedLog>, origin: Origin },
}

impl Sink {
    /// Writes `parts` one after the other (as one record when framed).
    pub fn write(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        match self {
            Sink::File { dir, name, file } => {
                let file = match file {
                    Some(file) => file,
                    None => file.insert(dir.create(name)?),
                };
                parts.iter().try_for_each(|part| file.write_all(part))
            }
            Sink::Framed { log, origin } => log.append(&frame::encode(origin, parts)),
        }
    }

    /// For messages.
    pub fn path(&self) -> PathBuf {
        match self {
            Sink::File { dir, name, .. } => dir.path(name),
            Sink::Framed { log, .. } => log.path(),
        }
    }
}
