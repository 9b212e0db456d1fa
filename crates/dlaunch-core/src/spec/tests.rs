//! Unit tests of `spec`, compiled only with #[cfg(test)] (declared in its mod.rs).
use std::path::Path;
use std::time::Duration;

use super::*;

/// The filesystem, as the shell's probe sees it (tests may look; the core may not).
pub struct TestProbe;

impl Probe for TestProbe {
    fn kind(&self, path: &Path) -> Result<PathKind, String> {
        let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
        Ok(if meta.is_file() {
            PathKind::File
        } else if meta.is_dir() {
            PathKind::Directory
        } else {
            PathKind::Other
        })
    }
}

/// Reads and parses a job file the way the shell does, for tests.
pub(crate) fn load(file: &Path) -> Result<Job, SpecErrors> {
    parse(file, &std::fs::read(file).unwrap(), &TestProbe)
}

/// Writes `text` as `job.toml` in a fresh directory and loads it.
fn load_text(text: &str) -> (tempfile::TempDir, Result<Job, SpecErrors>) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.toml");
    std::fs::write(&file, text).unwrap();
    let result = load(&file);
    (dir, result)
}

fn errors(text: &str) -> Vec<SpecError> {
    match load_text(text).1 {
        Ok(job) => panic!("expected errors, got {job:?}"),
        Err(SpecErrors(errors)) => errors,
    }
}

fn one_error(text: &str) -> SpecError {
    let errors = errors(text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    errors.into_iter().next().unwrap()
}

const MINIMAL: &str = "[job]\nname = \"sweep\"\n\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\n";

#[test]
fn minimal_job_gets_defaults() {
    let (dir, job) = load_text(MINIMAL);
    let job = job.unwrap();
    assert_eq!(job.name, "sweep");
    assert_eq!(job.output_dir, dir.path().join("runs/sweep"));
    assert_eq!(job.slots_per_worker, None);
    assert_eq!(job.coordinator_slots, None);
    assert_eq!(job.stop_signal, StopSignal { name: "SIGTERM".into(), number: 15 });
    assert_eq!(job.grace, Duration::from_secs(10));
    assert_eq!(job.heartbeat_timeout, Duration::from_secs(300));
    assert_eq!(job.log_limit, Some(1 << 30));
    let t = &job.templates[0];
    assert_eq!((t.retries, t.timeout, t.processes), (0, None, 1));
    assert_eq!(t.resources, Resources { cpus: 1, gpus: 0, memory: 0 });
    assert_eq!(t.workdir, dir.path());
    assert_eq!(t.success, GangSuccess::All);
}

#[test]
fn full_example_parses() {
    let text = r#"
[job]
name = "lr-sweep"
output_dir = "out/lr"
slots_per_worker = 2
coordinator_slots = 0
retries = 1
timeout = "30m"
stop_signal = "USR1"
grace = "2m"
log_limit = "unlimited"
master_ports = "40000-40100"
env = { OMP_PROC_BIND = "close", SHARED = 1 }

[[tasks]]
name = "train"
command = "python train.py --lr {lr} --seed {seed}"
matrix = { lr = [0.1, 0.01, 1.0], seed = [1, 2], model = ["resnet", "vit"] }
workdir = "."
retries = 2
timeout = "1h"
walltime = 5400
env = { SHARED = "task wins", EXTRA = true }
cpus = 4
gpus = 1
memory = "16GiB"

[[tasks]]
name = "ddp"
command = "torchrun train.py"
processes = 4
processes_per_node = 2
success = "rank0"
"#;
    let (dir, job) = load_text(text);
    let job = job.unwrap();
    assert_eq!(job.output_dir, dir.path().join("out/lr"));
    assert_eq!((job.slots_per_worker, job.coordinator_slots), (Some(2), Some(0)));
    assert_eq!(job.stop_signal.number, 10);
    assert_eq!(job.log_limit, None);
    assert_eq!(job.master_ports, PortRange { first: 40000, last: 40100 });
    let train = &job.templates[0];
    let keys: Vec<&str> = train.matrix.iter().map(|a| a.key.as_str()).collect();
    assert_eq!(keys, ["lr", "seed", "model"], "matrix keys keep file order");
    assert_eq!(train.matrix[0].values, ["0.1", "0.01", "1.0"]);
    assert_eq!(train.timeout, Some(Duration::from_secs(3600)));
    assert_eq!(train.walltime, Some(Duration::from_secs(5400)));
    assert_eq!(train.time_needed(), Some(Duration::from_secs(5400)));
    assert_eq!(
        train.env,
        [
            ("OMP_PROC_BIND".into(), "close".into()),
            ("SHARED".into(), "task wins".into()),
            ("EXTRA".into(), "true".into())
        ]
    );
    assert_eq!(train.resources, Resources { cpus: 4, gpus: 1, memory: 16 << 30 });
    let ddp = &job.templates[1];
    assert_eq!((ddp.processes, ddp.processes_per_node, ddp.success), (4, Some(2), GangSuccess::Rank0));
    assert_eq!((ddp.retries, ddp.timeout), (1, Some(Duration::from_secs(1800))), "job defaults apply");
}

#[test]
fn unknown_key_names_line_field_and_a_guess() {
    let e = one_error("[job]\nname = \"x\"\nslot_per_worker = 2\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\n");
    assert_eq!(e.position, Some((3, 1)));
    assert_eq!(e.field, "job.slot_per_worker");
    assert!(e.message.contains("did you mean `slots_per_worker`?"), "{}", e.message);
    let shown = e.to_string();
    assert!(shown.contains("job.toml:3:1: job.slot_per_worker: unknown key"), "{shown}");
}

#[test]
fn wrong_types_speak_toml_not_rust() {
    let e = one_error("[job]\nname = \"x\"\nslots_per_worker = \"two\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\n");
    assert_eq!((e.position, e.field.as_str()), (Some((3, 20)), "job.slots_per_worker"));
    assert!(e.message.contains("expected a whole number"), "{}", e.message);
    let e = one_error("job = 5\n");
    assert!(e.message.contains("expected a [job] table"), "{}", e.message);
    let e = one_error("[job]\nname = \"x\"\n[[tasks]]\nname = \"t\"\n");
    assert!(e.message.contains("missing key `command`"), "{}", e.message);
    assert_eq!(e.field, "tasks[0]");
}

#[test]
fn every_key_and_type_error_comes_in_one_round() {
    let text = "[job]\nname = \"x\"\nretriez = 1\ntimeoot = \"1h\"\ngrace = \"soon\"\n[[tasks]]\nname = \"t\"\ncomand = \"x\"\ncommand = \"true\"\ncpus = \"four\"\n[[tasks]]\nname = \"u\"\ncommand = \"true\"\ngpus = 1.5\n";
    let found: Vec<(usize, String)> =
        errors(text).into_iter().map(|e| (e.position.map_or(0, |p| p.0), e.field)).collect();
    let expected = [
        (3, "job.retriez"),
        (4, "job.timeoot"),
        (5, "job.grace"),
        (8, "tasks[0].comand"),
        (10, "tasks[0].cpus"),
        (14, "tasks[1].gpus"),
    ];
    assert_eq!(found, expected.map(|(line, field)| (line, field.to_string())));
    // A task without its name is left out whole: the rest of the file still gets its say. (A
    // missing command is validation's to report, since roles may bring their own; validation
    // waits until no whole table had to be left out.)
    let found = errors("[job]\nname = \"x\"\nretriez = 1\n[[tasks]]\nname = \"t\"\n[[tasks]]\nnam = \"u\"\n");
    let fields: Vec<&str> = found.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["job.retriez", "tasks[1]", "tasks[1].nam"], "{found:?}");
}

fn with_command(command: &str, matrix: &str) -> String {
    format!("[job]\nname = \"x\"\n[[tasks]]\nname = \"t\"\ncommand = {command:?}\nmatrix = {{ {matrix} }}\n")
}

#[test]
fn a_name_in_braces_that_is_no_matrix_key_is_warned_about_or_refused_when_near_one() {
    let shell = "echo {learning_rate} {lr} ${HOME} {{lr}} awk '{print $1}' find -exec {} + python -c \"print(f'{x}')\"";
    let (_dir, job) = load_text(&with_command(shell, "lr = [0.1], seed = [1]"));
    let job = job.unwrap();
    let warned: Vec<(Option<(usize, usize)>, &str)> =
        job.warnings.iter().map(|w| (w.position, w.message.as_str())).collect();
    assert_eq!(warned.len(), 2, "{warned:?}");
    assert_eq!(warned[0].0, Some((5, 17)));
    assert!(warned[0].1.starts_with("{learning_rate} is not a matrix key"), "{}", warned[0].1);
    assert!(warned[1].1.starts_with("{x} is not a matrix key"), "{}", warned[1].1);
    for typo in ["{seeds}", "{Seed}", "{sed}"] {
        let e = one_error(&with_command(&format!("run {typo} {{lr}}"), "lr = [0.1], seed = [1]"));
        assert_eq!((e.field.as_str(), e.position), ("tasks[0].command", Some((5, 16))));
        assert!(e.message.contains("did you mean {seed}?"), "{}", e.message);
    }
    let strict = with_command("echo {learning_rate}", "lr = [1]")
        .replace("name = \"x\"", "name = \"x\"\nstrict_placeholders = true");
    let e = one_error(&strict);
    assert!(e.message.contains("strict_placeholders"), "{}", e.message);
}

#[test]
fn a_value_that_cannot_be_placed_safely_is_refused_at_its_placeholder() {
    let command = "cat <<'EOF'\nlr = {v}\nEOF\necho {v}";
    let e = one_error(&with_command(command, "v = [\"0.1\", \"x\\nEOF\\ntouch /tmp/pwned\"]"));
    assert_eq!((e.field.as_str(), e.position), ("tasks[0].command", Some((5, 30))));
    assert!(e.message.contains("end the here-document early"), "{}", e.message);
    let e = one_error(&with_command("echo $(( {n} * 2 ))", "n = [1, \"a[$(id)]\"]"));
    assert!(e.message.contains("whole number"), "{}", e.message);
    // The same values are fine where quoting can keep them in place.
    let (_dir, job) =
        load_text(&with_command(&command.replace("'EOF'", "EOF"), "v = [\"x\\nEOF\\ntouch /tmp/pwned\"]"));
    assert!(job.is_ok(), "{job:?}");
}

#[test]
fn syntax_errors_have_positions() {
    let e = one_error("[job\n");
    assert_eq!(e.position, Some((1, 5)));
}

#[test]
fn all_problems_are_reported_at_once_in_file_order() {
    let text = "[job]\nname = \"x\"\nslots_per_worker = 0\n\n[[tasks]]\nname = \"t\"\ncommand = \"  \"\ncpus = -1\ntimeout = \"3x\"\nmemory = \"5 parsecs\"\n\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\n";
    let errors = errors(text);
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "job.slots_per_worker",
            "tasks[0].command",
            "tasks[0].cpus",
            "tasks[0].timeout",
            "tasks[0].memory",
            "tasks[1].name"
        ]
    );
    assert!(errors[0].message.contains("from 1 to"));
    assert!(errors[1].message.contains("empty"));
    assert!(errors[3].message.contains("\"30m\""));
    assert!(errors[4].message.contains("16GiB"));
    assert!(errors[5].message.contains("duplicate task name"));
}

#[test]
fn matrix_problems() {
    let errors = errors(
        "[job]\nname = \"x\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\nmatrix = { a = [], b = [[1]], c = [1, 1], d = 5, \"e-f\" = [1] }\n",
    );
    let messages: Vec<String> = errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect();
    assert!(messages[0].starts_with("tasks[0].matrix.a: the list is empty"), "{messages:?}");
    assert!(messages[1].starts_with("tasks[0].matrix.b[0]: matrix values must be"), "{messages:?}");
    assert!(messages[2].starts_with("tasks[0].matrix.c[1]: duplicate value 1"), "{messages:?}");
    assert!(messages[3].starts_with("tasks[0].matrix.d: expected a list"), "{messages:?}");
    assert!(messages[4].starts_with("tasks[0].matrix.e-f: matrix key"), "{messages:?}");
    let more = super::tests::errors(
        "[job]\nname = \"x\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\nmatrix = { lr = [1], LR = [2], v = [\"a\\u0000b\"] }\n",
    );
    let messages: Vec<String> = more.iter().map(|e| format!("{}: {}", e.field, e.message)).collect();
    assert_eq!(messages[0], "tasks[0].matrix.lr: matrix keys LR and lr would both set DLAUNCH_PARAM_LR");
    assert_eq!(messages[1], "tasks[0].matrix.LR: matrix keys lr and LR would both set DLAUNCH_PARAM_LR");
    assert_eq!(messages[2], "tasks[0].matrix.v[0]: matrix values cannot contain NUL bytes");
}

#[test]
fn absurd_matrices_are_refused_before_expansion() {
    let values: Vec<String> = (0..1000).map(|i| i.to_string()).collect();
    let list = values.join(", ");
    let text = format!(
        "[job]\nname = \"x\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\nmatrix = {{ a = [{list}], b = [{list}], c = [{list}] }}\n"
    );
    let e = one_error(&text);
    assert_eq!(e.field, "tasks[0].matrix");
    assert!(e.message.contains("more than 1000000 tasks"), "{}", e.message);
}

#[test]
fn names_cannot_escape_directories() {
    for name in ["../up", "a/b", "..", ".hidden", "", "sp ace"] {
        let text = format!("[job]\nname = {name:?}\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\n");
        let e = one_error(&text);
        assert_eq!(e.field, "job.name", "{name}");
        assert!(e.message.contains("invalid name"), "{name}: {}", e.message);
    }
    let e = one_error("[job]\nname = \"x\"\n[[tasks]]\nname = \"a/../../b\"\ncommand = \"true\"\n");
    assert_eq!(e.field, "tasks[0].name");
}

#[test]
fn paths_must_exist() {
    let e = one_error("[job]\nname = \"x\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\nworkdir = \"nope\"\n");
    assert_eq!((e.field.as_str(), e.position), ("tasks[0].workdir", Some((6, 11))));
    let e = one_error(
        "[job]\nname = \"x\"\n[datasets.d]\nsource = \"missing.tar\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\n",
    );
    assert_eq!(e.field, "datasets.d.source");
    assert!(e.message.contains("missing.tar"), "{}", e.message);
}

#[test]
fn datasets_resolve_and_are_referenced_by_name() {
    let text = "[job]\nname = \"x\"\n[datasets.\"cifar-10\"]\nsource = \"data.bin\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\ndatasets = [\"cifar-10\"]\n";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data.bin"), b"x").unwrap();
    std::fs::write(dir.path().join("job.toml"), text).unwrap();
    let job = load(&dir.path().join("job.toml")).unwrap();
    assert_eq!(job.datasets[0].source, dir.path().join("data.bin"));
    assert_eq!(job.datasets[0].env_var(), "DLAUNCH_DATASET_CIFAR_10");
    assert!(job.datasets[0].verify);
    assert_eq!(job.datasets[0].stage_dir, None);
    let e = one_error("[job]\nname = \"x\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\ndatasets = [\"nope\"]\n");
    assert_eq!(e.field, "tasks[0].datasets[0]");
    assert!(e.message.contains("unknown dataset \"nope\""), "{}", e.message);
}

#[test]
fn datasets_may_have_their_own_stage_dir_and_skip_verification() {
    let text = "[job]\nname = \"x\"\nstage_dir = \"/local/job\"\n[datasets.d]\nsource = \".\"\nstage_dir = \"scratch\"\nverify = false\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\n";
    let (dir, job) = load_text(text);
    let job = job.unwrap();
    assert_eq!(job.stage_dir.as_deref(), Some(Path::new("/local/job")));
    assert_eq!(job.datasets[0].stage_dir, Some(dir.path().join("scratch")), "relative to the job file");
    assert!(!job.datasets[0].verify);
    let e = one_error(
        "[job]\nname = \"x\"\n[datasets.d]\nsource = \".\"\nstage_dir = \"\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\n",
    );
    assert_eq!((e.field.as_str(), e.message.as_str()), ("datasets.d.stage_dir", "the path is empty"));
}

#[test]
fn environment_rules() {
    let errors = errors(
        "[job]\nname = \"x\"\nenv = { DLAUNCH_X = \"1\", \"A B\" = \"1\", T = [1] }\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\nenv = { RANK = \"3\" }\n",
    );
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["job.env.DLAUNCH_X", "job.env.A B", "job.env.T", "tasks[0].env.RANK"]);
    assert!(errors[3].message.contains("set by dlaunch"));
}

#[test]
fn gang_settings_are_consistent() {
    let errors = errors(
        "[job]\nname = \"x\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\nprocesses = 3\nprocesses_per_node = 2\nsuccess = 4\n",
    );
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["tasks[0].processes_per_node", "tasks[0].success"]);
    let e = one_error("[job]\nname = \"x\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\nprocesses = 0\n");
    assert_eq!(e.field, "tasks[0].processes");
}

#[test]
fn misc_job_settings_are_checked() {
    let errors = errors(
        "[job]\nname = \"x\"\nstop_signal = \"SIGFOO\"\nmaster_ports = \"80-90\"\ngrace = \"0s\"\nlog_limit = 0\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\n",
    );
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["job.stop_signal", "job.master_ports", "job.grace", "job.log_limit"]);
    assert!(errors[0].message.contains("SIGUSR1"));
    // Job-level task defaults are checked once, not once per task; durations that no deadline
    // could hold are refused.
    let more = super::tests::errors(
        "[job]\nname = \"x\"\nretries = -1\ntimeout = 9223372036854775807\n[[tasks]]\nname = \"a\"\ncommand = \"true\"\n[[tasks]]\nname = \"b\"\ncommand = \"true\"\ntimeout = \"200000000h\"\n",
    );
    let messages: Vec<String> = more.iter().map(|e| format!("{}: {}", e.field, e.message)).collect();
    assert_eq!(messages.len(), 3, "{messages:?}");
    assert!(messages[0].starts_with("job.retries: -1 is out of range"), "{messages:?}");
    assert_eq!(messages[1], "job.timeout: too long: at most 36500 days");
    assert_eq!(messages[2], "tasks[1].timeout: too long: at most 36500 days");
    let more = super::tests::errors(
        "[job]\nname = \"x\"\nmaster_ports = \"30000-30003\"\n[[tasks]]\nname = \"a\"\ncommand = \"true\"\nprocesses = 4\n[[tasks]]\nname = \"b\"\ncommand = \"true\"\nprocesses = 8\n[[tasks]]\nname = \"c\"\ncommand = \"true\"\nprocesses = 8\nprocesses_per_node = 4\n",
    );
    let messages: Vec<String> = more.iter().map(|e| format!("{}: {}", e.field, e.message)).collect();
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert!(
        messages[0].starts_with("tasks[1].processes: up to 8 processes on one host need as many ports"),
        "{messages:?}"
    );
}

#[test]
fn hostile_files() {
    let dir = tempfile::tempdir().unwrap();
    let e = one_error("");
    assert!(e.message.contains("empty"), "{e}");
    let e = one_error("  \n\n");
    assert!(e.message.contains("empty"), "{e}");
    let file = dir.path().join("bin.toml");
    std::fs::write(&file, b"[job]\nname = \"x\xff\"\n").unwrap();
    let e = &load(&file).unwrap_err().0[0];
    assert_eq!(e.position, Some((2, 10)));
    assert!(e.message.contains("UTF-8"), "{e}");
    let e = one_error("[[tasks]]\nname = \"t\"\ncommand = \"a\\u0000b\"\n[job]\nname = \"x\"\n");
    assert!(e.message.contains("NUL"), "{e}");
}

#[test]
fn after_names_templates_and_refuses_unknown_names_cycles_and_unmatched_values() {
    let (_dir, job) = load_text(
        "[job]\nname = \"p\"\n[[tasks]]\nname = \"prep\"\ncommand = \"true\"\n[[tasks]]\nname = \"train\"\ncommand = \"true\"\nafter = [\"prep\"]\n",
    );
    assert_eq!(job.unwrap().templates[1].after, [0]);
    let e = one_error("[job]\nname = \"p\"\n[[tasks]]\nname = \"a\"\ncommand = \"true\"\nafter = [\"prepp\"]\n");
    assert_eq!((e.position, e.field.as_str()), (Some((6, 10)), "tasks[0].after[0]"));
    assert!(e.message.contains("unknown task \"prepp\": expected one of a"), "{}", e.message);
    let e = one_error(
        "[job]\nname = \"p\"\n[[tasks]]\nname = \"a\"\ncommand = \"true\"\nafter = [\"b\"]\n[[tasks]]\nname = \"b\"\ncommand = \"true\"\nafter = [\"a\"]\n",
    );
    assert_eq!(e.position, Some((6, 10)));
    assert!(e.message.contains("dependency cycle: a → b → a"), "{}", e.message);
    let e = one_error(
        "[job]\nname = \"p\"\n[[tasks]]\nname = \"train\"\ncommand = \"true\"\nmatrix = { seed = [1, 2] }\n[[tasks]]\nname = \"eval\"\ncommand = \"true\"\nmatrix = { seed = [2, 3] }\nafter = [\"train\"]\n",
    );
    assert_eq!(e.field, "tasks[1].after[0]");
    assert!(e.message.contains("eval[seed=3] would wait for no task of train"), "{}", e.message);
}

const ROLES: &str = "[job]\nname = \"pai\"\n[[tasks]]\nname = \"tf\"\ncommand = \"python3 run.py\"\ngpus = 1\nsuccess = \"worker\"\ncompat = [\"openpai\"]\n\
[[tasks.roles]]\nname = \"ps\"\nprocesses = 2\ngpus = 0\nports = [\"http\"]\n\
[[tasks.roles]]\nname = \"worker\"\nprocesses = 3\ncommand = \"python3 worker.py\"\nwait_for = \"ps\"\nwait_timeout = \"20s\"\n";

#[test]
fn roles_inherit_the_task_resources_and_name_each_other() {
    let (_dir, job) = load_text(ROLES);
    let t = &job.unwrap().templates[0];
    assert_eq!(t.processes, 5);
    assert_eq!(t.success, GangSuccess::Role(1));
    assert_eq!(t.compat, [Compat::OpenPai]);
    assert_eq!(t.gpu_visibility, GpuVisibility::Task);
    let (ps, worker) = (&t.roles[0], &t.roles[1]);
    assert_eq!((ps.resources.gpus, ps.resources.cpus, ps.ports.as_slice()), (0, 1, &["http".to_string()][..]));
    assert_eq!((worker.resources.gpus, worker.wait_for, worker.wait_timeout.as_secs()), (1, Some(0), 20));
    assert_eq!((0..5).map(|p| t.role_of(p)).collect::<Vec<_>>(), [Some(0), Some(0), Some(1), Some(1), Some(1)]);
    assert_eq!(t.resources_of(1).gpus, 0);
    assert_eq!(t.resources_of(2).gpus, 1);
}

#[test]
fn role_mistakes_are_named_with_their_place() {
    let errors = errors(
        &ROLES
            .replace("wait_for = \"ps\"", "wait_for = \"pss\"")
            .replace("success = \"worker\"", "success = \"chief\"")
            .replace("ports = [\"http\"]", "ports = [\"http\", \"HTTP\"]")
            .replace("name = \"worker\"", "name = \"PS\""),
    );
    let shown: Vec<String> = errors.iter().map(|e| format!("{}: {}", e.field, e.message)).collect();
    let has = |needle: &str| shown.iter().any(|s| s.contains(needle));
    assert!(
        has("tasks[0].success: invalid value \"chief\": expected \"all\", \"rank0\", a role (ps, PS)"),
        "{shown:?}"
    );
    assert!(has("tasks[0].roles[0].ports[1]: port label \"HTTP\" is listed twice"), "{shown:?}");
    assert!(has("tasks[0].roles[1].name: roles ps and PS would both set DLAUNCH_ROLE_PS_HOSTS"), "{shown:?}");
    assert!(has("tasks[0].roles[1].wait_for: unknown role \"pss\": expected one of ps, PS"), "{shown:?}");
    let e = one_error(&ROLES.replace("wait_for = \"ps\"", "wait_for = \"worker\""));
    assert!(e.message.contains("a role cannot wait for itself"), "{}", e.message);
    let e = one_error(
        &ROLES.replace("name = \"ps\"\nprocesses = 2", "name = \"ps\"\nprocesses = 2\nwait_for = \"worker\""),
    );
    assert!(e.message.contains("roles wait for each other: ps → worker → ps"), "{}", e.message);
    let e = one_error(&ROLES.replace("command = \"python3 run.py\"\n", ""));
    assert_eq!(e.field, "tasks[0].roles[0].name");
    assert!(e.message.contains("role ps has no command and the task has none"), "{}", e.message);
    let e = one_error(&ROLES.replace("gpus = 1\n", "gpus = 1\nprocesses = 4\n"));
    assert!(e.message.contains("with [[tasks.roles]], set processes on each role"), "{}", e.message);
    let e = one_error(&MINIMAL.replace("command = \"true\"", "command = \"true\"\ncompat = [\"openpai\"]"));
    assert!(e.message.contains("openpai variables describe roles"), "{}", e.message);
    let e = one_error(&MINIMAL.replace("command = \"true\"", "command = \"true\"\ngpu_visibility = \"node\""));
    assert!(e.message.contains("expected \"task\" or \"process\""), "{}", e.message);
}

#[test]
fn role_commands_are_held_to_the_same_placeholder_rules() {
    let text = "[job]\nname = \"x\"\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\nmatrix = { v = [\"a\", \"EOF\"] }\n\
        [[tasks.roles]]\nname = \"r\"\ncommand = \"cat <<'EOF'\\n{v}\\nEOF\"\n";
    let e = one_error(text);
    assert_eq!(e.field, "tasks[0].roles[0].command", "{e}");
    assert!(e.message.contains("{v}"), "{e}");
}

#[test]
fn share_is_owner_only_unless_the_group_is_named() {
    assert_eq!(load_text(MINIMAL).1.unwrap().share, Share::Owner);
    let group = MINIMAL.replace("[job]\n", "[job]\nshare = \"group\"\n");
    assert_eq!(load_text(&group).1.unwrap().share, Share::Group);
    let error = one_error(&MINIMAL.replace("[job]\n", "[job]\nshare = \"world\"\n"));
    assert!(error.to_string().contains("expected `owner` or `group`"), "{error}");
}

#[test]
fn prefetch_defaults_to_two_per_slot_and_is_bounded() {
    let job =
        |prefetch: &str| format!("[job]\nname = \"x\"\n{prefetch}\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\n");
    let parsed = |text: &str| parse(Path::new("/tmp/job.toml"), text.as_bytes(), &TestProbe).unwrap().prefetch;
    assert_eq!(parsed(&job("")), 2);
    assert_eq!(parsed(&job("prefetch = 0")), 0);
    let e = one_error(&job("prefetch = 65"));
    assert_eq!((e.position, e.field.as_str()), (Some((3, 12)), "job.prefetch"));
    assert!(e.message.contains("expected a whole number from 0 to 64"), "{}", e.message);
}

#[test]
fn task_dir_defaults_to_the_job_and_is_refused_where_something_lives_in_it() {
    let text = "[job]\nname = \"x\"\ntask_dir = false\n[[tasks]]\nname = \"a\"\ncommand = \"true\"\n\
                [[tasks]]\nname = \"b\"\ncommand = \"true\"\ntask_dir = true\n";
    let (_dir, job) = load_text(text);
    let job = job.unwrap();
    assert_eq!(job.templates.iter().map(|t| t.task_dir).collect::<Vec<_>>(), [false, true]);
    assert!(load_text(MINIMAL).1.unwrap().templates[0].task_dir, "on by default");

    let e = one_error(
        "[job]\nname = \"x\"\n[[tasks]]\nname = \"a\"\ncommand = \"true\"\ntask_dir = false\noutputs = [\"m.pt\"]\n",
    );
    assert_eq!(e.field, "tasks[0].outputs");
    assert!(e.message.contains("set task_dir = true or drop outputs"), "{}", e.message);
    assert_eq!(e.position.map(|(line, _)| line), Some(7));
    let e = one_error(
        "[job]\nname = \"x\"\ntask_dir = false\n[[tasks]]\nname = \"a\"\n\
         [[tasks.roles]]\nname = \"server\"\ncommand = \"serve\"\n\
         [[tasks.roles]]\nname = \"client\"\ncommand = \"ask\"\nwait_for = \"server\"\n",
    );
    assert_eq!(e.field, "tasks[0].roles[1].wait_for");
    assert!(e.message.contains("task_dir = false"), "{}", e.message);
}

#[test]
fn layout_is_flat_by_default_and_nodes_leave_rank_0_without_tasks() {
    let job = |extra: &str| format!("[job]\nname = \"x\"\n{extra}\n[[tasks]]\nname = \"t\"\ncommand = \"true\"\n");
    let parsed = |text: &str| parse(Path::new("/tmp/job.toml"), text.as_bytes(), &TestProbe).unwrap();
    assert_eq!(parsed(&job("")).layout, Layout::Flat);
    assert_eq!(parsed(&job("layout = \"nodes\"")).layout, Layout::Nodes);
    assert_eq!(parsed(&job("layout = \"nodes\"\ncoordinator_slots = 0")).layout, Layout::Nodes);
    let e = one_error(&job("layout = \"nodes\"\ncoordinator_slots = 2"));
    assert_eq!((e.position, e.field.as_str()), (Some((4, 21)), "job.coordinator_slots"));
    assert!(e.message.contains("rank 0 runs no tasks with layout = \"nodes\""), "{}", e.message);
    let e = one_error(&job("layout = \"tree\""));
    assert!(e.to_string().contains("expected `flat` or `nodes`"), "{e}");
}
