//! Errors in a job file, each pointing at a file, line, column and field.

use std::fmt;
use std::path::{Path, PathBuf};

use super::source::{FieldPath, SourceMap};

/// One problem in a job file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpecError {
    pub file: PathBuf,
    /// 1-based line and column, when the problem has a place in the text.
    pub position: Option<(usize, usize)>,
    /// The field, e.g. `tasks[2].timeout`; empty for problems with the file as a whole.
    pub field: String,
    pub message: String,
}

impl SpecError {
    /// A problem with the file as a whole (unreadable, not UTF-8, ...).
    pub fn whole_file(file: &Path, message: impl Into<String>) -> Self {
        SpecError { file: file.to_path_buf(), position: None, field: String::new(), message: message.into() }
    }

    pub fn at(file: &Path, map: &SourceMap, path: &FieldPath, message: impl Into<String>) -> Self {
        SpecError {
            file: file.to_path_buf(),
            position: map.span_of(path).map(|span| map.line_col(span.start)),
            field: path.to_string(),
            message: message.into(),
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Everything wrong with a job file; validation reports all problems at once, not one per run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl From<SpecError> for SpecErrors {
    fn from(error: SpecError) -> Self {
        SpecErrors(vec![error])
    }
}
