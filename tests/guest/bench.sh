# Guest half of boot-bench: mark init for the VMM, hold 1 s so the host can
# sample RSS at init, then power off.
guest-probe boot-marker
echo "PROBE: bench=init"
sleep 1
poweroff -f
