//! The loop of rank 0: feeds worker reports to `Control`, carries out its effects (journal
//! lines, orders), and runs its own worker in-process when it has slots.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use crate::control::{Control, Effect};
use crate::journal::{Journal, JournalError};
use crate::run::progress::Progress;
use crate::signals::{self, Backoff, Waker};
use crate::transport::Transport;
use crate::wire::{self, Order, Report};
use crate::worker::Worker;

const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(1);

pub struct Coordinator<'a> {
    pub control: Control,
    pub transport: &'a mut Transport,
    pub journal: Journal,
    pub progress: Progress,
    pub local: Option<Worker>,
    pub waker: &'a Waker,
    /// When the allocation ends, if known: tasks that cannot finish by then are not started.
    pub deadline: Option<SystemTime>,
}

impl Coordinator<'_> {
    /// Runs until every task is settled or dispatching stopped and nothing runs any more.
    pub fn run(&mut self) -> Result<(), JournalError> {
        let mut backoff = Backoff::new();
        let mut next_health_check = Instant::now() + HEALTH_CHECK_INTERVAL;
        loop {
            let now = Instant::now();
            let mut active = false;
            while let Some((rank, bytes)) = self.transport.try_receive() {
                match wire::decode::<Report>(&bytes) {
                    Ok(reports) => {
                        // A heartbeat needs no quick follow-up: it does not keep the loop busy.
                        active |= reports.iter().any(|r| *r != Report::Heartbeat);
                        reports.into_iter().for_each(|r| self.on_report(rank, r, now));
                    }
                    Err(e) => log::error!("unreadable message from rank {rank}: {e}"),
                }
            }
            if let Some(local) = self.local.as_mut() {
                local.poll(now);
                let reports = local.take_reports();
                active |= !reports.is_empty();
                reports.into_iter().for_each(|r| self.on_report(0, r, now));
            }
            if let Some(signal) = signals::take_stop_request() {
                self.control.stop(&format!("{signal} received"), now);
            }
            if now >= next_health_check {
                if self.local.is_some() {
                    self.control.heard_from(0, now);
                }
                self.control.check_health(now);
                self.observe(now);
                next_health_check = now + HEALTH_CHECK_INTERVAL;
            }
            let wall = SystemTime::now();
            let time_left = self.deadline.map(|d| d.duration_since(wall).unwrap_or_default());
            self.control.dispatch(time_left, wall);
            active |= self.carry_out(now)?;
            if self.control.finished() {
                if let Some(local) = self.local.as_mut() {
                    local.kill_escaped();
                }
                return Ok(());
            }
            if active {
                backoff.reset();
            } else {
                self.waker.sleep(backoff.next_pause());
            }
        }
    }

    /// Progress output, the status snapshot, and requests from `dlaunch cancel`.
    fn observe(&mut self, now: Instant) {
        for request in self.progress.tick(self.journal.len(), now) {
            if request.tasks.is_empty() {
                self.control.stop("cancelled with dlaunch cancel", now);
            } else {
                self.control.cancel(&request.tasks, SystemTime::now());
            }
        }
    }

    fn on_report(&mut self, rank: u32, report: Report, now: Instant) {
        self.control.heard_from(rank, now);
        match report {
            Report::Ended(end) => self.control.process_ended(rank, end),
            Report::Stopping { signal } => self.control.stop(&format!("{signal} received by rank {rank}"), now),
            Report::Heartbeat => {}
            Report::Hello(_) => log::warn!("rank {rank} said hello twice"),
        }
    }

    /// Journal lines first, then orders: a task is on record before it can start.
    fn carry_out(&mut self, now: Instant) -> Result<bool, JournalError> {
        let effects = self.control.take_effects();
        if effects.is_empty() {
            self.journal.flush(false)?;
            return Ok(false);
        }
        let mut orders: BTreeMap<u32, Vec<Order>> = BTreeMap::new();
        for effect in effects {
            match effect {
                Effect::Record(event) => {
                    self.journal.append(&event)?;
                    self.progress.record(&event);
                }
                Effect::Send { rank, order } => orders.entry(rank).or_default().push(order),
            }
        }
        self.journal.flush(false)?;
        if let (Some(local_orders), Some(local)) = (orders.remove(&0), self.local.as_mut()) {
            for order in local_orders {
                local.handle(order, now);
            }
        }
        let batch: Vec<(u32, Vec<u8>)> = orders.iter().map(|(rank, o)| (*rank, wire::encode(o))).collect();
        self.transport.send_all(&batch);
        Ok(true)
    }
}

/// Tells every worker rank to exit.
pub fn dismiss(transport: &mut Transport, world_size: u32) {
    let exit = wire::encode(&[Order::Exit]);
    let batch: Vec<(u32, Vec<u8>)> = (1..world_size).map(|rank| (rank, exit.clone())).collect();
    transport.send_all(&batch);
}
