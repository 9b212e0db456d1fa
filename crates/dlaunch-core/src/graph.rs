//! Dependency graphs (`after` between tasks, `wait_for` between roles): cycles, layers and an
//! order that respects them. Nodes are indices; node i waits for the nodes in `after[i]`.
//! Which tasks a task waits for is decided by `plan::task_dependencies`.

/// A cycle among `after` edges (node i waits for `after[i]`), as the nodes along it with the
/// first repeated at the end; None when there is none.
pub(crate) fn find_cycle(after: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut marks = vec![Mark::New; after.len()];
    for start in 0..after.len() {
        if marks[start] != Mark::New {
            continue;
        }
        // Iterative depth-first search: (node, next edge to follow).
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        marks[start] = Mark::OnPath;
        while let Some(top) = path.last_mut() {
            let node = top.0;
            match after[node].get(top.1).copied() {
                Some(next) => {
                    top.1 += 1;
                    match marks.get(next).copied() {
                        Some(Mark::New) => {
                            marks[next] = Mark::OnPath;
                            path.push((next, 0));
                        }
                        Some(Mark::OnPath) => {
                            let from = path.iter().position(|&(n, _)| n == next).unwrap_or(0);
                            let mut cycle: Vec<usize> = path[from..].iter().map(|&(n, _)| n).collect();
                            cycle.push(next);
                            return Some(cycle);
                        }
                        _ => {}
                    }
                }
                None => {
                    marks[node] = Mark::Done;
                    path.pop();
                }
            }
        }
    }
    None
}

/// Nodes by layer: layer 0 waits for nothing, layer k for nodes of earlier layers only.
/// `after` must be acyclic (validation refuses cycles); nodes on a cycle would be left out.
pub fn layers(after: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let mut layer_of: Vec<Option<usize>> = vec![None; after.len()];
    let mut layers: Vec<Vec<usize>> = Vec::new();
    loop {
        let ready: Vec<usize> = (0..after.len())
            .filter(|&n| layer_of[n].is_none())
            .filter(|&n| after[n].iter().all(|&d| layer_of.get(d).copied().flatten().is_some()))
            .collect();
        if ready.is_empty() {
            return layers;
        }
        for &n in &ready {
            layer_of[n] = Some(layers.len());
        }
        layers.push(ready);
    }
}

/// The nodes in an order where every node comes after what it waits for (ties by index).
pub(crate) fn topological_order(after: &[Vec<usize>]) -> Vec<usize> {
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); after.len()];
    let mut waiting: Vec<usize> = after.iter().map(Vec::len).collect();
    for (node, deps) in after.iter().enumerate() {
        for &d in deps {
            if let Some(list) = dependents.get_mut(d) {
                list.push(node);
            }
        }
    }
    let mut ready: std::collections::BTreeSet<usize> = (0..after.len()).filter(|&n| waiting[n] == 0).collect();
    let mut order = Vec::with_capacity(after.len());
    while let Some(node) = ready.pop_first() {
        order.push(node);
        for &next in &dependents[node] {
            waiting[next] -= 1;
            if waiting[next] == 0 {
                ready.insert(next);
            }
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycles_are_found_with_their_path() {
        assert_eq!(find_cycle(&[vec![], vec![0], vec![1]]), None);
        assert_eq!(find_cycle(&[vec![2], vec![0], vec![1]]), Some(vec![0, 2, 1, 0]));
        assert_eq!(find_cycle(&[vec![], vec![1]]), Some(vec![1, 1]), "a task after itself");
        assert_eq!(find_cycle(&[vec![1], vec![], vec![3], vec![2]]), Some(vec![2, 3, 2]));
    }

    #[test]
    fn layers_and_order_follow_the_edges() {
        // 0: prep; 1: train after 0; 2: eval after 1; 3: report after 0 and 2; 4: alone.
        let after = [vec![], vec![0], vec![1], vec![0, 2], vec![]];
        assert_eq!(layers(&after), [vec![0, 4], vec![1], vec![2], vec![3]]);
        assert_eq!(topological_order(&after), [0, 1, 2, 3, 4]);
        assert_eq!(topological_order(&[vec![1], vec![]]), [1, 0]);
    }
}
