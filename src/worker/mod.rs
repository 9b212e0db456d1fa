//! A worker: runs the processes the coordinator sends, each pinned to its own CPUs, memory and
//! GPUs, enforces timeouts and log limits, and reports how each process ended. No MPI here: the
//! rank loop in `run::worker_rank` moves orders in and reports out (rank 0 runs one in-process).
//!
//! The core's `dlaunch_core::worker::Machine` decides (pure, handed the time), a `Launcher` acts
//! on processes, and `Worker` here connects the two: it feeds the machine what happened and
//! carries out its effects.

mod launcher;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use dlaunch_core::worker::{Effect, Machine, Setup};
pub use launcher::{GUARD_VARIABLE, Launcher, ProcLauncher};

use crate::guard::Guard;
use crate::returned::Sender;
use dlaunch_core::wire::{Order, Report, WorkerHello};

pub struct Worker<L: Launcher = ProcLauncher> {
    machine: Machine,
    launcher: L,
    reports: Vec<Report>,
    /// In returned mode: sends the tasks' files to rank 0.
    sender: Option<Sender>,
}

impl Worker {
    /// A worker on this machine's processes, with `guard` watching them.
    pub fn new(setup: Setup, guard: Option<Guard>) -> Self {
        let mut inherited: Vec<_> = std::env::vars_os().collect();
        // For `dlaunch wait-for` in the commands of roles that wait for another role.
        if let Ok(exe) = std::env::current_exe() {
            inherited.push(("DLAUNCH_EXE".into(), exe.into_os_string()));
        }
        let machine = Machine::new(setup, inherited, Instant::now());
        Worker::with_launcher(machine, ProcLauncher::new(guard))
    }

    /// `logs = "framed"`: tasks' output goes to `log` instead of files of their own. Not in
    /// returned mode, where the sender reads the files and rank 0 frames what it receives.
    pub fn set_framed_logs(&mut self, log: std::sync::Arc<crate::proc::FramedLog>) {
        if self.sender.is_none() {
            self.launcher.set_framed(log);
        }
    }
}

impl<L: Launcher> Worker<L> {
    pub fn with_launcher(machine: Machine, launcher: L) -> Self {
        Worker { machine, launcher, reports: Vec::new(), sender: None }
    }

    /// Returned mode: tasks write beneath `local`, and their files go to rank 0.
    pub fn set_returned(&mut self, local: PathBuf, output_limit: Option<u64>) {
        self.sender = Some(Sender::new(local, output_limit));
    }

    /// Datasets staged on this node: name → local path.
    pub fn set_datasets(&mut self, datasets: BTreeMap<String, PathBuf>) {
        self.machine.set_datasets(datasets);
    }

    pub fn hello(&self, addr: String) -> WorkerHello {
        self.machine.hello(addr)
    }

    pub fn busy(&self) -> bool {
        self.machine.busy()
    }

    /// Nothing to do until a process ends (`Machine::waits_for_an_end`); in returned mode
    /// never, where the sender's pace follows rank 0's acknowledgements.
    pub fn waits_for_an_end(&self) -> bool {
        self.sender.is_none() && self.machine.waits_for_an_end()
    }

    pub fn take_reports(&mut self) -> Vec<Report> {
        std::mem::take(&mut self.reports)
    }

    /// Carries out an order; returns false on `Exit`.
    pub fn handle(&mut self, order: Order, now: Instant) -> bool {
        match (order, self.sender.as_mut()) {
            (Order::Received { chunks }, Some(sender)) => sender.acknowledged(chunks),
            (Order::Restore(piece), Some(sender)) => sender.restore(piece),
            // Shared mode: the task's directory is where its outputs were returned to.
            (Order::Received { .. } | Order::Restore(_), None) => {}
            (order, _) => {
                let go_on = self.machine.order(order, now, SystemTime::now());
                self.carry_out();
                return go_on;
            }
        }
        true
    }

    /// Stops every process: dlaunch is shutting down early.
    pub fn interrupt(&mut self, now: Instant) {
        self.machine.interrupt(now, SystemTime::now());
        self.carry_out();
    }

    /// Reaps ended processes and enforces deadlines, grace periods and log limits.
    pub fn poll(&mut self, now: Instant) {
        let wall = SystemTime::now();
        let reaped = self.launcher.reap();
        // The logs are read after reaping: whatever made a process end is in them by now.
        for pid in self.machine.pids() {
            let state = self.launcher.logs(pid);
            self.machine.logs(pid, &state, now);
        }
        self.machine.ended(reaped, now, wall);
        self.machine.tick(now);
        self.carry_out();
        if let Some(sender) = self.sender.as_mut() {
            self.reports.extend(sender.pump());
        }
    }

    /// Kills processes that escaped a task that no longer runs (see `Machine::strays`).
    pub fn kill_escaped(&mut self) {
        let found = self.launcher.escaped();
        for pid in self.machine.strays(&found) {
            self.launcher.kill_escaped(pid);
        }
    }

    fn carry_out(&mut self) {
        loop {
            let effects = self.machine.take_effects();
            if effects.is_empty() {
                return;
            }
            for effect in effects {
                match effect {
                    Effect::Spawn { key, process, mut plan } => {
                        let localized = self.sender.as_ref().map(|sender| {
                            sender.localize(&mut plan);
                            (*plan).clone()
                        });
                        let outcome = self.launcher.spawn(*plan);
                        if let (Some(sender), Some(plan), Ok(_)) = (self.sender.as_mut(), localized, &outcome) {
                            sender.started(key, process, &plan);
                        }
                        self.machine.spawned(key, process, outcome, SystemTime::now());
                    }
                    Effect::Signal { pid, signal } => self.launcher.signal_group(pid, signal),
                    Effect::SweepEscaped => self.kill_escaped(),
                    Effect::Release { pid } => self.launcher.release(pid),
                    Effect::Report(report) => match self.sender.as_mut() {
                        Some(sender) => self.reports.extend(sender.hold(report)),
                        None => self.reports.push(report),
                    },
                }
            }
        }
    }
}
