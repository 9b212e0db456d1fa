//! Signals as data: a handler records which stop signal arrived and wakes the main loop through
//! a pipe, so ranks can sleep in `poll(2)` instead of spinning and still react at once to a
//! finished child (SIGCHLD) or a request to stop (SIGTERM, SIGINT, SIGUSR1/2 from SLURM).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, ppoll};
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use nix::sys::time::TimeSpec;

use dlaunch_core::worker::STOP_SIGNALS;

static STOP_REQUESTED: AtomicI32 = AtomicI32::new(0);
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: nix::libc::c_int) {
    if signal != nix::libc::SIGCHLD {
        STOP_REQUESTED.store(signal, Ordering::SeqCst);
    }
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        // write(2) is async-signal-safe; a full pipe already means "wake up".
        unsafe { nix::libc::write(fd, [1u8].as_ptr().cast(), 1) };
    }
}

/// The read end of the wake-up pipe; dropping it does not uninstall the handlers, so keep it
/// for the life of the process.
pub struct Waker {
    read: OwnedFd,
    _write: OwnedFd,
}

/// Installs the handlers. Call once, early.
pub fn install() -> nix::Result<Waker> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    WAKE_FD.store(write.as_raw_fd(), Ordering::SeqCst);
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    let stop = STOP_SIGNALS.iter().filter_map(|&n| Signal::try_from(n).ok());
    for signal in stop.chain([Signal::SIGCHLD]) {
        // Safety: the handler only touches atomics and calls write(2).
        unsafe { sigaction(signal, &action) }?;
    }
    Ok(Waker { read, _write: write })
}

/// The stop signal received, if any (taken: reported once).
pub fn take_stop_request() -> Option<Signal> {
    match STOP_REQUESTED.swap(0, Ordering::SeqCst) {
        0 => None,
        n => Signal::try_from(n).ok(),
    }
}

impl Waker {
    /// Sleeps until a signal arrives or `timeout` passes, without using CPU. ppoll, not poll:
    /// poll counts in whole milliseconds, and a 200 µs pause rounded to 0 would be a busy loop.
    pub fn sleep(&self, timeout: Duration) {
        let mut fds = [PollFd::new(self.read.as_fd(), PollFlags::POLLIN)];
        match ppoll(&mut fds, Some(TimeSpec::from_duration(timeout)), None) {
            Ok(n) if n > 0 => self.drain(),
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => log::debug!("poll: {e}"),
        }
    }

    fn drain(&self) {
        let mut buf = [0u8; 64];
        while matches!(nix::unistd::read(&self.read, &mut buf), Ok(n) if n > 0) {}
    }
}

/// Sleep lengths between polls. They start short and grow while nothing happens, up to a cap
/// that depends on how recently something did: while messages flow (a stream of short tasks)
/// a peer's answer is due any moment, so sleeps stay under a millisecond; after a quiet second
/// (long tasks running) a rank wakes only 20 times a second, using next to no CPU.
#[derive(Debug)]
pub struct Backoff {
    current: Duration,
    last_activity: Instant,
}

impl Backoff {
    const MIN: Duration = Duration::from_micros(50);
    const HOT_MAX: Duration = Duration::from_micros(200);
    const MAX: Duration = Duration::from_millis(50);
    /// How long after the last activity a rank counts as busy.
    const HOT_PERIOD: Duration = Duration::from_secs(1);

    pub fn new() -> Self {
        Backoff { current: Self::MIN, last_activity: Instant::now() }
    }

    /// Something happened: answer the next thing fast.
    pub fn reset(&mut self) {
        self.current = Self::MIN;
        self.last_activity = Instant::now();
    }

    pub fn next_pause(&mut self) -> Duration {
        let cap = if self.last_activity.elapsed() < Self::HOT_PERIOD { Self::HOT_MAX } else { Self::MAX };
        let pause = self.current.min(cap);
        self.current = (self.current * 2).min(cap);
        pause
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleep_really_sleeps_below_a_millisecond() {
        let waker = install().unwrap();
        let start = Instant::now();
        for _ in 0..100 {
            waker.sleep(Duration::from_micros(200));
        }
        assert!(start.elapsed() >= Duration::from_millis(20), "100 × 200 µs took {:?}", start.elapsed());
    }

    #[test]
    fn backoff_stays_short_while_busy_and_grows_when_quiet() {
        let mut b = Backoff::new();
        let first = b.next_pause();
        let steps: Vec<Duration> = (0..20).map(|_| b.next_pause()).collect();
        assert!(steps.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*steps.last().unwrap(), Backoff::HOT_MAX, "recently active: short sleeps");
        b.last_activity = Instant::now() - Backoff::HOT_PERIOD;
        let steps: Vec<Duration> = (0..20).map(|_| b.next_pause()).collect();
        assert_eq!(*steps.last().unwrap(), Backoff::MAX, "quiet for a while: long sleeps");
        b.reset();
        assert_eq!(b.next_pause(), first);
    }
}
