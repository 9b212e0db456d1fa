//! One dataset's stream over the receivers' communicator: rank 0 reads, MPI broadcasts, the
//! nodes write, all three at once.
//!
//! Disk work runs on a thread of its own (rank 0 reads, the nodes write) while the main thread
//! only drives MPI: OpenMPI moves a non-blocking broadcast forward only inside MPI calls, so a
//! thread blocked in read(2) or write(2) would stall it. Buffers cycle through a fixed pool of
//! `BUFFERS` chunks, `DEPTH` of them in flight: memory stays bounded whatever the dataset's size.
//!
//! Every broadcast carries one chunk and a trailer: a status byte and, in the last chunk, rank
//! 0's checksum. When rank 0 cannot read on, it marks the chunk `Abort`; everybody stops
//! `DEPTH` chunks after the first such chunk (the most any rank can have posted by the time it
//! sees it), so all ranks post the same broadcasts and none waits forever.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Duration;

use mpi::topology::SimpleCommunicator;

use super::broadcast::Ibcast;
use super::manifest::{Checksum, ChunkPlan, ReadError, StreamReader};
use super::store::Writer;

/// Big enough that per-broadcast overheads vanish, small enough that `BUFFERS` of them stay
/// well within the memory budget (64 MiB above baseline per rank).
pub const CHUNK: usize = 8 << 20;
const BUFFERS: usize = 4;
const DEPTH: u64 = 2;
const TRAILER: usize = 1 + 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    More = 0,
    Last = 1,
    Abort = 2,
}

fn status_of(buffer: &[u8], len: usize) -> Status {
    match buffer.get(len) {
        Some(0) => Status::More,
        Some(1) => Status::Last,
        _ => Status::Abort,
    }
}

fn set_trailer(buffer: &mut [u8], len: usize, status: Status, checksum: &Checksum) {
    buffer[len] = status as u8;
    buffer[len + 1..len + TRAILER].copy_from_slice(checksum);
}

/// The chunks everybody posts when the first `Abort` is chunk `index`.
fn end_after_abort(index: u64, count: u64) -> u64 {
    (index + DEPTH).min(count)
}

/// A fixed set of chunk buffers, passed from thread to thread through channels.
fn pool(plan: ChunkPlan) -> (SyncSender<Vec<u8>>, Receiver<Vec<u8>>) {
    let (free_tx, free_rx) = sync_channel(BUFFERS);
    for _ in 0..BUFFERS {
        let _ = free_tx.send(vec![0u8; plan.chunk + TRAILER]);
    }
    (free_tx, free_rx)
}

/// Writes (buffer, len) as they come, handing each buffer back; returns the writer at the end.
fn write_chunks(mut writer: Writer, chunks: Receiver<(Vec<u8>, usize)>, free: SyncSender<Vec<u8>>) -> Writer {
    for (buffer, len) in chunks {
        writer.write(&buffer[..len]);
        let _ = free.send(buffer);
    }
    writer
}

/// Rank 0: reads the stream, broadcasts it, and writes its own node's copy with `writer`.
/// Returns the checksum of what was sent (zeros without `hasher`), or why reading stopped.
pub fn send(
    comm: &SimpleCommunicator,
    plan: ChunkPlan,
    reader: StreamReader,
    hasher: Option<blake3::Hasher>,
    writer: Option<Writer>,
) -> (Result<Checksum, ReadError>, Option<Writer>) {
    let (free_tx, free_rx) = pool(plan);
    std::thread::scope(|threads| {
        let (filled_tx, filled_rx) = sync_channel(BUFFERS);
        let reading = threads.spawn(move || read_chunks(plan, reader, hasher, free_rx, filled_tx));
        let (write_tx, write_rx) = sync_channel(BUFFERS);
        let writing = writer.map(|w| {
            let free = free_tx.clone();
            threads.spawn(move || write_chunks(w, write_rx, free))
        });
        let local_copy = writing.is_some();
        drive(
            comm,
            plan,
            |_| filled_rx.try_recv().ok(),
            |buffer, len, status| {
                if local_copy && status != Status::Abort {
                    let _ = write_tx.send((buffer, len));
                } else {
                    let _ = free_tx.send(buffer);
                }
            },
        );
        drop(write_tx);
        let read = reading.join().unwrap_or_else(|_| Err(thread_died()));
        (read, writing.and_then(|w| w.join().ok()))
    })
}

fn thread_died() -> ReadError {
    ReadError::Io { path: "(reader thread)".into(), source: std::io::Error::other("the thread panicked") }
}

/// Rank 0's reading thread: fills free buffers with the next chunk and its trailer.
fn read_chunks(
    plan: ChunkPlan,
    mut reader: StreamReader,
    mut hasher: Option<blake3::Hasher>,
    free: Receiver<Vec<u8>>,
    filled: SyncSender<Vec<u8>>,
) -> Result<Checksum, ReadError> {
    let mut failure = None;
    let mut checksum = [0u8; 32];
    let mut end = plan.count();
    let mut index = 0;
    while index < end {
        let Ok(mut buffer) = free.recv() else { break };
        let len = plan.len(index);
        let mut status = if index + 1 == plan.count() { Status::Last } else { Status::More };
        if failure.is_none() {
            match reader.fill(&mut buffer[..len]) {
                Ok(n) if n == len => {
                    if let Some(hasher) = hasher.as_mut() {
                        hasher.update(&buffer[..len]);
                    }
                }
                Ok(n) => failure = Some(ReadError::Short { missing: (len - n) as u64 }),
                Err(e) => failure = Some(e),
            }
            if failure.is_some() {
                end = end_after_abort(index, plan.count());
            }
        }
        if failure.is_some() {
            status = Status::Abort;
        } else if status == Status::Last {
            checksum = hasher.take().map_or([0; 32], |h| *h.finalize().as_bytes());
        }
        set_trailer(&mut buffer, len, status, &checksum);
        if filled.send(buffer).is_err() {
            break;
        }
        index += 1;
    }
    failure.map_or(Ok(checksum), Err)
}

/// What a node got from `receive`.
pub enum Received {
    /// The whole stream, and rank 0's checksum of it.
    Complete(Checksum),
    /// Rank 0 could not read the source to the end.
    Aborted,
}

/// A node leader: receives the stream and writes it with `writer` (or drops it, without one,
/// to stay in step after a local failure).
pub fn receive(comm: &SimpleCommunicator, plan: ChunkPlan, writer: Option<Writer>) -> (Received, Option<Writer>) {
    let (free_tx, free_rx) = pool(plan);
    std::thread::scope(|threads| {
        let (write_tx, write_rx) = sync_channel(BUFFERS);
        let writing = writer.map(|w| {
            let free = free_tx.clone();
            threads.spawn(move || write_chunks(w, write_rx, free))
        });
        let mut received = Received::Aborted;
        drive(
            comm,
            plan,
            |_| free_rx.try_recv().ok(),
            |buffer, len, status| {
                if let Status::Last = status {
                    let mut checksum = [0u8; 32];
                    checksum.copy_from_slice(&buffer[len + 1..len + TRAILER]);
                    received = Received::Complete(checksum);
                }
                if status != Status::Abort && writing.is_some() {
                    let _ = write_tx.send((buffer, len));
                } else {
                    let _ = free_tx.send(buffer);
                }
            },
        );
        drop(write_tx);
        (received, writing.and_then(|w| w.join().ok()))
    })
}

/// Posts the broadcasts in order, at most `DEPTH` at once, and hands each completed buffer on
/// with its length and status. `next` gives the buffer for a chunk, or `None` while none is
/// ready.
fn drive(
    comm: &SimpleCommunicator,
    plan: ChunkPlan,
    mut next: impl FnMut(u64) -> Option<Vec<u8>>,
    mut completed: impl FnMut(Vec<u8>, usize, Status),
) {
    let mut in_flight: VecDeque<(u64, Ibcast)> = VecDeque::new();
    let mut posted = 0;
    let mut end = plan.count();
    let mut aborted = false;
    let mut pace = Pace::default();
    loop {
        let mut progressed = false;
        if let Some((index, request)) = in_flight.front_mut()
            && request.test()
        {
            let index = *index;
            let buffer = in_flight.pop_front().map(|(_, r)| r.finish()).unwrap_or_default();
            let len = plan.len(index);
            let status = status_of(&buffer, len);
            if status == Status::Abort && !aborted {
                aborted = true;
                end = end_after_abort(index, end);
            }
            completed(buffer, len, if aborted { Status::Abort } else { status });
            progressed = true;
        }
        while posted < end && (in_flight.len() as u64) < DEPTH {
            let Some(buffer) = next(posted) else { break };
            in_flight.push_back((posted, Ibcast::start(comm, buffer, plan.len(posted) + TRAILER)));
            posted += 1;
            progressed = true;
        }
        if posted >= end && in_flight.is_empty() {
            return;
        }
        pace.wait(progressed);
    }
}

/// Between tests of a transfer in progress: yield at first (the data is usually moments
/// away), then sleep briefly, so that a rank waiting on a slow disk elsewhere does not spin.
#[derive(Default)]
struct Pace {
    idle: u32,
}

impl Pace {
    fn wait(&mut self, progressed: bool) {
        if progressed {
            self.idle = 0;
            return;
        }
        self.idle += 1;
        if self.idle < 100 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_carry_status_and_checksum() {
        let mut buffer = vec![9u8; 10 + TRAILER];
        set_trailer(&mut buffer, 10, Status::Last, &[5; 32]);
        assert_eq!(status_of(&buffer, 10), Status::Last);
        assert_eq!(&buffer[11..], &[5; 32]);
        assert_eq!(&buffer[..10], &[9; 10], "the data is untouched");
        buffer[10] = 7;
        assert_eq!(status_of(&buffer, 10), Status::Abort, "anything unknown stops the stream");
    }

    #[test]
    fn after_an_abort_everybody_stops_at_the_same_chunk() {
        assert_eq!(end_after_abort(0, 10), DEPTH);
        assert_eq!(end_after_abort(9, 10), 10, "never past the end");
        // A rank posts chunk n only once chunk n - DEPTH is complete: when it sees the abort
        // in chunk i, it cannot have posted past i + DEPTH - 1.
        for i in 0..10 {
            assert!(end_after_abort(i, 10) > i + DEPTH - 1 || end_after_abort(i, 10) == 10);
        }
    }
}
