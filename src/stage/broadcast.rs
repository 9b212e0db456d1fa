//! MPI for staging: the communicators (one per node, one of the node leaders), small
//! collectives that wait without spinning, and an `MPI_Ibcast` that owns its buffer.

use std::os::raw::c_int;

use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::ffi;
use mpi::request::{Request, Scope, scope};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::signals::Backoff;
use dlaunch_core::exit_code;

pub struct Comms {
    pub node: SimpleCommunicator,
    /// Rank 0 of every node, in world-rank order, so world rank 0 is leader 0; `None` on the
    /// other ranks.
    pub leaders: Option<SimpleCommunicator>,
}

impl Comms {
    /// Nodes are what `MPI_Comm_split_type(SHARED)` says, or single ranks with `rank_is_node`.
    pub fn new(world: &SimpleCommunicator, rank_is_node: bool) -> Comms {
        let own = rank_is_node.then(|| world.split_by_color(Color::with_value(world.rank()))).flatten();
        let node = own.unwrap_or_else(|| world.split_shared(world.rank()));
        let color = if node.rank() == 0 { Color::with_value(0) } else { Color::undefined() };
        let leaders = world.split_by_color_with_key(color, world.rank());
        Comms { node, leaders }
    }

    /// Whether any rank of this node runs tasks, and so needs the datasets there.
    pub fn node_has_workers(&self, is_worker: bool) -> bool {
        let mut any = 0i32;
        self.node.all_reduce_into(&i32::from(is_worker), &mut any, SystemOperation::max());
        any > 0
    }
}

/// Waits for a request, sleeping between tests: these waits can be long (a node checksums its
/// old copy, rank 0 its source), and a rank that waits must not take a core from those working.
fn settle<'a, D: ?Sized, S: Scope<'a>>(mut request: Request<'a, D, S>) {
    let mut backoff = Backoff::new();
    loop {
        match request.test() {
            Ok(_) => return,
            Err(pending) => {
                request = pending;
                std::thread::sleep(backoff.next_pause());
            }
        }
    }
}

/// rsmpi counts in `c_int`: one call moves less than 2 GiB.
const MAX_PIECE: usize = 1 << 30;

/// Rank 0's bytes (`Some` there, `None` elsewhere), on every rank of `comm`.
pub fn broadcast_bytes(comm: &SimpleCommunicator, bytes: Option<Vec<u8>>) -> Vec<u8> {
    let root = comm.process_at_rank(0);
    let mut len = bytes.as_ref().map_or(0, |b| b.len() as u64);
    scope(|s| settle(root.immediate_broadcast_into(s, &mut len)));
    let mut bytes = bytes.unwrap_or_else(|| vec![0; len as usize]);
    for piece in bytes.chunks_mut(MAX_PIECE) {
        scope(|s| settle(root.immediate_broadcast_into(s, piece)));
    }
    bytes
}

/// Rank 0's value (`Some` there) on every rank of `comm`, as `T` (what `S` serializes to).
pub fn broadcast_json<S: Serialize, T: DeserializeOwned>(comm: &SimpleCommunicator, value: Option<S>) -> T {
    let bytes = broadcast_bytes(comm, value.map(|v| serde_json::to_vec(&v).unwrap_or_default()));
    decode(comm, &bytes)
}

/// Every rank's value, in rank order, on rank 0 (`None` elsewhere).
pub fn gather_json<T: Serialize + DeserializeOwned>(comm: &SimpleCommunicator, value: &T) -> Option<Vec<T>> {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let len = bytes.len() as c_int;
    let root = comm.process_at_rank(0);
    if comm.rank() != 0 {
        scope(|s| settle(root.immediate_gather_into(s, &len)));
        scope(|s| settle(root.immediate_gather_varcount_into(s, &bytes[..])));
        return None;
    }
    let mut lens = vec![0 as c_int; comm.size() as usize];
    scope(|s| settle(root.immediate_gather_into_root(s, &len, &mut lens[..])));
    let starts: Vec<c_int> = lens.iter().scan(0, |next, &len| Some(std::mem::replace(next, *next + len))).collect();
    let mut all = vec![0u8; lens.iter().map(|&l| l as usize).sum()];
    {
        let mut partition = PartitionMut::new(&mut all[..], &lens[..], &starts[..]);
        scope(|s| settle(root.immediate_gather_varcount_into_root(s, &bytes[..], &mut partition)));
    }
    Some(starts.iter().zip(&lens).map(|(&start, &len)| decode(comm, &all[start as usize..][..len as usize])).collect())
}

/// Every rank runs the same binary, so a message that does not decode means memory or
/// transport corruption: no rank can go on in step with the others, so all stop.
fn decode<T: DeserializeOwned>(comm: &SimpleCommunicator, bytes: &[u8]) -> T {
    match serde_json::from_slice(bytes) {
        Ok(value) => value,
        Err(e) => {
            eprintln!("dlaunch: staging: unreadable message between ranks ({e}): aborting all ranks");
            comm.abort(exit_code::INTERNAL)
        }
    }
}

/// An `MPI_Ibcast` from rank 0 of a communicator that owns its buffer, so the buffer can be
/// neither touched nor freed while MPI uses it. rsmpi's requests borrow their buffers, which
/// could then not travel to the disk threads and back.
pub struct Ibcast {
    request: ffi::MPI_Request,
    buffer: Vec<u8>,
}

impl Ibcast {
    /// Starts broadcasting `buffer[..len]` (rank 0 sends, the others receive into it).
    pub fn start(comm: &SimpleCommunicator, mut buffer: Vec<u8>, len: usize) -> Ibcast {
        let len = len.min(buffer.len()).min(c_int::MAX as usize);
        // SAFETY: MPI reads or writes `len` bytes of `buffer`'s heap block, which stays allocated
        // and untouched until the request completes: only `finish` gives the buffer back, after
        // waiting, and `Drop` waits too. Moving the Vec does not move its heap block.
        let request = unsafe {
            let mut request = ffi::RSMPI_REQUEST_NULL;
            ffi::MPI_Ibcast(
                buffer.as_mut_ptr().cast(),
                len as c_int,
                ffi::RSMPI_UINT8_T,
                0,
                comm.as_raw(),
                &mut request,
            );
            request
        };
        Ibcast { request, buffer }
    }

    /// Whether the broadcast is complete; drives MPI's progress.
    pub fn test(&mut self) -> bool {
        if self.done() {
            return true;
        }
        let mut flag: c_int = 0;
        // SAFETY: a live request; MPI_Test sets it to MPI_REQUEST_NULL once complete.
        unsafe { ffi::MPI_Test(&mut self.request, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
        flag != 0
    }

    /// The buffer back, once the broadcast is complete (waiting for it if need be).
    pub fn finish(mut self) -> Vec<u8> {
        self.wait();
        std::mem::take(&mut self.buffer)
    }

    fn done(&self) -> bool {
        // SAFETY: reading an immutable MPI constant.
        self.request == unsafe { ffi::RSMPI_REQUEST_NULL }
    }

    fn wait(&mut self) {
        if !self.done() {
            // SAFETY: a live request; MPI_Wait completes it and sets it to MPI_REQUEST_NULL.
            unsafe { ffi::MPI_Wait(&mut self.request, ffi::RSMPI_STATUS_IGNORE) };
        }
    }
}

impl Drop for Ibcast {
    fn drop(&mut self) {
        self.wait();
    }
}
