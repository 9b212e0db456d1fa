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

/// The choice by a scan of every worker, as the scheduler made it before it had an index: the
/// reference the index must agree with.
fn scan_choose(workers: &[WorkerRoom], demand: &ProcessGroup) -> Option<Vec<usize>> {
    let rooms: Vec<u32> = workers.iter().map(|w| if w.healthy { w.free.room_for(&demand.each) } else { 0 }).collect();
    let n = demand.processes;
    if n == 1 && demand.per_node.is_none() {
        let best = (0..workers.len()).filter(|&w| rooms[w] > 0).max_by_key(|&w| (rooms[w], std::cmp::Reverse(w)))?;
        return Some(vec![best]);
    }
    let mut hosts: Vec<(usize, u64)> = Vec::new();
    for (w, worker) in workers.iter().enumerate() {
        match hosts.iter_mut().find(|(host, _)| *host == worker.host) {
            Some((_, total)) => *total += u64::from(rooms[w]),
            None => hosts.push((worker.host, u64::from(rooms[w]))),
        }
    }
    let plan: Vec<(usize, u32)> = match demand.per_node {
        Some(per_node) => {
            hosts.retain(|&(_, total)| total >= u64::from(per_node));
            hosts.sort_by_key(|&(host, total)| (total, host));
            let needed = (n / per_node) as usize;
            if hosts.len() < needed {
                return None;
            }
            hosts.iter().take(needed).map(|&(host, _)| (host, per_node)).collect()
        }
        None => match hosts.iter().filter(|&&(_, t)| t >= u64::from(n)).min_by_key(|&&(host, t)| (t, host)) {
            Some(&(host, _)) => vec![(host, n)],
            None => {
                hosts.sort_by_key(|&(host, total)| (std::cmp::Reverse(total), host));
                let mut left = n;
                let mut plan = Vec::new();
                for &(host, total) in hosts.iter().filter(|&&(_, total)| total > 0) {
                    if left == 0 {
                        break;
                    }
                    let here = left.min(total as u32);
                    plan.push((host, here));
                    left -= here;
                }
                if left > 0 {
                    return None;
                }
                plan
            }
        },
    };
    let mut chosen = Vec::new();
    for (host, count) in plan {
        let mut on_host: Vec<usize> = (0..workers.len()).filter(|&w| workers[w].host == host && rooms[w] > 0).collect();
        on_host.sort_by_key(|&w| (std::cmp::Reverse(rooms[w]), w));
        let mut left = count;
        for w in on_host {
            let here = left.min(rooms[w]);
            chosen.extend(std::iter::repeat_n(w, here as usize));
            left -= here;
        }
    }
    Some(chosen)
}

/// xorshift64*: a fixed random sequence without a dependency.
fn random(state: &mut u64, below: usize) -> usize {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    (state.wrapping_mul(0x2545_f491_4f6c_dd1d) % below as u64) as usize
}

#[test]
fn the_index_agrees_with_a_scan_through_take_give_and_unhealthy() {
    // 30 workers of three sizes on 8 hosts of 1 to 6 workers.
    let hosts: Vec<usize> = (0..30).map(|w| [0, 1, 1, 2, 2, 2, 3, 4, 4, 4, 4, 5, 6, 6, 6, 6, 6, 7][w % 18]).collect();
    let mut s = Scheduler::new(8);
    for (w, &host) in hosts.iter().enumerate() {
        s.add_worker(w as u32 + 1, host, cap(2 + w as u32 % 3, 4 + 2 * (w as u32 % 2), w as u32 % 3));
    }
    let groups = [
        group(1, 0, 1, None),
        group(2, 1, 1, None),
        group(1, 0, 3, None),
        group(1, 0, 4, Some(2)),
        group(1, 0, 9, None),
    ];
    let mut state = 0x9e37_79b9_7f4a_7c15;
    let mut running: Vec<(Vec<usize>, Resources)> = Vec::new();
    let (mut placed, mut refused) = (0, 0);
    for step in 0..3000 {
        let (rooms, workers) = s.rooms();
        match random(&mut state, 10) {
            0..=5 => {
                let group = groups[random(&mut state, groups.len())];
                let expected = scan_choose(workers, &group);
                let demand = Demand { groups: vec![group], time_needed: None };
                let chosen = rooms.choose(workers, &demand);
                assert_eq!(chosen, expected, "step {step}: {group:?}");
                match chosen {
                    Some(chosen) => {
                        placed += 1;
                        running.push((chosen, group.each));
                    }
                    None => refused += 1,
                }
            }
            6..=8 if !running.is_empty() => {
                let (chosen, each) = running.swap_remove(random(&mut state, running.len()));
                for w in chosen {
                    rooms.give(workers, w, &each);
                }
            }
            9 if step % 50 == 9 => {
                let w = random(&mut state, workers.len());
                rooms.set_unhealthy(workers, w);
            }
            _ => {}
        }
        rooms.assert_consistent(workers);
    }
    assert!(placed > 500 && refused > 100, "both paths exercised: {placed} placed, {refused} refused");
}

#[test]
fn dispatch_stops_once_every_queued_template_failed() {
    // Two workers, one with a GPU; 200,000 GPU tasks queued, and a CPU-only template with
    // nothing queued. The worker without a GPU keeps a free slot that no queued task can use.
    let mut s = scheduler(&[0, 1], cap(1, 1, 0), 8);
    s.workers[0].capacity.gpus = 1;
    s.workers[0].free.gpus = 1;
    let demands = [single(1, 1), single(1, 0)];
    for t in 0..200_000 {
        s.enqueue(t, 0);
    }
    assert_eq!(s.dispatch(&demands, None), [Dispatch { task: 0, ranks: vec![1] }]);
    // The first queued task fails, and with it its template, the only one queued: nothing
    // behind it is tried (walking the queue, this loop would take minutes).
    for _ in 0..5_000 {
        assert!(s.dispatch(&demands, None).is_empty());
    }
    assert_eq!(s.queue_len(), 199_999);
}

/// The scheduler as it was before the index and the linked queue: a scan of every worker per
/// choice and a VecDeque walked per dispatch, kept as the reference for the decisions.
struct Reference {
    workers: Vec<WorkerRoom>,
    queue: std::collections::VecDeque<(usize, usize, u32)>,
    limit: u32,
}

impl Reference {
    fn choose(&self, demand: &Demand) -> Option<Vec<usize>> {
        let mut scratch = self.workers.clone();
        let mut chosen = Vec::new();
        for group in &demand.groups {
            let placed = scan_choose(&scratch, group)?;
            for &w in &placed {
                scratch[w].free.take(&group.each);
            }
            chosen.extend(placed);
        }
        Some(chosen)
    }

    fn dispatch(&mut self, demands: &[Demand], time_left: Option<Duration>) -> Vec<Dispatch> {
        let mut started = Vec::new();
        let mut waiting: Vec<usize> = Vec::new();
        let mut failed: std::collections::HashSet<usize> = Default::default();
        let mut i = 0;
        while i < self.queue.len() && failed.len() < demands.len() {
            if !self.workers.iter().any(|w| w.healthy && w.free.slots > 0) {
                break;
            }
            let (task, template, bypassed) = self.queue[i];
            let demand = &demands[template];
            if let (Some(needed), Some(left)) = (demand.time_needed, time_left)
                && needed > left
            {
                i += 1;
                continue;
            }
            let chosen = if failed.contains(&template) { None } else { self.choose(demand) };
            let Some(chosen) = chosen else {
                failed.insert(template);
                if bypassed >= self.limit {
                    break;
                }
                waiting.push(i);
                i += 1;
                continue;
            };
            for (&w, each) in chosen.iter().zip(demand.per_process()) {
                self.workers[w].free.take(&each);
            }
            for &w in &waiting {
                self.queue[w].2 += 1;
            }
            started.push(Dispatch { task, ranks: chosen.iter().map(|&w| self.workers[w].rank).collect() });
            self.queue.remove(i);
            if waiting.iter().any(|&w| self.queue[w].2 >= self.limit) {
                break;
            }
        }
        started
    }

    fn holder(&self) -> Option<(usize, u32)> {
        self.queue.iter().find(|q| q.2 >= self.limit).map(|q| (q.0, q.2))
    }
}

#[test]
fn decisions_equal_those_of_the_scan_over_a_random_run() {
    compare_with_the_scan(false);
}

/// Tasks put back at the head (chosen, then short of ports) are counted apart from the lazy
/// runs of their templates: the same comparison with some of the started tasks put back.
#[test]
fn decisions_equal_those_of_the_scan_with_tasks_put_back_at_the_head() {
    compare_with_the_scan(true);
}

fn release_both(s: &mut Scheduler, reference: &mut Reference, done: &Dispatch, demand: &Demand) {
    for (&rank, each) in done.ranks.iter().zip(demand.per_process()) {
        s.release(rank, &each);
        let w = &mut reference.workers[rank as usize - 1];
        w.free.give(&each, &w.capacity);
    }
}

fn compare_with_the_scan(put_back: bool) {
    let hosts = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 4, 4];
    let mut s = Scheduler::new(3);
    let mut reference = Reference { workers: Vec::new(), queue: Default::default(), limit: 3 };
    for (w, &host) in hosts.iter().enumerate() {
        let capacity = cap(1 + w as u32 % 3, 4, w as u32 % 2);
        s.add_worker(w as u32 + 1, host, capacity);
        reference.workers.push(WorkerRoom { rank: w as u32 + 1, host, capacity, free: capacity, healthy: true });
    }
    let roles = Demand { groups: vec![group(1, 0, 1, None), group(1, 1, 2, None)], time_needed: None };
    let long = Demand { time_needed: Some(Duration::from_secs(3600)), ..single(1, 0) };
    let demands = [single(1, 0), single(2, 1), gang(3, None), gang(4, Some(2)), gang(7, None), roles, long];
    let mut state = 0x2545_f491_4f6c_dd1d;
    let mut template_of: Vec<usize> = Vec::new();
    let mut running: Vec<Dispatch> = Vec::new();
    let (mut decisions, mut held) = (0, 0);
    for step in 0..5000 {
        match random(&mut state, 16) {
            0..=4 => {
                let template = random(&mut state, demands.len());
                // As if chosen before and short of ports: put back at the head, where it waits.
                if put_back && random(&mut state, 4) == 0 {
                    s.requeue_front(template_of.len(), template);
                    reference.queue.push_front((template_of.len(), template, 0));
                } else {
                    s.enqueue(template_of.len(), template);
                    reference.queue.push_back((template_of.len(), template, 0));
                }
                template_of.push(template);
            }
            5..=8 => {
                let time_left = [None, Some(Duration::from_secs(60))][random(&mut state, 2)];
                let started = s.dispatch(&demands, time_left);
                assert_eq!(started, reference.dispatch(&demands, time_left), "step {step}");
                decisions += started.len();
                running.extend(started);
                if put_back && random(&mut state, 3) == 0 && !running.is_empty() {
                    let back = running.swap_remove(random(&mut state, running.len()));
                    release_both(&mut s, &mut reference, &back, &demands[template_of[back.task]]);
                    s.requeue_front(back.task, template_of[back.task]);
                    reference.queue.push_front((back.task, template_of[back.task], 0));
                }
            }
            9..=13 if !running.is_empty() => {
                let done = running.swap_remove(random(&mut state, running.len()));
                release_both(&mut s, &mut reference, &done, &demands[template_of[done.task]]);
            }
            14 if !reference.queue.is_empty() => {
                let (task, _, _) = reference.queue.remove(random(&mut state, reference.queue.len())).unwrap();
                assert!(s.remove(task));
            }
            15 if step % 400 == 15 => {
                let rank = 1 + random(&mut state, hosts.len()) as u32;
                s.set_unhealthy(rank);
                reference.workers[rank as usize - 1].healthy = false;
            }
            _ => {}
        }
        assert_eq!(s.holder(), reference.holder(), "step {step}");
        held += usize::from(s.holder().is_some());
        assert!(s.queued().eq(reference.queue.iter().map(|q| q.0)), "step {step}");
    }
    assert!(decisions > 500 && held > 100, "{decisions} decisions, {held} steps with a held queue");
}
