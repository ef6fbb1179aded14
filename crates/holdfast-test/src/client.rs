//! Raw HTTP/1.1 clients for tests: [`RawClient`] sends exact bytes and reads one response
//! at a time; [`KeepAliveClient`] sends requests on a persistent connection and reports
//! failures precisely ([`TransportError`]: EOF before the response, reset, timeout...).
//!
//! Neither retries, pools or follows redirects: a test must see every failure the server
//! caused, so nothing here hides one.

mod keep_alive;
mod request;
mod response;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub use self::keep_alive::KeepAliveClient;
pub use self::request::ClientRequest;
pub use self::response::{Echoed, Response};
use crate::wire::{ReadError, Reader};

/// What kind of transport failure happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorKind {
    /// Connect was refused (nothing listening, or the listen queue reset it).
    Refused,
    /// The server closed its side (FIN) before the response was complete.
    Eof,
    /// The connection was reset (RST), on write or read.
    Reset,
    /// No complete response within the timeout.
    Timeout,
    /// The server sent something that is not a valid HTTP/1.1 response.
    Malformed,
    /// Any other I/O error.
    Other,
}

/// Where in the exchange it happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    Connect,
    /// Writing the request.
    Write,
    /// Waiting for the first byte of the response.
    BeforeResponse,
    /// After some of the response had arrived.
    MidResponse,
}

/// Whether the request went out on a new connection or one that had carried a response.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Checkout {
    Fresh,
    Reused,
}

/// A request that got no complete response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransportError {
    pub kind: ErrorKind,
    pub phase: Phase,
    pub checkout: Checkout,
    pub detail: String,
}

/// What a peer did with a connection while the client waited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerClose {
    /// Clean close: FIN.
    Eof,
    /// RST.
    Reset,
    /// Nothing happened within the wait.
    StillOpen,
    /// The peer sent bytes (already buffered ones are returned first).
    Data(Bytes),
    /// Another I/O error.
    Error(io::ErrorKind),
}

/// One TCP connection on which a test writes raw bytes and reads responses.
pub struct RawClient {
    reader: Reader<TcpStream>,
    responses_read: u64,
}

// === impl TransportError ===

impl TransportError {
    pub(crate) fn new(
        kind: ErrorKind,
        phase: Phase,
        checkout: Checkout,
        detail: impl Into<String>,
    ) -> Self {
        TransportError {
            kind,
            phase,
            checkout,
            detail: detail.into(),
        }
    }

    pub(crate) fn from_io(e: &io::Error, phase: Phase, checkout: Checkout) -> TransportError {
        TransportError::new(kind_of(e.kind()), phase, checkout, e.to_string())
    }

    /// The server closed the connection without sending a byte of the response (the
    /// keep-alive race of story 1a when `checkout` is `Reused`).
    pub fn is_eof_before_response(&self) -> bool {
        self.kind == ErrorKind::Eof && self.phase == Phase::BeforeResponse
    }

    pub fn is_reset(&self) -> bool {
        self.kind == ErrorKind::Reset
    }

    pub fn is_timeout(&self) -> bool {
        self.kind == ErrorKind::Timeout
    }

    pub fn is_refused(&self) -> bool {
        self.kind == ErrorKind::Refused
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} during {:?} on a {:?} connection: {}",
            self.kind, self.phase, self.checkout, self.detail
        )
    }
}

impl std::error::Error for TransportError {}

/// Maps an I/O error kind to the transport kinds tests count.
pub(crate) fn kind_of(kind: io::ErrorKind) -> ErrorKind {
    match kind {
        io::ErrorKind::ConnectionRefused => ErrorKind::Refused,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => ErrorKind::Reset,
        io::ErrorKind::UnexpectedEof => ErrorKind::Eof,
        io::ErrorKind::TimedOut => ErrorKind::Timeout,
        _ => ErrorKind::Other,
    }
}

// === impl RawClient ===

impl RawClient {
    /// Connects to `addr` (TCP_NODELAY on).
    ///
    /// # Errors
    ///
    /// The connect error (`ConnectionRefused` when nothing listens).
    pub async fn connect(addr: SocketAddr) -> io::Result<RawClient> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(RawClient::from_stream(stream))
    }

    /// Wraps an already connected stream.
    pub fn from_stream(stream: TcpStream) -> RawClient {
        RawClient {
            reader: Reader::new(stream),
            responses_read: 0,
        }
    }

    /// The client's own address (the server sees it as the peer).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.reader.io.local_addr()
    }

    /// The underlying stream, for socket options or direct I/O.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.reader.io
    }

    /// Bytes received but not yet consumed by a read.
    pub fn buffered(&self) -> &[u8] {
        &self.reader.buf
    }

    /// Complete responses read on this connection so far.
    pub fn responses_read(&self) -> u64 {
        self.responses_read
    }

    /// Writes `bytes` exactly as given.
    ///
    /// # Errors
    ///
    /// The write error (`BrokenPipe` or `ConnectionReset` after an RST).
    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) -> io::Result<()> {
        self.reader.io.write_all(bytes.as_ref()).await?;
        self.reader.io.flush().await
    }

    /// Writes `request` serialized for this connection (adds `Host` and framing).
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub async fn send_request(&mut self, request: &ClientRequest) -> io::Result<()> {
        let host = self.reader.io.peer_addr()?.to_string();
        self.send(request.to_bytes(&host)).await
    }

    /// Reads one response to a GET-like request. See
    /// [`read_response_for`](Self::read_response_for).
    ///
    /// # Errors
    ///
    /// As `read_response_for`.
    pub async fn read_response(&mut self, timeout: Duration) -> Result<Response, TransportError> {
        self.read_response_for("GET", timeout).await
    }

    /// Reads one final response (skipping 1xx ones, which are listed in
    /// `informational`) to a request with `method`: no body for HEAD, 204 and 304; the
    /// body by Content-Length, chunked or until EOF.
    ///
    /// # Errors
    ///
    /// A [`TransportError`] if the response is not complete within `timeout`.
    ///
    /// # Cancel safety
    ///
    /// After an error (a timeout included) the connection's framing is unknown: read no
    /// further response from it.
    pub async fn read_response_for(
        &mut self,
        method: &str,
        timeout: Duration,
    ) -> Result<Response, TransportError> {
        let mut body = Vec::new();
        let mut response = self
            .read_response_with(method, timeout, &mut |b: &[u8]| body.extend_from_slice(b))
            .await?;
        response.body = body.into();
        Ok(response)
    }

    /// Like [`read_response_for`](Self::read_response_for) but hands the body to
    /// `on_body` piece by piece instead of buffering it (`Response::body` stays empty,
    /// `body_len` counts the bytes), for bodies of any size.
    ///
    /// # Errors
    ///
    /// As `read_response_for`.
    pub async fn read_response_streaming(
        &mut self,
        method: &str,
        timeout: Duration,
        mut on_body: impl FnMut(&[u8]) + Send,
    ) -> Result<Response, TransportError> {
        self.read_response_with(method, timeout, &mut on_body).await
    }

    async fn read_response_with(
        &mut self,
        method: &str,
        timeout: Duration,
        on_body: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<Response, TransportError> {
        let checkout = if self.responses_read > 0 {
            Checkout::Reused
        } else {
            Checkout::Fresh
        };
        let had = self.reader.received - self.reader.buf.len() as u64;
        let result =
            tokio::time::timeout(timeout, response::read(&mut self.reader, method, on_body)).await;
        let started = self.reader.received > had;
        let phase = if started {
            Phase::MidResponse
        } else {
            Phase::BeforeResponse
        };
        match result {
            Ok(Ok(response)) => {
                self.responses_read += 1;
                Ok(response)
            }
            Ok(Err(ReadError::Eof)) => Err(TransportError::new(
                ErrorKind::Eof,
                phase,
                checkout,
                "server closed the connection before the response was complete",
            )),
            Ok(Err(ReadError::Io(e))) => Err(TransportError::from_io(&e, phase, checkout)),
            Ok(Err(ReadError::Malformed(why))) => Err(TransportError::new(
                ErrorKind::Malformed,
                phase,
                checkout,
                why,
            )),
            Err(_) => Err(TransportError::new(
                ErrorKind::Timeout,
                phase,
                checkout,
                format!("no complete response within {timeout:?}"),
            )),
        }
    }

    /// Waits up to `timeout` for the peer to close the connection or send something.
    /// Bytes already buffered are returned at once as `Data`. A zero timeout checks
    /// without waiting.
    pub async fn wait_close(&mut self, timeout: Duration) -> PeerClose {
        if !self.reader.buf.is_empty() {
            return PeerClose::Data(self.reader.buf.split().freeze());
        }
        match tokio::time::timeout(timeout, self.reader.fill()).await {
            Err(_) => PeerClose::StillOpen,
            Ok(Ok(0)) => PeerClose::Eof,
            Ok(Ok(_)) => PeerClose::Data(self.reader.buf.split().freeze()),
            Ok(Err(e)) if kind_of(e.kind()) == ErrorKind::Reset => PeerClose::Reset,
            Ok(Err(e)) => PeerClose::Error(e.kind()),
        }
    }

    /// Half-closes: sends FIN, keeps reading possible.
    ///
    /// # Errors
    ///
    /// The shutdown error.
    pub async fn shutdown_write(&mut self) -> io::Result<()> {
        self.reader.io.shutdown().await
    }

    /// Closes with RST (SO_LINGER 0) instead of FIN.
    pub fn reset(self) {
        let _ = socket2::SockRef::from(&self.reader.io).set_linger(Some(Duration::ZERO));
        drop(self);
    }
}

impl fmt::Debug for RawClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawClient")
            .field("local", &self.reader.io.local_addr().ok())
            .field("peer", &self.reader.io.peer_addr().ok())
            .field("buffered", &self.reader.buf.len())
            .field("responses_read", &self.responses_read)
            .finish()
    }
}
