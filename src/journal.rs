//! The journal file: appended by rank 0, read back to resume. Its format (a versioned header,
//! one JSON event per line) is the core's `journal`.
//!
//! Lines are written as they happen (a killed dlaunch loses nothing the kernel has), and
//! flushed to disk with fdatasync at most every `SYNC_INTERVAL`, so durability does not cap
//! dispatch throughput. The fdatasync runs on a thread of its own (`Syncer`): the loop that
//! writes a line before it sends the order it records (docs/design.md) hands the line to the
//! kernel and goes on, instead of waiting for the disk (a median 1 ms here, but up to 72 ms,
//! and more on a busy parallel filesystem). A torn last line — dlaunch killed mid-write — is
//! dropped on reading.

use std::fs::{File, OpenOptions, Permissions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg, OFlag};

use dlaunch_core::events::Event;
use dlaunch_core::journal::{self as format, FormatError, Parsed};

const SYNC_INTERVAL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: another dlaunch is running with this output directory (the journal is locked)")]
    Locked { path: PathBuf },
    #[error("{path}: {source}")]
    Format { path: PathBuf, source: FormatError },
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
    syncer: Syncer,
}

impl Journal {
    /// Opens (creating it with `mode`; never through a link) and locks the journal; returns it
    /// with the events already in it.
    pub fn open(path: &Path, mode: u32) -> Result<(Journal, Vec<Event>), JournalError> {
        let io_error = |source| JournalError::Io { path: path.to_path_buf(), source };
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(mode)
            .custom_flags(OFlag::O_NOFOLLOW.bits())
            .open(path)
            .map_err(io_error)?;
        let mut file = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| JournalError::Locked { path: path.to_path_buf() })?;
        // A journal from a run with another `share` setting gets this run's mode.
        file.set_permissions(Permissions::from_mode(mode)).map_err(io_error)?;
        let mut text = Vec::new();
        file.seek(SeekFrom::Start(0)).and_then(|_| file.read_to_end(&mut text)).map_err(io_error)?;
        let parsed = parse(&text, path)?;
        if parsed.good_len < text.len() {
            log::warn!("{}: dropping a torn last line ({} bytes)", path.display(), text.len() - parsed.good_len);
            file.set_len(parsed.good_len as u64).map_err(io_error)?;
        }
        let mut writer = BufWriter::new(file.try_clone().map_err(io_error)?);
        let new = parsed.good_len == 0;
        let mut len = parsed.good_len as u64;
        if new {
            let header = format::header_line();
            writer.write_all(&header).map_err(io_error)?;
            len = header.len() as u64;
        }
        let syncer = Syncer::start(file.try_clone().map_err(io_error)?).map_err(io_error)?;
        let journal = Journal {
            path: path.to_path_buf(),
            writer,
            _lock: file,
            dirty: new,
            last_sync: Instant::now(),
            len,
            syncer,
        };
        Ok((journal, parsed.events))
    }

    pub fn append(&mut self, event: &Event) -> Result<(), JournalError> {
        let mut line = serde_json::to_vec(event).map_err(|e| self.error(io::Error::other(e)))?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(|e| self.error(e))?;
        self.dirty = true;
        self.len += line.len() as u64;
        Ok(())
    }

    /// Appends a line as another rank wrote it for the journal (a node's leader, `layout =
    /// "nodes"`): one event's JSON, ended here with a newline if it lacks one.
    pub fn append_line(&mut self, line: &[u8]) -> Result<(), JournalError> {
        self.writer.write_all(line).map_err(|e| self.error(e))?;
        self.len += line.len() as u64;
        if !line.ends_with(b"\n") {
            self.writer.write_all(b"\n").map_err(|e| self.error(e))?;
            self.len += 1;
        }
        self.dirty = true;
        Ok(())
    }

    /// The journal's length after the lines appended so far (flushed or not).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Hands buffered lines to the kernel, and has them synced to disk when the interval has
    /// passed (on the syncer's thread: this returns at once) or, waiting for it, when `force`
    /// is set. A sync that failed is reported by the next call.
    pub fn flush(&mut self, force: bool) -> Result<(), JournalError> {
        if let Some(e) = self.syncer.failed() {
            return Err(self.error(e));
        }
        if !self.dirty {
            return Ok(());
        }
        self.writer.flush().map_err(|e| self.error(e))?;
        if force {
            self.writer.get_ref().sync_data().map_err(|e| self.error(e))?;
        } else if self.last_sync.elapsed() >= SYNC_INTERVAL {
            self.syncer.ask();
        } else {
            return Ok(());
        }
        self.last_sync = Instant::now();
        self.dirty = false;
        Ok(())
    }

    fn error(&self, source: io::Error) -> JournalError {
        JournalError::Io { path: self.path.clone(), source }
    }
}

/// Runs fdatasync on the journal when asked, on a thread of its own. Asks that come while a
/// sync runs are folded into one more.
struct Syncer {
    shared: Arc<(Mutex<SyncState>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct SyncState {
    asked: bool,
    stop: bool,
    error: Option<io::Error>,
    /// Syncs done, and the time they took: logged when the journal closes.
    syncs: u64,
    waited: Duration,
}

impl Syncer {
    fn start(file: File) -> io::Result<Syncer> {
        let shared = Arc::new((Mutex::new(SyncState::default()), Condvar::new()));
        let theirs = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name("dlaunch-journal-sync".into()).spawn(move || {
            let (state, wake) = &*theirs;
            let mut guard = state.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                while !guard.asked && !guard.stop {
                    guard = wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                if !guard.asked {
                    return;
                }
                guard.asked = false;
                drop(guard);
                let start = Instant::now();
                let synced = file.sync_data();
                guard = state.lock().unwrap_or_else(|e| e.into_inner());
                guard.syncs += 1;
                guard.waited += start.elapsed();
                if let Err(e) = synced {
                    guard.error.get_or_insert(e);
                }
            }
        })?;
        Ok(Syncer { shared, thread: Some(thread) })
    }

    fn ask(&self) {
        let (state, wake) = &*self.shared;
        state.lock().unwrap_or_else(|e| e.into_inner()).asked = true;
        wake.notify_one();
    }

    fn failed(&self) -> Option<io::Error> {
        self.shared.0.lock().unwrap_or_else(|e| e.into_inner()).error.take()
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        let (state, wake) = &*self.shared;
        state.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let state = state.lock().unwrap_or_else(|e| e.into_inner());
        log::debug!("journal: {} fdatasync off the loop, {:?} in all", state.syncs, state.waited);
    }
}

/// Locks an existing journal the way a running dlaunch holds it, without creating one: `None`
/// when there is none.
pub fn lock_existing(path: &Path) -> Result<Option<Flock<File>>, JournalError> {
    let file = match OpenOptions::new().read(true).custom_flags(OFlag::O_NOFOLLOW.bits()).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(JournalError::Io { path: path.to_path_buf(), source }),
    };
    Flock::lock(file, FlockArg::LockExclusiveNonblock)
        .map(Some)
        .map_err(|_| JournalError::Locked { path: path.to_path_buf() })
}

/// Reads the events of a journal without locking it (for tests and reports).
pub fn read(path: &Path) -> Result<Vec<Event>, JournalError> {
    let text = std::fs::read(path).map_err(|source| JournalError::Io { path: path.to_path_buf(), source })?;
    Ok(parse(&text, path)?.events)
}

/// The core's reading of `text`, with one warning for all lines it could not read.
pub fn parse(text: &[u8], path: &Path) -> Result<Parsed, JournalError> {
    let parsed = format::parse(text).map_err(|source| JournalError::Format { path: path.to_path_buf(), source })?;
    if let Some(error) = &parsed.first_error {
        const NAMED: usize = 10;
        let lines: Vec<String> = parsed.unreadable.iter().take(NAMED).map(usize::to_string).collect();
        let more = if parsed.unreadable.len() > NAMED { ", ..." } else { "" };
        log::warn!(
            "{}: skipped {} unreadable lines (line {}{more}; the first: {error}); \
             a newer dlaunch may have written them, or the file was damaged",
            path.display(),
            parsed.unreadable.len(),
            lines.join(", ")
        );
    }
    Ok(parsed)
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
            let (mut journal, old) = Journal::open(&path, 0o600).unwrap();
            assert!(old.is_empty());
            for n in 0..3 {
                journal.append(&event(n)).unwrap();
            }
            journal.flush(true).unwrap();
        }
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"event":"task_defined","task":"t3","dig"#).unwrap();
        drop(file);
        let (mut journal, events) = Journal::open(&path, 0o600).unwrap();
        assert_eq!(events, [event(0), event(1), event(2)]);
        journal.append(&event(4)).unwrap();
        journal.flush(true).unwrap();
        drop(journal);
        assert_eq!(read(&path).unwrap(), [event(0), event(1), event(2), event(4)]);
    }

    #[test]
    fn syncs_run_on_their_own_thread_and_asks_meanwhile_fold_into_one() {
        let dir = tempfile::tempdir().unwrap();
        let syncer = Syncer::start(File::create(dir.path().join("j")).unwrap()).unwrap();
        for _ in 0..1000 {
            syncer.ask();
        }
        let shared = Arc::clone(&syncer.shared);
        drop(syncer);
        let state = shared.0.lock().unwrap();
        assert!((1..1000).contains(&state.syncs), "{} syncs for 1000 asks", state.syncs);
        assert!(state.error.is_none());
    }

    #[test]
    fn a_second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let (_first, _) = Journal::open(&path, 0o600).unwrap();
        assert!(matches!(Journal::open(&path, 0o600), Err(JournalError::Locked { .. })));
    }

    #[test]
    fn a_journal_that_is_a_link_is_not_opened_and_a_live_one_cannot_be_locked() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "precious\n").unwrap();
        let link = dir.path().join("journal.jsonl");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(Journal::open(&link, 0o600).is_err());
        assert!(lock_existing(&link).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
        let path = dir.path().join("real.jsonl");
        assert!(lock_existing(&path).unwrap().is_none(), "no journal, nothing to lock");
        let (_live, _) = Journal::open(&path, 0o600).unwrap();
        assert!(matches!(lock_existing(&path), Err(JournalError::Locked { .. })));
    }

    #[test]
    fn garbage_in_the_middle_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        let good = serde_json::to_string(&event(1)).unwrap();
        std::fs::write(&path, format!("{good}\nnot json\n{good}\n")).unwrap();
        assert_eq!(read(&path).unwrap().len(), 2);
    }

    #[test]
    fn a_new_journal_starts_with_its_format_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("journal.jsonl");
        drop(Journal::open(&path, 0o600).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), format::header_line());
        std::fs::write(&path, "{\"journal\":\"dlaunch\",\"version\":\"9.1\"}\n").unwrap();
        let e = Journal::open(&path, 0o600).err().unwrap();
        assert!(matches!(e, JournalError::Format { source: FormatError::NewerMajor { .. }, .. }), "{e}");
        assert!(e.to_string().starts_with(&format!("{}: written by a newer dlaunch", path.display())), "{e}");
    }
}
