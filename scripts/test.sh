#!/bin/sh
# The whole test suite, as CI runs it (.ci/run): packages, formatting, lints, unit and
# integration tests under real mpirun, and the end-to-end tests on a real multi-node SLURM
# cluster started here in network namespaces (always stopped again).
set -eu
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The core first and alone: it must build and pass without OpenMPI, hwloc or CUDA.
scripts/check-core.sh
cargo test --quiet -p dlaunch-core
shellcheck scripts/gpu-check.sh scripts/gpu-check/task-check.sh scripts/check-core.sh
# The peer benchmark is checked, not run: it takes minutes and installs the peers.
shellcheck -x scripts/bench/peers.sh
# A real framework for the multi-process tests: JAX on CPUs, from PyPI.
if ! target/test-venv/bin/python3 -c "import jax" 2>/dev/null; then
    python3 -m venv target/test-venv
    target/test-venv/bin/pip install --quiet --disable-pip-version-check jax
fi
export DLAUNCH_REQUIRE_FRAMEWORKS=1
# Integration tests start several MPI ranks each: two tests at a time is plenty on 2 cores.
cargo test --quiet -- --test-threads=2
# End to end on a real SLURM cluster: slurmctld and three slurmd "nodes" in network namespaces
# of this machine (scripts/slurm-cluster), stopped again however the tests end.
slurm_base=${DLAUNCH_SLURM_BASE:-/tmp/dlaunch-slurm}
trap 'scripts/slurm-cluster/stop.sh || echo "test.sh: could not stop the SLURM test cluster" >&2' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP
scripts/slurm-cluster/start.sh
export DLAUNCH_SLURM_ENV="$slurm_base/env.sh" DLAUNCH_REQUIRE_SLURM=1
# One scenario at a time: the cluster has 3 nodes x 4 CPUs.
cargo test --quiet --test slurm -- --test-threads=1
