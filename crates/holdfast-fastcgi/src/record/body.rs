//! Fixed record bodies: BEGIN_REQUEST, END_REQUEST and the GET_VALUES_RESULT
//! variables (FastCGI 1.0 sections 4.1 and 5.1, 5.5).
//!
//! Scope: the typed values and their parsers; the encoders live in
//! `record/encode.rs`. Not in scope: acting on them, e.g. retrying on
//! `FCGI_OVERLOADED` or sizing a pool from `FCGI_MAX_CONNS`.

use crate::params;
use crate::record::DecodeError;

/// The role an application plays for a request (section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// `FCGI_RESPONDER` (1): what php-fpm serves; the only role holdfast uses.
    Responder,
    /// `FCGI_AUTHORIZER` (2).
    Authorizer,
    /// `FCGI_FILTER` (3).
    Filter,
    /// A role number this crate has no name for.
    Other(u16),
}

/// The body of a BEGIN_REQUEST record (`FCGI_BeginRequestBody`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BeginRequest {
    pub role: Role,
    /// `FCGI_KEEP_CONN`: the application must leave the connection open
    /// after this request.
    pub keep_conn: bool,
}

/// The body of an END_REQUEST record (`FCGI_EndRequestBody`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndRequest {
    /// The application's exit status, as a CGI program's would be.
    pub app_status: u32,
    pub protocol_status: ProtocolStatus,
}

/// Why a request ended, from the FastCGI layer's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolStatus {
    /// `FCGI_REQUEST_COMPLETE` (0): normal end.
    RequestComplete,
    /// `FCGI_CANT_MPX_CONN` (1): a second request on a connection that
    /// takes one at a time.
    CantMpxConn,
    /// `FCGI_OVERLOADED` (2): the application is out of a resource, e.g.
    /// database connections. The request was not processed.
    Overloaded,
    /// `FCGI_UNKNOWN_ROLE` (3): the role in BEGIN_REQUEST is not served.
    UnknownRole,
    /// A status byte this crate has no name for.
    Other(u8),
}

/// What GET_VALUES_RESULT said about the application (section 4.1).
///
/// A `None` field was not in the answer: the application did not recognise
/// that variable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ServerValues {
    /// `FCGI_MAX_CONNS`: most concurrent transport connections accepted.
    pub max_conns: Option<u32>,
    /// `FCGI_MAX_REQS`: most concurrent requests accepted.
    pub max_reqs: Option<u32>,
    /// `FCGI_MPXS_CONNS`: whether one connection may carry several
    /// requests at once. php-fpm says no.
    pub mpxs_conns: Option<bool>,
}

const FCGI_KEEP_CONN: u8 = 1;

// === impl Role ===

impl Role {
    pub const fn from_u16(role: u16) -> Self {
        match role {
            1 => Self::Responder,
            2 => Self::Authorizer,
            3 => Self::Filter,
            other => Self::Other(other),
        }
    }

    pub const fn as_u16(self) -> u16 {
        match self {
            Self::Responder => 1,
            Self::Authorizer => 2,
            Self::Filter => 3,
            Self::Other(other) => other,
        }
    }
}

// === impl BeginRequest ===

impl BeginRequest {
    /// Parses BEGIN_REQUEST content.
    ///
    /// # Errors
    ///
    /// [`DecodeError::BeginRequestLength`] unless `content` is 8 bytes.
    pub fn parse(content: &[u8]) -> Result<Self, DecodeError> {
        let &[role_hi, role_lo, flags, _, _, _, _, _] = content else {
            return Err(DecodeError::BeginRequestLength { len: content.len() });
        };
        Ok(Self {
            role: Role::from_u16(u16::from_be_bytes([role_hi, role_lo])),
            keep_conn: flags & FCGI_KEEP_CONN != 0,
        })
    }

    /// The 8 content bytes.
    pub fn to_bytes(&self) -> [u8; 8] {
        let [role_hi, role_lo] = self.role.as_u16().to_be_bytes();
        let flags = if self.keep_conn { FCGI_KEEP_CONN } else { 0 };
        [role_hi, role_lo, flags, 0, 0, 0, 0, 0]
    }
}

// === impl EndRequest ===

impl EndRequest {
    /// Parses END_REQUEST content.
    ///
    /// # Errors
    ///
    /// [`DecodeError::EndRequestLength`] unless `content` is 8 bytes.
    pub fn parse(content: &[u8]) -> Result<Self, DecodeError> {
        let &[a0, a1, a2, a3, protocol_status, _, _, _] = content else {
            return Err(DecodeError::EndRequestLength { len: content.len() });
        };
        Ok(Self {
            app_status: u32::from_be_bytes([a0, a1, a2, a3]),
            protocol_status: ProtocolStatus::from_u8(protocol_status),
        })
    }

    /// The 8 content bytes.
    pub fn to_bytes(&self) -> [u8; 8] {
        let [a0, a1, a2, a3] = self.app_status.to_be_bytes();
        [a0, a1, a2, a3, self.protocol_status.as_u8(), 0, 0, 0]
    }
}

// === impl ProtocolStatus ===

impl ProtocolStatus {
    pub const fn from_u8(status: u8) -> Self {
        match status {
            0 => Self::RequestComplete,
            1 => Self::CantMpxConn,
            2 => Self::Overloaded,
            3 => Self::UnknownRole,
            other => Self::Other(other),
        }
    }

    pub const fn as_u8(self) -> u8 {
        match self {
            Self::RequestComplete => 0,
            Self::CantMpxConn => 1,
            Self::Overloaded => 2,
            Self::UnknownRole => 3,
            Self::Other(other) => other,
        }
    }
}

// === impl ServerValues ===

impl ServerValues {
    /// Name of the `max_conns` variable.
    pub const MAX_CONNS: &'static [u8] = b"FCGI_MAX_CONNS";
    /// Name of the `max_reqs` variable.
    pub const MAX_REQS: &'static [u8] = b"FCGI_MAX_REQS";
    /// Name of the `mpxs_conns` variable.
    pub const MPXS_CONNS: &'static [u8] = b"FCGI_MPXS_CONNS";
    /// The three names, to pass to
    /// [`encode_get_values`](crate::record::encode_get_values).
    pub const NAMES: [&'static [u8]; 3] = [Self::MAX_CONNS, Self::MAX_REQS, Self::MPXS_CONNS];

    /// Parses GET_VALUES_RESULT content. Unknown names are ignored; for a
    /// repeated name the last value wins.
    ///
    /// # Errors
    ///
    /// [`DecodeError::Params`] for a malformed pair;
    /// [`DecodeError::ServerValue`] when a known name has a value other than
    /// a decimal `u32` (`0` or `1` for `FCGI_MPXS_CONNS`).
    pub fn parse(content: &[u8]) -> Result<Self, DecodeError> {
        let mut values = Self::default();
        for pair in params::decode_pairs(content) {
            let (name, value) = pair?;
            match name {
                Self::MAX_CONNS => {
                    let n = parse_u32(value).ok_or(DecodeError::ServerValue {
                        name: "FCGI_MAX_CONNS",
                    })?;
                    values.max_conns = Some(n);
                }
                Self::MAX_REQS => {
                    let n = parse_u32(value).ok_or(DecodeError::ServerValue {
                        name: "FCGI_MAX_REQS",
                    })?;
                    values.max_reqs = Some(n);
                }
                Self::MPXS_CONNS => {
                    let flag = match value {
                        b"0" => false,
                        b"1" => true,
                        _ => {
                            return Err(DecodeError::ServerValue {
                                name: "FCGI_MPXS_CONNS",
                            });
                        }
                    };
                    values.mpxs_conns = Some(flag);
                }
                _ => {}
            }
        }
        Ok(values)
    }
}

/// Plain ASCII decimal, no sign, no spaces; `None` on overflow.
fn parse_u32(digits: &[u8]) -> Option<u32> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u32, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u32::from(d - b'0'))
    })
}
