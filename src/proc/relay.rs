//! A task's stdout and stderr go through pipes to the rank's relay thread, which waits on every
//! pipe at once (epoll) and writes what comes to each stream's sink (a log file created on the
//! first byte, or the rank's framed log), keeping at most `log_limit` bytes of each.
//!
//! With the files handed to the task directly, a limit can only be checked after the fact: a
//! task writing 1 GB/s overshot any polling interval, and one ignoring the stop signal kept
//! writing through the grace period (5 GB against 1 MiB). Here the limit holds by
//! construction: past it the relay writes a one-line note, stops reading that pipe, and the
//! task's next writes block once the pipe is full until dlaunch stops it. A log that cannot be
//! written (a full disk) is reported, not the task's fault.
//!
//! One thread for the rank, not two per task: starting and ending two threads around every
//! process cost the worker rank thread creations, exits and wake-ups that compete with the
//! tasks for the CPUs (`docs/performance.md`, issue 15). A waiting relay costs no CPU, and the
//! worker's loop never reads a pipe or writes a log itself, so a slow file system stalls the
//! logs, not the loop. Each round reads at most once from each ready pipe: a task that prints
//! a lot cannot starve the others' logs.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use super::sink::Sink;

/// What is appended to a log cut at its limit; its length is the documented margin.
pub const CUT_NOTE: &str = "\n[dlaunch: log_limit reached, later output discarded]\n";

const BUFFER: usize = 64 << 10;

/// The relay needs little stack: its buffer lives on the heap.
const THREAD_STACK: usize = 128 << 10;

/// The epoll token of the relay's wake-up eventfd; streams count up from 0.
const WAKE: u64 = u64::MAX;

/// One stream's copy, as the relay reports it and `Logs::close` ends it.
#[derive(Default)]
struct Progress {
    /// Bytes read from the task, whether kept or not.
    received: AtomicU64,
    /// Why the log could not be written.
    error: Mutex<Option<String>>,
    /// The relay stopped reading (limit, write error) and keeps the pipe open until closing.
    stopped: AtomicBool,
    /// `Logs::close` was called: a stream that stops from now on is dropped at once.
    closing: AtomicBool,
}

/// A pipe to copy from, and where to.
pub struct Copy {
    pub pipe: File,
    pub sink: Sink,
}

enum Command {
    Add {
        token: u64,
        stream: Box<Stream>,
    },
    /// Drops a stream that stopped reading: its pipe closes, its writers get EPIPE.
    Release {
        token: u64,
    },
    Shutdown,
}

/// What the relay thread and the worker share.
struct Shared {
    epoll: Epoll,
    wake: EventFd,
    commands: Mutex<Vec<Command>>,
}

impl Shared {
    /// Queues `command` for the relay's next round, without waking it.
    fn queue(&self, command: Command) {
        self.commands.lock().unwrap_or_else(|e| e.into_inner()).push(command);
    }

    fn command(&self, command: Command) {
        self.queue(command);
        if let Err(e) = self.wake.write(1) {
            log::warn!("cannot wake the log relay: {e}");
        }
    }
}

/// The rank's relay: a thread copying every process's stdout and stderr. Dropping it ends the
/// thread.
pub struct Relay {
    shared: Arc<Shared>,
    next_token: u64,
}

impl Relay {
    pub fn start() -> io::Result<Relay> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let wake = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        epoll.add(&wake, EpollEvent::new(EpollFlags::EPOLLIN, WAKE))?;
        let shared = Arc::new(Shared { epoll, wake, commands: Mutex::new(Vec::new()) });
        let relay = Arc::clone(&shared);
        std::thread::Builder::new().name("dlaunch-log".into()).stack_size(THREAD_STACK).spawn(move || run(&relay))?;
        Ok(Relay { shared, next_token: 0 })
    }

    /// Starts copying one process's stdout and stderr.
    pub fn copy(&mut self, stdout: Copy, stderr: Copy, limit: Option<u64>) -> io::Result<Logs> {
        let streams = [self.add(stdout, limit)?, self.add(stderr, limit)?];
        Ok(Logs { streams, shared: Arc::clone(&self.shared) })
    }

    fn add(&mut self, copy: Copy, limit: Option<u64>) -> io::Result<Handle> {
        let token = self.next_token;
        self.next_token += 1;
        let progress = Arc::new(Progress::default());
        let (finished, done) = mpsc::channel();
        let pipe = Arc::new(copy.pipe);
        let stream = Stream {
            pipe: Arc::clone(&pipe),
            sink: copy.sink,
            limit,
            kept: 0,
            progress: Arc::clone(&progress),
            _finished: finished,
        };
        // Queued before the pipe is watched, so the relay knows the stream by its first event;
        // no wake-up needed, that event is one.
        self.shared.queue(Command::Add { token, stream: Box::new(stream) });
        if let Err(e) = self.shared.epoll.add(&*pipe, EpollEvent::new(EpollFlags::EPOLLIN, token)) {
            self.shared.command(Command::Release { token });
            return Err(e.into());
        }
        Ok(Handle { token, progress, done })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.shared.command(Command::Shutdown);
    }
}

/// One stream as the worker sees it.
struct Handle {
    token: u64,
    progress: Arc<Progress>,
    /// Disconnects when the relay is done with the stream.
    done: Receiver<()>,
}

/// The copies of one process's stdout and stderr.
pub struct Logs {
    streams: [Handle; 2],
    shared: Arc<Shared>,
}

impl Logs {
    /// Bytes the task wrote to stdout and stderr, and the first error writing either log.
    pub fn state(&self) -> (u64, u64, Option<String>) {
        let [out, err] = &self.streams;
        let error = |s: &Handle| s.progress.error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let received = |s: &Handle| s.progress.received.load(Ordering::Relaxed);
        (received(out), received(err), error(out).or_else(|| error(err)))
    }

    /// The process has ended: waits up to `wait` for the output still in the pipes to reach the
    /// logs (a stream ends when every writer is gone), then leaves the rest to the relay.
    pub fn close(self, wait: Duration) {
        let until = Instant::now() + wait;
        for stream in &self.streams {
            // Either this sees the relay's `stopped`, or the relay sees `closing` (both SeqCst):
            // a stopped stream is never left waiting for a release that does not come.
            stream.progress.closing.store(true, Ordering::SeqCst);
            if stream.progress.stopped.load(Ordering::SeqCst) {
                self.shared.command(Command::Release { token: stream.token });
            }
        }
        for stream in &self.streams {
            let left = until.saturating_duration_since(Instant::now());
            if let Err(RecvTimeoutError::Timeout) = stream.done.recv_timeout(left) {
                log::debug!("a log pipe is still held open by a process of an ended task");
            }
        }
    }
}

/// A stream as the relay holds it; dropping it closes the pipe and tells `Logs::close`.
struct Stream {
    pipe: Arc<File>,
    sink: Sink,
    limit: Option<u64>,
    kept: u64,
    progress: Arc<Progress>,
    _finished: Sender<()>,
}

/// What one read of a ready pipe came to.
enum Step {
    More,
    /// Every writer is gone, or the pipe failed.
    Ended,
    /// Past the limit, or the log cannot be written: stop reading.
    Stopped,
}

impl Stream {
    fn copy_once(&mut self, buffer: &mut [u8]) -> Step {
        let n = match (&*self.pipe).read(buffer) {
            Ok(0) => return Step::Ended,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Step::More,
            Err(e) => {
                self.fail(format!("cannot read the task's output for {}: {e}", self.sink.path().display()));
                return Step::Ended;
            }
        };
        self.progress.received.fetch_add(n as u64, Ordering::Relaxed);
        let room = self.limit.map_or(n, |limit| limit.saturating_sub(self.kept).min(n as u64) as usize);
        let note: &[u8] = if room < n { CUT_NOTE.as_bytes() } else { b"" };
        let written = self.sink.write(&[&buffer[..room], note]);
        self.kept += room as u64;
        if let Err(e) = &written {
            self.fail(format!("cannot write {}: {e}", self.sink.path().display()));
        }
        // Stop reading: the task blocks on a full pipe until dlaunch, told by the counts or
        // the error, stops it and closes the logs.
        if written.is_err() || room < n { Step::Stopped } else { Step::More }
    }

    fn fail(&self, message: String) {
        *self.progress.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
    }
}

fn run(shared: &Shared) {
    let mut reading: HashMap<u64, Box<Stream>> = HashMap::new();
    let mut stopped: HashMap<u64, Box<Stream>> = HashMap::new();
    let mut buffer = vec![0u8; BUFFER];
    let mut events = [EpollEvent::empty(); 64];
    loop {
        let ready = match shared.epoll.wait(&mut events, EpollTimeout::NONE) {
            Ok(n) => n,
            Err(Errno::EINTR) => continue,
            Err(e) => {
                log::error!("the log relay stopped: epoll_wait: {e}; tasks' output is no longer kept");
                return;
            }
        };
        let commands = std::mem::take(&mut *shared.commands.lock().unwrap_or_else(|e| e.into_inner()));
        for command in commands {
            match command {
                Command::Add { token, stream } => {
                    reading.insert(token, stream);
                }
                Command::Release { token } => {
                    if let Some(stream) = reading.remove(&token) {
                        let _ = shared.epoll.delete(&*stream.pipe);
                    }
                    stopped.remove(&token);
                }
                Command::Shutdown => return,
            }
        }
        for event in &events[..ready] {
            let token = event.data();
            if token == WAKE {
                let _ = shared.wake.read();
                continue;
            }
            let Some(stream) = reading.get_mut(&token) else { continue };
            let step = stream.copy_once(&mut buffer);
            if matches!(step, Step::More) {
                continue;
            }
            let Some(stream) = reading.remove(&token) else { continue };
            let _ = shared.epoll.delete(&*stream.pipe);
            if matches!(step, Step::Stopped) {
                stream.progress.stopped.store(true, Ordering::SeqCst);
                if !stream.progress.closing.load(Ordering::SeqCst) {
                    stopped.insert(token, stream);
                }
            }
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
        let mut relay = Relay::start().unwrap();
        let logs = relay.copy(out, err, None).unwrap();
        drop(out_writer);
        err_writer.write_all(b"only here\n").unwrap();
        drop(err_writer);
        logs.close(Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(dir.path().join("logs/err")).unwrap(), "only here\n");
        assert!(!dir.path().join("logs/out").exists());

        let (out, out_writer) = copy(dir.path(), "silent");
        let (err, err_writer) = copy(dir.path(), "quiet");
        let logs = relay.copy(out, err, Some(10)).unwrap();
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
        let mut relay = Relay::start().unwrap();
        let logs = relay.copy(out, err, Some(1000)).unwrap();
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
        let mut relay = Relay::start().unwrap();
        let logs = relay.copy(out, err, None).unwrap();
        out_writer.write_all(b"last words\n").unwrap();
        drop((out_writer, err_writer));
        logs.close(Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(dir.path().join("logs/out")).unwrap(), "last words\n");
    }

    #[test]
    fn a_pipe_held_open_delays_close_only_by_its_wait_and_what_comes_later_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (out, mut out_writer) = copy(dir.path(), "out");
        let (err, err_writer) = copy(dir.path(), "err");
        let mut relay = Relay::start().unwrap();
        let logs = relay.copy(out, err, None).unwrap();
        drop(err_writer);
        // A process that escaped its task still holds stdout.
        let start = Instant::now();
        logs.close(Duration::from_millis(200));
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(200) && waited < Duration::from_secs(5), "{waited:?}");
        out_writer.write_all(b"late\n").unwrap();
        drop(out_writer);
        let log = dir.path().join("logs/out");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read(&log).ok().as_deref() != Some(b"late\n") && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "late\n");
    }

    #[test]
    fn a_task_that_prints_without_pause_does_not_hold_up_the_others_logs() {
        let dir = tempfile::tempdir().unwrap();
        let mut relay = Relay::start().unwrap();
        let (loud, mut loud_writer) = copy(dir.path(), "loud");
        let (loud_err, _loud_err_writer) = copy(dir.path(), "loud-err");
        let loud_logs = relay.copy(loud, loud_err, None).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let flood = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = loud_writer.write_all(&[b'x'; BUFFER]);
                }
            })
        };
        let (quiet, mut quiet_writer) = copy(dir.path(), "quiet");
        let (quiet_err, quiet_err_writer) = copy(dir.path(), "quiet-err");
        let quiet_logs = relay.copy(quiet, quiet_err, None).unwrap();
        quiet_writer.write_all(b"hello\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while quiet_logs.state().0 < 6 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(quiet_logs.state().0, 6, "the quiet stream was read while the loud one flooded");
        assert!(loud_logs.state().0 > 0);
        stop.store(true, Ordering::Relaxed);
        drop((quiet_writer, quiet_err_writer));
        quiet_logs.close(Duration::from_secs(5));
        assert_eq!(std::fs::read_to_string(dir.path().join("logs/quiet")).unwrap(), "hello\n");
        flood.join().unwrap();
    }
}
