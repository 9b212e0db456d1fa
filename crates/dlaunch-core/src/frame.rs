//! Framed logs (`[job] logs = "framed"`): every task's stdout and stderr appended as records to
//! one file per worker rank, so that a task costs the filesystem no log files of its own.
//!
//! A record is a fixed header, the task id and the bytes, all lengths stated up front:
//!
//! ```text
//! offset size
//!      0    4  magic and version: "DLF1"
//!      4    1  stream: 1 stdout, 2 stderr
//!      5    4  attempt             (u32, little-endian)
//!      9    4  process in the task (u32, little-endian; 0 for a single-process task)
//!     13    4  task id length      (u32, little-endian)
//!     17    4  data length         (u32, little-endian)
//!     21    …  task id (UTF-8), then the data (any bytes)
//! ```
//!
//! A writer appends each record with one write under a lock, so a file is whole records,
//! except after a crash: its last record may be cut short. A reader then stops at the last
//! whole record and says so ([`Next::Incomplete`]); a follower waits for it to be completed.
//! A later format gets a new magic, which a reader of this one refuses instead of misreading.

pub const MAGIC: [u8; 4] = *b"DLF1";

/// Bytes before the task id.
pub const HEADER: usize = 21;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn code(self) -> u8 {
        match self {
            Stream::Stdout => 1,
            Stream::Stderr => 2,
        }
    }

    fn from_code(code: u8) -> Option<Stream> {
        match code {
            1 => Some(Stream::Stdout),
            2 => Some(Stream::Stderr),
            _ => None,
        }
    }
}

/// Whose output a record holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub task: String,
    pub attempt: u32,
    pub process: u32,
    pub stream: Stream,
}

/// One decoded record, borrowing from the buffer.
#[derive(Debug, PartialEq, Eq)]
pub struct Record<'a> {
    pub task: &'a str,
    pub attempt: u32,
    pub process: u32,
    pub stream: Stream,
    pub data: &'a [u8],
}

impl Record<'_> {
    pub fn is_from(&self, origin: &Origin) -> bool {
        self.task == origin.task
            && self.attempt == origin.attempt
            && self.process == origin.process
            && self.stream == origin.stream
    }
}

/// A record's data is at most this long: a writer splits longer output into several records.
pub const MAX_DATA: usize = u32::MAX as usize;

/// The record holding `parts` (written one after the other) as `origin`'s output. Data over
/// [`MAX_DATA`] is the caller's to split (the relay writes at most a buffer at a time).
pub fn encode(origin: &Origin, parts: &[&[u8]]) -> Vec<u8> {
    let data: usize = parts.iter().map(|p| p.len()).sum();
    let mut record = Vec::with_capacity(HEADER + origin.task.len() + data);
    record.extend_from_slice(&MAGIC);
    record.push(origin.stream.code());
    record.extend_from_slice(&origin.attempt.to_le_bytes());
    record.extend_from_slice(&origin.process.to_le_bytes());
    record.extend_from_slice(&(origin.task.len() as u32).to_le_bytes());
    record.extend_from_slice(&(data as u32).to_le_bytes());
    record.extend_from_slice(origin.task.as_bytes());
    parts.iter().for_each(|p| record.extend_from_slice(p));
    record
}

/// What the start of a buffer holds.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<'a> {
    /// A whole record, `len` bytes long.
    Record { record: Record<'a>, len: usize },
    /// Nothing: the buffer is empty.
    End,
    /// The start of a record whose rest is missing (still being written, or cut by a crash).
    Incomplete,
    /// Not a record of this format: reading cannot go on past it.
    Corrupt(String),
}

/// Decodes the record at the start of `buffer`.
pub fn next(buffer: &[u8]) -> Next<'_> {
    if buffer.is_empty() {
        return Next::End;
    }
    let magic_seen = buffer.len().min(MAGIC.len());
    if buffer[..magic_seen] != MAGIC[..magic_seen] {
        return Next::Corrupt(format!("no record starts here (expected {:?})", String::from_utf8_lossy(&MAGIC)));
    }
    if buffer.len() < HEADER {
        return Next::Incomplete;
    }
    let word = |at: usize| u32::from_le_bytes([buffer[at], buffer[at + 1], buffer[at + 2], buffer[at + 3]]);
    let Some(stream) = Stream::from_code(buffer[4]) else {
        return Next::Corrupt(format!("unknown stream code {}", buffer[4]));
    };
    let (attempt, process, id_len, data_len) = (word(5), word(9), word(13) as usize, word(17) as usize);
    let len = HEADER + id_len + data_len;
    if buffer.len() < len {
        return Next::Incomplete;
    }
    let Ok(task) = std::str::from_utf8(&buffer[HEADER..HEADER + id_len]) else {
        return Next::Corrupt("the task id is not UTF-8".into());
    };
    let data = &buffer[HEADER + id_len..len];
    Next::Record { record: Record { task, attempt, process, stream, data }, len }
}

/// Every whole record of `buffer` in order, and how reading ended: `End`, `Incomplete` or
/// `Corrupt`, with the offset of the first byte not read.
pub fn records(buffer: &[u8]) -> (Vec<Record<'_>>, Next<'_>, usize) {
    let mut found = Vec::new();
    let mut at = 0;
    loop {
        match next(&buffer[at..]) {
            Next::Record { record, len } => {
                found.push(record);
                at += len;
            }
            stop => return (found, stop, at),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(task: &str, attempt: u32, process: u32, stream: Stream) -> Origin {
        Origin { task: task.into(), attempt, process, stream }
    }

    #[test]
    fn records_read_back_as_written_whatever_their_bytes() {
        let binary: Vec<u8> = (0..=255).collect();
        let a = origin("t[lr=0.1]", 2, 0, Stream::Stderr);
        let b = origin("gang", 0, 7, Stream::Stdout);
        let mut file = encode(&a, &[b"hello ", &binary]);
        file.extend(encode(&b, &[]));
        file.extend(encode(&a, &[b"DLF1 inside the data"]));
        let (found, stop, read) = records(&file);
        assert_eq!((stop, read), (Next::End, file.len()));
        assert_eq!(found.len(), 3);
        assert!(found[0].is_from(&a) && found[1].is_from(&b) && found[2].is_from(&a));
        assert_eq!(found[0].data, [b"hello ".as_slice(), &binary].concat());
        assert_eq!(found[1].data, b"");
        assert_eq!(found[2].data, b"DLF1 inside the data");
        assert!(!found[0].is_from(&origin("t[lr=0.1]", 2, 0, Stream::Stdout)));
    }

    #[test]
    fn a_record_cut_anywhere_is_incomplete_and_the_whole_ones_before_it_stay() {
        let first = encode(&origin("a", 0, 0, Stream::Stdout), &[b"kept"]);
        let second = encode(&origin("b", 1, 0, Stream::Stdout), &[b"cut short"]);
        for cut in 1..second.len() {
            let file = [first.as_slice(), &second[..cut]].concat();
            let (found, stop, read) = records(&file);
            assert_eq!(found.len(), 1, "cut at {cut}");
            assert_eq!(found[0].data, b"kept");
            assert_eq!((stop, read), (Next::Incomplete, first.len()), "cut at {cut}");
        }
    }

    #[test]
    fn bytes_of_another_format_are_refused_not_misread() {
        let mut record = encode(&origin("a", 0, 0, Stream::Stdout), &[b"x"]);
        assert!(matches!(next(b"DLF2xxxxxxxxxxxxxxxxxxxxxxxx"), Next::Corrupt(_)));
        assert!(matches!(next(b"{\"journal\": 1}"), Next::Corrupt(_)));
        record[4] = 9;
        assert!(matches!(next(&record), Next::Corrupt(reason) if reason.contains("stream code 9")));
        let mut bad_id = encode(&origin("ab", 0, 0, Stream::Stdout), &[]);
        bad_id[HEADER] = 0xff;
        assert!(matches!(next(&bad_id), Next::Corrupt(_)));
        assert_eq!(next(b"DL"), Next::Incomplete);
    }
}
