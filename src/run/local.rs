//! A coordinator's transport when it runs tasks itself (rank 0 in the flat layout, a node's
//! leader in `layout = "nodes"`): MPI (or any transport) to the worker ranks, and a loopback
//! to its own worker, which is a peer like any other. That peer is turned here,
//! in the coordinator's thread: once per drain of the inbox (so at every coordinator turn; a
//! task ending wakes the coordinator through SIGCHLD) and right after orders reach it.

use std::time::Instant;

use crate::transport::{Loopback, Transport, network};
use dlaunch_core::wire::Report;

use super::worker_rank::{PeerSettings, Runner, WorkerPeer};

pub struct WithLocalWorker<T, W> {
    /// The coordinator's rank, which its own worker has too.
    rank: u32,
    remote: T,
    /// The coordinator's end of the loopback.
    loopback: Loopback,
    local: WorkerPeer<Loopback, W>,
    /// Whether the local worker had its turn in the current drain of the inbox.
    turned: bool,
}

impl<T: Transport, W: Runner> WithLocalWorker<T, W> {
    /// Connects rank 0's own worker; its hello waits in the inbox like a worker rank's.
    pub fn new(remote: T, worker: W, hello: Report, settings: PeerSettings) -> Self {
        let rank = settings.coordinator;
        let (loopback, mut ends) = network(rank, &[rank]);
        let end = ends.remove(0);
        let local = WorkerPeer::start(end, worker, hello, settings, Instant::now());
        WithLocalWorker { rank, remote, loopback, local, turned: false }
    }

    fn turn_local(&mut self) {
        // Stop signals are the coordinator's to take: it interrupts this worker by order.
        self.local.turn(Instant::now(), None);
    }
}

impl<T: Transport, W: Runner> Transport for WithLocalWorker<T, W> {
    fn try_receive(&mut self) -> Option<(u32, Vec<u8>)> {
        if let Some(message) = self.remote.try_receive().or_else(|| self.loopback.try_receive()) {
            return Some(message);
        }
        if !self.turned {
            self.turned = true;
            self.turn_local();
            if let Some(message) = self.loopback.try_receive() {
                return Some(message);
            }
        }
        self.turned = false;
        None
    }

    fn send_all(&mut self, batch: &[(u32, Vec<u8>)]) {
        if batch.iter().all(|(rank, _)| *rank != self.rank) {
            return self.remote.send_all(batch);
        }
        let (local, remote): (Vec<_>, Vec<_>) = batch.iter().cloned().partition(|(rank, _)| *rank == self.rank);
        self.remote.send_all(&remote);
        self.loopback.send_all(&local);
        self.turn_local();
    }

    fn sends_in_flight(&self, rank: u32) -> usize {
        if rank == self.rank { self.loopback.sends_in_flight(rank) } else { self.remote.sends_in_flight(rank) }
    }

    fn sending(&self) -> bool {
        self.remote.sending() || self.loopback.sending()
    }
}
