use std::time::Duration;

use super::*;
use crate::events::{AttemptStatus, Ending, Event, ProcessResult};
use crate::sched::Capacity;

fn at(seconds: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + seconds)
}

#[test]
fn host_names_sort_by_their_numbers() {
    let mut hosts = ["node10", "node2", "node1", "node0", "gpu01a", "gpu1b", "node02", "a"];
    hosts.sort_by(|a, b| charts::natural_cmp(a, b));
    assert_eq!(hosts, ["a", "gpu01a", "gpu1b", "node0", "node1", "node02", "node2", "node10"]);
}

#[test]
fn the_timeline_groups_hosts_in_natural_order() {
    let hosts = ["node10", "node2", "node1"];
    let mut events = vec![Event::RunStarted {
        run: 0,
        time: at(0),
        version: String::new(),
        world_size: 4,
        tasks: 3,
        slurm_job_id: None,
        job: None,
        kept: 0,
        deadline: None,
        backfill_limit: None,
    }];
    for (i, host) in hosts.iter().enumerate() {
        let rank = i as u32 + 1;
        let capacity = Capacity { slots: 1, cpus: 1, gpus: 0, memory: 0 };
        events.push(Event::WorkerJoined { rank, host: host.to_string(), capacity });
        let task = format!("t{i}");
        let processes = vec![Assigned { rank, host: host.to_string(), resources: Default::default(), ports: vec![] }];
        events.push(Event::AttemptStarted { task: task.clone(), attempt: 0, time: at(1), processes });
        events.push(Event::AttemptEnded {
            task,
            attempt: 0,
            status: AttemptStatus::Succeeded,
            reason: String::new(),
            retry: false,
            processes: vec![ProcessResult {
                process: 0,
                rank,
                host: host.to_string(),
                cpus: String::new(),
                gpus: vec![],
                ending: Ending::Exited { code: 0 },
                start: Some(at(1)),
                end: at(2),
            }],
        });
    }
    let page = html(&gather(&events), "t", &HashMap::new(), at(3));
    let labels: Vec<&str> = page
        .split("<text class=\"host\"")
        .skip(1)
        .filter_map(|s| s.split_once('>').and_then(|(_, rest)| rest.split_once('<')).map(|(name, _)| name))
        .collect();
    assert_eq!(labels, ["node1", "node2", "node10"]);
}
