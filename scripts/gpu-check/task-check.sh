#!/usr/bin/env bash
# Runs inside each process of scripts/gpu-check.sh's job and checks what dlaunch gave it:
#   task-check.sh GPUS CPUS WORLD_SIZE MEET [VISIBILITY]
# GPUS, CPUS, WORLD_SIZE: what the task asked for; MEET: how many tasks must be running at
# once (0: no meeting), so that tasks seen together can be checked for sharing nothing;
# VISIBILITY: the task's gpu_visibility ("task", the default, or "process").
# From the job's env: GPU_CHECK_WORK (facts, the CUDA probe, results), GPU_CHECK_RUN (name
# of this run), GPU_CHECK_MODE (cuda: a real GPU node; xml: a topology XML, nothing bound)
# and GPU_CHECK_SUBSET (the CUDA_VISIBLE_DEVICES dlaunch was started with; empty: none).
# Writes one line per check, RESULT<TAB>CHECK<TAB>DETAIL, and a FACTS line for the checks
# across tasks, to results/RUN/TASK_INDEX.RANK. Always exits 0: a missing result file is
# how the caller learns that this script itself broke.
set -u

want_gpus=$1 want_cpus=$2 want_world=$3 meet=$4 visibility=${5:-task}
work=$GPU_CHECK_WORK
run=$GPU_CHECK_RUN
facts=$work/facts
rank=${RANK:-?}
label="$run ${DLAUNCH_TASK_ID:-?}"
[ "$want_world" -gt 1 ] && label+=" rank $rank"

lines=()
row() { lines+=("$1"$'\t'"$label $2"$'\t'"$3"); }
# Ends a row's checks: PASS with $2 when nothing went wrong, else FAIL with the problems.
verdict() {
    local name=$1 detail=$2
    shift 2
    if [ $# -eq 0 ]; then row PASS "$name" "$detail"; else row FAIL "$name" "$*"; fi
}

# "0-3,8" -> "0 1 2 3 8"; fails on anything that is not a CPU list.
expand() {
    local part parts out=() c
    IFS=, read -ra parts <<<"$1"
    for part in "${parts[@]}"; do
        if [[ $part =~ ^([0-9]+)-([0-9]+)$ ]]; then
            for ((c = BASH_REMATCH[1]; c <= BASH_REMATCH[2]; c++)); do out+=("$c"); done
        elif [[ $part =~ ^[0-9]+$ ]]; then
            out+=("$part")
        else
            return 1
        fi
    done
    echo "${out[*]}"
}

# Field $2 (2 id, 3 NUMA node, 4 UUID, 5 PCI bus id; "-" when unknown) of GPU $1 in the
# facts; empty when there is no such GPU.
gpu_fact() { awk -v id="$1" -v f="$2" '$1 == "gpu" && $2 == id { print $f; exit }' "$facts"; }
pu_numa() { awk -v pu="$1" '$1 == "pu" && $2 == pu { print $3; exit }' "$facts"; }
sorted_unique() { tr ' ' '\n' | sed '/^$/d' | sort -n | uniq | paste -sd, -; }

if [ "$meet" -gt 0 ]; then
    dir=$work/meet/$run
    touch "$dir/${DLAUNCH_TASK_INDEX:-x}"
    deadline=$((SECONDS + 30))
    while here=("$dir"/*) && [ "${#here[@]}" -lt "$meet" ] && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.1
    done
    if [ "${#here[@]}" -ge "$meet" ]; then
        row PASS "ran at once" "${#here[@]} of $meet tasks running together"
    else
        row FAIL "ran at once" "only ${#here[@]} of $meet tasks running together after 30 s: no room for all"
    fi
fi

# GPUs: as many of its own (DLAUNCH_GPUS) as asked, all of the node, none twice, and (with a
# preset CUDA_VISIBLE_DEVICES) only those dlaunch was given. What the process sees
# (CUDA_VISIBLE_DEVICES) is its own with "process" visibility; with "task" visibility it is
# the GPUs of the gang's processes on this worker, its own at DLAUNCH_GPU_OFFSET.
cvd=${CUDA_VISIBLE_DEVICES-<unset>}
own=${DLAUNCH_GPUS-<unset>}
offset=${DLAUNCH_GPU_OFFSET:-0}
problems=()
IFS=, read -ra ids <<<"$own"
IFS=, read -ra visible <<<"$cvd"
if [ "$visibility" = process ]; then
    [ "$cvd" = "$own" ] || problems+=("CUDA_VISIBLE_DEVICES=$cvd but DLAUNCH_GPUS=$own;")
elif [[ $offset =~ ^[0-9]+$ ]]; then
    mine=$(IFS=,; echo "${visible[*]:$offset:${#ids[@]}}")
    [ "$mine" = "$own" ] || problems+=("CUDA_VISIBLE_DEVICES=$cvd has $mine at DLAUNCH_GPU_OFFSET=$offset, not its own $own;")
else
    problems+=("DLAUNCH_GPU_OFFSET=$offset;")
fi
[ "${#ids[@]}" -eq "$want_gpus" ] || problems+=("${#ids[@]} GPUs for a task asking $want_gpus;")
[ "$(printf '%s\n' "${ids[@]}" | sort | uniq -d)" = "" ] || problems+=("a GPU named twice;")
gpu_numas=() unknown_numa=()
for id in "${ids[@]}"; do
    if [ -z "$(gpu_fact "$id" 2)" ]; then
        problems+=("GPU $id is not in the topology;")
        continue
    fi
    if [ -n "$GPU_CHECK_SUBSET" ] && [[ ",$GPU_CHECK_SUBSET," != *",$id,"* ]]; then
        problems+=("GPU $id is outside the preset CUDA_VISIBLE_DEVICES=$GPU_CHECK_SUBSET;")
    fi
    numa=$(gpu_fact "$id" 3)
    if [ "$numa" = - ]; then unknown_numa+=("$id"); else gpu_numas+=("$numa"); fi
done
if [ "$cvd" = "$own" ]; then seen_as="CUDA_VISIBLE_DEVICES=DLAUNCH_GPUS=$cvd"; else seen_as="own $own at $offset of CUDA_VISIBLE_DEVICES=$cvd"; fi
verdict gpus "$seen_as" "${problems[@]}"

# The contract variables of docs/environment.md.
problems=()
[ "${OMP_NUM_THREADS:-}" = "$want_cpus" ] || problems+=("OMP_NUM_THREADS=${OMP_NUM_THREADS:-} for $want_cpus CPUs;")
[ "${WORLD_SIZE:-}" = "$want_world" ] || problems+=("WORLD_SIZE=${WORLD_SIZE:-} for $want_world processes;")
if [[ ${RANK:-} =~ ^[0-9]+$ ]] && [ "$RANK" -lt "$want_world" ]; then :; else problems+=("RANK=${RANK:-};"); fi
[ "${WORLD_RANK:-}" = "${RANK:-}" ] || problems+=("WORLD_RANK=${WORLD_RANK:-} but RANK=${RANK:-};")
if [[ ${LOCAL_RANK:-} =~ ^[0-9]+$ && ${LOCAL_WORLD_SIZE:-} =~ ^[0-9]+$ ]] && [ "$LOCAL_RANK" -lt "$LOCAL_WORLD_SIZE" ]; then
    :
else
    problems+=("LOCAL_RANK=${LOCAL_RANK:-} LOCAL_WORLD_SIZE=${LOCAL_WORLD_SIZE:-};")
fi
address="${MASTER_ADDR:-}:${MASTER_PORT:-}"
[ -n "${MASTER_ADDR:-}" ] && [ -n "${MASTER_PORT:-}" ] || problems+=("MASTER_ADDR:MASTER_PORT=$address;")
[ "${DLAUNCH_COORDINATOR_ADDRESS:-}" = "$address" ] || problems+=("DLAUNCH_COORDINATOR_ADDRESS=${DLAUNCH_COORDINATOR_ADDRESS:-} not $address;")
[ -n "${DLAUNCH_WORKER_RANK:-}" ] || problems+=("no DLAUNCH_WORKER_RANK;")
leaked=$(env | grep -E '^(OMPI_COMM_WORLD|PMIX_RANK|PMI_RANK|SLURM_PROCID|GPU_DEVICE_ORDINAL)' | cut -d= -f1 | paste -sd, -)
[ -z "$leaked" ] || problems+=("launcher variables leaked: $leaked;")
verdict contract "WORLD_SIZE=$want_world RANK=$rank LOCAL_RANK=${LOCAL_RANK:-} OMP_NUM_THREADS=$want_cpus MASTER=$address" "${problems[@]}"

# CPUs: as many as asked, on the NUMA nodes of the task's GPUs; on a real node also the
# CPUs the kernel lets this process run on. With a topology XML dlaunch binds nothing, so
# there the placement it reports is what is checked.
problems=()
placed=$(expand "${DLAUNCH_CPUS:-}") || problems+=("DLAUNCH_CPUS=${DLAUNCH_CPUS:-} is not a CPU list;")
read -ra placed_cpus <<<"$placed"
[ "${#placed_cpus[@]}" -eq "$want_cpus" ] || problems+=("${#placed_cpus[@]} CPUs (${DLAUNCH_CPUS:-}) for a task asking $want_cpus;")
how="placed; not bound on the XML path"
if [ "$GPU_CHECK_MODE" = cuda ]; then
    allowed_list=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*//p' /proc/self/status)
    allowed=$(expand "$allowed_list") || problems+=("Cpus_allowed_list=$allowed_list unreadable;")
    [ "$(sorted_unique <<<"$allowed")" = "$(sorted_unique <<<"$placed")" ] ||
        problems+=("bound to CPUs $allowed_list (/proc/self/status) but DLAUNCH_CPUS=${DLAUNCH_CPUS:-};")
    how="bound, /proc/self/status"
fi
gpu_numa_set=$(sorted_unique <<<"${gpu_numas[*]:-}")
[ "${#unknown_numa[@]}" -eq 0 ] || problems+=("hwloc gives no NUMA node for GPU ${unknown_numa[*]};")
cpu_numas=()
for cpu in "${placed_cpus[@]}"; do
    numa=$(pu_numa "$cpu")
    cpu_numas+=("$numa")
    # Where a GPU's node is unknown that is the finding; every CPU would repeat it.
    [ "${#unknown_numa[@]}" -gt 0 ] || [[ ",$gpu_numa_set," == *",$numa,"* ]] ||
        problems+=("CPU $cpu is on NUMA node ${numa:-?}, GPUs $own on $gpu_numa_set;")
done
cpu_numa_set=$(sorted_unique <<<"${cpu_numas[*]:-}")
[ "${DLAUNCH_NUMA_NODES:-}" = "$cpu_numa_set" ] || problems+=("DLAUNCH_NUMA_NODES=${DLAUNCH_NUMA_NODES:-} but the CPUs are on $cpu_numa_set;")
verdict cpus "CPUs ${DLAUNCH_CPUS:-} ($how) on NUMA $cpu_numa_set, GPUs $own on NUMA $gpu_numa_set" "${problems[@]}"

# The driver: exactly the GPUs placed, in order, by UUID and PCI bus id.
if [ "$GPU_CHECK_MODE" = cuda ]; then
    problems=()
    probe=$("$work/cuda-probe" 2>&1) || problems+=("cuda-probe failed: $(paste -sd' ' - <<<"$probe");")
    count=$(sed -n 's/^count //p' <<<"$probe")
    [ "$count" = "${#visible[@]}" ] || problems+=("the driver sees ${count:-no} GPUs, ${#visible[@]} visible;")
    seen=()
    while read -r _ ordinal uuid bus; do
        seen+=("$uuid")
        id=${visible[$ordinal]:-}
        [ -n "$id" ] || continue
        [ "$uuid" = "$(gpu_fact "$id" 4)" ] || problems+=("device $ordinal is $uuid, GPU $id is $(gpu_fact "$id" 4);")
        [ "$bus" = "$(gpu_fact "$id" 5)" ] || problems+=("device $ordinal at $bus, GPU $id at $(gpu_fact "$id" 5);")
    done < <(grep '^device ' <<<"$probe")
    verdict driver "the driver sees ${count:-?}: ${seen[*]:-none}" "${problems[@]}"
fi

result_dir=$work/results/$run
{
    printf '%s\n' "${lines[@]}"
    printf 'FACTS\t%s\t%s\t%s\t%s\t%s\n' "${DLAUNCH_TASK_ID:-?}" "$rank" "$own" "${DLAUNCH_CPUS:-}" "$cvd"
} >"$result_dir/.${DLAUNCH_TASK_INDEX:-x}.$rank"
mv "$result_dir/.${DLAUNCH_TASK_INDEX:-x}.$rank" "$result_dir/${DLAUNCH_TASK_INDEX:-x}.$rank"
