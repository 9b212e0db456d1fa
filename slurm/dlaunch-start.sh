#!/bin/bash
# slurm/dlaunch-start.sh - start dlaunch's ranks on the nodes of an existing SLURM allocation
# (inside salloc, or in a batch script of your own) with a chosen layout.
#
#   slurm/dlaunch-start.sh [--rank-per-node | --rank-per-gpu] [--dry-run] [--] job.toml [dlaunch options]
#
# Layouts:
#   (default)         srun's own layout of the allocation: one rank per task you allocated
#                     (--ntasks-per-node, -n). Rank 0 coordinates, the others run tasks; ranks
#                     on one node split its CPUs and GPUs between them.
#   --rank-per-node   one worker rank per node, holding all the node's GPUs and CPUs, plus
#                     the coordinator (rank 0) on the first node: nodes + 1 ranks.
#   --rank-per-gpu    one worker rank per GPU of each node (one rank on a node without GPUs),
#                     plus the coordinator on the first node.
# The two explicit layouts place every rank with srun --distribution=arbitrary and a node
# list (-w node1,node1,node2,...), allow more ranks than allocated tasks (--overcommit: the
# coordinator sleeps in poll(2) and needs no core of its own) and switch srun's CPU binding
# off, so that each worker sees its node's whole allocation and dlaunch splits it by locality.
# Allocate whole nodes (--exclusive) or enough CPUs (--cpus-per-task) for them.
#
# The srun command is printed before it runs; --dry-run only prints it. Everything after the
# layout options (or after --) goes to dlaunch unchanged.
#
# Settings (environment variables):
#   DLAUNCH            the dlaunch binary                          [dlaunch from PATH]
#   DLAUNCH_SRUN_ARGS  extra srun options, e.g. "--het-group=0,1" (all components of a
#                      heterogeneous job, each with its own layout). --mpi=pmix
#                      is added by itself only when the cluster's MpiDefault is not pmix and
#                      SLURM_MPI_TYPE is not set.
#
# Exit status: dlaunch's (through srun): 0 all tasks succeeded, 1 some failed, 2 bad job file
# or usage, 3 stopped early with work left (run the same command again to resume), 4
# internal error.
set -uo pipefail

warn() { echo "dlaunch-start.sh: $*" >&2; }
usage() {
    warn "usage: $0 [--rank-per-node | --rank-per-gpu] [--dry-run] [--] job.toml [dlaunch options]"
    exit 2
}

layout=default
dry_run=""
while [ $# -gt 0 ]; do
    case $1 in
        --rank-per-node) layout=node ;;
        --rank-per-gpu) layout=gpu ;;
        --dry-run) dry_run=1 ;;
        -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
        --) shift; break ;;
        *) break ;;
    esac
    shift
done
[ $# -ge 1 ] || usage
if [ -z "${SLURM_JOB_ID:-}" ]; then
    warn "not inside a SLURM allocation: use salloc or sbatch first"
    exit 2
fi
dlaunch=${DLAUNCH:-$(command -v dlaunch || true)}
if [ -z "$dlaunch" ] || [ ! -x "$dlaunch" ]; then
    warn "dlaunch not found: set DLAUNCH to the binary or put it on PATH"
    exit 2
fi

srun_args=()
if [ -z "${SLURM_MPI_TYPE:-}" ]; then
    # Debian's and most OpenMPI builds start under srun only through PMIx.
    mpi_default=$(scontrol show config 2>/dev/null | awk '$1 == "MpiDefault" { print $3 }')
    case $mpi_default in
        pmix*) ;;
        *) if srun --mpi=list 2>&1 | grep -qw pmix; then srun_args+=(--mpi=pmix); fi ;;
    esac
fi

# gpus_per_node: "node count" lines for every node of the allocation, from the per-node
# detail of `scontrol show job -d` (Nodes=node[1-2] ... GRES=gpu:a100:4(IDX:0-3),...).
gpus_per_node() {
    local line nodes gres count node
    scontrol show job -d "$SLURM_JOB_ID" 2>/dev/null | grep -E '^ +Nodes=' | while read -r line; do
        nodes=$(tr ' ' '\n' <<< "$line" | sed -n 's/^Nodes=//p')
        gres=$(tr ' ' '\n' <<< "$line" | sed -n 's/^GRES=//p')
        # the count right before "(IDX:", of the gpu entry
        count=$(tr ',' '\n' <<< "$gres" | sed -nE 's/^gpu(:[^:(]+)?:([0-9]+)\(.*/\2/p' | head -n 1)
        for node in $(scontrol show hostnames "$nodes"); do
            echo "$node ${count:-0}"
        done
    done
}

if [ "$layout" != default ] && [ -n "${SLURM_HET_SIZE:-}" ]; then
    warn "--rank-per-node and --rank-per-gpu place ranks in a plain allocation; in a heterogeneous"
    warn "job use the components' own layout: DLAUNCH_SRUN_ARGS=--het-group=0,1 $0 job.toml"
    exit 2
fi
if [ "$layout" != default ]; then
    per_node=$(gpus_per_node)
    if [ -z "$per_node" ]; then
        # No per-node detail (an older SLURM): the allocation's nodes, with this node's GPUs.
        per_node=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" | awk -v g="${SLURM_GPUS_ON_NODE:-0}" '{ print $1, g }')
    fi
    if [ -z "$per_node" ]; then
        warn "cannot list the nodes of job $SLURM_JOB_ID"
        exit 2
    fi
    # The coordinator first, on the first node; then the workers.
    hosts=$(awk 'NR == 1 { print $1 }' <<< "$per_node")
    while read -r node gpus; do
        ranks=1
        if [ "$layout" = gpu ] && [ "$gpus" -gt 1 ]; then ranks=$gpus; fi
        for ((i = 0; i < ranks; i++)); do hosts="$hosts,$node"; done
    done <<< "$per_node"
    count=$(tr ',' '\n' <<< "$hosts" | grep -c .)
    nodes=$(grep -c . <<< "$per_node")
    srun_args+=(--nodes="$nodes" --ntasks="$count" --distribution=arbitrary --nodelist="$hosts" --overcommit)
    # Without a binding plugin srun only warns about --cpu-bind.
    task_plugin=$(scontrol show config 2>/dev/null | awk '$1 == "TaskPlugin" { print $3 }')
    case $task_plugin in task/none | "") ;; *) srun_args+=(--cpu-bind=none) ;; esac
fi
if [ -n "${DLAUNCH_SRUN_ARGS:-}" ]; then
    read -r -a extra <<< "$DLAUNCH_SRUN_ARGS"
    srun_args+=("${extra[@]}")
fi

# The allocation's task layout must not fight the explicit one: srun reads these as defaults.
unset_layout=()
if [ "$layout" != default ]; then
    unset_layout=(-u SLURM_NTASKS_PER_NODE -u SLURM_TASKS_PER_NODE -u SLURM_NTASKS -u SLURM_NPROCS)
fi
echo "dlaunch-start.sh: srun ${srun_args[*]}${srun_args[*]:+ }$dlaunch $*"
[ -z "$dry_run" ] || exit 0
exec env "${unset_layout[@]}" srun "${srun_args[@]}" "$dlaunch" "$@"
