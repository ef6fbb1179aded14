//! FastCGI name-value pairs (FastCGI 1.0 section 3.4), as carried by PARAMS,
//! GET_VALUES and GET_VALUES_RESULT records.
//!
//! Scope: the length-prefixed pair encoding (one length byte below 128, else
//! four bytes with the high bit set) and a non-panicking decoder over a byte
//! slice. Not in scope: splitting pairs into records (see
//! [`record::encode_params`](crate::record::encode_params)) or deciding which
//! CGI variables a request carries; that is the proxy's job.

use bytes::{BufMut, BytesMut};
use thiserror::Error;

use crate::record::EncodeError;

/// Largest name or value length the four-byte form can express (2^31 - 1).
pub const MAX_LEN: usize = 0x7FFF_FFFF;

/// Appends one name-value pair to `buf`.
///
/// # Errors
///
/// [`EncodeError::ParamTooLong`] if the name or the value is longer than
/// [`MAX_LEN`]; `buf` is then left unchanged.
pub fn encode_pair(buf: &mut BytesMut, name: &[u8], value: &[u8]) -> Result<(), EncodeError> {
    let len = encoded_len(name, value)?;
    buf.reserve(len);
    put_len(buf, name.len());
    put_len(buf, value.len());
    buf.put_slice(name);
    buf.put_slice(value);
    Ok(())
}

/// Number of bytes [`encode_pair`] appends for this pair.
///
/// # Errors
///
/// [`EncodeError::ParamTooLong`] if the name or the value is longer than
/// [`MAX_LEN`].
pub fn encoded_len(name: &[u8], value: &[u8]) -> Result<usize, EncodeError> {
    Ok(len_prefix(name.len())? + len_prefix(value.len())? + name.len() + value.len())
}

/// Iterates over the pairs encoded in `content`.
///
/// Yields borrowed `(name, value)` slices of `content`. After the first
/// error it yields nothing more, since the pair boundaries are lost.
pub fn decode_pairs(content: &[u8]) -> Pairs<'_> {
    Pairs {
        rest: content,
        offset: 0,
        failed: false,
    }
}

/// Iterator returned by [`decode_pairs`].
#[derive(Debug, Clone)]
pub struct Pairs<'a> {
    rest: &'a [u8],
    offset: usize,
    failed: bool,
}

/// A malformed name-value pair.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ParamsError {
    /// The content ends inside a length prefix.
    #[error("name-value pair at byte {offset} ends inside its length prefix")]
    TruncatedLength {
        /// Offset of the pair within the content.
        offset: usize,
    },
    /// The lengths announce more bytes than the content holds.
    #[error(
        "name-value pair at byte {offset} announces {needed} bytes of name and value, \
         only {available} remain"
    )]
    TruncatedData {
        /// Offset of the pair within the content.
        offset: usize,
        /// Name plus value length from the prefixes.
        needed: usize,
        /// Bytes left after the prefixes.
        available: usize,
    },
}

// === impl Pairs ===

impl<'a> Iterator for Pairs<'a> {
    type Item = Result<(&'a [u8], &'a [u8]), ParamsError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let result = self.next_pair();
        self.failed = result.is_err();
        Some(result)
    }
}

impl<'a> Pairs<'a> {
    fn next_pair(&mut self) -> Result<(&'a [u8], &'a [u8]), ParamsError> {
        let offset = self.offset;
        let truncated = ParamsError::TruncatedLength { offset };
        let (name_len, after_name_len) = read_len(self.rest).ok_or(truncated.clone())?;
        let (value_len, data) = read_len(after_name_len).ok_or(truncated)?;
        // Both lengths are below 2^31; saturating covers 32-bit targets.
        let needed = name_len.saturating_add(value_len);
        if needed > data.len() {
            return Err(ParamsError::TruncatedData {
                offset,
                needed,
                available: data.len(),
            });
        }
        let (name, data) = data.split_at(name_len);
        let (value, rest) = data.split_at(value_len);
        self.offset += self.rest.len() - rest.len();
        self.rest = rest;
        Ok((name, value))
    }
}

fn len_prefix(len: usize) -> Result<usize, EncodeError> {
    match len {
        0..=127 => Ok(1),
        128..=MAX_LEN => Ok(4),
        _ => Err(EncodeError::ParamTooLong { len }),
    }
}

/// Writes a length already checked by [`len_prefix`].
fn put_len(buf: &mut BytesMut, len: usize) {
    match u8::try_from(len) {
        Ok(short) if short < 128 => buf.put_u8(short),
        // `len <= MAX_LEN` was checked, so it fits 31 bits.
        _ => buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX >> 1) | 0x8000_0000),
    }
}

/// Reads one length prefix; `None` if the input ends inside it.
fn read_len(input: &[u8]) -> Option<(usize, &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first < 0x80 {
        return Some((usize::from(first), rest));
    }
    let (&[b1, b2, b3], rest) = rest.split_first_chunk::<3>()?;
    let len = u32::from_be_bytes([first & 0x7F, b1, b2, b3]);
    // A u32 below 2^31 fits a usize on every target std supports here.
    Some((usize::try_from(len).ok()?, rest))
}

#[cfg(test)]
mod tests;
