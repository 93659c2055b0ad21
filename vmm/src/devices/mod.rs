//! Legacy (port I/O) devices: the serial console and the small ports the
//! guest uses to say it booted, powered off, rebooted or panicked; the console's capped
//! host file.

pub mod console_file;
pub mod legacy;
pub mod serial;
