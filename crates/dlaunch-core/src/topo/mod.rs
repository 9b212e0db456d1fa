//! Node hardware as data: the topology model, sharing a node between worker ranks, placing
//! tasks on it.
//!
//! The shell's `discover` fills a [`NodeTopology`] from hwloc and the CUDA driver; everything
//! after that is pure and tested against recorded topologies of real machines.

mod place;
mod report;
mod share;
mod visible;

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

pub(crate) use place::{Placement, Placer};
pub use report::render_text;
pub use share::{NodeMates, divide, share};
pub use visible::{cuda_ids_for_ordinals, filter_visible, granted_gpus};

/// Where the GPU list came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuSource {
    /// The CUDA driver of this machine.
    Cuda,
    /// No GPU detection was possible (no CUDA driver, or nothing in the XML).
    None,
    /// GPU/co-processor OS devices (cuda*, nvml*, rsmi*, opencl*...) of an XML topology.
    XmlOsDevices,
    /// NVIDIA/AMD display or 3D PCI devices of an XML topology without OS devices.
    XmlPciDevices,
    /// No driver to ask, but SLURM granted GPUs (`CUDA_VISIBLE_DEVICES` of the job step).
    SlurmGrant,
}

/// How the topology was obtained.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Source {
    /// hwloc discovery of the running machine.
    Native { gpu_source: GpuSource },
    /// An hwloc XML file (`HWLOC_XMLFILE` or an explicit path).
    Xml { path: String, gpu_source: GpuSource },
}

impl Source {
    pub fn gpu_source(&self) -> GpuSource {
        match self {
            Source::Native { gpu_source } | Source::Xml { gpu_source, .. } => *gpu_source,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumaNode {
    pub os_index: u32,
    /// Local memory in bytes.
    pub memory: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Core {
    /// OS index of the NUMA node this core is local to.
    pub numa: u32,
    /// OS indices of the allowed PUs (hardware threads) of this core.
    pub pus: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuVendor {
    Nvidia,
    Amd,
    Other,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// Value to put in CUDA_VISIBLE_DEVICES (NVIDIA) or ROCR_VISIBLE_DEVICES
    /// (AMD) to give a task this GPU.
    pub id: String,
    pub vendor: GpuVendor,
    pub name: String,
    /// Device memory in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// "dddd:bb:dd.f", lower case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_bus_id: Option<String>,
    /// OS index of the NUMA node closest to the GPU, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTopology {
    pub source: Source,
    /// False when the topology does not describe the running machine (XML):
    /// binding syscalls must then be skipped.
    pub is_this_system: bool,
    pub numa_nodes: Vec<NumaNode>,
    /// Cores with at least one allowed PU, in hwloc logical (locality) order.
    pub cores: Vec<Core>,
    pub gpus: Vec<Gpu>,
    /// OS indices of the PUs this process may use, sorted.
    pub allowed_cpus: Vec<u32>,
    /// Relative NUMA latencies (10 = local); row i / column j follow the
    /// order of `numa_nodes`. Absent when the machine reports none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub numa_distances: Option<Vec<Vec<u32>>>,
    /// True when this process's CPU binding (set by mpirun/srun) left out
    /// whole cores that cgroups/hwloc would otherwise allow: the launcher has
    /// then probably split the node between ranks already. A binding to one
    /// PU of every core (`srun --hint=nomultithread`) leaves out nothing here.
    #[serde(default)]
    pub binding_restricted: bool,
}

impl NodeTopology {
    /// Position of a NUMA node (by OS index) in `numa_nodes`.
    pub fn numa_position(&self, os_index: u32) -> Option<usize> {
        self.numa_nodes.iter().position(|n| n.os_index == os_index)
    }

    /// Relative distance between two NUMA nodes (OS indices), when known.
    pub fn numa_distance(&self, from: u32, to: u32) -> Option<u32> {
        let matrix = self.numa_distances.as_ref()?;
        let (i, j) = (self.numa_position(from)?, self.numa_position(to)?);
        matrix.get(i)?.get(j).copied()
    }

    /// Sort key for how far NUMA node `to` is from `from` (smaller is
    /// nearer): the reported latency when known; otherwise the gap in
    /// `numa_nodes` order, the next node before the previous one. Ties
    /// are broken by position so every ordering built on it is deterministic.
    pub(crate) fn numa_remoteness(&self, from: u32, to: u32) -> (u64, usize) {
        let (from_pos, to_pos) = match (self.numa_position(from), self.numa_position(to)) {
            (Some(f), Some(t)) => (f, t),
            _ => return (u64::MAX, usize::MAX),
        };
        if let Some(d) = self.numa_distance(from, to) {
            return (u64::from(d), to_pos);
        }
        let gap = from_pos.abs_diff(to_pos) as u64;
        (gap * 2 + u64::from(to_pos < from_pos), to_pos)
    }

    pub fn pu_count(&self) -> usize {
        self.cores.iter().map(|c| c.pus.len()).sum()
    }

    pub(crate) fn total_memory(&self) -> u64 {
        self.numa_nodes.iter().map(|n| n.memory).sum()
    }

    /// A regular made-up node, for tests of code that consumes topologies:
    /// `numa` nodes of `cores_per_numa` cores of `pus_per_core` PUs (numbered
    /// consecutively), `gpus_per_numa` NVIDIA GPUs per node (ids "0".. in node
    /// order), `memory_per_numa` bytes per node, no distances.
    pub fn synthetic(
        numa: u32,
        cores_per_numa: u32,
        pus_per_core: u32,
        gpus_per_numa: u32,
        memory_per_numa: u64,
    ) -> NodeTopology {
        let mut cores = Vec::new();
        let mut gpus = Vec::new();
        let mut pu = 0;
        for node in 0..numa {
            for _ in 0..cores_per_numa {
                cores.push(Core { numa: node, pus: (pu..pu + pus_per_core).collect() });
                pu += pus_per_core;
            }
            for _ in 0..gpus_per_numa {
                let n = gpus.len();
                gpus.push(Gpu {
                    id: n.to_string(),
                    vendor: GpuVendor::Nvidia,
                    name: "synthetic GPU".to_string(),
                    memory: None,
                    uuid: None,
                    pci_bus_id: Some(format!("0000:{:02x}:00.0", n + 1)),
                    numa: Some(node),
                });
            }
        }
        NodeTopology {
            source: Source::Xml {
                path: format!("synthetic:{numa}x{cores_per_numa}x{pus_per_core}"),
                gpu_source: GpuSource::None,
            },
            is_this_system: false,
            numa_nodes: (0..numa).map(|os_index| NumaNode { os_index, memory: memory_per_numa }).collect(),
            cores,
            gpus,
            allowed_cpus: (0..pu).collect(),
            numa_distances: None,
            binding_restricted: false,
        }
    }
}

/// Counts on the NUMA nodes the memory the kernel placed on none of them: a virtual machine
/// whose memory was plugged in at run time (a 132 GB Firecracker GPU node, measured) lists
/// 4.5 GB on its one node, and every task asking for more would be refused as unfit. When all
/// the kernel's nodes (`on_nodes` bytes, those this process may not use included: hwloc leaves
/// them out of `nodes`) hold less than nine tenths of the `machine`'s bytes, the rest goes to
/// each node in proportion to what it holds of `on_nodes`; returns how much went to `nodes`.
pub fn place_unplaced_memory(nodes: &mut [NumaNode], on_nodes: u64, machine: u64) -> Option<u64> {
    if nodes.is_empty() || on_nodes >= machine / 10 * 9 {
        return None;
    }
    let missing = machine - on_nodes;
    let count = nodes.len() as u64;
    let mut placed = 0;
    for node in nodes.iter_mut() {
        let share = if on_nodes == 0 {
            missing / count
        } else {
            (u128::from(missing) * u128::from(node.memory) / u128::from(on_nodes)) as u64
        };
        node.memory += share;
        placed += share;
    }
    Some(placed)
}

/// Whether a CPU binding to the PUs `bound` leaves out a whole core of those `allowed`
/// (`cores`: each core's PUs): a binding to one PU of each core, as `srun
/// --hint=nomultithread` makes, leaves out hyperthreads on purpose and no core.
pub fn binding_leaves_out_cores(cores: &[Vec<u32>], allowed: &BTreeSet<u32>, bound: &BTreeSet<u32>) -> bool {
    cores.iter().any(|pus| pus.iter().any(|pu| allowed.contains(pu)) && !pus.iter().any(|pu| bound.contains(pu)))
}

/// Formats OS CPU indices the way taskset/numactl/cgroups expect: sorted,
/// de-duplicated, consecutive runs as ranges ("0-3,8,10-11").
pub fn cpu_list(cpus: &[u32]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut iter = sorted.into_iter().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        parts.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
    }
    parts.join(",")
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::NodeTopology;
    use std::path::PathBuf;

    pub fn fixture_path(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/topologies").join(name)
    }

    /// A recorded machine: `NAME.json` is what the shell's discovery made of hwloc's
    /// `NAME.xml` export (the shell's tests check that it still does).
    pub fn fixture(name: &str) -> NodeTopology {
        let path = fixture_path(name).with_extension("json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_binding_leaves_out_cores_only_when_a_whole_allowed_core_is_unbound() {
        let cores = [vec![0, 4], vec![1, 5], vec![2, 6], vec![3, 7]];
        let set = |pus: &[u32]| pus.iter().copied().collect::<BTreeSet<u32>>();
        let allowed = set(&[0, 1, 2, 3, 4, 5, 6, 7]);
        assert!(!binding_leaves_out_cores(&cores, &allowed, &set(&[0, 1, 2, 3])), "--hint=nomultithread");
        assert!(!binding_leaves_out_cores(&cores, &allowed, &set(&[4, 1, 6, 3])), "any PU of each core");
        assert!(binding_leaves_out_cores(&cores, &allowed, &set(&[0, 4])), "mpirun --bind-to core");
        assert!(binding_leaves_out_cores(&cores, &allowed, &set(&[0, 1, 2])), "one core left out");
        let cgroup = set(&[0, 1, 4, 5]);
        assert!(!binding_leaves_out_cores(&cores, &cgroup, &set(&[0, 1])), "cores the cgroup denies do not count");
    }

    #[test]
    fn cpu_list_formats_ranges() {
        assert_eq!(cpu_list(&[]), "");
        assert_eq!(cpu_list(&[5]), "5");
        assert_eq!(cpu_list(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(cpu_list(&[11, 10, 3, 2, 1, 0, 8, 8]), "0-3,8,10-11");
        assert_eq!(cpu_list(&[0, 2, 4]), "0,2,4");
    }

    #[test]
    fn memory_the_kernel_placed_on_no_node_is_counted_on_them_in_proportion() {
        let gib = 1u64 << 30;
        let nodes = |memory: &[u64]| -> Vec<NumaNode> {
            memory.iter().enumerate().map(|(i, &m)| NumaNode { os_index: i as u32, memory: m }).collect()
        };
        let mut one = nodes(&[4 * gib]);
        assert_eq!(place_unplaced_memory(&mut one, 4 * gib, 128 * gib), Some(124 * gib));
        assert_eq!(one[0].memory, 128 * gib);
        let mut two = nodes(&[3 * gib, gib]);
        assert_eq!(place_unplaced_memory(&mut two, 4 * gib, 8 * gib), Some(4 * gib));
        assert_eq!((two[0].memory, two[1].memory), (6 * gib, 2 * gib));
        let mut none = nodes(&[0, 0]);
        assert_eq!(place_unplaced_memory(&mut none, 0, 8 * gib), Some(8 * gib));
        assert_eq!((none[0].memory, none[1].memory), (4 * gib, 4 * gib));
        // What firmware and the kernel keep for themselves is not missing memory.
        let mut whole = nodes(&[31 * gib, 31 * gib]);
        assert_eq!(place_unplaced_memory(&mut whole, 62 * gib, 64 * gib), None);
        assert_eq!(whole[0].memory, 31 * gib);
        assert_eq!(place_unplaced_memory(&mut [], 0, 64 * gib), None);
        // A process confined to node 0 of two sees only it: node 1's memory is not missing.
        let mut confined = nodes(&[32 * gib]);
        assert_eq!(place_unplaced_memory(&mut confined, 64 * gib, 64 * gib), None);
        assert_eq!(confined[0].memory, 32 * gib);
        // Confined, on a machine that also lost memory: node 0 gets its share of what is lost.
        let mut both = nodes(&[2 * gib]);
        assert_eq!(place_unplaced_memory(&mut both, 4 * gib, 64 * gib), Some(30 * gib));
        assert_eq!(both[0].memory, 32 * gib);
    }

    #[test]
    fn synthetic_is_consistent() {
        let t = NodeTopology::synthetic(2, 4, 2, 2, 1 << 30);
        assert_eq!(t.pu_count(), 16);
        assert_eq!(t.allowed_cpus.len(), 16);
        assert_eq!(t.gpus.len(), 4);
        assert_eq!(t.gpus[3].numa, Some(1));
        assert_eq!(t.total_memory(), 2 << 30);
    }

    #[test]
    fn serde_round_trip_is_tidy() {
        let t = NodeTopology::synthetic(1, 1, 1, 1, 1);
        let json = serde_json::to_string(&t).unwrap();
        assert!(json.contains(r#""source":{"kind":"xml""#), "{json}");
        assert!(json.contains(r#""vendor":"nvidia""#), "{json}");
        assert!(!json.contains("null"), "{json}");
        let back: NodeTopology = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
    }
}
