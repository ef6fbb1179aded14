//! One client connection: HTTP/1.1 by hyper, and holdfast's own rules for when the
//! connection may end.
//!
//! An HTTP/1.1 server that closes an idle connection races a client that is just
//! sending on it (RFC 9112 9.5). holdfast narrows that race:
//! - it advertises `Keep-Alive: timeout=N`, a margin below its real idle timeout, so
//!   clients that honour it retire the connection first;
//! - it never closes a connection that went idle less than `keepalive_min_idle` ago,
//!   nor one whose next request has started arriving;
//! - it closes with a half-close, then reads and discards for a short linger, so a
//!   client still sending gets a FIN and not a reset that would destroy a response
//!   already on its way.
//!
//! In a drain, each response carries `Connection: close`; a connection that stays
//! idle is closed after `drain.idle_close_after` (or the advertised timeout if
//! shorter). hyper's own header-read timer is off: it also runs between requests,
//! which would cut idle keep-alive connections; holdfast times the head itself.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::HeaderValue;
use http::header;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

mod io;

use self::io::ClientIo;
use super::drain::{DrainWatch, Tracked};
use crate::config::{DrainConfig, ListenerConfig};
use crate::proxy::{ConnContext, Proxy};

/// How long a closing connection keeps reading (and discarding) what the client
/// still sends, so the close is a FIN and never a reset.
pub(super) const LINGER: Duration = Duration::from_secs(2);

/// Settings and shared parts of one listener, built once.
pub struct ListenerShared {
    pub proxy: Arc<Proxy>,
    pub config: Arc<ListenerConfig>,
    pub drain: DrainConfig,
    http1: hyper::server::conn::http1::Builder,
    /// `Keep-Alive: timeout=N` sent on responses, N a margin below the real timeout.
    keep_alive: Option<HeaderValue>,
    advertised: Option<Duration>,
}

impl ListenerShared {
    pub fn new(proxy: Arc<Proxy>, config: ListenerConfig, drain: DrainConfig) -> Self {
        let mut http1 = hyper::server::conn::http1::Builder::new();
        let max_head = config.max_header_bytes.as_usize();
        http1
            .keep_alive(true)
            .half_close(false)
            .header_read_timeout(None)
            .max_header_size(max_head)
            // hyper requires at least 8 KiB of read buffer.
            .max_buf_size(max_head.max(8192) + 1024);
        let advertised = advertised_timeout(config.keepalive_timeout.get());
        let keep_alive =
            advertised.and_then(|d| HeaderValue::try_from(format!("timeout={}", d.as_secs())).ok());
        ListenerShared {
            proxy,
            config: Arc::new(config),
            drain,
            http1,
            keep_alive,
            advertised,
        }
    }
}

/// The timeout holdfast promises clients: a margin below the real one for
/// round-trip time and timer slack; `None` when too short to promise anything.
fn advertised_timeout(real: Duration) -> Option<Duration> {
    let margin = (real / 10).max(Duration::from_secs(1));
    let secs = real.saturating_sub(margin).as_secs();
    (secs >= 1).then(|| Duration::from_secs(secs))
}

/// Where the connection is between requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum ConnPhase {
    /// Waiting for (the rest of) a request head.
    Reading = 0,
    /// A request is being served.
    Busy = 1,
    /// Between requests, nothing received yet.
    Idle = 2,
}

/// What the connection task and the request path share.
pub struct ConnState {
    phase: AtomicU8,
    /// When the phase began, in ms since [`clock_base`].
    since_ms: AtomicU64,
    draining: AtomicBool,
    requests: AtomicU64,
}

fn clock_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    Instant::now()
        .saturating_duration_since(clock_base())
        .as_millis() as u64
}

impl ConnState {
    fn new() -> Self {
        ConnState {
            phase: AtomicU8::new(ConnPhase::Reading as u8),
            since_ms: AtomicU64::new(now_ms()),
            draining: AtomicBool::new(false),
            requests: AtomicU64::new(0),
        }
    }

    fn set(&self, phase: ConnPhase) {
        self.since_ms.store(now_ms(), Relaxed);
        self.phase.store(phase as u8, Relaxed);
    }

    fn phase(&self) -> (ConnPhase, Instant) {
        let phase = match self.phase.load(Relaxed) {
            0 => ConnPhase::Reading,
            1 => ConnPhase::Busy,
            _ => ConnPhase::Idle,
        };
        (
            phase,
            clock_base() + Duration::from_millis(self.since_ms.load(Relaxed)),
        )
    }
}

/// Held by a response body: the connection is busy until the response is written.
pub struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.set(ConnPhase::Idle);
    }
}

/// Serves one client connection until it ends.
pub async fn serve(
    stream: TcpStream,
    remote: SocketAddr,
    shared: Arc<ListenerShared>,
    mut drain: DrainWatch,
    tracked: Tracked,
) {
    let local = stream.local_addr().unwrap_or_else(|_| shared.config.listen);
    let state = Arc::new(ConnState::new());
    let ctx = Arc::new(ConnContext {
        remote,
        local,
        tls: false,
        listener: shared.config.clone(),
    });
    let svc = {
        let shared = shared.clone();
        let state = state.clone();
        service_fn(move |req: http::Request<Incoming>| {
            state.set(ConnPhase::Busy);
            let n = state.requests.fetch_add(1, Relaxed) + 1;
            let shared = shared.clone();
            let state = state.clone();
            let ctx = ctx.clone();
            async move {
                let mut resp = shared.proxy.handle(req, &ctx).await;
                if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                    let max = shared.config.max_requests_per_connection;
                    let h = resp.headers_mut();
                    if state.draining.load(Relaxed) || (max > 0 && n >= max) {
                        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
                    } else if let Some(ka) = &shared.keep_alive {
                        h.insert("keep-alive", ka.clone());
                    }
                }
                resp.body_mut().in_flight = Some(InFlight(state));
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let io = ClientIo {
        stream: Some(stream),
        state: state.clone(),
        read_eof: false,
        tracked: Some(tracked),
    };
    let conn = shared
        .http1
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);

    // The first verdict at once: it picks the nearer of the head and idle deadlines.
    let check = tokio::time::sleep_until(Instant::now());
    tokio::pin!(check);
    let mut closing = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    log_conn_error(&e, remote);
                }
                return;
            }
            () = check.as_mut(), if !closing => {
                match verdict(&state, &shared, Instant::now()) {
                    Verdict::Close => {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                    Verdict::Abort => {
                        tracing::info!(client = %remote, timeout = ?shared.config.header_timeout.get(), "client did not send a complete request head in time; closing");
                        return;
                    }
                    Verdict::RecheckAt(at) => check.as_mut().reset(at),
                }
            }
            () = drain.draining(), if !state.draining.load(Relaxed) => {
                state.draining.store(true, Relaxed);
                check.as_mut().reset(Instant::now());
            }
        }
    }
}

enum Verdict {
    Close,
    Abort,
    RecheckAt(Instant),
}

fn verdict(state: &ConnState, shared: &ListenerShared, now: Instant) -> Verdict {
    let (phase, since) = state.phase();
    let draining = state.draining.load(Relaxed);
    let min_idle = shared.config.keepalive_min_idle.get();
    let idle_limit = if draining {
        let mut d = shared.drain.idle_close_after.get();
        if let Some(adv) = shared.advertised {
            d = d.min(adv);
        }
        d.max(min_idle)
    } else {
        shared.config.keepalive_timeout.get().max(min_idle)
    };
    match phase {
        ConnPhase::Reading => {
            let at = since + shared.config.header_timeout.get();
            if now >= at {
                Verdict::Abort
            } else {
                // The request may be served and the connection go idle before `at`;
                // look again in time for a shorter idle deadline.
                Verdict::RecheckAt(at.min(now + idle_limit))
            }
        }
        // Busy connections get `Connection: close` on their response; look again
        // when the request may be over.
        ConnPhase::Busy => Verdict::RecheckAt(now + Duration::from_millis(250)),
        ConnPhase::Idle => {
            let at = since + idle_limit;
            if now >= at {
                Verdict::Close
            } else {
                Verdict::RecheckAt(at)
            }
        }
    }
}

fn log_conn_error(e: &hyper::Error, remote: SocketAddr) {
    if e.is_parse() || e.is_parse_too_large() || e.is_parse_status() {
        // hyper has already answered 400/431 where it could.
        tracing::info!(client = %remote, error = %e, "malformed request; answered and closed");
    } else if e.is_timeout() {
        tracing::info!(client = %remote, error = %e, "client connection timed out");
    } else {
        tracing::debug!(client = %remote, error = %e, "client connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertised_timeout_leaves_a_margin() {
        assert_eq!(
            advertised_timeout(Duration::from_secs(60)),
            Some(Duration::from_secs(54))
        );
        assert_eq!(
            advertised_timeout(Duration::from_secs(5)),
            Some(Duration::from_secs(4))
        );
        assert_eq!(
            advertised_timeout(Duration::from_secs(2)),
            Some(Duration::from_secs(1))
        );
        assert_eq!(advertised_timeout(Duration::from_millis(1500)), None);
    }
}
