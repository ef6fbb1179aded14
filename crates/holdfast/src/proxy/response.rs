//! Response bodies on their way to the client; each ends its request's access-log
//! line (`access_log.rs`) when it ends.
//!
//! An upstream body carries its pooled connection: reading the body to its end hands
//! the connection back to the pool; an error, a timeout or a client that goes away
//! drops it, which closes it. Deadlines between body chunks (`read_idle`) and for the
//! whole exchange (`total`) live here too.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use super::access_log::AccessRecord;
use super::figures::Tally;
use crate::body::BoxError;
use crate::server::conn::{InFlight, PIECE};
use crate::upstream::Payload;
use crate::upstream::figures::CloseReason;
use crate::upstream::peer::Outstanding;
use crate::upstream::pool::{Client, PooledConn};

/// The body of every response holdfast sends to a client.
pub struct ResponseBody {
    kind: Kind,
    /// Marks the client connection busy until the response is written.
    pub(crate) in_flight: Option<InFlight>,
}

enum Kind {
    Full(Option<Bytes>),
    Upstream(Box<UpstreamBody>),
    /// An upstream's answer with no body by its status or its request's method.
    Bodiless,
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if let (Some(in_flight), Kind::Upstream(u)) = (&mut self.in_flight, &mut self.kind) {
            if in_flight.send_timed_out(u.done && u.rest.is_empty()) {
                u.cut_by_send_timeout();
            }
            // hyper drops the body in the poll that saw it end, which read the clock then.
            if let Some(at) = u.ended_at {
                in_flight.ended_at(at);
            }
        }
    }
}

impl ResponseBody {
    pub fn full(data: impl Into<Bytes>) -> Self {
        ResponseBody {
            kind: Kind::Full(Some(data.into())),
            in_flight: None,
        }
    }

    pub fn empty() -> Self {
        ResponseBody {
            kind: Kind::Full(None),
            in_flight: None,
        }
    }

    /// holdfast's own answer, not an upstream's.
    pub(crate) fn is_local(&self) -> bool {
        matches!(self.kind, Kind::Full(_))
    }

    /// The answer may end with the request's body still unread from the client
    /// (dropped then, so hyper closes the connection): holdfast's own answer, or an
    /// upstream's that came before the body was all sent (see
    /// [`UpstreamBody::request_unsent`]).
    pub(crate) fn may_leave_request_body(&self) -> bool {
        match &self.kind {
            Kind::Full(_) => true,
            Kind::Upstream(u) => u.request_unsent,
            Kind::Bodiless => false,
        }
    }

    pub(crate) fn upstream(body: Box<UpstreamBody>) -> Self {
        ResponseBody {
            kind: Kind::Upstream(body),
            in_flight: None,
        }
    }

    /// An upstream's answer that has no body by its status or its request's method
    /// (HEAD, 204, 304), its upstream body dropped (see [`UpstreamBody::complete_at`]).
    pub(crate) fn bodiless() -> Self {
        ResponseBody {
            kind: Kind::Bodiless,
            in_flight: None,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match &mut this.kind {
            Kind::Full(data) => {
                let data = data.take().filter(|d| !d.is_empty());
                // HTTP/2 under `send_timeout`: hyper holds the piece until the
                // stream's window takes some of it (see `streams.rs`).
                if let Some(watch) = this.in_flight.as_ref().and_then(InFlight::stream) {
                    watch.polled(data.is_some());
                }
                Poll::Ready(data.map(|d| Ok(Frame::data(d))))
            }
            Kind::Upstream(u) => {
                // HTTP/2 under `send_timeout`: each poll is noted for the connection
                // task, which cuts a stream that holds a piece untaken too long.
                let Some(watch) = this.in_flight.as_ref().and_then(InFlight::stream) else {
                    let polled = u.poll_frame(cx, false);
                    if let (Poll::Ready(Some(Err(_))), Some(in_flight)) = (&polled, &this.in_flight)
                    {
                        in_flight.body_cut();
                    }
                    return polled;
                };
                let polled = u.poll_frame(cx, true);
                // The last piece too: hyper keeps it, and the body, until the
                // stream's window takes some of it.
                watch.polled(matches!(polled, Poll::Ready(Some(Ok(_)))));
                polled
            }
            Kind::Bodiless => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(data) => data.as_ref().is_none_or(Bytes::is_empty),
            Kind::Upstream(u) => u.is_end_stream(),
            Kind::Bodiless => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            Kind::Upstream(u) => u.body.size_hint(),
            Kind::Bodiless => SizeHint::default(),
        }
    }
}

enum Source {
    Http(Incoming),
    /// Plain HTTP/1.1: read from the connection.
    Http1 {
        ended: bool,
    },
    /// FastCGI STDOUT: the part that came with the head, then the connection.
    FastCgi {
        first: Option<Bytes>,
        ended: bool,
    },
}

impl Source {
    fn is_end_stream(&self) -> bool {
        match self {
            Source::Http(b) => b.is_end_stream(),
            Source::Http1 { ended } | Source::FastCgi { ended, .. } => *ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Source::Http(b) => b.size_hint(),
            Source::Http1 { ended: true } => SizeHint::with_exact(0),
            Source::Http1 { .. } | Source::FastCgi { .. } => SizeHint::default(),
        }
    }
}

/// The deadlines a body read is under.
#[derive(Debug, Clone, Copy)]
pub struct BodyDeadlines {
    pub read_idle: Option<Duration>,
    pub total: Option<Instant>,
}

pub(crate) struct UpstreamBody {
    body: Source,
    conn: Option<PooledConn>,
    deadlines: BodyDeadlines,
    /// One timer, re-armed in place, for both deadlines.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
    done: bool,
    /// A failure of the upstream body not reported to hyper yet (see `poll_frame`).
    failed: Option<BoxError>,
    bytes: u64,
    log: Option<Box<AccessRecord>>,
    /// Counted in the route's figures when the body ends or is dropped.
    tally: Option<Tally>,
    /// When the body ended and the connection was released.
    ended_at: Option<Instant>,
    /// FastCGI: the client has the whole body once this many bytes went out.
    complete_at: Option<u64>,
    /// Held while the connection is in use (`drain_fastcgi` takes it).
    outstanding: Option<Outstanding>,
    /// What is left of a chunk handed over in pieces (`streams::PIECE`).
    rest: Bytes,
    /// Plain HTTP/1.1: the upstream answered before the request body was all sent.
    /// The connection is not pooled with the request unfinished, and closing it at
    /// the answer's end drops the rest of the client's body, unless it was all sent
    /// by then.
    pub(crate) request_unsent: bool,
}

/// FastCGI: STDOUT read and dropped after the client has the whole body, at most;
/// beyond it, closing the connection is cheaper than reading on.
const DRAIN_LIMIT: u64 = 1 << 20;

impl UpstreamBody {
    pub fn new(
        payload: Payload,
        conn: PooledConn,
        deadlines: BodyDeadlines,
        (log, tally): (Option<Box<AccessRecord>>, Tally),
        outstanding: Outstanding,
    ) -> Box<Self> {
        let body = match payload {
            Payload::Http(b) => Source::Http(b),
            Payload::Http1 { empty, .. } => Source::Http1 { ended: empty },
            Payload::FastCgi(first) => Source::FastCgi {
                first: Some(first).filter(|b| !b.is_empty()),
                ended: false,
            },
        };
        // Boxed where it is built: returned by value and boxed by the caller, it
        // was copied once more (~470 bytes, per request; callgrind).
        let mut this = Box::new(UpstreamBody {
            body,
            conn: Some(conn),
            deadlines,
            timer: None,
            armed: false,
            done: false,
            failed: None,
            bytes: 0,
            log,
            tally: Some(tally),
            ended_at: None,
            complete_at: None,
            outstanding: Some(outstanding),
            rest: Bytes::new(),
            request_unsent: false,
        });
        // A response without a body (204, 304, HEAD, Content-Length: 0) is complete now.
        if this.body.is_end_stream() {
            this.finish();
        }
        this
    }

    /// FastCGI: the client has the whole body once `n` bytes of it went out (0 for a
    /// response with no body by its status or its request's method). A FastCGI body
    /// only ends at END_REQUEST, and hyper's server drops a body it will send no more
    /// of without reading it to that end (it never polls the body of a HEAD, 204 or
    /// 304 response); dropped after that many bytes, this body leaves its connection
    /// to [`drain_fastcgi`] instead of closing it as abandoned.
    pub(crate) fn complete_at(&mut self, n: u64) {
        self.complete_at = Some(n);
    }

    /// Hands the connection to [`drain_fastcgi`] when the client has the whole body;
    /// `false` otherwise.
    fn drain_rest(&mut self) -> bool {
        if self.complete_at.is_none_or(|n| self.bytes < n) {
            return false;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let Some(conn) = self.conn.take() else {
            return false;
        };
        runtime.spawn(drain_fastcgi(conn, self.deadlines, self.outstanding.take()));
        true
    }

    fn finish(&mut self) {
        self.done = true;
        if let Some(conn) = self.conn.take() {
            // One clock reading for the pool and, when the body is dropped, the
            // request's duration: both within the same poll.
            let now = Instant::now();
            conn.release(now);
            self.ended_at = Some(now);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && (self.conn.is_none() && self.done || self.declared_sent())
    }

    /// FastCGI: the client has every byte the declared `Content-Length` promised.
    /// The body ends there for the client (RFC 9113 8.1.1: HTTP/2 DATA must add up
    /// to it), whatever else the script writes before END_REQUEST, which the
    /// dropped body reads (`drain_rest`).
    fn declared_sent(&self) -> bool {
        self.failed.is_none() && self.complete_at.is_some_and(|n| self.bytes >= n)
    }

    /// The client took none of the response for `send_timeout`: the connection, if
    /// still held, is closed as timed out.
    fn cut_by_send_timeout(&mut self) {
        self.fail(CloseReason::Timeout, "send_timeout");
    }

    fn fail(&mut self, reason: CloseReason, what: &'static str) {
        self.done = true;
        self.close(reason, what);
    }

    /// Closes the connection and records why, leaving `done` (and so
    /// `is_end_stream`) as it is.
    fn close(&mut self, reason: CloseReason, what: &'static str) {
        if let Some(mut conn) = self.conn.take() {
            conn.set_close_reason(reason);
        }
        if let Some(log) = &mut self.log {
            log.outcome = what;
        }
    }

    /// `in_pieces`: hand data over in pieces of at most `streams::PIECE` bytes.
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
        in_pieces: bool,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(e) = self.failed.take() {
            self.done = true;
            return Poll::Ready(Some(Err(e)));
        }
        if !self.rest.is_empty() {
            let piece = self.rest.split_to(self.rest.len().min(PIECE));
            self.bytes += piece.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        if self.done && self.conn.is_none() && self.body.is_end_stream() || self.declared_sent() {
            return Poll::Ready(None);
        }
        match self.poll_source(cx) {
            Poll::Ready(Some(Ok(mut frame))) => {
                self.armed = false;
                // The timer is set only when a read has to wait: behind a client that
                // reads slower than the upstream sends, every read finds data, and
                // `total` is looked at here (a clock reading per piece, only with
                // `total` set) or never.
                if let Some(total) = self.deadlines.total
                    && Instant::now() >= total
                {
                    return self.timed_out("total_timeout");
                }
                // FastCGI frames by END_REQUEST: bytes past the script's own
                // `Content-Length` are not sent (hyper's HTTP/1 server cuts them
                // alike; over HTTP/2 they would make the response malformed).
                if let Some(n) = self.complete_at
                    && let Some(d) = frame.data_mut()
                    && self.bytes + d.len() as u64 > n
                {
                    tracing::warn!(
                        declared = n,
                        "FastCGI response longer than its Content-Length; the rest is not sent"
                    );
                    d.truncate(usize::try_from(n - self.bytes).unwrap_or(usize::MAX));
                }
                if in_pieces
                    && let Some(d) = frame.data_mut()
                    && d.len() > PIECE
                {
                    self.rest = d.split_off(PIECE);
                }
                if let Some(d) = frame.data_ref() {
                    self.bytes += d.len() as u64;
                } else if let Some(t) = frame.trailers_mut() {
                    super::headers::remove_from_response_trailers(t);
                }
                // hyper's server stops polling once `is_end_stream` says so, and after
                // a trailers frame (which ends a body, though hyper's HTTP/1 client
                // body does not say so then), so the connection must be released
                // here, not on a later `None`.
                if frame.is_trailers() || self.body.is_end_stream() {
                    self.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) if self.complete_at.is_some_and(|n| self.bytes < n) => {
                // Shorter than its `Content-Length`: cut, as a failed body is, never
                // passed off as complete (over HTTP/2, END_STREAM would make it
                // malformed, RFC 9113 8.1.1).
                tracing::warn!(
                    declared = self.complete_at,
                    sent = self.bytes,
                    "FastCGI response shorter than its Content-Length"
                );
                self.close(CloseReason::Error, "upstream_body_error");
                self.failed = Some("FastCGI response shorter than its Content-Length".into());
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(None) => {
                self.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                // Reported one poll late: hyper's server writes out what it has
                // buffered (the head, earlier chunks) when the body says `Pending`,
                // but drops it when the body fails, and the client must see the
                // response cut short, not missing. Not `done` meanwhile, so that
                // `is_end_stream` cannot pass the cut body off as complete.
                tracing::warn!(error = %e, "upstream response body failed");
                self.close(CloseReason::Error, "upstream_body_error");
                self.failed = Some(e);
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Pending => self.poll_deadline(cx),
        }
    }

    fn poll_source(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.body {
            Source::Http(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Source::Http1 { ended } => {
                let Some(conn) = self.conn.as_mut() else {
                    return Poll::Ready(None);
                };
                let Client::Http1(c) = conn.client() else {
                    return Poll::Ready(None);
                };
                let frame = c.poll_body(cx);
                *ended = c.body_done();
                frame.map_err(Into::into)
            }
            Source::FastCgi { first, ended } => {
                if let Some(data) = first.take() {
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                let Some(conn) = self.conn.as_mut() else {
                    return Poll::Ready(None);
                };
                let Client::FastCgi(c) = conn.client() else {
                    return Poll::Ready(None);
                };
                match c.poll_body(cx) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(None) => {
                        *ended = true;
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Ok(data))) => Poll::Ready(Some(Ok(Frame::data(data)))),
                    Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
                }
            }
        }
    }

    fn poll_deadline(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.armed {
            let idle_at = self.deadlines.read_idle.map(|d| Instant::now() + d);
            let at = match (idle_at, self.deadlines.total) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => match a.or(b) {
                    Some(t) => t,
                    None => return Poll::Pending,
                },
            };
            match &mut self.timer {
                Some(t) => t.as_mut().reset(at),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            self.armed = true;
        }
        let Some(timer) = self.timer.as_mut() else {
            return Poll::Pending;
        };
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        let total = self.deadlines.total.is_some_and(|t| t <= Instant::now());
        self.timed_out(if total {
            "total_timeout"
        } else {
            "read_idle_timeout"
        })
    }

    fn timed_out(&mut self, what: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        tracing::warn!(
            timeout = what,
            "upstream response body timed out; closing its connection"
        );
        self.fail(CloseReason::Timeout, what);
        Poll::Ready(Some(Err(what.into())))
    }
}

use std::future::Future as _;

/// Reads a FastCGI answer the client already has whole on to its END_REQUEST,
/// dropping any STDOUT (at most [`DRAIN_LIMIT`] bytes), then pools the connection.
/// Under the body's deadlines; on any failure the connection closes.
async fn drain_fastcgi(
    mut conn: PooledConn,
    deadlines: BodyDeadlines,
    _outstanding: Option<Outstanding>,
) {
    let mut dropped: u64 = 0;
    // Bounded: each turn reads a record or ends, and the records it reads are
    // bounded by DRAIN_LIMIT and the deadlines.
    loop {
        let Client::FastCgi(c) = conn.client() else {
            return;
        };
        let next = std::future::poll_fn(|cx| c.poll_body(cx));
        let idle_at = deadlines.read_idle.map(|d| Instant::now() + d);
        let at = match (idle_at, deadlines.total) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let next = match at {
            Some(at) => match tokio::time::timeout_at(at, next).await {
                Ok(next) => next,
                Err(_) => {
                    conn.set_close_reason(CloseReason::Timeout);
                    return;
                }
            },
            None => next.await,
        };
        match next {
            None => {
                conn.release(Instant::now());
                return;
            }
            Some(Ok(data)) => {
                dropped += data.len() as u64;
                if dropped > DRAIN_LIMIT {
                    conn.set_close_reason(CloseReason::Abandoned);
                    return;
                }
            }
            Some(Err(_)) => {
                conn.set_close_reason(CloseReason::Error);
                return;
            }
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if !self.done && self.failed.is_none() && !self.drain_rest() {
            // The client went away mid-body: the connection is dropped (closed), never
            // pooled half-read.
            // (Or the drain cut it.)
            self.fail(CloseReason::Abandoned, super::access_log::dropped_outcome());
        }
        if let Some(log) = self.log.take() {
            log.emit(self.bytes);
        }
        if let Some(tally) = self.tally.take() {
            tally.finish_at(self.ended_at.unwrap_or_else(Instant::now));
        }
    }
}
