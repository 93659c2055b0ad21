# Guest half of tests/vmm.rs `panic_vm`: PID 1 exits, the kernel panics
# ("Attempted to kill init") and the VMM must exit 2.
echo "PROBE: panic=exiting-init"
exit 1
