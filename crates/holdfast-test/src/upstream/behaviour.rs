//! What a scripted upstream does: the `Behaviour` a test picks and the `Plan` it compiles to.
//!
//! A behaviour is either an *answer* (what to send for each request: echo, fixed body,
//! stream, custom, hang, garbage, reset or close mid-body) or a *connection rule* (delay,
//! idle close, close after n responses, keep-alive announcement, idle bytes). Combine
//! them with [`Behaviour::and`] or [`Behaviour::All`]: the last answer wins, every rule
//! applies. Without an answer the upstream echoes.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::wire::Headers;

/// A custom answer: called once per request.
pub type Responder = Arc<dyn Fn(&Request) -> Reply + Send + Sync>;

/// What a [`TestUpstream`](super::TestUpstream) does with its connections.
#[derive(Clone)]
pub enum Behaviour {
    /// 200 whose body is `METHOD TARGET\n`, one `name: value\n` line per request header in
    /// order, an empty line, then the request body (parse it with
    /// [`Response::echoed`](crate::client::Response::echoed)); keep-alive. An
    /// `X-Request-Id` request header is copied to the response.
    Echo,
    /// `status` with `body_len` pattern bytes ([`pattern_byte`](crate::pattern_byte)) and
    /// `headers` added; framing as chosen.
    Fixed {
        status: u16,
        headers: Vec<(String, String)>,
        body_len: usize,
        framing: Framing,
    },
    /// Keep-alive, but closes (FIN, no `Connection: close`) a connection idle this long:
    /// from accept or the end of the last response until the first byte of the next request.
    CloseIdleAfter(Duration),
    /// Answers `Connection: keep-alive` and `Keep-Alive: timeout=N`, then closes (FIN)
    /// right after every response anyway.
    AnnounceKeepAliveThenClose { timeout_secs: u64 },
    /// Closes (FIN) after every response without announcing it.
    CloseAfterEachResponse,
    /// Closes (FIN) silently after the n-th response on a connection.
    CloseAfterRequests(u32),
    /// Reads the request and never answers; the socket is held until the fixture drops
    /// or [`kill_all_connections`](super::TestUpstream::kill_all_connections).
    Hang,
    /// Answers after this delay (measured from the end of the request body).
    Delay(Duration),
    /// Sends a head with `Content-Length: 100000`, 50000 body bytes, then RST
    /// (SO_LINGER 0, close).
    ResetMidBody,
    /// Like `ResetMidBody` but closes with FIN: a truncated body.
    CloseMidBody,
    /// Answers every request with bytes that are not HTTP, then closes (FIN).
    Garbage,
    /// After each response, once the connection has been idle this long, sends unsolicited
    /// bytes on it (once per idle period) and keeps it open.
    BytesWhileIdle(Duration),
    /// Writes the response head in two parts with this pause between them.
    SlowHeaders(Duration),
    /// 200 with `Content-Length: len` pattern bytes, streamed from a fixed block so memory
    /// stays small whatever `len` is.
    StreamBody { len: u64 },
    /// A custom answer per request.
    Respond(Responder),
    /// Every behaviour in order (see the module docs for how they combine).
    All(Vec<Behaviour>),
}

/// How a scripted response body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length`.
    ContentLength,
    /// `Transfer-Encoding: chunked` (the body in chunks of at most 16 KiB).
    Chunked,
    /// No length: the body ends when the upstream closes the connection (FIN).
    CloseDelimited,
}

/// A request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Request {
    /// Connection id, 1-based in accept order.
    pub conn: u64,
    /// Request number on its connection, 1-based.
    pub seq: u32,
    pub method: String,
    pub target: String,
    /// 1 for HTTP/1.1, 0 for HTTP/1.0.
    pub minor_version: u8,
    pub headers: Headers,
    /// The decoded body (chunked framing removed).
    pub body: Bytes,
    /// Chunked trailers, if any.
    pub trailers: Headers,
}

/// A custom response, returned by a [`Responder`].
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    /// Sent as given. If they include `Content-Length` or `Transfer-Encoding`, no framing
    /// header is added and the body is written raw (to script framing errors).
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub framing: Framing,
}

// === impl Behaviour ===

impl Behaviour {
    /// `Fixed` with Content-Length framing and no extra headers.
    pub fn fixed(status: u16, body_len: usize) -> Behaviour {
        Behaviour::Fixed {
            status,
            headers: Vec::new(),
            body_len,
            framing: Framing::ContentLength,
        }
    }

    /// `Respond` from a closure.
    pub fn respond(f: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Behaviour {
        Behaviour::Respond(Arc::new(f))
    }

    /// This behaviour, then `other`.
    pub fn and(self, other: Behaviour) -> Behaviour {
        match self {
            Behaviour::All(mut all) => {
                all.push(other);
                Behaviour::All(all)
            }
            first => Behaviour::All(vec![first, other]),
        }
    }

    pub(crate) fn plan(&self) -> Plan {
        let mut plan = Plan::default();
        self.apply(&mut plan);
        plan
    }

    fn apply(&self, plan: &mut Plan) {
        match self {
            Behaviour::Echo => plan.answer = Answer::Echo,
            Behaviour::Fixed {
                status,
                headers,
                body_len,
                framing,
            } => {
                plan.answer = Answer::Fixed {
                    status: *status,
                    headers: headers.clone(),
                    body_len: *body_len,
                    framing: *framing,
                }
            }
            Behaviour::CloseIdleAfter(d) => plan.idle_close = Some(*d),
            Behaviour::AnnounceKeepAliveThenClose { timeout_secs } => {
                plan.announce_timeout = Some(*timeout_secs);
                plan.close_after = Some(1);
            }
            Behaviour::CloseAfterEachResponse => plan.close_after = Some(1),
            Behaviour::CloseAfterRequests(n) => plan.close_after = Some((*n).max(1)),
            Behaviour::Hang => plan.answer = Answer::Hang,
            Behaviour::Delay(d) => plan.delay = Some(*d),
            Behaviour::ResetMidBody => plan.answer = Answer::MidBody(MidBodyEnd::Reset),
            Behaviour::CloseMidBody => plan.answer = Answer::MidBody(MidBodyEnd::Fin),
            Behaviour::Garbage => plan.answer = Answer::Garbage,
            Behaviour::BytesWhileIdle(d) => plan.idle_bytes = Some(*d),
            Behaviour::SlowHeaders(d) => plan.slow_headers = Some(*d),
            Behaviour::StreamBody { len } => plan.answer = Answer::Stream { len: *len },
            Behaviour::Respond(f) => plan.answer = Answer::Custom(f.clone()),
            Behaviour::All(all) => all.iter().for_each(|b| b.apply(plan)),
        }
    }
}

impl fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Behaviour::Echo => f.write_str("Echo"),
            Behaviour::Fixed {
                status,
                headers,
                body_len,
                framing,
            } => f
                .debug_struct("Fixed")
                .field("status", status)
                .field("headers", headers)
                .field("body_len", body_len)
                .field("framing", framing)
                .finish(),
            Behaviour::CloseIdleAfter(d) => f.debug_tuple("CloseIdleAfter").field(d).finish(),
            Behaviour::AnnounceKeepAliveThenClose { timeout_secs } => f
                .debug_struct("AnnounceKeepAliveThenClose")
                .field("timeout_secs", timeout_secs)
                .finish(),
            Behaviour::CloseAfterEachResponse => f.write_str("CloseAfterEachResponse"),
            Behaviour::CloseAfterRequests(n) => {
                f.debug_tuple("CloseAfterRequests").field(n).finish()
            }
            Behaviour::Hang => f.write_str("Hang"),
            Behaviour::Delay(d) => f.debug_tuple("Delay").field(d).finish(),
            Behaviour::ResetMidBody => f.write_str("ResetMidBody"),
            Behaviour::CloseMidBody => f.write_str("CloseMidBody"),
            Behaviour::Garbage => f.write_str("Garbage"),
            Behaviour::BytesWhileIdle(d) => f.debug_tuple("BytesWhileIdle").field(d).finish(),
            Behaviour::SlowHeaders(d) => f.debug_tuple("SlowHeaders").field(d).finish(),
            Behaviour::StreamBody { len } => {
                f.debug_struct("StreamBody").field("len", len).finish()
            }
            Behaviour::Respond(_) => f.write_str("Respond(..)"),
            Behaviour::All(all) => f.debug_tuple("All").field(all).finish(),
        }
    }
}

// === impl Reply ===

impl Reply {
    /// `status` with no headers and an empty Content-Length body.
    pub fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            framing: Framing::ContentLength,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Bytes>) -> Reply {
        self.body = body.into();
        self
    }

    /// Sets the framing.
    pub fn framing(mut self, framing: Framing) -> Reply {
        self.framing = framing;
        self
    }
}

// === Plan ===

/// How a mid-body abort ends the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum MidBodyEnd {
    Fin,
    Reset,
}

#[derive(Clone)]
pub(crate) enum Answer {
    Echo,
    Fixed {
        status: u16,
        headers: Vec<(String, String)>,
        body_len: usize,
        framing: Framing,
    },
    Stream {
        len: u64,
    },
    Custom(Responder),
    Hang,
    Garbage,
    MidBody(MidBodyEnd),
}

/// A behaviour compiled into one answer plus connection rules.
#[derive(Clone)]
pub(crate) struct Plan {
    pub answer: Answer,
    pub delay: Option<Duration>,
    pub slow_headers: Option<Duration>,
    pub idle_close: Option<Duration>,
    pub idle_bytes: Option<Duration>,
    pub close_after: Option<u32>,
    pub announce_timeout: Option<u64>,
}

impl Default for Plan {
    fn default() -> Plan {
        Plan {
            answer: Answer::Echo,
            delay: None,
            slow_headers: None,
            idle_close: None,
            idle_bytes: None,
            close_after: None,
            announce_timeout: None,
        }
    }
}
