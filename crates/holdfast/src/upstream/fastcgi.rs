//! FastCGI to an upstream (php-fpm): one request at a time per connection, with
//! `FCGI_KEEP_CONN` so the connection outlives the request and the pool owns it.
//!
//! The record codec is `holdfast-fastcgi` (sans-I/O); this module drives it over the
//! pool's socket. A request is written whole (BEGIN_REQUEST, PARAMS, STDIN), then
//! STDOUT is parsed into a CGI head and streamed as the body until END_REQUEST. No
//! background task reads a connection in use; while it is idle a watcher waits for
//! it to become readable, which on an idle FastCGI connection means the application
//! closed it (or sent garbage), and ends the connection's life in the pool.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use holdfast_fastcgi::record::{self, RecordType};
use holdfast_fastcgi::{
    EndRequest, HeadParser, Progress, ProtocolStatus, RecordDecoder, ResponseHead, Role,
    ServerValues,
};
use http_body::Body as _;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use super::error::{Delivery, Kind, UpstreamError};
use super::io::{Stream, UpstreamIo};
use super::pool::{Client, Connected};
use crate::body::{BodyEnd, RequestBody};

/// FastCGI request id: php-fpm does not multiplex, so every request is number 1.
const REQUEST_ID: u16 = 1;

/// Where a connection is in its current request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exchange {
    Idle,
    /// Request written (or being written), response head not complete.
    AwaitingHead,
    /// Streaming STDOUT.
    Body,
    /// END_REQUEST received on a clean record boundary: reusable.
    Done,
    /// Something went wrong: never reuse.
    Broken,
}

/// One FastCGI connection.
pub struct FastCgiConn {
    io: UpstreamIo,
    read_buf: BytesMut,
    decoder: RecordDecoder,
    exchange: Exchange,
    /// `true` while a request uses the connection; the idle watcher only acts on `false`.
    busy: watch::Sender<bool>,
    stream: Arc<Stream>,
    label: Arc<str>,
    /// When the last request's streamed body was all written, if it had one: the
    /// wait for the answer runs from then, not from a slow client's upload.
    body_written: Option<tokio::time::Instant>,
    /// The request body still to be written, while the response is read.
    upload: Option<Upload>,
    /// Whether a streamed request body waits on the client (for the pool).
    upload_clock: Arc<UploadClock>,
    /// The next request's body held whole, as it is written ([`FastCgiConn::watch_body`]).
    held_watch: Option<Arc<BodyEnd>>,
}

/// A request body on its way: STDIN records encoded and not yet written, and the
/// client's body they come from.
struct Upload {
    body: RequestBody,
    out: BytesMut,
    /// The empty STDIN record that ends the body is in `out`.
    ended: bool,
    /// Streamed (from the client, or from a spool file): its end dates
    /// `body_written`.
    streamed: bool,
    /// A body held whole: how much of its STDIN is written, for the answer's deadline.
    watch: Option<Arc<BodyEnd>>,
    written: u64,
}

/// Longest wait for a TCP peer's answer to the probe that tells a retired
/// connection from a dead application ([`FastCgiConn::retired_unread`]).
const RETIRE_ANSWER: Duration = Duration::from_secs(1);

/// Longest time a body held whole is still written for a request given up
/// ([`FastCgiConn::finish_held_body`]).
const HELD_BODY_LIMIT: Duration = Duration::from_secs(60);

/// STDIN of at most this many bytes goes out in the write of the request head.
const SMALL_BODY: usize = 64 * 1024;

/// Sets up a FastCGI connection on a connected socket (FastCGI has no handshake).
pub fn connected(stream: Stream, write_timeout: Duration, label: Arc<str>) -> Connected {
    let stream = Arc::new(stream);
    let (busy, busy_rx) = watch::channel(false);
    let conn = FastCgiConn {
        io: UpstreamIo::new(stream.clone(), write_timeout),
        read_buf: BytesMut::with_capacity(8 * 1024),
        decoder: RecordDecoder::new(),
        exchange: Exchange::Idle,
        busy,
        stream: stream.clone(),
        label,
        body_written: None,
        upload: None,
        upload_clock: Arc::default(),
        held_watch: None,
    };
    Connected {
        stream: stream.clone(),
        client: Client::FastCgi(Box::new(conn)),
        driver: Box::pin(watch_idle(stream, busy_rx)),
    }
}

/// Ends when the application closes the connection (or sends anything) while idle.
async fn watch_idle(stream: Arc<Stream>, mut busy: watch::Receiver<bool>) {
    loop {
        if busy.wait_for(|b| !*b).await.is_err() {
            return;
        }
        let event = tokio::select! {
            _ = stream.idle_event() => true,
            r = busy.wait_for(|b| *b) => match r {
                Ok(_) => false,
                Err(_) => return,
            },
        };
        // Readable while idle: closed, or garbage. Either way the connection is done.
        if event && !*busy.borrow() {
            return;
        }
    }
}

/// Whether a connection sending a streamed request body waits on the client for it,
/// for the pool: a new connection waiting on a slow client's upload is not one
/// waiting for a worker (see `Pool::waits_for_worker`). Written as the body is polled
/// (a clock reading per piece of the body), read by the pool.
#[derive(Debug, Default)]
pub struct UploadClock(std::sync::atomic::AtomicU64);

/// [`UploadClock`]: waiting on the client now.
const ON_CLIENT: u64 = u64::MAX;

impl UploadClock {
    /// The client gave a piece of the body (or its end) at `at`.
    fn gave(&self, at: tokio::time::Instant) {
        let micros = crate::timer::micros_since_base(at) + 1;
        self.0.store(micros, std::sync::atomic::Ordering::Relaxed);
    }

    /// Everything given so far is written: the body waits on the client.
    fn waits_on_client(&self) {
        if self.0.load(std::sync::atomic::Ordering::Relaxed) != ON_CLIENT {
            self.0
                .store(ON_CLIENT, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// `Some(None)` while the body waits on the client; `Some(Some(at))` when the
    /// client last gave a piece of it (or its end); `None` before anything.
    pub fn client_wait(&self) -> Option<Option<tokio::time::Instant>> {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            ON_CLIENT => Some(None),
            at => Some(Some(crate::timer::instant_from_micros(at - 1))),
        }
    }
}

impl FastCgiConn {
    /// Broken, or its idle watch has ended (the application closed it or sent
    /// something while it was idle): the watch drops its end of `busy` when it ends.
    pub fn is_closed(&self) -> bool {
        self.exchange == Exchange::Broken || self.busy.is_closed()
    }

    /// Not reusable after its request: something followed END_REQUEST, or the
    /// application ended the request before its STDIN was all written.
    pub fn is_broken(&self) -> bool {
        self.exchange == Exchange::Broken
    }

    /// Whether a streamed request body waits on the client, as the pool reads it.
    pub fn upload_clock(&self) -> Arc<UploadClock> {
        self.upload_clock.clone()
    }

    /// What tells the time to the answer's head how the request body goes out
    /// (`upstream::head_due`), called before [`send`](FastCgiConn::send): a body
    /// streamed from the client tells it itself; a body held whole (in memory or
    /// spooled) too long to go with the request head is written as the script reads
    /// it (PHP reads a PUT body as the script reads `php://input`), so a script that
    /// takes a large upload slowly is still being sent its request when
    /// `response_headers` has passed from the head: the time counts from the end of
    /// the writing, as for a streamed body. One allocation per such body.
    pub fn watch_body(&mut self, body: &mut RequestBody) -> Option<Arc<BodyEnd>> {
        self.held_watch = None;
        let long = match body {
            RequestBody::Streaming(_) => return body.watch_end(),
            RequestBody::Spooled(_) => true,
            // Its STDIN record and the empty one that ends it take 16 bytes more (and
            // padding): past SMALL_BODY it goes out after the head (see `send`).
            RequestBody::Buffered { data: Some(d), .. } => d.len() > SMALL_BODY - 16,
            _ => false,
        };
        if !long {
            return None;
        }
        let watch = Arc::new(BodyEnd::default());
        self.held_watch = Some(watch.clone());
        Some(watch)
    }

    /// Sends one request and reads until its CGI head is complete.
    ///
    /// # Errors
    /// The error, and the body back if not a byte of the request was written.
    pub async fn send(
        &mut self,
        params: &[(Bytes, Bytes)],
        body: RequestBody,
    ) -> Result<ResponseHead, (UpstreamError, Option<RequestBody>)> {
        self.busy.send_replace(true);
        self.exchange = Exchange::AwaitingHead;
        self.body_written = None;
        self.upload = None;
        let mut out = BytesMut::with_capacity(1024);
        record::encode_begin_request(&mut out, REQUEST_ID, Role::Responder, true);
        if let Err(e) = record::encode_params(
            &mut out,
            REQUEST_ID,
            params.iter().map(|(k, v)| (&k[..], &v[..])),
        ) {
            self.exchange = Exchange::Broken;
            return Err((
                UpstreamError::new(Kind::ClientBody, Delivery::NotSent).with_cause(e),
                Some(body),
            ));
        }
        // STDIN goes out while STDOUT is read (`poll_upload`, driven by the reads of
        // the head and the body): PHP reads a PUT body as the script reads
        // `php://input`, and a script that answers as it reads would otherwise fill
        // its STDOUT while holdfast, still writing STDIN, read none of it.
        let mut upload = Upload {
            body: RequestBody::Empty,
            out: BytesMut::new(),
            ended: true,
            streamed: false,
            watch: self.held_watch.take(),
            written: 0,
        };
        match &body {
            RequestBody::Empty => record::encode_stdin(&mut upload.out, REQUEST_ID, b""),
            RequestBody::Buffered { data, .. } => {
                if let Some(d) = data {
                    record::encode_stdin(&mut upload.out, REQUEST_ID, d);
                }
                record::encode_stdin(&mut upload.out, REQUEST_ID, b"");
            }
            RequestBody::Streaming(_) | RequestBody::Spooled(_) => upload.ended = false,
        }
        // A small body goes with the head, in one write.
        if upload.out.len() <= SMALL_BODY {
            out.extend_from_slice(&upload.out);
            upload.out.clear();
        }
        // Written here rather than by `write_all`, to know whether any byte left: a
        // write refused at once (the application reset the connection) sent nothing,
        // and the body, untouched, comes back for another attempt.
        let mut written = 0;
        while written < out.len() {
            let res = std::future::poll_fn(|cx| {
                std::pin::Pin::new(&mut self.io).poll_write(cx, &out[written..])
            })
            .await;
            let e = match res {
                Ok(0) => std::io::Error::from(std::io::ErrorKind::WriteZero),
                Ok(n) => {
                    written += n;
                    continue;
                }
                Err(e) => e,
            };
            self.exchange = Exchange::Broken;
            let sent = written > 0;
            return Err((write_error(e, sent), (!sent).then_some(body)));
        }
        // A body held whole comes back if the application never took the request.
        let replay = match body {
            s @ RequestBody::Streaming(_) => {
                upload.body = s;
                upload.streamed = true;
                None
            }
            // Read from its file: the copy starts again from the file's start.
            s @ RequestBody::Spooled(_) => {
                let back = s.try_clone();
                upload.body = s;
                upload.streamed = true;
                back
            }
            held => Some(held),
        };
        self.upload = Some(upload);
        self.read_head().await.map_err(|e| {
            let back = replay.filter(|_| e.delivery() == Delivery::NotSent);
            (e, back)
        })
    }

    /// Writes what it can of the request body; `Ready(Ok)` once it is all written.
    fn poll_upload(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        loop {
            let Some(up) = self.upload.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            if !up.out.is_empty() {
                match std::pin::Pin::new(&mut self.io).poll_write(cx, &up.out) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) => {
                        let e = std::io::Error::from(std::io::ErrorKind::WriteZero);
                        self.exchange = Exchange::Broken;
                        return Poll::Ready(Err(write_error(e, true)));
                    }
                    Poll::Ready(Ok(n)) => {
                        bytes::Buf::advance(&mut up.out, n);
                        if let Some(w) = &up.watch {
                            up.written += n as u64;
                            w.wrote(up.written);
                        }
                        continue;
                    }
                    Poll::Ready(Err(e)) => {
                        self.exchange = Exchange::Broken;
                        return Poll::Ready(Err(write_error(e, true)));
                    }
                }
            }
            if up.ended {
                if up.streamed {
                    self.body_written = Some(tokio::time::Instant::now());
                }
                if let Some(w) = &up.watch {
                    w.wrote_all();
                }
                self.upload = None;
                return Poll::Ready(Ok(()));
            }
            // Only a body streamed from the client waits on it; a spooled one waits
            // on the disk at most.
            let from_client = matches!(up.body, RequestBody::Streaming(_));
            match std::pin::Pin::new(&mut up.body).poll_frame(cx) {
                Poll::Pending => {
                    if from_client {
                        self.upload_clock.waits_on_client();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    if from_client {
                        self.upload_clock.gave(tokio::time::Instant::now());
                    }
                    record::encode_stdin(&mut up.out, REQUEST_ID, b"");
                    up.ended = true;
                }
                Poll::Ready(Some(Ok(frame))) => {
                    if from_client {
                        self.upload_clock.gave(tokio::time::Instant::now());
                    }
                    if let Ok(data) = frame.into_data() {
                        record::encode_stdin(&mut up.out, REQUEST_ID, &data);
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    self.exchange = Exchange::Broken;
                    let kind = if e.is::<crate::body::BodyTooLarge>() {
                        Kind::BodyTooLarge
                    } else if e.is::<crate::body::SpoolError>() {
                        // Reading the spool file back failed: not the client's doing.
                        Kind::Io
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

    /// The request's body, held whole (in memory or spooled), is still being written:
    /// closed now, the application would take the part it got for the whole body
    /// (PHP runs the script on whatever STDIN came). See [`finish_held_body`].
    ///
    /// [`finish_held_body`]: FastCgiConn::finish_held_body
    pub fn sending_held_body(&self) -> bool {
        matches!(self.exchange, Exchange::AwaitingHead | Exchange::Body)
            && self
                .upload
                .as_ref()
                .is_some_and(|u| !matches!(u.body, RequestBody::Streaming(_)))
    }

    /// Writes the rest of a body held whole for a request no one waits for any more
    /// (the client went away, a deadline passed), reading and dropping what the
    /// application sends meanwhile (a script may answer as it reads), until the body
    /// is all written, the request ends or the connection fails; at most
    /// 60 s (`HELD_BODY_LIMIT`), and a write stalls no longer than the write timeout.
    pub async fn finish_held_body(&mut self) {
        let finish = std::future::poll_fn(|cx| {
            loop {
                if self.poll_upload(cx).is_ready() {
                    return Poll::Ready(());
                }
                match std::task::ready!(self.poll_next_record(cx)) {
                    Ok(Some(r)) if r.kind != RecordType::EndRequest => {}
                    _ => return Poll::Ready(()),
                }
            }
        });
        let _ = tokio::time::timeout(HELD_BODY_LIMIT, finish).await;
    }

    /// When the last request's streamed body was all written (`None` without one).
    pub fn body_written(&self) -> Option<tokio::time::Instant> {
        self.body_written
    }

    async fn read_head(&mut self) -> Result<ResponseHead, UpstreamError> {
        let mut parser = HeadParser::new();
        let mut heard = false;
        loop {
            let record = match self.next_record().await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    self.exchange = Exchange::Broken;
                    if !heard && self.read_buf.is_empty() && self.retired_unread().await {
                        return Err(UpstreamError::new(Kind::Closed, Delivery::NotSent)
                            .with_cause(
                                "FastCGI application retired the connection without reading \
                                 the request (a worker at pm.max_requests)",
                            ));
                    }
                    return Err(
                        UpstreamError::new(Kind::Closed, Delivery::MaybeSent).with_cause(
                            "FastCGI application closed the connection before responding",
                        ),
                    );
                }
                Err(e) => return Err(e),
            };
            heard = true;
            match record.kind {
                RecordType::Stdout if !record.content.is_empty() => {
                    match parser.feed(&record.content) {
                        Ok(Progress::Partial(p)) => parser = p,
                        Ok(Progress::Complete(head)) => {
                            self.exchange = Exchange::Body;
                            return Ok(head);
                        }
                        Err(e) => {
                            self.exchange = Exchange::Broken;
                            return Err(UpstreamError::new(Kind::Protocol, Delivery::MaybeSent)
                                .with_cause(e));
                        }
                    }
                }
                RecordType::Stdout => {}
                RecordType::Stderr => self.log_stderr(&record.content),
                RecordType::EndRequest => {
                    let end = EndRequest::parse(&record.content)
                        .map_err(|e| self.broken(Kind::Protocol, e))?;
                    self.finish_request();
                    return Err(end_without_head(end));
                }
                _ => {}
            }
        }
    }

    /// The next piece of the response body; `None` after END_REQUEST.
    pub fn poll_body(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, UpstreamError>>> {
        loop {
            if self.exchange != Exchange::Body {
                return Poll::Ready(None);
            }
            let record = match std::task::ready!(self.poll_next_record(cx)) {
                Err(e) => return Poll::Ready(Some(Err(e))),
                Ok(None) => {
                    let e = self.broken(
                        Kind::Io,
                        "FastCGI application closed the connection mid-response",
                    );
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Some(record)) => record,
            };
            match record.kind {
                RecordType::Stdout if !record.content.is_empty() => {
                    return Poll::Ready(Some(Ok(record.content)));
                }
                RecordType::Stderr => self.log_stderr(&record.content),
                RecordType::EndRequest => {
                    if let Ok(end) = EndRequest::parse(&record.content)
                        && end.app_status != 0
                    {
                        tracing::debug!(address = %self.label, app_status = end.app_status, "FastCGI request ended with a non-zero status");
                    }
                    self.finish_request();
                    return Poll::Ready(None);
                }
                _ => {}
            }
        }
    }

    async fn next_record(&mut self) -> Result<Option<holdfast_fastcgi::Record>, UpstreamError> {
        std::future::poll_fn(|cx| self.poll_next_record(cx)).await
    }

    /// The next record; writes the request body meanwhile.
    fn poll_next_record(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<holdfast_fastcgi::Record>, UpstreamError>> {
        loop {
            match self.decoder.decode(&mut self.read_buf) {
                Err(e) => return Poll::Ready(Err(self.broken(Kind::Protocol, e))),
                Ok(Some(r)) => return Poll::Ready(Ok(Some(r))),
                Ok(None) => {
                    if let Poll::Ready(Err(e)) = self.poll_upload(cx) {
                        return Poll::Ready(Err(e));
                    }
                    let n = match tokio_util::io::poll_read_buf(
                        std::pin::Pin::new(&mut self.io),
                        cx,
                        &mut self.read_buf,
                    ) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(n)) => n,
                        Poll::Ready(Err(e)) => {
                            let kind = if is_reset(&e) { Kind::Closed } else { Kind::Io };
                            return Poll::Ready(Err(self.broken(kind, e)));
                        }
                    };
                    if n == 0 {
                        return Poll::Ready(Ok(None));
                    }
                }
            }
        }
    }

    /// The application sent a FIN and not a record for the request: did it retire
    /// the connection without reading the request? php-fpm does so when a worker
    /// reaches `pm.max_requests`: END_REQUEST of its last request, then
    /// `shutdown(SHUT_WR)` and reading (and discarding) until holdfast closes; a
    /// request written in between, even a POST, was never run and may go to another
    /// connection. A worker that died mid-request may have run it: its socket is
    /// closed whole, which the probe written here tells apart
    /// ([`Stream::peer_reads_on`]). The probe is an ABORT_REQUEST, which the
    /// retiring worker discards unread as a record.
    async fn retired_unread(&self) -> bool {
        let mut probe = BytesMut::new();
        record::encode_abort_request(&mut probe, REQUEST_ID);
        let retired = self.stream.peer_reads_on(&probe, RETIRE_ANSWER).await;
        if retired {
            tracing::debug!(address = %self.label, "FastCGI application retired the connection before reading the request; it may go to another");
        }
        retired
    }

    fn finish_request(&mut self) {
        // Reusable only on a clean record boundary: anything after END_REQUEST is garbage;
        // nor with the request's STDIN unfinished (the application ended early).
        self.exchange = if self.read_buf.is_empty() && self.upload.is_none() {
            Exchange::Done
        } else {
            Exchange::Broken
        };
        self.busy.send_replace(false);
    }

    fn broken(
        &mut self,
        kind: Kind,
        cause: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> UpstreamError {
        self.exchange = Exchange::Broken;
        UpstreamError::new(kind, Delivery::MaybeSent).with_cause(cause)
    }

    fn log_stderr(&self, content: &[u8]) {
        let text = String::from_utf8_lossy(content);
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            tracing::warn!(target: "holdfast::fastcgi", address = %self.label, "FastCGI stderr: {line}");
        }
    }
}

impl Drop for FastCgiConn {
    fn drop(&mut self) {
        // Dropped mid-request (client gone, deadline): tell the application, best
        // effort and without waiting; the connection closes either way.
        if matches!(self.exchange, Exchange::AwaitingHead | Exchange::Body) {
            let mut out = BytesMut::new();
            record::encode_abort_request(&mut out, REQUEST_ID);
            let _ = self.stream.try_write_now(&out);
        }
    }
}

/// A failed write; `sent`: some byte of the request was written before it.
fn write_error(e: std::io::Error, sent: bool) -> UpstreamError {
    let delivery = if sent {
        Delivery::MaybeSent
    } else {
        Delivery::NotSent
    };
    let kind = if e.kind() == std::io::ErrorKind::TimedOut {
        Kind::WriteTimeout
    } else if is_reset(&e) {
        Kind::Closed
    } else {
        Kind::Io
    };
    UpstreamError::new(kind, delivery).with_cause(e)
}

/// A reset before the response began is the application closing the connection:
/// php-fpm's worker closes a kept connection when it exits (a restart, `pm.max_requests`)
/// and, with a request it never read in the socket, the close is a reset, not a FIN.
/// Classed with a FIN as [`Kind::Closed`], so a reused connection counts as stale.
fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionAborted
    )
}

fn end_without_head(end: EndRequest) -> UpstreamError {
    match end.protocol_status {
        ProtocolStatus::Overloaded => UpstreamError::new(Kind::Overloaded, Delivery::NotSent)
            .with_cause("FastCGI application is overloaded"),
        ProtocolStatus::CantMpxConn => UpstreamError::new(Kind::Overloaded, Delivery::NotSent)
            .with_cause("FastCGI application cannot multiplex"),
        ProtocolStatus::UnknownRole => UpstreamError::new(Kind::Protocol, Delivery::NotSent)
            .with_cause("FastCGI application does not know the responder role"),
        _ => UpstreamError::new(Kind::Protocol, Delivery::MaybeSent)
            .with_cause("FastCGI request ended without a response"),
    }
}

/// Asks the application for FCGI_MAX_CONNS and friends on a connection of its own
/// (php-fpm answers management records and then closes).
pub async fn query_values(stream: Stream, timeout: Duration) -> Option<ServerValues> {
    let stream = Arc::new(stream);
    let mut io = UpstreamIo::new(stream, timeout);
    let mut out = BytesMut::new();
    record::encode_get_values(&mut out, ServerValues::NAMES.iter().copied()).ok()?;
    let exchange = async {
        io.write_all(&out).await.ok()?;
        let mut buf = BytesMut::new();
        let mut decoder = RecordDecoder::new();
        loop {
            if let Some(r) = decoder.decode(&mut buf).ok()? {
                if r.kind == RecordType::GetValuesResult {
                    return ServerValues::parse(&r.content).ok();
                }
                continue;
            }
            let n = std::future::poll_fn(|cx| {
                tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut io), cx, &mut buf)
            })
            .await
            .ok()?;
            if n == 0 {
                return None;
            }
        }
    };
    tokio::time::timeout(timeout, exchange).await.ok().flatten()
}

/// Turns a CGI head into an HTTP response head (RFC 3875 6.3). A local redirect
/// (`Location: /path` without `Status`) is sent to the client as a 302, as nginx does.
///
/// # Errors
/// A header name or value that is not valid HTTP.
pub fn into_response(head: ResponseHead) -> Result<http::Response<super::Payload>, UpstreamError> {
    let bad =
        |what: String| UpstreamError::new(Kind::Protocol, Delivery::MaybeSent).with_cause(what);
    let status = http::StatusCode::from_u16(head.status.code())
        .ok()
        // A 1xx is no final response: hyper's server would answer its own 500 (or,
        // for a 101, switch protocols with nothing behind: FastCGI has no tunnel).
        .filter(|s| !s.is_informational())
        .ok_or_else(|| bad(format!("invalid CGI status {}", head.status.code())))?;
    let mut resp = http::Response::new(super::Payload::FastCgi(head.body));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.reserve(head.headers.len());
    for field in head.headers {
        let name = http::HeaderName::from_bytes(&field.name).map_err(|_| {
            bad(format!(
                "invalid CGI header name {:?}",
                String::from_utf8_lossy(&field.name)
            ))
        })?;
        let value = http::HeaderValue::from_maybe_shared(field.value)
            .map_err(|_| bad(format!("invalid value for CGI header {name}")))?;
        headers.append(name, value);
    }
    // A Content-Length hyper's server cannot write makes it drop the response and
    // close: the client would get nothing. Framed by Transfer-Encoding it is removed
    // with the hop-by-hop fields anyway.
    if !headers.contains_key(http::header::TRANSFER_ENCODING) {
        let fields = headers.get_all(http::header::CONTENT_LENGTH);
        let Ok(length) = super::http1::codec::content_length(fields.iter().map(|v| v.as_bytes()))
        else {
            return Err(bad("invalid Content-Length in the CGI response".into()));
        };
        // Repeated (several fields, or a list): passed on as the one value.
        let repeated = fields.iter().nth(1).is_some()
            || fields
                .iter()
                .next()
                .is_some_and(|v| v.as_bytes().contains(&b','));
        if let Some(n) = length.filter(|_| repeated) {
            headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
        }
    }
    Ok(resp)
}
