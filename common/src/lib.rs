//! Helpers shared by every podvisor crate (the VMM, the guest agent, podvisord and its
//! tools). Each exists once here instead of a copy per crate.

pub mod caps;
mod error;
mod ifname;
pub mod names;

pub use error::{IoError, error_chain};
pub use ifname::{IfnameError, validate_ifname};

use std::sync::{Mutex, MutexGuard};

/// The calling thread's errno after a failed raw system call (EIO if there is none). It
/// allocates nothing, so a child between clone and exec may call it.
pub fn last_errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// Locks `m`, recovering from a poisoned mutex: a panic in one holder must not take every
/// later user (a VM's other devices, the daemon's other pods) down with it. Callers keep
/// their data consistent across panics (single inserts and removes).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The wall clock in nanoseconds since the Unix epoch, as CRI timestamps carry it; 0 for a
/// clock set before 1970, saturated past the year 2262.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_survives_a_poisoned_mutex() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }

    #[test]
    fn now_ns_is_after_2020() {
        assert!(now_ns() > 1_577_836_800_000_000_000);
    }
}
