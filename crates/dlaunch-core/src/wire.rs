//! What ranks say to each other. Plain data, serialized with serde; `transport` moves the bytes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::events::{AttemptKey, Ending};
use crate::returned::FileKey;
use crate::sched::Capacity;
use crate::spec::Resources;

/// Coordinator → worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Order {
    Launch(Box<Launch>),
    /// Start the processes of this attempt held after placement (`Launch::hold`), each seeing
    /// `visible`: the GPUs of all the attempt's processes on its host, in rank order.
    Start {
        key: AttemptKey,
        visible: Vec<String>,
    },
    /// Stop the processes of this attempt (its gang ended elsewhere).
    Stop {
        key: AttemptKey,
    },
    /// Hand back this prefetched order if it has not started (`Report::Returned`): another
    /// worker has room for it now. Started already: nothing to do, its start is on its way.
    Recall {
        key: AttemptKey,
    },
    /// Stop everything: dlaunch is shutting down early; report processes as interrupted.
    Interrupt,
    /// All done: exit.
    Exit,
    /// The coordinator is alive; sent only to a rank it had nothing else to send for a while.
    Heartbeat,
    /// The coordinator gave this worker up and runs its tasks elsewhere: kill them at once
    /// (another copy may already run) and report nothing more.
    GivenUp {
        reason: String,
    },
    /// Returned output: rank 0 wrote this many more of the worker's chunks (its credit back).
    Received {
        chunks: u32,
    },
    /// Returned output: a piece of a file an earlier attempt returned, to put back into the
    /// task's node-local directory before the Launch that follows (a checkpoint).
    Restore(Restore),
    /// What the orders of a template share, sent before the first Launch of that template a
    /// worker gets (in the same message or an earlier one); the worker keeps it for the run.
    Template(TemplateRecord),
}

/// The environment the processes of one template share, so that each `Launch` carries only
/// what differs (its `env` and `unset`). Made from the template's first order: the entries
/// all of its processes have with the same value. Which entries it holds only decides how
/// small later orders are, never what a process sees: an order overrides or unsets whatever
/// differs for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TemplateRecord {
    /// The template's index in the job.
    pub template: u32,
    /// Sorted by name, each name once.
    pub env: Vec<(String, String)>,
}

impl TemplateRecord {
    /// The entries shared by every one of `envs` (the full environments of the processes of
    /// one order).
    pub fn new<K: AsRef<str>, V: AsRef<str>>(template: u32, envs: &[Vec<(K, V)>]) -> Self {
        let mut shared = effective(envs.first().map_or(&[][..], Vec::as_slice));
        for env in envs.iter().skip(1) {
            let other = effective(env);
            shared.retain(|k, v| other.get(k) == Some(v));
        }
        let env = shared.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        TemplateRecord { template, env }
    }

    /// What an order carries for a process whose full environment is `full`, sorted by name
    /// stably (of a name given twice, the entry that counts is the last of its name): the
    /// entries that differ from the record, and the record's names `full` lacks. Walked beside
    /// the record (rank 0 does this for every process it starts); only the entries that differ
    /// are turned into owned strings, so `full` may lend the rest.
    pub fn split<K, V>(&self, full: impl IntoIterator<Item = (K, V)>) -> (Vec<(String, String)>, Vec<String>)
    where
        K: AsRef<str> + Into<String>,
        V: AsRef<str> + Into<String>,
    {
        let (mut env, mut unset) = (Vec::new(), Vec::new());
        let mut shared = self.env.iter().peekable();
        let mut entries = full.into_iter().peekable();
        while let Some((name, value)) = entries.next() {
            let next = entries.peek().map(|(next, _)| next.as_ref());
            debug_assert!(next >= Some(name.as_ref()) || next.is_none(), "sorted by name");
            if next == Some(name.as_ref()) {
                continue;
            }
            while let Some((lacking, _)) = shared.next_if(|(k, _)| k.as_str() < name.as_ref()) {
                unset.push(lacking.clone());
            }
            match shared.next_if(|(k, _)| k.as_str() == name.as_ref()) {
                Some((_, same)) if same.as_str() == value.as_ref() => {}
                _ => env.push((name.into(), value.into())),
            }
        }
        unset.extend(shared.map(|(lacking, _)| lacking.clone()));
        (env, unset)
    }

    /// The full environment of an order that carries `env` and `unset`: the record less what
    /// it unsets, then its own entries over it. Sorted by name, each name once.
    pub fn merge(&self, env: &[(String, String)], unset: &[String]) -> Vec<(String, String)> {
        let mut merged: BTreeMap<&str, &str> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        for name in unset {
            merged.remove(name.as_str());
        }
        merged.extend(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        merged.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }
}

/// An environment as a process gets it: a later entry of a name replaces an earlier one.
pub fn effective<K: AsRef<str>, V: AsRef<str>>(env: &[(K, V)]) -> BTreeMap<&str, &str> {
    env.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Restore {
    pub task_id: String,
    /// Relative to `DLAUNCH_TASK_DIR`.
    pub path: String,
    pub offset: u64,
    /// Travels after the batch's JSON, not in it (`encode`).
    #[serde(skip)]
    pub bytes: Vec<u8>,
    pub last: bool,
}

/// Start one process of a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    pub key: AttemptKey,
    /// The template whose record (`Order::Template`) `env` and `unset` complete.
    pub template: u32,
    pub task_id: String,
    pub process: u32,
    pub command: String,
    pub workdir: PathBuf,
    /// The job's and task's env and the contract variables, as far as they differ from the
    /// template's record (the worker merges them: `TemplateRecord::merge`); the worker adds
    /// placement.
    pub env: Vec<(String, String)>,
    /// Variables of the template's record this process does not get.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unset: Vec<String>,
    pub resources: Resources,
    pub timeout: Option<Duration>,
    /// Where stdout and stderr go.
    pub log_dir: PathBuf,
    /// Datasets the task needs; the worker knows where they are staged on its node.
    pub datasets: Vec<String>,
    /// The ports reserved for this process on its host: `DLAUNCH_PORT` (process 0's is
    /// `MASTER_PORT`), then one per label of its role (`DLAUNCH_PORT_<LABEL>`). The worker
    /// checks that no other program listens on any of them first.
    pub ports: Vec<u16>,
    /// Processes of this attempt on this worker that see each other's GPUs, this one among
    /// them, in rank order (`gpu_visibility = "task"`); the worker starts them once it has all
    /// their orders. Empty: the process sees its own GPUs only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_mates: Vec<u32>,
    /// Processes of this attempt on other worker ranks of this host share GPUs with this one:
    /// place it, report `Placed`, and start it only on `Start`, which brings the GPUs of all.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hold: bool,
    /// Declared outputs (patterns relative to `DLAUNCH_TASK_DIR`), sent back by process 0 in
    /// returned mode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<String>,
    /// Sent ahead of room (`[job] prefetch`): the worker holds it, in order with the others it
    /// holds, until a process of its own ends and frees room, starts it then without waiting
    /// for rank 0, and says so (`Report::Started`). Until then the task is not running.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prefetched: bool,
}

/// Worker → coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Report {
    Hello(WorkerHello),
    Ended(ProcessEnd),
    /// Processes of an attempt held after placement (`Launch::hold`), with their GPU ids.
    Placed {
        key: AttemptKey,
        gpus: Vec<(u32, Vec<String>)>,
    },
    /// A prefetched order (`Launch::prefetched`) started at `time`: its attempt runs from now.
    Started {
        key: AttemptKey,
        time: SystemTime,
    },
    /// A prefetched order given back unstarted (dispatching stopped, or it was cancelled).
    Returned {
        key: AttemptKey,
    },
    /// The worker received a stop signal (srun and mpirun forward them to every rank).
    Stopping {
        signal: String,
    },
    Heartbeat,
    /// Returned output: a piece of a log or an output (see `returned`).
    Chunk(Chunk),
    /// Returned output: the declared outputs of an ended process that follow as chunks, named
    /// as in `Chunk::file`; sent first, so that rank 0 knows what a lost rank did not send.
    Outputs {
        key: AttemptKey,
        process: u32,
        files: Vec<String>,
    },
    /// Returned output: a declared output that is not sent back, and why.
    OutputRefused {
        file: FileKey,
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub file: FileKey,
    pub offset: u64,
    /// Travels after the batch's JSON, not in it (`encode`).
    #[serde(skip)]
    pub bytes: Vec<u8>,
    /// On the last chunk: the blake3 digest of the whole output as the worker read it; empty
    /// for a log.
    pub last: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerHello {
    pub host: String,
    /// An address other nodes reach this worker's host at.
    pub addr: String,
    pub capacity: Capacity,
    /// For the log: "8 CPUs (0-7), 2 GPUs (0,1), 64 GiB".
    pub description: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessEnd {
    pub key: AttemptKey,
    pub process: u32,
    pub cpus: String,
    pub gpus: Vec<String>,
    pub ending: Ending,
    pub start: Option<SystemTime>,
    pub end: SystemTime,
}

/// Rank 0 → a node's leader (`layout = "nodes"`). A leader is the coordinator of its node's
/// workers (`Order`, `Report`); rank 0 speaks only to leaders.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Down {
    /// The run's first word to the leader, after every leader said hello: when the allocation
    /// ends (tasks that cannot finish by then are not started).
    Start { deadline: Option<SystemTime> },
    /// Run these tasks, in this order, after what the leader holds. `lease` numbers the
    /// leases a leader got, from 1: its `Up::Batch` says which it has taken in.
    Lease { lease: u32, tasks: Vec<Leased> },
    /// Cancel these tasks (`dlaunch cancel`), where the leader has them.
    Cancel { tasks: Vec<String> },
    /// Stop dispatching and interrupt what runs (a signal, the walltime, a failure).
    Stop { reason: String },
    /// Rank 0 is alive; sent only to a leader it had nothing else to send for a while.
    Heartbeat,
    /// All done: dismiss the node's workers and exit.
    Exit,
}

/// One task of a lease: its index in the job's tasks and the number its first attempt takes
/// (attempts are numbered across runs, and rank 0 holds the journal).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leased {
    pub task: u32,
    pub attempt: u32,
}

/// A node's leader → rank 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Up {
    /// The node's workers, each with its hello, once all of them said it.
    Hello { workers: Vec<(u32, WorkerHello)> },
    /// What the node did since its last batch, and what it wants.
    Batch(Batch),
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// Journal lines of the node's events, each as the journal writes it (JSON and a newline):
    /// rank 0 appends them as they are. Travels after the batch's JSON, not in it (`encode`).
    #[serde(skip)]
    pub lines: Vec<u8>,
    /// How many more tasks the node would take now.
    pub want: u32,
    /// The last lease (`Down::Lease::lease`) the node has taken in.
    pub leases: u32,
    /// Nothing runs on the node and nothing it holds can start (it holds nothing, it stopped,
    /// or what it holds cannot finish in the time left).
    pub idle: bool,
    /// Tasks leased to the node that it can no longer run (it lost the workers they need),
    /// by index: rank 0 queues them again for other nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handed_back: Vec<u32>,
    /// Templates whose tasks came to need more than the time left, by the node's clock: rank 0
    /// leases no more of them (its own clock may be behind).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub late: Vec<u32>,
    /// Why the node stopped dispatching on its own (a stop signal reached its ranks), once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopping: Option<String>,
}

/// A message that may carry file bytes (returned output's chunks and restored pieces).
pub trait Payload {
    fn payload(&self) -> Option<&[u8]>;
    fn payload_mut(&mut self) -> Option<&mut Vec<u8>>;
}

impl Payload for Order {
    fn payload(&self) -> Option<&[u8]> {
        match self {
            Order::Restore(piece) => Some(&piece.bytes),
            _ => None,
        }
    }

    fn payload_mut(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            Order::Restore(piece) => Some(&mut piece.bytes),
            _ => None,
        }
    }
}

impl Payload for Report {
    fn payload(&self) -> Option<&[u8]> {
        match self {
            Report::Chunk(chunk) => Some(&chunk.bytes),
            _ => None,
        }
    }

    fn payload_mut(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            Report::Chunk(chunk) => Some(&mut chunk.bytes),
            _ => None,
        }
    }
}

impl Payload for Down {
    fn payload(&self) -> Option<&[u8]> {
        None
    }

    fn payload_mut(&mut self) -> Option<&mut Vec<u8>> {
        None
    }
}

impl Payload for Up {
    fn payload(&self) -> Option<&[u8]> {
        match self {
            Up::Batch(batch) => Some(&batch.lines),
            Up::Hello { .. } => None,
        }
    }

    fn payload_mut(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            Up::Batch(batch) => Some(&mut batch.lines),
            Up::Hello { .. } => None,
        }
    }
}

/// First byte of a batch whose file bytes follow its JSON; JSON never starts with it.
const FRAMED: u8 = 0;

/// Why a message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("a framed message ends {0} bytes short of what its header announces")]
    Truncated(usize),
    #[error("a framed message carries {extra} bytes after its {count} payloads")]
    Trailing { extra: usize, count: usize },
}

/// Messages travel in batches: one MPI message per rank and loop turn, however many orders.
/// A batch without file bytes is plain JSON. One with file bytes is framed: `FRAMED`, the
/// JSON's length (u32, little-endian), the JSON (payloads left out), then each payload of the
/// batch, in order, as its length (u32) and its bytes. Bytes in JSON (base64 in a string) cost
/// rank 0 most of its time while chunks streamed.
pub fn encode<T: Serialize + Payload>(batch: &[T]) -> Vec<u8> {
    let json = serde_json::to_vec(batch).unwrap_or_default();
    let payloads: Vec<&[u8]> = batch.iter().filter_map(Payload::payload).collect();
    if payloads.iter().all(|p| p.is_empty()) {
        return json;
    }
    let size = 5 + json.len() + payloads.iter().map(|p| 4 + p.len()).sum::<usize>();
    let mut frame = Vec::with_capacity(size);
    frame.push(FRAMED);
    frame.extend_from_slice(&(json.len() as u32).to_le_bytes());
    frame.extend_from_slice(&json);
    for payload in payloads {
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(payload);
    }
    frame
}

pub fn decode<T: for<'de> Deserialize<'de> + Payload>(bytes: &[u8]) -> Result<Vec<T>, WireError> {
    let Some((&FRAMED, rest)) = bytes.split_first() else { return Ok(serde_json::from_slice(bytes)?) };
    let (json, mut rest) = take_sized(rest)?;
    let mut batch: Vec<T> = serde_json::from_slice(json)?;
    let mut count = 0;
    for slot in batch.iter_mut().filter_map(Payload::payload_mut) {
        let (payload, after) = take_sized(rest)?;
        *slot = payload.to_vec();
        rest = after;
        count += 1;
    }
    if !rest.is_empty() {
        return Err(WireError::Trailing { extra: rest.len(), count });
    }
    Ok(batch)
}

/// A length (u32, little-endian) and that many bytes; what follows.
fn take_sized(bytes: &[u8]) -> Result<(&[u8], &[u8]), WireError> {
    let (len, rest) = bytes.split_first_chunk::<4>().ok_or_else(|| WireError::Truncated(4 - bytes.len()))?;
    let len = u32::from_le_bytes(*len) as usize;
    if rest.len() < len {
        return Err(WireError::Truncated(len - rest.len()));
    }
    Ok(rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_bytes_travel_after_the_json_and_other_batches_stay_plain_json() {
        let chunk = |bytes: Vec<u8>| {
            Report::Chunk(Chunk {
                file: FileKey { key: AttemptKey { task: 1, attempt: 0 }, process: 0, name: "stdout".into() },
                offset: 7,
                bytes,
                last: None,
            })
        };
        let batch = vec![chunk((0..=255).collect()), Report::Heartbeat, chunk(Vec::new()), chunk(b"\"x".to_vec())];
        let framed = encode(&batch);
        assert_eq!(framed[0], FRAMED);
        let headers = serde_json::to_vec(&batch).unwrap();
        assert_eq!(framed.len(), 1 + 4 + headers.len() + 3 * 4 + 256 + 2, "the bytes as they are, beside the JSON");
        assert_eq!(decode::<Report>(&framed).unwrap(), batch);
        let plain = vec![chunk(Vec::new()), Report::Heartbeat];
        assert_eq!(encode(&plain)[0], b'[', "nothing to frame");
        assert_eq!(decode::<Report>(&encode(&plain)).unwrap(), plain);
        for cut in [1, 3, 10, framed.len() - 1] {
            assert!(decode::<Report>(&framed[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = framed.clone();
        longer.push(0);
        assert!(matches!(decode::<Report>(&longer), Err(WireError::Trailing { extra: 1, count: 3 })));
    }

    #[test]
    fn batches_round_trip() {
        let orders = vec![
            Order::Launch(Box::new(Launch {
                key: AttemptKey { task: 3, attempt: 1 },
                template: 2,
                task_id: "t[a=1]".into(),
                process: 0,
                command: "echo 'hi'".into(),
                workdir: "/tmp".into(),
                env: vec![("A".into(), "1".into())],
                unset: vec!["B".into()],
                resources: Resources { cpus: 2, gpus: 1, memory: 5 },
                timeout: Some(Duration::from_millis(1500)),
                log_dir: "/tmp/x".into(),
                datasets: vec!["d".into()],
                ports: vec![29500, 29501],
                gpu_mates: vec![],
                hold: true,
                outputs: vec!["ckpt/*.pt".into()],
                prefetched: true,
            })),
            Order::Start { key: AttemptKey { task: 3, attempt: 1 }, visible: vec!["4".into(), "5".into()] },
            Order::Stop { key: AttemptKey { task: 1, attempt: 0 } },
            Order::Recall { key: AttemptKey { task: 2, attempt: 0 } },
            Order::Exit,
            Order::Heartbeat,
            Order::GivenUp { reason: "no heartbeat for 5m".into() },
            Order::Received { chunks: 3 },
            Order::Restore(Restore {
                task_id: "t".into(),
                path: "ckpt/a".into(),
                offset: 0,
                bytes: vec![1],
                last: true,
            }),
            Order::Template(TemplateRecord { template: 2, env: vec![("B".into(), "2".into())] }),
        ];
        assert_eq!(decode::<Order>(&encode(&orders)).unwrap(), orders);
        assert!(decode::<Order>(b"garbage").is_err());
        let key = AttemptKey { task: 3, attempt: 1 };
        let reports = vec![
            Report::Started { key, time: SystemTime::UNIX_EPOCH + Duration::from_millis(1500) },
            Report::Returned { key },
        ];
        assert_eq!(decode::<Report>(&encode(&reports)).unwrap(), reports);
    }

    #[test]
    fn an_order_not_sent_ahead_costs_no_byte_for_saying_so() {
        let Order::Launch(launch) = &decode::<Order>(br#"[{"Launch":{"key":{"task":0,"attempt":0},"template":0,"task_id":"t","process":0,"command":"true","workdir":"/","env":[],"resources":{"cpus":0,"gpus":0,"memory":0},"timeout":null,"log_dir":"/l","datasets":[],"ports":[]}}]"#).unwrap()[0] else {
            panic!("a Launch");
        };
        assert!(!launch.prefetched, "absent means not sent ahead");
        let text = String::from_utf8(encode(&[Order::Launch(launch.clone())])).unwrap();
        assert!(!text.contains("prefetched"), "{text}");
        let ahead = Order::Launch(Box::new(Launch { prefetched: true, ..(**launch).clone() }));
        assert!(String::from_utf8(encode(&[ahead])).unwrap().contains(r#""prefetched":true"#));
    }

    fn pairs(entries: &[(&str, &str)]) -> Vec<(String, String)> {
        entries.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    /// `full` sorted by name, stably, as `split` takes it.
    fn sorted(mut full: Vec<(String, String)>) -> Vec<(String, String)> {
        full.sort_by(|a, b| a.0.cmp(&b.0));
        full
    }

    #[test]
    fn a_record_plus_what_an_order_carries_is_the_environment_it_replaces() {
        let first = [
            pairs(&[("JOB", "j"), ("RANK", "0"), ("OMP", "4"), ("ROLE_ENV", "a")]),
            pairs(&[("JOB", "j"), ("RANK", "1"), ("OMP", "4")]),
        ];
        let record = TemplateRecord::new(5, &first);
        assert_eq!(record.env, pairs(&[("JOB", "j"), ("OMP", "4")]), "only what every process has alike");
        // Later orders may differ anywhere: other values, names the record lacks, names it has
        // that they lack, a name given twice (the later one counts, as for a process).
        let later = [
            pairs(&[("JOB", "j"), ("RANK", "7"), ("OMP", "4")]),
            pairs(&[("RANK", "2"), ("OMP", "8"), ("NEW", "x")]),
            pairs(&[("OMP", "1"), ("JOB", "j"), ("OMP", "4"), ("JOB", "k")]),
            pairs(&[]),
        ];
        for full in first.iter().chain(&later) {
            let (env, unset) = record.split(sorted(full.clone()));
            let merged = record.merge(&env, &unset);
            let expected: Vec<(String, String)> =
                effective(full).into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            assert_eq!(merged, expected, "{full:?}");
            assert!(env.iter().all(|entry| !record.env.contains(entry)), "nothing the record has: {env:?}");
        }
        assert_eq!(record.split(sorted(later[0].clone())), (pairs(&[("RANK", "7")]), vec![]));
        assert_eq!(
            record.split(sorted(later[1].clone())),
            (pairs(&[("NEW", "x"), ("OMP", "8"), ("RANK", "2")]), vec!["JOB".into()])
        );
    }
}
