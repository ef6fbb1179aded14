//! Record encoders: each appends whole, 8-byte-aligned records to a `BytesMut`.
//!
//! Every record carries at most [`MAX_ENCODED_CONTENT_LEN`] (65528) content
//! bytes, so that content plus padding fits in 65535 as php-fpm requires.
//!
//! Scope: the records a client sends (BEGIN_REQUEST, PARAMS, STDIN,
//! ABORT_REQUEST, GET_VALUES) and, for fake upstreams in tests, the ones an
//! application sends (STDOUT/STDERR via [`encode_stream`], END_REQUEST,
//! GET_VALUES_RESULT). Not in scope: flushing, or holding back STDIN until
//! the upstream reads it; the caller writes `buf` out when it likes.

use bytes::{BufMut, BytesMut};

use crate::params;
use crate::record::{
    BeginRequest, EncodeError, EndRequest, HEADER_LEN, Header, MAX_ENCODED_CONTENT_LEN,
    NULL_REQUEST_ID, RecordType, Role, ServerValues, padding_for,
};

/// Appends a BEGIN_REQUEST record.
///
/// With `keep_conn`, the application leaves the connection open after the
/// request, so it can go back to a pool; without it, the application closes
/// it after END_REQUEST. `request_id` must not be 0, which is reserved for
/// management records.
pub fn encode_begin_request(buf: &mut BytesMut, request_id: u16, role: Role, keep_conn: bool) {
    let body = BeginRequest { role, keep_conn };
    put_record(buf, RecordType::BeginRequest, request_id, &body.to_bytes());
}

/// Appends an ABORT_REQUEST record for `request_id`.
pub fn encode_abort_request(buf: &mut BytesMut, request_id: u16) {
    put_record(buf, RecordType::AbortRequest, request_id, &[]);
}

/// Appends the whole PARAMS stream: the pairs, then the empty PARAMS record
/// that ends it.
///
/// Pairs are packed into records of at most 65528 content bytes, and a pair
/// that fits in one record is never split across two: php-fpm parses each
/// PARAMS record on its own. A single pair longer than a record is split
/// (section 3.3 allows it); nginx refuses to send such a request at all,
/// and php-fpm rejects it.
///
/// # Errors
///
/// [`EncodeError::ParamTooLong`] if a name or value is longer than
/// [`params::MAX_LEN`]. `buf` is then left as it was.
pub fn encode_params<'a, I>(
    buf: &mut BytesMut,
    request_id: u16,
    pairs: I,
) -> Result<(), EncodeError>
where
    I: IntoIterator<Item = (&'a [u8], &'a [u8])>,
{
    let start = buf.len();
    let mut record = OpenRecord::none();
    for (name, value) in pairs {
        let len = match params::encoded_len(name, value) {
            Ok(len) => len,
            Err(error) => {
                buf.truncate(start);
                return Err(error);
            }
        };
        if len > MAX_ENCODED_CONTENT_LEN {
            record.close(buf, RecordType::Params, request_id);
            let mut pair = BytesMut::with_capacity(len);
            params::encode_pair(&mut pair, name, value)?;
            put_chunks(buf, RecordType::Params, request_id, &pair);
            continue;
        }
        if record.content_len(buf) + len > MAX_ENCODED_CONTENT_LEN {
            record.close(buf, RecordType::Params, request_id);
        }
        record.open(buf);
        params::encode_pair(buf, name, value)?;
    }
    record.close(buf, RecordType::Params, request_id);
    put_record(buf, RecordType::Params, request_id, &[]);
    Ok(())
}

/// Appends `data` as STDIN records of at most 65528 content bytes each.
///
/// An empty `data` appends the empty STDIN record that ends the request
/// body; a non-empty one does not, so a body can be sent in pieces as it
/// arrives from downstream.
pub fn encode_stdin(buf: &mut BytesMut, request_id: u16, data: &[u8]) {
    encode_stream(buf, RecordType::Stdin, request_id, data);
}

/// Appends `data` as records of `kind` (a stream type: PARAMS, STDIN,
/// STDOUT, STDERR or DATA) of at most 65528 content bytes each. An empty
/// `data` appends the empty record that ends the stream.
pub fn encode_stream(buf: &mut BytesMut, kind: RecordType, request_id: u16, data: &[u8]) {
    if data.is_empty() {
        put_record(buf, kind, request_id, &[]);
    } else {
        put_chunks(buf, kind, request_id, data);
    }
}

/// Appends a GET_VALUES management record asking for `names`, e.g.
/// [`ServerValues::NAMES`].
///
/// # Errors
///
/// [`EncodeError::RecordTooLong`] if the names do not fit one record, and
/// [`EncodeError::ParamTooLong`] for a name over [`params::MAX_LEN`]. `buf`
/// is then left as it was.
pub fn encode_get_values<'a, I>(buf: &mut BytesMut, names: I) -> Result<(), EncodeError>
where
    I: IntoIterator<Item = &'a [u8]>,
{
    let mut content = BytesMut::new();
    for name in names {
        params::encode_pair(&mut content, name, &[])?;
    }
    if content.len() > MAX_ENCODED_CONTENT_LEN {
        return Err(EncodeError::RecordTooLong { len: content.len() });
    }
    put_record(buf, RecordType::GetValues, NULL_REQUEST_ID, &content);
    Ok(())
}

/// Appends an END_REQUEST record, as an application does after the last
/// STDOUT record.
pub fn encode_end_request(buf: &mut BytesMut, request_id: u16, end: &EndRequest) {
    put_record(buf, RecordType::EndRequest, request_id, &end.to_bytes());
}

/// Appends a GET_VALUES_RESULT management record holding the fields of
/// `values` that are `Some`.
pub fn encode_get_values_result(buf: &mut BytesMut, values: &ServerValues) {
    let mut content = BytesMut::new();
    let numbers = [
        (ServerValues::MAX_CONNS, values.max_conns),
        (ServerValues::MAX_REQS, values.max_reqs),
        (ServerValues::MPXS_CONNS, values.mpxs_conns.map(u32::from)),
    ];
    for (name, value) in numbers {
        if let Some(value) = value {
            // Short names and at most ten digits: far below the limits.
            let _ = params::encode_pair(&mut content, name, value.to_string().as_bytes());
        }
    }
    put_record(buf, RecordType::GetValuesResult, NULL_REQUEST_ID, &content);
}

/// Splits `data` into records of at most [`MAX_ENCODED_CONTENT_LEN`] bytes.
fn put_chunks(buf: &mut BytesMut, kind: RecordType, request_id: u16, data: &[u8]) {
    for chunk in data.chunks(MAX_ENCODED_CONTENT_LEN) {
        put_record(buf, kind, request_id, chunk);
    }
}

/// Appends one record. Callers pass at most [`MAX_ENCODED_CONTENT_LEN`] bytes.
fn put_record(buf: &mut BytesMut, kind: RecordType, request_id: u16, content: &[u8]) {
    debug_assert!(content.len() <= MAX_ENCODED_CONTENT_LEN);
    let content = &content[..content.len().min(MAX_ENCODED_CONTENT_LEN)];
    let padding = padding_for(content.len());
    let header = Header {
        kind,
        request_id,
        content_length: u16::try_from(content.len()).unwrap_or(u16::MAX),
        padding_length: padding,
    };
    buf.reserve(header.record_len());
    buf.put_slice(&header.to_bytes());
    buf.put_slice(content);
    buf.put_bytes(0, usize::from(padding));
}

/// A record whose header is reserved in `buf` and written once its content
/// is complete, so pairs are encoded in place.
struct OpenRecord {
    /// Offset of the reserved header in `buf`.
    header_at: Option<usize>,
}

impl OpenRecord {
    fn none() -> Self {
        Self { header_at: None }
    }

    fn content_len(&self, buf: &BytesMut) -> usize {
        self.header_at
            .map_or(0, |at| buf.len().saturating_sub(at + HEADER_LEN))
    }

    fn open(&mut self, buf: &mut BytesMut) {
        if self.header_at.is_none() {
            self.header_at = Some(buf.len());
            buf.put_bytes(0, HEADER_LEN);
        }
    }

    fn close(&mut self, buf: &mut BytesMut, kind: RecordType, request_id: u16) {
        let content_len = self.content_len(buf);
        let Some(at) = self.header_at.take() else {
            return;
        };
        let padding = padding_for(content_len);
        let header = Header {
            kind,
            request_id,
            // `encode_params` closes a record before it passes 65528 bytes.
            content_length: u16::try_from(content_len).unwrap_or(u16::MAX),
            padding_length: padding,
        };
        if let Some(slot) = buf.get_mut(at..at + HEADER_LEN) {
            slot.copy_from_slice(&header.to_bytes());
        }
        buf.put_bytes(0, usize::from(padding));
    }
}
