//! HTTP/1.1 to an upstream: opening a connection and sending one request on it.
//!
//! Over a plain socket holdfast speaks HTTP/1.1 itself: [`codec`] turns heads and
//! bodies into bytes and back, [`conn`] drives one connection from the request that
//! holds it and watches it while it is idle. Over TLS, hyper's connection-level
//! client (`client::conn::http1`) does the protocol, because watching an idle TLS
//! connection means reading through TLS (session tickets may arrive), which hyper's
//! driver does. Either way the pool owns the connection, and a FIN, reset or stray
//! bytes on an idle one end it before anyone can take it (verified by
//! `tests/pool.rs`).

/// The sans-I/O codec, in its own crate (`holdfast-http1`) so that it is fuzzed alone.
pub use holdfast_http1 as codec;
pub mod conn;

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::error::{Delivery, Kind, UpstreamError};
use super::io::Stream;
use super::pool::{Client, Connected};
use crate::body::RequestBody;

/// Largest read buffer of an upstream HTTP/1 connection.
const UPSTREAM_READ_BUF: usize = 64 * 1024;

/// Sets up HTTP/1.1 on a connected plain socket (HTTP/1 has no handshake).
pub fn connected(stream: Stream, write_timeout: Duration) -> Connected {
    let stream = Arc::new(stream);
    let (conn, driver) = conn::connect(stream.clone(), write_timeout);
    Connected {
        stream,
        client: Client::Http1(Box::new(conn)),
        driver: Box::pin(driver),
    }
}

/// hyper's HTTP/1.1 client on I/O layered over the socket (TLS).
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
        client: Client::Http1Tls(sender),
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
        // hyper undoes chunked once and leaves any other coding (or chunked again)
        // applied; the hop-by-hop Transfer-Encoding that says so is removed on the way
        // to the client, so such a body would arrive encoded and unmarked (our own
        // codec refuses it alike).
        Ok(resp)
            if !codec::only_chunked(
                resp.headers()
                    .get_all(http::header::TRANSFER_ENCODING)
                    .iter()
                    .map(http::HeaderValue::as_bytes),
            ) =>
        {
            Err((
                UpstreamError::new(Kind::Protocol, Delivery::MaybeSent)
                    .with_cause("transfer coding other than chunked"),
                None,
            ))
        }
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
