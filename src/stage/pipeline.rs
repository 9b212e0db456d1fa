//! One dataset's stream over the receivers' communicator: rank 0 reads, checksums and
//! broadcasts, the nodes receive, checksum and write, all at once.
//!
//! Each step runs on a thread of its own, chunks passing from one to the next through
//! channels: on rank 0 read → checksum → broadcast (→ write, for its own node), on a node
//! receive → checksum → write. The main thread only drives MPI: OpenMPI moves a non-blocking
//! broadcast forward only inside MPI calls, so a thread blocked in read(2) or write(2), or
//! busy checksumming, would stall it. Buffers cycle through a fixed pool of `BUFFERS` chunks,
//! `DEPTH` of them in flight: memory stays bounded whatever the dataset's size.
//!
//! Every broadcast carries one chunk and a trailer: a status byte and, in the last chunk, rank
//! 0's checksum. When rank 0 cannot read on, it marks the chunk `Abort`; everybody stops
//! `DEPTH` chunks after the first such chunk (the most any rank can have posted by the time it
//! sees it), so all ranks post the same broadcasts and none waits forever.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, SendError, SyncSender, TryRecvError, sync_channel};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Duration;

use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use nix::sys::resource::{UsageWho, getrusage};

use super::broadcast::Ibcast;
use super::manifest::{Checksum, ChunkPlan, ReadError, StreamReader};
use super::store::Writer;
use dlaunch_core::exit_code;

/// Big enough that per-broadcast overheads vanish, small enough that `BUFFERS` of them stay
/// well within the memory budget (64 MiB above baseline per rank).
pub const CHUNK: usize = 8 << 20;
/// Two in flight, one per disk or checksum step, one spare to absorb jitter.
const BUFFERS: usize = 6;
const DEPTH: u64 = 2;
const TRAILER: usize = 1 + 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    More = 0,
    Last = 1,
    Abort = 2,
}

struct Chunk {
    buffer: Vec<u8>,
    len: usize,
    status: Status,
}

impl Chunk {
    fn data(&self) -> &[u8] {
        &self.buffer[..self.len]
    }

    fn set_trailer(&mut self, checksum: &Checksum) {
        self.buffer[self.len] = self.status as u8;
        self.buffer[self.len + 1..self.len + TRAILER].copy_from_slice(checksum);
    }

    fn trailer_checksum(&self) -> Checksum {
        let mut checksum = [0u8; 32];
        checksum.copy_from_slice(&self.buffer[self.len + 1..self.len + TRAILER]);
        checksum
    }
}

fn status_of(buffer: &[u8], len: usize) -> Status {
    match buffer.get(len) {
        Some(0) => Status::More,
        Some(1) => Status::Last,
        _ => Status::Abort,
    }
}

/// The chunks everybody posts when the first `Abort` is chunk `index`.
fn end_after_abort(index: u64, count: u64) -> u64 {
    (index + DEPTH).min(count)
}

/// CPU seconds each step of the pipeline took on this rank: where a node with a core per
/// step would find its limit.
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu {
    pub read: f64,
    pub checksum: f64,
    pub write: f64,
    /// The main thread: MPI, and its waits between tests.
    pub mpi: f64,
}

impl std::fmt::Display for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Cpu { read, checksum, write, mpi } = self;
        write!(f, "read {read:.2}, checksum {checksum:.2}, write {write:.2}, MPI {mpi:.2}")
    }
}

fn thread_cpu() -> f64 {
    getrusage(UsageWho::RUSAGE_THREAD).map_or(0.0, |u| {
        let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        seconds(u.user_time()) + seconds(u.system_time())
    })
}

/// A fixed set of chunk buffers, passed from thread to thread through channels.
fn pool(plan: ChunkPlan) -> (SyncSender<Vec<u8>>, Receiver<Vec<u8>>) {
    let (free_tx, free_rx) = sync_channel(BUFFERS);
    for _ in 0..BUFFERS {
        let _ = free_tx.send(vec![0u8; plan.chunk + TRAILER]);
    }
    (free_tx, free_rx)
}

/// Runs `work` on a thread of the scope, returning its result and its CPU seconds.
fn step<'s, T: Send + 's>(
    threads: &'s Scope<'s, '_>,
    work: impl FnOnce() -> T + Send + 's,
) -> ScopedJoinHandle<'s, (T, f64)> {
    threads.spawn(move || {
        let result = work();
        (result, thread_cpu())
    })
}

/// Checksums the chunks that pass (not those of an aborted stream); with `seal`, writes the
/// checksum into the last chunk's trailer before passing it on.
fn checksum_chunks(
    mut hasher: blake3::Hasher,
    chunks: Receiver<Chunk>,
    next: SyncSender<Chunk>,
    seal: bool,
) -> Option<Checksum> {
    let mut last = None;
    for mut chunk in chunks {
        if chunk.status != Status::Abort {
            hasher.update(chunk.data());
        }
        if chunk.status == Status::Last {
            let checksum = *hasher.finalize().as_bytes();
            if seal {
                chunk.set_trailer(&checksum);
            }
            last = Some(checksum);
        }
        if next.send(chunk).is_err() {
            break;
        }
    }
    last
}

/// Writes the chunks as they come, handing each buffer back; returns the writer at the end.
fn write_chunks(mut writer: Writer, chunks: Receiver<Chunk>, free: SyncSender<Vec<u8>>) -> Writer {
    for chunk in chunks {
        writer.write(chunk.data());
        let _ = free.send(chunk.buffer);
    }
    writer
}

/// What rank 0 did: the checksum of what it sent (`None` unverified), or why it stopped.
pub struct Sent {
    pub read: Result<Option<Checksum>, ReadError>,
    pub writer: Option<Writer>,
    pub cpu: Cpu,
}

/// Rank 0: reads the stream, checksums it (with `hasher`), broadcasts it, and writes its own
/// node's copy with `writer`.
pub fn send(
    comm: &SimpleCommunicator,
    plan: ChunkPlan,
    reader: StreamReader,
    hasher: Option<blake3::Hasher>,
    writer: Option<Writer>,
) -> Sent {
    let (free_tx, free_rx) = pool(plan);
    std::thread::scope(|threads| {
        let (ready_tx, ready_rx) = sync_channel(BUFFERS);
        let (read_tx, checksumming) = match hasher {
            Some(hasher) => {
                let (tx, rx) = sync_channel(BUFFERS);
                (tx, Some(step(threads, move || checksum_chunks(hasher, rx, ready_tx, true))))
            }
            None => (ready_tx, None),
        };
        let reading = step(threads, move || read_chunks(plan, reader, free_rx, read_tx));
        let (write_tx, write_rx) = sync_channel(BUFFERS);
        let writing = writer.map(|w| {
            let free = free_tx.clone();
            step(threads, move || write_chunks(w, write_rx, free))
        });
        let local_copy = writing.is_some();
        let mpi_before = thread_cpu();
        drive(
            comm,
            plan,
            || ready_rx.try_recv().map(|chunk| chunk.buffer),
            |chunk| {
                if local_copy && chunk.status != Status::Abort {
                    pass(chunk, &write_tx, &free_tx)
                } else {
                    recycle(chunk, &free_tx)
                }
            },
        );
        let mpi = thread_cpu() - mpi_before;
        drop(write_tx);
        let (read, read_cpu) = reading.join().unwrap_or_else(|_| (Err(thread_died()), 0.0));
        let (checksum, checksum_cpu) = checksumming.and_then(|c| c.join().ok()).unwrap_or((None, 0.0));
        let (writer, write_cpu) = writing.and_then(|w| w.join().ok()).map_or((None, 0.0), |(w, cpu)| (Some(w), cpu));
        Sent {
            read: read.map(|()| checksum),
            writer,
            cpu: Cpu { read: read_cpu, checksum: checksum_cpu, write: write_cpu, mpi },
        }
    })
}

fn thread_died() -> ReadError {
    ReadError::Io { path: "(reading thread)".into(), source: std::io::Error::other("the thread panicked") }
}

/// Rank 0's reading thread: fills free buffers with the chunks in order, each with its status
/// in the trailer.
fn read_chunks(
    plan: ChunkPlan,
    mut reader: StreamReader,
    free: Receiver<Vec<u8>>,
    read: SyncSender<Chunk>,
) -> Result<(), ReadError> {
    let mut failure = None;
    let mut end = plan.count();
    let mut index = 0;
    while index < end {
        let Ok(mut buffer) = free.recv() else { break };
        let len = plan.len(index);
        let mut status = if index + 1 == plan.count() { Status::Last } else { Status::More };
        if failure.is_none() {
            failure = match reader.fill(&mut buffer[..len]) {
                Ok(n) if n == len => None,
                Ok(n) => Some(ReadError::Short { missing: (len - n) as u64 }),
                Err(e) => Some(e),
            };
            if failure.is_some() {
                end = end_after_abort(index, plan.count());
            }
        }
        if failure.is_some() {
            status = Status::Abort;
        }
        let mut chunk = Chunk { buffer, len, status };
        chunk.set_trailer(&[0; 32]);
        if read.send(chunk).is_err() {
            break;
        }
        index += 1;
    }
    failure.map_or(Ok(()), Err)
}

/// What a node got from `receive`.
pub enum Received {
    /// The whole stream: rank 0's checksum and this node's (both `None` unverified).
    Complete { sent: Option<Checksum>, got: Option<Checksum> },
    /// Rank 0 could not read the source to the end.
    Aborted,
}

/// A node leader: receives the stream, checksums it when `hasher` is given, and writes it with
/// `writer` (or drops it, without one, to stay in step after a local failure).
pub fn receive(
    comm: &SimpleCommunicator,
    plan: ChunkPlan,
    hasher: Option<blake3::Hasher>,
    writer: Option<Writer>,
) -> (Received, Option<Writer>, Cpu) {
    let (free_tx, free_rx) = pool(plan);
    let verify = hasher.is_some();
    std::thread::scope(|threads| {
        let (to_write, writing) = match writer {
            Some(writer) => {
                let (tx, rx) = sync_channel(BUFFERS);
                let free = free_tx.clone();
                (Some(tx), Some(step(threads, move || write_chunks(writer, rx, free))))
            }
            None => (None, None),
        };
        // Without a copy to write there is nothing to check either.
        let (next, checksumming) = match (hasher, to_write) {
            (Some(hasher), Some(to_write)) => {
                let (tx, rx) = sync_channel(BUFFERS);
                (Some(tx), Some(step(threads, move || checksum_chunks(hasher, rx, to_write, false))))
            }
            (_, to_write) => (to_write, None),
        };
        let mut sent = None;
        let mut complete = false;
        let mpi_before = thread_cpu();
        drive(
            comm,
            plan,
            || free_rx.try_recv(),
            |chunk| {
                if chunk.status == Status::Last {
                    complete = true;
                    sent = verify.then(|| chunk.trailer_checksum());
                }
                match &next {
                    Some(next) if chunk.status != Status::Abort => pass(chunk, next, &free_tx),
                    _ => recycle(chunk, &free_tx),
                }
            },
        );
        let mpi = thread_cpu() - mpi_before;
        drop(next);
        let (got, checksum_cpu) = checksumming.and_then(|c| c.join().ok()).unwrap_or((None, 0.0));
        let (writer, write_cpu) = writing.and_then(|w| w.join().ok()).map_or((None, 0.0), |(w, cpu)| (Some(w), cpu));
        let received = if complete { Received::Complete { sent, got } } else { Received::Aborted };
        (received, writer, Cpu { read: 0.0, checksum: checksum_cpu, write: write_cpu, mpi })
    })
}

/// Hands a chunk to the next step; should that step's thread have died, the buffer goes back
/// to the pool, so the stream still completes (the step's result reports the loss).
fn pass(chunk: Chunk, next: &SyncSender<Chunk>, free: &SyncSender<Vec<u8>>) {
    if let Err(SendError(chunk)) = next.send(chunk) {
        recycle(chunk, free);
    }
}

fn recycle(chunk: Chunk, free: &SyncSender<Vec<u8>>) {
    let _ = free.send(chunk.buffer);
}

/// Posts the broadcasts in order, at most `DEPTH` at once, and hands each completed chunk on.
/// `next` gives the buffer for the next chunk (filled on rank 0), `Empty` while none is
/// ready.
fn drive(
    comm: &SimpleCommunicator,
    plan: ChunkPlan,
    mut next: impl FnMut() -> Result<Vec<u8>, TryRecvError>,
    mut completed: impl FnMut(Chunk),
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
            completed(Chunk { buffer, len, status: if aborted { Status::Abort } else { status } });
            progressed = true;
        }
        while posted < end && (in_flight.len() as u64) < DEPTH {
            let buffer = match next() {
                Ok(buffer) => buffer,
                Err(TryRecvError::Empty) => break,
                // Only a panicked thread closes the channel early; the other ranks wait for
                // chunks that will not come, so all must stop.
                Err(TryRecvError::Disconnected) => {
                    eprintln!("dlaunch: staging: a thread reading or checksumming the data died: stopping all ranks");
                    comm.abort(exit_code::INTERNAL)
                }
            };
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
        let mut chunk = Chunk { buffer: vec![9u8; 10 + TRAILER], len: 10, status: Status::Last };
        chunk.set_trailer(&[5; 32]);
        assert_eq!(status_of(&chunk.buffer, 10), Status::Last);
        assert_eq!(chunk.trailer_checksum(), [5; 32]);
        assert_eq!(chunk.data(), &[9; 10], "the data is untouched");
        chunk.buffer[10] = 7;
        assert_eq!(status_of(&chunk.buffer, 10), Status::Abort, "anything unknown stops the stream");
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

    #[test]
    fn the_checksum_step_seals_the_last_chunk_and_skips_aborted_ones() {
        let (in_tx, in_rx) = sync_channel(4);
        let (out_tx, out_rx) = sync_channel(4);
        let chunk = |data: &[u8], status| {
            let mut buffer = data.to_vec();
            buffer.resize(data.len() + TRAILER, 0);
            Chunk { buffer, len: data.len(), status }
        };
        in_tx.send(chunk(b"ab", Status::More)).unwrap();
        in_tx.send(chunk(b"c", Status::Last)).unwrap();
        drop(in_tx);
        let sum = checksum_chunks(blake3::Hasher::new(), in_rx, out_tx, true).unwrap();
        assert_eq!(sum, *blake3::hash(b"abc").as_bytes());
        let sealed: Vec<Chunk> = out_rx.into_iter().collect();
        assert_eq!(sealed[1].trailer_checksum(), sum);
        let (in_tx, in_rx) = sync_channel(4);
        let (out_tx, _out_rx) = sync_channel(4);
        in_tx.send(chunk(b"ab", Status::Abort)).unwrap();
        drop(in_tx);
        assert_eq!(checksum_chunks(blake3::Hasher::new(), in_rx, out_tx, false), None, "no last chunk, no checksum");
    }
}
