//! One plain HTTP/1.1 upstream connection, driven by the request that holds it.
//!
//! The request's own task writes the request and reads the response head
//! ([`Http1Conn::begin`], then [`Http1Conn::poll_response`]), and the client
//! connection's task reads the body as hyper's server asks for it
//! ([`Http1Conn::poll_body`]). Nothing is handed between tasks: no channel, no
//! wake-up of a connection task per request (hyper's client runs the connection on
//! a task of its own; the hand-offs cost about a sixth of a small request's
//! user-space instructions).
//!
//! While the connection is idle in the pool, its driver task (`watch_idle`) is
//! the one woken by the socket's readability, so a FIN, a reset or stray bytes end
//! the connection at once, as hyper's driver did. The hand-over costs no wake-up:
//! parking ([`Http1Conn::park`]) registers the connection's own waker with the
//! socket directly, and that waker wakes the driver. It also counts its wake-ups,
//! which lets the check at reuse ([`Http1Conn::is_closed`]) tell with two loads that
//! the reactor has reported nothing since the socket was last seen quiet. A mutex
//! orders the driver's look at the socket against a request taking the connection,
//! which may run on another worker thread; both sides only ever take it
//! uncontended.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use http::{HeaderMap, Method, Response};
use http_body::{Body as _, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::codec::{self, ChunkedDecoder, Framing, RequestFraming, ResponseHead};
use crate::body::{BodyTooLarge, RequestBody};
use crate::timer::Timer;
use crate::upstream::SetFields;
use crate::upstream::error::{Delivery, Kind, UpstreamError};
use crate::upstream::figures::CloseReason;
use crate::upstream::io::{Stream, UpstreamIo};

/// Read buffer allocation. A new one is taken only when less than
/// [`MIN_READ_ROOM`] is left, so several small responses share one.
const READ_CHUNK: usize = 8 * 1024;
const MIN_READ_ROOM: usize = 1024;
/// A read that fills the room it had doubles the next allocation, up to this, for
/// the rest of the response: a large body then takes a read per 256 KiB rather
/// than per 8 KiB. Against a 64 KiB cap (hyper's client's), a 1 MiB response costs
/// ~18% less proxy CPU and goes ~30% faster (bench `get-1m`): fewer reads, writes
/// and wake-ups for the same bytes. What is left of the last chunk is let go when
/// the response ends ([`Http1Conn::end_body`]), so an idle connection does not keep it.
const MAX_READ_CHUNK: usize = 256 * 1024;
/// Largest read buffer: a response body is handed on as it arrives, so only a
/// head (at most [`codec::MAX_HEAD`]) or a chunk-size line needs to accumulate.
const MAX_READ_BUF: usize = codec::MAX_HEAD + MAX_READ_CHUNK;
/// Most request pieces written in one `writev`.
const MAX_IOVECS: usize = 8;

/// How the response body is being read.
#[derive(Debug)]
enum Decoding {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
}

/// One HTTP/1.1 connection over a plain (TCP or Unix) socket.
pub struct Http1Conn {
    io: UpstreamIo,
    stream: Arc<Stream>,
    write_timeout: std::time::Duration,
    read_buf: BytesMut,
    /// What the next read buffer allocation asks for.
    read_chunk: usize,
    head_scratch: codec::HeadScratch,
    /// Request bytes not yet written, in order (head, body pieces, chunk framing).
    queue: VecDeque<Bytes>,
    scratch: BytesMut,
    /// The request body still to send, when it is not sent whole from `queue`.
    body: Option<RequestBody>,
    chunked: bool,
    /// The request was written completely (or there is none in flight).
    request_done: bool,
    /// Some byte of the current request was written.
    sent_any: bool,
    head_request: bool,
    /// `None` once the response body ended (or before a response).
    decoding: Option<Decoding>,
    response_started: bool,
    /// The response said this connection carries no further request.
    must_close: bool,
    /// The last response's `Keep-Alive` field.
    keep_alive: Option<Bytes>,
    /// Something went wrong mid-exchange: never reuse.
    broken: bool,
    /// Writing the request failed as the upstream closed it; its answer, if it
    /// sent one first, is read before this error is returned.
    write_failed: Option<UpstreamError>,
    watch: Arc<IdleWatch>,
    /// `watch` as a waker: the one registered for the socket's readability while the
    /// connection is idle (see [`IdleWatch`]).
    idle_waker: Waker,
    /// The response-head deadline, one timer for the connection's life: each request
    /// moves it later, which tokio does with one compare-and-swap, where a timer per
    /// request would be registered in the wheel and taken out again (~650
    /// instructions). Left armed between requests; it only fires if no request moves
    /// it for a whole `response_headers` timeout, and then only wakes the task that
    /// last polled it, once, for nothing.
    deadline: Option<Timer<Box<tokio::time::Sleep>>>,
    /// While a streamed request body is still going out: when the response head is
    /// due once it has (see [`Http1Conn::set_deadline`]).
    after_body: Option<HeadDue>,
    /// Some of the request was written since the deadline was last set.
    body_progress: bool,
}

/// Sets up a connection on a connected plain socket (HTTP/1 has no handshake) and
/// returns it with its idle watcher.
pub fn connect(
    stream: Arc<Stream>,
    write_timeout: std::time::Duration,
) -> (Http1Conn, impl Future<Output = ()> + Send + 'static) {
    let watch = Arc::new(IdleWatch::new());
    let idle_waker = Waker::from(watch.clone());
    let conn = Http1Conn {
        io: UpstreamIo::new(stream.clone(), write_timeout),
        stream: stream.clone(),
        write_timeout,
        read_buf: BytesMut::new(),
        read_chunk: READ_CHUNK,
        head_scratch: codec::HeadScratch::default(),
        queue: VecDeque::with_capacity(4),
        scratch: BytesMut::new(),
        body: None,
        chunked: false,
        request_done: true,
        sent_any: false,
        head_request: false,
        decoding: None,
        response_started: false,
        must_close: false,
        keep_alive: None,
        broken: false,
        write_failed: None,
        watch: watch.clone(),
        idle_waker: idle_waker.clone(),
        deadline: None,
        after_body: None,
        body_progress: false,
    };
    (conn, watch_idle(stream, watch, idle_waker))
}

/// When a response head is due (see [`Http1Conn::set_deadline`]).
#[derive(Debug, Clone, Copy)]
pub struct HeadDue {
    /// `timeouts.response_headers`, counted from when the request was written whole.
    pub timeout: std::time::Duration,
    /// The request's `timeouts.total` deadline, if it has one: the head is due by
    /// then in any case.
    pub total: Option<tokio::time::Instant>,
}

impl HeadDue {
    /// The head's deadline for a request written whole at `at`.
    pub fn after(self, at: tokio::time::Instant) -> tokio::time::Instant {
        let by = at + self.timeout;
        match self.total {
            Some(total) if total < by => total,
            _ => by,
        }
    }
}

impl Http1Conn {
    /// Sets when the response head must have come (see [`Http1Conn::poll_deadline`]),
    /// for the request [`Http1Conn::begin`] took, handed the connection at `sent_at`:
    /// `due.timeout` after it is written whole. That is at once for a request that
    /// goes out with its head. One whose body streams (from the client, as it
    /// arrives) is timed from the body's end, as the upstream answers once it has
    /// it; meanwhile the body is given another `due.timeout` each time one passes
    /// with some of it written (its gaps are the listener's `body_timeout`'s to
    /// bound, its writes `timeouts.write`'s). Timed from its head, a slow upload got
    /// 504 while it was still arriving: with the defaults, every upload taking
    /// longer than 60 s. `due.total` applies throughout.
    pub fn set_deadline(&mut self, sent_at: tokio::time::Instant, due: HeadDue) {
        self.after_body = self.body.is_some().then_some(due);
        self.body_progress = false;
        self.arm_deadline(due.after(sent_at));
    }

    fn arm_deadline(&mut self, at: tokio::time::Instant) {
        match &mut self.deadline {
            Some(timer) => timer.reset(at),
            None => self.deadline = Some(Timer::new(Box::pin(tokio::time::sleep_until(at)))),
        }
    }

    /// Ready once the time set by [`Http1Conn::set_deadline`] has passed.
    pub fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Bounded: a second turn follows a reset to a later time, whose poll
        // registers for it.
        loop {
            let Some(timer) = &mut self.deadline else {
                return Poll::Pending;
            };
            if !timer.poll_due(cx) {
                return Poll::Pending;
            }
            match self.after_body {
                // A streamed body still going out, and some of it went since the
                // deadline was set: another `timeout` (by `total` at the latest).
                Some(due) if self.body_progress => {
                    self.body_progress = false;
                    timer.reset(due.after(tokio::time::Instant::now()));
                }
                _ => return Poll::Ready(()),
            }
        }
    }

    /// The upstream closed the connection (or sent something) while it was idle. A
    /// failed exchange is not this: [`Http1Conn::park`] refuses that connection, as
    /// an error rather than as evidence of the upstream's keep-alive limits.
    ///
    /// Asked as the pool hands an idle connection out, this also catches an event
    /// tokio's reactor reported since the park but the driver task has not yet run
    /// for (it may be queued behind this very task), which would otherwise reach
    /// the request: stray bytes would be read as the answer to the request sent
    /// next (a response desync: a stray second response becomes the next client's
    /// answer). In the common case that costs two loads (`IdleWatch::quiet`): the
    /// socket was seen quiet with the connection's own waker registered, and the
    /// reactor has not woken it since. Otherwise the readiness the reactor holds is
    /// looked at, and only an event there prompts a peek at the socket. What the
    /// kernel holds and the reactor has not yet reported is seen only by the peek
    /// of requests that cannot be retried (`Pool::checkout`).
    pub fn is_closed(&self) -> bool {
        if self.watch.quiet() {
            return false;
        }
        let mut st = self.watch.lock();
        if st.ended || st.busy {
            return st.ended;
        }
        // Registers the connection's own waker again: the driver's from here on.
        self.watch
            .poll_idle(&mut st, &self.stream, &self.idle_waker)
            .is_ready()
    }

    /// The last response's `Keep-Alive` value.
    pub fn keep_alive(&self) -> Option<&[u8]> {
        self.keep_alive.as_deref()
    }

    /// The response head or its framing said the connection ends with it.
    pub fn must_close(&self) -> bool {
        self.must_close
    }

    /// Keeps a field map that is done with (the request's, once its response head
    /// is in) to hold the next response head's fields: see `HeadScratch::recycle`.
    pub fn recycle_map(&mut self, map: http::HeaderMap) {
        self.head_scratch.recycle(map);
    }

    /// Takes the connection for a request: encodes the head and queues it (and a
    /// body held whole) to be written by [`Http1Conn::poll_response`].
    ///
    /// # Errors
    /// The connection was found closed: nothing was sent, and the body comes back
    /// for another attempt.
    /// The head is only read: the caller keeps it for another attempt. `set` are
    /// fields the proxy sets, written along with the head's own.
    pub fn begin(
        &mut self,
        parts: &http::request::Parts,
        set: Option<&SetFields>,
        body: RequestBody,
    ) -> Result<(), (UpstreamError, RequestBody)> {
        if self.broken || !self.watch.begin() {
            let e = UpstreamError::new(Kind::Closed, Delivery::NotSent)
                .with_cause("connection closed while idle");
            return Err((e, body));
        }
        let framing = request_framing(&parts.headers, &body);
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        match set {
            Some(set) => {
                let (replaced, n) = set.replaced();
                codec::encode_request_head_with(
                    &mut self.scratch,
                    &parts.method,
                    target,
                    &parts.headers,
                    framing,
                    &replaced[..n],
                    &SetFields::appended(),
                );
            }
            None => codec::encode_request_head(
                &mut self.scratch,
                &parts.method,
                target,
                &parts.headers,
                framing,
            ),
        }
        self.queue.push_back(self.scratch.split().freeze());
        self.chunked = framing == RequestFraming::Chunked;
        self.body = match body {
            RequestBody::Empty => None,
            // A body held whole goes out with the head, in one write.
            RequestBody::Buffered {
                data,
                trailers: None,
            } if !self.chunked => {
                self.queue.extend(data.filter(|d| !d.is_empty()));
                None
            }
            other => Some(other),
        };
        self.head_request = parts.method == Method::HEAD;
        self.write_failed = None;
        self.request_done = false;
        self.sent_any = false;
        self.response_started = false;
        self.must_close = false;
        self.decoding = None;
        Ok(())
    }

    /// Writes the request and reads until its final response head (informational
    /// responses other than `101` are skipped).
    pub fn poll_response(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Response<super::super::Payload>, UpstreamError>> {
        loop {
            if !self.request_done {
                if let Poll::Ready(Err(e)) = self.poll_write_request(cx) {
                    self.broken = true;
                    // Nothing of the request left: whatever is read cannot answer it.
                    if e.kind() != Kind::Closed || e.delivery() == Delivery::NotSent {
                        return Poll::Ready(Err(e));
                    }
                    // The upstream stopped taking the request (a reset after an early
                    // answer): what it answered before is still to be read, and is the
                    // answer; the write's failure is only the error without one.
                    self.abandon_request();
                    self.write_failed = Some(e);
                }
                // A streamed body went out whole (or was given up): the head is
                // due `timeout` from now (one clock reading, for such a body only).
                if self.request_done
                    && let Some(due) = self.after_body.take()
                {
                    self.arm_deadline(due.after(tokio::time::Instant::now()));
                }
            }
            let method = self.method_for_framing();
            match codec::parse_response_head_with(
                &mut self.read_buf,
                &method,
                &mut self.head_scratch,
            ) {
                Ok(Some(head)) if head.status.is_informational() && head.status.as_u16() != 101 => {
                    continue;
                }
                Ok(Some(head)) => {
                    self.write_failed = None;
                    return Poll::Ready(Ok(self.start_body(head)));
                }
                Ok(None) => {}
                Err(e) => {
                    self.broken = true;
                    return Poll::Ready(Err(UpstreamError::new(
                        Kind::Protocol,
                        Delivery::MaybeSent,
                    )
                    .with_cause(e)));
                }
            }
            let filled = ready!(self.poll_fill(cx));
            // The end, or an error, with no answer after a failed write: that failure.
            if matches!(filled, Ok(0) | Err(_))
                && let Some(e) = self.write_failed.take()
            {
                return Poll::Ready(Err(e));
            }
            match filled {
                Ok(0) => {
                    self.broken = true;
                    let delivery = if self.sent_any {
                        Delivery::MaybeSent
                    } else {
                        Delivery::NotSent
                    };
                    // A close before any response byte is what a stale connection
                    // looks like; one in the middle of a head, or after an
                    // informational response (consumed, so the buffer is empty
                    // again), is not: the upstream took the request and began to
                    // answer.
                    let (kind, what) = if !self.response_started {
                        (Kind::Closed, "connection closed before any response byte")
                    } else if self.read_buf.is_empty() {
                        (
                            Kind::Io,
                            "connection closed after an informational response",
                        )
                    } else {
                        (
                            Kind::Io,
                            "connection closed in the middle of the response head",
                        )
                    };
                    return Poll::Ready(Err(UpstreamError::new(kind, delivery).with_cause(what)));
                }
                Ok(_) => self.response_started = true,
                Err(e) => {
                    self.broken = true;
                    return Poll::Ready(Err(self.io_error(e)));
                }
            }
        }
    }

    fn method_for_framing(&self) -> Method {
        if self.head_request {
            Method::HEAD
        } else {
            Method::GET
        }
    }

    fn start_body(&mut self, head: ResponseHead) -> Response<super::super::Payload> {
        self.must_close |= head.must_close;
        self.keep_alive = head.keep_alive;
        self.decoding = match head.framing {
            Framing::None | Framing::Length(0) => None,
            Framing::Length(n) => Some(Decoding::Length(n)),
            Framing::Chunked => Some(Decoding::Chunked(ChunkedDecoder::new())),
            Framing::UntilClose => Some(Decoding::UntilClose),
        };
        let mut resp = Response::new(super::super::Payload::Http1 {
            empty: self.decoding.is_none(),
            hop_by_hop_removed: head.hop_by_hop_removed,
        });
        *resp.status_mut() = head.status;
        *resp.version_mut() = head.version;
        *resp.headers_mut() = head.headers;
        if let Some(reason) = head
            .reason
            .and_then(|r| hyper::ext::ReasonPhrase::try_from(r).ok())
        {
            resp.extensions_mut().insert(reason);
        }
        resp
    }

    /// After a failure with not a byte of the request written: the request's body,
    /// untouched (only the head was being written), for another attempt.
    pub fn take_unsent_body(&mut self) -> Option<RequestBody> {
        if self.sent_any {
            return None;
        }
        self.body.take()
    }

    /// The request, its body included, has been written whole. Not so for one given
    /// up after an early answer (its write failed as the upstream closed): the rest
    /// of its body is dropped, and so left unread from the client. Until the
    /// response head is in, `broken` means only that.
    pub fn request_sent(&self) -> bool {
        self.request_done && !self.broken
    }

    /// The response body ended (or there is none).
    pub fn body_done(&self) -> bool {
        self.decoding.is_none()
    }

    /// What is left of the response body, when known.
    pub fn body_size_hint(&self) -> SizeHint {
        match &self.decoding {
            None => SizeHint::with_exact(0),
            Some(Decoding::Length(n)) => SizeHint::with_exact(*n),
            Some(_) => SizeHint::default(),
        }
    }

    /// The next piece of the response body; `None` at its end. A request body still
    /// being sent goes on being sent meanwhile.
    pub fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        if !self.request_done {
            // `Ready` without `request_done` is a failed write: the upstream stopped
            // taking the request (it answered early). Its response is still read to
            // the end, but the connection cannot be reused.
            let wrote = self.poll_write_request(cx);
            if wrote.is_ready() && !self.request_done {
                self.abandon_request();
            }
        }
        loop {
            let Some(decoding) = self.decoding.as_mut() else {
                return Poll::Ready(None);
            };
            match decoding {
                Decoding::Length(left) => {
                    if let Some(data) = codec::take_length(&mut self.read_buf, left) {
                        if *left == 0 {
                            self.end_body();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Decoding::Chunked(decoder) => match decoder.decode(&mut self.read_buf) {
                    Ok(codec::Chunk::Data(data)) => {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(codec::Chunk::Trailers(t)) => {
                        // The trailer section ends the body, and hyper's server polls
                        // no further after a trailers frame.
                        self.end_body();
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(codec::Chunk::End) => {
                        self.end_body();
                        return Poll::Ready(None);
                    }
                    Ok(codec::Chunk::More) => {}
                    Err(e) => {
                        let e =
                            UpstreamError::new(Kind::Protocol, Delivery::MaybeSent).with_cause(e);
                        return self.fail_body(e);
                    }
                },
                Decoding::UntilClose => {
                    if !self.read_buf.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(self.read_buf.split().freeze()))));
                    }
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    if matches!(self.decoding, Some(Decoding::UntilClose)) {
                        self.end_body();
                        return Poll::Ready(None);
                    }
                    let e = UpstreamError::new(Kind::Io, Delivery::MaybeSent)
                        .with_cause("upstream closed the connection in the middle of the body");
                    return self.fail_body(e);
                }
                Ok(_) => {}
                Err(e) => {
                    let e = UpstreamError::new(Kind::Io, Delivery::MaybeSent).with_cause(e);
                    return self.fail_body(e);
                }
            }
        }
    }

    /// The body failed: the connection is never reused.
    fn fail_body(
        &mut self,
        error: UpstreamError,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        self.broken = true;
        Poll::Ready(Some(Err(error)))
    }

    fn end_body(&mut self) {
        self.decoding = None;
        self.read_chunk = READ_CHUNK;
        // The room left in a large chunk would stay allocated while the connection
        // idles (the chunk's `Bytes` are long gone by the next response): small
        // responses share an ordinary chunk instead.
        if self.read_buf.is_empty() && self.read_buf.capacity() > READ_CHUNK {
            self.read_buf = BytesMut::new();
        }
        if !self.request_done {
            self.abandon_request();
        }
    }

    fn abandon_request(&mut self) {
        self.body = None;
        self.queue.clear();
        self.request_done = true;
        self.broken = true;
    }

    /// Writes queued request bytes, then pulls the request body, until it is all
    /// written (`Ready(Ok)`) or something blocks (`Pending`, with a waker registered
    /// on the socket or on the client's body).
    fn poll_write_request(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        loop {
            while !self.queue.is_empty() {
                let mut slices = [io::IoSlice::new(&[]); MAX_IOVECS];
                let mut n = 0;
                for (slot, piece) in slices.iter_mut().zip(self.queue.iter()) {
                    *slot = io::IoSlice::new(piece);
                    n += 1;
                }
                let written =
                    match ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..n])) {
                        Ok(0) => {
                            return Poll::Ready(Err(
                                self.write_error(io::ErrorKind::WriteZero.into())
                            ));
                        }
                        Ok(w) => w,
                        Err(e) => return Poll::Ready(Err(self.write_error(e))),
                    };
                self.sent_any = true;
                self.body_progress = true;
                advance(&mut self.queue, written);
            }
            let Some(body) = self.body.as_mut() else {
                self.request_done = true;
                return Poll::Ready(Ok(()));
            };
            match ready!(Pin::new(body).poll_frame(cx)) {
                None => {
                    self.body = None;
                    if self.chunked {
                        codec::encode_last_chunk(&mut self.scratch, None);
                        self.queue.push_back(self.scratch.split().freeze());
                    }
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => {}
                    Ok(data) if self.chunked => {
                        codec::chunk_prefix(&mut self.scratch, data.len());
                        self.queue.push_back(self.scratch.split().freeze());
                        self.queue.push_back(data);
                        self.queue
                            .push_back(Bytes::from_static(codec::CHUNK_SUFFIX));
                    }
                    Ok(data) => self.queue.push_back(data),
                    Err(frame) => {
                        // Trailers end the body; without chunked framing they have
                        // no place and are dropped (the client sent a length).
                        if let (true, Ok(trailers)) = (self.chunked, frame.into_trailers()) {
                            codec::encode_last_chunk(&mut self.scratch, Some(&trailers));
                            self.queue.push_back(self.scratch.split().freeze());
                        } else if self.chunked {
                            codec::encode_last_chunk(&mut self.scratch, None);
                            self.queue.push_back(self.scratch.split().freeze());
                        }
                        self.body = None;
                    }
                },
                Some(Err(e)) => {
                    let kind = if e.is::<BodyTooLarge>() {
                        Kind::BodyTooLarge
                    } else {
                        Kind::ClientBody
                    };
                    return Poll::Ready(Err(
                        UpstreamError::new(kind, Delivery::MaybeSent).with_cause(e)
                    ));
                }
            }
        }
    }

    fn write_error(&self, e: io::Error) -> UpstreamError {
        let delivery = if self.sent_any {
            Delivery::MaybeSent
        } else {
            Delivery::NotSent
        };
        let kind = match e.kind() {
            io::ErrorKind::TimedOut => Kind::WriteTimeout,
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => Kind::Closed,
            _ => Kind::Io,
        };
        UpstreamError::new(kind, delivery).with_cause(e)
    }

    fn io_error(&self, e: io::Error) -> UpstreamError {
        let kind = match e.kind() {
            // Before the response head, a reset is the upstream closing the
            // connection, like a FIN: a stale pooled connection when it was reused.
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
                if !self.response_started =>
            {
                Kind::Closed
            }
            io::ErrorKind::TimedOut => Kind::WriteTimeout,
            _ => Kind::Io,
        };
        UpstreamError::new(kind, Delivery::MaybeSent).with_cause(e)
    }

    /// Reads more of the response into `read_buf`: `Ok(0)` at end of input.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read_buf.len() >= MAX_READ_BUF {
            // Only a head or a chunk-size line accumulates, and the codec refuses
            // those long before this: never reached with a working codec.
            return Poll::Ready(Err(io::Error::other("response head too large")));
        }
        if self.read_buf.capacity() - self.read_buf.len() < MIN_READ_ROOM {
            self.read_buf.reserve(self.read_chunk);
        }
        let room = self.read_buf.capacity() - self.read_buf.len();
        let read = tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read_buf);
        if let Poll::Ready(Ok(n)) = read
            && n == room
        {
            self.read_chunk = (self.read_chunk * 2).min(MAX_READ_CHUNK);
        }
        read
    }

    /// Makes the connection idle after a complete exchange: the driver watches the
    /// socket from now on.
    ///
    /// # Errors
    /// Why the connection cannot be pooled: the exchange did not end cleanly, or the
    /// upstream already closed it or sent bytes nobody asked for.
    pub fn park(&mut self) -> Result<(), CloseReason> {
        if self.broken || !self.request_done || self.decoding.is_some() || self.must_close {
            return Err(CloseReason::Error);
        }
        if !self.read_buf.is_empty() {
            // Bytes beyond the response: a confused or hostile upstream.
            return Err(CloseReason::Error);
        }
        let mut st = self.watch.lock();
        st.busy = false;
        // Registers the connection's own waker for the socket's next event (it wakes
        // the driver), without running the driver; one that has not run yet will.
        if self
            .watch
            .poll_idle(&mut st, &self.stream, &self.idle_waker)
            .is_ready()
        {
            return Err(CloseReason::ClosedByUpstreamIdle);
        }
        Ok(())
    }

    /// After a `101 Switching Protocols`: the socket, with what was read past the
    /// response head, for the tunnel. The connection is not used again.
    pub fn take_upgraded(&mut self) -> Upgraded {
        self.broken = true;
        self.decoding = None;
        Upgraded {
            io: UpstreamIo::new(self.stream.clone(), self.write_timeout),
            leftover: std::mem::take(&mut self.read_buf).freeze(),
        }
    }
}

/// Request framing: a length when the body's size is known, chunked otherwise.
fn request_framing(headers: &HeaderMap, body: &RequestBody) -> RequestFraming {
    match body.size_hint().exact() {
        // As hyper does: an empty body gets a length only if the client gave one.
        Some(0) if !headers.contains_key(http::header::CONTENT_LENGTH) => RequestFraming::None,
        Some(n) => RequestFraming::Length(n),
        None => RequestFraming::Chunked,
    }
}

/// Drops `n` written bytes from the front of the queue.
fn advance(queue: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = queue.front_mut() else {
            return;
        };
        if n < front.len() {
            front.advance(n);
            return;
        }
        n -= front.len();
        queue.pop_front();
    }
}

/// What the connection and its driver share. As a waker (the connection's
/// `idle_waker`), it is the one registered for the socket's readability while the
/// connection is idle: tokio's reactor wakes it for a FIN, a reset or bytes, and it
/// counts the wake-up and wakes the driver task.
///
/// The count lets the check at reuse skip the socket (`IdleWatch::quiet`). Each
/// look at an idle socket (`IdleWatch::poll_idle`: at the park, by the driver, or by
/// a check that found the connection not quiet) reads the count, then registers
/// this waker, under tokio's lock, and finds nothing: any event from then on wakes
/// this waker, any event before it was in the readiness the look saw. Only then
/// does it note the count it read as the one the socket was quiet at. While the
/// count has not moved since, the reactor has reported nothing since that look. A
/// wake-up that falls between the count's read and the note (the driver on another
/// thread) makes them differ, as does any that comes after: the check then looks
/// at the socket as before.
struct IdleWatch {
    state: Mutex<WatchState>,
    /// Wake-ups of this waker, by the reactor or tokio's budget (a wake-up that
    /// was not an event only costs a look).
    wakes: AtomicU64,
    /// `wakes` as read before the last look that found the idle socket quiet;
    /// [`NOT_QUIET`] when none holds (never looked, or the connection ended).
    quiet_at: AtomicU64,
    /// The driver task's waker, once it has run.
    driver: AtomicWaker,
}

/// `IdleWatch::quiet_at` when no look found the socket quiet: `wakes` never gets
/// there.
const NOT_QUIET: u64 = u64::MAX;

#[derive(Default)]
struct WatchState {
    /// A request holds the connection: the driver must not touch the socket.
    busy: bool,
    /// The upstream closed the connection (or sent something) while it was idle.
    ended: bool,
}

impl Wake for IdleWatch {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // Before the driver is woken, so that it reads the new count. Release: a
        // check that reads it then sees the readiness the reactor set before.
        self.wakes.fetch_add(1, AcqRel);
        self.driver.wake();
    }
}

impl IdleWatch {
    fn new() -> IdleWatch {
        IdleWatch {
            state: Mutex::default(),
            wakes: AtomicU64::new(0),
            quiet_at: AtomicU64::new(NOT_QUIET),
            driver: AtomicWaker::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, WatchState> {
        // Nothing panics while holding it; a poisoned lock still holds valid flags.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The idle socket was seen quiet, with this waker registered, and the reactor
    /// has not woken it since: nothing happened on the socket that the reactor has
    /// reported. Two loads, no lock; `false` only means "look".
    fn quiet(&self) -> bool {
        self.quiet_at.load(Acquire) == self.wakes.load(Acquire)
    }

    /// Looks at the idle socket (see [`Stream::poll_idle`]) with `waker` (this
    /// watch's own) registered for its next event; notes a quiet socket, marks an
    /// ended connection. Called with the lock held and the connection idle.
    fn poll_idle(&self, st: &mut WatchState, stream: &Stream, waker: &Waker) -> Poll<()> {
        let wakes = self.wakes.load(Acquire);
        match stream.poll_idle(&mut Context::from_waker(waker)) {
            Poll::Pending => {
                self.quiet_at.store(wakes, Release);
                Poll::Pending
            }
            Poll::Ready(probe) => {
                tracing::debug!(?probe, "idle upstream connection ended");
                st.ended = true;
                self.quiet_at.store(NOT_QUIET, Release);
                Poll::Ready(())
            }
        }
    }

    /// A request takes the connection; `false` if it already ended.
    fn begin(&self) -> bool {
        let mut st = self.lock();
        if st.ended {
            return false;
        }
        st.busy = true;
        true
    }
}

/// The driver of an idle connection: ends when the socket shows anything while no
/// request holds the connection. The pool then forgets it (`on_driver_end`).
/// `idle_waker` is `watch` as a waker: the one it registers with the socket, which
/// wakes this task.
async fn watch_idle(stream: Arc<Stream>, watch: Arc<IdleWatch>, idle_waker: Waker) {
    std::future::poll_fn(|cx| {
        // Before the look, so that a wake-up after it reaches this task.
        watch.driver.register(cx.waker());
        let mut st = watch.lock();
        if st.busy {
            return Poll::Pending;
        }
        watch.poll_idle(&mut st, &stream, &idle_waker)
    })
    .await;
}

/// The upstream side of a protocol switch: the socket, after the bytes that came
/// with the `101` response.
pub struct Upgraded {
    io: UpstreamIo,
    leftover: Bytes,
}

impl AsyncRead for Upgraded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.leftover.is_empty() {
            let n = self.leftover.len().min(buf.remaining());
            buf.put_slice(&self.leftover[..n]);
            self.leftover.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Upgraded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::config::TcpConfig;

    /// A large response reads in growing chunks, and an idle connection keeps none of
    /// the last one.
    #[tokio::test]
    async fn a_large_body_leaves_no_large_read_buffer_behind() {
        const BODY: usize = 2 * 1024 * 1024;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let upstream = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut b = [0u8; 1];
                assert_eq!(s.read(&mut b).await.expect("read"), 1, "request head");
                head.push(b[0]);
            }
            let mut out = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
            out.resize(out.len() + BODY, b'x');
            s.write_all(&out).await.expect("write");
            // Stay open: the connection is to be pooled.
            let _ = s.read(&mut [0u8; 1]).await;
        });
        let stream = Arc::new(
            Stream::connect_tcp(addr, &TcpConfig::default())
                .await
                .expect("connect"),
        );
        let (mut conn, _watch) = connect(stream, Duration::from_secs(5));
        let (parts, ()) = http::Request::get("/big")
            .header(http::header::HOST, "up")
            .body(())
            .expect("request")
            .into_parts();
        conn.begin(&parts, None, RequestBody::Empty).expect("begin");
        let resp = poll_fn(|cx| conn.poll_response(cx))
            .await
            .expect("response");
        assert_eq!(resp.status(), 200);

        let (mut total, mut largest) = (0, 0);
        while let Some(frame) = poll_fn(|cx| conn.poll_body(cx)).await {
            let data = frame.expect("body").into_data().expect("data");
            total += data.len();
            largest = largest.max(data.len());
            if total == BODY {
                break;
            }
        }
        // The end is seen on the poll after the last byte.
        assert!(poll_fn(|cx| conn.poll_body(cx)).await.is_none());
        assert_eq!(total, BODY);
        assert!(
            largest > READ_CHUNK,
            "reads grew past {READ_CHUNK} bytes: {largest}"
        );
        assert!(
            conn.read_buf.capacity() <= READ_CHUNK,
            "kept {} bytes of read buffer",
            conn.read_buf.capacity()
        );
        conn.park().expect("poolable");
        upstream.abort();
    }

    /// One complete `GET` exchange on `conn`, answered from `far`, then the park;
    /// `driver`, if given, is polled while the request holds the connection.
    async fn exchange<F: Future<Output = ()>>(
        conn: &mut Http1Conn,
        far: &mut tokio::net::UnixStream,
        driver: Option<&mut Pin<Box<F>>>,
    ) {
        let (parts, ()) = http::Request::get("/")
            .header(http::header::HOST, "up")
            .body(())
            .expect("request")
            .into_parts();
        conn.begin(&parts, None, RequestBody::Empty).expect("begin");
        if let Some(driver) = driver {
            poll_driver(driver).await;
        }
        far.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await
            .expect("respond");
        let resp = poll_fn(|cx| conn.poll_response(cx))
            .await
            .expect("response");
        assert_eq!(resp.status(), 200);
        while let Some(frame) = poll_fn(|cx| conn.poll_body(cx)).await {
            frame.expect("body");
        }
        conn.park().expect("poolable");
    }

    /// Returns once tokio's reactor has taken in what the kernel reported before the
    /// call: a byte sent on another socket pair is waited for, and one turn of the
    /// reactor reports every socket then ready.
    async fn reactor_turn() {
        let (a, b) = tokio::net::UnixStream::pair().expect("pair");
        assert_eq!(b.try_write(b"x").expect("write"), 1);
        a.readable().await.expect("readable");
    }

    /// Polls the idle connection's driver once (it stays pending: nothing happened).
    async fn poll_driver(driver: &mut Pin<Box<impl Future<Output = ()>>>) {
        poll_fn(|cx| {
            assert!(driver.as_mut().poll(cx).is_pending(), "the driver ended");
            Poll::Ready(())
        })
        .await;
    }

    #[derive(Clone, Copy, Debug)]
    enum DriverRan {
        Never,
        WhileBusy,
        AfterPark,
    }

    #[derive(Clone, Copy, Debug)]
    enum IdleEvent {
        StrayBytes,
        Fin,
    }

    /// An idle connection reused several times; then the upstream sends stray bytes or
    /// closes it, and tokio's reactor reports it before the driver runs again. The
    /// check at reuse must see it, wherever the driver's last run fell: never (it is
    /// queued behind the request that opened the connection), during the last
    /// exchange, or after the last park. Between exchanges nothing happened, and the
    /// check must take no look at the socket (`IdleWatch::quiet`).
    async fn an_event_the_reactor_reported_is_seen_at_reuse(ran: DriverRan, event: IdleEvent) {
        let (near, mut far) = tokio::net::UnixStream::pair().expect("pair");
        let (mut conn, driver) = connect(Arc::new(Stream::unix(near)), Duration::from_secs(5));
        let mut driver = Box::pin(driver);
        for _ in 0..3 {
            let busy_poll = matches!(ran, DriverRan::WhileBusy).then_some(&mut driver);
            exchange(&mut conn, &mut far, busy_poll).await;
            if let DriverRan::AfterPark = ran {
                poll_driver(&mut driver).await;
            }
            reactor_turn().await;
            assert!(conn.watch.quiet(), "{ran:?}: not quiet after the park");
            assert!(!conn.is_closed(), "{ran:?}: closed with nothing sent");
        }
        match event {
            IdleEvent::StrayBytes => far
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray")
                .await
                .expect("stray response"),
            IdleEvent::Fin => far.shutdown().await.expect("FIN"),
        }
        reactor_turn().await;
        assert!(!conn.watch.quiet(), "{ran:?}, {event:?}: still quiet");
        assert!(
            conn.is_closed(),
            "{ran:?}, {event:?}: handed out after the reactor reported it"
        );
        let (parts, ()) = http::Request::get("/")
            .header(http::header::HOST, "up")
            .body(())
            .expect("request")
            .into_parts();
        assert!(conn.begin(&parts, None, RequestBody::Empty).is_err());
    }

    #[tokio::test]
    async fn stray_bytes_are_seen_at_reuse_before_the_driver_ever_ran() {
        an_event_the_reactor_reported_is_seen_at_reuse(DriverRan::Never, IdleEvent::StrayBytes)
            .await;
    }

    #[tokio::test]
    async fn stray_bytes_are_seen_at_reuse_after_the_driver_ran_while_busy() {
        an_event_the_reactor_reported_is_seen_at_reuse(DriverRan::WhileBusy, IdleEvent::StrayBytes)
            .await;
    }

    #[tokio::test]
    async fn stray_bytes_are_seen_at_reuse_after_the_driver_ran_since_the_park() {
        an_event_the_reactor_reported_is_seen_at_reuse(DriverRan::AfterPark, IdleEvent::StrayBytes)
            .await;
    }

    #[tokio::test]
    async fn a_fin_is_seen_at_reuse_before_the_driver_ever_ran() {
        an_event_the_reactor_reported_is_seen_at_reuse(DriverRan::Never, IdleEvent::Fin).await;
    }

    #[tokio::test]
    async fn a_fin_is_seen_at_reuse_after_the_driver_ran_since_the_park() {
        an_event_the_reactor_reported_is_seen_at_reuse(DriverRan::AfterPark, IdleEvent::Fin).await;
    }
}
