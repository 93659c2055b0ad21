//! Makes a VM restored from a template snapshot its own: every VM restored from one snapshot
//! resumes with the template's kernel RNG state (so they would all draw the same "random"
//! numbers) and the template's wall clock (stale by however long the snapshot sat on disk).
//! SetupSandbox passes the host's random bytes and wall clock here.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use nix::sys::time::TimeSpec;
use nix::time::{ClockId, clock_gettime, clock_settime};

/// Most random-seed bytes accepted: far more than the CRNG's 256-bit key, little enough to
/// sit on the stack.
pub const MAX_RANDOM_SEED_LEN: usize = 4096;

const NANOS_PER_SEC: i64 = 1_000_000_000;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("random seed of {0} bytes (at most {MAX_RANDOM_SEED_LEN})")]
    SeedTooLong(usize),
    #[error("negative time {0} ns")]
    NegativeTime(i64),
    #[error("open /dev/urandom")]
    OpenUrandom(#[source] io::Error),
    #[error("add {0} bytes of entropy (RNDADDENTROPY)")]
    AddEntropy(usize, #[source] nix::Error),
    #[error("reseed the CRNG (RNDRESEEDCRNG)")]
    Reseed(#[source] nix::Error),
    #[error("read CLOCK_REALTIME")]
    GetClock(#[source] nix::Error),
    #[error("set CLOCK_REALTIME to {0} ns")]
    SetClock(i64, #[source] nix::Error),
}

impl IdentityError {
    /// The request was wrong (as opposed to a failing system call).
    pub fn is_invalid_argument(&self) -> bool {
        matches!(self, Self::SeedTooLong(_) | Self::NegativeTime(_))
    }
}

/// Checks the identity fields of a SetupSandbox request without changing anything.
pub fn validate(random_seed: &[u8], time_unix_nanos: i64) -> Result<(), IdentityError> {
    if random_seed.len() > MAX_RANDOM_SEED_LEN {
        return Err(IdentityError::SeedTooLong(random_seed.len()));
    }
    if time_unix_nanos < 0 {
        return Err(IdentityError::NegativeTime(time_unix_nanos));
    }
    Ok(())
}

/// `struct rand_pool_info` of include/uapi/linux/random.h with a fixed-size buffer (the kernel
/// reads `buf_size` bytes of it).
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MAX_RANDOM_SEED_LEN],
}

// The libc crate does not define the random(4) ioctls; values from include/uapi/linux/random.h.
// RNDADDENTROPY = _IOW('R', 0x03, int[2]): the size encoded is the header's, not the buffer's.
nix::ioctl_write_ptr_bad!(
    rnd_add_entropy,
    nix::request_code_write!(b'R', 0x03, std::mem::size_of::<[libc::c_int; 2]>()),
    RandPoolInfo
);
// RNDRESEEDCRNG = _IO('R', 0x07)
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

/// Mixes `seed` into the kernel's input pool, credits it as entropy (8 bits a byte: the host
/// drew it from its own CRNG) and reseeds the CRNG from the pool, so that what the guest draws
/// from now on depends on `seed`. Needs CAP_SYS_ADMIN.
pub fn mix_random_seed(seed: &[u8]) -> Result<(), IdentityError> {
    if seed.len() > MAX_RANDOM_SEED_LEN {
        return Err(IdentityError::SeedTooLong(seed.len()));
    }
    let mut info = RandPoolInfo {
        // At most 8 * 4096: fits a c_int.
        entropy_count: (seed.len() * 8) as libc::c_int,
        buf_size: seed.len() as libc::c_int,
        buf: [0; MAX_RANDOM_SEED_LEN],
    };
    info.buf[..seed.len()].copy_from_slice(seed);
    let urandom = File::open("/dev/urandom").map_err(IdentityError::OpenUrandom)?;
    // SAFETY: the fd is open for the call; `info` is a live rand_pool_info whose buf holds
    // buf_size (<= its length) bytes, which is all the kernel reads.
    unsafe { rnd_add_entropy(urandom.as_raw_fd(), &info) }
        .map_err(|e| IdentityError::AddEntropy(seed.len(), e))?;
    // SAFETY: the fd is open for the call; this ioctl takes no argument.
    match unsafe { rnd_reseed_crng(urandom.as_raw_fd()) } {
        Ok(_) => {}
        // The CRNG is not initialised yet (a seed under 32 bytes did not complete it): its
        // first real key comes from the pool, which now holds the seed.
        Err(nix::Error::ENODATA) => {
            tracing::warn!(
                bytes = seed.len(),
                "CRNG not ready: random seed left in the pool"
            );
            return Ok(());
        }
        Err(e) => return Err(IdentityError::Reseed(e)),
    }
    tracing::info!(bytes = seed.len(), "random seed mixed in, CRNG reseeded");
    Ok(())
}

/// `unix_nanos` (>= 0) as a timespec.
fn timespec_from_unix_nanos(unix_nanos: i64) -> TimeSpec {
    TimeSpec::new(unix_nanos / NANOS_PER_SEC, unix_nanos % NANOS_PER_SEC)
}

/// Steps CLOCK_REALTIME to `unix_nanos` and returns by how much it moved (nanoseconds,
/// negative when set back). Needs CAP_SYS_TIME.
pub fn step_clock(unix_nanos: i64) -> Result<i128, IdentityError> {
    if unix_nanos < 0 {
        return Err(IdentityError::NegativeTime(unix_nanos));
    }
    let before = clock_gettime(ClockId::CLOCK_REALTIME).map_err(IdentityError::GetClock)?;
    clock_settime(
        ClockId::CLOCK_REALTIME,
        timespec_from_unix_nanos(unix_nanos),
    )
    .map_err(|e| IdentityError::SetClock(unix_nanos, e))?;
    let before_ns =
        i128::from(before.tv_sec()) * i128::from(NANOS_PER_SEC) + i128::from(before.tv_nsec());
    let step_ns = i128::from(unix_nanos) - before_ns;
    // Precision loss is irrelevant for a log line.
    let step_secs = step_ns as f64 / 1e9;
    tracing::info!(step = %format!("{step_secs:+.3}s"), "CLOCK_REALTIME stepped to the host's clock");
    Ok(step_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_rejects_long_seeds_and_negative_times() {
        assert!(validate(&[], 0).is_ok());
        assert!(validate(&[7; MAX_RANDOM_SEED_LEN], 1_700_000_000_000_000_000).is_ok());
        let e = validate(&[7; MAX_RANDOM_SEED_LEN + 1], 0).unwrap_err();
        assert!(matches!(e, IdentityError::SeedTooLong(4097)), "{e:?}");
        assert!(e.is_invalid_argument());
        assert!(e.to_string().contains("4097"), "{e}");
        let e = validate(&[], -1).unwrap_err();
        assert!(matches!(e, IdentityError::NegativeTime(-1)), "{e:?}");
        assert!(e.is_invalid_argument());
        // The syscall wrappers check on their own too.
        assert!(matches!(
            mix_random_seed(&[0; MAX_RANDOM_SEED_LEN + 1]),
            Err(IdentityError::SeedTooLong(_))
        ));
        assert!(matches!(
            step_clock(-5),
            Err(IdentityError::NegativeTime(-5))
        ));
    }

    #[test]
    fn unix_nanos_split_into_seconds_and_nanoseconds() {
        let t = timespec_from_unix_nanos(1_700_000_123_456_789_012);
        assert_eq!((t.tv_sec(), t.tv_nsec()), (1_700_000_123, 456_789_012));
        let t = timespec_from_unix_nanos(999_999_999);
        assert_eq!((t.tv_sec(), t.tv_nsec()), (0, 999_999_999));
    }

    /// Adding entropy to the host's pool is harmless; it needs root (as do these tests).
    #[test]
    fn random_seed_is_mixed_in_and_the_crng_reseeded() {
        let seed: Vec<u8> = (0..=255).cycle().take(MAX_RANDOM_SEED_LEN).collect();
        mix_random_seed(&seed).unwrap();
        mix_random_seed(b"short seed").unwrap();
    }
}
