# shellcheck shell=sh
# Sourced by the benchmark scripts: a release build, a scratch directory removed on exit, and
# OpenMPI on loopback as root (this single test machine; leave these out on a cluster).
# Scripts in a folder below scripts/ name the repository root in bench_root.
cd "${bench_root:-$(dirname "$0")/..}" || exit 1
cargo build --release --quiet
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo
