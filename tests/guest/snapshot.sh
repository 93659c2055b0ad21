# Guest half of tests/snapshot.rs: a vsock echo server on port 5000, started again after
# every connection. The host snapshots the VM while a server listens and restores it in new
# VMMs: the restored guests continue this loop and answer on their new sockets.
n=0
while [ $n -lt 50 ]; do
    timeout 600 guest-probe vsock-echo-server 5000
    rc=$?
    n=$((n + 1))
    echo "PROBE: served n=$n rc=$rc uptime=$(cut -d' ' -f1 /proc/uptime)"
done
poweroff -f
