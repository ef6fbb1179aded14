//! HTTP/1.1 wire pieces shared by the scripted upstream and the raw clients.
//!
//! Header lists, message-head reading with `httparse`, body framing (RFC 9112 section 6)
//! and decoding (Content-Length, chunked with trailers, until EOF), and the deterministic
//! body pattern every fixture uses, so a test can verify any byte of any body by offset.
//! Not a general HTTP library: it is strict where a test wants to see an error and lenient
//! (bare LF) where real peers are.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest message head either side accepts, in bytes.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Largest chunk-size or trailer line, in bytes.
const MAX_LINE: usize = 8 * 1024;
/// Most header fields in one head.
const MAX_HEADERS: usize = 128;

/// Byte `i` of every deterministic body: `(i % 251) as u8`.
///
/// 251 is prime, so a body shifted by any offset does not match itself by accident.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// `len` pattern bytes starting at body offset `offset`.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| pattern_byte(offset + i)).collect()
}

/// Whether `data` equals the pattern starting at body offset `offset`.
pub fn is_pattern(offset: u64, data: &[u8]) -> bool {
    data.iter()
        .enumerate()
        .all(|(i, b)| *b == pattern_byte(offset + i as u64))
}

/// A pattern block whose length is a multiple of 251, so writing it repeatedly keeps
/// the pattern aligned.
pub(crate) fn pattern_block() -> Vec<u8> {
    pattern(0, 251 * 261)
}

// === impl Headers ===

/// Header fields in the order received, names as sent, values as raw bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, Vec<u8>)>);

impl Headers {
    /// An empty list.
    pub fn new() -> Headers {
        Headers(Vec::new())
    }

    /// Appends a field.
    pub fn push(&mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) {
        self.0.push((name.into(), value.into()));
    }

    /// The first value of `name` (case-insensitive) if it is UTF-8.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.get_bytes(name)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The first value of `name` (case-insensitive) as bytes.
    pub fn get_bytes(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Every value of `name` (case-insensitive), in order.
    pub fn get_all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.0
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Whether any `name` field lists `token` (comma-separated, case-insensitive), as
    /// `Connection: close` or `Transfer-Encoding: chunked` do.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.get_all(name).any(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case(token))
        })
    }

    /// Whether a field called `name` is present.
    pub fn contains(&self, name: &str) -> bool {
        self.get_bytes(name).is_some()
    }

    /// `(name, value)` pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no fields.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn from_httparse(headers: &[httparse::Header<'_>]) -> Headers {
        Headers(
            headers
                .iter()
                .map(|h| (h.name.to_owned(), h.value.to_owned()))
                .collect(),
        )
    }
}

/// How a message body is delimited (RFC 9112 section 6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body at all (HEAD, 1xx, 204, 304, or a request without length).
    Empty,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// A response body that ends when the server closes the connection.
    UntilEof,
}

/// A parsed request line and headers.
#[derive(Clone, Debug)]
pub(crate) struct RequestHead {
    pub method: String,
    pub target: String,
    pub minor_version: u8,
    pub headers: Headers,
}

/// A parsed status line and headers.
#[derive(Clone, Debug)]
pub(crate) struct ResponseHead {
    pub minor_version: u8,
    pub status: u16,
    pub reason: String,
    pub headers: Headers,
}

/// Why reading a message failed.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The peer closed its sending side before the message was complete.
    Eof,
    Io(std::io::Error),
    Malformed(String),
}

impl RequestHead {
    /// The request body framing (RFC 9112 section 6.3, rules 4 to 6 for requests).
    pub fn framing(&self) -> Result<BodyFraming, ReadError> {
        if self.headers.contains("transfer-encoding") {
            if last_coding_is_chunked(&self.headers) {
                return Ok(BodyFraming::Chunked);
            }
            return Err(ReadError::Malformed(
                "request transfer-encoding without final chunked".into(),
            ));
        }
        match content_length(&self.headers)? {
            Some(0) | None => Ok(BodyFraming::Empty),
            Some(n) => Ok(BodyFraming::Length(n)),
        }
    }
}

impl ResponseHead {
    /// The response body framing given the request method (RFC 9112 section 6.3).
    pub fn framing(&self, request_method: &str) -> Result<BodyFraming, ReadError> {
        if request_method.eq_ignore_ascii_case("HEAD")
            || (100..200).contains(&self.status)
            || self.status == 204
            || self.status == 304
        {
            return Ok(BodyFraming::Empty);
        }
        if self.headers.contains("transfer-encoding") {
            if last_coding_is_chunked(&self.headers) {
                return Ok(BodyFraming::Chunked);
            }
            return Ok(BodyFraming::UntilEof);
        }
        match content_length(&self.headers)? {
            Some(0) => Ok(BodyFraming::Empty),
            Some(n) => Ok(BodyFraming::Length(n)),
            None => Ok(BodyFraming::UntilEof),
        }
    }
}

fn last_coding_is_chunked(headers: &Headers) -> bool {
    let all: Vec<String> = headers
        .get_all("transfer-encoding")
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    all.join(",")
        .split(',')
        .map(str::trim)
        .rfind(|t| !t.is_empty())
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
}

fn content_length(headers: &Headers) -> Result<Option<u64>, ReadError> {
    let mut found: Option<u64> = None;
    for value in headers.get_all("content-length") {
        for part in String::from_utf8_lossy(value).split(',') {
            let n: u64 = part
                .trim()
                .parse()
                .map_err(|_| ReadError::Malformed(format!("bad content-length {part:?}")))?;
            if found.is_some_and(|f| f != n) {
                return Err(ReadError::Malformed("conflicting content-length".into()));
            }
            found = Some(n);
        }
    }
    Ok(found)
}

// === impl Reader ===

/// A byte source with its read-ahead buffer and a count of bytes received.
pub(crate) struct Reader<S> {
    pub io: S,
    pub buf: BytesMut,
    /// Bytes received from `io` since creation, to tell "nothing arrived" from "some did".
    pub received: u64,
}

impl<S: AsyncRead + Unpin> Reader<S> {
    pub fn new(io: S) -> Reader<S> {
        Reader {
            io,
            buf: BytesMut::with_capacity(16 * 1024),
            received: 0,
        }
    }

    /// Reads more bytes into the buffer; `Ok(0)` at EOF.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        let n = self.io.read_buf(&mut self.buf).await?;
        self.received += n as u64;
        Ok(n)
    }

    async fn fill_or_eof(&mut self) -> Result<(), ReadError> {
        match self.fill().await {
            Ok(0) => Err(ReadError::Eof),
            Ok(_) => Ok(()),
            Err(e) => Err(ReadError::Io(e)),
        }
    }

    pub async fn read_request_head(&mut self) -> Result<RequestHead, ReadError> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let head = RequestHead {
                        method: req.method.unwrap_or_default().to_owned(),
                        target: req.path.unwrap_or_default().to_owned(),
                        minor_version: req.version.unwrap_or(1),
                        headers: Headers::from_httparse(req.headers),
                    };
                    self.buf.advance(n);
                    return Ok(head);
                }
                Ok(httparse::Status::Partial) => self.check_head_size()?,
                Err(e) => return Err(ReadError::Malformed(format!("request head: {e}"))),
            }
            self.fill_or_eof().await?;
        }
    }

    pub async fn read_response_head(&mut self) -> Result<ResponseHead, ReadError> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut res = httparse::Response::new(&mut headers);
            match res.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let head = ResponseHead {
                        minor_version: res.version.unwrap_or(1),
                        status: res.code.unwrap_or_default(),
                        reason: res.reason.unwrap_or_default().to_owned(),
                        headers: Headers::from_httparse(res.headers),
                    };
                    self.buf.advance(n);
                    return Ok(head);
                }
                Ok(httparse::Status::Partial) => self.check_head_size()?,
                Err(e) => return Err(ReadError::Malformed(format!("response head: {e}"))),
            }
            self.fill_or_eof().await?;
        }
    }

    fn check_head_size(&self) -> Result<(), ReadError> {
        if self.buf.len() > MAX_HEAD {
            return Err(ReadError::Malformed(format!(
                "head larger than {MAX_HEAD} bytes"
            )));
        }
        Ok(())
    }

    /// Reads a body with `framing`, handing each piece to `sink`; returns the trailers.
    pub async fn read_body(
        &mut self,
        framing: BodyFraming,
        sink: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<Headers, ReadError> {
        match framing {
            BodyFraming::Empty => Ok(Headers::new()),
            BodyFraming::Length(n) => {
                self.read_exact_into(n, sink).await?;
                Ok(Headers::new())
            }
            BodyFraming::UntilEof => loop {
                if !self.buf.is_empty() {
                    sink(&self.buf);
                    self.buf.clear();
                }
                match self.fill().await {
                    Ok(0) => return Ok(Headers::new()),
                    Ok(_) => {}
                    Err(e) => return Err(ReadError::Io(e)),
                }
            },
            BodyFraming::Chunked => self.read_chunked(sink).await,
        }
    }

    async fn read_exact_into(
        &mut self,
        mut remaining: u64,
        sink: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<(), ReadError> {
        while remaining > 0 {
            if self.buf.is_empty() {
                self.fill_or_eof().await?;
            }
            let take = self
                .buf
                .len()
                .min(usize::try_from(remaining).unwrap_or(usize::MAX));
            sink(&self.buf[..take]);
            self.buf.advance(take);
            remaining -= take as u64;
        }
        Ok(())
    }

    /// RFC 9112 section 7.1: chunk-size [; ext] CRLF data CRLF ... 0 CRLF trailers CRLF.
    async fn read_chunked(
        &mut self,
        sink: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<Headers, ReadError> {
        loop {
            let line = self.read_line().await?;
            let size_text = line.split(';').next().unwrap_or("").trim();
            let size = u64::from_str_radix(size_text, 16)
                .map_err(|_| ReadError::Malformed(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                let mut trailers = Headers::new();
                loop {
                    let line = self.read_line().await?;
                    if line.is_empty() {
                        return Ok(trailers);
                    }
                    let (name, value) = line
                        .split_once(':')
                        .ok_or_else(|| ReadError::Malformed(format!("bad trailer {line:?}")))?;
                    trailers.push(name.trim(), value.trim().as_bytes());
                }
            }
            self.read_exact_into(size, sink).await?;
            let end = self.read_line().await?;
            if !end.is_empty() {
                return Err(ReadError::Malformed(
                    "chunk data longer than its size".into(),
                ));
            }
        }
    }

    /// One line without its CRLF (a bare LF is accepted).
    async fn read_line(&mut self) -> Result<String, ReadError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let mut line = self.buf.split_to(pos + 1);
                line.truncate(pos);
                if line.last() == Some(&b'\r') {
                    line.truncate(pos - 1);
                }
                return String::from_utf8(line.to_vec())
                    .map_err(|_| ReadError::Malformed("non-UTF-8 line".into()));
            }
            if self.buf.len() > MAX_LINE {
                return Err(ReadError::Malformed("line too long".into()));
            }
            self.fill_or_eof().await?;
        }
    }
}

/// Appends one chunk (RFC 9112 section 7.1) to `out`.
pub(crate) fn encode_chunk(out: &mut Vec<u8>, data: &[u8]) {
    if data.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The canonical reason phrase for the statuses tests use.
pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body_of(wire: &[u8], framing: BodyFraming) -> (Result<Headers, ReadError>, Vec<u8>) {
        let mut reader = Reader::new(wire);
        let mut body = Vec::new();
        let r = reader
            .read_body(framing, &mut |b: &[u8]| body.extend_from_slice(b))
            .await;
        (r, body)
    }

    #[tokio::test]
    async fn chunked_with_extensions_and_trailers() {
        let wire = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 42\r\nX-Other: a:b\r\n\r\nNEXT";
        let (trailers, body) = body_of(wire, BodyFraming::Chunked).await;
        let trailers = trailers.expect("valid chunked body");
        assert_eq!(body, b"hello world");
        assert_eq!(trailers.get("x-sum"), Some("42"));
        assert_eq!(trailers.get("x-other"), Some("a:b"));
    }

    #[tokio::test]
    async fn chunked_truncated_is_eof() {
        let (r, body) = body_of(b"a\r\nhello", BodyFraming::Chunked).await;
        assert!(matches!(r, Err(ReadError::Eof)));
        assert_eq!(body, b"hello");
    }

    #[tokio::test]
    async fn chunk_longer_than_size_is_malformed() {
        let (r, _) = body_of(b"2\r\nhello\r\n0\r\n\r\n", BodyFraming::Chunked).await;
        assert!(matches!(r, Err(ReadError::Malformed(_))));
    }

    #[tokio::test]
    async fn response_framing_follows_rfc9112() {
        let mut reader = Reader::new(
            &b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"[..],
        );
        let head = reader.read_response_head().await.expect("valid head");
        assert_eq!(head.framing("GET").ok(), Some(BodyFraming::Chunked));
        assert_eq!(head.framing("HEAD").ok(), Some(BodyFraming::Empty));
        let mut reader = Reader::new(&b"HTTP/1.0 200 OK\r\n\r\n"[..]);
        let head = reader.read_response_head().await.expect("valid head");
        assert_eq!(head.framing("GET").ok(), Some(BodyFraming::UntilEof));
    }

    #[test]
    fn pattern_is_aligned_in_blocks() {
        let block = pattern_block();
        assert_eq!(block.len() % 251, 0);
        assert!(is_pattern(block.len() as u64 * 3, &block));
        assert!(!is_pattern(1, &block[..10]));
    }
}
