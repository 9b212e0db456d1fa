//! Here-documents and comments: where a line ends decides what the next one is (a body line,
//! the delimiter, a command), and a value must not end either early.

use super::*;

pub(super) struct HereDoc {
    pub(super) delim: String,
    pub(super) quoted: bool,
    pub(super) strip_tabs: bool,
}

/// The first value on the current line of a here-document body.
pub(super) struct LineValue {
    /// Where it starts in the output.
    pub(super) at: usize,
    /// A guard can go in front of it (it stands in the body itself, not in nested quotes).
    pub(super) guardable: bool,
    pub(super) offset: usize,
    pub(super) key: String,
}

pub(super) struct Here {
    pub(super) doc: HereDoc,
    pub(super) line_start: usize,
    pub(super) value: Option<LineValue>,
    /// The template is at the start of a body line, where the delimiter may stand.
    pub(super) at_line_start: bool,
}

impl Scanner<'_, '_> {
    /// After a template newline: the next line may be a here-document delimiter or body.
    pub(super) fn template_newline(&mut self) {
        let in_body = self.stack.last() == Some(&Frame::HereBody);
        let in_code = matches!(self.frame(), Frame::Command { .. } | Frame::Case { .. });
        match self.here.as_mut() {
            Some(here) if in_body => here.at_line_start = true,
            Some(_) => {}
            // The body starts at the end of the command line, not at a newline inside quotes.
            None if in_code => {
                if let Some(doc) = self.pending.pop_front() {
                    self.start_body(doc);
                }
            }
            None => {}
        }
    }

    pub(super) fn start_body(&mut self, doc: HereDoc) {
        self.here = Some(Here { doc, line_start: self.out.len(), value: None, at_line_start: true });
        self.stack.push(Frame::HereBody);
    }

    /// At the start of a body line: the delimiter line ends the body (and starts the next one).
    pub(super) fn body_line_start(&mut self) {
        let line = self.text[self.pos..].split('\n').next().unwrap_or_default();
        let Some(here) = self.here.as_mut() else { return };
        here.at_line_start = false;
        let stripped = if here.doc.strip_tabs { line.trim_start_matches('\t') } else { line };
        if stripped != here.doc.delim {
            return;
        }
        self.here = None;
        self.stack.pop();
        self.out.push_str(line);
        self.pos += line.len();
        if self.rest().starts_with('\n') {
            self.out.push('\n');
            self.pos += 1;
            self.prev = Some('\n');
            self.command_position = true;
            self.template_newline();
        }
    }

    /// A body line is complete: a value on it must not make it the delimiter, nor lose tabs.
    pub(super) fn end_line(&mut self) -> Result<(), Refused> {
        let Some(here) = self.here.as_mut() else { return Ok(()) };
        let Some(value) = here.value.take() else { return Ok(()) };
        let line = &self.out[here.line_start..];
        let stripped = if here.doc.strip_tabs { line.trim_start_matches('\t') } else { line };
        let ends_body = stripped == here.doc.delim;
        let loses_tabs = here.line_start + (line.len() - stripped.len()) > value.at;
        if !ends_body && !loses_tabs {
            return Ok(());
        }
        if value.guardable {
            self.out.insert_str(value.at, GUARD);
            return Ok(());
        }
        let reason = if ends_body {
            format!("a value here would end the here-document early (a line `{}`)", here.doc.delim)
        } else {
            "a value here would lose its leading tabs to <<-".to_string()
        };
        Err(Refused { offset: value.offset, key: value.key, reason: quoted_here_hint(reason, here.doc.quoted) })
    }

    /// A `#` comment, up to the newline. Nothing in it runs, but a newline in a value would end
    /// it: values are written with their newlines as `\n`.
    pub(super) fn comment(&mut self) -> Result<(), Refused> {
        let end = self.rest().find('\n').unwrap_or(self.rest().len());
        let comment = &self.rest()[..end];
        let mut rest = comment;
        while let Some(open) = rest.find('{') {
            self.out.push_str(&rest[..open]);
            let after = &rest[open..];
            match after.find('}').and_then(|close| {
                let key = &after[1..close];
                self.params.iter().find(|(k, _)| k == key).map(|(_, v)| (close, v))
            }) {
                Some((close, value)) => {
                    self.out.push_str(&value.replace('\n', "\\n"));
                    rest = &after[close + 1..];
                }
                None => {
                    self.out.push('{');
                    rest = &after[1..];
                }
            }
        }
        self.out.push_str(rest);
        self.pos += end;
        self.prev = Some('#');
        Ok(())
    }

    /// `<<WORD`, `<<-WORD`, `<<'WORD'`: the body starts after the next newline.
    pub(super) fn heredoc_operator(&mut self) -> Result<(), Refused> {
        let rest = self.rest();
        if rest.starts_with("<<<") {
            // bash's here-string: one word, read like any other.
            return self.raw(3);
        }
        let strip_tabs = rest.starts_with("<<-");
        let mut len = if strip_tabs { 3 } else { 2 };
        len += rest[len..].len() - rest[len..].trim_start_matches([' ', '\t']).len();
        let word_start = len;
        let mut delim = String::new();
        let mut quoted = false;
        let mut quote: Option<char> = None;
        let mut chars = rest[len..].chars();
        while let Some(c) = chars.next() {
            match (quote, c) {
                (None, ' ' | '\t' | '\n' | ';' | '&' | '|' | '(' | ')' | '<' | '>') => break,
                (None, '\'' | '"') => {
                    quote = Some(c);
                    quoted = true;
                }
                (Some(q), c) if c == q => quote = None,
                (None, '\\') => {
                    quoted = true;
                    if let Some(next) = chars.next() {
                        delim.push(next);
                        len += 1 + next.len_utf8();
                    }
                    continue;
                }
                _ => delim.push(c),
            }
            len += c.len_utf8();
        }
        let word = &rest[word_start..len];
        if let Some(open) = word.find('{')
            && let Some((key, _)) = self.params.iter().find(|(k, _)| word[open..].starts_with(&format!("{{{k}}}")))
        {
            let reason = "a here-document's delimiter cannot be a placeholder: the shell reads it before \
                          any value could be quoted"
                .to_string();
            return Err(Refused { offset: self.pos + word_start + open, key: key.clone(), reason });
        }
        if self.here.is_none() && !word.is_empty() {
            self.pending.push_back(HereDoc { delim, quoted, strip_tabs });
        }
        self.raw(len)
    }
}

pub(super) fn quoted_here_hint(reason: String, quoted: bool) -> String {
    if quoted {
        format!(
            "{reason}; a quoted here-document passes text as is, so nothing can prevent that: \
             use an unquoted delimiter, or read the value from $DLAUNCH_PARAM_<KEY>"
        )
    } else {
        format!("{reason}; move the placeholder out of quotes and `…` inside the here-document")
    }
}
