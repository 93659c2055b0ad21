//! Single-use tokens for streaming URLs, as kubelet's streaming server hands them out: an
//! Exec, Attach or PortForward RPC stores its validated request under a random token and
//! answers the URL; the first connection to it takes the request, later ones and those
//! after the token expired get 404.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use podvisor_common::lock;

/// How long a token stays valid (kubelet's and containerd's one minute).
pub const TOKEN_TTL: Duration = Duration::from_secs(60);
/// The most tokens waiting at once: a flood of RPCs that never connect cannot grow the
/// cache without bound (kubelet's cache holds 1000).
pub const MAX_PENDING: usize = 1000;
/// Random bytes in a token: 128 bits.
const TOKEN_BYTES: usize = 16;

/// Why a token could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// [`MAX_PENDING`] tokens wait and none has expired.
    #[error("{MAX_PENDING} streaming requests are waiting for their connection; try again later")]
    Full,
    /// The kernel's random source failed.
    #[error("read /dev/urandom")]
    Random(#[source] std::io::Error),
}

/// Pending requests by token.
#[derive(Debug)]
pub struct Tokens<T> {
    ttl: Duration,
    pending: Mutex<HashMap<String, (Instant, T)>>,
}

impl<T> Tokens<T> {
    /// An empty cache whose tokens live `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// Stores `request` under a new token.
    pub fn insert(&self, request: T) -> Result<String, TokenError> {
        let token = new_token()?;
        let now = Instant::now();
        let mut pending = lock(&self.pending);
        if pending.len() >= MAX_PENDING {
            pending.retain(|_, (expires, _)| *expires > now);
        }
        if pending.len() >= MAX_PENDING {
            return Err(TokenError::Full);
        }
        pending.insert(token.clone(), (now + self.ttl, request));
        Ok(token)
    }

    /// Takes the request stored under `token`: `None` when it is unknown, already taken or
    /// expired.
    pub fn take(&self, token: &str) -> Option<T> {
        let (expires, request) = lock(&self.pending).remove(token)?;
        (Instant::now() < expires).then_some(request)
    }

    /// Requests waiting (expired ones included until they are pruned).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Whether none waits.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A new random token: [`TOKEN_BYTES`] random bytes in hex.
fn new_token() -> Result<String, TokenError> {
    let mut raw = [0u8; TOKEN_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .map_err(TokenError::Random)?;
    Ok(hex::encode(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_taken_once() {
        let t = Tokens::new(TOKEN_TTL);
        let a = t.insert(1).unwrap();
        let b = t.insert(2).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(t.take(&b), Some(2));
        assert_eq!(t.take(&b), None, "reused");
        assert_eq!(t.take("forged"), None);
        assert_eq!(t.take(&a), Some(1));
        assert!(t.is_empty());
    }

    #[test]
    fn tokens_expire_and_the_cache_is_bounded() {
        let t = Tokens::new(Duration::ZERO);
        let a = t.insert(1).unwrap();
        assert_eq!(t.take(&a), None, "expired");
        for i in 0..MAX_PENDING + 10 {
            t.insert(i).unwrap();
        }
        assert!(
            t.len() <= MAX_PENDING,
            "expired tokens are pruned when full"
        );

        let t = Tokens::new(TOKEN_TTL);
        for i in 0..MAX_PENDING {
            t.insert(i).unwrap();
        }
        assert!(matches!(t.insert(0), Err(TokenError::Full)));
    }
}
