#!/usr/bin/env bash
# Dataset staging between separate nodes whose network is the limit (benchmark, not a test):
# dlaunch's staging rate next to a raw MPI_Bcast of the same bytes, both measured over the
# throw-away SLURM cluster (scripts/slurm-cluster/), three nodes in network namespaces, one
# rank per node, with each node's link capped by tc (token bucket, both directions) to
# stand in for a real NIC. scripts/bench-staging.sh measures the same without a cap.
#
#   scripts/bench-staging-cluster.sh [GiB] [RATE...]
#
# GiB: dataset size, 1 to 4 (default 1). RATE: a link rate as tc writes it (10gbit,
# 2500mbit, ...) or "none" for no cap; default: none 10gbit 5gbit 2500mbit 1gbit.
# Needs root and the SLURM packages (scripts/install-deps.sh); starts its own cluster in
# /tmp/dlaunch-slurm-bench and stops it at the end (it refuses while another one runs).
# All nodes still share this machine's cores: a cap at or above what they can move
# measures the CPU, not the link.
set -euo pipefail
cd "$(dirname "$0")/.."

gib=${1:-1}
case $gib in 1 | 2 | 3 | 4) ;; *) echo "usage: $0 [GiB: 1-4] [RATE...]" >&2; exit 2 ;; esac
shift $(($# > 0 ? 1 : 0))
rates=("$@")
[ ${#rates[@]} -gt 0 ] || rates=(none 10gbit 5gbit 2500mbit 1gbit)
size=$((gib << 30))
chunk=$((8 << 20))
nodes=3

export DLAUNCH_SLURM_BASE=/tmp/dlaunch-slurm-bench DLAUNCH_SLURM_NODES=$nodes
cluster=scripts/slurm-cluster
work=$(mktemp -d /var/tmp/dlaunch-bench-cluster.XXXXXX)
cleanup() {
    "$cluster/stop.sh" --purge > /dev/null 2>&1 || echo "stopping the cluster failed: run $cluster/stop.sh" >&2
    rm -rf "$work"
}
trap cleanup EXIT
"$cluster/start.sh" > "$work/cluster.log" 2>&1 || { cat "$work/cluster.log" >&2; exit 1; }
# shellcheck source=/dev/null
. "$DLAUNCH_SLURM_BASE/env.sh"

cargo build --release --quiet
mpicc -O2 -o "$work/raw_bcast" scripts/bench/raw_bcast.c
echo "writing $gib GiB of random data" >&2
head -c "$size" /dev/urandom > "$work/data.bin"
# Rank 0 reads from the page cache, as it would after a first run.
cat "$work/data.bin" > /dev/null

cat > "$work/job.toml" <<EOF
[job]
name = "staged"
stage_dir = "$work/stage"
[datasets.data]
source = "$work/data.bin"
[[tasks]]
name = "t"
command = "true"
datasets = ["data"]
matrix = { i = [$(seq -s, 1 $((nodes - 1)))] }
EOF
cat > "$work/both.sh" <<EOF
#!/bin/bash
set -e
srun --mpi=pmix "$work/raw_bcast" $size $chunk > "$work/raw.out"
srun --mpi=pmix "$PWD/target/release/dlaunch" run --fresh "$work/job.toml" > "$work/staged.log" 2>&1
EOF
chmod +x "$work/both.sh"

# cap RATE: every node's link limited to RATE each way (its veth end sends, the bridge's
# end sends to it), or no limit for "none".
cap() {
    local i ns veth
    for i in $(seq 1 "$nodes"); do
        ns=/run/netns/dls-node$i veth=dls-v$i
        if [ "$1" = none ]; then
            nsenter --net="$ns" tc qdisc del dev dlaunch0 root 2> /dev/null || true
            tc qdisc del dev "$veth" root 2> /dev/null || true
        else
            nsenter --net="$ns" tc qdisc replace dev dlaunch0 root tbf rate "$1" burst 1mb latency 50ms
            tc qdisc replace dev "$veth" root tbf rate "$1" burst 1mb latency 50ms
        fi
    done
}

row() { printf '%-10s %10s %10s %8s\n' "$@"; }
echo
echo "dataset: $gib GiB, $nodes nodes (network namespaces) x 1 rank, $(nproc) cores shared, chunk 8 MiB; GB/s = 1e9 bytes/s"
row "link cap" "raw Bcast" "staging" "ratio"
for rate in "${rates[@]}"; do
    cap "$rate"
    rm -rf "$work/stage" "$work/runs"
    sbatch --wait --quiet -D "$work" -N "$nodes" --ntasks-per-node=1 -o "$work/slurm-%j.out" "$work/both.sh" ||
        { cat "$work"/slurm-*.out "$work/staged.log" >&2; exit 1; }
    raw=$(tail -n 1 "$work/raw.out")
    staged=$(python3 -c 'import json, sys; print("%.3f" % json.load(open(sys.argv[1]))["datasets"][0]["gb_per_s"])' \
        "$work/runs/staged/summary.json")
    row "$rate" "$raw" "$staged" "$(awk -v a="$staged" -v b="$raw" 'BEGIN { printf "%.0f%%", 100 * a / b }')"
done
cap none
