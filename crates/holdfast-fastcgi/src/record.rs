//! FastCGI 1.0 records: the 8-byte header, record types, encoders and a
//! streaming decoder.
//!
//! Scope: framing (FastCGI 1.0 section 3.3), the fixed bodies of
//! BEGIN_REQUEST, END_REQUEST and GET_VALUES(_RESULT) (sections 4 and 5), and
//! a decoder that turns a read buffer into whole [`Record`]s. Not in scope:
//! reassembling a request's STDOUT/STDERR streams, matching request ids to
//! requests, or deciding whether a connection can be reused; the caller does
//! that with the records this module yields.

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;

pub use self::body::{BeginRequest, EndRequest, ProtocolStatus, Role, ServerValues};
pub use self::encode::{
    encode_abort_request, encode_begin_request, encode_end_request, encode_get_values,
    encode_get_values_result, encode_params, encode_stdin, encode_stream,
};

mod body;
mod encode;

/// The only protocol version, `FCGI_VERSION_1`.
pub const VERSION_1: u8 = 1;
/// Length of a record header, `FCGI_HEADER_LEN`.
pub const HEADER_LEN: usize = 8;
/// Largest content a record can carry: its length field is 16 bits.
pub const MAX_CONTENT_LEN: usize = u16::MAX as usize;
/// Largest padding a record can carry: its length field is 8 bits.
pub const MAX_PADDING_LEN: usize = u8::MAX as usize;
/// Largest content the encoders put in one record: 65528, the largest
/// multiple of 8 below 65536. With 8-byte padding, content plus padding
/// then stays within 65535, which php-fpm requires of PARAMS records
/// (`len + padding > FCGI_MAX_LENGTH` fails the request in its `fastcgi.c`).
pub const MAX_ENCODED_CONTENT_LEN: usize = MAX_CONTENT_LEN & !7;
/// Request id of management records (GET_VALUES and friends), `FCGI_NULL_REQUEST_ID`.
pub const NULL_REQUEST_ID: u16 = 0;

/// A record type (FastCGI 1.0 section 8, `FCGI_BEGIN_REQUEST` ..).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordType {
    BeginRequest,
    AbortRequest,
    EndRequest,
    Params,
    Stdin,
    Stdout,
    Stderr,
    Data,
    GetValues,
    GetValuesResult,
    UnknownType,
    /// A type this crate has no name for. [`RecordType::from_u8`] never puts
    /// 1 to 11 here.
    Other(u8),
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: RecordType,
    pub request_id: u16,
    pub content_length: u16,
    pub padding_length: u8,
}

/// One whole record, padding removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordType,
    pub request_id: u16,
    pub content: Bytes,
}

/// Splits a byte stream from an upstream into [`Record`]s.
///
/// Holds no bytes and no state: a record stays in the caller's buffer until
/// all of it has arrived, so the caller may read more into the same buffer
/// and call [`decode`](Self::decode) again. An empty buffer after `decode`
/// returned `Ok(None)` means the stream sits on a record boundary.
#[derive(Debug, Default, Clone)]
pub struct RecordDecoder {
    _private: (),
}

/// The upstream sent something that is not FastCGI 1.0.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The version byte of a record header is not 1.
    #[error("FastCGI record has version {version}, only version 1 exists")]
    UnsupportedVersion { version: u8 },
    /// An END_REQUEST body is not the 8 bytes of `FCGI_EndRequestBody`.
    #[error("END_REQUEST body is {len} bytes, expected 8")]
    EndRequestLength { len: usize },
    /// A BEGIN_REQUEST body is not the 8 bytes of `FCGI_BeginRequestBody`.
    #[error("BEGIN_REQUEST body is {len} bytes, expected 8")]
    BeginRequestLength { len: usize },
    /// A GET_VALUES_RESULT body holds a malformed name-value pair.
    #[error("malformed GET_VALUES_RESULT: {0}")]
    Params(#[from] crate::params::ParamsError),
    /// A GET_VALUES_RESULT value is not what its name requires
    /// (a decimal `u32`, or `0`/`1` for `FCGI_MPXS_CONNS`).
    #[error("GET_VALUES_RESULT has an invalid value for {name}")]
    ServerValue { name: &'static str },
}

/// Something that cannot be expressed in FastCGI records.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A name or value is longer than the 31-bit length prefix allows.
    #[error("name or value of {len} bytes exceeds the 2^31 - 1 limit of a name-value pair")]
    ParamTooLong { len: usize },
    /// The content of a record that cannot be split (GET_VALUES) exceeds
    /// [`MAX_ENCODED_CONTENT_LEN`].
    #[error("record content of {len} bytes exceeds 65528 and this record type cannot be split")]
    RecordTooLong { len: usize },
}

// === impl RecordType ===

impl RecordType {
    /// Maps a wire byte to a type; unnamed bytes become [`RecordType::Other`].
    pub const fn from_u8(byte: u8) -> Self {
        match byte {
            1 => Self::BeginRequest,
            2 => Self::AbortRequest,
            3 => Self::EndRequest,
            4 => Self::Params,
            5 => Self::Stdin,
            6 => Self::Stdout,
            7 => Self::Stderr,
            8 => Self::Data,
            9 => Self::GetValues,
            10 => Self::GetValuesResult,
            11 => Self::UnknownType,
            other => Self::Other(other),
        }
    }

    /// The wire byte.
    pub const fn as_u8(self) -> u8 {
        match self {
            Self::BeginRequest => 1,
            Self::AbortRequest => 2,
            Self::EndRequest => 3,
            Self::Params => 4,
            Self::Stdin => 5,
            Self::Stdout => 6,
            Self::Stderr => 7,
            Self::Data => 8,
            Self::GetValues => 9,
            Self::GetValuesResult => 10,
            Self::UnknownType => 11,
            Self::Other(other) => other,
        }
    }

    /// Whether this is a management record type (section 3.4): one that
    /// travels with [`NULL_REQUEST_ID`].
    pub const fn is_management(self) -> bool {
        matches!(
            self,
            Self::GetValues | Self::GetValuesResult | Self::UnknownType
        )
    }
}

impl From<u8> for RecordType {
    fn from(byte: u8) -> Self {
        Self::from_u8(byte)
    }
}

impl From<RecordType> for u8 {
    fn from(kind: RecordType) -> Self {
        kind.as_u8()
    }
}

// === impl Header ===

impl Header {
    /// Parses a record header.
    ///
    /// # Errors
    ///
    /// [`DecodeError::UnsupportedVersion`] if the version byte is not 1.
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, DecodeError> {
        let [
            version,
            kind,
            id_hi,
            id_lo,
            len_hi,
            len_lo,
            padding_length,
            _reserved,
        ] = *bytes;
        if version != VERSION_1 {
            return Err(DecodeError::UnsupportedVersion { version });
        }
        Ok(Self {
            kind: RecordType::from_u8(kind),
            request_id: u16::from_be_bytes([id_hi, id_lo]),
            content_length: u16::from_be_bytes([len_hi, len_lo]),
            padding_length,
        })
    }

    /// The 8 header bytes, version 1 and a zero reserved byte.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let [id_hi, id_lo] = self.request_id.to_be_bytes();
        let [len_hi, len_lo] = self.content_length.to_be_bytes();
        [
            VERSION_1,
            self.kind.as_u8(),
            id_hi,
            id_lo,
            len_hi,
            len_lo,
            self.padding_length,
            0,
        ]
    }

    /// Header plus content plus padding.
    pub fn record_len(&self) -> usize {
        HEADER_LEN + usize::from(self.content_length) + usize::from(self.padding_length)
    }
}

// === impl RecordDecoder ===

impl RecordDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next whole record from the front of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` does not yet hold a whole record (header,
    /// content and padding); read more into `buf` and call again. Then `buf`
    /// has been grown to fit the rest of the record, at most 8 + 65535 + 255
    /// bytes. A record is removed from `buf` only once it is whole, and
    /// nothing after it is touched.
    ///
    /// # Errors
    ///
    /// [`DecodeError::UnsupportedVersion`] as soon as the first byte of a
    /// record header is not 1, without waiting for the rest of the header.
    /// Nothing is consumed and the stream cannot be resynchronised: close
    /// the connection.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Record>, DecodeError> {
        // Check the first byte alone: a peer speaking HTTP or another
        // protocol shows it there, whatever else follows.
        match buf.first() {
            None => return Ok(None),
            Some(&VERSION_1) => {}
            Some(&version) => return Err(DecodeError::UnsupportedVersion { version }),
        }
        let Some(bytes) = buf.first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let header = Header::decode(bytes)?;
        let record_len = header.record_len();
        if buf.len() < record_len {
            buf.reserve(record_len - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let content = buf.split_to(usize::from(header.content_length)).freeze();
        buf.advance(usize::from(header.padding_length));
        Ok(Some(Record {
            kind: header.kind,
            request_id: header.request_id,
            content,
        }))
    }
}

/// Padding that brings `content_len` to a multiple of 8, as nginx and
/// php-fpm send (FastCGI 1.0 section 3.3 recommends 8-byte alignment).
pub(crate) fn padding_for(content_len: usize) -> u8 {
    // The result is in 0..8, so the cast cannot truncate.
    ((8 - content_len % 8) % 8) as u8
}

#[cfg(test)]
mod tests;
