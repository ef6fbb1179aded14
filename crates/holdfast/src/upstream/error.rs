//! Why an exchange with an upstream failed, whether the upstream can have seen the
//! request, and what that means for retries and for the client's status code.

use std::fmt;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One failed attempt, or the final failure of a request.
#[derive(Debug)]
pub struct UpstreamError {
    kind: Kind,
    delivery: Delivery,
    cause: Option<BoxError>,
}

/// What failed. Private in spirit: callers ask the `is_*` predicates and `status()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Every slot busy and the wait queue full.
    QueueFull,
    /// Waited `queue_timeout` for a slot.
    QueueTimeout,
    /// Every address of the upstream is ejected or gone.
    NoPeer,
    ConnectRefused,
    ConnectTimeout,
    ConnectFailed,
    /// The upstream's TLS certificate was rejected (expired, wrong name, unknown issuer).
    TlsCertificate,
    /// The TLS handshake failed otherwise (an alert, no common version or ALPN
    /// protocol, not TLS at all).
    TlsHandshake,
    /// HTTP/2: the upstream refused the stream (GOAWAY with a lower last-stream-id, or
    /// `REFUSED_STREAM`), which proves it did not process it (RFC 9113 8.7).
    Refused,
    /// The connection closed before any byte of the response arrived.
    Closed,
    /// A reset or other I/O error while exchanging.
    Io,
    WriteTimeout,
    ResponseHeadersTimeout,
    ReadTimeout,
    TotalTimeout,
    /// The upstream sent something that is not a valid response.
    Protocol,
    /// The application said it is overloaded (FastCGI OVERLOADED, CANT_MPX_CONN).
    Overloaded,
    /// The client's request body failed (too large, or the client went away).
    ClientBody,
    /// The request body exceeded `max_body_bytes`.
    BodyTooLarge,
}

/// Whether the upstream can have received the request. Decides whether a retry of a
/// non-idempotent request is safe and what `Proxy-Status` tells the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Provably never sent (no connection, or the connection was found closed first).
    NotSent,
    /// Written, or possibly written, and no response came.
    MaybeSent,
}

impl UpstreamError {
    pub fn new(kind: Kind, delivery: Delivery) -> Self {
        UpstreamError {
            kind,
            delivery,
            cause: None,
        }
    }

    pub fn with_cause(mut self, cause: impl Into<BoxError>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    /// An earlier attempt of the same request may have reached the upstream: then so
    /// may the request, whatever this attempt says.
    #[must_use]
    pub fn sent_before(mut self, sent_before: bool) -> Self {
        if sent_before {
            self.delivery = Delivery::MaybeSent;
        }
        self
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn delivery(&self) -> Delivery {
        self.delivery
    }

    /// The client's body failed because its connection (or, HTTP/2, its stream)
    /// ended: the client went away mid-upload and no answer reaches it. Not a
    /// stalled body (`body_timeout`) or bad chunking, which are answered 400.
    pub fn client_gone(&self) -> bool {
        self.kind == Kind::ClientBody && self.cause.as_deref().is_some_and(|c| ended(c))
    }

    pub fn is_timeout(&self) -> bool {
        matches!(
            self.kind,
            Kind::ConnectTimeout
                | Kind::WriteTimeout
                | Kind::ResponseHeadersTimeout
                | Kind::ReadTimeout
                | Kind::TotalTimeout
        )
    }

    /// A failure that says something about the address's health (not about a stale
    /// pooled connection, the client, or holdfast's own limits).
    pub fn counts_against_health(&self) -> bool {
        matches!(
            self.kind,
            Kind::ConnectRefused
                | Kind::ConnectTimeout
                | Kind::ConnectFailed
                | Kind::TlsCertificate
                | Kind::TlsHandshake
                | Kind::Protocol
        )
    }

    /// Opening a connection failed: nothing was sent, another address may do.
    pub fn is_connect(&self) -> bool {
        matches!(
            self.kind,
            Kind::ConnectRefused
                | Kind::ConnectTimeout
                | Kind::ConnectFailed
                | Kind::TlsCertificate
                | Kind::TlsHandshake
        )
    }

    /// The status the client gets: 503 for capacity, 504 for a timeout, 502 otherwise.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self.kind {
            Kind::QueueFull | Kind::QueueTimeout | Kind::NoPeer | Kind::Overloaded => {
                S::SERVICE_UNAVAILABLE
            }
            Kind::BodyTooLarge => S::PAYLOAD_TOO_LARGE,
            Kind::ClientBody => S::BAD_REQUEST,
            _ if self.is_timeout() => S::GATEWAY_TIMEOUT,
            _ => S::BAD_GATEWAY,
        }
    }

    /// RFC 9209 `Proxy-Status` error type.
    pub fn proxy_status_error(&self) -> &'static str {
        match self.kind {
            Kind::QueueFull | Kind::QueueTimeout => "connection_limit_reached",
            Kind::NoPeer => "destination_unavailable",
            Kind::ConnectRefused => "connection_refused",
            Kind::ConnectTimeout => "connection_timeout",
            Kind::ConnectFailed => "destination_unavailable",
            Kind::TlsCertificate => "tls_certificate_error",
            Kind::TlsHandshake => "tls_protocol_error",
            Kind::Refused | Kind::Closed | Kind::Io => "connection_terminated",
            Kind::WriteTimeout => "connection_write_timeout",
            Kind::ResponseHeadersTimeout | Kind::TotalTimeout => "http_response_timeout",
            Kind::ReadTimeout => "connection_read_timeout",
            Kind::Protocol => "http_protocol_error",
            Kind::Overloaded => "destination_unavailable",
            Kind::ClientBody | Kind::BodyTooLarge => "http_request_error",
        }
    }

    /// Whether the request reached the upstream, in words for `Proxy-Status` details.
    pub fn delivery_details(&self) -> &'static str {
        match self.delivery {
            Delivery::NotSent => "request not sent to the upstream",
            Delivery::MaybeSent => "request sent, no response",
        }
    }

    /// Classifies a hyper client error from `send_request`.
    pub fn from_hyper(err: hyper::Error) -> Self {
        if refused_by_http2(&err) {
            return UpstreamError::new(Kind::Refused, Delivery::NotSent).with_cause(err);
        }
        if handshake_refused(&err) {
            return UpstreamError::new(Kind::TlsHandshake, Delivery::NotSent).with_cause(err);
        }
        let kind = if err.is_incomplete_message() || err.is_canceled() && !err.is_closed() {
            Kind::Closed
        } else if err.is_parse() || err.is_parse_status() || err.is_parse_too_large() {
            Kind::Protocol
        } else if err.is_timeout() {
            Kind::WriteTimeout
        } else if err.is_body_write_aborted() {
            Kind::ClientBody
        } else {
            // Including hyper's other "user" errors, such as "dispatch task is gone"
            // (the connection's task ended under the request, as when the process is
            // cut short): not the client's fault. A failed client body is found below,
            // by its type in the error chain.
            Kind::Io
        };
        let kind = refine_io(&err).unwrap_or(kind);
        UpstreamError::new(kind, Delivery::MaybeSent).with_cause(err)
    }
}

/// Whether reading a client's body failed because its connection (or HTTP/2 stream)
/// ended, not for a bad body.
pub(crate) fn connection_ended(e: &hyper::Error) -> bool {
    ended(e)
}

/// Whether `e` says a client's connection (or HTTP/2 stream) ended under its body:
/// the first I/O or HTTP/2 error in its chain says how, and an incomplete message is
/// a connection that ended. An [`UpstreamError`] wrapping the cause is looked into.
fn ended(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    // Bounded by the chain's length.
    while let Some(e) = next {
        if let Some(u) = e.downcast_ref::<UpstreamError>() {
            return u.cause.as_deref().is_some_and(|c| ended(c));
        }
        if e.is::<crate::body::ClientGone>() {
            return true;
        }
        if e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_incomplete_message)
        {
            return true;
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_remote() && h2.reason() == Some(h2::Reason::CANCEL);
        }
        next = e.source();
    }
    false
}

/// Whether an HTTP/2 peer said it did not process the request: a GOAWAY whose
/// last-stream-id is below the request's stream (h2 gives only those streams, and
/// requests sent after it, the GOAWAY as their error; streams below it that the
/// connection then loses see an I/O error) or `REFUSED_STREAM` (RFC 9113 8.7).
fn refused_by_http2(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_remote()
                && (h2.is_go_away() || h2.reason() == Some(h2::Reason::REFUSED_STREAM));
        }
        cur = e.source();
    }
    false
}

/// Whether the upstream ended the TLS handshake with an alert that only a handshake
/// carries (RFC 8446 6.2): in TLS 1.3 the client's side of the handshake is done once
/// it sent its Finished, so a server that then refuses the client's certificate
/// (none, an unknown issuer, expired) says so with an alert read only as the answer
/// to the request already written. The server had not finished the handshake: it
/// took none of the request as data.
fn handshake_refused(err: &(dyn std::error::Error + 'static)) -> bool {
    use rustls::AlertDescription as A;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    // Bounded by the chain's length.
    while let Some(e) = cur {
        // `io::Error::source` skips the error it wraps: looked at through `get_ref`.
        let tls = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .or_else(|| e.downcast_ref::<rustls::Error>());
        if let Some(rustls::Error::AlertReceived(alert)) = tls {
            return matches!(
                alert,
                A::HandshakeFailure
                    | A::BadCertificate
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateExpired
                    | A::CertificateUnknown
                    | A::UnknownCA
                    | A::AccessDenied
                    | A::DecryptError
                    | A::CertificateRequired
            );
        }
        cur = e.source();
    }
    false
}

/// Looks through hyper's error chain for an I/O error that says more.
fn refine_io(err: &(dyn std::error::Error + 'static)) -> Option<Kind> {
    let mut cur = err.source();
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as E;
            return Some(match io.kind() {
                E::TimedOut => Kind::WriteTimeout,
                // Before the response head, a reset is the upstream closing the
                // connection, like a FIN: a stale pooled connection when it was reused.
                E::ConnectionReset | E::BrokenPipe | E::ConnectionAborted | E::UnexpectedEof => {
                    Kind::Closed
                }
                _ => Kind::Io,
            });
        }
        if e.downcast_ref::<crate::body::BodyTooLarge>().is_some() {
            return Some(Kind::BodyTooLarge);
        }
        if e.downcast_ref::<crate::body::ClientBodyError>().is_some()
            || e.downcast_ref::<crate::body::BodyStalled>().is_some()
        {
            return Some(Kind::ClientBody);
        }
        cur = e.source();
    }
    None
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            Kind::QueueFull => "no capacity: every connection busy and the wait queue full",
            Kind::QueueTimeout => "no capacity: timed out waiting for a connection",
            Kind::NoPeer => "no upstream address available",
            Kind::ConnectRefused => "connection refused",
            Kind::ConnectTimeout => "connect timed out",
            Kind::ConnectFailed => "connect failed",
            Kind::TlsCertificate => "upstream TLS certificate rejected",
            Kind::TlsHandshake => "TLS handshake with the upstream failed",
            Kind::Refused => "upstream refused the HTTP/2 stream (not processed)",
            Kind::Closed => "upstream closed the connection before responding",
            Kind::Io => "connection error",
            Kind::WriteTimeout => "writing the request timed out",
            Kind::ResponseHeadersTimeout => "timed out waiting for response headers",
            Kind::ReadTimeout => "timed out reading the response body",
            Kind::TotalTimeout => "request exceeded its total timeout",
            Kind::Protocol => "invalid response from upstream",
            Kind::Overloaded => "upstream application overloaded",
            Kind::ClientBody => "client request body failed",
            Kind::BodyTooLarge => "request body too large",
        };
        f.write_str(what)?;
        if let Some(cause) = &self.cause {
            write!(f, ": {cause}")?;
            let mut src = cause.source();
            while let Some(s) = src {
                write!(f, ": {s}")?;
                src = s.source();
            }
        }
        Ok(())
    }
}

impl std::error::Error for UpstreamError {}
