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

# The image is rebuilt only when its inputs (the agent and this script) change, and then
# byte for byte the same for the same inputs: VM templates are keyed by the image's content,
# and tests run this from several processes while pods of other tests run.
key=$(cat "$agent" "$0" | sha256sum | cut -c1-16)
img="$out/rootfs.ext4"
cpio_out="$out/initramfs.cpio"
exec 9>"$out/.rootfs.lock"
flock 9
if [ -f "$img" ] && [ -f "$cpio_out" ] && [ "$(cat "$out/rootfs.key" 2>/dev/null)" = "$key" ]; then
    # Current; the new mtime says so to whoever compares it with the agent's.
    touch "$img" "$cpio_out"
    echo "[rootfs] $img is current ($key)"
    exit 0
fi

stage=$(mktemp -d "${TMPDIR:-/tmp}/podvisor-rootfs.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage"/{sbin,proc,sys,dev,run,tmp,mnt,etc,var}
install -m 0755 "$agent" "$stage/sbin/podvisor-agent"
ln -s /sbin/podvisor-agent "$stage/init"
echo "podvisor" > "$stage/etc/hostname"
: > "$stage/etc/resolv.conf"
printf '127.0.0.1\tlocalhost\n' > "$stage/etc/hosts"

# Fixed times, UUID and hash seed: the same inputs give the same bytes.
epoch=946684800
find "$stage" -exec touch -h -d "@$epoch" {} +
uuid=6f6f7670-6f64-4976-8973-6f722d726f6f

# Size: the content plus room for ext4's own metadata, rounded to MiB.
kib=$(du -sk "$stage" | cut -f1)
mib=$(( (kib * 12 / 10) / 1024 + 4 ))
# Unique temporary files renamed into place: tests may run this from two processes at once,
# and VMs still running keep the image they opened.
tmp_img=$(mktemp "$img.XXXXXX")
tmp_cpio=$(mktemp "$out/initramfs.cpio.XXXXXX")
trap 'rm -rf "$stage" "$tmp_img" "$tmp_cpio"' EXIT
E2FSPROGS_FAKE_TIME=$epoch SOURCE_DATE_EPOCH=$epoch \
    mkfs.ext4 -q -F -L podvisor-root -U "$uuid" -O ^has_journal \
    -E "root_owner=0:0,hash_seed=$uuid" -d "$stage" "$tmp_img" "${mib}M"
# mkfs copies each file's ctime (which touch cannot set) and atime (reading a directory
# moves it); debugfs sets both.
(cd "$stage" && find . -printf 'sif "/%P" ctime @'"$epoch"'\nsif "/%P" atime @'"$epoch"'\n') |
    E2FSPROGS_FAKE_TIME=$epoch debugfs -w -f - "$tmp_img" >/dev/null 2>&1
chmod 0644 "$tmp_img"
mv "$tmp_img" "$img"

# The same tree as an initramfs, for the boot-time comparison in the bench.
(cd "$stage" && find . | LC_ALL=C sort | cpio -o -H newc --quiet --reproducible) > "$tmp_cpio"
chmod 0644 "$tmp_cpio"
mv "$tmp_cpio" "$cpio_out"
echo "$key" > "$out/rootfs.key"
echo "[rootfs] $img (${mib} MiB), $cpio_out ($(du -k "$cpio_out" | cut -f1) KiB), $key"
