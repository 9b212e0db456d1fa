//! The job file: what users write, and the validated `Job` the rest of dlaunch runs.

mod error;
mod model;
mod raw;
mod source;
mod units;
mod validate;

use std::path::Path;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

pub use error::{SpecError, SpecErrors};
pub use model::*;
pub use units::{format_duration, format_size};

#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) use tests::{TestProbe, load};

use raw::RawFile;
use source::SourceMap;

/// What the paths a job file names are on this machine. The core cannot look (it has no
/// filesystem); the shell answers, and validation decides what the answer means.
pub trait Probe {
    /// What `path` is, or why it cannot be read.
    fn kind(&self, path: &Path) -> Result<PathKind, String>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    File,
    Directory,
    /// A device, socket, FIFO...
    Other,
}

impl PathKind {
    /// From what the shell's `stat` said.
    pub fn of(is_file: bool, is_dir: bool) -> PathKind {
        match (is_file, is_dir) {
            (true, _) => PathKind::File,
            (_, true) => PathKind::Directory,
            _ => PathKind::Other,
        }
    }
}

/// Parses and validates job-file bytes; `file` (absolute) names the file in errors and anchors
/// relative paths.
pub fn parse(file: &Path, bytes: &[u8], probe: &dyn Probe) -> Result<Job, SpecErrors> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let valid = std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default();
        let map = SourceMap::new(valid);
        SpecError {
            file: file.to_path_buf(),
            position: Some(map.line_col(valid.len())),
            field: String::new(),
            message: "the file is not valid UTF-8 text".into(),
        }
    })?;
    if text.trim().is_empty() {
        return Err(SpecError::whole_file(
            file,
            "the file is empty: a job file needs a [job] table with a name and at least one [[tasks]] entry",
        )
        .into());
    }
    let map = SourceMap::new(text);
    let root = DeTable::parse(text).map_err(|e| toml_error(file, &map, &e))?;
    let read = read_all(root);
    let mut errors: Vec<SpecError> = read.errors.iter().map(|e| toml_error(file, &map, e)).collect();
    // Entries of the wrong kind were left out; what remains of the file is still worth checking,
    // unless whole tables went with them (their absence would be reported as errors of its own).
    if let Some(raw) = read.raw.filter(|_| !read.pruned_tables) {
        match validate::validate(file, &map, raw, probe) {
            Ok(job) if errors.is_empty() => return Ok(job),
            Ok(_) => {}
            Err(more) => errors.extend(more),
        }
    }
    errors.sort_by_key(|e| e.position);
    Err(SpecErrors(errors))
}

/// What serde could read of a file, and every key and type error on the way.
struct ReadAll {
    raw: Option<RawFile>,
    errors: Vec<toml::de::Error>,
    /// Whole tables (a `[[tasks]]` entry, `[job]`) were left out, not just single keys.
    pruned_tables: bool,
}

/// serde stops at the first unknown key or wrong type; a user with three typos would need three
/// runs to see them. Read again without the offending entry until the rest reads, collecting
/// each error; every round removes an entry, so this ends.
fn read_all(mut root: Spanned<DeTable<'_>>) -> ReadAll {
    let mut errors = Vec::new();
    let mut removed_keys: Vec<String> = Vec::new();
    let mut pruned_tables = false;
    loop {
        let error = match RawFile::deserialize(toml::de::Deserializer::from(root.clone())) {
            Ok(raw) => return ReadAll { raw: Some(raw), errors, pruned_tables },
            Err(error) => error,
        };
        let removed = error.span().and_then(|span| remove_innermost(root.get_mut(), span.start));
        // `job = 5` is one mistake: once the entry is gone, its absence is no news.
        let missing = error.message().strip_prefix("missing field `").and_then(|rest| rest.strip_suffix('`'));
        if !missing.is_some_and(|key| removed_keys.iter().any(|k| k == key)) {
            errors.push(error);
        }
        match removed {
            Some(Removed { key, table }) => {
                pruned_tables |= table;
                removed_keys.push(key);
            }
            None => return ReadAll { raw: None, errors, pruned_tables: true },
        }
    }
}

/// An entry left out: its key (empty for an array item), and whether it was a whole table.
struct Removed {
    key: String,
    table: bool,
}

/// Removes the innermost key or array item whose text contains `offset`. The whole tree is
/// searched: a `[table]` header's span covers only the header, not the keys below it.
fn remove_innermost(table: &mut DeTable<'_>, offset: usize) -> Option<Removed> {
    for (_, value) in table.iter_mut() {
        let deeper = match value.get_mut() {
            DeValue::Table(inner) => remove_innermost(inner, offset),
            DeValue::Array(items) => remove_item(items, offset),
            _ => None,
        };
        if deeper.is_some() {
            return deeper;
        }
    }
    let (key, value) = table.iter().find(|(k, v)| contains(k.span(), offset) || contains(v.span(), offset))?;
    let removed = Removed { key: key.get_ref().to_string(), table: matches!(value.get_ref(), DeValue::Table(_)) };
    table.remove(removed.key.as_str());
    Some(removed)
}

fn remove_item(items: &mut toml::de::DeArray<'_>, offset: usize) -> Option<Removed> {
    for item in items.as_mut() {
        if let DeValue::Table(inner) = item.get_mut()
            && let Some(removed) = remove_innermost(inner, offset)
        {
            return Some(removed);
        }
    }
    let index = items.iter().position(|item| contains(item.span(), offset))?;
    *items = items.iter().enumerate().filter(|(i, _)| *i != index).map(|(_, item)| item.clone()).collect();
    Some(Removed { key: String::new(), table: true })
}

fn contains(span: std::ops::Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end.max(span.start + 1)
}

fn toml_error(file: &Path, map: &SourceMap, error: &toml::de::Error) -> SpecError {
    let start = error.span().map(|span| span.start);
    SpecError {
        file: file.to_path_buf(),
        position: start.map(|offset| map.line_col(offset)),
        field: start.map(|offset| map.path_at(offset).to_string()).unwrap_or_default(),
        message: explain(error.message().trim()),
    }
}

/// serde speaks Rust ("expected i64", "struct RawTask"); users read TOML.
const SERDE_TO_TOML: &[(&str, &str)] = &[
    ("expected i64", "expected a whole number"),
    ("expected struct RawJob", "expected a [job] table"),
    ("expected struct RawTask", "expected a [[tasks]] table"),
    ("expected struct RawRole", "expected a [[tasks.roles]] table"),
    ("expected struct RawDataset", "expected a [datasets.NAME] table"),
    ("expected a sequence", "expected a list"),
    ("expected a map", "expected a table"),
    ("missing field", "missing key"),
];

/// serde's "unknown field `slot_per_worker`, expected one of ..." plus a "did you mean" guess.
fn explain(message: &str) -> String {
    let Some(rest) = message.strip_prefix("unknown field `") else {
        return SERDE_TO_TOML.iter().fold(message.to_string(), |m, (from, to)| m.replace(from, to));
    };
    let Some((unknown, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    let candidates: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let guess = candidates
        .iter()
        .map(|c| (strsim::damerau_levenshtein(unknown, c), *c))
        .filter(|(distance, c)| *distance <= 2.max(c.len() / 4))
        .min();
    match guess {
        Some((_, c)) => format!("unknown key `{unknown}`: did you mean `{c}`? (valid keys: {})", candidates.join(", ")),
        None => format!("unknown key `{unknown}` (valid keys: {})", candidates.join(", ")),
    }
}
