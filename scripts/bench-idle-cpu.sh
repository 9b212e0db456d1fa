#!/bin/sh
# CPU used by dlaunch's own ranks while every slot runs a long task: the cost of waiting.
# Runs `mpirun -n RANKS dlaunch` with tasks that sleep, samples each rank's utime+stime from
# /proc for SECONDS, then stops the job with SIGTERM. Progress lines every second (the most
# often anyone would ask for) and the status snapshot are on, as in a real batch job.
#   scripts/bench-idle-cpu.sh [SECONDS=30] [RANKS=4]
set -eu
seconds=${1:-30}
ranks=${2:-4}
# shellcheck source=scripts/bench-setup.sh
. "$(dirname "$0")/bench-setup.sh"
cat > "$work/job.toml" <<JOB
[job]
name = "idle"
slots_per_worker = 2
grace = "2s"
progress_every = "1s"
[[tasks]]
name = "sleeper"
command = "sleep $((seconds + 60))"
cpus = 0
matrix = { i = [$(seq -s, 1 $((2 * (ranks - 1))))] }
JOB
mpirun -n "$ranks" --oversubscribe target/release/dlaunch "$work/job.toml" >/dev/null 2>&1 &
launcher=$!
sleep 5
ranks_pids=$(pgrep -P "$launcher" -x dlaunch | tr '\n' ' ')
ticks() { for p in $ranks_pids; do awk '{ print $14 + $15 }' "/proc/$p/stat"; done; }
before=$(ticks)
sleep "$seconds"
after=$(ticks)
hz=$(getconf CLK_TCK)
echo "$before" >"$work/before"; echo "$after" >"$work/after"
echo "CPU per dlaunch rank over ${seconds}s, all slots busy with long tasks (rank order as started):"
paste "$work/before" "$work/after" | awk -v s="$seconds" -v hz="$hz" '{ printf "  %.2f%% of a core\n", 100 * ($2 - $1) / hz / s }'
kill -TERM "$launcher"
wait "$launcher" || true
