//! The CUDA driver asked in a child process forked as a rank starts, before MPI: the driver's
//! start (`cuInit`: 250-260 ms on a 16-core H200 node, measured) then runs while MPI starts,
//! instead of after it, where every run of dlaunch waited for it. A child, not a thread: MPI
//! starting beside a thread inside the driver is not something to rely on, and a driver that
//! crashes takes only the child along (the node is then CPU-only, as with a missing driver).

use std::fs::File;
use std::io::{Read, Write};

use nix::fcntl::OFlag;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, Pid, fork};

use super::CudaAnswer;

pub struct CudaProbe {
    child: Pid,
    answer: Option<File>,
}

impl CudaProbe {
    /// Forks the probe. Call while the process is still single-threaded (before MPI starts).
    pub fn start() -> nix::Result<CudaProbe> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        // Safety: single-threaded here; the child asks the driver, writes and exits without
        // running anything of the parent's (no destructors, no buffered output).
        match unsafe { fork() }? {
            ForkResult::Child => {
                drop(read);
                let bytes = serde_json::to_vec(&CudaAnswer::ask()).unwrap_or_default();
                let _ = File::from(write).write_all(&bytes);
                // Safety: ends the child at once; see above.
                unsafe { nix::libc::_exit(0) }
            }
            ForkResult::Parent { child } => Ok(CudaProbe { child, answer: Some(File::from(read)) }),
        }
    }

    /// The driver's answer, once the probe has sent it (at once when it already has).
    pub fn answer(mut self) -> CudaAnswer {
        let start = std::time::Instant::now();
        let mut bytes = Vec::new();
        let read = self.answer.take().map(|mut pipe| pipe.read_to_end(&mut bytes));
        let _ = waitpid(self.child, None);
        log::debug!("the CUDA driver's answer came {:?} after it was needed", start.elapsed());
        match (read, serde_json::from_slice(&bytes)) {
            (Some(Ok(_)), Ok(answer)) => answer,
            _ => CudaAnswer::Unusable("the process asking the driver ended without an answer".into()),
        }
    }
}

impl Drop for CudaProbe {
    /// An answer nobody asked for (rank 0 runs no tasks): the probe goes.
    fn drop(&mut self) {
        if self.answer.take().is_some() {
            let _ = kill(self.child, Signal::SIGKILL);
            let _ = waitpid(self.child, None);
        }
    }
}
