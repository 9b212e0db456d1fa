//! Any bytes as a job file: parsing, validation, error rendering and task expansion must
//! never panic, whatever the input.
#![no_main]

use std::path::Path;

use dlaunch_core::spec::{PathKind, Probe};
use libfuzzer_sys::fuzz_target;

/// The fuzzed file lives nowhere: every path it names is missing.
struct Nowhere;

impl Probe for Nowhere {
    fn kind(&self, _: &Path) -> Result<PathKind, String> {
        Err("No such file or directory".into())
    }
}

fuzz_target!(|data: &[u8]| {
    let file = Path::new("/nonexistent-dlaunch-fuzz/job.toml");
    match dlaunch_core::spec::parse(file, data, &Nowhere) {
        Ok(job) => {
            let tasks: u64 = job
                .templates
                .iter()
                .map(|t| t.matrix.iter().map(|a| a.values.len() as u64).product::<u64>())
                .sum();
            // Expansion is linear in the task count; keep each run fast for the fuzzer.
            if tasks <= 10_000 {
                // Validation tried every value that could be refused.
                let expanded = dlaunch_core::plan::expand(&job).expect("a valid job expands");
                assert_eq!(expanded.len() as u64, tasks);
            }
        }
        Err(errors) => {
            assert!(!errors.0.is_empty());
            let _ = errors.to_string();
        }
    }
});
