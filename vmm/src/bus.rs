//! Routing of vCPU port-I/O and MMIO exits to devices.

use std::sync::Mutex;

use crate::devices::legacy::LegacyPorts;
use crate::devices::serial::SerialConsole;
use crate::layout::VIRTIO_MMIO_SIZE;
use crate::virtio::mmio::MmioTransport;
use podvisor_common::lock;

/// The port-I/O devices.
#[derive(Debug)]
pub struct PortIoBus {
    /// COM1.
    pub serial: Mutex<SerialConsole>,
    /// Exit port, boot marker, i8042.
    pub legacy: LegacyPorts,
}

impl PortIoBus {
    /// A guest `in`: ports nobody owns read as all ones, like an empty ISA bus.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        if SerialConsole::handles(port) {
            lock(&self.serial).read(port, data);
        } else if LegacyPorts::handles(port) {
            self.legacy.read(port, data);
        } else {
            data.fill(0xff);
        }
    }

    /// A guest `out`: ports nobody owns ignore it.
    pub fn write(&self, port: u16, data: &[u8]) {
        if SerialConsole::handles(port) {
            lock(&self.serial).write(port, data);
        } else if LegacyPorts::handles(port) {
            self.legacy.write(port, data);
        }
    }
}

/// The virtio-mmio windows, one per device, in address order.
#[derive(Debug, Default)]
pub struct MmioBus {
    windows: Vec<(u64, Mutex<MmioTransport>)>,
}

impl MmioBus {
    /// Adds the window at `base`.
    pub fn add(&mut self, base: u64, transport: MmioTransport) {
        self.windows.push((base, Mutex::new(transport)));
    }

    /// The transport whose window holds `addr`, and the offset in it.
    fn find(&self, addr: u64) -> Option<(&Mutex<MmioTransport>, u64)> {
        self.windows.iter().find_map(|(base, t)| {
            let off = addr.checked_sub(*base)?;
            (off < VIRTIO_MMIO_SIZE).then_some((t, off))
        })
    }

    /// The transports, for the control API.
    pub fn transports(&self) -> impl Iterator<Item = &Mutex<MmioTransport>> {
        self.windows.iter().map(|(_, t)| t)
    }

    /// A guest MMIO read: unmapped addresses read as zero.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((t, off)) => lock(t).read(off, data),
            None => data.fill(0),
        }
    }

    /// A guest MMIO write: unmapped addresses ignore it.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((t, off)) = self.find(addr) {
            lock(t).write(off, data);
        }
    }
}
