//! This host's name, and an address that the other nodes of the allocation can reach it at.

use std::net::{IpAddr, ToSocketAddrs};
use std::path::PathBuf;

pub fn hostname() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "localhost".into())
}

/// A temporary directory named by an environment variable that does not exist. dlaunch (and
/// MPI, which it starts) create only their own directories in it, never the missing parents:
/// those would land wherever the typo points, on the root filesystem.
#[derive(Debug, thiserror::Error)]
#[error(
    "{}={}: no such directory on {}; dlaunch and MPI keep temporary files there and create only their own directories inside it: create it, or set {0} to a directory that exists (unset, /tmp is used)",
    var, path.display(), hostname()
)]
pub struct MissingTempDir {
    pub var: &'static str,
    pub path: PathBuf,
}

/// The variables naming the temporary directory, in the order OpenMPI reads them
/// (`opal_tmp_directory`); the first one set is used, and Rust's `temp_dir` reads `TMPDIR`.
const TEMP_DIR_VARS: [&str; 3] = ["TMPDIR", "TEMP", "TMP"];

/// Checks the temporary directory MPI and dlaunch will use before either creates anything in it.
pub fn check_temp_dir() -> Result<(), MissingTempDir> {
    let named = TEMP_DIR_VARS.iter().find_map(|&var| Some((var, std::env::var_os(var).filter(|v| !v.is_empty())?)));
    match named {
        Some((var, path)) if !std::path::Path::new(&path).is_dir() => {
            Err(MissingTempDir { var, path: PathBuf::from(path) })
        }
        _ => Ok(()),
    }
}

/// The address advertised as `MASTER_ADDR` and in `TF_CONFIG`, chosen like this:
/// 1. `DLAUNCH_ADDRESS`, when set;
/// 2. the interface OpenMPI is told to use (`OMPI_MCA_oob_tcp_if_include`, then
///    `OMPI_MCA_btl_tcp_if_include`, names or CIDRs): MPI's network is the job's network;
/// 3. the host name, when it resolves to a non-loopback address;
/// 4. the first non-loopback IPv4 interface; else the host name.
pub fn advertised_address(host: &str) -> String {
    if let Ok(addr) = std::env::var("DLAUNCH_ADDRESS")
        && !addr.is_empty()
    {
        return addr;
    }
    let interfaces = interfaces();
    for var in ["OMPI_MCA_oob_tcp_if_include", "OMPI_MCA_btl_tcp_if_include"] {
        if let Ok(spec) = std::env::var(var)
            && let Some(ip) = pick_interface(&interfaces, &spec)
        {
            return ip.to_string();
        }
    }
    if let Ok(addrs) = (host, 0).to_socket_addrs()
        && let Some(ip) = addrs.map(|a| a.ip()).find(|ip| ip.is_ipv4() && !ip.is_loopback())
    {
        return ip.to_string();
    }
    interfaces
        .iter()
        .map(|(_, ip)| *ip)
        .find(|ip| ip.is_ipv4() && !ip.is_loopback())
        .map_or_else(|| host.to_string(), |ip| ip.to_string())
}

fn interfaces() -> Vec<(String, IpAddr)> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else { return Vec::new() };
    addrs
        .filter_map(|ifa| {
            let ip = ifa.address.as_ref()?.as_sockaddr_in().map(|a| IpAddr::V4(a.ip()))?;
            Some((ifa.interface_name, ip))
        })
        .collect()
}

/// The first IPv4 address of an interface named in `spec` ("lo", "eth0,ib0", "10.0.0.0/8").
pub fn pick_interface(interfaces: &[(String, IpAddr)], spec: &str) -> Option<IpAddr> {
    for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let found = interfaces.iter().find(|(name, ip)| name == item || in_cidr(item, *ip));
        if let Some((_, ip)) = found {
            return Some(*ip);
        }
    }
    None
}

fn in_cidr(cidr: &str, ip: IpAddr) -> bool {
    let Some((net, bits)) = cidr.split_once('/') else { return false };
    let (Ok(IpAddr::V4(net)), Ok(bits), IpAddr::V4(ip)) = (net.parse::<IpAddr>(), bits.parse::<u32>(), ip) else {
        return false;
    };
    if bits > 32 {
        return false;
    }
    let mask = if bits == 0 { 0 } else { u32::MAX << (32 - bits) };
    u32::from(net) & mask == u32::from(ip) & mask
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_total_from_meminfo() {
        let meminfo = "MemTotal:       131981020 kB\nMemFree:        130651668 kB\n";
        assert_eq!(mem_total(meminfo), Some(131981020 * 1024));
        assert_eq!(mem_total("MemFree: 1 kB\n"), None);
        assert_eq!(mem_total("MemTotal: lots\n"), None);
        assert_eq!(mem_total("Node 0 MemTotal:        4550128 kB\nNode 0 MemFree: 1 kB\n"), Some(4550128 * 1024));
    }

    #[test]
    fn interfaces_by_name_or_cidr() {
        let ifs = vec![
            ("lo".to_string(), "127.0.0.1".parse().unwrap()),
            ("eth0".to_string(), "192.168.77.11".parse().unwrap()),
        ];
        assert_eq!(pick_interface(&ifs, "eth0"), Some("192.168.77.11".parse().unwrap()));
        assert_eq!(pick_interface(&ifs, "192.168.77.0/24"), Some("192.168.77.11".parse().unwrap()));
        assert_eq!(pick_interface(&ifs, "ib0,lo"), Some("127.0.0.1".parse().unwrap()));
        assert_eq!(pick_interface(&ifs, "10.0.0.0/8"), None);
        assert_eq!(pick_interface(&ifs, "10.0.0.0/99"), None);
    }

    #[test]
    fn this_machine_has_a_name_and_an_address() {
        let host = hostname();
        assert!(!host.is_empty());
        assert!(!advertised_address(&host).is_empty());
    }
}

/// The machine's memory as the kernel counts it (`MemTotal` of /proc/meminfo), in bytes.
pub fn machine_memory() -> Option<u64> {
    mem_total(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// The memory the kernel places on its NUMA nodes, all of them (those a cpuset keeps this
/// process from too), in bytes: the sum of each node's `MemTotal`.
pub fn memory_on_nodes() -> Option<u64> {
    let nodes = std::fs::read_dir("/sys/devices/system/node").ok()?;
    let node_files = nodes.flatten().filter(|e| {
        e.file_name().to_str().is_some_and(|n| n.strip_prefix("node").is_some_and(|i| i.parse::<u32>().is_ok()))
    });
    node_files.map(|e| std::fs::read_to_string(e.path().join("meminfo")).ok().and_then(|t| mem_total(&t))).sum()
}

/// The `MemTotal` line of /proc/meminfo or of a node's meminfo ("Node 0 MemTotal: … kB").
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| Some(l.split_once("MemTotal:")?.1))?;
    let kb: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kb.checked_mul(1024)
}

/// The memory this process may use, when something limits it below the machine's: its cgroup
/// (v2 `memory.max`, v1 `memory.limit_in_bytes`) or SLURM's `--mem` (`SLURM_MEM_PER_NODE`, MB).
pub fn memory_limit() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok().and_then(|text| {
        let (v2, v1) = cgroup_memory_files(&text);
        [v2, v1].into_iter().flatten().find_map(|path| parse_limit(&std::fs::read_to_string(path).ok()?))
    });
    let slurm =
        std::env::var("SLURM_MEM_PER_NODE").ok().and_then(|mb| mb.trim().parse::<u64>().ok()).map(|mb| mb << 20);
    [cgroup, slurm].into_iter().flatten().min()
}

/// The files holding this process's memory limit, from /proc/self/cgroup: (v2, v1).
fn cgroup_memory_files(proc_cgroup: &str) -> (Option<String>, Option<String>) {
    let mut v2 = None;
    let mut v1 = None;
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next(), fields.next(), fields.next());
        match (controllers, path) {
            (Some(""), Some(path)) => v2 = Some(format!("/sys/fs/cgroup{path}/memory.max")),
            (Some(list), Some(path)) if list.split(',').any(|c| c == "memory") => {
                v1 = Some(format!("/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"))
            }
            _ => {}
        }
    }
    (v2, v1)
}

/// A cgroup limit file's content: bytes, or "max" / an absurd v1 "unlimited" (None).
fn parse_limit(text: &str) -> Option<u64> {
    let bytes = text.trim().parse::<u64>().ok()?;
    (bytes < 1 << 60).then_some(bytes)
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    #[test]
    fn cgroup_files_and_limits() {
        let v1 = "12:pids:/\n4:memory:/slurm/uid_0/job_42\n0::/\n";
        let (v2_file, v1_file) = cgroup_memory_files(v1);
        assert_eq!(v1_file.as_deref(), Some("/sys/fs/cgroup/memory/slurm/uid_0/job_42/memory.limit_in_bytes"));
        assert_eq!(v2_file.as_deref(), Some("/sys/fs/cgroup//memory.max"));
        let (v2_file, v1_file) = cgroup_memory_files("0::/system.slice/job.scope\n");
        assert_eq!(v2_file.as_deref(), Some("/sys/fs/cgroup/system.slice/job.scope/memory.max"));
        assert_eq!(v1_file, None);
        assert_eq!(parse_limit("4294967296\n"), Some(4 << 30));
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712"), None, "cgroup v1 says unlimited this way");
    }
}
