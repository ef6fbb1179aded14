//! Serving one upstream connection according to a [`Plan`].
//!
//! The loop is: idle (where `CloseIdleAfter` and `BytesWhileIdle` act), read a request
//! head and body, record it, answer, then keep the connection or close it. Every close
//! the script makes is a FIN (`shutdown(Write)` then drop) except `ResetMidBody`'s RST.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::behaviour::{Answer, Framing, MidBodyEnd, Plan, Request};
use super::{CloseCause, Shared};
use crate::wire::{self, ReadError, Reader, RequestHead};

/// What `BytesWhileIdle` sends on an idle connection.
pub(crate) const UNSOLICITED: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nunsolicited: yes\r\n\r\n";
/// What `Garbage` answers: a TLS-looking record, NUL and invalid UTF-8, no status line.
pub(crate) const GARBAGE: &[u8] = b"\x16\x03\x01\x00\x2a this is not HTTP \x00\xff\xfe\r\n\r\n";
/// `ResetMidBody` and `CloseMidBody`: announced length and bytes sent before the end.
const MID_BODY_LENGTH: usize = 100_000;
const MID_BODY_SENT: usize = 50_000;
/// Chunk size for scripted chunked bodies.
const CHUNK: usize = 16 * 1024;

/// How an answer left the connection.
enum After {
    /// A complete response; the connection may be kept.
    Responded(u16),
    /// A complete response whose framing needs the connection closed (close-delimited).
    RespondedThenClose(u16),
    /// The script closed the connection (FIN already sent).
    Closed,
    /// The script wants an RST: the caller must just drop the socket (linger 0 is set).
    Reset,
    /// Never answer.
    Hang,
}

/// Serves `stream` until it closes; returns why it closed.
pub(super) async fn serve(shared: &Shared, stream: TcpStream, id: u64) -> CloseCause {
    let plan = &shared.plan;
    let mut reader = Reader::new(stream);
    let mut seq: u32 = 0;
    // Bounded by the peer: each round consumes one request or ends the connection.
    loop {
        if let Some(cause) = await_request(&mut reader, plan, seq > 0).await {
            return cause;
        }
        let head = match reader.read_request_head().await {
            Ok(head) => head,
            Err(e) => return read_failed(&mut reader.io, e).await,
        };
        let framing = match head.framing() {
            Ok(framing) => framing,
            Err(e) => return read_failed(&mut reader.io, e).await,
        };
        if head.headers.has_token("expect", "100-continue")
            && framing != wire::BodyFraming::Empty
            && let Err(e) = reader.io.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await
        {
            return CloseCause::PeerError(e.kind());
        }
        let mut body = Vec::new();
        let trailers = match reader
            .read_body(framing, &mut |b: &[u8]| body.extend_from_slice(b))
            .await
        {
            Ok(trailers) => trailers,
            Err(e) => return read_failed(&mut reader.io, e).await,
        };
        seq += 1;
        let wants_close = head.headers.has_token("connection", "close")
            || (head.minor_version == 0 && !head.headers.has_token("connection", "keep-alive"));
        let request = into_request(head, id, seq, body.into(), trailers);
        shared.record_request(request.clone());

        if let Some(delay) = plan.delay {
            tokio::time::sleep(delay).await;
        }
        let after = match answer(&mut reader.io, plan, &request, wants_close).await {
            Ok(after) => after,
            Err(e) => return CloseCause::PeerError(e.kind()),
        };
        match after {
            After::Responded(status) => {
                shared.record_response(id, seq, status);
                if wants_close {
                    let _ = reader.io.shutdown().await;
                    return CloseCause::RequestedClose;
                }
                if plan.close_after.is_some_and(|n| seq >= n) {
                    let _ = reader.io.shutdown().await;
                    return CloseCause::Script;
                }
            }
            After::RespondedThenClose(status) => {
                shared.record_response(id, seq, status);
                let _ = reader.io.shutdown().await;
                return CloseCause::Script;
            }
            After::Closed | After::Reset => return CloseCause::Script,
            After::Hang => std::future::pending::<()>().await,
        }
    }
}

fn into_request(
    head: RequestHead,
    conn: u64,
    seq: u32,
    body: Bytes,
    trailers: wire::Headers,
) -> Request {
    Request {
        conn,
        seq,
        method: head.method,
        target: head.target,
        minor_version: head.minor_version,
        headers: head.headers,
        body,
        trailers,
    }
}

async fn read_failed(io: &mut TcpStream, e: ReadError) -> CloseCause {
    match e {
        ReadError::Eof => CloseCause::PeerEof,
        ReadError::Io(e) => CloseCause::PeerError(e.kind()),
        ReadError::Malformed(why) => {
            let _ = io
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await;
            let _ = io.shutdown().await;
            CloseCause::Malformed(why)
        }
    }
}

enum Idle {
    Read(io::Result<usize>),
    Close,
    SendBytes,
}

/// Waits for the first byte of the next request; `Some(cause)` if the connection ended.
async fn await_request(
    reader: &mut Reader<TcpStream>,
    plan: &Plan,
    after_response: bool,
) -> Option<CloseCause> {
    if !reader.buf.is_empty() {
        return None;
    }
    let start = Instant::now();
    let close_at = plan.idle_close.map(|d| start + d);
    let mut bytes_at = plan
        .idle_bytes
        .filter(|_| after_response)
        .map(|d| start + d);
    // Bounded: `SendBytes` fires at most once, every other event returns.
    loop {
        let event = tokio::select! {
            r = reader.fill() => Idle::Read(r),
            _ = sleep_until(close_at) => Idle::Close,
            _ = sleep_until(bytes_at) => Idle::SendBytes,
        };
        match event {
            Idle::Read(Ok(0)) => return Some(CloseCause::PeerEof),
            Idle::Read(Ok(_)) => return None,
            Idle::Read(Err(e)) => return Some(CloseCause::PeerError(e.kind())),
            Idle::Close => {
                let _ = reader.io.shutdown().await;
                return Some(CloseCause::IdleTimeout);
            }
            Idle::SendBytes => {
                bytes_at = None;
                if let Err(e) = reader.io.write_all(UNSOLICITED).await {
                    return Some(CloseCause::PeerError(e.kind()));
                }
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Writes the planned answer to `request`.
async fn answer(
    io: &mut TcpStream,
    plan: &Plan,
    request: &Request,
    wants_close: bool,
) -> io::Result<After> {
    let head_only = request.method.eq_ignore_ascii_case("HEAD");
    match &plan.answer {
        Answer::Echo => {
            let body = echo_body(request);
            let mut head = builtin_head(200, plan, request, wants_close);
            push_header(&mut head, "content-type", "text/plain");
            send(io, plan, head, &body, Framing::ContentLength, head_only).await?;
            Ok(After::Responded(200))
        }
        Answer::Fixed {
            status,
            headers,
            body_len,
            framing,
        } => {
            let mut head = builtin_head(*status, plan, request, wants_close);
            for (name, value) in headers {
                push_header(&mut head, name, value);
            }
            let no_body = (100..200).contains(status) || *status == 204 || *status == 304;
            let body = if no_body {
                Vec::new()
            } else {
                wire::pattern(0, *body_len)
            };
            let user_framed = has_framing(headers);
            if no_body || user_framed {
                finish_head(&mut head);
                write_head(io, plan, &head).await?;
                if !head_only {
                    io.write_all(&body).await?;
                }
                io.flush().await?;
                return Ok(ends(*status, *framing));
            }
            send(io, plan, head, &body, *framing, head_only).await?;
            Ok(ends(*status, *framing))
        }
        Answer::Stream { len } => {
            let mut head = builtin_head(200, plan, request, wants_close);
            push_header(&mut head, "content-length", &len.to_string());
            finish_head(&mut head);
            write_head(io, plan, &head).await?;
            if !head_only {
                let block = wire::pattern_block();
                let mut left = *len;
                // Bounded by `len`.
                while left > 0 {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(block.len());
                    io.write_all(&block[..n]).await?;
                    left -= n as u64;
                }
            }
            io.flush().await?;
            Ok(After::Responded(200))
        }
        Answer::Custom(responder) => {
            let reply = responder(request);
            let mut head = status_line(reply.status);
            for (name, value) in &reply.headers {
                push_header(&mut head, name, value);
            }
            if has_framing(&reply.headers) {
                finish_head(&mut head);
                write_head(io, plan, &head).await?;
                if !head_only {
                    io.write_all(&reply.body).await?;
                }
                io.flush().await?;
            } else {
                send(io, plan, head, &reply.body, reply.framing, head_only).await?;
            }
            Ok(ends(reply.status, reply.framing))
        }
        Answer::Hang => Ok(After::Hang),
        Answer::Garbage => {
            io.write_all(GARBAGE).await?;
            io.flush().await?;
            let _ = io.shutdown().await;
            Ok(After::Closed)
        }
        Answer::MidBody(end) => {
            let mut head = builtin_head(200, plan, request, wants_close);
            push_header(&mut head, "content-length", &MID_BODY_LENGTH.to_string());
            finish_head(&mut head);
            write_head(io, plan, &head).await?;
            io.write_all(&wire::pattern(0, MID_BODY_SENT)).await?;
            io.flush().await?;
            match end {
                MidBodyEnd::Fin => {
                    let _ = io.shutdown().await;
                    Ok(After::Closed)
                }
                MidBodyEnd::Reset => {
                    // Linger 0 makes the close that follows (the caller drops the
                    // socket) send RST instead of FIN.
                    socket2::SockRef::from(&*io).set_linger(Some(Duration::ZERO))?;
                    Ok(After::Reset)
                }
            }
        }
    }
}

fn ends(status: u16, framing: Framing) -> After {
    match framing {
        Framing::CloseDelimited => After::RespondedThenClose(status),
        Framing::ContentLength | Framing::Chunked => After::Responded(status),
    }
}

fn has_framing(headers: &[(String, String)]) -> bool {
    headers.iter().any(|(n, _)| {
        n.eq_ignore_ascii_case("content-length") || n.eq_ignore_ascii_case("transfer-encoding")
    })
}

fn echo_body(request: &Request) -> Vec<u8> {
    let mut body = format!("{} {}\n", request.method, request.target).into_bytes();
    for (name, value) in request.headers.iter() {
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(b": ");
        body.extend_from_slice(value);
        body.push(b'\n');
    }
    body.push(b'\n');
    body.extend_from_slice(&request.body);
    body
}

fn status_line(status: u16) -> Vec<u8> {
    format!("HTTP/1.1 {status} {}\r\n", wire::reason(status)).into_bytes()
}

/// Status line plus the headers every built-in answer carries.
fn builtin_head(status: u16, plan: &Plan, request: &Request, wants_close: bool) -> Vec<u8> {
    let mut head = status_line(status);
    push_header(&mut head, "x-upstream-conn", &request.conn.to_string());
    push_header(&mut head, "x-upstream-seq", &request.seq.to_string());
    if let Some(id) = request.headers.get_bytes("x-request-id") {
        head.extend_from_slice(b"x-request-id: ");
        head.extend_from_slice(id);
        head.extend_from_slice(b"\r\n");
    }
    if wants_close {
        push_header(&mut head, "connection", "close");
    } else if let Some(secs) = plan.announce_timeout {
        push_header(&mut head, "connection", "keep-alive");
        push_header(&mut head, "keep-alive", &format!("timeout={secs}"));
    }
    head
}

fn push_header(head: &mut Vec<u8>, name: &str, value: &str) {
    head.extend_from_slice(name.as_bytes());
    head.extend_from_slice(b": ");
    head.extend_from_slice(value.as_bytes());
    head.extend_from_slice(b"\r\n");
}

fn finish_head(head: &mut Vec<u8>) {
    head.extend_from_slice(b"\r\n");
}

/// Adds the framing header, ends the head, writes head and body.
async fn send(
    io: &mut TcpStream,
    plan: &Plan,
    mut head: Vec<u8>,
    body: &[u8],
    framing: Framing,
    head_only: bool,
) -> io::Result<()> {
    match framing {
        Framing::ContentLength => push_header(&mut head, "content-length", &body.len().to_string()),
        Framing::Chunked => push_header(&mut head, "transfer-encoding", "chunked"),
        Framing::CloseDelimited => {}
    }
    finish_head(&mut head);
    write_head(io, plan, &head).await?;
    if !head_only {
        match framing {
            Framing::ContentLength | Framing::CloseDelimited => io.write_all(body).await?,
            Framing::Chunked => {
                let mut out = Vec::with_capacity(body.len() + 64);
                for chunk in body.chunks(CHUNK) {
                    wire::encode_chunk(&mut out, chunk);
                }
                out.extend_from_slice(b"0\r\n\r\n");
                io.write_all(&out).await?;
            }
        }
    }
    io.flush().await
}

/// Writes a head, in two parts with a pause if the plan has `SlowHeaders`.
async fn write_head(io: &mut TcpStream, plan: &Plan, head: &[u8]) -> io::Result<()> {
    match plan.slow_headers {
        Some(pause) => {
            let (first, rest) = head.split_at(head.len() / 2);
            io.write_all(first).await?;
            io.flush().await?;
            tokio::time::sleep(pause).await;
            io.write_all(rest).await
        }
        None => io.write_all(head).await,
    }
}
