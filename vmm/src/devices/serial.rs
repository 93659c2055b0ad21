//! The 8250 console on COM1, on vm-superio.

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// COM1 base port.
pub const COM1_BASE: u16 = 0x3f8;
/// Ports COM1 spans.
pub const COM1_LEN: u16 = 8;

/// Raises the serial IRQ through an irqfd.
#[derive(Debug)]
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where console output goes.
pub type ConsoleOut = Box<dyn Write + Send>;

/// COM1.
pub struct SerialConsole {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOut>,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SerialConsole")
    }
}

impl SerialConsole {
    /// A console raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: ConsoleOut) -> Self {
        Self {
            serial: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Whether `port` belongs to COM1.
    pub fn handles(port: u16) -> bool {
        (COM1_BASE..COM1_BASE + COM1_LEN).contains(&port)
    }

    /// A guest read of a COM1 register.
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.serial.read((port - COM1_BASE) as u8);
        }
    }

    /// A guest write of a COM1 register.
    pub fn write(&mut self, port: u16, data: &[u8]) {
        if let Some(&b) = data.first()
            && let Err(e) = self.serial.write((port - COM1_BASE) as u8, b)
        {
            tracing::debug!("serial write: {e:?}");
        }
    }

    /// Feeds host input to the guest.
    pub fn enqueue_input(&mut self, input: &[u8]) {
        if let Err(e) = self.serial.enqueue_raw_bytes(input) {
            tracing::debug!("serial input: {e:?}");
        }
    }
}
