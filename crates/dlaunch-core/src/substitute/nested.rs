//! Where the shell reads a word as arithmetic (array subscripts, `[[ … -eq … ]]`, `${x:offset}`)
//! and what it runs inside backticks: places where a value can only be a number, or must be
//! quoted one level deeper.

use super::*;

impl Scanner<'_, '_> {
    /// The shell reads `…` by dropping one level of backslashes and then parsing the result as a
    /// command of its own: do the same, substitute in that command, and escape it back. Nested
    /// backticks (written \`) are handled by the same steps one level further down.
    pub(super) fn backticks(&mut self) -> Result<(), Refused> {
        let start = self.pos;
        let (raw, len) = backtick_body(&self.rest()[1..]);
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
        let inner = scan(&command, self.params).map_err(|e| Refused { offset: start + 1 + e.offset, ..e })?;
        self.unknown.extend(inner.unknown.into_iter().map(|u| Unknown { offset: start + 1 + u.offset, ..u }));
        self.sensitive |= inner.value_sensitive;
        let changed = inner.command != command;
        let body = if changed { Cow::Owned(escape(&inner.command, BACKTICK_SPECIAL)) } else { Cow::Borrowed(raw) };
        let closing = &self.rest()[1 + raw.len()..1 + len];
        self.out.push('`');
        match self.here.is_some() && changed {
            // A value inside `…` in a here-document: its lines are checked, but cannot be guarded.
            true => self.emit_value(&body, false, start, "…")?,
            false => {
                for c in body.chars() {
                    self.emit(c)?;
                }
            }
        }
        self.out.push_str(closing);
        self.pos += 1 + len;
        self.prev = Some('`');
        Ok(())
    }
}

/// Before a placeholder: `name[` (also `name["`), an indexed array's subscript, which bash
/// evaluates as arithmetic.
pub(super) fn subscript(before: &str) -> bool {
    let Some(before) = before.trim_end_matches(['"', '\'']).strip_suffix('[') else { return false };
    let name = &before[before.trim_end_matches(|c: char| c.is_ascii_alphanumeric() || c == '_').len()..];
    is_identifier(name)
}

/// The placeholder is an operand of `-eq`, `-lt`, …, which `[[ ]]` evaluates as arithmetic.
pub(super) fn compared(text: &str, offset: usize, len: usize) -> bool {
    const OPERATORS: [&str; 6] = ["-eq", "-ne", "-lt", "-le", "-gt", "-ge"];
    let before = text[..offset].trim_end_matches(['"', '\'']).trim_end();
    let after = text[offset + len..].trim_start_matches(['"', '\'']).trim_start();
    OPERATORS.iter().any(|op| {
        before.strip_suffix(op).is_some_and(|b| b.ends_with([' ', '\t']))
            || after.strip_prefix(op).is_some_and(|a| a.starts_with([' ', '\t']))
    })
}

/// Inside `${name:…}` with an offset or length (not `:-`, `:=`, `:?`, `:+`): arithmetic.
pub(super) fn substring_bound(before: &str) -> bool {
    let Some(start) = before.rfind("${") else { return false };
    let inner = before[start + 2..].trim_start_matches(['#', '!']);
    let name_end = inner.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(inner.len());
    let rest = &inner[name_end..];
    let rest = match rest.strip_prefix('[') {
        Some(subscript) => subscript.find(']').map_or("", |close| &subscript[close + 1..]),
        None => rest,
    };
    name_end > 0 && rest.strip_prefix(':').is_some_and(|bound| !bound.starts_with(['-', '=', '?', '+']))
}

/// After an opening backtick: the text up to the first backtick that no backslash protects
/// (the shell's own rule, blind to quotes), and the length consumed with that backtick.
pub(super) fn backtick_body(text: &str) -> (&str, usize) {
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
