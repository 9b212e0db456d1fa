//! Starting processes: placing them (with their GPU mates, or held until the coordinator's Start), and what the launcher said.

use super::*;

impl Machine {
    pub(super) fn remember(&mut self, record: TemplateRecord) {
        if record.template as usize >= self.job.templates.len() {
            log::warn!(
                "rank {}: a record of template {}, but the job has {} templates: ignored",
                self.rank,
                record.template,
                self.job.templates.len()
            );
            return;
        }
        self.records.insert(record.template, record);
    }

    /// Gives `launch` its full environment from its template's record; false when the record
    /// never came (the coordinator sends it first: a bug if not).
    pub(super) fn complete(&self, launch: &mut Launch) -> bool {
        let Some(record) = self.records.get(&launch.template) else { return false };
        launch.env = record.merge(&launch.env, &launch.unset);
        launch.unset = Vec::new();
        true
    }

    /// Ends an order whose environment cannot be known as an infrastructure failure: its
    /// task is not at fault. A prefetched one starts first, so that its end has an attempt.
    pub(super) fn refuse(&mut self, launch: Launch, wall: SystemTime) {
        let error = format!(
            "rank {} got the order for process {} of task {} before the record of its template {}: dlaunch's coordinator and worker disagree (a bug)",
            self.rank, launch.process, launch.task_id, launch.template
        );
        log::error!("{error}");
        if launch.prefetched {
            self.effects.push(Effect::Report(Report::Started { key: launch.key, time: wall }));
        }
        let end =
            ended(launch.key, launch.process, String::new(), vec![], Ending::Infrastructure { error }, None, wall);
        self.effects.push(Effect::Report(Report::Ended(end)));
    }

    /// Processes that see each other's GPUs are placed together once all their orders came
    /// (the coordinator sends them in one batch); the others at once.
    pub(super) fn launch(&mut self, launch: Launch, now: Instant, wall: SystemTime) {
        let (key, mates) = (launch.key, launch.gpu_mates.len());
        if mates <= 1 {
            return self.launch_together(vec![launch], now, wall);
        }
        let group = self.gathering.entry(key).or_default();
        group.push(launch);
        if group.len() == mates
            && let Some(mut group) = self.gathering.remove(&key)
        {
            group.sort_by_key(|l| l.process);
            self.launch_together(group, now, wall);
        }
    }

    /// Places every process of `launches` or none, then starts each seeing the GPUs of all.
    pub(super) fn launch_together(&mut self, launches: Vec<Launch>, now: Instant, wall: SystemTime) {
        let mut placements: Vec<Placement> = Vec::with_capacity(launches.len());
        for launch in &launches {
            let want = launch.resources;
            if let Some(placement) = self.placer.place(want.cpus, want.gpus) {
                placements.push(placement);
                continue;
            }
            let (free_cpus, free_gpus) = self.placer.free();
            let error = format!(
                "rank {} has {free_cpus} free CPUs and {free_gpus} free GPUs, the task needs {} and {}",
                self.rank, want.cpus, want.gpus
            );
            placements.iter().for_each(|p| self.placer.release(p));
            for launch in &launches {
                let ending = Ending::LaunchFailed { error: error.clone() };
                let end = ended(launch.key, launch.process, String::new(), vec![], ending, None, wall);
                self.effects.push(Effect::Report(Report::Ended(end)));
            }
            return;
        }
        let own: Vec<Vec<String>> = placements.iter().map(|p| self.placer.gpu_ids(p)).collect();
        if launches[0].hold {
            let key = launches[0].key;
            let gpus = launches.iter().map(|l| l.process).zip(own).collect();
            self.holding.insert(key, launches.into_iter().zip(placements).collect());
            self.effects.push(Effect::Report(Report::Placed { key, gpus }));
            return;
        }
        for (i, (launch, placement)) in launches.into_iter().zip(placements).enumerate() {
            let visible = task_visible_gpus(&own, i);
            self.spawn_placed(launch, placement, (&visible.0, visible.1), now, wall);
        }
    }

    /// Starts orders sent ahead of room, first come first, while there is room: a slot (the
    /// coordinator counts them; the worker only keeps to its count) and CPUs and GPUs to place
    /// them on. Each start is reported first: from then on its attempt runs.
    pub(super) fn start_prefetched(&mut self, now: Instant, wall: SystemTime) {
        while let Some(next) = self.prefetched.front() {
            let occupied =
                self.running.len() + self.starting.len() + self.holding.values().map(Vec::len).sum::<usize>();
            if self.slots.is_some_and(|slots| occupied >= slots as usize) {
                return;
            }
            let want = next.resources;
            let Some(placement) = self.placer.place(want.cpus, want.gpus) else { return };
            let Some(launch) = self.prefetched.pop_front() else { return };
            self.effects.push(Effect::Report(Report::Started { key: launch.key, time: wall }));
            let own = self.placer.gpu_ids(&placement);
            self.spawn_placed(launch, placement, (&own, 0), now, wall);
        }
    }

    /// dlaunch itself failed here (a full disk, no fork): what this worker holds goes back
    /// rather than start into the same fault before rank 0, told of it, stops dispatching.
    pub(super) fn return_prefetched_after_fault(&mut self) {
        self.return_prefetched(|_| true);
    }

    /// Hands back the orders sent ahead of room that `matches` names: they never started.
    pub(super) fn return_prefetched(&mut self, matches: impl Fn(AttemptKey) -> bool) {
        let (back, kept): (Vec<Launch>, Vec<Launch>) = self.prefetched.drain(..).partition(|l| matches(l.key));
        self.prefetched = kept.into();
        self.effects.extend(back.into_iter().map(|l| Effect::Report(Report::Returned { key: l.key })));
    }

    /// Starts the held processes of `key`, each finding its own GPUs in `visible`.
    pub(super) fn start_held(&mut self, key: AttemptKey, visible: &[String], now: Instant, wall: SystemTime) {
        let Some(held) = self.holding.remove(&key) else {
            log::warn!("rank {}: told to start {key:?}, which holds nothing here", self.rank);
            return;
        };
        for (launch, placement) in held {
            let own = self.placer.gpu_ids(&placement);
            let offset = own.first().and_then(|g| visible.iter().position(|v| v == g)).unwrap_or(0);
            self.spawn_placed(launch, placement, (visible, offset), now, wall);
        }
    }

    /// Gives back what held processes reserved and reports them ended as `ending`: they never ran.
    pub(super) fn release_held(&mut self, matches: impl Fn(AttemptKey) -> bool, ending: Ending, wall: SystemTime) {
        let keys: Vec<AttemptKey> = self.holding.keys().copied().filter(|&k| matches(k)).collect();
        for key in keys {
            for (launch, placement) in self.holding.remove(&key).unwrap_or_default() {
                self.placer.release(&placement);
                let end = ended(key, launch.process, String::new(), vec![], ending.clone(), None, wall);
                self.effects.push(Effect::Report(Report::Ended(end)));
            }
        }
    }

    pub(super) fn spawn_placed(
        &mut self,
        launch: Launch,
        placement: Placement,
        visible: (&[String], usize),
        now: Instant,
        wall: SystemTime,
    ) {
        let want = launch.resources;
        let gpus = self.placer.gpu_ids(&placement);
        let cpus = cpu_list(&placement.cpus);
        let amd = placement.gpus.iter().any(|&g| self.placer.topology().gpus[g].vendor == GpuVendor::Amd);
        let numa = cpu_list(&placement.numa_nodes);
        let placed = placement_env(&cpus, &numa, &gpus, visible, amd, want.cpus);
        let datasets: Vec<(String, String)> = launch
            .datasets
            .iter()
            .filter_map(|name| {
                let path = self.datasets.get(name)?;
                Some((crate::spec::dataset_env_var(name), path.to_string_lossy().into_owned()))
            })
            .collect();
        let env = compose(&self.inherited, &[&placed, &datasets, &launch.env]);
        let bound = self.bind && !placement.cpus.is_empty();
        let many_nodes = self.placer.topology().numa_nodes.len() > 1;
        let plan = SpawnPlan {
            task_id: launch.task_id.clone(),
            attempt: launch.key.attempt,
            process: launch.process,
            command: launch.command,
            workdir: launch.workdir,
            env,
            output_dir: self.job.output_dir.clone(),
            log_dir: launch.log_dir,
            share: self.job.share,
            log_limit: self.job.log_limit,
            cpus: if bound { placement.cpus.clone() } else { vec![] },
            mem_nodes: if bound && many_nodes { placement.numa_nodes.clone() } else { vec![] },
            ports: launch.ports,
            outputs: launch.outputs,
        };
        let running = Child {
            key: launch.key,
            task_id: launch.task_id,
            process: launch.process,
            placement,
            cpus,
            gpus,
            start: wall,
            deadline: launch.timeout.map(|t| now + t),
            timeout: launch.timeout,
            kill: None,
        };
        self.starting.push(Starting { key: launch.key, process: launch.process, running });
        self.effects.push(Effect::Spawn { key: launch.key, process: launch.process, plan: Box::new(plan) });
    }

    /// The launcher's answer to `Effect::Spawn`.
    pub fn spawned(&mut self, key: AttemptKey, process: u32, outcome: Result<Pid, SpawnFailure>, wall: SystemTime) {
        let Some(i) = self.starting.iter().position(|s| s.key == key && s.process == process) else {
            log::warn!("rank {}: the launcher answered for a process it was not asked to start", self.rank);
            return;
        };
        let Starting { running, .. } = self.starting.swap_remove(i);
        match outcome {
            Ok(pid) => {
                log::debug!(
                    "rank {}: started {} process {} as pid {pid} on CPUs {}",
                    self.rank,
                    running.task_id,
                    running.process,
                    running.cpus
                );
                self.running.insert(pid, running);
            }
            Err(failure) => {
                self.placer.release(&running.placement);
                let ending = match failure {
                    SpawnFailure::Task(error) => Ending::LaunchFailed { error },
                    SpawnFailure::Infrastructure(error) => Ending::Infrastructure { error },
                    SpawnFailure::PortInUse(port) => Ending::PortInUse { port, host: self.host.clone() },
                };
                let fault = matches!(ending, Ending::Infrastructure { .. });
                let end = ended(key, process, running.cpus, running.gpus, ending, Some(running.start), wall);
                self.effects.push(Effect::Report(Report::Ended(end)));
                if fault {
                    self.return_prefetched_after_fault();
                }
            }
        }
    }
}
