//! Standard output and error for people and scripts. A reader that stops early (`dlaunch check
//! | head`, `2>&1 | head`) ends the output quietly, like `cat` does, instead of a panic: Rust
//! ignores SIGPIPE, so the closed pipe shows up as an EPIPE error on the next write, and
//! `println!`/`eprintln!` panic on it.

use std::io::{self, Write};

/// Writes `text` to stdout and flushes it. A closed pipe is not an error: whoever closed it has
/// read all they wanted. Any other failure (a full disk behind `>`) is returned.
pub fn print(text: &str) -> io::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// A message for stderr, with a newline. Nobody is left to tell when stderr itself fails.
pub fn error(message: impl std::fmt::Display) {
    let _ = writeln!(io::stderr().lock(), "{message}");
}

/// `print` for commands whose output is their result: a failed write is reported, and the
/// command fails with `failed` rather than claiming a success nobody could read.
pub fn print_result(text: &str, code: i32, failed: i32) -> i32 {
    match print(text) {
        Ok(()) => code,
        Err(e) => {
            error(format_args!("dlaunch: cannot write to standard output: {e}"));
            failed
        }
    }
}
