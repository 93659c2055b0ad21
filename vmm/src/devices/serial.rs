//! The 8250 console on COM1, on vm-superio.

use std::io::Write;

use vm_superio::serial::SerialState;
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

/// Most unread guest input a snapshot may carry (the 8250's FIFO is far smaller).
const MAX_SNAPSHOT_INPUT: usize = 64 * 1024;

/// The UART registers in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Input the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

/// Where console output goes.
pub type ConsoleOut = Box<dyn Write + Send>;

/// COM1.
pub struct SerialConsole {
    serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, ConsoleOut>,
}

/// Why a snapshot's UART state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum SerialRestoreError {
    /// More unread input than the UART could have held.
    #[error("serial snapshot holds {len} bytes of input (at most {MAX_SNAPSHOT_INPUT})")]
    TooMuchInput {
        /// Bytes in the snapshot.
        len: usize,
    },
    /// vm-superio refused the register state.
    #[error("serial snapshot")]
    State(#[source] vm_superio::serial::Error<std::io::Error>),
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

    /// A console continuing from a snapshot's register state.
    pub fn from_snapshot(
        irq: EventFd,
        out: ConsoleOut,
        snap: &SerialSnapshot,
    ) -> Result<Self, SerialRestoreError> {
        // The receive buffer is the guest's unread input: bounded like the UART's FIFO.
        if snap.in_buffer.len() > MAX_SNAPSHOT_INPUT {
            return Err(SerialRestoreError::TooMuchInput {
                len: snap.in_buffer.len(),
            });
        }
        let state = SerialState {
            baud_divisor_low: snap.baud_divisor_low,
            baud_divisor_high: snap.baud_divisor_high,
            interrupt_enable: snap.interrupt_enable,
            interrupt_identification: snap.interrupt_identification,
            line_control: snap.line_control,
            line_status: snap.line_status,
            modem_control: snap.modem_control,
            modem_status: snap.modem_status,
            scratch: snap.scratch,
            in_buffer: snap.in_buffer.clone(),
        };
        let serial = Serial::from_state(&state, IrqTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(SerialRestoreError::State)?;
        Ok(Self { serial })
    }

    /// The register state, for a snapshot: without it a restored guest's driver waits forever
    /// for the transmit interrupt it had enabled.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.serial.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
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
