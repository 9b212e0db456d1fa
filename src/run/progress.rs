//! What rank 0 tells people while the job runs, and what it leaves for `dlaunch status`:
//! a live line on a terminal (or a timestamped line every `progress_every` in a batch log), one
//! line per noteworthy event, the view snapshot beside the journal, and `dlaunch cancel`
//! requests picked up from the output directory. All of it runs on the coordinator loop's
//! once-a-second health check: no thread, no extra wake-ups.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::observe::cancel::{CancelRequest, take_requests};
use crate::observe::write_snapshot;
use dlaunch_core::events::Event;
use dlaunch_core::spec::LogMode;
use dlaunch_core::view::{RunView, noteworthy, progress_line};

pub struct Progress {
    output_dir: PathBuf,
    logs: LogMode,
    view: RunView,
    /// On a terminal: the live line.
    bar: Option<ProgressBar>,
    /// In a batch log: a line this often (None: never).
    every: Option<Duration>,
    next_line: Instant,
    /// Events since the last snapshot.
    dirty: bool,
}

fn stamp() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl Progress {
    /// `history`: the events of earlier runs, so counts include what they did.
    pub fn new(output_dir: PathBuf, logs: LogMode, history: &[Event], every: Duration) -> Self {
        let mut view = RunView::default();
        history.iter().for_each(|e| view.apply(e));
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template("[{elapsed_precise}] {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar
        });
        let every = (!every.is_zero() && bar.is_none()).then_some(every);
        Progress {
            output_dir,
            logs,
            view,
            bar,
            every,
            next_line: Instant::now() + every.unwrap_or_default(),
            dirty: true,
        }
    }

    /// An event went to the journal: fold it, and say it if people should hear of it.
    pub fn record(&mut self, event: &Event) {
        self.view.apply(event);
        self.dirty = true;
        let output_dir = &self.output_dir;
        let line = noteworthy(event, |task, attempt, process, processes| {
            dlaunch_core::view::stderr_hint(output_dir, self.logs, task, attempt, process, processes)
        });
        if let Some(line) = line {
            self.say(&line);
        }
    }

    fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("{} {line}", stamp())),
            None => log::info!("{} {line}", stamp()),
        }
    }

    /// Once a second: the progress line, the snapshot for `dlaunch status` (when something
    /// changed), and the cancel requests waiting in the output directory.
    pub fn tick(&mut self, journal_len: u64, now: Instant) -> Vec<CancelRequest> {
        let line = progress_line(&self.view, SystemTime::now());
        if let Some(bar) = &self.bar {
            bar.set_message(line);
        } else if let Some(every) = self.every
            && now >= self.next_line
        {
            self.say(&format!("progress: {line}"));
            self.next_line = now + every;
        }
        if self.dirty {
            self.snapshot(journal_len);
        }
        take_requests(&self.output_dir)
    }

    /// The journal holds its last line: the final snapshot, and the live line goes away.
    pub fn finish(&mut self, journal_len: u64) {
        self.snapshot(journal_len);
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    fn snapshot(&mut self, journal_len: u64) {
        match write_snapshot(&self.output_dir, journal_len, &self.view) {
            Ok(()) => self.dirty = false,
            Err(e) => log::debug!("cannot write the status snapshot: {e}"),
        }
    }
}
