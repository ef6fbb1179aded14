//! A parsed HTTP/1.1 response, and the parser for the upstream's echo bodies.

use std::borrow::Cow;

use bytes::Bytes;
use tokio::io::AsyncRead;

use crate::wire::{BodyFraming, Headers, ReadError, Reader};

/// Most 1xx responses skipped before a final one.
const MAX_INFORMATIONAL: usize = 16;

/// A complete response as a client received it.
#[derive(Clone, Debug)]
pub struct Response {
    /// 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub minor_version: u8,
    pub status: u16,
    pub reason: String,
    pub headers: Headers,
    /// The decoded body; empty when read with `read_response_streaming`.
    pub body: Bytes,
    /// Decoded body length in bytes.
    pub body_len: u64,
    /// Chunked trailers, if any.
    pub trailers: Headers,
    /// Statuses of 1xx responses received before this one.
    pub informational: Vec<u16>,
    /// How the body was delimited.
    pub framing: BodyFraming,
}

/// A request as the upstream's `Echo` behaviour wrote it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Echoed {
    pub method: String,
    pub target: String,
    /// `(name, value)` in the order the upstream received them, names as sent.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

// === impl Response ===

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }

    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Whether the server lets the client reuse the connection (RFC 9112 section 9.3):
    /// no `Connection: close`, HTTP/1.1 or an HTTP/1.0 `keep-alive`, and a body that did
    /// not end with the connection.
    pub fn keeps_alive(&self) -> bool {
        if self.headers.has_token("connection", "close") || self.framing == BodyFraming::UntilEof {
            return false;
        }
        self.minor_version >= 1 || self.headers.has_token("connection", "keep-alive")
    }

    /// The `timeout=N` of a `Keep-Alive` header, in seconds.
    pub fn keep_alive_timeout(&self) -> Option<u64> {
        self.header("keep-alive")?
            .split(',')
            .filter_map(|p| p.trim().split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("timeout"))
            .and_then(|(_, v)| v.trim().parse().ok())
    }

    /// The request the upstream echoed, if this is an `Echo` response.
    pub fn echoed(&self) -> Option<Echoed> {
        Echoed::parse(&self.body)
    }
}

// === impl Echoed ===

impl Echoed {
    /// Parses an `Echo` body: `METHOD TARGET\n`, `name: value\n` lines, `\n`, body.
    pub fn parse(body: &[u8]) -> Option<Echoed> {
        let mut rest = body;
        let mut next_line = || {
            let pos = rest.iter().position(|b| *b == b'\n')?;
            let line = String::from_utf8_lossy(&rest[..pos]).into_owned();
            rest = &rest[pos + 1..];
            Some(line)
        };
        let first = next_line()?;
        let (method, target) = first.split_once(' ')?;
        let (method, target) = (method.to_owned(), target.to_owned());
        let mut headers = Vec::new();
        // Bounded by the body length: each round consumes a line.
        loop {
            let line = next_line()?;
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(": ")?;
            headers.push((name.to_owned(), value.to_owned()));
        }
        Some(Echoed {
            method,
            target,
            headers,
            body: Bytes::copy_from_slice(rest),
        })
    }

    /// The first echoed value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one final response, skipping interim 1xx ones (but not 101).
pub(super) async fn read<S: AsyncRead + Unpin + Send>(
    reader: &mut Reader<S>,
    method: &str,
    on_body: &mut (dyn FnMut(&[u8]) + Send),
) -> Result<Response, ReadError> {
    let mut informational = Vec::new();
    let head = loop {
        let head = reader.read_response_head().await?;
        if (100..200).contains(&head.status) && head.status != 101 {
            informational.push(head.status);
            if informational.len() > MAX_INFORMATIONAL {
                return Err(ReadError::Malformed("too many 1xx responses".into()));
            }
            continue;
        }
        break head;
    };
    let framing = head.framing(method)?;
    let mut body_len = 0u64;
    let trailers = reader
        .read_body(framing, &mut |b: &[u8]| {
            body_len += b.len() as u64;
            on_body(b);
        })
        .await?;
    Ok(Response {
        minor_version: head.minor_version,
        status: head.status,
        reason: head.reason,
        headers: head.headers,
        body: Bytes::new(),
        body_len,
        trailers,
        informational,
        framing,
    })
}
