#!/bin/sh
# Returned output across nodes (docs/returned-output.md): on the SLURM test cluster, one task
# per node writes MIB MiB to a declared output, and all three are sent to rank 0 at once.
# Prints the bytes returned and the rate, from the journal: from the first process's end (when
# its output starts out) to the run's end (every byte written and renamed on rank 0).
#   scripts/bench-returned-cluster.sh [MIB=1024]
# Needs a running cluster (scripts/slurm-cluster/start.sh, same DLAUNCH_SLURM_BASE).
# DLAUNCH=path/to/dlaunch [target/debug/dlaunch]. The node-local copies and rank 0's land on
# disk under /tmp: 2 x 3 x MIB MiB at most, removed at the end.
set -eu
mib=${1:-1024}
cd "$(dirname "$0")/.."
base=${DLAUNCH_SLURM_BASE:-/tmp/dlaunch-slurm}
# shellcheck source=/dev/null
. "$base/env.sh"
dlaunch=$(realpath "${DLAUNCH:-target/debug/dlaunch}")
start=$(realpath slurm/dlaunch-start.sh)
work=$(mktemp -d /tmp/dlaunch-bench-returned.XXXXXX)
trap 'rm -rf "$work" /tmp/dlaunch-0/bench-returned-* "$base"/tmp/node*/dlaunch-0/bench-returned-*' EXIT
cat > "$work/job.toml" <<JOB
[job]
name = "bench-returned"
output = "returned"
[[tasks]]
name = "big"
matrix = { node = [1, 2, 3] }
gpus = 2
command = "head -c $((mib << 20)) /dev/zero > \$DLAUNCH_TASK_DIR/out.bin"
outputs = ["out.bin"]
JOB
sbatch --parsable --wait -N 3 --ntasks-per-node=1 --gpus-per-node=2 --time=20 -D "$work" -o "$work/slurm.out" \
    --wrap "DLAUNCH=$dlaunch $start --rank-per-node job.toml" >/dev/null || {
    cat "$work/slurm.out" >&2
    exit 1
}
python3 - "$work/runs/bench-returned/journal.jsonl" <<'PY'
import json, sys
from datetime import datetime
def at(text):
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
events = [json.loads(line) for line in open(sys.argv[1])][1:]
ends = [at(p["end"]) for e in events if e["event"] == "attempt_ended" for p in e["processes"]]
hosts = sorted(p["host"] for e in events if e["event"] == "attempt_ended" for p in e["processes"])
returned = sum(e["bytes"] for e in events if e["event"] == "output_returned")
done = max(at(e["time"]) for e in events if e["event"] == "run_ended")
seconds = done - min(ends)
print(f"returned {returned / 2**20:.0f} MiB from {', '.join(hosts)} in {seconds:.2f} s: "
      f"{returned / 1e6 / seconds:.0f} MB/s into rank 0's output_dir")
PY
