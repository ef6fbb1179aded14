//! `/metrics`: every figure holdfast keeps, in the Prometheus text exposition format
//! (version 0.0.4).
//!
//! Names follow the Prometheus conventions: a `holdfast_` prefix, base units in the
//! name (`_seconds`), `_total` on counters, one family's samples together under its
//! `# HELP` and `# TYPE`. The request path never touches this module: it bumps plain
//! atomics ([`crate::proxy::figures`], [`crate::upstream::figures`]) and this module
//! reads them when scraped.
//!
//! The encoder is written by hand rather than with the `prometheus-client` crate: the
//! figures already live in atomics owned by the pools and routes, and that crate wants
//! its own metric types in a registry (its label families sit behind a lock on the
//! recording side), so it would add a copy step and a dependency for ~100 lines of
//! formatting (`metrics/text.rs`).

mod text;

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use tokio::time::Instant;

use crate::config::{HttpVersion, Protocol};
use crate::proxy::Proxy;
use crate::proxy::figures::{RouteCell, STATUS_CLASSES};
use crate::server::ServerState;
use crate::upstream::figures::{CloseReason, RetryReason};
use crate::upstream::peer::{HealthState, Peer};
use crate::upstream::pool::PoolSnapshot;

use self::text::{Kind, Text};

/// The `Content-Type` of the exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

const HEALTH_STATES: [(HealthState, &str); 3] = [
    (HealthState::Healthy, "healthy"),
    (HealthState::Ejected, "ejected"),
    (HealthState::Probation, "probation"),
];

/// Every metric, as `/metrics` serves it.
pub fn render(proxy: &Proxy, state: &ServerState) -> String {
    let routing = proxy.routing();
    let mut t = Text::default();

    // === process ===
    t.family(
        "holdfast_build_info",
        Kind::Gauge,
        "Always 1; the version holdfast was built from.",
    );
    t.sample(
        "holdfast_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1,
    );
    t.single(
        "holdfast_draining",
        Kind::Gauge,
        "1 while the server drains (/ready answers 503), else 0.",
        u64::from(state.draining.load(Relaxed)),
    );
    t.single(
        "holdfast_reloads_total",
        Kind::Counter,
        "Config reloads applied.",
        state.reloads.load(Relaxed),
    );
    t.single(
        "holdfast_reload_failures_total",
        Kind::Counter,
        "Config reloads refused (the new config did not load; the old one stays).",
        state.reload_failures.load(Relaxed),
    );
    t.single(
        "holdfast_upgrades_total",
        Kind::Counter,
        "Binary upgrades handed over to a new process.",
        state.upgrades.load(Relaxed),
    );
    t.single(
        "holdfast_upgrade_failures_total",
        Kind::Counter,
        "Binary upgrades that failed (this process kept serving).",
        state.upgrade_failures.load(Relaxed),
    );

    // === client connections ===
    t.single(
        "holdfast_client_connections",
        Kind::Gauge,
        "Client connections open now (including ones being closed).",
        state.clients.open() as u64,
    );
    t.single(
        "holdfast_client_parked_connections",
        Kind::Gauge,
        "Idle HTTP/1 client connections parked now (hyper's buffers freed until the \
         client sends again); they count in holdfast_client_connections too.",
        state.clients.parked() as u64,
    );
    let clients = state.clients.figures();
    t.single(
        "holdfast_client_connections_total",
        Kind::Counter,
        "Client connections accepted.",
        clients.accepted.load(Relaxed),
    );
    t.family(
        "holdfast_client_errors_total",
        Kind::Counter,
        "Client connections ended for the client's fault: malformed (a request refused \
         with 400 or 431), head_timeout (no complete request head within header_timeout), \
         tls_handshake (failed or too slow), http2_abuse (GOAWAY ENHANCE_YOUR_CALM).",
    );
    for (kind, n) in [
        ("malformed", &clients.malformed),
        ("head_timeout", &clients.head_timeout),
        ("tls_handshake", &clients.tls_handshake),
        ("http2_abuse", &clients.http2_abuse),
    ] {
        t.sample(
            "holdfast_client_errors_total",
            &[("kind", kind)],
            n.load(Relaxed),
        );
    }

    // === routes ===
    let mut routes: Vec<(String, &RouteCell)> = routing
        .figures
        .routes
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("route[{i}]"), &**c))
        .collect();
    routes.push(("none".to_owned(), &*routing.figures.unrouted));
    t.family(
        "holdfast_route_info",
        Kind::Gauge,
        "Always 1; what each route label stands for.",
    );
    for (i, r) in routing.config.routes.iter().enumerate() {
        t.sample(
            "holdfast_route_info",
            &[
                ("route", &format!("route[{i}]")),
                ("host", r.host.as_deref().unwrap_or("")),
                ("path", &r.path),
                ("upstream", r.upstream.get_ref()),
            ],
            1,
        );
    }
    t.family(
        "holdfast_requests_total",
        Kind::Counter,
        "Client requests answered, by route (`none`: no route matched) and status class.",
    );
    for (route, cell) in &routes {
        for (i, class) in STATUS_CLASSES.iter().enumerate() {
            t.sample(
                "holdfast_requests_total",
                &[("route", route), ("class", class)],
                cell.requests(i),
            );
        }
    }
    t.family(
        "holdfast_request_duration_seconds",
        Kind::Histogram,
        "From a request's head to the end of its response, by route.",
    );
    for (route, cell) in &routes {
        t.histogram(
            "holdfast_request_duration_seconds",
            &[("route", route)],
            &cell.duration.snapshot(),
        );
    }
    t.family(
        "holdfast_upstream_time_to_first_byte_seconds",
        Kind::Histogram,
        "From sending a request upstream to its response head, by route.",
    );
    for (route, cell) in &routes {
        t.histogram(
            "holdfast_upstream_time_to_first_byte_seconds",
            &[("route", route)],
            &cell.upstream_ttfb.snapshot(),
        );
    }

    // === upstreams ===
    let upstreams: Vec<_> = routing.upstreams.iter().collect();
    t.family(
        "holdfast_upstream_info",
        Kind::Gauge,
        "Always 1; each upstream's protocol.",
    );
    for u in &upstreams {
        let protocol = match (u.config.protocol(), u.config.effective_http_version()) {
            (Protocol::FastCgi, _) => "fastcgi",
            (_, HttpVersion::Http2) => "http2",
            (_, HttpVersion::Auto) => "http_alpn",
            (_, HttpVersion::Http1) => "http1",
        };
        t.sample(
            "holdfast_upstream_info",
            &[("upstream", &u.name), ("protocol", protocol)],
            1,
        );
    }
    t.family(
        "holdfast_upstream_requests_total",
        Kind::Counter,
        "Requests forwarded to each upstream (retries not counted again).",
    );
    for u in &upstreams {
        t.sample(
            "holdfast_upstream_requests_total",
            &[("upstream", &u.name)],
            u.figures.requests.load(Relaxed),
        );
    }
    t.family(
        "holdfast_upstream_retries_total",
        Kind::Counter,
        "Requests tried again on a new connection, by reason.",
    );
    for u in &upstreams {
        for r in RetryReason::ALL {
            t.sample(
                "holdfast_upstream_retries_total",
                &[("upstream", &u.name), ("reason", r.as_str())],
                u.figures.retries(r),
            );
        }
    }
    t.family(
        "holdfast_upstream_retry_budget_exhausted_total",
        Kind::Counter,
        "Retries that were safe but refused because the retry budget was spent.",
    );
    for u in &upstreams {
        t.sample(
            "holdfast_upstream_retry_budget_exhausted_total",
            &[("upstream", &u.name)],
            u.figures.retry_budget_exhausted.load(Relaxed),
        );
    }

    // === addresses and their pools ===
    let now = Instant::now();
    let addresses: Vec<Address> = upstreams
        .iter()
        .flat_map(|u| {
            u.peers()
                .iter()
                .map(|p| Address {
                    upstream: u.name.to_string(),
                    peer: p.clone(),
                    pool: p.pool.snapshot(),
                    health: p.health.state(now),
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let gauges: [PerAddress; 6] = [
        (
            "holdfast_upstream_outstanding_requests",
            "Requests in flight to the address.",
            |a| a.peer.outstanding() as u64,
        ),
        (
            "holdfast_pool_open_connections",
            "Connections open to the address, idle or in use.",
            |a| a.pool.open as u64,
        ),
        (
            "holdfast_pool_idle_connections",
            "Idle connections kept for reuse.",
            |a| a.pool.idle as u64,
        ),
        (
            "holdfast_pool_in_use_connections",
            "Connection slots taken by requests (connecting or in use).",
            |a| a.pool.in_use as u64,
        ),
        (
            "holdfast_pool_waiting_requests",
            "Requests queued for a connection slot.",
            |a| a.pool.waiting as u64,
        ),
        (
            "holdfast_pool_max_connections",
            "The connection cap in force (config, or lower if a FastCGI application asked).",
            |a| a.pool.max_connections as u64,
        ),
    ];
    for (name, help, get) in gauges {
        t.family(name, Kind::Gauge, help);
        for a in &addresses {
            t.sample(name, &a.labels(), get(a));
        }
    }
    t.family(
        "holdfast_upstream_health",
        Kind::Gauge,
        "1 for the address's passive health state, 0 for the others.",
    );
    for a in &addresses {
        for (s, name) in HEALTH_STATES {
            let [u, ad] = a.labels();
            t.sample(
                "holdfast_upstream_health",
                &[u, ad, ("state", name)],
                u64::from(a.health == s),
            );
        }
    }
    let counters: [PerAddress; 5] = [
        (
            "holdfast_pool_connections_created_total",
            "Connections opened.",
            |a| a.peer.pool.figures.created.load(Relaxed),
        ),
        (
            "holdfast_pool_connections_reused_total",
            "Requests sent on an idle connection rather than a new one.",
            |a| a.peer.pool.figures.reused.load(Relaxed),
        ),
        (
            "holdfast_pool_stale_caught_total",
            "Idle connections found closed by the check before use, before any request was written.",
            |a| a.peer.pool.figures.stale_caught.load(Relaxed),
        ),
        (
            "holdfast_pool_queue_timeouts_total",
            "Requests that waited queue_timeout for a slot and got 503.",
            |a| a.peer.pool.figures.queue_timeouts.load(Relaxed),
        ),
        (
            "holdfast_pool_queue_full_total",
            "Requests refused at once because the wait queue was full.",
            |a| a.peer.pool.figures.queue_full.load(Relaxed),
        ),
    ];
    for (name, help, get) in counters {
        t.family(name, Kind::Counter, help);
        for a in &addresses {
            t.sample(name, &a.labels(), get(a));
        }
    }
    t.family(
        "holdfast_pool_connections_closed_total",
        Kind::Counter,
        "Connections closed, by reason.",
    );
    for a in &addresses {
        for r in CloseReason::ALL {
            let [u, ad] = a.labels();
            t.sample(
                "holdfast_pool_connections_closed_total",
                &[u, ad, ("reason", r.as_str())],
                a.peer.pool.figures.closed_count(r),
            );
        }
    }
    let histograms: [PerAddressHistogram; 2] = [
        (
            "holdfast_pool_idle_age_at_reuse_seconds",
            "How long a connection had been idle when a request reused it.",
            |a| &a.peer.pool.figures.idle_age_at_reuse,
        ),
        (
            "holdfast_pool_idle_age_at_upstream_close_seconds",
            "How long a connection had been idle when the upstream closed it.",
            |a| &a.peer.pool.figures.idle_age_at_upstream_close,
        ),
    ];
    for (name, help, get) in histograms {
        t.family(name, Kind::Histogram, help);
        for a in &addresses {
            t.histogram(name, &a.labels(), &get(a).snapshot());
        }
    }
    t.family(
        "holdfast_pool_idle_timeout_seconds",
        Kind::Gauge,
        "Effective idle timeout; `source` says where it comes from (config, keep_alive_header, observed).",
    );
    for a in &addresses {
        let [u, ad] = a.labels();
        t.sample_f64(
            "holdfast_pool_idle_timeout_seconds",
            &[u, ad, ("source", a.pool.idle_timeout_source.as_str())],
            a.pool.effective_idle_timeout.as_secs_f64(),
        );
    }
    t.family(
        "holdfast_pool_learned_max_requests",
        Kind::Gauge,
        "Requests per connection learned from an upstream that closes after a fixed number without saying so (absent until learned).",
    );
    for a in &addresses {
        if let Some(n) = a.pool.learned_max_requests {
            t.sample("holdfast_pool_learned_max_requests", &a.labels(), n);
        }
    }

    // === FastCGI ===
    let fastcgi: [PerFastCgi; 2] = [
        (
            "holdfast_fastcgi_max_conns",
            "FCGI_MAX_CONNS the FastCGI application announced (absent until asked or if it did not say).",
            |v| v.max_conns.map(u64::from),
        ),
        (
            "holdfast_fastcgi_max_reqs",
            "FCGI_MAX_REQS the FastCGI application announced.",
            |v| v.max_reqs.map(u64::from),
        ),
    ];
    for (name, help, get) in fastcgi {
        t.family(name, Kind::Gauge, help);
        for a in &addresses {
            if let Some(n) = a.peer.fastcgi_values().and_then(get) {
                t.sample(name, &a.labels(), n);
            }
        }
    }
    t.out
}

/// A per-address family: name, help, and how to read its value.
type PerAddress = (&'static str, &'static str, fn(&Address) -> u64);
type PerAddressHistogram = (
    &'static str,
    &'static str,
    fn(&Address) -> &crate::upstream::figures::Histogram,
);
/// A FastCGI family: name, help, and which announced value it shows.
type PerFastCgi = (
    &'static str,
    &'static str,
    fn(&holdfast_fastcgi::ServerValues) -> Option<u64>,
);

struct Address {
    upstream: String,
    peer: Arc<Peer>,
    pool: PoolSnapshot,
    health: HealthState,
}

impl Address {
    fn labels(&self) -> [(&str, &str); 2] {
        [("upstream", &self.upstream), ("address", &self.peer.label)]
    }
}
