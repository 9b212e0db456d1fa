//! Human-readable summary for `dlaunch topo`.

use std::fmt::Write;

use super::{Gpu, GpuSource, NodeTopology, Source, cpu_list};

/// Short multi-line description: detection source, allowed cpuset, each NUMA
/// node with its memory, cores (as PU lists) and GPUs.
pub fn render_text(topo: &NodeTopology) -> String {
    let mut out = String::new();
    let gpu_source = match topo.source.gpu_source() {
        GpuSource::Cuda => "GPUs from the CUDA driver",
        GpuSource::None => "no GPU detected",
        GpuSource::XmlOsDevices => "GPUs from hwloc OS devices",
        GpuSource::XmlPciDevices => "GPUs from hwloc PCI devices",
        GpuSource::SlurmGrant => "GPUs as granted by SLURM (no driver to query)",
    };
    let origin = match &topo.source {
        Source::Native { .. } => "hwloc discovery of this machine".to_string(),
        Source::Xml { path, .. } => format!("hwloc XML {path}"),
    };
    let system = if topo.is_this_system { "" } else { " (not this machine: no binding)" };
    let _ = writeln!(out, "Source: {origin}{system}; {gpu_source}");
    let bound = if topo.binding_restricted { ", narrowed by this process's CPU binding" } else { "" };
    let _ = writeln!(
        out,
        "Allowed CPUs: {} ({} PUs on {} cores{bound})",
        cpu_list(&topo.allowed_cpus),
        topo.pu_count(),
        topo.cores.len()
    );
    for node in &topo.numa_nodes {
        let cores: Vec<String> =
            topo.cores.iter().filter(|c| c.numa == node.os_index).map(|c| cpu_list(&c.pus)).collect();
        let _ = writeln!(
            out,
            "NUMA node {}: {}, {} cores{}{}",
            node.os_index,
            bytes(node.memory),
            cores.len(),
            if cores.is_empty() { "" } else { ": " },
            cores.join(" ")
        );
        for gpu in topo.gpus.iter().filter(|g| g.numa == Some(node.os_index)) {
            let _ = writeln!(out, "  {}", gpu_line(gpu));
        }
    }
    let known = |g: &&Gpu| g.numa.is_some_and(|n| topo.numa_position(n).is_some());
    let stray: Vec<&Gpu> = topo.gpus.iter().filter(|g| !known(g)).collect();
    if !stray.is_empty() {
        let _ = writeln!(out, "GPUs of unknown NUMA locality:");
        for gpu in stray {
            let _ = writeln!(out, "  {}", gpu_line(gpu));
        }
    }
    // Larger matrices do not fit a short report; the JSON form has them.
    if let Some(matrix) = &topo.numa_distances
        && topo.numa_nodes.len() > 1
        && topo.numa_nodes.len() <= 8
    {
        let rows: Vec<String> =
            matrix.iter().map(|row| row.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")).collect();
        let _ = writeln!(out, "NUMA distances: {}", rows.join(" | "));
    }
    out
}

fn gpu_line(gpu: &Gpu) -> String {
    let mut line = format!("GPU {} ({:?}): {}", gpu.id, gpu.vendor, gpu.name);
    if let Some(memory) = gpu.memory {
        let _ = write!(line, ", {}", bytes(memory));
    }
    if let Some(bus) = &gpu.pci_bus_id {
        let _ = write!(line, ", PCI {bus}");
    }
    if let Some(uuid) = &gpu.uuid {
        let _ = write!(line, ", {uuid}");
    }
    line
}

fn bytes(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    const MIB: f64 = (1u64 << 20) as f64;
    let n = n as f64;
    if n >= GIB { format!("{:.1} GiB", n / GIB) } else { format!("{:.0} MiB", n / MIB) }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::fixture;
    use super::*;

    #[test]
    fn power8_report() {
        let text = render_text(&fixture("power8gpudistances.xml"));
        assert!(text.contains("GPUs from hwloc OS devices"), "{text}");
        assert!(text.contains("not this machine"), "{text}");
        assert!(
            text.contains("Allowed CPUs: 0-1,8-9,16-17,24-25,80-81,88-89,96-97,104-105 (16 PUs on 8 cores)"),
            "{text}"
        );
        assert!(
            text.contains(
                "NUMA node 0: 63.8 GiB, 4 cores: 0-1 8-9 16-17 24-25\n  GPU 0 (Nvidia): Tesla P100-SXM2-16GB"
            ),
            "{text}"
        );
        assert!(text.contains("PCI 000a:01:00.0"), "{text}");
        assert!(text.contains("NUMA distances: 10 40 | 40 10"), "{text}");
    }

    #[test]
    fn memory_only_nodes_and_no_gpu() {
        let text = render_text(&fixture("16amd64-8n2c-cpusets.xml"));
        assert!(text.contains("no GPU detected"), "{text}");
        assert!(text.contains("NUMA node 4: 8.0 GiB, 0 cores\n"), "{text}");
        assert!(text.contains("Allowed CPUs: 0-3,5-6,12-15 (10 PUs on 10 cores)"), "{text}");
    }
}
