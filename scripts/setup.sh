#!/bin/sh
# One command for a fresh Debian 12 machine (as root): install packages, build dlaunch,
# run the quickstart example on 4 MPI ranks.
set -eu
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release
# On this test machine OpenMPI must stay on loopback and may run as root; on a real cluster
# leave these out (OpenMPI then uses the cluster's network).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo
mpirun -n 4 --oversubscribe target/release/dlaunch examples/quickstart.toml
