//! The worker's rules over a fake launcher: no processes, no clock; every step is handed `now`.
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use super::*;
use dlaunch_core::events::{AttemptKey, Ending};
use dlaunch_core::spec::Resources;
use dlaunch_core::wire::{Launch, ProcessEnd, TemplateRecord};
use std::sync::Arc;

use dlaunch_core::topo::NodeTopology;
use dlaunch_core::worker::{Escaped, LogState, Pid, SIGKILL, Setup, SpawnFailure, SpawnPlan};

const SIGTERM: i32 = 15;

/// What the fake launcher was asked, in order, and what it will answer.
#[derive(Default)]
struct Fake {
    next_pid: Pid,
    spawned: Vec<(Pid, SpawnPlan)>,
    fail_next: Option<SpawnFailure>,
    /// Ended processes the next reap returns.
    ended: Vec<(Pid, Ending)>,
    logs: HashMap<Pid, LogState>,
    escaped: Vec<Escaped>,
    /// Everything done to processes, in order: "signal 100 15", "kill-escaped 500", "release 100".
    actions: Vec<String>,
}

#[derive(Clone, Default)]
struct FakeLauncher(Rc<RefCell<Fake>>);

impl Launcher for FakeLauncher {
    fn spawn(&mut self, plan: SpawnPlan) -> Result<Pid, SpawnFailure> {
        let mut fake = self.0.borrow_mut();
        if let Some(failure) = fake.fail_next.take() {
            return Err(failure);
        }
        fake.next_pid += 1;
        let pid = 100 + fake.next_pid;
        fake.spawned.push((pid, plan));
        Ok(pid)
    }

    fn reap(&mut self) -> Vec<(Pid, Ending)> {
        std::mem::take(&mut self.0.borrow_mut().ended)
    }

    fn signal_group(&mut self, pid: Pid, signal: i32) {
        self.0.borrow_mut().actions.push(format!("signal {pid} {signal}"));
    }

    fn escaped(&mut self) -> Vec<Escaped> {
        self.0.borrow().escaped.clone()
    }

    fn kill_escaped(&mut self, pid: Pid) {
        let mut fake = self.0.borrow_mut();
        fake.escaped.retain(|e| e.pid != pid);
        fake.actions.push(format!("kill-escaped {pid}"));
    }

    fn logs(&self, pid: Pid) -> LogState {
        self.0.borrow().logs.get(&pid).cloned().unwrap_or_default()
    }

    fn release(&mut self, pid: Pid) {
        self.0.borrow_mut().actions.push(format!("release {pid}"));
    }
}

/// The order to start process 0 of `task` (attempt 0) with `cpus` CPUs.
fn order(task: u32, cpus: u32, timeout: Option<Duration>) -> Launch {
    Launch {
        key: AttemptKey { task, attempt: 0 },
        template: 0,
        task_id: format!("t{task}"),
        process: 0,
        command: "true".into(),
        workdir: "/tmp".into(),
        env: vec![("DLAUNCH_TASK_ID".into(), format!("t{task}"))],
        unset: vec![],
        resources: Resources { cpus, gpus: 0, memory: 0 },
        timeout,
        log_dir: format!("/tmp/logs/t{task}").into(),
        datasets: vec![],
        ports: vec![29500 + task as u16],
        gpu_mates: vec![],
        hold: false,
        outputs: vec![],
        prefetched: false,
    }
}

struct Harness {
    worker: Worker<FakeLauncher>,
    fake: FakeLauncher,
    t0: Instant,
}

impl Harness {
    /// A worker of 4 CPUs and 2 GPUs for a job with `job` as its `[job]` table.
    fn new(job: &str) -> Harness {
        Harness::with_slots(job, None)
    }

    fn with_slots(job: &str, slots: Option<u32>) -> Harness {
        let text = format!("[job]\nname = \"w\"\n{job}\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\n");
        let job = Arc::new(
            dlaunch_core::spec::parse(
                Path::new("/tmp/dlaunch-test/job.toml"),
                text.as_bytes(),
                &crate::jobfile::FsProbe,
            )
            .unwrap(),
        );
        let topology = NodeTopology::synthetic(1, 4, 1, 2, 1 << 30);
        let t0 = Instant::now();
        let setup = Setup { rank: 1, host: "n1".into(), job, topology, slots, memory_cap: None };
        let machine = Machine::new(setup, vec![], t0);
        let fake = FakeLauncher::default();
        let mut worker = Worker::with_launcher(machine, fake.clone());
        // As the coordinator does before any order of the template.
        worker.handle(Order::Template(TemplateRecord { template: 0, env: vec![] }), t0);
        Harness { worker, fake, t0 }
    }

    fn at(&self, seconds: f64) -> Instant {
        self.t0 + Duration::from_secs_f64(seconds)
    }

    /// Launches process 0 of `task` (attempt 0) with `cpus` CPUs; returns its pid.
    fn launch(&mut self, task: u32, cpus: u32, timeout: Option<Duration>, now: Instant) -> Option<Pid> {
        let before = self.fake.0.borrow().spawned.len();
        assert!(self.worker.handle(Order::Launch(Box::new(order(task, cpus, timeout))), now));
        let fake = self.fake.0.borrow();
        (fake.spawned.len() > before).then(|| fake.spawned[before].0)
    }

    fn end(&self, pid: Pid, ending: Ending) {
        self.fake.0.borrow_mut().ended.push((pid, ending));
    }

    fn actions(&self) -> Vec<String> {
        std::mem::take(&mut self.fake.0.borrow_mut().actions)
    }

    fn endings(&mut self) -> Vec<(u32, Ending)> {
        self.worker
            .take_reports()
            .into_iter()
            .map(|r| match r {
                Report::Ended(ProcessEnd { key, ending, .. }) => (key.task, ending),
                other => panic!("not an end: {other:?}"),
            })
            .collect()
    }
}

#[test]
fn a_timeout_sends_the_stop_signal_then_sigkill_after_the_grace_period() {
    let mut h = Harness::new("grace = \"5s\"");
    let pid = h.launch(1, 1, Some(Duration::from_secs(10)), h.at(0.0)).unwrap();
    h.worker.poll(h.at(9.9));
    assert_eq!(h.actions(), Vec::<String>::new(), "nothing before the deadline");
    h.worker.poll(h.at(10.0));
    assert_eq!(h.actions(), [format!("signal {pid} {SIGTERM}")]);
    h.worker.poll(h.at(14.9));
    assert_eq!(h.actions(), Vec::<String>::new(), "the grace period runs");
    h.worker.poll(h.at(15.0));
    assert_eq!(h.actions(), [format!("signal {pid} {SIGKILL}")]);
    h.worker.poll(h.at(16.0));
    assert_eq!(h.actions(), Vec::<String>::new(), "SIGKILL goes once");
    h.end(pid, Ending::Signaled { signal: SIGKILL, core_dumped: false });
    h.worker.poll(h.at(16.1));
    assert_eq!(h.actions(), [format!("signal {pid} {SIGKILL}"), format!("release {pid}")], "the group goes too");
    assert_eq!(h.endings(), [(1, Ending::TimedOut { after_s: 10 })]);
    assert!(!h.worker.busy());
}

#[test]
fn a_task_that_stops_within_the_grace_period_gets_no_sigkill() {
    let mut h = Harness::new("grace = \"5s\"\nstop_signal = \"SIGUSR1\"");
    let pid = h.launch(1, 1, Some(Duration::from_secs(1)), h.at(0.0)).unwrap();
    h.worker.poll(h.at(1.0));
    assert_eq!(h.actions(), [format!("signal {pid} 10")], "the job's stop signal");
    h.end(pid, Ending::Exited { code: 0 });
    h.worker.poll(h.at(2.0));
    h.worker.poll(h.at(30.0));
    assert_eq!(h.actions(), [format!("signal {pid} {SIGKILL}"), format!("release {pid}")]);
    assert_eq!(h.endings(), [(1, Ending::TimedOut { after_s: 1 })]);
}

#[test]
fn an_end_by_an_outside_stop_signal_is_held_then_interrupted_or_failed() {
    for (stop_after, outside) in
        [(Some(1.0), Ending::Signaled { signal: SIGTERM, core_dumped: false }), (None, Ending::Exited { code: 143 })]
    {
        let mut h = Harness::new("");
        let pid = h.launch(1, 1, None, h.at(0.0)).unwrap();
        h.end(pid, outside.clone());
        h.worker.poll(h.at(0.5));
        assert!(h.endings().is_empty(), "held back");
        assert!(h.worker.busy(), "a held end keeps the worker busy");
        match stop_after {
            Some(t) => {
                h.worker.interrupt(h.at(t));
                assert_eq!(h.endings(), [(1, Ending::Interrupted)], "stopped along with dlaunch");
            }
            None => {
                h.worker.poll(h.at(2.4));
                assert!(h.endings().is_empty(), "still within the window");
                h.worker.poll(h.at(2.5));
                assert_eq!(h.endings(), [(1, outside)], "no stop came: the failure it looks like");
            }
        }
        assert!(!h.worker.busy());
    }
}

#[test]
fn a_signal_that_does_not_stop_dlaunch_is_reported_at_once() {
    let mut h = Harness::new("");
    let pid = h.launch(1, 1, None, h.at(0.0)).unwrap();
    h.end(pid, Ending::Signaled { signal: 11, core_dumped: true });
    h.worker.poll(h.at(0.1));
    assert_eq!(h.endings(), [(1, Ending::Signaled { signal: 11, core_dumped: true })]);
}

#[test]
fn a_log_past_its_limit_or_unwritable_stops_the_task() {
    let mut h = Harness::new("log_limit = \"1KiB\"\ngrace = \"2s\"");
    let chatty = h.launch(1, 1, None, h.at(0.0)).unwrap();
    let quiet = h.launch(2, 1, None, h.at(0.0)).unwrap();
    let full = h.launch(3, 1, None, h.at(0.0)).unwrap();
    {
        let mut fake = h.fake.0.borrow_mut();
        fake.logs.insert(chatty, LogState { stdout: 10, stderr: 1025, error: None });
        fake.logs.insert(quiet, LogState { stdout: 1024, stderr: 1024, error: None });
        let error = Some("cannot write /out/stdout: No space left on device".to_string());
        fake.logs.insert(full, LogState { stdout: 3, stderr: 0, error });
    }
    h.worker.poll(h.at(0.1));
    let mut actions = h.actions();
    actions.sort();
    assert_eq!(
        actions,
        [format!("signal {chatty} {SIGTERM}"), format!("signal {full} {SIGTERM}")],
        "at the limit is fine"
    );
    h.worker.poll(h.at(1.0));
    assert_eq!(h.actions(), Vec::<String>::new(), "signalled once");
    h.worker.poll(h.at(2.1));
    assert_eq!(h.actions().len(), 2, "SIGKILL after the grace period, as for a timeout");
    h.end(chatty, Ending::Signaled { signal: SIGKILL, core_dumped: false });
    h.end(full, Ending::Exited { code: 1 });
    h.worker.poll(h.at(2.2));
    let mut endings = h.endings();
    endings.sort_by_key(|(task, _)| *task);
    assert_eq!(
        endings,
        [
            (1, Ending::LogLimit { stream: "stderr".into(), limit: 1024 }),
            (3, Ending::Infrastructure { error: "cannot write /out/stdout: No space left on device".into() }),
        ]
    );
}

#[test]
fn escaped_processes_of_ended_tasks_are_killed_before_their_logs_close() {
    let mut h = Harness::new("");
    let ending = h.launch(1, 1, None, h.at(0.0)).unwrap();
    let _running = h.launch(2, 1, None, h.at(0.0)).unwrap();
    let escaped = |pid, task: &str| Escaped { pid, task_id: task.into(), attempt: 0 };
    h.fake.0.borrow_mut().escaped = vec![escaped(500, "t1"), escaped(501, "t2"), escaped(502, "t1")];
    h.end(ending, Ending::Exited { code: 0 });
    h.worker.poll(h.at(0.1));
    assert_eq!(
        h.actions(),
        [
            format!("signal {ending} {SIGKILL}"),
            "kill-escaped 500".to_string(),
            "kill-escaped 502".to_string(),
            format!("release {ending}"),
        ],
        "what task 2 started runs on: task 2 does"
    );
    assert_eq!(h.endings(), [(1, Ending::Exited { code: 0 })]);
    // A daemon of an attempt that ended earlier is found by the periodic look.
    h.fake.0.borrow_mut().escaped.push(Escaped { pid: 503, task_id: "t1".into(), attempt: 0 });
    h.worker.poll(h.at(0.5));
    assert_eq!(h.actions(), Vec::<String>::new(), "not looked for again within a second");
    h.worker.poll(h.at(1.1));
    assert_eq!(h.actions(), ["kill-escaped 503"]);
}

#[test]
fn interrupt_stops_everything_and_reports_it_interrupted() {
    let mut h = Harness::new("grace = \"3s\"");
    let a = h.launch(1, 2, None, h.at(0.0)).unwrap();
    let b = h.launch(2, 2, None, h.at(0.0)).unwrap();
    h.worker.interrupt(h.at(1.0));
    let mut actions = h.actions();
    actions.sort();
    assert_eq!(actions, [format!("signal {a} {SIGTERM}"), format!("signal {b} {SIGTERM}")]);
    h.end(a, Ending::Exited { code: 0 });
    h.worker.poll(h.at(2.0));
    h.worker.poll(h.at(4.0));
    assert!(h.actions().contains(&format!("signal {b} {SIGKILL}")), "the one that did not stop");
    h.end(b, Ending::Signaled { signal: SIGKILL, core_dumped: false });
    h.worker.poll(h.at(4.1));
    let mut endings = h.endings();
    endings.sort_by_key(|(task, _)| *task);
    assert_eq!(endings, [(1, Ending::Interrupted), (2, Ending::Interrupted)]);
    assert!(h.launch(3, 4, None, h.at(5.0)).is_some(), "their CPUs are free again");
}

#[test]
fn stop_ends_only_its_attempt() {
    let mut h = Harness::new("");
    let a = h.launch(1, 1, None, h.at(0.0)).unwrap();
    let _b = h.launch(2, 1, None, h.at(0.0)).unwrap();
    h.worker.handle(Order::Stop { key: AttemptKey { task: 1, attempt: 0 } }, h.at(1.0));
    assert_eq!(h.actions(), [format!("signal {a} {SIGTERM}")]);
    h.end(a, Ending::Signaled { signal: SIGTERM, core_dumped: false });
    h.worker.poll(h.at(1.1));
    assert_eq!(h.endings(), [(1, Ending::Stopped)], "dlaunch's own stop is not held");
}

#[test]
fn spawn_failures_say_whose_fault_they_are_and_free_the_placement() {
    let mut h = Harness::new("");
    let cases = [
        (
            SpawnFailure::Task("cannot enter the working directory".into()),
            Ending::LaunchFailed { error: "cannot enter the working directory".into() },
        ),
        (
            SpawnFailure::Infrastructure("cannot create the log directory".into()),
            Ending::Infrastructure { error: "cannot create the log directory".into() },
        ),
        (SpawnFailure::PortInUse(29501), Ending::PortInUse { port: 29501, host: "n1".into() }),
    ];
    for (failure, ending) in cases {
        h.fake.0.borrow_mut().fail_next = Some(failure);
        assert_eq!(h.launch(1, 4, None, h.at(0.0)), None);
        assert_eq!(h.endings(), [(1, ending)]);
    }
    let pid = h.launch(1, 4, None, h.at(0.0)).expect("all 4 CPUs are free");
    let fake = h.fake.0.borrow();
    let plan = &fake.spawned.iter().find(|(p, _)| *p == pid).unwrap().1;
    assert_eq!(plan.ports, vec![29501], "the launcher checks the reserved port");
    assert_eq!(plan.cpus, Vec::<u32>::new(), "a topology from XML is placed, not bound");
}

#[test]
fn a_launch_that_does_not_fit_is_reported_without_a_spawn() {
    let mut h = Harness::new("");
    h.launch(1, 3, None, h.at(0.0)).unwrap();
    assert_eq!(h.launch(2, 2, None, h.at(0.0)), None);
    let endings = h.endings();
    assert!(
        matches!(&endings[..], [(2, Ending::LaunchFailed { error })] if error.contains("1 free CPUs")),
        "{endings:?}"
    );
}

/// Process 1 of a gang whose processes 0 and 2 run on other ranks of the host: placed, held
/// with its GPU reserved, started seeing the host's GPUs of the gang, or released on Stop.
#[test]
fn a_held_process_starts_with_the_gpus_of_its_mates_on_other_ranks() {
    let mut h = Harness::new("");
    let held = |task| Launch {
        process: 1,
        resources: Resources { cpus: 1, gpus: 1, memory: 0 },
        hold: true,
        ..order(task, 1, None)
    };
    h.worker.handle(Order::Launch(Box::new(held(1))), h.at(0.0));
    h.worker.handle(Order::Launch(Box::new(held(2))), h.at(0.0));
    assert!(h.fake.0.borrow().spawned.is_empty(), "nothing starts before the order");
    let key = |task| AttemptKey { task, attempt: 0 };
    assert_eq!(
        h.worker.take_reports(),
        [
            Report::Placed { key: key(1), gpus: vec![(1, vec!["0".into()])] },
            Report::Placed { key: key(2), gpus: vec![(1, vec!["1".into()])] }
        ]
    );
    assert!(h.worker.busy(), "held processes keep the worker busy");
    assert!(h.launch(3, 0, None, h.at(0.0)).is_some(), "CPU-only work still fits");
    let gpu_task = Launch { resources: Resources { cpus: 0, gpus: 1, memory: 0 }, ..order(4, 0, None) };
    h.worker.handle(Order::Launch(Box::new(gpu_task.clone())), h.at(0.0));
    assert!(matches!(&h.endings()[..], [(4, Ending::LaunchFailed { .. })]), "both GPUs are reserved");

    let visible: Vec<String> = ["7", "0", "8"].map(String::from).to_vec();
    h.worker.handle(Order::Start { key: key(1), visible }, h.at(1.0));
    h.worker.handle(Order::Stop { key: key(2) }, h.at(1.0));
    assert_eq!(h.endings(), [(2, Ending::Stopped)], "the held one never ran");
    let fake = h.fake.0.borrow();
    let env = |k: &str| fake.spawned[1].1.env.get(std::ffi::OsStr::new(k)).cloned().unwrap_or_default();
    assert_eq!(env("CUDA_VISIBLE_DEVICES"), "7,0,8");
    assert_eq!(env("DLAUNCH_GPUS"), "0");
    assert_eq!(env("DLAUNCH_GPU_OFFSET"), "1");
    drop(fake);
    h.worker.handle(Order::Launch(Box::new(gpu_task)), h.at(2.0));
    assert_eq!(h.fake.0.borrow().spawned.len(), 3, "the stopped one gave its GPU back");
}

/// Sends `task` ahead of room (`Launch::prefetched`) at the start; returns the pid if it started at once.
fn prefetch(h: &mut Harness, task: u32, cpus: u32) -> Option<Pid> {
    let now = h.at(0.0);
    let before = h.fake.0.borrow().spawned.len();
    let launch = Launch { prefetched: true, ..order(task, cpus, None) };
    assert!(h.worker.handle(Order::Launch(Box::new(launch)), now));
    let fake = h.fake.0.borrow();
    (fake.spawned.len() > before).then(|| fake.spawned[before].0)
}

/// Reports as (kind, task): ("ended", 1), ("started", 2), ("returned", 3).
fn reported(h: &mut Harness) -> Vec<(&'static str, u32)> {
    h.worker
        .take_reports()
        .into_iter()
        .map(|r| match r {
            Report::Ended(end) => ("ended", end.key.task),
            Report::Started { key, .. } => ("started", key.task),
            Report::Returned { key } => ("returned", key.task),
            other => panic!("unexpected report {other:?}"),
        })
        .collect()
}

#[test]
fn prefetched_orders_wait_for_room_and_start_in_order_the_moment_it_frees() {
    let mut h = Harness::new("");
    let a = h.launch(1, 4, None, h.at(0.0)).unwrap();
    assert_eq!(prefetch(&mut h, 2, 2), None, "no CPUs free: held");
    assert_eq!(prefetch(&mut h, 3, 2), None);
    assert!(reported(&mut h).is_empty(), "held orders are not news");
    h.end(a, Ending::Exited { code: 0 });
    h.worker.poll(h.at(1.0));
    assert_eq!(reported(&mut h), [("ended", 1), ("started", 2), ("started", 3)], "the end, then each start");
    let spawned: Vec<String> = h.fake.0.borrow().spawned.iter().map(|(_, p)| p.task_id.clone()).collect();
    assert_eq!(spawned, ["t1", "t2", "t3"]);
}

#[test]
fn prefetched_orders_keep_to_the_slots_and_start_at_once_where_one_is_free() {
    let mut h = Harness::with_slots("", Some(1));
    assert!(prefetch(&mut h, 1, 0).is_some(), "a free slot: started on arrival");
    assert_eq!(reported(&mut h), [("started", 1)]);
    let first = h.fake.0.borrow().spawned[0].0;
    assert_eq!(prefetch(&mut h, 2, 0), None, "the one slot is taken, CPUs or not");
    h.end(first, Ending::Exited { code: 0 });
    h.worker.poll(h.at(1.0));
    assert_eq!(reported(&mut h), [("ended", 1), ("started", 2)]);
}

#[test]
fn prefetched_orders_are_handed_back_on_stop_and_interrupt() {
    let mut h = Harness::new("");
    h.launch(1, 4, None, h.at(0.0)).unwrap();
    prefetch(&mut h, 2, 1);
    prefetch(&mut h, 3, 1);
    h.worker.handle(Order::Stop { key: AttemptKey { task: 2, attempt: 0 } }, h.at(1.0));
    assert_eq!(reported(&mut h), [("returned", 2)]);
    h.worker.interrupt(h.at(2.0));
    assert_eq!(reported(&mut h), [("returned", 3)]);
    assert_eq!(h.fake.0.borrow().spawned.len(), 1, "neither ever started");
}

#[test]
fn a_recalled_order_goes_back_unless_it_started_and_the_running_one_is_left_alone() {
    let mut h = Harness::with_slots("", Some(1));
    let first = prefetch(&mut h, 1, 0).unwrap();
    assert_eq!(prefetch(&mut h, 2, 0), None);
    reported(&mut h);
    h.worker.handle(Order::Recall { key: AttemptKey { task: 2, attempt: 0 } }, h.at(1.0));
    assert_eq!(reported(&mut h), [("returned", 2)]);
    h.worker.handle(Order::Recall { key: AttemptKey { task: 1, attempt: 0 } }, h.at(1.0));
    assert!(reported(&mut h).is_empty(), "started already: its start said so");
    assert!(h.worker.busy(), "and it runs on");
    h.end(first, Ending::Exited { code: 0 });
    h.worker.poll(h.at(2.0));
    assert_eq!(reported(&mut h), [("ended", 1)], "the recalled one never starts here");
}

#[test]
fn prefetched_orders_go_back_when_dlaunch_itself_failed_here() {
    let mut h = Harness::with_slots("", Some(1));
    let first = prefetch(&mut h, 1, 0).unwrap();
    assert_eq!(prefetch(&mut h, 2, 0), None);
    reported(&mut h);
    h.end(first, Ending::Infrastructure { error: "No space left on device".into() });
    h.worker.poll(h.at(1.0));
    assert_eq!(reported(&mut h), [("ended", 1), ("returned", 2)], "not started into the same fault");
    assert_eq!(h.fake.0.borrow().spawned.len(), 1);
}

#[test]
fn a_process_gets_its_templates_record_with_its_orders_differences_over_it() {
    let mut h = Harness::new("");
    let shared = [("JOB", "j"), ("ONLY_SOME", "4"), ("RANK", "0")];
    let env = shared.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    h.worker.handle(Order::Template(TemplateRecord { template: 0, env }), h.at(0.0));
    let launch = Launch {
        env: vec![("RANK".into(), "3".into()), ("DLAUNCH_TASK_ID".into(), "t1".into())],
        unset: vec!["ONLY_SOME".into()],
        ..order(1, 1, None)
    };
    h.worker.handle(Order::Launch(Box::new(launch)), h.at(0.0));
    let fake = h.fake.0.borrow();
    let env = |k: &str| fake.spawned[0].1.env.get(std::ffi::OsStr::new(k)).cloned();
    assert_eq!(env("JOB"), Some("j".into()), "from the record");
    assert_eq!(env("RANK"), Some("3".into()), "the order's own value wins");
    assert_eq!(env("DLAUNCH_TASK_ID"), Some("t1".into()));
    assert_eq!(env("ONLY_SOME"), None, "unset by the order");
}

#[test]
fn an_order_whose_templates_record_never_came_fails_as_dlaunchs_fault_sent_ahead_or_not() {
    let mut h = Harness::new("");
    // The job has one template: a record for a second one is not kept.
    h.worker.handle(Order::Template(TemplateRecord { template: 1, env: vec![] }), h.at(0.0));
    let unknown = Launch { template: 1, ..order(1, 1, None) };
    h.worker.handle(Order::Launch(Box::new(unknown.clone())), h.at(0.0));
    let ahead = Launch { key: AttemptKey { task: 2, attempt: 0 }, prefetched: true, ..unknown };
    h.worker.handle(Order::Launch(Box::new(ahead)), h.at(0.0));
    assert!(h.fake.0.borrow().spawned.is_empty(), "nothing starts without its environment");
    let reports = h.worker.take_reports();
    let kinds: Vec<(&str, u32)> = reports
        .iter()
        .map(|r| match r {
            Report::Ended(end) => {
                let Ending::Infrastructure { error } = &end.ending else { panic!("{end:?}") };
                assert!(error.contains("before the record of its template 1"), "{error}");
                ("ended", end.key.task)
            }
            Report::Started { key, .. } => ("started", key.task),
            other => panic!("unexpected report {other:?}"),
        })
        .collect();
    assert_eq!(kinds, [("ended", 1), ("started", 2), ("ended", 2)], "a held order starts to have an end");
    assert!(!h.worker.busy());
}

#[test]
fn only_a_worker_holding_the_next_order_of_its_full_slots_waits_for_an_end() {
    let mut h = Harness::with_slots("", Some(1));
    assert!(!h.worker.waits_for_an_end(), "nothing runs: an order starts at once");
    let first = prefetch(&mut h, 1, 0).unwrap();
    assert!(!h.worker.waits_for_an_end(), "the next order is not here yet");
    assert_eq!(prefetch(&mut h, 2, 0), None);
    assert!(h.worker.waits_for_an_end(), "full, and holding the next order");
    h.end(first, Ending::Exited { code: 0 });
    h.worker.poll(h.at(1.0));
    assert!(!h.worker.waits_for_an_end(), "the held order started: the one after may come");
}
