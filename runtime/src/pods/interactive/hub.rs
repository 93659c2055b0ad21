//! The fanout of a container's output to its attach sessions.
//!
//! The guest agent allows one ProcessIo attachment per process, and podvisord's log writer
//! (`supervise`) holds the container's. Its pump [`AttachHub::publish`]es every chunk it
//! writes to the log to the current subscribers, each a bounded channel of
//! [`SUBSCRIBER_BUFFER`] chunks filled with `try_send`: the log writer never waits for an
//! attacher. A subscriber whose channel is full is dropped whole (its session ends with
//! ResourceExhausted) rather than losing chunks in the middle of its stream, which would
//! garble a terminal without a word; the log keeps every byte either way. Each subscriber
//! sees the output from when it subscribed on; none of what came before.
//!
//! The pump also [`AttachHub::connect`]s the input side of its ProcessIo stream, so attach
//! sessions' stdin reaches the container ([`AttachHub::input`]). When the container's
//! output ends the pump [`AttachHub::end`]s the hub: subscribers' channels close (their
//! sessions end) and later subscriptions are refused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use podvisor_common::lock;
use podvisor_proto::v1 as agent;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::logs::Stream;

/// Output chunks buffered per attach session before it is dropped as too slow (the agent's
/// chunks are at most 32 KiB: at most 8 MiB per session).
pub(in crate::pods) const SUBSCRIBER_BUFFER: usize = 256;

/// One chunk of a container's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::pods) struct Chunk {
    /// Which stream.
    pub stream: Stream,
    /// The bytes.
    pub data: Bytes,
}

/// A container's output fanout and stdin input; see the module's documentation.
#[derive(Debug, Default)]
pub(in crate::pods) struct AttachHub {
    state: Mutex<HubState>,
}

#[derive(Debug, Default)]
struct HubState {
    /// The input side of the log writer's ProcessIo stream, once connected.
    input: Option<mpsc::Sender<agent::ProcessInput>>,
    subscribers: Vec<Subscriber>,
    /// The container's output ended (or could not be attached to).
    ended: bool,
    /// `stdin_once` closed the container's stdin already.
    stdin_closed: bool,
}

#[derive(Debug)]
struct Subscriber {
    tx: mpsc::Sender<Chunk>,
    dropped: Arc<AtomicBool>,
}

/// One attach session's view of the output.
#[derive(Debug)]
pub(in crate::pods) struct Subscription {
    rx: mpsc::Receiver<Chunk>,
    dropped: Arc<AtomicBool>,
}

/// How a subscription's output ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(in crate::pods) enum Ended {
    /// The container's output ended.
    Output,
    /// The session could not keep up and was dropped.
    TooSlow,
}

impl Subscription {
    /// The next chunk, or how the output ended for this session.
    pub async fn next(&mut self) -> Result<Chunk, Ended> {
        match self.rx.recv().await {
            Some(c) => Ok(c),
            None if self.dropped.load(Ordering::SeqCst) => Err(Ended::TooSlow),
            None => Err(Ended::Output),
        }
    }
}

impl AttachHub {
    /// The log writer attached to the container's output; `input` is its stream's input
    /// side (stdin data and `close_stdin` for the container).
    pub fn connect(&self, input: mpsc::Sender<agent::ProcessInput>) {
        lock(&self.state).input = Some(input);
    }

    /// Hands one output chunk to every subscriber without waiting; a subscriber that is
    /// full is dropped, one that went away forgotten.
    pub fn publish(&self, stream: Stream, data: &Bytes) {
        let mut st = lock(&self.state);
        st.subscribers.retain(|s| {
            let chunk = Chunk {
                stream,
                data: data.clone(),
            };
            match s.tx.try_send(chunk) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    tracing::warn!(
                        "an attach session fell {SUBSCRIBER_BUFFER} chunks behind the \
                         container's output; it is dropped"
                    );
                    s.dropped.store(true, Ordering::SeqCst);
                    false
                }
                Err(TrySendError::Closed(_)) => false,
            }
        });
    }

    /// The container's output ended: every session's output ends and no one can subscribe
    /// any more; the input side is dropped.
    pub fn end(&self) {
        let mut st = lock(&self.state);
        st.ended = true;
        st.subscribers.clear();
        st.input = None;
    }

    /// A new session's view of the output from now on; `None` once the output ended.
    pub fn subscribe(&self) -> Option<Subscription> {
        let mut st = lock(&self.state);
        if st.ended {
            return None;
        }
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let dropped = Arc::new(AtomicBool::new(false));
        st.subscribers.push(Subscriber {
            tx,
            dropped: dropped.clone(),
        });
        Some(Subscription { rx, dropped })
    }

    /// Where stdin for the container goes; `None` before the log writer attached or after
    /// the output ended.
    pub fn input(&self) -> Option<mpsc::Sender<agent::ProcessInput>> {
        lock(&self.state).input.clone()
    }

    /// For `stdin_once`: the first call (while connected) returns where to send the
    /// container's `close_stdin`; later calls return `None`.
    pub fn take_stdin_close(&self) -> Option<mpsc::Sender<agent::ProcessInput>> {
        let mut st = lock(&self.state);
        if st.stdin_closed {
            return None;
        }
        let input = st.input.clone()?;
        st.stdin_closed = true;
        Some(input)
    }

    /// How many sessions are subscribed (for tests and logs).
    #[cfg(test)]
    pub fn subscribers(&self) -> usize {
        lock(&self.state).subscribers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[tokio::test]
    async fn every_subscriber_gets_the_output_from_when_it_subscribed() {
        let hub = AttachHub::default();
        let mut first = hub.subscribe().unwrap();
        hub.publish(Stream::Stdout, &b("one"));
        let mut second = hub.subscribe().unwrap();
        hub.publish(Stream::Stderr, &b("two"));
        hub.end();
        let chunk = |stream, s| Chunk { stream, data: b(s) };
        assert_eq!(first.next().await, Ok(chunk(Stream::Stdout, "one")));
        assert_eq!(first.next().await, Ok(chunk(Stream::Stderr, "two")));
        assert_eq!(first.next().await, Err(Ended::Output));
        assert_eq!(second.next().await, Ok(chunk(Stream::Stderr, "two")));
        assert_eq!(second.next().await, Err(Ended::Output));
        assert!(hub.subscribe().is_none(), "no subscription after the end");
    }

    #[tokio::test]
    async fn a_stalled_subscriber_is_dropped_without_stalling_the_others() {
        let hub = AttachHub::default();
        let mut stalled = hub.subscribe().unwrap();
        let mut reader = hub.subscribe().unwrap();
        // publish never waits: this would hang if a full subscriber held it up.
        for n in 0..SUBSCRIBER_BUFFER * 3 {
            hub.publish(Stream::Stdout, &Bytes::from(n.to_string()));
            let got = reader.next().await.unwrap();
            assert_eq!(got.data, Bytes::from(n.to_string()));
        }
        assert_eq!(hub.subscribers(), 1, "the stalled one is gone");
        for _ in 0..SUBSCRIBER_BUFFER {
            stalled.next().await.unwrap();
        }
        assert_eq!(stalled.next().await, Err(Ended::TooSlow));
    }

    #[tokio::test]
    async fn a_subscriber_that_went_away_is_forgotten() {
        let hub = AttachHub::default();
        drop(hub.subscribe().unwrap());
        hub.publish(Stream::Stdout, &b("x"));
        assert_eq!(hub.subscribers(), 0);
    }

    #[tokio::test]
    async fn stdin_is_closed_once() {
        let hub = AttachHub::default();
        assert!(hub.take_stdin_close().is_none(), "not connected yet");
        let (tx, _rx) = mpsc::channel(1);
        hub.connect(tx);
        assert!(hub.input().is_some());
        assert!(hub.take_stdin_close().is_some());
        assert!(hub.take_stdin_close().is_none());
        hub.end();
        assert!(hub.input().is_none());
    }
}
