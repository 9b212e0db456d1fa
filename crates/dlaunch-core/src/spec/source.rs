//! Where things are in a job file: byte spans ↔ field paths ↔ line and column.
//!
//! serde tells us *that* a value is wrong and roughly where (a byte span); the validator knows
//! *which* field is wrong. Both become "file:line:column: field: message" through this map,
//! so users can jump straight to the spot in their editor.

use std::fmt;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

/// One step in a path to a value: a table key or an array index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// A path to a value in the job file, written the way users think of it: `tasks[1].matrix.lr`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(pub Vec<Segment>);

impl FieldPath {
    pub fn key(&self, key: &str) -> FieldPath {
        let mut segments = self.0.clone();
        segments.push(Segment::Key(key.to_string()));
        FieldPath(segments)
    }

    pub fn index(&self, index: usize) -> FieldPath {
        let mut segments = self.0.clone();
        segments.push(Segment::Index(index));
        FieldPath(segments)
    }
}

/// `FieldPath::root().key("job").key("name")`, shortened for the validator's many call sites.
pub fn field(keys: &[&str]) -> FieldPath {
    FieldPath(keys.iter().map(|k| Segment::Key(k.to_string())).collect())
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => write!(f, "{key}")?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

/// The text of a job file with its spanned syntax tree (absent when the text is not valid TOML).
pub struct SourceMap<'a> {
    text: &'a str,
    root: Option<Spanned<DeTable<'a>>>,
}

impl<'a> SourceMap<'a> {
    pub fn new(text: &'a str) -> Self {
        SourceMap { text, root: DeTable::parse(text).ok() }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub(crate) fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = floor_char_boundary(self.text, offset.min(self.text.len()));
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    /// The span of the value at `path`, or of its nearest existing ancestor.
    pub(crate) fn span_of(&self, path: &FieldPath) -> Option<Range<usize>> {
        let root = self.root.as_ref()?;
        let mut span = root.span();
        let mut value: Option<&DeValue<'a>> = None;
        let mut table: Option<&DeTable<'a>> = Some(root.get_ref());
        for segment in &path.0 {
            let next = match (segment, table, value) {
                (Segment::Key(key), Some(t), _) => {
                    t.iter().find(|(k, _)| k.get_ref().as_ref() == key.as_str()).map(|(_, v)| v)
                }
                (Segment::Index(i), _, Some(DeValue::Array(items))) => items.get(*i),
                _ => None,
            };
            let Some(next) = next else { break };
            span = next.span();
            value = Some(next.get_ref());
            table = match next.get_ref() {
                DeValue::Table(t) => Some(t),
                _ => None,
            };
        }
        Some(span)
    }

    /// Line and column of the `nth` occurrence of `needle` in the text of the value at `path`:
    /// where a placeholder stands in a command, escapes in the TOML string notwithstanding.
    pub(crate) fn find_in(&self, path: &FieldPath, needle: &str, nth: usize) -> Option<(usize, usize)> {
        let span = self.span_of(path)?;
        let (offset, _) = self.text.get(span.clone())?.match_indices(needle).nth(nth)?;
        Some(self.line_col(span.start + offset))
    }

    /// The path of the innermost value (or key) whose span contains `offset`. The whole tree is
    /// searched: a `[table]` header's span covers only the header, not the keys below it.
    pub(crate) fn path_at(&self, offset: usize) -> FieldPath {
        let mut best = FieldPath::default();
        if let Some(root) = self.root.as_ref() {
            search_table(root.get_ref(), offset, &mut FieldPath::default(), &mut best);
        }
        best
    }
}

fn search_table(table: &DeTable<'_>, offset: usize, path: &mut FieldPath, best: &mut FieldPath) {
    for (key, value) in table.iter() {
        path.0.push(Segment::Key(key.get_ref().to_string()));
        if contains(&key.span(), offset) || contains(&value.span(), offset) {
            keep_deeper(path, best);
        }
        search_value(value.get_ref(), offset, path, best);
        path.0.pop();
    }
}

fn search_value(value: &DeValue<'_>, offset: usize, path: &mut FieldPath, best: &mut FieldPath) {
    match value {
        DeValue::Table(table) => search_table(table, offset, path, best),
        DeValue::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                path.0.push(Segment::Index(i));
                if contains(&item.span(), offset) {
                    keep_deeper(path, best);
                }
                search_value(item.get_ref(), offset, path, best);
                path.0.pop();
            }
        }
        _ => {}
    }
}

fn keep_deeper(path: &FieldPath, best: &mut FieldPath) {
    if path.0.len() > best.0.len() {
        *best = path.clone();
    }
}

fn contains(span: &Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end.max(span.start + 1)
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[job]\nname = \"x\"\n\n[[tasks]]\nname = \"a\"\ncommand = \"true\"\n\n[[tasks]]\nname = \"b\"\nmatrix = { lr = [0.1, 0.2] }\n";

    #[test]
    fn paths_display_like_users_write_them() {
        assert_eq!(field(&["tasks"]).index(1).key("matrix").key("lr").to_string(), "tasks[1].matrix.lr");
    }

    #[test]
    fn span_of_a_nested_field_points_at_its_line() {
        let map = SourceMap::new(TEXT);
        let span = map.span_of(&field(&["tasks"]).index(1).key("matrix").key("lr")).unwrap();
        assert_eq!(map.line_col(span.start).0, 10);
        let span = map.span_of(&field(&["tasks"]).index(0).key("command")).unwrap();
        assert_eq!(map.line_col(span.start), (6, 11));
    }

    #[test]
    fn path_at_finds_the_innermost_value() {
        let map = SourceMap::new(TEXT);
        let offset = TEXT.find("0.2").unwrap();
        assert_eq!(map.path_at(offset).to_string(), "tasks[1].matrix.lr[1]");
    }

    #[test]
    fn line_col_counts_characters_not_bytes() {
        let map = SourceMap::new("a = \"é\"\nb = 1\n");
        assert_eq!(map.line_col(9), (2, 1));
        assert_eq!(map.line_col(7), (1, 7));
    }
}
