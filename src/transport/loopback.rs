//! Ranks as channels inside one process: rank 0's coordinator talks to its own worker this
//! way, and tests put fake peers around a coordinator or a worker.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, Sender, channel};

use super::Transport;

/// One rank's end. Sending to a rank that is not connected, or whose end is gone, loses the
/// message, as sending to a dead MPI rank would.
pub struct Loopback {
    rank: u32,
    inbox: Receiver<(u32, Vec<u8>)>,
    peers: BTreeMap<u32, Sender<(u32, Vec<u8>)>>,
}

/// A coordinator (rank `coordinator`: 0, or a node's leader) and workers: the coordinator's
/// end, and one end per worker rank in the order given. Workers reach the coordinator only, as
/// in dlaunch; a worker may have the coordinator's rank too (the coordinator's own worker),
/// since each end names only the ranks it can reach.
pub fn network(coordinator: u32, workers: &[u32]) -> (Loopback, Vec<Loopback>) {
    let (to_coordinator, coordinator_inbox) = channel();
    let coordinator_rank = coordinator;
    let mut coordinator = Loopback { rank: coordinator_rank, inbox: coordinator_inbox, peers: BTreeMap::new() };
    let ends = workers
        .iter()
        .map(|&rank| {
            let (to_worker, inbox) = channel();
            coordinator.peers.insert(rank, to_worker);
            Loopback { rank, inbox, peers: BTreeMap::from([(coordinator_rank, to_coordinator.clone())]) }
        })
        .collect();
    (coordinator, ends)
}

impl Transport for Loopback {
    fn try_receive(&mut self) -> Option<(u32, Vec<u8>)> {
        self.inbox.try_recv().ok()
    }

    fn send_all(&mut self, batch: &[(u32, Vec<u8>)]) {
        for (rank, bytes) in batch {
            let delivered = self.peers.get(rank).is_some_and(|peer| peer.send((self.rank, bytes.clone())).is_ok());
            if !delivered {
                log::debug!("loopback: rank {rank} is not there; a message from rank {} is lost", self.rank);
            }
        }
    }

    /// A send is in its peer's queue at once, and the peer runs in this thread (rank 0's own
    /// worker) or its own: none is ever held here.
    fn sends_in_flight(&self, _rank: u32) -> usize {
        0
    }

    fn sending(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_reach_the_named_peer_in_order_and_carry_the_sender() {
        let (mut coordinator, mut workers) = network(0, &[0, 3]);
        coordinator.send_all(&[(3, b"a".to_vec()), (0, b"b".to_vec()), (3, b"c".to_vec())]);
        assert_eq!(workers[1].try_receive(), Some((0, b"a".to_vec())));
        assert_eq!(workers[1].try_receive(), Some((0, b"c".to_vec())));
        assert_eq!(workers[1].try_receive(), None);
        assert_eq!(workers[0].try_receive(), Some((0, b"b".to_vec())));
        workers[1].send_all(&[(0, b"r".to_vec())]);
        workers[0].send_all(&[(0, b"s".to_vec())]);
        assert_eq!(coordinator.try_receive(), Some((3, b"r".to_vec())));
        assert_eq!(coordinator.try_receive(), Some((0, b"s".to_vec())));
    }

    #[test]
    fn a_gone_or_unknown_peer_loses_the_message() {
        let (mut coordinator, mut workers) = network(0, &[1]);
        workers.clear();
        coordinator.send_all(&[(1, b"lost".to_vec()), (7, b"nobody".to_vec())]);
        assert_eq!(coordinator.try_receive(), None);
    }
}
