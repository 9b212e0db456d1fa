//! Matrix values into shell commands: `{key}` becomes the value, quoted for the spot it lands in.
//!
//! The command is read the way `sh` reads it, as far as placeholders care: plain words, '…',
//! "…", $( ), `…`, ${…} (also inside "…"), $(( )), `case` patterns and arms, `#` comments and
//! here-documents (quoted delimiters, `<<-`). Each value is written so that the shell gives it
//! back byte for byte and runs none of it. Where no quoting can do that (a quoted here-document
//! passes text as is; arithmetic takes numbers only), the command is refused, naming the
//! placeholder and why.

use std::borrow::Cow;
use std::collections::VecDeque;

mod heredoc;
mod nested;

use heredoc::{Here, HereDoc, LineValue};
use nested::{compared, subscript, substring_bound};

/// A placeholder whose value cannot be placed safely where it stands.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{{{key}}}: {reason}")]
pub struct Refused {
    /// Byte offset of the placeholder's `{` in the command.
    pub offset: usize,
    pub key: String,
    pub reason: String,
}

/// A `{identifier}` that is not a matrix key: the shell gets it as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unknown {
    pub offset: usize,
    pub name: String,
}

/// What reading a command found, besides the command with values in place.
pub struct Scan {
    pub command: String,
    pub unknown: Vec<Unknown>,
    /// A placeholder stands where some values could be refused (a here-document, arithmetic):
    /// every combination of values must be tried, not only one.
    pub value_sensitive: bool,
}

/// Replaces `{key}` for the given keys with the quoted value and `{{key}}` with a literal
/// `{key}`; every other brace (`awk '{print $1}'`, `${HOME}`, `find -exec {} +`) stays as written.
pub(crate) fn substitute(command: &str, params: &[(String, String)]) -> Result<String, Refused> {
    if params.is_empty() {
        return Ok(command.to_string());
    }
    scan(command, params).map(|scan| scan.command)
}

pub fn scan(command: &str, params: &[(String, String)]) -> Result<Scan, Refused> {
    let mut scanner = Scanner::new(command, params);
    scanner.run()?;
    Ok(Scan { command: scanner.out, unknown: scanner.unknown, value_sensitive: scanner.sensitive })
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

pub(crate) fn is_identifier(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Where a placeholder stands decides how its value must be written.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Frame {
    /// Commands: the top level, `$( )` (counting open parentheses to find its end) or a `case`
    /// arm (`arm`, ended by `;;` or `esac`).
    Command {
        parens: u32,
        arm: bool,
    },
    Single,
    Double,
    /// `${…}`; `quoted` inside "…" or a here-document, where quotes are not special.
    Param {
        quoted: bool,
    },
    /// `$(( ))` and bash's `(( ))`, or `$[ ]` (`bracket`), counting open parentheses.
    Arith {
        parens: u32,
        bracket: bool,
    },
    /// bash's `$'…'`, where backslash escapes are interpreted.
    AnsiC,
    /// Between `case` and `esac`: the word before `in`, then patterns.
    Case {
        patterns: bool,
    },
    /// The body of the here-document in `Scanner::here`.
    HereBody,
}

/// An empty expansion: put in front of a value's line in an unquoted here-document, the line
/// can neither be read as the delimiter nor lose leading tabs to `<<-`, and reads back the same.
const GUARD: &str = "${-+}";

/// Characters a backslash protects: inside "…" and ${…} in "…", in an unquoted here-document,
/// and those the shell unescapes when it reads `…`.
const DOUBLE_SPECIAL: &[char] = &['$', '`', '"', '\\'];
const QUOTED_PARAM_SPECIAL: &[char] = &['$', '`', '"', '\\', '}'];
const HERE_SPECIAL: &[char] = &['$', '`', '\\'];
const BACKTICK_SPECIAL: &[char] = &['\\', '`', '$'];

/// Words after which the next word is again a command (where `case` is a keyword).
const BEFORE_COMMAND: &[&str] = &["then", "do", "else", "elif", "if", "while", "until", "!", "{", "time"];

struct Scanner<'c, 'p> {
    text: &'c str,
    pos: usize,
    params: &'p [(String, String)],
    out: String,
    stack: Vec<Frame>,
    /// Here-documents whose bodies start after the next newline.
    pending: VecDeque<HereDoc>,
    here: Option<Here>,
    prev: Option<char>,
    command_position: bool,
    /// In the arguments of bash's `let`, each an arithmetic expression.
    let_arguments: bool,
    unknown: Vec<Unknown>,
    sensitive: bool,
}

impl<'c, 'p> Scanner<'c, 'p> {
    fn new(text: &'c str, params: &'p [(String, String)]) -> Self {
        Scanner {
            text,
            pos: 0,
            params,
            out: String::with_capacity(text.len()),
            stack: vec![Frame::Command { parens: 0, arm: false }],
            pending: VecDeque::new(),
            here: None,
            prev: None,
            command_position: true,
            let_arguments: false,
            unknown: Vec::new(),
            sensitive: false,
        }
    }

    fn frame(&self) -> Frame {
        *self.stack.last().unwrap_or(&Frame::Command { parens: 0, arm: false })
    }

    fn rest(&self) -> &'c str {
        &self.text[self.pos..]
    }

    fn set_frame(&mut self, frame: Frame) {
        if let Some(top) = self.stack.last_mut() {
            *top = frame;
        }
    }

    fn word_start(&self) -> bool {
        self.prev.is_none_or(|c| " \t\n;&|()<>".contains(c))
    }

    fn run(&mut self) -> Result<(), Refused> {
        while let Some(c) = self.rest().chars().next() {
            if self.frame() == Frame::HereBody && self.here.as_ref().is_some_and(|h| h.at_line_start) {
                self.body_line_start();
                continue;
            }
            self.step(c)?;
        }
        self.end_line()
    }

    fn step(&mut self, c: char) -> Result<(), Refused> {
        let frame = self.frame();
        let quoted_here = frame == Frame::HereBody && self.here.as_ref().is_some_and(|h| h.doc.quoted);
        if c == '{' && self.placeholder(frame)? {
            return Ok(());
        }
        if quoted_here {
            return self.raw(c.len_utf8());
        }
        let code = matches!(frame, Frame::Command { .. } | Frame::Case { .. });
        if code && self.word_start() {
            if c == '#' {
                return self.comment();
            }
            if self.command_position && self.rest().starts_with("((") {
                self.stack.push(Frame::Arith { parens: 0, bracket: false });
                return self.raw(2);
            }
            if self.keyword(frame)? {
                return Ok(());
            }
        }
        if c == '\\' && frame != Frame::Single {
            let next = self.rest()[1..].chars().next().map_or(0, char::len_utf8);
            return self.raw(1 + next);
        }
        if matches!(frame, Frame::Single | Frame::AnsiC) {
            if c == '\'' {
                self.stack.pop();
            }
            return self.raw(c.len_utf8());
        }
        if c == '`' {
            return self.backticks();
        }
        if c == '$' {
            let rest = self.rest();
            let nested = if rest.starts_with("$((") {
                Some((Frame::Arith { parens: 0, bracket: false }, 3))
            } else if rest.starts_with("$[") {
                Some((Frame::Arith { parens: 0, bracket: true }, 2))
            } else if rest.starts_with("$'") && matches!(frame, Frame::Command { .. } | Frame::Case { .. }) {
                Some((Frame::AnsiC, 2))
            } else if rest.starts_with("$(") {
                Some((Frame::Command { parens: 0, arm: false }, 2))
            } else if rest.starts_with("${") {
                let quoted = matches!(frame, Frame::Double | Frame::HereBody | Frame::Param { quoted: true });
                Some((Frame::Param { quoted }, 2))
            } else {
                None
            };
            if let Some((nested, len)) = nested {
                self.stack.push(nested);
                self.command_position = true;
                return self.raw(len);
            }
        }
        match (frame, c) {
            (Frame::Command { .. } | Frame::Case { .. } | Frame::Param { quoted: false }, '\'') => {
                self.stack.push(Frame::Single)
            }
            (Frame::Command { .. } | Frame::Case { .. } | Frame::Param { .. }, '"') => self.stack.push(Frame::Double),
            (Frame::Double, '"') | (Frame::Param { .. }, '}') => {
                self.stack.pop();
            }
            (Frame::Command { .. } | Frame::Case { .. }, '<') if self.rest().starts_with("<<") => {
                return self.heredoc_operator();
            }
            (Frame::Command { parens, arm }, '(') => self.set_frame(Frame::Command { parens: parens + 1, arm }),
            (Frame::Command { parens: 0, arm: false }, ')') if self.stack.len() > 1 => {
                self.stack.pop();
            }
            (Frame::Command { parens, arm }, ')') => {
                self.set_frame(Frame::Command { parens: parens.saturating_sub(1), arm })
            }
            (Frame::Command { parens: 0, arm: true }, ';') if self.rest().starts_with(";;") => {
                self.stack.pop();
                return self.raw(2);
            }
            (Frame::Case { patterns: true }, ')') => {
                self.raw(1)?;
                self.stack.push(Frame::Command { parens: 0, arm: true });
                self.command_position = true;
                return Ok(());
            }
            (Frame::Arith { parens, bracket }, '(') => self.set_frame(Frame::Arith { parens: parens + 1, bracket }),
            (Frame::Arith { parens: 0, bracket: false }, ')') if self.rest().starts_with("))") => {
                self.stack.pop();
                return self.raw(2);
            }
            (Frame::Arith { parens: 0, bracket: true }, ']') => {
                self.stack.pop();
            }
            (Frame::Arith { parens, bracket }, ')') => {
                self.set_frame(Frame::Arith { parens: parens.saturating_sub(1), bracket })
            }
            _ => {}
        }
        if code && matches!(c, ';' | '&' | '|' | '(' | ')' | '\n') {
            self.command_position = true;
            self.let_arguments = false;
        }
        self.raw(c.len_utf8())
    }

    /// Copies `len` bytes of the template to the output as they are.
    fn raw(&mut self, len: usize) -> Result<(), Refused> {
        let text = &self.text[self.pos..self.pos + len];
        self.pos += len;
        for c in text.chars() {
            self.prev = Some(c);
            self.emit(c)?;
            if c == '\n' {
                self.template_newline();
            }
        }
        Ok(())
    }

    /// One output character; a newline ends a here-document line and may start a body.
    fn emit(&mut self, c: char) -> Result<(), Refused> {
        if c != '\n' {
            self.out.push(c);
            return Ok(());
        }
        self.end_line()?;
        self.out.push('\n');
        if let Some(here) = self.here.as_mut() {
            here.line_start = self.out.len();
        }
        Ok(())
    }

    /// At `{`: a placeholder for a key is replaced (true); anything else is left to the caller.
    fn placeholder(&mut self, frame: Frame) -> Result<bool, Refused> {
        let offset = self.pos;
        let rest = self.rest();
        if self.prev == Some('$') {
            return Ok(false);
        }
        if let Some(inner) = rest.strip_prefix("{{")
            && let Some(end) = inner.find("}}")
            && self.params.iter().any(|(k, _)| k == &inner[..end])
        {
            let literal = &rest[1..end + 3];
            self.out.push_str(literal);
            self.pos += end + 4;
            self.prev = Some('}');
            return Ok(true);
        }
        let Some(end) = rest.find('}') else { return Ok(false) };
        let key = &rest[1..end];
        let Some((key, value)) = self.params.iter().find(|(k, _)| k == key) else {
            if is_identifier(key) && self.prev != Some('{') {
                self.unknown.push(Unknown { offset, name: key.to_string() });
            }
            return Ok(false);
        };
        let refuse = |reason: String| Refused { offset, key: key.clone(), reason };
        let quoted_here = self.here.as_ref().is_some_and(|h| h.doc.quoted);
        let evaluated = match frame {
            Frame::Arith { .. } => true,
            Frame::Command { .. } | Frame::Case { .. } | Frame::Double => {
                self.let_arguments || subscript(&self.text[..offset]) || compared(self.text, offset, end + 1)
            }
            Frame::Param { .. } => subscript(&self.text[..offset]) || substring_bound(&self.text[..offset]),
            _ => false,
        };
        let written: Cow<str> = match frame {
            _ if evaluated => {
                self.sensitive = true;
                let digits = value.strip_prefix(['+', '-']).unwrap_or(value);
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(refuse(format!(
                        "{value:?} is not a whole number, and the shell evaluates what stands here as \
                         arithmetic ($(( )), (( )), $[ ], let, an array subscript, ${{x:offset}}, \
                         -eq and the like), where bash runs `a[$(command)]`: only whole numbers can be \
                         substituted there"
                    )));
                }
                if digits.len() < value.len() {
                    Cow::Owned(format!("({value})"))
                } else {
                    Cow::Borrowed(value.as_str())
                }
            }
            Frame::AnsiC => {
                return Err(refuse(
                    "inside $'…' backslashes are read differently by bash and other shells, so no \
                     writing of a value is exact everywhere: use '…' or \"…\""
                        .to_string(),
                ));
            }
            Frame::Command { .. } | Frame::Case { .. } | Frame::Param { quoted: false } => shell_quote(value),
            // Close the quote, add an escaped quote, reopen: 'it'\''s'.
            Frame::Single => Cow::Owned(value.replace('\'', r"'\''")),
            Frame::Double => Cow::Owned(escape(value, DOUBLE_SPECIAL)),
            Frame::Param { quoted: true } => Cow::Owned(escape(value, QUOTED_PARAM_SPECIAL)),
            Frame::HereBody if quoted_here => Cow::Borrowed(value.as_str()),
            Frame::HereBody => Cow::Owned(escape(value, HERE_SPECIAL)),
            Frame::Arith { .. } => Cow::Borrowed(value.as_str()),
        };
        self.pos += end + 1;
        self.prev = Some('}');
        if self.here.is_some() {
            self.sensitive = true;
            let guardable = frame == Frame::HereBody && !quoted_here;
            return self.emit_value(&written, guardable, offset, key).map(|()| true);
        }
        self.out.push_str(&written);
        Ok(true)
    }

    /// A value in a here-document body, line by line, so every line it touches is checked.
    fn emit_value(&mut self, text: &str, guardable: bool, offset: usize, key: &str) -> Result<(), Refused> {
        for (i, part) in text.split('\n').enumerate() {
            if i > 0 {
                self.emit('\n')?;
            }
            if let Some(here) = self.here.as_mut()
                && here.value.is_none()
            {
                here.value = Some(LineValue { at: self.out.len(), guardable, offset, key: key.to_string() });
            }
            self.out.push_str(part);
        }
        Ok(())
    }

    /// `case` starts patterns and `esac` ends them, where they are keywords.
    fn keyword(&mut self, frame: Frame) -> Result<bool, Refused> {
        let rest = self.rest();
        let word_len = rest.find(|c: char| " \t\n;&|()<>'\"`$\\".contains(c)).unwrap_or(rest.len());
        let word = &rest[..word_len];
        if word.is_empty() {
            return Ok(false);
        }
        let at_command = self.command_position;
        self.command_position = at_command && BEFORE_COMMAND.contains(&word);
        match (frame, word) {
            (Frame::Command { .. }, "case") if at_command => self.stack.push(Frame::Case { patterns: false }),
            (Frame::Command { .. }, "let") if at_command => {
                self.let_arguments = true;
                return Ok(false);
            }
            (Frame::Case { patterns: false }, "in") => self.set_frame(Frame::Case { patterns: true }),
            (Frame::Case { patterns: true }, "esac") => {
                self.stack.pop();
            }
            (Frame::Command { parens: 0, arm: true }, "esac") if at_command => {
                self.stack.pop();
                self.stack.pop();
            }
            _ => return Ok(false),
        }
        self.raw(word_len)?;
        Ok(true)
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
            substitute("awk '{print $1}' ${HOME} {lr} {other} find -exec {} + {seed}", &p).unwrap(),
            "awk '{print $1}' ${HOME} 0.1 {other} find -exec {} + 7"
        );
        assert_eq!(substitute("echo {{lr}} {lr}", &p).unwrap(), "echo {lr} 0.1");
        assert_eq!(substitute("echo {lr", &p).unwrap(), "echo {lr");
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
            let out = sh(&substitute(template, &p).unwrap());
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

    /// Values that would run code or end a construct early if written as they are.
    fn hostile_values(mark: &str) -> Vec<String> {
        vec![
            format!("$(touch {mark})"),
            format!("`touch {mark}`"),
            format!("1\ntouch {mark} #"),
            format!("x\nEOF\ntouch {mark}\ncat <<EOF"),
            "EOF".into(),
            "E".into(),
            "\tEOF".into(),
            "}".into(),
            "a}b}".into(),
            "it's \"quoted\"".into(),
            "back\\slash\\".into(),
            "two\nlines".into(),
            "\tlead\n\ttabs".into(),
            "*".into(),
            String::new(),
        ]
    }

    /// Every shell context a placeholder can stand in, with `sh` and (where present) bash as sh:
    /// the value comes back byte for byte, or the command is refused; nothing in it ever runs.
    #[test]
    fn values_arrive_exactly_or_are_refused_in_every_context() {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("pwned");
        let mark = mark.to_str().unwrap();
        // (template, what the shell prints around the value, refused in a quoted here-document?)
        let contexts: &[(&str, &str, &str)] = &[
            ("cat <<EOF\n{v}\nEOF", "", "\n"),
            ("cat <<EOF\nlr = {v};\nEOF\necho after", "lr = ", ";\nafter\n"),
            ("cat <<EOF\n{v}OF\nEOF", "", "OF\n"),
            ("cat <<-EOF\n\t{v}\n\tEOF", "", "\n"),
            ("cat <<EOF; cat <<\"END\"\n{v}\nEOF\nfixed\nEND", "", "\nfixed\n"),
            ("cat <<'EOF'\n{v}\nEOF", "", "\n"),
            ("cat <<-'EOF'\n\t{v}\n\tEOF", "", "\n"),
            ("cat <<\\EOF\nx {v} $HOME\nEOF", "x ", " $HOME\n"),
            ("printf '%s' ok # seed {v}", "ok", ""),
            ("printf '%s' {v}  # seed {v}", "", ""),
            ("printf '%s' ${DLAUNCH_TEST_UNSET:-{v}}", "", ""),
            ("printf '%s' \"${DLAUNCH_TEST_UNSET:-{v}}\"", "", ""),
            ("printf '%s' \"${DLAUNCH_TEST_UNSET:-pre{v}post}\"", "pre", "post"),
            ("X=1; printf '%s' \"${X:+{v}}\"", "", ""),
            ("case {v} in {v}) printf '%s' {v};; *) echo no;; esac", "", ""),
            ("printf '%s' \"$(case x in x) printf '%s' {v};; esac)\"", "", ""),
            ("printf '%s' \"$(case x in (x) printf '%s' \"{v}\";; esac; printf ')')\"", "", ")"),
            ("cat <<EOF\n$(printf '%s' {v})\nEOF", "", "\n"),
        ];
        for (template, before, after) in contexts {
            for value in hostile_values(mark) {
                let p = params(&[("v", &value)]);
                let command = match substitute(template, &p) {
                    Ok(command) => command,
                    Err(refused) => {
                        // Only where no quoting can help: text passed as is, or nested quotes.
                        let literal = ["<<'", "<<-'", "<<\\", "$(printf"].iter().any(|c| template.contains(c));
                        let breaks_lines = value.contains("EOF") || value.contains('\n') || value.starts_with('\t');
                        assert!(literal && breaks_lines, "{template:?} refused {value:?}: {refused}");
                        assert_eq!(refused.offset, template.find("{v}").unwrap());
                        continue;
                    }
                };
                let expected = if template.contains("ok # seed") {
                    format!("{before}{after}")
                } else {
                    format!("{before}{value}{after}")
                };
                // dlaunch runs `/bin/sh -c`; bash started as `sh` is in POSIX mode, as on
                // systems where /bin/sh is bash.
                for shell in ["sh", "bash"] {
                    let mut run = std::process::Command::new(shell);
                    std::os::unix::process::CommandExt::arg0(&mut run, "sh");
                    let Ok(out) = run.arg("-c").arg(&command).output() else { continue };
                    assert_eq!(
                        String::from_utf8_lossy(&out.stdout),
                        expected,
                        "{shell}: {template:?} with {value:?} ran {command:?}\n{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    assert!(!std::path::Path::new(mark).exists(), "{shell} ran code from {value:?} in {command:?}");
                }
            }
        }
    }

    #[test]
    fn arithmetic_takes_whole_numbers_only() {
        for (value, expected) in [("41", "42\n"), ("-5", "-4\n"), ("+2", "3\n")] {
            let command = substitute("echo $(( {n} + 1 ))", &params(&[("n", value)])).unwrap();
            assert_eq!(sh(&command), expected, "{command}");
        }
        for value in ["1+1", "x", "a[$(touch /tmp/x)]", "", "1.5"] {
            let refused = substitute("echo $(( {n} + 1 ))", &params(&[("n", value)])).unwrap_err();
            assert_eq!((refused.offset, refused.key.as_str()), (9, "n"));
            assert!(refused.reason.contains("whole number"), "{refused}");
        }
    }

    /// bash evaluates these spots as arithmetic, and arithmetic runs the command in a subscript
    /// such as `a[$(touch x)]`, quotes or not: only whole numbers may go there.
    #[test]
    fn spots_bash_evaluates_as_arithmetic_take_whole_numbers_only() {
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("pwned");
        let evil = format!("a[$(touch {})]", mark.display());
        for (template, expected) in [
            ("echo $[ {n} + 1 ]", "42\n"),
            ("(( x = {n} + 1 )); echo $x", "42\n"),
            ("let x={n}+1 y=1; echo $x", "42\n"),
            ("a=(0 1 2 3); echo ${a[{n} - 40]}", "1\n"),
            ("a[{n}]=z; echo \"${a[41]}\"", "z\n"),
            ("x=abcdef; echo ${x:{n}-40:2}", "bc\n"),
            ("[[ {n} -eq 41 ]] && echo yes", "yes\n"),
            ("[[ 41 -le \"{n}\" ]] && echo yes", "yes\n"),
        ] {
            let command = substitute(template, &params(&[("n", "41")])).unwrap();
            let out = std::process::Command::new("bash").arg("-c").arg(&command).output().unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), expected, "{command}");
            let refused = substitute(template, &params(&[("n", &evil)])).unwrap_err();
            assert!(refused.reason.contains("whole number"), "{template}: {refused}");
        }
        // Where bash does not evaluate, such a value is just text.
        for template in ["echo {n} -x", "echo ${x:-{n}}", "echo \"[{n}]\""] {
            let command = substitute(template, &params(&[("n", &evil)])).unwrap();
            let out = std::process::Command::new("bash").arg("-c").arg(&command).output().unwrap();
            assert!(String::from_utf8_lossy(&out.stdout).contains(&evil), "{command}");
        }
        assert!(!mark.exists());
        let refused = substitute("echo $'{n}'", &params(&[("n", "x")])).unwrap_err();
        assert!(refused.reason.contains("$'…'"), "{refused}");
    }

    #[test]
    fn a_placeholder_cannot_be_a_here_document_delimiter() {
        let refused = substitute("cat <<{v}\nx\n{v}\n", &params(&[("v", "EOF")])).unwrap_err();
        assert_eq!(refused.offset, 6);
        assert!(refused.reason.contains("delimiter"), "{refused}");
    }

    #[test]
    fn values_in_quoted_here_documents_say_why_they_are_refused() {
        let refused = substitute("cat <<'EOF'\n{v}\nEOF", &params(&[("v", "a\nEOF")])).unwrap_err();
        assert!(refused.reason.contains("end the here-document early"), "{refused}");
        assert!(refused.reason.contains("DLAUNCH_PARAM_"), "{refused}");
        let refused = substitute("cat <<-'EOF'\n\t{v}\n\tEOF", &params(&[("v", "\tx")])).unwrap_err();
        assert!(refused.reason.contains("leading tabs"), "{refused}");
    }

    #[test]
    fn unknown_placeholders_are_found_and_shell_braces_are_not() {
        let command = "echo {learning_rate} ${HOME} {{lr}} {lr} awk '{print $1}' find -exec {} + {1..3} \
                       python -c \"print(f'{x}')\" # {comment}";
        let scan = scan(command, &params(&[("lr", "0.1")])).unwrap();
        let names: Vec<&str> = scan.unknown.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["learning_rate", "x"]);
        assert_eq!(scan.unknown[0].offset, 5);
        assert!(!scan.value_sensitive);
        assert!(super::scan("cat <<EOF\n{lr}\nEOF", &params(&[("lr", "1")])).unwrap().value_sensitive);
    }
}
