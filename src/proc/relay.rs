//! A task's stdout and stderr go through pipes to a thread per stream that writes them to their
//! sink (a log file created on the first byte, or the rank's framed log), keeping at most
//! `log_limit` bytes of each.
//!
//! With the files handed to the task directly, a limit can only be checked after the fact: a
//! task writing 1 GB/s overshot any polling interval, and one ignoring the stop signal kept
//! writing through the grace period (5 GB against 1 MiB). Here the limit holds by
//! construction: past it the thread writes a one-line note, stops reading, and the task's
//! next writes block once the pipe is full until dlaunch stops it. A thread that is blocked
//! in read(2) or waiting costs no CPU, and the worker's loop stays as it was. A log that
//! cannot be written (a full disk) is reported, not the task's fault.

use std::fs::File;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::sink::Sink;

/// What is appended to a log cut at its limit; its length is the documented margin.
pub const CUT_NOTE: &str = "\n[dlaunch: log_limit reached, later output discarded]\n";

const BUFFER: usize = 64 << 10;

/// The copy threads need little stack: their buffer lives on the heap.
const THREAD_STACK: usize = 128 << 10;

/// One stream's copy, as its thread reports it.
#[derive(Default)]
struct Progress {
    /// Bytes read from the task, whether kept or not.
    received: AtomicU64,
    /// Why the log could not be written.
    error: Mutex<Option<String>>,
}

struct Stream {
    progress: Arc<Progress>,
    /// Dropped to tell a thread that stopped reading (limit, write error) to end.
    release: Option<Sender<()>>,
    /// Disconnects when the thread ends.
    done: Receiver<()>,
}

/// The copies of one process's stdout and stderr.
pub struct Logs {
    streams: [Stream; 2],
}

/// A pipe to copy from, and where to.
pub struct Copy {
    pub pipe: File,
    pub sink: Sink,
}

impl Logs {
    /// Starts a thread per stream.
    pub fn start(stdout: Copy, stderr: Copy, limit: Option<u64>) -> io::Result<Logs> {
        Ok(Logs { streams: [start(stdout, limit)?, start(stderr, limit)?] })
    }

    /// Bytes the task wrote to stdout and stderr, and the first error writing either log.
    pub fn state(&self) -> (u64, u64, Option<String>) {
        let [out, err] = &self.streams;
        let error = |s: &Stream| s.progress.error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let received = |s: &Stream| s.progress.received.load(Ordering::Relaxed);
        (received(out), received(err), error(out).or_else(|| error(err)))
    }

    /// The process has ended: waits up to `wait` for the output still in the pipes to reach the
    /// files (it ends when every writer is gone), then lets the threads go.
    pub fn close(mut self, wait: Duration) {
        let until = Instant::now() + wait;
        for stream in &mut self.streams {
            stream.release = None;
            let left = until.saturating_duration_since(Instant::now());
            if let Err(RecvTimeoutError::Timeout) = stream.done.recv_timeout(left) {
                log::debug!("a log pipe is still held open by a process of an ended task");
            }
        }
    }
}

fn start(copy: Copy, limit: Option<u64>) -> io::Result<Stream> {
    let progress = Arc::new(Progress::default());
    let (release, released) = mpsc::channel();
    let (finished, done) = mpsc::channel();
    let shared = Arc::clone(&progress);
    std::thread::Builder::new().name("dlaunch-log".into()).stack_size(THREAD_STACK).spawn(move || {
        run(copy, limit, &shared, &released);
        drop(finished);
    })?;
    Ok(Stream { progress, release: Some(release), done })
}

fn run(mut copy: Copy, limit: Option<u64>, progress: &Progress, released: &Receiver<()>) {
    let mut buffer = vec![0u8; BUFFER];
    let mut kept = 0u64;
    loop {
        let n = match copy.pipe.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                *progress.error.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("cannot read the task's output for {}: {e}", copy.sink.path().display()));
                return;
            }
        };
        progress.received.fetch_add(n as u64, Ordering::Relaxed);
        let room = limit.map_or(n, |limit| limit.saturating_sub(kept).min(n as u64) as usize);
        let note: &[u8] = if room < n { CUT_NOTE.as_bytes() } else { b"" };
        let written = copy.sink.write(&[&buffer[..room], note]);
        kept += room as u64;
        if let Err(e) = &written {
            *progress.error.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(format!("cannot write {}: {e}", copy.sink.path().display()));
        }
        if written.is_err() || room < n {
            // Stop reading: the task blocks on a full pipe until dlaunch, told by the counts
            // or the error, stops it and closes the logs.
            let _ = released.recv();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::super::sink::LogDir;
    use super::*;

    fn pipe() -> (File, File) {
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        (File::from(read), File::from(write))
    }

    /// A copy into `<dir>/logs/<name>`.
    fn copy(dir: &std::path::Path, name: &'static str) -> (Copy, File) {
        let (read, write) = pipe();
        let logs = LogDir::new(dir, std::path::Path::new("logs"), Default::default());
        (Copy { pipe: read, sink: Sink::File { dir: logs, name, file: None } }, write)
    }

    #[test]
    fn nothing_is_created_for_a_stream_that_stays_silent() {
        let dir = tempfile::tempdir().unwrap();
        let (out, out_writer) = copy(dir.path(), "out");
        let (err, mut err_writer) = copy(dir.path(), "err");
        let logs = Logs::start(out, err, None).unwrap();
        drop(out_writer);
        err_writer.write_all(b"only here\n").unwrap();
        drop(err_writer);
        logs.close(Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(dir.path().join("logs/err")).unwrap(), "only here\n");
        assert!(!dir.path().join("logs/out").exists());

        let (out, out_writer) = copy(dir.path(), "silent");
        let (err, err_writer) = copy(dir.path(), "quiet");
        let logs = Logs::start(out, err, Some(10)).unwrap();
        drop((out_writer, err_writer));
        logs.close(Duration::from_secs(5));
        let names: Vec<_> =
            std::fs::read_dir(dir.path().join("logs")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["err"]);
    }

    #[test]
    fn output_past_the_limit_is_cut_with_a_note_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (out, mut out_writer) = copy(dir.path(), "out");
        let (err, err_writer) = copy(dir.path(), "err");
        let logs = Logs::start(out, err, Some(1000)).unwrap();
        out_writer.write_all(&[b'x'; 3000]).unwrap();
        drop(err_writer);
        let deadline = Instant::now() + Duration::from_secs(10);
        while logs.state().0 < 3000 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(logs.state(), (3000, 0, None));
        logs.close(Duration::from_secs(5));
        let text = std::fs::read_to_string(dir.path().join("logs/out")).unwrap();
        assert_eq!(text.len(), 1000 + CUT_NOTE.len());
        assert!(text.ends_with(CUT_NOTE));
        // Another test's child may hold a copy of the read end for a moment (between its
        // fork and exec): the pipe counts as closed once a write fails within a while.
        let deadline = Instant::now() + Duration::from_secs(2);
        while out_writer.write_all(b"more").is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(out_writer.write_all(b"more").is_err(), "the pipe is closed once the logs are");
    }

    #[test]
    fn close_waits_for_what_is_still_in_the_pipe() {
        let dir = tempfile::tempdir().unwrap();
        let (out, mut out_writer) = copy(dir.path(), "out");
        let (err, err_writer) = copy(dir.path(), "err");
        let logs = Logs::start(out, err, None).unwrap();
        out_writer.write_all(b"last words\n").unwrap();
        drop((out_writer, err_writer));
        logs.close(Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(dir.path().join("logs/out")).unwrap(), "last words\n");
    }
}
