//! `dlaunch wait-for`: what a role with `wait_for` runs before its command (see
//! `dlaunch_core::env::wait_line`): connect to every `host:port` of the role it waits for,
//! again and again, until each accepts a connection or the time is up.

use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::beneath;
use dlaunch_core::env::{WAIT_FAILED, parse_host_list};
use dlaunch_core::spec::format_duration;

/// One connection attempt may take this long: a host that drops packets must not stall the
/// loop for the kernel's minutes-long SYN timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Returns the exit status: 0 when all listen, `WAIT_FAILED` otherwise, with the reason on
/// stderr and in `marker` when given.
pub fn wait_for(role: &str, timeout: Duration, hosts: &str, marker: Option<&Path>) -> i32 {
    match wait(role, timeout, hosts) {
        Ok(()) => 0,
        Err(reason) => {
            eprintln!("dlaunch wait-for: {reason}");
            if let Some(marker) = marker {
                leave_marker(marker, &reason);
            }
            WAIT_FAILED
        }
    }
}

/// Creates the marker, never through a link: only the worker's log directory is meant.
fn leave_marker(marker: &Path, reason: &str) {
    let created = create_marker(marker).and_then(|mut file| std::io::Write::write_all(&mut file, reason.as_bytes()));
    if let Err(e) = created {
        eprintln!(
            "dlaunch wait-for: cannot create {} ({e}): the failure shows as exit {WAIT_FAILED}",
            marker.display()
        );
    }
}

/// The marker goes in the attempt's log directory, which exists only once the process wrote
/// output: it is made here like the logs make it, beneath the task's directory and with its
/// mode, never through a link.
fn create_marker(marker: &Path) -> std::io::Result<std::fs::File> {
    let (Some(dir), Some(name)) = (marker.parent(), marker.file_name().and_then(|n| n.to_str())) else {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"));
    };
    let task_dir = std::env::var_os("DLAUNCH_TASK_DIR").map(PathBuf::from);
    let within = task_dir.as_ref().and_then(|t| Some((t, dir.strip_prefix(t).ok()?)));
    let opened = match within {
        Some((task_dir, relative)) if !relative.as_os_str().is_empty() => {
            let mode = std::fs::metadata(task_dir)?.permissions().mode() & 0o777;
            beneath::make_dirs(&beneath::open_root(task_dir)?, relative, mode, false)?
        }
        _ => beneath::open_root(dir)?,
    };
    beneath::create_new(&opened, name, 0o600)
}

fn wait(role: &str, timeout: Duration, hosts: &str) -> Result<(), String> {
    let mut pending = parse_host_list(hosts).map_err(|e| format!("role {role}: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        pending.retain(|(host, port)| !accepts(host, *port));
        if pending.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let left: Vec<String> = pending.iter().map(|(h, p)| format!("{h}:{p}")).collect();
            return Err(format!(
                "role {role} did not accept connections within {} at {}",
                format_duration(timeout),
                left.join(", ")
            ));
        }
        std::thread::sleep(RETRY_PAUSE);
    }
}

fn accepts(host: &str, port: u16) -> bool {
    let addrs = (host, port).to_socket_addrs().map(Iterator::collect::<Vec<_>>).unwrap_or_default();
    addrs.iter().any(|addr| TcpStream::connect_timeout(addr, CONNECT_TIMEOUT).is_ok())
}
