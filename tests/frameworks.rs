//! Real distributed frameworks under dlaunch. scripts/test.sh installs JAX (CPU) from PyPI
//! into target/test-venv and sets DLAUNCH_REQUIRE_FRAMEWORKS=1, so CI always runs this; a bare
//! `cargo test` without that venv says it skipped.

mod common;

use std::path::PathBuf;

use common::*;

fn venv_python() -> Option<PathBuf> {
    let python = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target/test-venv/bin/python3"));
    let has_jax =
        std::process::Command::new(&python).args(["-c", "import jax"]).output().is_ok_and(|o| o.status.success());
    if has_jax {
        return Some(python);
    }
    assert!(
        std::env::var("DLAUNCH_REQUIRE_FRAMEWORKS").is_err(),
        "JAX is required here but {} cannot import it: run scripts/test.sh",
        python.display()
    );
    eprintln!("skipped: no JAX in target/test-venv (scripts/test.sh installs it)");
    None
}

#[test]
fn jax_all_reduce_over_four_processes() {
    let Some(python) = venv_python() else { return };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/jax/allreduce.py");
    let job = format!(
        "[job]\nname = \"jax\"\nenv = {{ JAX_PLATFORMS = \"cpu\" }}\n[[tasks]]\nname = \"allreduce\"\ncommand = \"{} {script}\"\nprocesses = 4\ncpus = 0\ntimeout = \"10m\"\n",
        python.display()
    );
    let dir = JobDir::new(&job);
    let out = dir.mpirun(5, &[]);
    assert!(out.status.success(), "{}", text(&out));
    for k in 0..4 {
        let stdout =
            std::fs::read_to_string(dir.output("jax").join(format!("tasks/allreduce/attempt-0/rank-{k}/stdout")))
                .unwrap();
        let line: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(line["rank"], k);
        assert_eq!(line["processes"], 4);
        assert_eq!(line["sum"], 10.0, "1+2+3+4 all-reduced by JAX over dlaunch's rendezvous");
    }
}
