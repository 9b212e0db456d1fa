//! Splitting one node between several worker ranks running on it.
//!
//! Rules (all deterministic, computed the same way by every rank):
//!
//! * **At least as many GPUs as ranks, all with a known NUMA node.** GPUs
//!   are ordered by (NUMA node, PCI bus id) and cut into `count` contiguous
//!   blocks (sizes differ by at most one; with one GPU per rank, rank k gets
//!   GPU k of that order). A rank's *home* is the NUMA node of most of its
//!   GPUs. Each home's cores are cut into contiguous chunks, one per rank
//!   homed there. Cores of NUMA nodes that host no rank's GPU go, node by
//!   node, to the ranks of the *nearest* home by reported NUMA distance
//!   (ties, or no distances at all, go to the home with the fewest cores per
//!   rank so far, then to the first), split evenly among them, so no core is
//!   left unused and extra cores stay close.
//! * **Otherwise** (CPU-only node, fewer GPUs than ranks, or GPUs of unknown
//!   locality): cores in locality order are cut into `count` contiguous
//!   chunks. With fewer GPUs than ranks each GPU goes to the GPU-less rank
//!   with the most cores on the GPU's NUMA node; the other ranks get none.
//!   With GPUs of unknown locality, rank k gets GPU block k.
//! * **More ranks than cores** (globally, or on one home node): shares must
//!   overlap; ranks get single cores round-robin and a warning is logged.
//!   A share is never empty while the node has a core.
//!
//! A share's NUMA nodes are those its cores lie in; each keeps the part of
//! its memory proportional to the share's cores there (a core used by
//! several overlapping shares counts for each of them pro rata).

use std::collections::BTreeMap;

use super::{NodeTopology, NumaNode};

/// The part of `topo` that worker rank `index` of `count` ranks on this node
/// may use; the parts do not overlap unless there are more ranks than cores.
pub fn share(topo: &NodeTopology, index: usize, count: usize) -> NodeTopology {
    let count = if count == 0 {
        log::warn!("share of a node among 0 ranks requested; using the whole node");
        1
    } else {
        count
    };
    let index = if index >= count {
        log::warn!("share {index} of {count} requested; using share {}", index % count);
        index % count
    } else {
        index
    };
    let shares = split(topo, count);
    build(topo, &shares, index)
}

/// How the worker ranks of one node see it, next to each other.
#[derive(Clone, Copy, Debug)]
pub struct NodeMates {
    /// This rank's position among the node's worker ranks, and how many there are.
    pub index: usize,
    pub count: usize,
    /// Every worker rank of the node may use the same CPUs (no binding, or the same one).
    pub same_cpus: bool,
    /// Every worker rank of the node sees the same GPUs.
    pub same_gpus: bool,
}

/// This rank's part of its node. What the launcher already split between the ranks (a CPU
/// binding per rank, a CUDA_VISIBLE_DEVICES per rank) stays as given; what every rank sees
/// alike is split here, so two ranks never hand out the same core or GPU.
pub fn divide(topo: &NodeTopology, mates: NodeMates) -> NodeTopology {
    let NodeMates { index, count, same_cpus, same_gpus } = mates;
    match (same_cpus, same_gpus) {
        (true, true) => share(topo, index, count),
        (true, false) => {
            let cpus_only = NodeTopology { gpus: Vec::new(), ..topo.clone() };
            NodeTopology { gpus: topo.gpus.clone(), ..share(&cpus_only, index, count) }
        }
        (false, true) => {
            let blocks = split_even(&gpus_by_locality(topo), count.max(1));
            let mine = blocks.get(index).map_or(&[][..], Vec::as_slice);
            NodeTopology { gpus: mine.iter().map(|&g| topo.gpus[g].clone()).collect(), ..topo.clone() }
        }
        (false, false) => topo.clone(),
    }
}

#[derive(Clone, Debug, Default)]
struct RankShare {
    /// Indices into `topo.cores`.
    cores: Vec<usize>,
    /// Indices into `topo.gpus`.
    gpus: Vec<usize>,
}

fn split(topo: &NodeTopology, count: usize) -> Vec<RankShare> {
    let gpu_order = gpus_by_locality(topo);
    let located = gpu_order.iter().all(|&g| topo.gpus[g].numa.is_some_and(|n| topo.numa_position(n).is_some()));
    let mut shares = if !gpu_order.is_empty() && gpu_order.len() >= count && located {
        split_around_gpus(topo, count, &gpu_order)
    } else {
        let mut shares = split_cores_evenly(topo, count);
        if gpu_order.len() >= count {
            for (share, block) in shares.iter_mut().zip(split_even(&gpu_order, count)) {
                share.gpus = block;
            }
        } else {
            give_gpus_to_nearest_ranks(topo, &mut shares, &gpu_order);
        }
        shares
    };
    fill_empty_shares(topo, &mut shares);
    shares
}

fn gpus_by_locality(topo: &NodeTopology) -> Vec<usize> {
    let mut order: Vec<usize> = (0..topo.gpus.len()).collect();
    order.sort_by_key(|&g| {
        let gpu = &topo.gpus[g];
        let node_pos = gpu.numa.and_then(|n| topo.numa_position(n)).unwrap_or(usize::MAX);
        (node_pos, gpu.pci_bus_id.clone(), g)
    });
    order
}

/// Cuts `items` into `parts` contiguous pieces whose sizes differ by at most
/// one, the larger ones first.
fn split_even<T: Clone>(items: &[T], parts: usize) -> Vec<Vec<T>> {
    let (base, extra) = (items.len() / parts, items.len() % parts);
    let mut next = 0;
    (0..parts)
        .map(|k| {
            let len = base + usize::from(k < extra);
            let piece = items[next..next + len].to_vec();
            next += len;
            piece
        })
        .collect()
}

fn split_cores_evenly(topo: &NodeTopology, count: usize) -> Vec<RankShare> {
    let n = topo.cores.len();
    let all: Vec<usize> = (0..n).collect();
    if n > 0 && count > n {
        log::warn!("{count} ranks share a node with {n} cores: ranks will share cores");
        return (0..count).map(|k| RankShare { cores: vec![k % n], gpus: Vec::new() }).collect();
    }
    split_even(&all, count).into_iter().map(|cores| RankShare { cores, gpus: Vec::new() }).collect()
}

fn split_around_gpus(topo: &NodeTopology, count: usize, gpu_order: &[usize]) -> Vec<RankShare> {
    let mut cores_at: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    let mut node_order: Vec<u32> = Vec::new();
    for (i, core) in topo.cores.iter().enumerate() {
        if !cores_at.contains_key(&core.numa) {
            node_order.push(core.numa);
        }
        cores_at.entry(core.numa).or_default().push(i);
    }

    let mut shares: Vec<RankShare> =
        split_even(gpu_order, count).into_iter().map(|gpus| RankShare { cores: Vec::new(), gpus }).collect();
    if node_order.is_empty() {
        return shares;
    }

    let mut ranks_at: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (k, share) in shares.iter().enumerate() {
        let mut home = majority_node(topo, &share.gpus);
        if !cores_at.contains_key(&home) {
            // GPUs hang off a node without usable cores (memory-only or
            // disallowed): home the rank on the nearest node that has some.
            home = nearest(topo, home, &node_order);
        }
        ranks_at.entry(home).or_default().push(k);
    }

    for (node, ranks) in &ranks_at {
        let cores = &cores_at[node];
        if ranks.len() > cores.len() {
            log::warn!(
                "{} ranks have their GPUs on NUMA node {node}, which has {} cores: ranks will share cores",
                ranks.len(),
                cores.len()
            );
            for (j, &k) in ranks.iter().enumerate() {
                shares[k].cores.push(cores[j % cores.len()]);
            }
        } else {
            distribute(cores, ranks, &mut shares);
        }
    }

    let homes: Vec<u32> = node_order.iter().copied().filter(|n| ranks_at.contains_key(n)).collect();
    let mut load: BTreeMap<u32, usize> = homes.iter().map(|&h| (h, cores_at[&h].len())).collect();
    for &spare in node_order.iter().filter(|n| !ranks_at.contains_key(n)) {
        let target = homes.iter().copied().min_by(|&a, &b| {
            let (ra, rb) = (ranks_at[&a].len(), ranks_at[&b].len());
            // Unknown distances rank all homes alike: index order says
            // little about locality, so balance decides instead.
            topo.numa_distance(spare, a)
                .cmp(&topo.numa_distance(spare, b))
                // load[a]/ra < load[b]/rb, without division
                .then_with(|| (load[&a] * rb).cmp(&(load[&b] * ra)))
                .then_with(|| topo.numa_position(a).cmp(&topo.numa_position(b)))
        });
        if let Some(target) = target {
            distribute(&cores_at[&spare], &ranks_at[&target], &mut shares);
            *load.entry(target).or_default() += cores_at[&spare].len();
        }
    }
    shares
}

/// NUMA node holding most of `gpus`; ties go to the node of the earliest.
fn majority_node(topo: &NodeTopology, gpus: &[usize]) -> u32 {
    let nodes: Vec<u32> = gpus.iter().filter_map(|&g| topo.gpus[g].numa).collect();
    let count = |n: u32| nodes.iter().filter(|&&m| m == n).count();
    let mut best: Option<(u32, usize)> = None;
    for &n in &nodes {
        if best.is_none_or(|(_, c)| count(n) > c) {
            best = Some((n, count(n)));
        }
    }
    best.map_or(0, |(n, _)| n)
}

fn nearest(topo: &NodeTopology, from: u32, candidates: &[u32]) -> u32 {
    candidates.iter().copied().min_by_key(|&c| topo.numa_remoteness(from, c)).unwrap_or(from)
}

/// Cuts `cores` into contiguous chunks for `ranks` (in rank order). When the
/// cut is uneven the larger chunks go to the ranks with the fewest cores so
/// far, so that several pools split in a row even out.
fn distribute(cores: &[usize], ranks: &[usize], shares: &mut [RankShare]) {
    let r = ranks.len();
    if r == 0 || cores.is_empty() {
        return;
    }
    let mut sizes = vec![cores.len() / r; r];
    let mut by_need: Vec<usize> = (0..r).collect();
    by_need.sort_by_key(|&j| (shares[ranks[j]].cores.len(), j));
    for &j in by_need.iter().take(cores.len() % r) {
        sizes[j] += 1;
    }
    let mut next = 0;
    for (j, &k) in ranks.iter().enumerate() {
        shares[k].cores.extend_from_slice(&cores[next..next + sizes[j]]);
        next += sizes[j];
    }
}

fn give_gpus_to_nearest_ranks(topo: &NodeTopology, shares: &mut [RankShare], gpu_order: &[usize]) {
    for &g in gpu_order {
        let node = topo.gpus[g].numa;
        let local_cores = |share: &RankShare| share.cores.iter().filter(|&&c| Some(topo.cores[c].numa) == node).count();
        let best = (0..shares.len())
            .filter(|&k| shares[k].gpus.is_empty())
            .max_by_key(|&k| (local_cores(&shares[k]), std::cmp::Reverse(k)));
        if let Some(k) = best {
            shares[k].gpus.push(g);
        }
    }
}

fn fill_empty_shares(topo: &NodeTopology, shares: &mut [RankShare]) {
    let n = topo.cores.len();
    if n == 0 {
        return;
    }
    for (k, share) in shares.iter_mut().enumerate() {
        if share.cores.is_empty() {
            log::warn!("node share {k} would have no core; giving it core {} of another share", k % n);
            share.cores.push(k % n);
        }
    }
}

fn build(topo: &NodeTopology, plan: &[RankShare], index: usize) -> NodeTopology {
    let mine = &plan[index];
    let mut core_ids = mine.cores.clone();
    core_ids.sort_unstable();
    core_ids.dedup();
    let mut gpu_ids = mine.gpus.clone();
    gpu_ids.sort_unstable();

    let mut users = vec![0usize; topo.cores.len()];
    for share in plan {
        let mut own = share.cores.clone();
        own.sort_unstable();
        own.dedup();
        own.into_iter().for_each(|c| users[c] += 1);
    }
    let mut node_cores: BTreeMap<u32, usize> = BTreeMap::new();
    topo.cores.iter().for_each(|c| *node_cores.entry(c.numa).or_default() += 1);
    let mut node_part: BTreeMap<u32, f64> = BTreeMap::new();
    for &c in &core_ids {
        *node_part.entry(topo.cores[c].numa).or_default() += 1.0 / users[c].max(1) as f64;
    }

    let kept: Vec<usize> =
        (0..topo.numa_nodes.len()).filter(|&i| node_part.contains_key(&topo.numa_nodes[i].os_index)).collect();
    let numa_nodes = kept
        .iter()
        .map(|&i| {
            let node = &topo.numa_nodes[i];
            let total = node_cores.get(&node.os_index).copied().unwrap_or(1).max(1) as f64;
            let fraction = node_part[&node.os_index] / total;
            let memory = if fraction >= 1.0 - 1e-9 { node.memory } else { (node.memory as f64 * fraction) as u64 };
            NumaNode { os_index: node.os_index, memory }
        })
        .collect();
    let numa_distances = topo.numa_distances.as_ref().and_then(|m| {
        kept.iter()
            .map(|&i| kept.iter().map(|&j| m.get(i).and_then(|row| row.get(j)).copied()).collect::<Option<Vec<_>>>())
            .collect::<Option<Vec<_>>>()
    });
    let cores: Vec<_> = core_ids.iter().map(|&c| topo.cores[c].clone()).collect();
    let mut allowed_cpus: Vec<u32> = cores.iter().flat_map(|c| c.pus.iter().copied()).collect();
    allowed_cpus.sort_unstable();

    NodeTopology {
        source: topo.source.clone(),
        is_this_system: topo.is_this_system,
        numa_nodes,
        cores,
        gpus: gpu_ids.iter().map(|&g| topo.gpus[g].clone()).collect(),
        allowed_cpus,
        numa_distances,
        binding_restricted: topo.binding_restricted,
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::fixture;
    use super::*;
    use std::collections::BTreeSet;

    fn gpu_ids(t: &NodeTopology) -> Vec<&str> {
        t.gpus.iter().map(|g| g.id.as_str()).collect()
    }

    fn assert_disjoint(shares: &[NodeTopology]) {
        let mut seen = BTreeSet::new();
        for s in shares {
            for &pu in &s.allowed_cpus {
                assert!(seen.insert(pu), "PU {pu} in two shares");
            }
        }
    }

    /// Ranks bound to CPUs of their own by the launcher but seeing all GPUs still get GPUs of
    /// their own; GPUs the launcher split (one CUDA_VISIBLE_DEVICES per rank) stay theirs.
    #[test]
    fn what_the_launcher_split_stays_split_and_the_rest_is_divided() {
        let t = fixture("nvidiaDGX2.xml");
        let mates = |index, same_cpus, same_gpus| NodeMates { index, count: 4, same_cpus, same_gpus };
        let bound: Vec<_> = (0..4).map(|k| divide(&t, mates(k, false, true))).collect();
        let mut seen = BTreeSet::new();
        for b in &bound {
            assert_eq!(b.gpus.len(), 4);
            assert_eq!(b.allowed_cpus, t.allowed_cpus, "the binding is the launcher's");
            assert!(b.gpus.iter().all(|g| seen.insert(g.id.clone())), "a GPU in two ranks");
        }
        let own_gpu = NodeTopology { gpus: t.gpus[5..6].to_vec(), ..t.clone() };
        let shares: Vec<_> = (0..4).map(|k| divide(&own_gpu, mates(k, true, false))).collect();
        assert_disjoint(&shares);
        assert!(shares.iter().all(|s| gpu_ids(s) == gpu_ids(&own_gpu)), "each rank keeps the GPU it was given");
        assert_eq!(gpu_ids(&divide(&own_gpu, mates(2, false, false))), gpu_ids(&own_gpu));
        assert_eq!(divide(&t, mates(1, true, true)), share(&t, 1, 4));
    }

    #[test]
    fn dgx2_four_ranks() {
        let t = fixture("nvidiaDGX2.xml");
        let shares: Vec<_> = (0..4).map(|k| share(&t, k, 4)).collect();
        assert_disjoint(&shares);
        for (k, s) in shares.iter().enumerate() {
            assert_eq!(s.gpus.len(), 4);
            let home = s.gpus[0].numa;
            assert!(s.gpus.iter().all(|g| g.numa == home), "share {k}: {:?}", s.gpus);
            assert!(!s.cores.is_empty());
            assert!(s.cores.iter().all(|c| Some(c.numa) == home), "share {k}");
            assert_eq!(s.numa_nodes.len(), 1);
            // two ranks per node: half the node's memory each
            let node = t.numa_nodes.iter().find(|n| Some(n.os_index) == home).map(|n| n.memory);
            assert_eq!(Some(s.numa_nodes[0].memory * 2), node.map(|m| m - m % 2));
        }
        let all: BTreeSet<&str> = shares.iter().flat_map(gpu_ids).collect();
        assert_eq!(all.len(), 16);
        assert_eq!(gpu_ids(&shares[0]), ["0", "1", "2", "3"]);
    }

    #[test]
    fn dgx2_sixteen_ranks_one_gpu_each() {
        let t = fixture("nvidiaDGX2.xml");
        for k in 0..16 {
            let s = share(&t, k, 16);
            assert_eq!(gpu_ids(&s), [k.to_string().as_str()]);
            // 8 ranks per node but 2 cores there: overlapping, still local
            assert_eq!(s.cores.len(), 1);
            assert_eq!(Some(s.cores[0].numa), s.gpus[0].numa);
        }
    }

    #[test]
    fn power8_two_ranks_follow_gpus() {
        let t = fixture("power8gpudistances.xml");
        let a = share(&t, 0, 2);
        let b = share(&t, 1, 2);
        assert_disjoint(&[a.clone(), b.clone()]);
        assert_eq!(gpu_ids(&a), ["0", "1"]);
        assert_eq!(gpu_ids(&b), ["2", "3"]);
        assert!(a.cores.iter().all(|c| c.numa == 0) && a.cores.len() == 4);
        assert!(b.cores.iter().all(|c| c.numa == 1) && b.cores.len() == 4);
        assert_eq!(b.numa_distances, Some(vec![vec![10]]));
        // One rank: everything.
        let whole = share(&t, 0, 1);
        assert_eq!(whole.allowed_cpus, t.allowed_cpus);
        assert_eq!(whole.gpus, t.gpus);
        assert_eq!(whole.numa_nodes, t.numa_nodes);
    }

    #[test]
    fn spare_numa_nodes_go_to_nearest_home() {
        // 4 nodes, GPUs only on nodes 0 and 1; node 2 is nearer to 1 and
        // node 3 nearer to 0.
        let mut t = NodeTopology::synthetic(4, 4, 1, 0, 1000);
        let base = NodeTopology::synthetic(2, 1, 1, 1, 1);
        t.gpus = base.gpus.clone();
        t.numa_distances =
            Some(vec![vec![10, 20, 30, 15], vec![20, 10, 15, 30], vec![30, 15, 10, 30], vec![15, 30, 30, 10]]);
        let a = share(&t, 0, 2);
        let b = share(&t, 1, 2);
        assert_disjoint(&[a.clone(), b.clone()]);
        let nodes = |s: &NodeTopology| s.numa_nodes.iter().map(|n| n.os_index).collect::<Vec<_>>();
        assert_eq!(nodes(&a), [0, 3]);
        assert_eq!(nodes(&b), [1, 2]);
        assert_eq!(a.allowed_cpus.len() + b.allowed_cpus.len(), 16);
        // Without distances, ties on remoteness go to the least loaded home.
        t.numa_distances = None;
        let a = share(&t, 0, 2);
        let b = share(&t, 1, 2);
        assert_disjoint(&[a.clone(), b.clone()]);
        assert_eq!(a.allowed_cpus.len(), 8);
        assert_eq!(b.allowed_cpus.len(), 8);
    }

    #[test]
    fn cpu_only_node_splits_evenly_and_contiguously() {
        let t = fixture("192em64t-24n8c2t.xml");
        let shares: Vec<_> = (0..5).map(|k| share(&t, k, 5)).collect();
        assert_disjoint(&shares);
        let sizes: Vec<usize> = shares.iter().map(|s| s.cores.len()).collect();
        assert_eq!(sizes, [39, 39, 38, 38, 38]);
        assert_eq!(shares[0].cores[..], t.cores[..39]);
        assert_eq!(shares.iter().map(|s| s.allowed_cpus.len()).sum::<usize>(), 384);
        // 39 cores = nodes 0-3 (8 cores each) + 7 of node 4: memory pro rata.
        let mem: Vec<u64> = shares[0].numa_nodes.iter().map(|n| n.memory).collect();
        let full: Vec<u64> = t.numa_nodes[..5].iter().map(|n| n.memory).collect();
        assert_eq!(mem[..4], full[..4]);
        assert_eq!(mem[4], full[4] * 7 / 8);
        assert_eq!(shares[1].numa_nodes[0].memory, full[4] / 8);
    }

    #[test]
    fn four_ranks_on_four_sockets_get_one_socket_each() {
        let t = fixture("16em64t-4s2c2t.xml");
        assert_eq!(t.cores.len(), 8);
        let shares: Vec<_> = (0..4).map(|k| share(&t, k, 4)).collect();
        assert_disjoint(&shares);
        for (k, s) in shares.iter().enumerate() {
            assert_eq!(s.cores[..], t.cores[2 * k..2 * k + 2]);
            assert_eq!(s.allowed_cpus.len(), 4);
        }
    }

    #[test]
    fn fewer_gpus_than_ranks() {
        let t = fixture("power8gpudistances.xml");
        let shares: Vec<_> = (0..8).map(|k| share(&t, k, 8)).collect();
        assert_disjoint(&shares);
        let with_gpu: Vec<usize> = (0..8).filter(|&k| !shares[k].gpus.is_empty()).collect();
        assert_eq!(with_gpu, [0, 1, 4, 5]);
        for s in &shares {
            assert_eq!(s.cores.len(), 1);
            if let Some(g) = s.gpus.first() {
                assert_eq!(g.numa, Some(s.cores[0].numa));
            }
        }
    }

    #[test]
    fn more_ranks_than_cores_overlap_but_never_empty() {
        let t = fixture("16amd64-8n2c-cpusets.xml");
        let shares: Vec<_> = (0..12).map(|k| share(&t, k, 12)).collect();
        assert!(shares.iter().all(|s| s.cores.len() == 1 && !s.allowed_cpus.is_empty()));
        let used: BTreeSet<u32> = shares.iter().flat_map(|s| s.allowed_cpus.clone()).collect();
        assert_eq!(used.len(), 10);
        // out-of-range input is tolerated
        assert_eq!(share(&t, 3, 0).allowed_cpus, t.allowed_cpus);
        assert!(!share(&t, 40, 12).cores.is_empty());
    }
}
