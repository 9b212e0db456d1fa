//! Expanding task templates into tasks: matrix products, stable ids, quoted substitution.
//!
//! Ids come from the job file alone (template name and parameter values), never from timing or
//! order of execution, so the same file always yields the same ids, and a changed matrix only
//! changes the ids of the tasks it really changes.

use std::collections::HashMap;

use serde::Serialize;

use crate::spec::{Job, TaskTemplate};
pub use crate::substitute::shell_quote;
use crate::substitute::{Refused, substitute};

/// A task's fingerprint: the first 64 bits of a BLAKE3 hash, written (journal, summary) as 16
/// hex digits; held as a number, a million tasks hold no strings for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Digest(pub(crate) u64);

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl Digest {
    fn of(hash: &blake3::Hash) -> Self {
        let mut first = [0; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        // Big-endian: its hex digits are the hash's first 16, the digests journals always had.
        Digest(u64::from_be_bytes(first))
    }

    /// Whether `written` is this digest as the journal writes it.
    pub fn is(&self, written: &str) -> bool {
        written == self.to_string()
    }
}

/// One unit of work: a template with one combination of matrix values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// Stable and safe as a file name: `train[lr=0.1,seed=1]`.
    pub id: String,
    /// Position in the job's FIFO order.
    pub index: usize,
    /// Index of its template in `Job::templates`.
    pub template: usize,
    /// For each axis of its template's matrix, in order, the index of its value there: a
    /// million tasks hold no copies of keys and values (see `params`).
    pub values: Box<[u32]>,
    /// The command with parameters substituted and quoted.
    pub command: String,
    /// Fingerprint of what the task runs; a changed digest means results must be redone.
    pub digest: Digest,
    /// Tasks (indices) that must succeed before this one starts (`after`).
    pub after: Box<[usize]>,
    /// Each role's command, substituted (the task's for roles without one); empty without roles.
    pub role_commands: Box<[String]>,
}

impl Task {
    /// Matrix key and value, in the matrix's order; `template` is the task's own.
    pub fn params<'a>(&'a self, template: &'a TaskTemplate) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        template
            .matrix
            .iter()
            .zip(&self.values)
            .map(|(axis, &at)| (axis.key.as_str(), axis.values.get(at as usize).map_or("", String::as_str)))
    }

    /// The command process `process` runs.
    pub(crate) fn command_of(&self, template: &TaskTemplate, process: u32) -> &str {
        template.role_of(process).and_then(|r| self.role_commands.get(r)).unwrap_or(&self.command)
    }
}

/// The task's matrix values with their job-file types (`lr: 0.1` a number, `model: "a"` a string),
/// by a search per value: the reference `TypedValues` is checked against.
#[cfg(test)]
pub(crate) fn typed_params(template: &TaskTemplate, task: &Task) -> serde_json::Map<String, serde_json::Value> {
    task.params(template)
        .map(|(key, value)| {
            let axis = template.matrix.iter().find(|a| a.key == key);
            let typed = axis.and_then(|a| a.typed.get(a.values.iter().position(|v| v == value)?).cloned());
            (key.to_string(), typed.unwrap_or_else(|| value.into()))
        })
        .collect()
}

/// The task's matrix values with their job-file types (`lr: 0.1` a number, `model: "a"` a
/// string) for every task of a template.
pub(crate) struct TypedValues<'a> {
    template: &'a TaskTemplate,
}

impl<'a> TypedValues<'a> {
    pub(crate) fn new(template: &'a TaskTemplate) -> Self {
        TypedValues { template }
    }

    pub(crate) fn of(&self, task: &Task) -> serde_json::Map<String, serde_json::Value> {
        self.template
            .matrix
            .iter()
            .zip(&task.values)
            .map(|(axis, &at)| {
                let at = at as usize;
                let value = axis.typed.get(at).cloned();
                (axis.key.clone(), value.unwrap_or_else(|| axis.values.get(at).cloned().unwrap_or_default().into()))
            })
            .collect()
    }
}

/// Ids longer than this are shortened with a hash, to stay well within a file name's 255 bytes.
const MAX_ID_LEN: usize = 200;

/// A value that cannot be placed safely in its template's command. Validation tries every
/// value that could be refused, so a job that passed `check` never meets this.
#[derive(Debug, thiserror::Error)]
#[error("task {task}: {refused}")]
pub struct ExpandError {
    pub task: String,
    pub refused: Refused,
}

pub fn expand(job: &Job) -> Result<Vec<Task>, ExpandError> {
    let mut tasks = Vec::new();
    for (template_index, template) in job.templates.iter().enumerate() {
        for values in matrix_indices(template) {
            let params: Vec<(String, String)> = template
                .matrix
                .iter()
                .zip(&values)
                .map(|(axis, &at)| (axis.key.clone(), axis.values[at as usize].clone()))
                .collect();
            let refused = |refused| ExpandError { task: task_id(&template.name, &params), refused };
            let mut command = substitute(&template.command, &params).map_err(refused)?;
            command.shrink_to_fit();
            let role_commands = template
                .roles
                .iter()
                .map(|r| {
                    r.command.as_ref().map_or_else(|| Ok(command.clone()), |c| substitute(c, &params).map_err(refused))
                })
                .collect::<Result<Box<[String]>, ExpandError>>()?;
            let digest = digest(template, &command, &role_commands);
            let mut id = task_id(&template.name, &params);
            id.shrink_to_fit();
            tasks.push(Task {
                id,
                index: tasks.len(),
                template: template_index,
                values,
                command,
                digest,
                after: Box::default(),
                role_commands,
            });
        }
    }
    tasks.shrink_to_fit();
    let dependencies = task_dependencies(&job.templates, &tasks);
    for (task, after) in tasks.iter_mut().zip(dependencies) {
        task.after = after.into_boxed_slice();
    }
    Ok(tasks)
}

/// Every combination of value indices of the template's matrix, the first axis varying
/// slowest (like nested loops, as `TaskTemplate::combinations`).
fn matrix_indices(template: &TaskTemplate) -> impl Iterator<Item = Box<[u32]>> + '_ {
    let sizes: Vec<usize> = template.matrix.iter().map(|axis| axis.values.len()).collect();
    let mut next = (!sizes.contains(&0)).then(|| vec![0u32; sizes.len()]);
    std::iter::from_fn(move || {
        let current = next.take()?;
        let mut following = current.clone();
        // An odometer: the last axis turns fastest, a full axis carries into the one before.
        for axis in (0..sizes.len()).rev() {
            following[axis] += 1;
            if (following[axis] as usize) < sizes[axis] {
                next = Some(following);
                break;
            }
            following[axis] = 0;
        }
        Some(current.into_boxed_slice())
    })
}

pub fn task_id(name: &str, params: &[(String, String)]) -> String {
    if params.is_empty() {
        return name.to_string();
    }
    let pairs: Vec<String> = params.iter().map(|(k, v)| format!("{k}={}", encode_id_value(v))).collect();
    let id = format!("{name}[{}]", pairs.join(","));
    if id.len() <= MAX_ID_LEN {
        return id;
    }
    let hash = blake3::hash(id.as_bytes()).to_hex();
    let mut cut = MAX_ID_LEN - 18;
    while !id.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{}", &id[..cut], &hash.as_str()[..16])
}

/// Percent-encodes everything but a conservative set, so ids never contain `/`, spaces or the
/// `=`, `,` and `]` that separate parameters: distinct values always give distinct ids.
fn encode_id_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-' | b'+' | b'@' | b':') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// What makes a task's result: its command, environment, directory, shape and inputs. Limits
/// (timeout, retries) and resource sizes are left out: changing them does not redo finished work.
fn digest(template: &TaskTemplate, command: &str, role_commands: &[String]) -> Digest {
    #[derive(Serialize)]
    struct Definition<'a> {
        command: &'a str,
        workdir: &'a std::path::Path,
        env: &'a [(String, String)],
        processes: u32,
        processes_per_node: Option<u32>,
        datasets: &'a [String],
        // Left out when empty, so tasks without roles keep the digests they always had.
        #[serde(skip_serializing_if = "Vec::is_empty")]
        roles: Vec<(&'a str, &'a str, u32, Option<u32>)>,
    }
    let definition = Definition {
        command,
        workdir: &template.workdir,
        env: &template.env,
        processes: template.processes,
        processes_per_node: template.processes_per_node,
        datasets: &template.datasets,
        roles: template
            .roles
            .iter()
            .zip(role_commands)
            .map(|(r, c)| (r.name.as_str(), c.as_str(), r.processes, r.processes_per_node))
            .collect(),
    };
    let bytes = serde_json::to_vec(&definition).unwrap_or_default();
    Digest::of(&blake3::hash(&bytes))
}

/// Tasks of one template by the values of the matrix keys a dependent shares with it.
type ByShared<'t> = HashMap<Vec<&'t str>, Vec<usize>>;

/// For each task (by index), the tasks it waits for (`after`), in index order. A template names
/// the templates it runs after; with matrices, a task waits only for the tasks of those that
/// agree with it on every matrix key both share (`eval[seed=1]` waits for
/// `train[lr=*,seed=1]`); with no shared key, for all of them.
pub(crate) fn task_dependencies(templates: &[TaskTemplate], tasks: &[Task]) -> Vec<Vec<usize>> {
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
            let shared = template.shared_matrix_keys(&templates[dep]);
            let index = indexes.entry((task.template, dep)).or_insert_with(|| {
                let mut index = ByShared::new();
                for &t in &by_template[dep] {
                    index.entry(values_of(&tasks[t], &templates[dep], &shared)).or_default().push(t);
                }
                index
            });
            mine.extend(index.get(&values_of(task, template, &shared)).into_iter().flatten().copied());
        }
        mine.sort_unstable();
        mine.dedup();
        deps.push(mine);
    }
    deps
}

fn values_of<'t>(task: &'t Task, template: &'t TaskTemplate, keys: &[String]) -> Vec<&'t str> {
    keys.iter().map(|key| task.params(template).find(|(k, _)| k == key).map_or("", |(_, v)| v)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_written_as_the_first_16_hex_digits_of_the_hash() {
        for text in ["", "python train.py --seed 1", "x"] {
            let hash = blake3::hash(text.as_bytes());
            let digest = Digest::of(&hash);
            assert_eq!(digest.to_string(), hash.to_hex()[..16]);
            assert!(digest.is(&hash.to_hex()[..16]) && !digest.is(&hash.to_hex()));
        }
    }

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn ids_are_readable_stable_and_safe() {
        assert_eq!(task_id("train", &[]), "train");
        assert_eq!(task_id("train", &params(&[("lr", "0.1"), ("seed", "1")])), "train[lr=0.1,seed=1]");
        let id = task_id("t", &params(&[("path", "../a b/c,d=e]")]));
        assert_eq!(id, "t[path=..%2Fa%20b%2Fc%2Cd%3De%5D]");
        assert!(!id.contains('/'));
        let long = "x".repeat(500);
        let a = task_id("t", &params(&[("v", &format!("{long}a"))]));
        let b = task_id("t", &params(&[("v", &format!("{long}b"))]));
        assert!(a.len() <= MAX_ID_LEN && b.len() <= MAX_ID_LEN);
        assert_ne!(a, b);
    }

    #[test]
    fn expansion_order_ids_and_digests() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job.toml");
        let text = "[job]\nname = \"j\"\n[[tasks]]\nname = \"a\"\ncommand = \"run {lr} {seed}\"\nmatrix = { lr = [0.1, 0.01], seed = [1, 2, 3] }\n[[tasks]]\nname = \"b\"\ncommand = \"true\"\n";
        std::fs::write(&file, text).unwrap();
        let job = crate::spec::load(&file).unwrap();
        let tasks = expand(&job).unwrap();
        let ids: Vec<&str> = tasks.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "a[lr=0.1,seed=1]",
                "a[lr=0.1,seed=2]",
                "a[lr=0.1,seed=3]",
                "a[lr=0.01,seed=1]",
                "a[lr=0.01,seed=2]",
                "a[lr=0.01,seed=3]",
                "b"
            ]
        );
        assert_eq!(tasks[4].command, "run 0.01 2");
        let typed = TypedValues::new(&job.templates[0]);
        for task in &tasks[..6] {
            assert_eq!(typed.of(task), typed_params(&job.templates[0], task), "{}", task.id);
        }
        assert_eq!(serde_json::Value::Object(typed.of(&tasks[4])), serde_json::json!({ "lr": 0.01, "seed": 2 }));
        assert_eq!(tasks[6].index, 6);
        assert_eq!(tasks[6].template, 1);
        assert_eq!(expand(&job).unwrap(), tasks, "expansion is deterministic");
        // Changing one matrix value changes only the tasks that use it.
        std::fs::write(&file, text.replace("0.01", "0.02")).unwrap();
        let changed = expand(&crate::spec::load(&file).unwrap()).unwrap();
        assert_eq!(changed[0], tasks[0]);
        assert_eq!(changed[6], tasks[6]);
        assert_ne!(changed[3].id, tasks[3].id);
        // Changing the command changes the digest but not the id.
        std::fs::write(&file, text.replace("run {lr}", "run2 {lr}")).unwrap();
        let changed = expand(&crate::spec::load(&file).unwrap()).unwrap();
        assert_eq!(changed[0].id, tasks[0].id);
        assert_ne!(changed[0].digest, tasks[0].digest);
        assert_eq!(changed[6].digest, tasks[6].digest);
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
        let tasks = crate::plan::expand(&job).unwrap();
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
