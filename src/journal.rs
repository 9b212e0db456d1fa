//! The journal: one JSON event per line, appended by rank 0, read back to resume.
//!
//! Lines are written as they happen (a killed dlaunch loses nothing the kernel has), and
//! flushed to disk with fdatasync at most every `SYNC_INTERVAL`, so durability does not cap
//! dispatch throughput. A torn last line — dlaunch killed mid-write — is dropped on reading.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::events::Event;

const SYNC_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: another dlaunch is running with this output directory (the journal is locked)")]
    Locked { path: PathBuf },
}

pub struct Journal {
    path: PathBuf,
    writer: BufWriter<File>,
    /// Held for the journal's life: one dlaunch per output directory.
    _lock: Flock<File>,
    dirty: bool,
    last_sync: Instant,
    /// Bytes of complete lines in the file: where a reader of the events so far stops.
    len: u64,
}

impl Journal {
    /// Opens (creating, owner-only) and locks the journal; returns it with the events already in it.
    pub fn open(path: &Path) -> Result<(Journal, Vec<Event>), JournalError> {
        let io_error = |source| JournalError::Io { path: path.to_path_buf(), source };
        let file = OpenOptions::new().read(true).append(true).create(true).mode(0o600).open(path).map_err(io_error)?;
        let mut file = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| JournalError::Locked { path: path.to_path_buf() })?;
        let mut text = Vec::new();
        file.seek(SeekFrom::Start(0)).and_then(|_| file.read_to_end(&mut text)).map_err(io_error)?;
        let (events, good_len) = parse(&text, path);
        if good_len < text.len() {
            log::warn!("{}: dropping a torn last line ({} bytes)", path.display(), text.len() - good_len);
            file.set_len(good_len as u64).map_err(io_error)?;
        }
        let writer = BufWriter::new(file.try_clone().map_err(io_error)?);
        let journal = Journal {
            path: path.to_path_buf(),
            writer,
            _lock: file,
            dirty: false,
            last_sync: Instant::now(),
            len: good_len as u64,
        };
        Ok((journal, events))
    }

    pub fn append(&mut self, event: &Event) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(event).map_err(|e| self.error(io::Error::other(e)))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(|e| self.error(e))?;
        self.dirty = true;
        self.len += line.len() as u64;
        Ok(())
    }

    /// The journal's length after the lines appended so far (flushed or not).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hands buffered lines to the kernel, and syncs them to disk when the interval has passed
    /// or `force` is set.
    pub fn flush(&mut self, force: bool) -> Result<(), JournalError> {
        if !self.dirty {
            return Ok(());
        }
        self.writer.flush().map_err(|e| self.error(e))?;
        if force || self.last_sync.elapsed() >= SYNC_INTERVAL {
            self.writer.get_ref().sync_data().map_err(|e| self.error(e))?;
            self.last_sync = Instant::now();
            self.dirty = false;
        }
        Ok(())
    }

    fn error(&self, source: io::Error) -> JournalError {
        JournalError::Io { path: self.path.clone(), source }
    }
}

/// Reads the events of a journal without locking it (for tests and reports).
pub fn read(path: &Path) -> io::Result<Vec<Event>> {
    let text = std::fs::read(path)?;
    Ok(parse(&text, path).0)
}

/// The events, and how many bytes of `text` hold complete lines.
pub fn parse(text: &[u8], path: &Path) -> (Vec<Event>, usize) {
    let mut events = Vec::new();
    let mut offset = 0;
    let mut good_len = 0;
    for (number, line) in text.split_inclusive(|&b| b == b'\n').enumerate() {
        offset += line.len();
        let complete = line.ends_with(b"\n");
        match serde_json::from_slice::<Event>(line) {
            Ok(event) if complete => {
                events.push(event);
                good_len = offset;
            }
            _ if !complete => break,
            Ok(_) => {}
            Err(e) => {
                log::warn!("{}:{}: skipping an unreadable journal line: {e}", path.display(), number + 1);
                good_len = offset;
            }
        }
    }
    (events, good_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(n: usize) -> Event {
        Event::TaskDefined { task: format!("t{n}"), digest: "d".into(), params: Default::default() }
    }

    #[test]
    fn appends_survive_reopen_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        {
            let (mut journal, old) = Journal::open(&path).unwrap();
            assert!(old.is_empty());
            for n in 0..3 {
                journal.append(&event(n)).unwrap();
            }
            journal.flush(true).unwrap();
        }
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"event":"task_defined","task":"t3","dig"#).unwrap();
        drop(file);
        let (mut journal, events) = Journal::open(&path).unwrap();
        assert_eq!(events, [event(0), event(1), event(2)]);
        journal.append(&event(4)).unwrap();
        journal.flush(true).unwrap();
        drop(journal);
        assert_eq!(read(&path).unwrap(), [event(0), event(1), event(2), event(4)]);
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let (_first, _) = Journal::open(&path).unwrap();
        assert!(matches!(Journal::open(&path), Err(JournalError::Locked { .. })));
    }

    #[test]
    fn garbage_in_the_middle_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let good = serde_json::to_string(&event(1)).unwrap();
        std::fs::write(&path, format!("{good}\nnot json\n{good}\n")).unwrap();
        assert_eq!(read(&path).unwrap().len(), 2);
    }
}
