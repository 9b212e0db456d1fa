//! Choosing GPUs and CPUs for one task, the way a careful admin would by hand.
//!
//! * **GPUs first, then CPUs next to them.** Among NUMA nodes with enough
//!   free GPUs, prefer (in order): one whose free PUs also fit the task; the
//!   fewest free GPUs (best fit, keeping larger GPU groups for multi-GPU
//!   tasks); one whose *whole* free cores fit the task; the most free PUs;
//!   the first in locality order. The task takes the first free GPUs of that
//!   node and its CPUs from there. If no single node has enough free GPUs,
//!   they are taken from the node with the most free GPUs, then from the
//!   nearest nodes.
//! * **CPU-only tasks** (`gpus == 0`) go to a NUMA node where they fit,
//!   preferring (in order): whole free cores fitting the task; fewer free
//!   GPUs (cores next to free GPUs are kept for GPU tasks); the most free PUs
//!   (spreading tasks spreads memory-bandwidth load); the first node.
//! * **Within a node, whole free cores first**: all PUs of fully free cores,
//!   core by core, then free PUs of partly used cores, so two tasks share a
//!   physical core only when no whole core is left. A task larger than the
//!   node's free PUs takes all of them and spills to the nearest other nodes
//!   (NUMA distance when known, else the next node by index first).
//! * `cpus == 0` asks for no dedicated CPUs: the placement's `cpus` is empty
//!   (the task runs unpinned) while GPUs are still chosen.
//!
//! Everything is deterministic: ties always fall back to index order.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::NodeTopology;

/// Resources handed to one task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// OS indices of the PUs, sorted; empty for tasks that asked for none.
    pub cpus: Vec<u32>,
    /// Indices into the placer's `topology().gpus`, sorted.
    pub gpus: Vec<usize>,
    /// OS indices of the NUMA nodes of `cpus` (of the GPUs when `cpus` is
    /// empty), sorted.
    pub numa_nodes: Vec<u32>,
}

/// Which PUs and GPUs of a worker's (shared) topology are in use.
#[derive(Clone, Debug)]
pub struct Placer {
    topo: NodeTopology,
    /// NUMA nodes that have cores, in locality order, with their cores'
    /// usable PUs (core by core).
    nodes: Vec<(u32, Vec<Vec<u32>>)>,
    used_pus: BTreeSet<u32>,
    used_gpus: Vec<bool>,
}

impl Placer {
    pub fn new(topo: NodeTopology) -> Self {
        // A hand-made or deserialized topology could list core PUs outside
        // allowed_cpus; those are never handed out.
        let allowed: BTreeSet<u32> = topo.allowed_cpus.iter().copied().collect();
        let mut nodes: Vec<(u32, Vec<Vec<u32>>)> = Vec::new();
        for core in &topo.cores {
            let pus: Vec<u32> = core.pus.iter().copied().filter(|p| allowed.contains(p)).collect();
            if pus.is_empty() {
                continue;
            }
            match nodes.iter_mut().find(|(n, _)| *n == core.numa) {
                Some((_, cores)) => cores.push(pus),
                None => nodes.push((core.numa, vec![pus])),
            }
        }
        let used_gpus = vec![false; topo.gpus.len()];
        Placer { topo, nodes, used_pus: BTreeSet::new(), used_gpus }
    }

    pub fn topology(&self) -> &NodeTopology {
        &self.topo
    }

    /// (PUs, GPUs, memory bytes) this worker may hand out in total.
    pub fn capacity(&self) -> (u32, u32, u64) {
        let pus = self.nodes.iter().flat_map(|(_, cores)| cores).map(Vec::len).sum::<usize>();
        (to_u32(pus), to_u32(self.topo.gpus.len()), self.topo.total_memory())
    }

    /// (PUs, GPUs) not in use right now.
    pub fn free(&self) -> (u32, u32) {
        let pus = self.nodes.iter().map(|(n, _)| self.node_free(*n)).sum::<usize>();
        (to_u32(pus), to_u32(self.used_gpus.iter().filter(|u| !**u).count()))
    }

    /// The `Gpu.id`s of a placement's GPUs, for CUDA_VISIBLE_DEVICES and the like.
    pub fn gpu_ids(&self, placement: &Placement) -> Vec<String> {
        placement.gpus.iter().filter_map(|&g| self.topo.gpus.get(g)).map(|g| g.id.clone()).collect()
    }

    /// Chooses GPUs and CPUs together for a task asking `cpus` PUs and `gpus`
    /// GPUs, and marks them used; None when they are not free right now.
    pub fn place(&mut self, cpus: u32, gpus: u32) -> Option<Placement> {
        let (want_cpus, want_gpus) = (cpus as usize, gpus as usize);
        let (free_pus, free_gpus) = self.free();
        if want_cpus > free_pus as usize || want_gpus > free_gpus as usize {
            return None;
        }
        let (chosen_gpus, near) =
            if want_gpus > 0 { self.choose_gpus(want_gpus, want_cpus) } else { (Vec::new(), Vec::new()) };
        let chosen_cpus = if want_cpus > 0 { self.choose_cpus(want_cpus, &near)? } else { Vec::new() };

        chosen_cpus.iter().for_each(|&pu| {
            self.used_pus.insert(pu);
        });
        chosen_gpus.iter().for_each(|&g| self.used_gpus[g] = true);

        let numa_nodes: BTreeSet<u32> = if chosen_cpus.is_empty() {
            chosen_gpus.iter().filter_map(|&g| self.topo.gpus[g].numa).collect()
        } else {
            chosen_cpus.iter().filter_map(|&pu| self.node_of_pu(pu)).collect()
        };
        let mut cpus = chosen_cpus;
        cpus.sort_unstable();
        let mut gpus = chosen_gpus;
        gpus.sort_unstable();
        Some(Placement { cpus, gpus, numa_nodes: numa_nodes.into_iter().collect() })
    }

    pub fn release(&mut self, placement: &Placement) {
        for pu in &placement.cpus {
            if !self.used_pus.remove(pu) {
                log::warn!("released PU {pu} was not in use");
            }
        }
        for &g in &placement.gpus {
            match self.used_gpus.get_mut(g) {
                Some(used) if *used => *used = false,
                _ => log::warn!("released GPU {g} was not in use"),
            }
        }
    }

    fn node_of_pu(&self, pu: u32) -> Option<u32> {
        self.nodes.iter().find(|(_, cores)| cores.iter().any(|c| c.contains(&pu))).map(|(n, _)| *n)
    }

    fn cores_of(&self, node: u32) -> &[Vec<u32>] {
        self.nodes.iter().find(|(n, _)| *n == node).map_or(&[], |(_, cores)| cores.as_slice())
    }

    fn node_free(&self, node: u32) -> usize {
        self.cores_of(node).iter().flatten().filter(|pu| !self.used_pus.contains(pu)).count()
    }

    /// PUs of this node's cores that no task uses at all.
    fn node_whole_free(&self, node: u32) -> usize {
        self.cores_of(node).iter().filter(|core| core.iter().all(|pu| !self.used_pus.contains(pu))).map(Vec::len).sum()
    }

    fn position(&self, node: u32) -> usize {
        self.nodes.iter().position(|(n, _)| *n == node).unwrap_or(usize::MAX)
    }

    fn free_gpus_near(&self, node: u32) -> usize {
        (0..self.topo.gpus.len()).filter(|&g| !self.used_gpus[g] && self.cpu_home(g) == Some(node)).count()
    }

    /// The node whose cores serve GPU `g`: its own NUMA node, or the nearest
    /// node with cores when its node has none (memory-only or outside this
    /// share). None when its locality is unknown.
    fn cpu_home(&self, g: usize) -> Option<u32> {
        let node = self.topo.gpus[g].numa?;
        if self.nodes.iter().any(|(n, _)| *n == node) {
            return Some(node);
        }
        self.topo.numa_position(node)?;
        self.nodes.iter().map(|(n, _)| *n).min_by_key(|&n| self.topo.numa_remoteness(node, n))
    }

    /// Free GPUs for the task and the nodes whose CPUs should serve it.
    fn choose_gpus(&self, want: usize, want_cpus: usize) -> (Vec<usize>, Vec<u32>) {
        // Groups of free GPUs by the node serving them, None (unknown) last.
        let mut groups: Vec<(Option<u32>, Vec<usize>)> = Vec::new();
        for g in (0..self.topo.gpus.len()).filter(|&g| !self.used_gpus[g]) {
            let home = self.cpu_home(g);
            match groups.iter_mut().find(|(h, _)| *h == home) {
                Some((_, list)) => list.push(g),
                None => groups.push((home, vec![g])),
            }
        }
        let pos = |home: Option<u32>| home.map_or(usize::MAX, |n| self.position(n));
        groups.sort_by_key(|(home, _)| pos(*home));

        let key = |home: Option<u32>, free_gpus: usize| {
            let (free, whole) = home.map_or((0, 0), |n| (self.node_free(n), self.node_whole_free(n)));
            (
                !(want_cpus == 0 || free >= want_cpus),
                free_gpus,
                !(want_cpus == 0 || whole >= want_cpus),
                std::cmp::Reverse(free),
                pos(home),
            )
        };
        if let Some((home, list)) = groups.iter().filter(|(_, l)| l.len() >= want).min_by_key(|(h, l)| key(*h, l.len()))
        {
            return (list[..want].to_vec(), home.iter().copied().collect());
        }

        // No single node has enough: start where most are free, continue
        // with the nearest nodes.
        let Some(first) = groups.iter().max_by_key(|(h, l)| (l.len(), std::cmp::Reverse(pos(*h)))).map(|g| g.0) else {
            return (Vec::new(), Vec::new());
        };
        groups.sort_by_key(|(home, _)| match (first, *home) {
            _ if *home == first => (0, 0, 0),
            (Some(f), Some(h)) => {
                let (d, p) = self.topo.numa_remoteness(f, h);
                (1, d, p)
            }
            _ => (2, 0, pos(*home)),
        });
        let mut chosen = Vec::new();
        let mut near = Vec::new();
        for (home, list) in &groups {
            if chosen.len() == want {
                break;
            }
            let take = (want - chosen.len()).min(list.len());
            chosen.extend_from_slice(&list[..take]);
            near.extend(*home);
        }
        (chosen, near)
    }

    /// Node for a task without GPUs, or whose GPUs have no known locality.
    fn choose_cpu_node(&self, want: usize) -> Option<u32> {
        self.nodes.iter().map(|(n, _)| *n).min_by_key(|&n| {
            let free = self.node_free(n);
            (
                free < want,
                self.node_whole_free(n) < want,
                self.free_gpus_near(n),
                std::cmp::Reverse(free),
                self.position(n),
            )
        })
    }

    /// `want` free PUs: from the `near` nodes in order (or the best node for
    /// a CPU-only task), then from the other nodes nearest to them; whole
    /// free cores before partly used ones within each node.
    fn choose_cpus(&self, want: usize, near: &[u32]) -> Option<Vec<u32>> {
        let mut order: Vec<u32> = Vec::new();
        for &n in near {
            if !order.contains(&n) {
                order.push(n);
            }
        }
        if order.is_empty() {
            order.push(self.choose_cpu_node(want)?);
        }
        let mut rest: Vec<u32> = self.nodes.iter().map(|(n, _)| *n).filter(|n| !order.contains(n)).collect();
        rest.sort_by_key(|&n| order.iter().map(|&o| self.topo.numa_remoteness(o, n)).min());
        order.extend(rest);

        let mut chosen = Vec::with_capacity(want);
        for node in order {
            if chosen.len() == want {
                break;
            }
            let cores = self.cores_of(node);
            let is_free = |pu: &&u32| !self.used_pus.contains(*pu);
            let whole = cores.iter().filter(|c| c.iter().all(|pu| !self.used_pus.contains(pu))).flatten();
            let partial =
                cores.iter().filter(|c| !c.iter().all(|pu| !self.used_pus.contains(pu))).flatten().filter(is_free);
            chosen.extend(whole.chain(partial).take(want - chosen.len()).copied());
        }
        (chosen.len() == want).then_some(chosen)
    }
}

fn to_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::fixture;
    use super::super::{NodeTopology, share};
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn core_of(t: &NodeTopology, pu: u32) -> usize {
        t.cores.iter().position(|c| c.pus.contains(&pu)).unwrap()
    }

    fn numa_of(t: &NodeTopology, pu: u32) -> u32 {
        t.cores[core_of(t, pu)].numa
    }

    #[test]
    fn power8_one_gpu_tasks_get_local_cores() {
        let t = fixture("power8gpudistances.xml");
        let mut p = Placer::new(t.clone());
        assert_eq!(p.capacity(), (16, 4, t.total_memory()));
        let mut gpus = BTreeSet::new();
        for _ in 0..4 {
            let pl = p.place(2, 1).expect("fits");
            assert_eq!(pl.gpus.len(), 1);
            assert!(gpus.insert(pl.gpus[0]));
            let node = t.gpus[pl.gpus[0]].numa.unwrap();
            assert!(pl.cpus.iter().all(|&pu| numa_of(&t, pu) == node), "{pl:?}");
            assert_eq!(pl.numa_nodes, [node]);
            // two PUs of one core
            assert_eq!(core_of(&t, pl.cpus[0]), core_of(&t, pl.cpus[1]));
        }
        assert_eq!(p.place(1, 1), None);
        assert_eq!(p.place(8, 0).map(|pl| pl.cpus.len()), Some(8));
    }

    #[test]
    fn restricted_cpuset_never_leaks() {
        let t = fixture("16amd64-8n2c-cpusets.xml");
        let allowed: BTreeSet<u32> = t.allowed_cpus.iter().copied().collect();
        let mut p = Placer::new(t.clone());
        assert_eq!(p.capacity().0 as usize, allowed.len());
        assert_eq!(p.capacity().0, 10);
        let mut handed = BTreeSet::new();
        for size in [1, 3, 2, 1, 1, 2] {
            let pl = p.place(size, 0).expect("fits");
            for pu in pl.cpus {
                assert!(allowed.contains(&pu), "PU {pu} outside allowed cpuset");
                assert!(handed.insert(pu), "PU {pu} twice");
            }
        }
        assert_eq!(handed, allowed);
        assert_eq!(p.place(1, 0), None);
    }

    #[test]
    fn many_small_tasks_fill_numa_nodes_whole_cores_first() {
        let t = fixture("192em64t-24n8c2t.xml");
        let mut p = Placer::new(t.clone());
        let mut placements = Vec::new();
        let mut handed = BTreeSet::new();
        let mut per_node: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        while let Some(pl) = p.place(1, 0) {
            assert_eq!(pl.cpus.len(), 1);
            assert!(handed.insert(pl.cpus[0]), "PU {} handed out twice", pl.cpus[0]);
            assert_eq!(pl.numa_nodes, [numa_of(&t, pl.cpus[0])]);
            per_node.entry(pl.numa_nodes[0]).or_default().push(core_of(&t, pl.cpus[0]));
            placements.push(pl);
        }
        assert_eq!(handed.len(), 384);
        assert_eq!(per_node.len(), 24);
        for cores in per_node.values() {
            let first8: BTreeSet<usize> = cores[..8].iter().copied().collect();
            assert_eq!(first8.len(), 8, "hyperthread used before a whole core");
        }
        // Release one task: exactly that PU comes back.
        let freed = placements.swap_remove(17);
        p.release(&freed);
        assert_eq!(p.place(1, 0), Some(freed.clone()));
        assert_eq!(p.place(1, 0), None);
        // Release a whole node's worth: a 16-PU task fits in that one node.
        let node = placements[0].numa_nodes[0];
        for pl in placements.iter().filter(|pl| pl.numa_nodes == [node]) {
            p.release(pl);
        }
        p.release(&freed);
        let big = p.place(16, 0).expect("node is free again");
        assert_eq!(big.numa_nodes, [node]);
    }

    #[test]
    fn two_pu_tasks_take_whole_cores() {
        let t = fixture("192em64t-24n8c2t.xml");
        let mut p = Placer::new(t.clone());
        for _ in 0..192 {
            let pl = p.place(2, 0).expect("fits");
            assert_eq!(core_of(&t, pl.cpus[0]), core_of(&t, pl.cpus[1]));
        }
        assert_eq!(p.free(), (0, 0));
    }

    #[test]
    fn spill_goes_to_nearest_node() {
        let t = fixture("192em64t-24n8c2t.xml");
        let mut p = Placer::new(t.clone());
        let pl = p.place(20, 0).expect("fits");
        assert_eq!(pl.cpus.len(), 20);
        let first = t.numa_nodes[0].os_index;
        assert_eq!(pl.numa_nodes.len(), 2);
        assert!(pl.numa_nodes.contains(&first));
        let other = pl.numa_nodes.iter().copied().find(|&n| n != first).unwrap();
        // 50 is the smallest remote distance of node 0 in this machine.
        assert_eq!(t.numa_distance(first, other), Some(50));
        let from_first = pl.cpus.iter().filter(|&&pu| numa_of(&t, pu) == first).count();
        assert_eq!(from_first, 16);
        // whole cores of the second node: 4 PUs = 2 cores
        let spilled: BTreeSet<usize> =
            pl.cpus.iter().filter(|&&pu| numa_of(&t, pu) == other).map(|&pu| core_of(&t, pu)).collect();
        assert_eq!(spilled.len(), 2);
    }

    #[test]
    fn gpu_task_spills_when_its_node_is_busy() {
        let t = fixture("power8gpudistances.xml");
        let mut p = Placer::new(t.clone());
        // Fill node 0 and most of node 1 with a CPU task, leaving 2 PUs on node 1.
        let filler = p.place(14, 0).expect("fits");
        assert_eq!(filler.numa_nodes.len(), 2);
        let pl = p.place(2, 2).expect("fits");
        let home = t.gpus[pl.gpus[0]].numa.unwrap();
        assert!(pl.gpus.iter().all(|&g| t.gpus[g].numa == Some(home)));
        assert!(pl.cpus.iter().all(|&pu| numa_of(&t, pu) == home));
    }

    #[test]
    fn spill_without_distances_uses_next_node() {
        let mut t = NodeTopology::synthetic(3, 2, 1, 0, 1);
        t.numa_distances = None;
        let mut p = Placer::new(t.clone());
        let pl = p.place(4, 0).expect("fits");
        assert_eq!(pl.numa_nodes, [0, 1]);
        let pl = p.place(2, 0).expect("fits");
        assert_eq!(pl.numa_nodes, [2]);
    }

    #[test]
    fn dgx2_gpu_pairs_share_a_numa_node() {
        let t = fixture("nvidiaDGX2.xml");
        let mut p = Placer::new(t.clone());
        assert_eq!(p.capacity().1, 16);
        let mut used = BTreeSet::new();
        for i in 0..8 {
            let cpus = if i < 4 { 1 } else { 0 };
            let pl = p.place(cpus, 2).expect("fits");
            assert_eq!(pl.gpus.len(), 2);
            let nodes: BTreeSet<Option<u32>> = pl.gpus.iter().map(|&g| t.gpus[g].numa).collect();
            assert_eq!(nodes.len(), 1, "{pl:?}");
            let node = t.gpus[pl.gpus[0]].numa.unwrap();
            assert_eq!(pl.numa_nodes, [node]);
            if cpus == 0 {
                assert!(pl.cpus.is_empty());
            } else {
                assert_eq!(numa_of(&t, pl.cpus[0]), node);
            }
            pl.gpus.iter().for_each(|g| assert!(used.insert(*g)));
        }
        assert_eq!(p.place(0, 1), None);
    }

    #[test]
    fn multi_node_gpu_task_when_no_node_has_enough() {
        let t = fixture("power8gpudistances.xml");
        let mut p = Placer::new(t.clone());
        let one = p.place(1, 1).expect("fits");
        let three = p.place(6, 3).expect("fits");
        assert_eq!(three.gpus.len(), 3);
        assert!(!three.gpus.contains(&one.gpus[0]));
        // Most of its GPUs are on the node with 2 free: cpus start there.
        let main = t.gpus[three.gpus[2]].numa.unwrap();
        assert!(three.cpus.iter().filter(|&&pu| numa_of(&t, pu) == main).count() >= 4);
    }

    #[test]
    fn cpu_tasks_avoid_cores_next_to_free_gpus() {
        let mut t = NodeTopology::synthetic(2, 4, 1, 0, 1);
        t.gpus = NodeTopology::synthetic(1, 1, 1, 2, 1).gpus; // two GPUs on node 0
        let mut p = Placer::new(t);
        let pl = p.place(2, 0).expect("fits");
        assert_eq!(pl.numa_nodes, [1]);
        let g = p.place(1, 2).expect("fits");
        assert_eq!(g.numa_nodes, [0]);
        assert_eq!(p.gpu_ids(&g), ["0", "1"]);
    }

    #[test]
    fn not_enough_resources_and_determinism() {
        let t = fixture("24em64t-2n6c2t-pci.xml");
        let mut a = Placer::new(t.clone());
        let mut b = Placer::new(t);
        assert_eq!(a.place(25, 0), None);
        assert_eq!(a.place(1, 4), None);
        for size in [3, 5, 1, 7, 2] {
            assert_eq!(a.place(size, 0), b.place(size, 0));
        }
        assert_eq!(a.free(), (6, 3));
    }

    #[test]
    fn placer_on_a_share_stays_inside_it() {
        let t = fixture("nvidiaDGX2.xml");
        let s = share(&t, 3, 4);
        let mut p = Placer::new(s.clone());
        assert_eq!(p.capacity().1, 4);
        let pl = p.place(1, 4).expect("fits");
        assert!(s.allowed_cpus.contains(&pl.cpus[0]));
        assert_eq!(p.gpu_ids(&pl), ["12", "13", "14", "15"]);
    }
}
