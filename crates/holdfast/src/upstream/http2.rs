//! HTTP/2 to an upstream: opening a connection, sending one request on a stream of it,
//! and what the pool needs to know about the connection as it lives.
//!
//! hyper's connection-level client (`client::conn::http2`) does the protocol; the
//! connection, and all hyper spawns for it, run in one task of its own (`exec.rs`:
//! that is what makes a GOAWAY error proof that a request was not processed); a
//! request needs only a clone of the sender.
//! The pool shares one connection among many requests (`pool/shared.rs`). What hyper
//! hides, a [`frames::FrameWatch`] on the bytes it reads reports into [`Signals`]: the
//! upstream's `SETTINGS_MAX_CONCURRENT_STREAMS` (a new connection is handed out only
//! once the first SETTINGS arrived, so the pool never counts more free streams than
//! the upstream takes) and `GOAWAY` (the connection takes no new request from that
//! moment). Liveness: hyper sends a PING every `http2.ping_interval`, busy or idle,
//! and closes the connection when one goes unanswered for `http2.ping_timeout`.
//!
//! A request the upstream refused (a GOAWAY below its stream, or `REFUSED_STREAM`)
//! fails as `Kind::Refused`, never sent, so it is retried on another connection even
//! when it is not idempotent: HTTP/2 proves it was not processed (RFC 9113 8.7).

mod exec;
pub mod frames;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicU32, AtomicUsize};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;

use self::exec::{ConnDriver, ConnExec};
use self::frames::{FrameWatch, Seen};
use super::error::{Delivery, Kind, UpstreamError};
use super::io::Stream;
use super::pool::{Client, Connected};
use crate::body::RequestBody;
use crate::config::UpstreamHttp2Config;

/// Streams assumed until the upstream's SETTINGS say otherwise, and kept when they say
/// nothing: what hyper (and h2) assume.
pub const DEFAULT_MAX_STREAMS: usize = 100;

/// Body bytes the upstream may send a stream ahead of what holdfast has taken from it
/// (hyper's default).
const STREAM_WINDOW: u32 = 2 << 20;

/// Body bytes it may send the whole connection ahead: the most HTTP/2 allows (RFC 9113
/// 6.9.1). A stream whose client reads slowly, or not at all, keeps up to its
/// [`STREAM_WINDOW`] unread here, and HTTP/2 counts those bytes against the
/// connection's window too: with hyper's 5 MiB, three clients not reading large
/// answers closed the connection's window, and every other stream on it (with the one
/// connection of the default, every request to the address) got its head and then
/// no more of its body. What a stream holds is still bounded by its own window.
const CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// A request's handle on a shared connection: a clone of hyper's sender and the
/// connection's [`Signals`].
#[derive(Clone)]
pub struct Http2Client {
    sender: hyper::client::conn::http2::SendRequest<RequestBody>,
    pub signals: Arc<Signals>,
    scheme: Scheme,
}

/// What the pool learns about one HTTP/2 connection, from its frames and requests.
#[derive(Debug)]
pub struct Signals {
    max_streams: AtomicUsize,
    settings: AtomicBool,
    going_away: AtomicBool,
    /// The GOAWAY's last-stream-id, for the log.
    last_stream_id: AtomicU32,
    ended: AtomicBool,
    not_http2: AtomicBool,
    /// The gate between requests handing themselves to hyper's dispatcher and the
    /// dispatcher's end: [`SENDS_CLOSED`] once it ended, plus [`ONE_SEND`] per
    /// request being put into its channel (see [`Signals::close_sends`]).
    sends: AtomicUsize,
    /// Woken on every change; one waiter at a time (the connection's drive task).
    pub changed: Notify,
}

/// [`Signals::sends`]: hyper's dispatcher ended; no request goes into its channel.
const SENDS_CLOSED: usize = 1;
/// [`Signals::sends`]: one request being put into the dispatcher's channel.
const ONE_SEND: usize = 2;

/// A request being put into hyper's channel: the dispatcher's channel is not dropped
/// until this is.
struct SendPass<'a>(&'a AtomicUsize);

impl Drop for SendPass<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(ONE_SEND, Release);
    }
}

impl Signals {
    fn new() -> Self {
        Signals {
            max_streams: AtomicUsize::new(DEFAULT_MAX_STREAMS),
            settings: AtomicBool::new(false),
            going_away: AtomicBool::new(false),
            last_stream_id: AtomicU32::new(u32::MAX),
            ended: AtomicBool::new(false),
            not_http2: AtomicBool::new(false),
            sends: AtomicUsize::new(0),
            changed: Notify::new(),
        }
    }

    /// Streams the upstream takes at once on this connection.
    pub fn max_streams(&self) -> usize {
        self.max_streams.load(Relaxed)
    }

    /// The upstream sent GOAWAY, or the connection failed or ended: no new stream.
    pub fn is_going_away(&self) -> bool {
        self.going_away.load(Relaxed) || self.ended.load(Relaxed)
    }

    /// The upstream's GOAWAY, if it sent one: its last-stream-id.
    pub fn goaway_last_stream_id(&self) -> Option<u32> {
        let id = self.last_stream_id.load(Relaxed);
        (id != u32::MAX).then_some(id)
    }

    /// A request saw the connection fail: take no new streams on it.
    pub fn fail(&self) {
        self.ended.store(true, Relaxed);
        self.changed.notify_one();
    }

    fn on_frame(&self, seen: Seen) {
        match seen {
            Seen::Settings {
                max_concurrent_streams,
            } => {
                if let Some(n) = max_concurrent_streams {
                    self.max_streams
                        .store(usize::try_from(n).unwrap_or(usize::MAX), Relaxed);
                }
                self.settings.store(true, Relaxed);
            }
            Seen::GoAway { last_stream_id, .. } => {
                self.last_stream_id.store(last_stream_id, Relaxed);
                self.going_away.store(true, Relaxed);
            }
            Seen::NotHttp2 => {
                self.not_http2.store(true, Relaxed);
                self.ended.store(true, Relaxed);
            }
        }
        self.changed.notify_one();
    }

    /// Lets a request into hyper's channel, unless the dispatcher has ended.
    fn open_send(&self) -> Option<SendPass<'_>> {
        if self.sends.fetch_add(ONE_SEND, AcqRel) & SENDS_CLOSED != 0 {
            self.sends.fetch_sub(ONE_SEND, Relaxed);
            return None;
        }
        Some(SendPass(&self.sends))
    }

    /// The dispatcher ended: no request goes into its channel from now on, and
    /// those going in now are in once this returns, where dropping the channel's
    /// receiver finds them (see [`handshake`]). Bounded by those requests: each
    /// holds its pass only across hyper's synchronous `try_send_request`.
    async fn close_sends(&self) {
        self.sends.fetch_or(SENDS_CLOSED, AcqRel);
        while self.sends.load(Acquire) != SENDS_CLOSED {
            tokio::task::yield_now().await;
        }
    }

    /// Waits for the upstream's first SETTINGS.
    async fn settled(&self) -> Result<(), &'static str> {
        loop {
            if self.not_http2.load(Relaxed) {
                return Err("the upstream does not speak HTTP/2 (its first frame is not SETTINGS)");
            }
            if self.settings.load(Relaxed) {
                return Ok(());
            }
            if self.is_going_away() {
                return Err("the upstream closed the connection before its HTTP/2 SETTINGS");
            }
            self.changed.notified().await;
        }
    }
}

/// Performs the HTTP/2 handshake on a connected (possibly TLS) socket and waits for
/// the upstream's SETTINGS, at most `wait`.
///
/// # Errors
/// The handshake failed, the upstream is not HTTP/2, or its SETTINGS did not come in
/// time; never sent.
pub async fn handshake<IO>(
    io: IO,
    stream: Arc<Stream>,
    tls: bool,
    config: &UpstreamHttp2Config,
    wait: Duration,
) -> Result<Connected, UpstreamError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let signals = Arc::new(Signals::new());
    let io = Watched {
        io,
        watch: FrameWatch::default(),
        signals: signals.clone(),
    };
    let exec = ConnExec::default();
    let mut builder = hyper::client::conn::http2::Builder::new(exec.clone());
    builder
        .timer(TokioTimer::new())
        .initial_max_send_streams(DEFAULT_MAX_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    if let Some(every) = config.ping_interval.non_zero() {
        builder
            .keep_alive_interval(every)
            .keep_alive_timeout(config.ping_timeout.get())
            .keep_alive_while_idle(true);
    }
    let failed = |cause: String| {
        UpstreamError::new(Kind::ConnectFailed, Delivery::NotSent).with_cause(cause)
    };
    let (sender, conn) = builder
        .handshake::<_, RequestBody>(TokioIo::new(io))
        .await
        .map_err(|e| failed(format!("HTTP/2 handshake: {e}")))?;
    let driver_signals = signals.clone();
    let gate = signals.clone();
    let dispatcher = async move {
        let mut conn = conn;
        let ended = (&mut conn).await;
        // hyper's dispatcher ended (a GOAWAY, the connection's end); its request
        // channel's receiver lives on in `conn` until dropped here. Its drop drops
        // the requests still in the channel, and each answers its sender with
        // "connection closed" and the request, unsent: retried. But tokio's
        // `Rx::drop` closes the channel and then drops only what it can pop: a
        // request another thread was pushing at that moment (admitted before the
        // close, its slot not yet written) is not popped, nor any behind it. They
        // stay in the channel until its last sender is dropped, and the senders
        // belong to the connection, which lives as long as a stream is leased on
        // it: those requests' own leases. So they waited, unanswered and never
        // sent, for `timeouts.response_headers` (a 504), with the connection off
        // the list and still counted open. The gate lets every push in progress
        // finish before the receiver is dropped, and lets none start after.
        gate.close_sends().await;
        drop(conn);
        if let Err(e) = ended {
            tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
        }
    };
    let mut driver = Box::pin(ConnDriver::new(dispatcher, exec, move || {
        driver_signals.fail();
    }));
    // The connection reads the upstream's SETTINGS in this task until it is handed
    // to the pool (see `exec`): driven here meanwhile.
    let settled = async {
        tokio::select! {
            biased;
            r = signals.settled() => r,
            () = &mut driver => Err("the upstream closed the connection before its HTTP/2 SETTINGS"),
        }
    };
    match tokio::time::timeout(wait, settled).await {
        // No stream allowed: h2 would hold the request that opened the connection as
        // pending-open, unsent, until its response deadline. Not sent; another
        // connection or address may take it.
        Ok(Ok(())) if signals.max_streams() == 0 => {
            return Err(failed(
                "the upstream's HTTP/2 SETTINGS allow no stream (SETTINGS_MAX_CONCURRENT_STREAMS = 0)"
                    .to_owned(),
            ));
        }
        Ok(Ok(())) => {}
        Ok(Err(why)) => {
            return Err(
                UpstreamError::new(Kind::Protocol, Delivery::NotSent).with_cause(why.to_owned())
            );
        }
        Err(_) => {
            return Err(UpstreamError::new(Kind::ConnectTimeout, Delivery::NotSent)
                .with_cause("no HTTP/2 SETTINGS from the upstream in time"));
        }
    }
    Ok(Connected {
        stream,
        client: Client::Http2(Http2Client {
            sender,
            signals,
            scheme: if tls { Scheme::HTTPS } else { Scheme::HTTP },
        }),
        driver,
    })
}

/// The outcome of one send: a response, or an error and, if the request provably
/// never left, the request itself for another attempt.
pub type SendResult = Result<Response<Incoming>, (UpstreamError, Option<Request<RequestBody>>)>;

/// Sends a request on a new stream. The target becomes absolute (`:scheme`,
/// `:authority` from `Host`, RFC 9113 8.3.1), as HTTP/2 wants.
pub async fn send(client: &mut Http2Client, mut req: Request<RequestBody>) -> SendResult {
    to_http2(&mut req, &client.scheme);
    // The request goes into hyper's channel (`try_send_request` does so before it
    // returns) only while the dispatcher still takes it, or its channel's drop
    // will find it (see `handshake`).
    let Some(pass) = client.signals.open_send() else {
        // The dispatcher ended: never sent.
        client.signals.fail();
        return Err((
            UpstreamError::new(Kind::Closed, Delivery::NotSent)
                .with_cause("the HTTP/2 connection takes no new request"),
            Some(req),
        ));
    };
    let response = client.sender.try_send_request(req);
    drop(pass);
    match response.await {
        Ok(resp) => Ok(resp),
        Err(mut e) => match e.take_message() {
            Some(req) => {
                client.signals.fail();
                Err((
                    UpstreamError::new(Kind::Closed, Delivery::NotSent).with_cause(e.into_error()),
                    Some(req),
                ))
            }
            None => {
                let e = e.into_error();
                if e.is_user() {
                    // "dispatch task is gone": hyper's dispatch task ended (GOAWAY,
                    // the connection's end) while it held this request as the stream
                    // h2 had not opened yet (pending-open: above the upstream's
                    // SETTINGS_MAX_CONCURRENT_STREAMS), and dropped it unanswered.
                    // No frame of it was written. (A user error of the request itself,
                    // the only other kind hyper answers here, is a CONNECT with a body,
                    // which never reaches an upstream.) The one window where its head
                    // was written: the upstream raised its limit, h2 opened the stream,
                    // and the connection ended before hyper's task ran again: a body
                    // was never sent, but a request without one was whole. That needs
                    // a raised limit and the connection's end in one read; a request
                    // held back forever is the likelier loss.
                    client.signals.fail();
                    return Err((
                        UpstreamError::new(Kind::Closed, Delivery::NotSent).with_cause(e),
                        None,
                    ));
                }
                if ends_connection(&e) {
                    client.signals.fail();
                }
                let error = UpstreamError::from_hyper(e);
                if error.kind() == Kind::Refused {
                    // REFUSED_STREAM: the retry goes to a new connection, as the retry
                    // rules say, not back to the one that refuses (it takes no new
                    // stream; those in flight finish).
                    client.signals.fail();
                }
                Err((error, None))
            }
        },
    }
}

impl Http2Client {
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed() || self.signals.is_going_away()
    }
}

/// Whether an error says the whole connection is done, not only this stream.
fn ends_connection(err: &hyper::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_go_away() || h2.is_io();
        }
        if e.downcast_ref::<io::Error>().is_some() {
            return true;
        }
        cur = e.source();
    }
    err.is_closed() || err.is_canceled()
}

fn to_http2(req: &mut Request<RequestBody>, scheme: &Scheme) {
    let authority = req
        .headers_mut()
        .remove(HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok());
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(scheme.clone());
    parts.authority = authority.or_else(|| req.uri().authority().cloned());
    parts.path_and_query = Some(path);
    if parts.authority.is_some()
        && let Ok(uri) = Uri::from_parts(parts)
    {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = http::Version::HTTP_2;
}

/// The I/O under hyper, with the frame watch on what it reads.
struct Watched<IO> {
    io: IO,
    watch: FrameWatch,
    signals: Arc<Signals>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut me.io).poll_read(cx, buf);
        match &res {
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if new.is_empty() {
                    me.signals.fail();
                } else {
                    let signals = &me.signals;
                    me.watch.feed(new, &mut |seen| signals.on_frame(seen));
                }
            }
            // A reset (or any read error) ends the connection as an end of input does:
            // a handshake waiting for SETTINGS must not wait out the connect timeout.
            Poll::Ready(Err(_)) => me.signals.fail(),
            Poll::Pending => {}
        }
        res
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
