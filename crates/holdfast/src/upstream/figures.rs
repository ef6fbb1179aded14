//! Figures kept by the pool and the upstream: plain atomics, read by the admin
//! endpoints. Updating one is a relaxed atomic add; nothing here allocates per request.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde::Serialize;

/// Why a pooled connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Idle past the effective idle timeout.
    IdleExpired,
    /// The upstream closed it (FIN, reset, or stray bytes) while it sat idle.
    ClosedByUpstreamIdle,
    /// The upstream's response said `Connection: close`.
    UpstreamConnectionClose,
    /// `Keep-Alive: timeout=0|1`: the upstream leaves no time to reuse it.
    NotPoolable,
    /// `max_lifetime` reached.
    Lifetime,
    /// `max_requests`, `Keep-Alive: max`, or a learned per-connection limit.
    MaxRequests,
    /// Failed mid-exchange.
    Error,
    /// A deadline fired mid-exchange.
    Timeout,
    /// The client went away or the request was cancelled mid-exchange (also before
    /// the client's side of an upgrade was handed over).
    Abandoned,
    /// Upgraded (`101 Switching Protocols`): its tunnel ended, both sides closed.
    TunnelClosed,
    /// Evicted: idle list full, room needed for a new connection, evidence that
    /// older connections are stale, or the pool is draining.
    Evicted,
    /// HTTP/2: the upstream sent GOAWAY; the connection took no new stream after it.
    GoAway,
}

impl CloseReason {
    pub const ALL: [CloseReason; 12] = [
        CloseReason::IdleExpired,
        CloseReason::ClosedByUpstreamIdle,
        CloseReason::UpstreamConnectionClose,
        CloseReason::NotPoolable,
        CloseReason::Lifetime,
        CloseReason::MaxRequests,
        CloseReason::Error,
        CloseReason::Timeout,
        CloseReason::Abandoned,
        CloseReason::TunnelClosed,
        CloseReason::Evicted,
        CloseReason::GoAway,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::IdleExpired => "idle_expired",
            CloseReason::ClosedByUpstreamIdle => "closed_by_upstream_idle",
            CloseReason::UpstreamConnectionClose => "upstream_connection_close",
            CloseReason::NotPoolable => "not_poolable",
            CloseReason::Lifetime => "lifetime",
            CloseReason::MaxRequests => "max_requests",
            CloseReason::Error => "error",
            CloseReason::Timeout => "timeout",
            CloseReason::Abandoned => "abandoned",
            CloseReason::TunnelClosed => "tunnel_closed",
            CloseReason::Evicted => "evicted",
            CloseReason::GoAway => "goaway",
        }
    }
}

/// Why a request was tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// A reused connection turned out closed before any response byte.
    StaleConnection,
    /// Never sent: connect refused or failed, or the connection was found closed first.
    NotSent,
    /// HTTP/2: the upstream refused the stream (GOAWAY or `REFUSED_STREAM`).
    Refused,
}

impl RetryReason {
    pub const ALL: [RetryReason; 3] = [
        RetryReason::StaleConnection,
        RetryReason::NotSent,
        RetryReason::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::StaleConnection => "stale_connection",
            RetryReason::NotSent => "not_sent",
            RetryReason::Refused => "refused_stream",
        }
    }
}

/// A fixed-bucket histogram of durations, in seconds.
#[derive(Debug)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

/// Upper bounds in seconds (Prometheus `le`), the last bucket is `+Inf`.
pub const BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BUCKETS.len());
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_micros
            .fetch_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    /// Cumulative counts per bucket (the last is the total), and the sum in seconds.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut cumulative = Vec::with_capacity(self.counts.len());
        let mut acc = 0;
        for c in &self.counts {
            acc += c.load(Relaxed);
            cumulative.push(acc);
        }
        HistogramSnapshot {
            cumulative,
            sum_secs: self.sum_micros.load(Relaxed) as f64 / 1e6,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct HistogramSnapshot {
    pub cumulative: Vec<u64>,
    pub sum_secs: f64,
}

impl HistogramSnapshot {
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

/// Per-address pool figures.
#[derive(Debug, Default)]
pub struct PoolFigures {
    pub created: AtomicU64,
    pub reused: AtomicU64,
    closed: [AtomicU64; CloseReason::ALL.len()],
    pub queue_timeouts: AtomicU64,
    pub queue_full: AtomicU64,
    /// Stale connections caught by the pre-use check, before any request was written.
    pub stale_caught: AtomicU64,
    /// TLS handshakes completed, and how many of them resumed an earlier session.
    pub tls_handshakes: AtomicU64,
    pub tls_resumed: AtomicU64,
    pub idle_age_at_reuse: Histogram,
    pub idle_age_at_upstream_close: Histogram,
}

impl PoolFigures {
    pub fn closed(&self, reason: CloseReason) {
        self.closed[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn closed_count(&self, reason: CloseReason) -> u64 {
        self.closed[reason as usize].load(Relaxed)
    }
}

/// Per-upstream figures (retries span addresses).
#[derive(Debug, Default)]
pub struct UpstreamFigures {
    pub requests: AtomicU64,
    retries: [AtomicU64; RetryReason::ALL.len()],
    pub retry_budget_exhausted: AtomicU64,
}

impl UpstreamFigures {
    pub fn retried(&self, reason: RetryReason) {
        self.retries[reason as usize].fetch_add(1, Relaxed);
    }

    pub fn retries(&self, reason: RetryReason) -> u64 {
        self.retries[reason as usize].load(Relaxed)
    }
}
