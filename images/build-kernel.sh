#!/usr/bin/env bash
# Builds the podvisor guest kernel (vmlinux with a PVH entry) from Debian's
# linux-source-6.1, tinyconfig + config.fragment + patches/, and caches it
# outside the repo keyed by a hash of every input, so a rebuild is a link.
#
#   images/build-kernel.sh OUT_DIR      -> OUT_DIR/vmlinux (symlink into the cache)
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:?usage: build-kernel.sh OUT_DIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cache=${PODVISOR_CACHE:-/var/cache/podvisor}
src_tar=/usr/src/linux-source-6.1.tar.xz

log() { printf '[kernel] %s\n' "$*" >&2; }

[ -f "$src_tar" ] || { log "missing $src_tar: run 'make setup' (installs linux-source-6.1)"; exit 1; }
src_version=$(dpkg-query -W -f='${Version}' linux-source-6.1)

# Bump when the build steps below change what comes out.
recipe=1
key=$( {
    echo "recipe $recipe"
    echo "linux-source-6.1 $src_version"
    cat "$here/kernel/config.fragment"
    for p in "$here"/kernel/patches/*.patch; do echo "== $(basename "$p")"; cat "$p"; done
} | sha256sum | cut -c1-16)
dest="$cache/kernel/$key"
mkdir -p "$out"

if [ -f "$dest/vmlinux" ]; then
    log "cached: $dest/vmlinux (key $key)"
    ln -sfn "$dest/vmlinux" "$out/vmlinux"
    ln -sfn "$dest/config" "$out/kernel.config"
    exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/podvisor-kernel.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "building kernel $key from linux-source-6.1 $src_version in $work (about 7 min on 2 cores)"
tar -xJf "$src_tar" -C "$work"
cd "$work/linux-source-6.1"
for p in "$here"/kernel/patches/*.patch; do
    log "patch $(basename "$p")"
    patch -p1 --quiet --forward < "$p"
done

make -s tinyconfig
scripts/kconfig/merge_config.sh -m -O . .config "$here/kernel/config.fragment" >/dev/null
make -s olddefconfig

# Fail loudly when an option of the fragment did not take (a missing dependency).
missing=0
while IFS= read -r line; do
    case "$line" in ''|'#'*) continue ;; esac
    opt=${line%%=*}; val=${line#*=}
    if [ "$val" = n ]; then
        if grep -q "^$opt=" .config; then log "option $opt should be off but is $(grep "^$opt=" .config)"; missing=1; fi
    elif ! grep -qx "$opt=$val" .config; then
        log "option $opt=$val did not take (got: $(grep "^$opt=" .config || echo unset))"; missing=1
    fi
done < "$here/kernel/config.fragment"
[ "$missing" = 0 ] || { log "config fragment did not apply; fix kernel/config.fragment"; exit 1; }

jobs=$(nproc)
log "make -j$jobs vmlinux"
start=$(date +%s)
# Progress: one line per 250 compiled files instead of thousands.
make -j"$jobs" vmlinux 2>&1 | awk '
    /^  (CC|AS|LD|AR)/ { n++; if (n % 250 == 0) { printf "[kernel] %d objects built\n", n > "/dev/stderr"; fflush() } next }
    { print > "/dev/stderr" }'
[ "${PIPESTATUS[0]}" = 0 ] || { log "kernel build failed"; exit 1; }
log "built in $(( $(date +%s) - start )) s"

mkdir -p "$cache/kernel"
tmp_dest=$(mktemp -d "$cache/kernel/.tmp.XXXXXX")
cp vmlinux "$tmp_dest/vmlinux"
cp .config "$tmp_dest/config"
rm -rf "$dest"
mv "$tmp_dest" "$dest"
ln -sfn "$dest/vmlinux" "$out/vmlinux"
ln -sfn "$dest/config" "$out/kernel.config"
log "cached: $dest/vmlinux"
