//! Multi-process tasks (gangs) under real mpirun: the distributed-training environment
//! contract, a real TCP rendezvous, whole-gang retry and early success.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;

const RENDEZVOUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gang/rendezvous.py");

fn gang_results(dir: &JobDir, name: &str, task: &str, attempt: u32, n: u32) -> Vec<serde_json::Value> {
    (0..n)
        .map(|k| {
            let path = dir.output(name).join(format!("tasks/{task}/attempt-{attempt}/rank-{k}/stdout"));
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_json::from_str(text.lines().last().unwrap_or_default()).unwrap()
        })
        .collect()
}

#[test]
fn a_four_process_task_meets_over_tcp_with_a_consistent_contract() {
    let job = format!(
        "[job]\nname = \"gang\"\n[[tasks]]\nname = \"ddp\"\ncommand = \"env > env.$RANK; python3 {RENDEZVOUS}\"\nworkdir = \"out\"\nprocesses = 4\n"
    );
    let dir = JobDir::new(&job);
    std::fs::create_dir(dir.path().join("out")).unwrap();
    let out = dir.mpirun(5, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let results = gang_results(&dir, "gang", "ddp", 0, 4);
    let ranks: BTreeSet<u64> = results.iter().map(|r| r["rank"].as_u64().unwrap()).collect();
    assert_eq!(ranks, BTreeSet::from([0, 1, 2, 3]));
    let summary = dir.summary("gang");
    let placed: BTreeSet<u64> =
        summary["tasks"][0]["processes"].as_array().unwrap().iter().map(|p| p["rank"].as_u64().unwrap()).collect();
    assert!(placed.len() > 1, "spread over several worker ranks: {placed:?}");
    for r in &results {
        assert_eq!(r["sum_of_ranks"], 6, "the rendezvous really happened: {r}");
        assert_eq!(r["world"], 4);
        assert_eq!(r["master"], results[0]["master"]);
        // One host here: everybody is on node 0 and local ranks are the ranks.
        assert_eq!(r["local_world"], 4);
        assert_eq!(r["local_rank"], r["rank"]);
        assert_eq!(r["node_rank"], 0);
        let tf = &r["tf_config"];
        assert_eq!(tf["task"]["type"], "worker");
        assert_eq!(tf["task"]["index"], r["rank"]);
        assert_eq!(tf["cluster"]["worker"].as_array().unwrap().len(), 4);
        assert_eq!(tf["cluster"]["worker"][0], r["master"], "TF's chief is MASTER_ADDR:MASTER_PORT");
    }
    let workers: BTreeSet<String> =
        results[0]["tf_config"]["cluster"]["worker"].as_array().unwrap().iter().map(|w| w.to_string()).collect();
    assert_eq!(workers.len(), 4, "every process has its own port");
    let env0 = read_env(&dir.path().join("out/env.0"));
    assert_eq!(env0["MASTER_ADDR"], "127.0.0.1", "OpenMPI is told to use lo here, so is MASTER_ADDR");
    assert_eq!(env0["DLAUNCH_COORDINATOR_ADDRESS"], results[0]["master"].as_str().unwrap());
    assert_eq!(env0["DLAUNCH_HOSTS"], env0["DLAUNCH_HOST"]);
    assert_eq!(env0["GROUP_RANK"], "0");
}

#[test]
fn one_failing_process_stops_the_gang_and_it_is_retried_whole() {
    let marker = format!("dlaunch-gang-{}", std::process::id());
    let job = format!(
        "[job]\nname = \"retry\"\ngrace = \"2s\"\n[[tasks]]\nname = \"g\"\ncommand = \"if [ $DLAUNCH_ATTEMPT = 0 ]; then if [ $RANK = 2 ]; then sleep 1; exit 9; fi; sleep 300; : {marker}; fi; echo done $RANK\"\nprocesses = 3\ncpus = 0\nretries = 1\n"
    );
    let dir = JobDir::new(&job);
    let out = dir.mpirun(3, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let task = &dir.summary("retry")["tasks"][0];
    assert_eq!(task["status"], "succeeded");
    assert_eq!(task["attempts"], 2);
    let journal = dir.journal("retry");
    let first = journal.iter().find(|e| e["event"] == "attempt_ended" && e["attempt"] == 0).unwrap();
    assert_eq!(first["reason"], "process 2: exit 9");
    assert_eq!(first["retry"], true);
    let endings: Vec<&str> =
        first["processes"].as_array().unwrap().iter().map(|p| p["ending"]["how"].as_str().unwrap()).collect();
    assert_eq!(endings.iter().filter(|h| **h == "stopped").count(), 2, "the others were stopped: {endings:?}");
    for k in 0..3 {
        let log = dir.output("retry").join(format!("tasks/g/attempt-1/rank-{k}/stdout"));
        assert_eq!(std::fs::read_to_string(log).unwrap(), format!("done {k}\n"));
    }
    assert!(eventually(Duration::from_secs(5), || processes_matching(&marker).is_empty()));
}

#[test]
fn a_gang_can_end_when_process_zero_succeeds() {
    let job = "[job]\nname = \"early\"\ngrace = \"1s\"\n[[tasks]]\nname = \"server\"\ncommand = \"if [ $RANK = 0 ]; then sleep 0.5; exit 0; fi; sleep 300\"\nprocesses = 3\ncpus = 0\nsuccess = \"rank0\"\n";
    let dir = JobDir::new(job);
    let out = dir.mpirun(2, &[]);
    assert!(out.status.success(), "{}", text(&out));
    let task = &dir.summary("early")["tasks"][0];
    assert_eq!(task["status"], "succeeded");
    let endings: Vec<&str> =
        task["processes"].as_array().unwrap().iter().map(|p| p["ending"]["how"].as_str().unwrap()).collect();
    assert_eq!(endings, ["exited", "stopped", "stopped"]);
}

#[test]
fn a_gang_larger_than_the_allocation_is_refused_at_start() {
    let dir = JobDir::new(
        "[job]\nname = \"huge\"\n[[tasks]]\nname = \"g\"\ncommand = \"true\"\nprocesses = 4\nprocesses_per_node = 2\n",
    );
    let out = dir.mpirun(3, &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("task g needs"), "{}", text(&out));
}

/// Another program on the host (another dlaunch job, a service) listens on the first port the
/// job hands out: the worker finds it taken before the task starts, and the attempt runs again
/// at once on the next port instead of failing with "Address already in use".
#[test]
fn a_port_another_program_listens_on_is_skipped() {
    let bind = "python3 -c 'import os, socket; s = socket.socket(); s.bind((\"0.0.0.0\", int(os.environ[\"MASTER_PORT\"]))); s.listen(); print(os.environ[\"MASTER_PORT\"])'";
    let tasks = format!("[[tasks]]\nname = \"t\"\ncommand = '''{bind}'''\n");
    let (dir, port, _taken) = job_with_a_port_taken("ports", &tasks, 0, "0.0.0.0");
    let out = dir.mpirun(2, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let journal = dir.journal("ports");
    let ended: Vec<&serde_json::Value> = journal.iter().filter(|e| e["event"] == "attempt_ended").collect();
    assert_eq!(ended[0]["status"], "interrupted", "{ended:#?}");
    let reason = ended[0]["reason"].as_str().unwrap();
    assert!(
        reason.starts_with(&format!("port {port} on ")) && reason.ends_with("in use by another program"),
        "{reason}"
    );
    assert_eq!(ended.last().unwrap()["status"], "succeeded", "{ended:#?}");
    let attempt = ended.last().unwrap()["attempt"].as_u64().unwrap();
    let used = std::fs::read_to_string(dir.output("ports").join(format!("tasks/t/attempt-{attempt}/stdout"))).unwrap();
    assert_ne!(used.trim(), port.to_string(), "the task got another port");
}

/// The same with the other program listening on IPv6 loopback only, and the task binding
/// [::] as a dual-stack server does (Python's `create_server(..., dualstack_ipv6=True)`): the
/// port is as taken for it, so the worker must find it taken too (docs/environment.md), not
/// start the attempt into "Address already in use". Fails: the check binds 0.0.0.0 only.
#[test]
fn a_port_another_program_listens_on_over_ipv6_is_skipped() {
    let bind = "python3 -c 'import os, socket; s = socket.create_server((\"::\", int(os.environ[\"MASTER_PORT\"])), family=socket.AF_INET6, dualstack_ipv6=True); print(os.environ[\"MASTER_PORT\"])'";
    let tasks = format!("[[tasks]]\nname = \"t\"\ncommand = '''{bind}'''\n");
    let (dir, port, taken) = job_with_a_port_taken("ports6", &tasks, 0, "::1");
    if taken.is_none() {
        eprintln!("[::1]:{port} cannot be listened on here (no IPv6 loopback?): nothing to check");
        return;
    }
    let out = dir.mpirun(2, &[]);
    let task = &tasks_by_id(&dir.summary("ports6"))["t"];
    assert_eq!(task["status"], "succeeded", "{task:#}\n{}", text(&out));
    let journal = dir.journal("ports6");
    let skipped = journal.iter().any(|e| e["event"] == "attempt_ended" && e["status"] == "interrupted");
    assert!(skipped, "port {port} was not found taken before the task started");
}

/// A job named `name` with `tasks` whose `skip`-th port handed out (counted from where this job
/// starts in its `master_ports`) is held by another program listening on `address`; returns the port and the
/// listener (None when something else holds the port already, which serves as well).
fn job_with_a_port_taken(
    name: &str,
    tasks: &str,
    skip: u16,
    address: &str,
) -> (JobDir, u16, Option<std::net::TcpListener>) {
    const SPAN: u16 = 21;
    let free = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap().local_addr().unwrap().port().min(65000);
    let range = dlaunch_core::spec::PortRange { first: free, last: free + SPAN - 1 };
    let job = format!("[job]\nname = \"{name}\"\nmaster_ports = \"{}-{}\"\n{tasks}", range.first, range.last);
    let dir = JobDir::new(&job);
    let first = dlaunch_core::sched::first_port(range, &dir.output(name).to_string_lossy());
    let port = range.first + (first - range.first + skip) % SPAN;
    let taken = std::net::TcpListener::bind((address, port)).ok();
    (dir, port, taken)
}

/// The same for a role's labelled port: process 0's `DLAUNCH_PORT_HTTP` comes right after its
/// `DLAUNCH_PORT`, and another program listens on it.
#[test]
fn a_labelled_port_another_program_listens_on_is_skipped() {
    let bind = "python3 -c 'import os, socket; s = socket.socket(); s.bind((\"0.0.0.0\", int(os.environ[\"DLAUNCH_PORT_HTTP\"]))); s.listen(); print(os.environ[\"DLAUNCH_PORT_HTTP\"])'";
    let tasks = format!(
        "[[tasks]]\nname = \"t\"\ncommand = '''{bind}'''\n[[tasks.roles]]\nname = \"web\"\nports = [\"http\"]\n"
    );
    let (dir, port, _taken) = job_with_a_port_taken("labels", &tasks, 1, "0.0.0.0");
    let out = dir.mpirun(2, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let journal = dir.journal("labels");
    let ended: Vec<&serde_json::Value> = journal.iter().filter(|e| e["event"] == "attempt_ended").collect();
    assert_eq!(ended[0]["status"], "interrupted", "{ended:#?}");
    let reason = ended[0]["reason"].as_str().unwrap();
    assert!(reason.contains(&format!("port {port} on ")) && reason.ends_with("in use by another program"), "{reason}");
    assert_eq!(ended.last().unwrap()["status"], "succeeded", "{ended:#?}");
    let attempt = ended.last().unwrap()["attempt"].as_u64().unwrap();
    let used = std::fs::read_to_string(dir.output("labels").join(format!("tasks/t/attempt-{attempt}/stdout"))).unwrap();
    assert_ne!(used.trim(), port.to_string(), "the task got another port");
}

/// Two dlaunch jobs at once on one host, both with the default `master_ports`, each task
/// holding its `MASTER_PORT` for a while: they start at places of their own in the range, so
/// neither meets "Address already in use".
#[test]
fn two_jobs_on_one_host_do_not_share_ports() {
    let hold = "python3 -c 'import os, socket, time; s = socket.socket(); s.bind((\"0.0.0.0\", int(os.environ[\"MASTER_PORT\"]))); s.listen(); time.sleep(1)'";
    let job = |name: &str| {
        format!(
            "[job]\nname = \"{name}\"\n[[tasks]]\nname = \"t\"\ncommand = '''{hold}'''\nmatrix = {{ i = [1, 2, 3, 4] }}\n"
        )
    };
    let (a, b) = (JobDir::new(&job("a")), JobDir::new(&job("b")));
    let runs = [a.mpirun_command(3, &[]).spawn().unwrap(), b.mpirun_command(3, &[]).spawn().unwrap()];
    for (out, name) in runs.into_iter().map(|child| wait_with_limit(child, Duration::from_secs(120))).zip(["a", "b"]) {
        assert_eq!(out.status.code(), Some(0), "job {name}: {}", text(&out));
    }
    let journals = [a.journal("a"), b.journal("b")];
    let clashes =
        journals.iter().flatten().filter(|e| e["reason"].as_str().is_some_and(|r| r.contains("in use"))).count();
    assert_eq!(clashes, 0, "the jobs met on a port");
}
