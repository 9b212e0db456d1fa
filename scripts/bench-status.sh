#!/bin/sh
# How fast `dlaunch status` answers on a big run: generates the journal of a finished run of
# TASKS tasks (one attempt each, 1% failed) on 64 workers, then times `status --json` without
# a snapshot (the whole journal folded), with the snapshot the first reader saved, and with a
# snapshot plus 10,000 lines written after it (a live run between two snapshots).
#   scripts/bench-status.sh [TASKS=1000000] [DLAUNCH=target/release/dlaunch]
set -eu
tasks=${1:-1000000}
dlaunch=${2:-target/release/dlaunch}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
out="$work/run"
mkdir -p "$out"
python3 - "$tasks" "$out/journal.jsonl" <<'PY'
import json, sys
tasks, path = int(sys.argv[1]), sys.argv[2]
t = lambda s: "2026-01-01T%02d:%02d:%02d.000Z" % (s // 3600 % 24, s // 60 % 60, s % 60)
with open(path, "w") as f:
    w = lambda e: f.write(json.dumps(e, separators=(",", ":")) + "\n")
    w({"event": "run_started", "run": 0, "time": t(0), "version": "0.1.0", "world_size": 65, "tasks": tasks, "slurm_job_id": None, "kept": 0})
    for r in range(1, 65):
        w({"event": "worker_joined", "rank": r, "host": "node%d" % (r // 4), "capacity": {"slots": 4, "cpus": 32, "gpus": 4, "memory": 1 << 38}})
    for i in range(tasks):
        task, rank, s = "train[lr=0.1,seed=%d]" % i, 1 + i % 64, i // 256
        w({"event": "task_defined", "task": task, "digest": "0123456789abcdef", "params": {"lr": 0.1, "seed": i}})
        w({"event": "attempt_started", "task": task, "attempt": 0, "time": t(s), "processes": [{"rank": rank, "host": "node%d" % (rank // 4), "resources": {"cpus": 8, "gpus": 1, "memory": 0}}]})
        failed = i % 100 == 99
        w({"event": "attempt_ended", "task": task, "attempt": 0, "status": "failed" if failed else "succeeded", "reason": "exit 1" if failed else "", "retry": False,
           "processes": [{"process": 0, "rank": rank, "host": "node%d" % (rank // 4), "cpus": "0-7", "gpus": ["0"], "ending": {"how": "exited", "code": 1 if failed else 0}, "start": t(s), "end": t(s + 1)}]})
    w({"event": "run_ended", "time": t(tasks // 256 + 2), "succeeded": tasks - tasks // 100, "failed": tasks // 100, "cancelled": 0, "not_run": 0, "reason": ""})
PY
echo "journal: $(du -h "$out/journal.jsonl" | cut -f1) for $tasks tasks"
timed() { start=$(date +%s.%N); "$dlaunch" status --json "$out" >/dev/null; end=$(date +%s.%N); echo "  $1: $(echo "$end - $start" | bc) s"; }
timed "no snapshot (whole journal)"
timed "snapshot saved by the first reader"
python3 - "$out/journal.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "a") as f:
    for i in range(10000):
        f.write(json.dumps({"event": "task_defined", "task": "extra%d" % i, "digest": "x"}) + "\n")
PY
timed "snapshot + 10,000 newer lines"
