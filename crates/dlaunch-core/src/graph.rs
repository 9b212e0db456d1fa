//! Dependencies between tasks (`after`): which tasks a task waits for, cycles, and the layers
//! `dlaunch check` shows.
//!
//! A template names the templates it runs after. With matrices, a task waits only for the tasks
//! of those templates that agree with it on every matrix key both share (`eval[seed=1]` waits
//! for `train[lr=*,seed=1]`); with no shared key it waits for all of them.

use std::collections::HashMap;

use crate::plan::Task;
use crate::spec::TaskTemplate;

/// Tasks of one template by the values of the matrix keys a dependent shares with it.
type ByShared<'t> = HashMap<Vec<&'t str>, Vec<usize>>;

/// For each task (by index), the tasks it waits for, in index order.
pub fn task_dependencies(templates: &[TaskTemplate], tasks: &[Task]) -> Vec<Vec<usize>> {
    let mut by_template: Vec<Vec<usize>> = vec![Vec::new(); templates.len()];
    for task in tasks {
        by_template[task.template].push(task.index);
    }
    // (template, dependency template) → values of the shared keys → tasks of the dependency.
    let mut indexes: HashMap<(usize, usize), ByShared> = HashMap::new();
    let mut deps = Vec::with_capacity(tasks.len());
    for task in tasks {
        let template = &templates[task.template];
        let mut mine = Vec::new();
        for &dep in &template.after {
            let shared = shared_keys(template, &templates[dep]);
            let index = indexes.entry((task.template, dep)).or_insert_with(|| {
                let mut index = ByShared::new();
                for &t in &by_template[dep] {
                    index.entry(values_of(&tasks[t], &shared)).or_default().push(t);
                }
                index
            });
            mine.extend(index.get(&values_of(task, &shared)).into_iter().flatten().copied());
        }
        mine.sort_unstable();
        mine.dedup();
        deps.push(mine);
    }
    deps
}

/// Matrix keys of `a` that `b` has too, in `a`'s order.
pub fn shared_keys(a: &TaskTemplate, b: &TaskTemplate) -> Vec<String> {
    a.matrix.iter().filter(|x| b.matrix.iter().any(|y| y.key == x.key)).map(|x| x.key.clone()).collect()
}

fn values_of<'t>(task: &'t Task, keys: &[String]) -> Vec<&'t str> {
    keys.iter().map(|key| task.params.iter().find(|(k, _)| k == key).map_or("", |(_, v)| v.as_str())).collect()
}

/// A cycle among `after` edges (node i waits for `after[i]`), as the nodes along it with the
/// first repeated at the end; None when there is none.
pub fn find_cycle(after: &[Vec<usize>]) -> Option<Vec<usize>> {
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
pub fn topological_order(after: &[Vec<usize>]) -> Vec<usize> {
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

    #[test]
    fn matrix_dependencies_match_on_shared_keys() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job.toml");
        std::fs::write(
            &file,
            "[job]\nname = \"j\"\n\
             [[tasks]]\nname = \"prep\"\ncommand = \"true\"\n\
             [[tasks]]\nname = \"train\"\ncommand = \"true\"\nmatrix = { lr = [1, 2], seed = [1, 2, 3] }\nafter = [\"prep\"]\n\
             [[tasks]]\nname = \"eval\"\ncommand = \"true\"\nmatrix = { seed = [1, 3] }\nafter = [\"train\"]\n\
             [[tasks]]\nname = \"report\"\ncommand = \"true\"\nafter = [\"eval\", \"prep\"]\n",
        )
        .unwrap();
        let job = crate::spec::load(&file).unwrap();
        let tasks = crate::plan::expand(&job);
        let id = |i: usize| tasks[i].id.as_str();
        let deps_of = |name: &str| {
            let task = tasks.iter().find(|t| t.id == name).unwrap();
            task.after.iter().map(|&d| id(d)).collect::<Vec<_>>()
        };
        assert!(deps_of("prep").is_empty());
        assert_eq!(deps_of("train[lr=2,seed=3]"), ["prep"]);
        assert_eq!(deps_of("eval[seed=1]"), ["train[lr=1,seed=1]", "train[lr=2,seed=1]"]);
        assert_eq!(deps_of("eval[seed=3]"), ["train[lr=1,seed=3]", "train[lr=2,seed=3]"]);
        assert_eq!(deps_of("report"), ["prep", "eval[seed=1]", "eval[seed=3]"]);
    }
}
