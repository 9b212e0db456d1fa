//! scripts/gpu-check.sh, the one-command check for GPU nodes, run on its XML path: with no
//! GPU here it runs the same job and checks against the GPU topology of a POWER8 node with
//! four P100s and exits 77. A dlaunch that breaks placement must make it fail. Its real-node
//! path runs against a made-up CUDA driver (tests/fixtures/fake_libcuda.c).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/gpu-check.sh");
const POWER8: &str = "topologies/power8gpudistances.xml";

/// Runs the script with `dlaunch` (the binary under test, or a wrapper around it), the
/// record written under `out`, and `env` (GPU_CHECK_XML forces the XML path).
fn gpu_check(dlaunch: &Path, out: &Path, env: &[(&str, &Path)]) -> Output {
    let mut command = Command::new("bash");
    command
        .arg(SCRIPT)
        .env("GPU_CHECK_DLAUNCH", dlaunch)
        .env("GPU_CHECK_OUT", out)
        .envs(MPI_ENV.iter().copied())
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("HWLOC_XMLFILE")
        .env_remove("GPU_CHECK_MPIRUN")
        .env_remove("GPU_CHECK_XML")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    wait_with_limit(command.spawn().expect("spawn gpu-check.sh"), Duration::from_secs(240))
}

/// The table's rows as (result, check, detail).
fn rows(output: &Output) -> Vec<(String, String, String)> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .skip_while(|l| !l.starts_with("RESULT"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(|l| {
            let (result, rest) = l.split_once("  ").expect("result column");
            let rest = rest.trim_start();
            let (check, detail) = rest.split_once("  ").unwrap_or((rest, ""));
            (result.trim().to_string(), check.trim().to_string(), detail.trim().to_string())
        })
        .collect()
}

fn record(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("gpu-check.json")).expect("gpu-check.json");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("the record is not JSON ({e}):\n{text}"))
}

/// A shell script standing in for dlaunch: `body` runs with $DLAUNCH naming the real one.
fn wrapper(dir: &Path, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("dlaunch-wrapper");
    std::fs::write(&path, format!("#!/bin/sh\nDLAUNCH={DLAUNCH}\n{body}\n")).expect("write wrapper");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
    path
}

#[test]
fn without_a_gpu_it_checks_a_gpu_topology_and_exits_77() {
    let out = tempfile::tempdir().unwrap();
    let output = gpu_check(Path::new(DLAUNCH), out.path(), &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let rows = rows(&output);
    let failed: Vec<_> = rows.iter().filter(|r| r.0 == "FAIL").collect();
    assert!(failed.is_empty(), "{failed:?}\n{}", text(&output));
    if !stdout.contains("no GPU on this machine") {
        // A machine with a CUDA driver and GPUs gets the real check instead.
        assert_eq!(output.status.code(), Some(0), "{}", text(&output));
        return;
    }
    assert_eq!(output.status.code(), Some(77), "{}", text(&output));
    assert!(stdout.contains("GPU 3 (Nvidia): Tesla P100-SXM2-16GB"), "prints dlaunch topo: {stdout}");
    let passed = |check: &str| rows.iter().any(|r| r.0 == "PASS" && r.1 == check);
    for check in [
        "cuda-probe",
        "GPU NUMA locality",
        "full: dlaunch",
        "full per-gpu[n=0] ran at once",
        "full per-gpu[n=3] gpus",
        "full per-gpu[n=3] contract",
        "full per-gpu[n=3] cpus",
        "full all-gpus gpus",
        "full gang rank 1 contract",
        "full per-gpu: each its own GPU and CPUs, every GPU used",
        "full gang: a GPU and CPUs of its own per process",
        "subset: dlaunch topo",
        "subset per-gpu: each its own GPU and CPUs, every GPU used",
        "subset all-gpus: every GPU of the run",
    ] {
        assert!(passed(check), "no PASS row {check:?}: {rows:?}");
    }
    let cpus = rows.iter().find(|r| r.1 == "full per-gpu[n=2] cpus").expect("cpus row");
    assert!(cpus.2.contains("on NUMA 1, GPUs 2 on NUMA 1"), "GPU 2 is on NUMA node 1 of the POWER8: {cpus:?}");

    let record = record(out.path());
    assert_eq!(record["mode"], "xml");
    assert_eq!(record["exit"], 77);
    assert_eq!(record["failed"], 0);
    assert_eq!(record["passed"].as_u64(), Some(rows.iter().filter(|r| r.0 == "PASS").count() as u64));
    assert_eq!(record["topology"]["gpus"].as_array().map(Vec::len), Some(4));
    let runs = record["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!(runs[1]["cuda_visible_devices"], "1,3");
    assert!(runs.iter().all(|r| r["exit"] == 0), "{runs:?}");
    assert_eq!(record["checks"].as_array().map(Vec::len), Some(rows.len()));
}

#[test]
fn a_dlaunch_that_ignores_a_preset_cuda_visible_devices_fails_the_check() {
    let out = tempfile::tempdir().unwrap();
    let liar = wrapper(out.path(), "exec env -u CUDA_VISIBLE_DEVICES \"$DLAUNCH\" \"$@\"");
    let output = gpu_check(&liar, &out.path().join("record"), &[("GPU_CHECK_XML", &fixture(POWER8))]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let rows = rows(&output);
    let failed = |check: &str, detail: &str| rows.iter().any(|r| r.0 == "FAIL" && r.1 == check && r.2.contains(detail));
    assert!(failed("subset: dlaunch topo", "sees GPUs 0,1,2,3 under CUDA_VISIBLE_DEVICES=1,3"), "{rows:?}");
    assert!(failed("subset per-gpu[n=0] gpus", "GPU 0 is outside the preset CUDA_VISIBLE_DEVICES=1,3"), "{rows:?}");
    assert!(failed("subset all-gpus: every GPU of the run", "the run had 1,3"), "{rows:?}");
    assert!(rows.iter().filter(|r| r.1.starts_with("full")).all(|r| r.0 == "PASS"), "{rows:?}");
    assert_eq!(record(&out.path().join("record"))["exit"], 1);
}

#[test]
fn cpus_away_from_the_gpus_numa_node_fail_the_check() {
    // dlaunch runs the job on a copy of the POWER8 where the PCI domains of GPU 0 (NUMA node
    // 0) and GPU 2 (node 1) are swapped, so GPU ids follow another order than the checks
    // know from the real file, as with a GPU numbering that does not match hwloc's.
    let out = tempfile::tempdir().unwrap();
    let xml = std::fs::read_to_string(fixture(POWER8)).unwrap();
    let swapped = xml.replace("\"0002:", "\"SWAP:").replace("\"000a:", "\"0002:").replace("\"SWAP:", "\"000a:");
    assert_ne!(swapped, xml);
    let swapped_path = out.path().join("swapped.xml");
    std::fs::write(&swapped_path, swapped).unwrap();
    let body =
        format!("[ \"$1\" = topo ] || export HWLOC_XMLFILE={}\nexec \"$DLAUNCH\" \"$@\"", swapped_path.display());
    let liar = wrapper(out.path(), &body);
    let output = gpu_check(&liar, &out.path().join("record"), &[("GPU_CHECK_XML", &fixture(POWER8))]);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    let rows = rows(&output);
    let wrong_node = |detail: &str| {
        rows.iter().any(|r| {
            r.0 == "FAIL" && r.1.starts_with("full per-gpu[") && r.1.ends_with(" cpus") && r.2.contains(detail)
        })
    };
    assert!(wrong_node("is on NUMA node 1, GPUs 0 on 0"), "{rows:?}");
    assert!(wrong_node("is on NUMA node 0, GPUs 2 on 1"), "{rows:?}");
}

/// Builds the made-up driver (tests/fixtures/fake_libcuda.c, one GPU) into `dir`/lib, the
/// directory to put on LD_LIBRARY_PATH.
fn fake_driver(dir: &Path) -> PathBuf {
    build_driver(dir, &fixture("fake_libcuda.c"))
}

/// The made-up driver with a `cuInit` that never returns, as a driver stuck on a GPU that
/// fell off the bus does.
fn hanging_driver(dir: &Path) -> PathBuf {
    let source = dir.join("hanging_libcuda.c");
    std::fs::write(
        &source,
        format!(
            "#define cuInit fake_cuInit_that_answers\n#include \"{}\"\n#undef cuInit\n#include <unistd.h>\n\
             CUresult cuInit(unsigned int flags) {{ for (;;) pause(); return fake_cuInit_that_answers(flags); }}\n",
            fixture("fake_libcuda.c").display()
        ),
    )
    .unwrap();
    build_driver(dir, &source)
}

fn build_driver(dir: &Path, source: &Path) -> PathBuf {
    let lib = dir.join("lib");
    std::fs::create_dir(&lib).unwrap();
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(lib.join("libcuda.so"))
        .arg(source)
        .status()
        .expect("cc");
    assert!(built.success(), "cc failed on {}", source.display());
    std::os::unix::fs::symlink("libcuda.so", lib.join("libcuda.so.1")).unwrap();
    lib
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.get(stat.rfind(')')? + 2..)?.chars().next())
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// A rank killed outright (mpirun's abort, srun's time limit, the OOM killer) while the driver
/// hangs in its CUDA probe takes the probe along (PR_SET_PDEATHSIG), and the probe holds none
/// of the rank's descriptors: the task guard sees its pipe close and ends too. Before, the
/// probe ran on for ever, re-parented away, and kept the guard waiting (found by a review).
#[test]
fn a_rank_killed_outright_takes_its_cuda_probe_along() {
    rank_killed_while_its_probe_hangs(None);
}

/// The same on a kernel without close_range(2) (before Linux 5.9, as RHEL 8's 4.18): the probe
/// closes the rank's descriptors one at a time, as `/proc/self/fd` lists them.
#[test]
fn without_close_range_the_probe_still_holds_none_of_the_ranks_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let wrapper = dir.path().join("without_close_range");
    let built = Command::new("cc").arg("-o").arg(&wrapper).arg(fixture("without_close_range.c")).status().expect("cc");
    assert!(built.success(), "cc failed");
    rank_killed_while_its_probe_hangs(Some(&wrapper));
}

/// Rank 0 alone (it runs a worker, so it waits for the probe's answer), its driver hanging in
/// `cuInit`, started through `wrapper` if given, is killed: its children must all go.
fn rank_killed_while_its_probe_hangs(wrapper: Option<&Path>) {
    let out = tempfile::tempdir().unwrap();
    let lib = hanging_driver(out.path());
    let dir = JobDir::new("[job]\nname = \"probe\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\n");
    let mut command = match wrapper {
        Some(wrapper) => {
            let mut command = Command::new(wrapper);
            command.arg(DLAUNCH);
            command
        }
        None => Command::new(DLAUNCH),
    };
    let mut rank = command
        .arg(dir.job())
        .current_dir(dir.path())
        .env("LD_LIBRARY_PATH", &lib)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn dlaunch");
    let rank_pid = rank.id();
    let maps_driver =
        |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| m.contains("libcuda"));
    let children = || -> Vec<u32> {
        processes_matching(&dir.job().to_string_lossy())
            .into_iter()
            .filter(|&pid| parent_of(pid) == Some(rank_pid))
            .collect()
    };
    let found = eventually(Duration::from_secs(60), || children().into_iter().any(maps_driver));
    let children = children();
    let probe_fds: Vec<String> = children
        .iter()
        .filter(|&&pid| maps_driver(pid))
        .flat_map(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).into_iter().flatten().flatten())
        .filter_map(|entry| std::fs::read_link(entry.path()).ok())
        .map(|target| target.display().to_string())
        .collect();
    rank.kill().unwrap();
    rank.wait().unwrap();
    assert!(found, "no CUDA probe of rank {rank_pid} found in the driver");
    let gone = eventually(Duration::from_secs(10), || children.iter().all(|&pid| !alive(pid)));
    for &pid in children.iter().filter(|&&pid| alive(pid)) {
        // Ours to end: the test started them.
        send_signal(&pid.to_string(), "KILL");
    }
    assert!(gone, "processes of rank {rank_pid} outlived it (the CUDA probe, the task guard): {children:?}");
    // stdin, stdout, stderr and its answer's pipe: nothing of the rank's (the guard's pipe).
    assert!(probe_fds.len() <= 4, "the probe holds the rank's descriptors: {probe_fds:?}");
}

/// A worker rank never loads the CUDA driver itself: a child forked before MPI starts asks it
/// (src/discover/probe.rs), so the driver's slow start overlaps MPI's. The task reads the maps
/// of its parent, the worker rank, and the GPU it was given.
#[test]
fn the_cuda_driver_is_asked_by_a_child_of_the_rank_not_the_rank() {
    let out = tempfile::tempdir().unwrap();
    let lib = fake_driver(out.path());
    let dir = JobDir::new(
        "[job]\nname = \"probe\"\n[[tasks]]\nname = \"t\"\ngpus = 1\n\
         command = \"echo $DLAUNCH_GPUS > $DLAUNCH_TASK_DIR/gpus; grep -c libcuda /proc/$PPID/maps > $DLAUNCH_TASK_DIR/maps || true\"\n",
    );
    let mut command = dir.mpirun_command(2, &[]);
    command.env("LD_LIBRARY_PATH", &lib);
    let output = wait_with_limit(command.spawn().expect("mpirun"), Duration::from_secs(300));
    assert!(output.status.success(), "{}", text(&output));
    let task = dir.output("probe").join("tasks/t");
    let read = |name: &str| std::fs::read_to_string(task.join(name)).unwrap().trim().to_string();
    assert_eq!(read("gpus"), "0", "the fake GPU was found and given");
    assert_eq!(read("maps"), "0", "the worker rank has no CUDA driver mapped");
}

#[test]
fn with_a_cuda_driver_it_takes_the_real_node_path() {
    // A made-up driver with one GPU (tests/fixtures/fake_libcuda.c): dlaunch finds it through
    // cudarc, the tasks run bound to real CPUs and ask the driver what they see. The GPU's PCI
    // address (0000:00:04.0) has no NUMA node on machines that do not list it in sysfs.
    let out = tempfile::tempdir().unwrap();
    let lib = fake_driver(out.path());
    let record_dir = out.path().join("record");
    let output = gpu_check(Path::new(DLAUNCH), &record_dir, &[("LD_LIBRARY_PATH", &lib)]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("== dlaunch topo (cuda)"), "{}", text(&output));
    assert!(stdout.contains("Fake GPU 0, 16.0 GiB, PCI 0000:00:04.0"), "{stdout}");
    let rows = rows(&output);
    let row = |check: &str| rows.iter().find(|r| r.1 == check).unwrap_or_else(|| panic!("no row {check:?}: {rows:?}"));
    for check in ["dlaunch matches the driver", "full: dlaunch", "full per-gpu[n=0] gpus", "full per-gpu[n=0] contract"]
    {
        assert_eq!(row(check).0, "PASS", "{rows:?}");
    }
    for task in ["per-gpu[n=0]", "all-gpus"] {
        let driver = row(&format!("full {task} driver"));
        assert_eq!(driver.0, "PASS", "{rows:?}");
        assert!(driver.2.contains("sees 1: GPU-fafafafa-fafa-fafa-fafa-fafafafafa00"), "{driver:?}");
        let cpus = row(&format!("full {task} cpus"));
        assert!(
            (cpus.0 == "PASS" && cpus.2.contains("(bound, /proc/self/status)"))
                || (cpus.0 == "FAIL" && cpus.2 == "hwloc gives no NUMA node for GPU 0;"),
            "the task's binding agrees with DLAUNCH_CPUS: {cpus:?}"
        );
    }
    let unexplained: Vec<_> =
        rows.iter().filter(|r| r.0 == "FAIL" && r.2 != "hwloc gives no NUMA node for GPU 0;").collect();
    assert!(unexplained.is_empty(), "{unexplained:?}");
    let failed = rows.iter().any(|r| r.0 == "FAIL");
    assert_eq!(output.status.code(), Some(if failed { 1 } else { 0 }), "{}", text(&output));
    let record = record(&record_dir);
    assert_eq!(record["mode"], "cuda");
    assert_eq!(record["topology"]["source"]["gpu_source"], "cuda");
}

/// `scripts/gpu-check/bundle.sh` packs dlaunch with Open MPI, PMIx and hwloc's PCI plugin for a
/// GPU node that has none of them (how the H200 check ran, docs/gpu-check.md): in a mount
/// namespace where this machine's own copies are hidden (their directories empty, their
/// libraries and programs empty files), the bundle alone runs the check (its XML path here).
#[test]
fn the_bundle_runs_the_check_where_no_open_mpi_is_installed() {
    let out = tempfile::tempdir().unwrap();
    let bundle = out.path().join("bundle");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let packed = Command::new(root.join("scripts/gpu-check/bundle.sh"))
        .arg(&bundle)
        .env("DLAUNCH", DLAUNCH)
        .output()
        .expect("bundle.sh");
    assert!(packed.status.success(), "{}", text(&packed));
    let hide = r#"set -e
        empty=$(mktemp -d)
        for d in /usr/lib/*/openmpi /usr/lib/*/pmix2 /usr/lib/*/hwloc /usr/share/openmpi /etc/openmpi; do
            [ -d "$d" ] && mount --bind "$empty" "$d"
        done
        for f in "$1"/lib/*; do
            for p in /lib/*/"${f##*/}" /usr/lib/*/"${f##*/}"; do
                [ -e "$p" ] && mount --bind /dev/null "$(readlink -f "$p")" || true
            done
        done
        for b in mpirun orterun orted; do
            [ -e /usr/bin/$b ] && mount --bind /dev/null "$(readlink -f /usr/bin/$b)" || true
        done
        . "$1/env.sh"
        [ "$(command -v mpirun)" = "$1/bin/mpirun" ]
        exec scripts/gpu-check.sh"#;
    let checked = Command::new("unshare")
        .args(["-m", "--propagation", "private", "bash", "-c", hide, "hide"])
        .arg(&bundle)
        .current_dir(root)
        .env("GPU_CHECK_OUT", out.path().join("record"))
        .envs(MPI_ENV.iter().copied())
        .env_remove("CUDA_VISIBLE_DEVICES")
        .env_remove("HWLOC_XMLFILE")
        .env_remove("GPU_CHECK_XML")
        .output()
        .expect("unshare");
    let stdout = String::from_utf8_lossy(&checked.stdout);
    assert_eq!(checked.status.code(), Some(77), "{}", text(&checked));
    assert!(stdout.contains(", 0 failed,"), "{stdout}");
}
