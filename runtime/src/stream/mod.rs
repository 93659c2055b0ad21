//! The CRI streaming server: the HTTP endpoint kubelet redirects `exec`, `attach` and
//! `port-forward` to, and the protocols spoken over its upgraded connections.
//!
//! - [`spdy`]: SPDY/3.1 sessions, as Kubernetes' `httpstream/spdy` speaks them.

pub mod spdy;
