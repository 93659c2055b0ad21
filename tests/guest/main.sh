# Guest half of tests/vmm.rs `main_vm`: every check prints a `PROBE:` line
# that the host waits for, in this order. Runs as PID 1 (exec'd by /init).
# Drives: vda = root (this image), vdb = data (4 MiB, rw), vdc = swap.

# kvm_pvm (this project's CI host) loses guest user-space writes when a process migrates
# between vCPUs of a busy host: a fresh static program then reads its relocated TLS as
# zeros and dies with SIGSEGV (8 of 110 runs on 2 vCPUs under load; 0 of 80 on 1 vCPU and
# 0 of 80 pinned). Programs of this 2-vCPU check run pinned to CPU 0, this shell too (it
# re-runs itself under taskset once: a CI run saw empty drive serials and a segfault from the
# unpinned shell while the host was busy); /proc/cpuinfo checks SMP.
pin="taskset 1"
if [ -z "$PODVISOR_PINNED" ]; then
    PODVISOR_PINNED=1 exec taskset 1 /bin/busybox sh "$0"
fi

# (a) a static program from the image runs.
if $pin guest-probe hello; then echo "PROBE: probe=ok"; else echo "PROBE: probe=failed rc=$?"; fi

# (e) both vCPUs are online (nproc would count only this shell's CPU).
echo "PROBE: nproc=$(grep -c ^processor /proc/cpuinfo)"

# Drive ids are the virtio serials.
read -r s1 </sys/block/vda/serial
read -r s2 </sys/block/vdb/serial
read -r s3 </sys/block/vdc/serial
echo "PROBE: serials=$s1,$s2,$s3"

# (b) read the whole data drive; then write a 512-byte pattern at sector 2056.
set -- $(sha256sum /dev/vdb)
echo "PROBE: vdb-sha256=$1"
yes podvisor-pattern- | head -c 512 >/tmp/pattern
if dd if=/tmp/pattern of=/dev/vdb bs=512 seek=2056 count=1 conv=notrunc,fsync oflag=direct 2>/tmp/dd.err; then
    echo "PROBE: vdb-write=done offset=$((2056 * 512)) mode=direct"
elif dd if=/tmp/pattern of=/dev/vdb bs=512 seek=2056 count=1 conv=notrunc,fsync 2>>/tmp/dd.err; then
    sync
    echo "PROBE: vdb-write=done offset=$((2056 * 512)) mode=buffered direct-error=$(head -n 1 /tmp/dd.err)"
else
    echo "PROBE: vdb-write=failed $(cat /tmp/dd.err)"
fi

# (c) vsock, host to guest: the host connects to port 5000 once it sees VSOCK-LISTENING.
timeout 180 $pin guest-probe vsock-echo-server 5000
echo "PROBE: vsock-server=done rc=$?"
# guest to host: the host listens on <uds>_5001.
timeout 180 $pin guest-probe vsock-echo-client 5001 hello-from-guest
echo "PROBE: vsock-client=done rc=$?"

# (d) network: only the TAP at 10.213.0.1 is on the other side.
if [ -d /sys/class/net/eth0 ]; then
    read -r mac </sys/class/net/eth0/address
    ip link set eth0 up
    ip addr add 10.213.0.2/24 dev eth0
    if ping -c 3 -W 5 10.213.0.1 >/tmp/ping.out 2>&1; then r=ok; else r=failed; fi
    echo "PROBE: ping=$r mac=$mac $(grep 'packets transmitted' /tmp/ping.out)"
else
    echo "PROBE: ping=failed no eth0"
fi

# (g) drive swap: report vdc, then wait (bounded) for the host to swap it.
read -r size0 </sys/block/vdc/size
head0=$(dd if=/dev/vdc bs=512 count=1 iflag=direct 2>/dev/null | head -c 16)
echo "PROBE: swap-before size=$size0 head=$head0"
size=$size0
i=0
while [ "$size" = "$size0" ] && [ $i -lt 240 ]; do
    sleep 0.5
    i=$((i + 1))
    read -r size </sys/block/vdc/size
done
head1=$(dd if=/dev/vdc bs=512 count=1 iflag=direct 2>/dev/null | head -c 16)
if [ -z "$head1" ]; then
    echo 3 >/proc/sys/vm/drop_caches
    head1=$(dd if=/dev/vdc bs=512 count=1 2>/dev/null | head -c 16)
fi
echo "PROBE: swap-after size=$size head=$head1 polls=$i"

# (f) power off: the VMM must exit 0.
echo "PROBE: main=done"
poweroff -f
