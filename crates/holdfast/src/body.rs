//! Request bodies on their way upstream: streamed, or kept whole when small enough to
//! send again on a retry.
//!
//! Owns: the replay buffer (bounded by `retry.replay_body_limit`) and the client body
//! size limit (`max_body_bytes`, 413). Does not own: response bodies (see
//! `proxy::response`).

use std::fmt;
use std::pin::Pin;
use std::sync::atomic::{
    AtomicBool, AtomicU8, AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release,
};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::server::conn::UploadHold;

mod spool;

pub use self::spool::{SpoolError, Spooled};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client sent more than `max_body_bytes`.
#[derive(Debug)]
pub struct BodyTooLarge;

impl fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request body exceeds max_body_bytes")
    }
}

impl std::error::Error for BodyTooLarge {}

/// The client's body stopped arriving for longer than the listener's `body_timeout`.
#[derive(Debug)]
pub struct BodyStalled;

impl fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request body stalled longer than body_timeout")
    }
}

impl std::error::Error for BodyStalled {}

/// Reading the client's body failed (it went away, or sent bad chunking).
#[derive(Debug)]
pub struct ClientBodyError(pub hyper::Error);

impl fmt::Display for ClientBodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "reading the client's request body: {}", self.0)
    }
}

impl std::error::Error for ClientBodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// The client went away in the middle of its body (its connection or HTTP/2 stream
/// ended): the cause of a failure whose protocol handle reports only its consequence.
#[derive(Debug)]
pub struct ClientGone;

impl fmt::Display for ClientGone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the client went away in the middle of its request body")
    }
}

impl std::error::Error for ClientGone {}

/// The part of a body read so far. A body that arrives in one piece (most small
/// ones) is kept as hyper's `Bytes`, without a copy.
#[derive(Default)]
struct Kept {
    first: Option<Bytes>,
    more: BytesMut,
}

impl Kept {
    fn push(&mut self, data: Bytes) {
        match self.first.take() {
            None if self.more.is_empty() => self.first = Some(data),
            first => {
                if let Some(f) = first {
                    self.more.extend_from_slice(&f);
                }
                self.more.extend_from_slice(&data);
            }
        }
    }

    fn len(&self) -> u64 {
        (self.first.as_ref().map_or(0, Bytes::len) + self.more.len()) as u64
    }

    fn into_bytes(self) -> Bytes {
        self.first.unwrap_or_else(|| self.more.freeze())
    }
}

/// A request body as holdfast sends it upstream.
#[derive(Debug)]
pub enum RequestBody {
    Empty,
    /// Held whole, so a retry can send it again.
    Buffered {
        data: Option<Bytes>,
        /// Boxed: rare, and a `HeaderMap` inline would triple the size of every body.
        trailers: Option<Box<HeaderMap>>,
    },
    /// Streamed from the client; cannot be replayed. `prefix` holds what was read while
    /// deciding whether the body fits the replay buffer.
    Streaming(Box<Streaming>),
    /// Read whole into a spool file before the request went upstream
    /// ([`RequestBody::spool`]); read back from its start for each attempt.
    Spooled(Box<Spooled>),
}

#[derive(Debug)]
pub struct Streaming {
    prefix: Option<Bytes>,
    incoming: Incoming,
    received: u64,
    limit: u64,
    /// Set once the body has been taken to its end (see [`RequestBody::watch_end`]).
    ended: EndWatch,
    /// Longest wait for the next piece of the body (`0`: none), and the wait's deadline.
    stall: std::time::Duration,
    stall_deadline: crate::timer::StallDeadline,
    /// Keeps the client connection busy until the body ends, fails or is dropped.
    hold: Option<UploadHold>,
}

/// What a streamed body tells about its way upstream, shared with the connection that
/// sends it: whether it has been taken to its end, and what must live as long as the
/// protocol handle may still be sending it (an HTTP/2 stream lease: the stream stays
/// open, and counts against the upstream's `SETTINGS_MAX_CONCURRENT_STREAMS`, until
/// the body's last piece went out, even after the response ended).
#[derive(Default)]
pub struct BodyEnd {
    ended: AtomicBool,
    /// When it ended, for the time to first byte that counts from there
    /// (`upstream::head_due`): one clock reading per streamed body.
    ended_at: OnceLock<tokio::time::Instant>,
    /// Bytes handed to the protocol handle so far. A plain store by the one body: no
    /// read-modify-write per piece.
    taken: AtomicU64,
    /// How the body failed, if it did: [`BodyEnd::TOO_LARGE`], [`BodyEnd::CLIENT`] or
    /// [`BodyEnd::GONE`].
    failed: AtomicU8,
    held: Mutex<Option<Box<dyn Send>>>,
}

impl fmt::Debug for BodyEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BodyEnd")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl BodyEnd {
    const TOO_LARGE: u8 = 1;
    const CLIENT: u8 = 2;
    const GONE: u8 = 3;

    /// The body failed on its way: over `max_body_bytes`, or the client's own body
    /// failed. A protocol handle may report only its consequence (HTTP/2: the stream
    /// hyper reset for it), not the cause.
    pub fn failure(&self) -> Option<BodyFailure> {
        match self.failed.load(Acquire) {
            Self::TOO_LARGE => Some(BodyFailure::TooLarge),
            Self::CLIENT => Some(BodyFailure::Client),
            Self::GONE => Some(BodyFailure::Gone),
            _ => None,
        }
    }

    /// The body has been taken to its end.
    pub fn is_ended(&self) -> bool {
        self.ended.load(Acquire)
    }

    /// When the body was taken to its end, if it was.
    pub fn ended_at(&self) -> Option<tokio::time::Instant> {
        self.ended_at.get().copied()
    }

    /// How many bytes of it the protocol handle has taken so far.
    pub fn taken(&self) -> u64 {
        self.taken.load(Relaxed)
    }

    /// Keeps `what` until the body ends or is dropped; gives it back if it has ended.
    ///
    /// # Errors
    /// `what`, when the body has ended already.
    pub fn hold(&self, what: Box<dyn Send>) -> Result<(), Box<dyn Send>> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_ended() {
            return Err(what);
        }
        *held = Some(what);
        Ok(())
    }

    /// A body held whole that a protocol handle writes as the upstream takes it
    /// (FastCGI's STDIN, read by the script): `bytes` of it written so far.
    pub(crate) fn wrote(&self, bytes: u64) {
        self.taken.store(bytes, Relaxed);
    }

    /// That body has been written whole.
    pub(crate) fn wrote_all(&self) {
        self.end();
    }

    fn end(&self) {
        let _ = self.ended_at.set(tokio::time::Instant::now());
        let held = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            self.ended.store(true, Release);
            held.take()
        };
        drop(held);
    }

    /// The body is gone without an end (failed, or dropped by the protocol): nothing
    /// is being sent any more.
    fn abandon(&self) {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(held);
    }
}

/// How a streamed body failed (see [`BodyEnd::failure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFailure {
    TooLarge,
    /// Stalled past `body_timeout`, or bad chunking.
    Client,
    /// The client's connection (or HTTP/2 stream) ended under it: it went away.
    Gone,
}

/// A streamed body's [`BodyEnd`], if watched; lets go of what it holds on drop.
#[derive(Debug, Default)]
struct EndWatch(Option<Arc<BodyEnd>>);

impl EndWatch {
    fn took(&self, bytes: u64) {
        if let Some(e) = &self.0 {
            e.taken.store(bytes, Relaxed);
        }
    }

    fn end(&self) {
        if let Some(e) = &self.0 {
            e.end();
        }
    }

    fn abandon(&self) {
        if let Some(e) = &self.0 {
            e.abandon();
        }
    }

    fn fail(&self, how: u8) {
        if let Some(e) = &self.0 {
            e.failed.store(how, Release);
            e.abandon();
        }
    }
}

impl Drop for EndWatch {
    fn drop(&mut self) {
        self.abandon();
    }
}

impl RequestBody {
    /// Reads up to `replay_limit` bytes of the client's body: a body that ends within it
    /// is kept whole (replayable); a longer one streams on, its first part included.
    ///
    /// # Errors
    /// The client's body failed or exceeded `max_body` (0 = no limit).
    pub async fn prepare(
        mut incoming: Incoming,
        replay_limit: u64,
        max_body: u64,
        stall: std::time::Duration,
    ) -> Result<RequestBody, BoxError> {
        let limit = if max_body == 0 { u64::MAX } else { max_body };
        if incoming.is_end_stream() {
            return Ok(RequestBody::Empty);
        }
        if let Some(exact) = incoming.size_hint().exact()
            && exact > limit
        {
            return Err(Box::new(BodyTooLarge));
        }
        use http_body_util::BodyExt;
        let mut kept = Kept::default();
        // The loop of `next_frame`, written out: called, it cost ~500 instructions
        // per request with a body (a future of its own, the error boxed twice).
        while kept.len() <= replay_limit {
            // A piece already here needs no deadline (nor a clock reading).
            let frame = match futures_util::FutureExt::now_or_never(incoming.frame()) {
                Some(f) => f,
                None if stall.is_zero() => incoming.frame().await,
                None => match tokio::time::timeout(stall, incoming.frame()).await {
                    Ok(f) => f,
                    Err(_) => return Err(Box::new(BodyStalled)),
                },
            };
            match frame {
                None => {
                    return Ok(RequestBody::Buffered {
                        data: Some(kept.into_bytes()),
                        trailers: None,
                    });
                }
                Some(Err(e)) => return Err(Box::new(ClientBodyError(e))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        kept.push(data);
                        if kept.len() > limit {
                            return Err(Box::new(BodyTooLarge));
                        }
                    }
                    Err(frame) => {
                        // Trailers end the body (none left: as if none came).
                        let trailers = frame
                            .into_trailers()
                            .ok()
                            .map(|mut t| {
                                crate::proxy::headers::remove_from_trailers(&mut t);
                                t
                            })
                            .filter(|t| !t.is_empty())
                            .map(Box::new);
                        return Ok(RequestBody::Buffered {
                            data: Some(kept.into_bytes()),
                            trailers,
                        });
                    }
                },
            }
        }
        let received = kept.len();
        Ok(RequestBody::Streaming(Box::new(Streaming {
            prefix: Some(kept.into_bytes()),
            incoming,
            received,
            limit,
            ended: EndWatch::default(),
            stall,
            stall_deadline: Default::default(),
            hold: None,
        })))
    }

    /// Reads the client's whole body before anything goes upstream: up to `memory`
    /// bytes in memory ([`RequestBody::Buffered`]), a longer body in an unlinked file
    /// in `dir` ([`RequestBody::Spooled`]; `None`: the system's temporary directory). Either can be sent again on a retry.
    /// Trailers are not kept: the one user, FastCGI, has no place for them.
    ///
    /// # Errors
    /// The client's body failed, stalled or exceeded `max_body` (0 = no limit), or the
    /// spool file failed ([`SpoolError`]).
    pub async fn spool(
        mut incoming: Incoming,
        memory: u64,
        max_body: u64,
        stall: std::time::Duration,
        dir: Option<&std::path::Path>,
    ) -> Result<RequestBody, BoxError> {
        let limit = if max_body == 0 { u64::MAX } else { max_body };
        if incoming.is_end_stream() {
            return Ok(RequestBody::Empty);
        }
        if let Some(exact) = incoming.size_hint().exact()
            && exact > limit
        {
            return Err(Box::new(BodyTooLarge));
        }
        let mut kept = Kept::default();
        let mut file: Option<spool::SpoolWriter> = None;
        while let Some(frame) = next_frame(&mut incoming, stall).await? {
            let Ok(data) = frame.into_data() else {
                // Trailers end the body.
                break;
            };
            if let Some(f) = file.as_mut() {
                if f.len() + data.len() as u64 > limit {
                    return Err(Box::new(BodyTooLarge));
                }
                f.push(&data).await?;
                continue;
            }
            kept.push(data);
            if kept.len() > limit {
                return Err(Box::new(BodyTooLarge));
            }
            if kept.len() > memory {
                let mut f = spool::SpoolWriter::create(dir).await?;
                f.push(&kept.into_bytes()).await?;
                kept = Kept::default();
                file = Some(f);
            }
        }
        Ok(match file {
            Some(f) => RequestBody::Spooled(Box::new(f.finish().await?)),
            None => RequestBody::Buffered {
                data: Some(kept.into_bytes()),
                trailers: None,
            },
        })
    }

    /// Streams the client's body without buffering any of it.
    pub fn stream(incoming: Incoming, max_body: u64, stall: std::time::Duration) -> RequestBody {
        if incoming.is_end_stream() {
            return RequestBody::Empty;
        }
        let limit = if max_body == 0 { u64::MAX } else { max_body };
        RequestBody::Streaming(Box::new(Streaming {
            prefix: None,
            incoming,
            received: 0,
            limit,
            ended: EndWatch::default(),
            stall,
            stall_deadline: Default::default(),
            hold: None,
        }))
    }

    /// A streamed body keeps what `hold` gives (the client connection busy) until it
    /// ends, fails or is dropped; other bodies call nothing.
    pub fn hold_connection(&mut self, hold: impl FnOnce() -> Option<UploadHold>) {
        if let RequestBody::Streaming(s) = self {
            s.hold = hold();
        }
    }

    /// A copy for another attempt, if this body can be sent again.
    pub fn try_clone(&self) -> Option<RequestBody> {
        match self {
            RequestBody::Empty => Some(RequestBody::Empty),
            RequestBody::Buffered { data, trailers } => Some(RequestBody::Buffered {
                data: data.clone(),
                trailers: trailers.clone(),
            }),
            RequestBody::Spooled(s) => Some(RequestBody::Spooled(Box::new(s.rewound()))),
            RequestBody::Streaming(_) => None,
        }
    }

    /// A flag set once a streamed body has been taken to its end; `None` for a body
    /// held whole, which is taken at once. A connection whose protocol handle still
    /// sends the body after the response has ended (hyper's, over TLS) is not ready
    /// for another request until then.
    pub fn watch_end(&mut self) -> Option<Arc<BodyEnd>> {
        match self {
            RequestBody::Streaming(s) => Some(s.ended.0.get_or_insert_default().clone()),
            _ => None,
        }
    }

    pub fn full(data: impl Into<Bytes>) -> RequestBody {
        RequestBody::Buffered {
            data: Some(data.into()),
            trailers: None,
        }
    }
}

/// The client's next body frame, waiting at most `stall` (0: no limit) for it.
async fn next_frame(
    incoming: &mut Incoming,
    stall: std::time::Duration,
) -> Result<Option<Frame<Bytes>>, BoxError> {
    use http_body_util::BodyExt;
    // A piece already here needs no deadline (nor a clock reading).
    let frame = match futures_util::FutureExt::now_or_never(incoming.frame()) {
        Some(f) => f,
        None if stall.is_zero() => incoming.frame().await,
        None => match tokio::time::timeout(stall, incoming.frame()).await {
            Ok(f) => f,
            Err(_) => return Err(Box::new(BodyStalled)),
        },
    };
    frame
        .transpose()
        .map_err(|e| Box::new(ClientBodyError(e)) as BoxError)
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Buffered { data, trailers } => {
                if let Some(d) = data.take().filter(|d| !d.is_empty()) {
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(*t))))
            }
            RequestBody::Spooled(s) => s.poll_next(cx).map(|o| o.map(|r| r.map(Frame::data))),
            RequestBody::Streaming(s) => {
                if let Some(p) = s.prefix.take().filter(|p| !p.is_empty()) {
                    s.ended.took(p.len() as u64);
                    // The part read ahead may be the whole body: then it ends here,
                    // and hyper asks no more (see below).
                    if s.incoming.is_end_stream() {
                        s.ended.end();
                        s.hold = None;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                let polled = Pin::new(&mut s.incoming).poll_frame(cx);
                if polled.is_ready() {
                    s.stall_deadline.progressed();
                } else if s.stall_deadline.expired(s.stall, cx) {
                    s.ended.fail(BodyEnd::CLIENT);
                    s.hold = None;
                    return Poll::Ready(Some(Err(Box::new(BodyStalled))));
                }
                match polled {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(None) => {
                        s.ended.end();
                        s.hold = None;
                        Poll::Ready(None)
                    }
                    Poll::Ready(Some(Err(e))) => {
                        s.ended
                            .fail(if crate::upstream::error::connection_ended(&e) {
                                BodyEnd::GONE
                            } else {
                                BodyEnd::CLIENT
                            });
                        s.hold = None;
                        Poll::Ready(Some(Err(Box::new(ClientBodyError(e)))))
                    }
                    Poll::Ready(Some(Ok(mut frame))) => {
                        if let Some(t) = frame.trailers_mut() {
                            crate::proxy::headers::remove_from_trailers(t);
                        }
                        if let Some(d) = frame.data_ref() {
                            s.received += d.len() as u64;
                            if s.received > s.limit {
                                s.ended.fail(BodyEnd::TOO_LARGE);
                                s.hold = None;
                                return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                            }
                            s.ended.took(s.received);
                        }
                        // hyper asks no more of a body that says it has ended (the
                        // last piece of a sized one), so its end is noted here too.
                        if s.incoming.is_end_stream() {
                            s.ended.end();
                            s.hold = None;
                        }
                        Poll::Ready(Some(Ok(frame)))
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Buffered { data, trailers } => {
                data.as_ref().is_none_or(Bytes::is_empty) && trailers.is_none()
            }
            RequestBody::Streaming(s) => s.prefix.is_none() && s.incoming.is_end_stream(),
            RequestBody::Spooled(s) => s.is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Buffered { data, trailers } => {
                let len = data.as_ref().map_or(0, |d| d.len() as u64);
                if trailers.is_some() {
                    // Not exact: trailers need chunked framing, not Content-Length.
                    let mut hint = SizeHint::new();
                    hint.set_lower(len);
                    hint
                } else {
                    SizeHint::with_exact(len)
                }
            }
            RequestBody::Spooled(s) => SizeHint::with_exact(s.remaining()),
            RequestBody::Streaming(s) => {
                let prefix = s.prefix.as_ref().map_or(0, |p| p.len() as u64);
                let inner = s.incoming.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + prefix);
                if let Some(u) = inner.upper() {
                    hint.set_upper(u + prefix);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_in_one_piece_is_kept_without_a_copy() {
        let data = Bytes::from(vec![7u8; 4096]);
        let mut kept = Kept::default();
        kept.push(data.clone());
        assert_eq!(kept.len(), 4096);
        let out = kept.into_bytes();
        assert_eq!(out.as_ptr(), data.as_ptr(), "the same buffer, not a copy");
    }

    #[test]
    fn a_body_in_pieces_is_joined_in_order() {
        let mut kept = Kept::default();
        for part in [&b"ab"[..], b"", b"cde", b"f"] {
            kept.push(Bytes::copy_from_slice(part));
        }
        assert_eq!(kept.len(), 6);
        assert_eq!(kept.into_bytes(), Bytes::from_static(b"abcdef"));
        assert!(Kept::default().into_bytes().is_empty());
    }
}
