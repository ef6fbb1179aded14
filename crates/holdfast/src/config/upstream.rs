//! One `[upstream.NAME]`: its addresses, protocol, balancing, and the `pool`,
//! `timeouts`, `tcp`, `retry` and `health` tables, with their defaults.
//!
//! Only the schema lives here; `upstream` and `upstream::pool` give the settings their
//! meaning.

use serde::{Deserialize, Serialize};

use super::defaults;
use super::{
    ByteSize, Dur, HttpVersion, Protocol, UpstreamAddr, UpstreamHttp2Config, UpstreamTlsConfig,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    /// Power of two random choices by outstanding requests.
    LeastOutstanding,
}

/// One `[upstream.NAME]`: a set of addresses and how holdfast talks to them.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// One or more addresses, all of one protocol.
    pub addresses: Vec<UpstreamAddr>,
    /// `auto` (default: over TLS, HTTP/2 or HTTP/1.1 as ALPN picks; HTTP/1.1 over
    /// plain TCP), `"1.1"` or `"2"` (over plain TCP: HTTP/2 with prior knowledge, as
    /// `h2c://` addresses).
    #[serde(default)]
    pub http_version: HttpVersion,
    /// `round_robin` (default) or `least_outstanding`.
    #[serde(default)]
    pub balance: Balance,
    /// `Host` sent upstream: `client` keeps the client's (default), `upstream` uses the
    /// address's host:port, a literal `host[:port]` is sent as written.
    #[serde(default = "defaults::host_header")]
    pub host_header: String,
    /// How often host names in `addresses` are resolved again. Default `30s`.
    #[serde(default = "defaults::resolve_every")]
    pub resolve_every: Dur,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub timeouts: TimeoutConfig,
    #[serde(default)]
    pub tcp: TcpConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub health: HealthConfig,
    /// `[upstream.NAME.tls]`: for `https://` addresses. Default: the system's trust
    /// store, the address's host as the name, no client certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<UpstreamTlsConfig>,
    #[serde(default)]
    pub http2: UpstreamHttp2Config,
}

/// `[upstream.NAME.pool]`: connection reuse, per upstream address.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Most connections open to one address (idle and busy). Default 256.
    pub max_connections: usize,
    /// Most idle connections kept per address. Default 64.
    pub max_idle: usize,
    /// HTTP keep-alive: how long an idle upstream connection is kept for reuse. Lowered
    /// automatically by the upstream's `Keep-Alive: timeout=N` and by observed idle
    /// closes. Default `4s`, below the 5 s that Node.js and Apache use.
    pub idle_timeout: Dur,
    /// Requests per connection before it is retired; `0` means no limit (the
    /// upstream's `Keep-Alive: max=N` still applies). Default 0.
    pub max_requests: u64,
    /// Age after which a connection is retired once its request ends; `0s` is off.
    /// Default `0s`.
    pub max_lifetime: Dur,
    /// Requests that may wait for a connection when `max_connections` are busy; more
    /// get 503 at once. Default 1024.
    pub queue_size: usize,
    /// How long a request waits for a connection before 503. Default `2s`.
    pub queue_timeout: Dur,
    /// Learn from the upstream: lower the idle timeout to what `Keep-Alive: timeout`
    /// announces or what observed idle closes show, and retire connections before an
    /// unannounced per-connection request limit. Default true; `false` exists to show
    /// what the learning prevents.
    pub learn: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_connections: 256,
            max_idle: 64,
            idle_timeout: Dur::secs(4),
            max_requests: 0,
            max_lifetime: Dur::secs(0),
            queue_size: 1024,
            queue_timeout: Dur::secs(2),
            learn: true,
        }
    }
}

/// `[upstream.NAME.timeouts]`. Each one, when it fires, cancels the request, closes
/// its connection and frees its slot; the client gets 504.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutConfig {
    /// TCP connect. Default `5s`.
    pub connect: Dur,
    /// Longest a write of the request may stall; `0s` is off. Default `60s`.
    pub write: Dur,
    /// From request sent to response headers (time to first byte). Default `60s`.
    pub response_headers: Dur,
    /// Longest gap between two chunks of the response body. Default `60s`.
    pub read_idle: Dur,
    /// The whole exchange including the response body; `0s` is off. Default `0s`.
    pub total: Dur,
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        TimeoutConfig {
            connect: Dur::secs(5),
            write: Dur::secs(60),
            response_headers: Dur::secs(60),
            read_idle: Dur::secs(60),
            total: Dur::secs(0),
        }
    }
}

/// `[upstream.NAME.tcp]`: socket options. TCP keepalive probes are kernel packets that
/// detect a dead peer or path; they do not keep an HTTP connection reusable (that is
/// `pool.idle_timeout`, the HTTP keep-alive).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcpConfig {
    /// TCP_NODELAY. Default true.
    pub nodelay: bool,
    /// Send TCP keepalive probes on upstream connections. Default true.
    pub keepalive: bool,
    /// Idle time before the first probe. Default `60s`.
    pub keepalive_idle: Dur,
    /// Time between probes. Default `10s`.
    pub keepalive_interval: Dur,
    /// Unanswered probes before the kernel drops the connection. Default 3.
    pub keepalive_count: u32,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            nodelay: true,
            keepalive: true,
            keepalive_idle: Dur::secs(60),
            keepalive_interval: Dur::secs(10),
            keepalive_count: 3,
        }
    }
}

/// The longest TCP keepalive idle time and interval the kernel takes, in seconds
/// (Linux `MAX_TCP_KEEPIDLE`, `MAX_TCP_KEEPINTVL`).
const MAX_KEEPALIVE_SECS: u64 = 32_767;
/// The most TCP keepalive probes the kernel takes (Linux `MAX_TCP_KEEPCNT`).
const MAX_KEEPALIVE_COUNT: u32 = 127;

impl TcpConfig {
    /// (key below `tcp.`, problem) pairs: values the kernel refuses, which would fail
    /// every connect (the options are set on each new socket, in whole seconds).
    pub(super) fn problems(&self) -> Vec<(&'static str, String)> {
        let mut bad = Vec::new();
        if !self.keepalive {
            return bad;
        }
        for (key, d) in [
            ("keepalive_idle", self.keepalive_idle),
            ("keepalive_interval", self.keepalive_interval),
        ] {
            if !(1..=MAX_KEEPALIVE_SECS).contains(&d.get().as_secs()) {
                bad.push((
                    key,
                    format!("{d} is outside 1s..={MAX_KEEPALIVE_SECS}s (whole seconds)"),
                ));
            }
        }
        if !(1..=MAX_KEEPALIVE_COUNT).contains(&self.keepalive_count) {
            bad.push((
                "keepalive_count",
                format!("must be between 1 and {MAX_KEEPALIVE_COUNT}"),
            ));
        }
        bad
    }
}

/// `[upstream.NAME.retry]`: retries happen only when provably safe.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Tries per request, the first included; 1 turns retries off. Default 3.
    pub attempts: u32,
    /// Request bodies up to this size are kept so a retry can send them again.
    /// Default `64KiB`.
    pub replay_body_limit: ByteSize,
    /// Retries allowed as a share of requests. Default 0.2.
    pub budget_ratio: f64,
    /// Retries always allowed per second on top of the ratio. Default 10.
    pub budget_min_per_second: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 3,
            replay_body_limit: ByteSize::kib(64),
            budget_ratio: 0.2,
            budget_min_per_second: 10,
        }
    }
}

/// `[upstream.NAME.health]`: passive health from real requests.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Consecutive failures (connect refused or timed out, a failed TLS handshake,
    /// garbage instead of a response) that eject an address. A reset or a stale pooled
    /// connection never counts. Default 5.
    pub max_fails: u32,
    /// First ejection time; doubles on each ejection in a row. Default `5s`.
    pub eject_for: Dur,
    /// Longest ejection. Default `60s`.
    pub eject_max: Dur,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            max_fails: 5,
            eject_for: Dur::secs(5),
            eject_max: Dur::secs(60),
        }
    }
}

impl UpstreamConfig {
    /// An upstream with every default, for the one-line `proxy` command and tests.
    pub fn new(addresses: Vec<UpstreamAddr>) -> Self {
        UpstreamConfig {
            addresses,
            balance: Balance::default(),
            host_header: defaults::host_header(),
            resolve_every: defaults::resolve_every(),
            pool: PoolConfig::default(),
            timeouts: TimeoutConfig::default(),
            tcp: TcpConfig::default(),
            retry: RetryConfig::default(),
            health: HealthConfig::default(),
            http_version: HttpVersion::default(),
            tls: None,
            http2: UpstreamHttp2Config::default(),
        }
    }

    pub fn protocol(&self) -> Protocol {
        self.addresses
            .first()
            .map_or(Protocol::Http1, |a| a.protocol)
    }

    /// Whether the addresses are `https://`.
    pub fn uses_tls(&self) -> bool {
        self.addresses.first().is_some_and(|a| a.tls)
    }

    /// The HTTP version spoken, after `h2c://` and `http_version` are combined.
    pub fn effective_http_version(&self) -> HttpVersion {
        match (self.protocol(), self.http_version, self.uses_tls()) {
            (Protocol::Http2, _, _) => HttpVersion::Http2,
            (_, HttpVersion::Auto, false) => HttpVersion::Http1,
            (_, v, _) => v,
        }
    }
}
