#!/bin/sh
# Returned output's cost (docs/returned-output.md): W1 (N x `true`) in shared and in returned
# mode, then rank 0's peak memory (/usr/bin/time -v) while 64 tasks write MB MiB each to
# stdout as fast as they can, sent back to rank 0 in returned mode.
#   scripts/bench-returned.sh [N=2000] [RANKS=3] [MB=20]
# DLAUNCH=path/to/dlaunch uses that binary instead of a fresh release build.
set -eu
n=${1:-2000}
ranks=${2:-3}
mb=${3:-20}
cd "$(dirname "$0")/.."
if [ -z "${DLAUNCH:-}" ]; then
    cargo build --release --quiet
    DLAUNCH=target/release/dlaunch
fi
dlaunch=$(realpath "$DLAUNCH")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo
now() { date +%s.%N; }
job() { # name mode values command
    mkdir -p "$work/$1"
    cat > "$work/$1/job.toml" <<JOB
[job]
name = "$1"
output = "$2"
log_limit = "unlimited"
[[tasks]]
name = "t"
command = "$4"
cpus = 0
matrix = { i = [$3] }
JOB
}
for mode in shared returned; do
    job "w1-$mode" "$mode" "$(seq -s, 1 "$n")" true
    t0=$(now)
    mpirun -n "$ranks" --oversubscribe "$dlaunch" "$work/w1-$mode/job.toml" >/dev/null 2>&1
    t1=$(now)
    awk "BEGIN { printf \"W1 %s: %d x true, %d ranks: %.2f s, %.0f tasks/s\n\", \"$mode\", $n, $ranks, $t1 - $t0, $n / ($t1 - $t0) }"
done
for mode in shared returned; do
    job "log-$mode" "$mode" "$(seq -s, 1 64)" "yes dlaunch-returned-output-benchmark | head -c ${mb}000000"
    t0=$(now)
    mpirun -n "$ranks" --oversubscribe sh -c \
        "if [ \$OMPI_COMM_WORLD_RANK = 0 ]; then exec /usr/bin/time -v -o $work/time-$mode $dlaunch $work/log-$mode/job.toml; else exec $dlaunch $work/log-$mode/job.toml; fi" \
        >/dev/null 2>&1
    t1=$(now)
    rss=$(awk -F: '/Maximum resident/ { print $2 }' "$work/time-$mode")
    bytes=$(cat "$work"/log-"$mode"/runs/log-"$mode"/tasks/*/attempt-0/stdout | wc -c)
    awk "BEGIN { printf \"logs %s: 64 tasks x %d MB: %.2f s, %.0f MB/s into output_dir, rank 0 peak RSS %d MiB\n\", \"$mode\", $mb, $t1 - $t0, $bytes / 1e6 / ($t1 - $t0), $rss / 1024 }"
done
