#!/bin/sh
# The whole test suite, as CI runs it (.ci/run): packages, formatting, lints, unit and
# integration tests under real mpirun, and the end-to-end tests on a real multi-node SLURM
# cluster started here in network namespaces (always stopped again).
set -eu
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
# A real framework for the multi-process tests: JAX on CPUs, from PyPI.
if ! target/test-venv/bin/python3 -c "import jax" 2>/dev/null; then
    python3 -m venv target/test-venv
    target/test-venv/bin/pip install --quiet --disable-pip-version-check jax
fi
export DLAUNCH_REQUIRE_FRAMEWORKS=1
# Integration tests start several MPI ranks each: two tests at a time is plenty on 2 cores.
cargo test --quiet -- --test-threads=2
