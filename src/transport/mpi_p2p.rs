//! The transport of a real run: MPI point-to-point, without spinning and without deadlocks.
//!
//! OpenMPI's blocking calls busy-poll a core, so waiting is done with non-blocking probes and
//! sleeps in between (the caller's back-off). Sends are non-blocking too, and while they
//! complete the incoming messages keep being received: two ranks that send each other large
//! (rendezvous-protocol) messages at the same time would otherwise both wait forever.

use std::collections::VecDeque;
use std::time::Duration;

use mpi::request::{Request, scope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::Transport;

pub struct MpiTransport {
    world: SimpleCommunicator,
    inbox: VecDeque<(u32, Vec<u8>)>,
}

impl MpiTransport {
    pub fn new(world: SimpleCommunicator) -> Self {
        MpiTransport { world, inbox: VecDeque::new() }
    }

    pub fn world(&self) -> &SimpleCommunicator {
        &self.world
    }
}

impl Transport for MpiTransport {
    fn try_receive(&mut self) -> Option<(u32, Vec<u8>)> {
        if let Some(message) = self.inbox.pop_front() {
            return Some(message);
        }
        receive_one(&self.world)
    }

    /// Returns once every send is complete as far as MPI is concerned.
    fn send_all(&mut self, batch: &[(u32, Vec<u8>)]) {
        if batch.is_empty() {
            return;
        }
        let world = &self.world;
        let inbox = &mut self.inbox;
        scope(|scope| {
            let mut pending: Vec<Option<Request<'_, [u8], _>>> = batch
                .iter()
                .map(|(rank, bytes)| Some(world.process_at_rank(*rank as i32).immediate_send(scope, &bytes[..])))
                .collect();
            let mut pause = Duration::from_micros(20);
            loop {
                for slot in pending.iter_mut() {
                    if let Some(request) = slot.take() {
                        *slot = request.test().err();
                    }
                }
                if pending.iter().all(Option::is_none) {
                    break;
                }
                while let Some(message) = receive_one(world) {
                    inbox.push_back(message);
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(2));
            }
        });
    }
}

/// Receives into a zeroed buffer: `matched_receive_vec` builds its buffer one element at a
/// time, which unoptimized builds pay for at about 90 ns a byte (a returned-output chunk of
/// 2 MB held rank 0 for 185 ms).
fn receive_one(world: &SimpleCommunicator) -> Option<(u32, Vec<u8>)> {
    let (message, status) = world.any_process().immediate_matched_probe()?;
    let mut bytes = vec![0u8; usize::try_from(status.count(u8::equivalent_datatype())).unwrap_or(0)];
    message.matched_receive_into(&mut bytes[..]);
    Some((status.source_rank() as u32, bytes))
}
