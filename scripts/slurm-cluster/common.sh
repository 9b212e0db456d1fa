# scripts/slurm-cluster/common.sh - helpers shared by start.sh, stop.sh and smoke.sh.
# Sourced, not run.  Expects BASE to be set by the caller.
# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables below are used by the scripts that source this

# Machine-wide names (one test cluster per machine).  Linux interface names must stay
# within 15 characters.
NS_PREFIX=dls-node              # network namespaces: dls-node1 .. dls-nodeN
VETH_PREFIX=dls-v               # host ends of the veth pairs: dls-v1 .. dls-vN
BRIDGE=dls-br0                  # bridge in the root namespace, holds $SUBNET.1/24
NODE_IF=dlaunch0                # node end of the veth pair, same name in every node
OWNER_FILE=/run/dlaunch-slurm.owner   # which base directory owns the names above

# Per-cluster paths.
ETC=$BASE/etc
RUN=$BASE/run
LOG=$BASE/log
MUNGE_DIR=$BASE/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
CTLD_HOST=$(hostname -s)
LOGTAG=${LOGTAG:-slurm-cluster}

say() { echo "[$LOGTAG] $*"; }
warn() { echo "[$LOGTAG] WARNING: $*" >&2; }
die() { echo "[$LOGTAG] ERROR: $*" >&2; exit 1; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
# check_range NAME VALUE MIN MAX: die unless VALUE is an integer within MIN..MAX.
check_range() {
    if ! is_uint "$2" || [ "$2" -lt "$3" ] || [ "$2" -gt "$4" ]; then
        die "$1 must be an integer in $3..$4 (got '$2')"
    fi
}
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

ns_name() { echo "$NS_PREFIX$1"; }
veth_name() { echo "$VETH_PREFIX$1"; }
node_addr() { echo "$SUBNET.1$1"; }    # node1 -> .11, node12 -> .112

# wait_for SECONDS COMMAND-STRING: re-run the command every 0.2 s until it succeeds.
wait_for() {
    local deadline
    deadline=$(awk -v t="$(now)" -v s="$1" 'BEGIN { printf "%d", t + s }')
    while :; do
        eval "$2" && return 0
        [ "$(date +%s)" -lt "$deadline" ] || return 1
        sleep 0.2
    done
}

# proc_state PID: one-letter state (R, S, Z, ...) or nothing if the process is gone.
# The comm field may contain spaces, so take what follows the last ')'.
proc_state() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 0
    stat=${stat##*) }
    echo "${stat%% *}"
}

# gone PID: true when the process has exited.  A zombie counts as gone: exited daemons
# can linger in state Z for seconds until their (re)parent reaps them.
gone() {
    local st
    st=$(proc_state "$1")
    [ -z "$st" ] || [ "$st" = Z ]
}

# pid_alive PIDFILE COMM: print the PID and succeed when the PID file names a live
# (non-zombie) process whose command name is COMM - never trust a stale PID file.
pid_alive() {
    local pid
    [ -s "$1" ] || return 1
    pid=$(tr -d ' \n' < "$1" 2>/dev/null) || return 1
    is_uint "$pid" || return 1
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
    gone "$pid" && return 1
    echo "$pid"
}

# running_daemons_of BASEDIR: names of the daemons of that cluster that are alive,
# e.g. "munged slurmctld node1 node2 node3" (empty when nothing runs).
running_daemons_of() {
    local b=$1 out="" f n
    pid_alive "$b/munge/munged.pid" munged >/dev/null && out="$out munged"
    pid_alive "$b/run/slurmctld.pid" slurmctld >/dev/null && out="$out slurmctld"
    for f in $(printf '%s\n' "$b"/run/slurmd.node*.pid | sort -V); do
        [ -e "$f" ] || continue
        n=${f##*/slurmd.}
        pid_alive "$f" slurmd >/dev/null && out="$out ${n%.pid}"
    done
    echo "${out# }"
}
running_daemons() { running_daemons_of "$BASE"; }

# nodes_in_state N REGEX: true when sinfo lists exactly N nodes and every node's short
# state matches REGEX (a trailing '*' = not responding never matches).
nodes_in_state() {
    local states
    states=$(sinfo -h -N -o '%t' 2>/dev/null) || return 1
    [ "$(printf '%s\n' "$states" | grep -c .)" = "$1" ] || return 1
    ! printf '%s\n' "$states" | grep -qvE "^($2)\$"
}
all_nodes_idle() { nodes_in_state "$1" 'idle'; }
all_nodes_up() { nodes_in_state "$1" 'idle|mix|alloc|comp'; }

# cleanup_network [quiet]: remove the namespaces, veth links and bridge of the test
# cluster.  Processes still inside our namespaces (only job steps of ours can be there)
# are stopped first; otherwise a namespace would live on after `ip netns del`.
cleanup_network() {
    local quiet=${1:-} nsf ns pids l
    for nsf in /run/netns/"$NS_PREFIX"*; do
        [ -e "$nsf" ] || continue
        ns=${nsf##*/}
        pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
        if [ -n "${pids// /}" ]; then
            warn "processes left in netns $ns: $pids- sending SIGTERM"
            # shellcheck disable=SC2086
            kill $pids 2>/dev/null || true
            wait_for 5 "[ -z \"\$(ip netns pids $ns 2>/dev/null | while read -r p; do gone \$p || echo \$p; done)\" ]" || {
                warn "still alive in $ns after 5 s - sending SIGKILL"
                # shellcheck disable=SC2046
                kill -9 $(ip netns pids "$ns" 2>/dev/null) 2>/dev/null || true
            }
        fi
        ip netns del "$ns" 2>/dev/null || warn "could not delete netns $ns"
        [ "$quiet" = quiet ] || say "removed netns $ns"
    done
    # Host ends of the veth pairs (normally gone with their peers) and the bridge.
    for l in $(ip -o link show 2>/dev/null | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' |
               grep -E "^(${VETH_PREFIX}[0-9]+|${BRIDGE})\$" | sort -r); do
        # a veth may vanish by itself meanwhile, once its peer's namespace is gone
        if ip link del "$l" 2>/dev/null || ! ip link show "$l" >/dev/null 2>&1; then
            [ "$quiet" = quiet ] || say "removed link $l"
        else
            warn "could not delete link $l"
        fi
    done
}
