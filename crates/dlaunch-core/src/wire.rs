//! What ranks say to each other. Plain data, serialized with serde; `transport` moves the bytes.

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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Restore {
    pub task_id: String,
    /// Relative to `DLAUNCH_TASK_DIR`.
    pub path: String,
    pub offset: u64,
    #[serde(with = "base64")]
    pub bytes: Vec<u8>,
    pub last: bool,
}

/// Start one process of a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    pub key: AttemptKey,
    pub task_id: String,
    pub process: u32,
    pub command: String,
    pub workdir: PathBuf,
    /// The job's and task's env and the contract variables; the worker adds placement.
    pub env: Vec<(String, String)>,
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
    #[serde(default)]
    pub gpu_mates: Vec<u32>,
    /// Processes of this attempt on other worker ranks of this host share GPUs with this one:
    /// place it, report `Placed`, and start it only on `Start`, which brings the GPUs of all.
    #[serde(default)]
    pub hold: bool,
    /// Declared outputs (patterns relative to `DLAUNCH_TASK_DIR`), sent back by process 0 in
    /// returned mode.
    #[serde(default)]
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
    #[serde(with = "base64")]
    pub bytes: Vec<u8>,
    /// On the last chunk: the blake3 digest of the whole file, as the worker read it.
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

/// File bytes as base64 text: JSON writes a `Vec<u8>` as an array of numbers, about 3.6
/// characters a byte, where base64 takes 1.33.
mod base64 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        decode(&text).ok_or_else(|| D::Error::custom("invalid base64"))
    }

    pub fn encode(bytes: &[u8]) -> String {
        let mut text = String::with_capacity(bytes.len().div_ceil(3) * 4);
        for group in bytes.chunks(3) {
            let n = group.iter().enumerate().fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
            for i in 0..4 {
                let c = if i <= group.len() { ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' };
                text.push(c);
            }
        }
        text
    }

    pub fn decode(text: &str) -> Option<Vec<u8>> {
        let text = text.as_bytes();
        if !text.len().is_multiple_of(4) {
            return None;
        }
        let mut bytes = Vec::with_capacity(text.len() / 4 * 3);
        for group in text.chunks(4) {
            let padding = group.iter().rev().take_while(|&&c| c == b'=').count();
            if padding > 2 {
                return None;
            }
            let mut n = 0u32;
            for &c in &group[..4 - padding] {
                n = (n << 6) | ALPHABET.iter().position(|&a| a == c)? as u32;
            }
            n <<= 6 * padding as u32;
            bytes.extend_from_slice(&n.to_be_bytes()[1..4 - padding]);
        }
        Some(bytes)
    }
}

/// Messages travel in batches: one MPI message per rank and loop turn, however many orders.
pub fn encode<T: Serialize>(batch: &[T]) -> Vec<u8> {
    serde_json::to_vec(batch).unwrap_or_default()
}

pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<Vec<T>, serde_json::Error> {
    serde_json::from_slice(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_travel_as_base64() {
        for len in 0..10 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 97 + 200) as u8).collect();
            assert_eq!(base64::decode(&base64::encode(&bytes)), Some(bytes));
        }
        assert_eq!(base64::encode(b"Man"), "TWFu");
        assert_eq!(base64::encode(b"Ma"), "TWE=");
        for bad in ["TWF", "TW=u", "T===", "TW!u"] {
            assert_eq!(base64::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn batches_round_trip() {
        let orders = vec![
            Order::Launch(Box::new(Launch {
                key: AttemptKey { task: 3, attempt: 1 },
                task_id: "t[a=1]".into(),
                process: 0,
                command: "echo 'hi'".into(),
                workdir: "/tmp".into(),
                env: vec![("A".into(), "1".into())],
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
        let Order::Launch(launch) = &decode::<Order>(br#"[{"Launch":{"key":{"task":0,"attempt":0},"task_id":"t","process":0,"command":"true","workdir":"/","env":[],"resources":{"cpus":0,"gpus":0,"memory":0},"timeout":null,"log_dir":"/l","datasets":[],"ports":[]}}]"#).unwrap()[0] else {
            panic!("a Launch");
        };
        assert!(!launch.prefetched, "absent means not sent ahead");
        let text = String::from_utf8(encode(&[Order::Launch(launch.clone())])).unwrap();
        assert!(!text.contains("prefetched"), "{text}");
        let ahead = Order::Launch(Box::new(Launch { prefetched: true, ..(**launch).clone() }));
        assert!(String::from_utf8(encode(&[ahead])).unwrap().contains(r#""prefetched":true"#));
    }
}
