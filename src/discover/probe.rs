//! The CUDA driver asked in a child process forked as a rank starts, before MPI: the driver's
//! start (`cuInit`: 250-260 ms on a 16-core H200 node, measured) then runs while MPI starts,
//! instead of after it, where every run of dlaunch waited for it. A child, not a thread: MPI
//! starting beside a thread inside the driver is not something to rely on, and a driver that
//! crashes takes only the child along (the node is then CPU-only, as with a missing driver).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};

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
        let rank = nix::unistd::getpid();
        // Safety: single-threaded here; the child asks the driver, writes and exits without
        // running anything of the parent's (no destructors, no buffered output).
        match unsafe { fork() }? {
            ForkResult::Child => {
                drop(read);
                leave_the_rank_alone(rank, write.as_raw_fd());
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

/// The probe dies with its rank (a driver that hangs must not outlive a rank killed
/// outright) and holds none of the rank's descriptors but its answer's: the task guard's
/// pipe, which tells the guard that the rank is gone, above all.
fn leave_the_rank_alone(rank: Pid, answer: RawFd) {
    // Safety: prctl and close_range on this process's own state; no memory is passed.
    unsafe {
        nix::libc::prctl(nix::libc::PR_SET_PDEATHSIG, nix::libc::SIGKILL);
        // The rank died before the line above: nobody waits for an answer.
        if nix::unistd::getppid() != rank {
            nix::libc::_exit(0);
        }
        let close = |first: RawFd, last: RawFd| {
            first <= last && nix::libc::syscall(nix::libc::SYS_close_range, first as u32, last as u32, 0) == 0
        };
        let lowest = 3;
        let before = answer == lowest || close(lowest, answer - 1);
        if before && close(answer + 1, RawFd::MAX) {
            return;
        }
    }
    // No close_range (Linux before 5.9, as on RHEL 8): one descriptor at a time.
    let open: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|entries| entries.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    for fd in open.into_iter().filter(|&fd| fd > 2 && fd != answer) {
        // Safety: closes a descriptor of this process; the directory's own is gone by now.
        unsafe { nix::libc::close(fd) };
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
