//! Unit tests of `sched`, compiled only with #[cfg(test)] (declared in its mod.rs).
use super::*;

fn cap(slots: u32, cpus: u32, gpus: u32) -> Capacity {
    Capacity { slots, cpus, gpus, memory: 1 << 40 }
}

fn group(cpus: u32, gpus: u32, processes: u32, per_node: Option<u32>) -> ProcessGroup {
    ProcessGroup { each: Resources { cpus, gpus, memory: 0 }, processes, per_node }
}

fn single(cpus: u32, gpus: u32) -> Demand {
    Demand { groups: vec![group(cpus, gpus, 1, None)], time_needed: None }
}

fn gang(processes: u32, per_node: Option<u32>) -> Demand {
    Demand { groups: vec![group(1, 0, processes, per_node)], time_needed: None }
}

/// Ranks 1..=n on hosts given by `hosts[i]`, each with `capacity`.
fn scheduler(hosts: &[usize], capacity: Capacity, backfill: u32) -> Scheduler {
    let mut s = Scheduler::new(backfill);
    for (i, &host) in hosts.iter().enumerate() {
        s.add_worker(i as u32 + 1, host, capacity);
    }
    s
}

fn finish(s: &mut Scheduler, d: &Dispatch, demand: &Demand) {
    for (&rank, each) in d.ranks.iter().zip(demand.per_process()) {
        s.release(rank, &each);
    }
}

#[test]
fn fifo_spread_over_workers_never_beyond_slots() {
    let mut s = scheduler(&[0, 1, 2], cap(2, 8, 0), 8);
    for t in 0..10 {
        s.enqueue(t, 0);
    }
    let demands = [single(1, 0)];
    let started = s.dispatch(&demands, None);
    let tasks: Vec<usize> = started.iter().map(|d| d.task).collect();
    assert_eq!(tasks, [0, 1, 2, 3, 4, 5], "FIFO, and only as many as slots");
    let ranks: Vec<u32> = started.iter().map(|d| d.ranks[0]).collect();
    assert_eq!(ranks, [1, 2, 3, 1, 2, 3], "spread over workers");
    assert!(s.dispatch(&demands, None).is_empty(), "never pushes to a full worker");
    finish(&mut s, &started[1], &demands[0]);
    let next = s.dispatch(&demands, None);
    assert_eq!(next, [Dispatch { task: 6, ranks: vec![2] }], "the freed worker gets the next task");
}

#[test]
fn resources_limit_admission() {
    let mut s = scheduler(&[0], cap(u32::MAX, 4, 2), 8);
    for t in 0..4 {
        s.enqueue(t, 0);
    }
    let demands = [single(1, 1)];
    assert_eq!(s.dispatch(&demands, None).len(), 2, "two GPUs, two tasks");
    let mut s = scheduler(&[0], cap(u32::MAX, 4, 0), 8);
    for t in 0..4 {
        s.enqueue(t, 0);
    }
    assert_eq!(s.dispatch(&[single(3, 0)], None).len(), 1, "four CPUs, one 3-CPU task");
}

#[test]
fn first_fitting_task_goes_to_the_worker_that_has_room() {
    let mut s = scheduler(&[0, 1], cap(4, 4, 0), 8);
    s.workers[1].capacity.gpus = 1;
    s.workers[1].free.gpus = 1;
    s.enqueue(0, 1);
    s.enqueue(1, 0);
    let demands = [single(1, 0), single(1, 1)];
    let started = s.dispatch(&demands, None);
    assert_eq!(started[0], Dispatch { task: 0, ranks: vec![2] }, "the GPU task goes where the GPU is");
}

#[test]
fn gangs_pack_onto_as_few_nodes_as_possible() {
    // Nodes 0 and 1 have two workers each with 2 slots; host 2 has one worker with 2 slots.
    let mut s = scheduler(&[0, 0, 1, 1, 2], cap(2, 2, 0), 8);
    s.enqueue(0, 0);
    s.enqueue(1, 1);
    let demands = [gang(4, None), gang(2, None)];
    let started = s.dispatch(&demands, None);
    assert_eq!(started[0].ranks, [1, 1, 2, 2], "four processes on one host");
    assert_eq!(started[1].ranks, [5, 5], "the tightest host that holds the pair");
}

#[test]
fn gangs_spanning_nodes_and_per_node_counts() {
    let mut s = scheduler(&[0, 1, 2], cap(2, 2, 0), 8);
    s.enqueue(0, 0);
    let started = s.dispatch(&[gang(5, None)], None);
    assert_eq!(started[0].ranks, [1, 1, 2, 2, 3]);
    let mut s = scheduler(&[0, 1, 2], cap(4, 4, 0), 8);
    s.enqueue(0, 0);
    let started = s.dispatch(&[gang(4, Some(2))], None);
    assert_eq!(started[0].ranks, [1, 1, 2, 2], "two per host, on two hosts");
}

#[test]
fn a_gang_is_reserved_whole_or_not_at_all() {
    let mut s = scheduler(&[0, 1], cap(2, 2, 0), 100);
    s.enqueue(0, 1);
    s.enqueue(1, 0);
    let demands = [gang(4, None), single(1, 0)];
    let started = s.dispatch(&demands, None);
    assert_eq!(started, [Dispatch { task: 0, ranks: vec![1] }]);
    let before: Vec<Capacity> = s.workers().iter().map(|w| w.free).collect();
    assert!(s.dispatch(&demands, None).is_empty());
    let after: Vec<Capacity> = s.workers().iter().map(|w| w.free).collect();
    assert_eq!(before, after, "a gang that does not fit takes nothing");
}

#[test]
fn small_tasks_backfill_but_cannot_starve_a_gang() {
    let mut s = scheduler(&[0, 1], cap(2, 2, 0), 3);
    let demands = [single(1, 0), gang(4, None)];
    s.enqueue(0, 0);
    s.enqueue(1, 1);
    for t in 2..20 {
        s.enqueue(t, 0);
    }
    let mut running: Vec<Dispatch> = s.dispatch(&demands, None);
    let mut order: Vec<usize> = running.iter().map(|d| d.task).collect();
    for _ in 0..40 {
        let Some(done) = running.first().cloned() else {
            break;
        };
        running.remove(0);
        let demand = if done.task == 1 { &demands[1] } else { &demands[0] };
        finish(&mut s, &done, demand);
        let started = s.dispatch(&demands, None);
        order.extend(started.iter().map(|d| d.task));
        running.extend(started);
    }
    let gang_position = order.iter().position(|&t| t == 1).expect("the gang ran");
    assert!(gang_position <= 1 + 3 + 1, "at most backfill_limit small tasks overtook it: {order:?}");
    assert_eq!(order.len(), 20, "everything ran: {order:?}");
}

#[test]
fn a_waiting_gang_lets_small_tasks_use_the_gaps_meanwhile() {
    let mut s = scheduler(&[0, 1], cap(2, 2, 0), 10);
    let demands = [single(1, 0), gang(4, None)];
    s.enqueue(0, 0);
    s.enqueue(1, 1);
    s.enqueue(2, 0);
    s.enqueue(3, 0);
    let started: Vec<usize> = s.dispatch(&demands, None).iter().map(|d| d.task).collect();
    assert_eq!(started, [0, 2, 3]);
}

#[test]
fn tasks_that_need_more_time_than_is_left_stay_queued_without_blocking() {
    let mut s = scheduler(&[0], cap(4, 4, 0), 0);
    let long = Demand { time_needed: Some(Duration::from_secs(3600)), ..single(1, 0) };
    let demands = [long, single(1, 0)];
    s.enqueue(0, 0);
    s.enqueue(1, 1);
    let started = s.dispatch(&demands, Some(Duration::from_secs(600)));
    assert_eq!(started.iter().map(|d| d.task).collect::<Vec<_>>(), [1]);
    assert_eq!(s.queued().collect::<Vec<_>>(), [0]);
    assert_eq!(s.dispatch(&demands, Some(Duration::from_secs(7200))).len(), 1);
}

#[test]
fn unhealthy_workers_get_nothing() {
    let mut s = scheduler(&[0, 1], cap(2, 2, 0), 8);
    s.set_unhealthy(1);
    for t in 0..4 {
        s.enqueue(t, 0);
    }
    let started = s.dispatch(&[single(1, 0)], None);
    assert!(started.iter().all(|d| d.ranks == [2]));
    assert_eq!(started.len(), 2);
}

#[test]
fn fit_checks_use_full_capacity() {
    let mut s = scheduler(&[0, 1], cap(2, 8, 1), 8);
    assert!(s.fits_when_idle(&single(8, 1)));
    assert!(!s.fits_when_idle(&single(9, 0)));
    assert!(!s.fits_when_idle(&single(1, 2)));
    assert!(s.fits_when_idle(&gang(4, None)));
    assert!(!s.fits_when_idle(&gang(5, None)));
    assert!(!s.fits_when_idle(&gang(4, Some(1))), "per_node 1 needs four hosts");
    s.enqueue(0, 0);
    s.dispatch(&[single(8, 1)], None);
    assert!(s.fits_when_idle(&single(8, 1)), "busy now, but fits when idle");
    assert_eq!(s.largest_worker().map(|w| w.capacity.cpus), Some(8));
}

#[test]
fn dispatch_of_a_long_homogeneous_queue_is_cheap_when_full() {
    let mut s = scheduler(&[0], cap(1, 1, 0), 8);
    for t in 0..200_000 {
        s.enqueue(t, 0);
    }
    let demands = [single(1, 0)];
    assert_eq!(s.dispatch(&demands, None).len(), 1);
    // Full: returns at once rather than scanning 200k entries (this loop would take seconds otherwise).
    for _ in 0..10_000 {
        assert!(s.dispatch(&demands, None).is_empty());
    }
}

#[test]
fn roles_are_placed_whole_or_not_at_all() {
    let mut s = scheduler(&[0, 1], cap(8, 8, 4), 8);
    // Two parameter servers without GPUs and two workers with 4 GPUs each.
    let pai = Demand { groups: vec![group(1, 0, 2, None), group(1, 4, 2, None)], time_needed: None };
    s.enqueue(0, 0);
    s.enqueue(1, 0);
    let started = s.dispatch(std::slice::from_ref(&pai), None);
    assert_eq!(started.len(), 1, "the second needs GPUs that are taken");
    let ranks = &started[0].ranks;
    assert_eq!(ranks.len(), 4);
    assert_ne!(ranks[2], ranks[3], "each worker on a host with 4 GPUs");
    assert_eq!(s.queue_len(), 1, "nothing of the second was started");
    finish(&mut s, &started[0], &pai);
    assert_eq!(s.dispatch(std::slice::from_ref(&pai), None).len(), 1);
}

#[test]
fn the_task_that_used_up_its_backfill_budget_holds_the_queue() {
    let mut s = scheduler(&[0], cap(2, 2, 0), 1);
    let classes = [single(1, 0), gang(4, None)];
    s.enqueue(0, 1);
    s.enqueue(1, 0);
    s.enqueue(2, 0);
    assert!(s.holder().is_none());
    let started = s.dispatch(&classes, None);
    assert_eq!(started.iter().map(|d| d.task).collect::<Vec<_>>(), [1], "one task overtook the gang, then it held");
    assert_eq!(s.holder(), Some((0, 1)));
}
