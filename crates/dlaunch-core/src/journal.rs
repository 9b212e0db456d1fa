//! The journal's format: a header line naming the format and its version, then one JSON event
//! per line. The shell's `journal` owns the file; this decides what its bytes mean.
//!
//! Like HyperQueue's journal, a file written by a newer major version is refused rather than
//! half-read: resuming from events this dlaunch does not understand could rerun finished work.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::events::{Assigned, AttemptStatus, Event, ProcessResult};

/// Bumped on a change older readers would misread (a new major version), or that they can
/// safely ignore (a new minor version: new optional fields, new events they skip).
pub const VERSION: Version = Version { major: 1, minor: 0 };

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    /// Always "dlaunch": tells a journal from any other JSON-lines file.
    journal: String,
    version: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error(
        "written by a newer dlaunch (journal format {found}); this dlaunch reads format {}.x: \
         resume with that dlaunch, or start over with --fresh (the old results are kept aside)",
        VERSION.major
    )]
    NewerMajor { found: String },
    #[error("the first line is a journal header with an unreadable version {found:?}")]
    BadVersion { found: String },
}

/// The first line of every new journal.
pub fn header_line() -> Vec<u8> {
    let header = Header { journal: "dlaunch".into(), version: VERSION.to_string() };
    let mut line = serde_json::to_vec(&header).unwrap_or_default();
    line.push(b'\n');
    line
}

/// What a journal's bytes hold.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    pub events: Vec<Event>,
    /// Bytes of complete lines: what follows is a torn last line (dlaunch killed mid-write).
    pub good_len: usize,
    /// Line numbers (from 1) of complete lines that are no event this dlaunch knows, and the
    /// first such line's error: a newer minor version's events, or damage.
    pub unreadable: Vec<usize>,
    pub first_error: Option<String>,
    /// False for journals written before the header existed (read as format 1.0) and for an
    /// empty file: the shell writes a header only into an empty file.
    pub has_header: bool,
}

pub fn parse(text: &[u8]) -> Result<Parsed, FormatError> {
    let mut parsed = Parsed::default();
    let mut offset = 0;
    for (index, line) in text.split_inclusive(|&b| b == b'\n').enumerate() {
        offset += line.len();
        if !line.ends_with(b"\n") {
            break;
        }
        parsed.good_len = offset;
        if index == 0
            && let Ok(header) = serde_json::from_slice::<Header>(line)
        {
            check_version(&header.version)?;
            parsed.has_header = true;
            continue;
        }
        match event_of(line) {
            Ok(event) => parsed.events.push(event),
            Err(e) => {
                parsed.unreadable.push(index + 1);
                parsed.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    Ok(parsed)
}

/// One event line, as every reader reads it. The two events of every attempt, most lines of a
/// journal, are read straight into their fields: serde reads an internally tagged enum through
/// a copy of the whole line first, which was most of what rank 0 of the node layout spent on
/// each task. A line written otherwise (its tag not first) is read the general way.
pub fn event_of(line: &[u8]) -> Result<Event, serde_json::Error> {
    if line.starts_with(br#"{"event":"attempt_started","#) {
        let Started { task, attempt, time, processes } = serde_json::from_slice(line)?;
        return Ok(Event::AttemptStarted { task, attempt, time, processes });
    }
    if line.starts_with(br#"{"event":"attempt_ended","#) {
        let Ended { task, attempt, status, reason, retry, processes } = serde_json::from_slice(line)?;
        return Ok(Event::AttemptEnded { task, attempt, status, reason, retry, processes });
    }
    serde_json::from_slice(line)
}

/// `Event::AttemptStarted`'s fields, for `event_of` (its tag is left out as unknown).
#[derive(Deserialize)]
struct Started {
    task: String,
    attempt: u32,
    #[serde(with = "crate::events::time_format")]
    time: SystemTime,
    processes: Vec<Assigned>,
}

/// `Event::AttemptEnded`'s fields, for `event_of`.
#[derive(Deserialize)]
struct Ended {
    task: String,
    attempt: u32,
    status: AttemptStatus,
    reason: String,
    retry: bool,
    processes: Vec<ProcessResult>,
}

fn check_version(found: &str) -> Result<(), FormatError> {
    let major = found.split('.').next().and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(major) if major == VERSION.major => Ok(()),
        Some(major) if major > VERSION.major => Err(FormatError::NewerMajor { found: found.to_string() }),
        _ => Err(FormatError::BadVersion { found: found.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(event: &Event) -> String {
        format!("{}\n", serde_json::to_string(event).unwrap())
    }

    fn event(n: usize) -> Event {
        Event::TaskDefined { task: format!("t{n}"), digest: "d".into(), params: Default::default() }
    }

    #[test]
    fn attempts_read_straight_into_their_fields_read_as_the_general_way_does() {
        let started = crate::testing::started("t[x=1]", 3);
        let ended = crate::testing::ended("t[x=1]", 3, AttemptStatus::Failed, true);
        for event in [started, ended, event(7)] {
            let line = line(&event);
            assert_eq!(event_of(line.as_bytes()).unwrap(), event);
            assert_eq!(event_of(line.as_bytes()).unwrap(), serde_json::from_str::<Event>(&line).unwrap());
            // The tag later than first: read the general way, to the same event.
            let value: serde_json::Value = serde_json::from_str(&line).unwrap();
            let mut fields: Vec<(String, serde_json::Value)> = value.as_object().unwrap().clone().into_iter().collect();
            fields.rotate_left(1);
            let reordered = serde_json::to_string(&fields.into_iter().collect::<serde_json::Map<_, _>>()).unwrap();
            assert_eq!(event_of(reordered.as_bytes()).unwrap(), event);
        }
        assert!(event_of(br#"{"event":"attempt_ended","task":"t"}"#).is_err(), "missing fields are an error");
    }

    #[test]
    fn header_then_events_then_a_torn_tail() {
        let head = String::from_utf8(header_line()).unwrap();
        assert_eq!(head, "{\"journal\":\"dlaunch\",\"version\":\"1.0\"}\n");
        let good = format!("{head}{}{}", line(&event(1)), line(&event(2)));
        let text = format!("{good}{{\"event\":\"task_def");
        let parsed = parse(text.as_bytes()).unwrap();
        assert!(parsed.has_header);
        assert_eq!(parsed.events, [event(1), event(2)]);
        assert_eq!(parsed.good_len, good.len());
        assert!(parsed.unreadable.is_empty());
    }

    #[test]
    fn journals_from_before_the_header_read_as_version_one() {
        let text = format!("{}{}", line(&event(1)), line(&event(2)));
        let parsed = parse(text.as_bytes()).unwrap();
        assert!(!parsed.has_header);
        assert_eq!(parsed.events.len(), 2);
    }

    #[test]
    fn a_newer_major_version_is_refused_a_newer_minor_read() {
        let newer = "{\"journal\":\"dlaunch\",\"version\":\"2.0\"}\n";
        let e = parse(newer.as_bytes()).unwrap_err();
        assert_eq!(e, FormatError::NewerMajor { found: "2.0".into() });
        assert!(e.to_string().contains("--fresh"), "{e}");
        let minor = format!("{{\"journal\":\"dlaunch\",\"version\":\"1.7\"}}\n{}", line(&event(1)));
        assert_eq!(parse(minor.as_bytes()).unwrap().events, [event(1)]);
        let bad = "{\"journal\":\"dlaunch\",\"version\":\"one\"}\n";
        assert!(matches!(parse(bad.as_bytes()), Err(FormatError::BadVersion { .. })));
    }

    #[test]
    fn unreadable_lines_are_counted_and_named() {
        let text = format!(
            "{}{}not json\n{}{{\"event\":\"from_the_future\"}}\n",
            String::from_utf8(header_line()).unwrap(),
            line(&event(1)),
            line(&event(2))
        );
        let parsed = parse(text.as_bytes()).unwrap();
        assert_eq!(parsed.events, [event(1), event(2)]);
        assert_eq!(parsed.unreadable, [3, 5]);
        assert!(parsed.first_error.is_some());
        assert_eq!(parsed.good_len, text.len());
    }
}
