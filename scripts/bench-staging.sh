#!/usr/bin/env bash
# Dataset staging benchmark (not a test): dlaunch's staging rate next to a raw MPI_Bcast of
# the same bytes and a local cp, measured in one run, with each rank's peak memory and the
# CPU time of every step. The figures and what they mean are in docs/staging.md.
#
#   scripts/bench-staging.sh [GiB]         a GiB-sized dataset, 1 to 4 (default 2)
#
# On one machine every rank shares one node, and staging would be a single local copy. To
# measure the broadcast, the staging runs set DLAUNCH_STAGE_RANK_IS_NODE=1, a mode for
# benchmarks and tests only: every rank is a node of its own, so rank 0 reads and broadcasts
# while every other rank receives, verifies and writes a copy (all copies onto the one disk).
# Settings: BENCH_DIR (scratch directory, kept with its data file when given; default a new
# one under /var/tmp, removed at the end), RANKS (4).
set -euo pipefail
cd "$(dirname "$0")/.."

gib=${1:-2}
ranks=${RANKS:-4}
case $gib in 1 | 2 | 3 | 4) ;; *) echo "usage: $0 [GiB: 1-4]" >&2; exit 2 ;; esac
size=$((gib << 30))
chunk=$((8 << 20))

export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl_tcp_if_include=lo OMPI_MCA_oob_tcp_if_include=lo OMPI_MCA_rmaps_base_oversubscribe=1

work=${BENCH_DIR:-$(mktemp -d /var/tmp/dlaunch-bench.XXXXXX)}
mkdir -p "$work"
cleanup() {
    rm -rf "$work/stage" "$work/copy.bin" "$work/runs"
    [ -n "${BENCH_DIR:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

cargo build --release --quiet
dlaunch=$PWD/target/release/dlaunch
mpicc -O2 -o "$work/raw_bcast" scripts/bench/raw_bcast.c

if [ "$(stat -c %s "$work/data.bin" 2>/dev/null || echo 0)" != "$size" ]; then
    echo "writing $gib GiB of random data to $work/data.bin" >&2
    head -c "$size" /dev/urandom > "$work/data.bin"
fi
printf x > "$work/tiny.bin"
# Every reader below starts from the page cache, as rank 0 would after a first run.
cat "$work/data.bin" > /dev/null

# Each rank of an mpirun under /usr/bin/time: "<rank> <max RSS KiB> <CPU s>" in $work/<tag>.usage.
timed() { # tag mpirun-args...
    local tag=$1
    shift
    rm -f "$work/$tag".usage.*
    # The single quotes are meant: each rank's shell expands its own OMPI_COMM_WORLD_RANK.
    # shellcheck disable=SC2016
    mpirun "$@" sh -c 'exec /usr/bin/time -f "$OMPI_COMM_WORLD_RANK %M %U %S" -o "$0.$OMPI_COMM_WORLD_RANK" "$@"' \
        "$work/$tag.usage" "$run_command" "${run_args[@]}"
}

cpu_total() { # tag -> CPU seconds of all ranks
    cat "$work/$1".usage.* | awk '{ s += $3 + $4 } END { printf "%.2f", s }'
}

# A local copy: read from the page cache, write to this disk.
sync
start=$(date +%s.%N)
cp "$work/data.bin" "$work/copy.bin"
end=$(date +%s.%N)
cp_rate=$(awk -v b="$size" -v a="$start" -v e="$end" 'BEGIN { printf "%.3f", b / (e - a) / 1e9 }')
rm -f "$work/copy.bin"
sync

raw() { # tag ranks message-bytes -> GB/s
    run_command=$work/raw_bcast run_args=("$size" "$3")
    timed "$1" -n "$2" | tail -n 1
}
raw_8=$(raw raw8 "$ranks" "$chunk")
raw_64=$(raw raw64 "$ranks" $((64 << 20)))
raw_pair=$(raw rawpair 2 "$chunk")

# A job that stages one dataset and runs one trivial task per worker rank.
job() { # name source verify workers
    cat > "$work/$1.toml" <<EOF
[job]
name = "$1"
stage_dir = "stage"
[datasets.data]
source = "$2"
verify = $3
[[tasks]]
name = "t"
command = "true"
datasets = ["data"]
matrix = { i = [$(seq -s, 1 "$4")] }
EOF
}

# Stages with a fresh stage directory; prints the GB/s from summary.json.
stage() { # name ranks [VAR=value...]
    local name=$1 n=$2
    shift 2
    rm -rf "$work/stage"
    sync
    run_command=$dlaunch run_args=(run --fresh "$name.toml")
    # "$@" holds NAME=value settings for this staging run.
    # shellcheck disable=SC2163
    (cd "$work" && export RUST_LOG=dlaunch=debug "$@" && timed "$name" -n "$n" -x RUST_LOG > "$work/$name.log" 2>&1) ||
        { cat "$work/$name.log" >&2; exit 1; }
    python3 -c 'import json, sys; print("%.3f" % json.load(open(sys.argv[1]))["datasets"][0]["gb_per_s"])' \
        "$work/runs/$name/summary.json"
}

job baseline tiny.bin true $((ranks - 1))
job staged data.bin true $((ranks - 1))
job unverified data.bin false $((ranks - 1))
job pair data.bin true 1
stage baseline "$ranks" DLAUNCH_STAGE_RANK_IS_NODE=1 > /dev/null
staged=$(stage staged "$ranks" DLAUNCH_STAGE_RANK_IS_NODE=1)
unverified=$(stage unverified "$ranks" DLAUNCH_STAGE_RANK_IS_NODE=1)
pair=$(stage pair 2 DLAUNCH_STAGE_RANK_IS_NODE=1)
cp "$work/staged.log" "$work/staged-nodes.log"
cat "$work"/staged.usage.* | sort -n > "$work/staged-nodes.usage"
one_node=$(stage staged "$ranks")

pct() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f%%", 100 * a / b }'; }
row() { printf '%-58s %7s GB/s  %s\n' "$@"; }
echo
echo "dataset: $gib GiB ($size bytes), $ranks ranks, $(nproc) cores, chunk $((chunk >> 20)) MiB; GB/s = 1e9 bytes/s"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
row "local cp (page cache to this disk)" "$cp_rate"
row "raw MPI_Bcast to $((ranks - 1)) ranks, 8 MiB messages" "$raw_8" "(CPU $(cpu_total raw8) s)"
row "raw MPI_Bcast to $((ranks - 1)) ranks, 64 MiB messages" "$raw_64" "(CPU $(cpu_total raw64) s)"
row "dlaunch staging to $((ranks - 1)) one-rank nodes, verified" "$staged" \
    "($(pct "$staged" "$raw_8") of raw; CPU $(awk '{ s += $3 + $4 } END { printf "%.2f", s }' "$work/staged-nodes.usage") s)"
row "dlaunch staging to $((ranks - 1)) one-rank nodes, verify = false" "$unverified" \
    "($(pct "$unverified" "$raw_8") of raw; CPU $(cpu_total unverified) s)"
row "raw MPI_Bcast to 1 rank, 8 MiB messages" "$raw_pair" "(CPU $(cpu_total rawpair) s)"
row "dlaunch staging to 1 one-rank node, verified" "$pair" "($(pct "$pair" "$raw_pair") of raw; CPU $(cpu_total pair) s)"
row "dlaunch staging on one real node (one local copy)" "$one_node"
echo
echo "CPU seconds per step, staging to $((ranks - 1)) one-rank nodes, verified:"
grep -o 'rank [0-9]*): CPU seconds per step: .*' "$work/staged-nodes.log" | sort -n -k2 | sed 's/^/  /'
echo
echo "peak RSS per rank (MiB): 1-byte dataset -> $gib GiB dataset (difference)"
cat "$work"/baseline.usage.* | sort -n | join - "$work/staged-nodes.usage" |
    awk '{ printf "  rank %s: %6.1f -> %6.1f  (%+.1f)\n", $1, $2 / 1024, $5 / 1024, ($5 - $2) / 1024 }'
