//! Starting a task process the way posix_spawn does: `clone(CLONE_VM | CLONE_VFORK)`.
//!
//! A worker rank is a big process (OpenMPI maps shared-memory segments), and `fork` copies its
//! page tables and makes every later write in the parent fault: measured, 1.8 ms per task, three
//! quarters of the cost of starting a trivial task. The child here shares the parent's memory
//! instead, on a stack of its own, and the parent waits until it has called exec. So the child
//! may only make system calls on data prepared beforehand: no allocation, no locks, no Rust
//! standard library beyond plain reads of that data.

use std::ffi::{CString, OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::libc::{self, c_int, c_ulong, c_void};
use nix::unistd::Pid;

/// What the child needs, all prepared by the parent.
struct ChildPlan {
    program: CString,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    workdir: CString,
    stdin: c_int,
    stdout: c_int,
    stderr: c_int,
    cpus: Option<libc::cpu_set_t>,
    node_mask: Vec<c_ulong>,
    parent: libc::pid_t,
    parent_mask: libc::sigset_t,
    /// Write end of a close-on-exec pipe: the child reports a failure before exec here.
    error_pipe: c_int,
}

/// Signals whose handlers dlaunch installs, and SIGPIPE, which the Rust runtime ignores: the
/// child sets them back to default before it unblocks signals, so no dlaunch handler can run
/// on the shared memory, and the task starts with the dispositions a shell expects.
const RESET_SIGNALS: [c_int; 6] =
    [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1, libc::SIGUSR2, libc::SIGCHLD, libc::SIGPIPE];

const CHILD_STACK: usize = 64 * 1024;

thread_local! {
    /// The child's stack, kept for the next start: a fresh one per task cost its pages'
    /// faults and zeroing in every child and the heap's trimming in the rank.
    static STACK: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; CHILD_STACK]);
}

/// Steps of the child that can fail, reported with errno through the pipe.
const STEPS: [&str; 7] = [
    "cannot set the process group",
    "dlaunch ended while the task started",
    "cannot bind the task to its CPUs",
    "cannot bind the task's memory to its NUMA nodes",
    "cannot redirect stdin, stdout or stderr",
    "cannot enter the working directory",
    "cannot execute /bin/sh",
];

/// A step of the child failed: which, and whether it was entering the task's working directory
/// (the task's own setting) rather than something dlaunch does.
#[derive(Debug)]
pub struct StartError {
    pub error: io::Error,
    pub workdir: bool,
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl From<io::Error> for StartError {
    fn from(error: io::Error) -> Self {
        StartError { error, workdir: false }
    }
}

/// The step of `STEPS` that enters the working directory.
const WORKDIR_STEP: usize = 5;

pub struct Stdio {
    pub stdin: File,
    pub stdout: File,
    pub stderr: File,
}

/// Starts `/bin/sh -c command name` in a new process group; returns its pid. `name` becomes
/// the shell's `$0`: it shows in `ps` and in the shell's own error messages.
pub fn spawn_shell(
    command: &str,
    name: &str,
    workdir: &Path,
    env: &std::collections::BTreeMap<OsString, OsString>,
    stdio: &Stdio,
    cpus: &[u32],
    mem_nodes: &[u32],
) -> Result<Pid, StartError> {
    let args = [
        c_string(OsStr::new("sh"))?,
        c_string(OsStr::new("-c"))?,
        c_string(OsStr::new(command))?,
        c_string(OsStr::new(name))?,
    ];
    let vars: Vec<CString> = env
        .iter()
        .filter_map(|(key, value)| {
            let mut entry = key.clone();
            entry.push("=");
            entry.push(value);
            c_string(&entry).ok()
        })
        .collect();
    let (error_read, error_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
    let mut plan = ChildPlan {
        program: c_string(OsStr::new("/bin/sh"))?,
        argv: pointers(&args),
        envp: pointers(&vars),
        workdir: c_string(workdir.as_os_str())?,
        stdin: stdio.stdin.as_raw_fd(),
        stdout: stdio.stdout.as_raw_fd(),
        stderr: stdio.stderr.as_raw_fd(),
        cpus: if cpus.is_empty() { None } else { Some(cpu_set(cpus)?) },
        node_mask: node_mask(mem_nodes),
        parent: std::process::id() as libc::pid_t,
        // Safety: an all-zero sigset_t is a valid (empty) set; it is overwritten below.
        parent_mask: unsafe { std::mem::zeroed() },
        error_pipe: error_write.as_raw_fd(),
    };
    // Safety: plain signal-mask calls on sets we own. All signals stay blocked from before
    // the clone until the child has reset dlaunch's handlers.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut plan.parent_mask);
    }
    let (pid, clone_error) = STACK.with_borrow_mut(|stack| {
        // Safety: the child runs `child_main` on its own stack and, sharing our memory, only
        // reads `plan` and makes system calls; CLONE_VFORK keeps this thread, and so `plan`
        // and `stack`, suspended until the child has exec'd or exited.
        let pid = unsafe {
            let top = stack.as_mut_ptr().add(CHILD_STACK) as usize & !15;
            libc::clone(
                child_main,
                top as *mut c_void,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                (&plan as *const ChildPlan).cast_mut().cast(),
            )
        };
        (pid, io::Error::last_os_error())
    });
    // Safety: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &plan.parent_mask, std::ptr::null_mut()) };
    drop(error_write);
    if pid < 0 {
        return Err(clone_error.into());
    }
    let pid = Pid::from_raw(pid);
    match child_failure(error_read) {
        None => Ok(pid),
        Some(error) => {
            // The child has exited already; reap it here so nobody mistakes it for a task.
            let _ = nix::sys::wait::waitpid(pid, None);
            Err(error)
        }
    }
}

/// Reads the child's report: nothing when exec succeeded (the pipe closed on exec).
fn child_failure(pipe: OwnedFd) -> Option<StartError> {
    let mut report = [0u8; 8];
    let n = nix::unistd::read(&pipe, &mut report).unwrap_or(0);
    if n < 8 {
        return None;
    }
    let step = u32::from_ne_bytes([report[0], report[1], report[2], report[3]]) as usize;
    let errno = i32::from_ne_bytes([report[4], report[5], report[6], report[7]]);
    let what = STEPS.get(step).copied().unwrap_or("cannot start the task");
    let cause = io::Error::from_raw_os_error(errno);
    Some(StartError { error: io::Error::new(cause.kind(), format!("{what}: {cause}")), workdir: step == WORKDIR_STEP })
}

/// The child, between clone and exec. System calls only; see the module comment.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // Safety: `arg` is the parent's ChildPlan, alive until we exec or exit (CLONE_VFORK).
    let plan = unsafe { &*(arg as *const ChildPlan) };
    // Safety: each call is a system call on prepared data; failures go to `fail`.
    unsafe {
        for signal in RESET_SIGNALS {
            libc::signal(signal, libc::SIG_DFL);
        }
        if libc::setpgid(0, 0) != 0 {
            fail(plan, 0);
        }
        // If dlaunch dies, the task dies with it rather than running on unsupervised.
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 || libc::getppid() != plan.parent {
            fail(plan, 1);
        }
        if let Some(set) = &plan.cpus
            && libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) != 0
        {
            fail(plan, 2);
        }
        if !plan.node_mask.is_empty() {
            const MPOL_BIND: libc::c_long = 2;
            let max_node = (plan.node_mask.len() * c_ulong::BITS as usize + 1) as c_ulong;
            if libc::syscall(libc::SYS_set_mempolicy, MPOL_BIND, plan.node_mask.as_ptr(), max_node) != 0 {
                fail(plan, 3);
            }
        }
        if libc::dup2(plan.stdin, 0) < 0 || libc::dup2(plan.stdout, 1) < 0 || libc::dup2(plan.stderr, 2) < 0 {
            fail(plan, 4);
        }
        if libc::chdir(plan.workdir.as_ptr()) != 0 {
            fail(plan, 5);
        }
        // OpenMPI marks none of its sockets close-on-exec: a task must not inherit dlaunch's
        // connections to other ranks or to the process manager.
        mark_close_on_exec_from_3();
        libc::pthread_sigmask(libc::SIG_SETMASK, &plan.parent_mask, std::ptr::null_mut());
        libc::execve(plan.program.as_ptr(), plan.argv.as_ptr(), plan.envp.as_ptr());
        fail(plan, 6)
    }
}

/// Reports the failed step and errno to the parent and exits. Child side; system calls only.
unsafe fn fail(plan: &ChildPlan, step: u32) -> ! {
    // Safety: errno of this thread; a write to a pipe; _exit never returns.
    unsafe {
        let errno = *libc::__errno_location();
        let mut report = [0u8; 8];
        report[..4].copy_from_slice(&step.to_ne_bytes());
        report[4..].copy_from_slice(&errno.to_ne_bytes());
        libc::write(plan.error_pipe, report.as_ptr().cast(), report.len());
        libc::_exit(127)
    }
}

/// close_range(3, ~0, CLOSE_RANGE_CLOEXEC) (Linux 5.11); on older kernels, one descriptor at a
/// time up to the soft limit. Child side; system calls only.
unsafe fn mark_close_on_exec_from_3() {
    // Safety: system calls on descriptor numbers; no memory is passed.
    unsafe {
        if libc::syscall(libc::SYS_close_range, 3 as c_ulong, c_ulong::MAX, libc::CLOSE_RANGE_CLOEXEC as c_ulong) == 0 {
            return;
        }
        let mut limit: libc::rlimit = std::mem::zeroed();
        let highest = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 { limit.rlim_cur } else { 1024 };
        for fd in 3..highest.min(1 << 20) as c_int {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
}

fn c_string(text: &OsStr) -> io::Result<CString> {
    CString::new(text.as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in an argument"))
}

/// NULL-terminated pointer array for execve; valid while `strings` lives.
fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

fn cpu_set(cpus: &[u32]) -> io::Result<libc::cpu_set_t> {
    // Safety: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let capacity = 8 * std::mem::size_of::<libc::cpu_set_t>();
    for &cpu in cpus {
        if cpu as usize >= capacity {
            return Err(io::Error::other(format!("cannot bind to CPU {cpu}: beyond {capacity} CPUs")));
        }
        // Safety: `cpu` is within the set, checked above.
        unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    }
    Ok(set)
}

/// The nodemask for set_mempolicy: one bit per NUMA node, in machine words.
pub fn node_mask(nodes: &[u32]) -> Vec<c_ulong> {
    let bits = c_ulong::BITS;
    let Some(&max) = nodes.iter().max() else { return Vec::new() };
    let mut mask = vec![0; (max / bits) as usize + 1];
    for &node in nodes {
        mask[(node / bits) as usize] |= 1 << (node % bits);
    }
    mask
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stdio(dir: &Path) -> Stdio {
        let file = |name: &str| File::create(dir.join(name)).unwrap();
        Stdio { stdin: File::open("/dev/null").unwrap(), stdout: file("out"), stderr: file("err") }
    }

    fn wait(pid: Pid) -> nix::sys::wait::WaitStatus {
        nix::sys::wait::waitpid(pid, None).unwrap()
    }

    #[test]
    fn runs_the_command_in_its_own_group_with_its_env_and_directory() {
        let dir = tempfile::tempdir().unwrap();
        let env = [("GREETING".into(), "hi".into())].into_iter().collect();
        let pid = spawn_shell(
            "echo $GREETING $(pwd) $(ps -o pgid= $$)",
            "t",
            dir.path(),
            &env,
            &stdio(dir.path()),
            &[0],
            &[],
        )
        .unwrap();
        assert_eq!(wait(pid), nix::sys::wait::WaitStatus::Exited(pid, 0));
        let out = std::fs::read_to_string(dir.path().join("out")).unwrap();
        let words: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(words[..2], ["hi", &*dir.path().to_string_lossy()]);
        assert_eq!(words[2], pid.to_string(), "the task leads its own process group");
    }

    #[test]
    fn a_failing_step_is_reported_with_its_cause() {
        let dir = tempfile::tempdir().unwrap();
        let env = Default::default();
        let missing = dir.path().join("gone");
        let error = spawn_shell("true", "t", &missing, &env, &stdio(dir.path()), &[], &[]).unwrap_err();
        assert!(error.to_string().starts_with("cannot enter the working directory: No such file"), "{error}");
        let error = spawn_shell("true", "t", dir.path(), &env, &stdio(dir.path()), &[100_000], &[]).unwrap_err();
        assert!(error.to_string().contains("beyond"), "{error}");
    }

    #[test]
    fn node_masks() {
        assert_eq!(node_mask(&[]), Vec::<c_ulong>::new());
        assert_eq!(node_mask(&[0, 2]), vec![0b101]);
        assert_eq!(node_mask(&[65]).len(), 2);
    }
}
