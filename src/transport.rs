//! Moving message bytes between ranks. The coordinator and worker loops see only this trait:
//! MPI point-to-point in production (`MpiTransport`), channels inside one process in tests and
//! between rank 0's coordinator and its own worker (`Loopback`).

mod loopback;
mod mpi_p2p;

pub use loopback::{Loopback, network};
pub use mpi_p2p::MpiTransport;

/// A rank's end of the message paths. Neither call blocks waiting for a peer: loops sleep
/// between turns themselves (`signals::Backoff`), so no rank busy-polls a core.
pub trait Transport {
    /// The next message (source rank, bytes), if one has arrived.
    fn try_receive(&mut self) -> Option<(u32, Vec<u8>)>;

    /// Sends every (rank, bytes) and returns once all are on their way.
    fn send_all(&mut self, batch: &[(u32, Vec<u8>)]);

    /// Sends to `rank` that it has not taken yet: what paces a large transfer to it.
    fn sends_in_flight(&self, rank: u32) -> usize;

    /// Whether any send has not been taken yet: MPI moves one on only while this rank calls it.
    fn sending(&self) -> bool;
}
