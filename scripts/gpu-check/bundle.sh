#!/usr/bin/env bash
# Packs dlaunch with this machine's Open MPI, PMIx and hwloc PCI plugin into one directory, for
# a GPU node that has none of them and no package registry (docs/gpu-check.md, "Results"):
#   scripts/gpu-check/bundle.sh DIR     # here (Debian 12, after scripts/setup.sh); DLAUNCH=
#                                        # names a dlaunch binary instead of a release build
#   . DIR/env.sh                         # there, then scripts/gpu-check.sh as usual
# DIR gets dlaunch (release, stripped), Open MPI's programs, components and help files under
# DIR/root/usr, every library they need beyond the C library in DIR/lib, and env.sh, which
# points Open MPI (OPAL_PREFIX), PMIx and hwloc at them and puts DIR/bin (mpirun) first on PATH.
set -euo pipefail
dir=${1:?usage: scripts/gpu-check/bundle.sh DIR}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
arch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
multi=/usr/lib/$arch
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
rm -rf "${dir:?}/root" "$dir/lib" "$dir/bin" "$dir/hwloc"
mkdir -p "$dir/root/usr/bin" "$dir/root$multi" "$dir/root/usr/share" "$dir/lib" "$dir/bin" "$dir/hwloc"

if [ -z "${DLAUNCH:-}" ]; then
    (cd "$root" && cargo build --release --quiet)
fi
strip -o "$dir/dlaunch" "${DLAUNCH:-$root/target/release/dlaunch}"
cp -a /usr/bin/orterun /usr/bin/orted "$dir/root/usr/bin/"
cp -a "$multi/openmpi" "$multi/pmix2" "$dir/root$multi/"
cp -a /usr/share/openmpi "$dir/root/usr/share/"
cp -L "$multi/hwloc/hwloc_pci.so" "$dir/hwloc/"
ln -s ../root/usr/bin/orterun "$dir/bin/mpirun"

# Every shared library the programs and plugins load, but the C library's own.
{
    ldd "$dir/dlaunch" /usr/bin/orterun /usr/bin/orted "$dir/hwloc/hwloc_pci.so"
    find "$dir/root$multi" -name '*.so*' -type f -exec ldd {} \;
} 2>/dev/null | awk '$3 ~ /^\// {print $3}' | sort -u |
    grep -vE '/(libc|libm|libpthread|libdl|librt|libresolv|ld-linux[^/]*)\.so' |
    while read -r library; do cp -L "$library" "$dir/lib/"; done

# Debian's /etc/openmpi/openmpi-mca-params.conf is not relocated with OPAL_PREFIX: as variables.
cat >"$dir/env.sh" <<EOF
# Sourced on the GPU node: dlaunch and Open MPI from $dir (moved anywhere: DLAUNCH_BUNDLE).
D=\${DLAUNCH_BUNDLE:-\$(cd "\$(dirname "\${BASH_SOURCE[0]}")" && pwd)}
export OPAL_PREFIX=\$D/root/usr
export PMIX_INSTALL_PREFIX=\$D/root$multi/pmix2
export PMIX_MCA_mca_base_component_path=\$D/root$multi/pmix2/lib/pmix
export PMIX_MCA_pcompress_base_silence_warning=1
export HWLOC_PLUGINS_PATH=\$D/hwloc
export PATH=\$D/bin:\$PATH
export LD_LIBRARY_PATH=\$D/lib:/usr/local/nvidia/lib64:/usr/local/nvidia/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export OMPI_MCA_btl='^uct,openib,ofi' OMPI_MCA_mtl='^ofi' OMPI_MCA_pml='^ucx' OMPI_MCA_osc='^ucx,pt2pt'
export OMPI_MCA_btl_base_warn_component_unused=0
export GPU_CHECK_DLAUNCH=\$D/dlaunch
EOF
echo "bundle: $(du -sh "$dir" | cut -f1) in $dir; on the GPU node: . $dir/env.sh && scripts/gpu-check.sh"
