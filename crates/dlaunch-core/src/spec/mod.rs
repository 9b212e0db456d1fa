//! The job file: what users write, and the validated `Job` the rest of dlaunch runs.

mod error;
mod model;
mod raw;
mod source;
mod units;
mod validate;

use std::path::Path;

pub use error::{SpecError, SpecErrors};
pub use model::*;
pub use units::{format_duration, format_size};
pub use validate::MAX_TASKS;

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
    let raw: RawFile = toml::from_str(text).map_err(|e| toml_error(file, &map, &e))?;
    validate::validate(file, &map, raw, probe).map_err(SpecErrors)
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
