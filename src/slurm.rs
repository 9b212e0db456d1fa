//! What the SLURM allocation tells dlaunch: the job, and when it ends.

use std::process::Command;
use std::time::{Duration, SystemTime};

/// The SLURM job dlaunch runs in, if any.
#[derive(Clone, Debug, PartialEq)]
pub struct SlurmJob {
    pub id: String,
    pub name: Option<String>,
    pub nodes: Option<String>,
}

pub fn job() -> Option<SlurmJob> {
    let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    Some(SlurmJob { id: var("SLURM_JOB_ID")?, name: var("SLURM_JOB_NAME"), nodes: var("SLURM_JOB_NODELIST") })
}

/// When the allocation ends: `SLURM_JOB_END_TIME` (SLURM 23.02+) when set, else what
/// `squeue` says is left. None: unlimited, or unknown (then nothing is held back).
pub fn end_time(job: &SlurmJob) -> Option<SystemTime> {
    if let Some(end) = std::env::var("SLURM_JOB_END_TIME").ok().and_then(|v| v.parse::<u64>().ok()) {
        return Some(SystemTime::UNIX_EPOCH + Duration::from_secs(end));
    }
    let out = Command::new("squeue").args(["-h", "-j", &job.id, "-o", "%L"]).output();
    match out {
        Ok(out) if out.status.success() => {
            squeue_time_left(&String::from_utf8_lossy(&out.stdout)).map(|left| SystemTime::now() + left)
        }
        Ok(out) => {
            log::warn!("squeue could not tell the time left: {}", String::from_utf8_lossy(&out.stderr).trim());
            None
        }
        Err(e) => {
            log::warn!("cannot run squeue to learn the time left ({e}): tasks are started regardless of walltime");
            None
        }
    }
}

/// What `squeue -j <id> -o %L` prints: one line, or one per component of a heterogeneous job
/// (each may have its own time limit). The step spans all components, so the first to end
/// ends the run; lines without a limit do not count.
pub fn squeue_time_left(text: &str) -> Option<Duration> {
    text.lines().map(str::trim).filter_map(parse_time_left).min()
}

/// squeue's `%L`: `[days-]hours:minutes:seconds`, `minutes:seconds`, or words like
/// `UNLIMITED`, `NOT_SET`, `INVALID` (no limit known).
pub fn parse_time_left(text: &str) -> Option<Duration> {
    let (days, clock) = match text.split_once('-') {
        Some((d, rest)) => (d.parse::<u64>().ok()?, rest),
        None => (0, text),
    };
    let parts: Vec<u64> = clock.split(':').map(|p| p.parse().ok()).collect::<Option<_>>()?;
    let seconds = match parts.as_slice() {
        [h, m, s] => h * 3600 + m * 60 + s,
        [m, s] => m * 60 + s,
        [s] => *s,
        _ => return None,
    };
    Some(Duration::from_secs(days * 86_400 + seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_time_left_formats() {
        assert_eq!(parse_time_left("1-02:03:04"), Some(Duration::from_secs(86_400 + 7384)));
        assert_eq!(parse_time_left("02:03:04"), Some(Duration::from_secs(7384)));
        assert_eq!(parse_time_left("59:30"), Some(Duration::from_secs(3570)));
        assert_eq!(parse_time_left("45"), Some(Duration::from_secs(45)));
        for none in ["UNLIMITED", "NOT_SET", "INVALID", "", "1:2:3:4"] {
            assert_eq!(parse_time_left(none), None, "{none}");
        }
    }

    #[test]
    fn heterogeneous_jobs_end_with_their_first_component() {
        assert_eq!(squeue_time_left("4:58\n"), Some(Duration::from_secs(298)));
        assert_eq!(squeue_time_left("5:00\n7:00\n"), Some(Duration::from_secs(300)));
        assert_eq!(squeue_time_left("UNLIMITED\n1:00:00\n"), Some(Duration::from_secs(3600)));
        assert_eq!(squeue_time_left("UNLIMITED\nUNLIMITED\n"), None);
        assert_eq!(squeue_time_left(""), None);
    }
}
