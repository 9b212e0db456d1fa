//! The transport of a real run: MPI point-to-point, without spinning and without deadlocks.
//!
//! OpenMPI's blocking calls busy-poll a core, so waiting is done with non-blocking probes and
//! sleeps in between (the caller's back-off). Sends are non-blocking and are not waited for:
//! a send may complete only once the receiver takes it (OpenMPI's shared-memory transport), and
//! a worker that waited for a busy or stopped rank 0 to take its report would start nothing
//! meanwhile, not even the orders it holds. Each send's bytes stay here until MPI is done with
//! them; while any is in flight, every call moves them on, and incoming messages keep being
//! received, so two ranks that send each other large (rendezvous-protocol) messages at the
//! same time cannot wait for each other forever.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use mpi::request::{Request, StaticScope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::Transport;

/// How long dropping the transport waits for its last sends (rank 0's Exit to every worker):
/// a rank that is gone never takes them.
const LAST_SENDS_LIMIT: Duration = Duration::from_secs(10);

pub struct MpiTransport {
    world: SimpleCommunicator,
    inbox: VecDeque<(u32, Vec<u8>)>,
    in_flight: Vec<InFlight>,
}

/// A send MPI has not completed, and the bytes it reads until it has.
struct InFlight {
    rank: u32,
    request: Option<Request<'static, [u8]>>,
    bytes: *mut [u8],
}

impl InFlight {
    fn start(world: &SimpleCommunicator, rank: u32, bytes: &[u8]) -> Self {
        let leaked: &'static [u8] = Box::leak(bytes.to_vec().into_boxed_slice());
        let request = world.process_at_rank(rank as i32).immediate_send(StaticScope, leaked);
        InFlight { rank, request: Some(request), bytes: std::ptr::from_ref(leaked).cast_mut() }
    }

    /// True once the send is complete; its bytes are freed then.
    fn complete(&mut self) -> bool {
        if let Some(request) = self.request.take()
            && let Err(pending) = request.test()
        {
            self.request = Some(pending);
            return false;
        }
        // Safety: the bytes were leaked from a Box in `start`, and MPI no longer reads them.
        unsafe { drop(Box::from_raw(self.bytes)) };
        true
    }
}

impl MpiTransport {
    pub fn new(world: SimpleCommunicator) -> Self {
        MpiTransport { world, inbox: VecDeque::new(), in_flight: Vec::new() }
    }

    pub fn world(&self) -> &SimpleCommunicator {
        &self.world
    }

    /// Moves the sends in flight on; drops those complete.
    fn progress(&mut self) {
        self.in_flight.retain_mut(|send| !send.complete());
    }
}

impl Transport for MpiTransport {
    fn try_receive(&mut self) -> Option<(u32, Vec<u8>)> {
        self.progress();
        if let Some(message) = self.inbox.pop_front() {
            return Some(message);
        }
        receive_one(&self.world)
    }

    /// Returns once every send is started; they complete in later calls.
    fn send_all(&mut self, batch: &[(u32, Vec<u8>)]) {
        for (rank, bytes) in batch {
            self.in_flight.push(InFlight::start(&self.world, *rank, bytes));
        }
        self.progress();
    }

    fn sends_in_flight(&self, rank: u32) -> usize {
        self.in_flight.iter().filter(|send| send.rank == rank).count()
    }

    fn sending(&self) -> bool {
        !self.in_flight.is_empty()
    }
}

impl Drop for MpiTransport {
    /// MPI_Finalize must not find sends in flight: waits for them, receiving meanwhile, up to
    /// `LAST_SENDS_LIMIT`; then leaves them (and their bytes) to MPI.
    fn drop(&mut self) {
        let start = Instant::now();
        let mut pause = Duration::from_micros(20);
        loop {
            self.progress();
            if self.in_flight.is_empty() {
                return;
            }
            if start.elapsed() > LAST_SENDS_LIMIT {
                log::warn!("{} messages to other ranks were not taken; exiting without them", self.in_flight.len());
                self.in_flight.drain(..).for_each(|send| std::mem::forget(send.request));
                return;
            }
            while let Some(message) = receive_one(&self.world) {
                self.inbox.push_back(message);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(2));
        }
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
