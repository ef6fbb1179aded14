//! Sans-I/O HTTP/1.1 client codec: request heads and chunked request bodies to bytes,
//! bytes to response heads and response body pieces.
//!
//! holdfast speaks HTTP/1.1 to its upstreams itself, so that the task serving a request
//! reads and writes the pooled connection directly, with no background driver task
//! between it and the socket; hyper stays the client-facing server. This crate is the
//! protocol half of that: it does no I/O, keeps no connection state beyond one chunked
//! body, and never panics on what an upstream sends. holdfast's
//! `upstream/http1/conn.rs` drives it over the pooled socket.
//!
//! What it owns, by RFC 9112 section:
//! - 3: the request line (origin-form target) and 5: the request's field lines, with the
//!   body framing fields written from the caller's [`RequestFraming`] only;
//! - 4 and 5: the status line and field lines of a response, parsed by `httparse` with
//!   size and count limits ([`MAX_HEAD`], [`MAX_HEADERS`]);
//! - 6.1, 6.2 and 6.3: how long the response body is ([`Framing`]), including the
//!   smuggling-relevant cases: `Transfer-Encoding` beats `Content-Length` and closes
//!   the connection, differing or malformed `Content-Length` values are an error;
//! - 7.1 and 7.1.2: chunked bodies in both directions, with trailer sections;
//! - 9.3 and 9.6: whether the connection may carry another request ([`ResponseHead::must_close`]).
//!
//! A response head leaves its hop-by-hop fields out of the map where that is all
//! removing them takes (RFC 9110 7.6.1, [`ResponseHead::hop_by_hop_removed`]): the
//! fields are seen here anyway, and a field never inserted costs nothing to remove.
//!
//! Not in scope: hop-by-hop removal from requests, `Host`, and what to do with 1xx
//! responses; the proxy decides those.

use std::fmt;
use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Version};

/// Largest response head accepted (status line + fields + CRLF).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most header fields accepted in a response head (hyper's default is 100).
pub const MAX_HEADERS: usize = 100;

/// Longest chunk size line accepted, extensions and CRLF included.
const MAX_CHUNK_LINE: u32 = 4 * 1024;
/// Largest trailer section accepted, final CRLF included.
const MAX_TRAILERS: usize = 16 * 1024;
/// Most hex digits in a chunk size: 16 fill a u64, so more could only overflow.
const MAX_CHUNK_DIGITS: u8 = 16;

/// How a response body is delimited (RFC 9112 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body: a response to HEAD, 1xx, 204, 304.
    None,
    /// Content-Length; Length(0) is a valid, empty body.
    Length(u64),
    Chunked,
    /// Read until the upstream closes the connection.
    UntilClose,
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    /// `HTTP_10` or `HTTP_11`.
    pub version: Version,
    pub headers: HeaderMap,
    /// The reason phrase, only when it differs from the status's canonical one
    /// (so the proxy can pass it on); None otherwise.
    pub reason: Option<Bytes>,
    pub framing: Framing,
    /// The connection cannot carry another request after this response:
    /// `Connection: close` (any token, case-insensitive, comma lists, several fields),
    /// an HTTP/1.0 response (always, even with keep-alive: holdfast does not reuse 1.0),
    /// a body delimited by close, or a response with both Transfer-Encoding and
    /// Content-Length (RFC 9112 6.3 point 3: TE wins, and the connection must close).
    /// Also set for 101 and for a 2xx to CONNECT: the connection is no longer HTTP.
    pub must_close: bool,
    /// The hop-by-hop fields (RFC 9110 7.6.1: `Connection`, `Keep-Alive`,
    /// `Transfer-Encoding`, `TE`, `Upgrade`, `Proxy-Connection`, `Proxy-Authenticate`,
    /// `Proxy-Authorization`, and `Trailer` unless the body is chunked) were left out
    /// of `headers`, since a proxy removes them anyway and never building them is the
    /// cheapest removal. Not done (`false`, every field kept) for a 101, whose
    /// `Upgrade` passes on, or when `Connection` names other fields to remove.
    pub hop_by_hop_removed: bool,
    /// The value of the last `Keep-Alive` field, which the pool reads.
    pub keep_alive: Option<Bytes>,
}

/// Why a response head was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// The head exceeds MAX_HEAD bytes or MAX_HEADERS fields.
    TooLarge,
    /// Not a valid HTTP/1.x response head (httparse error, bad version, bad field name or
    /// value, invalid or conflicting Content-Length, status < 100 or > 999...). The string
    /// says what, for logs and the 502 Proxy-Status detail.
    Invalid(&'static str),
}

impl fmt::Display for HeadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadError::TooLarge => f.write_str("response head too large"),
            HeadError::Invalid(what) => write!(f, "invalid response head: {what}"),
        }
    }
}

impl std::error::Error for HeadError {}

/// Where a field's name and value lie in the head, so that the map can be built from
/// the frozen head after `httparse`'s borrow of the read buffer has ended.
#[derive(Debug, Clone, Copy)]
struct Span {
    name: (u32, u32),
    value: (u32, u32),
    kind: FieldKind,
}

/// What a field is to a proxy, and which of them decide the framing. Worked out once
/// per name and kept in [`NameCache`], so a name seen before is never compared again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldKind {
    EndToEnd,
    ContentLength,
    /// `Trailer`: passed on with a chunked body, which can carry the trailers.
    Trailer,
    Connection,
    KeepAlive,
    TransferEncoding,
    /// The other hop-by-hop fields.
    HopByHop,
}

impl FieldKind {
    fn is_hop_by_hop(self) -> bool {
        matches!(
            self,
            FieldKind::Connection
                | FieldKind::KeepAlive
                | FieldKind::TransferEncoding
                | FieldKind::HopByHop
        )
    }
}

/// Classifies a field name (lowercase or not) without building a `HeaderName`.
fn kind_of(name: &[u8]) -> FieldKind {
    const KINDS: [(&[u8], FieldKind); 10] = [
        (b"content-length", FieldKind::ContentLength),
        (b"trailer", FieldKind::Trailer),
        (b"connection", FieldKind::Connection),
        (b"keep-alive", FieldKind::KeepAlive),
        (b"transfer-encoding", FieldKind::TransferEncoding),
        (b"te", FieldKind::HopByHop),
        (b"upgrade", FieldKind::HopByHop),
        (b"proxy-connection", FieldKind::HopByHop),
        (b"proxy-authenticate", FieldKind::HopByHop),
        (b"proxy-authorization", FieldKind::HopByHop),
    ];
    // Lengths first: most names match none of these lengths.
    KINDS
        .iter()
        .find(|(known, _)| known.len() == name.len() && known.eq_ignore_ascii_case(name))
        .map_or(FieldKind::EndToEnd, |&(_, kind)| kind)
}

/// What the first pass over the head learnt, before the head is split off the buffer.
struct Scanned {
    len: usize,
    status: StatusCode,
    version: Version,
    reason: Option<(u32, u32)>,
    fields: usize,
    framing: Framing,
    must_close: bool,
    strip_hop_by_hop: bool,
    keep_alive: Option<(u32, u32)>,
    /// Transfer-Encoding decides the framing: a Content-Length beside it is not
    /// passed on (RFC 9112 6.3, point 3), or the client would frame by it.
    drop_content_length: bool,
    /// A valid Content-Length that came as a list or in several fields (RFC 9112 6.3
    /// point 5): passed on as one field with the one value, which is all the next
    /// hop (hyper's server among them) takes.
    single_content_length: Option<u64>,
}

/// Parses a response head at the start of `buf`.
///
/// Ok(None): incomplete, read more (but if `buf` already holds [`MAX_HEAD`] bytes or
/// more, Err(TooLarge): the head could only be longer).
/// Ok(Some(head)): the head's bytes were split off the front of `buf` (what follows, the
/// start of the body or the next message, stays in `buf`); header values share the
/// head's allocation instead of being copied.
/// `request_method` decides Framing::None for HEAD; 1xx, 204, 304 are Framing::None too
/// (1xx heads are returned like any other: the caller skips 100/102/103 and handles 101).
///
/// After an error the connection is unusable and `buf`'s contents are unspecified.
pub fn parse_response_head(
    buf: &mut BytesMut,
    request_method: &Method,
) -> Result<Option<ResponseHead>, HeadError> {
    parse_response_head_with(buf, request_method, &mut HeadScratch::default())
}

/// What a connection keeps from one response head to the next, so that parsing the
/// next one costs less: room for where each field lies (a fresh array of
/// [`MAX_HEADERS`] entries would be zeroed, 2 KiB, for every response), and the field
/// names of the last head.
///
/// An upstream sends the same names in the same order on every response of a
/// connection, so each field's name is first compared, byte for byte, with the name
/// the last head had at the same position. When they match, the `HeaderName` and the
/// field's kind are taken from there instead of being worked out again; that was a
/// quarter of the cost of a head with eight fields.
#[derive(Debug, Default)]
pub struct HeadScratch {
    spans: Vec<Span>,
    names: NameCache,
    /// An emptied map to build the next head's fields in (see [`HeadScratch::recycle`]).
    spare: Option<HeaderMap>,
}

/// The largest map [`HeadScratch::recycle`] keeps, in fields it has room for: a usual
/// head's map, not one that a request with hundreds of fields grew.
const SPARE_MAP_CAPACITY: usize = 48;

impl HeadScratch {
    /// Keeps `map`, emptied, for the next response head's fields, so that its two
    /// allocations are not made again. A proxy hands in the request's map once the
    /// request is done with: the response's map goes on to hyper's server, which
    /// parses the client's next request into it, and so on, with no map allocated per
    /// request. A map with room for more than a usual head's fields is dropped.
    pub fn recycle(&mut self, mut map: HeaderMap) {
        if map.capacity() <= SPARE_MAP_CAPACITY {
            map.clear();
            self.spare = Some(map);
        }
    }
}

/// The field names of the last head, by position: at most [`CACHED_NAMES`] of them and
/// [`CACHED_NAME_BYTES`] bytes, so a pooled connection keeps a few hundred bytes here
/// for a usual head and about 3 KiB at most (names not known to `http` are held twice:
/// as they came and lowercased in their `HeaderName`). Positions past those are parsed
/// every time.
#[derive(Debug, Default)]
struct NameCache {
    /// The names' bytes as they came, one after another.
    raw: Vec<u8>,
    known: Vec<KnownName>,
}

const CACHED_NAMES: usize = 32;
const CACHED_NAME_BYTES: usize = 1024;

#[derive(Debug)]
struct KnownName {
    /// Where this name's bytes end in `NameCache::raw` (they start where the one
    /// before ends).
    end: u32,
    name: HeaderName,
    kind: FieldKind,
}

impl NameCache {
    /// The kind of the field at `position` named `raw`, remembering its name for
    /// [`NameCache::name`]. A name unlike the one last seen at `position` forgets that
    /// one and every one after it.
    fn learn(&mut self, position: usize, raw: &[u8]) -> Result<FieldKind, HeadError> {
        let start = match position.checked_sub(1) {
            Some(before) => self
                .known
                .get(before)
                .map_or(usize::MAX, |k| k.end as usize),
            None => 0,
        };
        if let Some(known) = self.known.get(position)
            && self.raw.get(start..known.end as usize) == Some(raw)
        {
            return Ok(known.kind);
        }
        let kind = kind_of(raw);
        if start == usize::MAX || position >= CACHED_NAMES {
            // Past what is kept: the map is built with a name parsed then.
            return Ok(kind);
        }
        let name = HeaderName::from_bytes(raw).map_err(|_| HeadError::Invalid("header name"))?;
        self.known.truncate(position);
        self.raw.truncate(start);
        if start + raw.len() <= CACHED_NAME_BYTES {
            self.raw.extend_from_slice(raw);
            self.known.push(KnownName {
                end: self.raw.len() as u32,
                name,
                kind,
            });
        }
        Ok(kind)
    }

    /// The name of the field at `position`, if [`NameCache::learn`] kept it.
    fn name(&self, position: usize) -> Option<HeaderName> {
        self.known.get(position).map(|k| k.name.clone())
    }
}

/// [`parse_response_head`] with the connection's [`HeadScratch`].
pub fn parse_response_head_with(
    buf: &mut BytesMut,
    request_method: &Method,
    scratch: &mut HeadScratch,
) -> Result<Option<ResponseHead>, HeadError> {
    if buf.is_empty() {
        return Ok(None); // the usual case before the first read: nothing to parse
    }
    let HeadScratch {
        spans,
        names,
        spare,
    } = scratch;
    spans.clear();
    let Some(scanned) = scan_head(buf, request_method, spans, names)? else {
        return Ok(None);
    };
    let head = buf.split_to(scanned.len).freeze();

    let strip = scanned.strip_hop_by_hop;
    let chunked = scanned.framing == Framing::Chunked;
    let keep_alive = match scanned.keep_alive {
        Some(span) => Some(slice(&head, span).ok_or(HeadError::Invalid("header value"))?),
        None => None,
    };
    let mut headers = match spare.take() {
        Some(mut map) => {
            map.reserve(scanned.fields);
            map
        }
        None => HeaderMap::with_capacity(scanned.fields),
    };
    for (position, span) in spans.iter().enumerate() {
        if strip && (span.kind.is_hop_by_hop() || span.kind == FieldKind::Trailer && !chunked)
            || span.kind == FieldKind::ContentLength
                && (scanned.drop_content_length || scanned.single_content_length.is_some())
        {
            continue;
        }
        let name = match names.name(position) {
            Some(name) => name,
            None => head
                .get(range(span.name))
                .and_then(|name| HeaderName::from_bytes(name).ok())
                .ok_or(HeadError::Invalid("header name"))?,
        };
        let value = slice(&head, span.value).ok_or(HeadError::Invalid("header value"))?;
        headers.append(name, checked_value(value));
    }
    if let Some(n) = scanned.single_content_length {
        headers.append(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    let reason = match scanned.reason {
        Some(span) => Some(slice(&head, span).ok_or(HeadError::Invalid("reason phrase"))?),
        None => None,
    };
    Ok(Some(ResponseHead {
        status: scanned.status,
        version: scanned.version,
        headers,
        reason,
        framing: scanned.framing,
        must_close: scanned.must_close,
        hop_by_hop_removed: strip,
        keep_alive,
    }))
}

/// Parses the head in place: everything but building the header map, which needs the
/// head split off and frozen first.
fn scan_head(
    buf: &[u8],
    method: &Method,
    spans: &mut Vec<Span>,
    names: &mut NameCache,
) -> Result<Option<Scanned>, HeadError> {
    let mut fields = [MaybeUninit::uninit(); MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    // Defaults: no obs-fold, no spaces after field names, no invalid lines skipped.
    // `checked_value` relies on no obs-fold: a folded value would hold CR and LF.
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut fields,
    );
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(e) => return Err(HeadError::Invalid(httparse_error(e))),
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }

    let version = match response.version {
        Some(0) => Version::HTTP_10,
        Some(1) => Version::HTTP_11,
        _ => return Err(HeadError::Invalid("version")),
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(HeadError::Invalid("status code"))?;
    let reason = match response.reason {
        Some(reason) if !reason.is_empty() && status.canonical_reason() != Some(reason) => {
            Some(span_of(buf, reason.as_bytes()).ok_or(HeadError::Invalid("reason phrase"))?)
        }
        _ => None,
    };

    let mut must_close = version == Version::HTTP_10;
    let mut transfer_encoding = false;
    let mut last_coding_chunked = false;
    let mut foreign_coding = false;
    // Over every field: `chunked` in two fields is chunked applied twice.
    let mut chunked_codings = 0;
    let mut content_length = ContentLength::Absent;
    // Not one field with one value: several fields, or a list.
    let mut content_length_repeated = false;
    // `Connection` names only `close` / `keep-alive`: no other field to remove.
    let mut connection_names_fields = false;
    let mut keep_alive = None;
    for (position, field) in response.headers.iter().enumerate() {
        let name = field.name.as_bytes();
        let kind = names.learn(position, name)?;
        let span = Span {
            name: span_of(buf, name).ok_or(HeadError::Invalid("header name"))?,
            value: span_of(buf, field.value).ok_or(HeadError::Invalid("header value"))?,
            kind,
        };
        spans.push(span);
        match kind {
            FieldKind::ContentLength => {
                content_length_repeated |=
                    !matches!(content_length, ContentLength::Absent) || field.value.contains(&b',');
                content_length.add(field.value);
            }
            FieldKind::TransferEncoding => {
                // Only the last coding decides (RFC 9112 6.3 point 4); empty list
                // elements, and so an empty line, are not codings (RFC 9110 5.6.1).
                transfer_encoding = true;
                if let Some(chunked) = last_coding_is_chunked(field.value) {
                    last_coding_chunked = chunked;
                }
                let (chunked, other) = codings(field.value);
                chunked_codings += chunked;
                foreign_coding |= other;
            }
            FieldKind::Connection => {
                for token in field.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        must_close = true;
                    } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                        connection_names_fields = true;
                    }
                }
            }
            FieldKind::KeepAlive => keep_alive = Some(span.value),
            FieldKind::EndToEnd | FieldKind::Trailer | FieldKind::HopByHop => {}
        }
    }

    // RFC 9112 6.3, in its order.
    let code = status.as_u16();
    let framing =
        if *method == Method::HEAD || status.is_informational() || code == 204 || code == 304 {
            // A 101 hands the connection over to another protocol.
            must_close |= code == 101;
            Framing::None
        } else if *method == Method::CONNECT && status.is_success() {
            // Point 2: the connection becomes a tunnel after the head.
            must_close = true;
            Framing::None
        } else if transfer_encoding {
            // RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing.
            if version == Version::HTTP_10 {
                return Err(HeadError::Invalid("transfer-encoding in HTTP/1.0"));
            }
            // A coding besides chunked (gzip, identity, ...) leaves the body encoded
            // once chunked is undone, and a proxy that removes the hop-by-hop
            // Transfer-Encoding would pass it on unmarked: refused, as nginx does.
            // So would chunked applied twice (RFC 9112 7.1: a sender must not), once
            // undone.
            if foreign_coding || chunked_codings > 1 {
                return Err(HeadError::Invalid("transfer coding other than chunked"));
            }
            // Point 3: whoever else read the Content-Length disagrees about where the
            // message ends, so the connection must not carry another one.
            must_close |= !matches!(content_length, ContentLength::Absent);
            if last_coding_chunked {
                Framing::Chunked
            } else {
                must_close = true;
                Framing::UntilClose
            }
        } else {
            match content_length {
                ContentLength::Absent => {
                    must_close = true;
                    Framing::UntilClose
                }
                ContentLength::Valid(n) => Framing::Length(n),
                ContentLength::Invalid => return Err(HeadError::Invalid("content-length")),
            }
        };

    Ok(Some(Scanned {
        len,
        status,
        version,
        reason,
        fields: response.headers.len(),
        framing,
        must_close,
        strip_hop_by_hop: !connection_names_fields && code != 101,
        keep_alive,
        drop_content_length: transfer_encoding,
        single_content_length: match content_length {
            ContentLength::Valid(n) if content_length_repeated && !transfer_encoding => Some(n),
            _ => None,
        },
    }))
}

/// The Content-Length fields seen so far.
#[derive(Debug, Clone, Copy)]
enum ContentLength {
    Absent,
    Valid(u64),
    Invalid,
}

impl ContentLength {
    /// Folds in one field: every comma-separated value of every field must be the same
    /// decimal number (RFC 9112 6.3 point 5); anything else poisons the lot.
    fn add(&mut self, value: &[u8]) {
        for part in value.split(|&b| b == b',') {
            *self = match (*self, parse_decimal(part.trim_ascii())) {
                (ContentLength::Invalid, _) | (_, None) => ContentLength::Invalid,
                (ContentLength::Absent, Some(n)) => ContentLength::Valid(n),
                (ContentLength::Valid(m), Some(n)) if m == n => ContentLength::Valid(n),
                (ContentLength::Valid(_), Some(_)) => ContentLength::Invalid,
            };
        }
    }
}

/// The length that `Content-Length` field values say: `Ok(None)` without any, the
/// one number every comma-separated value of every field repeats (RFC 9112 6.3 point
/// 5), or `Err` for anything else (a proxy must not guess where such a body ends).
#[allow(clippy::result_unit_err)] // the only failure: no usable length
pub fn content_length<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> Result<Option<u64>, ()> {
    let mut length = ContentLength::Absent;
    for v in values {
        length.add(v);
    }
    match length {
        ContentLength::Absent => Ok(None),
        ContentLength::Valid(n) => Ok(Some(n)),
        ContentLength::Invalid => Err(()),
    }
}

/// `1*DIGIT` as a u64: no sign, no whitespace, no empty string, no overflow.
fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// Whether a message's `Transfer-Encoding` field values (all of them) name no coding
/// but `chunked`, and that at most once: chunked applied twice (RFC 9112 7.1 forbids
/// it) would be undone once and the body passed on still chunk-framed.
pub fn only_chunked<'a>(values: impl IntoIterator<Item = &'a [u8]>) -> bool {
    let mut chunked = 0;
    for value in values {
        let (n, other) = codings(value);
        if other {
            return false;
        }
        chunked += n;
    }
    chunked <= 1
}

/// The codings a `Transfer-Encoding` value names: how many times `chunked`, and
/// whether any other. Empty list elements are not codings (RFC 9110 5.6.1).
fn codings(value: &[u8]) -> (usize, bool) {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|coding| !coding.is_empty())
        .fold((0, false), |(chunked, other), coding| {
            if coding.eq_ignore_ascii_case(b"chunked") {
                (chunked + 1, other)
            } else {
                (chunked, true)
            }
        })
}

/// Whether the last coding of a field value is chunked; None if it names none.
fn last_coding_is_chunked(value: &[u8]) -> Option<bool> {
    value
        .rsplit(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .find(|coding| !coding.is_empty())
        .map(|coding| coding.eq_ignore_ascii_case(b"chunked"))
}

/// A field value httparse has accepted, as a `HeaderValue` without checking its bytes
/// a second time (a tenth of the cost of parsing a response head).
///
/// httparse takes a value byte when it is HTAB, or from 0x20 to 0xFF but not DEL
/// (RFC 9110 5.5: field-vchar, obs-text, SP and HTAB), and `HeaderValue` the same set;
/// `http_value_bytes_are_header_value_bytes` checks the two agree on every byte. This
/// holds with obs-fold off, as `scan_head` parses. Debug builds (tests, fuzzing)
/// still check each value and panic on a bad one.
#[allow(unsafe_code)]
fn checked_value(value: Bytes) -> HeaderValue {
    debug_assert!(value.iter().all(|&b| is_field_value_byte(b)));
    // SAFETY: not a memory-safety contract: `from_maybe_shared_unchecked` requires
    // valid field-value bytes, which httparse already checked (see above).
    unsafe { HeaderValue::from_maybe_shared_unchecked(value) }
}

/// The bytes httparse takes in a field value (and `HeaderValue` accepts).
fn is_field_value_byte(b: u8) -> bool {
    b == b'\t' || (b >= 0x20 && b != 0x7f)
}

/// Offsets of `part` within `base`; None if it is not inside (httparse guarantees it
/// is, but a wrong offset must be an error rather than a panic later). Offsets fit
/// u32 because the head is at most MAX_HEAD bytes.
fn span_of(base: &[u8], part: &[u8]) -> Option<(u32, u32)> {
    if part.is_empty() {
        return Some((0, 0));
    }
    let start = (part.as_ptr() as usize).checked_sub(base.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    if end > base.len() {
        return None;
    }
    Some((u32::try_from(start).ok()?, u32::try_from(end).ok()?))
}

fn range((start, end): (u32, u32)) -> std::ops::Range<usize> {
    start as usize..end as usize
}

/// The span of `head` as a shared slice, None if out of bounds.
fn slice(head: &Bytes, span: (u32, u32)) -> Option<Bytes> {
    let range = range(span);
    (range.start <= range.end && range.end <= head.len()).then(|| head.slice(range))
}

fn httparse_error(e: httparse::Error) -> &'static str {
    match e {
        httparse::Error::HeaderName => "header name",
        httparse::Error::HeaderValue => "header value",
        httparse::Error::NewLine => "line ending",
        httparse::Error::Status => "status line",
        httparse::Error::Token => "token",
        httparse::Error::TooManyHeaders => "too many header fields",
        httparse::Error::Version => "version",
    }
}

/// Request body framing chosen by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    None,
    Length(u64),
    Chunked,
}

const CONTENT_LENGTH_PREFIX: &[u8] = b"content-length: ";
const CHUNKED_LINE: &[u8] = b"transfer-encoding: chunked\r\n";
const CRLF: &[u8] = b"\r\n";

/// Appends a request head: `METHOD target HTTP/1.1\r\n`, every field of `headers` except
/// `content-length` and `transfer-encoding` (the caller's framing decides those), then
/// `content-length: N` or `transfer-encoding: chunked` per `framing` (nothing for None),
/// then the blank line. Field names are written as stored (lowercase); several values
/// of one name become several lines, in order. `target` is origin-form ("/path?query"),
/// already valid (as an `http::uri::PathAndQuery` is): it is written as is.
/// Hop-by-hop fields are the caller's to remove.
pub fn encode_request_head(
    out: &mut BytesMut,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    framing: RequestFraming,
) {
    encode_request_head_with(out, method, target, headers, framing, &[], &[]);
}

/// [`encode_request_head`] with fields set on the way instead of in `headers`: every
/// field of `headers` named in `replaced` is left out and the given value, if any,
/// written instead; `appended` fields follow those of `headers`. The proxy sets its
/// `X-Forwarded-*`, `Host` and `Via` this way, which spares a header-map insertion
/// (and often the map's growth) per field.
pub fn encode_request_head_with(
    out: &mut BytesMut,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    framing: RequestFraming,
    replaced: &[(&HeaderName, Option<&HeaderValue>)],
    appended: &[(&HeaderName, &HeaderValue)],
) {
    debug_assert!(
        !target.bytes().any(|b| b <= b' ' || b == 0x7f),
        "request target with whitespace or control bytes"
    );
    let is_framing = |name: &HeaderName| {
        name == header::CONTENT_LENGTH
            || name == header::TRANSFER_ENCODING
            || replaced.iter().any(|(r, _)| *r == name)
    };
    let extra = replaced
        .iter()
        .filter_map(|(name, value)| Some((*name, (*value)?)))
        .chain(appended.iter().copied());

    // One reservation for the whole head rather than growing field by field. Fields
    // left out below are counted too: a few bytes too many cost less than telling them
    // apart twice.
    let mut size = method.as_str().len() + 1 + target.len() + b" HTTP/1.1\r\n".len() + CRLF.len();
    for (name, value) in headers {
        size += name.as_str().len() + 2 + value.len() + CRLF.len();
    }
    for (name, value) in extra.clone() {
        size += name.as_str().len() + 2 + value.len() + CRLF.len();
    }
    size += match framing {
        RequestFraming::None => 0,
        RequestFraming::Length(_) => CONTENT_LENGTH_PREFIX.len() + 20 + CRLF.len(),
        RequestFraming::Chunked => CHUNKED_LINE.len(),
    };
    out.reserve(size);

    out.extend_from_slice(method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if !is_framing(name) {
            put_field(out, name, value);
        }
    }
    for (name, value) in extra {
        put_field(out, name, value);
    }
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => {
            out.extend_from_slice(CONTENT_LENGTH_PREFIX);
            put_decimal(out, n);
            out.extend_from_slice(CRLF);
        }
        RequestFraming::Chunked => out.extend_from_slice(CHUNKED_LINE),
    }
    out.extend_from_slice(CRLF);
}

fn put_field(out: &mut BytesMut, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(CRLF);
}

/// Appends `n` in decimal. A digit loop into a stack buffer instead of `core::fmt`,
/// whose formatter machinery costs more than the number on every request with a body.
fn put_decimal(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends `n` in lowercase hex, without leading zeros; same reason as [`put_decimal`].
fn put_hex(out: &mut BytesMut, mut n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = HEX[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Appends the size line of one chunk of a chunked request body (`{hex len}\r\n`).
///
/// The caller writes the `len` bytes of data itself, then [`CHUNK_SUFFIX`], so that the
/// data is not copied. `len` must not be 0: an empty chunk would end the body, so
/// nothing is written for 0 (the stray CRLF that follows then makes the upstream reject
/// the body instead of reading what comes next as a new request).
pub fn chunk_prefix(out: &mut BytesMut, len: usize) {
    debug_assert!(len > 0, "an empty chunk would end the body");
    if len == 0 {
        return;
    }
    out.reserve(16 + CRLF.len());
    put_hex(out, len as u64);
    out.extend_from_slice(CRLF);
}

/// What follows the data of a chunk written after [`chunk_prefix`].
pub const CHUNK_SUFFIX: &[u8] = b"\r\n";

/// Appends the end of a chunked body: `0\r\n`, trailer fields if any, `\r\n`.
/// Which fields may go in a trailer section is the caller's decision.
pub fn encode_last_chunk(out: &mut BytesMut, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        put_field(out, name, value);
    }
    out.extend_from_slice(CRLF);
}

/// Decodes a chunked response body (RFC 9112 7.1) incrementally.
///
/// The size line is consumed byte by byte as it arrives, so nothing of it needs to be
/// buffered; the trailer section is parsed once its end is in the buffer. Line ends
/// must be CRLF: a proxy that accepts a bare LF where the upstream's other readers do
/// not is a smuggling vector.
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: State,
    /// Bytes of the current size line so far.
    line: u32,
}

#[derive(Debug, Clone, Copy)]
enum State {
    /// In the chunk-size hex digits.
    Size {
        size: u64,
        digits: u8,
    },
    /// Whitespace after the size: only a `;` may follow (BWS before an extension).
    SizeSpace {
        size: u64,
    },
    /// In chunk extensions, skipped up to the CR.
    Extension {
        size: u64,
    },
    /// After the size line's CR.
    SizeLf {
        size: u64,
    },
    /// Data bytes of the current chunk still to come (never 0).
    Data {
        remaining: u64,
    },
    /// After a chunk's data: its CR, then its LF.
    DataCr,
    DataLf,
    /// After the last chunk. `scanned`: bytes already searched for the section's end.
    Trailers {
        scanned: usize,
    },
    Done,
    /// An error was returned; it is returned again.
    Failed(&'static str),
}

/// A piece of a chunked body.
#[derive(Debug)]
pub enum Chunk {
    /// Body bytes, split off `buf` without copying (never empty).
    Data(Bytes),
    /// The trailer section, when the last chunk had one (non-empty map); `End` follows.
    Trailers(HeaderMap),
    /// The body ended; the bytes after it (the next message) stay in `buf`.
    End,
    /// Need more bytes.
    More,
}

/// A chunked body that does not follow RFC 9112 7.1 (or exceeds a limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkError(pub &'static str);

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid chunked body: {}", self.0)
    }
}

impl std::error::Error for ChunkError {}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a chunked body.
    pub fn new() -> Self {
        ChunkedDecoder {
            state: State::Size { size: 0, digits: 0 },
            line: 0,
        }
    }

    /// Consumes from the front of `buf` what it can. Returns Data as soon as any body bytes
    /// of the current chunk are available (up to the chunk's remaining size, and all that is
    /// buffered of it), so a large chunk streams in pieces. Call again until More or End.
    /// After End, calling again returns End; after an error, the same error.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Chunk, ChunkError> {
        let result = self.decode_inner(buf);
        if let Err(ChunkError(what)) = result {
            self.state = State::Failed(what);
        }
        result
    }

    /// The whole body, trailer section included, has been consumed.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    fn decode_inner(&mut self, buf: &mut BytesMut) -> Result<Chunk, ChunkError> {
        loop {
            match self.state {
                State::Data { remaining } => {
                    if buf.is_empty() {
                        return Ok(Chunk::More);
                    }
                    let n = usize::try_from(remaining).map_or(buf.len(), |r| r.min(buf.len()));
                    let left = remaining - n as u64;
                    self.state = if left == 0 {
                        State::DataCr
                    } else {
                        State::Data { remaining: left }
                    };
                    return Ok(Chunk::Data(buf.split_to(n).freeze()));
                }
                State::Trailers { scanned } => return self.trailers(buf, scanned),
                State::Done => return Ok(Chunk::End),
                State::Failed(what) => return Err(ChunkError(what)),
                _ => {
                    // Size line or the CRLF after data, a byte at a time.
                    let mut used = 0;
                    for &b in buf.iter() {
                        used += 1;
                        self.step(b)?;
                        if matches!(self.state, State::Data { .. } | State::Trailers { .. }) {
                            break;
                        }
                    }
                    buf.advance(used);
                    if !matches!(self.state, State::Data { .. } | State::Trailers { .. }) {
                        return Ok(Chunk::More);
                    }
                }
            }
        }
    }

    /// One byte of a size line or of the CRLF after chunk data.
    fn step(&mut self, b: u8) -> Result<(), ChunkError> {
        if matches!(
            self.state,
            State::Size { .. }
                | State::SizeSpace { .. }
                | State::Extension { .. }
                | State::SizeLf { .. }
        ) {
            self.line += 1;
            if self.line > MAX_CHUNK_LINE {
                return Err(ChunkError("chunk size line too long"));
            }
        }
        self.state = match self.state {
            State::Size { size, digits } => match (hex_value(b), b) {
                (Some(_), _) if digits == MAX_CHUNK_DIGITS => {
                    return Err(ChunkError("chunk size too large"));
                }
                (Some(v), _) => State::Size {
                    size: (size << 4) | u64::from(v),
                    digits: digits + 1,
                },
                _ if digits == 0 => return Err(ChunkError("missing chunk size")),
                (None, b' ' | b'\t') => State::SizeSpace { size },
                (None, b';') => State::Extension { size },
                (None, b'\r') => State::SizeLf { size },
                (None, _) => return Err(ChunkError("invalid chunk size")),
            },
            State::SizeSpace { size } => match b {
                b' ' | b'\t' => State::SizeSpace { size },
                b';' => State::Extension { size },
                _ => return Err(ChunkError("whitespace after chunk size")),
            },
            State::Extension { size } => match b {
                b'\r' => State::SizeLf { size },
                b'\t' => State::Extension { size },
                0..=0x1f | 0x7f => return Err(ChunkError("invalid byte in chunk extension")),
                _ => State::Extension { size },
            },
            State::SizeLf { size } => {
                if b != b'\n' {
                    return Err(ChunkError("chunk size line not ended by CRLF"));
                }
                self.line = 0;
                if size == 0 {
                    State::Trailers { scanned: 0 }
                } else {
                    State::Data { remaining: size }
                }
            }
            State::DataCr if b == b'\r' => State::DataLf,
            State::DataLf if b == b'\n' => State::Size { size: 0, digits: 0 },
            State::DataCr | State::DataLf => {
                return Err(ChunkError("chunk data not followed by CRLF"));
            }
            // decode_inner only steps the states above.
            other => other,
        };
        Ok(())
    }

    /// The trailer section after the last chunk (RFC 9112 7.1.2).
    fn trailers(&mut self, buf: &mut BytesMut, scanned: usize) -> Result<Chunk, ChunkError> {
        // Nearly every body ends with an empty section.
        match buf.first() {
            None => return Ok(Chunk::More),
            Some(b'\r') => match buf.get(1) {
                None => return Ok(Chunk::More),
                Some(b'\n') => {
                    buf.advance(2);
                    self.state = State::Done;
                    return Ok(Chunk::End);
                }
                Some(_) => return Err(ChunkError("trailer section not ended by CRLF")),
            },
            Some(b'\n') => return Err(ChunkError("trailer section not ended by CRLF")),
            Some(_) => {}
        }

        // Fields: wait for the CRLF CRLF that ends them, searching only new bytes.
        let limit = buf.len().min(MAX_TRAILERS);
        // (Clamped: a caller passing another buffer must not make this panic.)
        let from = scanned.saturating_sub(3).min(limit);
        let Some(end) = buf[from..limit]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|at| from + at + 4)
        else {
            if buf.len() >= MAX_TRAILERS {
                return Err(ChunkError("trailer section too large"));
            }
            self.state = State::Trailers { scanned: limit };
            return Ok(Chunk::More);
        };
        // httparse also takes a bare LF; a proxy must not (see the type's docs).
        let section = &buf[..end];
        if section
            .iter()
            .enumerate()
            .any(|(at, &b)| b == b'\n' && (at == 0 || section[at - 1] != b'\r'))
        {
            return Err(ChunkError("trailer section not ended by CRLF"));
        }

        let section = buf.split_to(end).freeze();
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let fields = match httparse::parse_headers(&section, &mut fields) {
            Ok(httparse::Status::Complete((n, fields))) if n == section.len() => fields,
            Err(httparse::Error::TooManyHeaders) => {
                return Err(ChunkError("too many trailer fields"));
            }
            _ => return Err(ChunkError("invalid trailer section")),
        };
        let mut trailers = HeaderMap::with_capacity(fields.len());
        for field in fields.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes())
                .map_err(|_| ChunkError("invalid trailer field name"))?;
            let value = HeaderValue::from_maybe_shared(section.slice_ref(field.value))
                .map_err(|_| ChunkError("invalid trailer field value"))?;
            trailers.append(name, value);
        }
        self.state = State::Done;
        Ok(if trailers.is_empty() {
            Chunk::End
        } else {
            Chunk::Trailers(trailers)
        })
    }
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Decodes a Content-Length body: hands out up to `remaining` bytes from `buf`, and
/// counts them off. None when `buf` is empty or `remaining` is 0.
pub fn take_length(buf: &mut BytesMut, remaining: &mut u64) -> Option<Bytes> {
    if buf.is_empty() || *remaining == 0 {
        return None;
    }
    let n = usize::try_from(*remaining).map_or(buf.len(), |r| r.min(buf.len()));
    *remaining -= n as u64;
    Some(buf.split_to(n).freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_set_on_the_way_replace_and_follow_the_maps_own() {
        let mut headers = HeaderMap::new();
        headers.append("host", HeaderValue::from_static("client.example"));
        headers.append("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        headers.append("x-forwarded-host", HeaderValue::from_static("forged"));
        headers.append("via", HeaderValue::from_static("1.0 earlier"));
        let host = HeaderName::from_static("host");
        let xff = HeaderName::from_static("x-forwarded-for");
        let xfh = HeaderName::from_static("x-forwarded-host");
        let via = HeaderName::from_static("via");
        let ours = HeaderValue::from_static("1.1 holdfast");
        let mut out = BytesMut::new();
        encode_request_head_with(
            &mut out,
            &Method::GET,
            "/",
            &headers,
            RequestFraming::None,
            &[
                (&xff, Some(&HeaderValue::from_static("10.0.0.1"))),
                (&xfh, None),
                (&host, Some(&HeaderValue::from_static("up:80"))),
            ],
            &[(&via, &ours)],
        );
        assert_eq!(
            &out[..],
            &b"GET / HTTP/1.1\r\nvia: 1.0 earlier\r\nx-forwarded-for: 10.0.0.1\r\n\
               host: up:80\r\nvia: 1.1 holdfast\r\n\r\n"[..]
        );
    }

    #[test]
    fn hop_by_hop_fields_are_left_out_of_the_map() {
        let h = head(
            b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\n\
              transfer-encoding: chunked\r\ntrailer: x-sum\r\nproxy-connection: x\r\n\
              te: trailers\r\nx-a: 1\r\n\r\n",
        );
        assert!(h.hop_by_hop_removed);
        assert_eq!(h.keep_alive.as_deref(), Some(&b"timeout=5"[..]));
        let names: Vec<&str> = h.headers.keys().map(|n| n.as_str()).collect();
        // `Trailer` stays with a chunked body, which can carry the trailers.
        assert_eq!(names, ["trailer", "x-a"]);
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.must_close);

        let h =
            head(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ntrailer: x-sum\r\nUpgrade: h2c\r\n\r\n");
        assert!(h.hop_by_hop_removed);
        assert_eq!(h.headers.len(), 1, "{:?}", h.headers);
        assert!(h.headers.contains_key("content-length"));
    }

    #[test]
    fn hop_by_hop_fields_stay_when_connection_names_others_or_on_101() {
        let h = head(b"HTTP/1.1 200 OK\r\nconnection: close, x-private\r\nx-private: 1\r\ncontent-length: 0\r\n\r\n");
        assert!(!h.hop_by_hop_removed);
        assert!(h.must_close);
        assert!(h.headers.contains_key("connection"));
        assert!(h.headers.contains_key("x-private"));

        let h = head(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n");
        assert!(!h.hop_by_hop_removed);
        assert_eq!(h.headers["upgrade"], "websocket");
    }

    fn parse(input: &[u8]) -> (Result<Option<ResponseHead>, HeadError>, BytesMut) {
        parse_for(input, &Method::GET)
    }

    fn parse_for(
        input: &[u8],
        method: &Method,
    ) -> (Result<Option<ResponseHead>, HeadError>, BytesMut) {
        let mut buf = BytesMut::from(input);
        let result = parse_response_head(&mut buf, method);
        (result, buf)
    }

    fn head(input: &[u8]) -> ResponseHead {
        head_for(input, &Method::GET)
    }

    fn head_for(input: &[u8], method: &Method) -> ResponseHead {
        match parse_for(input, method).0 {
            Ok(Some(head)) => head,
            other => panic!("expected a head, got {other:?}"),
        }
    }

    fn error(input: &[u8]) -> HeadError {
        match parse(input).0 {
            Err(e) => e,
            other => panic!("expected an error, got {other:?}"),
        }
    }

    #[test]
    fn plain_200_splits_head_from_body() {
        let (result, buf) =
            parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhelloHTTP/1.1");
        let head = result.unwrap().unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.version, Version::HTTP_11);
        assert_eq!(head.framing, Framing::Length(5));
        assert!(!head.must_close);
        assert_eq!(head.reason, None);
        assert_eq!(head.headers.len(), 2);
        assert_eq!(head.headers["content-length"], "5");
        assert_eq!(head.headers["x-a"], "b");
        assert_eq!(&buf[..], b"helloHTTP/1.1");
    }

    #[test]
    fn header_values_share_the_head() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nX-Long: abcdefghijklmnopqrstuvwxyz\r\nContent-Length: 0\r\n\r\n"
                [..],
        );
        let start = buf.as_ptr() as usize;
        let end = start + buf.len();
        let head = parse_response_head(&mut buf, &Method::GET)
            .unwrap()
            .unwrap();
        let value = head.headers["x-long"].as_bytes().as_ptr() as usize;
        assert!(value >= start && value < end, "value was copied");
    }

    #[test]
    fn several_fields_of_one_name_keep_their_order() {
        let head = head(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nContent-Length: 0\r\nset-cookie: b=2\r\n\r\n",
        );
        let cookies: Vec<_> = head.headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
    }

    #[test]
    fn head_byte_by_byte() {
        let input = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nServer: x\r\n\r\nok";
        let head_len = input.len() - 2;
        let mut buf = BytesMut::new();
        for (at, &b) in input.iter().enumerate() {
            buf.extend_from_slice(&[b]);
            let result = parse_response_head(&mut buf, &Method::GET).unwrap();
            if at + 1 < head_len {
                assert!(result.is_none(), "complete after {} bytes", at + 1);
            } else {
                let head = result.unwrap();
                assert_eq!(head.status, StatusCode::CREATED);
                assert_eq!(head.framing, Framing::Length(2));
                assert_eq!(head.headers["server"], "x");
                assert!(buf.is_empty());
                buf.extend_from_slice(&input[at + 1..]);
                assert_eq!(&buf[..], b"ok");
                return;
            }
        }
        panic!("never complete");
    }

    #[test]
    fn bodiless_responses() {
        let cl = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
        assert_eq!(head_for(cl, &Method::HEAD).framing, Framing::None);
        let te = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n";
        let te_head = head_for(te, &Method::HEAD);
        assert_eq!(te_head.framing, Framing::None);
        assert!(!te_head.must_close);
        for status in [
            "100 Continue",
            "103 Early Hints",
            "204 No Content",
            "304 Not Modified",
        ] {
            let input = format!(
                "HTTP/1.1 {status}\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n"
            );
            let head = head(input.as_bytes());
            assert_eq!(head.framing, Framing::None, "{status}");
            assert!(!head.must_close, "{status}");
        }
        let switching = head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n");
        assert_eq!(switching.framing, Framing::None);
        assert!(switching.must_close);
    }

    #[test]
    fn informational_head_leaves_the_final_one_in_buf() {
        let (result, buf) = parse(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(result.unwrap().unwrap().status, StatusCode::CONTINUE);
        assert_eq!(&buf[..], b"HTTP/1.1 200 OK\r\n\r\n");
    }

    #[test]
    fn connect_success_is_a_tunnel() {
        let head = head_for(b"HTTP/1.1 200 OK\r\n\r\n", &Method::CONNECT);
        assert_eq!(head.framing, Framing::None);
        assert!(head.must_close);
        let refused = head_for(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n",
            &Method::CONNECT,
        );
        assert_eq!(refused.framing, Framing::Length(0));
    }

    #[test]
    fn transfer_encoding() {
        let chunked = head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(chunked.framing, Framing::Chunked);
        assert!(!chunked.must_close);
        let spaced = head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding:  CHUNKED \r\n\r\n");
        assert_eq!(spaced.framing, Framing::Chunked);

        // Any other coding would reach the client still applied and unmarked.
        for other in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, CHUNKED \r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: identity\r\n\r\n",
        ] {
            assert_eq!(
                error(other),
                HeadError::Invalid("transfer coding other than chunked"),
                "{}",
                String::from_utf8_lossy(other)
            );
        }
        // No body, nothing to decode: the head passes.
        let head_only = head_for(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            &Method::HEAD,
        );
        assert_eq!(head_only.framing, Framing::None);
    }

    /// Chunked applied twice (RFC 9112 7.1: a sender must not) would be undone once
    /// and the body passed on still chunk-framed, unmarked: refused like any coding
    /// holdfast does not undo, in one field or over several.
    #[test]
    fn chunked_applied_twice_is_refused() {
        for input in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(
                error(input),
                HeadError::Invalid("transfer coding other than chunked"),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        assert!(!only_chunked([&b"chunked, chunked"[..]]));
        assert!(!only_chunked([&b"chunked"[..], b"chunked"]));
        assert!(only_chunked([&b"chunked"[..], b" , "]));
        assert!(only_chunked(std::iter::empty()));
    }

    /// A repeated Content-Length (RFC 9112 6.3 point 5) frames the body by its
    /// one value, and must be passed on as that one value: hyper's server refuses to
    /// write a response whose Content-Length is a list, and the client gets nothing.
    #[test]
    fn a_repeated_content_length_is_passed_on_once() {
        for input in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n",
        ] {
            let h = head(input);
            assert_eq!(h.framing, Framing::Length(5));
            let values: Vec<_> = h.headers.get_all("content-length").iter().collect();
            assert_eq!(values, ["5"], "{}", String::from_utf8_lossy(input));
        }
    }

    /// RFC 9110 5.6.1: a recipient ignores empty list elements: `chunked,` (or
    /// an empty `Transfer-Encoding` line after `chunked`) still ends with chunked. Read
    /// until close instead, the chunk framing would reach the client as body bytes.
    #[test]
    fn empty_transfer_coding_list_elements_are_ignored() {
        for input in [
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: , chunked , \r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: ,\r\n\r\n",
        ] {
            let h = head(input);
            assert_eq!(
                h.framing,
                Framing::Chunked,
                "{}",
                String::from_utf8_lossy(input)
            );
            assert!(!h.must_close, "{}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn transfer_encoding_beats_content_length_and_closes() {
        let both =
            head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(both.framing, Framing::Chunked);
        assert!(both.must_close);
        // Not passed on: the client would frame the body by it (RFC 9112 6.3).
        assert!(!both.headers.contains_key(http::header::CONTENT_LENGTH));
        // Even an invalid Content-Length: TE decides, the connection closes.
        let invalid =
            head(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(invalid.framing, Framing::Chunked);
        assert!(invalid.must_close);
    }

    #[test]
    fn transfer_encoding_in_http_1_0_is_invalid() {
        assert_eq!(
            error(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            HeadError::Invalid("transfer-encoding in HTTP/1.0")
        );
    }

    #[test]
    fn content_length_values() {
        assert_eq!(
            head(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n").framing,
            Framing::Length(5)
        );
        assert_eq!(
            head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n").framing,
            Framing::Length(5)
        );
        let zero = head(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(zero.framing, Framing::Length(0));
        assert!(!zero.must_close);
        assert_eq!(
            head(b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551615\r\n\r\n").framing,
            Framing::Length(u64::MAX)
        );
        for bad in [
            &b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length:\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5,\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5 5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0x5\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551616\r\n\r\n",
        ] {
            assert_eq!(
                parse(bad).0.unwrap_err(),
                HeadError::Invalid("content-length"),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn no_framing_reads_until_close() {
        let head = head(b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\nbody");
        assert_eq!(head.framing, Framing::UntilClose);
        assert!(head.must_close);
    }

    #[test]
    fn http_1_0_always_closes() {
        let head = head(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\nx");
        assert_eq!(head.version, Version::HTTP_10);
        assert_eq!(head.framing, Framing::Length(1));
        assert!(head.must_close);
    }

    #[test]
    fn connection_close_tokens() {
        for field in [
            "Connection: close",
            "Connection: keep-alive, Close",
            "connection: Upgrade ,CLOSE ",
            "Connection: keep-alive\r\nConnection: te, close",
        ] {
            let input = format!("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n{field}\r\n\r\n");
            assert!(head(input.as_bytes()).must_close, "{field}");
        }
        for field in [
            "Connection: keep-alive",
            "Connection: closed",
            "X-Connection: close",
        ] {
            let input = format!("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n{field}\r\n\r\n");
            assert!(!head(input.as_bytes()).must_close, "{field}");
        }
    }

    #[test]
    fn too_many_headers() {
        let mut input = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..MAX_HEADERS {
            input.push_str(&format!("x-{i}: v\r\n"));
        }
        let fits = format!("{input}\r\n");
        assert_eq!(head(fits.as_bytes()).headers.len(), MAX_HEADERS);
        input.push_str("one-more: v\r\n\r\n");
        assert_eq!(error(input.as_bytes()), HeadError::TooLarge);
    }

    #[test]
    fn head_over_max_head() {
        let mut input = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
        input.resize(MAX_HEAD, b'a');
        input.extend_from_slice(b"\r\n\r\n");
        assert_eq!(error(&input), HeadError::TooLarge);

        // Incomplete, and already too long to ever fit.
        input.truncate(MAX_HEAD + 1);
        assert_eq!(error(&input), HeadError::TooLarge);
        input.truncate(MAX_HEAD);
        assert_eq!(error(&input), HeadError::TooLarge);
        // Incomplete but can still fit.
        input.truncate(MAX_HEAD - 1);
        assert!(parse(&input).0.unwrap().is_none());

        // Exactly MAX_HEAD with the final CRLF fits.
        let mut exact = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
        exact.resize(MAX_HEAD - 4, b'a');
        exact.extend_from_slice(b"\r\n\r\nbody");
        let (result, buf) = parse(&exact);
        assert_eq!(
            result.unwrap().unwrap().headers["x-big"].len(),
            MAX_HEAD - 4 - 24
        );
        assert_eq!(&buf[..], b"body");
    }

    #[test]
    fn reason_phrase() {
        assert_eq!(head(b"HTTP/1.1 200 OK\r\n\r\n").reason, None);
        assert_eq!(head(b"HTTP/1.1 404 Not Found\r\n\r\n").reason, None);
        assert_eq!(head(b"HTTP/1.1 200\r\n\r\n").reason, None);
        assert_eq!(head(b"HTTP/1.1 200 \r\n\r\n").reason, None);
        assert_eq!(
            head(b"HTTP/1.1 200 Fine Thanks\r\n\r\n").reason.as_deref(),
            Some(&b"Fine Thanks"[..])
        );
        assert_eq!(
            head(b"HTTP/1.1 200 ok\r\n\r\n").reason.as_deref(),
            Some(&b"ok"[..])
        );
        // No canonical reason at all.
        assert_eq!(
            head(b"HTTP/1.1 299 Custom\r\n\r\n").reason.as_deref(),
            Some(&b"Custom"[..])
        );
    }

    #[test]
    fn invalid_heads() {
        for input in [
            &b"HTTP/1.1 099 Low\r\n\r\n"[..],
            &b"HTTP/1.1 20 OK\r\n\r\n"[..],
            &b"HTTP/2.0 200 OK\r\n\r\n"[..],
            &b"HTTP/1.2 200 OK\r\n\r\n"[..],
            &b"ICY 200 OK\r\n\r\n"[..],
            &b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n"[..],
            &b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n"[..],
            &b"HTTP/1.1 200 OK\r\nX: a\x7fb\r\n\r\n"[..],
            // Obsolete line folding.
            &b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n"[..],
            &b"HTTP/1.1 200 OK\r\n : x\r\n\r\n"[..],
        ] {
            assert!(
                matches!(error(input), HeadError::Invalid(_)),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            error(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").to_string(),
            "invalid response head: content-length"
        );
        assert_eq!(HeadError::TooLarge.to_string(), "response head too large");
    }

    #[test]
    fn high_status_is_valid() {
        assert_eq!(
            head(b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n")
                .status
                .as_u16(),
            999
        );
    }

    #[test]
    fn no_panic_on_arbitrary_bytes() {
        // A cheap deterministic fuzz: every prefix and one-byte mutation of a valid head.
        let base = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nabc";
        for cut in 0..=base.len() {
            let _ = parse(&base[..cut]);
        }
        for at in 0..base.len() {
            for b in [0u8, b'\n', b'\r', b' ', b':', b',', 0x7f, 0xff] {
                let mut input = base.to_vec();
                input[at] = b;
                let _ = parse(&input);
            }
        }
    }

    // Chunked decoding.

    /// Decodes all of `input` given in one piece; returns data, trailers, what is left.
    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>, BytesMut), ChunkError> {
        let mut buf = BytesMut::from(input);
        let mut decoder = ChunkedDecoder::new();
        let mut body = Vec::new();
        let mut trailers = None;
        loop {
            match decoder.decode(&mut buf)? {
                Chunk::Data(data) => {
                    assert!(!data.is_empty());
                    body.extend_from_slice(&data);
                }
                Chunk::Trailers(map) => {
                    assert!(!map.is_empty());
                    trailers = Some(map);
                }
                Chunk::End => {
                    assert!(decoder.is_done());
                    return Ok((body, trailers, buf));
                }
                Chunk::More => panic!("incomplete"),
            }
        }
    }

    fn decode_error(input: &[u8]) -> ChunkError {
        let mut buf = BytesMut::from(input);
        let mut decoder = ChunkedDecoder::new();
        loop {
            match decoder.decode(&mut buf) {
                Ok(Chunk::More | Chunk::End) => {
                    panic!("no error for {:?}", String::from_utf8_lossy(input))
                }
                Ok(_) => {}
                Err(e) => {
                    // And it stays failed.
                    assert_eq!(decoder.decode(&mut buf).unwrap_err(), e);
                    return e;
                }
            }
        }
    }

    #[test]
    fn chunked_simple() {
        let (body, trailers, rest) =
            decode_all(b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n").unwrap();
        assert_eq!(body, b"hello, world");
        assert!(trailers.is_none());
        assert!(rest.is_empty());
    }

    #[test]
    fn chunked_hex_sizes() {
        let mut input = b"1A\r\n".to_vec();
        input.extend_from_slice(&[b'x'; 26]);
        input.extend_from_slice(b"\r\n0000000000000001\r\ny\r\n0\r\n\r\n");
        let (body, _, _) = decode_all(&input).unwrap();
        assert_eq!(body.len(), 27);
        assert_eq!(body.last(), Some(&b'y'));
    }

    #[test]
    fn chunked_extensions_are_skipped() {
        let (body, _, _) = decode_all(
            b"5;name=value;other=\"q;\\\"x\"\r\nhello\r\n3 ; ext\r\nabc\r\n0;last\r\n\r\n",
        )
        .unwrap();
        assert_eq!(body, b"helloabc");
    }

    #[test]
    fn chunked_trailers_and_pipelined_next_response() {
        let (body, trailers, rest) =
            decode_all(b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nx-sum: 2\r\nGrpc-Status: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n").unwrap();
        assert_eq!(body, b"abc");
        let trailers = trailers.unwrap();
        assert_eq!(
            trailers.get_all("x-sum").iter().collect::<Vec<_>>(),
            ["1", "2"]
        );
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(&rest[..], b"HTTP/1.1 200 OK\r\n\r\n");

        let (_, none, rest) = decode_all(b"0\r\n\r\nHTTP/1.1").unwrap();
        assert!(none.is_none());
        assert_eq!(&rest[..], b"HTTP/1.1");
    }

    #[test]
    fn chunked_byte_by_byte() {
        let input = b"4;a=b\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nExpires: never\r\nX-Y: z\r\n\r\nnext";
        let body_end = input.len() - 4;
        let mut decoder = ChunkedDecoder::new();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut trailers = None;
        let mut ended_at = None;
        for (at, &b) in input.iter().enumerate() {
            buf.extend_from_slice(&[b]);
            loop {
                match decoder.decode(&mut buf).unwrap() {
                    Chunk::Data(data) => {
                        assert!(!data.is_empty());
                        body.extend_from_slice(&data);
                    }
                    Chunk::Trailers(map) => trailers = Some(map),
                    Chunk::End => {
                        ended_at.get_or_insert(at + 1);
                        break;
                    }
                    Chunk::More => break,
                }
            }
        }
        assert_eq!(ended_at, Some(body_end));
        assert_eq!(body, b"Wikipedia in\r\n\r\nchunks.");
        let trailers = trailers.unwrap();
        assert_eq!(trailers.len(), 2);
        assert_eq!(trailers["expires"], "never");
        assert_eq!(trailers["x-y"], "z");
        assert_eq!(&buf[..], b"next");
        assert!(matches!(decoder.decode(&mut buf), Ok(Chunk::End)));
        assert_eq!(&buf[..], b"next");
    }

    #[test]
    fn large_chunk_streams_in_pieces() {
        let mut decoder = ChunkedDecoder::new();
        let mut buf = BytesMut::from(&b"10000\r\n"[..]);
        assert!(matches!(decoder.decode(&mut buf), Ok(Chunk::More)));
        assert!(buf.is_empty());
        let mut total = 0;
        for piece in 0..16 {
            buf.extend_from_slice(&[b'a' + piece; 4096]);
            match decoder.decode(&mut buf).unwrap() {
                Chunk::Data(data) => {
                    assert_eq!(data.len(), 4096);
                    assert!(data.iter().all(|&b| b == b'a' + piece));
                    total += data.len();
                }
                other => panic!("expected data, got {other:?}"),
            }
            assert!(buf.is_empty());
            if piece < 15 {
                assert!(matches!(decoder.decode(&mut buf), Ok(Chunk::More)));
            }
        }
        assert_eq!(total, 0x10000);
        // Data is never handed out past the chunk's end.
        buf.extend_from_slice(b"\r\n2\r\nxyz");
        assert!(matches!(decoder.decode(&mut buf), Ok(Chunk::Data(d)) if &d[..] == b"xy"));
        assert!(matches!(
            decoder.decode(&mut buf),
            Err(ChunkError("chunk data not followed by CRLF"))
        ));
    }

    #[test]
    fn chunked_errors() {
        assert_eq!(decode_error(b"g\r\n"), ChunkError("missing chunk size"));
        assert_eq!(decode_error(b"\r\n"), ChunkError("missing chunk size"));
        assert_eq!(decode_error(b";ext\r\n"), ChunkError("missing chunk size"));
        assert_eq!(decode_error(b"5g\r\n"), ChunkError("invalid chunk size"));
        assert_eq!(decode_error(b"-5\r\n"), ChunkError("missing chunk size"));
        assert_eq!(decode_error(b"0x5\r\n"), ChunkError("invalid chunk size"));
        assert_eq!(
            decode_error(b"5\nhello\r\n"),
            ChunkError("invalid chunk size")
        );
        assert_eq!(
            decode_error(b"5\r\rhello\r\n"),
            ChunkError("chunk size line not ended by CRLF")
        );
        assert_eq!(
            decode_error(b"5 \r\nhello\r\n"),
            ChunkError("whitespace after chunk size")
        );
        assert_eq!(
            decode_error(b"5;a\nhello\r\n"),
            ChunkError("invalid byte in chunk extension")
        );
        assert_eq!(
            decode_error(b"5;a\x00\r\nhello\r\n"),
            ChunkError("invalid byte in chunk extension")
        );
        assert_eq!(
            decode_error(b"5\r\nhelloX\r\n"),
            ChunkError("chunk data not followed by CRLF")
        );
        assert_eq!(
            decode_error(b"5\r\nhello\n0\r\n\r\n"),
            ChunkError("chunk data not followed by CRLF")
        );
        assert_eq!(
            decode_error(b"5\r\nhello\r0\r\n\r\n"),
            ChunkError("chunk data not followed by CRLF")
        );
        // 17 hex digits cannot fit a u64, even with leading zeros.
        assert_eq!(
            decode_error(b"10000000000000000\r\n"),
            ChunkError("chunk size too large")
        );
        assert_eq!(
            decode_error(b"00000000000000001\r\n"),
            ChunkError("chunk size too large")
        );
        // Trailer sections: CRLF only, bounded, valid fields.
        assert_eq!(
            decode_error(b"0\r\n\n"),
            ChunkError("trailer section not ended by CRLF")
        );
        assert_eq!(
            decode_error(b"0\r\n\rx"),
            ChunkError("trailer section not ended by CRLF")
        );
        assert_eq!(
            decode_error(b"0\r\nX: y\n\r\n\r\n"),
            ChunkError("trailer section not ended by CRLF")
        );
        assert_eq!(
            decode_error(b"0\r\nBad Name: y\r\n\r\n"),
            ChunkError("invalid trailer section")
        );
        assert_eq!(
            decode_error(b"0\r\nX: y\r\n z\r\n\r\n"),
            ChunkError("invalid trailer section")
        );
        assert_eq!(ChunkError("x").to_string(), "invalid chunked body: x");
    }

    #[test]
    fn chunk_size_fills_u64() {
        let mut decoder = ChunkedDecoder::new();
        let mut buf = BytesMut::from(&b"ffffffffffffffff\r\nabc"[..]);
        assert!(matches!(decoder.decode(&mut buf), Ok(Chunk::Data(d)) if &d[..] == b"abc"));
    }

    #[test]
    fn overlong_size_line() {
        let mut line = b"5;".to_vec();
        line.resize(MAX_CHUNK_LINE as usize - 2, b'x');
        line.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        assert_eq!(decode_all(&line).unwrap().0, b"hello");

        let mut line = b"5;".to_vec();
        line.resize(MAX_CHUNK_LINE as usize - 1, b'x');
        line.extend_from_slice(b"\r\nhello\r\n0\r\n\r\n");
        assert_eq!(decode_error(&line), ChunkError("chunk size line too long"));

        // Detected while the line is still arriving, without buffering it.
        let (error, most_buffered) = feed_until_error(b"5;", MAX_CHUNK_LINE as usize);
        assert_eq!(error, ChunkError("chunk size line too long"));
        assert_eq!(most_buffered, 0);
    }

    /// Feeds `prefix`, then `x` a byte at a time (at most `max` of them) until the
    /// decoder fails; the error, and the most it held buffered meanwhile.
    fn feed_until_error(prefix: &[u8], max: usize) -> (ChunkError, usize) {
        let mut decoder = ChunkedDecoder::new();
        let mut buf = BytesMut::from(prefix);
        assert!(matches!(decoder.decode(&mut buf), Ok(Chunk::More)));
        let mut most_buffered = 0;
        for _ in 0..max {
            buf.extend_from_slice(b"x");
            match decoder.decode(&mut buf) {
                Ok(Chunk::More) => most_buffered = most_buffered.max(buf.len()),
                Err(e) => return (e, most_buffered),
                Ok(other) => panic!("unexpected {other:?}"),
            }
        }
        panic!("no error after {max} bytes");
    }

    #[test]
    fn trailer_limits() {
        let (error, most_buffered) = feed_until_error(b"0\r\nX-Big: ", MAX_TRAILERS);
        assert_eq!(error, ChunkError("trailer section too large"));
        assert!(most_buffered <= MAX_TRAILERS);

        let mut many = b"0\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("t-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(decode_error(&many), ChunkError("too many trailer fields"));
    }

    #[test]
    fn chunked_no_panic_on_arbitrary_bytes() {
        let base = b"5;e=1\r\nhello\r\n0\r\nX: y\r\n\r\nnext";
        for at in 0..base.len() {
            for b in [0u8, b'\n', b'\r', b' ', b';', b'0', b'f', b'g', 0xff] {
                let mut input = base.to_vec();
                input[at] = b;
                let mut buf = BytesMut::from(&input[..]);
                let mut decoder = ChunkedDecoder::new();
                for _ in 0..20 {
                    match decoder.decode(&mut buf) {
                        Ok(Chunk::More | Chunk::End) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
        }
    }

    #[test]
    fn take_length_counts_down() {
        let mut buf = BytesMut::from(&b"helloHTTP"[..]);
        let mut remaining = 5;
        assert_eq!(
            take_length(&mut buf, &mut remaining).as_deref(),
            Some(&b"hello"[..])
        );
        assert_eq!(remaining, 0);
        assert_eq!(take_length(&mut buf, &mut remaining), None);
        assert_eq!(&buf[..], b"HTTP");

        let mut buf = BytesMut::from(&b"abc"[..]);
        let mut remaining = 10;
        assert_eq!(
            take_length(&mut buf, &mut remaining).as_deref(),
            Some(&b"abc"[..])
        );
        assert_eq!(remaining, 7);
        assert_eq!(take_length(&mut buf, &mut remaining), None);
        assert_eq!(remaining, 7);
    }

    // Encoding.

    #[test]
    fn encode_head_with_length() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("example.com"));
        headers.append("accept", HeaderValue::from_static("text/html"));
        headers.append("accept", HeaderValue::from_static("*/*"));
        headers.insert("content-length", HeaderValue::from_static("999"));
        headers.insert("x-custom", HeaderValue::from_static("v"));
        let mut out = BytesMut::from(&b"previous"[..]);
        encode_request_head(
            &mut out,
            &Method::POST,
            "/a/b?c=d",
            &headers,
            RequestFraming::Length(12345),
        );
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "previousPOST /a/b?c=d HTTP/1.1\r\n\
             host: example.com\r\n\
             accept: text/html\r\n\
             accept: */*\r\n\
             x-custom: v\r\n\
             content-length: 12345\r\n\r\n"
        );
    }

    #[test]
    fn encode_head_chunked_and_none() {
        let mut headers = HeaderMap::new();
        headers.insert("transfer-encoding", HeaderValue::from_static("gzip"));
        headers.insert("content-length", HeaderValue::from_static("1"));
        headers.insert("host", HeaderValue::from_static("h"));
        let mut out = BytesMut::new();
        encode_request_head(
            &mut out,
            &Method::PUT,
            "/",
            &headers,
            RequestFraming::Chunked,
        );
        assert_eq!(
            &out[..],
            b"PUT / HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
        );

        let mut out = BytesMut::new();
        encode_request_head(&mut out, &Method::GET, "/x", &headers, RequestFraming::None);
        assert_eq!(&out[..], b"GET /x HTTP/1.1\r\nhost: h\r\n\r\n");

        let mut out = BytesMut::new();
        encode_request_head(
            &mut out,
            &Method::POST,
            "/",
            &HeaderMap::new(),
            RequestFraming::Length(0),
        );
        assert_eq!(&out[..], b"POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n");

        let mut out = BytesMut::new();
        encode_request_head(
            &mut out,
            &Method::POST,
            "/",
            &HeaderMap::new(),
            RequestFraming::Length(u64::MAX),
        );
        assert_eq!(
            &out[..],
            b"POST / HTTP/1.1\r\ncontent-length: 18446744073709551615\r\n\r\n"
        );
    }

    #[test]
    fn encode_chunks() {
        let mut out = BytesMut::new();
        chunk_prefix(&mut out, 5);
        out.extend_from_slice(b"hello");
        out.extend_from_slice(CHUNK_SUFFIX);
        chunk_prefix(&mut out, 0x1abc);
        out.extend_from_slice(CHUNK_SUFFIX);
        chunk_prefix(&mut out, 1);
        encode_last_chunk(&mut out, None);
        assert_eq!(&out[..], b"5\r\nhello\r\n1abc\r\n\r\n1\r\n0\r\n\r\n");

        let mut out = BytesMut::new();
        encode_last_chunk(&mut out, Some(&HeaderMap::new()));
        assert_eq!(&out[..], b"0\r\n\r\n");

        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.append("x-t", HeaderValue::from_static("a"));
        trailers.append("x-t", HeaderValue::from_static("b"));
        let mut out = BytesMut::new();
        encode_last_chunk(&mut out, Some(&trailers));
        assert_eq!(&out[..], b"0\r\ngrpc-status: 0\r\nx-t: a\r\nx-t: b\r\n\r\n");
    }

    #[test]
    fn encoded_chunks_decode() {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-t", HeaderValue::from_static("a"));
        let mut out = BytesMut::new();
        for piece in [&b"one"[..], &[b'z'; 300], b"x"] {
            chunk_prefix(&mut out, piece.len());
            out.extend_from_slice(piece);
            out.extend_from_slice(CHUNK_SUFFIX);
        }
        encode_last_chunk(&mut out, Some(&trailers));
        let (body, decoded, rest) = decode_all(&out).unwrap();
        assert_eq!(body.len(), 304);
        assert_eq!(decoded, Some(trailers));
        assert!(rest.is_empty());
    }

    #[test]
    fn numbers() {
        for n in [0u64, 1, 9, 10, 255, 256, 4095, 12345678, u64::MAX] {
            let mut out = BytesMut::new();
            put_decimal(&mut out, n);
            assert_eq!(&out[..], n.to_string().as_bytes());
            let mut out = BytesMut::new();
            put_hex(&mut out, n);
            assert_eq!(&out[..], format!("{n:x}").as_bytes());
        }
    }
}

/// Upstream bytes are untrusted: whatever arrives, in whatever pieces, the codec
/// answers without panicking, and how a valid response is cut into reads does not
/// change what it yields.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    /// Feeds `input` to a chunked decoder in `pieces`; the body and trailers, or the
    /// first error.
    fn decode_in_pieces(
        input: &[u8],
        cuts: &[usize],
    ) -> Result<(Vec<u8>, Option<HeaderMap>, bool), ChunkError> {
        let mut decoder = ChunkedDecoder::new();
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut trailers = None;
        let mut at = 0;
        let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
        bounds.sort_unstable();
        bounds.push(input.len());
        for end in bounds {
            if end < at {
                continue;
            }
            buf.extend_from_slice(&input[at..end]);
            at = end;
            // Bounded: every step consumes bytes or stops.
            for _ in 0..input.len() + 2 {
                match decoder.decode(&mut buf)? {
                    Chunk::Data(d) => body.extend_from_slice(&d),
                    Chunk::Trailers(t) => trailers = Some(t),
                    Chunk::End => return Ok((body, trailers, true)),
                    Chunk::More => break,
                }
            }
        }
        Ok((body, trailers, false))
    }

    fn chunked(data: &[u8], sizes: &[usize], trailer: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut rest = data;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes.get(i).copied().unwrap_or(7).clamp(1, rest.len());
            out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
            i += 1;
        }
        out.extend_from_slice(b"0\r\n");
        if trailer {
            out.extend_from_slice(b"x-sum: 42\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// Every byte: `is_field_value_byte` is `HeaderValue`'s rule, and a byte httparse
    /// keeps in a value passes it (`checked_value` relies on both).
    #[test]
    fn field_value_bytes_are_what_httparse_and_header_value_take() {
        for b in 0..=255u8 {
            assert_eq!(
                is_field_value_byte(b),
                HeaderValue::from_bytes(&[b'a', b, b'a']).is_ok(),
                "byte {b:#x}"
            );
            let wire = [
                b"HTTP/1.1 200 OK\r\nx: a".as_slice(),
                &[b, b'a'],
                b"\r\n\r\n",
            ]
            .concat();
            let mut headers = [httparse::EMPTY_HEADER; 4];
            let mut resp = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(_)) = resp.parse(&wire) {
                let v = resp.headers[0].value;
                assert!(
                    v.iter().all(|&b| is_field_value_byte(b)),
                    "byte {b:#x}: {v:?}"
                );
            }
        }
    }

    /// Field names for heads made up by tests: hop-by-hop and framing ones, names of
    /// one length that differ by a byte or by case, and long ones that overflow what
    /// `NameCache` keeps.
    const NAMES: [&str; 12] = [
        "Content-Length",
        "content-length",
        "Content-Lengtx",
        "Connection",
        "Keep-Alive",
        "Transfer-Encoding",
        "Trailer",
        "x-aa",
        "x-ab",
        "Server",
        "x-a-long-name-padded-out-to-well-past-the-hundred-bytes-so-that-a-dozen-of-them-are-more-than-the-cache-keeps-xxxxxxxxxxxx",
        "x-another-long-name-padded-out-to-well-past-the-hundred-bytes-so-that-a-dozen-of-them-are-more-than-the-cache-keeps-xxxxxx",
    ];

    /// Everything a parsed head says, comparable: fields, framing, must_close,
    /// hop_by_hop_removed, keep_alive.
    type Summary = (Vec<(String, Bytes)>, Framing, bool, bool, Option<Bytes>);

    fn summary(
        parsed: Result<Option<ResponseHead>, HeadError>,
    ) -> Result<Option<Summary>, HeadError> {
        parsed.map(|head| {
            head.map(|h| {
                let fields = h
                    .headers
                    .iter()
                    .map(|(n, v)| (n.to_string(), Bytes::copy_from_slice(v.as_bytes())))
                    .collect();
                (
                    fields,
                    h.framing,
                    h.must_close,
                    h.hop_by_hop_removed,
                    h.keep_alive,
                )
            })
        })
    }

    #[test]
    fn a_name_seen_before_at_the_same_place_is_taken_only_when_its_bytes_match() {
        let mut scratch = HeadScratch::default();
        let mut parse = |wire: &[u8]| {
            let mut buf = BytesMut::from(wire);
            parse_response_head_with(&mut buf, &Method::GET, &mut scratch)
                .unwrap()
                .unwrap()
        };
        let h = parse(b"HTTP/1.1 200 OK\r\nx-ab: 1\r\nConnection: close\r\n\r\n");
        assert_eq!(h.framing, Framing::UntilClose);
        assert!(h.must_close);
        assert_eq!(
            h.headers.keys().map(|n| n.as_str()).collect::<Vec<_>>(),
            ["x-ab"]
        );
        // Same lengths, same places, other names: the kinds and names must be new.
        let h = parse(b"HTTP/1.1 200 OK\r\nx-ac: 1\r\nKeep-Alive: timeout=9\r\n\r\n");
        assert_eq!(h.keep_alive.as_deref(), Some(&b"timeout=9"[..]));
        assert!(h.must_close, "no length: read until close");
        assert_eq!(
            h.headers.keys().map(|n| n.as_str()).collect::<Vec<_>>(),
            ["x-ac"]
        );
        // The cached names in another order.
        let h = parse(
            b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=9\r\nx-ac: 2\r\ncontent-length: 0\r\n\r\n",
        );
        assert_eq!(h.framing, Framing::Length(0));
        assert!(!h.must_close);
        assert_eq!(h.headers["x-ac"], "2");
        assert!(!h.headers.contains_key("keep-alive"));
        // A bad name after good ones fails here too.
        let mut buf =
            BytesMut::from(&b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=9\r\nx\x7fy: 2\r\n\r\n"[..]);
        assert!(parse_response_head_with(&mut buf, &Method::GET, &mut scratch).is_err());
    }

    #[test]
    fn a_recycled_map_holds_the_next_head_and_nothing_of_its_own() {
        let mut scratch = HeadScratch::default();
        let mut request = HeaderMap::with_capacity(32);
        request.append("authorization", HeaderValue::from_static("Bearer secret"));
        request.append("x-request-only", HeaderValue::from_static("1"));
        let room = request.capacity();
        scratch.recycle(request);
        let wire = b"HTTP/1.1 200 OK\r\nserver: x\r\ncontent-length: 0\r\n\r\n";
        let h =
            parse_response_head_with(&mut BytesMut::from(&wire[..]), &Method::GET, &mut scratch)
                .unwrap()
                .unwrap();
        assert_eq!(h.headers.len(), 2, "{:?}", h.headers);
        assert_eq!(h.headers["server"], "x");
        assert!(!h.headers.contains_key("authorization"));
        assert_eq!(h.headers.capacity(), room, "built in the recycled map");
        // Used once: the next head gets a map of its own.
        let h =
            parse_response_head_with(&mut BytesMut::from(&wire[..]), &Method::GET, &mut scratch)
                .unwrap()
                .unwrap();
        assert!(h.headers.capacity() < room);

        // A map grown far past a usual head's is not kept.
        scratch.recycle(HeaderMap::with_capacity(SPARE_MAP_CAPACITY * 4));
        let h =
            parse_response_head_with(&mut BytesMut::from(&wire[..]), &Method::GET, &mut scratch)
                .unwrap()
                .unwrap();
        assert!(
            h.headers.capacity() < SPARE_MAP_CAPACITY,
            "{}",
            h.headers.capacity()
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = parse_response_head(&mut buf, &Method::GET);
            let mut with_head = b"HTTP/1.1 200 OK\r\n".to_vec();
            with_head.extend_from_slice(&bytes);
            let _ = parse_response_head(&mut BytesMut::from(&with_head[..]), &Method::GET);
            let _ = decode_in_pieces(&bytes, &[bytes.len() / 3]);
        }

        #[test]
        fn http_value_bytes_are_header_value_bytes(value in proptest::collection::vec(any::<u8>(), 0..40)) {
            // Whatever value httparse accepts, `HeaderValue` accepts too: the premise
            // of `checked_value`.
            let mut wire = b"HTTP/1.1 200 OK\r\nx: ".to_vec();
            wire.extend_from_slice(&value);
            wire.extend_from_slice(b"\r\n\r\n");
            let mut headers = [httparse::EMPTY_HEADER; 4];
            let mut resp = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(_)) = resp.parse(&wire) {
                let v = resp.headers[0].value;
                prop_assert!(HeaderValue::from_bytes(v).is_ok(), "{:?}", v);
                prop_assert!(v.iter().all(|&b| is_field_value_byte(b)), "{:?}", v);
            }
            for &b in &value {
                prop_assert_eq!(
                    is_field_value_byte(b),
                    HeaderValue::from_bytes(&[b'a', b, b'a']).is_ok(),
                    "byte {:#x}", b
                );
            }
        }

        #[test]
        fn how_a_chunked_body_is_cut_into_reads_changes_nothing(
            data in proptest::collection::vec(any::<u8>(), 0..300),
            sizes in proptest::collection::vec(1usize..40, 0..20),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
            trailer in any::<bool>(),
        ) {
            let wire = chunked(&data, &sizes, trailer);
            let (body, trailers, ended) = decode_in_pieces(&wire, &cuts).expect("valid body");
            prop_assert!(ended);
            prop_assert_eq!(body, data);
            prop_assert_eq!(trailers.is_some(), trailer);
        }

        #[test]
        fn a_connections_earlier_heads_change_nothing(
            heads in proptest::collection::vec(
                proptest::collection::vec((0..NAMES.len(), 0u8..3), 0..40),
                1..6,
            ),
        ) {
            // One scratch for all heads, as a connection keeps it, against a fresh one
            // for each: names at the same position from one head to the next, differing
            // by a byte or by case, or past what the cache keeps, must not matter.
            let mut kept = HeadScratch::default();
            for fields in &heads {
                let mut wire = b"HTTP/1.1 200 OK\r\n".to_vec();
                for &(name, value) in fields {
                    wire.extend_from_slice(NAMES[name].as_bytes());
                    wire.extend_from_slice(format!(": {value}\r\n").as_bytes());
                }
                wire.extend_from_slice(b"\r\n");
                let with_kept =
                    parse_response_head_with(&mut BytesMut::from(&wire[..]), &Method::GET, &mut kept);
                let fresh = parse_response_head(&mut BytesMut::from(&wire[..]), &Method::GET);
                prop_assert_eq!(summary(with_kept), summary(fresh));
            }
        }

        #[test]
        fn how_a_head_is_cut_into_reads_changes_nothing(cut in 0usize..200) {
            let wire: &[u8] = b"HTTP/1.1 200 OK\r\nserver: x\r\ncontent-length: 5\r\n\
                connection: keep-alive\r\nkeep-alive: timeout=5\r\n\r\nhello";
            let cut = cut.min(wire.len());
            let mut buf = BytesMut::from(&wire[..cut]);
            let mut parsed = parse_response_head(&mut buf, &Method::GET).expect("valid so far");
            if parsed.is_none() {
                buf.extend_from_slice(&wire[cut..]);
                parsed = parse_response_head(&mut buf, &Method::GET).expect("valid");
            } else {
                buf.extend_from_slice(&wire[cut..]);
            }
            let head = parsed.expect("complete");
            prop_assert_eq!(head.framing, Framing::Length(5));
            prop_assert_eq!(head.headers.len(), 2);
            prop_assert_eq!(&buf[..], b"hello");
        }
    }
}
