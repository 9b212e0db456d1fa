#!/bin/sh
# Rank 0's CPU per task in the flat layout and in `layout = "nodes"`, under real mpirun:
# trivial tasks on RANKS ranks (one node here), N and 4N of them, RUNS rounds, the layouts
# and sizes interleaved. Rank 0 and rank 1 (a worker in the flat layout; the node's leader,
# with its own worker, in the node layout) run under /usr/bin/time. What a rank's CPU grows
# by from N to 4N tasks, per task, is its work per task, without MPI's start-up and the
# run's fixed costs. On one node the leader does the flat rank 0's work for its node: what
# the layout buys shows at rank 0, whose work per task limits a flat run on thousands of
# nodes (docs/performance.md).
#   scripts/bench/layouts.sh [N=2000] [RANKS=5] [RUNS=3]
set -eu
n=${1:-2000}
ranks=${2:-5}
runs=${3:-3}
bench_root=$(dirname "$0")/../..
# shellcheck source=scripts/bench-setup.sh
. "$bench_root/scripts/bench-setup.sh"
for size in "$n" $((4 * n)); do
    values=$(seq -s, 1 "$size")
    for layout in flat nodes; do
        cat > "$work/$layout-$size.toml" <<JOB
[job]
name = "$layout"
layout = "$layout"
output_dir = "$work/out"
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
# One line per run: layout tasks wall rank0_cpu rank1_cpu.
for run in $(seq 1 "$runs"); do
    for size in "$n" $((4 * n)); do
        for layout in flat nodes; do
            rm -rf "$work/out"
            export TIMES="$work/times"
            t0=$(now)
            mpirun -n "$ranks" --oversubscribe "$work/timed" "$work/$layout-$size.toml" >/dev/null 2>&1
            t1=$(now)
            read -r u0 s0 < "$TIMES.0"
            read -r u1 s1 < "$TIMES.1"
            echo "$layout $size $(awk "BEGIN { print $t1 - $t0, $u0 + $s0, $u1 + $s1 }")"
        done
    done
done > "$work/rows"
sed 's/^/  /' "$work/rows"
# Medians per layout and size, then the growth from N to 4N per task.
for layout in flat nodes; do
    for size in "$n" $((4 * n)); do
        for col in 3 4 5; do
            awk -v l="$layout" -v s="$size" -v c="$col" '$1 == l && $2 == s { print $c }' "$work/rows" |
                sort -g | awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }'
        done | paste -sd' ' | sed "s/^/$layout $size /"
    done
done > "$work/medians"
awk -v n="$n" '
    { wall[$1, $2] = $3; r0[$1, $2] = $4; r1[$1, $2] = $5 }
    END {
        printf "%-6s %12s %12s %22s %22s\n", "layout", "wall N (s)", "wall 4N (s)", "rank 0 us/task (4N-N)", "rank 1 us/task (4N-N)"
        split("flat nodes", ls, " ")
        for (i = 1; i <= 2; i++) {
            l = ls[i]
            printf "%-6s %12.2f %12.2f %22.1f %22.1f\n", l, wall[l, n], wall[l, 4 * n],
                (r0[l, 4 * n] - r0[l, n]) * 1e6 / (3 * n), (r1[l, 4 * n] - r1[l, n]) * 1e6 / (3 * n)
        }
    }' "$work/medians"
