//! A fake FastCGI application on loopback: answers GET_VALUES and every request with
//! `200 ok`, keeping its connections (optionally closing one after some requests).

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use holdfast_fastcgi::record::{self, RecordType};
use holdfast_fastcgi::{EndRequest, ProtocolStatus, RecordDecoder, ServerValues};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// A FastCGI application that says `FCGI_MAX_CONNS=max_conns` (and `FCGI_MAX_REQS` the
/// same), answers `200 ok` with the connection kept, and closes a connection after
/// `close_after` requests when given.
///
/// # Drop behavior
///
/// Stops accepting; connections already accepted run until the runtime ends.
pub struct FastCgiApp {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for FastCgiApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FastCgiApp {
    pub async fn start(max_conns: u32, close_after: Option<u32>) -> FastCgiApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = BytesMut::new();
                    let mut dec = RecordDecoder::new();
                    let mut served = 0;
                    // Ends when the peer closes, after close_after requests, or on garbage.
                    loop {
                        let r = match dec.decode(&mut buf) {
                            Ok(Some(r)) => r,
                            Ok(None) => match s.read_buf(&mut buf).await {
                                Ok(n) if n > 0 => continue,
                                _ => return,
                            },
                            Err(_) => return,
                        };
                        let mut out = BytesMut::new();
                        match r.kind {
                            RecordType::GetValues => {
                                let values = ServerValues {
                                    max_conns: Some(max_conns),
                                    max_reqs: Some(max_conns),
                                    mpxs_conns: Some(false),
                                };
                                record::encode_get_values_result(&mut out, &values);
                            }
                            RecordType::Stdin if r.content.is_empty() => {
                                let body = Bytes::from_static(
                                    b"Status: 200 OK\r\nContent-Type: text/plain\r\n\r\nok",
                                );
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
                        if s.write_all(&out).await.is_err() || close_after == Some(served) {
                            return;
                        }
                    }
                });
            }
        });
        FastCgiApp { addr, task }
    }
}
