#!/usr/bin/env bash
# scripts/slurm-cluster/start.sh - start a throw-away multi-node SLURM cluster on this
# one machine, for dlaunch's end-to-end tests and CI.  Must run as root (Debian 12,
# Slurm 22.05, munge, OpenMPI 4.1 with PMIx).
#
#   apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge
#   scripts/slurm-cluster/start.sh            # start (or report that it already runs)
#   . /tmp/dlaunch-slurm/env.sh               # SLURM_CONF + OpenMPI settings for tests
#   scripts/slurm-cluster/smoke.sh            # optional: 6-rank MPI smoke test
#   scripts/slurm-cluster/stop.sh [--purge]   # stop everything (see stop.sh)
#
# What it builds (defaults shown):
#
#   root network namespace                       netns dls-node1    (hostname node1)
#   ----------------------                       --------------------------------
#   munged     (own key, own socket in $BASE)    slurmd -N node1
#   slurmctld  (listens on 192.168.77.1:6817)    dlaunch0  192.168.77.11/24, lo
#   bridge dls-br0  192.168.77.1/24  <--veth-->  (no default route)
#     dls-v1, dls-v2, ... dls-vN                 ... same for node2 (.12), node3 (.13)
#
# Every slurmd runs in its own network namespace AND its own UTS namespace (hostname
# nodeN: OpenMPI names its shared-memory segments after the host, so "nodes" sharing a
# hostname crash) AND its own mount namespace, used only to bind-mount a private hosts
# file over /etc/hosts so that node1..nodeN and the controller resolve *inside* the
# nodes.  The machine's real /etc/hosts is never modified; in the root namespace the node
# names do NOT resolve (use the addresses from env.sh there).
#
# The node end of every veth pair has the same name, "dlaunch0", in every namespace, so
# OMPI_MCA_btl_tcp_if_include=dlaunch0 would work inside all nodes.  env.sh instead uses
# the subnet CIDR (192.168.77.0/24), which also matches the bridge in the root
# namespace and can never match the machine's external interface.  Processes inside the
# node namespaces cannot reach anything but the private subnet anyway: the only
# interfaces there are lo and dlaunch0, and there is no default route.
#
# Settings (environment variables):
#   DLAUNCH_SLURM_BASE     directory for everything (config, state, logs)  /tmp/dlaunch-slurm
#   DLAUNCH_SLURM_NODES    number of slurmd "nodes", 1..99                 3
#   DLAUNCH_SLURM_CPUS     CPUs per node (may exceed the real cores)       4
#   DLAUNCH_SLURM_GPUS     fake GPUs (gres gpu) per node, 0..16            2
#   DLAUNCH_SLURM_MEM      RealMemory per node in MB                       4000
#   DLAUNCH_SLURM_SUBNET   first three octets of the private /24           192.168.77
#   DLAUNCH_SLURM_PORT     slurmctld TCP port (root namespace)             6817
#   DLAUNCH_SLURM_TIMEOUT  seconds to wait for all nodes to become idle    60
#
# Node N gets the address $SUBNET.1N (node1 = .11, node12 = .112).  Only one such cluster
# can run on a machine at a time: the bridge/netns names, the subnet and the port are
# machine-wide.  /run/dlaunch-slurm.owner records which base directory owns them.
#
# Idempotence: if the cluster of this base directory already runs completely, start.sh
# only checks it, rewrites nothing and exits 0.  If it runs only partly (or another base
# directory owns the machine-wide names), start.sh refuses and says what to do.
# Leftovers of a failed or crashed start (namespaces, links, stale PID files) are
# cleaned up automatically when nothing is running.
set -euo pipefail

BASE=${DLAUNCH_SLURM_BASE:-/tmp/dlaunch-slurm}
NODES=${DLAUNCH_SLURM_NODES:-3}
CPUS=${DLAUNCH_SLURM_CPUS:-4}
GPUS=${DLAUNCH_SLURM_GPUS:-2}
MEM=${DLAUNCH_SLURM_MEM:-4000}
SUBNET=${DLAUNCH_SLURM_SUBNET:-192.168.77}
CTLD_PORT=${DLAUNCH_SLURM_PORT:-6817}
TIMEOUT=${DLAUNCH_SLURM_TIMEOUT:-60}

case ${1:-} in
    "") ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "usage: $0 [--help]   (settings via DLAUNCH_SLURM_* environment variables)" >&2; exit 2 ;;
esac

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"
LOGTAG=start
export SLURM_CONF=$ETC/slurm.conf       # for the daemons and every client command below

t0=$(now)

# ------------------------------------------------------------------ sanity checks
[ "$(id -u)" = 0 ] || die "must run as root (network namespaces, mknod, daemons as root)"
for b in munged mungekey munge unmunge slurmctld slurmd sinfo scontrol ip nsenter unshare mknod ss; do
    command -v "$b" >/dev/null ||
        die "'$b' not found; apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
done
check_range DLAUNCH_SLURM_NODES "$NODES" 1 99
check_range DLAUNCH_SLURM_CPUS "$CPUS" 1 4096
check_range DLAUNCH_SLURM_GPUS "$GPUS" 0 16
check_range DLAUNCH_SLURM_MEM "$MEM" 1 100000000
check_range DLAUNCH_SLURM_PORT "$CTLD_PORT" 1 65535
check_range DLAUNCH_SLURM_TIMEOUT "$TIMEOUT" 1 3600
[[ $SUBNET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "DLAUNCH_SLURM_SUBNET must look like 192.168.77 (got '$SUBNET')"
case $BASE in /?*) ;; *) die "DLAUNCH_SLURM_BASE must be an absolute path other than / (got '$BASE')" ;; esac

# ------------------------------------------------------------------ already running?
running=$(running_daemons)
if [ -n "$running" ]; then
    if [ -f "$BASE/cluster.conf" ]; then
        # shellcheck disable=SC1091
        . "$BASE/cluster.conf"          # NODES etc. of the running cluster win
    fi
    want="munged slurmctld$(for i in $(seq 1 "$NODES"); do printf ' node%s' "$i"; done)"
    if [ "$running" = "$want" ] && all_nodes_up "$NODES"; then
        say "cluster in $BASE is already running ($NODES nodes up); nothing to do"
        say "use: . $BASE/env.sh     stop: $HERE/stop.sh"
        exit 0
    fi
    die "cluster in $BASE is only partly running or not healthy (running: $running;" \
        "expected: $want). Run '$HERE/stop.sh' first, then start again. Logs: $LOG/"
fi

# The bridge, namespaces, subnet and port are machine-wide: refuse if another base
# directory's cluster holds them.
if [ -s "$OWNER_FILE" ]; then
    owner=$(cat "$OWNER_FILE")
    if [ "$owner" != "$BASE" ] && [ -n "$(running_daemons_of "$owner")" ]; then
        die "another dlaunch test cluster (base $owner) is running on this machine;" \
            "stop it with: DLAUNCH_SLURM_BASE=$owner $HERE/stop.sh"
    fi
fi
if ss -Hltn "sport = :$CTLD_PORT" | grep -q .; then
    die "TCP port $CTLD_PORT is already in use (set DLAUNCH_SLURM_PORT to another port)"
fi

# Nothing of ours runs: remove leftovers of an earlier failed/crashed run.
cleanup_network quiet
# The private subnet must not be in use on this machine already.
if ip -4 -o addr show | grep -q " inet ${SUBNET//./\\.}\." || [ -n "$(ip -4 route show "$SUBNET.0/24")" ]; then
    die "subnet $SUBNET.0/24 is already in use on this machine (set DLAUNCH_SLURM_SUBNET)"
fi
rm -rf "$BASE/state" "$BASE/spool" "$BASE/tmp" "$RUN" "$LOG" "$BASE/env.sh" "$BASE/cluster.conf"
echo "$BASE" > "$OWNER_FILE"

trap 'echo "[$LOGTAG] start-up FAILED; logs are in $LOG/ - run $HERE/stop.sh to clean up" >&2' ERR

# ------------------------------------------------------------------ directories
mkdir -p "$ETC" "$RUN" "$LOG" "$MUNGE_DIR" "$BASE/state" "$BASE/fakecg/systemd" "$BASE/fakegpu" "$BASE/bin"
chmod 755 "$BASE" "$MUNGE_DIR"
for i in $(seq 1 "$NODES"); do
    mkdir -p "$BASE/spool/slurmd.node$i" "$BASE/tmp/node$i"
done
chmod 1777 "$BASE/tmp"/node*

# Fake GPUs: character devices with NVIDIA's major number 195 (nothing behind them).
# slurmd's gres code rejects regular files, so they have to be real device nodes.
for ((g = 0; g < GPUS; g++)); do
    dev=$BASE/fakegpu/nvidia$g
    [ -c "$dev" ] || { rm -f "$dev"; mknod "$dev" c 195 "$g"; }
done

# ------------------------------------------------------------------ munge
# Own key and own socket directory: the machine's munged (if any) is not used or touched.
[ -s "$MUNGE_DIR/munge.key" ] || mungekey --create --keyfile="$MUNGE_DIR/munge.key" >/dev/null
chmod 600 "$MUNGE_DIR/munge.key"
rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock" "$MUNGE_DIR/munged.pid"
munged --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCKET" \
       --pid-file="$MUNGE_DIR/munged.pid" --seed-file="$MUNGE_DIR/munged.seed" \
       --log-file="$LOG/munged.log" ||
    die "munged failed to start; see $LOG/munged.log"
wait_for 10 "munge -S '$MUNGE_SOCKET' -n </dev/null | unmunge -S '$MUNGE_SOCKET' >/dev/null 2>&1" ||
    die "munge self-test failed; see $LOG/munged.log"
say "munged      pid $(cat "$MUNGE_DIR/munged.pid")"

# ------------------------------------------------------------------ network
ip link add "$BRIDGE" type bridge
ip addr add "$SUBNET.1/24" dev "$BRIDGE"
ip link set "$BRIDGE" up
for i in $(seq 1 "$NODES"); do
    ns=$(ns_name "$i")
    ip netns add "$ns"
    # host end dls-vN joins the bridge; node end is called $NODE_IF in every namespace
    ip link add "$(veth_name "$i")" type veth peer name "$NODE_IF" netns "$ns"
    ip link set "$(veth_name "$i")" master "$BRIDGE" up
    ip -n "$ns" addr add "$(node_addr "$i")/24" dev "$NODE_IF"
    ip -n "$ns" link set lo up
    ip -n "$ns" link set "$NODE_IF" up
    # deliberately no default route: nothing inside can leave the private subnet
done

# Hosts file that the nodes see as /etc/hosts (bind-mounted in their mount namespace).
{
    echo "# generated by dlaunch scripts/slurm-cluster/start.sh - seen only inside the nodes"
    echo "127.0.0.1 localhost"
    echo "$SUBNET.1 $CTLD_HOST dlaunch-ctl"
    for i in $(seq 1 "$NODES"); do echo "$(node_addr "$i") node$i"; done
} > "$ETC/hosts"

# ------------------------------------------------------------------ slurm config
{
    cat <<EOF
# generated by dlaunch scripts/slurm-cluster/start.sh
ClusterName=dlaunch
SlurmctldHost=$CTLD_HOST($SUBNET.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/slurmd.%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
# Per-node scratch: the pmix plugin creates spmix_appdir_* there, which collide when
# several "nodes" share one /tmp.
TmpFS=$BASE/tmp/%n
# No cgroups: plain process tracking, no task binding/confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
SchedulerType=sched/backfill
# Heterogeneous jobs are started only by the backfill scheduler: every second, not every 30 s.
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Trust the node lines below even where they exceed the real hardware (CPUs, memory).
SlurmdParameters=config_overrides
ReturnToService=2
# Debian's OpenMPI only works with pmix (pmi2: "OMPI was not built with SLURM's PMI support").
MpiDefault=pmix
MailProg=/bin/true
GresTypes=gpu
EOF
    gres=""
    [ "$GPUS" -gt 0 ] && gres=" Gres=gpu:$GPUS"
    for i in $(seq 1 "$NODES"); do
        echo "NodeName=node$i NodeAddr=$(node_addr "$i") NodeHostname=node$i CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$MEM$gres State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} > "$ETC/slurm.conf"

{
    echo "AutoDetect=off"
    if [ "$GPUS" -eq 1 ]; then
        echo "Name=gpu File=$BASE/fakegpu/nvidia0"
    elif [ "$GPUS" -gt 1 ]; then
        echo "Name=gpu File=$BASE/fakegpu/nvidia[0-$((GPUS - 1))]"
    fi
} > "$ETC/gres.conf"

# slurmd 22.05 always loads a cgroup plugin, even with proctrack/linuxproc + task/none.
# Point it at an empty dummy hierarchy so the host's cgroup setup does not matter.
cat > "$ETC/cgroup.conf" <<EOF
CgroupPlugin=cgroup/v1
CgroupMountpoint=$BASE/fakecg
CgroupAutomount=no
EOF

# PMIx plugin settings (mpi.conf sits next to slurm.conf).  Slurm's default "mixed"
# fence uses the tree algorithm for data-less fences such as the final barrier in
# OpenMPI's MPI_Init.  Here that let some ranks leave MPI_Init before their peers had
# wired up their MPI layer: about 1 in 12 `srun --mpi=pmix` launches of 10 ranks over 5
# nodes crashed (SIGSEGV in mca_btl_tcp calling a NULL active-message callback inside
# MPI_Init) or hung in the first collective.  With the ring algorithm: no failures.
cat > "$ETC/mpi.conf" <<EOF
PMIxCollFence=ring
EOF

# What stop.sh and a second start.sh need to know about this cluster.
cat > "$BASE/cluster.conf" <<EOF
NODES=$NODES
SUBNET=$SUBNET
CTLD_PORT=$CTLD_PORT
EOF

# The file tests source.  Only absolute settings: no PATH changes.
node_names=$(for i in $(seq 1 "$NODES"); do printf 'node%s ' "$i"; done)
node_addrs=$(for i in $(seq 1 "$NODES"); do printf '%s ' "$(node_addr "$i")"; done)
cat > "$BASE/env.sh" <<EOF
# generated by dlaunch scripts/slurm-cluster/start.sh - source it: . $BASE/env.sh
# Slurm client commands (sinfo, sbatch, srun, scontrol, ...) find the cluster through this:
export SLURM_CONF=$ETC/slurm.conf
# Jobs run as root on this test cluster; OpenMPI refuses that unless told otherwise.
export OMPI_ALLOW_RUN_AS_ROOT=1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# Keep all OpenMPI TCP traffic (MPI messages and mpirun<->orted out-of-band) on the
# private subnet.  Inside the nodes it selects $NODE_IF, in the root namespace the
# bridge $BRIDGE; it never matches the machine's external interface.
export OMPI_MCA_btl_tcp_if_include=$SUBNET.0/24
export OMPI_MCA_oob_tcp_if_include=$SUBNET.0/24
# Use only OpenMPI's own transports (shared memory + the TCP above): UCX and libfabric
# would pick interfaces by themselves, ignoring the *_if_include settings.  (Debian's
# /etc/openmpi/openmpi-mca-params.conf already excludes them; this holds elsewhere too.)
export OMPI_MCA_pml=ob1
export OMPI_MCA_btl=self,vader,tcp
export OMPI_MCA_osc=^ucx,pt2pt
# Facts about the test cluster, for tests and scripts.
export DLAUNCH_SLURM_BASE=$BASE
export DLAUNCH_SLURM_NODES=$NODES
export DLAUNCH_SLURM_CPUS=$CPUS
export DLAUNCH_SLURM_GPUS=$GPUS
export DLAUNCH_SLURM_MEM=$MEM
export DLAUNCH_SLURM_NODE_NAMES="${node_names% }"
export DLAUNCH_SLURM_NODE_ADDRS="${node_addrs% }"
export DLAUNCH_SLURM_SUBNET_CIDR=$SUBNET.0/24
export DLAUNCH_SLURM_CTLD_ADDR=$SUBNET.1
export DLAUNCH_SLURM_NODE_IF=$NODE_IF
export DLAUNCH_SLURM_LOGDIR=$LOG
export DLAUNCH_MUNGE_SOCKET=$MUNGE_SOCKET
EOF

# ------------------------------------------------------------------ slurmctld
slurmctld || die "slurmctld failed to start; see $LOG/slurmctld.log"
wait_for 30 "scontrol ping 2>/dev/null | grep -q UP" ||
    die "slurmctld does not answer 'scontrol ping' after 30 s; see $LOG/slurmctld.log"
say "slurmctld   pid $(cat "$RUN/slurmctld.pid")  $SUBNET.1:$CTLD_PORT"

# ------------------------------------------------------------------ slurmd per node
for i in $(seq 1 "$NODES"); do
    # nsenter, not `ip netns exec`: the latter remounts /sys and slurmd's cgroup code fails.
    # In the new mount namespace (private propagation) we detach /run/netns, so that this
    # node does not pin the other nodes' namespaces, and bind our hosts file over /etc/hosts.
    nsenter --net="/run/netns/$(ns_name "$i")" \
        unshare --uts --mount --propagation private \
        sh -c "hostname node$i &&
               { umount -l /run/netns 2>/dev/null || true; } &&
               mount --bind '$ETC/hosts' /etc/hosts &&
               exec slurmd -N node$i" ||
        die "slurmd node$i failed to start; see $LOG/slurmd.node$i.log"
done

# ------------------------------------------------------------------ wait for idle nodes
if ! wait_for "$TIMEOUT" "all_nodes_idle $NODES"; then
    sinfo -N -o '%N %T %E' >&2 || true
    for i in $(seq 1 "$NODES"); do
        pid_alive "$RUN/slurmd.node$i.pid" slurmd >/dev/null ||
            echo "[$LOGTAG] slurmd node$i is not running" >&2
    done
    die "not all $NODES nodes are idle after $TIMEOUT s; see $LOG/slurmctld.log and $LOG/slurmd.node*.log"
fi
trap - ERR

sinfo -N -o '%N %T %c %m %G'
say "cluster ready in $(elapsed "$t0") s: $NODES nodes x $CPUS CPUs, $GPUS fake GPUs each, base $BASE"
say "use: . $BASE/env.sh     smoke test: $HERE/smoke.sh     stop: $HERE/stop.sh"
