//! Hardware-aware placement across ranks, on real machine topologies loaded from hwloc XML
//! (the GPUs of a POWER8 node with 4 P100s); real CPU binding is checked in tests/run.rs.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

use common::*;

fn topology_json(xml: &str) -> serde_json::Value {
    let out = Command::new(DLAUNCH).args(["topo", "--json"]).env("HWLOC_XMLFILE", fixture(xml)).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn gpu_tasks_get_their_own_gpu_and_cores_of_its_numa_node() {
    let xml = "topologies/power8gpudistances.xml";
    let topo = topology_json(xml);
    let gpu_numa = |id: &str| topo["gpus"].as_array().unwrap().iter().find(|g| g["id"] == id).unwrap()["numa"].clone();
    let pu_numa = |pu: u32| {
        topo["cores"].as_array().unwrap().iter().find(|c| c["pus"].as_array().unwrap().contains(&pu.into())).unwrap()
            ["numa"]
            .clone()
    };
    let meeting = tempfile::tempdir().unwrap();
    let job = format!(
        "[job]\nname = \"gpus\"\n[[tasks]]\nname = \"t\"\ncommand = \"env > $DLAUNCH_TASK_DIR/env; {}\"\ngpus = 1\ncpus = 2\nmatrix = {{ i = [1, 2, 3, 4] }}\n",
        barrier(meeting.path(), 4)
    );
    let dir = JobDir::new(&job);
    let mut command = dir.mpirun_command(3, &[]);
    command.env("HWLOC_XMLFILE", fixture(xml));
    let out = wait_with_limit(command.spawn().unwrap(), std::time::Duration::from_secs(300));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read_dir(meeting.path()).unwrap().count(), 4, "all four ran at once");
    let mut gpus = BTreeSet::new();
    let mut cpus_seen = BTreeSet::new();
    for i in 1..=4 {
        let env = read_env(&dir.output("gpus").join(format!("tasks/t[i={i}]/env")));
        let gpu = env["CUDA_VISIBLE_DEVICES"].clone();
        assert_eq!(env["DLAUNCH_GPUS"], gpu);
        assert!(gpus.insert(gpu.clone()), "GPU {gpu} given twice");
        let cpus = parse_cpu_list(&env["DLAUNCH_CPUS"]);
        assert_eq!(cpus.len(), 2);
        assert_eq!(env["OMP_NUM_THREADS"], "2");
        for cpu in &cpus {
            assert!(cpus_seen.insert(*cpu), "CPU {cpu} given twice");
            assert_eq!(pu_numa(*cpu), gpu_numa(&gpu), "CPU {cpu} is not on GPU {gpu}'s NUMA node");
        }
        assert_eq!(env["DLAUNCH_NUMA_NODES"], gpu_numa(&gpu).to_string());
    }
    assert_eq!(gpus.len(), 4);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("2 GPUs (0,1)") && stderr.contains("2 GPUs (2,3)"),
        "the node's GPUs split by locality: {stderr}"
    );
    assert!(stderr.contains("not bound"), "binding is skipped for a foreign topology: {stderr}");
}

#[test]
fn a_worker_only_hands_out_the_gpus_it_was_given() {
    let xml = "topologies/power8gpudistances.xml";
    let dir = JobDir::new(
        "[job]\nname = \"cvd\"\n[[tasks]]\nname = \"t\"\ncommand = \"echo $CUDA_VISIBLE_DEVICES > $DLAUNCH_TASK_DIR/gpu\"\ngpus = 1\nmatrix = { i = [1, 2, 3, 4] }\n",
    );
    let mut command = dir.mpirun_command(2, &[]);
    command.env("HWLOC_XMLFILE", fixture(xml)).env("CUDA_VISIBLE_DEVICES", "1,3");
    let out = wait_with_limit(command.spawn().unwrap(), std::time::Duration::from_secs(300));
    assert!(out.status.success(), "{}", text(&out));
    for i in 1..=4 {
        let gpu = std::fs::read_to_string(dir.output("cvd").join(format!("tasks/t[i={i}]/gpu"))).unwrap();
        assert!(["1", "3"].contains(&gpu.trim()), "task {i} got GPU {gpu}");
    }
}

#[test]
fn a_task_that_fits_nowhere_is_refused_at_start() {
    let xml = "topologies/power8gpudistances.xml";
    let dir = JobDir::new("[job]\nname = \"big\"\n[[tasks]]\nname = \"huge\"\ncommand = \"true\"\ngpus = 3\n");
    let mut command = dir.mpirun_command(3, &[]);
    command.env("HWLOC_XMLFILE", fixture(xml));
    let out = wait_with_limit(command.spawn().unwrap(), std::time::Duration::from_secs(300));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("task huge needs 1 CPUs, 3 GPUs"), "{stderr}");
    assert!(stderr.contains("the largest worker has unlimited slots, 8 CPUs, 2 GPUs"), "{stderr}");
}

#[test]
fn cpu_only_tasks_see_no_gpu_and_topo_reports_this_machine() {
    let topo: serde_json::Value =
        serde_json::from_slice(&Command::new(DLAUNCH).args(["topo", "--json"]).output().unwrap().stdout).unwrap();
    assert_eq!(topo["is_this_system"], true);
    assert!(!topo["allowed_cpus"].as_array().unwrap().is_empty());
    let out = Command::new(DLAUNCH).arg("topo").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("Allowed CPUs"));
    let dir =
        JobDir::new("[job]\nname = \"cpu\"\n[[tasks]]\nname = \"t\"\ncommand = \"env > $DLAUNCH_TASK_DIR/env\"\n");
    let mut command = dir.mpirun_command(2, &[]);
    command.env("CUDA_VISIBLE_DEVICES", "0");
    let out = wait_with_limit(command.spawn().unwrap(), std::time::Duration::from_secs(300));
    assert!(out.status.success(), "{}", text(&out));
    let env = read_env(&dir.output("cpu").join("tasks/t/env"));
    assert_eq!(env["CUDA_VISIBLE_DEVICES"], "", "a task without GPUs sees none");
}

#[test]
fn memory_admission_respects_the_allocations_limit() {
    // SLURM's --mem of 100 MB, shared by the node's two workers: 50 MiB each.
    let dir = JobDir::new(
        "[job]\nname = \"mem\"\n[[tasks]]\nname = \"small\"\ncommand = \"true\"\nmemory = \"40MiB\"\n[[tasks]]\nname = \"big\"\ncommand = \"true\"\nmemory = \"80MiB\"\n",
    );
    let mut command = dir.mpirun_command(3, &[]);
    command.env("SLURM_MEM_PER_NODE", "100");
    let out = wait_with_limit(command.spawn().unwrap(), std::time::Duration::from_secs(300));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("task big needs 1 CPUs, 0 GPUs, 80 MiB"), "{stderr}");
    assert!(stderr.contains("50 MiB (rank"), "{stderr}");
}
