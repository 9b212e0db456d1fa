#!/bin/sh
# Holds the core crate to its promise (docs/design.md): no MPI, hwloc, CUDA or system-call
# crates among its dependencies; no clock, filesystem, process, network or environment calls
# outside its tests; no import cycle between its modules. Then runs its tests alone, which
# builds nothing of the shell (so they pass on a machine without OpenMPI, hwloc or CUDA).
set -eu
cd "$(dirname "$0")/.."
core=crates/dlaunch-core
failed=0

forbidden_crates=$(cargo tree -p dlaunch-core -e normal,build --prefix none \
    | awk '{print $1}' | grep -E '^(mpi|mpi-sys|hwlocality|hwlocality-sys|cudarc|nix|libc|env_logger|clap)$' | sort -u || true)
if [ -n "$forbidden_crates" ]; then
    echo "check-core: dlaunch-core depends on $(echo "$forbidden_crates" | tr '\n' ' ')— those belong to the shell" >&2
    failed=1
fi

# Non-test code of every core file: stop reading at the file's first #[cfg(test)]; skip the
# unit-test files and comments.
effects='std::(fs|process|net|env|thread|os)\b|SystemTime::now|Instant::now|\bmpi::|hwlocality|cudarc|\bnix::|\blibc::'
hits=$(find "$core/src" -name '*.rs' ! -name 'tests.rs' -exec awk -v re="$effects" '
    /#\[cfg\(test\)\]/ { exit }
    /^[[:space:]]*\/\// { next }
    $0 ~ re { printf "%s:%d: %s\n", FILENAME, FNR, $0 }' {} \;)
if [ -n "$hits" ]; then
    echo "check-core: the core must not touch the world (pass the value in from the shell):" >&2
    echo "$hits" >&2
    failed=1
fi

# Module graph: an edge from each top-level module to every top-level module it names.
edges=$(find "$core/src" -name '*.rs' ! -name 'tests.rs' | while read -r f; do
    from=$(echo "${f#"$core"/src/}" | sed 's|/.*||; s|\.rs$||')
    [ "$from" = lib ] && continue
    { grep -oE 'crate::[a-z_]+' "$f" || true; } | sed 's/crate:://' | sort -u | while read -r to; do
        if [ "$to" != "$from" ]; then echo "$from $to"; fi
    done
done)
if ! echo "$edges" | tsort >/dev/null 2>/tmp/check-core-tsort.$$; then
    echo "check-core: import cycle between core modules:" >&2
    cat /tmp/check-core-tsort.$$ >&2
    failed=1
fi
rm -f /tmp/check-core-tsort.$$

[ "$failed" = 0 ] || exit 1
echo "check-core: dlaunch-core is pure ($(echo "$edges" | wc -l) module edges, no cycle)"
