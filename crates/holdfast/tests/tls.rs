//! TLS and HTTP/2 in front, end to end: certificates made at test time (rcgen) under a
//! test CA, rustls and hyper clients that trust it, raw HTTP/2 frames where a test must
//! see exact frames, and curl and h2load against the real binary.
//!
//! Covered: HTTPS over HTTP/1.1 and HTTP/2 (ALPN), SNI, session resumption, TLS 1.1
//! refused, h2c with prior knowledge, the redirect listener, certificate reload
//! (in-process and by SIGHUP), rapid-reset abuse cut off while another client is
//! served, and HTTP/2 connections in drains and upgrades: two-phase GOAWAY, streams in
//! flight finish, idle connections close, no client request fails.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use holdfast::config::Config;
use holdfast::server::Control;
use holdfast_test::h2::{self as frames, Frame, code, flag, kind};
use holdfast_test::{
    Behaviour, HoldfastProcess, RawClient, TestUpstream, free_addr, read_pid_file, sys, wait_until,
    wait_until_async,
};
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::pki::TestCa;
use support::{Gateway, proxy_to, start};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const BIN: &str = env!("CARGO_BIN_EXE_holdfast");
/// Bound for anything that should happen at once.
const SOON: Duration = Duration::from_secs(10);

// === fixtures: certificates ===

/// The DER of the first certificate in a PEM file.
fn leaf_der(path: &Path) -> Vec<u8> {
    CertificateDer::from_pem_file(path).unwrap().to_vec()
}

/// A path as a TOML string.
fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// `[[listener]]` with `[listener.tls]` for one certificate, then `extra` lines.
fn tls_listener(listen: &str, cert: &Path, key: &Path, extra: &str) -> String {
    format!(
        "\n[[listener]]\nlisten = \"{listen}\"\n{extra}\n[listener.tls]\ncert = {}\nkey = {}\n",
        toml_path(cert),
        toml_path(key)
    )
}

// === fixtures: clients ===

async fn tls_connect(
    addr: SocketAddr,
    name: &str,
    config: Arc<ClientConfig>,
) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    timeout(SOON, TlsConnector::from(config).connect(name, tcp))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake")
}

fn served_leaf(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// One HTTP connection driven by hyper's client.
enum Client {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// What a request got back.
struct Answer {
    status: StatusCode,
    version: Version,
    headers: http::HeaderMap,
    body: String,
}

impl Client {
    /// Hyper's HTTP/1.1 or HTTP/2 client over `io`; the connection task's handle says
    /// how the connection ended.
    async fn over<IO>(io: IO, h2: bool) -> (Client, JoinHandle<hyper::Result<()>>)
    where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(io);
        if h2 {
            let (send, conn) = http2::handshake(TokioExecutor::new(), io).await.unwrap();
            (Client::H2(send), tokio::spawn(conn))
        } else {
            let (send, conn) = http1::handshake(io).await.unwrap();
            (Client::H1(send), tokio::spawn(conn))
        }
    }

    async fn tls(
        addr: SocketAddr,
        pki: &TestCa,
        alpn: &[&str],
    ) -> (Client, JoinHandle<hyper::Result<()>>) {
        let s = tls_connect(addr, "localhost", pki.client(alpn)).await;
        let h2 = s.get_ref().1.alpn_protocol() == Some(b"h2");
        Client::over(s, h2).await
    }

    fn request(
        &self,
        method: Method,
        scheme: &str,
        path: &str,
        body: &str,
    ) -> Request<Full<Bytes>> {
        let b = Request::builder().method(method);
        let b = match self {
            // HTTP/2 takes :scheme and :authority from an absolute URI.
            Client::H2(_) => b.uri(format!("{scheme}://localhost{path}")),
            Client::H1(_) => b.uri(path).header("host", "localhost"),
        };
        b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
    }

    /// Sends a request; `Err(Some(req))` when it was not sent (the connection is
    /// closing), `Err(None)` when it failed after being sent.
    async fn try_send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<Answer, Option<Request<Full<Bytes>>>> {
        let res = match self {
            Client::H1(s) => s.try_send_request(req).await,
            Client::H2(s) => s.try_send_request(req).await,
        };
        let resp = res.map_err(|mut e| e.take_message())?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map_err(|_| None)?.to_bytes();
        Ok(Answer {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    async fn send(&mut self, method: Method, scheme: &str, path: &str, body: &str) -> Answer {
        let req = self.request(method, scheme, path, body);
        match timeout(SOON, self.try_send(req)).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => panic!("{path}: request failed (returned unsent: {})", e.is_some()),
            Err(_) => panic!("{path}: no answer in time"),
        }
    }
}

/// Reads frames until `stop` says so or the stream ends; answers the server's
/// SETTINGS. Returns every frame read.
async fn read_frames<R>(s: &mut R, mut stop: impl FnMut(&Frame) -> bool) -> Vec<Frame>
where
    R: AsyncRead + AsyncWrite + Unpin,
{
    let mut seen = Vec::new();
    let deadline = Instant::now() + SOON;
    loop {
        let f = match tokio::time::timeout_at(deadline, frames::read_frame(s)).await {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None) | Err(_)) => return seen,
            Err(_) => panic!("no end to the frames within {SOON:?}; seen: {seen:?}"),
        };
        if f.is(kind::SETTINGS) && !f.has(flag::ACK) {
            let _ = frames::send(s, &[frames::settings_ack()]).await;
        }
        let done = stop(&f);
        seen.push(f);
        if done {
            return seen;
        }
    }
}

// === HTTPS, ALPN, SNI, TLS versions ===

#[tokio::test]
async fn https_get_and_post_over_http1_and_http2_by_alpn() {
    let pki = TestCa::new("holdfast test CA");
    let (cert, key) = pki.leaf("site", &["localhost"]);
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}{}",
        proxy_to(&up.url()),
        tls_listener("127.0.0.1:0", &cert, &key, "")
    ))
    .await;
    for (alpn, want) in [
        (&["http/1.1"][..], "http/1.1"),
        (&["h2"][..], "h2"),
        (&["h2", "http/1.1"][..], "h2"),
        (&["http/1.1", "h2"][..], "h2"),
    ] {
        let s = tls_connect(gw.addr, "localhost", pki.client(alpn)).await;
        let got = s
            .get_ref()
            .1
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        assert_eq!(got.as_deref(), Some(want), "ALPN offered {alpn:?}");
        let h2 = want == "h2";
        let (mut c, _conn) = Client::over(s, h2).await;
        let a = c.send(Method::GET, "https", "/hello?x=1", "").await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(
            a.version,
            if h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            }
        );
        assert!(a.body.starts_with("GET /hello?x=1\n"), "{}", a.body);
        assert!(
            a.body
                .to_ascii_lowercase()
                .contains("x-forwarded-proto: https\n"),
            "the upstream is told the client used https: {}",
            a.body
        );
        if h2 {
            assert!(!a.headers.contains_key("keep-alive"), "{:?}", a.headers);
            assert!(!a.headers.contains_key("connection"), "{:?}", a.headers);
        } else {
            assert!(a.headers.contains_key("keep-alive"), "{:?}", a.headers);
        }
        let a = c.send(Method::POST, "https", "/submit", "payload=42").await;
        assert_eq!(a.status, StatusCode::OK);
        assert!(a.body.starts_with("POST /submit\n"), "{}", a.body);
        assert!(a.body.ends_with("\n\npayload=42"), "{}", a.body);
    }
}

/// An HTTP/1.0 client may offer ALPN `http/1.0` alone (`curl --http1.0` does). rustls
/// refuses a handshake whose offer shares no name with the server's list, so with only
/// `h2` and `http/1.1` listed such a client got a `no_application_protocol` alert
/// instead of an answer; nginx lists `http/1.0` too.
#[tokio::test]
async fn a_client_offering_only_alpn_http_1_0_is_served_http_1_0() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestCa::new("holdfast test CA");
    let (cert, key) = pki.leaf("site", &["localhost"]);
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}{}",
        proxy_to(&up.url()),
        tls_listener("127.0.0.1:0", &cert, &key, "")
    ))
    .await;
    let mut s = tls_connect(gw.addr, "localhost", pki.client(&["http/1.0"])).await;
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.0"[..]));
    s.write_all(b"GET /old HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    // The server ends an HTTP/1.0 exchange by closing; a TLS close may come without
    // close_notify, which is no concern here.
    let _ = timeout(SOON, s.read_to_end(&mut out))
        .await
        .expect("answered and closed in time");
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.0 200 ") || out.starts_with("HTTP/1.1 200 "),
        "{out}"
    );
    assert!(out.contains("GET /old\n"), "{out}");
}

#[tokio::test]
async fn sni_picks_the_certificate() {
    let pki = TestCa::new("holdfast test CA");
    let (dc, dk) = pki.leaf("default", &["default.test", "unlisted.test"]);
    let (ac, ak) = pki.leaf("a", &["a.test"]);
    let (wc, wk) = pki.leaf("w", &["*.w.test"]);
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}{}\n[[listener.tls.certificates]]\ncert = {}\nkey = {}\n\
         \n[[listener.tls.certificates]]\ncert = {}\nkey = {}\nnames = [\"*.w.test\"]\n",
        proxy_to(&up.url()),
        tls_listener("127.0.0.1:0", &dc, &dk, ""),
        toml_path(&ac),
        toml_path(&ak),
        toml_path(&wc),
        toml_path(&wk),
    ))
    .await;
    for (name, want) in [
        ("a.test", &ac),
        ("one.w.test", &wc),
        ("unlisted.test", &dc),
        ("default.test", &dc),
    ] {
        let s = tls_connect(gw.addr, name, pki.client(&["http/1.1"])).await;
        assert_eq!(served_leaf(&s), leaf_der(want), "SNI {name}");
    }
    // No SNI at all: the default.
    let mut no_sni = (*pki.client(&["http/1.1"])).clone();
    no_sni.enable_sni = false;
    let s = tls_connect(gw.addr, "default.test", Arc::new(no_sni)).await;
    assert_eq!(served_leaf(&s), leaf_der(&dc));
}

/// `names` listing a name the certificate is not valid for was accepted, and every
/// client that asked for that name refused the certificate at the handshake. It is
/// refused at load, naming the entry; a name under one of its wildcards is valid.
#[tokio::test]
async fn a_listed_name_the_certificate_is_not_valid_for_is_refused_at_load() {
    let pki = TestCa::new("holdfast test CA");
    let (dc, dk) = pki.leaf("default", &["default.test"]);
    let (ac, ak) = pki.leaf("a", &["a.test", "*.w.test"]);
    let config = |names: &str| {
        format!(
            "{}{}\n[[listener.tls.certificates]]\ncert = {}\nkey = {}\nnames = {names}\n",
            proxy_to("http://127.0.0.1:9"),
            tls_listener("127.0.0.1:0", &dc, &dk, ""),
            toml_path(&ac),
            toml_path(&ak),
        )
    };
    let e = Config::from_toml(&config(r#"["a.test", "shop.test"]"#), Path::new("t.toml"))
        .expect_err("shop.test is not a name of a.pem")
        .to_string();
    assert!(
        e.contains("certificates[0].names") && e.contains("\"shop.test\""),
        "{e}"
    );
    Config::from_toml(
        &config(r#"["A.test.", "one.w.test", "*.w.test"]"#),
        Path::new("t.toml"),
    )
    .unwrap_or_else(|e| panic!("names the certificate is valid for: {e}"));
}

#[tokio::test]
async fn sessions_resume_on_tls13_and_tls12() {
    let pki = TestCa::new("holdfast test CA");
    let (cert, key) = pki.leaf("site", &["localhost"]);
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}{}",
        proxy_to(&up.url()),
        tls_listener("127.0.0.1:0", &cert, &key, "")
    ))
    .await;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        // One client config holds the session it was given.
        let client = pki.client_with(&["http/1.1"], &[version]);
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let s = tls_connect(gw.addr, "localhost", client.clone()).await;
            kinds.push(s.get_ref().1.handshake_kind());
            // TLS 1.3 tickets arrive after the handshake: read a response first.
            let (mut c, conn) = Client::over(s, false).await;
            assert_eq!(c.send(Method::GET, "https", "/", "").await.status, 200);
            drop(c);
            let _ = conn.await;
        }
        assert_eq!(
            kinds,
            [
                Some(rustls::HandshakeKind::Full),
                Some(rustls::HandshakeKind::Resumed)
            ],
            "{version:?}"
        );
    }
}

#[tokio::test]
async fn tls_1_1_is_refused_with_a_protocol_version_alert() {
    let pki = TestCa::new("holdfast test CA");
    let (cert, key) = pki.leaf("site", &["localhost"]);
    let gw = start(&format!(
        "{}{}",
        proxy_to("http://127.0.0.1:9"),
        tls_listener("127.0.0.1:0", &cert, &key, "")
    ))
    .await;
    let mut raw = RawClient::connect(gw.addr).await.unwrap();
    raw.send(client_hello(0x0302)).await.unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + SOON;
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 64];
    while got.len() < 7 {
        match tokio::time::timeout_at(deadline, raw.stream().read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("no answer to a TLS 1.1 ClientHello"),
        }
    }
    // An alert record: fatal (2), protocol_version (70).
    assert!(got.len() >= 7, "{got:?}");
    assert_eq!(got[0], 0x15, "alert record: {got:?}");
    assert_eq!(&got[5..7], &[2, 70], "fatal protocol_version: {got:?}");
}

/// A ClientHello offering only `version` (0x0302 = TLS 1.1): no supported_versions
/// extension; everything else a TLS 1.2 server could accept, so only the version
/// stands in the way.
fn client_hello(version: u16) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&version.to_be_bytes());
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    let suites: [u16; 3] = [0xc02b, 0xc02f, 0xc013];
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null
    let name = b"localhost";
    let mut sni = Vec::new();
    sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
    sni.push(0);
    sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
    sni.extend_from_slice(name);
    let mut ext = Vec::new();
    let mut extension = |kind: u16, data: &[u8]| {
        ext.extend_from_slice(&kind.to_be_bytes());
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(data);
    };
    extension(0x0000, &sni); // server_name
    extension(0x000a, &[0, 2, 0x00, 0x17]); // supported_groups: secp256r1
    extension(0x000b, &[1, 0]); // ec_point_formats: uncompressed
    extension(0x000d, &[0, 4, 0x04, 0x03, 0x04, 0x01]); // signature_algorithms
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut hs = vec![1]; // client_hello
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

// === plain listeners: h2c and the redirect ===

#[tokio::test]
async fn h2c_with_prior_knowledge_beside_http1_only_where_enabled() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\n\n[[listener]]\nlisten = \"127.0.0.1:0\"\n",
        proxy_to(&up.url())
    ))
    .await;
    let (h2c, plain) = (gw.listeners[0], gw.listeners[1]);
    for h2 in [true, false] {
        let (mut c, _conn) = Client::over(TcpStream::connect(h2c).await.unwrap(), h2).await;
        let a = c.send(Method::GET, "http", "/p", "").await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(
            a.version,
            if h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            }
        );
        assert!(
            a.body
                .to_ascii_lowercase()
                .contains("x-forwarded-proto: http\n"),
            "{}",
            a.body
        );
    }
    // Without h2c, the preface is a malformed HTTP/1 request.
    let (mut c, conn) = Client::over(TcpStream::connect(plain).await.unwrap(), true).await;
    let req = c.request(Method::GET, "http", "/p", "");
    let sent = timeout(SOON, c.try_send(req))
        .await
        .expect("an answer or an error");
    assert!(
        sent.is_err(),
        "HTTP/2 without h2c = true must not be served"
    );
    let _ = timeout(SOON, conn).await.expect("the connection ends");
}

#[tokio::test]
async fn redirect_listener_answers_308_to_the_https_listener() {
    let pki = TestCa::new("holdfast test CA");
    let (cert, key) = pki.leaf("site", &["localhost"]);
    let up = TestUpstream::start(Behaviour::Echo).await;
    let https = free_addr();
    let gw = start(&format!(
        "{}{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nredirect_https = true\nredirect_https_port = {}\n",
        proxy_to(&up.url()),
        tls_listener(&https.to_string(), &cert, &key, ""),
        https.port()
    ))
    .await;
    let redirect = gw.listeners[1];
    let mut raw = RawClient::connect(redirect).await.unwrap();
    for method in ["GET", "POST"] {
        raw.send(format!(
            "{method} /shop/cart?item=7 HTTP/1.1\r\nHost: localhost:{}\r\nContent-Length: 0\r\n\r\n",
            redirect.port()
        ))
        .await
        .unwrap();
        let r = raw.read_response(SOON).await.unwrap();
        assert_eq!(r.status, 308, "{method}");
        let location = r.headers.get("location").unwrap().to_owned();
        assert_eq!(
            location,
            format!("https://localhost:{}/shop/cart?item=7", https.port())
        );
    }
    assert_eq!(up.requests_seen(), 0, "a redirect listener proxies nothing");
    // Following it works.
    let (mut c, _conn) = Client::tls(https, &pki, &["http/1.1"]).await;
    let a = c.send(Method::GET, "https", "/shop/cart?item=7", "").await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(up.requests_seen(), 1);
}

/// RFC 9112 3.2: a request with more than one `Host` gets 400, on a redirect
/// listener as on any other: which host it is for is ambiguous (a cache in front may
/// read the other one, and keep a redirect to a host the client never named). It was
/// redirected to the first one. One `Host` is still redirected, on the same
/// connection.
#[tokio::test]
async fn a_redirect_listener_refuses_a_request_with_two_hosts() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nredirect_https = true\n",
        proxy_to(&up.url()),
    ))
    .await;
    let mut raw = RawClient::connect(gw.addr).await.unwrap();
    raw.send("GET /a HTTP/1.1\r\nHost: evil.example\r\nHost: shop.example\r\n\r\n")
        .await
        .unwrap();
    let r = raw.read_response(SOON).await.unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.headers.get("location"), None, "{r:?}");
    raw.send("GET /a HTTP/1.1\r\nHost: shop.example\r\n\r\n")
        .await
        .unwrap();
    let r = raw.read_response(SOON).await.unwrap();
    assert_eq!(r.status, 308, "{r:?}");
    assert_eq!(r.headers.get("location"), Some("https://shop.example/a"));
}

// === reload ===

#[tokio::test]
async fn reload_swaps_certificates_for_new_connections_and_keeps_open_ones() {
    let pki = TestCa::new("holdfast test CA");
    let (cert, key) = pki.leaf("site", &["localhost"]);
    let v1 = leaf_der(&cert);
    let up = TestUpstream::start(Behaviour::Echo).await;
    let text = format!(
        "{}{}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
        proxy_to(&up.url()),
        tls_listener("127.0.0.1:0", &cert, &key, "")
    );
    let gw = start(&text).await;
    // Validation reads the files, so the config is parsed while they are good; the
    // server reads them again on reload.
    let parsed = Config::from_toml(&text, Path::new("test.toml")).unwrap();
    let config = || Box::new(parsed.clone());

    let s = tls_connect(gw.addr, "localhost", pki.client(&["h2"])).await;
    assert_eq!(served_leaf(&s), v1);
    let (mut open_h2, _c1) = Client::over(s, true).await;
    let (mut open_h1, _c2) = Client::tls(gw.addr, &pki, &["http/1.1"]).await;
    assert_eq!(
        open_h2.send(Method::GET, "https", "/", "").await.status,
        200
    );
    assert_eq!(
        open_h1.send(Method::GET, "https", "/", "").await.status,
        200
    );

    // A renewal rewrites the files; the config is the same.
    pki.leaf("site", &["localhost"]);
    let v2 = leaf_der(&cert);
    assert_ne!(v1, v2);
    gw.send(Control::Reload(config())).await;
    let swapped = wait_until_async(SOON, || async {
        served_leaf(&tls_connect(gw.addr, "localhost", pki.client(&["h2"])).await) == v2
    })
    .await;
    assert!(swapped, "new connections get the new certificate");
    assert_eq!(
        open_h2.send(Method::GET, "https", "/", "").await.status,
        200
    );
    assert_eq!(
        open_h1.send(Method::GET, "https", "/", "").await.status,
        200
    );

    // A broken file keeps the certificates in force.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    let failures = gw.state.reload_failures.load(Relaxed);
    gw.send(Control::Reload(config())).await;
    assert!(
        wait_until(SOON, || gw.state.reload_failures.load(Relaxed) > failures).await,
        "the failed reload is counted"
    );
    let s = tls_connect(gw.addr, "localhost", pki.client(&["h2"])).await;
    assert_eq!(served_leaf(&s), v2);
    assert_eq!(
        open_h2.send(Method::GET, "https", "/", "").await.status,
        200
    );
}

/// A reload whose certificate files cannot be used (here broken after the config was
/// read, as a renewal caught half-written would be) fails whole, as a bad config file
/// does: the routes and upstreams in force stay, and it is counted as a failure only.
/// Before, only the certificates stayed: the rest of the new config applied (requests
/// went to the new upstream, the old one's pools drained) and the reload was counted
/// in `holdfast_reloads_total` as well as in the failures.
#[tokio::test]
async fn a_reload_whose_certificates_cannot_be_used_applies_nothing() {
    let pki = TestCa::new("holdfast test CA");
    let (cert, key) = pki.leaf("site", &["localhost"]);
    let old = TestUpstream::start(Behaviour::Echo).await;
    let new = TestUpstream::start(Behaviour::Echo).await;
    let text = |url: &str| {
        format!(
            "{}{}\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            proxy_to(url),
            tls_listener("127.0.0.1:0", &cert, &key, "")
        )
    };
    let gw = start(&text(&old.url())).await;
    // Read while the files are good; the server reads them again on reload.
    let to_new = Config::from_toml(&text(&new.url()), Path::new("test.toml")).unwrap();
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
    gw.send(Control::Reload(Box::new(to_new))).await;
    assert!(
        wait_until(SOON, || gw.state.reload_failures.load(Relaxed) == 1).await,
        "the failed reload is counted"
    );
    assert_eq!(
        gw.state.reloads.load(Relaxed),
        0,
        "a refused reload is not counted as applied"
    );
    let (mut c, _conn) = Client::tls(gw.addr, &pki, &["http/1.1"]).await;
    assert_eq!(c.send(Method::GET, "https", "/", "").await.status, 200);
    assert_eq!(
        (old.requests_seen(), new.requests_seen()),
        (1, 0),
        "the routes in force stay"
    );
}

// === HTTP/2 limits ===

/// Opens a TLS connection with ALPN h2 and sends `n` requests each reset at once, in
/// one write; returns the frames read until the connection ends, or until a response
/// to the request sent after them arrives.
async fn rapid_reset(gw: &Gateway, pki: &TestCa, n: u32) -> Vec<Frame> {
    let mut s = tls_connect(gw.addr, "localhost", pki.client(&["h2"])).await;
    frames::start(&mut s).await.unwrap();
    let mut burst = Vec::new();
    for i in 0..n {
        let id = 2 * i + 1;
        burst.push(frames::get(id, "https", "localhost", "/"));
        burst.push(frames::rst_stream(id, code::CANCEL));
    }
    let probe = 2 * n + 1;
    burst.push(frames::get(probe, "https", "localhost", "/probe"));
    frames::send(&mut s, &burst).await.unwrap();
    read_frames(&mut s, |f| f.is(kind::HEADERS) && f.stream == probe).await
}

#[tokio::test]
async fn rapid_reset_abuser_gets_goaway_and_is_cut_off_while_others_are_served() {
    let pki = TestCa::new("holdfast test CA");
    let (cert, key) = pki.leaf("site", &["localhost"]);
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}{}\n[listener.http2]\nmax_pending_accept_reset_streams = 50\n",
        proxy_to(&up.url()),
        tls_listener("127.0.0.1:0", &cert, &key, ""),
    ))
    .await;
    let (mut good, good_conn) = Client::tls(gw.addr, &pki, &["h2"]).await;
    assert_eq!(good.send(Method::GET, "https", "/", "").await.status, 200);

    let seen = rapid_reset(&gw, &pki, 1000).await;
    let goaway = seen
        .iter()
        .find(|f| f.is(kind::GOAWAY))
        .unwrap_or_else(|| panic!("no GOAWAY; frames: {seen:?}"));
    assert_eq!(goaway.goaway().1, code::ENHANCE_YOUR_CALM, "{goaway:?}");
    assert!(
        !seen.iter().any(|f| f.is(kind::HEADERS) && f.stream == 2001),
        "the abuser's last request is not served"
    );
    // The stream ended: read_frames returned without the probe's answer.

    // The other client never noticed.
    for _ in 0..5 {
        assert_eq!(good.send(Method::GET, "https", "/", "").await.status, 200);
    }
    assert!(!good_conn.is_finished());
    let (mut fresh, _c) = Client::tls(gw.addr, &pki, &["h2"]).await;
    assert_eq!(fresh.send(Method::GET, "https", "/", "").await.status, 200);
}

#[tokio::test]
async fn the_reset_limit_is_the_configured_one() {
    // The same burst under a limit above it is served: the setting reaches h2.
    let pki = TestCa::new("holdfast test CA");
    let (cert, key) = pki.leaf("site", &["localhost"]);
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}{}\n[listener.http2]\nmax_pending_accept_reset_streams = 5000\n",
        proxy_to(&up.url()),
        tls_listener("127.0.0.1:0", &cert, &key, ""),
    ))
    .await;
    let seen = rapid_reset(&gw, &pki, 1000).await;
    assert!(!seen.iter().any(|f| f.is(kind::GOAWAY)), "{seen:?}");
    let answer = seen.last().unwrap();
    assert!(
        answer.is(kind::HEADERS) && answer.stream == 2001,
        "{answer:?}"
    );
    assert_eq!(answer.indexed_status(), Some(200));
}

#[tokio::test]
async fn http2_limits_are_announced_to_the_client() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\n\n[listener.http2]\n\
         max_concurrent_streams = 7\nmax_header_list_size = \"8KiB\"\n\
         initial_stream_window = \"300000\"\ninitial_connection_window = \"3MiB\"\n",
        proxy_to(&up.url())
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    frames::start(&mut s).await.unwrap();
    let seen = read_frames(&mut s, |f| f.is(kind::WINDOW_UPDATE) && f.stream == 0).await;
    let settings = seen
        .iter()
        .find(|f| f.is(kind::SETTINGS) && !f.has(flag::ACK))
        .unwrap_or_else(|| panic!("no SETTINGS: {seen:?}"));
    let values: Vec<(u16, u32)> = settings
        .payload
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    // SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_INITIAL_WINDOW_SIZE,
    // SETTINGS_MAX_HEADER_LIST_SIZE (RFC 9113 6.5.2).
    for want in [(0x3, 7), (0x4, 300_000), (0x6, 8192)] {
        assert!(values.contains(&want), "{want:?} in {values:?}");
    }
    // The connection window opens from 65535 with a WINDOW_UPDATE on stream 0.
    let update = seen.last().unwrap();
    let increment = u32::from_be_bytes(update.payload[..4].try_into().unwrap());
    assert_eq!(65_535 + increment, 3 << 20);
}

#[tokio::test]
async fn http2_connection_idle_past_keepalive_timeout_gets_goaway_and_closes() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\nkeepalive_timeout = \"1s\"\n\
         keepalive_min_idle = \"0s\"\nheader_timeout = \"2s\"\n",
        proxy_to(&up.url())
    ))
    .await;
    // One client answers the PING of the graceful shutdown, one stays silent.
    for answers in [true, false] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        frames::start(&mut s).await.unwrap();
        frames::send(&mut s, &[frames::get(1, "http", "localhost", "/")])
            .await
            .unwrap();
        let mut ping = None;
        // When the response ended (the connection went idle) and when the first
        // GOAWAY came: it must wait for keepalive_timeout, not follow the response.
        let (mut answered, mut goaway) = (None, None);
        let mut seen = read_frames(&mut s, |f| {
            if f.stream == 1 && f.has(flag::END_STREAM) && !f.is(kind::SETTINGS) {
                answered.get_or_insert_with(Instant::now);
            }
            if f.is(kind::GOAWAY) {
                goaway.get_or_insert_with(Instant::now);
            }
            if f.is(kind::PING) && !f.has(flag::ACK) {
                ping = Some(f.payload.clone());
            }
            ping.is_some()
        })
        .await;
        let first_goaway = Instant::now();
        assert!(
            seen.iter()
                .any(|f| f.is(kind::DATA) && f.stream == 1 && f.has(flag::END_STREAM)),
            "the request was answered: {seen:?}"
        );
        let (answered, goaway) = (answered.unwrap(), goaway.expect("a GOAWAY"));
        let idle = goaway - answered;
        assert!(
            idle >= Duration::from_millis(900) && idle < Duration::from_secs(4),
            "GOAWAY after {idle:?} idle; keepalive_timeout is 1s"
        );
        if answers {
            frames::send(&mut s, &[frames::ping_ack(&ping.unwrap())])
                .await
                .unwrap();
        }
        seen.extend(read_frames(&mut s, |_| false).await);
        let goaways: Vec<(u32, u32)> = seen
            .iter()
            .filter(|f| f.is(kind::GOAWAY))
            .map(Frame::goaway)
            .collect();
        if answers {
            assert_eq!(
                goaways,
                [(0x7fff_ffff, code::NO_ERROR), (1, code::NO_ERROR)],
                "{seen:?}"
            );
            assert!(first_goaway.elapsed() < Duration::from_secs(1));
        } else {
            // Cut once quiet for header_timeout (longer than keepalive_timeout here)
            // after the GOAWAY.
            assert_eq!(goaways, [(0x7fff_ffff, code::NO_ERROR)], "{seen:?}");
            assert!(first_goaway.elapsed() >= Duration::from_millis(1500));
        }
    }
}

/// A client that goes silent after the GOAWAY (a vanished peer) is cut
/// `header_timeout` after it: the longer grace is for a client still heard from, whose
/// response's end may wait in h2 for its window. A silent one must not hold up a drain.
#[tokio::test]
async fn a_silent_http2_client_is_cut_header_timeout_after_the_goaway() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\nmax_requests_per_connection = 1\n\
         header_timeout = \"1s\"\nkeepalive_timeout = \"30s\"\n",
        proxy_to(&up.url())
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    frames::start(&mut s).await.unwrap();
    // The server's SETTINGS acknowledged before the request: an ACK read after the
    // GOAWAY would count as hearing from the client.
    read_frames(&mut s, |f| f.is(kind::SETTINGS) && !f.has(flag::ACK)).await;
    frames::send(&mut s, &[frames::get(1, "http", "localhost", "/")])
        .await
        .unwrap();
    // The graceful shutdown's PING, which this client leaves unanswered.
    let seen = read_frames(&mut s, |f| f.is(kind::PING) && !f.has(flag::ACK)).await;
    assert!(
        seen.iter().any(|f| f.is(kind::GOAWAY)),
        "a GOAWAY after the one request: {seen:?}"
    );
    let goaway = Instant::now();
    let rest = read_frames(&mut s, |_| false).await;
    let cut = goaway.elapsed();
    assert!(
        cut >= Duration::from_millis(700) && cut < Duration::from_secs(4),
        "cut {cut:?} after the GOAWAY (header_timeout 1s): {rest:?}"
    );
    // Counted before the socket closed. A client served and then gone (a phone that
    // lost its network while idle) is no slow head: `head_timeout` counted it.
    assert_eq!(
        gw.state.clients.figures().head_timeout.load(Relaxed),
        0,
        "client_errors_total{{kind=\"head_timeout\"}}"
    );
}

#[tokio::test]
async fn http2_max_requests_per_connection_ends_with_goaway() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\nmax_requests_per_connection = 2\n",
        proxy_to(&up.url())
    ))
    .await;
    let (mut c, conn) = Client::over(TcpStream::connect(gw.addr).await.unwrap(), true).await;
    assert_eq!(c.send(Method::GET, "http", "/1", "").await.status, 200);
    assert_eq!(c.send(Method::GET, "http", "/2", "").await.status, 200);
    let ended = timeout(SOON, conn)
        .await
        .expect("GOAWAY ends the connection");
    assert!(ended.unwrap().is_ok(), "a graceful end");
    let req = c.request(Method::GET, "http", "/3", "");
    assert!(
        matches!(c.try_send(req).await, Err(Some(_))),
        "a third request is handed back unsent"
    );
}

// === drain ===

#[tokio::test]
async fn drain_sends_two_goaways_and_serves_every_stream_below_the_last() {
    let up = TestUpstream::start(Behaviour::Delay(Duration::from_millis(300))).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\n",
        proxy_to(&up.url())
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    frames::start(&mut s).await.unwrap();
    frames::send(&mut s, &[frames::get(1, "http", "localhost", "/one")])
        .await
        .unwrap();
    up.wait_for_requests(1, SOON).await.unwrap();
    let drained = tokio::spawn(gw.drain());

    // Phase one: GOAWAY with the highest stream id, and a PING.
    let mut ping = None;
    let mut first = None;
    let mut seen = read_frames(&mut s, |f| {
        if f.is(kind::PING) && !f.has(flag::ACK) {
            ping = Some(f.payload.clone());
        }
        if f.is(kind::GOAWAY) {
            first = Some(f.goaway());
        }
        ping.is_some() && first.is_some()
    })
    .await;
    assert_eq!(first, Some((0x7fff_ffff, code::NO_ERROR)), "{seen:?}");
    // A request the client sends before it has seen GOAWAY is still taken...
    frames::send(
        &mut s,
        &[
            frames::get(3, "http", "localhost", "/two"),
            frames::ping_ack(&ping.unwrap()),
        ],
    )
    .await
    .unwrap();
    // ...phase two names it as the last one...
    let mut last = None;
    seen.extend(
        read_frames(&mut s, |f| {
            if f.is(kind::GOAWAY) {
                last = Some(f.goaway());
            }
            last.is_some()
        })
        .await,
    );
    assert_eq!(last, Some((3, code::NO_ERROR)), "{seen:?}");
    // ...and one after the final GOAWAY is not processed.
    frames::send(&mut s, &[frames::get(5, "http", "localhost", "/three")])
        .await
        .unwrap();
    seen.extend(read_frames(&mut s, |_| false).await);

    for stream in [1, 3] {
        let head = seen
            .iter()
            .find(|f| f.is(kind::HEADERS) && f.stream == stream)
            .unwrap_or_else(|| panic!("no response on stream {stream}: {seen:?}"));
        assert_eq!(head.indexed_status(), Some(200));
        assert!(
            seen.iter()
                .any(|f| f.stream == stream && f.has(flag::END_STREAM) && !f.is(kind::SETTINGS)),
            "stream {stream} completed"
        );
    }
    assert!(!seen.iter().any(|f| f.stream == 5), "{seen:?}");
    assert_eq!(up.requests_seen(), 2);
    let report = timeout(SOON, drained).await.unwrap().unwrap();
    assert_eq!(report.cut, 0);
}

#[tokio::test]
async fn drain_with_http2_clients_in_flight_fails_no_request() {
    let pki = TestCa::new("holdfast test CA");
    let (cert, key) = pki.leaf("site", &["localhost"]);
    let up = TestUpstream::start(Behaviour::Delay(Duration::from_millis(500))).await;
    let gw = start(&format!(
        "{}{}\n[drain]\ntimeout = \"30s\"\n",
        proxy_to(&up.url()),
        tls_listener("127.0.0.1:0", &cert, &key, ""),
    ))
    .await;
    // Three busy connections with four requests each, and one idle connection.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Client::tls(gw.addr, &pki, &["h2"]).await);
    }
    let mut in_flight = Vec::new();
    for (c, _) in &clients[..3] {
        let Client::H2(send) = c else { unreachable!() };
        for i in 0..4 {
            let mut c = Client::H2(send.clone());
            let req = c.request(Method::GET, "https", &format!("/slow/{i}"), "");
            in_flight.push(tokio::spawn(async move {
                c.try_send(req).await.map(|a| a.status)
            }));
        }
    }
    up.wait_for_requests(12, SOON).await.unwrap();
    let started = Instant::now();
    let report = timeout(SOON, gw.drain()).await.expect("the drain ends");
    assert_eq!(report.cut, 0);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for r in in_flight {
        let status = r.await.unwrap().unwrap_or_else(|unsent| {
            panic!(
                "a request in flight failed (returned unsent: {})",
                unsent.is_some()
            )
        });
        assert_eq!(status, StatusCode::OK);
    }
    // Every connection, the idle one too, ended with GOAWAY, not an error; a request
    // after it is handed back unsent, for the client to send elsewhere.
    for (mut c, conn) in clients {
        let ended = timeout(SOON, conn).await.expect("closed").unwrap();
        assert!(ended.is_ok(), "{ended:?}");
        let req = c.request(Method::GET, "https", "/late", "");
        assert!(matches!(c.try_send(req).await, Err(Some(_))));
    }
}

// === the binary: curl, h2load, SIGHUP, upgrade ===

/// `holdfast proxy` with a TLS front, started and ready.
async fn proxy_process(pki: &TestCa, up: &TestUpstream) -> (HoldfastProcess, SocketAddr) {
    let (cert, key) = pki.paths("site");
    let listen = free_addr();
    let args = [
        "proxy",
        "--listen",
        &listen.to_string(),
        "--to",
        &up.url(),
        "--admin",
        "off",
        "--access-log",
        "off",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let proc = HoldfastProcess::spawn_with_env(Path::new(BIN), &args, None, &[("NO_COLOR", "1")]);
    assert!(
        proc.wait_for_log("listening", SOON).await,
        "holdfast did not start: {}",
        proc.logs()
    );
    (proc, listen)
}

fn have(tool: &str) -> bool {
    std::process::Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test]
async fn curl_and_h2load_through_the_tls_front() {
    assert!(
        have("curl") && have("h2load"),
        "curl and h2load (nghttp2-client) are needed; scripts/test installs them"
    );
    let pki = TestCa::new("holdfast test CA");
    pki.leaf("site", &["localhost"]);
    let up = TestUpstream::start(Behaviour::Echo).await;
    let (proc, listen) = proxy_process(&pki, &up).await;
    let url = format!("https://localhost:{}/curl", listen.port());
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--http2", "--cacert"])
        .arg(pki.ca_file())
        .args([
            "--resolve",
            &format!("localhost:{}:127.0.0.1", listen.port()),
        ])
        .args([
            "-w",
            "\n%{http_version} %{http_code}",
            "-d",
            "from=curl",
            &url,
        ])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "curl: {}{}",
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("POST /curl\n"), "{stdout}");
    assert!(stdout.ends_with("\n2 200"), "{stdout}");

    let out = tokio::process::Command::new("h2load")
        .args(["-n", "400", "-c", "4", "-m", "8"])
        .arg(format!("https://127.0.0.1:{}/load", listen.port()))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "h2load: {stdout}");
    assert!(stdout.contains("Application protocol: h2"), "{stdout}");
    assert!(
        stdout.contains("400 succeeded, 0 failed, 0 errored, 0 timeout"),
        "{stdout}\n{}",
        proc.logs()
    );
    assert!(stdout.contains("status codes: 400 2xx"), "{stdout}");
}

#[tokio::test]
async fn sighup_reloads_the_certificate_files_of_a_proxy_command() {
    let pki = TestCa::new("holdfast test CA");
    let (cert, _) = pki.leaf("site", &["localhost"]);
    let v1 = leaf_der(&cert);
    let up = TestUpstream::start(Behaviour::Echo).await;
    let (mut proc, listen) = proxy_process(&pki, &up).await;
    let s = tls_connect(listen, "localhost", pki.client(&["h2"])).await;
    assert_eq!(served_leaf(&s), v1);
    let (mut open, _conn) = Client::over(s, true).await;
    assert_eq!(open.send(Method::GET, "https", "/", "").await.status, 200);

    pki.leaf("site", &["localhost"]);
    let v2 = leaf_der(&cert);
    proc.signal(sys::SIGHUP).unwrap();
    assert!(
        proc.wait_for_log("certificates reloaded", SOON).await,
        "{}",
        proc.logs()
    );
    let s = tls_connect(listen, "localhost", pki.client(&["h2"])).await;
    assert_eq!(served_leaf(&s), v2);
    assert_eq!(open.send(Method::GET, "https", "/", "").await.status, 200);
}

#[tokio::test]
async fn upgrade_under_http2_load_fails_no_request() {
    let pki = TestCa::new("holdfast test CA");
    let (cert, key) = pki.leaf("site", &["localhost"]);
    let up = TestUpstream::start(Behaviour::Delay(Duration::from_millis(20))).await;
    let listen = free_addr();
    let admin = free_addr();
    let toml = format!(
        "[log]\naccess_log = false\n\n[admin]\nlisten = \"{admin}\"\n\n{}{}",
        proxy_to(&up.url()),
        tls_listener(&listen.to_string(), &cert, &key, "")
    );
    let mut proc = HoldfastProcess::spawn_with_env(
        Path::new(BIN),
        &["run", "--pid-file", "{dir}/holdfast.pid"],
        Some(&toml),
        &[("NO_COLOR", "1")],
    );
    assert!(
        proc.wait_for_log("admin listening", SOON).await,
        "{}",
        proc.logs()
    );
    let pid_file = proc.dir().join("holdfast.pid");

    // Four HTTP/2 clients send back to back; on GOAWAY they connect again, as
    // clients do, and count any request that failed after it was sent.
    let stop = Arc::new(tokio::sync::Notify::new());
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let connections = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (pki_client, stop, ok, failed, connections) = (
            pki.client(&["h2"]),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            connections.clone(),
        );
        tasks.push(tokio::spawn(async move {
            // Bounded in time and count, whatever the test does meanwhile.
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut sent = 0u32;
            let mut stopped = std::pin::pin!(stop.notified());
            'connect: while Instant::now() < deadline {
                let s = tls_connect(listen, "localhost", pki_client.clone()).await;
                connections.fetch_add(1, Relaxed);
                let (mut c, _conn) = Client::over(s, true).await;
                let mut req = c.request(Method::GET, "https", "/", "");
                loop {
                    sent += 1;
                    if sent > 100_000 || Instant::now() >= deadline {
                        break 'connect;
                    }
                    tokio::select! {
                        () = &mut stopped => break 'connect,
                        r = c.try_send(req) => match r {
                            Ok(a) if a.status == 200 => {
                                ok.fetch_add(1, Relaxed);
                                req = c.request(Method::GET, "https", "/", "");
                            }
                            Ok(_) | Err(None) => {
                                failed.fetch_add(1, Relaxed);
                                continue 'connect;
                            }
                            // Not sent: the connection is going away.
                            Err(Some(_)) => continue 'connect,
                        },
                    }
                }
            }
        }));
    }
    assert!(wait_until(SOON, || ok.load(Relaxed) > 50).await);
    let before = connections.load(Relaxed);
    proc.signal(sys::SIGUSR2).unwrap();
    assert!(
        proc.wait_for_log("new binary is ready", SOON).await,
        "{}",
        proc.logs()
    );
    let successor = read_pid_file(&pid_file).expect("the successor wrote the pid file");
    proc.kill_on_drop(successor);
    assert!(
        proc.wait_exit(SOON).await.is_some(),
        "the old process drained: {}",
        proc.logs()
    );
    let served = ok.load(Relaxed);
    assert!(wait_until(SOON, || ok.load(Relaxed) > served + 50).await);
    stop.notify_waiters();
    for t in tasks {
        let _ = timeout(SOON, t).await;
    }
    eprintln!(
        "upgrade under HTTP/2 load: {} requests over {} connections ({before} before SIGUSR2), {} failed",
        ok.load(Relaxed),
        connections.load(Relaxed),
        failed.load(Relaxed)
    );
    assert_eq!(failed.load(Relaxed), 0, "{}", proc.logs());
    assert!(
        connections.load(Relaxed) > before,
        "the clients moved to the successor"
    );
    let _ = sys::send_signal(successor, sys::SIGTERM);
    let _ = wait_until(SOON, || !sys::is_running(successor)).await;
}

// === HTTP/2: a response's end still queued in h2 when its stream ended ===

/// Opens an h2c connection whose stream window is `window` bytes, asks for `/`, and
/// reads for `hold` without granting more window (answering SETTINGS and PING). Then
/// opens the window and reads to the end. Returns (DATA bytes on stream 1, whether
/// stream 1 ended, frames seen).
async fn slow_window_get(
    addr: SocketAddr,
    window: u32,
    hold: Duration,
    during: impl FnOnce(),
) -> (usize, bool, Vec<Frame>) {
    use tokio::io::AsyncWriteExt;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut payload = vec![0, 4];
    payload.extend_from_slice(&window.to_be_bytes());
    let mut out = frames::PREFACE.to_vec();
    out.extend(
        Frame {
            kind: kind::SETTINGS,
            flags: 0,
            stream: 0,
            payload,
        }
        .encode(),
    );
    out.extend(frames::get(1, "http", "localhost", "/").encode());
    s.write_all(&out).await.unwrap();
    let (mut data, mut ended, mut seen) = (0usize, false, Vec::new());
    let mut during = Some(during);
    let on = |f: &Frame, data: &mut usize, ended: &mut bool| {
        if f.stream == 1 && (f.is(kind::DATA) || f.is(kind::HEADERS)) {
            if f.is(kind::DATA) {
                *data += f.payload.len();
            }
            if f.has(flag::END_STREAM) {
                *ended = true;
            }
        }
    };
    let until = Instant::now() + hold;
    loop {
        let f = match tokio::time::timeout_at(until, frames::read_frame(&mut s)).await {
            Err(_) => break,
            Ok(Ok(Some(f))) => f,
            Ok(_) => break,
        };
        if f.is(kind::SETTINGS) && !f.has(flag::ACK) {
            frames::send(&mut s, &[frames::settings_ack()])
                .await
                .unwrap();
        }
        if f.is(kind::PING) && !f.has(flag::ACK) {
            frames::send(&mut s, &[frames::ping_ack(&f.payload)])
                .await
                .unwrap();
        }
        if f.is(kind::HEADERS)
            && f.stream == 1
            && let Some(d) = during.take()
        {
            d();
        }
        on(&f, &mut data, &mut ended);
        seen.push(f);
    }
    // The client's application reads on: grant plenty of window.
    let wu = |stream| Frame {
        kind: kind::WINDOW_UPDATE,
        flags: 0,
        stream,
        payload: 1_000_000u32.to_be_bytes().to_vec(),
    };
    let _ = frames::send(&mut s, &[wu(0), wu(1)]).await;
    let until = Instant::now() + SOON;
    while let Ok(Ok(Some(f))) = tokio::time::timeout_at(until, frames::read_frame(&mut s)).await {
        on(&f, &mut data, &mut ended);
        seen.push(f);
        if ended {
            break;
        }
    }
    (data, ended, seen)
}

/// An h2c gateway (`header_timeout = "1s"`, plus `listener_keys`) in front of an
/// upstream that answers 4,000 bytes.
async fn gateway_for_slow_windows(listener_keys: &str) -> (TestUpstream, Gateway) {
    let up = TestUpstream::start(Behaviour::Fixed {
        status: 200,
        headers: vec![],
        body_len: 4000,
        framing: holdfast_test::Framing::ContentLength,
    })
    .await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\nheader_timeout = \"1s\"\n{listener_keys}",
        proxy_to(&up.url())
    ))
    .await;
    (up, gw)
}

/// A client that holds its stream window closed for longer than `header_timeout` gets
/// the end of its response once it opens the window.
#[tokio::test]
async fn http2_response_end_held_by_flow_control_arrives() {
    let (_up, gw) = gateway_for_slow_windows("").await;
    let (data, ended, seen) = slow_window_get(gw.addr, 1000, Duration::from_secs(3), || {}).await;
    assert!(
        ended && data == 4000,
        "data {data}, ended {ended}: {seen:?}"
    );
}

/// `max_requests_per_connection = 1`: GOAWAY at once. The stream's body has ended for
/// hyper (so it no longer counts as open) while 3,000 bytes wait in h2 for the client's
/// window; the connection is not cut `header_timeout` after the GOAWAY, and they are
/// delivered.
#[tokio::test]
async fn http2_response_end_held_by_flow_control_survives_goaway() {
    let (_up, gw) = gateway_for_slow_windows("max_requests_per_connection = 1\n").await;
    let (data, ended, seen) = slow_window_get(gw.addr, 1000, Duration::from_secs(3), || {}).await;
    assert!(
        ended && data == 4000,
        "data {data}, ended {ended}: {seen:?}"
    );
}

/// The same in a drain, which sends the GOAWAY as the response's head arrives.
#[tokio::test]
async fn http2_response_end_held_by_flow_control_survives_a_drain() {
    let (_up, gw) = gateway_for_slow_windows("").await;
    let addr = gw.addr;
    let drained = std::sync::Mutex::new(None);
    let (data, ended, seen) = slow_window_get(addr, 1000, Duration::from_secs(3), || {
        *drained.lock().unwrap() = Some(tokio::spawn(gw.drain()));
    })
    .await;
    let report = drained.lock().unwrap().take().unwrap();
    let report = timeout(SOON, report).await.unwrap().unwrap();
    assert!(
        ended && data == 4000,
        "data {data}, ended {ended}, drain {report:?}: {seen:?}"
    );
}

// === send_timeout on an HTTP/2 stream whose client grants no window ===

/// What a [`RawH2`] client saw on one stream.
#[derive(Debug, Default, Clone)]
struct StreamSeen {
    data: usize,
    ended: bool,
    /// RST_STREAM's error code.
    reset: Option<u32>,
    last_data_at: Option<Instant>,
    reset_at: Option<Instant>,
}

/// A raw HTTP/2 client with a stream window of its choosing: a task reads frames (so
/// that waits with a deadline never cut a frame in half), this side writes, answers
/// SETTINGS and PING, and tallies what each stream got.
struct RawH2<W> {
    w: W,
    frames: tokio::sync::mpsc::UnboundedReceiver<Frame>,
    reader: JoinHandle<()>,
    streams: std::collections::BTreeMap<u32, StreamSeen>,
}

impl<W> Drop for RawH2<W> {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn window_update(stream: u32, n: u32) -> Frame {
    Frame {
        kind: kind::WINDOW_UPDATE,
        flags: 0,
        stream,
        payload: n.to_be_bytes().to_vec(),
    }
}

/// A [`RawH2`] client on `s`: sends the preface and SETTINGS with `SETTINGS_INITIAL_WINDOW_SIZE = window`.
async fn raw_h2<S>(s: S, window: u32) -> RawH2<tokio::io::WriteHalf<S>>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(s);
    let mut payload = vec![0, 4];
    payload.extend_from_slice(&window.to_be_bytes());
    let mut out = frames::PREFACE.to_vec();
    out.extend(
        Frame {
            kind: kind::SETTINGS,
            flags: 0,
            stream: 0,
            payload,
        }
        .encode(),
    );
    tokio::io::AsyncWriteExt::write_all(&mut w, &out)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        while let Ok(Some(f)) = frames::read_frame(&mut r).await {
            if tx.send(f).is_err() {
                return;
            }
        }
    });
    RawH2 {
        w,
        frames: rx,
        reader,
        streams: Default::default(),
    }
}

impl<W: AsyncWrite + Unpin> RawH2<W> {
    async fn send(&mut self, f: &[Frame]) {
        frames::send(&mut self.w, f).await.unwrap();
    }

    fn stream(&self, id: u32) -> StreamSeen {
        self.streams.get(&id).cloned().unwrap_or_default()
    }

    /// Takes the next frame, by `until`: `false` at the deadline or when the
    /// connection ended.
    async fn next(&mut self, until: Instant) -> bool {
        let Ok(Some(f)) = tokio::time::timeout_at(until, self.frames.recv()).await else {
            return false;
        };
        if f.is(kind::SETTINGS) && !f.has(flag::ACK) {
            self.send(&[frames::settings_ack()]).await;
        }
        if f.is(kind::PING) && !f.has(flag::ACK) {
            self.send(&[frames::ping_ack(&f.payload)]).await;
        }
        let now = Instant::now();
        let seen = self.streams.entry(f.stream).or_default();
        if f.is(kind::DATA) {
            seen.data += f.payload.len();
            seen.last_data_at = Some(now);
        }
        if (f.is(kind::DATA) || f.is(kind::HEADERS)) && f.has(flag::END_STREAM) {
            seen.ended = true;
        }
        if f.is(kind::RST_STREAM) && f.payload.len() == 4 {
            seen.reset = Some(u32::from_be_bytes(f.payload[..4].try_into().unwrap()));
            seen.reset_at = Some(now);
        }
        true
    }

    /// Takes frames until `done` holds (`true`) or `until` passes (`false`).
    async fn until(&mut self, until: Instant, done: impl Fn(&Self) -> bool) -> bool {
        while !done(self) {
            if !self.next(until).await {
                return done(self);
            }
        }
        true
    }
}

/// The `up` address's entry in `/pools`.
async fn up_pool(gw: &Gateway) -> serde_json::Value {
    let resp = holdfast_test::KeepAliveClient::new(gw.admin)
        .get("/pools")
        .await
        .expect("GET /pools");
    let all: serde_json::Value = serde_json::from_slice(&resp.body).expect("/pools is JSON");
    all.as_array()
        .and_then(|ups| ups.iter().find(|u| u["name"] == "up"))
        .map(|u| u["addresses"][0].clone())
        .expect("upstream up in /pools")
}

/// README (`send_timeout`): an HTTP/2 client that opens a stream with a small window
/// and never sends WINDOW_UPDATE. hyper stops taking the response body while the
/// stream has no window, so the body's own deadlines (`read_idle`) are never looked at,
/// and the socket never stalls (other streams flow): the stream must still end about
/// `send_timeout` after it stopped taking data, with its upstream connection closed
/// (counted as a timeout), the stream reset (never ended as if complete), and the
/// other streams of the connection served.
#[tokio::test]
async fn http2_stream_without_window_is_cut_after_send_timeout() {
    let big = TestUpstream::start(Behaviour::StreamBody { len: 1 << 30 }).await;
    let small = TestUpstream::start(Behaviour::fixed(200, 4000)).await;
    let gw = start(&format!(
        "[[route]]\npath = \"/small\"\nupstream = \"small\"\n\n\
         [upstream.small]\naddresses = [\"{}\"]\n\n{}\
         [upstream.up.timeouts]\nread_idle = \"1s\"\n\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\nsend_timeout = \"1s\"\n",
        small.url(),
        proxy_to(&big.url())
    ))
    .await;
    let mut c = raw_h2(TcpStream::connect(gw.addr).await.unwrap(), 1000).await;
    c.send(&[frames::get(1, "http", "localhost", "/big")]).await;
    // Every timeout here is 1 s; 10 s is far past any of them.
    let deadline = Instant::now() + Duration::from_secs(10);
    assert!(
        c.until(deadline, |c| c.stream(1).data == 1000).await,
        "the first 1,000 bytes: {:?}",
        c.stream(1)
    );
    // Another stream on the same connection, with window, flows meanwhile.
    c.send(&[
        frames::get(3, "http", "localhost", "/small"),
        window_update(3, 1 << 20),
    ])
    .await;
    let cut = c
        .until(deadline, |c| {
            c.stream(1).reset.is_some() && c.stream(3).ended
        })
        .await;
    let (s1, s3) = (c.stream(1), c.stream(3));
    assert!(
        cut,
        "stream 1 still open 10 s after its window closed (send_timeout = 1s): \
         stream 1 {s1:?}, stream 3 {s3:?}, pool {}",
        up_pool(&gw).await
    );
    assert!(!s1.ended, "the cut response looks complete: {s1:?}");
    let stalled = s1.reset_at.unwrap() - s1.last_data_at.unwrap();
    assert!(
        stalled >= Duration::from_secs(1),
        "cut after {stalled:?}, before send_timeout"
    );
    assert_eq!((s3.data, s3.ended, s3.reset), (4000, true, None), "{s3:?}");
    big.wait_for_closed(1, SOON)
        .await
        .expect("the upstream connection closed");
    let closed_as_timeout = wait_until_async(SOON, || async {
        let pool = up_pool(&gw).await;
        pool["in_use"] == 0 && pool["closed"]["timeout"] == 1
    })
    .await;
    assert!(closed_as_timeout, "{}", up_pool(&gw).await);
    // The connection goes on serving.
    c.send(&[
        frames::get(5, "http", "localhost", "/small"),
        window_update(5, 1 << 20),
    ])
    .await;
    let until = Instant::now() + SOON;
    assert!(
        c.until(until, |c| c.stream(5).ended).await,
        "{:?}",
        c.stream(5)
    );
    assert_eq!(c.stream(5).data, 4000);
}

/// README (`send_timeout`): a stream whose client grants it no window at all is reset
/// `send_timeout` after, whatever its body: an upstream's that came whole in one piece
/// (its last; hyper holds it, and the response, until the window takes some of it) and
/// holdfast's own answer (a 404). Both were held for as long as the client kept the
/// connection open: the stream never ended, so the connection never went idle, no
/// `keepalive_timeout` closed it, and a drain waited for it until `drain.timeout`.
#[tokio::test]
async fn http2_stream_granted_no_window_is_cut_after_send_timeout_whatever_its_body() {
    let up = TestUpstream::start(Behaviour::fixed(200, 4000)).await;
    let gw = start(&format!(
        "[[route]]\nhost = \"localhost\"\nupstream = \"up\"\n\n\
         [upstream.up]\naddresses = [\"{}\"]\n\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\nsend_timeout = \"1s\"\n",
        up.url()
    ))
    .await;
    let mut c = raw_h2(TcpStream::connect(gw.addr).await.unwrap(), 0).await;
    let started = Instant::now();
    c.send(&[
        frames::get(1, "http", "localhost", "/"),
        frames::get(3, "http", "nowhere", "/"),
    ])
    .await;
    // Every timeout here is 1 s; 10 s is far past any of them.
    let deadline = started + Duration::from_secs(10);
    let cut = c
        .until(deadline, |c| {
            c.stream(1).reset.is_some() && c.stream(3).reset.is_some()
        })
        .await;
    let (s1, s3) = (c.stream(1), c.stream(3));
    assert!(
        cut,
        "streams still open 10 s after they were granted no window (send_timeout = 1s): \
         upstream's answer {s1:?}, holdfast's 404 {s3:?}"
    );
    for s in [&s1, &s3] {
        assert!(!s.ended && s.data == 0, "{s:?}");
        let after = s.reset_at.unwrap() - started;
        assert!(after >= Duration::from_secs(1), "cut after {after:?}");
    }
    assert_eq!(s1.reset, Some(code::CANCEL));
    // The connection goes on serving, and is idle again: none of its streams is held.
    c.send(&[
        window_update(0, 1 << 20),
        frames::get(5, "http", "localhost", "/"),
        window_update(5, 1 << 20),
    ])
    .await;
    let until = Instant::now() + SOON;
    assert!(
        c.until(until, |c| c.stream(5).ended).await,
        "{:?}",
        c.stream(5)
    );
    assert_eq!(c.stream(5).data, 4000);
}

/// Uploads on one HTTP/2 connection to an upstream with one connection
/// (`pool.max_connections = 1`): one at a time gets it, the others wait for it with
/// their bodies unread. A waiting stream's body still fills its window
/// (`initial_stream_window`) in holdfast, and with the connection's window (4 MiB by
/// default) that is counted against, four of them left none for the upload that held
/// the upstream: it stalled, waiting for a window the waiting ones held while they
/// waited for it, until `body_timeout` failed it (400) or `queue_timeout` them (503).
/// Every upload must be served in turn.
#[tokio::test]
async fn uploads_waiting_for_an_upstream_connection_do_not_starve_the_one_that_has_it() {
    const LEN: usize = 1_500_000;
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}[upstream.up.pool]\nmax_connections = 1\nmax_idle = 1\nqueue_timeout = \"30s\"\n\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\nbody_timeout = \"5s\"\n",
        proxy_to(&up.url())
    ))
    .await;
    let (c, _conn) = Client::over(TcpStream::connect(gw.addr).await.unwrap(), true).await;
    let Client::H2(send) = &c else { unreachable!() };
    let started = Instant::now();
    let uploads: Vec<_> = (0..6)
        .map(|i| {
            let mut send = send.clone();
            let req = c.request(Method::POST, "http", &format!("/{i}"), &"x".repeat(LEN));
            tokio::spawn(async move {
                let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((status, body.to_bytes().len()))
            })
        })
        .collect();
    let mut got = Vec::new();
    for u in uploads {
        got.push(
            timeout(Duration::from_secs(30), u)
                .await
                .map(|r| r.unwrap()),
        );
    }
    for (i, g) in got.iter().enumerate() {
        match g {
            Ok(Ok((status, len))) => {
                assert_eq!(*status, StatusCode::OK, "upload {i}: {got:?}");
                assert!(*len > LEN, "upload {i}: echoed {len} bytes");
            }
            _ => panic!("upload {i} after {:?}: {got:?}", started.elapsed()),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "served in {:?}: an upload waited for a body_timeout",
        started.elapsed()
    );
}

/// The other side of the same rule: over TLS (ALPN h2), a client that reads slowly but
/// steadily, granting 32 KiB of window every 300 ms (well within `send_timeout = 1s`),
/// gets the whole response, though it takes several times `send_timeout`.
#[tokio::test]
async fn http2_slow_but_steady_reader_is_not_cut_by_send_timeout() {
    const LEN: usize = 384 << 10;
    const GRANT: u32 = 32 << 10;
    let pki = TestCa::new("holdfast test CA");
    let (cert, key) = pki.leaf("site", &["localhost"]);
    let up = TestUpstream::start(Behaviour::fixed(200, LEN)).await;
    let gw = start(&format!(
        "{}[upstream.up.timeouts]\nread_idle = \"1s\"\n{}",
        proxy_to(&up.url()),
        tls_listener("127.0.0.1:0", &cert, &key, "send_timeout = \"1s\"")
    ))
    .await;
    let tls = tls_connect(gw.addr, "localhost", pki.client(&["h2"])).await;
    let mut c = raw_h2(tls, GRANT).await;
    // The connection's window is no limit; the stream's is.
    c.send(&[
        window_update(0, 1 << 30),
        frames::get(1, "https", "localhost", "/big"),
    ])
    .await;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(20);
    // One grant per 300 ms: at most LEN / GRANT of them are needed.
    for _ in 0..=LEN / GRANT as usize {
        let s = c.stream(1);
        if s.ended || s.reset.is_some() || Instant::now() >= deadline {
            break;
        }
        let next = Instant::now() + Duration::from_millis(300);
        while c.next(next.min(deadline)).await {}
        c.send(&[window_update(1, GRANT)]).await;
    }
    let until = Instant::now() + SOON;
    c.until(until, |c| c.stream(1).ended || c.stream(1).reset.is_some())
        .await;
    let s = c.stream(1);
    assert!(
        s.ended && s.data == LEN && s.reset.is_none(),
        "after {:?}: {s:?}, pool {}",
        start.elapsed(),
        up_pool(&gw).await
    );
    assert!(
        start.elapsed() > Duration::from_secs(2),
        "the reader was not slow: {:?}",
        start.elapsed()
    );
    assert_eq!(up_pool(&gw).await["closed"]["timeout"], 0);
}

// === header_timeout before the first HTTP/2 request, h2c sniff figures ===

/// Reads (and discards) until the server closes; how long that took, or `None` if it
/// did not close within `within`.
async fn closed_within<R: AsyncRead + Unpin>(s: &mut R, within: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let start = Instant::now();
    let deadline = start + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
}

/// README: `header_timeout` runs from accept (TLS handshake included) to the end of
/// the first head. A TLS client that negotiates h2 and then sends nothing (not even
/// the preface), or starts a request head and never finishes it, must be cut about
/// `header_timeout` after accept, as an HTTP/1.1 one is; not held for
/// `keepalive_timeout` (plus `header_timeout`).
#[tokio::test]
async fn http2_first_head_is_due_within_header_timeout() {
    let pki = TestCa::new("holdfast test CA");
    let (cert, key) = pki.leaf("site", &["localhost"]);
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}{}",
        proxy_to(&up.url()),
        tls_listener(
            "127.0.0.1:0",
            &cert,
            &key,
            "header_timeout = \"1s\"\nkeepalive_timeout = \"30s\"\nkeepalive_min_idle = \"0s\""
        )
    ))
    .await;
    let bound = Duration::from_secs(6);
    // HTTP/1.1 over TLS, nothing sent: cut at header_timeout.
    let mut h1 = tls_connect(gw.addr, "localhost", pki.client(&["http/1.1"])).await;
    let h1_cut = closed_within(&mut h1, bound).await;
    // h2 over TLS, nothing sent after the handshake.
    let mut silent = tls_connect(gw.addr, "localhost", pki.client(&["h2"])).await;
    let silent_cut = closed_within(&mut silent, bound).await;
    // h2 over TLS, a request head begun (HEADERS without END_HEADERS) and never ended.
    let mut partial = tls_connect(gw.addr, "localhost", pki.client(&["h2"])).await;
    frames::start(&mut partial).await.unwrap();
    let mut head = frames::get(1, "https", "localhost", "/");
    head.flags = flag::END_STREAM; // no END_HEADERS: a CONTINUATION is due
    frames::send(&mut partial, &[head]).await.unwrap();
    let partial_cut = closed_within(&mut partial, bound).await;
    assert!(h1_cut.is_some(), "HTTP/1.1 control: cut at header_timeout");
    assert!(
        silent_cut.is_some() && partial_cut.is_some(),
        "h2 clients with no complete first head must be cut about header_timeout (1s) \
         after accept; cut after: silent {silent_cut:?}, partial head {partial_cut:?} \
         (None: still open after {bound:?}; keepalive_timeout is 30s)"
    );
    // Each counted as a head timeout, the HTTP/2 ones when cut after their GOAWAY.
    assert_eq!(gw.state.clients.figures().head_timeout.load(Relaxed), 3);
}

/// README: `holdfast_client_errors_total{kind="head_timeout"}` counts connections with
/// "no complete head within header_timeout". On an `h2c = true` listener a client that
/// sends nothing, or a few bytes of the preface, is cut by the sniff's timeout, and
/// must be counted like the same client on a plain listener.
#[tokio::test]
async fn h2c_sniff_timeout_is_counted_as_head_timeout() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\nheader_timeout = \"1s\"\n",
        proxy_to(&up.url())
    ))
    .await;
    let figures = gw.state.clients.figures();
    for sent in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
        let before = figures.head_timeout.load(Relaxed);
        let mut raw = TcpStream::connect(gw.addr).await.unwrap();
        {
            use tokio::io::AsyncWriteExt;
            raw.write_all(sent).await.unwrap();
        }
        assert!(
            closed_within(&mut raw, SOON).await.is_some(),
            "cut after header_timeout"
        );
        assert!(
            wait_until(Duration::from_secs(2), || figures
                .head_timeout
                .load(Relaxed)
                > before)
            .await,
            "a client that sent {:?} and then waited past header_timeout is counted as \
             head_timeout (counted: {})",
            String::from_utf8_lossy(sent),
            figures.head_timeout.load(Relaxed)
        );
    }
}

/// `redirect_https_port = 0` cannot be a port to redirect to.
#[test]
fn redirect_https_port_zero_is_refused() {
    let text = "[[route]]\nupstream = \"up\"\n[upstream.up]\naddresses = [\"http://127.0.0.1:9\"]\n\
                [[listener]]\nlisten = \"127.0.0.1:0\"\nredirect_https = true\nredirect_https_port = 0\n";
    assert!(
        Config::from_toml(text, Path::new("test.toml")).is_err(),
        "redirect_https_port = 0 accepted: every redirect would go to https://HOST:0/"
    );
}

// === malformed request targets ===

/// An HPACK field: literal without indexing, with a literal name (RFC 7541 6.2.2),
/// or an indexed one when `name` is a static table index.
fn hpack_field(block: &mut Vec<u8>, name: Result<u8, &str>, value: &str) {
    match name {
        Ok(index) => block.push(index),
        Err(name) => {
            block.push(0);
            block.push(name.len() as u8);
            block.extend_from_slice(name.as_bytes());
        }
    }
    assert!(value.len() < 127, "value too long for this encoder");
    block.push(value.len() as u8);
    block.extend_from_slice(value.as_bytes());
}

/// A request target with no path is malformed (RFC 9113 8.3.1: every HTTP/2
/// request but CONNECT has a `:path`; RFC 9112 3.2.3: authority-form is for CONNECT
/// only), and so is `*` for another method than OPTIONS; an intermediary must not
/// forward one (RFC 9113 8.1.1). h2 lets an HTTP/2 request with neither `:path` nor
/// `:authority` through; holdfast sent it on as `GET /`, and an HTTP/1 `GET
/// example.test:80` as `GET /` to the route of `example.test`, whatever its `Host`.
#[tokio::test]
async fn a_request_target_that_is_not_a_path_is_refused_not_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\n",
        proxy_to(&up.url())
    ))
    .await;
    // HTTP/2: `:method GET`, `:scheme http`, then `fields`.
    let h2_status = |fields: Vec<(Result<u8, &'static str>, &'static str)>| async move {
        let s = TcpStream::connect(gw.addr).await.unwrap();
        let mut c = raw_h2(s, 65535).await;
        let mut block = vec![0x82, 0x86];
        for (name, value) in fields {
            hpack_field(&mut block, name, value);
        }
        c.send(&[Frame {
            kind: kind::HEADERS,
            flags: flag::END_STREAM | flag::END_HEADERS,
            stream: 1,
            payload: block,
        }])
        .await;
        let until = Instant::now() + SOON;
        while let Ok(Some(f)) = tokio::time::timeout_at(until, c.frames.recv()).await {
            if f.stream == 1 && (f.is(kind::HEADERS) || f.is(kind::RST_STREAM)) {
                return f.indexed_status();
            }
        }
        panic!("no answer on stream 1");
    };
    // No `:path`, no `:authority`: the host from `Host`.
    assert_eq!(h2_status(vec![(Err("host"), "localhost")]).await, Some(400));
    // `*` on a GET.
    assert_eq!(
        h2_status(vec![(Ok(1), "localhost"), (Ok(4), "*")]).await,
        Some(400)
    );
    // As a control, a path is served.
    assert_eq!(
        h2_status(vec![(Ok(1), "localhost"), (Ok(4), "/ok")]).await,
        Some(200)
    );
    for head in [
        "GET example.test:80 HTTP/1.1\r\nHost: localhost\r\n",
        "GET * HTTP/1.1\r\nHost: localhost\r\n",
    ] {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = Vec::new();
        timeout(SOON, s.read_to_end(&mut out))
            .await
            .expect("answered and closed in time")
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 400 "), "{head:?}: {out}");
    }
    assert_eq!(
        up.requests()
            .iter()
            .map(|r| r.target.as_str())
            .collect::<Vec<_>>(),
        ["/ok"],
        "only the control reached the upstream"
    );
}

/// A request whose first TLS record has only partly arrived when the connection's
/// idle time runs out has started arriving, as a partial head has on plain HTTP/1:
/// it is under `header_timeout`, not closed as idle. rustls takes the record's first
/// bytes off the socket and can decrypt nothing yet, so no look at the socket sees
/// them, and the connection was closed as idle with the client's request half sent.
/// The client (rustls driven by hand) sends its second request's first record 3
/// bytes at first, 300 ms into the idle time, and the rest after the 1 s keep-alive
/// timeout.
#[tokio::test]
async fn a_request_whose_first_tls_record_has_partly_arrived_is_not_closed_as_idle() {
    let pki = TestCa::new("holdfast test CA");
    let (cert, key) = pki.leaf("site", &["localhost"]);
    let up = TestUpstream::start(Behaviour::respond(|_| {
        holdfast_test::Reply::new(200).body("ok")
    }))
    .await;
    let gw = start(&format!(
        "{}{}",
        proxy_to(&up.url()),
        tls_listener(
            "127.0.0.1:0",
            &cert,
            &key,
            "keepalive_timeout = \"1s\"\nkeepalive_min_idle = \"0s\"\n"
        )
    ))
    .await;
    let config = pki.client(&["http/1.1"]);
    let addr = gw.addr;
    let second = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(SOON)).unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let mut tls = rustls::ClientConnection::new(config, name).unwrap();
        /// The response's text once it ends with the body `ok`; `None` at a close.
        fn response(
            tls: &mut rustls::ClientConnection,
            tcp: &mut std::net::TcpStream,
        ) -> Option<String> {
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.ends_with(b"\r\n\r\nok") {
                match rustls::Stream::new(tls, tcp).read(&mut buf) {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            Some(String::from_utf8_lossy(&got).into_owned())
        }
        let request = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n";
        rustls::Stream::new(&mut tls, &mut tcp)
            .write_all(request)
            .unwrap();
        let first = response(&mut tls, &mut tcp).expect("the first request is answered");
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        tls.writer().write_all(request).unwrap();
        let mut wire = Vec::new();
        while tls.wants_write() {
            tls.write_tls(&mut wire).unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        tcp.write_all(&wire[..3]).unwrap();
        std::thread::sleep(Duration::from_millis(1200));
        tcp.write_all(&wire[3..]).ok()?;
        response(&mut tls, &mut tcp)
    })
    .await
    .unwrap();
    let second = second.expect("the request begun before the idle close is answered");
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
}

/// RFC 9110 9.3.2: a response to HEAD has no content, and h2 leaves that to the
/// server (hyper's HTTP/1 server drops a HEAD response's body itself; its HTTP/2
/// server sends whatever the body holds). holdfast's own answers (no route, an
/// upstream that cannot be reached, ...) carry a text body, which went out as DATA on
/// an HTTP/2 HEAD, and a client that holds the server to it (h2's, here hyper's)
/// reset the stream with PROTOCOL_ERROR: the HEAD failed. The length the body would
/// have had is still said, as over HTTP/1.
#[tokio::test]
async fn a_head_request_over_http2_gets_no_data_from_holdfasts_own_answers() {
    let dead = free_addr();
    let up = TestUpstream::start(Behaviour::fixed(200, 1000)).await;
    let gw = start(&format!(
        "[[route]]\npath = \"/dead\"\nupstream = \"dead\"\n\n\
         [[route]]\npath = \"/up\"\nupstream = \"up\"\n\n\
         [upstream.dead]\naddresses = [\"http://{dead}\"]\n\n\
         [upstream.up]\naddresses = [\"{}\"]\n\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\n",
        up.url()
    ))
    .await;
    let (mut c, _conn) = Client::over(TcpStream::connect(gw.addr).await.unwrap(), true).await;
    for (path, want, length) in [
        ("/none", StatusCode::NOT_FOUND, None),
        ("/dead", StatusCode::BAD_GATEWAY, None),
        ("/up", StatusCode::OK, Some("1000")),
    ] {
        for method in [Method::HEAD, Method::GET] {
            let req = c.request(method.clone(), "http", path, "");
            let a = match timeout(SOON, c.try_send(req)).await {
                Ok(Ok(a)) => a,
                Ok(Err(_)) => panic!("{method} {path}: the request failed"),
                Err(_) => panic!("{method} {path}: no answer in time"),
            };
            assert_eq!(a.status, want, "{method} {path}");
            let said = a.headers.get("content-length").map(|v| v.to_str().unwrap());
            if method == Method::HEAD {
                assert_eq!(a.body, "", "{method} {path}");
                match length {
                    Some(l) => assert_eq!(said, Some(l), "{method} {path}"),
                    None => assert!(said.is_some(), "{method} {path}: a length is said"),
                }
            } else {
                assert!(!a.body.is_empty(), "{method} {path}");
            }
        }
    }
}
