//! Legacy (port I/O) devices: the serial console and the small ports the
//! guest uses to say it booted, powered off, rebooted or panicked.

pub mod legacy;
pub mod serial;
