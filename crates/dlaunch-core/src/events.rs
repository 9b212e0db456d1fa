//! Every state change of a run, as data: what the journal stores, what summaries and (later)
//! progress reports are built from.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::sched::Capacity;
use crate::spec::Resources;

/// Identifies one attempt of one task within a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttemptKey {
    pub task: u32,
    pub attempt: u32,
}

/// How one process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "how", rename_all = "snake_case")]
pub enum Ending {
    Exited {
        code: i32,
    },
    Signaled {
        signal: i32,
        core_dumped: bool,
    },
    /// Killed by dlaunch after its timeout.
    TimedOut {
        after_s: u64,
    },
    /// Killed by dlaunch: a log file outgrew `log_limit`.
    LogLimit {
        stream: String,
        limit: u64,
    },
    /// Stopped by dlaunch because its gang finished or failed elsewhere.
    Stopped,
    /// Stopped because dlaunch itself was told to stop (signal, walltime).
    Interrupted,
    /// Never ran: spawning failed (bad workdir, exec error, ...).
    LaunchFailed {
        error: String,
    },
    /// Its worker rank stopped answering or died.
    WorkerLost,
    /// dlaunch could not do its part (create the log directory, start the process, write its
    /// log: a full disk): not the task's fault. Like an interruption, it runs again on resume.
    Infrastructure {
        error: String,
    },
    /// Never ran: another program listens on the port reserved for it on `host`. The attempt
    /// is run again at once with other ports.
    PortInUse {
        port: u16,
        host: String,
    },
    /// Its role's `wait_for` gave up: the processes it waits for did not accept connections
    /// in time, and its command never ran.
    WaitFailed,
}

impl Ending {
    pub fn succeeded(&self) -> bool {
        matches!(self, Ending::Exited { code: 0 })
    }

    /// Short, for people: "exit 3", "killed by SIGSEGV (core dumped)", "timed out after 1m".
    pub fn describe(&self) -> String {
        match self {
            Ending::Exited { code } => format!("exit {code}"),
            Ending::Signaled { signal, core_dumped } => {
                let hint = match *signal {
                    9 => " (out of memory, or killed from outside)",
                    _ if *core_dumped => " (core dumped)",
                    _ => "",
                };
                format!("killed by {}{hint}", signal_name(*signal))
            }
            Ending::TimedOut { after_s } => {
                format!("timed out after {}", crate::spec::format_duration(Duration::from_secs(*after_s)))
            }
            Ending::LogLimit { stream, limit } => {
                format!("stopped: {stream} exceeded log_limit ({})", crate::spec::format_size(*limit))
            }
            Ending::Stopped => "stopped (gang ended)".into(),
            Ending::Interrupted => "interrupted".into(),
            Ending::LaunchFailed { error } => format!("could not start: {error}"),
            Ending::WorkerLost => "worker lost".into(),
            Ending::Infrastructure { error } => format!("dlaunch failed, not the task: {error}"),
            Ending::PortInUse { port, host } => format!("port {port} on {host} is in use by another program"),
            Ending::WaitFailed => "wait_for timed out".into(),
        }
    }
}

pub(crate) fn signal_name(signal: i32) -> String {
    const NAMES: &[(i32, &str)] = &[
        (1, "SIGHUP"),
        (2, "SIGINT"),
        (3, "SIGQUIT"),
        (4, "SIGILL"),
        (6, "SIGABRT"),
        (7, "SIGBUS"),
        (8, "SIGFPE"),
        (9, "SIGKILL"),
        (10, "SIGUSR1"),
        (11, "SIGSEGV"),
        (12, "SIGUSR2"),
        (13, "SIGPIPE"),
        (14, "SIGALRM"),
        (15, "SIGTERM"),
        (24, "SIGXCPU"),
        (25, "SIGXFSZ"),
    ];
    NAMES.iter().find(|(n, _)| *n == signal).map_or_else(|| format!("signal {signal}"), |(_, name)| name.to_string())
}

/// The result of a whole attempt (all processes of a gang together).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptStatus {
    Succeeded,
    Failed,
    Interrupted,
    /// Stopped at a user's request (`dlaunch cancel`): not retried, not rerun on resume.
    Cancelled,
}

/// Where the coordinator sent one process of an attempt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    pub rank: u32,
    pub host: String,
    /// What the process holds on its worker until it ends (absent in journals before 0.1).
    #[serde(default)]
    pub resources: Resources,
    /// The ports of `master_ports` it holds on its host: its own, then one per label of its
    /// role (absent in journals of versions before they were recorded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
}

/// How one process of an attempt went, and on which CPUs and GPUs the worker placed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessResult {
    pub process: u32,
    pub rank: u32,
    pub host: String,
    /// OS CPU numbers as a list ("0-3,8"); empty when unpinned.
    pub cpus: String,
    pub gpus: Vec<String>,
    pub ending: Ending,
    #[serde(with = "time_format::option")]
    pub start: Option<SystemTime>,
    #[serde(with = "time_format")]
    pub end: SystemTime,
}

/// One journal line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    RunStarted {
        run: u32,
        #[serde(with = "time_format")]
        time: SystemTime,
        version: String,
        world_size: u32,
        tasks: usize,
        slurm_job_id: Option<String>,
        /// Which job ran; absent in journals of dlaunch versions before it was recorded.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job: Option<JobIdentity>,
        /// Tasks of this job file that succeeded in earlier runs and are kept.
        #[serde(default)]
        kept: usize,
        /// The last moment a task may still be running (the allocation's end less the grace
        /// period and a margin), when the allocation has a time limit; tasks whose timeout or
        /// `walltime` does not fit before it wait for a later allocation.
        #[serde(default, skip_serializing_if = "Option::is_none", with = "time_format::option")]
        deadline: Option<SystemTime>,
        /// How often a queued task may be overtaken by later ones before it holds the queue.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backfill_limit: Option<u32>,
    },
    /// A worker rank joined the run with this capacity (what utilisation is measured against).
    WorkerJoined {
        rank: u32,
        host: String,
        capacity: Capacity,
    },
    /// A task's definition as of this run, written when it is new or changed.
    TaskDefined {
        task: String,
        digest: String,
        /// Matrix values with their types from the job file (numbers stay numbers).
        #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
        params: serde_json::Map<String, serde_json::Value>,
    },
    AttemptStarted {
        task: String,
        attempt: u32,
        #[serde(with = "time_format")]
        time: SystemTime,
        processes: Vec<Assigned>,
    },
    AttemptEnded {
        task: String,
        attempt: u32,
        status: AttemptStatus,
        /// Human-readable cause, e.g. "process 2: exit 1".
        reason: String,
        /// A failed attempt that will be retried.
        retry: bool,
        processes: Vec<ProcessResult>,
    },
    /// A queued task was overtaken `overtaken` times (the backfill budget): nothing queued
    /// behind it starts until it does. Written once each time a task comes to hold the queue.
    QueueHeld {
        task: String,
        overtaken: u32,
        #[serde(with = "time_format")]
        time: SystemTime,
    },
    /// A queued task was cancelled (`dlaunch cancel`) before it started.
    TaskCancelled {
        task: String,
        #[serde(with = "time_format")]
        time: SystemTime,
    },
    WorkerLost {
        rank: u32,
        host: String,
        reason: String,
    },
    /// Not run in this run: a task it runs after finally failed, was cancelled, or was skipped itself.
    TaskSkipped {
        task: String,
        reason: String,
    },
    /// Returned output: a declared output of an attempt reached rank 0 whole, with this digest.
    OutputReturned {
        task: String,
        attempt: u32,
        /// Relative to the attempt's log directory (`outputs/...`).
        path: String,
        bytes: u64,
        blake3: String,
    },
    /// Returned output: a declared output that is not in the output directory, and why.
    OutputMissing {
        task: String,
        attempt: u32,
        path: String,
        reason: String,
    },
    DatasetStaged {
        dataset: String,
        bytes: u64,
        seconds: f64,
        nodes: u32,
    },
    RunEnded {
        #[serde(with = "time_format")]
        time: SystemTime,
        succeeded: usize,
        failed: usize,
        #[serde(default)]
        cancelled: usize,
        not_run: usize,
        /// Journals of earlier versions have none.
        #[serde(default)]
        skipped: usize,
        reason: String,
    },
}

/// What tells one job from another in a journal: its name and its job file. The digest (of the
/// job file's bytes) says which version of the file ran; editing the file keeps the job the
/// same job, with changed tasks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobIdentity {
    pub name: String,
    pub file: String,
    pub digest: String,
}

impl JobIdentity {
    pub fn same_job(&self, other: &JobIdentity) -> bool {
        self.name == other.name && self.file == other.file
    }
}

/// The identity of the job that last ran, from a journal's events.
pub fn last_job(events: &[Event]) -> Option<&JobIdentity> {
    events.iter().rev().find_map(|e| match e {
        Event::RunStarted { job, .. } => job.as_ref(),
        _ => None,
    })
}

/// Timestamps as RFC 3339 with milliseconds: readable by people and by every JSON consumer.
pub mod time_format {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(*time))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(time: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
            match time {
                Some(t) => super::serialize(t, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|text| humantime::parse_rfc3339(&text).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endings_read_well() {
        assert_eq!(Ending::Exited { code: 3 }.describe(), "exit 3");
        assert_eq!(Ending::Signaled { signal: 11, core_dumped: true }.describe(), "killed by SIGSEGV (core dumped)");
        assert!(Ending::Signaled { signal: 9, core_dumped: false }.describe().contains("out of memory"));
        assert_eq!(Ending::TimedOut { after_s: 90 }.describe(), "timed out after 1m 30s");
        assert!(Ending::Exited { code: 0 }.succeeded());
        assert!(!Ending::Stopped.succeeded());
    }

    #[test]
    fn events_round_trip_through_json_lines() {
        let time = humantime::parse_rfc3339("2026-11-21T10:00:00.123Z").unwrap();
        let event = Event::AttemptEnded {
            task: "t[a=1]".into(),
            attempt: 2,
            status: AttemptStatus::Failed,
            reason: "process 0: exit 1".into(),
            retry: true,
            processes: vec![ProcessResult {
                process: 0,
                rank: 1,
                host: "node1".into(),
                cpus: "0-3".into(),
                gpus: vec!["1".into()],
                ending: Ending::Exited { code: 1 },
                start: None,
                end: time,
            }],
        };
        let line = serde_json::to_string(&event).unwrap();
        assert!(line.starts_with(r#"{"event":"attempt_ended","task":"t[a=1]""#), "{line}");
        assert!(line.contains(r#""end":"2026-11-21T10:00:00.123Z""#), "{line}");
        assert!(line.contains(r#""ending":{"how":"exited","code":1}"#), "{line}");
        assert_eq!(serde_json::from_str::<Event>(&line).unwrap(), event);
    }
}
