#!/usr/bin/env bash
# podvisor end to end, as a user sees it: a local registry with a busybox image, podvisord
# serving CRI on a socket, and a pod (a microVM) running a container, driven with podvisorctl
# the way kubelet or crictl would drive it. Everything lives in a temporary directory and is
# removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=target/release
work=$(mktemp -d /tmp/podvisor-demo.XXXXXX)
sock="$work/podvisord.sock"
ctl() { echo "\$ podvisorctl $*" >&2; "$bin/podvisorctl" --socket "$sock" "$@"; }
cleanup() {
    set +e
    # Pods outlive podvisord by design: remove the demo's pod first if it is still there.
    if [ -n "${pod:-}" ] && [ -n "${daemon:-}" ]; then
        "$bin/podvisorctl" --socket "$sock" rmp "$pod" >/dev/null 2>&1
    fi
    [ -n "${daemon:-}" ] && kill "$daemon" 2>/dev/null && wait "$daemon" 2>/dev/null
    [ -n "${registry:-}" ] && kill "$registry" 2>/dev/null && wait "$registry" 2>/dev/null
    ip link del pvdemo0 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# Waits up to $1 seconds for the command after it to succeed (no fixed sleeps: each try is a
# real readiness check).
wait_for() {
    local deadline=$(( $(date +%s) + $1 )); shift
    until "$@" >/dev/null 2>&1; do
        if [ "$(date +%s)" -gt "$deadline" ]; then echo "timed out waiting for: $*" >&2; return 1; fi
        sleep 0.2
    done
}

port=
for p in $(seq 5100 5199); do
    if [ -z "$(ss -ltnH "sport = :$p")" ]; then port=$p; break; fi
done
[ -n "$port" ] || { echo "no free port in 5100-5199" >&2; exit 1; }
registry_host="127.0.0.1:$port"
echo "== a local registry (Debian's docker-registry) on $registry_host"
mkdir -p "$work/registry"
cat >"$work/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: $registry_host
EOF
/usr/bin/docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry=$!
wait_for 30 curl -sf "http://$registry_host/v2/"
"$bin/push-busybox" "$registry_host" demo/busybox 1.0

echo "== podvisord with its configuration in $work"
# Pod networking: Debian's CNI plugins with a bridge of the demo's own (never /etc/cni).
mkdir -p "$work/cni"
cat >"$work/cni/10-demo.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "podvisor-demo", "plugins": [
  {"type": "bridge", "bridge": "pvdemo0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.213.99.0/24"}]],
            "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$work/cni-ipam"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
cat >"$work/config.toml" <<EOF
socket = "$sock"
root_dir = "$work/root"
state_dir = "$work/state"
vmm_binary = "$PWD/$bin/podvisor-vmm"

[registry]
insecure = ["$registry_host"]

[cni]
conf_dir = "$work/cni"
bin_dirs = ["/usr/lib/cni"]

[handlers.podvisor]
vcpus = 1
memory_mib = 256
kernel = "$PWD/build/guest/vmlinux"
image = "$PWD/build/guest/rootfs.ext4"
EOF
RUST_LOG=${RUST_LOG:-info} "$bin/podvisord" --config "$work/config.toml" >"$work/podvisord.log" 2>&1 &
daemon=$!
wait_for 60 "$bin/podvisorctl" --socket "$sock" version
ctl version

mkdir -p "$work/logs"
cat >"$work/pod.json" <<EOF
{"metadata": {"name": "demo", "namespace": "default", "uid": "demo-uid-1", "attempt": 0},
 "hostname": "demo-pod", "log_directory": "$work/logs"}
EOF
cat >"$work/container.json" <<EOF
{"metadata": {"name": "hello", "attempt": 0}, "image": {"image": "$registry_host/demo/busybox:1.0"},
 "command": ["sh", "-c"],
 "args": ["echo hello from \$(hostname), a podvisor microVM; echo and this on stderr >&2; sleep 1000"],
 "log_path": "hello.log"}
EOF

echo "== a pod: RunPodSandbox boots its microVM (about a minute on a kvm_pvm host)"
start=$(date +%s)
pod=$(ctl runp "$work/pod.json")
echo "pod $pod ready after $(( $(date +%s) - start )) s"
ctl pods
ctl inspectp "$pod" | grep -E '"(ip|state)"' || true
ctl pull "$registry_host/demo/busybox:1.0"
ctl images
ctr=$(ctl create "$pod" "$work/container.json" "$work/pod.json")
ctl start "$ctr"
ctl ps -a
wait_for 120 grep -q "stderr F and this" "$work/logs/hello.log"
echo "== the container's log ($work/logs/hello.log, CRI format)"
cat "$work/logs/hello.log"
ctl logs "$ctr"
echo "== exec in the container"
ctl exec "$ctr" -- sh -c 'echo "pid 1 is $(cat /proc/1/comm) on $(cat /etc/hostname)"; cat /proc/net/fib_trie | grep -A1 "/32 host" | head -4'
echo "== stop and remove"
ctl stop -t 2 "$ctr"
ctl ps -a
ctl rm "$ctr"
ctl stopp "$pod"
ctl rmp "$pod"
pod=
ctl pods
echo "== done: podvisord's log was $work/podvisord.log"
