#!/bin/sh
# Dispatch overhead of dlaunch against the limit set by the machine: how long N trivial tasks
# take under `mpirun -n RANKS dlaunch`, next to MPI start-up alone (an MPI hello on the same
# ranks) plus N `sh -c true` started by a minimal launcher (Python's subprocess, which uses
# vfork/posix_spawn) at the same parallelism, each with its own log directory and stdout and
# stderr files as dlaunch's tasks have. Everything runs in this one invocation.
#   scripts/bench-dispatch.sh [N=2000] [RANKS=3]
set -eu
n=${1:-2000}
ranks=${2:-3}
workers=$((ranks - 1))
# shellcheck source=scripts/bench-setup.sh
. "$(dirname "$0")/bench-setup.sh"
mpicc -o "$work/hello" tests/fixtures/mpi_hello.c
values=$(seq -s, 1 "$n")
cat > "$work/job.toml" <<JOB
[job]
name = "bench"
slots_per_worker = 1
[[tasks]]
name = "t"
command = "true"
cpus = 0
matrix = { i = [$values] }
JOB
now() { date +%s.%N; }
calc() { awk "BEGIN { print $1 }"; }
elapsed() { calc "$2 - $1"; }

t0=$(now); mpirun -n "$ranks" --oversubscribe "$work/hello" >/dev/null; t1=$(now)
mpi=$(elapsed "$t0" "$t1")
t0=$(now)
python3 - "$n" "$workers" "$work/logs" <<'PY'
import os, subprocess, sys
n, lanes, logs = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
running = []
for i in range(n):
    if len(running) == lanes:
        os.wait()
        running = [p for p in running if p.poll() is None]
    d = os.path.join(logs, str(i))
    os.makedirs(d)
    with open(os.path.join(d, "stdout"), "wb") as out, open(os.path.join(d, "stderr"), "wb") as err:
        running.append(subprocess.Popen(["/bin/sh", "-c", "true"], stdout=out, stderr=err))
for p in running:
    p.wait()
PY
t1=$(now)
fork=$(elapsed "$t0" "$t1")
t0=$(now); mpirun -n "$ranks" --oversubscribe target/release/dlaunch "$work/job.toml" >/dev/null 2>&1; t1=$(now)
dl=$(elapsed "$t0" "$t1")
limit=$(calc "$mpi + $fork")
printf '%d tasks, %d ranks (%d workers, 1 slot each), %s\n' "$n" "$ranks" "$workers" "$(nproc) cores"
printf '  MPI start-up (hello):          %6.2f s\n' "$mpi"
printf '  spawn %d x sh -c true:       %6.2f s  (%d at a time, logs to files)\n' "$n" "$fork" "$workers"
printf '  limit (sum):                   %6.2f s\n' "$limit"
printf '  dlaunch:                       %6.2f s  = %.2f x the limit, %.0f tasks/s\n' "$dl" "$(calc "$dl / $limit")" "$(calc "$n / $dl")"
