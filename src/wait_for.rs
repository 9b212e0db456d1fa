//! `dlaunch wait-for`: what a role with `wait_for` runs before its command (see
//! `dlaunch_core::env::wait_line`): connect to every `host:port` of the role it waits for,
//! again and again, until each accepts a connection or the time is up.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use dlaunch_core::env::{WAIT_FAILED, parse_host_list};
use dlaunch_core::spec::format_duration;

/// One connection attempt may take this long: a host that drops packets must not stall the
/// loop for the kernel's minutes-long SYN timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Returns the exit status: 0 when all listen, `WAIT_FAILED` otherwise (with the reason on stderr).
pub fn wait_for(role: &str, timeout: Duration, hosts: &str) -> i32 {
    let mut pending = match parse_host_list(hosts) {
        Ok(targets) => targets,
        Err(e) => {
            eprintln!("dlaunch wait-for: role {role}: {e}");
            return WAIT_FAILED;
        }
    };
    let deadline = Instant::now() + timeout;
    loop {
        pending.retain(|(host, port)| !accepts(host, *port));
        if pending.is_empty() {
            return 0;
        }
        if Instant::now() >= deadline {
            let left: Vec<String> = pending.iter().map(|(h, p)| format!("{h}:{p}")).collect();
            eprintln!(
                "dlaunch wait-for: role {role} did not accept connections within {} at {}",
                format_duration(timeout),
                left.join(", ")
            );
            return WAIT_FAILED;
        }
        std::thread::sleep(RETRY_PAUSE);
    }
}

fn accepts(host: &str, port: u16) -> bool {
    let addrs = (host, port).to_socket_addrs().map(Iterator::collect::<Vec<_>>).unwrap_or_default();
    addrs.iter().any(|addr| TcpStream::connect_timeout(addr, CONNECT_TIMEOUT).is_ok())
}
