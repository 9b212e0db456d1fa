//! Ports for rendezvous (`MASTER_PORT`, `TF_CONFIG`), handed out per host so two tasks on one
//! node never get the same port.

use std::collections::{BTreeSet, HashMap};

use crate::spec::PortRange;

#[derive(Debug)]
pub struct PortBook {
    range: PortRange,
    hosts: HashMap<usize, HostPorts>,
}

#[derive(Debug, Default)]
struct HostPorts {
    in_use: BTreeSet<u16>,
    /// Round-robin cursor: a retried attempt gets a fresh port, not the one that just failed.
    next: u16,
}

impl PortBook {
    pub fn new(range: PortRange) -> Self {
        PortBook { range, hosts: HashMap::new() }
    }

    /// A port on `host` not in use by any running task, or None when the range is exhausted.
    pub fn take(&mut self, host: usize) -> Option<u16> {
        let PortRange { first, last } = self.range;
        let ports = self.hosts.entry(host).or_default();
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
        let mut book = PortBook::new(PortRange { first: 29500, last: 29502 });
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
}
