//! Ports for rendezvous (`MASTER_PORT`, `TF_CONFIG`), handed out per host so two tasks on one
//! node never get the same port.
//!
//! Two jobs on one node (two users' dlaunch runs, or two test jobs at once) hand out from the
//! same default range without knowing of each other. Each job starts its round-robin at a
//! place of its own in the range (from its output directory, so a resumed run starts where
//! the last one did): they meet only by a one-in-a-thousand chance, and then the worker's
//! bind test before a start finds the port taken and the attempt moves on.

use std::collections::{BTreeSet, HashMap};

use crate::spec::PortRange;

#[derive(Debug)]
pub struct PortBook {
    range: PortRange,
    /// Where every host's round-robin starts: `first_port` of this job.
    start: u16,
    hosts: HashMap<usize, HostPorts>,
}

/// The first port a job with this output directory hands out on each host.
pub fn first_port(range: PortRange, output_dir: &str) -> u16 {
    let span = u64::from(range.last - range.first) + 1;
    let hash = blake3::hash(output_dir.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    range.first + (u64::from_le_bytes(first) % span) as u16
}

#[derive(Debug)]
struct HostPorts {
    in_use: BTreeSet<u16>,
    /// Round-robin cursor: a retried attempt gets a fresh port, not the one that just failed.
    next: u16,
}

impl PortBook {
    pub fn new(range: PortRange, start: u16) -> Self {
        PortBook { range, start, hosts: HashMap::new() }
    }

    /// A port on `host` not in use by any running task, or None when the range is exhausted.
    pub fn take(&mut self, host: usize) -> Option<u16> {
        let PortRange { first, last } = self.range;
        let start = self.start;
        let ports = self.hosts.entry(host).or_insert_with(|| HostPorts { in_use: BTreeSet::new(), next: start });
        let span = u32::from(last - first) + 1;
        let start = ports.next.clamp(first, last);
        for step in 0..span {
            let port = (u32::from(start - first) + step) % span + u32::from(first);
            let port = port as u16;
            if ports.in_use.insert(port) {
                ports.next = if port == last { first } else { port + 1 };
                return Some(port);
            }
        }
        None
    }

    pub fn give(&mut self, host: usize, port: u16) {
        if let Some(ports) = self.hosts.get_mut(&host) {
            ports.in_use.remove(&port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_unique_per_host_and_rotate() {
        let mut book = PortBook::new(PortRange { first: 29500, last: 29502 }, 29500);
        assert_eq!(book.take(0), Some(29500));
        assert_eq!(book.take(0), Some(29501));
        assert_eq!(book.take(1), Some(29500), "hosts are independent");
        book.give(0, 29500);
        assert_eq!(book.take(0), Some(29502), "round robin, not lowest free");
        assert_eq!(book.take(0), Some(29500));
        assert_eq!(book.take(0), None, "exhausted");
        book.give(0, 29501);
        assert_eq!(book.take(0), Some(29501));
    }

    #[test]
    fn each_job_starts_at_a_place_of_its_own() {
        let range = PortRange { first: 29500, last: 30499 };
        let firsts: BTreeSet<u16> = (0..50).map(|i| first_port(range, &format!("/runs/job{i}"))).collect();
        assert!(firsts.len() > 45, "{firsts:?}");
        assert!(firsts.iter().all(|p| (29500..=30499).contains(p)));
        assert_eq!(first_port(range, "/runs/a"), first_port(range, "/runs/a"), "the same on every start");
        let mut book = PortBook::new(PortRange { first: 29500, last: 29502 }, 29502);
        assert_eq!((book.take(0), book.take(0)), (Some(29502), Some(29500)), "from its start, round the range");
    }
}
