//! A client that keeps one connection open across requests, like a pooled HTTP client
//! with a pool of one, and reports exactly how each failed request failed.
//!
//! It reconnects lazily when it has no connection (first use, after a response that
//! ends the connection, after an error) and never retries: a request that fails returns
//! its [`TransportError`].

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

use super::{Checkout, ClientRequest, ErrorKind, Phase, RawClient, Response, TransportError};

/// Default timeout for connecting and for each response.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends requests to one address on a persistent connection.
#[derive(Debug)]
pub struct KeepAliveClient {
    addr: SocketAddr,
    timeout: Duration,
    conn: Option<RawClient>,
    connections_opened: u64,
}

// === impl KeepAliveClient ===

impl KeepAliveClient {
    /// A client for `addr`; it connects on the first request.
    pub fn new(addr: SocketAddr) -> KeepAliveClient {
        KeepAliveClient {
            addr,
            timeout: DEFAULT_TIMEOUT,
            conn: None,
            connections_opened: 0,
        }
    }

    /// Sets the connect timeout and the per-response timeout (default 10 s).
    pub fn with_timeout(mut self, timeout: Duration) -> KeepAliveClient {
        self.timeout = timeout;
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections opened so far.
    pub fn connections_opened(&self) -> u64 {
        self.connections_opened
    }

    /// Whether a connection is open for the next request.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The open connection, to inspect or script it.
    pub fn connection(&mut self) -> Option<&mut RawClient> {
        self.conn.as_mut()
    }

    /// Drops the connection (FIN); the next request opens a new one.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// `GET target`.
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub async fn get(&mut self, target: &str) -> Result<Response, TransportError> {
        self.send(&ClientRequest::get(target)).await
    }

    /// Sends `request` on the open connection (or a new one) and reads the response.
    /// The connection is kept if the response allows it and dropped otherwise.
    ///
    /// # Errors
    ///
    /// A [`TransportError`] saying what failed, where, and on which kind of connection;
    /// the connection is dropped.
    pub async fn send(&mut self, request: &ClientRequest) -> Result<Response, TransportError> {
        let (mut conn, checkout) = match self.conn.take() {
            Some(conn) => (conn, Checkout::Reused),
            None => (self.connect().await?, Checkout::Fresh),
        };
        if let Err(e) = conn.send_request(request).await {
            return Err(TransportError::from_io(&e, Phase::Write, checkout));
        }
        let mut response = conn.read_response_for(&request.method, self.timeout).await;
        if let Err(e) = &mut response {
            // RawClient only knows whether it had read a response before; we know better.
            e.checkout = checkout;
        }
        let response = response?;
        if response.keeps_alive() && !request.asks_close() {
            self.conn = Some(conn);
        }
        Ok(response)
    }

    async fn connect(&mut self) -> Result<RawClient, TransportError> {
        let connect = TcpStream::connect(self.addr);
        let stream = match tokio::time::timeout(self.timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(TransportError::from_io(&e, Phase::Connect, Checkout::Fresh)),
            Err(_) => {
                return Err(TransportError::new(
                    ErrorKind::Timeout,
                    Phase::Connect,
                    Checkout::Fresh,
                    format!("connect to {} took over {:?}", self.addr, self.timeout),
                ));
            }
        };
        let _ = stream.set_nodelay(true);
        self.connections_opened += 1;
        Ok(RawClient::from_stream(stream))
    }
}
