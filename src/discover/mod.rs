//! Reads the machine (or an XML file) through hwloc and the CUDA driver and turns it into the
//! core's [`NodeTopology`].

mod gpus;
mod probe;

pub use gpus::CudaAnswer;
use gpus::{cuda_gpus, recorded_gpus};
pub use probe::CudaProbe;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use hwlocality::Topology;
use hwlocality::cpu::binding::CpuBindingFlags;
use hwlocality::cpu::cpuset::CpuSet;
use hwlocality::object::TopologyObject;
use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::distance::DistancesKind;
use hwlocality::object::types::ObjectType;
use hwlocality::topology::builder::{TopologyBuilder, TypeFilter};

use dlaunch_core::topo::{Core, GpuSource, NodeTopology, NumaNode, Source, filter_visible, granted_gpus};

/// Why the hardware of this node could not be described.
#[derive(Debug, thiserror::Error)]
pub enum TopoError {
    #[error("hwloc could not {action}: {message}")]
    Hwloc { action: &'static str, message: String },
    #[error("cannot load topology XML {path}: {message}")]
    Xml { path: String, message: String },
    #[error("no processing unit of this node is available to this process")]
    NoUsablePu,
}

/// Describes the machine this process runs on, as this process may use it.
///
/// hwloc honours `HWLOC_XMLFILE` (and `HWLOC_THISSYSTEM`) by itself: the
/// result then describes that file, `is_this_system` is false (unless
/// `HWLOC_THISSYSTEM=1`) and GPUs come from the file, restricted by
/// CUDA_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES.
pub fn discover() -> Result<NodeTopology, TopoError> {
    discover_with(CudaAnswer::ask)
}

/// `discover`, with the CUDA driver's answer from `cuda` (asked only on this machine).
pub fn discover_with(cuda: impl FnOnce() -> CudaAnswer) -> Result<NodeTopology, TopoError> {
    let start = std::time::Instant::now();
    let topology =
        io_builder()?.build().map_err(|e| TopoError::Hwloc { action: "load the topology", message: e.to_string() })?;
    // Start-up time on a node with many devices goes here and to the CUDA driver.
    log::debug!("hwloc loaded the topology in {:?}", start.elapsed());
    let foreign = foreign_description(topology.is_this_system());
    let cuda_visible = env_var("CUDA_VISIBLE_DEVICES");
    let gpus = if topology.is_this_system() {
        // Inside a SLURM job, the GPUs SLURM granted are known even when no driver is there
        // to ask (a driverless login-type node, or gres devices in a test cluster).
        let slurm_granted = env_var("SLURM_JOB_ID").is_some();
        GpuMode::Cuda { cuda_visible, slurm_granted, answer: cuda() }
    } else {
        GpuMode::Recorded { cuda_visible, rocr_visible: env_var("ROCR_VISIBLE_DEVICES") }
    };
    from_hwloc(&topology, foreign, gpus)
}

/// Describes the machine recorded in an hwloc XML file, exactly as recorded:
/// no environment variable (HWLOC_*, CUDA_VISIBLE_DEVICES) is consulted.
pub fn discover_from_xml(path: impl AsRef<Path>) -> Result<NodeTopology, TopoError> {
    let path = path.as_ref();
    let topology = load_xml(path)?;
    from_hwloc(
        &topology,
        Some(path.display().to_string()),
        GpuMode::Recorded { cuda_visible: None, rocr_visible: None },
    )
}

fn load_xml(path: &Path) -> Result<Topology, TopoError> {
    let xml_error = |message: String| TopoError::Xml { path: path.display().to_string(), message };
    // Read the file here: hwlocality's from_xml_file() panics (unreachable!)
    // on errno values other than EINVAL, e.g. ENOENT for a missing file.
    let xml = std::fs::read_to_string(path).map_err(|e| xml_error(e.to_string()))?;
    let builder = io_builder()?;
    // from_xml() has the same unreachable!() for unexpected errno values.
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| builder.from_xml(&xml)));
    match loaded {
        Ok(Ok(builder)) => builder.build().map_err(|e| xml_error(e.to_string())),
        Ok(Err(e)) => Err(xml_error(e.to_string())),
        Err(_) => Err(xml_error("hwloc rejected the XML buffer".to_string())),
    }
}

/// Without an explicit filter hwloc drops every I/O object, and with them the
/// PCI locality of GPUs. "Important" keeps GPUs, NICs and their OS devices
/// without the cost of listing every bridge.
fn io_builder() -> Result<TopologyBuilder, TopoError> {
    Topology::builder()
        .with_io_type_filter(TypeFilter::KeepImportant)
        .map_err(|e| TopoError::Hwloc { action: "enable I/O discovery", message: e.to_string() })
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// What hwloc read instead of this machine, named after the variable that
/// made it do so (hwloc gives FSROOT priority, then SYNTHETIC, then XMLFILE).
fn foreign_description(is_this_system: bool) -> Option<String> {
    let set = |name: &str| env_var(name).filter(|v| !v.is_empty());
    if let Some(root) = set("HWLOC_FSROOT") {
        return (!is_this_system).then(|| format!("fsroot:{root}"));
    }
    if let Some(desc) = set("HWLOC_SYNTHETIC") {
        return (!is_this_system).then(|| format!("synthetic:{desc}"));
    }
    let path = set("HWLOC_XMLFILE")?;
    if !is_this_system {
        return Some(path);
    }
    // hwloc silently discovers this machine when HWLOC_XMLFILE cannot be
    // loaded. Only HWLOC_THISSYSTEM=1 (read like hwloc, with atoi) makes a
    // loaded file claim to be this system; then try the file to tell apart.
    let vouched = env_var("HWLOC_THISSYSTEM").and_then(|v| v.trim().parse::<i64>().ok()).is_some_and(|v| v != 0);
    if vouched && load_xml(Path::new(&path)).is_ok() {
        return Some(path);
    }
    log::warn!("HWLOC_XMLFILE={path} could not be loaded; hwloc discovered this machine instead");
    None
}

enum GpuMode {
    /// What the CUDA driver of this machine said.
    Cuda { cuda_visible: Option<String>, slurm_granted: bool, answer: CudaAnswer },
    /// Read GPUs recorded in the topology, then keep the granted ones.
    Recorded { cuda_visible: Option<String>, rocr_visible: Option<String> },
}

fn from_hwloc(topology: &Topology, foreign: Option<String>, gpu_mode: GpuMode) -> Result<NodeTopology, TopoError> {
    let is_this_system = topology.is_this_system();
    let (allowed, binding_restricted) = allowed_pus(topology, is_this_system);

    let mut numa = NumaInfo::read(topology);
    if is_this_system
        && let (Some(machine), Some(on_nodes)) = (crate::host::machine_memory(), crate::host::memory_on_nodes())
        && let Some(missing) = dlaunch_core::topo::place_unplaced_memory(&mut numa.nodes, on_nodes, machine)
    {
        log::warn!(
            "the kernel places part of this machine's {1} of memory on no NUMA node (memory plugged in at run time?): counting {0} of it on this process's nodes, in proportion",
            dlaunch_core::spec::format_size(missing),
            dlaunch_core::spec::format_size(machine)
        );
    }
    let cores = read_cores(topology, &allowed, &numa);
    if cores.is_empty() {
        return Err(TopoError::NoUsablePu);
    }
    let allowed_cpus: Vec<u32> = {
        let mut v: Vec<u32> = cores.iter().flat_map(|c| c.pus.iter().copied()).collect();
        v.sort_unstable();
        v
    };

    let (gpus, gpu_source) = match gpu_mode {
        GpuMode::Cuda { cuda_visible, slurm_granted, answer } => {
            match cuda_gpus(topology, &numa, cuda_visible.as_deref(), answer) {
                Some(gpus) => (gpus, GpuSource::Cuda),
                None => match cuda_visible.as_deref() {
                    Some(list) if slurm_granted && !granted_gpus(list).is_empty() => {
                        log::info!("no CUDA driver to ask: using the GPUs SLURM granted ({list}), locality unknown");
                        (granted_gpus(list), GpuSource::SlurmGrant)
                    }
                    _ => (Vec::new(), GpuSource::None),
                },
            }
        }
        GpuMode::Recorded { cuda_visible, rocr_visible } => {
            let (gpus, source) = recorded_gpus(topology, &numa);
            (filter_visible(gpus, cuda_visible.as_deref(), rocr_visible.as_deref()), source)
        }
    };

    let source = match foreign {
        Some(path) => Source::Xml { path, gpu_source },
        None => Source::Native { gpu_source },
    };
    Ok(NodeTopology {
        source,
        is_this_system,
        numa_distances: numa_distances(topology, &numa.nodes),
        numa_nodes: numa.nodes,
        cores,
        gpus,
        allowed_cpus,
        binding_restricted,
    })
}

/// PUs this process may use: hwloc's allowed set (it already applies
/// cgroup/cpuset restrictions on this system, and the recorded allowed set
/// for XML) narrowed to the process's CPU binding (taskset, mpirun/srun
/// binding), which hwloc does not apply by itself.
fn allowed_pus(topology: &Topology, is_this_system: bool) -> (BTreeSet<u32>, bool) {
    let allowed: BTreeSet<u32> = bitmap_indices(&(topology.allowed_cpuset() & topology.cpuset()));
    if !is_this_system {
        return (allowed, false);
    }
    match topology.cpu_binding(CpuBindingFlags::PROCESS) {
        Ok(binding) if binding.weight().is_some() => {
            let bound: BTreeSet<u32> = bitmap_indices(&binding);
            let narrowed: BTreeSet<u32> = allowed.intersection(&bound).copied().collect();
            if narrowed.is_empty() {
                log::warn!("this process is bound to no allowed PU; ignoring its CPU binding");
                (allowed, false)
            } else {
                let cores: Vec<Vec<u32>> = topology
                    .objects_with_type(ObjectType::Core)
                    .map(|core| core.cpuset().map(|set| bitmap_indices(&set)).unwrap_or_default().into_iter().collect())
                    .collect();
                let restricted = dlaunch_core::topo::binding_leaves_out_cores(&cores, &allowed, &narrowed);
                if narrowed.len() < allowed.len() {
                    log::info!(
                        "CPU binding of this process limits it to {} of {} allowed PUs",
                        narrowed.len(),
                        allowed.len()
                    );
                }
                (narrowed, restricted)
            }
        }
        Ok(_) => (allowed, false),
        Err(e) => {
            log::info!("cannot read this process's CPU binding ({e}); using hwloc's allowed cpuset");
            (allowed, false)
        }
    }
}

/// Set bits of a finite hwloc bitmap. Infinite bitmaps (weight None) never
/// come out of the topology's own sets; they yield nothing rather than loop.
fn bitmap_indices(set: &CpuSet) -> BTreeSet<u32> {
    if set.weight().is_none() {
        return BTreeSet::new();
    }
    set.iter_set().filter_map(|i| u32::try_from(usize::from(i)).ok()).collect()
}

/// NUMA nodes in hwloc logical order, plus which ones are ordinary DRAM:
/// cores and GPUs are attached to DRAM rather than to HBM/NVM/GPU-memory
/// nodes that may share their locality.
struct NumaInfo {
    nodes: Vec<NumaNode>,
    ordinary: BTreeSet<u32>,
}

impl NumaInfo {
    fn read(topology: &Topology) -> NumaInfo {
        let mut nodes = Vec::new();
        let mut ordinary = BTreeSet::new();
        for obj in topology.objects_with_type(ObjectType::NUMANode) {
            let Some(os_index) = obj.os_index().and_then(|i| u32::try_from(i).ok()) else {
                log::warn!("ignoring a NUMA node without OS index");
                continue;
            };
            let memory = match obj.attributes() {
                Some(ObjectAttributes::NUMANode(attr)) => attr.local_memory().map_or(0, |m| m.get()),
                _ => 0,
            };
            if obj.subtype().is_none() {
                ordinary.insert(os_index);
            }
            nodes.push(NumaNode { os_index, memory });
        }
        NumaInfo { nodes, ordinary }
    }

    /// The node that best represents a nodeset: first ordinary node in
    /// logical order, else first node at all.
    fn pick(&self, nodeset: &BTreeSet<u32>) -> Option<u32> {
        let in_set = |n: &&NumaNode| nodeset.contains(&n.os_index);
        self.nodes
            .iter()
            .filter(in_set)
            .find(|n| self.ordinary.contains(&n.os_index))
            .or_else(|| self.nodes.iter().find(in_set))
            .map(|n| n.os_index)
    }

    /// Local NUMA node of a CPU-side object: its own nodeset, or that of the
    /// nearest ancestor with one (memory-less cores, as in machines whose
    /// local node is disallowed, get the nearest node that is allowed).
    fn local_to(&self, obj: &TopologyObject) -> Option<u32> {
        std::iter::once(obj).chain(obj.ancestors()).find_map(|o| self.pick(&nodeset_of(o)))
    }
}

fn nodeset_of(obj: &TopologyObject) -> BTreeSet<u32> {
    match obj.nodeset() {
        Some(ns) if ns.weight().is_some() => ns.iter_set().filter_map(|i| u32::try_from(usize::from(i)).ok()).collect(),
        _ => BTreeSet::new(),
    }
}

/// Cores in logical order, each with its allowed PUs. A PU without a Core
/// ancestor (some virtual machines) counts as a core of its own.
fn read_cores(topology: &Topology, allowed: &BTreeSet<u32>, numa: &NumaInfo) -> Vec<Core> {
    let fallback_numa = numa.nodes.first().map_or(0, |n| n.os_index);
    let mut cores: Vec<Core> = Vec::new();
    let mut by_object: BTreeMap<u64, usize> = BTreeMap::new();
    for pu in topology.objects_with_type(ObjectType::PU) {
        let Some(os) = pu.os_index().and_then(|i| u32::try_from(i).ok()) else {
            continue;
        };
        if !allowed.contains(&os) {
            continue;
        }
        let owner = pu.first_ancestor_with_type(ObjectType::Core).unwrap_or(pu);
        let slot = *by_object.entry(owner.global_persistent_index()).or_insert_with(|| {
            let node = numa.local_to(owner).unwrap_or_else(|| {
                log::warn!("PU {os} has no NUMA node; attributing it to node {fallback_numa}");
                fallback_numa
            });
            cores.push(Core { numa: node, pus: Vec::new() });
            cores.len() - 1
        });
        cores[slot].pus.push(os);
    }
    cores
}

/// hwloc's NUMA latency matrix reordered like `nodes`; None unless it covers
/// every node.
fn numa_distances(topology: &Topology, nodes: &[NumaNode]) -> Option<Vec<Vec<u32>>> {
    let matrices = topology
        .distances_with_type(Some(DistancesKind::MEANS_LATENCY), ObjectType::NUMANode)
        .map_err(|e| log::debug!("no NUMA distances: {e}"))
        .ok()?;
    let matrix = matrices.first()?;
    let n = matrix.num_objects();
    let values = matrix.distances();
    let columns: Vec<Option<u32>> =
        matrix.objects().map(|o| o.and_then(|o| o.os_index()).and_then(|i| u32::try_from(i).ok())).collect();
    let column_of = |os: u32| columns.iter().position(|c| *c == Some(os));
    let index: Vec<usize> = nodes.iter().map(|node| column_of(node.os_index)).collect::<Option<_>>()?;
    let rows = index
        .iter()
        .map(|&i| {
            index
                .iter()
                .map(|&j| values.get(i * n + j).map(|&d| u32::try_from(d).unwrap_or(u32::MAX)))
                .collect::<Option<Vec<u32>>>()
        })
        .collect::<Option<Vec<_>>>()?;
    Some(rows)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use dlaunch_core::topo::{GpuSource, GpuVendor, Source};

    use super::*;

    fn fixture_path(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/topologies").join(name)
    }

    fn fixture(name: &str) -> NodeTopology {
        discover_from_xml(fixture_path(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
    }

    /// The core's placement tests read `NAME.json` beside each `NAME.xml` (the core has no
    /// hwloc): they must be what discovery makes of the XML today. `DLAUNCH_BLESS=1` rewrites
    /// them after a deliberate change to discovery.
    #[test]
    fn recorded_topologies_match_discovery() {
        let dir = fixture_path("");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let xml = entry.unwrap().path();
            if xml.extension().is_none_or(|e| e != "xml") {
                continue;
            }
            let name = xml.file_name().unwrap().to_str().unwrap();
            let mut topo = fixture(name);
            // Where the checkout lives is no part of the machine.
            topo.source = Source::Xml { path: name.to_string(), gpu_source: topo.source.gpu_source() };
            let json = format!("{}\n", serde_json::to_string_pretty(&topo).unwrap());
            let recorded = xml.with_extension("json");
            if std::env::var_os("DLAUNCH_BLESS").is_some() {
                std::fs::write(&recorded, &json).unwrap();
            }
            let old = std::fs::read_to_string(&recorded).unwrap_or_default();
            assert!(old == json, "{} is stale: run this test with DLAUNCH_BLESS=1", recorded.display());
            checked += 1;
        }
        assert!(checked >= 8, "only {checked} topologies in {}", dir.display());
    }

    #[test]
    fn this_machine_is_cpu_only_and_usable() {
        let topo = match discover() {
            Ok(t) => t,
            Err(e) => panic!("discover failed: {e}"),
        };
        assert!(topo.is_this_system);
        assert!(!topo.allowed_cpus.is_empty());
        assert_eq!(topo.allowed_cpus.len(), topo.pu_count());
        assert!(!topo.numa_nodes.is_empty());
        assert!(topo.cores.iter().all(|c| topo.numa_position(c.numa).is_some()));
        // This build machine has no GPU and no libcuda; with a GPU machine
        // the source would be Cuda.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            assert_eq!(topo.source, Source::Native { gpu_source: GpuSource::None });
            assert!(topo.gpus.is_empty());
        }
    }

    #[test]
    fn power8_gpus_and_numa() {
        let t = fixture("power8gpudistances.xml");
        assert!(!t.is_this_system);
        assert_eq!(t.source.gpu_source(), GpuSource::XmlOsDevices);
        assert_eq!(t.gpus.len(), 4, "{:?}", t.gpus);
        let numas: Vec<Option<u32>> = t.gpus.iter().map(|g| g.numa).collect();
        assert_eq!(numas, [Some(0), Some(0), Some(1), Some(1)]);
        let ids: Vec<&str> = t.gpus.iter().map(|g| g.id.as_str()).collect();
        assert_eq!(ids, ["0", "1", "2", "3"]);
        let g = &t.gpus[0];
        assert_eq!(g.vendor, GpuVendor::Nvidia);
        assert_eq!(g.name, "Tesla P100-SXM2-16GB");
        assert_eq!(g.pci_bus_id.as_deref(), Some("0002:01:00.0"));
        assert_eq!(g.uuid.as_deref(), Some("GPU-77bf6b9a-6906-5a93-d28b-b77d2c23d1d2"));
        assert_eq!(g.memory, Some(16671616 * 1024));
        assert_eq!(t.numa_nodes.len(), 2);
        assert_eq!(t.numa_distance(0, 1), Some(40));
        assert_eq!(t.numa_distance(1, 1), Some(10));
        assert_eq!(t.allowed_cpus.len(), 16);
        assert_eq!(t.cores.len(), 8);
        assert_eq!(t.cores[4], Core { numa: 1, pus: vec![80, 81] });
    }

    #[test]
    fn restricted_cpuset_is_honoured() {
        let t = fixture("16amd64-8n2c-cpusets.xml");
        // allowed_cpuset 0x0000f06f
        assert_eq!(t.allowed_cpus, [0, 1, 2, 3, 5, 6, 12, 13, 14, 15]);
        let nodes: Vec<u32> = t.numa_nodes.iter().map(|n| n.os_index).collect();
        assert_eq!(nodes, [1, 2, 3, 5, 4]);
        // PUs 0-1 lost their own (disallowed) node: nearest allowed one.
        assert_eq!(t.cores[0].numa, 1);
        assert!(t.numa_distances.is_some());
        assert!(t.gpus.is_empty());
        assert_eq!(t.source.gpu_source(), GpuSource::None);
    }

    #[test]
    fn dgx2_has_sixteen_gpus_on_two_nodes() {
        let t = fixture("nvidiaDGX2.xml");
        assert_eq!(t.gpus.len(), 16);
        assert!(t.gpus[..8].iter().all(|g| g.numa == Some(0)));
        assert!(t.gpus[8..].iter().all(|g| g.numa == Some(1)));
        assert_eq!(t.gpus[0].pci_bus_id.as_deref(), Some("0000:34:00.0"));
        assert_eq!(t.allowed_cpus, [0, 1, 24, 25]);
    }

    #[test]
    fn pci_and_osdev_gpu_sources() {
        // cuda0 on an NVIDIA board, opencl0d1 on an AMD function: one GPU of
        // each vendor, numbered separately.
        let t = fixture("32em64t-2n8c2t-pci-normalio.xml");
        assert_eq!(t.source.gpu_source(), GpuSource::XmlOsDevices);
        let found: Vec<(GpuVendor, &str, Option<u32>)> =
            t.gpus.iter().map(|g| (g.vendor, g.id.as_str(), g.numa)).collect();
        assert_eq!(found, [(GpuVendor::Nvidia, "0", Some(1)), (GpuVendor::Amd, "0", Some(1))]);

        // No GPU OS devices: the NVIDIA 3D PCI devices stand in; the AMD
        // ES1000 on-board VGA is not a GPU.
        let t = fixture("24em64t-2n6c2t-pci.xml");
        assert_eq!(t.source.gpu_source(), GpuSource::XmlPciDevices);
        let found: Vec<(&str, Option<&str>, Option<u32>)> =
            t.gpus.iter().map(|g| (g.id.as_str(), g.pci_bus_id.as_deref(), g.numa)).collect();
        assert_eq!(
            found,
            [
                ("0", Some("0000:06:00.0"), Some(0)),
                ("1", Some("0000:11:00.0"), Some(1)),
                ("2", Some("0000:14:00.0"), Some(1))
            ]
        );
        assert!(t.gpus.iter().all(|g| g.vendor == GpuVendor::Nvidia && g.memory.is_none()));
        assert_eq!(t.allowed_cpus.len(), 24);

        // Only that ES1000: no GPU at all.
        let t = fixture("96em64t-4n4d3ca2co-pci.xml");
        assert_eq!(t.source.gpu_source(), GpuSource::None, "{:?}", t.gpus);
        assert!(t.gpus.is_empty());
        assert_eq!(t.numa_nodes.len(), 4);
    }

    #[test]
    fn many_numa_nodes_with_hyperthreads() {
        let t = fixture("192em64t-24n8c2t.xml");
        assert_eq!(t.numa_nodes.len(), 24);
        assert_eq!(t.cores.len(), 192);
        assert!(t.cores.iter().all(|c| c.pus.len() == 2));
        assert_eq!(t.allowed_cpus.len(), 384);
        let d = t.numa_distances.as_ref().map(|m| (m.len(), m[0][1], m[0][2]));
        assert_eq!(d, Some((24, 50, 65)));
    }

    #[test]
    fn bad_xml_is_an_error() {
        let err = discover_from_xml(fixture_path("does-not-exist.xml"));
        assert!(matches!(err, Err(TopoError::Xml { .. })), "{err:?}");
        let garbage = std::env::temp_dir().join(format!("dlaunch-topo-garbage-{}.xml", std::process::id()));
        if std::fs::write(&garbage, "<topology>not hwloc</nonsense>").is_ok() {
            let err = discover_from_xml(&garbage);
            let _ = std::fs::remove_file(&garbage);
            assert!(matches!(err, Err(TopoError::Xml { .. })), "{err:?}");
        }
    }

    /// Runs `discover()` in a child process (environment variables are
    /// process-wide and tests run in threads) to check how hwloc treats
    /// HWLOC_XMLFILE.
    #[test]
    fn hwloc_xmlfile_env_is_honoured() {
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let run = |env: &[(&str, String)]| {
            let mut cmd = std::process::Command::new(&exe);
            cmd.args(["--ignored", "--exact", "--nocapture", "discover::tests::print_discovered"]);
            cmd.env_remove("CUDA_VISIBLE_DEVICES").env_remove("HWLOC_THISSYSTEM");
            for (k, v) in env {
                cmd.env(k, v);
            }
            let out = cmd.output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
            let line = out.lines().find_map(|l| l.strip_prefix("DISCOVERED ")).map(str::to_string);
            line.and_then(|l| serde_json::from_str::<NodeTopology>(&l).ok())
        };
        let xml = fixture_path("power8gpudistances.xml").display().to_string();

        let t = run(&[("HWLOC_XMLFILE", xml.clone())]).expect("child discover");
        assert!(!t.is_this_system);
        assert_eq!(t.source, Source::Xml { path: xml.clone(), gpu_source: GpuSource::XmlOsDevices });
        assert_eq!(t.gpus.len(), 4);
        assert_eq!(t.allowed_cpus.len(), 16);

        let t = run(&[("HWLOC_XMLFILE", xml.clone()), ("CUDA_VISIBLE_DEVICES", "2,3".into())]).expect("child discover");
        let ids: Vec<&str> = t.gpus.iter().map(|g| g.id.as_str()).collect();
        assert_eq!(ids, ["2", "3"]);

        // HWLOC_THISSYSTEM=1 makes hwloc vouch for the file.
        let t = run(&[("HWLOC_XMLFILE", xml.clone()), ("HWLOC_THISSYSTEM", "1".into())]).expect("child discover");
        assert!(t.is_this_system);
        assert!(matches!(t.source, Source::Xml { .. }));
        // Being "this system", the file's PUs are narrowed to this process's
        // real CPU binding (here 0-1, which the file also has).
        let file_pus = [0, 1, 8, 9, 16, 17, 24, 25, 80, 81, 88, 89, 96, 97, 104, 105];
        assert!(!t.allowed_cpus.is_empty() && t.allowed_cpus.iter().all(|p| file_pus.contains(p)), "{t:?}");

        // A file hwloc cannot load: it silently discovers this machine.
        let missing = fixture_path("missing.xml").display().to_string();
        let t = run(&[("HWLOC_XMLFILE", missing.clone())]).expect("child discover");
        assert!(t.is_this_system);
        assert_eq!(t.source, Source::Native { gpu_source: t.source.gpu_source() });
        let t = run(&[("HWLOC_XMLFILE", missing), ("HWLOC_THISSYSTEM", "1".into())]).expect("child discover");
        assert!(matches!(t.source, Source::Native { .. }));
    }

    #[test]
    #[ignore = "helper run by hwloc_xmlfile_env_is_honoured in a child process"]
    fn print_discovered() {
        match discover() {
            Ok(t) => println!("DISCOVERED {}", serde_json::to_string(&t).unwrap_or_default()),
            Err(e) => println!("ERROR {e}"),
        }
    }
}
