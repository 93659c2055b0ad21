#!/usr/bin/env bash
# Builds the guest root image: a small read-only ext4 disk whose init is the
# static podvisor-agent. The kernel mounts it as /dev/vda (root=/dev/vda ro),
# so nothing is unpacked at boot (an initramfs costs ~0.9 s per MB to unpack
# on a kvm_pvm host, see images/README.md).
#
#   images/build-rootfs.sh AGENT_BINARY OUT_DIR  -> OUT_DIR/rootfs.ext4 (+ initramfs.cpio)
set -euo pipefail
agent=${1:?usage: build-rootfs.sh AGENT_BINARY OUT_DIR}
out=${2:?usage: build-rootfs.sh AGENT_BINARY OUT_DIR}
mkdir -p "$out"

[ -x "$agent" ] || { echo "[rootfs] agent binary $agent missing: build it first" >&2; exit 1; }
if ! file "$agent" 2>/dev/null | grep -q "static"; then
    # `file` may be absent; ldd says "not a dynamic executable" for static ones.
    if ldd "$agent" >/dev/null 2>&1; then
        echo "[rootfs] $agent is dynamically linked; the guest has no libc" >&2
        exit 1
    fi
fi

stage=$(mktemp -d "${TMPDIR:-/tmp}/podvisor-rootfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{sbin,proc,sys,dev,run,tmp,mnt,etc,var}
install -m 0755 "$agent" "$stage/sbin/podvisor-agent"
ln -s /sbin/podvisor-agent "$stage/init"
echo "podvisor" > "$stage/etc/hostname"
: > "$stage/etc/resolv.conf"
printf '127.0.0.1\tlocalhost\n' > "$stage/etc/hosts"

# Size: the content plus room for ext4's own metadata, rounded to MiB.
kib=$(du -sk "$stage" | cut -f1)
mib=$(( (kib * 12 / 10) / 1024 + 4 ))
img="$out/rootfs.ext4"
# Unique temporary files renamed into place: tests may run this from two processes at once,
# and VMs still running keep the image they opened.
tmp_img=$(mktemp "$img.XXXXXX")
tmp_cpio=$(mktemp "$out/initramfs.cpio.XXXXXX")
trap 'rm -rf "$stage" "$tmp_img" "$tmp_cpio"' EXIT
mkfs.ext4 -q -F -L podvisor-root -O ^has_journal -E root_owner=0:0 -d "$stage" "$tmp_img" "${mib}M"
chmod 0644 "$tmp_img"
mv "$tmp_img" "$img"

# The same tree as an initramfs, for the boot-time comparison in the bench.
(cd "$stage" && find . | cpio -o -H newc --quiet) > "$tmp_cpio"
chmod 0644 "$tmp_cpio"
mv "$tmp_cpio" "$out/initramfs.cpio"
echo "[rootfs] $img (${mib} MiB), $out/initramfs.cpio ($(du -k "$out/initramfs.cpio" | cut -f1) KiB)"
