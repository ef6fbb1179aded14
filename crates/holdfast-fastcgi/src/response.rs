//! Incremental parser for the CGI response head at the start of STDOUT
//! (RFC 3875 section 6).
//!
//! Scope: header lines fed in pieces of any size, as STDOUT records arrive;
//! CRLF, bare LF and mixed line ends; the `Status` field; telling a client
//! redirect from a local one (RFC 3875 6.2.2-6.2.3); a size limit on the
//! head. Not in scope: the body, `Content-Length` or chunking, hop-by-hop
//! header removal, turning fields into `http` types, or following a local
//! redirect; the proxy decides all of those.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use thiserror::Error;

/// Default limit on the size of a response head: 64 KiB.
pub const DEFAULT_HEAD_LIMIT: usize = 64 * 1024;

/// Collects STDOUT bytes until the blank line that ends the CGI head.
///
/// [`feed`](Self::feed) takes the parser by value: it comes back in
/// [`Progress::Partial`] while more bytes are needed, and is gone once the
/// head is complete, so a finished parser cannot be fed by mistake.
#[derive(Debug, Clone)]
pub struct HeadParser {
    buf: BytesMut,
    limit: usize,
    /// Bytes of `buf` already searched for a line feed.
    scanned: usize,
    /// Start of the line not yet complete.
    line_start: usize,
    /// Number of complete lines, for error messages.
    lines: usize,
    fields: Vec<FieldRange>,
    status: Option<(u16, Range<usize>)>,
    /// Index into `fields` of the `Location` field.
    location: Option<usize>,
}

/// What [`HeadParser::feed`] made of the bytes so far.
#[derive(Debug)]
pub enum Progress {
    /// No blank line yet: feed the parser more.
    Partial(HeadParser),
    /// The head is complete.
    Complete(ResponseHead),
}

/// A parsed CGI response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: Status,
    /// Header fields in the order received, values without surrounding
    /// whitespace. The CGI `Status` field is not among them: it is in
    /// [`status`](Self::status) and is not an HTTP header.
    pub headers: Vec<HeaderField>,
    /// Bytes after the blank line that arrived with the head: the start of
    /// the body.
    pub body: Bytes,
}

/// One header field, as bytes: nothing requires UTF-8.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderField {
    pub name: Bytes,
    pub value: Bytes,
}

/// The response status the head asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// A `Status:` field gave it (RFC 3875 6.3.3). A `Location` field, if
    /// any, is then an ordinary header.
    Explicit { code: u16, reason: Bytes },
    /// Neither `Status` nor `Location`: 200 OK (RFC 3875 6.2.1).
    ImplicitOk,
    /// `Location` holds anything but a local path, typically an absolute
    /// URL, and there is no `Status`: a client redirect, 302 Found
    /// (RFC 3875 6.2.3).
    ClientRedirect,
    /// `Location` starts with a single `/` and there is no `Status`: a local
    /// redirect (RFC 3875 6.2.2). The server may serve that path instead
    /// (Apache does) or send it to the client as a 302 (nginx does).
    LocalRedirect,
}

/// Why a CGI response head was rejected. `line` counts from 1.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ResponseError {
    /// No blank line within `limit` bytes.
    #[error("CGI response head exceeds {limit} bytes")]
    HeadTooLarge { limit: usize },
    /// A line starts with a space or tab: obsolete line folding, which
    /// RFC 9112 5.2 lets a recipient reject.
    #[error("CGI response header line {line} is folded (obs-fold)")]
    ObsFold { line: usize },
    /// A non-empty line has no colon.
    #[error("CGI response header line {line} has no colon")]
    MalformedLine { line: usize },
    /// The field name is empty or not an HTTP token, e.g. whitespace
    /// before the colon (RFC 9112 5.1).
    #[error("CGI response header line {line} has an invalid field name")]
    InvalidName { line: usize },
    /// The field value holds a control character, such as NUL or a bare CR.
    #[error("CGI response header line {line} has a control character in its value")]
    InvalidValue { line: usize },
    /// `Status` is not three digits from 100 to 999, optionally followed by
    /// whitespace and a reason phrase.
    #[error("CGI response header line {line} has an invalid Status")]
    InvalidStatus { line: usize },
    /// A second `Status` field.
    #[error("CGI response header line {line} repeats Status")]
    DuplicateStatus { line: usize },
    /// A second `Location` field: which redirect is meant is unclear.
    #[error("CGI response header line {line} repeats Location")]
    DuplicateLocation { line: usize },
}

#[derive(Debug, Clone)]
struct FieldRange {
    name: Range<usize>,
    value: Range<usize>,
}

// === impl HeadParser ===

impl Default for HeadParser {
    fn default() -> Self {
        Self::new()
    }
}

impl HeadParser {
    /// A parser with the [`DEFAULT_HEAD_LIMIT`] of 64 KiB.
    pub fn new() -> Self {
        Self::with_limit(DEFAULT_HEAD_LIMIT)
    }

    /// A parser that rejects heads of more than `limit` bytes, counting
    /// line ends and the blank line.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            limit,
            scanned: 0,
            line_start: 0,
            lines: 0,
            fields: Vec::new(),
            status: None,
            location: None,
        }
    }

    /// Bytes received so far. Zero when STDOUT ends here means the
    /// application wrote nothing; more means its head was cut short.
    pub fn buffered_len(&self) -> usize {
        self.buf.len()
    }

    /// Adds the next STDOUT bytes.
    ///
    /// Lines are checked as soon as they are complete, so a malformed head
    /// fails without waiting for its end.
    ///
    /// # Errors
    ///
    /// A [`ResponseError`] naming the first bad line, or
    /// [`ResponseError::HeadTooLarge`] once the head cannot fit the limit.
    pub fn feed(mut self, data: &[u8]) -> Result<Progress, ResponseError> {
        self.buf.extend_from_slice(data);
        while let Some(found) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            let newline = self.scanned + found;
            self.scanned = newline + 1;
            self.lines += 1;
            let mut end = newline;
            if end > self.line_start && self.buf[end - 1] == b'\r' {
                end -= 1;
            }
            if end == self.line_start {
                let head_len = newline + 1;
                if head_len > self.limit {
                    return Err(ResponseError::HeadTooLarge { limit: self.limit });
                }
                return Ok(Progress::Complete(self.finish(head_len)));
            }
            // This line is not the blank one, so the head needs at least
            // one more line feed.
            if newline + 2 > self.limit {
                return Err(ResponseError::HeadTooLarge { limit: self.limit });
            }
            self.parse_line(self.line_start..end)?;
            self.line_start = newline + 1;
        }
        self.scanned = self.buf.len();
        // Everything buffered is head, and the blank line's LF is missing.
        if self.buf.len() >= self.limit {
            return Err(ResponseError::HeadTooLarge { limit: self.limit });
        }
        Ok(Progress::Partial(self))
    }

    fn parse_line(&mut self, line: Range<usize>) -> Result<(), ResponseError> {
        let number = self.lines;
        let bytes = &self.buf[line.clone()];
        if matches!(bytes.first(), Some(b' ' | b'\t')) {
            return Err(ResponseError::ObsFold { line: number });
        }
        let colon = bytes
            .iter()
            .position(|&b| b == b':')
            .ok_or(ResponseError::MalformedLine { line: number })?;
        let name = &bytes[..colon];
        if name.is_empty() || !name.iter().copied().all(is_tchar) {
            return Err(ResponseError::InvalidName { line: number });
        }
        let value = trim_ows(line.start + colon + 1..line.end, &self.buf);
        if !self.buf[value.clone()].iter().copied().all(is_field_byte) {
            return Err(ResponseError::InvalidValue { line: number });
        }
        if name.eq_ignore_ascii_case(b"status") {
            if self.status.is_some() {
                return Err(ResponseError::DuplicateStatus { line: number });
            }
            let status = parse_status(value, &self.buf)
                .ok_or(ResponseError::InvalidStatus { line: number })?;
            self.status = Some(status);
            return Ok(());
        }
        if name.eq_ignore_ascii_case(b"location") {
            if self.location.is_some() {
                return Err(ResponseError::DuplicateLocation { line: number });
            }
            self.location = Some(self.fields.len());
        }
        self.fields.push(FieldRange {
            name: line.start..line.start + colon,
            value,
        });
        Ok(())
    }

    fn finish(self, head_len: usize) -> ResponseHead {
        let mut head = self.buf.freeze();
        let body = head.split_off(head_len);
        let status = match (self.status, self.location) {
            (Some((code, reason)), _) => Status::Explicit {
                code,
                reason: head.slice(reason),
            },
            (None, Some(index)) => match self.fields.get(index) {
                Some(field) => redirect_kind(&head[field.value.clone()]),
                None => Status::ImplicitOk,
            },
            (None, None) => Status::ImplicitOk,
        };
        let headers = self
            .fields
            .into_iter()
            .map(|field| HeaderField {
                name: head.slice(field.name),
                value: head.slice(field.value),
            })
            .collect();
        ResponseHead {
            status,
            headers,
            body,
        }
    }
}

// === impl ResponseHead ===

impl ResponseHead {
    /// The `Location` value, if the head has one.
    pub fn location(&self) -> Option<&Bytes> {
        self.headers
            .iter()
            .find(|field| field.name.eq_ignore_ascii_case(b"location"))
            .map(|field| &field.value)
    }
}

// === impl Status ===

impl Status {
    /// The HTTP status code: the explicit one, 200, or 302 for both kinds
    /// of redirect.
    pub fn code(&self) -> u16 {
        match self {
            Self::Explicit { code, .. } => *code,
            Self::ImplicitOk => 200,
            Self::ClientRedirect | Self::LocalRedirect => 302,
        }
    }
}

/// RFC 3875 6.2.2: a local redirect is an abs-path. `//host/..` is a
/// network-path reference to another host, so it is not treated as local.
fn redirect_kind(location: &[u8]) -> Status {
    match location {
        [] => Status::ImplicitOk,
        [b'/', b'/', ..] => Status::ClientRedirect,
        [b'/', ..] => Status::LocalRedirect,
        _ => Status::ClientRedirect,
    }
}

/// `Status: 404` or `Status: 404 Not Found`; returns the code and the
/// reason phrase's range.
fn parse_status(value: Range<usize>, buf: &[u8]) -> Option<(u16, Range<usize>)> {
    let bytes = &buf[value.clone()];
    let (digits, rest) = bytes.split_first_chunk::<3>()?;
    if !digits.iter().all(u8::is_ascii_digit) || digits[0] == b'0' {
        return None;
    }
    let code = digits
        .iter()
        .fold(0u16, |n, &d| n * 10 + u16::from(d - b'0'));
    if !rest.is_empty() && !matches!(rest[0], b' ' | b'\t') {
        return None;
    }
    Some((code, trim_ows(value.start + 3..value.end, buf)))
}

fn trim_ows(mut range: Range<usize>, buf: &[u8]) -> Range<usize> {
    while range.start < range.end && matches!(buf[range.start], b' ' | b'\t') {
        range.start += 1;
    }
    while range.end > range.start && matches!(buf[range.end - 1], b' ' | b'\t') {
        range.end -= 1;
    }
    range
}

/// RFC 9110 5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// RFC 9110 5.5 field-vchar, SP or HTAB; obs-text (0x80-0xFF) allowed.
fn is_field_byte(b: u8) -> bool {
    b == b'\t' || b >= 0x20 && b != 0x7F
}

#[cfg(test)]
mod tests;
