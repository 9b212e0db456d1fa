//! Expanding task templates into tasks: matrix products, stable ids, quoted substitution.
//!
//! Ids come from the job file alone (template name and parameter values), never from timing or
//! order of execution, so the same file always yields the same ids, and a changed matrix only
//! changes the ids of the tasks it really changes.

use std::borrow::Cow;

use serde::Serialize;

use crate::spec::{Job, TaskTemplate};

/// One unit of work: a template with one combination of matrix values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// Stable and safe as a file name: `train[lr=0.1,seed=1]`.
    pub id: String,
    /// Position in the job's FIFO order.
    pub index: usize,
    /// Index of its template in `Job::templates`.
    pub template: usize,
    /// Matrix key and value, in the matrix's order.
    pub params: Vec<(String, String)>,
    /// The command with parameters substituted and quoted.
    pub command: String,
    /// Fingerprint of what the task runs; a changed digest means results must be redone.
    pub digest: String,
}

/// The task's matrix values with their job-file types (`lr: 0.1` a number, `model: "a"` a string).
pub fn typed_params(template: &TaskTemplate, task: &Task) -> serde_json::Map<String, serde_json::Value> {
    let typed = |key: &str, value: &str| {
        let axis = template.matrix.iter().find(|a| a.key == key)?;
        let at = axis.values.iter().position(|v| v == value)?;
        axis.typed.get(at).cloned()
    };
    task.params.iter().map(|(k, v)| (k.clone(), typed(k, v).unwrap_or_else(|| v.clone().into()))).collect()
}

/// Ids longer than this are shortened with a hash, to stay well within a file name's 255 bytes.
const MAX_ID_LEN: usize = 200;

pub fn expand(job: &Job) -> Vec<Task> {
    let mut tasks = Vec::new();
    for (template_index, template) in job.templates.iter().enumerate() {
        for params in combinations(template) {
            let command = substitute(&template.command, &params);
            let digest = digest(template, &command);
            tasks.push(Task {
                id: task_id(&template.name, &params),
                index: tasks.len(),
                template: template_index,
                params,
                command,
                digest,
            });
        }
    }
    tasks
}

/// All combinations of matrix values; the first key varies slowest, like nested loops.
fn combinations(template: &TaskTemplate) -> Vec<Vec<(String, String)>> {
    let mut combos: Vec<Vec<(String, String)>> = vec![Vec::new()];
    for axis in &template.matrix {
        combos = combos
            .into_iter()
            .flat_map(|prefix| {
                axis.values.iter().map(move |value| {
                    let mut combo = prefix.clone();
                    combo.push((axis.key.clone(), value.clone()));
                    combo
                })
            })
            .collect();
    }
    combos
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
fn digest(template: &TaskTemplate, command: &str) -> String {
    #[derive(Serialize)]
    struct Definition<'a> {
        command: &'a str,
        workdir: &'a std::path::Path,
        env: &'a [(String, String)],
        processes: u32,
        processes_per_node: Option<u32>,
        datasets: &'a [String],
    }
    let definition = Definition {
        command,
        workdir: &template.workdir,
        env: &template.env,
        processes: template.processes,
        processes_per_node: template.processes_per_node,
        datasets: &template.datasets,
    };
    let bytes = serde_json::to_vec(&definition).unwrap_or_default();
    blake3::hash(&bytes).to_hex()[..16].to_string()
}

/// Where a placeholder stands in a shell line decides how its value must be quoted.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Context {
    /// Top level or inside `$( )`; counts open parentheses to find the closing one.
    Plain {
        parens: u32,
    },
    Single,
    Double,
}

/// The characters before which the shell drops a backslash when it reads `…`.
const BACKTICK_SPECIAL: [char; 3] = ['\\', '`', '$'];

/// Replaces `{key}` for the given keys with the quoted value and `{{key}}` with a literal
/// `{key}`; every other brace (`awk '{print $1}'`, `${HOME}`, `find -exec {} +`) stays as written.
/// The value is quoted for the spot it lands in (plain, '…', "…", $( ), `…` at any depth), so a
/// value like `x; rm -rf ~` is always one word.
pub fn substitute(command: &str, params: &[(String, String)]) -> String {
    if params.is_empty() {
        return command.to_string();
    }
    let mut out = String::with_capacity(command.len());
    let mut stack = vec![Context::Plain { parens: 0 }];
    let mut rest = command;
    while let Some(c) = rest.chars().next() {
        let context = *stack.last().unwrap_or(&Context::Plain { parens: 0 });
        if c == '{'
            && let Some((literal, value, len)) = placeholder(rest, params)
        {
            match value {
                Some(value) => out.push_str(&quote_for(context, value)),
                None => out.push_str(literal),
            }
            rest = &rest[len..];
            continue;
        }
        let len = c.len_utf8();
        // A backslash protects the next character everywhere but inside single quotes.
        if c == '\\' && context != Context::Single {
            let next_len = rest[len..].chars().next().map_or(0, char::len_utf8);
            out.push_str(&rest[..len + next_len]);
            rest = &rest[len + next_len..];
            continue;
        }
        if c == '`' && context != Context::Single {
            let (inner, len) = backtick_body(&rest[1..]);
            out.push('`');
            out.push_str(&substitute_backticked(inner, params));
            out.push_str(&rest[1 + inner.len()..1 + len]);
            rest = &rest[1 + len..];
            continue;
        }
        if c == '$' && rest[len..].starts_with('(') && context != Context::Single {
            stack.push(Context::Plain { parens: 0 });
            out.push_str("$(");
            rest = &rest[2..];
            continue;
        }
        match (context, c) {
            (Context::Plain { .. }, '\'') => stack.push(Context::Single),
            (Context::Plain { .. }, '"') => stack.push(Context::Double),
            (Context::Plain { parens }, '(') => set_parens(&mut stack, parens + 1),
            (Context::Plain { parens: 0 }, ')') if stack.len() > 1 => {
                stack.pop();
            }
            (Context::Plain { parens }, ')') => set_parens(&mut stack, parens.saturating_sub(1)),
            (Context::Single, '\'') | (Context::Double, '"') => {
                stack.pop();
            }
            _ => {}
        }
        out.push(c);
        rest = &rest[len..];
    }
    out
}

/// After an opening backtick: the text up to the first backtick that no backslash protects
/// (the shell's own rule, blind to quotes), and the length consumed with that backtick.
fn backtick_body(text: &str) -> (&str, usize) {
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 2,
            b'`' => return (&text[..i], i + 1),
            _ => i += 1,
        }
    }
    (text, text.len())
}

/// The shell reads `…` by dropping one level of backslashes and then parsing the result as a
/// command of its own: do the same, substitute in that command, and escape it back. Nested
/// backticks (written `\``) are handled by the same steps one level further down.
fn substitute_backticked<'r>(raw: &'r str, params: &[(String, String)]) -> Cow<'r, str> {
    let mut command = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match chars.peek() {
            Some(&next) if c == '\\' && BACKTICK_SPECIAL.contains(&next) => {
                command.push(next);
                chars.next();
            }
            _ => command.push(c),
        }
    }
    let substituted = substitute(&command, params);
    if substituted == command { Cow::Borrowed(raw) } else { Cow::Owned(escape(&substituted, &BACKTICK_SPECIAL)) }
}

fn set_parens(stack: &mut [Context], parens: u32) {
    if let Some(top) = stack.last_mut() {
        *top = Context::Plain { parens };
    }
}

/// At a `{`: `{key}` → the value; `{{key}}` → the literal `{key}`. Returns the literal text,
/// the value (None for the escaped form) and the length consumed.
fn placeholder<'c, 'p>(text: &'c str, params: &'p [(String, String)]) -> Option<(&'c str, Option<&'p str>, usize)> {
    if let Some(inner) = text.strip_prefix("{{") {
        let end = inner.find("}}")?;
        let key = &inner[..end];
        params.iter().any(|(k, _)| k == key).then(|| (&text[1..end + 3], None, end + 4))
    } else {
        let end = text.find('}')?;
        let key = &text[1..end];
        params.iter().find(|(k, _)| k == key).map(|(_, v)| ("", Some(v.as_str()), end + 1))
    }
}

fn quote_for(context: Context, value: &str) -> Cow<'_, str> {
    match context {
        Context::Plain { .. } => shell_quote(value),
        // Close the quote, add an escaped quote, reopen: 'it'\''s'.
        Context::Single => Cow::Owned(value.replace('\'', r"'\''")),
        Context::Double => Cow::Owned(escape(value, &['$', '`', '"', '\\'])),
    }
}

fn escape(text: &str, special: &[char]) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if special.contains(&c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One shell word for `value`: as is when nothing in it is special, else single-quoted.
pub fn shell_quote(value: &str) -> Cow<'_, str> {
    let plain = !value.is_empty()
        && value.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'_' | b'@' | b'%' | b'+' | b'=' | b':' | b',' | b'.' | b'/' | b'-')
        });
    if plain { Cow::Borrowed(value) } else { Cow::Owned(format!("'{}'", value.replace('\'', r"'\''"))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// Runs `command` with sh and returns its stdout: quoting is proven by the real shell.
    fn sh(command: &str) -> String {
        let out = std::process::Command::new("sh").arg("-c").arg(command).output().unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn only_matrix_keys_are_substituted() {
        let p = params(&[("lr", "0.1"), ("seed", "7")]);
        assert_eq!(
            substitute("awk '{print $1}' ${HOME} {lr} {other} find -exec {} + {seed}", &p),
            "awk '{print $1}' ${HOME} 0.1 {other} find -exec {} + 7"
        );
        assert_eq!(substitute("echo {{lr}} {lr}", &p), "echo {lr} 0.1");
        assert_eq!(substitute("echo {lr", &p), "echo {lr");
    }

    #[test]
    fn hostile_values_stay_one_word_in_every_context() {
        let evil = "x; echo INJECTED '$HOME' \"`id`\" $(id) \\";
        let p = params(&[("v", evil)]);
        for template in [
            "printf '%s\\n' {v}",
            "printf '%s\\n' '{v}'",
            "printf '%s\\n' \"{v}\"",
            "printf '%s\\n' \"$(printf '%s' {v})\"",
            "printf '%s\\n' \"$(printf '%s' \"{v}\")\"",
            "printf '%s\\n' \"`printf '%s' {v}`\"",
            "printf '%s\\n' \"`printf '%s' '{v}'`\"",
            "printf \"%s\\n\" \"`printf \"%s\" \"{v}\"`\"",
            "printf '%s\\n' \"`printf '%s' \"{v}\"`\"",
            "printf '%s\\n' \"`printf '%s' \"$(printf '%s' {v})\"`\"",
            // Unquoted, with field splitting off: nested backticks cannot sit inside "…" portably.
            "IFS=; printf '%s\\n' `printf '%s' \\`printf '%s' {v}\\``",
            "IFS=; printf '%s\\n' `printf '%s' \\`printf '%s' \"{v}\"\\``",
            "IFS=; printf '%s\\n' `printf '%s' \\`printf '%s' '{v}'\\``",
            "printf '%s\\n' pre{v}post",
        ] {
            let out = sh(&substitute(template, &p));
            let expected = if template.contains("pre{v}") { format!("pre{evil}post\n") } else { format!("{evil}\n") };
            assert_eq!(out, expected, "template {template}");
        }
    }

    #[test]
    fn quoting_is_minimal_for_ordinary_values() {
        assert_eq!(shell_quote("0.01"), "0.01");
        assert_eq!(shell_quote("data/train.csv"), "data/train.csv");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
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
        let tasks = expand(&job);
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
        assert_eq!(tasks[6].index, 6);
        assert_eq!(tasks[6].template, 1);
        assert_eq!(expand(&job), tasks, "expansion is deterministic");
        // Changing one matrix value changes only the tasks that use it.
        std::fs::write(&file, text.replace("0.01", "0.02")).unwrap();
        let changed = expand(&crate::spec::load(&file).unwrap());
        assert_eq!(changed[0], tasks[0]);
        assert_eq!(changed[6], tasks[6]);
        assert_ne!(changed[3].id, tasks[3].id);
        // Changing the command changes the digest but not the id.
        std::fs::write(&file, text.replace("run {lr}", "run2 {lr}")).unwrap();
        let changed = expand(&crate::spec::load(&file).unwrap());
        assert_eq!(changed[0].id, tasks[0].id);
        assert_ne!(changed[0].digest, tasks[0].digest);
        assert_eq!(changed[6].digest, tasks[6].digest);
    }
}
