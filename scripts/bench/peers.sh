#!/bin/sh
# dlaunch against the tools a user would pick instead, in one interleaved run on this machine:
# the same workloads, 4 task slots each, the whole lifecycle timed (start, all tasks, exit),
# loopback only. The limit is `xargs -P` (fork/exec, no logs) plus the MPI floor (mpirun of a
# program that only calls MPI_Init and MPI_Finalize).
#
#   W1  2,000 x `true`                   tasks/s, and x the limit
#   W2  200 (and 2,000) x `sleep 0.05`    efficiency: ideal time / measured time
#   W3  one task                          seconds, and over the MPI floor
#   W4  200 x `true` on 1, 2, 4, 8, 16 worker ranks (or -P)   tasks/s, x the limit
#   W5  4 tasks that sleep                CPU of the tool's own processes while it waits
#
# Peers install on demand: GNU parallel with apt-get, mpi4py (built against the system
# OpenMPI), dask, distributed, dask-mpi and disBatch with pip into target/peers-venv. A peer
# that cannot be installed is reported as skipped. Settings, all optional:
#   RUNS=1 WORKLOADS="W1 W2 W3 W4 W5" W1_TASKS=2000 W2_TASKS="200" W4_TASKS=200
#   W4_WORKERS="1 2 4 8 16" W5_SECONDS=4 SLOW_MAX=200 TIMEOUT=300 PEERS="xargs dlaunch-disk
#   dlaunch-tmpfs parallel mpi4py dask-local dask-mpi disbatch" JSON=target/peers.json
#   DLAUNCH_LOGS="files framed framed-bare"  ([job] logs, -bare: task_dir = false; a row per mode)
#   DLAUNCH=target/release/dlaunch  (the binary to run: another build, for A/B runs)
# SLOW_MAX caps the task count for tools that manage a few tasks a second (disBatch).
#   scripts/bench/peers.sh            # one round: 10-25 minutes on 2 busy cores
#   RUNS=3 W2_TASKS="200 2000" scripts/bench/peers.sh
set -eu
bench_root=$(dirname "$0")/../..
# shellcheck source=scripts/bench-setup.sh
. "$bench_root/scripts/bench-setup.sh"
peers=${PEERS:-xargs dlaunch-disk dlaunch-tmpfs parallel mpi4py dask-local dask-mpi disbatch}
venv=target/peers-venv
json=${JSON:-target/peers.json}

have_parallel() { command -v parallel >/dev/null 2>&1; }
install_parallel() {
    have_parallel && return 0
    { apt-get install -y -q parallel || { apt-get update -q && apt-get install -y -q parallel; }; } >&2
}
# $1: a module to import; $2...: what pip installs for it.
install_python() {
    module=$1
    shift
    "$venv/bin/python3" -c "import $module" 2>/dev/null && return 0
    MPICC=mpicc "$venv/bin/pip" install --quiet --disable-pip-version-check --no-binary mpi4py "$@" >&2
}

[ -x "$venv/bin/python3" ] || python3 -m venv "$venv" || true
chosen=""
for peer in $peers; do
    case $peer in
        xargs | dlaunch-disk | dlaunch-tmpfs) ok=true ;;
        parallel) install_parallel && ok=true || ok=false ;;
        mpi4py) install_python mpi4py mpi4py && ok=true || ok=false ;;
        dask-local) install_python distributed dask distributed && ok=true || ok=false ;;
        dask-mpi) install_python dask_mpi mpi4py dask distributed dask-mpi && ok=true || ok=false ;;
        disbatch) install_python disbatch disbatch && ok=true || ok=false ;;
        *)
            echo "peers.sh: unknown peer '$peer'; known: xargs dlaunch-disk dlaunch-tmpfs parallel mpi4py dask-local dask-mpi disbatch" >&2
            exit 2
            ;;
    esac
    if $ok; then
        chosen="$chosen $peer"
    else
        echo "peers.sh: $peer skipped: it could not be installed here" >&2
    fi
done

mpicc -o "$work/mpi_floor" scripts/bench/mpi_floor.c
python=$PWD/$venv/bin/python3
[ -x "$python" ] || python=python3
mkdir -p target/peers-out
"$python" scripts/bench/peers.py --tools "$chosen" \
    --runs "${RUNS:-1}" --workloads "${WORKLOADS:-W1 W2 W3 W4 W5}" \
    --w1 "${W1_TASKS:-2000}" --w2 "${W2_TASKS:-200}" --w4 "${W4_TASKS:-200}" \
    --w4-workers "${W4_WORKERS:-1 2 4 8 16}" --w5-seconds "${W5_SECONDS:-4}" \
    --slow-max "${SLOW_MAX:-200}" --timeout "${TIMEOUT:-300}" \
    --dlaunch "$(realpath "${DLAUNCH:-target/release/dlaunch}")" --dlaunch-logs "${DLAUNCH_LOGS:-files}" --python "$python" --floor "$work/mpi_floor" \
    --disk "$PWD/target/peers-out" --json "$json"
