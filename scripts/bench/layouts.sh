#!/bin/sh
# Rank 0's CPU per task in the flat layout and in `layout = "nodes"`, under real mpirun: N
# trivial tasks on RANKS ranks (one node here), RUNS rounds, the layouts interleaved. Rank 0
# and rank 1 (a worker in the flat layout; the node's leader, with its own worker, in the node
# layout) run under /usr/bin/time; the table gives their user+system CPU per task, and the
# wall time. On one node the leader does the flat rank 0's work for its node: what the layout
# buys shows at rank 0, whose work per task is what limits a flat run on thousands of nodes.
#   scripts/bench/layouts.sh [N=4000] [RANKS=5] [RUNS=3]
set -eu
n=${1:-4000}
ranks=${2:-5}
runs=${3:-3}
bench_root=$(dirname "$0")/../..
# shellcheck source=scripts/bench-setup.sh
. "$bench_root/scripts/bench-setup.sh"
values=$(seq -s, 1 "$n")
for layout in flat nodes; do
    cat > "$work/$layout.toml" <<JOB
[job]
name = "$layout"
layout = "$layout"
output_dir = "$work/out-$layout"
slots_per_worker = 1
logs = "framed"
task_dir = false
[[tasks]]
name = "t"
command = "true"
cpus = 0
matrix = { i = [$values] }
JOB
done
cat > "$work/timed" <<'SH'
#!/bin/sh
rank=${OMPI_COMM_WORLD_RANK:-0}
if [ "$rank" -le 1 ]; then
    exec /usr/bin/time -f "%U %S" -o "$TIMES.$rank" "$DLAUNCH_BIN" "$@"
fi
exec "$DLAUNCH_BIN" "$@"
SH
chmod +x "$work/timed"
export DLAUNCH_BIN="$PWD/target/release/dlaunch"
now() { date +%s.%N; }
printf 'run layout  wall_s  rank0_cpu_us_per_task  rank1_cpu_us_per_task\n'
for run in $(seq 1 "$runs"); do
    for layout in flat nodes; do
        rm -rf "$work/out-$layout"
        export TIMES="$work/times-$layout-$run"
        t0=$(now)
        mpirun -n "$ranks" --oversubscribe "$work/timed" "$work/$layout.toml" >/dev/null 2>&1
        t1=$(now)
        awk -v n="$n" -v run="$run" -v layout="$layout" -v t0="$t0" -v t1="$t1" \
            -v f0="$TIMES.0" -v f1="$TIMES.1" 'BEGIN {
                getline l0 < f0; split(l0, a, " "); getline l1 < f1; split(l1, b, " ")
                printf "%3d %-6s %7.2f  %21.1f  %21.1f\n", run, layout, t1 - t0,
                    (a[1] + a[2]) * 1e6 / n, (b[1] + b[2]) * 1e6 / n }'
    done
done
