//! One probe connection: send a request, read its whole response, and watch an idle
//! connection for the upstream's close. [`Dialer`] opens it: TCP or a unix socket,
//! with TLS for `https` (holdfast's own upstream TLS client, ALPN `http/1.1`).
//!
//! Deliberately not hyper: the probe needs to see what a pooled client hides, such as
//! a FIN that arrives while nothing is being read, an RST rather than a FIN, or bytes
//! sent on an idle connection. HTTP/1.1 responses are framed by hand (RFC 9112 6.3:
//! no body for 1xx/204/304, chunked, Content-Length, else until close); FastCGI uses
//! the `holdfast-fastcgi` codec with `FCGI_KEEP_CONN` set.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use holdfast_fastcgi::record::{self, RecordType};
use holdfast_fastcgi::{EndRequest, HeadParser, Progress, RecordDecoder, Role, ServerValues};
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Instant;

use super::{ProbeError, Target};
use crate::config::{HttpVersion, UpstreamTlsConfig};
use crate::upstream::tls::TlsClient;

/// A probe connection's bytes: TCP, a unix socket, or TLS over TCP.
trait ProbeIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ProbeIo for T {}

/// Where the probe connects, and how.
pub struct Dialer {
    place: Place,
    tls: Option<(TlsClient, ServerName<'static>)>,
}

enum Place {
    /// Every address the host resolved to, in the resolver's order, and the first
    /// that took a connection: the probe's connections all go there.
    Tcp {
        addrs: Vec<SocketAddr>,
        chosen: OnceLock<SocketAddr>,
    },
    Unix(PathBuf),
}

impl Dialer {
    /// Resolves the target's host and, for `https`, sets up TLS as `tls` says
    /// (checked by the caller): verified against its `ca_file` or the system's roots,
    /// its `server_name` or the URL's host, its client certificate if any. The first
    /// connection tries the addresses in the resolver's order, as other clients do
    /// (`localhost` is often `::1` first, for a server listening on `127.0.0.1`
    /// only); every connection after it goes to the address that answered.
    ///
    /// # Errors
    /// The host does not resolve, or TLS cannot be set up.
    pub async fn new(
        target: &Target,
        tls: Option<&UpstreamTlsConfig>,
        timeout: Duration,
    ) -> Result<Dialer, ProbeError> {
        let place = match &target.unix {
            Some(path) => Place::Unix(path.clone()),
            None => {
                // Bounded by `--timeout` like every other wait, on a thread of its own
                // (not tokio's blocking pool, which the runtime waits for as it ends:
                // a hung resolver would hold the exit too).
                let lookup = crate::upstream::lookup_host(&target.host, target.port);
                let mut addrs: Vec<SocketAddr> = tokio::time::timeout(timeout, lookup)
                    .await
                    .unwrap_or_else(|_| {
                        Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "no answer from the resolver in {}",
                                crate::config::Dur(timeout)
                            ),
                        ))
                    })
                    .map_err(|e| ProbeError::Resolve(target.host.clone(), e))?;
                let mut seen = std::collections::HashSet::new();
                addrs.retain(|a| seen.insert(*a));
                if addrs.is_empty() {
                    return Err(ProbeError::Resolve(
                        target.host.clone(),
                        io::Error::new(io::ErrorKind::NotFound, "no address"),
                    ));
                }
                Place::Tcp {
                    addrs,
                    chosen: OnceLock::new(),
                }
            }
        };
        let tls = match tls.filter(|_| target.tls) {
            Some(config) => {
                // The probe speaks HTTP/1.1 only, so ALPN offers only that.
                let client = TlsClient::new(config, HttpVersion::Http1).map_err(ProbeError::Tls)?;
                let name = client
                    .server_name(&target.host)
                    .map_err(|e| ProbeError::Tls(e.to_string()))?;
                Some((client, name))
            }
            None => None,
        };
        Ok(Dialer { place, tls })
    }

    /// The address connected to, for the report; before any connection, every
    /// address the host resolved to.
    pub fn describe(&self) -> String {
        match &self.place {
            Place::Tcp { chosen, .. } if let Some(addr) = chosen.get() => addr.to_string(),
            Place::Tcp { addrs, .. } => addrs
                .iter()
                .map(SocketAddr::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            Place::Unix(path) => path.display().to_string(),
        }
    }

    /// A connection (and its TLS handshake), each attempt within `timeout`.
    async fn dial(&self, timeout: Duration) -> Result<Box<dyn ProbeIo>, ProbeError> {
        let io: Box<dyn ProbeIo> = match &self.place {
            Place::Unix(path) => Box::new(
                connect_within(timeout, UnixStream::connect(path))
                    .await
                    .map_err(|e| ProbeError::Connect(self.describe(), e))?,
            ),
            Place::Tcp { addrs, chosen } => {
                let tcp = |addr: SocketAddr| async move {
                    let s = connect_within(timeout, TcpStream::connect(addr)).await?;
                    let _ = s.set_nodelay(true);
                    Ok::<_, io::Error>(s)
                };
                if let Some(addr) = chosen.get() {
                    Box::new(
                        tcp(*addr)
                            .await
                            .map_err(|e| ProbeError::Connect(addr.to_string(), e))?,
                    )
                } else {
                    let mut failed = None;
                    let mut stream = None;
                    // Bounded by the resolver's answer.
                    for addr in addrs {
                        match tcp(*addr).await {
                            Ok(s) => {
                                let _ = chosen.set(*addr);
                                stream = Some(s);
                                break;
                            }
                            Err(e) => failed = Some(e),
                        }
                    }
                    match (stream, failed) {
                        (Some(s), _) => Box::new(s),
                        (None, e) => {
                            return Err(ProbeError::Connect(
                                self.describe(),
                                e.unwrap_or_else(|| io::ErrorKind::NotFound.into()),
                            ));
                        }
                    }
                }
            }
        };
        let Some((client, name)) = &self.tls else {
            return Ok(io);
        };
        match tokio::time::timeout(timeout, client.connect(name.clone(), io)).await {
            Ok(Ok((tls, _))) => Ok(Box::new(tls)),
            Ok(Err(e)) => Err(ProbeError::Tls(format!(
                "TLS handshake with {}: {e}",
                self.describe()
            ))),
            Err(_) => Err(ProbeError::Tls(format!(
                "TLS handshake with {} not done within {timeout:?}",
                self.describe()
            ))),
        }
    }
}

/// `connect` within `timeout`, a timeout being an error of its own.
async fn connect_within<S>(
    timeout: Duration,
    connect: impl std::future::Future<Output = io::Result<S>>,
) -> io::Result<S> {
    match tokio::time::timeout(timeout, connect).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// Largest response head the probe reads.
const MAX_HEAD: usize = 64 * 1024;
/// Largest response body the probe reads through (and discards).
const MAX_BODY: u64 = 16 * 1024 * 1024;

/// How the upstream ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseStyle {
    /// The response said so: `Connection: close`, HTTP/1.0 without keep-alive, or a
    /// body delimited by the close.
    ConnectionClose,
    /// A FIN without warning.
    Fin,
    /// A reset.
    Rst,
}

impl CloseStyle {
    pub fn describe(self) -> &'static str {
        match self {
            CloseStyle::ConnectionClose => "with Connection: close",
            CloseStyle::Fin => "silently (FIN)",
            CloseStyle::Rst => "with a reset (RST)",
        }
    }
}

/// What one response said about the connection.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    pub status: u16,
    /// `HTTP/1.x`, or `FastCGI`.
    pub version: &'static str,
    pub connection: Option<String>,
    pub keep_alive: Option<String>,
    /// The response ends the connection (see [`CloseStyle::ConnectionClose`]).
    pub closes: bool,
}

/// The outcome of one exchange.
#[derive(Debug)]
pub enum Answer {
    Response(Facts),
    /// The upstream had closed the connection: nothing came back.
    Closed(CloseStyle),
}

/// What watching an idle connection showed.
#[derive(Debug, Clone, Copy)]
pub enum Watch {
    Closed {
        after: Duration,
        style: CloseStyle,
        /// Bytes the upstream sent while the connection was idle (a 408, say).
        unsolicited: usize,
    },
    /// Still open at the deadline.
    Open { unsolicited: usize },
}

pub struct Conn {
    stream: Box<dyn ProbeIo>,
    buf: BytesMut,
    target: Target,
    timeout: Duration,
    /// When the last response ended: the start of the idle period.
    pub idle_since: Instant,
}

impl Conn {
    /// # Errors
    /// The connect (or TLS handshake) failed or took longer than `timeout`.
    pub async fn open(
        target: &Target,
        dialer: &Dialer,
        timeout: Duration,
    ) -> Result<Conn, ProbeError> {
        let stream = dialer.dial(timeout).await?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(8 * 1024),
            target: target.clone(),
            timeout,
            idle_since: Instant::now(),
        })
    }

    /// Sends one request and reads its whole response.
    ///
    /// # Errors
    /// A response that is not HTTP (or FastCGI), too large, or too slow.
    pub async fn exchange(&mut self) -> Result<Answer, ProbeError> {
        let deadline = Instant::now() + self.timeout;
        let request = match &self.target.fastcgi_script {
            None => self.http_request(),
            Some(script) => fastcgi_request(&self.target, script)?,
        };
        // TLS buffers what is written: flush it out.
        let sent = match self.stream.write_all(&request).await {
            Ok(()) => self.stream.flush().await,
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            // A write fails only once the upstream has reset the connection.
            return match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => {
                    Ok(Answer::Closed(CloseStyle::Rst))
                }
                _ => Err(ProbeError::Io(e)),
            };
        }
        let answer = match self.target.fastcgi_script {
            None => self.read_http(deadline).await?,
            Some(_) => self.read_fastcgi(deadline).await?,
        };
        self.idle_since = Instant::now();
        Ok(answer)
    }

    fn http_request(&self) -> Vec<u8> {
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: holdfast-probe/{}\r\nAccept: */*\r\n\r\n",
            self.target.path,
            self.target.host_header,
            env!("CARGO_PKG_VERSION")
        )
        .into_bytes()
    }

    /// Reads more bytes; `Ok(0)` is a FIN.
    async fn fill(&mut self, deadline: Instant) -> Result<usize, ProbeError> {
        match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
            Ok(Ok(n)) => Ok(n),
            // TLS: a FIN without close_notify first.
            Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
            Ok(Err(e)) => Err(ProbeError::Io(e)),
            Err(_) => Err(ProbeError::Timeout(self.timeout)),
        }
    }

    /// Like `fill`, but a close before any byte of a response is an answer.
    async fn fill_first(&mut self, deadline: Instant) -> Result<Option<CloseStyle>, ProbeError> {
        match self.fill(deadline).await {
            Ok(0) => Ok(Some(CloseStyle::Fin)),
            Ok(_) => Ok(None),
            Err(ProbeError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                Ok(Some(CloseStyle::Rst))
            }
            Err(e) => Err(e),
        }
    }

    async fn fill_more(&mut self, deadline: Instant, what: &str) -> Result<(), ProbeError> {
        match self.fill(deadline).await? {
            0 => Err(ProbeError::Protocol(format!(
                "the upstream closed the connection in the middle of {what}"
            ))),
            _ => Ok(()),
        }
    }

    async fn read_http(&mut self, deadline: Instant) -> Result<Answer, ProbeError> {
        if self.buf.is_empty()
            && let Some(style) = self.fill_first(deadline).await?
        {
            return Ok(Answer::Closed(style));
        }
        // Bounded: each round reads bytes or ends; 1xx responses are skipped.
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 100];
            let mut resp = httparse::Response::new(&mut headers);
            let parsed = resp
                .parse(&self.buf)
                .map_err(|e| ProbeError::Protocol(format!("not an HTTP response: {e}")))?;
            let httparse::Status::Complete(head_len) = parsed else {
                if self.buf.len() > MAX_HEAD {
                    return Err(ProbeError::Protocol("response head over 64 KiB".into()));
                }
                self.fill_more(deadline, "a response head").await?;
                continue;
            };
            let status = resp.code.unwrap_or(0);
            let minor = resp.version.unwrap_or(1);
            let header = |name: &str| {
                let values: Vec<String> = resp
                    .headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
                    .collect();
                (!values.is_empty()).then(|| values.join(", "))
            };
            let connection = header("connection");
            let keep_alive = header("keep-alive");
            let chunked = header("transfer-encoding")
                .is_some_and(|te| te.to_ascii_lowercase().trim_end().ends_with("chunked"));
            // Repeats of one value are one length (RFC 9110 8.6); anything else is an
            // error, not a body read until a close that may never come.
            let length = match header("content-length") {
                None => None,
                Some(v) => match crate::upstream::http1::codec::content_length([v.as_bytes()]) {
                    Ok(n) => n,
                    Err(()) if chunked => None,
                    Err(()) => {
                        return Err(ProbeError::Protocol(format!("bad Content-Length {v:?}")));
                    }
                },
            };
            self.buf.advance(head_len);
            if (100..200).contains(&status) && status != 101 {
                continue;
            }
            let has_token = |t: &str| {
                connection
                    .as_deref()
                    .is_some_and(|c| c.split(',').any(|x| x.trim().eq_ignore_ascii_case(t)))
            };
            let mut closes = has_token("close") || (minor == 0 && !has_token("keep-alive"));
            let no_body = status < 200 || status == 204 || status == 304;
            if no_body {
            } else if chunked {
                self.skip_chunked(deadline).await?;
            } else if let Some(n) = length {
                self.skip(n, deadline).await?;
            } else {
                // Delimited by the close (RFC 9112 6.3 rule 8).
                self.skip_to_eof(deadline).await?;
                closes = true;
            }
            return Ok(Answer::Response(Facts {
                status,
                version: if minor == 0 { "HTTP/1.0" } else { "HTTP/1.1" },
                connection,
                keep_alive,
                closes,
            }));
        }
    }

    async fn skip(&mut self, mut n: u64, deadline: Instant) -> Result<(), ProbeError> {
        if n > MAX_BODY {
            return Err(ProbeError::Protocol(format!(
                "response body of {n} bytes: probe a smaller path"
            )));
        }
        // Bounded by `n`: every round consumes bytes.
        loop {
            let take = n.min(self.buf.len() as u64);
            self.buf.advance(take as usize);
            n -= take;
            if n == 0 {
                return Ok(());
            }
            self.fill_more(deadline, "a response body").await?;
        }
    }

    async fn skip_to_eof(&mut self, deadline: Instant) -> Result<(), ProbeError> {
        let mut total = self.buf.len() as u64;
        self.buf.clear();
        // Bounded by MAX_BODY and the deadline.
        while self.fill(deadline).await? > 0 {
            total += self.buf.len() as u64;
            self.buf.clear();
            if total > MAX_BODY {
                return Err(ProbeError::Protocol(
                    "response body over 16 MiB: probe a smaller path".into(),
                ));
            }
        }
        Ok(())
    }

    async fn line(&mut self, deadline: Instant) -> Result<String, ProbeError> {
        // Bounded by MAX_HEAD and the deadline.
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.advance(i + 2);
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD {
                return Err(ProbeError::Protocol("chunk line over 64 KiB".into()));
            }
            self.fill_more(deadline, "a chunked body").await?;
        }
    }

    async fn skip_chunked(&mut self, deadline: Instant) -> Result<(), ProbeError> {
        let mut total = 0u64;
        // Bounded by MAX_BODY: every chunk adds to `total`, the last one is 0.
        loop {
            let line = self.line(deadline).await?;
            let size = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size, 16)
                .map_err(|_| ProbeError::Protocol(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers, until an empty line.
                while !self.line(deadline).await?.is_empty() {}
                return Ok(());
            }
            total += size;
            if total > MAX_BODY {
                return Err(ProbeError::Protocol(
                    "response body over 16 MiB: probe a smaller path".into(),
                ));
            }
            self.skip(size, deadline).await?;
            if !self.line(deadline).await?.is_empty() {
                return Err(ProbeError::Protocol("chunk without its CRLF".into()));
            }
        }
    }

    async fn read_fastcgi(&mut self, deadline: Instant) -> Result<Answer, ProbeError> {
        if self.buf.is_empty()
            && let Some(style) = self.fill_first(deadline).await?
        {
            return Ok(Answer::Closed(style));
        }
        let mut decoder = RecordDecoder::new();
        let mut head = Some(HeadParser::new());
        let mut status = 0;
        // Bounded by the deadline: every round decodes a record or reads bytes.
        loop {
            let rec = decoder
                .decode(&mut self.buf)
                .map_err(|e| ProbeError::Protocol(format!("not FastCGI: {e}")))?;
            let Some(rec) = rec else {
                self.fill_more(deadline, "a FastCGI response").await?;
                continue;
            };
            match rec.kind {
                RecordType::Stdout if !rec.content.is_empty() => {
                    if let Some(p) = head.take() {
                        match p.feed(&rec.content) {
                            Ok(Progress::Partial(p)) => head = Some(p),
                            Ok(Progress::Complete(h)) => status = h.status.code(),
                            Err(e) => {
                                return Err(ProbeError::Protocol(format!(
                                    "bad CGI response head: {e}"
                                )));
                            }
                        }
                    }
                }
                RecordType::EndRequest => {
                    let end = EndRequest::parse(&rec.content)
                        .map_err(|e| ProbeError::Protocol(format!("bad END_REQUEST: {e}")))?;
                    if status == 0 {
                        return Err(ProbeError::Protocol(format!(
                            "the application ended the request without a response ({:?})",
                            end.protocol_status
                        )));
                    }
                    return Ok(Answer::Response(Facts {
                        status,
                        version: super::report::FASTCGI,
                        ..Facts::default()
                    }));
                }
                _ => {}
            }
        }
    }

    /// Waits until the upstream closes this idle connection or `until` passes.
    pub async fn watch_close(&mut self, until: Instant) -> Watch {
        let mut unsolicited = self.buf.len();
        self.buf.clear();
        // Bounded by `until`: every round ends, or reads bytes the upstream sent.
        loop {
            let read = tokio::time::timeout_at(until, self.stream.read_buf(&mut self.buf)).await;
            let after = self.idle_since.elapsed();
            let style = match read {
                Err(_) => return Watch::Open { unsolicited },
                Ok(Ok(0)) => CloseStyle::Fin,
                Ok(Ok(n)) => {
                    unsolicited += n;
                    self.buf.clear();
                    continue;
                }
                // TLS: a FIN without close_notify first.
                Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => CloseStyle::Fin,
                Ok(Err(_)) => CloseStyle::Rst,
            };
            return Watch::Closed {
                after,
                style,
                unsolicited,
            };
        }
    }
}

/// A FastCGI GET for `script` with `FCGI_KEEP_CONN`, as a web server sends it.
fn fastcgi_request(target: &Target, script: &str) -> Result<Vec<u8>, ProbeError> {
    let mut out = BytesMut::new();
    record::encode_begin_request(&mut out, 1, Role::Responder, true);
    let port = target.port.to_string();
    let params: [(&str, &str); 11] = [
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        ("SERVER_SOFTWARE", "holdfast-probe"),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("REQUEST_METHOD", "GET"),
        ("SCRIPT_FILENAME", script),
        ("SCRIPT_NAME", script),
        ("REQUEST_URI", script),
        ("QUERY_STRING", ""),
        ("SERVER_NAME", &target.host),
        ("SERVER_PORT", &port),
        ("REMOTE_ADDR", "127.0.0.1"),
    ];
    record::encode_params(
        &mut out,
        1,
        params.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes())),
    )
    .map_err(|e| ProbeError::Protocol(format!("cannot encode FastCGI params: {e}")))?;
    record::encode_stdin(&mut out, 1, b"");
    Ok(out.to_vec())
}

/// Asks a FastCGI application what it accepts (GET_VALUES), on a connection of its own.
///
/// # Errors
/// The connection failed, or the answer was not FastCGI.
pub async fn fastcgi_values(
    dialer: &Dialer,
    timeout: Duration,
) -> Result<Option<ServerValues>, ProbeError> {
    let mut stream = dialer.dial(timeout).await?;
    let mut out = BytesMut::new();
    record::encode_get_values(&mut out, ServerValues::NAMES.iter().copied())
        .map_err(|e| ProbeError::Protocol(format!("cannot encode GET_VALUES: {e}")))?;
    let exchange = async {
        stream.write_all(&out).await.map_err(ProbeError::Io)?;
        let mut buf = BytesMut::new();
        let mut decoder = RecordDecoder::new();
        // Bounded by the timeout around it.
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(r)) if r.kind == RecordType::GetValuesResult => {
                    return Ok(ServerValues::parse(&r.content).ok());
                }
                Ok(Some(_)) => continue,
                Ok(None) => {}
                Err(e) => return Err(ProbeError::Protocol(format!("not FastCGI: {e}"))),
            }
            if stream.read_buf(&mut buf).await.map_err(ProbeError::Io)? == 0 {
                return Ok(None);
            }
        }
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A resolver that never answers is bounded by `--timeout`, like every other wait
    /// of the probe: it reports the host unresolved instead of waiting for good.
    #[tokio::test]
    async fn a_resolver_that_never_answers_is_bounded_by_the_timeout() {
        let host = crate::upstream::tests::HUNG_HOST;
        let target = Target::parse(&format!("http://{host}:8080/"), None).unwrap();
        let timeout = Duration::from_millis(200);
        let outcome =
            tokio::time::timeout(Duration::from_secs(5), Dialer::new(&target, None, timeout))
                .await
                .expect("the lookup outlived --timeout");
        match outcome {
            Err(ProbeError::Resolve(h, e)) => {
                assert_eq!(h, host);
                assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("{host} resolved"),
        }
    }

    /// A host whose first address refuses (`localhost` as `::1` first, for a server
    /// on `127.0.0.1` only): the probe connects to the next, as other clients do,
    /// and every later connection goes there too.
    #[tokio::test]
    async fn the_next_address_is_tried_when_the_first_refuses() {
        let refusing = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        let dialer = Dialer {
            place: Place::Tcp {
                addrs: vec![refusing, open],
                chosen: OnceLock::new(),
            },
            tls: None,
        };
        let timeout = Duration::from_secs(5);
        dialer
            .dial(timeout)
            .await
            .expect("the second address answers");
        assert_eq!(dialer.describe(), open.to_string());
        dialer.dial(timeout).await.expect("and again");
        for _ in 0..2 {
            let (_, from) = tokio::time::timeout(timeout, listener.accept())
                .await
                .expect("accepted in time")
                .unwrap();
            assert!(from.ip().is_loopback());
        }
    }
}
