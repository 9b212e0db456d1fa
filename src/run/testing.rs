//! A fake worker for tests of the loops. It keeps `worker::Worker`'s contract — a stop signal
//! on interrupt, SIGKILL once the grace has passed, an end reported for each process — without
//! processes, and writes down what it did, in order, for the test to read.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use dlaunch_core::events::Ending;
use dlaunch_core::wire::{Launch, Order, ProcessEnd, Report};

use super::worker_rank::Runner;

#[derive(Default)]
pub struct FakeState {
    pub grace: Duration,
    /// Processes running, each with when it was sent its stop signal.
    pub running: Vec<(Launch, Option<Instant>)>,
    /// Ends each launch at once with this ending, instead of running it.
    pub finish_with: Option<Ending>,
    pub reports: Vec<Report>,
    /// "launch <task>", "stop signal <task>", "SIGKILL <task>", "kill escaped".
    pub log: Vec<String>,
    /// What `waits_for_an_end` answers.
    pub waits_for_an_end: bool,
}

/// Clones share the state: the test keeps one, the peer owns another.
#[derive(Clone, Default)]
pub struct FakeRunner(pub Rc<RefCell<FakeState>>);

impl FakeRunner {
    pub fn new(grace: Duration, finish_with: Option<Ending>) -> Self {
        FakeRunner(Rc::new(RefCell::new(FakeState { grace, finish_with, ..FakeState::default() })))
    }

    pub fn log(&self) -> Vec<String> {
        self.0.borrow().log.clone()
    }

    /// A running process ends by itself (a report the peer will find at its next poll).
    pub fn end_first(&self, ending: Ending) {
        let mut state = self.0.borrow_mut();
        let (launch, _) = state.running.remove(0);
        state.reports.push(ended(&launch, ending));
    }
}

pub fn ended(launch: &Launch, ending: Ending) -> Report {
    Report::Ended(ProcessEnd {
        key: launch.key,
        process: launch.process,
        cpus: "0".into(),
        gpus: vec![],
        ending,
        start: Some(SystemTime::UNIX_EPOCH),
        end: SystemTime::UNIX_EPOCH,
    })
}

impl FakeState {
    fn signal(&mut self, now: Instant, which: impl Fn(&Launch) -> bool) {
        for (launch, stopped) in self.running.iter_mut().filter(|(l, s)| s.is_none() && which(l)) {
            *stopped = Some(now);
            self.log.push(format!("stop signal {}", launch.task_id));
        }
    }
}

impl Runner for FakeRunner {
    fn handle(&mut self, order: Order, now: Instant) -> bool {
        let mut state = self.0.borrow_mut();
        match order {
            Order::Launch(launch) => {
                state.log.push(format!("launch {}", launch.task_id));
                match state.finish_with.clone() {
                    Some(ending) => state.reports.push(ended(&launch, ending)),
                    None => state.running.push((*launch, None)),
                }
            }
            Order::Stop { key } => state.signal(now, |l| l.key == key),
            Order::Interrupt => state.signal(now, |_| true),
            Order::Exit => return false,
            // Its launches never hold and are never prefetched, so no Start or Recall comes.
            Order::Heartbeat
            | Order::GivenUp { .. }
            | Order::Start { .. }
            | Order::Recall { .. }
            | Order::Received { .. }
            | Order::Restore(_)
            | Order::Template(_) => {}
        }
        true
    }

    fn poll(&mut self, now: Instant) {
        let mut state = self.0.borrow_mut();
        let grace = state.grace;
        let (killed, running): (Vec<_>, Vec<_>) =
            state.running.drain(..).partition(|(_, stopped)| stopped.is_some_and(|t| now >= t + grace));
        state.running = running;
        for (launch, _) in killed {
            state.log.push(format!("SIGKILL {}", launch.task_id));
            state.reports.push(ended(&launch, Ending::Interrupted));
        }
    }

    fn take_reports(&mut self) -> Vec<Report> {
        std::mem::take(&mut self.0.borrow_mut().reports)
    }

    fn interrupt(&mut self, now: Instant) {
        self.0.borrow_mut().signal(now, |_| true);
    }

    fn busy(&self) -> bool {
        !self.0.borrow().running.is_empty()
    }

    fn waits_for_an_end(&self) -> bool {
        self.0.borrow().waits_for_an_end
    }

    fn kill_escaped(&mut self) {
        self.0.borrow_mut().log.push("kill escaped".into());
    }
}

/// A one-process attempt of task `task`, named `id`.
pub fn launch(task: u32, id: &str) -> Launch {
    Launch {
        key: dlaunch_core::events::AttemptKey { task, attempt: 0 },
        template: 0,
        task_id: id.into(),
        process: 0,
        command: "true".into(),
        workdir: "/tmp".into(),
        env: vec![],
        unset: vec![],
        resources: dlaunch_core::spec::Resources { cpus: 1, gpus: 0, memory: 0 },
        timeout: None,
        log_dir: "/tmp".into(),
        datasets: vec![],
        ports: vec![],
        gpu_mates: vec![],
        hold: false,
        outputs: vec![],
        prefetched: false,
    }
}
