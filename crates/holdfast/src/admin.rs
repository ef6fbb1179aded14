//! The admin listener: `/live`, `/ready` (503 while draining), `/metrics`
//! (Prometheus text format, [`metrics`]), `/config` (the effective config with
//! secrets redacted, [`redact`]) and `/pools` (every upstream address with its pool
//! figures, health, and effective idle timeout with where it came from).
//!
//! Loopback by default and on its own port; not meant to face clients.

pub mod metrics;
pub mod redact;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::proxy::Proxy;
use crate::server::ServerState;
use crate::upstream::figures::{CloseReason, RetryReason};
use crate::upstream::peer::HealthState;
use crate::upstream::pool::PoolSnapshot;

/// How long an admin client has to send a request head (scrapers and probes send
/// theirs at once); one that dawdles is cut, so it cannot hold a connection forever.
pub const ADMIN_HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, state: Arc<ServerState>) {
    let mut errors = crate::server::listener::AcceptErrors::new("admin accept");
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                if let Some(pause) = errors.failed(&e) {
                    tokio::time::sleep(pause).await;
                }
                continue;
            }
        };
        errors.accepted();
        let proxy = proxy.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let mut resp = route(&req, &proxy, &state);
                if state.draining.load(Relaxed) || state.handed_over.load(Relaxed) {
                    // A checker's keep-alive connection would go on asking this
                    // process; after an upgrade the new one answers on reconnect.
                    resp.headers_mut().insert(
                        header::CONNECTION,
                        header::HeaderValue::from_static("close"),
                    );
                }
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(ADMIN_HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The admin endpoints, all read-only.
const ENDPOINTS: [&str; 5] = ["/live", "/ready", "/config", "/pools", "/metrics"];

fn route(req: &Request<Incoming>, proxy: &Proxy, state: &ServerState) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    // hyper leaves the body out of a HEAD answer; any other method would be
    // answered as a GET, as if it had done something.
    if !matches!(*req.method(), Method::GET | Method::HEAD) && ENDPOINTS.contains(&path) {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} answers GET and HEAD only\n"),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" if state.draining.load(Relaxed) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        }
        "/ready" => text(StatusCode::OK, "ready\n"),
        "/config" => text(
            StatusCode::OK,
            redact::effective_toml(&proxy.routing().config),
        ),
        "/pools" => json(&pools(proxy)),
        "/metrics" => {
            let mut r = text(StatusCode::OK, metrics::render(proxy, state));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(metrics::CONTENT_TYPE),
            );
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /live, /ready, /metrics, /config, /pools\n",
        ),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json<T: Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot render: {e}\n"),
        ),
    }
}

#[derive(Serialize)]
pub struct UpstreamView {
    pub name: String,
    pub requests: u64,
    pub retries: std::collections::BTreeMap<&'static str, u64>,
    pub retry_budget_exhausted: u64,
    pub addresses: Vec<AddressView>,
}

#[derive(Serialize)]
pub struct AddressView {
    pub address: String,
    pub health: HealthState,
    pub outstanding: usize,
    #[serde(flatten)]
    pub pool: PoolSnapshot,
    pub created: u64,
    pub reused: u64,
    pub stale_caught: u64,
    pub tls_handshakes: u64,
    pub tls_resumed: u64,
    pub queue_timeouts: u64,
    pub queue_full: u64,
    pub closed: std::collections::BTreeMap<&'static str, u64>,
}

/// Every upstream and address with its figures, as `/pools` shows them.
pub fn pools(proxy: &Proxy) -> Vec<UpstreamView> {
    let now = Instant::now();
    proxy
        .routing()
        .upstreams
        .iter()
        .map(|u| UpstreamView {
            name: u.name.to_string(),
            requests: u.figures.requests.load(Relaxed),
            retries: RetryReason::ALL
                .iter()
                .map(|r| (r.as_str(), u.figures.retries(*r)))
                .collect(),
            retry_budget_exhausted: u.figures.retry_budget_exhausted.load(Relaxed),
            addresses: u
                .peers()
                .iter()
                .map(|p| {
                    let f = &p.pool.figures;
                    AddressView {
                        address: p.label.to_string(),
                        health: p.health.state(now),
                        outstanding: p.outstanding(),
                        pool: p.snapshot(),
                        created: f.created.load(Relaxed),
                        reused: f.reused.load(Relaxed),
                        stale_caught: f.stale_caught.load(Relaxed),
                        tls_handshakes: f.tls_handshakes.load(Relaxed),
                        tls_resumed: f.tls_resumed.load(Relaxed),
                        queue_timeouts: f.queue_timeouts.load(Relaxed),
                        queue_full: f.queue_full.load(Relaxed),
                        closed: CloseReason::ALL
                            .iter()
                            .map(|r| (r.as_str(), f.closed_count(*r)))
                            .collect(),
                    }
                })
                .collect(),
        })
        .collect()
}
