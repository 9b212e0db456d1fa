#!/bin/sh
# Installs the Debian 12 packages dlaunch needs to build, test and run (as root).
# Idempotent and quiet when everything is already there.
set -eu
PACKAGES="libopenmpi-dev openmpi-bin libhwloc-dev hwloc libudev-dev libclang-dev clang pkg-config \
  slurmctld slurmd slurm-client munge iproute2 procps python3 python3-venv shellcheck chromium"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
command -v cargo >/dev/null || {
    echo "cargo not found: install Rust (https://rustup.rs), dlaunch needs Rust 1.88 or newer" >&2
    exit 1
}
