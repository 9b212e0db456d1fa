#!/usr/bin/env bash
# Proves dlaunch's GPU paths on a GPU node in one command (docs/gpu-check.md):
#   scripts/gpu-check.sh
# Builds dlaunch (release) unless GPU_CHECK_DLAUNCH names a binary, prints `dlaunch topo`,
# runs a small job under mpirun whose tasks check what they were given (scripts/gpu-check/),
# once with every GPU and once with CUDA_VISIBLE_DEVICES preset to a subset, prints a
# PASS/FAIL table and writes a JSON record (GPU_CHECK_OUT, default target/gpu-check).
# Exit: 0 all passed, 1 something failed, 77 no GPU here and the same checks passed on a GPU
# topology XML (GPU_CHECK_XML, default tests/fixtures/topologies/power8gpudistances.xml).
# GPU_CHECK_MPIRUN replaces the launcher (default `mpirun -n 2`, Open MPI unbound).
set -euo pipefail
# One node: its ranks need no network but loopback (a caller's own choice stands).
export OMPI_MCA_btl_tcp_if_include=${OMPI_MCA_btl_tcp_if_include:-lo}
export OMPI_MCA_oob_tcp_if_include=${OMPI_MCA_oob_tcp_if_include:-lo}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")
lib=$here/gpu-check
mkdir -p "${GPU_CHECK_OUT:-$root/target/gpu-check}"
out=$(cd "${GPU_CHECK_OUT:-$root/target/gpu-check}" && pwd)
work=$out/work
started=$SECONDS
mode="" xml=${GPU_CHECK_XML:-}

# The paths go into a job file and a shell line: keep them to characters that need no quoting.
for path in "$root" "$out"; do
    if ! [[ $path =~ ^[A-Za-z0-9/._+,=:-]+$ ]]; then
        echo "gpu-check: $path: use a directory whose name has only letters, digits and /._+,=:-" >&2
        exit 1
    fi
done

rm -rf "$work"
mkdir -p "$work"
: >"$work/rows.tsv"
: >"$work/runs.tsv"
row() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$work/rows.tsv"; }
note() { printf 'gpu-check: %s\n' "$*"; }
# A check's verdict: PASS with detail $2 when no problem was given after it, else FAIL.
verdict() {
    local name=$1 detail=$2
    shift 2
    if [ $# -eq 0 ]; then row PASS "$name" "$detail"; else row FAIL "$name" "$*"; fi
}

json_string() {
    local s
    s=$(printf '%s' "$1" | tr -d '\000-\010\013\014\016-\037')
    s=${s//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\t'/\\t}
    s=${s//$'\n'/\\n}
    s=${s//$'\r'/\\r}
    printf '"%s"' "$s"
}

# The record: what this run saw, for docs/gpu-check.md and for comparing nodes.
write_record() {
    local status=$1 passed=$2 failed=$3 skipped=$4 first result check detail name cvd rc seconds
    {
        printf '{\n  "date": %s,\n' "$(json_string "$(date -u +%Y-%m-%dT%H:%M:%SZ)")"
        printf '  "host": %s,\n' "$(json_string "$(hostname)")"
        printf '  "commit": %s,\n' "$(json_string "$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)")"
        printf '  "mode": %s,\n  "xml": %s,\n' "$(json_string "$mode")" "$(json_string "$xml")"
        printf '  "exit": %s,\n  "seconds": %s,\n' "$status" "$((SECONDS - started))"
        printf '  "passed": %s,\n  "failed": %s,\n  "skipped": %s,\n' "$passed" "$failed" "$skipped"
        printf '  "driver": %s,\n' "$(json_string "$(cat "$work/driver.txt" 2>/dev/null)")"
        printf '  "topology": '
        if [ -s "$work/topo.json" ]; then cat "$work/topo.json"; else printf 'null\n'; fi
        printf '  ,\n  "runs": ['
        first=1
        # The preset comes last: tab is whitespace to read, so an empty field in between would vanish.
        while IFS=$'\t' read -r name rc seconds cvd; do
            [ "$first" = 1 ] || printf ','
            first=0
            printf '\n    {"name": %s, "cuda_visible_devices": %s, "exit": %s, "seconds": %s}' \
                "$(json_string "$name")" "$(json_string "$cvd")" "$rc" "$seconds"
        done <"$work/runs.tsv"
        printf '\n  ],\n  "checks": ['
        first=1
        while IFS=$'\t' read -r result check detail; do
            [ "$first" = 1 ] || printf ','
            first=0
            printf '\n    {"result": %s, "check": %s, "detail": %s}' \
                "$(json_string "$result")" "$(json_string "$check")" "$(json_string "$detail")"
        done <"$work/rows.tsv"
        printf '\n  ]\n}\n'
    } >"$out/gpu-check.json"
}

# Prints the table, writes the record and exits with the verdict.
finish() {
    local passed failed skipped status
    passed=$(grep -c '^PASS' "$work/rows.tsv" || true)
    failed=$(grep -c '^FAIL' "$work/rows.tsv" || true)
    skipped=$(grep -c '^SKIP' "$work/rows.tsv" || true)
    if [ "$failed" -gt 0 ]; then status=1; elif [ "$mode" = xml ]; then status=77; else status=0; fi
    echo
    awk -F'\t' '
        { result[NR] = $1; check[NR] = $2; detail[NR] = $3; if (length($2) > width) width = length($2) }
        END {
            printf "%-6s  %-*s  %s\n", "RESULT", width, "CHECK", "DETAIL"
            for (i = 1; i <= NR; i++) printf "%-6s  %-*s  %s\n", result[i], width, check[i], detail[i]
        }' "$work/rows.tsv"
    write_record "$status" "$passed" "$failed" "$skipped"
    echo
    note "$passed passed, $failed failed, $skipped skipped in $((SECONDS - started)) s; record: $out/gpu-check.json"
    [ "$status" != 77 ] || note "no GPU on this machine: skipped (77) after the checks passed on $xml"
    exit "$status"
}

if [ -n "${GPU_CHECK_DLAUNCH:-}" ]; then
    dlaunch=$GPU_CHECK_DLAUNCH
    row PASS dlaunch "$dlaunch (GPU_CHECK_DLAUNCH)"
elif (cd "$root" && cargo build --release --quiet); then
    dlaunch=$root/target/release/dlaunch
    row PASS dlaunch "built: $dlaunch"
else
    row FAIL dlaunch "cargo build --release failed in $root"
    finish
fi

probe=$work/cuda-probe
if cc -O2 -o "$probe" "$lib/cuda-probe.c" -ldl 2>"$work/cc.log"; then
    row PASS cuda-probe "built with cc, libcuda loaded by dlopen"
else
    row FAIL cuda-probe "cc failed: $(head -c 300 "$work/cc.log" | paste -sd' ' -)"
    finish
fi
probe_rc=0
"$probe" >"$work/driver.txt" 2>&1 || probe_rc=$?
driver_count=$(sed -n 's/^count //p' "$work/driver.txt")

if [ -n "$xml" ]; then
    mode=xml
    note "GPU_CHECK_XML is set: checking against $xml, not this machine's GPUs"
elif [ "$probe_rc" = 0 ] && [ "${driver_count:-0}" -gt 0 ]; then
    mode=cuda
else
    mode=xml
    xml=$root/tests/fixtures/topologies/power8gpudistances.xml
    note "no GPU on this machine (CUDA driver: $(paste -sd' ' - <"$work/driver.txt"))"
    note "running the same checks on the GPU topology $xml; the exit status will be 77 (skipped)"
fi

# Runs a command as dlaunch should see this node: with the topology XML and no GPUs preset
# on the XML path; as it is (SLURM's CUDA_VISIBLE_DEVICES included) on a GPU node.
in_mode() {
    if [ "$mode" = xml ]; then
        env -u CUDA_VISIBLE_DEVICES -u ROCR_VISIBLE_DEVICES HWLOC_XMLFILE="$xml" "$@"
    else
        env -u HWLOC_XMLFILE "$@"
    fi
}

# `dlaunch topo --json` reduced to what the checks need: "gpu ID NUMA UUID PCI" and
# "pu OS_INDEX NUMA" lines, "-" for what is unknown.
facts_of() {
    awk -f "$lib/flatten.awk" "$1" | awk '
        {
            eq = index($0, "="); split(substr($0, 1, eq - 1), k, "."); value = substr($0, eq + 1)
            if (k[1] == "gpus") { gpus = k[2] + 1 > gpus ? k[2] + 1 : gpus; gpu[k[2], k[3]] = value }
            if (k[1] == "cores" && k[3] == "numa") core_numa[k[2]] = value
            if (k[1] == "cores" && k[3] == "pus") { pus[++n] = value; pu_core[n] = k[2] }
        }
        function known(v) { return v == "" ? "-" : v }
        END {
            for (i = 0; i < gpus; i++)
                print "gpu", gpu[i, "id"], known(gpu[i, "numa"]), known(gpu[i, "uuid"]), known(gpu[i, "pci_bus_id"])
            for (i = 1; i <= n; i++) print "pu", pus[i], core_numa[pu_core[i]]
        }'
}

echo "== dlaunch topo ($mode)"
in_mode "$dlaunch" topo
if ! in_mode "$dlaunch" topo --json >"$work/topo.json" 2>"$work/topo.log"; then
    row FAIL topology "dlaunch topo --json failed: $(head -c 300 "$work/topo.log" | paste -sd' ' -)"
    finish
fi
facts_of "$work/topo.json" >"$work/facts"
mapfile -t gpu_ids < <(awk '$1 == "gpu" { print $2 }' "$work/facts")
source_kind=$(awk -f "$lib/flatten.awk" "$work/topo.json" | sed -n 's/^source\.gpu_source=//p')
if [ "${#gpu_ids[@]}" -eq 0 ]; then
    row FAIL topology "dlaunch found no GPU (GPUs from: $source_kind)"
    finish
fi
row PASS topology "${#gpu_ids[@]} GPUs (${gpu_ids[*]}) from $source_kind"

problems=()
located=()
while read -r _ id numa _; do
    if [ "$numa" = - ]; then problems+=("hwloc gives no NUMA node for GPU $id;"); else located+=("$id:$numa"); fi
done < <(grep '^gpu ' "$work/facts")
verdict "GPU NUMA locality" "GPU:NUMA ${located[*]}" "${problems[@]}"

if [ "$mode" = cuda ]; then
    problems=()
    [ "$driver_count" = "${#gpu_ids[@]}" ] || problems+=("the driver sees $driver_count GPUs, dlaunch ${#gpu_ids[@]};")
    [ "$source_kind" = cuda ] || problems+=("dlaunch took its GPUs from $source_kind, not the driver;")
    mapfile -t recorded < <(awk '$1 == "gpu" { print $4, $5 }' "$work/facts")
    while read -r _ ordinal uuid bus; do
        [ "${recorded[$ordinal]:-}" = "$uuid $bus" ] ||
            problems+=("device $ordinal is $uuid at $bus, dlaunch has ${recorded[$ordinal]:-nothing};")
    done < <(grep '^device ' "$work/driver.txt")
    verdict "dlaunch matches the driver" "UUIDs and PCI bus ids of $driver_count GPUs agree" "${problems[@]}"
else
    row SKIP "CUDA driver" "not on the XML path: each task checks CUDA_VISIBLE_DEVICES and DLAUNCH_GPUS against the placement instead"
fi

launcher=(mpirun -n 2)
if [ -n "${GPU_CHECK_MPIRUN:-}" ]; then
    read -ra launcher <<<"$GPU_CHECK_MPIRUN"
elif mpirun --version 2>/dev/null | grep -q 'Open MPI'; then
    # Open MPI binds each of two ranks to one core: the worker would have two CPUs.
    launcher+=(--bind-to none --oversubscribe)
    if [ "$(id -u)" = 0 ]; then
        export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    fi
fi

# The tasks' checks that look across tasks: those given together share no GPU and no CPU;
# a task asking for every GPU gets exactly those the run had.
cross_checks() {
    local run=$1 results=$2 gang=$3 all_ids=$4 facts_lines gpus cpus
    facts_lines=$(cat "$results"/* 2>/dev/null | grep '^FACTS' || true)
    gpus=$(awk -F'\t' '$2 ~ /^per-gpu\[/ { print $4 }' <<<"$facts_lines" | sort)
    cpus=$(awk -F'\t' '$2 ~ /^per-gpu\[/ { print $5 }' <<<"$facts_lines")
    problems=()
    [ "$(paste -sd, - <<<"$gpus")" = "$all_ids" ] ||
        problems+=("per-GPU tasks got GPUs $(paste -sd' ' - <<<"$gpus"), the run had $all_ids;")
    shared_cpus "$cpus" || problems+=("a CPU went to two per-GPU tasks at once ($(paste -sd' ' - <<<"$cpus"));")
    verdict "$run per-gpu: each its own GPU and CPUs, every GPU used" "GPUs $all_ids" "${problems[@]}"
    gpus=$(awk -F'\t' '$2 == "all-gpus" { print $4 }' <<<"$facts_lines" | tr , '\n' | sort | paste -sd, -)
    problems=()
    [ "$gpus" = "$all_ids" ] || problems+=("got GPUs $gpus, the run had $all_ids;")
    verdict "$run all-gpus: every GPU of the run" "GPUs $gpus" "${problems[@]}"
    if [ "$gang" = 1 ]; then
        local task visible
        for task in gang gang-process; do
            # By rank: process k's own GPUs come k-th in what a "task" gang sees.
            gpus=$(awk -F'\t' -v t="$task" '$2 == t { print $3 "\t" $4 }' <<<"$facts_lines" | sort -n | cut -f2)
            cpus=$(awk -F'\t' -v t="$task" '$2 == t { print $5 }' <<<"$facts_lines")
            visible=$(awk -F'\t' -v t="$task" '$2 == t { print $6 }' <<<"$facts_lines" | sort -u)
            problems=()
            [ "$(wc -l <<<"$gpus")" = 2 ] && [ "$(sort -u <<<"$gpus" | wc -l)" = 2 ] ||
                problems+=("$task processes got GPUs $(paste -sd' ' - <<<"$gpus");")
            shared_cpus "$cpus" || problems+=("$task processes share a CPU ($(paste -sd' ' - <<<"$cpus"));")
            if [ "$task" = gang ] && [ "$visible" != "$(paste -sd, - <<<"$gpus")" ]; then
                problems+=("gang processes see $(paste -sd' ' - <<<"$visible"), not both GPUs in rank order;")
            fi
            verdict "$run $task: a GPU and CPUs of its own per process" "GPUs $(paste -sd' ' - <<<"$gpus")" "${problems[@]}"
        done
    fi
}

# Succeeds when no CPU appears in two of the given CPU lists (one per line).
shared_cpus() {
    local list part a b c
    while read -r list; do
        IFS=, read -ra parts <<<"$list"
        for part in "${parts[@]}"; do
            a=${part%-*} b=${part#*-}
            for ((c = a; c <= b; c++)); do echo "$c"; done
        done
    done <<<"$1" | sort | uniq -d | grep -q . && return 1
    return 0
}

# One dlaunch job on this node: run NAME, preset CUDA_VISIBLE_DEVICES (empty: none), GPU ids.
run_job() {
    local run=$1 preset=$2
    shift 2
    local ids=("$@") k=$# dir=$work/$run results=$work/results/$run matrix gang=0 rc=0 t0=$SECONDS i all_ids
    mkdir -p "$dir" "$results" "$work/meet/$run"
    matrix=$(seq -s, 0 $((k - 1)) | sed 's/,/, /g')
    all_ids=$(printf '%s\n' "${ids[@]}" | sort | paste -sd, -)
    sed -e "s|@RUN@|$run|g" -e "s|@WORK@|$work|g" -e "s|@MODE@|$mode|g" -e "s|@SUBSET@|$preset|g" \
        -e "s|@CHECK@|$lib/task-check.sh|g" -e "s|@GPUS@|$k|g" -e "s|@MATRIX@|$matrix|g" \
        "$lib/job.toml.in" >"$dir/job.toml"
    if [ "$k" -ge 2 ] && [ -z "$preset" ]; then
        gang=1
        sed -e "s|@CHECK@|$lib/task-check.sh|g" "$lib/gang.toml.in" >>"$dir/job.toml"
    fi
    echo "== $run: ${launcher[*]} dlaunch ($k GPUs${preset:+, CUDA_VISIBLE_DEVICES=$preset})"
    in_mode env ${preset:+"CUDA_VISIBLE_DEVICES=$preset"} timeout -k 5 100 \
        "${launcher[@]}" "$dlaunch" "$dir/job.toml" >"$dir/dlaunch.log" 2>&1 || rc=$?
    printf '%s\t%s\t%s\t%s\n' "$run" "$rc" "$((SECONDS - t0))" "$preset" >>"$work/runs.tsv"
    if [ "$rc" = 0 ]; then
        row PASS "$run: dlaunch" "exit 0 in $((SECONDS - t0)) s"
    else
        row FAIL "$run: dlaunch" "exit $rc in $((SECONDS - t0)) s: $(tail -n 3 "$dir/dlaunch.log" | paste -sd' ' -)"
    fi
    # Task files are named TASK_INDEX.RANK: the per-GPU tasks first, then all-gpus, then the gangs.
    local expected=()
    for ((i = 0; i <= k; i++)); do expected+=("$i.0"); done
    [ "$gang" = 0 ] || expected+=("$((k + 1)).0" "$((k + 1)).1" "$((k + 2)).0" "$((k + 2)).1")
    for i in "${expected[@]}"; do
        if [ -f "$results/$i" ]; then
            grep -v '^FACTS' "$results/$i" >>"$work/rows.tsv"
        else
            row FAIL "$run task $i" "no result: the task did not run or its check broke (see $dir)"
        fi
    done
    cross_checks "$run" "$results" "$gang" "$all_ids"
}

run_job full "" "${gpu_ids[@]}"

# As SLURM does: dlaunch started with some of the GPUs must hand out those only.
if [ "${#gpu_ids[@]}" -ge 2 ]; then
    subset=()
    for ((i = 1; i < ${#gpu_ids[@]}; i += 2)); do subset+=("${gpu_ids[$i]}"); done
    preset=$(IFS=,; echo "${subset[*]}")
    in_mode env CUDA_VISIBLE_DEVICES="$preset" "$dlaunch" topo --json >"$work/topo-subset.json" 2>/dev/null || true
    seen=$(facts_of "$work/topo-subset.json" | awk '$1 == "gpu" { print $2 }' | paste -sd, -)
    problems=()
    [ "$seen" = "$preset" ] || problems+=("sees GPUs ${seen:-none} under CUDA_VISIBLE_DEVICES=$preset")
    verdict "subset: dlaunch topo" "sees GPUs $seen under CUDA_VISIBLE_DEVICES=$preset" "${problems[@]}"
    run_job subset "$preset" "${subset[@]}"
else
    row SKIP subset "one GPU: no subset to preset"
fi

finish
