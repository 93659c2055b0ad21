#!/usr/bin/env bash
# Installs what podvisor's build, demo and tests need on Debian 12.
# Idempotent: packages already present are not touched.
set -euo pipefail

packages=(
    # guest kernel build
    linux-source-6.1 bc flex bison libelf-dev build-essential cpio xz-utils
    # guest images and tests
    busybox-static e2fsprogs iproute2 kmod curl file
    # lint: scripts/module-cycles.py
    python3
    # benchmark comparison
    qemu-system-x86
    # CRI tests (later issues): registry and CNI plugins
    docker-registry containernetworking-plugins iptables
    # image tests: layers as umoci writes them
    umoci
    # install test: systemd-analyze verify of podvisord.service
    systemd
    # CRI types (k8s-cri's build script runs protoc)
    protobuf-compiler
    # CRI streaming interoperability: containerd 1.6 (with runc) as the reference
    # runtime, and a venv for PyPI's kubernetes client (tests/src/python.rs)
    containerd runc python3-venv
)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "[setup] installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    echo "[setup] all packages present"
fi

# The registry and containerd packages start services on install; tests start their own
# (every run, not only after an install: a later reboot would start them again).
if command -v systemctl >/dev/null 2>&1; then
    for svc in docker-registry containerd; do
        if systemctl is-enabled --quiet "$svc" 2>/dev/null || systemctl is-active --quiet "$svc" 2>/dev/null; then
            echo "[setup] disabling and stopping the $svc service (tests start their own)"
            systemctl disable --now "$svc" >/dev/null 2>&1 || true
        fi
    done
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "[setup] cargo not found: install Rust (rustup) first" >&2
    exit 1
fi
if ! rustup target list --installed 2>/dev/null | grep -q x86_64-unknown-linux-gnu; then
    rustup target add x86_64-unknown-linux-gnu
fi
[ -e /dev/kvm ] || { echo "[setup] /dev/kvm is missing: podvisor needs KVM" >&2; exit 1; }
[ -e /dev/net/tun ] || { mkdir -p /dev/net && mknod /dev/net/tun c 10 200; }
# The unprivileged user every VMM runs as once its VM is built (podvisord's vmm_user).
if ! getent passwd podvisor >/dev/null; then
    echo "[setup] creating the system user podvisor (the VMMs' user)"
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin podvisor
fi
echo "[setup] done"
