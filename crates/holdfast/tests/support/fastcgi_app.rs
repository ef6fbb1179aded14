//! A fake FastCGI application on loopback: answers GET_VALUES and every request with
//! `200 ok`, keeping its connections (optionally closing one after some requests), and
//! counts the connections that carry requests.

#![allow(dead_code)] // each test binary uses its own part

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use holdfast_fastcgi::record::{self, RecordType};
use holdfast_fastcgi::{EndRequest, ProtocolStatus, RecordDecoder, ServerValues};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// How a [`FastCgiApp`] behaves.
#[derive(Debug, Clone, Copy)]
pub struct FastCgiAppOptions {
    /// What it says for `FCGI_MAX_CONNS` (and `FCGI_MAX_REQS`).
    pub max_conns: u32,
    /// Closes a connection after this many requests.
    pub close_after: Option<u32>,
    /// How long it takes to answer GET_VALUES.
    pub values_delay: Duration,
}

impl Default for FastCgiAppOptions {
    fn default() -> Self {
        FastCgiAppOptions {
            max_conns: 8,
            close_after: None,
            values_delay: Duration::ZERO,
        }
    }
}

/// Connections that carried a request (a BEGIN_REQUEST): open now, and the most open
/// at once.
#[derive(Debug, Default)]
pub struct Connections {
    open: AtomicUsize,
    most_open: AtomicUsize,
}

impl Connections {
    pub fn most_open(&self) -> usize {
        self.most_open.load(SeqCst)
    }

    fn opened(&self) {
        let now = self.open.fetch_add(1, SeqCst) + 1;
        self.most_open.fetch_max(now, SeqCst);
    }

    fn closed(&self) {
        self.open.fetch_sub(1, SeqCst);
    }
}

/// A FastCGI application that says `FCGI_MAX_CONNS=max_conns` (and `FCGI_MAX_REQS` the
/// same), answers `200 ok` with the connection kept, and closes a connection after
/// `close_after` requests when given.
///
/// # Drop behavior
///
/// Stops accepting; connections already accepted run until the runtime ends.
pub struct FastCgiApp {
    pub addr: SocketAddr,
    pub connections: Arc<Connections>,
    task: JoinHandle<()>,
}

impl Drop for FastCgiApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FastCgiApp {
    pub async fn start(max_conns: u32, close_after: Option<u32>) -> FastCgiApp {
        FastCgiApp::start_with(FastCgiAppOptions {
            max_conns,
            close_after,
            ..FastCgiAppOptions::default()
        })
        .await
    }

    pub async fn start_with(options: FastCgiAppOptions) -> FastCgiApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        FastCgiApp::start_on(listener, options)
    }

    /// On a listener of the caller's (an address chosen before the application runs).
    pub fn start_on(listener: TcpListener, options: FastCgiAppOptions) -> FastCgiApp {
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(Connections::default());
        let counts = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s, options, counts.clone()));
            }
        });
        FastCgiApp {
            addr,
            connections,
            task,
        }
    }
}

/// One connection. Ends when the peer closes, after `close_after` requests, or on
/// garbage.
async fn serve(mut s: tokio::net::TcpStream, options: FastCgiAppOptions, counts: Arc<Connections>) {
    let mut buf = BytesMut::new();
    let mut dec = RecordDecoder::new();
    let mut served = 0;
    let mut counted = false;
    loop {
        let r = match dec.decode(&mut buf) {
            Ok(Some(r)) => r,
            Ok(None) => match s.read_buf(&mut buf).await {
                Ok(n) if n > 0 => continue,
                _ => break,
            },
            Err(_) => break,
        };
        let mut out = BytesMut::new();
        match r.kind {
            RecordType::GetValues => {
                tokio::time::sleep(options.values_delay).await;
                let values = ServerValues {
                    max_conns: Some(options.max_conns),
                    max_reqs: Some(options.max_conns),
                    mpxs_conns: Some(false),
                };
                record::encode_get_values_result(&mut out, &values);
            }
            RecordType::BeginRequest if !counted => {
                counted = true;
                counts.opened();
                continue;
            }
            RecordType::Stdin if r.content.is_empty() => {
                let body =
                    Bytes::from_static(b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\nok");
                record::encode_stream(&mut out, RecordType::Stdout, 1, &body);
                record::encode_stream(&mut out, RecordType::Stdout, 1, b"");
                let end = EndRequest {
                    app_status: 0,
                    protocol_status: ProtocolStatus::RequestComplete,
                };
                record::encode_end_request(&mut out, 1, &end);
                served += 1;
            }
            _ => continue,
        }
        if s.write_all(&out).await.is_err() || options.close_after == Some(served) {
            break;
        }
    }
    if counted {
        counts.closed();
    }
}
