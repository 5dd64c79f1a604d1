//! Bandwidth, counters and rate-limited logging of the proxy.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket shared by every connection of a sandbox. Tokens are
/// bytes; a transfer may drive the bucket negative and then waits until it
/// has refilled, so the rate holds on average over about a second.
pub(crate) struct Bandwidth {
    bytes_per_sec: u64,
    state: Mutex<(f64, Instant)>,
}

impl Bandwidth {
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1),
            state: Mutex::new((bytes_per_sec as f64, Instant::now())),
        }
    }

    /// Takes `bytes` from the bucket, waiting while it is in debt.
    pub async fn take(&self, bytes: usize) {
        let rate = self.bytes_per_sec as f64;
        let wait = {
            let mut state = self.state.lock().unwrap();
            let (tokens, last) = &mut *state;
            let now = Instant::now();
            *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate);
            *last = now;
            *tokens -= bytes as f64;
            if *tokens < 0.0 {
                Duration::from_secs_f64(-*tokens / rate)
            } else {
                Duration::ZERO
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Counters of one sandbox's network traffic.
#[derive(Default)]
pub(crate) struct Counters {
    pub connections: AtomicU64,
    pub blocked: AtomicU64,
    pub dials: AtomicU64,
    pub bytes_out: AtomicU64,
    pub bytes_in: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> NetworkStats {
        NetworkStats {
            connections: self.connections.load(Ordering::Relaxed),
            blocked: self.blocked.load(Ordering::Relaxed),
            dials: self.dials.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
        }
    }
}

/// Network counters of a sandbox since it started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetworkStats {
    /// Connections the guest opened to the proxy, DNS included.
    pub connections: u64,
    /// Connections and DNS names the policy blocked.
    pub blocked: u64,
    /// Outbound connections the host attempted for the guest.
    pub dials: u64,
    /// Bytes sent from the guest to remote servers.
    pub bytes_out: u64,
    /// Bytes received from remote servers for the guest.
    pub bytes_in: u64,
}

/// Log lines about blocked connections allowed per window.
const LOG_BURST: u32 = 5;
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// Logs blocked connections at most [`LOG_BURST`] times per
/// [`LOG_WINDOW`], because a guest can trigger them in a loop. The next
/// line logged says how many were left out.
pub(crate) struct BlockLog {
    sandbox: String,
    state: Mutex<(Instant, u32, u64)>,
}

impl BlockLog {
    pub fn new(sandbox: &str) -> Self {
        Self {
            sandbox: sandbox.to_string(),
            state: Mutex::new((Instant::now(), 0, 0)),
        }
    }

    pub fn blocked(&self, destination: &str, reason: &dyn std::fmt::Display) {
        let suppressed = {
            let mut state = self.state.lock().unwrap();
            let (window, logged, suppressed) = &mut *state;
            if window.elapsed() >= LOG_WINDOW {
                *window = Instant::now();
                *logged = 0;
            }
            if *logged >= LOG_BURST {
                *suppressed += 1;
                return;
            }
            *logged += 1;
            std::mem::take(suppressed)
        };
        tracing::info!(
            sandbox = %self.sandbox,
            destination,
            suppressed,
            "network connection blocked: {reason}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bandwidth_waits_for_debt() {
        let bucket = Bandwidth::new(1000);
        let start = tokio::time::Instant::now();
        bucket.take(1000).await;
        assert!(start.elapsed() < Duration::from_millis(10));
        bucket.take(500).await;
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(450), "{waited:?}");
    }

    #[test]
    fn block_log_counts_suppressed_lines() {
        let log = BlockLog::new("sb-test");
        for _ in 0..(LOG_BURST + 3) {
            log.blocked("x.example:443", &"denied");
        }
        assert_eq!(log.state.lock().unwrap().2, 3);
    }
}
