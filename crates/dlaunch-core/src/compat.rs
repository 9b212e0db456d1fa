//! Other launchers' variable names (`compat = ["openpai", "backendai"]`), so jobs ported from
//! them run unchanged. Each is derived from dlaunch's own contract (docs/environment.md has
//! both side by side); only tasks with roles get them, since both systems describe roles.

use crate::env::{Site, host_port, sites_by_role};
use crate::plan::Task;
use crate::spec::{Compat, Job, TaskTemplate};

/// The variables of every system the task's `compat` names.
pub fn all(job: &Job, task: &Task, template: &TaskTemplate, sites: &[Site], process: usize) -> Vec<(String, String)> {
    template.compat.iter().flat_map(|&system| variables(system, job, task, template, sites, process)).collect()
}

pub fn variables(
    system: Compat,
    job: &Job,
    task: &Task,
    template: &TaskTemplate,
    sites: &[Site],
    process: usize,
) -> Vec<(String, String)> {
    match system {
        Compat::OpenPai => openpai(job, task, template, sites, process),
        Compat::BackendAi => backendai(template, sites, process),
    }
}

/// This process's role and index in it, from its rank.
fn whoami(template: &TaskTemplate, process: usize) -> Option<(usize, usize)> {
    let role = template.role_of(process as u32)?;
    let first: u32 = template.roles[..role].iter().map(|r| r.processes).sum();
    Some((role, process - first as usize))
}

/// OpenPAI's names, of both the job protocol (v1) and the older (v0.x) runtime; role names as
/// written, values in OpenPAI's formats (lists comma-separated, host lists as `ip:port`).
fn openpai(job: &Job, task: &Task, template: &TaskTemplate, sites: &[Site], process: usize) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let mut set = |key: String, value: String| env.push((key, value));
    let by_role = sites_by_role(template, sites);
    set("PAI_JOB_NAME".into(), job.name.clone());
    if template.task_dir {
        set("PAI_OUTPUT_DIR".into(), crate::layout::task_dir(&job.output_dir, &task.id).to_string_lossy().into_owned());
    }
    set("PAI_TASK_ROLE_COUNT".into(), by_role.len().to_string());
    let names: Vec<&str> = by_role.iter().map(|(r, _)| r.name.as_str()).collect();
    set("PAI_TASK_ROLE_LIST".into(), names.join(","));
    for (role, part) in &by_role {
        let name = &role.name;
        set(format!("PAI_TASK_ROLE_TASK_COUNT_{name}"), part.len().to_string());
        let hosts: Vec<String> = part.iter().map(|s| host_port(&s.addr, s.port)).collect();
        set(format!("PAI_TASK_ROLE_{name}_HOST_LIST"), hosts.join(","));
        for (index, site) in part.iter().enumerate() {
            set(format!("PAI_HOST_IP_{name}_{index}"), String::from(&*site.addr));
            for (label, port) in role.ports.iter().zip(&site.labelled) {
                set(format!("PAI_PORT_LIST_{name}_{index}_{label}"), port.to_string());
            }
        }
    }
    if let Some((role, index)) = whoami(template, process) {
        let role = &template.roles[role];
        let site = &sites[process];
        set("PAI_CURRENT_TASK_ROLE_NAME".into(), role.name.clone());
        set("PAI_CURRENT_TASK_ROLE_CURRENT_TASK_INDEX".into(), index.to_string());
        set("PAI_TASK_ROLE_NAME".into(), role.name.clone());
        set("PAI_TASK_ROLE_INDEX".into(), index.to_string());
        set("PAI_TASK_ROLE_NUM".into(), role.processes.to_string());
        set("PAI_CURRENT_CONTAINER_IP".into(), String::from(&*site.addr));
        set("PAI_CONTAINER_HOST_IP".into(), String::from(&*site.addr));
        set("PAI_CURRENT_CONTAINER_PORT".into(), site.port.to_string());
        set("PAI_CONTAINER_HOST_PORT".into(), site.port.to_string());
        for (label, port) in role.ports.iter().zip(&site.labelled) {
            set(format!("PAI_CONTAINER_HOST_{label}_PORT_LIST"), port.to_string());
        }
    }
    env
}

/// Backend.AI's cluster-session names. Its containers have host names of their own (`main1`,
/// `sub2`); dlaunch's processes share hosts, so the host variables carry addresses that
/// resolve everywhere instead. `IDX` counts from 1 within a role, as Backend.AI's do.
fn backendai(template: &TaskTemplate, sites: &[Site], process: usize) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    let by_role = sites_by_role(template, sites);
    let replicas: Vec<String> = by_role.iter().map(|(r, part)| format!("{}:{}", r.name, part.len())).collect();
    let hosts: Vec<&str> = sites.iter().map(|s| &*s.addr).collect();
    let distinct: std::collections::BTreeSet<&str> = sites.iter().map(|s| &*s.host).collect();
    env.push(("BACKENDAI_CLUSTER_SIZE".into(), sites.len().to_string()));
    env.push(("BACKENDAI_CLUSTER_HOSTS".into(), hosts.join(",")));
    env.push(("BACKENDAI_CLUSTER_REPLICAS".into(), replicas.join(",")));
    env.push(("BACKENDAI_CLUSTER_MODE".into(), if distinct.len() > 1 { "multi-node" } else { "single-node" }.into()));
    env.push(("BACKENDAI_CLUSTER_LOCAL_RANK".into(), process.to_string()));
    if let Some((role, index)) = whoami(template, process) {
        env.push(("BACKENDAI_CLUSTER_ROLE".into(), template.roles[role].name.clone()));
        env.push(("BACKENDAI_CLUSTER_IDX".into(), (index + 1).to_string()));
        env.push(("BACKENDAI_CLUSTER_HOST".into(), String::from(&*sites[process].addr)));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openpai_and_backendai_names_in_their_formats() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job.toml");
        std::fs::write(
            &file,
            "[job]\nname = \"j\"\n[[tasks]]\nname = \"s\"\ncommand = \"true\"\ncompat = [\"openpai\", \"backendai\"]\n\
             [[tasks.roles]]\nname = \"main\"\n[[tasks.roles]]\nname = \"sub\"\nprocesses = 2\nports = [\"http\"]\n",
        )
        .unwrap();
        let job = crate::spec::load(&file).unwrap();
        let task = crate::plan::expand(&job).unwrap().remove(0);
        let site = |n: u16, labelled: Vec<u16>| Site {
            rank: 1,
            host: format!("node{}", n % 2).into(),
            addr: format!("10.0.0.{}", n % 2).into(),
            port: 29500 + n,
            labelled,
        };
        let sites = [site(0, vec![]), site(1, vec![29600]), site(2, vec![29601])];
        let mut env = crate::env::task_env(&job, &task, &job.templates[0], 0, &sites, 2);
        env.extend(all(&job, &task, &job.templates[0], &sites, 2));
        let get = |key: &str| env.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or("-");
        for (key, value) in [
            ("PAI_JOB_NAME", "j"),
            ("PAI_TASK_ROLE_LIST", "main,sub"),
            ("PAI_TASK_ROLE_TASK_COUNT_sub", "2"),
            ("PAI_CURRENT_TASK_ROLE_NAME", "sub"),
            ("PAI_CURRENT_TASK_ROLE_CURRENT_TASK_INDEX", "1"),
            ("PAI_TASK_ROLE_sub_HOST_LIST", "10.0.0.1:29501,10.0.0.0:29502"),
            ("PAI_CONTAINER_HOST_http_PORT_LIST", "29601"),
            ("PAI_PORT_LIST_sub_0_http", "29600"),
            ("PAI_HOST_IP_main_0", "10.0.0.0"),
            ("BACKENDAI_CLUSTER_SIZE", "3"),
            ("BACKENDAI_CLUSTER_ROLE", "sub"),
            ("BACKENDAI_CLUSTER_IDX", "2"),
            ("BACKENDAI_CLUSTER_REPLICAS", "main:1,sub:2"),
            ("BACKENDAI_CLUSTER_HOSTS", "10.0.0.0,10.0.0.1,10.0.0.0"),
            ("BACKENDAI_CLUSTER_HOST", "10.0.0.0"),
            ("BACKENDAI_CLUSTER_LOCAL_RANK", "2"),
            ("BACKENDAI_CLUSTER_MODE", "multi-node"),
            ("DLAUNCH_ROLE_SUB_HOSTS", "10.0.0.1:29501,10.0.0.0:29502"),
            ("DLAUNCH_PORT_HTTP", "29601"),
        ] {
            assert_eq!(get(key), value, "{key}");
        }
    }
}
