//! Small port-I/O devices: the podvisor exit port, the boot-time marker and
//! the i8042 reset line.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::exit::{ExitReason, ExitSignal};

/// Our guest kernel (`podvisor.exit_port=`, see images/kernel/patches)
/// writes to this port on power-off, to the next one on a panic and to the
/// one after on restart. The port says what happened, not the value: a
/// kvm_pvm host's ring-0 emulator has been seen to report a stale value.
/// 0x501 is QEMU's isa-debug-exit port, free on a PC.
pub const EXIT_PORT: u16 = 0x501;
/// Power-off.
pub const EXIT_PORT_POWER_OFF: u16 = EXIT_PORT;
/// Kernel panic.
pub const EXIT_PORT_PANIC: u16 = EXIT_PORT + 1;
/// Restart.
pub const EXIT_PORT_RESTART: u16 = EXIT_PORT + 2;
/// Our guest kernel writes here just before it runs init (its last
/// initcall): boot-to-init time.
pub const BOOT_MARKER_PORT: u16 = EXIT_PORT + 4;
/// i8042 command/status port.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
const I8042_CMD_RESET_CPU: u8 = 0xfe;

/// Timing of one VM's boot, in milliseconds since the VMM started.
#[derive(Debug)]
pub struct BootTimes {
    start: Instant,
    first_vcpu_entry_us: AtomicU64,
    init_us: AtomicU64,
}

impl BootTimes {
    /// Starts the clock (call at VMM start).
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            first_vcpu_entry_us: AtomicU64::new(0),
            init_us: AtomicU64::new(0),
        }
    }

    fn now_us(&self) -> u64 {
        (self.start.elapsed().as_micros() as u64).max(1)
    }

    /// Records the first KVM_RUN of the boot vCPU.
    pub fn mark_first_vcpu_entry(&self) {
        let _ = self.first_vcpu_entry_us.compare_exchange(
            0,
            self.now_us(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
    }

    /// Microseconds from VMM start to the first vCPU entry, if reached.
    pub fn first_vcpu_entry_us(&self) -> Option<u64> {
        Some(self.first_vcpu_entry_us.load(Ordering::SeqCst)).filter(|v| *v != 0)
    }

    /// Microseconds from VMM start to the guest's init marker, if reached.
    pub fn init_us(&self) -> Option<u64> {
        Some(self.init_us.load(Ordering::SeqCst)).filter(|v| *v != 0)
    }
}

/// The exit port, boot marker and i8042 together: each is a byte or two of
/// state, so one port handler serves them.
#[derive(Debug)]
pub struct LegacyPorts {
    exit: Arc<ExitSignal>,
    times: Arc<BootTimes>,
}

impl LegacyPorts {
    /// Ports that report to `exit` and `times`.
    pub fn new(exit: Arc<ExitSignal>, times: Arc<BootTimes>) -> Self {
        Self { exit, times }
    }

    /// Whether `port` is one of ours.
    pub fn handles(port: u16) -> bool {
        matches!(
            port,
            EXIT_PORT_POWER_OFF
                | EXIT_PORT_PANIC
                | EXIT_PORT_RESTART
                | BOOT_MARKER_PORT
                | I8042_COMMAND_PORT
                | I8042_DATA_PORT
        )
    }

    /// A guest read: the i8042 reports an empty, idle controller so the
    /// kernel's reset path does not wait; the other ports read 0.
    pub fn read(&self, _port: u16, data: &mut [u8]) {
        data.fill(0);
    }

    /// A guest write.
    pub fn write(&self, port: u16, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        tracing::debug!(port, value, "legacy port write");
        match port {
            EXIT_PORT_POWER_OFF => self.exit.trigger(ExitReason::PowerOff),
            EXIT_PORT_PANIC => self.exit.trigger(ExitReason::Panic),
            EXIT_PORT_RESTART => self.exit.trigger(ExitReason::Reset),
            BOOT_MARKER_PORT => {
                let us = self.times.now_us();
                if self
                    .times
                    .init_us
                    .compare_exchange(0, us, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    tracing::info!(
                        boot_to_init_ms = us / 1000,
                        "guest init started {:.1} ms after VMM start",
                        us as f64 / 1000.0
                    );
                }
            }
            I8042_COMMAND_PORT if value == I8042_CMD_RESET_CPU => {
                self.exit.trigger(ExitReason::Reset);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports() -> (LegacyPorts, Arc<ExitSignal>, Arc<BootTimes>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let times = Arc::new(BootTimes::new(Instant::now()));
        (LegacyPorts::new(exit.clone(), times.clone()), exit, times)
    }

    #[test]
    fn exit_ports_map_to_reasons_whatever_the_value() {
        for (port, r) in [
            (EXIT_PORT_POWER_OFF, ExitReason::PowerOff),
            (EXIT_PORT_PANIC, ExitReason::Panic),
            (EXIT_PORT_RESTART, ExitReason::Reset),
        ] {
            for v in [0u8, 2, 0xff] {
                let (p, exit, _) = ports();
                p.write(port, &[v]);
                assert_eq!(exit.reason(), Some(r.clone()));
            }
        }
    }

    #[test]
    fn first_exit_reason_wins() {
        let (p, exit, _) = ports();
        p.write(EXIT_PORT_PANIC, &[0]);
        p.write(EXIT_PORT_POWER_OFF, &[0]);
        assert_eq!(exit.reason(), Some(ExitReason::Panic));
    }

    #[test]
    fn i8042_reset_ends_the_vm() {
        let (p, exit, _) = ports();
        p.write(I8042_COMMAND_PORT, &[0x20]);
        assert_eq!(exit.reason(), None);
        p.write(I8042_COMMAND_PORT, &[I8042_CMD_RESET_CPU]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }

    #[test]
    fn boot_marker_is_recorded_once() {
        let (p, _, times) = ports();
        assert_eq!(times.init_us(), None);
        p.write(BOOT_MARKER_PORT, &[1]);
        let first = times.init_us().unwrap();
        p.write(BOOT_MARKER_PORT, &[1]);
        assert_eq!(times.init_us(), Some(first));
        p.write(BOOT_MARKER_PORT, &[]);
    }
}
