//! GPUs: as the CUDA driver reports them on this machine, or as an hwloc topology records
//! them (OS devices, else NVIDIA/AMD PCI devices), each with its PCI bus id and NUMA node.

use std::collections::BTreeMap;

use hwlocality::Topology;
use hwlocality::object::TopologyObject;
use hwlocality::object::attributes::{ObjectAttributes, PCIDeviceAttributes};
use hwlocality::object::types::OSDeviceType;

use cudarc::driver::{result as cu, sys as cusys};
use dlaunch_core::topo::{Gpu, GpuSource, GpuVendor, cuda_ids_for_ordinals};
use serde::{Deserialize, Serialize};

use super::NumaInfo;

const PCI_VENDOR_NVIDIA: u16 = 0x10de;
const PCI_VENDOR_AMD: u16 = 0x1002;
/// PCI classes of NVIDIA GPUs: VGA (GeForce/Quadro), 3D controller (Tesla),
/// other display controller.
const PCI_CLASSES_NVIDIA: [u16; 3] = [0x0300, 0x0302, 0x0380];
/// PCI classes of AMD compute GPUs: Instinct boards present as 3D/display
/// controller or processing accelerator. AMD *VGA* devices are left out:
/// in servers they are mostly on-board BMC display chips (Radeon ES1000).
const PCI_CLASSES_AMD: [u16; 3] = [0x0302, 0x0380, 0x1200];
/// OS device name prefixes of compute GPU backends. DRM devices ("card0",
/// "renderD128") are left out: they also cover display-only adapters.
const GPU_OSDEV_PREFIXES: [&str; 5] = ["cuda", "nvml", "rsmi", "opencl", "ze"];

fn pci_attributes(obj: &TopologyObject) -> Option<&PCIDeviceAttributes> {
    match obj.attributes() {
        Some(ObjectAttributes::PCIDevice(pci)) => Some(pci),
        _ => None,
    }
}

fn pci_bus_id(pci: &PCIDeviceAttributes) -> String {
    format!("{:04x}:{:02x}:{:02x}.{:x}", pci.domain(), pci.bus_id(), pci.bus_device(), pci.function())
}

fn vendor_of(pci_vendor: u16) -> GpuVendor {
    match pci_vendor {
        PCI_VENDOR_NVIDIA => GpuVendor::Nvidia,
        PCI_VENDOR_AMD => GpuVendor::Amd,
        _ => GpuVendor::Other,
    }
}

/// NUMA node of an I/O object: that of the CPU-side object hwloc attached it
/// to. Attached to the whole machine means hwloc does not know, unless the
/// machine has a single node anyway.
fn io_numa(obj: &TopologyObject, numa: &NumaInfo) -> Option<u32> {
    let parent = obj.first_non_io_ancestor()?;
    if parent.parent().is_none() && numa.nodes.len() > 1 {
        return None;
    }
    numa.local_to(parent)
}

fn info(obj: &TopologyObject, key: &str) -> Option<String> {
    obj.info(key).map(|v| v.to_string_lossy().into_owned()).filter(|v| !v.is_empty())
}

fn name_of(obj: &TopologyObject) -> String {
    obj.name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// GPUs recorded in a topology: from GPU/co-processor OS devices, grouped by
/// PCI device (cuda0 and nvml0 of one board are one GPU); failing that, from
/// NVIDIA/AMD display PCI devices. Ids count per vendor in PCI order, since
/// CUDA and ROCm number their own devices separately.
pub(super) fn recorded_gpus(topology: &Topology, numa: &NumaInfo) -> (Vec<Gpu>, GpuSource) {
    type PciKey = (u32, u8, u8, u8);
    let mut by_pci: BTreeMap<PciKey, (&TopologyObject, Vec<&TopologyObject>)> = BTreeMap::new();
    for osdev in topology.os_devices() {
        let is_compute = matches!(
            osdev.attributes(),
            Some(ObjectAttributes::OSDevice(a))
                if matches!(a.device_type(), OSDeviceType::GPU | OSDeviceType::CoProcessor)
        );
        let name = name_of(osdev);
        let backend_ok = GPU_OSDEV_PREFIXES.iter().any(|p| name.starts_with(p))
            && info(osdev, "OpenCLDeviceType").is_none_or(|t| t != "CPU");
        if !is_compute || !backend_ok {
            continue;
        }
        let Some(pcidev) = osdev.parent().filter(|p| pci_attributes(p).is_some()) else {
            log::debug!("GPU OS device {name} has no PCI device; ignored");
            continue;
        };
        let Some(pci) = pci_attributes(pcidev) else {
            continue;
        };
        let key = (u32::from(pci.domain()), pci.bus_id(), pci.bus_device(), pci.function());
        by_pci.entry(key).or_insert_with(|| (pcidev, Vec::new())).1.push(osdev);
    }
    if !by_pci.is_empty() {
        let gpus = by_pci.into_values().map(|(pcidev, osdevs)| gpu_from_pci(pcidev, &osdevs, numa)).collect();
        return (number_per_vendor(gpus), GpuSource::XmlOsDevices);
    }

    let mut pcidevs: Vec<&TopologyObject> = topology
        .pci_devices()
        .filter(|d| {
            pci_attributes(d).is_some_and(|p| match p.vendor_id() {
                PCI_VENDOR_NVIDIA => PCI_CLASSES_NVIDIA.contains(&p.class_id()),
                PCI_VENDOR_AMD => PCI_CLASSES_AMD.contains(&p.class_id()),
                _ => false,
            })
        })
        .collect();
    pcidevs
        .sort_by_key(|d| pci_attributes(d).map(|p| (u32::from(p.domain()), p.bus_id(), p.bus_device(), p.function())));
    if pcidevs.is_empty() {
        return (Vec::new(), GpuSource::None);
    }
    let gpus = pcidevs.into_iter().map(|d| gpu_from_pci(d, &[], numa)).collect();
    (number_per_vendor(gpus), GpuSource::XmlPciDevices)
}

fn gpu_from_pci(pcidev: &TopologyObject, osdevs: &[&TopologyObject], numa: &NumaInfo) -> Gpu {
    let from_osdevs = |key: &str| osdevs.iter().find_map(|o| info(o, key));
    let pci = pci_attributes(pcidev);
    let name =
        from_osdevs("GPUModel").or_else(|| info(pcidev, "PCIDevice")).unwrap_or_else(|| "unknown GPU".to_string());
    // hwloc records CUDA memory in KiB.
    let memory = from_osdevs("CUDAGlobalMemorySize").and_then(|kib| kib.parse::<u64>().ok()).map(|k| k * 1024);
    let uuid = from_osdevs("NVIDIAUUID").or_else(|| from_osdevs("AMDUUID"));
    Gpu {
        id: String::new(),
        vendor: pci.map_or(GpuVendor::Other, |p| vendor_of(p.vendor_id())),
        name,
        memory,
        uuid,
        pci_bus_id: pci.map(pci_bus_id),
        numa: io_numa(pcidev, numa),
    }
}

fn number_per_vendor(mut gpus: Vec<Gpu>) -> Vec<Gpu> {
    let mut next: BTreeMap<String, usize> = BTreeMap::new();
    for gpu in &mut gpus {
        let counter = next.entry(format!("{:?}", gpu.vendor)).or_insert(0);
        gpu.id = counter.to_string();
        *counter += 1;
    }
    gpus
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CudaDevice {
    name: String,
    memory: Option<u64>,
    uuid: Option<String>,
    pci: Option<(u32, u32, u32)>,
}

/// What the CUDA driver says of this machine's GPUs: asked in this process (`ask`), or in a
/// child process forked before MPI starts (`probe::CudaProbe`), which sends it over a pipe.
#[derive(Debug, Serialize, Deserialize)]
pub enum CudaAnswer {
    NoLibrary,
    /// A driver without devices: login nodes, GPU-less images.
    NoDevice,
    /// Why the driver cannot be used.
    Unusable(String),
    Devices(Vec<CudaDevice>),
}

impl CudaAnswer {
    pub fn ask() -> CudaAnswer {
        // SAFETY: only attempts to dlopen libcuda; cu::init() would panic without it.
        if !unsafe { cusys::is_culib_present() } {
            return CudaAnswer::NoLibrary;
        }
        // cudarc panics when a driver symbol it expects is missing (old driver): that must
        // cost the GPUs, not the worker.
        match std::panic::catch_unwind(cuda_devices) {
            Ok(Ok(devices)) => CudaAnswer::Devices(devices),
            Ok(Err(e)) if e.0 == cusys::CUresult::CUDA_ERROR_NO_DEVICE => CudaAnswer::NoDevice,
            Ok(Err(e)) => CudaAnswer::Unusable(e.to_string()),
            Err(_) => CudaAnswer::Unusable("the driver library is incompatible".into()),
        }
    }
}

/// GPUs of this machine according to the CUDA driver's `answer`; None when there is no
/// usable driver (the node is then treated as CPU-only).
pub(super) fn cuda_gpus(
    topology: &Topology,
    numa: &NumaInfo,
    cuda_visible: Option<&str>,
    answer: CudaAnswer,
) -> Option<Vec<Gpu>> {
    let devices = match answer {
        CudaAnswer::Devices(devices) => devices,
        CudaAnswer::NoLibrary => {
            log::debug!("no CUDA driver library found; treating this node as CPU-only");
            return None;
        }
        CudaAnswer::NoDevice => {
            log::info!("CUDA driver present but it sees no GPU; treating this node as CPU-only");
            return None;
        }
        CudaAnswer::Unusable(why) => {
            log::warn!("CUDA driver unusable ({why}); treating this node as CPU-only");
            return None;
        }
    };
    let ids = cuda_ids_for_ordinals(cuda_visible, devices.len());
    let gpus = devices
        .into_iter()
        .zip(ids)
        .map(|(dev, id)| {
            let pci_bus_id = dev.pci.map(|(d, b, s)| format!("{d:04x}:{b:02x}:{s:02x}.0"));
            let numa_node = pci_bus_id.as_deref().and_then(|bus| gpu_numa_on_this_system(topology, numa, bus));
            Gpu {
                id,
                vendor: GpuVendor::Nvidia,
                name: dev.name,
                memory: dev.memory,
                uuid: dev.uuid,
                pci_bus_id,
                numa: numa_node,
            }
        })
        .collect();
    Some(gpus)
}

fn cuda_devices() -> Result<Vec<CudaDevice>, cu::DriverError> {
    use cusys::CUdevice_attribute as Attr;
    cu::init()?;
    let count = cu::device::get_count()?;
    let mut devices = Vec::new();
    for ordinal in 0..count {
        let dev = cu::device::get(ordinal)?;
        let name = cu::device::get_name(dev)?;
        // SAFETY: dev comes from cu::device::get.
        let memory = unsafe { cu::device::total_mem(dev) }.ok().map(|m| m as u64);
        let uuid = cu::device::get_uuid(dev).ok().map(|u| format_uuid(&u.bytes));
        // SAFETY: dev comes from cu::device::get.
        let attr = |a: Attr| unsafe { cu::device::get_attribute(dev, a) }.ok().and_then(|v| u32::try_from(v).ok());
        let pci = match (
            attr(Attr::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID),
            attr(Attr::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID),
            attr(Attr::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID),
        ) {
            (Some(d), Some(b), Some(s)) => Some((d, b, s)),
            _ => None,
        };
        devices.push(CudaDevice { name, memory, uuid, pci });
    }
    Ok(devices)
}

/// nvidia-smi's spelling, which CUDA_VISIBLE_DEVICES also accepts.
fn format_uuid(bytes: &[std::ffi::c_char; 16]) -> String {
    let hex: Vec<String> = bytes.iter().map(|&b| format!("{:02x}", b as u8)).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        hex[0..4].concat(),
        hex[4..6].concat(),
        hex[6..8].concat(),
        hex[8..10].concat(),
        hex[10..16].concat()
    )
}

/// NUMA node of a CUDA GPU: via hwloc's PCI object, or, when hwloc could not
/// see PCI (containers without /sys/bus/pci), from sysfs directly.
fn gpu_numa_on_this_system(topology: &Topology, numa: &NumaInfo, bus_id: &str) -> Option<u32> {
    if let Ok(Some(dev)) = topology.pci_device_by_bus_id_string(bus_id) {
        return io_numa(dev, numa);
    }
    let path = format!("/sys/bus/pci/devices/{bus_id}/numa_node");
    let node = std::fs::read_to_string(&path).ok()?.trim().parse::<i64>().ok()?;
    let node = u32::try_from(node).ok()?; // -1: the kernel does not know
    numa.nodes.iter().any(|n| n.os_index == node).then_some(node)
}
