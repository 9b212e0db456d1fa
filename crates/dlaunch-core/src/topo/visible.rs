//! CUDA_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES handling, kept pure so the
//! rules are testable without GPUs or environment variables.

use super::{Gpu, GpuVendor};

/// Entries of a CUDA_VISIBLE_DEVICES-style list as the CUDA runtime reads
/// it: comma separated, and an empty or negative entry ("-1", commonly used
/// to hide every GPU) ends the list.
pub(crate) fn parse_visible_list(value: &str) -> Vec<String> {
    value.split(',').map(str::trim).take_while(|e| !e.is_empty() && !e.starts_with('-')).map(str::to_string).collect()
}

/// `Gpu.id` of each CUDA device ordinal `0..count`. With CUDA_VISIBLE_DEVICES
/// set, CUDA enumerates exactly its entries in order, so ordinal i *is* entry
/// i, and a child given that entry sees the same physical GPU. Without it the
/// ordinal itself is the id.
pub fn cuda_ids_for_ordinals(cuda_visible: Option<&str>, count: usize) -> Vec<String> {
    let entries = cuda_visible.map(parse_visible_list);
    (0..count)
        .map(|ordinal| match &entries {
            Some(list) => match list.get(ordinal) {
                Some(entry) => entry.clone(),
                None => {
                    // CUDA reports more devices than the list names: cannot
                    // happen with a well-formed list; the ordinal is the best
                    // remaining guess.
                    log::warn!("CUDA device {ordinal} has no CUDA_VISIBLE_DEVICES entry; using its ordinal as id");
                    ordinal.to_string()
                }
            },
            None => ordinal.to_string(),
        })
        .collect()
}

/// GPUs known only from the scheduler's grant (`CUDA_VISIBLE_DEVICES` set by SLURM's gres
/// plugin): ids as granted, nothing else known.
pub fn granted_gpus(cuda_visible: &str) -> Vec<Gpu> {
    parse_visible_list(cuda_visible)
        .into_iter()
        .map(|id| Gpu {
            id,
            vendor: GpuVendor::Other,
            name: "granted by SLURM (no driver to query)".to_string(),
            memory: None,
            uuid: None,
            pci_bus_id: None,
            numa: None,
        })
        .collect()
}

/// Keeps the GPUs of a recorded (XML) topology that this process was granted:
/// NVIDIA (and unknown-vendor) GPUs by `cuda_visible`, AMD GPUs by
/// `rocr_visible`, or by `cuda_visible` when that is unset (HIP honours it
/// too, and Slurm sets it on AMD nodes). A vendor whose variable is unset
/// keeps all its GPUs. Entries name an id (number) or a UUID (prefix); as in
/// CUDA, an entry that names no GPU ends the list.
pub fn filter_visible(gpus: Vec<Gpu>, cuda_visible: Option<&str>, rocr_visible: Option<&str>) -> Vec<Gpu> {
    let list_for = |vendor: GpuVendor| match vendor {
        GpuVendor::Amd => rocr_visible.or(cuda_visible),
        GpuVendor::Nvidia | GpuVendor::Other => cuda_visible,
    };
    let mut keep = vec![false; gpus.len()];
    for vendor in [GpuVendor::Nvidia, GpuVendor::Amd, GpuVendor::Other] {
        let candidates: Vec<usize> = (0..gpus.len()).filter(|&i| gpus[i].vendor == vendor).collect();
        let Some(list) = list_for(vendor) else {
            candidates.iter().for_each(|&i| keep[i] = true);
            continue;
        };
        for entry in parse_visible_list(list) {
            match find_entry(&gpus, &candidates, &entry) {
                Some(i) => keep[i] = true,
                None => {
                    if !candidates.is_empty() {
                        log::warn!(
                            "visible-devices entry {entry:?} names no {vendor:?} GPU of this node; ignoring it and the entries after it"
                        );
                    }
                    break;
                }
            }
        }
    }
    gpus.into_iter().zip(keep).filter_map(|(g, k)| k.then_some(g)).collect()
}

fn find_entry(gpus: &[Gpu], candidates: &[usize], entry: &str) -> Option<usize> {
    if let Ok(n) = entry.parse::<u64>() {
        return candidates.iter().copied().find(|&i| gpus[i].id.parse::<u64>().ok() == Some(n));
    }
    let wanted = entry.to_ascii_lowercase();
    let mut hits = candidates.iter().copied().filter(|&i| {
        gpus[i].id.eq_ignore_ascii_case(entry)
            || gpus[i].uuid.as_ref().is_some_and(|u| u.to_ascii_lowercase().starts_with(&wanted))
    });
    // CUDA rejects an ambiguous UUID prefix; so do we.
    match (hits.next(), hits.next()) {
        (Some(i), None) => Some(i),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(id: &str, vendor: GpuVendor, uuid: &str) -> Gpu {
        Gpu {
            id: id.to_string(),
            vendor,
            name: "g".to_string(),
            memory: None,
            uuid: Some(uuid.to_string()),
            pci_bus_id: None,
            numa: None,
        }
    }

    fn ids(gpus: &[Gpu]) -> Vec<&str> {
        gpus.iter().map(|g| g.id.as_str()).collect()
    }

    #[test]
    fn slurm_grants_become_gpus_with_their_ids() {
        assert_eq!(ids(&granted_gpus("2,3")), ["2", "3"]);
        assert!(granted_gpus("").is_empty());
        assert!(granted_gpus("-1").is_empty());
        assert!(granted_gpus("0,1").iter().all(|g| g.numa.is_none()));
    }

    fn four() -> Vec<Gpu> {
        (0..4).map(|i| gpu(&i.to_string(), GpuVendor::Nvidia, &format!("GPU-{i}aaa-{i}"))).collect()
    }

    #[test]
    fn parse_follows_cuda_rules() {
        assert_eq!(parse_visible_list("2,3"), ["2", "3"]);
        assert_eq!(parse_visible_list(" 0 , 1 "), ["0", "1"]);
        assert!(parse_visible_list("").is_empty());
        assert!(parse_visible_list("-1").is_empty());
        assert_eq!(parse_visible_list("1,-1,2"), ["1"]);
        assert_eq!(parse_visible_list("GPU-abc,MIG-def"), ["GPU-abc", "MIG-def"]);
    }

    #[test]
    fn ordinals_map_to_entries() {
        assert_eq!(cuda_ids_for_ordinals(Some("2,3"), 2), ["2", "3"]);
        assert_eq!(cuda_ids_for_ordinals(None, 3), ["0", "1", "2"]);
        assert_eq!(cuda_ids_for_ordinals(Some("GPU-x"), 1), ["GPU-x"]);
    }

    #[test]
    fn filter_by_index_and_uuid() {
        assert_eq!(ids(&filter_visible(four(), Some("2,3"), None)), ["2", "3"]);
        assert_eq!(ids(&filter_visible(four(), Some("3,1"), None)), ["1", "3"]);
        assert_eq!(ids(&filter_visible(four(), None, None)), ["0", "1", "2", "3"]);
        assert!(filter_visible(four(), Some(""), None).is_empty());
        assert!(filter_visible(four(), Some("-1"), None).is_empty());
        assert_eq!(ids(&filter_visible(four(), Some("GPU-2aaa"), None)), ["2"]);
        assert_eq!(ids(&filter_visible(four(), Some("gpu-1AAA-1"), None)), ["1"]);
        // Unknown entry ends the list, as in CUDA.
        assert_eq!(ids(&filter_visible(four(), Some("0,7,1"), None)), ["0"]);
        // Ambiguous UUID prefix names nothing.
        assert!(filter_visible(four(), Some("GPU-"), None).is_empty());
        // "02" is index 2.
        assert_eq!(ids(&filter_visible(four(), Some("02"), None)), ["2"]);
    }

    #[test]
    fn amd_uses_rocr_then_cuda_list() {
        let mixed =
            vec![gpu("0", GpuVendor::Nvidia, "GPU-n0"), gpu("0", GpuVendor::Amd, "a0"), gpu("1", GpuVendor::Amd, "a1")];
        let kept = filter_visible(mixed.clone(), Some("0"), Some("1"));
        assert_eq!(kept, vec![mixed[0].clone(), mixed[2].clone()]);
        let kept = filter_visible(mixed.clone(), Some("1"), None);
        assert_eq!(kept, vec![mixed[2].clone()]);
        let kept = filter_visible(mixed.clone(), None, Some("0"));
        assert_eq!(kept, vec![mixed[0].clone(), mixed[1].clone()]);
    }
}
