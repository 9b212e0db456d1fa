//! The loop of a worker rank: orders in, reports out, sleeping while nothing happens.

use std::time::{Duration, Instant};

use crate::signals::{self, Backoff, Waker};
use crate::transport::Transport;
use crate::worker::Worker;
use dlaunch_core::wire::{self, Order, Report};

pub fn run(transport: &mut Transport, worker: &mut Worker, waker: &Waker, heartbeat_every: Duration, hello: Report) {
    transport.send_all(&[(0, wire::encode(&[hello]))]);
    let mut backoff = Backoff::new();
    let mut last_sent = Instant::now();
    loop {
        let now = Instant::now();
        let mut active = false;
        let mut exit = false;
        while let Some((_, bytes)) = transport.try_receive() {
            active = true;
            match wire::decode::<Order>(&bytes) {
                Ok(orders) => {
                    for order in orders {
                        exit |= !worker.handle(order, now);
                    }
                }
                Err(e) => log::error!("unreadable message from the coordinator: {e}"),
            }
        }
        let mut reports = Vec::new();
        if let Some(signal) = signals::take_stop_request() {
            worker.interrupt(now);
            reports.push(Report::Stopping { signal: signal.to_string() });
        }
        worker.poll(now);
        if exit {
            shut_down(worker);
            return;
        }
        reports.extend(worker.take_reports());
        // Real news (a process ended) is answered by new work soon: stay quick. A heartbeat is not.
        active |= !reports.is_empty();
        if reports.is_empty() && now.duration_since(last_sent) >= heartbeat_every {
            reports.push(Report::Heartbeat);
        }
        if !reports.is_empty() {
            transport.send_all(&[(0, wire::encode(&reports))]);
            last_sent = now;
        }
        if active {
            backoff.reset();
        } else {
            waker.sleep(backoff.next_pause());
        }
    }
}

/// The coordinator said Exit: it counts nothing as running, so anything still here is a stray.
fn shut_down(worker: &mut Worker) {
    worker.kill_escaped();
    if worker.busy() {
        log::warn!("exit requested while processes still run: killing them");
        let now = Instant::now();
        worker.interrupt(now);
        while worker.busy() {
            worker.poll(Instant::now());
            std::thread::sleep(Duration::from_millis(10));
            if now.elapsed() > Duration::from_secs(60) {
                break;
            }
        }
    }
}
