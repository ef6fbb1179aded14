//! One client connection: TLS when the listener has it, then HTTP/1.1 or HTTP/2 by
//! hyper, and holdfast's own rules for when the connection may end.
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
//!
//! HTTP/2 (ALPN `h2`, or the prior-knowledge preface when `h2c = true`) ends
//! connections with GOAWAY, which does not race: h2's graceful shutdown first sends
//! GOAWAY with the highest possible stream id and a PING, and only once the PING is
//! answered the final GOAWAY naming the last stream it took. Streams the client opened
//! before it saw that are served; streams above it were never processed, and the
//! client knows it may send them again on a new connection (RFC 9113 6.8). So an
//! HTTP/2 connection with no open stream for `keepalive_timeout` gets GOAWAY, and in a
//! drain every HTTP/2 connection gets it at once: its open streams finish, then it
//! closes. One that neither finishes closing nor has a stream open is cut
//! `header_timeout` after the GOAWAY if the client has gone silent, and
//! `keepalive_timeout` (or `header_timeout`, if longer) after it if the client is
//! still heard from: h2 may still hold the end of a response the client's window has
//! not taken. HTTP/2 responses carry no `Connection` or `Keep-Alive`
//! (connection-specific fields are malformed there, RFC 9113 8.2.2).
//!
//! The TLS handshake (and the h2c sniff) must end within `header_timeout`.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering::Relaxed};
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderValue, Version};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;

mod io;
mod streams;

use self::io::{ClientIo, Transport};
pub(crate) use self::streams::PIECE;
use self::streams::{StreamExec, StreamWatch, Streams};
use super::drain::{ClientFigures, DrainWatch, Tracked};
use super::tls::{self, TlsFront};
use crate::config::{DrainConfig, ListenerConfig, TlsConfig};
use crate::proxy::{ConnContext, Proxy};
use crate::timer::{Timer, clock_base};

/// How long a closing connection keeps reading (and discarding) what the client
/// still sends, so the close is a FIN and never a reset.
pub(super) const LINGER: Duration = Duration::from_secs(2);

/// Settings and shared parts of one listener, built once.
pub struct ListenerShared {
    pub proxy: Arc<Proxy>,
    pub config: Arc<ListenerConfig>,
    pub drain: DrainConfig,
    tls: Option<TlsFront>,
    http1: http1::Builder,
    http2: http2::Builder<StreamExec>,
    /// `Keep-Alive: timeout=N` sent on responses, N a margin below the real timeout.
    keep_alive: Option<HeaderValue>,
    advertised: Option<Duration>,
}

impl ListenerShared {
    /// Reads the listener's certificates (if it has TLS) and sets up hyper's HTTP/1
    /// and HTTP/2 servers with its limits.
    ///
    /// # Errors
    /// The listener's certificates cannot be read or used.
    pub fn new(
        proxy: Arc<Proxy>,
        config: ListenerConfig,
        drain: DrainConfig,
    ) -> Result<Self, String> {
        let tls = config.tls.as_ref().map(TlsFront::new).transpose()?;
        // Phases are stored relative to this base; set it before any connection's
        // accept time, which may come before its state is made.
        clock_base();
        let mut http1 = http1::Builder::new();
        let max_head = config.max_header_bytes.as_usize();
        http1
            .keep_alive(true)
            .half_close(false)
            .header_read_timeout(None)
            .max_header_size(max_head)
            // hyper requires at least 8 KiB of read buffer.
            .max_buf_size(max_head.max(8192).saturating_add(1024));
        let advertised = advertised_timeout(config.keepalive_timeout.get());
        let keep_alive =
            advertised.and_then(|d| HeaderValue::try_from(format!("timeout={}", d.as_secs())).ok());
        let h = &config.http2;
        // Validation keeps these within u32 (windows within 2^31-1), but for a header
        // list size of 4GiB, sent as the most the field holds.
        let u32_of = |b: crate::config::ByteSize| u32::try_from(b.get()).unwrap_or(u32::MAX);
        let mut http2 = http2::Builder::new(StreamExec::new(config.send_timeout.get()));
        http2
            .max_concurrent_streams(h.max_concurrent_streams)
            .max_header_list_size(u32_of(h.max_header_list_size))
            .initial_stream_window_size(u32_of(h.initial_stream_window))
            // At least what the streams' windows add up to: see `connection_window`.
            .initial_connection_window_size(h.connection_window())
            // Rapid reset (CVE-2023-44487) and its server-side twin: past these
            // counts the connection gets GOAWAY ENHANCE_YOUR_CALM.
            .max_pending_accept_reset_streams(h.max_pending_accept_reset_streams)
            .max_local_error_reset_streams(h.max_local_error_reset_streams);
        Ok(ListenerShared {
            proxy,
            config: Arc::new(config),
            drain,
            tls,
            http1,
            http2,
            keep_alive,
            advertised,
        })
    }

    /// Reads this listener's certificate files again (SIGHUP), for
    /// [`ListenerShared::install_certificates`]; `None` for a plain listener.
    ///
    /// # Errors
    /// A file cannot be used.
    pub fn load_certificates(&self, config: &TlsConfig) -> Option<Result<tls::CertStore, String>> {
        self.tls.as_ref().map(|_| TlsFront::load(config))
    }

    /// Serves new handshakes with `store`; returns how many certificates it holds.
    pub fn install_certificates(&self, store: tls::CertStore) -> usize {
        self.tls.as_ref().map_or(0, |t| t.install(store))
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
    /// Requests whose response is not written yet (at most one on HTTP/1), in the
    /// low 32 bits, and (HTTP/1) request bodies still streaming upstream after their
    /// answer, in units of [`UPLOAD`] (see [`UploadHold`]). One atomic, so that the
    /// holder that leaves it at zero, on whichever task, is the one that makes the
    /// connection idle.
    active: AtomicU64,
    /// HTTP/1 (see [`UploadHold`]).
    http1: bool,
    /// HTTP/1, while only an upload holds the connection: when the connection task
    /// last saw the client's body arrive, in ms since [`clock_base`].
    upload_seen_ms: AtomicU64,
    /// HTTP/2: `max_requests_per_connection` reached; send GOAWAY.
    close_soon: AtomicBool,
    /// The client asked to close after this request (`Connection: close`, or
    /// HTTP/1.0 without keep-alive), which has no body and asks for no upgrade: it
    /// sends nothing more, so no linger is needed. (One with a body may still be
    /// sending it when the answer comes early; closing with it unread would send a
    /// reset.)
    pub(super) client_closes: AtomicBool,
    /// HTTP/2: the client has sent something since holdfast began closing (a PING
    /// ack, a WINDOW_UPDATE): it is alive, and may be reading slowly. HTTP/1: bytes
    /// were read while busy (a request body arriving, see [`UploadHold`]; or bytes
    /// past a request that asked to close, see `ClientIo::sends_nothing_more`).
    pub(super) heard: AtomicBool,
    /// HTTP/1: a write or flush hyper started has not finished (the socket is full):
    /// hyper holds bytes still to send. hyper ends a request once its response's last
    /// piece is in its write buffer, before that piece is sent, so the connection may
    /// look idle meanwhile; it parks, or is dropped as idle, only once they are sent.
    /// (Written by `ClientIo` on the connection's task only.)
    pub(super) unsent: AtomicBool,
    /// HTTP/1: woken from a park, on a new hyper connection that has seen no request
    /// yet (whatever it holds is empty lines; see `closing_http1`).
    pub(super) woken: AtomicBool,
    /// When it was last woken from a park, in ms since [`clock_base`]: it parks again
    /// only `PARK_AFTER` after that (whatever woke it may be followed by more).
    woken_ms: AtomicU64,
    /// A write to the client stalled past `send_timeout` (`ClientIo`): the response
    /// bodies dropped with the connection were cut by it.
    pub(super) send_timed_out: AtomicBool,
    /// HTTP/1.0: the response goes out delimited by the connection's close (a body
    /// of unknown length; HTTP/1.0 has no chunked coding).
    pub(super) close_delimited: AtomicBool,
    /// A response body failed mid-way (`InFlight::body_cut`). With `close_delimited`,
    /// the client can only tell by a reset: a FIN would say the body is complete.
    pub(super) body_cut: AtomicBool,
    /// HTTP/1: hyper keeps an upgrade request's switch pending after an answer that
    /// did not switch (the upstream refused it, or holdfast answered), and when the
    /// connection later ends it hands the socket to that upgrade instead of ending
    /// cleanly. Kept here (a handle on it) so that a park can take the socket back;
    /// `refused_upgrade_kept` says whether to look (set only after such an answer).
    refused_upgrade: std::sync::Mutex<Option<OnUpgrade>>,
    refused_upgrade_kept: AtomicBool,
    /// HTTP/2: the streams whose response bodies are watched for `send_timeout`
    /// (`streams.rs`).
    streams: Streams,
    /// Makes an HTTP/2 connection task look again at once.
    wake: Notify,
    /// Plain HTTP/1 connections may park while idle (see [`park`]).
    parkable: bool,
    /// `PARK_NONE`, `PARK_REQUESTED`, `PARK_PARKED` or `PARK_CLOSING`.
    park: AtomicU8,
    /// The server's client figures, for what goes wrong on this connection.
    figures: Arc<ClientFigures>,
    /// What the proxy knows of the connection (kept here: one allocation per
    /// connection, one reference per request).
    ctx: ConnContext,
    /// The listener's settings and proxy, reached through this state so that a
    /// request holds one reference (its [`InFlight`]), not two.
    shared: Arc<ListenerShared>,
}

/// An idle plain HTTP/1 connection parks after this long: hyper's per-connection
/// buffers (16 KiB) are freed and only the socket and a small task remain, until the
/// client sends again. Busier connections never park, so they pay nothing for it.
const PARK_AFTER: Duration = Duration::from_millis(100);
const PARK_NONE: u8 = 0;
/// The connection task asked `ClientIo` to end hyper's connection at its next idle read.
const PARK_REQUESTED: u8 = 1;
/// `ClientIo` told hyper "end of input"; the socket is still open and ours.
const PARK_PARKED: u8 = 2;
/// HTTP/1: holdfast told hyper to close the idle connection (a drain, or its idle
/// timeout). `ClientIo`'s first `poll_shutdown` peeks first: a request that reached
/// the socket since tokio's reactor last looked turns the close into a park (the
/// socket is handed back and the request served); no bytes, and it closes.
const PARK_CLOSING: u8 = 3;

impl ConnState {
    /// `accepted`: when the connection was accepted; its first head is due
    /// `header_timeout` after that, a TLS handshake (or h2c sniff) included.
    fn new(
        parkable: bool,
        http1: bool,
        figures: Arc<ClientFigures>,
        ctx: ConnContext,
        shared: Arc<ListenerShared>,
        accepted: Instant,
    ) -> Self {
        let since = accepted.saturating_duration_since(clock_base()).as_millis() as u64;
        ConnState {
            parkable,
            figures,
            ctx,
            shared,
            park: AtomicU8::new(PARK_NONE),
            phase: AtomicU8::new(ConnPhase::Reading as u8),
            since_ms: AtomicU64::new(since),
            draining: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            active: AtomicU64::new(0),
            http1,
            upload_seen_ms: AtomicU64::new(0),
            close_soon: AtomicBool::new(false),
            client_closes: AtomicBool::new(false),
            heard: AtomicBool::new(false),
            unsent: AtomicBool::new(false),
            woken: AtomicBool::new(false),
            woken_ms: AtomicU64::new(0),
            send_timed_out: AtomicBool::new(false),
            close_delimited: AtomicBool::new(false),
            body_cut: AtomicBool::new(false),
            refused_upgrade: std::sync::Mutex::new(None),
            refused_upgrade_kept: AtomicBool::new(false),
            streams: Streams::default(),
            wake: Notify::new(),
        }
    }

    fn set(&self, phase: ConnPhase) {
        self.set_at(phase, Instant::now());
    }

    fn set_at(&self, phase: ConnPhase, now: Instant) {
        let since = now.saturating_duration_since(clock_base()).as_millis() as u64;
        self.since_ms.store(since, Relaxed);
        self.phase.store(phase as u8, Relaxed);
    }

    /// Keeps the upgrade of a request answered without a switch (see
    /// `refused_upgrade`); it replaces an earlier one, as hyper's does.
    fn keep_refused_upgrade(&self, upgrade: OnUpgrade) {
        let mut kept = self
            .refused_upgrade
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *kept = Some(upgrade);
        self.refused_upgrade_kept.store(true, Relaxed);
    }

    /// The upgrade kept by [`ConnState::keep_refused_upgrade`], if any.
    fn take_refused_upgrade(&self) -> Option<OnUpgrade> {
        // Set and taken on the connection's task only: no read-modify-write needed.
        if !self.refused_upgrade_kept.load(Relaxed) {
            return None;
        }
        self.refused_upgrade_kept.store(false, Relaxed);
        self.refused_upgrade
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
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

/// Held from the moment a request reaches the service until its response is written
/// (it travels in the response body); dropped early if the request is cancelled (an
/// HTTP/2 stream reset). The connection is idle when none is held.
pub struct InFlight {
    state: Arc<ConnState>,
    /// When the response ended, if the body said (see [`InFlight::ended_at`]).
    ended_at: Option<Instant>,
    /// HTTP/2 with a `send_timeout`: the stream's watch, once its response has a
    /// body (see `streams.rs`).
    stream: Option<Arc<StreamWatch>>,
}

impl InFlight {
    fn start(state: &Arc<ConnState>, now: Instant) -> InFlight {
        state.active.fetch_add(1, Relaxed);
        state.set_at(ConnPhase::Busy, now);
        InFlight {
            state: state.clone(),
            ended_at: None,
            stream: None,
        }
    }

    /// HTTP/2: lists the stream for the connection task's `send_timeout` looks, when
    /// its task is watched. Called from the service's future, which runs inside the
    /// stream's task.
    fn watch_stream(&mut self, now: Instant) {
        if let Some(watch) = streams::current() {
            self.state.streams.list(watch.clone(), now);
            self.stream = Some(watch);
        }
    }

    /// The stream's watch, to note each poll of the response body in.
    pub(crate) fn stream(&self) -> Option<&StreamWatch> {
        self.stream.as_deref()
    }

    /// Whether `send_timeout` cut the response: its HTTP/2 stream, or (`body_done`:
    /// the body had not ended) the whole connection's writes.
    pub(crate) fn send_timed_out(&self, body_done: bool) -> bool {
        self.stream.as_ref().is_some_and(|w| w.is_cut())
            || !body_done && self.state.send_timed_out.load(Relaxed)
    }

    /// The response body failed before its end: the client must see it cut (see
    /// `ConnState::body_cut`).
    pub(crate) fn body_cut(&self) {
        self.state.body_cut.store(true, Relaxed);
    }

    /// The response ended at `at`, a clock reading taken in the same poll that drops
    /// this: the connection is idle from then, with no reading of its own.
    pub(crate) fn ended_at(&mut self, at: Instant) {
        self.ended_at = Some(at);
    }

    /// HTTP/1: keeps the connection busy while the request's body streams upstream,
    /// which may go on after the response (see [`UploadHold`]); `None` on HTTP/2.
    pub(crate) fn hold_upload(&self) -> Option<UploadHold> {
        if !self.state.http1 {
            return None;
        }
        // On the connection's task (hyper's HTTP/1 server polls the service there),
        // the only one that writes `upload_seen_ms`: a new upload's stall is timed
        // afresh.
        self.state.upload_seen_ms.store(0, Relaxed);
        self.state.active.fetch_add(UPLOAD, Relaxed);
        Some(UploadHold(self.state.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.state.active.fetch_sub(1, Relaxed) == 1 {
            let at = self.ended_at.unwrap_or_else(Instant::now);
            self.state.set_at(ConnPhase::Idle, at);
        }
    }
}

/// One [`UploadHold`] in [`ConnState::active`].
const UPLOAD: u64 = 1 << 32;

/// Held by a request body that streams upstream from an HTTP/1 client until it ends,
/// fails or is dropped. An upstream may answer before it has the whole body (HTTP/2,
/// or hyper's HTTP/1.1 client over TLS) and go on taking it: hyper is still reading
/// it from the client after the response went out. The connection is not idle
/// meanwhile: parked, it would tell hyper the input ended, which cuts the body, and
/// the rest of it would reach a new hyper connection as a request head.
///
/// While only this holds the connection, it is looked at every `body_timeout` (or
/// `keepalive_timeout`, when that is off) and cut when nothing of the body arrived
/// since: an upstream that takes no more of it (no flow-control window) stops
/// hyper's reads, and no other deadline is left to end the connection.
///
/// HTTP/2 client connections take none: each stream ends on its own, and a
/// connection with no stream in flight is told GOAWAY and cut after its grace.
pub struct UploadHold(Arc<ConnState>);

impl fmt::Debug for UploadHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UploadHold")
    }
}

impl Drop for UploadHold {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(UPLOAD, Relaxed) == UPLOAD {
            // After the response: idle from now, and the connection task, which has
            // no timer while busy, is told to look.
            self.0.set(ConnPhase::Idle);
            self.0.wake.notify_one();
        }
    }
}

impl ConnState {
    /// Only uploads (no request in flight) hold the connection.
    fn upload_only(&self) -> bool {
        let active = self.active.load(Relaxed);
        active != 0 && active as u32 == 0
    }

    /// How long an upload that holds the connection alone may go without arriving.
    fn upload_stall_limit(&self) -> Duration {
        let config = &self.shared.config;
        config
            .body_timeout
            .non_zero()
            .unwrap_or_else(|| config.keepalive_timeout.get())
    }
}

/// Which HTTP the connection speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http1,
    Http2,
}

/// Serves one client connection until it ends.
///
/// An async block rather than an `async fn`, which would keep every argument twice
/// (rust-lang/rust#62958): this future is most of the memory an idle connection holds.
#[allow(clippy::manual_async_fn)]
pub fn serve(
    stream: TcpStream,
    remote: SocketAddr,
    shared: Arc<ListenerShared>,
    drain: DrainWatch,
    tracked: Tracked,
    slot: Option<OwnedSemaphorePermit>,
) -> impl Future<Output = ()> + Send {
    async move {
        let accepted = Instant::now();
        let (transport, replay, proto) = if shared.tls.is_none() && !shared.config.h2c {
            (Transport::Plain(stream), Bytes::new(), Proto::Http1)
        } else {
            // Boxed: the task of every connection is as large as its largest state,
            // and an idle (parked) connection should not carry a TLS handshake's.
            match Box::pin(establish(stream, &shared, &tracked, remote)).await {
                Some(established) => established,
                None => return,
            }
        };
        // A listener bound to one address and port needs no getsockname per connection.
        let local = {
            let bound = shared.config.listen;
            if bound.ip().is_unspecified() || bound.port() == 0 {
                transport.tcp().local_addr().unwrap_or(bound)
            } else {
                bound
            }
        };
        let parkable = shared.tls.is_none() && !shared.config.h2c;
        let ctx = ConnContext::new(
            remote,
            local,
            matches!(transport, Transport::Tls(_)),
            shared.config.clone(),
        );
        let state = Arc::new(ConnState::new(
            parkable,
            proto == Proto::Http1,
            tracked.figures(),
            ctx,
            shared.clone(),
            accepted,
        ));
        let io = ClientIo::new(
            transport,
            replay,
            state.clone(),
            proto == Proto::Http1,
            tracked,
            slot,
        );
        let io = TokioIo::new(io);
        let svc = {
            let state = state.clone();
            service_fn(move |req: http::Request<Incoming>| {
                // One clock reading for the connection's state and the request's timing.
                let arrived = Instant::now();
                let shared = &state.shared;
                let asks_close = req.version() == Version::HTTP_10
                    && !crate::proxy::headers::connection_has(req.headers(), "keep-alive")
                    || req.version() == Version::HTTP_11
                        && crate::proxy::headers::connection_has(req.headers(), "close");
                let has_body = !http_body::Body::is_end_stream(req.body());
                // hyper's HTTP/2 server sends a HEAD response's body (see below).
                let head_h2 =
                    req.version() == Version::HTTP_2 && req.method() == http::Method::HEAD;
                // HTTP/1 upgrade requests only (an empty map is one branch): see
                // `ConnState::refused_upgrade`.
                let upgrade = req.extensions().get::<OnUpgrade>().cloned();
                // Not an upgrade request: after a switch the client goes on sending,
                // and each side's end of the tunnel is a half-close.
                if asks_close && !has_body && upgrade.is_none() {
                    state.client_closes.store(true, Relaxed);
                }
                // One writer: hyper calls the service from the connection's own task
                // only, so no atomic read-modify-write is needed.
                let n = state.requests.load(Relaxed) + 1;
                state.requests.store(n, Relaxed);
                let max = shared.config.max_requests_per_connection;
                let last = max > 0 && n >= max;
                if last && req.version() == Version::HTTP_2 {
                    state.close_soon.store(true, Relaxed);
                    state.wake.notify_one();
                }
                // The request's one reference to the connection, and through it to
                // the listener.
                let in_flight = InFlight::start(&state, arrived);
                async move {
                    let version = req.version();
                    let state = &*in_flight.state;
                    let shared = &*state.shared;
                    let mut resp = if shared.config.redirect_https {
                        shared.proxy.redirect(
                            &req,
                            &state.ctx,
                            arrived,
                            shared.config.redirect_https_port,
                        )
                    } else {
                        shared
                            .proxy
                            .handle(req, &state.ctx, arrived, &in_flight)
                            .await
                    };
                    if head_h2 && resp.body().is_local() {
                        // RFC 9110 9.3.2: no content in an answer to HEAD. hyper's
                        // HTTP/1 server leaves the body out itself; its HTTP/2 server
                        // sends what the body holds as DATA, which a client holding
                        // the server to RFC 9113 8.1.1 (h2) takes for a malformed
                        // response and resets. holdfast's own answers have a text
                        // body (an upstream's answer to HEAD has none): its length
                        // is said, as hyper's HTTP/1 server says it.
                        let len = http_body::Body::size_hint(resp.body()).exact();
                        if let Some(len) = len.filter(|&n| n > 0) {
                            resp.headers_mut()
                                .entry(header::CONTENT_LENGTH)
                                .or_insert_with(|| HeaderValue::from(len));
                        }
                        *resp.body_mut() = crate::proxy::response::ResponseBody::empty();
                    }
                    if resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                        if let Some(upgrade) = upgrade {
                            state.keep_refused_upgrade(upgrade);
                        }
                        // holdfast's own answer to a request with a body may leave the
                        // body unread, and so may an upstream's that came before the
                        // body was all sent (RFC 9110 10.1.1): hyper then closes the
                        // connection after the answer, which must say so rather than
                        // promise keep-alive.
                        // A client that asked to close is not promised keep-alive
                        // either (hyper closes, and adds `Connection: close`).
                        let closing = state.draining.load(Relaxed)
                            || last
                            || asks_close
                            || has_body && resp.body().may_leave_request_body();
                        // HTTP/1.0 has no chunked coding: hyper ends a body of
                        // unknown length with the connection.
                        let close_delimited = version == Version::HTTP_10 && unknown_length(&resp);
                        if close_delimited {
                            state.close_delimited.store(true, Relaxed);
                        }
                        let closing = closing || close_delimited;
                        if let Some((name, value)) =
                            connection_field(version, closing, shared.keep_alive.as_ref())
                        {
                            resp.headers_mut().insert(name, value);
                        }
                        if closing && version == Version::HTTP_10 {
                            // hyper gives an HTTP/1.1 response to a 1.0 client that
                            // asked for keep-alive a `keep-alive` token beside the
                            // `close`; an HTTP/1.0 one it closes as it says.
                            *resp.version_mut() = Version::HTTP_10;
                        }
                    }
                    let mut in_flight = in_flight;
                    // Any body, holdfast's own too: a stream granted no window
                    // holds it, and the connection, until `send_timeout` cuts it.
                    if version == Version::HTTP_2 && !http_body::Body::is_end_stream(resp.body()) {
                        in_flight.watch_stream(arrived);
                    }
                    resp.body_mut().in_flight = Some(in_flight);
                    Ok::<_, Infallible>(resp)
                }
            })
        };
        let mut drain = drain;
        match proto {
            Proto::Http1 => {
                let mut io = io;
                loop {
                    // hyper's connection and the watch over it in one allocation (kept
                    // out of the task, which every parked connection holds).
                    let (state, shared) = (&state, &shared);
                    let watch = &mut drain;
                    let svc = svc.clone();
                    // `let else` straight on the await: a named result would keep its
                    // own room in the task while parked.
                    let Some(client_io) = Box::pin(async move {
                        let mut conn = shared.http1.serve_connection(io, svc).with_upgrades();
                        let shutdown = |c: Pin<&mut _>| {
                            hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(c)
                        };
                        drive(
                            Pin::new(&mut conn),
                            shutdown,
                            proto,
                            state,
                            shared,
                            watch,
                            remote,
                        )
                        .await;
                        // Taken whatever happens next: once hyper handed it the
                        // socket, it holds the connection's state, which would then
                        // hold it.
                        let refused_upgrade = state.take_refused_upgrade();
                        let closing = match state.park.load(Relaxed) {
                            PARK_PARKED => false,
                            // Told to close while idle, and not closed through
                            // `ClientIo::poll_shutdown`, whose look for a request
                            // already in the socket therefore never ran: hyper handed
                            // the socket to a refused upgrade instead of shutting it
                            // down, or (`closing_http1`) held only empty lines and was
                            // left. The same look here.
                            PARK_CLOSING
                                if state.phase.load(Relaxed) == ConnPhase::Idle as u8
                                    && !state.unsent.load(Relaxed) =>
                            {
                                true
                            }
                            _ => return None,
                        };
                        // hyper saw "end of input" and ended cleanly without shutting
                        // the socket: take it back, with anything hyper had read but
                        // not used. The rest of hyper's parts (a clone of the service)
                        // is not kept while parked. After an upgrade it did not make,
                        // hyper hands the socket to that upgrade instead.
                        let (io, read_buf) = match conn.into_parts() {
                            Some(parts) => (parts.io, parts.read_buf),
                            None => {
                                use futures_util::FutureExt;
                                let upgraded = refused_upgrade?.now_or_never()?.ok()?;
                                let parts = upgraded.downcast::<TokioIo<ClientIo>>().ok()?;
                                (parts.io, parts.read_buf)
                            }
                        };
                        let mut client_io = io.into_inner();
                        if closing {
                            if !client_io.has_unread() {
                                return None;
                            }
                            // Served as after a park (`park` looks again and serves it).
                            state.park.store(PARK_PARKED, Relaxed);
                        }
                        client_io.unread(read_buf);
                        Some(client_io)
                    })
                    .await
                    else {
                        return;
                    };
                    tracing::trace!(client = %remote, "idle connection parked");
                    if !Box::pin(park(&client_io, state, shared, &mut drain)).await {
                        return; // dropping the socket closes it, with a linger
                    }
                    state.park.store(PARK_NONE, Relaxed);
                    state.woken.store(true, Relaxed);
                    let woke = Instant::now().saturating_duration_since(clock_base());
                    state.woken_ms.store(woke.as_millis() as u64, Relaxed);
                    io = TokioIo::new(client_io);
                }
            }
            Proto::Http2 => {
                // Until its first stream the connection stays `Reading` from accept:
                // its first head (preface and HEADERS included) is due
                // `header_timeout` after accept, as on HTTP/1 (see `verdict_h2`).
                let (state, shared, drain) = (&state, &shared, &mut drain);
                Box::pin(async move {
                    let conn = shared.http2.serve_connection(io, svc);
                    tokio::pin!(conn);
                    drive(
                        conn.as_mut(),
                        |c| c.graceful_shutdown(),
                        proto,
                        state,
                        shared,
                        drain,
                        remote,
                    )
                    .await;
                })
                .await;
            }
        }
    }
}

/// The TLS handshake, or the h2c sniff, within `header_timeout`: the transport, the
/// bytes read to tell HTTP/2 from HTTP/1 (replayed to hyper), and the protocol.
/// `None`: the connection is over (logged and counted here).
async fn establish(
    stream: TcpStream,
    shared: &ListenerShared,
    tracked: &Tracked,
    remote: SocketAddr,
) -> Option<(Transport, Bytes, Proto)> {
    let handshake = shared.config.header_timeout.get();
    if let Some(front) = &shared.tls {
        let stream = io::RecordWatch::new(stream);
        return match tokio::time::timeout(handshake, front.accept(stream)).await {
            Ok(Ok(s)) => {
                let proto = if tls::negotiated_h2(&s) {
                    Proto::Http2
                } else {
                    Proto::Http1
                };
                Some((Transport::Tls(Box::new(s)), Bytes::new(), proto))
            }
            Ok(Err(e)) => {
                tracked.figures().tls_handshake.fetch_add(1, Relaxed);
                tracing::debug!(client = %remote, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracked.figures().tls_handshake.fetch_add(1, Relaxed);
                tracing::info!(client = %remote, timeout = ?handshake, "TLS handshake not done in time; closing");
                None
            }
        };
    }
    let mut stream = stream;
    match io::sniff_h2_preface(&mut stream, handshake).await {
        Ok((h2, replay)) => {
            let proto = if h2 { Proto::Http2 } else { Proto::Http1 };
            Some((Transport::Plain(stream), replay, proto))
        }
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            // As on a plain listener: no complete head within `header_timeout`.
            tracked.figures().head_timeout.fetch_add(1, Relaxed);
            tracing::info!(client = %remote, timeout = ?handshake, "client did not send a complete request head in time; closing");
            None
        }
        Err(e) => {
            tracing::debug!(client = %remote, error = %e, "no request on a new connection");
            None
        }
    }
}

/// Waits, with no hyper state, until a parked connection's client sends again
/// (`true`: serve it) or the connection should close (`false`).
#[allow(clippy::manual_async_fn)] // an async fn would keep its arguments twice
fn park<'a>(
    io: &'a ClientIo,
    state: &'a ConnState,
    shared: &'a ListenerShared,
    drain: &'a mut DrainWatch,
) -> impl Future<Output = bool> + Send + 'a {
    async move {
        // Counted parked until this returns (woken or closing) or is dropped.
        let _parked = io.parked();
        // Polled by hand, not `select!` over `readable()`: this future is what every
        // parked connection keeps, and a readiness future is larger than the poll.
        let check = tokio::time::sleep_until(Instant::now());
        tokio::pin!(check);
        let draining = drain.draining();
        tokio::pin!(draining);
        loop {
            let at = match verdict(state, shared, Instant::now()) {
                Verdict::RecheckAt(at) | Verdict::Park(at) => at,
                // A request that reached the socket since the reactor last looked
                // (a drain's wake-up, or the timer, can come first) is served, with
                // `Connection: close` in a drain: closing would drop it unanswered.
                Verdict::Close => return io.has_unread(),
                Verdict::Abort(_) | Verdict::UploadStalled(_) | Verdict::Unclosed(_) => {
                    return false;
                }
            };
            check.as_mut().reset(at);
            let readable = std::future::poll_fn(|cx| {
                // Data or EOF: a new hyper connection handles either.
                if let Poll::Ready(r) = io.poll_readable(cx) {
                    return Poll::Ready(Some(r.is_ok()));
                }
                if check.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                if !state.draining.load(Relaxed) && draining.as_mut().poll(cx).is_ready() {
                    state.draining.store(true, Relaxed);
                    return Poll::Ready(None);
                }
                Poll::Pending
            })
            .await;
            if let Some(ok) = readable {
                return ok;
            }
        }
    }
}

/// Whether a response's body has no length hyper can write (no `Content-Length`,
/// no exact size), so that an HTTP/1.0 client gets it delimited by the close.
fn unknown_length(resp: &http::Response<crate::proxy::response::ResponseBody>) -> bool {
    let body = resp.body();
    !http_body::Body::is_end_stream(body)
        && http_body::Body::size_hint(body).exact().is_none()
        && !resp.headers().contains_key(header::CONTENT_LENGTH)
}

/// The connection-management field a response gets: HTTP/1 only, since HTTP/2 has
/// no such fields (RFC 9113 8.2.2) and ends connections with GOAWAY instead.
fn connection_field(
    version: Version,
    closing: bool,
    keep_alive: Option<&HeaderValue>,
) -> Option<(HeaderName, HeaderValue)> {
    if version >= Version::HTTP_2 {
        None
    } else if closing {
        Some((header::CONNECTION, HeaderValue::from_static("close")))
    } else {
        keep_alive.map(|ka| (HeaderName::from_static("keep-alive"), ka.clone()))
    }
}

/// What woke [`drive`].
enum Wake {
    Ended(hyper::Result<()>),
    Check,
    Drain,
    Notified,
}

/// Runs a hyper connection under holdfast's rules until it ends.
///
/// HTTP/1 holds a timer only while the connection waits for a head or sits idle.
/// Its phase changes inside hyper's poll (the head arrives, the response body is
/// dropped), so each poll of the connection is followed by a look at the phase: a
/// busy connection needs no timer, and a new connection whose request came with it
/// (most of them) never registers one. That matters for churn: a timer earlier than
/// every other one makes tokio wake its own worker through an eventfd, a write and
/// an extra epoll event per connection. A timer set while idle stays set when the
/// next head starts arriving, unless the head is due earlier than it fires. HTTP/2
/// streams run on tasks of their own, so HTTP/2 keeps a timer always and looks again
/// every [`BUSY_RECHECK`] while busy, from the poll that took its first stream, and
/// each look cuts streams stalled past `send_timeout` (`streams.rs`).
async fn drive<C>(
    mut conn: Pin<&mut C>,
    shutdown: impl Fn(Pin<&mut C>),
    proto: Proto,
    state: &ConnState,
    shared: &ListenerShared,
    drain: &mut DrainWatch,
    remote: SocketAddr,
) where
    C: Future<Output = hyper::Result<()>>,
{
    let sleep = tokio::time::sleep_until(Instant::now());
    tokio::pin!(sleep);
    // Polled only to register for a new deadline (see `crate::timer`).
    let mut check = Timer::new(sleep);
    // Whether `check` is set for a time still to be looked at.
    let mut armed = proto == Proto::Http2;
    // HTTP/2: `check` is due within `BUSY_RECHECK` because a stream is open.
    let mut busy = false;
    // When holdfast began closing (HTTP/1: no more verdicts; HTTP/2: GOAWAY sent).
    let mut closing: Option<Instant> = None;
    // Made once, not per wake-up, which would register the task's waker again each time.
    let draining = drain.draining();
    tokio::pin!(draining);
    let wake = state.wake.notified();
    tokio::pin!(wake);
    loop {
        let woke = std::future::poll_fn(|cx| {
            // The connection first: it is what wakes this task almost every time.
            if let Poll::Ready(res) = conn.as_mut().poll(cx) {
                return Poll::Ready(Wake::Ended(res));
            }
            // The first stream of a busy spell starts inside that poll; the timer was
            // set for an idle deadline (or the first head's).
            if proto == Proto::Http2 && !busy && state.active.load(Relaxed) > 0 {
                busy = true;
                let due = state.phase().1 + BUSY_RECHECK;
                if !armed || due < check.deadline() {
                    check.reset(due);
                    armed = true;
                }
            }
            if proto == Proto::Http1 {
                if !armed {
                    if closing.is_none()
                        && let Some(at) = http1_next_check(state, shared)
                    {
                        check.reset(at);
                        armed = true;
                    }
                } else if let Some(due) = http1_head_due(state, shared.config.header_timeout.get())
                    && due < check.deadline()
                {
                    // Armed while idle, and a head has started arriving since.
                    check.reset(due);
                }
            }
            if armed && check.poll_due(cx) {
                armed = false;
                return Poll::Ready(Wake::Check);
            }
            if !state.draining.load(Relaxed) && draining.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Drain);
            }
            // HTTP/2 is woken this way when `max_requests_per_connection` is reached;
            // HTTP/1 when an upload that alone held it ends (see `UploadHold`), looked
            // for only then (a poll of it registers the waker again).
            if (proto == Proto::Http2 || armed && state.upload_only())
                && wake.as_mut().poll(cx).is_ready()
            {
                wake.set(state.wake.notified());
                return Poll::Ready(Wake::Notified);
            }
            Poll::Pending
        })
        .await;
        let now = Instant::now();
        match woke {
            Wake::Ended(res) => {
                if let Err(e) = res {
                    log_conn_error(&e, remote, state);
                }
                return;
            }
            Wake::Check => {
                let v = match proto {
                    Proto::Http1 if closing.is_some() => match closing_http1(state, shared, now) {
                        Some(v) => v,
                        None => {
                            tracing::debug!(client = %remote, "idle connection holding only empty lines; closing");
                            return;
                        }
                    },
                    Proto::Http1 => verdict(state, shared, now),
                    Proto::Http2 => {
                        cut_stalled_streams(state, shared, now, remote);
                        // `verdict_h2` looks again within `BUSY_RECHECK` while so.
                        busy = state.active.load(Relaxed) > 0;
                        verdict_h2(state, shared, now, closing)
                    }
                };
                match v {
                    Verdict::Close => {
                        if proto == Proto::Http1 {
                            // Idle (HTTP/1 closes only so): see `PARK_CLOSING`.
                            state.park.store(PARK_CLOSING, Relaxed);
                        }
                        shutdown(conn.as_mut());
                        closing = Some(now);
                        state.heard.store(false, Relaxed);
                        // HTTP/2 still watches the client finish closing; HTTP/1
                        // looks once more (see `closing_http1`).
                        armed = true;
                        check.reset(now);
                    }
                    Verdict::Abort(why) => {
                        state.figures.head_timeout.fetch_add(1, Relaxed);
                        tracing::info!(client = %remote, timeout = ?shared.config.header_timeout.get(), "{why}; closing");
                        return;
                    }
                    Verdict::Unclosed(grace) => {
                        // Not a head timeout: the client was served, or it would
                        // have been cut so before the GOAWAY.
                        tracing::info!(client = %remote, timeout = ?grace, "HTTP/2 client did not finish closing after GOAWAY; closing");
                        return;
                    }
                    Verdict::UploadStalled(limit) => {
                        tracing::info!(client = %remote, timeout = ?limit, "request body still streaming upstream after its answer, none of it taken or sent within the limit; closing");
                        return;
                    }
                    // HTTP/1 sets its next time after the connection's next poll
                    // (not once closing: then only `closing_http1` looks).
                    Verdict::RecheckAt(_) if proto == Proto::Http1 && closing.is_none() => {}
                    Verdict::RecheckAt(at) => {
                        check.reset(at);
                        armed = true;
                    }
                    Verdict::Park(_) => {
                        // hyper reads the idle socket when polled next (this loop
                        // polls `conn` again at once) and ends at the "end of input".
                        state.park.store(PARK_REQUESTED, Relaxed);
                    }
                }
            }
            Wake::Drain | Wake::Notified => {
                if matches!(woke, Wake::Drain) {
                    state.draining.store(true, Relaxed);
                }
                if proto == Proto::Http2 || closing.is_none() {
                    check.reset(now);
                    armed = true;
                }
            }
        }
    }
}

/// HTTP/2: cuts the streams whose client has taken no more of the response for
/// `send_timeout` (see `streams.rs`).
fn cut_stalled_streams(
    state: &ConnState,
    shared: &ListenerShared,
    now: Instant,
    remote: SocketAddr,
) {
    let limit = shared.config.send_timeout.get();
    if limit.is_zero() {
        return;
    }
    let cut = state.streams.cut_stalled(limit, now);
    if cut > 0 {
        tracing::info!(client = %remote, streams = cut, timeout = ?limit, "HTTP/2 client took none of a response within send_timeout; stream reset, upstream connection closed");
    }
}

/// An HTTP/1 connection told to close while idle (hyper's graceful shutdown), looked
/// at after hyper had its poll: `None` if it should be dropped now. An idle hyper
/// connection ends at that poll, except a new one (after a park) that has read bytes
/// starting no request (empty lines, RFC 9112 2.2): hyper takes that for a request
/// begun and waits for a head that may never come, which no idle rule or drain would
/// end. Only that one is dropped; any other is left to hyper, which may still be
/// reading a request body after an early answer (the upstream may still want it), or
/// sending the end of a response (a slow reader, bounded by `send_timeout`). A head
/// that began arriving is served (with `Connection: close`) under `header_timeout`.
fn closing_http1(state: &ConnState, shared: &ListenerShared, now: Instant) -> Option<Verdict> {
    match state.phase().0 {
        ConnPhase::Idle if state.woken.load(Relaxed) && !state.unsent.load(Relaxed) => None,
        ConnPhase::Reading => Some(match verdict(state, shared, now) {
            Verdict::Abort(why) => Verdict::Abort(why),
            _ => Verdict::RecheckAt(now + BUSY_RECHECK),
        }),
        ConnPhase::Busy if state.upload_only() => Some(verdict(state, shared, now)),
        _ => Some(Verdict::RecheckAt(now + BUSY_RECHECK)),
    }
}

/// When an HTTP/1 connection should be looked at next: `None` while a request is
/// being served (the phase changes inside hyper's poll, so the next poll sees it).
/// A request body that streams upstream after its answer (see [`UploadHold`]) is
/// looked at, though the connection stays busy.
fn http1_next_check(state: &ConnState, shared: &ListenerShared) -> Option<Instant> {
    if state.phase.load(Relaxed) == ConnPhase::Busy as u8 && !state.upload_only() {
        return None;
    }
    let now = Instant::now();
    Some(match verdict(state, shared, now) {
        Verdict::RecheckAt(at) => at,
        // Due now: the timer fires at the timer driver's next turn.
        Verdict::Close
        | Verdict::Park(_)
        | Verdict::Abort(_)
        | Verdict::UploadStalled(_)
        | Verdict::Unclosed(_) => now,
    })
}

/// When a head that has started arriving is due, for a connection reading one.
fn http1_head_due(state: &ConnState, header_timeout: Duration) -> Option<Instant> {
    if state.phase.load(Relaxed) != ConnPhase::Reading as u8 {
        return None;
    }
    Some(state.phase().1 + header_timeout)
}

enum Verdict {
    Close,
    /// HTTP/1: only a request body still streaming upstream after its answer holds
    /// the connection, and none of it arrived for this long (see [`UploadHold`]).
    UploadStalled(Duration),
    /// Idle long enough to park; look again at the given time.
    Park(Instant),
    /// Cut the connection now, saying why: a head not complete in time (counted as
    /// `head_timeout`).
    Abort(&'static str),
    /// HTTP/2: told GOAWAY, the client has not finished closing within this grace.
    Unclosed(Duration),
    RecheckAt(Instant),
}

/// How often a connection with a request in flight is looked at again.
const BUSY_RECHECK: Duration = Duration::from_millis(250);

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
                Verdict::Abort("client did not send a complete request head in time")
            } else {
                // The request may be served and the connection go idle before `at`;
                // look again in time for a shorter idle deadline, or to park.
                let mut next = at.min(now + idle_limit);
                if state.parkable && state.park.load(Relaxed) == PARK_NONE {
                    next = next.min(now + PARK_AFTER);
                }
                Verdict::RecheckAt(next)
            }
        }
        // Only an upload after its answer: cut once none of it arrived for its limit.
        ConnPhase::Busy if state.upload_only() => {
            let limit = state.upload_stall_limit();
            let seen = state.upload_seen_ms.load(Relaxed);
            let heard = state.heard.swap(false, Relaxed);
            if seen == 0 || heard {
                let ms = now.saturating_duration_since(clock_base()).as_millis() as u64;
                state.upload_seen_ms.store(ms.max(1), Relaxed);
                Verdict::RecheckAt(now + limit)
            } else {
                let at = clock_base() + Duration::from_millis(seen) + limit;
                if now >= at {
                    Verdict::UploadStalled(limit)
                } else {
                    Verdict::RecheckAt(at)
                }
            }
        }
        // Busy connections get `Connection: close` on their response; look again
        // when the request may be over.
        ConnPhase::Busy => Verdict::RecheckAt(now + BUSY_RECHECK),
        ConnPhase::Idle => {
            let at = since + idle_limit;
            let woke = clock_base() + Duration::from_millis(state.woken_ms.load(Relaxed));
            let park_at = since.max(woke) + PARK_AFTER;
            if now >= at {
                Verdict::Close
            } else if !state.parkable || state.park.load(Relaxed) != PARK_NONE {
                Verdict::RecheckAt(at)
            } else if now >= park_at {
                Verdict::Park(at)
            } else {
                Verdict::RecheckAt(at.min(park_at))
            }
        }
    }
}

fn verdict_h2(
    state: &ConnState,
    shared: &ListenerShared,
    now: Instant,
    closing: Option<Instant>,
) -> Verdict {
    let active = state.active.load(Relaxed);
    let (phase, since) = state.phase();
    if let Some(goaway) = closing {
        // h2 finishes the open streams, then closes. A stream stops counting as open
        // when hyper hands its last piece to h2, which may hold it for a while yet:
        // the client's flow-control window decides when it goes (a slow reader, or
        // one that holds its window). So a client heard from since the GOAWAY (it
        // answered the PING) is given as long as an idle connection, not just
        // `header_timeout`, before it is cut; a drain bounds it with `drain.timeout`
        // anyway, and counts what it cuts. One that went silent (a vanished peer)
        // is cut `header_timeout` after the GOAWAY, so that it holds no drain up.
        if active > 0 {
            return Verdict::RecheckAt(now + BUSY_RECHECK);
        }
        let header_timeout = shared.config.header_timeout.get();
        let grace = if state.heard.load(Relaxed) {
            shared.config.keepalive_timeout.get().max(header_timeout)
        } else {
            header_timeout
        };
        let at = goaway.max(since) + grace;
        return if now >= at && phase == ConnPhase::Reading {
            // The GOAWAY was for a first head not complete in time.
            Verdict::Abort("HTTP/2 client did not send a complete first request in time")
        } else if now >= at {
            Verdict::Unclosed(grace)
        } else {
            Verdict::RecheckAt(at)
        };
    }
    if state.draining.load(Relaxed) || state.close_soon.load(Relaxed) {
        return Verdict::Close;
    }
    if active > 0 {
        return Verdict::RecheckAt(now + BUSY_RECHECK);
    }
    if phase == ConnPhase::Reading {
        // No stream taken yet: the first head was due `header_timeout` after accept
        // (TLS handshake or h2c sniff included). GOAWAY, not a bare close: a HEADERS
        // racing it is above the last stream id, so the client may send it again.
        let at = since + shared.config.header_timeout.get();
        return if now >= at {
            Verdict::Close
        } else {
            Verdict::RecheckAt(at)
        };
    }
    let idle_limit = shared
        .config
        .keepalive_timeout
        .get()
        .max(shared.config.keepalive_min_idle.get());
    let at = since + idle_limit;
    if now >= at {
        Verdict::Close
    } else {
        Verdict::RecheckAt(at)
    }
}

fn log_conn_error(e: &hyper::Error, remote: SocketAddr, state: &ConnState) {
    let figures = &*state.figures;
    let h2_reason = std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .and_then(h2::Error::reason);
    if h2_reason == Some(h2::Reason::ENHANCE_YOUR_CALM) {
        figures.http2_abuse.fetch_add(1, Relaxed);
        tracing::warn!(client = %remote, error = %e, "HTTP/2 client reset or broke too many streams (rapid reset); closed with GOAWAY ENHANCE_YOUR_CALM");
    } else if e.is_parse() || e.is_parse_too_large() || e.is_parse_status() {
        figures.malformed.fetch_add(1, Relaxed);
        // hyper has already answered 400/431 where it could.
        tracing::info!(client = %remote, error = %e, "malformed request; answered and closed");
        if let Some(status) = hyper_answer(e) {
            // From when the head began to arrive, as for any request.
            let start = match state.phase() {
                (ConnPhase::Reading, since) => since,
                _ => Instant::now(),
            };
            state.shared.proxy.refused_head(&state.ctx, status, start);
        }
    } else if e.is_timeout() {
        figures.head_timeout.fetch_add(1, Relaxed);
        tracing::info!(client = %remote, error = %e, "client connection timed out");
    } else {
        tracing::debug!(client = %remote, error = %e, "client connection ended with an error");
    }
}

/// The status hyper's HTTP/1 server answered a request head it could not take with
/// (`on_error` in its `role.rs`); `None` when it answered nothing: an HTTP/2
/// preface sent to an HTTP/1 connection.
fn hyper_answer(e: &hyper::Error) -> Option<http::StatusCode> {
    if e.is_parse_version_h2() || e.is_parse_status() {
        None
    } else if e.is_parse_too_large() {
        // A head over `max_header_bytes`, or a target over hyper's 64 KiB.
        Some(if e.to_string().starts_with("URI too long") {
            http::StatusCode::URI_TOO_LONG
        } else {
            http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        })
    } else if e.is_parse() {
        Some(http::StatusCode::BAD_REQUEST)
    } else {
        None
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

    #[test]
    fn connection_fields_only_on_http1() {
        let ka = HeaderValue::from_static("timeout=54");
        let field = |v, closing| {
            connection_field(v, closing, Some(&ka)).map(|(n, v)| format!("{n}: {v:?}"))
        };
        assert_eq!(
            field(Version::HTTP_11, false).as_deref(),
            Some("keep-alive: \"timeout=54\"")
        );
        assert_eq!(
            field(Version::HTTP_11, true).as_deref(),
            Some("connection: \"close\"")
        );
        assert_eq!(field(Version::HTTP_2, false), None);
        assert_eq!(field(Version::HTTP_2, true), None);
        assert_eq!(connection_field(Version::HTTP_11, false, None), None);
    }
}
