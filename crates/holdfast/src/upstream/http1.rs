//! HTTP/1.1 to an upstream: opening a connection and sending one request on it.
//!
//! hyper's connection-level client (`client::conn::http1`) does the protocol; the pool
//! owns the connection. hyper's driver keeps reading an idle connection, so a FIN,
//! reset or stray bytes end the driver at once and the pool drops the connection
//! before anyone can take it (verified by `tests/pool.rs`).

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::error::{Delivery, Kind, UpstreamError};
use super::io::{Stream, UpstreamIo};
use super::pool::{Client, Connected};
use crate::body::RequestBody;

/// Largest read buffer of an upstream HTTP/1 connection.
const UPSTREAM_READ_BUF: usize = 64 * 1024;

/// Performs the HTTP/1 handshake (no I/O: HTTP/1 has none) on a connected socket.
pub async fn handshake(
    stream: Stream,
    write_timeout: Duration,
) -> Result<Connected, UpstreamError> {
    let stream = Arc::new(stream);
    let io = UpstreamIo::new(stream.clone(), write_timeout);
    handshake_on(io, stream).await
}

/// [`handshake`] on I/O layered over the socket (TLS).
pub async fn handshake_on<IO>(io: IO, stream: Arc<Stream>) -> Result<Connected, UpstreamError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let io = TokioIo::new(io);
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        // hyper's read buffer grows with the body it reads and is kept for the
        // connection's life: cap it, so many large responses at once cost 64 KiB per
        // connection, not hundreds.
        .max_buf_size(UPSTREAM_READ_BUF)
        .handshake::<_, RequestBody>(io)
        .await
        .map_err(|e| UpstreamError::new(Kind::ConnectFailed, Delivery::NotSent).with_cause(e))?;
    Ok(Connected {
        stream,
        client: Client::Http1(sender),
        driver: Box::pin(async move {
            // Errors here (reset, stray bytes) end the connection; the request that
            // was using it, if any, gets the error from its response future.
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        }),
    })
}

/// The outcome of one send: a response, or an error and, if the request provably
/// never left, the request itself for another attempt.
pub type SendResult = Result<Response<Incoming>, (UpstreamError, Option<Request<RequestBody>>)>;

/// Queues `req` on the connection now (no `await` needed for that) and returns the
/// future of its response: hyper's own, mapped (an `async` block around it would
/// double its size, and it sits in every request's future).
#[expect(
    clippy::result_large_err,
    reason = "the error carries the unsent request back for another attempt, by design"
)]
pub fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<RequestBody>,
    req: Request<RequestBody>,
) -> impl Future<Output = SendResult> + Send + use<> {
    use futures_util::FutureExt;
    sender.try_send_request(req).map(|result| match result {
        Ok(resp) => Ok(resp),
        Err(mut e) => match e.take_message() {
            Some(req) => Err((
                UpstreamError::new(Kind::Closed, Delivery::NotSent).with_cause(e.into_error()),
                Some(req),
            )),
            None => Err((UpstreamError::from_hyper(e.into_error()), None)),
        },
    })
}
