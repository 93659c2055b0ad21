# Guest half of boot-bench: the kernel wrote the boot marker before running
# init; hold 1 s so the host can sample RSS at init, then power off.
echo "PROBE: bench=init"
sleep 1
poweroff -f
