//! TLS and HTTP/2 to upstreams, end to end: certificates made at test time (rcgen)
//! under a test CA, a real nginx over TLS (mutual TLS, session resumption, ALPN h2),
//! hyper HTTP/2 servers holdfast shares connections with, and a raw HTTP/2 server that
//! sends exactly the GOAWAY a test needs.
//!
//! Covered: GET over TLS with a client certificate and connection reuse; resumed TLS
//! sessions on new connections; a wrong-name and an expired certificate give 502 naming
//! the cause; many concurrent requests on one HTTP/2 connection (ALPN and h2c); the
//! upstream's max-concurrent-streams respected (the rest wait in the pool's queue, or
//! go to another connection); GOAWAY in the middle of a load (graceful, and one below
//! streams in flight) with no failed request, POSTs included; a silent connection
//! found by PING and replaced; an HTTP/1.1 connection that answered before its
//! request body was all sent is not pooled.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use holdfast_test::h2::{self as frames, Frame, flag, kind};
use holdfast_test::{
    ClientRequest, KeepAliveClient, Nginx, Response, TransportError, wait_until, wait_until_async,
};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::pki::TestCa;
use support::{Gateway, proxy_to, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

/// Bound for anything that should happen at once.
const SOON: Duration = Duration::from_secs(10);

// === fixtures: certificates ===

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// nginx serving `location_body` over TLS with `cert`, asking for a client certificate
/// from the test CA when `mutual`.
async fn nginx_tls(pki: &TestCa, cert: &(PathBuf, PathBuf), extra: &str, body: &str) -> Nginx {
    Nginx::start(&format!(
        "log_format tls '$request $ssl_session_reused $ssl_protocol $server_protocol';\n\
         server {{\n\
         \x20   listen 127.0.0.1:{{port}} ssl {extra};\n\
         \x20   access_log {{dir}}/access.log tls;\n\
         \x20   ssl_protocols TLSv1.2 TLSv1.3;\n\
         \x20   ssl_certificate {};\n\
         \x20   ssl_certificate_key {};\n\
         \x20   ssl_client_certificate {};\n\
         \x20   ssl_verify_client optional;\n\
         \x20   location / {{ {body} }}\n\
         }}\n",
        cert.0.display(),
        cert.1.display(),
        pki.ca_file().display(),
    ))
    .await
}

// === fixtures: holdfast ===

async fn https_gateway(url: &str, tls: &str, extra: &str) -> Gateway {
    start(&format!(
        "{}{extra}\n[upstream.up.tls]\n{tls}\n",
        proxy_to(url)
    ))
    .await
}

async fn send(gw: &Gateway, req: &ClientRequest) -> Response {
    KeepAliveClient::new(gw.addr)
        .with_timeout(SOON)
        .send(req)
        .await
        .unwrap_or_else(|e| panic!("{} {}: {e}", req.method, req.target))
}

/// Sends `req` through the gateway on a task of its own, as a client that may wait
/// on a gated upstream.
fn spawn_request(
    addr: SocketAddr,
    req: ClientRequest,
) -> tokio::task::JoinHandle<Result<Response, TransportError>> {
    tokio::spawn(async move {
        KeepAliveClient::new(addr)
            .with_timeout(SOON)
            .send(&req)
            .await
    })
}

/// `/pools` for upstream `up`: the upstream and its one address.
async fn pools(gw: &Gateway) -> (serde_json::Value, serde_json::Value) {
    let resp = KeepAliveClient::new(gw.admin)
        .with_timeout(SOON)
        .get("/pools")
        .await
        .expect("GET /pools");
    let all: serde_json::Value = serde_json::from_slice(&resp.body).expect("/pools is JSON");
    let up = all
        .as_array()
        .and_then(|ups| ups.iter().find(|u| u["name"] == "up"))
        .cloned()
        .expect("upstream up in /pools");
    let address = up["addresses"][0].clone();
    (up, address)
}

fn count(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// Sends `requests` from `clients` concurrent clients (one connection each), POSTs
/// without an idempotency key every other time; returns the failures.
async fn load(gw: &Gateway, clients: usize, per_client: usize) -> Vec<String> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let addr = gw.addr;
        tasks.push(tokio::spawn(async move {
            let mut client = KeepAliveClient::new(addr).with_timeout(SOON);
            let mut failed = Vec::new();
            for i in 0..per_client {
                let req = if i % 2 == 0 {
                    ClientRequest::get(format!("/get/{c}/{i}"))
                } else {
                    ClientRequest::post(format!("/post/{c}/{i}"), format!("body {c} {i}"))
                };
                match client.send(&req).await {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => failed.push(format!(
                        "{} {}: {} {:?} {}",
                        req.method,
                        req.target,
                        r.status,
                        r.header("proxy-status"),
                        r.text()
                    )),
                    Err(e) => failed.push(format!("{} {}: {e}", req.method, req.target)),
                }
            }
            failed
        }));
    }
    let mut failed = Vec::new();
    for t in tasks {
        failed.extend(t.await.expect("client task"));
    }
    failed
}

// === fixtures: a hyper HTTP/2 server ===

/// What a test HTTP/2 upstream saw, and the switches a test holds.
#[derive(Default)]
struct H2State {
    connections: AtomicUsize,
    /// Connections that have ended.
    closed: AtomicUsize,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    served: AtomicUsize,
    /// Per connection, streams in flight and the most at once.
    per_conn: std::sync::Mutex<Vec<(Arc<AtomicUsize>, Arc<AtomicUsize>)>>,
    /// Requests wait while this is false (when the server is gated).
    gate: Option<watch::Sender<bool>>,
    /// Notified: every open connection starts a graceful shutdown (GOAWAY).
    goaway: Notify,
}

struct H2Server {
    addr: SocketAddr,
    state: Arc<H2State>,
}

impl H2Server {
    /// An h2c server advertising `max_streams`; with `gated`, requests wait for
    /// [`H2Server::open_gate`].
    async fn start(max_streams: u32, gated: bool) -> H2Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(H2State {
            gate: gated.then(|| watch::channel(false).0),
            ..H2State::default()
        });
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                st.connections.fetch_add(1, Relaxed);
                let conn_counts = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
                st.per_conn.lock().unwrap().push(conn_counts.clone());
                let st = st.clone();
                tokio::spawn(async move {
                    let svc_state = st.clone();
                    let svc =
                        service_fn(move |req| handle(req, svc_state.clone(), conn_counts.clone()));
                    let mut builder =
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    builder.max_concurrent_streams(max_streams);
                    let conn = builder.serve_connection(TokioIo::new(sock), svc);
                    tokio::pin!(conn);
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        () = st.goaway.notified() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                    st.closed.fetch_add(1, Relaxed);
                });
            }
        });
        H2Server { addr, state }
    }

    /// Waits (up to `SOON`) until `n` requests are in flight at the server.
    async fn in_flight_reaches(&self, n: usize) -> bool {
        wait_until(SOON, || self.state.in_flight.load(Relaxed) == n).await
    }

    fn open_gate(&self) {
        if let Some(g) = &self.state.gate {
            g.send_replace(true);
        }
    }
}

/// Counts itself in and out of the in-flight figures.
struct InFlight(Vec<Arc<AtomicUsize>>);

impl InFlight {
    fn enter(counters: Vec<(Arc<AtomicUsize>, Arc<AtomicUsize>)>) -> InFlight {
        let mut held = Vec::new();
        for (now, max) in counters {
            let n = now.fetch_add(1, Relaxed) + 1;
            max.fetch_max(n, Relaxed);
            held.push(now);
        }
        InFlight(held)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        for c in &self.0 {
            c.fetch_sub(1, Relaxed);
        }
    }
}

async fn handle(
    req: hyper::Request<Incoming>,
    st: Arc<H2State>,
    conn: (Arc<AtomicUsize>, Arc<AtomicUsize>),
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let _in = InFlightGlobal::enter(&st, conn);
    if let Some(g) = &st.gate {
        let mut rx = g.subscribe();
        let _ = rx.wait_for(|open| *open).await;
    }
    let method = req.method().clone();
    let version = req.version();
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    st.served.fetch_add(1, Relaxed);
    let text = format!(
        "{method} {version:?} {} bytes\n",
        body.map_or(0, |b| b.len())
    );
    Ok(hyper::Response::new(Full::new(Bytes::from(text))))
}

/// The server-wide and per-connection in-flight counts of one request.
struct InFlightGlobal<'a> {
    st: &'a H2State,
    _conn: InFlight,
}

impl<'a> InFlightGlobal<'a> {
    fn enter(st: &'a H2State, conn: (Arc<AtomicUsize>, Arc<AtomicUsize>)) -> Self {
        let n = st.in_flight.fetch_add(1, Relaxed) + 1;
        st.max_in_flight.fetch_max(n, Relaxed);
        InFlightGlobal {
            st,
            _conn: InFlight::enter(vec![conn]),
        }
    }
}

impl Drop for InFlightGlobal<'_> {
    fn drop(&mut self) {
        self.st.in_flight.fetch_sub(1, Relaxed);
    }
}

// === TLS to nginx ===

/// holdfast → nginx over TLS with a client certificate (mutual TLS) and a name other
/// than the address: GETs work, the connection is reused, nginx saw the certificate.
#[tokio::test]
async fn https_to_nginx_with_a_client_certificate_reuses_its_connection() {
    let pki = TestCa::new("holdfast upstream test CA");
    let server = pki.issue("nginx", &["upstream.test"], false);
    let client = pki.issue("holdfast-client", &[], false);
    let nginx = nginx_tls(
        &pki,
        &server,
        "",
        "if ($ssl_client_verify != SUCCESS) { return 403 \"no client certificate: $ssl_client_verify\\n\"; }\n\
         return 200 \"client $ssl_client_s_dn over $ssl_protocol\\n\";",
    )
    .await;
    let gw = https_gateway(
        &format!("https://127.0.0.1:{}", nginx.port()),
        &format!(
            "ca_file = {}\nserver_name = \"upstream.test\"\nclient_cert = {}\nclient_key = {}",
            toml_path(&pki.ca_file()),
            toml_path(&client.0),
            toml_path(&client.1)
        ),
        "",
    )
    .await;
    let mut c = KeepAliveClient::new(gw.addr).with_timeout(SOON);
    for i in 0..3 {
        let r = c
            .get(&format!("/r{i}"))
            .await
            .expect("GET through holdfast");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            r.text().contains("CN=holdfast-client"),
            "nginx saw holdfast's client certificate: {}",
            r.text()
        );
    }
    let (_, address) = pools(&gw).await;
    assert_eq!(count(&address["created"]), 1, "{address}");
    assert_eq!(count(&address["reused"]), 2, "{address}");
    assert_eq!(count(&address["tls_handshakes"]), 1, "{address}");
}

/// A renewed client certificate written over the same files: a reload with the same
/// config builds a new upstream, so the next request presents the new certificate
/// (not the pooled connection made with the old one).
#[tokio::test]
async fn a_reload_after_the_client_certificate_files_changed_uses_the_new_one() {
    let pki = TestCa::new("holdfast upstream test CA");
    let server = pki.issue("nginx", &["upstream.test"], false);
    let client = pki.issue("client-one", &[], false);
    let nginx = nginx_tls(&pki, &server, "", "return 200 \"$ssl_client_s_dn\\n\";").await;
    let text = format!(
        "{}\n[upstream.up.tls]\nca_file = {}\nserver_name = \"upstream.test\"\n\
         client_cert = {}\nclient_key = {}\n",
        proxy_to(&format!("https://127.0.0.1:{}", nginx.port())),
        toml_path(&pki.ca_file()),
        toml_path(&client.0),
        toml_path(&client.1)
    );
    let gw = start(&text).await;
    let mut c = KeepAliveClient::new(gw.addr).with_timeout(SOON);
    let r = c.get("/before").await.expect("GET");
    assert_eq!(r.text().trim(), "CN=client-one");

    let renewed = pki.issue("client-two", &[], false);
    std::fs::copy(&renewed.0, &client.0).unwrap();
    std::fs::copy(&renewed.1, &client.1).unwrap();
    let full = format!(
        "{text}\n[[listener]]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n"
    );
    let config = holdfast::config::Config::from_toml(&full, Path::new("test.toml")).unwrap();
    gw.send(holdfast::server::Control::Reload(Box::new(config)))
        .await;
    let reloaded = wait_until_async(SOON, || async { gw.state.reloads.load(Relaxed) == 1 }).await;
    assert!(reloaded);
    let r = c.get("/after").await.expect("GET");
    assert_eq!(r.text().trim(), "CN=client-two", "the renewed certificate");
}

/// An HTTPS upstream speaking HTTP/1.1 (`upstream.test`): `POST /upload` is answered
/// 413 at once, before its body is read, and then nothing more is read on that
/// connection; `POST /read` is answered 200 once its body is read; `GET /gzipped`
/// with a gzip transfer coding under chunked; `GET /both` chunked with a Content-Length
/// too; anything else 200. Returns its address and the count of connections accepted.
async fn tls_http1_upstream(pki: &TestCa) -> (SocketAddr, Arc<AtomicUsize>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server(&["upstream.test"], &["http/1.1"]));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let accepts = accepted.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            accepts.fetch_add(1, Relaxed);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(sock).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 16 * 1024];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match tls.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    buf.drain(..end + 4);
                    if head.starts_with("post /upload") {
                        let reply =
                            b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 5\r\n\r\nnope!";
                        let _ = tls.write_all(reply).await;
                        let _ = tls.flush().await;
                        // Reads nothing more, and keeps the connection open.
                        std::future::pending::<()>().await;
                    }
                    if head.starts_with("get /gzipped") {
                        let reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n\
                                      2\r\nok\r\n0\r\n\r\n";
                        let _ = tls.write_all(reply).await;
                        continue;
                    }
                    if head.starts_with("get /both") {
                        // Chunked, and a Content-Length that disagrees.
                        let reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\
                                      content-length: 100\r\n\r\n2\r\nok\r\n0\r\n\r\n";
                        if tls.write_all(reply).await.is_err() || tls.flush().await.is_err() {
                            return;
                        }
                        continue;
                    }
                    if head.starts_with("get /trailers") {
                        let reply = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\
                                      trailer: x-checksum\r\n\r\n\
                                      2\r\nok\r\n0\r\nx-checksum: 42\r\n\r\n";
                        if tls.write_all(reply).await.is_err() || tls.flush().await.is_err() {
                            return;
                        }
                        continue;
                    }
                    let silent = head.starts_with("post /silent");
                    if head.starts_with("post /read") || silent {
                        // Chunked: up to the last chunk (the test's bodies hold no CR).
                        let length = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok());
                        let whole = |buf: &[u8]| match length {
                            Some(n) => (buf.len() >= n).then_some(n),
                            None => buf
                                .windows(7)
                                .position(|w| w == b"\r\n0\r\n\r\n")
                                .map(|p| p + 7),
                        };
                        let length = loop {
                            if let Some(n) = whole(&buf) {
                                break n;
                            }
                            match tls.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        buf.drain(..length);
                        if silent {
                            // Has the whole request, and never answers.
                            std::future::pending::<()>().await;
                        }
                    }
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if tls.write_all(reply).await.is_err() || tls.flush().await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// A gateway to [`tls_http1_upstream`] at `addr` that streams request bodies.
async fn streaming_gateway(pki: &TestCa, addr: SocketAddr) -> Gateway {
    https_gateway(
        &format!("https://127.0.0.1:{}", addr.port()),
        &format!(
            "ca_file = {}\nserver_name = \"upstream.test\"",
            toml_path(&pki.ca_file())
        ),
        "retry.attempts = 1\n",
    )
    .await
}

/// The upstream answers before it has read the request body, then reads nothing more.
/// hyper keeps sending a streamed body after the response has ended, so the connection
/// is not ready for another request until the body is all sent: here never. It must
/// not go back to the pool, where the next request would find it unusable.
#[tokio::test]
async fn a_connection_still_sending_a_streamed_body_is_not_pooled() {
    let pki = TestCa::new("holdfast upstream test CA");
    let (addr, accepted) = tls_http1_upstream(&pki).await;
    let gw = streaming_gateway(&pki, addr).await;

    // A client uploads a chunked body and stops half way; the answer comes anyway.
    let mut uploader = TcpStream::connect(gw.addr).await.unwrap();
    uploader
        .write_all(
            b"POST /upload HTTP/1.1\r\nhost: a.test\r\ntransfer-encoding: chunked\r\n\r\n\
              5\r\nhello\r\n",
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    while !got.ends_with(b"nope!") {
        let n = tokio::time::timeout(SOON, uploader.read(&mut chunk))
            .await
            .expect("the early answer")
            .unwrap();
        assert!(n > 0, "closed before the answer: {got:?}");
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 413"), "{got:?}");

    let resp = KeepAliveClient::new(gw.addr)
        .with_timeout(Duration::from_secs(3))
        .get("/next")
        .await
        .expect("the next request is not held up by the unfinished upload");
    assert_eq!(resp.status, 200);
    assert_eq!(accepted.load(Relaxed), 2, "a connection of its own");
    let (_, pool) = pools(&gw).await;
    assert_eq!(count(&pool["closed"]["not_poolable"]), 1, "{pool}");
    // Pooled, it would be found unusable at the next checkout and taken for one the
    // upstream closed while idle, teaching the pool a wrong idle timeout.
    assert_eq!(count(&pool["stale_caught"]), 0, "{pool}");
    assert_eq!(
        count(&pool["closed"]["closed_by_upstream_idle"]),
        0,
        "{pool}"
    );
}

/// As above, with a body holdfast held whole (kept for a retry, under
/// `replay_body_limit`): hyper takes it in one piece, so no streamed body's end says it
/// is still being sent, yet hyper still has most of it to write when the early answer
/// has been read. The connection is not ready for another request until that is
/// written (here: never). Pooled, the next request took it and waited for hyper up
/// to `timeouts.write`.
#[tokio::test]
async fn a_connection_still_writing_a_body_held_whole_is_not_pooled() {
    let pki = TestCa::new("holdfast upstream test CA");
    let (addr, accepted) = tls_http1_upstream(&pki).await;
    let gw = https_gateway(
        &format!("https://127.0.0.1:{}", addr.port()),
        &format!(
            "ca_file = {}\nserver_name = \"upstream.test\"",
            toml_path(&pki.ca_file())
        ),
        "retry.replay_body_limit = \"16MiB\"\ntimeouts.write = \"30s\"\n",
    )
    .await;
    // More than the socket buffers between holdfast and the upstream hold.
    let body = vec![b'x'; 12 << 20];
    let early = KeepAliveClient::new(gw.addr)
        .with_timeout(SOON)
        .send(&ClientRequest::post("/upload", body))
        .await
        .expect("the early answer");
    assert_eq!(early.status, 413);

    let resp = KeepAliveClient::new(gw.addr)
        .with_timeout(Duration::from_secs(3))
        .get("/next")
        .await
        .expect("the next request is not held up by the body still being written");
    assert_eq!(resp.status, 200);
    assert_eq!(accepted.load(Relaxed), 2, "a connection of its own");
    let (_, pool) = pools(&gw).await;
    assert_eq!(count(&pool["closed"]["not_poolable"]), 1, "{pool}");
    assert_eq!(count(&pool["stale_caught"]), 0, "{pool}");
}

/// A streamed body sent whole before the answer leaves its connection reusable, sized
/// or chunked: hyper asks nothing more of a sized body after its last piece, so the
/// end is noted as that piece is taken.
#[tokio::test]
async fn a_connection_that_sent_its_whole_streamed_body_is_pooled() {
    let pki = TestCa::new("holdfast upstream test CA");
    let (addr, accepted) = tls_http1_upstream(&pki).await;
    let gw = streaming_gateway(&pki, addr).await;
    let body = vec![b'x'; 200 * 1024]; // over the replay limit: streamed either way
    let mut client = KeepAliveClient::new(gw.addr).with_timeout(SOON);
    let sized = client
        .send(&ClientRequest::post("/read", body.clone()))
        .await
        .expect("sized POST");
    assert_eq!(sized.status, 200);
    let chunked = client
        .send(
            &ClientRequest::new("POST", "/read")
                .header("transfer-encoding", "chunked")
                .body(chunked_body(&body)),
        )
        .await
        .expect("chunked POST");
    assert_eq!(chunked.status, 200);
    let (_, pool) = pools(&gw).await;
    assert_eq!(accepted.load(Relaxed), 1, "{pool}");
    assert_eq!(count(&pool["reused"]), 1, "{pool}");
}

/// Sends a POST of `FIRST` bytes and then `PIECES` more pieces, each after a gap of
/// 600 ms (a client slower than a `response_headers` of 1 s, within `body_timeout`),
/// and reads the answer; also gives the time from the body's end to the answer.
async fn slow_upload(gw: &Gateway, target: &str) -> (Response, Duration) {
    const FIRST: usize = 70 * 1024; // over the replay limit: streamed
    const PIECE: usize = 1000;
    const PIECES: usize = 3;
    let mut client = holdfast_test::RawClient::connect(gw.addr)
        .await
        .expect("connect");
    let head = format!(
        "POST {target} HTTP/1.1\r\nhost: a.test\r\ncontent-length: {}\r\n\r\n",
        FIRST + PIECES * PIECE
    );
    client.send(head).await.expect("head");
    client.send(vec![b'x'; FIRST]).await.expect("first part");
    for _ in 0..PIECES {
        // The client's own pace: there is no event to wait for.
        tokio::time::sleep(Duration::from_millis(600)).await;
        client.send(vec![b'y'; PIECE]).await.expect("a piece");
    }
    let ended = tokio::time::Instant::now();
    let resp = client.read_response(SOON).await.expect("an answer");
    (resp, ended.elapsed())
}

/// `timeouts.response_headers` counts from the end of a body streamed from the client
/// over hyper's clients too (HTTPS HTTP/1.1, h2c), as on plain http://: an upload
/// slower than it used to get 504 while it still arrived, timed from its head. An
/// upstream that then says nothing still gets its 504, `response_headers` after the
/// body's end.
#[tokio::test]
async fn a_slow_upload_over_hyper_clients_is_timed_for_its_answer_from_its_end() {
    let timeouts = "[upstream.up.timeouts]\nresponse_headers = \"1s\"\n";
    let pki = TestCa::new("holdfast upstream test CA");
    let (addr, _) = tls_http1_upstream(&pki).await;
    let gw = https_gateway(
        &format!("https://127.0.0.1:{}", addr.port()),
        &format!(
            "ca_file = {}\nserver_name = \"upstream.test\"",
            toml_path(&pki.ca_file())
        ),
        timeouts,
    )
    .await;
    let (resp, _) = slow_upload(&gw, "/read").await;
    assert_eq!(resp.status, 200, "HTTPS: {}", resp.text());
    let (resp, after_end) = slow_upload(&gw, "/silent").await;
    assert_eq!(resp.status, 504, "HTTPS, silent: {}", resp.text());
    assert!(
        after_end >= Duration::from_millis(900),
        "504 {after_end:?} after the body's end, before response_headers"
    );

    let server = H2Server::start(16, false).await;
    let gw = start(&format!(
        "{}{timeouts}",
        proxy_to(&format!("h2c://{}", server.addr))
    ))
    .await;
    let (resp, _) = slow_upload(&gw, "/upload").await;
    assert_eq!(resp.status, 200, "h2c: {}", resp.text());
    assert_eq!(resp.text(), "POST HTTP/2.0 74680 bytes\n");
}

/// A chunked answer with trailers from a TLS upstream (hyper's client) ends with its
/// trailers: hyper's server polls no further after them and drops the body. The
/// connection goes back to the pool, and the request is not logged as a client that
/// went away.
#[tokio::test]
async fn a_response_with_trailers_from_a_tls_upstream_returns_its_connection_to_the_pool() {
    let pki = TestCa::new("holdfast upstream test CA");
    let (addr, accepted) = tls_http1_upstream(&pki).await;
    let gw = streaming_gateway(&pki, addr).await;
    let mut client = KeepAliveClient::new(gw.addr).with_timeout(SOON);
    for _ in 0..2 {
        let r = client
            .send(&ClientRequest::get("/trailers").header("te", "trailers"))
            .await
            .expect("GET /trailers");
        assert_eq!(r.status, 200);
        assert_eq!(&r.body[..], b"ok");
    }
    let (_, pool) = pools(&gw).await;
    assert_eq!(accepted.load(Relaxed), 1, "{pool}");
    assert_eq!(count(&pool["reused"]), 1, "{pool}");
    assert_eq!(count(&pool["closed"]["abandoned"]), 0, "{pool}");
}

/// A response that is chunked and has a Content-Length too: RFC 9112 6.3 says
/// whoever else read the length disagrees about where the message ends, and
/// holdfast's own HTTP/1.1 client closes such a connection; over TLS (hyper's client)
/// it must not go back to the pool either.
#[tokio::test]
async fn a_tls_connection_whose_answer_had_both_length_and_chunks_is_not_pooled() {
    let pki = TestCa::new("holdfast upstream test CA");
    let (addr, accepted) = tls_http1_upstream(&pki).await;
    let gw = streaming_gateway(&pki, addr).await;
    let mut client = KeepAliveClient::new(gw.addr).with_timeout(SOON);
    for i in 0..2 {
        let r = client.get("/both").await.expect("GET /both");
        assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]), "request {i}");
    }
    let (_, pool) = pools(&gw).await;
    assert_eq!(accepted.load(Relaxed), 2, "{pool}");
    assert_eq!(count(&pool["reused"]), 0, "{pool}");
    assert_eq!(
        count(&pool["closed"]["upstream_connection_close"]),
        2,
        "{pool}"
    );
}

/// A body a little over `retry.replay_body_limit` streams, its first part read ahead
/// while deciding whether it could be kept: when that part is the whole body, the
/// body ends as it goes out, and the connection must be pooled as after any body sent
/// whole (hyper asks nothing more of a body that says it has ended).
#[tokio::test]
async fn a_body_read_whole_while_deciding_to_stream_it_leaves_its_connection_pooled() {
    let pki = TestCa::new("holdfast upstream test CA");
    let (addr, accepted) = tls_http1_upstream(&pki).await;
    let gw = https_gateway(
        &format!("https://127.0.0.1:{}", addr.port()),
        &format!(
            "ca_file = {}\nserver_name = \"upstream.test\"",
            toml_path(&pki.ca_file())
        ),
        "[upstream.up.retry]\nreplay_body_limit = \"1KiB\"\n",
    )
    .await;
    // Over the limit, and small enough to arrive with its head in one read.
    let body = vec![b'x'; 1500];
    let mut client = KeepAliveClient::new(gw.addr).with_timeout(SOON);
    for i in 0..2 {
        let resp = client
            .send(&ClientRequest::post("/read", body.clone()))
            .await
            .expect("POST");
        assert_eq!(resp.status, 200, "request {i}");
    }
    let (_, pool) = pools(&gw).await;
    assert_eq!(count(&pool["closed"]["not_poolable"]), 0, "{pool}");
    assert_eq!(accepted.load(Relaxed), 1, "{pool}");
    assert_eq!(count(&pool["reused"]), 1, "{pool}");
}

/// `data` as one chunk and the last chunk.
fn chunked_body(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n0\r\n\r\n");
    out
}

/// A new connection resumes the TLS session of an earlier one (nginx closes each
/// connection after one request), as both sides see it.
#[tokio::test]
async fn new_connections_resume_the_tls_session() {
    let pki = TestCa::new("holdfast upstream test CA");
    let server = pki.issue("nginx", &["localhost"], false);
    let nginx = nginx_tls(
        &pki,
        &server,
        "",
        "keepalive_requests 1; return 200 \"resumed=$ssl_session_reused\\n\";",
    )
    .await;
    let gw = https_gateway(
        &format!("https://localhost:{}", nginx.port()),
        &format!("ca_file = {}", toml_path(&pki.ca_file())),
        "",
    )
    .await;
    let mut seen = Vec::new();
    for i in 0..3 {
        let r = send(&gw, &ClientRequest::get(format!("/s{i}"))).await;
        assert_eq!(r.status, 200, "{}", r.text());
        seen.push(r.text().trim().to_owned());
    }
    let (_, address) = pools(&gw).await;
    assert_eq!(count(&address["tls_handshakes"]), 3, "{address}");
    assert!(
        count(&address["tls_resumed"]) >= 1,
        "a later handshake resumed: {address}"
    );
    assert!(
        seen[1..].iter().any(|s| s == "resumed=r"),
        "nginx saw a resumed session: {seen:?}"
    );
}

/// A certificate for another name, or an expired one: 502 naming the cause, nothing
/// sent to nginx.
#[tokio::test]
async fn wrong_name_or_expired_certificate_is_a_502_naming_the_cause() {
    let pki = TestCa::new("holdfast upstream test CA");
    for (case, names, expired, cause) in [
        (
            "wrong name",
            &["other.test"][..],
            false,
            "not valid for name",
        ),
        ("expired", &["upstream.test"][..], true, "expired"),
    ] {
        let server = pki.issue(&format!("nginx-{}", case.replace(' ', "-")), names, expired);
        let nginx = nginx_tls(&pki, &server, "", "return 200 \"reached\\n\";").await;
        let gw = https_gateway(
            &format!("https://127.0.0.1:{}", nginx.port()),
            &format!(
                "ca_file = {}\nserver_name = \"upstream.test\"",
                toml_path(&pki.ca_file())
            ),
            "",
        )
        .await;
        let r = send(&gw, &ClientRequest::post("/pay", "x")).await;
        assert_eq!(r.status, 502, "{case}: {}", r.text());
        let ps = r.header("proxy-status").unwrap_or_default().to_owned();
        assert!(
            ps.contains("error=tls_certificate_error") && ps.contains(cause),
            "{case}: Proxy-Status names the cause: {ps}"
        );
        assert!(
            ps.contains("request not sent"),
            "{case}: says the request was not sent: {ps}"
        );
        assert!(
            nginx.access_log().is_empty(),
            "{case}: nothing reached nginx: {}",
            nginx.access_log()
        );
    }
}

// === HTTP/2 ===

/// nginx with `http2` over TLS: ALPN picks h2 and fifty concurrent requests share one
/// connection.
#[tokio::test]
async fn alpn_h2_to_nginx_carries_concurrent_requests_on_one_connection() {
    let pki = TestCa::new("holdfast upstream test CA");
    let server = pki.issue("nginx", &["localhost"], false);
    let nginx = nginx_tls(
        &pki,
        &server,
        "http2",
        "return 200 \"$server_protocol\\n\";",
    )
    .await;
    let gw = https_gateway(
        &format!("https://localhost:{}", nginx.port()),
        &format!("ca_file = {}", toml_path(&pki.ca_file())),
        "",
    )
    .await;
    // The first request learns (ALPN) that the address speaks HTTP/2.
    let r = send(&gw, &ClientRequest::get("/first")).await;
    assert_eq!(r.text().trim(), "HTTP/2.0");
    let failed = load(&gw, 50, 4).await;
    assert!(failed.is_empty(), "failed: {failed:?}");
    let (_, address) = pools(&gw).await;
    assert_eq!(count(&address["created"]), 1, "one connection: {address}");
    assert_eq!(count(&address["reused"]), 200, "{address}");
    assert_eq!(address["http2"]["connections"], 1, "{address}");
    let log = nginx.access_log();
    let h2_lines = log.lines().filter(|l| l.ends_with(" HTTP/2.0")).count();
    assert_eq!(h2_lines, 201, "{log}");
}

/// An h2c address that accepts and closes before its SETTINGS (a restarting process, a
/// sidecar whose backend is down) never received a request: like a refused connect, the
/// request goes at once to the other address, whatever its method. Round robin over
/// [closer, good]: four POSTs without a key all succeed, each well within
/// `timeouts.connect` (5 s). The closer half-closes (FIN: holdfast saw "closed before
/// its HTTP/2 SETTINGS", a Protocol error, and answered 502 without a retry) or resets
/// (RST: nothing noticed it, each request waited the whole connect timeout).
#[tokio::test]
async fn h2c_closed_before_settings_is_retried_on_another_address_at_once() {
    for reset in [false, true] {
        let closer = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closer_addr = closer.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        let closer_task = tokio::spawn(async move {
            let mut held = Vec::new();
            // Ends when aborted below.
            while let Ok((mut sock, _)) = closer.accept().await {
                counted.fetch_add(1, Relaxed);
                if reset {
                    let _ = socket2::SockRef::from(&sock).set_linger(Some(Duration::ZERO));
                    drop(sock);
                } else {
                    let _ = sock.shutdown().await;
                    held.push(sock);
                }
            }
        });
        let server = H2Server::start(100, false).await;
        let gw = start(&format!(
            "[[route]]\nupstream = \"up\"\n\n[upstream.up]\n\
             addresses = [\"h2c://{closer_addr}\", \"h2c://{}\"]\n\
             [upstream.up.retry]\nbudget_min_per_second = 1000\n",
            server.addr
        ))
        .await;
        let mut failed = Vec::new();
        for i in 0..4 {
            let began = tokio::time::Instant::now();
            let r = send(&gw, &ClientRequest::post(format!("/p{i}"), "x")).await;
            let took = began.elapsed();
            if r.status != 200 || took > Duration::from_secs(2) {
                failed.push((
                    i,
                    r.status,
                    took,
                    r.header("proxy-status").unwrap_or("").to_owned(),
                ));
            }
        }
        closer_task.abort();
        assert!(
            accepted.load(Relaxed) >= 1,
            "reset={reset}: the closer was tried"
        );
        assert!(
            failed.is_empty(),
            "reset={reset}: failed or slow: {failed:?}"
        );
    }
}

/// A drain closes idle upstream connections (README, Drain), not busy HTTP/2 ones: a
/// request that reaches holdfast during the drain (here on a keep-alive connection
/// opened before it) takes a stream on the shared connection, as before the drain.
/// Before, the drain took every HTTP/2 connection off the list, so each such request
/// needed a connection of its own: with `pool.max_connections` held by the busy one,
/// it waited in the queue for `queue_timeout` and got 503.
#[tokio::test]
async fn a_request_during_a_drain_shares_the_busy_http2_connection() {
    let server = H2Server::start(100, true).await;
    let gw = start(&format!(
        "[drain]\nidle_close_after = \"30s\"\n\n\
         [[route]]\npath = \"/up\"\nupstream = \"up\"\n\n\
         [upstream.up]\naddresses = [\"h2c://{}\"]\n\
         pool.max_connections = 1\npool.max_idle = 1\npool.queue_timeout = \"500ms\"\n",
        server.addr
    ))
    .await;
    // A keep-alive connection opened before the drain (no route: holdfast answers).
    let mut late = KeepAliveClient::new(gw.addr).with_timeout(SOON);
    let r = late.get("/elsewhere").await.expect("response");
    assert_eq!(r.status, 404, "{}", r.text());
    let first = spawn_request(gw.addr, ClientRequest::get("/up/first"));
    assert!(
        server.in_flight_reaches(1).await,
        "the first request reached the upstream"
    );
    gw.send(holdfast::server::Control::Drain).await;
    // The listener closes just before the pools drain, in the same run of the
    // server's task (this runtime has one thread): refused, the pools have drained.
    let closed = wait_until_async(SOON, || async {
        TcpStream::connect(gw.addr).await.is_err()
    })
    .await;
    assert!(closed, "the drain closed the listener");
    let second = tokio::spawn(async move { late.send(&ClientRequest::get("/up/second")).await });
    let shared = server.in_flight_reaches(2).await;
    server.open_gate();
    let r = second.await.unwrap().expect("response");
    assert!(
        shared,
        "the request during the drain reached the upstream: {} {:?} {}",
        r.status,
        r.header("proxy-status"),
        r.text()
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(first.await.unwrap().expect("response").status, 200);
    assert_eq!(server.state.connections.load(Relaxed), 1, "one connection");
    assert_eq!(gw.drain().await.cut, 0);
}

/// `/pools` shows, for an HTTP/2 address, the idle timeout its shared connections
/// keep to: `http2.idle_timeout`, not `pool.idle_timeout` (HTTP/1 keep-alive), which
/// `effective_idle_timeout` shows and which does not apply to them.
#[tokio::test]
async fn pools_shows_the_idle_timeout_in_force_for_http2_connections() {
    let server = H2Server::start(100, false).await;
    let config = format!(
        "{}http2.idle_timeout = \"7s\"\npool.idle_timeout = \"3s\"\n",
        proxy_to(&format!("h2c://{}", server.addr))
    );
    let gw = start(&config).await;
    let r = KeepAliveClient::new(gw.addr)
        .with_timeout(SOON)
        .get("/")
        .await
        .expect("response");
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, address) = pools(&gw).await;
    assert_eq!(address["http2"]["connections"], 1, "{address}");
    assert_eq!(address["http2"]["idle_timeout"], 7.0, "{address}");
}

/// A request on an HTTP/2 connection off the list (here retired as its one stream
/// under `pool.max_requests = 1` was leased; a GOAWAY or a drain does the same) is in
/// use until it ends: `/pools` counts it in `in_use`, as `open` counts its connection.
#[tokio::test]
async fn pools_counts_streams_on_a_retired_http2_connection_in_use() {
    let server = H2Server::start(100, true).await;
    let config = format!(
        "{}pool.max_requests = 1\n",
        proxy_to(&format!("h2c://{}", server.addr))
    );
    let gw = start(&config).await;
    let request = spawn_request(gw.addr, ClientRequest::get("/held"));
    assert!(
        server.in_flight_reaches(1).await,
        "the request reached the upstream"
    );
    let (_, address) = pools(&gw).await;
    assert_eq!(address["open"], 1, "{address}");
    assert_eq!(address["in_use"], 1, "{address}");
    server.open_gate();
    let r = request.await.unwrap().expect("response");
    assert_eq!(r.status, 200, "{}", r.text());
    let settled = wait_until_async(SOON, || async {
        let (_, a) = pools(&gw).await;
        a["open"] == 0 && a["in_use"] == 0
    })
    .await;
    let (_, address) = pools(&gw).await;
    assert!(settled, "closed and no longer in use: {address}");
}

/// The upstream advertises 2 streams: of 10 concurrent requests, 2 are in flight at
/// the upstream and 8 wait in holdfast's queue; all succeed, on one connection.
#[tokio::test]
async fn max_concurrent_streams_is_respected_and_the_rest_wait_in_the_queue() {
    let server = H2Server::start(2, true).await;
    let gw = start(&proxy_to(&format!("h2c://{}", server.addr))).await;
    let addr = gw.addr;
    let clients: Vec<_> = (0..10)
        .map(|i| spawn_request(addr, ClientRequest::post(format!("/q{i}"), "x")))
        .collect();
    let queued = wait_until_async(SOON, || async {
        let (_, a) = pools(&gw).await;
        server.state.in_flight.load(Relaxed) == 2 && a["waiting"] == 8
    })
    .await;
    let (_, address) = pools(&gw).await;
    assert!(
        queued,
        "2 in flight at the upstream ({}), 8 waiting: {address}",
        server.state.in_flight.load(Relaxed)
    );
    assert_eq!(address["http2"]["max_streams"], 2, "{address}");
    server.open_gate();
    for c in clients {
        let r = c.await.unwrap().expect("response");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(server.state.max_in_flight.load(Relaxed), 2);
    assert_eq!(server.state.connections.load(Relaxed), 1);
    let (_, address) = pools(&gw).await;
    assert_eq!(count(&address["created"]), 1, "{address}");
}

/// With `http2.connections = 2`, requests beyond one connection's streams go to a
/// second connection instead of waiting.
#[tokio::test]
async fn requests_beyond_a_connections_streams_go_to_another_connection() {
    let server = H2Server::start(2, true).await;
    let gw = start(&format!(
        "{}\n[upstream.up.http2]\nconnections = 2\n",
        proxy_to(&format!("h2c://{}", server.addr))
    ))
    .await;
    let addr = gw.addr;
    let clients: Vec<_> = (0..4)
        .map(|i| spawn_request(addr, ClientRequest::get(format!("/c{i}"))))
        .collect();
    let spread = server.in_flight_reaches(4).await;
    assert!(
        spread,
        "4 in flight at once: {}",
        server.state.in_flight.load(Relaxed)
    );
    server.open_gate();
    for c in clients {
        assert_eq!(c.await.unwrap().expect("response").status, 200);
    }
    assert_eq!(server.state.connections.load(Relaxed), 2);
    let per_conn: Vec<usize> = server
        .state
        .per_conn
        .lock()
        .unwrap()
        .iter()
        .map(|(_, max)| max.load(Relaxed))
        .collect();
    assert_eq!(per_conn, vec![2, 2], "2 streams on each connection");
}

/// With `http2.connections = 2`, a request finding the one open connection busy opens
/// the second rather than pile onto the first, even with streams to spare.
#[tokio::test]
async fn busy_connections_spread_over_the_configured_count() {
    let server = H2Server::start(100, true).await;
    let gw = start(&format!(
        "{}\n[upstream.up.http2]\nconnections = 2\n",
        proxy_to(&format!("h2c://{}", server.addr))
    ))
    .await;
    let addr = gw.addr;
    let first = spawn_request(addr, ClientRequest::get("/a"));
    let started = server.in_flight_reaches(1).await;
    assert!(started, "the first request reached the upstream");
    let second = spawn_request(addr, ClientRequest::get("/b"));
    let both = server.in_flight_reaches(2).await;
    assert!(both, "the second request reached the upstream");
    server.open_gate();
    assert_eq!(first.await.unwrap().expect("response").status, 200);
    assert_eq!(second.await.unwrap().expect("response").status, 200);
    assert_eq!(
        server.state.connections.load(Relaxed),
        2,
        "one request on each"
    );
}

/// `pool.max_connections` bounds the open connections of an HTTP/2 address too: with
/// `http2.connections = 2` but `max_connections = 1`, a request finding the one
/// connection's streams all taken waits for a stream rather than open a second.
#[tokio::test]
async fn http2_connections_stay_within_max_connections() {
    let server = H2Server::start(1, true).await;
    let gw = start(&format!(
        "{}\n[upstream.up.pool]\nmax_connections = 1\nmax_idle = 1\n\
         [upstream.up.http2]\nconnections = 2\n",
        proxy_to(&format!("h2c://{}", server.addr))
    ))
    .await;
    let addr = gw.addr;
    let first = spawn_request(addr, ClientRequest::get("/a"));
    let started = server.in_flight_reaches(1).await;
    assert!(started, "the first request reached the upstream");
    let second = spawn_request(addr, ClientRequest::get("/b"));
    let settled = wait_until_async(SOON, || async {
        server.state.connections.load(Relaxed) > 1 || pools(&gw).await.1["waiting"] == 1
    })
    .await;
    assert!(settled, "the second request waits or connects");
    assert_eq!(
        server.state.connections.load(Relaxed),
        1,
        "no connection beyond max_connections"
    );
    server.open_gate();
    assert_eq!(first.await.unwrap().expect("response").status, 200);
    assert_eq!(second.await.unwrap().expect("response").status, 200);
    assert_eq!(server.state.connections.load(Relaxed), 1);
}

/// A connection the upstream sent GOAWAY on is still open while its streams finish,
/// so it still counts under `pool.max_connections`: with `max_connections = 1` and
/// its one stream in flight, the next request waits for it to end rather than open a
/// second connection, then opens one.
#[tokio::test]
async fn a_connection_going_away_counts_under_max_connections_until_its_streams_end() {
    let server = H2Server::start(100, true).await;
    let gw = start(&format!(
        "{}\n[upstream.up.pool]\nmax_connections = 1\nmax_idle = 1\n",
        proxy_to(&format!("h2c://{}", server.addr))
    ))
    .await;
    let addr = gw.addr;
    let first = spawn_request(addr, ClientRequest::get("/a"));
    let started = server.in_flight_reaches(1).await;
    assert!(started, "the first request reached the upstream");
    server.state.goaway.notify_waiters();
    let seen = wait_until_async(SOON, || async {
        count(&pools(&gw).await.1["closed"]["goaway"]) == 1
    })
    .await;
    assert!(seen, "the GOAWAY was seen: {:#}", pools(&gw).await.1);
    let second = spawn_request(addr, ClientRequest::get("/b"));
    let settled = wait_until_async(SOON, || async {
        server.state.connections.load(Relaxed) > 1 || pools(&gw).await.1["waiting"] == 1
    })
    .await;
    assert!(settled, "the second request waits or connects");
    let (_, address) = pools(&gw).await;
    assert_eq!(
        server.state.connections.load(Relaxed),
        1,
        "no second connection while the first is open: {address:#}"
    );
    assert_eq!(count(&address["open"]), 1, "{address:#}");
    server.open_gate();
    assert_eq!(first.await.unwrap().expect("response").status, 200);
    let r = second.await.unwrap().expect("response");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(server.state.connections.load(Relaxed), 2);
}

/// A request that gave up waiting for a stream (`queue_timeout`) is no longer counted
/// as waiting in `/pools`, though nothing else happened on the pool since.
#[tokio::test]
async fn a_request_that_stopped_waiting_for_a_stream_is_not_counted_waiting() {
    let server = H2Server::start(1, true).await;
    let gw = start(&format!(
        "{}\n[upstream.up.pool]\nqueue_timeout = \"200ms\"\n",
        proxy_to(&format!("h2c://{}", server.addr))
    ))
    .await;
    let addr = gw.addr;
    let first = spawn_request(addr, ClientRequest::get("/a"));
    let started = server.in_flight_reaches(1).await;
    assert!(started, "the first request reached the upstream");
    let r = send(&gw, &ClientRequest::get("/b")).await;
    assert_eq!(r.status, 503, "{}", r.text());
    let (_, address) = pools(&gw).await;
    assert_eq!(count(&address["queue_timeouts"]), 1, "{address}");
    assert_eq!(count(&address["waiting"]), 0, "{address}");
    server.open_gate();
    assert_eq!(first.await.unwrap().expect("response").status, 200);
}

/// `pool.max_requests = 3` on an HTTP/2 upstream: the connection takes three streams
/// and no more (a fourth request opens another connection rather than wait for it or
/// be refused by it), finishes the three, then closes.
#[tokio::test]
async fn an_http2_connection_retires_at_max_requests_after_its_streams_finish() {
    let server = H2Server::start(100, true).await;
    let gw = start(&format!(
        "{}
[upstream.up.pool]
max_requests = 3
",
        proxy_to(&format!("h2c://{}", server.addr))
    ))
    .await;
    let addr = gw.addr;
    let get = move |i: usize| spawn_request(addr, ClientRequest::get(format!("/r{i}")));
    let mut clients: Vec<_> = (0..3).map(get).collect();
    let three = server.in_flight_reaches(3).await;
    assert!(three, "three requests in flight at the upstream");
    assert_eq!(server.state.connections.load(Relaxed), 1);
    clients.push(get(3));
    let four = server.in_flight_reaches(4).await;
    assert!(four, "the fourth request reached the upstream");
    assert_eq!(
        server.state.connections.load(Relaxed),
        2,
        "the fourth request went to a new connection"
    );
    assert_eq!(
        server.state.closed.load(Relaxed),
        0,
        "no connection closed yet"
    );
    server.open_gate();
    for c in clients {
        let r = c.await.unwrap().expect("response");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let closed = wait_until(SOON, || server.state.closed.load(Relaxed) == 1).await;
    assert!(
        closed,
        "the first connection closed once its three streams ended"
    );
    let (_, address) = pools(&gw).await;
    assert_eq!(count(&address["closed"]["max_requests"]), 1, "{address:#}");
}

/// `pool.max_lifetime` on an HTTP/2 upstream: a connection past it takes no new
/// stream, but the one in flight finishes; then it closes and the next request opens
/// another.
#[tokio::test]
async fn an_http2_connection_retires_at_max_lifetime_without_cutting_its_stream() {
    let server = H2Server::start(100, true).await;
    let gw = start(&format!(
        "{}
[upstream.up.pool]
max_lifetime = \"300ms\"
",
        proxy_to(&format!("h2c://{}", server.addr))
    ))
    .await;
    let addr = gw.addr;
    let first = spawn_request(addr, ClientRequest::get("/long"));
    let started = server.in_flight_reaches(1).await;
    assert!(started, "the first request reached the upstream");
    // The reaper takes it off the list at 300 ms, with its stream still in flight.
    let retired = wait_until_async(SOON, || async {
        count(&pools(&gw).await.1["closed"]["lifetime"]) == 1
    })
    .await;
    assert!(retired, "retired at max_lifetime: {:#}", pools(&gw).await.1);
    assert_eq!(
        server.state.closed.load(Relaxed),
        0,
        "its stream is still in flight"
    );
    server.open_gate();
    let r = first.await.unwrap().expect("response");
    assert_eq!(r.status, 200, "the stream in flight finished: {}", r.text());
    let closed = wait_until(SOON, || server.state.closed.load(Relaxed) == 1).await;
    assert!(closed, "the retired connection closed after its stream");
    let r = send(&gw, &ClientRequest::get("/next")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        server.state.connections.load(Relaxed),
        2,
        "the next request opened another"
    );
}

/// `http2.idle_timeout`: an HTTP/2 connection with no stream in flight that long
/// closes; a busy one does not.
#[tokio::test]
async fn an_idle_http2_connection_closes_after_its_idle_timeout() {
    let server = H2Server::start(100, true).await;
    let gw = start(&format!(
        "{}
[upstream.up.http2]
idle_timeout = \"300ms\"
",
        proxy_to(&format!("h2c://{}", server.addr))
    ))
    .await;
    let addr = gw.addr;
    let busy = spawn_request(addr, ClientRequest::get("/busy"));
    let started = server.in_flight_reaches(1).await;
    assert!(started, "the request reached the upstream");
    // Busy for well past the idle timeout: the connection stays.
    let closed_while_busy = wait_until(Duration::from_millis(900), || {
        server.state.closed.load(Relaxed) > 0
    })
    .await;
    assert!(
        !closed_while_busy,
        "a connection with a stream in flight is not idle"
    );
    // Nor retired: a second request takes a stream on it.
    let second = spawn_request(addr, ClientRequest::get("/second"));
    let both = server.in_flight_reaches(2).await;
    assert!(both, "the second request reached the upstream");
    assert_eq!(
        server.state.connections.load(Relaxed),
        1,
        "on the busy connection"
    );
    server.open_gate();
    assert_eq!(busy.await.unwrap().expect("response").status, 200);
    assert_eq!(second.await.unwrap().expect("response").status, 200);
    let closed = wait_until(SOON, || server.state.closed.load(Relaxed) == 1).await;
    assert!(closed, "closed once idle for 300 ms");
    let (_, address) = pools(&gw).await;
    assert_eq!(count(&address["closed"]["idle_expired"]), 1, "{address:#}");
    let r = send(&gw, &ClientRequest::get("/again")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(server.state.connections.load(Relaxed), 2);
}

/// The upstream shuts its connection down gracefully (GOAWAY) in the middle of a load
/// of GETs and POSTs without idempotency keys: no request fails, later ones go to a
/// new connection.
#[tokio::test]
async fn graceful_goaway_in_the_middle_of_a_load_fails_no_request() {
    let server = H2Server::start(100, false).await;
    let gw = start(&proxy_to(&format!("h2c://{}", server.addr))).await;
    let state = server.state.clone();
    let trigger = tokio::spawn(async move {
        let started = wait_until_async(SOON, || async { state.served.load(Relaxed) >= 150 }).await;
        state.goaway.notify_waiters();
        started
    });
    let failed = load(&gw, 16, 40).await;
    assert!(trigger.await.unwrap(), "the load reached the GOAWAY point");
    assert!(failed.is_empty(), "failed: {failed:?}");
    assert!(server.state.connections.load(Relaxed) >= 2);
    let (_, address) = pools(&gw).await;
    assert!(
        count(&address["closed"]["goaway"]) >= 1,
        "the GOAWAY was seen: {address}"
    );
}

/// A raw HTTP/2 upstream takes four POSTs (no idempotency key) on one connection, then
/// sends GOAWAY with the first one's stream as the last it processes, answers it and
/// closes. The other three were refused, so holdfast sends them again on a new
/// connection: every client gets 200.
#[tokio::test]
async fn posts_above_the_goaway_last_stream_id_are_retried_on_a_new_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let second_conn_requests = Arc::new(AtomicUsize::new(0));
    let seen = second_conn_requests.clone();
    tokio::spawn(async move {
        let (first, _) = listener.accept().await.unwrap();
        tokio::spawn(goaway_after(first, 4));
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(answer_all(sock, seen.clone()));
        }
    });
    let gw = start(&proxy_to(&format!("h2c://{addr}"))).await;
    let clients: Vec<_> = (0..4)
        .map(|i| {
            let addr = gw.addr;
            spawn_request(addr, ClientRequest::post(format!("/pay/{i}"), "charge"))
        })
        .collect();
    for c in clients {
        let r = c.await.unwrap().expect("response");
        assert_eq!(r.status, 200, "{} {:?}", r.text(), r.header("proxy-status"));
    }
    assert_eq!(second_conn_requests.load(Relaxed), 3, "three sent again");
    let (up, address) = pools(&gw).await;
    assert_eq!(count(&up["retries"]["refused_stream"]), 3, "{up}");
    assert_eq!(count(&address["created"]), 2, "{address}");
}

/// Reads the client preface; answers SETTINGS and PING; yields each HEADERS frame.
async fn h2_server_frames(sock: &mut TcpStream) -> Option<Frame> {
    loop {
        let f = frames::read_frame(sock).await.ok()??;
        if f.is(kind::SETTINGS) && !f.has(flag::ACK) {
            frames::send(sock, &[frames::settings_ack()]).await.ok()?;
        } else if f.is(kind::PING) && !f.has(flag::ACK) {
            frames::send(sock, &[frames::ping_ack(&f.payload)])
                .await
                .ok()?;
        } else if f.is(kind::HEADERS) {
            return Some(f);
        }
    }
}

async fn server_preface(sock: &mut TcpStream) -> Option<()> {
    let mut preface = [0u8; 24];
    sock.read_exact(&mut preface).await.ok()?;
    assert_eq!(&preface[..], frames::PREFACE);
    frames::send(sock, &[frames::settings()]).await.ok()
}

/// `:status: 200` (static table index 8), ending the stream.
fn ok_200(stream: u32) -> Frame {
    Frame {
        kind: kind::HEADERS,
        flags: flag::END_HEADERS | flag::END_STREAM,
        stream,
        payload: vec![0x88],
    }
}

async fn goaway_after(mut sock: TcpStream, n: usize) -> Option<()> {
    server_preface(&mut sock).await?;
    let mut streams = Vec::new();
    while streams.len() < n {
        streams.push(h2_server_frames(&mut sock).await?.stream);
    }
    let last = streams[0];
    let mut goaway = last.to_be_bytes().to_vec();
    goaway.extend(0u32.to_be_bytes());
    let goaway = Frame {
        kind: kind::GOAWAY,
        flags: 0,
        stream: 0,
        payload: goaway,
    };
    frames::send(&mut sock, &[goaway, ok_200(last)])
        .await
        .ok()?;
    // Let the client see both before the close.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(500), sock.read_to_end(&mut rest)).await;
    sock.shutdown().await.ok()
}

async fn answer_all(mut sock: TcpStream, seen: Arc<AtomicUsize>) -> Option<()> {
    server_preface(&mut sock).await?;
    loop {
        let f = h2_server_frames(&mut sock).await?;
        seen.fetch_add(1, Relaxed);
        frames::send(&mut sock, &[ok_200(f.stream)]).await.ok()?;
    }
}

/// A connection that stops answering (every byte held by a frozen relay) is found by
/// PING and closed; the next request opens a new connection and succeeds.
#[tokio::test]
async fn an_unanswered_ping_closes_the_connection_and_the_next_request_opens_another() {
    let server = H2Server::start(100, false).await;
    let relay = Relay::start(server.addr).await;
    let gw = start(&format!(
        "{}\n[upstream.up.http2]\nping_interval = \"200ms\"\nping_timeout = \"300ms\"\n\
         [upstream.up.timeouts]\nresponse_headers = \"3s\"\n",
        proxy_to(&format!("h2c://{}", relay.addr))
    ))
    .await;
    assert_eq!(send(&gw, &ClientRequest::get("/one")).await.status, 200);
    relay.freeze_existing();
    let closed = wait_until_async(SOON, || async {
        let (_, a) = pools(&gw).await;
        a["closed"]["error"] == 1 && a["http2"]["connections"] == 0
    })
    .await;
    let (_, address) = pools(&gw).await;
    assert!(closed, "the silent connection left the pool: {address}");
    let r = send(&gw, &ClientRequest::post("/two", "x")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, address) = pools(&gw).await;
    assert_eq!(count(&address["created"]), 2, "{address}");
}

/// A TCP relay whose existing connections can be frozen: bytes stop in both
/// directions, sockets stay open.
struct Relay {
    addr: SocketAddr,
    frozen: Arc<std::sync::Mutex<Vec<watch::Sender<bool>>>>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frozen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let list = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(target).await else {
                    continue;
                };
                let (tx, rx) = watch::channel(false);
                list.lock().unwrap().push(tx);
                let (cr, cw) = client.into_split();
                let (ur, uw) = upstream.into_split();
                tokio::spawn(pump(cr, uw, rx.clone()));
                tokio::spawn(pump(ur, cw, rx));
            }
        });
        Relay { addr, frozen }
    }

    fn freeze_existing(&self) {
        for f in self.frozen.lock().unwrap().iter() {
            f.send_replace(true);
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = frozen.wait_for(|f| *f) => break,
        };
        if *frozen.borrow() {
            break;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    // Frozen: hold both halves open, moving nothing, until the test ends.
    std::future::pending::<()>().await;
    drop((from, to));
}

// === HTTP/2 request bodies and stream accounting ===

/// An h2c upstream advertising `max_streams` that answers `POST /early` at once,
/// without reading its body: the body is kept (not dropped, so the stream stays open
/// for the rest of the upload, as a server that answers early and still reads on
/// does). Every other request is read whole and answered. `goaway` starts a graceful
/// shutdown of every open connection.
struct EarlyServer {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
    goaway: Arc<Notify>,
}

async fn early_answer_server(max_streams: u32) -> EarlyServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let goaway = Arc::new(Notify::new());
    let kept: Arc<std::sync::Mutex<Vec<Incoming>>> = Arc::default();
    let (conns, srv, ga) = (connections.clone(), served.clone(), goaway.clone());
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            conns.fetch_add(1, Relaxed);
            let (kept, srv, ga) = (kept.clone(), srv.clone(), ga.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<Incoming>| {
                    let (kept, srv) = (kept.clone(), srv.clone());
                    async move {
                        if req.uri().path() == "/early" {
                            kept.lock().unwrap().push(req.into_body());
                            return Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"early\n"),
                            )));
                        }
                        let _ = req.into_body().collect().await;
                        srv.fetch_add(1, Relaxed);
                        Ok(hyper::Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                    }
                });
                let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                builder.max_concurrent_streams(max_streams);
                let conn = builder.serve_connection(TokioIo::new(sock), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    () = ga.notified() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
    });
    EarlyServer {
        addr,
        connections,
        served,
        goaway,
    }
}

/// A client that starts a `POST /early` with a 100 KB body, sends 4 KiB of it, reads
/// the early answer and keeps its connection (and so the upload) open.
async fn early_answered_upload(gw: &Gateway) -> holdfast_test::RawClient {
    let mut c = holdfast_test::RawClient::connect(gw.addr).await.unwrap();
    c.send(b"POST /early HTTP/1.1\r\nHost: up\r\nContent-Length: 100000\r\n\r\n")
        .await
        .unwrap();
    c.send(vec![b'u'; 4096]).await.unwrap();
    let r = c
        .read_response_for("POST", SOON)
        .await
        .expect("early answer");
    assert_eq!(r.status, 200, "{}", r.text());
    c
}

/// holdfast gives a stream back to its connection when the response ends, but hyper
/// goes on sending the request body after an early answer: the stream is still open
/// and counts against the upstream's SETTINGS_MAX_CONCURRENT_STREAMS. With a limit of
/// 1 and `http2.connections = 2`, the next request must go to a second connection;
/// it is leased on the first one (holdfast counts no stream there), where h2 holds it
/// as pending-open until `response_headers` (504). The client speaks HTTP/2 too, so
/// its upload stays open after the answer, as gRPC client streams do.
#[tokio::test]
async fn a_stream_still_uploading_after_an_early_answer_counts_against_max_streams() {
    use futures_util::StreamExt;
    use http_body_util::{Empty, StreamBody};
    let server = early_answer_server(1).await;
    let gw = start(&format!(
        "{}retry.attempts = 1
[upstream.up.http2]
connections = 2
         [upstream.up.timeouts]
response_headers = \"3s\"
         [[listener]]
listen = \"127.0.0.1:0\"
h2c = true
",
        proxy_to(&format!("h2c://{}", server.addr))
    ))
    .await;
    let io = TokioIo::new(TcpStream::connect(gw.addr).await.unwrap());
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
        .await
        .expect("h2c handshake");
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(hyper::body::Frame::data(b)), rx))
    });
    let upload = hyper::Request::post(format!("http://{}/early", gw.addr))
        .body(StreamBody::new(chunks.boxed()))
        .unwrap();
    tx.send(Bytes::from(vec![b'u'; 4096])).await.unwrap();
    let mut upload_send = send.clone();
    let early = tokio::time::timeout(SOON, upload_send.send_request(upload))
        .await
        .expect("early answer in time")
        .expect("early answer");
    assert_eq!(early.status(), 200);
    let _ = early.into_body().collect().await;
    // The upload goes on (tx is kept); the next request:
    let get = hyper::Request::get(format!("http://{}/next", gw.addr))
        .body(StreamBody::new(
            Empty::<Bytes>::new()
                .into_data_stream()
                .map(|r| r.map(hyper::body::Frame::data))
                .boxed(),
        ))
        .unwrap();
    let t = tokio::time::Instant::now();
    let r = tokio::time::timeout(SOON, send.send_request(get))
        .await
        .expect("in time")
        .expect("response");
    let status = r.status();
    let text = r
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    assert_eq!(
        status,
        200,
        "after {:?}: {text:?}; upstream connections: {}",
        t.elapsed(),
        server.connections.load(Relaxed)
    );
    assert_eq!(server.served.load(Relaxed), 1);
    drop(tx);
}

/// A request that h2 holds as pending-open (never written: no stream id was sent) when
/// the upstream's graceful GOAWAY arrives is dropped by hyper's dispatch task, which
/// answers "dispatch task is gone"; holdfast classifies that as sent-maybe, so a POST
/// gets 502 "request sent, no response" instead of being sent again on a new
/// connection.
#[tokio::test]
async fn a_pending_open_post_is_retried_after_a_goaway() {
    let server = early_answer_server(1).await;
    let gw = start(&format!(
        "{}retry.replay_body_limit = \"1KiB\"\n\
         [upstream.up.timeouts]\nresponse_headers = \"5s\"\n",
        proxy_to(&format!("h2c://{}", server.addr))
    ))
    .await;
    let _upload = early_answered_upload(&gw).await;
    let post = spawn_request(gw.addr, ClientRequest::post("/pay", "charge"));
    let leased = wait_until_async(SOON, || async {
        pools(&gw).await.1["http2"]["streams"] == 1
    })
    .await;
    assert!(leased, "the POST took a stream: {}", pools(&gw).await.1);
    assert_eq!(
        server.served.load(Relaxed),
        0,
        "the POST did not reach the upstream"
    );
    server.goaway.notify_waiters();
    let r = post.await.unwrap().expect("response");
    assert_eq!(r.status, 200, "{} {:?}", r.text(), r.header("proxy-status"));
    assert_eq!(server.served.load(Relaxed), 1);
}

/// A streamed request body over `max_body_bytes` to an HTTP/2 upstream: the client gets
/// 413, as with HTTP/1 upstreams, not 502.
#[tokio::test]
async fn an_oversized_streamed_body_to_an_http2_upstream_gets_413() {
    let server = H2Server::start(100, false).await;
    let gw = start(&format!(
        "{}retry.attempts = 1\n[[listener]]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = \"1KiB\"\n",
        proxy_to(&format!("h2c://{}", server.addr))
    ))
    .await;
    let mut body = Vec::new();
    for chunk in vec![b'x'; 4096].chunks(512) {
        body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        body.extend_from_slice(chunk);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let req = ClientRequest::new("POST", "/big")
        .header("transfer-encoding", "chunked")
        .body(body);
    let r = send(&gw, &req).await;
    assert_eq!(r.status, 413, "{} {:?}", r.text(), r.header("proxy-status"));
}

/// Serves an upstream connection whose first SETTINGS allow no stream at all
/// (SETTINGS_MAX_CONCURRENT_STREAMS = 0) and never raise it: counts the HEADERS it
/// gets, answers nothing, keeps the connection open.
async fn no_streams_allowed(mut sock: TcpStream, headers: Arc<AtomicUsize>) -> Option<()> {
    let mut preface = [0u8; 24];
    sock.read_exact(&mut preface).await.ok()?;
    let mut p = 3u16.to_be_bytes().to_vec();
    p.extend(0u32.to_be_bytes());
    let zero = Frame {
        kind: kind::SETTINGS,
        flags: 0,
        stream: 0,
        payload: p,
    };
    frames::send(&mut sock, &[zero]).await.ok()?;
    loop {
        let f = h2_server_frames(&mut sock).await?;
        headers.fetch_add(1, Relaxed);
        drop(f);
    }
}

/// An upstream connection whose first SETTINGS allow no stream (MAX_CONCURRENT_STREAMS
/// = 0) cannot carry the request that opened it: the POST is not sent there (h2 would
/// hold it pending-open until `response_headers`), it is retried at once as never
/// sent, on a new connection that takes it.
#[tokio::test]
async fn a_connection_allowing_no_streams_sends_nothing_and_the_request_is_retried() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let zero_headers = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let (zh, seen) = (zero_headers.clone(), answered.clone());
    tokio::spawn(async move {
        let (first, _) = listener.accept().await.unwrap();
        tokio::spawn(no_streams_allowed(first, zh));
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(answer_all(sock, seen.clone()));
        }
    });
    // Longer than the client waits: a request held until it would fail the test.
    let gw = start(&format!(
        "{}[upstream.up.timeouts]\nresponse_headers = \"60s\"\n",
        proxy_to(&format!("h2c://{addr}"))
    ))
    .await;
    let r = send(&gw, &ClientRequest::post("/pay", "charge")).await;
    assert_eq!(r.status, 200, "{} {:?}", r.text(), r.header("proxy-status"));
    assert_eq!(
        answered.load(Relaxed),
        1,
        "sent once, on the second connection"
    );
    assert_eq!(zero_headers.load(Relaxed), 0, "nothing sent on the first");
}

/// An HTTP/2 connection still being opened when a reload removes its upstream
/// finishes the request that opened it and then closes, while another request keeps
/// the drained pool alive, rather than stay open until its idle timeout.
#[tokio::test]
async fn an_http2_connection_opened_after_its_pool_drained_closes_when_its_stream_ends() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Notify::new());
    let accepted = Arc::new(Notify::new());
    let settings_go = Arc::new(Notify::new());
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    let (hd, acc, go) = (held.clone(), accepted.clone(), settings_go.clone());
    tokio::spawn(async move {
        // The first connection takes one stream at a time and never answers it.
        let (mut first, _) = listener.accept().await.unwrap();
        tokio::spawn(async move {
            let mut preface = [0u8; 24];
            first.read_exact(&mut preface).await.ok()?;
            let mut p = 3u16.to_be_bytes().to_vec();
            p.extend(1u32.to_be_bytes());
            let one = Frame {
                kind: kind::SETTINGS,
                flags: 0,
                stream: 0,
                payload: p,
            };
            frames::send(&mut first, &[one]).await.ok()?;
            h2_server_frames(&mut first).await?;
            hd.notify_one();
            while let Ok(Some(_)) = frames::read_frame(&mut first).await {}
            Some(())
        });
        // The second one sends its SETTINGS only once the pool is draining.
        let (mut sock, _) = listener.accept().await.unwrap();
        acc.notify_one();
        go.notified().await;
        server_preface(&mut sock).await?;
        let f = h2_server_frames(&mut sock).await?;
        frames::send(&mut sock, &[ok_200(f.stream)]).await.ok()?;
        // Then read until holdfast closes the connection.
        while let Ok(Some(_)) = frames::read_frame(&mut sock).await {}
        closed_tx.send(()).ok()
    });
    let other = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_addr = other.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = other.accept().await {
            tokio::spawn(answer_all(sock, Arc::default()));
        }
    });
    let gw = start(&format!(
        "{}[upstream.up.http2]\nconnections = 2\n",
        proxy_to(&format!("h2c://{addr}"))
    ))
    .await;
    // Outlives the test's waits: it keeps the pool alive after the reload.
    let addr = gw.addr;
    let _long = tokio::spawn(async move {
        KeepAliveClient::new(addr)
            .with_timeout(SOON * 6)
            .send(&ClientRequest::get("/long"))
            .await
    });
    let taken = tokio::time::timeout(SOON, held.notified()).await;
    assert!(
        taken.is_ok(),
        "the first request holds the first connection"
    );
    let req = spawn_request(gw.addr, ClientRequest::post("/pay", "charge"));
    let opening = tokio::time::timeout(SOON, accepted.notified()).await;
    assert!(opening.is_ok(), "the second request opens a connection");
    let text = format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        proxy_to(&format!("h2c://{other_addr}"))
    );
    let config = holdfast::config::Config::from_toml(&text, Path::new("test.toml")).unwrap();
    gw.send(holdfast::server::Control::Reload(Box::new(config)))
        .await;
    let reloaded = wait_until_async(SOON, || async { gw.state.reloads.load(Relaxed) == 1 }).await;
    assert!(reloaded, "reloaded");
    settings_go.notify_one();
    let r = req.await.unwrap().expect("response");
    assert_eq!(r.status, 200, "{} {:?}", r.text(), r.header("proxy-status"));
    let closed = tokio::time::timeout(SOON, closed_rx).await;
    assert!(
        matches!(closed, Ok(Ok(()))),
        "the connection closes with its last stream, not at its idle timeout"
    );
}

/// An upstream connection that refuses every stream (RST_STREAM REFUSED_STREAM, as an
/// overloaded server does): the POST was provably not processed and is retried "on a
/// new connection" (ARCHITECTURE.md, Retries), but the retry takes a stream on the
/// same, still listed, connection and is refused again until the attempts run out.
#[tokio::test]
async fn a_refused_stream_is_retried_on_a_new_connection() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let refused = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let (rf, seen) = (refused.clone(), answered.clone());
    tokio::spawn(async move {
        let (mut first, _) = listener.accept().await.unwrap();
        tokio::spawn(async move {
            server_preface(&mut first).await?;
            loop {
                let f = h2_server_frames(&mut first).await?;
                rf.fetch_add(1, Relaxed);
                frames::send(&mut first, &[frames::rst_stream(f.stream, 0x7)])
                    .await
                    .ok()?;
            }
            #[allow(unreachable_code)]
            Some(())
        });
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(answer_all(sock, seen.clone()));
        }
    });
    let gw = start(&proxy_to(&format!("h2c://{addr}"))).await;
    let r = send(&gw, &ClientRequest::post("/pay", "charge")).await;
    assert_eq!(
        r.status,
        200,
        "{} {:?}; refused {} times",
        r.text(),
        r.header("proxy-status"),
        refused.load(Relaxed)
    );
    assert_eq!(refused.load(Relaxed), 1);
    assert_eq!(answered.load(Relaxed), 1);
}

/// An upstream that sends GOAWAY with its first SETTINGS: the connection is never
/// listed, and `/pools` counts it closed (not open forever), so that `created`
/// equals the listed connections plus those closed.
#[tokio::test]
async fn a_connection_never_listed_is_counted_closed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = Arc::new(AtomicUsize::new(0));
    let seen = answered.clone();
    tokio::spawn(async move {
        let (mut first, _) = listener.accept().await.unwrap();
        tokio::spawn(async move {
            let mut preface = [0u8; 24];
            first.read_exact(&mut preface).await.ok()?;
            let mut goaway = 0u32.to_be_bytes().to_vec();
            goaway.extend(0u32.to_be_bytes());
            let goaway = Frame {
                kind: kind::GOAWAY,
                flags: 0,
                stream: 0,
                payload: goaway,
            };
            frames::send(&mut first, &[frames::settings(), goaway])
                .await
                .ok()?;
            let mut rest = Vec::new();
            first.read_to_end(&mut rest).await.ok()
        });
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(answer_all(sock, seen.clone()));
        }
    });
    let gw = start(&proxy_to(&format!("h2c://{addr}"))).await;
    let r = send(&gw, &ClientRequest::get("/")).await;
    assert_eq!(r.status, 200, "{} {:?}", r.text(), r.header("proxy-status"));
    assert_eq!(answered.load(Relaxed), 1);
    let (_, address) = pools(&gw).await;
    let closed: u64 = address["closed"]
        .as_object()
        .expect("closed counts")
        .values()
        .map(count)
        .sum();
    let listed = count(&address["http2"]["connections"]);
    assert_eq!(count(&address["created"]), 2, "{address}");
    assert_eq!(
        closed + listed,
        2,
        "every connection listed or closed: {address}"
    );
}

/// A response with a transfer coding besides chunked (hyper's client undoes only
/// chunked) is refused with 502, not passed on encoded without the field that says so.
#[tokio::test]
async fn a_transfer_coding_other_than_chunked_from_a_tls_upstream_is_a_502() {
    let pki = TestCa::new("holdfast upstream test CA");
    let (addr, _) = tls_http1_upstream(&pki).await;
    let gw = streaming_gateway(&pki, addr).await;
    let r = send(&gw, &ClientRequest::get("/gzipped")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    let r = send(&gw, &ClientRequest::get("/plain")).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// An HTTPS upstream speaking HTTP/1.1 through hyper's server that answers every
/// request with what it received: its framing (`length N` or `chunked`), its body, and
/// its trailer fields, one `name: value` a line.
async fn tls_http1_recorder(pki: &TestCa) -> SocketAddr {
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server(&["upstream.test"], &["http/1.1"]));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(sock).await else {
                    return;
                };
                let service = service_fn(|req: hyper::Request<Incoming>| async move {
                    let framing = match req.headers().get("content-length") {
                        Some(n) => format!("length {}", n.to_str().unwrap_or("?")),
                        None if req.headers().contains_key("transfer-encoding") => {
                            "chunked".to_owned()
                        }
                        None => "none".to_owned(),
                    };
                    let collected = req.into_body().collect().await;
                    let mut text = format!("{framing}\n");
                    if let Ok(c) = collected {
                        let trailers = c.trailers().cloned().unwrap_or_default();
                        text.push_str(&String::from_utf8_lossy(&c.to_bytes()));
                        text.push('\n');
                        for (name, value) in &trailers {
                            text.push_str(&format!("{name}: {}\n", value.to_str().unwrap_or("?")));
                        }
                    }
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

/// An HTTP/2 client's request body has no `Transfer-Encoding` and may end with
/// trailers (declared in `Trailer`, RFC 9110 6.6.2). Toward an HTTPS HTTP/1.1 upstream
/// (hyper's client, which writes only declared trailer fields) the body goes chunked
/// and must carry them, kept for replay or streamed.
#[tokio::test]
async fn trailers_of_an_http2_request_reach_an_https_http1_upstream() {
    let pki = TestCa::new("holdfast upstream test CA");
    let addr = tls_http1_recorder(&pki).await;
    for retry in ["retry.attempts = 3\n", "retry.attempts = 1\n"] {
        let gw = https_gateway(
            &format!("https://127.0.0.1:{}", addr.port()),
            &format!(
                "ca_file = {}\nserver_name = \"upstream.test\"",
                toml_path(&pki.ca_file())
            ),
            &format!("{retry}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\n"),
        )
        .await;
        let sock = TcpStream::connect(gw.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http2::handshake::<_, _, _>(
            TokioExecutor::new(),
            TokioIo::new(sock),
        )
        .await
        .expect("h2c handshake");
        tokio::spawn(conn);
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-sum", http::HeaderValue::from_static("42"));
        let frames: Vec<Result<hyper::body::Frame<Bytes>, Infallible>> = vec![
            Ok(hyper::body::Frame::data(Bytes::from_static(b"hello"))),
            Ok(hyper::body::Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let req = hyper::Request::post("http://a.test/t")
            .header("te", "trailers")
            .header("trailer", "x-sum")
            .body(body)
            .unwrap();
        let resp = tokio::time::timeout(SOON, sender.send_request(req))
            .await
            .expect("an answer in time")
            .expect("POST over h2c");
        assert_eq!(resp.status(), 200, "{retry}");
        let got = tokio::time::timeout(SOON, resp.into_body().collect())
            .await
            .expect("the body in time")
            .expect("the body")
            .to_bytes();
        let got = String::from_utf8_lossy(&got);
        assert_eq!(got, "chunked\nhello\nx-sum: 42\n", "{retry}");
    }
}

/// A graceful GOAWAY (hyper's `graceful_shutdown`: GOAWAY with the highest stream id,
/// a PING, then the final GOAWAY) lets the streams already opened finish. A POST
/// whose stream was opened before the GOAWAY was read is processed by the upstream,
/// so it must not be sent again; one opened after it was refused, and is. hyper's
/// dispatcher, on a multi-thread runtime, could fail a request with the GOAWAY although
/// its stream had been opened (hyper#2500), and holdfast then sent the POST twice.
/// Many requests race the upstream's GOAWAYs here: each path must arrive once, and
/// each POST be answered 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_post_racing_a_graceful_goaway_runs_once_upstream() {
    const CLIENTS: usize = 32;
    const POSTS: usize = 150;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let arrivals: Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
    let seen = arrivals.clone();
    let server = tokio::spawn(async move {
        // Ends when aborted.
        while let Ok((sock, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let served = Arc::new(AtomicUsize::new(0));
                let shut = Arc::new(Notify::new());
                let (served2, shut2) = (served.clone(), shut.clone());
                let svc = service_fn(move |req: hyper::Request<Incoming>| {
                    let (seen, served, shut) = (seen.clone(), served2.clone(), shut2.clone());
                    async move {
                        *seen
                            .lock()
                            .unwrap()
                            .entry(req.uri().path().to_owned())
                            .or_default() += 1;
                        // Every connection goes away gracefully after 5 requests.
                        if served.fetch_add(1, Relaxed) + 1 == 5 {
                            shut.notify_one();
                        }
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                            b"ok\n",
                        ))))
                    }
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(sock), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    () = shut.notified() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
    });
    // Retries are what this is about: the budget must not be what stops them, nor
    // the attempts: with every connection going away after 5 requests and 32 in
    // flight, a POST is now and then refused (above a GOAWAY's last-stream-id,
    // proved unprocessed) three times running, and 3 attempts answer that with 502.
    let gw = start(&format!(
        "{}retry.budget_min_per_second = 100000\nretry.attempts = 20\n",
        proxy_to(&format!("h2c://{addr}"))
    ))
    .await;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let a = gw.addr;
            tokio::spawn(async move {
                let mut client = KeepAliveClient::new(a).with_timeout(SOON);
                let mut failed = Vec::new();
                for i in 0..POSTS {
                    match client
                        .send(&ClientRequest::post(format!("/p/{c}/{i}"), ""))
                        .await
                    {
                        Ok(r) if r.status == 200 => {}
                        Ok(r) => failed.push(format!("/p/{c}/{i}: {}", r.status)),
                        Err(e) => failed.push(format!("/p/{c}/{i}: {e}")),
                    }
                }
                failed
            })
        })
        .collect();
    let mut failed = Vec::new();
    for c in clients {
        failed.extend(c.await.unwrap());
    }
    server.abort();
    let twice: Vec<_> = arrivals
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(p, n)| format!("{p} ×{n}"))
        .collect();
    assert!(twice.is_empty(), "POSTs run twice upstream: {twice:?}");
    // And each is answered: a request put into hyper's channel as the dispatcher
    // ended (the GOAWAY read) is given back unsent and retried, not left without
    // an answer until `response_headers` (the client gives up after 10 s).
    assert!(failed.is_empty(), "POSTs not answered 200: {failed:?}");
    assert_eq!(arrivals.lock().unwrap().len(), CLIENTS * POSTS);
}

/// After an early answer from an HTTP/2 upstream, hyper goes on sending the request
/// body (the stream stays open), so the plain HTTP/1 client connection is still
/// reading that body once the answer has gone out. A pause in the upload must not
/// park the connection as idle: the park tells hyper the input ended, which cut the
/// body, and the rest of it then arrived at a new hyper connection as a request head.
/// The answer promised keep-alive: the upload finishes, and the next request on the
/// connection is served.
#[tokio::test]
async fn a_pause_in_an_upload_after_an_early_answer_does_not_park_the_connection() {
    let server = early_answer_server(8).await;
    let gw = start(&format!(
        "{}retry.attempts = 1\n",
        proxy_to(&format!("h2c://{}", server.addr))
    ))
    .await;
    let mut c = early_answered_upload(&gw).await;
    // Idle well past the park (100 ms) in the middle of the body: the pause is the
    // scenario.
    tokio::time::sleep(Duration::from_millis(400)).await;
    c.send(vec![b'u'; 100_000 - 4096]).await.unwrap();
    c.send(b"GET /next HTTP/1.1\r\nHost: up\r\n\r\n")
        .await
        .unwrap();
    let next = c.read_response_for("GET", SOON).await;
    assert_eq!(next.as_ref().map(|r| r.status), Ok(200), "{next:?}");
    assert_eq!(server.served.load(Relaxed), 1);
}

/// The same upload, after the early answer, to an upstream that takes no more of it
/// (the HTTP/2 stream's window stays closed: the handler keeps the body unread). hyper
/// then reads no more of it from the client, and only the body holds the client
/// connection: with no request in flight, no other deadline would end it. It is cut
/// once none of the body arrived for `body_timeout`.
#[tokio::test]
async fn an_upload_the_upstream_stops_taking_after_an_early_answer_is_cut_after_body_timeout() {
    let server = early_answer_server(8).await;
    let gw = start(&format!(
        "{}retry.attempts = 1\n[[listener]]\nlisten = \"127.0.0.1:0\"\nbody_timeout = \"300ms\"\n",
        proxy_to(&format!("h2c://{}", server.addr))
    ))
    .await;
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    wr.write_all(b"POST /early HTTP/1.1\r\nHost: up\r\nContent-Length: 100000000\r\n\r\n")
        .await
        .unwrap();
    wr.write_all(&[b'u'; 4096]).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"early\n") {
        let n = tokio::time::timeout(SOON, rd.read(&mut buf))
            .await
            .expect("early answer in time")
            .unwrap();
        assert!(n > 0, "closed before the early answer");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // Far more than the upstream's window (1 MiB) and the sockets' buffers hold.
    let upload = tokio::spawn(async move {
        let chunk = vec![b'u'; 64 * 1024];
        for _ in 0..2_000 {
            if wr.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    upload.abort();
    assert!(closed.is_ok(), "the connection was not cut");
}

// === a client certificate refused ===

/// A TLS server with `config` answering every request on its connections `200 ok`;
/// counts the connections it accepts (handshake or not).
async fn tls_ok_server(config: Arc<rustls::ServerConfig>) -> (SocketAddr, Arc<AtomicUsize>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let accepts = accepted.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            accepts.fetch_add(1, Relaxed);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(sock).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                    // The test's requests carry one byte of body after the head.
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        if head.len() < end + 5 {
                            break;
                        }
                        head.drain(..end + 5);
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if tls.write_all(reply).await.is_err() || tls.flush().await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// TLS 1.3: an upstream that wants a client certificate holdfast does not have (or
/// one from another issuer) refuses it after holdfast's side of the handshake is
/// done, so the refusal is read only as the answer to the request written. The
/// upstream took none of it: the request is not sent, goes to another address (a
/// POST included), and a 502 names a TLS error, not a connection that ended.
#[tokio::test]
async fn an_upstream_refusing_the_client_certificate_has_not_seen_the_request() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let pki = TestCa::new("holdfast upstream test CA");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    // Client certificates must come from a CA holdfast has nothing from.
    let other = TestCa::new("another CA");
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(other.ca_file()).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let (cert, key) = pki.leaf("mutual", &["upstream.test"]);
    let mut mutual = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from_pem_file(&cert).unwrap()],
            PrivateKeyDer::from_pem_file(&key).unwrap(),
        )
        .unwrap();
    mutual.alpn_protocols = vec![b"http/1.1".to_vec()];
    let (refusing, refusing_accepts) = tls_ok_server(Arc::new(mutual)).await;
    let (open, _) = tls_ok_server(pki.server(&["upstream.test"], &["http/1.1"])).await;
    let config = |addrs: &[SocketAddr]| {
        let addrs = addrs
            .iter()
            .map(|a| format!("\"https://{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "[[route]]\nupstream = \"up\"\n\n[upstream.up]\naddresses = [{addrs}]\n\
             [upstream.up.tls]\nca_file = {}\nserver_name = \"upstream.test\"\n",
            toml_path(&pki.ca_file())
        )
    };

    let alone = start(&config(&[refusing])).await;
    let r = send(&alone, &ClientRequest::post("/pay", "x")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    let ps = r.header("proxy-status").unwrap_or_default().to_owned();
    assert!(
        ps.contains("error=tls_protocol_error") && ps.contains("CertificateRequired"),
        "Proxy-Status names the refusal: {ps}"
    );
    assert!(ps.contains("request not sent"), "not sent: {ps}");

    let gw = start(&config(&[refusing, open])).await;
    let before = refusing_accepts.load(Relaxed);
    for i in 0..4 {
        let r = send(&gw, &ClientRequest::post("/pay", "x")).await;
        assert_eq!(
            r.status,
            200,
            "POST {i}: {} {:?}",
            r.text(),
            r.header("proxy-status")
        );
    }
    assert!(
        refusing_accepts.load(Relaxed) > before,
        "the refusing address was tried"
    );
}

// === HTTP/2 flow control behind slow clients ===

/// The I/O of an upstream connection, counting the bytes it writes.
struct CountingIo {
    io: TcpStream,
    written: Arc<AtomicUsize>,
}

impl tokio::io::AsyncRead for CountingIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CountingIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let res = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &res {
            self.written.fetch_add(*n, Relaxed);
        }
        res
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Clients that stop reading large answers hold their streams' data in holdfast, unread
/// and so unacknowledged, which HTTP/2 counts against the connection's window as well
/// as the stream's. hyper's defaults (2 MiB a stream, 5 MiB the connection) let three
/// such streams close the window of the one connection every request to the address
/// shares: every other answer's body then stopped behind them (until `read_idle` cut
/// it, or `send_timeout` the slow clients). A small answer must come through while
/// four clients sit on 16 MiB answers.
#[tokio::test]
async fn clients_not_reading_large_answers_do_not_stall_other_streams() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let written = Arc::new(AtomicUsize::new(0));
    let big = Bytes::from(vec![b'b'; 16 << 20]);
    {
        let written = written.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let io = CountingIo {
                    io: sock,
                    written: written.clone(),
                };
                let big = big.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<Incoming>| {
                        let body = if req.uri().path() == "/big" {
                            big.clone()
                        } else {
                            Bytes::from_static(b"small\n")
                        };
                        async move { Ok::<_, Infallible>(hyper::Response::new(Full::new(body))) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(io), svc)
                        .await;
                });
            }
        });
    }
    let gw = start(&proxy_to(&format!("h2c://{addr}"))).await;
    // Four clients ask for 16 MiB and read none of it (a small receive buffer, so
    // that the sockets hold little of it).
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.set_recv_buffer_size(4096).unwrap();
        let mut s = sock.connect(gw.addr).await.unwrap();
        s.write_all(b"GET /big HTTP/1.1\r\nHost: up\r\n\r\n")
            .await
            .unwrap();
        stalled.push(s);
    }
    // Until the upstream writes no more: every large answer is held up by its client.
    // (Bounded: 50 looks, 300 ms apart.)
    let mut last = 0;
    let mut settled = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = written.load(Relaxed);
        if now > 0 && now == last {
            settled = true;
            break;
        }
        last = now;
    }
    assert!(settled, "the upstream kept writing");
    let r = send(&gw, &ClientRequest::get("/small")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, b"small\n"[..]);
    drop(stalled);
}
