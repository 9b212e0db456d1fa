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

/// A two-socket machine whose memory is this machine's, half on each NUMA node, seen from a
/// process whose cpuset (cgroup `cpuset.mems`/`cpuset.cpus`, Kubernetes' topology manager,
/// systemd's `AllowedMemoryNodes=`, a site's per-socket partitions) allows only socket 0 and
/// node 0: hwloc drops the disallowed node 1, as it does on such a real machine.
fn two_sockets_node_1_disallowed(half: u64) -> String {
    let core = |os: u32, gp: u32| {
        let set = format!("0x{:08x}", 1u32 << os);
        let ns = if os < 2 { "0x00000001" } else { "0x00000002" };
        format!(
            "<object type=\"Core\" os_index=\"{os}\" cpuset=\"{set}\" complete_cpuset=\"{set}\" nodeset=\"{ns}\" complete_nodeset=\"{ns}\" gp_index=\"{gp}\">\
             <object type=\"PU\" os_index=\"{os}\" cpuset=\"{set}\" complete_cpuset=\"{set}\" nodeset=\"{ns}\" complete_nodeset=\"{ns}\" gp_index=\"{}\"/></object>",
            gp + 1
        )
    };
    let package = |p: u32, cpus: &str, ns: &str, gp: u32| {
        format!(
            "<object type=\"Package\" os_index=\"{p}\" cpuset=\"{cpus}\" complete_cpuset=\"{cpus}\" nodeset=\"{ns}\" complete_nodeset=\"{ns}\" gp_index=\"{gp}\">\
             <object type=\"NUMANode\" os_index=\"{p}\" cpuset=\"{cpus}\" complete_cpuset=\"{cpus}\" nodeset=\"{ns}\" complete_nodeset=\"{ns}\" gp_index=\"{}\" local_memory=\"{half}\"/>\
             {}{}</object>",
            gp + 1,
            core(2 * p, gp + 2),
            core(2 * p + 1, gp + 4)
        )
    };
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE topology SYSTEM \"hwloc2.dtd\">\n<topology version=\"2.0\">\
         <object type=\"Machine\" os_index=\"0\" cpuset=\"0x0000000f\" complete_cpuset=\"0x0000000f\" allowed_cpuset=\"0x00000003\" \
         nodeset=\"0x00000003\" complete_nodeset=\"0x00000003\" allowed_nodeset=\"0x00000001\" gp_index=\"1\">{}{}</object></topology>\n",
        package(0, "0x00000003", "0x00000001", 10),
        package(1, "0x0000000c", "0x00000002", 20)
    )
}

/// Memory the kernel places on no NUMA node is counted on the nodes (`place_unplaced_memory`),
/// but memory on nodes this process may not use is not missing: hwloc shows only the nodes it
/// may allocate from, MemTotal counts them all. Compared with MemTotal, a process confined to
/// one socket of two was told that half the machine's memory sat on no node, and node 0 claimed
/// all of it, where the kernel cannot give it (found by a review).
#[test]
fn memory_of_disallowed_numa_nodes_is_not_counted_on_the_allowed_ones() {
    let half = dlaunch::host::machine_memory().expect("/proc/meminfo") / 2;
    let dir = tempfile::tempdir().unwrap();
    let xml = dir.path().join("two-sockets.xml");
    std::fs::write(&xml, two_sockets_node_1_disallowed(half)).unwrap();
    // HWLOC_THISSYSTEM=1: the description is this machine's (as dlaunch treats it), so the
    // machine's memory is read from /proc/meminfo, as on a real confined node.
    let out = Command::new(DLAUNCH)
        .args(["topo", "--json"])
        .env("HWLOC_XMLFILE", &xml)
        .env("HWLOC_THISSYSTEM", "1")
        .env_remove("CUDA_VISIBLE_DEVICES")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let topo: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(topo["is_this_system"], true);
    let nodes = topo["numa_nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "only the allowed node: {nodes:?}");
    assert_eq!(
        nodes[0]["memory"].as_u64(),
        Some(half),
        "node 0 holds half of the machine; the other half is node 1's, which this process may not use.\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("on no NUMA node"),
        "no memory is unplaced here: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
