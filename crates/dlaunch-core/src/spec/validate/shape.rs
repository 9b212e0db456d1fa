//! A task's shape beyond one command: roles, what success means, ports enough for it, what it runs after, other launchers' variables.

use super::*;

impl Validator<'_> {
    /// Resolves `after` names to templates, then refuses cycles and matrix values that would
    /// make a task wait for nothing.
    pub(super) fn dependencies(&mut self, tasks: &[RawTask], templates: &mut [TaskTemplate]) {
        let names: Vec<&str> = tasks.iter().map(|t| t.name.as_str()).collect();
        for (i, task) in tasks.iter().enumerate().take(templates.len()) {
            let at = field(&["tasks"]).index(i).key("after");
            let mut after = Vec::new();
            for (j, name) in task.after.iter().flatten().enumerate() {
                match names.iter().position(|n| n == name) {
                    Some(dep) if !after.contains(&dep) => after.push(dep),
                    Some(_) => self.error(&at.index(j), format!("{name:?} is listed twice")),
                    None => self.error(&at.index(j), format!("unknown task {name:?}{}", one_of(&names, ""))),
                }
            }
            templates[i].after = after;
        }
        let edges: Vec<Vec<usize>> = templates.iter().map(|t| t.after.clone()).collect();
        if let Some(cycle) = crate::graph::find_cycle(&edges) {
            let path: Vec<&str> = cycle.iter().map(|&t| names[t]).collect();
            let first = cycle[0];
            let j = templates[first].after.iter().position(|&d| Some(&d) == cycle.get(1)).unwrap_or(0);
            self.error(
                &field(&["tasks"]).index(first).key("after").index(j),
                format!("dependency cycle: {} (each waits for the next, so none could start)", path.join(" → ")),
            );
        }
        for (i, template) in templates.iter().enumerate() {
            for (j, &dep) in template.after.iter().enumerate() {
                let other = &templates[dep];
                for key in template.shared_matrix_keys(other) {
                    let theirs = other.matrix.iter().find(|a| a.key == key).map(|a| a.values.as_slice()).unwrap_or(&[]);
                    let ours =
                        template.matrix.iter().find(|a| a.key == key).map(|a| a.values.as_slice()).unwrap_or(&[]);
                    if let Some(missing) = ours.iter().find(|v| !theirs.contains(v)) {
                        self.error(
                            &field(&["tasks"]).index(i).key("after").index(j),
                            format!(
                                "{}[{key}={missing}] would wait for no task of {}: {key} = {missing} is not among its values ({})",
                                template.name,
                                other.name,
                                theirs.join(", ")
                            ),
                        );
                    }
                }
            }
        }
    }

    /// `[[tasks.roles]]`: each role's defaults are the task's `cpus`, `gpus` and `memory`.
    pub(super) fn roles(
        &mut self,
        raw: &[RawRole],
        at: &FieldPath,
        defaults: Resources,
        task_command: bool,
    ) -> Vec<Role> {
        if raw.is_empty() {
            self.error(at, "the list of roles is empty: add [[tasks.roles]] entries or leave roles out");
        }
        let mut roles = Vec::with_capacity(raw.len());
        for (i, r) in raw.iter().enumerate() {
            let at = at.index(i);
            if !is_identifier(&r.name) {
                self.error(&at.key("name"), format!("invalid role name {:?}: use letters, digits and '_'", r.name));
            } else if let Some(other) = raw[..i].iter().find(|o| o.name.eq_ignore_ascii_case(&r.name)) {
                let variable = r.name.to_ascii_uppercase();
                self.error(
                    &at.key("name"),
                    format!(
                        "roles {} and {} would both set DLAUNCH_ROLE_{variable}_HOSTS: role names must differ",
                        other.name, r.name
                    ),
                );
            }
            match &r.command {
                Some(c) if c.trim().is_empty() => self.error(&at.key("command"), "the command is empty"),
                Some(c) if c.contains('\0') => self.error(&at.key("command"), "the command contains a NUL byte"),
                None if !task_command => {
                    self.error(&at.key("name"), format!("role {} has no command and the task has none", r.name))
                }
                _ => {}
            }
            let resources = Resources {
                cpus: r.cpus.map_or(defaults.cpus, |n| self.count(n, &at.key("cpus"), 0)),
                gpus: r.gpus.map_or(defaults.gpus, |n| self.count(n, &at.key("gpus"), 0)),
                memory: r.memory.as_ref().map_or(defaults.memory, |m| self.size(m, &at.key("memory")).unwrap_or(0)),
            };
            let processes = r.processes.map_or(1, |n| self.count(n, &at.key("processes"), 1));
            let processes_per_node = r.processes_per_node.map(|n| self.count(n, &at.key("processes_per_node"), 1));
            self.whole_hosts(processes, processes_per_node, &at);
            let ports = r.ports.clone().unwrap_or_default();
            for (j, label) in ports.iter().enumerate() {
                if !is_identifier(label) {
                    self.error(
                        &at.key("ports").index(j),
                        format!("invalid port label {label:?}: use letters, digits and '_'"),
                    );
                } else if ports[..j].iter().any(|o| o.eq_ignore_ascii_case(label)) {
                    self.error(&at.key("ports").index(j), format!("port label {label:?} is listed twice"));
                }
            }
            let wait_timeout = self.duration_or(r.wait_timeout.as_ref(), &at.key("wait_timeout"), DEFAULT_WAIT_TIMEOUT);
            roles.push(Role {
                name: r.name.clone(),
                command: r.command.clone(),
                resources,
                processes,
                processes_per_node,
                ports,
                wait_for: None,
                wait_timeout,
            });
        }
        let names: Vec<&str> = raw.iter().map(|r| r.name.as_str()).collect();
        for (i, r) in raw.iter().enumerate() {
            let Some(name) = &r.wait_for else { continue };
            let at = at.index(i).key("wait_for");
            match names.iter().position(|n| n == name) {
                Some(j) if j == i => self.error(&at, "a role cannot wait for itself"),
                Some(j) => roles[i].wait_for = Some(j),
                None => self.error(&at, format!("unknown role {name:?}{}", one_of(&names, ""))),
            }
        }
        let edges: Vec<Vec<usize>> = roles.iter().map(|r| r.wait_for.into_iter().collect()).collect();
        if let Some(cycle) = crate::graph::find_cycle(&edges) {
            let path: Vec<&str> = cycle.iter().map(|&r| names[r]).collect();
            self.error(
                &at.index(cycle[0]).key("wait_for"),
                format!("roles wait for each other: {} (none would ever start)", path.join(" → ")),
            );
        }
        roles
    }

    pub(super) fn compat(&mut self, names: Option<&[String]>, has_roles: bool, at: &FieldPath) -> Vec<Compat> {
        let mut compat = Vec::new();
        for (j, name) in names.into_iter().flatten().enumerate() {
            let system = match name.as_str() {
                "openpai" => Compat::OpenPai,
                "backendai" => Compat::BackendAi,
                other => {
                    self.error(
                        &at.index(j),
                        format!("unknown system {other:?}: expected \"openpai\" or \"backendai\""),
                    );
                    continue;
                }
            };
            if !has_roles {
                self.error(&at.index(j), format!("{name} variables describe roles: add [[tasks.roles]] to this task"));
            }
            if !compat.contains(&system) {
                compat.push(system);
            }
        }
        compat
    }

    /// Every process of a running task holds a port of `master_ports` on its host, and a gang
    /// may be packed onto one host: a range smaller than that could never start it.
    pub(super) fn ports_suffice(&mut self, templates: &[TaskTemplate], ports: PortRange) {
        let available = u32::from(ports.last - ports.first) + 1;
        for (i, t) in templates.iter().enumerate() {
            let (per_host, key) = if t.roles.is_empty() {
                match t.processes_per_node {
                    Some(n) => (n, "processes_per_node"),
                    None => (t.processes, "processes"),
                }
            } else {
                let ports =
                    |r: &Role| r.processes_per_node.unwrap_or(r.processes).saturating_mul(1 + r.ports.len() as u32);
                (t.roles.iter().fold(0u32, |n, r| n.saturating_add(ports(r))), "roles")
            };
            if per_host > available {
                let message = format!(
                    "up to {per_host} processes on one host need as many ports, but [job] master_ports \
                     holds {available}: widen master_ports or set a smaller processes_per_node"
                );
                self.error(&field(&["tasks"]).index(i).key(key), message);
            }
        }
    }

    pub(super) fn success(
        &mut self,
        value: Option<&Value>,
        processes: u32,
        roles: &[Role],
        at: &FieldPath,
    ) -> GangSuccess {
        let role = |name: &str| roles.iter().position(|r| r.name == name);
        match value {
            None => GangSuccess::All,
            Some(Value::String(s)) if s == "all" => GangSuccess::All,
            Some(Value::String(s)) if s == "rank0" => GangSuccess::Rank0,
            Some(Value::String(s)) if role(s).is_some() => GangSuccess::Role(role(s).unwrap_or(0) as u32),
            Some(Value::Integer(n)) if *n >= 1 && *n <= i64::from(processes) => GangSuccess::Count(*n as u32),
            Some(other) => {
                let names: Vec<&str> = roles.iter().map(|r| r.name.as_str()).collect();
                let role_names =
                    if names.is_empty() { String::new() } else { format!(", a role ({})", names.join(", ")) };
                self.error(
                    at,
                    format!("invalid value {other}: expected \"all\", \"rank0\"{role_names}, or a count from 1 to processes ({processes})"),
                );
                GangSuccess::All
            }
        }
    }
}
