#!/usr/bin/env bash
# Boots one podvisor microVM with the guest agent as init, shows its console
# until the agent is ready, asks the VMM for its state, and stops it.
set -euo pipefail
cd "$(dirname "$0")/.."

vmm=target/release/podvisor-vmm
work=$(mktemp -d /tmp/podvisor-demo.XXXXXX)
console="$work/console.log"
api="$work/api.sock"
cleanup() {
    [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

echo "== booting a microVM: 2 vCPUs, 256 MiB, root disk with podvisor-agent as init"
"$vmm" --kernel build/guest/vmlinux \
    --drive build/guest/rootfs.ext4,ro,id=root \
    --cmdline "quiet root=/dev/vda ro rootfstype=ext4 init=/sbin/podvisor-agent" \
    --vcpus 2 --mem-mib 256 \
    --vsock "cid=3,uds=$work/vsock.sock" \
    --api-sock "$api" --serial "$console" &
pid=$!

# Follow the console until the agent says it is ready (or the VM ends).
tail -n +1 -f "$console" --pid "$pid" 2>/dev/null &
tailpid=$!
deadline=$(( $(date +%s) + 300 ))
until grep -q "podvisor-agent: ready" "$console" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then echo "VMM exited before the agent was ready" >&2; exit 1; fi
    if [ "$(date +%s)" -gt "$deadline" ]; then echo "agent not ready after 300 s" >&2; exit 1; fi
    sleep 0.5
done
kill "$tailpid" 2>/dev/null || true
echo
echo "== VMM state (GET /vm on the control socket)"
curl -s --unix-socket "$api" http://localhost/vm
echo
echo "== stopping the VM"
curl -s -X PUT --unix-socket "$api" http://localhost/vm/stop
wait "$pid" && echo "VMM exited 0"
pid=
