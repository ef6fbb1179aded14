//! HTTP/1.1 proxying end to end on loopback: bodies and framing, header rules,
//! upgrades, request smuggling, routes, client-facing limits, error statuses, nginx as
//! a real upstream, and the access log.
//!
//! Most tests run holdfast in-process (`support::start`). The 1 GiB tests and the
//! access-log tests run the built binary, so that its memory and its log output are its
//! own. Upstreams are `holdfast_test::TestUpstream` where a scripted answer will do, and
//! small raw tokio servers here where the test needs the socket itself (a 101 that
//! then echoes bytes, a reset before any response byte, 1 GiB bodies that are never held
//! in memory).

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use holdfast_test::{
    Behaviour, BodyFraming, ClientRequest, Framing, HoldfastProcess, KeepAliveClient, Nginx,
    PeerClose, RawClient, Reply, Response, TestUpstream, is_pattern, pattern,
};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use support::{proxy_to, start};

/// Bound for every wait on an event that should happen promptly.
const WAIT: Duration = Duration::from_secs(5);
const GIB: u64 = 1 << 30;
/// Proxy memory allowed while 1 GiB streams through it.
const MAX_PROXY_RSS_KIB: u64 = 100 * 1024;

// === bodies and framing ===

/// hyper takes a response's last piece into its write buffer, which ends the
/// request, before that piece reaches the socket. Behind a client that reads slowly
/// the connection then looks idle while the response's end still waits to be sent,
/// and parking it (after 100 ms idle, the socket handed back from hyper) must wait
/// for the end to be written, not drop it with hyper. The binary runs on a listener
/// made here, with a small send buffer (connections inherit it), and the client has
/// a small receive buffer, so that the kernel holds well under the response whatever
/// the machine's TCP buffer sizes. The client reads nothing until hyper has taken the
/// response's end (its access line is written then), so the rest waits in hyper's
/// buffer, and nothing for longer than the park after that; then it reads it all.
/// Three clients in turn.
#[tokio::test]
async fn a_slow_reader_gets_the_whole_response() {
    // More than the kernel holds for a client that reads nothing (with these
    // buffers, under 80 KiB: with less, nothing is left in hyper's buffer), less than
    // that plus what hyper takes (over 112 KiB: with more, the body never ends).
    const LEN: usize = 96 << 10;
    let upstream = TestUpstream::start(Behaviour::respond(|_| {
        Reply::new(200).body(pattern(0, LEN))
    }))
    .await;
    let listener =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    listener.set_send_buffer_size(32 * 1024).expect("SO_SNDBUF");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    listener.bind(&any.into()).expect("bind");
    listener.listen(128).expect("listen");
    let addr = listener
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("bound address");
    let fds = format!("{addr}=0;");
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[listener]]\nlisten = \"{addr}\"\n\n{}",
        proxy_to(&upstream.url())
    );
    let proxy = HoldfastProcess::spawn_with_stdin(
        Path::new(env!("CARGO_BIN_EXE_holdfast")),
        &["run"],
        Some(&config),
        &[("HOLDFAST_LISTEN_FDS", &fds), ("NO_COLOR", "1")],
        std::process::Stdio::from(std::os::fd::OwnedFd::from(listener)),
    );
    assert!(
        proxy.wait_for_log("admin listening", WAIT).await,
        "holdfast did not start:\n{}",
        proxy.logs()
    );
    for client in 1..=3 {
        // The kernel doubles it: about 32 KiB, and no autotuning.
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(16 * 1024).expect("SO_RCVBUF");
        let mut s = socket.connect(addr).await.expect("connect");
        s.write_all(b"GET /big HTTP/1.1\r\nhost: a.test\r\n\r\n")
            .await
            .expect("request");
        // hyper has the response's last piece once its access line is written.
        let ended = holdfast_test::wait_until(WAIT, || {
            proxy.logs().matches("path=/big ").count() == client
        })
        .await;
        assert!(ended, "client {client}: no access line:\n{}", proxy.logs());
        // Idle well past the park (100 ms) with the end still in hyper's buffer: the
        // pause is the scenario.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        let deadline = Instant::now() + Duration::from_secs(10);
        let outcome = loop {
            let head_len = got.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
            if head_len.is_some_and(|h| got.len() >= h + LEN) {
                break "complete";
            }
            match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
                Ok(Ok(0)) => break "end of stream",
                Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Ok(Err(_)) => break "read error",
                Err(_) => break "stalled",
            }
        };
        let head_len = got
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a response head")
            + 4;
        let body = &got[head_len..];
        assert_eq!(body.len(), LEN, "client {client}: cut short ({outcome})");
        assert!(is_pattern(0, body));
        // The connection serves on (parked once the end was sent).
        s.write_all(b"GET /again HTTP/1.1\r\nhost: a.test\r\n\r\n")
            .await
            .expect("second request");
        let mut status = [0u8; 12];
        tokio::time::timeout(WAIT, s.read_exact(&mut status))
            .await
            .expect("a second response in time")
            .expect("a second response");
        assert_eq!(&status, b"HTTP/1.1 200");
    }
}

#[tokio::test]
async fn small_bodies_pass_byte_for_byte_both_ways() {
    // `/make/LEN/cl` and `/make/LEN/chunked` answer LEN pattern bytes; anything else
    // answers with the request body.
    let upstream = TestUpstream::start(Behaviour::respond(|req| {
        match req.target.strip_prefix("/make/") {
            Some(rest) => {
                let (len, framing) = rest.split_once('/').expect("/make/LEN/FRAMING");
                let framing = match framing {
                    "chunked" => Framing::Chunked,
                    _ => Framing::ContentLength,
                };
                Reply::new(200)
                    .body(pattern(0, len.parse().expect("a length")))
                    .framing(framing)
            }
            None => Reply::new(200).body(req.body.clone()),
        }
    }))
    .await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = KeepAliveClient::new(gw.addr);

    for len in [0, 1, 64 * 1024] {
        let body = pattern(0, len);

        let resp = client
            .send(&ClientRequest::post("/echo", body.clone()))
            .await
            .unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, body, "Content-Length upload of {len} bytes");
        let seen = upstream.requests().pop().unwrap();
        assert_eq!(seen.body, body, "upstream got the {len}-byte body");

        let resp = client
            .send(
                &ClientRequest::new("POST", "/echo")
                    .header("transfer-encoding", "chunked")
                    .body(chunked(&body, 1000)),
            )
            .await
            .unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, body, "chunked upload of {len} bytes");
        assert_eq!(upstream.requests().pop().unwrap().body, body);

        let resp = client.get(&format!("/make/{len}/cl")).await.unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, body, "Content-Length download of {len} bytes");
        assert_eq!(
            resp.header("content-length"),
            Some(len.to_string().as_str())
        );

        let resp = client.get(&format!("/make/{len}/chunked")).await.unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body, body, "chunked download of {len} bytes");
        if len > 0 {
            assert_eq!(resp.framing, BodyFraming::Chunked);
        }
    }
    // Every exchange on one client connection: the framing never went wrong.
    assert_eq!(client.connections_opened(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_upload_streams_with_bounded_proxy_memory() {
    let bulk = bulk_upstream().await;
    let (proxy, addr) = spawn_holdfast(&bulk_config(bulk.addr), &[]).await;

    for framing in [BodyFraming::Length(GIB), BodyFraming::Chunked] {
        let mut client = RawClient::connect(addr).await.unwrap();
        let head = match framing {
            BodyFraming::Chunked => "transfer-encoding: chunked".to_owned(),
            _ => format!("content-length: {GIB}"),
        };
        client
            .send(format!(
                "POST /sink HTTP/1.1\r\nhost: bulk.test\r\n{head}\r\n\r\n"
            ))
            .await
            .unwrap();
        write_pattern(client.stream(), GIB, framing == BodyFraming::Chunked)
            .await
            .unwrap();
        let resp = client.read_response(Duration::from_secs(60)).await.unwrap();
        assert_eq!(resp.status, 200, "{framing:?}: {}", resp.text());
        assert_eq!(
            resp.text(),
            format!("received {GIB} pattern ok"),
            "{framing:?} upload"
        );
    }
    assert_memory_bounded(&proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_download_streams_with_bounded_proxy_memory() {
    let bulk = bulk_upstream().await;
    let (proxy, addr) = spawn_holdfast(&bulk_config(bulk.addr), &[]).await;

    for (kind, expected) in [
        ("cl", BodyFraming::Length(GIB)),
        ("chunked", BodyFraming::Chunked),
    ] {
        let mut client = RawClient::connect(addr).await.unwrap();
        client
            .send(format!(
                "GET /source/{GIB}/{kind} HTTP/1.1\r\nhost: bulk.test\r\n\r\n"
            ))
            .await
            .unwrap();
        let mut check = PatternCheck::default();
        let resp = client
            .read_response_streaming("GET", Duration::from_secs(60), |b| check.feed(b))
            .await
            .unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.framing, expected, "{kind}");
        assert_eq!(resp.body_len, GIB, "{kind}");
        assert!(check.ok, "{kind}: the body differs from the pattern");
    }
    assert_memory_bounded(&proxy);
}

#[tokio::test]
async fn expect_100_continue_gets_100_then_the_response() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    client
        .send(
            "POST /upload HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n\
             content-length: 5\r\n\r\n",
        )
        .await
        .unwrap();
    // The body is held back until the 100 arrives, as a client that asked would.
    match client.wait_close(WAIT).await {
        PeerClose::Data(d) => assert!(
            d.starts_with(b"HTTP/1.1 100 Continue\r\n"),
            "{:?}",
            String::from_utf8_lossy(&d)
        ),
        other => panic!("expected 100 Continue, got {other:?}"),
    }
    client.send("hello").await.unwrap();
    let resp = client.read_response(WAIT).await.unwrap();
    assert_eq!(resp.status, 200);
    let echoed = resp.echoed().unwrap();
    assert_eq!(echoed.body, "hello");
    // holdfast answered the expectation itself; the upstream gets a plain request.
    assert_eq!(echoed.header("expect"), None);
}

#[tokio::test]
async fn head_gets_the_headers_and_no_body() {
    let upstream = TestUpstream::start(Behaviour::StreamBody { len: 1000 }).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = KeepAliveClient::new(gw.addr);

    let head = client.send(&ClientRequest::head("/file")).await.unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("1000"));
    assert_eq!(head.body_len, 0);
    assert_eq!(upstream.requests()[0].method, "HEAD");

    // Had a body followed the HEAD response, this response would be garbage.
    let get = client.get("/file").await.unwrap();
    assert_eq!(get.status, 200);
    assert_eq!(get.body_len, 1000);
    assert!(is_pattern(0, &get.body));
    assert_eq!(client.connections_opened(), 1);
}

#[tokio::test]
async fn no_content_and_not_modified_have_no_body() {
    let upstream = TestUpstream::start(Behaviour::respond(|req| match req.target.as_str() {
        "/204" => Reply::new(204).header("x-kind", "no-content"),
        // A 304 carries the representation's length but never a body.
        "/304" => Reply::new(304)
            .header("etag", "\"v1\"")
            .header("content-length", "1000"),
        _ => Reply::new(200).body("after"),
    }))
    .await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = KeepAliveClient::new(gw.addr);

    let resp = client.get("/204").await.unwrap();
    assert_eq!(resp.status, 204);
    assert_eq!(resp.header("x-kind"), Some("no-content"));
    assert_eq!(resp.header("transfer-encoding"), None);
    assert_eq!(resp.body_len, 0);

    let resp = client
        .send(&ClientRequest::get("/304").header("if-none-match", "\"v1\""))
        .await
        .unwrap();
    assert_eq!(resp.status, 304);
    assert_eq!(resp.header("etag"), Some("\"v1\""));
    assert_eq!(resp.header("transfer-encoding"), None);

    // Any body bytes after the 204 or the 304 would corrupt this response.
    let resp = client.get("/after").await.unwrap();
    assert_eq!((resp.status, resp.text().as_ref()), (200, "after"));
    assert_eq!(client.connections_opened(), 1);
}

#[tokio::test]
async fn trailers_pass_both_ways() {
    let upstream = TestUpstream::start(Behaviour::respond(|_| {
        Reply::new(200)
            .header("transfer-encoding", "chunked")
            .header("trailer", "x-sum")
            .body("2\r\nok\r\n0\r\nx-sum: abc\r\n\r\n")
    }))
    .await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    // Twice: a response that ends with trailers leaves its upstream connection
    // reusable like any other.
    // The second time `trailers` is one of several TE entries, which still counts.
    for te in ["trailers", "deflate;q=0.5, Trailers"] {
        client
            .send(&format!(
                "POST /t HTTP/1.1\r\nhost: x\r\nte: {te}\r\ntrailer: x-req-sum\r\n\
                 transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nx-req-sum: 42\r\n\r\n",
            ))
            .await
            .unwrap();
        let resp = client.read_response(WAIT).await.unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(resp.text(), "ok");
        assert_eq!(resp.trailers.get("x-sum"), Some("abc"), "{resp:?}");

        let seen = upstream.requests().pop().unwrap();
        assert_eq!(seen.body, "hello");
        assert_eq!(seen.headers.get("te"), Some("trailers"), "{te}");
        assert_eq!(seen.trailers.get("x-req-sum"), Some("42"), "{seen:?}");
    }
    assert_eq!(
        upstream.connections_accepted(),
        1,
        "the connection was reused"
    );
}

/// A response trailer section may carry fields that describe the upstream's
/// connection (`Keep-Alive`, `Connection`, `TE`...). They go no further than a
/// header of the same name would: an HTTP/2 client cannot be sent them at all (h2
/// refuses connection-specific fields in trailers, RFC 9113 8.2.2), and the stream,
/// its body sent whole, was reset instead of ended.
#[tokio::test]
async fn hop_by_hop_trailers_stop_here_and_an_http2_response_ends_whole() {
    use http_body_util::{BodyExt, Empty};
    let upstream = TestUpstream::start(Behaviour::respond(|_| {
        Reply::new(200)
            .header("transfer-encoding", "chunked")
            .header("trailer", "x-sum")
            .body(
                "2\r\nok\r\n0\r\nx-sum: abc\r\nkeep-alive: timeout=5\r\n\
                 connection: x-hop\r\nx-hop: 1\r\nte: gzip\r\ncontent-length: 2\r\n\r\n",
            )
    }))
    .await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(gw.addr).await.expect("connect"));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/t", gw.addr))
        .header("te", "trailers")
        .body(Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("in time")
        .expect("the whole body, ended, not reset");
    let trailers = body.trailers().cloned().expect("trailers");
    assert_eq!(body.to_bytes(), "ok");
    let names: Vec<&str> = trailers.keys().map(|n| n.as_str()).collect();
    assert_eq!(names, ["x-sum"], "{trailers:?}");
}

// === header rules ===

/// RFC 9110 6.5.1: a sender must not generate trailer fields that only mean something
/// in the header section (framing, routing, ...), and an upstream that merges trailers
/// into its headers (Apache's `MergeTrailers`; CVE-2013-5704) must not get, from a
/// trailer, what holdfast removes or replaces in the head: hop-by-hop and framing
/// fields, `Host`, and the forwarding fields of an untrusted client. Other trailers
/// pass, whether the body was kept for a retry or streamed.
#[tokio::test]
async fn request_trailers_cannot_carry_fields_holdfast_controls() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}[upstream.up.retry]\nreplay_body_limit = \"16\"\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    // Kept for a retry, then streamed.
    for data in ["hello", "0123456789abcdef0123456789abcdef"] {
        client
            .send(&format!(
                "POST /t HTTP/1.1\r\nhost: x\r\ntrailer: x-req-sum\r\n\
                 transfer-encoding: chunked\r\n\r\n{:x}\r\n{data}\r\n0\r\n\
                 x-req-sum: 42\r\nx-forwarded-for: 6.6.6.6\r\nforwarded: for=6.6.6.6\r\n\
                 x-real-ip: 6.6.6.6\r\nhost: evil.test\r\ncontent-length: 0\r\n\
                 connection: close\r\nkeep-alive: timeout=1\r\n\r\n",
                data.len()
            ))
            .await
            .unwrap();
        let resp = client.read_response(WAIT).await.unwrap();
        assert_eq!(resp.status, 200, "{data}");
        let seen = upstream.requests().pop().unwrap();
        assert_eq!(seen.body, data);
        let names: Vec<&str> = seen.trailers.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["x-req-sum"], "{data}: {seen:?}");
    }
}

/// A request's fields never show up in a response. holdfast builds a response's
/// fields in the map that held the request's on the same upstream connection, emptied
/// first (`HeadScratch::recycle`); this would catch one left full.
#[tokio::test]
async fn request_fields_never_reach_a_response() {
    let upstream = TestUpstream::start(Behaviour::respond(|_| {
        Reply::new(200).header("x-from-upstream", "1").body("ok")
    }))
    .await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = KeepAliveClient::new(gw.addr);
    for i in 0..3 {
        let resp = client
            .send(
                &ClientRequest::get(format!("/{i}"))
                    .header("x-request-only", "secret")
                    .header("authorization", "Bearer t"),
            )
            .await
            .unwrap();
        assert_eq!((resp.status, resp.text().as_ref()), (200, "ok"));
        assert_eq!(resp.header("x-from-upstream"), Some("1"), "response {i}");
        assert_eq!(resp.header("x-request-only"), None, "response {i}");
        assert_eq!(resp.header("authorization"), None, "response {i}");
        assert_eq!(resp.headers.len(), 5, "response {i}: {:?}", resp.headers);
    }
    assert_eq!(
        upstream.connections_accepted(),
        1,
        "one upstream connection"
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    const HOP: [&str; 9] = [
        "x-listed",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "connection",
    ];
    let upstream = TestUpstream::start(Behaviour::respond(|req| {
        let reply = Reply::new(200)
            .header("connection", "x-listed")
            .header("x-listed", "secret")
            .header("keep-alive", "timeout=30, max=7")
            .header("te", "trailers")
            .header("upgrade", "h2c")
            .header("proxy-connection", "keep-alive")
            .header("proxy-authenticate", "Basic realm=\"up\"")
            .header("proxy-authorization", "Basic dXA6dXA=")
            .header("x-kept", "yes");
        match req.target.as_str() {
            "/chunked" => reply
                .header("transfer-encoding", "chunked")
                .body("2\r\nok\r\n0\r\n\r\n"),
            // `Trailer` is dropped where no trailers can follow; a chunked message
            // that may carry them keeps it (see `trailers_pass_both_ways`).
            _ => reply.header("trailer", "x-foo").body(req.body.clone()),
        }
    }))
    .await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = KeepAliveClient::new(gw.addr);
    let hop_request = |target: &str| {
        ClientRequest::new("POST", target)
            .header("connection", "keep-alive, x-listed")
            .header("x-listed", "secret")
            .header("keep-alive", "timeout=5")
            .header("te", "gzip")
            .header("trailer", "x-foo")
            .header("upgrade", "h2c")
            .header("proxy-connection", "keep-alive")
            .header("proxy-authenticate", "Basic realm=\"client\"")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .header("x-kept", "yes")
    };

    let resp = client
        .send(&hop_request("/length").body("hello"))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "hello");
    let resp_chunked = client
        .send(
            &hop_request("/chunked")
                .header("transfer-encoding", "chunked")
                .body("5\r\nhello\r\n0\r\n\r\n"),
        )
        .await
        .unwrap();
    assert_eq!(resp_chunked.text(), "ok");

    for seen in upstream.requests() {
        for name in HOP {
            assert!(
                !seen.headers.contains(name),
                "{name} reached the upstream on {}: {:?}",
                seen.target,
                seen.headers
            );
        }
        assert_eq!(seen.headers.get("x-kept"), Some("yes"));
        assert_eq!(seen.body, "hello");
    }
    for resp in [&resp, &resp_chunked] {
        for name in HOP.into_iter().filter(|n| *n != "trailer") {
            // holdfast sends its own `Keep-Alive: timeout=N`; the upstream's must not pass.
            if name == "keep-alive" {
                let ka = resp.header("keep-alive").unwrap_or("");
                assert!(!ka.contains("max=7"), "upstream keep-alive passed: {ka}");
                continue;
            }
            assert!(
                !resp.headers.contains(name),
                "{name} reached the client: {:?}",
                resp.headers
            );
        }
        assert_eq!(resp.header("x-kept"), Some("yes"));
    }
    assert_eq!(resp.header("trailer"), None, "{:?}", resp.headers);
}

/// hyper undoes only chunked: a request or response with another transfer coding
/// would be passed on still encoded, without the hop-by-hop field that says so. A
/// request gets 501 and is not forwarded (RFC 9112 6.1), a response 502.
#[tokio::test]
async fn transfer_codings_other_than_chunked_are_refused_both_ways() {
    let upstream = TestUpstream::start(Behaviour::respond(|req| match req.target.as_str() {
        "/gzipped" => Reply::new(200)
            .header("transfer-encoding", "gzip, chunked")
            .body("2\r\nok\r\n0\r\n\r\n"),
        _ => Reply::new(200).body("fine"),
    }))
    .await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = KeepAliveClient::new(gw.addr);
    let upload = ClientRequest::new("POST", "/upload")
        .header("transfer-encoding", "gzip, chunked")
        .body("5\r\nhello\r\n0\r\n\r\n");
    let r = client.send(&upload).await.unwrap();
    assert_eq!(r.status, 501, "{}", r.text());
    let r = client.send(&ClientRequest::get("/gzipped")).await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    let r = client.send(&ClientRequest::get("/plain")).await.unwrap();
    assert_eq!(r.text(), "fine");
    let targets: Vec<String> = upstream.requests().into_iter().map(|r| r.target).collect();
    assert!(!targets.contains(&"/upload".to_string()), "{targets:?}");
}

/// Chunked applied twice is undone only once: the body would pass on still
/// chunk-framed, with nothing to say so. Refused both ways, like other codings.
#[tokio::test]
async fn chunked_applied_twice_is_refused_both_ways() {
    let upstream = TestUpstream::start(Behaviour::respond(|req| match req.target.as_str() {
        "/twice" => Reply::new(200)
            .header("transfer-encoding", "chunked, chunked")
            .body("6\r\n1\r\nA\r\n\r\n0\r\n\r\n"),
        "/two-fields" => Reply::new(200)
            .header("transfer-encoding", "chunked")
            .header("transfer-encoding", "chunked")
            .body("6\r\n1\r\nA\r\n\r\n0\r\n\r\n"),
        _ => Reply::new(200).body("fine"),
    }))
    .await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = KeepAliveClient::new(gw.addr);
    let upload = ClientRequest::new("POST", "/upload")
        .header("transfer-encoding", "chunked, chunked")
        .body("6\r\n1\r\nA\r\n\r\n0\r\n\r\n");
    let r = client.send(&upload).await.unwrap();
    assert_eq!(r.status, 501, "{}", r.text());
    for target in ["/twice", "/two-fields"] {
        let r = client.send(&ClientRequest::get(target)).await.unwrap();
        assert_eq!(r.status, 502, "{target}: {}", r.text());
    }
    let r = client.send(&ClientRequest::get("/plain")).await.unwrap();
    assert_eq!(r.text(), "fine");
    let targets: Vec<String> = upstream.requests().into_iter().map(|r| r.target).collect();
    assert!(!targets.contains(&"/upload".to_string()), "{targets:?}");
}

/// An absolute-form target with userinfo is refused (RFC 9110 4.2.4), not forwarded
/// with `user@host` as its Host.
#[tokio::test]
async fn userinfo_in_an_absolute_target_is_a_400() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    client
        .send("GET http://user@shop.test/x HTTP/1.1\r\nhost: shop.test\r\n\r\n")
        .await
        .unwrap();
    let r = client.read_response(WAIT).await.unwrap();
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(upstream.requests_seen(), 0);
}

/// An absolute-form target with a query and no path (`http://host?q`, RFC 3986 allows
/// the empty path, which HTTP reads as `/`) is sent on as `/?q`. Its path-and-query
/// as sent was `?q`, which holdfast refused as a bad target with 400.
#[tokio::test]
async fn an_absolute_target_with_a_query_and_no_path_goes_on_as_slash_and_the_query() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    client
        .send("GET http://shop.test?q=1 HTTP/1.1\r\nhost: shop.test\r\n\r\n")
        .await
        .unwrap();
    let r = client.read_response(WAIT).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let targets: Vec<String> = upstream.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/?q=1"]);
}

#[tokio::test]
async fn via_is_added_both_ways() {
    let upstream = TestUpstream::start(Behaviour::respond(|_| {
        Reply::new(200).header("via", "1.1 origin-cache")
    }))
    .await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = KeepAliveClient::new(gw.addr);
    let resp = client
        .send(&ClientRequest::get("/").header("via", "1.0 edge"))
        .await
        .unwrap();
    let seen = upstream.requests().pop().unwrap();
    let via: Vec<&str> = seen
        .headers
        .get_all("via")
        .filter_map(|v| std::str::from_utf8(v).ok())
        .collect();
    assert_eq!(via.join(", "), "1.0 edge, 1.1 holdfast");
    let via: Vec<&str> = resp
        .headers
        .get_all("via")
        .filter_map(|v| std::str::from_utf8(v).ok())
        .collect();
    assert_eq!(via.join(", "), "1.1 origin-cache, 1.1 holdfast");
}

#[tokio::test]
async fn forwarded_headers_are_added_and_forged_ones_replaced() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let plain = start(&proxy_to(&upstream.url())).await;
    let trusting = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let forged = ClientRequest::get("/")
        .header("host", "shop.test")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.test");
    let plain_request = ClientRequest::get("/").header("host", "shop.test");

    let echoed = |resp: Response| resp.echoed().unwrap();
    let e = echoed(send_one(plain.addr, &plain_request).await);
    assert_eq!(e.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(e.header("x-forwarded-proto"), Some("http"));
    assert_eq!(e.header("x-forwarded-host"), Some("shop.test"));

    // From a peer not in trusted_proxies, whatever the client claims is replaced.
    let e = echoed(send_one(plain.addr, &forged).await);
    assert_eq!(e.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(e.header("x-forwarded-proto"), Some("http"));
    assert_eq!(e.header("x-forwarded-host"), Some("shop.test"));

    // From a trusted proxy, its values are kept and the chain extended.
    let e = echoed(send_one(trusting.addr, &forged).await);
    assert_eq!(e.header("x-forwarded-for"), Some("6.6.6.6, 127.0.0.1"));
    assert_eq!(e.header("x-forwarded-proto"), Some("https"));
    assert_eq!(e.header("x-forwarded-host"), Some("evil.test"));
}

#[tokio::test]
async fn host_is_kept_or_rewritten_per_upstream() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let url = upstream.url();
    let gw = start(&format!(
        "[[route]]\npath = \"/keep\"\nupstream = \"keep\"\n\
         [[route]]\npath = \"/addr\"\nupstream = \"addr\"\n\
         [[route]]\npath = \"/literal\"\nupstream = \"literal\"\n\
         [upstream.keep]\naddresses = [\"{url}\"]\n\
         [upstream.addr]\naddresses = [\"{url}\"]\nhost_header = \"upstream\"\n\
         [upstream.literal]\naddresses = [\"{url}\"]\nhost_header = \"api.internal\"\n"
    ))
    .await;
    let mut client = KeepAliveClient::new(gw.addr);
    for (path, expected) in [
        ("/keep", "shop.test".to_owned()),
        ("/addr", upstream.addr().to_string()),
        ("/literal", "api.internal".to_owned()),
    ] {
        let resp = client
            .send(&ClientRequest::get(path).header("host", "shop.test"))
            .await
            .unwrap();
        let e = resp.echoed().unwrap();
        assert_eq!(e.header("host"), Some(expected.as_str()), "{path}");
    }
}

// === upgrades and smuggling ===

#[tokio::test]
async fn websocket_upgrade_is_passed_through() {
    // Answers 101 to an upgrade request, then echoes raw bytes until EOF.
    let upstream = raw_upstream(|stream| async move {
        let mut io = BufReader::new(stream);
        let Ok(Some(head)) = read_head(&mut io).await else {
            return;
        };
        let ok = header(&head, "upgrade") == Some("websocket")
            && header(&head, "connection").is_some_and(|c| c.eq_ignore_ascii_case("upgrade"))
            && header(&head, "sec-websocket-key") == Some("dGhlIHNhbXBsZSBub25jZQ==");
        let answer: &[u8] = if ok {
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
              sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
        } else {
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"
        };
        if io.get_mut().write_all(answer).await.is_err() || !ok {
            return;
        }
        let mut buf = [0u8; 4096];
        // Bounded by the peer: ends at its EOF.
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 || io.get_mut().write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = io.get_mut().shutdown().await;
    })
    .await;
    let gw = start(&proxy_to(&format!("http://{}", upstream.addr))).await;

    let mut client = RawClient::connect(gw.addr).await.unwrap();
    client
        .send(
            "GET /chat HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
             sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let resp = client.read_response(WAIT).await.unwrap();
    assert_eq!(resp.status, 101, "{resp:?}");
    assert_eq!(resp.header("upgrade"), Some("websocket"));
    assert_eq!(resp.header("connection"), Some("upgrade"));
    assert_eq!(
        resp.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );

    // Not HTTP any more: bytes go both ways as they are.
    let frame = b"\x81\x05hello not http\r\n\r\n";
    client.send(frame).await.unwrap();
    let echoed = read_exactly(&mut client, frame.len()).await;
    assert_eq!(echoed, frame);
    client.shutdown_write().await.unwrap();
    assert_eq!(client.wait_close(WAIT).await, PeerClose::Eof);
    // The upstream connection closed with its tunnel, counted so (it was counted
    // abandoned, as for a client gone mid-exchange).
    assert!(
        tunnel_closes_counted(&gw, "tunnel_closed").await,
        "{:#}",
        get_json(gw.admin, "/pools").await
    );
}

/// Waits (up to `WAIT`) until the one address of the one upstream counts one
/// connection closed for `reason`, and none for any other.
async fn tunnel_closes_counted(gw: &support::Gateway, reason: &str) -> bool {
    holdfast_test::wait_until_async(WAIT, || async {
        let pools = get_json(gw.admin, "/pools").await;
        let closed = &pools[0]["addresses"][0]["closed"];
        closed.as_object().is_some_and(|all| {
            all.iter()
                .all(|(r, n)| n.as_u64() == Some(u64::from(r == reason)))
        })
    })
    .await
}

/// A tunnel whose peers both went quiet would otherwise hold its client place and its
/// upstream connection forever: no byte either way for `timeouts.read_idle` closes
/// both sides.
#[tokio::test]
async fn a_silent_websocket_is_closed_after_read_idle() {
    let (upstream_closed, saw_upstream_close) = tokio::sync::oneshot::channel();
    let upstream_closed = std::sync::Mutex::new(Some(upstream_closed));
    let upstream = raw_upstream(move |stream| {
        let upstream_closed = upstream_closed.lock().unwrap().take();
        async move {
            let mut io = BufReader::new(stream);
            let Ok(Some(_)) = read_head(&mut io).await else {
                return;
            };
            let answer = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n";
            if io.get_mut().write_all(answer).await.is_err() {
                return;
            }
            // Says nothing more; reads until holdfast closes (bounded by the test's wait).
            let mut buf = [0u8; 64];
            let end = tokio::time::timeout(WAIT, io.read(&mut buf)).await;
            if let Some(tx) = upstream_closed {
                let _ = tx.send(matches!(end, Ok(Ok(0))));
            }
        }
    })
    .await;
    let gw = start(&format!(
        "{}[upstream.up.timeouts]\nread_idle = \"300ms\"\n",
        proxy_to(&format!("http://{}", upstream.addr))
    ))
    .await;
    let mut ws = RawClient::connect(gw.addr).await.unwrap();
    ws.send("GET /chat HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(ws.read_response(WAIT).await.unwrap().status, 101);
    assert_eq!(
        ws.wait_close(WAIT).await,
        PeerClose::Eof,
        "client side left open"
    );
    assert!(
        saw_upstream_close.await.unwrap(),
        "upstream side not closed within {WAIT:?}"
    );
    assert!(
        tunnel_closes_counted(&gw, "timeout").await,
        "{:#}",
        get_json(gw.admin, "/pools").await
    );
}

/// Each side of a tunnel may end its sending alone: the upstream's FIN reaches the
/// client while the client goes on sending, also when the upgrade request listed
/// `close` beside `Upgrade` in its `Connection`. That request was taken for one whose
/// client sends nothing more, whose close needs no half-close: the upstream's end of
/// the tunnel never reached the client, which waited for it until `read_idle`.
#[tokio::test]
async fn the_upstreams_half_close_reaches_the_client_through_a_tunnel() {
    for connection in ["Upgrade", "Upgrade, close"] {
        let (got_tx, got_rx) = tokio::sync::oneshot::channel();
        let got_tx = std::sync::Mutex::new(Some(got_tx));
        // Switches, sends "hello" and ends its sending; then reads until EOF.
        let upstream = raw_upstream(move |stream| {
            let got_tx = got_tx.lock().unwrap().take();
            async move {
                let mut io = BufReader::new(stream);
                let Ok(Some(_)) = read_head(&mut io).await else {
                    return;
                };
                let answer = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nhello";
                if io.get_mut().write_all(answer).await.is_err() {
                    return;
                }
                let _ = io.get_mut().shutdown().await;
                let mut got = Vec::new();
                // Bounded by the test's wait.
                let _ = tokio::time::timeout(WAIT, io.read_to_end(&mut got)).await;
                if let Some(tx) = got_tx {
                    let _ = tx.send(got);
                }
            }
        })
        .await;
        let gw = start(&proxy_to(&format!("http://{}", upstream.addr))).await;
        let mut ws = RawClient::connect(gw.addr).await.unwrap();
        ws.send(format!(
            "GET /chat HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: {connection}\r\n\r\n"
        ))
        .await
        .unwrap();
        let resp = ws.read_response(WAIT).await.unwrap();
        assert_eq!(resp.status, 101, "{connection}: {resp:?}");
        assert_eq!(read_exactly(&mut ws, 5).await, b"hello", "{connection}");
        assert_eq!(
            ws.wait_close(WAIT).await,
            PeerClose::Eof,
            "{connection}: the upstream's end of the tunnel reached the client"
        );
        ws.send(b"still here").await.unwrap();
        ws.shutdown_write().await.unwrap();
        assert_eq!(got_rx.await.unwrap(), b"still here", "{connection}");
    }
}

/// `Upgrade: h2c` (HTTP/1.1's upgrade to cleartext HTTP/2) is between the client and
/// holdfast: it is not passed on as an upgrade, where a lenient upstream that switched
/// would get a raw tunnel. The request is served as a plain one, without the field.
#[tokio::test]
async fn an_upgrade_to_h2c_is_served_as_a_plain_request() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let resp = send_one(
        gw.addr,
        &ClientRequest::get("/h2c")
            .header("connection", "Upgrade, HTTP2-Settings")
            .header("upgrade", "h2c")
            .header("http2-settings", "AAMAAABkAAQAAP__"),
    )
    .await;
    assert_eq!(resp.status, 200, "{resp:?}");
    let e = resp.echoed().expect("echoed by the upstream");
    assert_eq!(e.header("upgrade"), None, "Upgrade: h2c passed on");
    assert_eq!(e.header("http2-settings"), None);
}

#[tokio::test]
async fn ambiguous_requests_are_rejected_and_never_forwarded() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let cases: [(&str, &str); 4] = [
        (
            "two different content-lengths",
            "POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
        ),
        (
            "transfer-encoding without final chunked",
            "POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked, gzip\r\n\r\nhello",
        ),
        (
            "a chunk size that is not hex",
            "POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        ),
        (
            "chunk data longer than its size",
            "POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n\
             5\r\nhello, world\r\n0\r\n\r\n",
        ),
    ];
    for (what, request) in cases {
        let mut client = RawClient::connect(gw.addr).await.unwrap();
        client.send(request).await.unwrap();
        let resp = client.read_response(WAIT).await;
        let status = resp.as_ref().map(|r| r.status);
        assert_eq!(status, Ok(400), "{what}: {resp:?}");
    }
    assert_eq!(
        upstream.stats().connections_accepted,
        0,
        "an ambiguous request reached the upstream: {:?}",
        upstream.requests()
    );
}

/// RFC 9112 3.2: a request with more than one `Host`, a `Host` that is not a host
/// and port, or an HTTP/1.1 request with no `Host` (and no absolute target) gets 400
/// and never reaches an upstream: routing by one reading of it (the first `Host`)
/// while a server behind, or a cache in front, takes another is how requests reach
/// the wrong virtual host. HTTP/1.0 needs no `Host`; an absolute target names the
/// host itself.
#[tokio::test]
async fn a_missing_repeated_or_invalid_host_gets_400_and_is_never_forwarded() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let cases = [
        ("no Host", "GET /a HTTP/1.1\r\n\r\n"),
        (
            "two Hosts",
            "GET /a HTTP/1.1\r\nhost: a.test\r\nhost: b.test\r\n\r\n",
        ),
        ("a space", "GET /a HTTP/1.1\r\nhost: a b\r\n\r\n"),
        ("a path", "GET /a HTTP/1.1\r\nhost: a.test/b\r\n\r\n"),
        ("userinfo", "GET /a HTTP/1.1\r\nhost: u@a.test\r\n\r\n"),
    ];
    for (what, request) in cases {
        let mut client = RawClient::connect(gw.addr).await.unwrap();
        client.send(request).await.unwrap();
        let resp = client.read_response(WAIT).await;
        let status = resp.as_ref().map(|r| r.status);
        assert_eq!(status, Ok(400), "{what}: {resp:?}");
    }
    assert_eq!(
        upstream.requests_seen(),
        0,
        "a request with a bad Host reached the upstream: {:?}",
        upstream.requests()
    );
    for request in [
        "GET /a HTTP/1.0\r\n\r\n",
        "GET http://c.test/a HTTP/1.1\r\n\r\n",
        "GET /a HTTP/1.1\r\nhost: [::1]:8080\r\n\r\n",
    ] {
        let mut client = RawClient::connect(gw.addr).await.unwrap();
        client.send(request).await.unwrap();
        let resp = client.read_response(WAIT).await;
        assert!(
            resp.as_ref().is_ok_and(|r| r.status == 200),
            "{request:?}: {resp:?}"
        );
    }
}

/// hyper does not reject Content-Length with Transfer-Encoding: it applies RFC 9112
/// 6.3, letting the chunked framing win, dropping Content-Length and closing the
/// connection after the response. The upstream gets one unambiguous request, and what
/// was smuggled behind it is never read.
#[tokio::test]
async fn content_length_with_transfer_encoding_cannot_smuggle_a_request() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let (cl, te) = ("content-length: 30", "transfer-encoding: chunked");
    for (first, second) in [(cl, te), (te, cl)] {
        let mut client = RawClient::connect(gw.addr).await.unwrap();
        client
            .send(format!(
                "POST / HTTP/1.1\r\nhost: x\r\n{first}\r\n{second}\r\n\r\n\
                 0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"
            ))
            .await
            .unwrap();
        let resp = client.read_response(WAIT).await.unwrap();
        assert!(resp.headers.has_token("connection", "close"), "{resp:?}");
        assert_eq!(client.wait_close(WAIT).await, PeerClose::Eof);
    }
    let seen = upstream.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for r in seen {
        assert_eq!(r.target, "/");
        assert!(r.body.is_empty(), "{r:?}");
        assert!(!r.headers.contains("content-length"), "{r:?}");
    }
}

#[tokio::test]
async fn malformed_request_gets_400_and_serving_goes_on() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    for garbage in [
        &b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 not http\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nbad header line\r\n\r\n",
        b"GET /\x7f HTTP/1.1\r\nhost: x\r\n\r\n",
    ] {
        let mut client = RawClient::connect(gw.addr).await.unwrap();
        client.send(garbage).await.unwrap();
        let resp = client.read_response(WAIT).await.unwrap();
        assert_eq!(resp.status, 400, "{:?}", String::from_utf8_lossy(garbage));
        assert_eq!(client.wait_close(WAIT).await, PeerClose::Eof);
    }
    let resp = send_one(gw.addr, &ClientRequest::get("/still-here")).await;
    assert_eq!(resp.status, 200);
    assert_eq!(upstream.requests_seen(), 1);
}

// === routes ===

#[tokio::test]
async fn routes_match_host_and_path_most_specific_first() {
    let a = TestUpstream::start(Behaviour::Echo).await;
    let b = TestUpstream::start(Behaviour::Echo).await;
    let c = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "[[route]]\npath = \"/app\"\nupstream = \"a\"\n\
         [[route]]\npath = \"/app/api\"\nstrip_prefix = true\nupstream = \"b\"\n\
         [[route]]\nhost = \"shop.test\"\npath = \"/app\"\nupstream = \"c\"\n\
         [upstream.a]\naddresses = [\"{}\"]\n\
         [upstream.b]\naddresses = [\"{}\"]\n\
         [upstream.c]\naddresses = [\"{}\"]\n",
        a.url(),
        b.url(),
        c.url()
    ))
    .await;
    let mut client = KeepAliveClient::new(gw.addr);
    let mut get = async |host: &str, target: &str| {
        client
            .send(&ClientRequest::get(target).header("host", host))
            .await
            .unwrap()
    };

    assert_eq!(get("other.test", "/app/page").await.status, 200);
    assert_eq!(get("other.test", "/app/api/users?id=1").await.status, 200);
    assert_eq!(get("shop.test", "/app/api/users").await.status, 200);
    assert_eq!(get("SHOP.test:8080", "/app").await.status, 200);
    for (host, target) in [("other.test", "/apps"), ("shop.test", "/other")] {
        let resp = get(host, target).await;
        assert_eq!(resp.status, 404, "{host}{target}");
        assert!(resp.text().contains("no route"), "{}", resp.text());
    }

    let targets =
        |u: &TestUpstream| -> Vec<String> { u.requests().into_iter().map(|r| r.target).collect() };
    assert_eq!(targets(&a), ["/app/page"]);
    // The longer prefix wins, and its prefix is stripped.
    assert_eq!(targets(&b), ["/users?id=1"]);
    // An exact host beats any host-less route, whatever their paths.
    assert_eq!(targets(&c), ["/app/api/users", "/app"]);
}

// === client-facing limits ===

#[tokio::test]
async fn idle_client_connection_closes_after_keepalive_timeout_but_not_before_min_idle() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let listener = |timeout: &str, min_idle: &str| {
        format!(
            "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nkeepalive_timeout = \"{timeout}\"\n\
             keepalive_min_idle = \"{min_idle}\"\n",
            proxy_to(&upstream.url())
        )
    };
    let short = start(&listener("500ms", "100ms")).await;
    let floored = start(&listener("300ms", "1500ms")).await;

    // The slow head keeps the connection reading past the idle timeout, so the idle
    // deadline that follows is computed while a head timer is pending.
    let (short_idle, slow_head_idle, floored_idle) = tokio::join!(
        idle_until_closed(short.addr, None),
        idle_until_closed(short.addr, Some(Duration::from_millis(700))),
        idle_until_closed(floored.addr, None)
    );
    for idle in [short_idle, slow_head_idle] {
        assert!(
            idle >= Duration::from_millis(400) && idle < Duration::from_secs(3),
            "keepalive_timeout 500ms closed after {short_idle:?}, {slow_head_idle:?}"
        );
    }
    assert!(
        floored_idle >= Duration::from_millis(1400) && floored_idle < Duration::from_secs(4),
        "keepalive_min_idle 1500ms, timeout 300ms closed after {floored_idle:?}"
    );
}

#[tokio::test]
async fn keep_alive_timeout_is_advertised_below_the_real_one() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let default = start(&proxy_to(&upstream.url())).await;
    let ten = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nkeepalive_timeout = \"10s\"\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let resp = send_one(default.addr, &ClientRequest::get("/")).await;
    assert_eq!(resp.keep_alive_timeout(), Some(54), "{:?}", resp.headers);
    let resp = send_one(ten.addr, &ClientRequest::get("/")).await;
    assert_eq!(resp.keep_alive_timeout(), Some(9), "{:?}", resp.headers);
}

#[tokio::test]
async fn slowloris_header_is_cut_at_header_timeout() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nheader_timeout = \"500ms\"\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    let started = Instant::now();
    client.send("GET / HTTP/1.1\r\n").await.unwrap();
    let slow = b"x-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut closed = None;
    // One byte every 100 ms: a head that would take 5 s.
    for byte in slow {
        if client.send([*byte]).await.is_err() {
            closed = Some(started.elapsed());
            break;
        }
        match client.wait_close(Duration::from_millis(100)).await {
            PeerClose::StillOpen => {}
            PeerClose::Eof | PeerClose::Reset | PeerClose::Error(_) => {
                closed = Some(started.elapsed());
                break;
            }
            PeerClose::Data(d) => {
                // A 408 is fine too; the connection must still end.
                assert!(d.starts_with(b"HTTP/1.1 408"), "{d:?}");
            }
        }
    }
    let closed = closed.expect("a byte-by-byte head was never cut");
    assert!(
        closed >= Duration::from_millis(400) && closed < Duration::from_secs(2),
        "header_timeout 500ms cut the head after {closed:?}"
    );
    assert_eq!(upstream.stats().connections_accepted, 0);
}

/// Some clients send a CRLF after a request body; RFC 9112 (2.2) has servers ignore
/// empty lines before a request line. Alone they start no request: the connection
/// stays under the idle rules (here a 5 s keep-alive timeout), not cut at the
/// `header_timeout` of a head that has begun, and serves the next request.
#[tokio::test]
async fn a_stray_crlf_between_requests_does_not_start_a_head() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nheader_timeout = \"300ms\"\n\
         keepalive_timeout = \"5s\"\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let mut client = RawClient::connect(gw.addr).await.expect("connect");
    client
        .send_request(&ClientRequest::post("/", "body"))
        .await
        .expect("request");
    let resp = client.read_response(WAIT).await.expect("response");
    assert_eq!(resp.status, 200);
    client.send("\r\n").await.expect("stray CRLF");
    assert_eq!(
        closed_within(&mut client, Duration::from_secs(1)).await,
        None,
        "cut at header_timeout for a CRLF"
    );
    client
        .send_request(&ClientRequest::get("/next"))
        .await
        .expect("next request");
    let resp = client.read_response(WAIT).await.expect("next response");
    assert_eq!(resp.status, 200);
}

/// A parked connection woken by a stray CRLF gets a new hyper connection holding just
/// that line. When a drain then closes idle connections, it is closed too, promptly:
/// not left open until the drain's timeout because hyper, holding bytes, does not end
/// at the graceful shutdown.
#[tokio::test]
async fn a_connection_woken_by_a_stray_crlf_still_closes_in_a_drain() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nheader_timeout = \"300ms\"\n\
         keepalive_min_idle = \"0s\"\n\
         [drain]\npre_delay = \"0s\"\nidle_close_after = \"100ms\"\ntimeout = \"20s\"\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let mut client = RawClient::connect(gw.addr).await.expect("connect");
    client
        .send_request(&ClientRequest::get("/"))
        .await
        .expect("request");
    assert_eq!(
        client.read_response(WAIT).await.expect("response").status,
        200
    );
    // Idle for the 100 ms after which it parks: wait until it has.
    gw.wait_metric("holdfast_client_parked_connections", 1.0, WAIT)
        .await;
    client.send("\r\n").await.expect("stray CRLF");
    // Woken by it (it parks again only after another 100 ms idle): the drain must
    // find a woken connection, not the parked one it would close anyway.
    gw.wait_metric("holdfast_client_parked_connections", 0.0, WAIT)
        .await;
    gw.send(holdfast::server::Control::Drain).await;
    assert!(
        closed_within(&mut client, Duration::from_secs(5))
            .await
            .is_some(),
        "still open 5 s into the drain"
    );
}

/// In a drain, an idle connection is closed once quiet for `drain.idle_close_after`,
/// or for the keep-alive timeout holdfast advertised if that is shorter: the client
/// was told it may not reuse the connection past it, so waiting longer keeps the drain
/// going for nothing. `keepalive_timeout = 3s` advertises 2 s; `idle_close_after` is
/// 30 s; the connection goes at about 2 s, not 30.
#[tokio::test]
async fn a_drain_closes_an_idle_connection_at_the_advertised_timeout_if_shorter() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nkeepalive_timeout = \"3s\"\n\
         keepalive_min_idle = \"0s\"\n\
         [drain]\npre_delay = \"0s\"\nidle_close_after = \"30s\"\ntimeout = \"60s\"\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let mut client = RawClient::connect(gw.addr).await.expect("connect");
    client
        .send_request(&ClientRequest::get("/"))
        .await
        .expect("request");
    let resp = client.read_response(WAIT).await.expect("response");
    assert_eq!(resp.keep_alive_timeout(), Some(2), "{:?}", resp.headers);
    gw.send(holdfast::server::Control::Drain).await;
    let took = closed_within(&mut client, Duration::from_secs(5)).await;
    assert!(
        took.is_some(),
        "still open 5 s into the drain; advertised 2 s, idle_close_after 30 s"
    );
}

/// A request that reached a parked connection's socket before the drain began is
/// answered (with `Connection: close`), not dropped with the connection the drain
/// closes. The drain's wake-up comes before tokio's reactor has seen the request (this
/// runtime has one thread: the test sends the request and the drain, then yields), so
/// the connection looked idle and was closed with the request unread in its socket:
/// the client, which sent before any FIN, got none of a response.
#[tokio::test]
async fn a_request_already_at_a_parked_connection_when_the_drain_starts_is_answered() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nkeepalive_min_idle = \"0s\"\n\
         [drain]\npre_delay = \"0s\"\nidle_close_after = \"100ms\"\ntimeout = \"20s\"\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let mut client = RawClient::connect(gw.addr).await.expect("connect");
    client
        .send_request(&ClientRequest::get("/first"))
        .await
        .expect("request");
    assert_eq!(
        client.read_response(WAIT).await.expect("response").status,
        200
    );
    gw.wait_metric("holdfast_client_parked_connections", 1.0, WAIT)
        .await;
    // Idle for longer than `idle_close_after`: the drain closes it at once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    client
        .send_request(&ClientRequest::get("/second"))
        .await
        .expect("request");
    gw.send(holdfast::server::Control::Drain).await;
    let resp = client
        .read_response(WAIT)
        .await
        .expect("the request sent before the drain is answered");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.headers.get("connection"), Some("close"));
    assert_eq!(upstream.requests_seen(), 2);
}

/// Waits (bounded by `within`) for holdfast to end the connection; a 408 before the
/// close is fine. Returns how long that took, or `None` if it stayed open.
async fn closed_within(client: &mut RawClient, within: Duration) -> Option<Duration> {
    let started = Instant::now();
    loop {
        let left = within.checked_sub(started.elapsed())?;
        match client.wait_close(left).await {
            PeerClose::StillOpen => return None,
            PeerClose::Data(d) => assert!(d.starts_with(b"HTTP/1.1 408"), "{d:?}"),
            PeerClose::Eof | PeerClose::Reset | PeerClose::Error(_) => {
                return Some(started.elapsed());
            }
        }
    }
}

/// The first head is due `header_timeout` after accept: time a client spends before
/// its first byte (here on an h2c listener, which waits for it to tell HTTP/2 from
/// HTTP/1; a TLS handshake alike) is not given again for the head.
#[tokio::test]
async fn first_head_is_due_header_timeout_after_accept() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\nheader_timeout = \"2s\"\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    let accepted = Instant::now();
    // A slow client: 1.5 s before its first byte, then half a head and nothing more.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    client.send("GET / HTTP/1.1\r\nx-slow: a").await.unwrap();
    let closed = closed_within(&mut client, Duration::from_secs(5))
        .await
        .map(|_| accepted.elapsed())
        .expect("a head that never completes is cut");
    assert!(
        closed >= Duration::from_millis(1800) && closed < Duration::from_secs(3),
        "header_timeout 2s from accept cut the head after {closed:?}"
    );
    assert_eq!(upstream.stats().connections_accepted, 0);
}

/// On a listener whose idle connections do not park (h2c; TLS alike) the timer of an
/// idle keep-alive connection is set for the idle timeout; a head that starts
/// arriving is still due `header_timeout` after its first byte.
#[tokio::test]
async fn head_started_on_an_idle_connection_is_cut_at_header_timeout() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\n\
         keepalive_timeout = \"30s\"\nheader_timeout = \"500ms\"\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    client.send_request(&ClientRequest::get("/")).await.unwrap();
    let resp = client.read_response(Duration::from_secs(5)).await.unwrap();
    assert_eq!(resp.status, 200);
    client.send("GET / HTTP/1.1\r\nx-slow: a").await.unwrap();
    let closed = closed_within(&mut client, Duration::from_secs(5))
        .await
        .expect(
            "a head begun on an idle connection is cut at header_timeout, not the idle timeout",
        );
    assert!(closed >= Duration::from_millis(400), "cut after {closed:?}");
}

/// A half head that came pipelined behind a request is read while that request is
/// served, so the connection looks idle afterwards: the idle close must still end
/// it (hyper has not begun that message), or a client could hold it forever.
#[tokio::test]
async fn closing_connection_with_a_half_pipelined_head_still_ends() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\nkeepalive_timeout = \"1s\"\n\
         keepalive_min_idle = \"0s\"\nheader_timeout = \"1s\"\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    // One write: a whole request, then half of the next one, never finished.
    client
        .send("GET / HTTP/1.1\r\nHost: a.test\r\n\r\nGET / HTTP/1.1\r\nx-slow: a")
        .await
        .unwrap();
    let resp = client.read_response(Duration::from_secs(5)).await.unwrap();
    assert_eq!(resp.status, 200);
    // Idle close after 1 s.
    let closed = closed_within(&mut client, Duration::from_secs(6)).await;
    assert!(closed.is_some(), "the connection never ended");
}

#[tokio::test]
async fn oversized_head_gets_431() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nmax_header_bytes = \"1KiB\"\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let big = "a".repeat(2048);
    let resp = send_one(gw.addr, &ClientRequest::get("/").header("x-big", big)).await;
    assert_eq!(resp.status, 431);
    // Just under the limit still passes.
    let fits = "a".repeat(700);
    let resp = send_one(gw.addr, &ClientRequest::get("/").header("x-fits", fits)).await;
    assert_eq!(resp.status, 200);
    assert_eq!(upstream.requests_seen(), 1);
}

#[tokio::test]
async fn oversized_body_gets_413() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let url = upstream.url();
    // Bodies are buffered for retries by default; with one attempt they stream.
    let gw = start(&format!(
        "[[route]]\npath = \"/buffered\"\nupstream = \"buffered\"\n\
         [[route]]\npath = \"/streamed\"\nupstream = \"streamed\"\n\
         [upstream.buffered]\naddresses = [\"{url}\"]\n\
         [upstream.streamed]\naddresses = [\"{url}\"]\nretry.attempts = 1\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = \"1KiB\"\n"
    ))
    .await;
    let body = pattern(0, 2048);
    for path in ["/buffered", "/streamed"] {
        let resp = send_one(gw.addr, &ClientRequest::post(path, body.clone())).await;
        assert_eq!(resp.status, 413, "{path} Content-Length: {}", resp.text());
        let resp = send_one(
            gw.addr,
            &ClientRequest::new("POST", path)
                .header("transfer-encoding", "chunked")
                .body(chunked(&body, 512)),
        )
        .await;
        assert_eq!(resp.status, 413, "{path} chunked: {}", resp.text());
        let resp = send_one(gw.addr, &ClientRequest::post(path, pattern(0, 1024))).await;
        assert_eq!(resp.status, 200, "{path}: a body at the limit passes");
    }
    assert_eq!(upstream.requests_seen(), 2, "{:?}", upstream.requests());
}

/// A client that sent `Connection: close` may still be sending its body when holdfast
/// answers early (here a 413 for a declared length over the limit). Closing with that
/// body unread would send a reset, which can reach the client before the answer and
/// fails its next write; holdfast half-closes and reads on until the client closes, as
/// for any other early answer.
#[tokio::test]
async fn an_early_answer_to_a_closing_client_still_uploading_is_not_a_reset() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}retry.attempts = 1\n[[listener]]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = \"1KiB\"\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(
        b"POST / HTTP/1.1\r\nhost: a.test\r\nconnection: close\r\n\
          content-length: 209715200\r\n\r\n",
    )
    .await
    .expect("head");
    // The client keeps sending its body for a while (well within the linger).
    let chunk = vec![b'x'; 16 * 1024];
    for i in 0..30 {
        if let Err(e) = s.write_all(&chunk).await {
            panic!("body write {i} failed: {e} (the connection was reset)");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got))
        .await
        .expect("holdfast closes after its answer")
        .expect("read the answer");
    assert!(
        got.starts_with(b"HTTP/1.1 413"),
        "{}",
        String::from_utf8_lossy(&got)
    );
}

/// An upstream response with both Transfer-Encoding and Content-Length is framed by
/// Transfer-Encoding; the Content-Length must not reach the client (RFC 9112 6.3),
/// which would frame the body by it and take a cut one for complete.
#[tokio::test]
async fn a_content_length_beside_transfer_encoding_is_not_passed_on() {
    let upstream = raw_upstream(|s| async move {
        let mut io = BufReader::new(s);
        if let Ok(Some(_)) = read_head(&mut io).await {
            let _ = io
                .get_mut()
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
                      b\r\nhello world\r\n0\r\n\r\n",
                )
                .await;
            // Keeps the connection open: only the framing may end the body.
            std::future::pending::<()>().await;
        }
    })
    .await;
    let gw = start(&proxy_to(&format!("http://{}", upstream.addr))).await;
    let resp = send_one(gw.addr, &ClientRequest::get("/")).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "hello world");
    assert_eq!(
        resp.headers.get("content-length"),
        None,
        "{:?}",
        resp.headers
    );
}

/// A request asking to switch protocols but carrying a body (`curl --http2 -d` on
/// plain HTTP: `Upgrade: h2c` on a POST) is passed on as a plain request with its
/// body, not as an upgrade without it.
#[tokio::test]
async fn an_upgrade_request_with_a_body_keeps_its_body() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let resp = send_one(
        gw.addr,
        &ClientRequest::post("/form", "hello")
            .header("connection", "Upgrade, HTTP2-Settings")
            .header("upgrade", "h2c")
            .header("http2-settings", "AAMAAABkAAQCAAAAAAIAAAAA"),
    )
    .await;
    assert_eq!(resp.status, 200);
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(&seen[0].body[..], b"hello", "{:?}", seen[0]);
    assert_eq!(seen[0].headers.get("upgrade"), None);
}

/// CONNECT asks for a tunnel, which a reverse proxy does not open: 501, and nothing
/// reaches the upstream (forwarded, it lost its target and its tunnel).
#[tokio::test]
async fn connect_is_refused_with_501() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let resp = send_one(
        gw.addr,
        &ClientRequest::new("CONNECT", "example.com:443").header("host", "example.com:443"),
    )
    .await;
    assert_eq!(resp.status, 501, "{}", resp.text());
    assert_eq!(upstream.stats().connections_accepted, 0);
}

/// HTTP/2 sends each cookie in a field of its own (RFC 9113 8.2.3); an HTTP/1.1
/// upstream gets them joined in one `Cookie` field, or a server reading one line
/// would lose the rest (a session cookie among them).
#[tokio::test]
async fn http2_cookies_reach_an_http1_upstream_in_one_field() {
    use http_body_util::Empty;
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nh2c = true\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(gw.addr).await.expect("connect"));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/c", gw.addr))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Empty::<bytes::Bytes>::new())
        .expect("request");
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), 200);
    let seen = upstream.requests();
    let cookies: Vec<&[u8]> = seen[0].headers.get_all("cookie").collect();
    assert_eq!(cookies, [&b"a=1; b=2"[..]]);
}

#[tokio::test]
async fn oversized_declared_body_is_refused_before_reaching_the_upstream() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}retry.attempts = 1\n[[listener]]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = \"1KiB\"\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let resp = send_one(gw.addr, &ClientRequest::post("/", pattern(0, 2048))).await;
    assert_eq!(resp.status, 413);
    assert_eq!(upstream.stats().connections_accepted, 0);
}

#[tokio::test]
async fn nth_request_on_a_connection_gets_connection_close() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nmax_requests_per_connection = 3\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    for n in 1..=3 {
        client
            .send_request(&ClientRequest::get(format!("/{n}")))
            .await
            .unwrap();
        let resp = client.read_response(WAIT).await.unwrap();
        assert_eq!(resp.status, 200);
        assert_eq!(
            resp.headers.has_token("connection", "close"),
            n == 3,
            "response {n}: {:?}",
            resp.headers
        );
    }
    assert_eq!(client.wait_close(WAIT).await, PeerClose::Eof);
}

#[tokio::test]
async fn connections_over_the_listener_limit_wait_until_one_closes() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nmax_connections = 2\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut c = RawClient::connect(gw.addr).await.unwrap();
        c.send_request(&ClientRequest::get("/")).await.unwrap();
        assert_eq!(c.read_response(WAIT).await.unwrap().status, 200);
        open.push(c);
    }
    // The third connects (the kernel queues it) but is not served.
    let mut third = RawClient::connect(gw.addr).await.unwrap();
    third
        .send_request(&ClientRequest::get("/third"))
        .await
        .unwrap();
    assert_eq!(
        third.wait_close(Duration::from_millis(500)).await,
        PeerClose::StillOpen
    );
    assert_eq!(upstream.requests_seen(), 2);
    // One closes; the third is served.
    drop(open.pop());
    let resp = third.read_response(WAIT).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.echoed().unwrap().target, "/third");
}

/// A connection upgraded to a WebSocket is still a client connection: it keeps its
/// place under `max_connections` until it closes, although hyper is done with it.
#[tokio::test]
async fn an_upgraded_connection_counts_against_max_connections() {
    // Answers 101, then echoes raw bytes until EOF; any other request gets 200.
    let upstream = raw_upstream(|stream| async move {
        let mut io = BufReader::new(stream);
        let Ok(Some(head)) = read_head(&mut io).await else {
            return;
        };
        if header(&head, "upgrade").is_none() {
            let _ = io
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
            return;
        }
        let answer = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n";
        if io.get_mut().write_all(answer).await.is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        // Bounded by the peer: ends at its EOF.
        while let Ok(n) = io.read(&mut buf).await {
            if n == 0 || io.get_mut().write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    })
    .await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nmax_connections = 1\n",
        proxy_to(&format!("http://{}", upstream.addr))
    ))
    .await;
    let mut ws = RawClient::connect(gw.addr).await.unwrap();
    ws.send("GET /chat HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(ws.read_response(WAIT).await.unwrap().status, 101);
    ws.send(b"ping").await.unwrap();
    assert_eq!(read_exactly(&mut ws, 4).await, b"ping");
    // The listener is full: a second client waits in the kernel's queue.
    let mut second = RawClient::connect(gw.addr).await.unwrap();
    second
        .send_request(&ClientRequest::get("/second"))
        .await
        .unwrap();
    assert_eq!(
        second.wait_close(Duration::from_millis(500)).await,
        PeerClose::StillOpen,
        "served past max_connections while a WebSocket is open"
    );
    // The WebSocket ends; the second client is served.
    ws.shutdown_write().await.unwrap();
    assert_eq!(ws.wait_close(WAIT).await, PeerClose::Eof);
    drop(ws);
    let resp = second.read_response(WAIT).await.unwrap();
    assert_eq!(resp.status, 200);
}

// === errors toward the client ===

#[tokio::test]
async fn refused_upstream_gets_502() {
    let closed = holdfast_test::free_addr();
    let gw = start(&proxy_to(&format!("http://{closed}"))).await;
    let resp = send_one(gw.addr, &ClientRequest::get("/")).await;
    assert_error(&resp, 502, "connection_refused");
}

#[tokio::test]
async fn reset_before_the_response_gets_502() {
    // Reads the request, then resets the connection without a byte of response.
    let upstream = raw_upstream(|stream| async move {
        let mut io = BufReader::new(stream);
        if let Ok(Some(_)) = read_head(&mut io).await {
            let _ = socket2::SockRef::from(io.get_ref()).set_linger(Some(Duration::ZERO));
        }
    })
    .await;
    let gw = start(&proxy_to(&format!("http://{}", upstream.addr))).await;
    let resp = send_one(gw.addr, &ClientRequest::get("/")).await;
    assert_error(&resp, 502, "connection_terminated");
}

/// A reset after the response head cannot become a 502 any more; the client must see
/// the response cut short, never a complete one (with Content-Length the framing shows
/// it; with chunked framing only holdfast can, by not sending the last chunk).
#[tokio::test]
async fn reset_mid_body_is_not_passed_off_as_a_complete_response() {
    let with_length = TestUpstream::start(Behaviour::ResetMidBody).await;
    // Two chunks of a chunked body, then a reset.
    let chunked = raw_upstream(|stream| async move {
        let mut io = BufReader::new(stream);
        if let Ok(Some(_)) = read_head(&mut io).await {
            let _ = io
                .get_mut()
                .write_all(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
                      5\r\nhello\r\n6\r\n world\r\n",
                )
                .await;
            let _ = socket2::SockRef::from(io.get_ref()).set_linger(Some(Duration::ZERO));
        }
    })
    .await;
    for url in [with_length.url(), format!("http://{}", chunked.addr)] {
        let gw = start(&proxy_to(&url)).await;
        let mut client = RawClient::connect(gw.addr).await.unwrap();
        client.send_request(&ClientRequest::get("/")).await.unwrap();
        let err = client.read_response(WAIT).await.unwrap_err();
        assert!(!err.is_timeout(), "{url}: {err}");
        assert_eq!(err.phase, holdfast_test::Phase::MidResponse, "{url}: {err}");
    }
}

/// An HTTP/1.0 client has no chunked coding: a body of unknown length reaches it
/// delimited by the connection's close. Cut short by the upstream (a close in the
/// middle of a chunked body), it must not end with a FIN, which is that framing's
/// "complete": the client would take the first part for the whole response (a
/// truncated file saved as good). The connection is reset instead.
#[tokio::test]
async fn a_cut_body_to_an_http_1_0_client_ends_in_a_reset_not_a_clean_close() {
    let upstream = raw_upstream(|stream| async move {
        let mut io = BufReader::new(stream);
        if let Ok(Some(_)) = read_head(&mut io).await {
            // One chunk, then a clean close with no last chunk.
            let _ = io
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .await;
        }
    })
    .await;
    let gw = start(&proxy_to(&format!("http://{}", upstream.addr))).await;
    for request in [
        "GET /a HTTP/1.0\r\n\r\n",
        "GET /a HTTP/1.0\r\nconnection: keep-alive\r\n\r\n",
    ] {
        let mut client = RawClient::connect(gw.addr).await.unwrap();
        client.send(request).await.unwrap();
        let err = client.read_response(WAIT).await.unwrap_err();
        assert!(err.is_reset(), "{request:?}: {err}");
    }
    // A whole body of unknown length still ends with the close, cleanly.
    let whole = raw_upstream(|stream| async move {
        let mut io = BufReader::new(stream);
        if let Ok(Some(_)) = read_head(&mut io).await {
            let _ = io
                .get_mut()
                .write_all(
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
                )
                .await;
        }
    })
    .await;
    let gw = start(&proxy_to(&format!("http://{}", whole.addr))).await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    client.send("GET /a HTTP/1.0\r\n\r\n").await.unwrap();
    let resp = client.read_response(WAIT).await.unwrap();
    assert_eq!(&resp.body[..], b"hello", "{resp:?}");
}

/// An upstream that answers before it has read the request body (a 413 for an
/// upload) ends the exchange early: the client gets the answer, the connection is
/// closed, since the request on it was cut short, and that close is holdfast's
/// doing, not evidence that the upstream limits requests per connection.
#[tokio::test]
async fn an_early_response_closes_the_connection_without_teaching_a_request_limit() {
    const LEN: usize = 16 << 20;
    let upstream = raw_upstream(|stream| async move {
        let mut io = BufReader::new(stream);
        // Never reads a body: answers every head at once.
        while let Ok(Some(_)) = read_head(&mut io).await {
            let reply = b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 5\r\n\r\nnope!";
            if io.get_mut().write_all(reply).await.is_err() {
                return;
            }
        }
    })
    .await;
    let gw = start(&proxy_to(&format!("http://{}", upstream.addr))).await;
    for _ in 0..2 {
        let (mut read, mut write) = TcpStream::connect(gw.addr).await.unwrap().into_split();
        let writer = tokio::spawn(async move {
            let head = format!("POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: {LEN}\r\n\r\n");
            write.write_all(head.as_bytes()).await?;
            let piece = vec![b'a'; 64 * 1024];
            for _ in 0..LEN / piece.len() {
                write.write_all(&piece).await?;
            }
            std::io::Result::Ok(())
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.ends_with(b"nope!") {
            match tokio::time::timeout(WAIT, read.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                other => panic!("no 413 for the client: {other:?}, got {got:?}"),
            }
        }
        assert!(
            got.starts_with(b"HTTP/1.1 413"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        writer.abort();
    }
    let pools = get_json(gw.admin, "/pools").await;
    let address = &pools[0]["addresses"][0];
    assert_eq!(address["closed"]["error"], 2, "{address:#}");
    assert_eq!(
        address["closed"]["closed_by_upstream_idle"], 0,
        "{address:#}"
    );
    assert!(address["learned_max_requests"].is_null(), "{address:#}");
}

async fn get_json(addr: SocketAddr, path: &str) -> serde_json::Value {
    let mut client = RawClient::connect(addr).await.unwrap();
    client
        .send_request(&ClientRequest::get(path))
        .await
        .unwrap();
    let resp = client.read_response(WAIT).await.unwrap();
    serde_json::from_slice(&resp.body).unwrap()
}

#[tokio::test]
async fn garbage_from_the_upstream_gets_502() {
    let upstream = TestUpstream::start(Behaviour::Garbage).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let resp = send_one(gw.addr, &ClientRequest::get("/")).await;
    assert_error(&resp, 502, "http_protocol_error");
}

#[tokio::test]
async fn full_queue_gets_503() {
    let upstream = TestUpstream::start(Behaviour::Hang).await;
    let gw = start(&format!(
        "{}[upstream.up.pool]\nmax_connections = 1\nmax_idle = 1\nqueue_size = 0\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let addr = gw.addr;
    let _hanging = tokio::spawn(async move {
        let _ = KeepAliveClient::new(addr)
            .with_timeout(Duration::from_secs(60))
            .get("/hang")
            .await;
    });
    upstream.wait_for_requests(1, WAIT).await.unwrap();
    let resp = send_one(gw.addr, &ClientRequest::get("/")).await;
    assert_error(&resp, 503, "connection_limit_reached");
    assert_eq!(upstream.requests_seen(), 1);
}

#[tokio::test]
async fn upstream_timeout_gets_504() {
    let upstream = TestUpstream::start(Behaviour::Hang).await;
    let gw = start(&format!(
        "{}[upstream.up.timeouts]\nresponse_headers = \"300ms\"\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let started = Instant::now();
    let resp = send_one(gw.addr, &ClientRequest::get("/")).await;
    assert_error(&resp, 504, "http_response_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
}

/// `timeouts.response_headers` is the upstream's time to answer once it has the
/// request. A body that streams (longer than `retry.replay_body_limit`) from a client
/// slower than that, within `body_timeout`, used to be timed from its head: the
/// client got 504 while its upload was still arriving (with the defaults, every
/// upload taking over 60 s), and the upstream a cut body. Now the time counts from
/// the body's end: the upload is answered, and an upstream that then says nothing
/// still gets its 504, `response_headers` after the body's end.
#[tokio::test]
async fn a_slow_upload_is_timed_for_its_answer_from_its_end() {
    const FIRST: usize = 70 * 1024;
    const PIECE: usize = 1000;
    const PIECES: usize = 3;
    for (behaviour, status) in [(Behaviour::Echo, 200), (Behaviour::Hang, 504)] {
        let upstream = TestUpstream::start(behaviour).await;
        let gw = start(&format!(
            "{}[upstream.up.timeouts]\nresponse_headers = \"1s\"\n",
            proxy_to(&upstream.url())
        ))
        .await;
        let mut client = RawClient::connect(gw.addr).await.expect("connect");
        let head = format!(
            "POST /upload HTTP/1.1\r\nhost: a.test\r\ncontent-length: {}\r\n\r\n",
            FIRST + PIECES * PIECE
        );
        client.send(head).await.expect("head");
        client.send(vec![b'x'; FIRST]).await.expect("first part");
        // The rest comes slowly: the pieces' gaps add up to more than
        // `response_headers`, each well within `body_timeout`.
        for _ in 0..PIECES {
            tokio::time::sleep(Duration::from_millis(600)).await;
            client.send(vec![b'y'; PIECE]).await.expect("a piece");
        }
        let ended = Instant::now();
        let resp = client.read_response(WAIT).await.expect("an answer");
        assert_eq!(resp.status, status, "{}", resp.text());
        if status == 200 {
            let echoed = resp.echoed().expect("echoed");
            assert_eq!(echoed.body.len(), FIRST + PIECES * PIECE);
        } else {
            assert_error(&resp, 504, "http_response_timeout");
            assert!(
                ended.elapsed() >= Duration::from_millis(900),
                "504 {:?} after the body's end, before response_headers",
                ended.elapsed()
            );
        }
    }
}

// === a real upstream ===

#[tokio::test]
async fn nginx_serves_a_static_file_through_holdfast() {
    let www = holdfast_test::tempdir();
    let file = pattern(0, 200_000);
    std::fs::write(www.path().join("file.bin"), &file).unwrap();
    let nginx = Nginx::start(&format!(
        "server {{\n    listen 127.0.0.1:{{port}};\n    root {};\n}}",
        www.path().display()
    ))
    .await;
    let gw = start(&proxy_to(&nginx.url())).await;
    let mut client = KeepAliveClient::new(gw.addr);

    let resp = client.get("/file.bin").await.unwrap();
    assert_eq!(resp.status, 200);
    assert!(
        resp.header("server")
            .is_some_and(|s| s.starts_with("nginx"))
    );
    assert_eq!(resp.body, file);
    let etag = resp.header("etag").expect("nginx sends an ETag").to_owned();

    let resp = client
        .send(&ClientRequest::get("/file.bin").header("if-none-match", etag))
        .await
        .unwrap();
    assert_eq!(resp.status, 304);

    let resp = client
        .send(&ClientRequest::head("/file.bin"))
        .await
        .unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-length"), Some("200000"));

    let resp = client.get("/missing").await.unwrap();
    assert_eq!(resp.status, 404);
    assert_eq!(client.connections_opened(), 1);
}

// === access log ===

#[tokio::test]
async fn access_log_has_one_line_per_request() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let (proxy, addr) = spawn_holdfast(&binary_config(&upstream.url(), "text"), &[]).await;
    let mut client = KeepAliveClient::new(addr);
    assert_eq!(client.get("/first?x=1").await.unwrap().status, 200);
    let second = client
        .send(&ClientRequest::post("/second", "body"))
        .await
        .unwrap();
    assert_eq!(second.status, 200);
    assert!(
        proxy.wait_for_log("/second", WAIT).await,
        "{}",
        proxy.logs()
    );

    let logs = proxy.logs();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("holdfast::access"))
        .collect();
    assert_eq!(lines.len(), 2, "{logs}");
    let address = upstream.addr().to_string();
    for (line, method, path, conn) in [
        (lines[0], "GET", "/first?x=1", "new"),
        (lines[1], "POST", "/second", "reused"),
    ] {
        let field =
            |name: &str| text_field(line, name).unwrap_or_else(|| panic!("{name} in {line}"));
        assert_eq!(field("method"), method, "{line}");
        assert_eq!(field("path"), path, "{line}");
        assert_eq!(field("status"), "200", "{line}");
        assert_eq!(field("route"), "route[0]", "{line}");
        assert_eq!(field("upstream"), "up", "{line}");
        assert_eq!(field("address"), address, "{line}");
        assert_eq!(field("conn"), conn, "{line}");
        assert_eq!(field("retries"), "0", "{line}");
        for ms in ["total_ms", "ttfb_ms"] {
            let v: f64 = field(ms).parse().unwrap();
            assert!(v >= 0.0, "{line}");
        }
    }
}

/// A request that got no connection (every one busy past `queue_timeout`: 503) is
/// logged with `conn="-"`, not as one sent on a new connection.
#[tokio::test]
async fn access_log_says_no_connection_for_a_request_that_waited_out_the_queue() {
    let upstream = TestUpstream::start(Behaviour::Hang).await;
    let config = format!(
        "{}\n[upstream.up.pool]\nmax_connections = 1\nmax_idle = 1\nqueue_timeout = \"200ms\"\n",
        binary_config(&upstream.url(), "text")
    );
    let (proxy, addr) = spawn_holdfast(&config, &[]).await;
    // Holds the one connection: never answered.
    let held = tokio::spawn(async move {
        KeepAliveClient::new(addr)
            .with_timeout(WAIT)
            .get("/held")
            .await
    });
    upstream
        .wait_for_requests(1, WAIT)
        .await
        .expect("the first request reached the upstream");
    let resp = send_one(addr, &ClientRequest::get("/queued")).await;
    assert_eq!(resp.status, 503, "{resp:?}");
    assert!(
        proxy.wait_for_log("/queued", WAIT).await,
        "{}",
        proxy.logs()
    );
    let logs = proxy.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("holdfast::access") && l.contains("/queued"))
        .unwrap_or_else(|| panic!("no access line for /queued: {logs}"));
    assert_eq!(text_field(line, "status").as_deref(), Some("503"), "{line}");
    assert_eq!(text_field(line, "conn").as_deref(), Some("-"), "{line}");
    held.abort();
}

/// GET /a then /b on one keep-alive connection through holdfast (JSON log) to an
/// upstream that behaves as given; returns the upstream and the two access lines.
async fn two_json_access_lines(behaviour: Behaviour) -> (TestUpstream, Vec<serde_json::Value>) {
    let upstream = TestUpstream::start(behaviour).await;
    let (proxy, addr) = spawn_holdfast(&binary_config(&upstream.url(), "json"), &[]).await;
    let mut client = KeepAliveClient::new(addr);
    assert_eq!(client.get("/a").await.unwrap().status, 200);
    assert_eq!(client.get("/b").await.unwrap().status, 200);
    assert!(proxy.wait_for_log("\"/b\"", WAIT).await, "{}", proxy.logs());

    let logs = proxy.logs();
    let mut access = Vec::new();
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["target"] == "holdfast::access" {
            access.push(v);
        }
    }
    assert_eq!(access.len(), 2, "{logs}");
    (upstream, access)
}

#[tokio::test]
async fn access_log_can_be_json() {
    let (upstream, access) = two_json_access_lines(Behaviour::Echo).await;
    for (v, path, conn) in [(&access[0], "/a", "new"), (&access[1], "/b", "reused")] {
        assert_eq!(v["method"], "GET", "{v}");
        assert_eq!(v["path"], path, "{v}");
        assert_eq!(v["status"], 200, "{v}");
        assert_eq!(v["route"], "route[0]", "{v}");
        assert_eq!(v["upstream"], "up", "{v}");
        assert_eq!(v["address"], upstream.addr().to_string(), "{v}");
        assert_eq!(v["conn"], conn, "{v}");
        assert_eq!(v["retries"], 0, "{v}");
        assert!(v["total_ms"].as_f64().is_some_and(|t| t >= 0.0), "{v}");
        assert!(v["ttfb_ms"].as_f64().is_some_and(|t| t >= 0.0), "{v}");
    }
}

/// `ttfb_ms` is the upstream's time to answer, on a new and on a reused connection
/// (the answer is dated as its first bytes are read; an earlier answer's date on the
/// same connection must not stand in for it).
#[tokio::test]
async fn access_log_ttfb_is_the_upstreams_time_to_answer() {
    const DELAY: Duration = Duration::from_millis(200);
    let (_upstream, access) = two_json_access_lines(Behaviour::Delay(DELAY)).await;
    for (v, conn) in access.iter().zip(["new", "reused"]) {
        assert_eq!(v["conn"], conn, "{v}");
        let ttfb = v["ttfb_ms"].as_f64().unwrap_or(-1.0);
        let total = v["total_ms"].as_f64().unwrap_or(-1.0);
        assert!(
            ttfb >= DELAY.as_millis() as f64,
            "ttfb below the upstream's delay: {v}"
        );
        assert!(ttfb <= total, "ttfb past the total: {v}");
    }
}

/// `access_log = false` (or `holdfast::access=off` in the level) leaves no access
/// line, while other lines at the same level are still written.
#[tokio::test]
async fn access_log_off_writes_no_access_line() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    for (log, how) in [
        ("access_log = false\n", "access_log = false"),
        ("level = \"info,holdfast::access=off\"\n", "level"),
    ] {
        let config =
            binary_config(&upstream.url(), "text").replacen("[log]\n", &format!("[log]\n{log}"), 1);
        let (mut proxy, addr) = spawn_holdfast(&config, &[]).await;
        assert_eq!(
            send_one(addr, &ClientRequest::get("/quiet")).await.status,
            200
        );
        // The drain's info lines come after the request's access line would have.
        proxy.signal(holdfast_test::sys::SIGTERM).unwrap();
        assert!(
            proxy.wait_for_log("drained", WAIT).await,
            "{how}: {}",
            proxy.logs()
        );
        assert!(
            !proxy.logs().contains("holdfast::access"),
            "{how}: {}",
            proxy.logs()
        );
    }
}

// === helpers ===

/// Sends one request on a new connection and reads its response.
async fn send_one(addr: SocketAddr, request: &ClientRequest) -> Response {
    KeepAliveClient::new(addr)
        .with_timeout(WAIT)
        .send(request)
        .await
        .unwrap_or_else(|e| panic!("{} {}: {e}", request.method, request.target))
}

/// A holdfast error response: `status`, a short body, and `Proxy-Status` naming `error`.
fn assert_error(resp: &Response, status: u16, error: &str) {
    assert_eq!(resp.status, status, "{resp:?}");
    let text = resp.text();
    assert!(
        !text.is_empty() && text.len() < 512 && text.starts_with(&status.to_string()),
        "body: {text:?}"
    );
    let ps = resp.header("proxy-status").unwrap_or_default();
    assert!(
        ps.starts_with("holdfast") && ps.contains(&format!("error={error}")),
        "proxy-status: {ps:?}"
    );
}

/// `body` in chunks of at most `size` bytes, with the last chunk.
fn chunked(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in body.chunks(size) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// Sends a request (its head in two parts `head_pause` apart, if given), reads the
/// response, then waits for the server to close the idle connection; returns how long
/// it stayed idle.
async fn idle_until_closed(addr: SocketAddr, head_pause: Option<Duration>) -> Duration {
    let mut client = RawClient::connect(addr).await.unwrap();
    if let Some(pause) = head_pause {
        client.send("GET /slow HTTP/1.1\r\n").await.unwrap();
        // A connection whose request has begun is not idle, however long the pause.
        assert_eq!(client.wait_close(pause).await, PeerClose::StillOpen);
        client.send("host: x\r\n\r\n").await.unwrap();
    } else {
        client.send_request(&ClientRequest::get("/")).await.unwrap();
    }
    assert_eq!(client.read_response(WAIT).await.unwrap().status, 200);
    let idle_since = Instant::now();
    match client.wait_close(WAIT).await {
        PeerClose::Eof => idle_since.elapsed(),
        other => panic!(
            "idle connection: {other:?} after {:?}",
            idle_since.elapsed()
        ),
    }
}

/// Reads exactly `n` bytes that the peer sends.
async fn read_exactly(client: &mut RawClient, n: usize) -> Vec<u8> {
    let mut got = Vec::new();
    // Bounded: each round adds bytes or fails.
    while got.len() < n {
        match client.wait_close(WAIT).await {
            PeerClose::Data(d) => got.extend_from_slice(&d),
            other => panic!("after {} of {n} bytes: {other:?}", got.len()),
        }
    }
    got
}

/// The value of `name=` in a text log line, without quotes.
fn text_field(line: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=");
    let start = line.find(&key)? + key.len();
    let rest = &line[start..];
    Some(match rest.strip_prefix('"') {
        Some(quoted) => quoted[..quoted.find('"')?].to_owned(),
        None => rest.split(' ').next()?.to_owned(),
    })
}

// === the binary as a child process ===

/// Starts the built binary with `config`; returns it and its listener's address.
async fn spawn_holdfast(config: &str, env: &[(&str, &str)]) -> (HoldfastProcess, SocketAddr) {
    let mut env = env.to_vec();
    env.push(("NO_COLOR", "1"));
    let proxy = HoldfastProcess::spawn_with_env(
        Path::new(env!("CARGO_BIN_EXE_holdfast")),
        &["run"],
        Some(config),
        &env,
    );
    assert!(
        proxy.wait_for_log("admin listening", WAIT).await,
        "holdfast did not start:\n{}",
        proxy.logs()
    );
    let logs = proxy.logs();
    let addr = logs
        .lines()
        .filter(|l| l.contains("listening") && !l.contains("admin listening"))
        .find_map(loopback_addr)
        .unwrap_or_else(|| panic!("no listening address in:\n{logs}"));
    (proxy, addr)
}

/// The first `127.0.0.1:PORT` in `line`.
fn loopback_addr(line: &str) -> Option<SocketAddr> {
    let start = line.find("127.0.0.1:")?;
    let rest = &line[start + "127.0.0.1:".len()..];
    let port: String = rest.chars().take_while(char::is_ascii_digit).collect();
    format!("127.0.0.1:{port}").parse().ok()
}

fn binary_config(upstream: &str, log_format: &str) -> String {
    format!(
        "[log]\nformat = \"{log_format}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\n\n{}",
        proxy_to(upstream)
    )
}

fn bulk_config(upstream: SocketAddr) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[listener]]\nlisten = \"127.0.0.1:0\"\n\
         max_body_bytes = 0\n\n{}",
        proxy_to(&format!("http://{upstream}"))
    )
}

/// Peak and current resident memory of `pid`, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{key} in /proc/{pid}/status"))
    };
    (kib("VmHWM:"), kib("VmRSS:"))
}

fn assert_memory_bounded(proxy: &HoldfastProcess) {
    let (peak, now) = memory_kib(proxy.pid());
    eprintln!("holdfast memory after 2 GiB through it: peak {peak} KiB, now {now} KiB");
    assert!(
        peak < MAX_PROXY_RSS_KIB,
        "holdfast peaked at {peak} KiB resident while streaming"
    );
}

/// Out of file descriptors, accept fails (EMFILE) with the connection left in the
/// kernel's queue, again at every try until a descriptor is free. The accept loop must
/// live through it, say so once (not at every try: it warned 20 times a second for as
/// long as it lasted), and take the waiting clients once descriptors are free. The child's limit is lowered from here (`prlimit`) to the descriptors it has
/// open, so that the next client's accept fails; holdfast answers these requests
/// itself (no route), needing no descriptor but the client's.
#[tokio::test]
async fn running_out_of_descriptors_is_logged_once_and_accepting_resumes() {
    let config = "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[listener]]\nlisten = \"127.0.0.1:0\"\n\n\
         [[route]]\nhost = \"routed.test\"\nupstream = \"app\"\n\n\
         [upstream.app]\naddresses = [\"http://127.0.0.1:9\"]\n";
    let (proxy, addr) = spawn_holdfast(config, &[]).await;
    let pid = proxy.pid();
    let open: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/PID/fd")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let top = open.iter().max().expect("open descriptors") + 1;
    let holes = top - open.len() as u64;
    let old = holdfast_test::sys::set_open_files_limit(pid, top).expect("prlimit");
    let request = b"GET / HTTP/1.1\r\nhost: other.test\r\n\r\n";
    let mut answered = Vec::new();
    let mut last = None;
    // Each answered client took one free number below the limit, until an accept
    // fails: on that client, or on the next try after it took the last number (the
    // descriptor is claimed before the queue is looked at).
    for _ in 0..holes + 2 {
        let mut c = RawClient::connect(addr).await.expect("connect");
        c.send(request).await.expect("request");
        tokio::select! {
            r = c.read_response(WAIT) => {
                assert_eq!(r.expect("answered").status, 404);
                answered.push(c);
            }
            true = proxy.wait_for_log("accept failed", WAIT) => {
                last = Some(c);
                break;
            }
        }
    }
    let Some(mut last) = last else {
        let _ = holdfast_test::sys::set_open_files_limit(pid, old);
        panic!(
            "no accept failed after {holes} free numbers:\n{}",
            proxy.logs()
        )
    };
    // Out of descriptors now: this one waits in the queue.
    let mut waiting = RawClient::connect(addr).await.expect("connect");
    waiting.send(request).await.expect("request");
    // The episode lasts a while: the loop keeps trying (not spinning) and keeps quiet.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let said = proxy.logs().matches("accept failed").count();
    holdfast_test::sys::set_open_files_limit(pid, old).expect("prlimit");
    for c in [&mut last, &mut waiting] {
        let r = c.read_response(WAIT).await;
        assert_eq!(
            r.expect("a waiting client is served once descriptors are free")
                .status,
            404
        );
    }
    assert_eq!(said, 1, "logged at every try:\n{}", proxy.logs());
    assert!(
        proxy.wait_for_log("accepting again", WAIT).await,
        "the episode's end is not logged:\n{}",
        proxy.logs()
    );
    // And accepting goes on as before.
    let mut c = RawClient::connect(addr).await.expect("connect");
    c.send(request).await.expect("request");
    assert_eq!(c.read_response(WAIT).await.expect("answered").status, 404);
    drop(answered);
}

// === raw upstreams ===

/// A loopback server that runs `handle` on every connection.
///
/// # Drop behavior
///
/// Stops accepting; connections already handed to `handle` run on.
struct RawUpstream {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_upstream<F, Fut>(handle: F) -> RawUpstream
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = Arc::new(handle);
    let task = tokio::spawn(async move {
        // Ends when aborted.
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            tokio::spawn(handle(stream));
        }
    });
    RawUpstream { addr, task }
}

/// Reads a message head (up to the empty line); `None` at EOF before any byte.
async fn read_head(io: &mut BufReader<TcpStream>) -> std::io::Result<Option<String>> {
    let mut head = String::new();
    // Bounded by the 64 KiB check.
    loop {
        let before = head.len();
        if io.read_line(&mut head).await? == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(std::io::ErrorKind::UnexpectedEof.into())
            };
        }
        if head[before..].trim_end().is_empty() {
            return Ok(Some(head));
        }
        if head.len() > 64 * 1024 {
            return Err(std::io::Error::other("head too large"));
        }
    }
}

/// The value of header `name` in `head`.
fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Pattern bytes, long enough that any offset's next 256 KiB is one slice of it.
static BLOCK: LazyLock<Vec<u8>> = LazyLock::new(|| pattern(0, 251 * 2048));
const PIECE: usize = 256 * 1024;

/// `len` pattern bytes from `offset`: a slice of [`BLOCK`].
fn pattern_piece(offset: u64, len: usize) -> &'static [u8] {
    let start = (offset % 251) as usize;
    &BLOCK[start..start + len]
}

/// Checks a body against the pattern piece by piece, without keeping it.
struct PatternCheck {
    offset: u64,
    ok: bool,
}

impl Default for PatternCheck {
    fn default() -> Self {
        PatternCheck {
            offset: 0,
            ok: true,
        }
    }
}

impl PatternCheck {
    fn feed(&mut self, data: &[u8]) {
        for piece in data.chunks(PIECE) {
            self.ok &= piece == pattern_piece(self.offset, piece.len());
            self.offset += piece.len() as u64;
        }
    }
}

/// Writes `len` pattern bytes, chunked or raw.
async fn write_pattern(io: &mut TcpStream, len: u64, chunked: bool) -> std::io::Result<()> {
    let mut offset = 0;
    // Bounded by `len`.
    while offset < len {
        let n = usize::try_from(len - offset).unwrap_or(PIECE).min(PIECE);
        let piece = pattern_piece(offset, n);
        if chunked {
            io.write_all(format!("{n:x}\r\n").as_bytes()).await?;
            io.write_all(piece).await?;
            io.write_all(b"\r\n").await?;
        } else {
            io.write_all(piece).await?;
        }
        offset += n as u64;
    }
    if chunked {
        io.write_all(b"0\r\n\r\n").await?;
    }
    io.flush().await
}

/// A bulk upstream that never holds a body: `POST` bodies (Content-Length or chunked)
/// are checked against the pattern and answered `received N pattern ok|BROKEN`;
/// `GET /source/LEN/cl|chunked` answers LEN pattern bytes.
async fn bulk_upstream() -> RawUpstream {
    raw_upstream(|stream| async move {
        let _ = serve_bulk(stream).await;
    })
    .await
}

async fn serve_bulk(stream: TcpStream) -> std::io::Result<()> {
    let mut io = BufReader::with_capacity(PIECE, stream);
    // Bounded by the peer: each round consumes a request or ends.
    while let Some(head) = read_head(&mut io).await? {
        let target = head.split(' ').nth(1).unwrap_or("/").to_owned();
        if head.starts_with("POST") {
            let mut check = PatternCheck::default();
            if header(&head, "transfer-encoding").is_some_and(|te| te.contains("chunked")) {
                read_chunked(&mut io, &mut check).await?;
            } else {
                let len = header(&head, "content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                read_exact_into(&mut io, len, &mut check).await?;
            }
            let verdict = if check.ok { "ok" } else { "BROKEN" };
            let body = format!("received {} pattern {verdict}", check.offset);
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            io.get_mut().write_all(response.as_bytes()).await?;
        } else {
            let mut parts = target.trim_start_matches("/source/").split('/');
            let len: u64 = parts.next().and_then(|l| l.parse().ok()).unwrap_or(0);
            let chunked = parts.next() == Some("chunked");
            let framing = if chunked {
                "transfer-encoding: chunked".to_owned()
            } else {
                format!("content-length: {len}")
            };
            let head = format!("HTTP/1.1 200 OK\r\n{framing}\r\n\r\n");
            io.get_mut().write_all(head.as_bytes()).await?;
            write_pattern(io.get_mut(), len, chunked).await?;
        }
    }
    Ok(())
}

async fn read_exact_into(
    io: &mut BufReader<TcpStream>,
    mut len: u64,
    check: &mut PatternCheck,
) -> std::io::Result<()> {
    // Bounded by `len`: each round consumes bytes or fails.
    while len > 0 {
        let buf = io.fill_buf().await?;
        if buf.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let n = buf.len().min(usize::try_from(len).unwrap_or(usize::MAX));
        check.feed(&buf[..n]);
        io.consume(n);
        len -= n as u64;
    }
    Ok(())
}

async fn read_chunked(
    io: &mut BufReader<TcpStream>,
    check: &mut PatternCheck,
) -> std::io::Result<()> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut line = String::new();
    // Bounded by the peer: each round consumes a chunk or fails.
    loop {
        line.clear();
        io.read_line(&mut line).await?;
        let size = line.split(';').next().unwrap_or("").trim();
        let size = u64::from_str_radix(size, 16).map_err(|_| bad("chunk size"))?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                line.clear();
                if io.read_line(&mut line).await? == 0 || line.trim().is_empty() {
                    return Ok(());
                }
            }
        }
        read_exact_into(io, size, check).await?;
        line.clear();
        io.read_line(&mut line).await?;
        if !line.trim().is_empty() {
            return Err(bad("chunk longer than its size"));
        }
    }
}

// === routing and forwarding rules ===

/// A dot segment must not carry a request out of the route it matched: `/api/../admin`
/// is `/admin` (RFC 3986 5.2.4) to any upstream that normalizes, so matching it against
/// the `/api` route hands the `/api` upstream a path the operator never routed to it.
/// nginx matches locations on the normalized path (and `%2e` is a dot, RFC 3986 2.3).
#[tokio::test]
async fn dot_segments_cannot_leave_a_route_prefix() {
    let api = TestUpstream::start(Behaviour::Echo).await;
    let site = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "[[route]]\npath = \"/api\"\nupstream = \"api\"\n\
         [[route]]\npath = \"/\"\nupstream = \"site\"\n\
         [upstream.api]\naddresses = [\"{}\"]\n\
         [upstream.site]\naddresses = [\"{}\"]\n",
        api.url(),
        site.url()
    ))
    .await;
    let mut client = KeepAliveClient::new(gw.addr);
    for target in ["/api/../admin", "/api/%2e%2e/admin", "/api/./../admin"] {
        let r = client.send(&ClientRequest::get(target)).await.unwrap();
        assert_eq!(r.status, 200, "{target}: {}", r.text());
    }
    // Behind an encoded or backslash separator a `..` is refused, not guessed at.
    for target in ["/api/..%2Fadmin", "/api/%2e%2e%5Cadmin"] {
        let r = client.send(&ClientRequest::get(target)).await.unwrap();
        assert_eq!(r.status, 400, "{target}: {}", r.text());
    }
    let targets: Vec<String> = api.requests().into_iter().map(|r| r.target).collect();
    assert!(
        targets.is_empty(),
        "the /api upstream got paths outside /api: {targets:?}"
    );
    let targets: Vec<String> = site.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/admin"; 3], "resolved, and sent resolved");
}

/// RFC 3986 2.3: a percent-encoded unreserved character is the character itself, so
/// `/%61dmin` is `/admin` to every upstream that decodes its path (all of them). It
/// must match the `/admin` route, not slip past it to a less specific one whose
/// upstream then serves `/admin` (nginx decodes before matching locations too).
#[tokio::test]
async fn a_percent_encoded_prefix_matches_its_route() {
    let admin = TestUpstream::start(Behaviour::Echo).await;
    let site = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "[[route]]\npath = \"/admin\"\nupstream = \"admin\"\n\
         [[route]]\npath = \"/\"\nupstream = \"site\"\n\
         [upstream.admin]\naddresses = [\"{}\"]\n\
         [upstream.site]\naddresses = [\"{}\"]\n",
        admin.url(),
        site.url()
    ))
    .await;
    let mut client = KeepAliveClient::new(gw.addr);
    for target in [
        "/%61dmin/x",
        "/%61%64%6D%69n/x",
        "/adm%69n?q=%61",
        "/x/%2e%2e/%61dmin",
    ] {
        let r = client.send(&ClientRequest::get(target)).await.unwrap();
        assert_eq!(r.status, 200, "{target}: {}", r.text());
    }
    let targets: Vec<String> = site.requests().into_iter().map(|r| r.target).collect();
    assert!(
        targets.is_empty(),
        "the / upstream got paths under /admin: {targets:?}"
    );
    // Sent as matched; the query is not the route's business.
    let targets: Vec<String> = admin.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(
        targets,
        ["/admin/x", "/admin/x", "/admin?q=%61", "/admin"],
        "sent decoded"
    );
}

/// Servlet containers (Tomcat, Jetty) and Spring drop a segment's `;` parameters
/// before resolving dot segments, so `/public/..;/admin` is `/admin` to them while
/// routing saw a `/public` path (the `..;/` route bypass). Like a `..` behind an
/// encoded separator, it is refused rather than sent to the `/public` upstream.
#[tokio::test]
async fn a_dot_dot_segment_with_parameters_is_refused() {
    let public = TestUpstream::start(Behaviour::Echo).await;
    let site = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "[[route]]\npath = \"/public\"\nupstream = \"public\"\n\
         [[route]]\npath = \"/\"\nupstream = \"site\"\n\
         [upstream.public]\naddresses = [\"{}\"]\n\
         [upstream.site]\naddresses = [\"{}\"]\n",
        public.url(),
        site.url()
    ))
    .await;
    let mut client = KeepAliveClient::new(gw.addr);
    for target in [
        "/public/..;/admin",
        "/public/..;jsessionid=1/admin",
        "/public/%2e%2e;x/admin",
        "/public/x/..;",
    ] {
        let r = client.send(&ClientRequest::get(target)).await.unwrap();
        assert_eq!(r.status, 400, "{target}: {}", r.text());
    }
    // Parameters elsewhere are the upstream's business.
    let r = client
        .send(&ClientRequest::get("/public/a;v=1/..b;c"))
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let targets: Vec<String> = public.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/public/a;v=1/..b;c"]);
    assert!(site.requests().is_empty());
}

/// README: `trusted_proxies` are the "CIDRs whose X-Forwarded-* are kept and
/// extended"; from anyone else the forwarding fields are the proxy's own. A client's
/// RFC 7239 `Forwarded` (which Spring, Django's and others' proxy support read before
/// `X-Forwarded-*`) and its `X-Forwarded-Port` / `-Prefix` pass through untouched, so
/// an untrusted client still picks the address, scheme, host and port the
/// application believes.
#[tokio::test]
async fn untrusted_forwarded_and_other_x_forwarded_fields_do_not_pass() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let forged = ClientRequest::get("/")
        .header("host", "shop.test")
        .header("forwarded", "for=6.6.6.6;proto=https;host=evil.test")
        .header("x-forwarded-port", "443")
        .header("x-forwarded-prefix", "/evil")
        .header("x-real-ip", "6.6.6.6");
    let e = send_one(gw.addr, &forged).await.echoed().unwrap();
    assert_eq!(e.header("x-forwarded-for"), Some("127.0.0.1"));
    for name in [
        "forwarded",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-real-ip",
    ] {
        assert_eq!(
            e.header(name),
            None,
            "{name} from an untrusted client reached the upstream"
        );
    }
}

/// `shop.test.` is the same host as `shop.test` (a fully qualified name; browsers
/// send it as typed). nginx drops the trailing dot before matching server names;
/// holdfast sends such a request to a less specific route.
#[tokio::test]
async fn a_trailing_dot_in_host_keeps_the_host_route() {
    let shop = TestUpstream::start(Behaviour::Echo).await;
    let other = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "[[route]]\nhost = \"shop.test\"\nupstream = \"shop\"\n\
         [[route]]\nupstream = \"other\"\n\
         [upstream.shop]\naddresses = [\"{}\"]\n\
         [upstream.other]\naddresses = [\"{}\"]\n",
        shop.url(),
        other.url()
    ))
    .await;
    for host in ["shop.test.", "shop.test.:8080"] {
        let resp = send_one(gw.addr, &ClientRequest::get("/").header("host", host)).await;
        assert_eq!(resp.status, 200);
    }
    assert_eq!(shop.requests().len(), 2, "went to another route instead");
    assert_eq!(other.requests().len(), 0);
}

/// RFC 9110 2.5: "A proxy MUST send its own HTTP-version in forwarded messages".
/// An HTTP/1.0 upstream's status line reaches an HTTP/1.1 client as `HTTP/1.0`, which
/// tells the client the connection closes after this response (RFC 9112 9.3).
#[tokio::test]
async fn a_response_goes_out_in_holdfasts_own_http_version() {
    let upstream = raw_upstream(|stream| async move {
        let mut io = BufReader::new(stream);
        let Ok(Some(_)) = read_head(&mut io).await else {
            return;
        };
        let _ = io
            .get_mut()
            .write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
        let _ = io.get_mut().shutdown().await;
    })
    .await;
    let gw = start(&proxy_to(&format!("http://{}", upstream.addr))).await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    client
        .send("GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let resp = client.read_response(WAIT).await.unwrap();
    assert_eq!((resp.status, resp.text().as_ref()), (200, "ok"));
    assert_eq!(
        resp.minor_version, 1,
        "status line HTTP/1.{}",
        resp.minor_version
    );
}

// === access log and CLI ===

/// A client that gives up while the upstream has not answered yet still gets its
/// access-log line (nginx writes 499): without it an operator cannot see the requests
/// a slow upstream made clients abandon.
#[tokio::test]
async fn access_log_has_a_line_for_a_client_that_left_before_the_answer() {
    let upstream = TestUpstream::start(Behaviour::Hang).await;
    let (proxy, addr) = spawn_holdfast(&binary_config(&upstream.url(), "json"), &[]).await;
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(b"GET /abandoned HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    upstream
        .wait_for_requests(1, WAIT)
        .await
        .expect("forwarded");
    drop(c);
    // Written as hyper drops the request, on the client's FIN. (Not awaited through a
    // drain's end: the connection's count may fall, and the drain end, on another
    // worker thread before the request is dropped.)
    assert!(
        proxy.wait_for_log("/abandoned", WAIT).await,
        "{}",
        proxy.logs()
    );
    let logs = proxy.logs();
    let line = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "holdfast::access");
    let Some(v) = line else {
        panic!("no access line for the abandoned request:\n{logs}");
    };
    assert_eq!(v["path"], "/abandoned", "{v}");
    assert_eq!(v["outcome"], "client_gone", "{v}");
}

/// A client that goes away in the middle of its upload (its connection ends before the
/// body it announced) is a client gone before any answer was made for it: README has
/// it logged `client_gone` with status 499 and no bytes, as when it leaves while the
/// upstream answers. Before, holdfast took the cut body for a bad request: the line
/// said 400, `local`, and the bytes of a 400 nobody could read, whether the body was
/// being read first (for a retry's copy) or streamed to the upstream, over HTTP/1.1
/// or HTTP/2 (whose client reports only the stream it reset for the body).
#[tokio::test]
async fn access_log_says_client_gone_for_a_client_that_left_mid_upload() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let h2c = h2c_upstream_reading_bodies().await;
    let config = format!(
        "[log]\nformat = \"json\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\n\n\
         [[route]]\npath = \"/streamed\"\nupstream = \"streamed\"\n\n\
         [[route]]\npath = \"/h2\"\nupstream = \"h2\"\n\n\
         [[route]]\nupstream = \"kept\"\n\n\
         [upstream.streamed]\naddresses = [\"{url}\"]\nretry.attempts = 1\n\n\
         [upstream.h2]\naddresses = [\"h2c://{h2c}\"]\nretry.attempts = 1\n\n\
         [upstream.kept]\naddresses = [\"{url}\"]\n",
        url = upstream.url()
    );
    let (proxy, addr) = spawn_holdfast(&config, &[]).await;
    for path in ["/kept", "/streamed", "/h2"] {
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(
            format!("POST {path} HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\nabcdef")
                .as_bytes(),
        )
        .await
        .expect("write");
        drop(c);
        let quoted = format!("\"{path}\"");
        assert!(
            proxy.wait_for_log(&quoted, WAIT).await,
            "no line for {path}:\n{}",
            proxy.logs()
        );
        let logs = proxy.logs();
        let v = logs
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["target"] == "holdfast::access" && v["path"] == path)
            .unwrap_or_else(|| panic!("no access line for {path}:\n{logs}"));
        assert_eq!(
            (&v["status"], &v["outcome"], &v["bytes"]),
            (&499.into(), &"client_gone".into(), &0.into()),
            "{v}"
        );
    }
}

/// An h2c server that reads each request's body whole, then answers 200.
async fn h2c_upstream_reading_bodies() -> SocketAddr {
    use http_body_util::{BodyExt, Full};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            bytes::Bytes::from_static(b"ok\n"),
                        )))
                    },
                );
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                        .await;
            });
        }
    });
    addr
}

/// README: "`bytes` is the response body sent". holdfast's own answers (404 for no
/// route, 502/503/504 with a short text body) send a body too.
#[tokio::test]
async fn access_log_bytes_counts_the_body_of_holdfasts_own_answers() {
    // Nothing listens there: connect refused, holdfast answers 502 itself.
    let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let (proxy, addr) = spawn_holdfast(&binary_config(&url, "json"), &[]).await;
    let resp = send_one(addr, &ClientRequest::get("/local")).await;
    assert_eq!(resp.status, 502);
    assert!(
        proxy.wait_for_log("\"/local\"", WAIT).await,
        "{}",
        proxy.logs()
    );
    let logs = proxy.logs();
    let v = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "holdfast::access")
        .unwrap_or_else(|| panic!("no access line:\n{logs}"));
    assert_eq!(v["status"], 502, "{v}");
    assert_eq!(
        v["bytes"].as_u64(),
        Some(resp.body.len() as u64),
        "the client got a {}-byte body: {v}",
        resp.body.len()
    );
}

/// `holdfast proxy` builds its config from flags; a value `run` and `check` refuse
/// (README: "`run` exits 64 on a bad config") must be refused here too, naming the
/// flag, rather than start a proxy that cannot serve (0 connections: every request
/// waits out the queue and gets 503) or that speaks HTTP to a FastCGI address.
#[tokio::test]
async fn proxy_flags_are_validated_like_a_config_file() {
    for (args, flag) in [
        (
            &["--to", "http://127.0.0.1:9", "--max-connections", "0"][..],
            "--max-connections",
        ),
        (
            &["--to", "http://127.0.0.1:9", "--connect-timeout", "0s"][..],
            "--connect-timeout",
        ),
        (
            &[
                "--to",
                "http://127.0.0.1:9",
                "--to",
                "fastcgi://127.0.0.1:9000",
            ][..],
            "--to",
        ),
        (
            &["--to", "fastcgi://127.0.0.1:9000", "--root", "relative/dir"][..],
            "--root",
        ),
        (
            &["--to", "http://127.0.0.1:9", "--timeout", "0s"][..],
            "--timeout",
        ),
        (
            &["--to", "http://127.0.0.1:9", "--workers", "100000"][..],
            "--workers",
        ),
    ] {
        let mut argv = vec!["proxy", "--listen", "127.0.0.1:0", "--admin", "off"];
        argv.extend_from_slice(args);
        let mut p = HoldfastProcess::spawn(Path::new(env!("CARGO_BIN_EXE_holdfast")), &argv, None);
        let status = p.wait_exit(WAIT).await;
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(64),
            "{argv:?} was accepted:\n{}",
            p.logs()
        );
        assert!(
            p.logs().contains(&format!("{flag}: ")),
            "{argv:?}: {}",
            p.logs()
        );
    }
}

/// README: "A config error names the file, line, column and key". An upstream name
/// with a dot (`[upstream."api.v1"]`, a quoted TOML key) loses the line and prints a
/// key that reads as a different path.
#[tokio::test]
async fn check_names_the_line_of_an_error_under_a_dotted_upstream_name() {
    let dir = holdfast_test::tempdir();
    let path = dir.path().join("h.toml");
    std::fs::write(
        &path,
        "[[listener]]\nlisten = \"127.0.0.1:0\"\n\n[[route]]\nupstream = \"api.v1\"\n\n\
         [upstream.\"api.v1\"]\naddresses = [\"http://127.0.0.1:9\"]\nretry.attempts = 0\n",
    )
    .unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .await
        .expect("run holdfast check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("h.toml:9:"), "no line for the error: {err}");
}

// === HTTP/1 upstream codec: early answers, Content-Length lists ===

/// RFC 9112 6.3 point 5: a Content-Length that is a list of one repeated value may be
/// taken as that value. holdfast's codec takes `5, 5` as 5, so the response must
/// reach the client, framed by that length, not be lost.
#[tokio::test]
async fn a_repeated_content_length_list_reaches_the_client() {
    let upstream = raw_upstream(|s| async move {
        let mut io = BufReader::new(s);
        while let Ok(Some(_)) = read_head(&mut io).await {
            if io
                .get_mut()
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello")
                .await
                .is_err()
            {
                return;
            }
        }
    })
    .await;
    let gw = start(&proxy_to(&format!("http://{}", upstream.addr))).await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    client.send_request(&ClientRequest::get("/")).await.unwrap();
    let resp = client.read_response(WAIT).await;
    let resp = resp.unwrap_or_else(|e| panic!("no response for a valid upstream answer: {e}"));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), "hello");
}

/// An upstream that answers an upload early and then closes its socket with the body
/// unread (the kernel resets the connection): the answer arrived whole before the
/// reset, so the client must get it, not a 502 for the failed write of the body.
#[tokio::test]
async fn an_early_answer_followed_by_a_reset_reaches_the_client() {
    const LEN: usize = 16 << 20;
    let upstream = raw_upstream(|stream| async move {
        let mut io = BufReader::new(stream);
        if let Ok(Some(_)) = read_head(&mut io).await {
            // Some of the body is here (unread): the close below resets.
            let _ = io.fill_buf().await;
            let reply = b"HTTP/1.1 413 Content Too Large\r\nconnection: close\r\n\
                          content-length: 5\r\n\r\nnope!";
            let _ = io.get_mut().write_all(reply).await;
        }
    })
    .await;
    let gw = start(&proxy_to(&format!("http://{}", upstream.addr))).await;
    let mut failures = Vec::new();
    for _ in 0..5 {
        let (mut read, mut write) = TcpStream::connect(gw.addr).await.unwrap().into_split();
        let writer = tokio::spawn(async move {
            let head = format!("POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: {LEN}\r\n\r\n");
            write.write_all(head.as_bytes()).await?;
            let piece = vec![b'a'; 64 * 1024];
            for _ in 0..LEN / piece.len() {
                write.write_all(&piece).await?;
            }
            std::io::Result::Ok(())
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout(WAIT, read.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        writer.abort();
        if !got.starts_with(b"HTTP/1.1 413") {
            failures.push(String::from_utf8_lossy(&got).into_owned());
        }
    }
    assert!(
        failures.is_empty(),
        "the upstream's 413 was lost: {failures:#?}"
    );
}

/// A reused connection that closes in the middle of a response head was not stale:
/// the upstream took the request and began to answer. It is not retried (the table in
/// ARCHITECTURE.md: only a close before any response byte), and teaches the pool no
/// idle timeout.
#[tokio::test]
async fn a_close_in_the_middle_of_a_head_is_not_a_stale_connection() {
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    let upstream = raw_upstream(move |stream| {
        let count = count.clone();
        async move {
            let mut io = BufReader::new(stream);
            let mut on_this = 0;
            while let Ok(Some(_)) = read_head(&mut io).await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                on_this += 1;
                let reply: &[u8] = if on_this == 1 {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                } else {
                    b"HTTP/1.1 200 OK\r\ncontent-"
                };
                if io.get_mut().write_all(reply).await.is_err() || on_this > 1 {
                    return; // the second answer is cut short
                }
            }
        }
    })
    .await;
    let gw = start(&format!(
        "{}[upstream.up.retry]\nattempts = 3\n",
        proxy_to(&format!("http://{}", upstream.addr))
    ))
    .await;
    let mut client = KeepAliveClient::new(gw.addr);
    assert_eq!(client.get("/1").await.unwrap().text(), "ok");
    let r = client.get("/2").await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "sent again after the upstream began to answer"
    );
}

/// Nor was one that closes after an informational response (`103 Early Hints`): the
/// upstream took the request and began to answer, though no byte of the final head
/// came. It is not retried, and teaches the pool no idle timeout.
#[tokio::test]
async fn a_close_after_an_informational_response_is_not_a_stale_connection() {
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    let upstream = raw_upstream(move |stream| {
        let count = count.clone();
        async move {
            let mut io = BufReader::new(stream);
            let mut on_this = 0;
            while let Ok(Some(_)) = read_head(&mut io).await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                on_this += 1;
                let reply: &[u8] = if on_this == 1 {
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                } else {
                    b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n"
                };
                if io.get_mut().write_all(reply).await.is_err() || on_this > 1 {
                    return; // no final answer
                }
            }
        }
    })
    .await;
    let gw = start(&format!(
        "{}[upstream.up.retry]\nattempts = 3\n",
        proxy_to(&format!("http://{}", upstream.addr))
    ))
    .await;
    let mut client = KeepAliveClient::new(gw.addr);
    assert_eq!(client.get("/1").await.unwrap().text(), "ok");
    let r = client.get("/2").await.unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "sent again after the upstream began to answer"
    );
}

// === the client side of HTTP/1.1: stalls, unread bodies, closes ===

/// An answer given before the request's body was read (no route here; a 413 or an
/// upstream's early answer alike) leaves hyper unable to reuse the connection: it
/// closes it right after the answer. The answer must then say `Connection: close`,
/// not promise keep-alive: a client that takes the promise sends its next request on
/// a connection already closed (story 1a, on the client side).
#[tokio::test]
async fn an_answer_that_leaves_the_body_unread_does_not_promise_keep_alive() {
    let (_upstream, gw) = api_only_gateway().await;
    let mut client = RawClient::connect(gw.addr).await.expect("connect");
    client
        .send_request(&ClientRequest::post("/nowhere", pattern(0, 64 * 1024)))
        .await
        .expect("request");
    let resp = client.read_response(WAIT).await.expect("the 404");
    assert_eq!(resp.status, 404);
    if resp.keeps_alive() {
        next_request_is_served(&mut client, &resp).await;
    }
}

/// Same with `Expect: 100-continue`: the route refuses before the body is asked for.
/// hyper sends no 100 and closes after the 404; the 404 must say so.
#[tokio::test]
async fn expect_100_continue_refused_before_the_body_does_not_promise_keep_alive() {
    let (_upstream, gw) = api_only_gateway().await;
    let mut client = RawClient::connect(gw.addr).await.expect("connect");
    client
        .send(
            "POST /nowhere HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n\
             content-length: 5\r\n\r\n",
        )
        .await
        .expect("head");
    let resp = client.read_response(WAIT).await.expect("the 404, no hang");
    assert_eq!(resp.status, 404);
    assert!(resp.informational.is_empty(), "{:?}", resp.informational);
    if resp.keeps_alive() {
        // Kept alive, the connection expects the 5 body bytes, then the next request.
        client.send("hello").await.expect("body");
        next_request_is_served(&mut client, &resp).await;
    }
}

/// A gateway with one route, `/api`, so that anything else is holdfast's own 404.
async fn api_only_gateway() -> (TestUpstream, support::Gateway) {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "[[route]]\npath = \"/api\"\nupstream = \"up\"\n[upstream.up]\naddresses = [\"{}\"]\n",
        upstream.url()
    ))
    .await;
    (upstream, gw)
}

/// A response that promised keep-alive: the next request on its connection is served.
async fn next_request_is_served(client: &mut RawClient, promised: &holdfast_test::Response) {
    client
        .send_request(&ClientRequest::get("/api/next"))
        .await
        .expect("next request");
    let next = client.read_response(WAIT).await;
    assert!(
        next.as_ref().is_ok_and(|r| r.status == 200),
        "the answer promised keep-alive ({:?}), then the next request got {next:?}",
        promised.headers
    );
}

/// A client that sent `Connection: close` is answered in full, then gets a FIN; the
/// answer does not advertise a keep-alive timeout it will not keep.
#[tokio::test]
async fn a_client_asking_to_close_gets_the_whole_response_then_a_fin() {
    const LEN: u64 = 4 << 20;
    let upstream = TestUpstream::start(Behaviour::StreamBody { len: LEN }).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = RawClient::connect(gw.addr).await.expect("connect");
    client
        .send_request(&ClientRequest::get("/big").header("connection", "close"))
        .await
        .expect("request");
    let mut ok = true;
    let resp = client
        .read_response_streaming("GET", WAIT, |b| ok &= !b.is_empty())
        .await
        .expect("the whole response");
    assert_eq!(resp.body_len, LEN);
    assert_eq!(client.wait_close(WAIT).await, PeerClose::Eof);
    assert!(
        resp.header("keep-alive").is_none(),
        "keep-alive promised to a client that asked to close: {:?}",
        resp.headers
    );
}

/// A client that sent `Connection: close` and then, while its request was in flight,
/// more bytes (a pipelining client sending on past its close, RFC 9112 9.6): the
/// answer to the first request ends with a FIN, not with a reset sent for the bytes
/// still unread in the socket, which can reach the client before the answer and
/// destroy it. hyper reads what arrives while it serves the request only until its
/// buffer holds something; the rest stays in the socket.
#[tokio::test]
async fn a_client_asking_to_close_and_sending_more_gets_a_fin_not_a_reset() {
    let upstream = TestUpstream::start(Behaviour::Delay(Duration::from_millis(300))).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = RawClient::connect(gw.addr).await.expect("connect");
    client
        .send_request(&ClientRequest::get("/first").header("connection", "close"))
        .await
        .expect("request");
    upstream
        .wait_for_requests(1, WAIT)
        .await
        .expect("the first request reached the upstream");
    // More than hyper reads at once while the first request is served.
    let mut more = ClientRequest::post("/second", vec![b'x'; 64 * 1024]).to_bytes("a.test");
    more.extend_from_slice(&ClientRequest::get("/third").to_bytes("a.test"));
    client.send(&more).await.expect("pipelined bytes");
    let resp = client.read_response(WAIT).await.expect("the first answer");
    assert_eq!(resp.status, 200);
    assert_eq!(client.wait_close(WAIT).await, PeerClose::Eof);
    assert_eq!(
        upstream.requests_seen(),
        1,
        "only the first request is served"
    );
}

/// A client that half-closes after its request (`shutdown(SHUT_WR)`, as `nc -N` does)
/// is taken as gone, as nginx takes it (499): the end of its input is how holdfast
/// learns that a client left, and stops the upstream work for it. README says so.
#[tokio::test]
async fn a_client_that_half_closes_after_its_request_is_taken_as_gone() {
    let upstream = TestUpstream::start(Behaviour::Delay(Duration::from_millis(200))).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = RawClient::connect(gw.addr).await.expect("connect");
    client
        .send_request(&ClientRequest::get("/").header("connection", "close"))
        .await
        .expect("request");
    client.shutdown_write().await.expect("half-close");
    let resp = client.read_response(WAIT).await;
    assert!(resp.is_err(), "half-closed client got {resp:?}");
}

/// A client that stops reading a response larger than the socket buffers: hyper stops
/// taking the body, so the body's `read_idle` timer is never looked at again. Some
/// deadline must still end the exchange and close the upstream connection, not hold it
/// (and its pool slot) for as long as the client keeps the TCP connection open.
#[tokio::test]
async fn a_client_that_stops_reading_does_not_hold_the_upstream_connection_forever() {
    let upstream = TestUpstream::start(Behaviour::StreamBody { len: 1 << 30 }).await;
    let gw = start(&format!(
        "{}[upstream.up.timeouts]\nread_idle = \"1s\"\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\nkeepalive_timeout = \"2s\"\nheader_timeout = \"2s\"\n\
         send_timeout = \"2s\"\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let mut client = RawClient::connect(gw.addr).await.expect("connect");
    client
        .send_request(&ClientRequest::get("/big"))
        .await
        .expect("request");
    // The head and a little of the body, then the client reads no more.
    match client.wait_close(WAIT).await {
        PeerClose::Data(d) => assert!(d.starts_with(b"HTTP/1.1 200"), "{d:?}"),
        other => panic!("no response: {other:?}"),
    }
    upstream
        .wait_for_connections(1, WAIT)
        .await
        .expect("the upstream connection");
    // Every timeout configured here is 2 s at most; 10 s is far past any of them.
    let closed = upstream.wait_for_closed(1, Duration::from_secs(10)).await;
    let pools = get_json(gw.admin, "/pools").await;
    assert!(
        closed.is_ok(),
        "the upstream connection is still held 10 s after the client stopped reading: \
         in_use = {}",
        pools[0]["addresses"][0]["in_use"]
    );
    assert_eq!(
        pools[0]["addresses"][0]["closed"]["timeout"], 1,
        "closed as a timeout (send_timeout): {pools}"
    );
    drop(client);
}

/// `timeouts.total` bounds a response body that never waits on its upstream: a fast
/// upstream streaming a large body to a client that reads steadily but more slowly
/// keeps holdfast's reads from the upstream always ready, so the body's timer, set
/// only when a read has to wait, was never looked at, and the exchange ran for as
/// long as the client took (here ~2 minutes for 1 GiB), holding the upstream
/// connection all along.
#[tokio::test]
async fn total_timeout_cuts_a_response_the_client_reads_slower_than_the_upstream_sends() {
    let upstream = TestUpstream::start(Behaviour::StreamBody { len: 1 << 30 }).await;
    let gw = start(&format!(
        "{}[upstream.up.timeouts]\ntotal = \"1s\"\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let mut client = TcpStream::connect(gw.addr).await.expect("connect");
    client
        .write_all(&ClientRequest::get("/big").to_bytes("x"))
        .await
        .expect("request");
    // About 8 MB/s, and 8 s at most: the upstream on loopback sends far faster.
    let start = Instant::now();
    let mut buf = vec![0u8; 16 << 10];
    let mut got = 0u64;
    let ended = loop {
        if start.elapsed() > Duration::from_secs(8) {
            break false;
        }
        match tokio::time::timeout(WAIT, client.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got += n as u64,
            Err(_) => panic!("nothing from holdfast for {WAIT:?}"),
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let took = start.elapsed();
    assert!(
        ended,
        "still streaming {took:?} in (total = 1s), {got} bytes read"
    );
    assert!(got < 1 << 30, "cut short, not complete: {got} bytes");
    assert!(took < Duration::from_secs(4), "cut after {took:?}");
    upstream
        .wait_for_closed(1, WAIT)
        .await
        .expect("the upstream connection closed");
    let pools = get_json(gw.admin, "/pools").await;
    assert_eq!(
        pools[0]["addresses"][0]["closed"]["timeout"], 1,
        "closed as a timeout: {pools}"
    );
}

/// A request body that stops arriving: the head came in time, then the body stalls
/// (a slowloris on the body). With the default retry settings the body is read into
/// the replay buffer before any upstream is asked, under no deadline at all.
#[tokio::test]
async fn a_request_body_that_stops_arriving_is_cut() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}[upstream.up.timeouts]\nresponse_headers = \"1s\"\nread_idle = \"1s\"\nwrite = \"1s\"\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\nkeepalive_timeout = \"1s\"\nheader_timeout = \"1s\"\n\
         body_timeout = \"1s\"\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let mut client = RawClient::connect(gw.addr).await.expect("connect");
    client
        .send("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n0123456789")
        .await
        .expect("head and 10 body bytes");
    // Every timeout configured here is 1 s; 8 s is far past any of them.
    let outcome = client.wait_close(Duration::from_secs(8)).await;
    assert_ne!(
        outcome,
        PeerClose::StillOpen,
        "a stalled request body held the connection for 8 s (upstream saw {} requests)",
        upstream.requests_seen()
    );
}

/// Two requests pipelined in one write on a connection whose limit is one: the first
/// is answered with `Connection: close`, then the connection ends with a FIN (the
/// client retries the second), not a reset. The second is a 64 KiB upload, more than
/// hyper reads with the first head: the rest waits unread in the kernel, so closing
/// the socket without a half-close first (and a linger) would send a reset instead.
#[tokio::test]
async fn a_pipelined_request_past_max_requests_gets_a_fin() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nmax_requests_per_connection = 1\n",
        proxy_to(&upstream.url())
    ))
    .await;
    let mut client = RawClient::connect(gw.addr).await.expect("connect");
    let mut two = ClientRequest::get("/1").to_bytes("x");
    two.extend_from_slice(&ClientRequest::post("/2", vec![b'x'; 64 << 10]).to_bytes("x"));
    client.send(two).await.expect("two requests");
    let resp = client.read_response(WAIT).await.expect("first response");
    assert!(
        resp.headers.has_token("connection", "close"),
        "{:?}",
        resp.headers
    );
    assert_eq!(client.wait_close(WAIT).await, PeerClose::Eof);
    assert_eq!(upstream.requests_seen(), 1);
}

/// A pipelined head whose end comes after the connection parked (100 ms idle) is
/// still served.
#[tokio::test]
async fn a_pipelined_head_finished_after_the_park_is_served() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = RawClient::connect(gw.addr).await.expect("connect");
    client
        .send("GET /1 HTTP/1.1\r\nhost: x\r\n\r\nGET /2 HTTP/1.1\r\nho")
        .await
        .expect("one and a half requests");
    assert_eq!(client.read_response(WAIT).await.expect("first").status, 200);
    // Idle for the 100 ms after which it parks, half a head held: wait until it has.
    gw.wait_metric("holdfast_client_parked_connections", 1.0, WAIT)
        .await;
    client
        .send("st: x\r\n\r\n")
        .await
        .expect("rest of the head");
    let resp = client.read_response(WAIT).await;
    assert!(resp.as_ref().is_ok_and(|r| r.status == 200), "{resp:?}");
}

/// README: `outcome` is `error` when there was "no usable upstream response:
/// holdfast answered with a 5xx", `local` only for holdfast's own answers (no
/// route). A 101 the client never asked for cannot be relayed: the 502 that
/// replaces it is an upstream error, not a local answer.
#[tokio::test]
async fn access_log_calls_an_unsolicited_101_an_error() {
    let upstream = raw_upstream(|stream| async move {
        let mut io = BufReader::new(stream);
        let Ok(Some(_)) = read_head(&mut io).await else {
            return;
        };
        let _ = io
            .get_mut()
            .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
            .await;
        let _ = io.get_mut().shutdown().await;
    })
    .await;
    let (proxy, addr) = spawn_holdfast(
        &binary_config(&format!("http://{}", upstream.addr), "json"),
        &[],
    )
    .await;
    let resp = send_one(addr, &ClientRequest::get("/unasked")).await;
    assert_eq!(resp.status, 502, "{resp:?}");
    assert!(
        proxy.wait_for_log("\"/unasked\"", WAIT).await,
        "{}",
        proxy.logs()
    );
    let logs = proxy.logs();
    let v = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "holdfast::access")
        .unwrap_or_else(|| panic!("no access line:\n{logs}"));
    assert_eq!(v["status"], 502, "{v}");
    assert_eq!(v["outcome"], "error", "{v}");
}

/// A body over `max_body_bytes` is the client's doing: its 413 is holdfast's own
/// answer (`local`), not an upstream failure (`error`, which the README keeps for 5xx).
#[tokio::test]
async fn access_log_calls_a_413_for_a_body_too_large_local() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let config = format!(
        "[log]\nformat = \"json\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\nmax_body_bytes = \"1KiB\"\n\n{}",
        proxy_to(&upstream.url())
    );
    let (proxy, addr) = spawn_holdfast(&config, &[]).await;
    let resp = send_one(addr, &ClientRequest::post("/big", "x".repeat(4096))).await;
    assert_eq!(resp.status, 413, "{resp:?}");
    assert!(
        proxy.wait_for_log("\"/big\"", WAIT).await,
        "{}",
        proxy.logs()
    );
    let logs = proxy.logs();
    let v = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "holdfast::access")
        .unwrap_or_else(|| panic!("no access line:\n{logs}"));
    assert_eq!(v["status"], 413, "{v}");
    assert_eq!(v["outcome"], "local", "{v}");
}

/// A request target may carry raw UTF-8 (hyper takes it), C1 control characters
/// included: U+009B is a terminal's CSI, U+0085 a line break to many readers. The
/// access line escapes them, in text as in JSON, as tracing's own formatter does
/// since it was fixed for this (terminal injection), so a request cannot colour,
/// rewrite or split the operator's log.
#[tokio::test]
async fn access_log_escapes_c1_control_characters_of_the_target() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    for format in ["text", "json"] {
        let (proxy, addr) = spawn_holdfast(&binary_config(&upstream.url(), format), &[]).await;
        let mut c = RawClient::connect(addr).await.unwrap();
        c.send(b"GET /c1/\xc2\x9b31mred\xc2\x85x?q=\xc2\x9b HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let resp = c.read_response(WAIT).await.unwrap();
        assert_eq!(resp.status, 200, "{format}: {resp:?}");
        assert!(
            proxy.wait_for_log("/c1/", WAIT).await,
            "{format}: {}",
            proxy.logs()
        );
        let logs = proxy.logs();
        let line = logs
            .lines()
            .find(|l| l.contains("/c1/"))
            .expect("an access line");
        assert!(
            !line.chars().any(|c| ('\u{80}'..='\u{9f}').contains(&c)),
            "{format}: a C1 control character reached the log: {line:?}"
        );
        assert!(
            line.contains("/c1/\\u009b31mred\\u0085x?q=\\u009b"),
            "{format}: {line:?}"
        );
        if format == "json" {
            let v: serde_json::Value = serde_json::from_str(line).expect("JSON");
            assert_eq!(v["path"], "/c1/\u{9b}31mred\u{85}x?q=\u{9b}", "{v}");
        }
    }
}

/// A `redirect_https` listener's 308 is holdfast's own answer to a request: it has
/// its access-log line like any other (`local`, no route), not none.
#[tokio::test]
async fn access_log_has_a_line_for_a_redirect() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let config = format!(
        "[log]\nformat = \"json\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\nredirect_https = true\n\n{}",
        proxy_to(&upstream.url())
    );
    let (proxy, addr) = spawn_holdfast(&config, &[]).await;
    let resp = send_one(addr, &ClientRequest::get("/moved?x=1")).await;
    assert_eq!(resp.status, 308, "{resp:?}");
    assert!(
        proxy.wait_for_log("\"/moved?x=1\"", WAIT).await,
        "{}",
        proxy.logs()
    );
    let logs = proxy.logs();
    let v = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "holdfast::access")
        .unwrap_or_else(|| panic!("no access line:\n{logs}"));
    assert_eq!(v["status"], 308, "{v}");
    assert_eq!(v["route"], "-", "{v}");
    assert_eq!(v["outcome"], "local", "{v}");
    assert_eq!(v["bytes"], resp.body.len(), "{v}");
}

/// A request refused after routing (a `..` hidden behind `;` parameters) is counted
/// in `holdfast_requests_total` under the route it matched; its access line must
/// name that route too, or the log and the metrics disagree about where it went.
#[tokio::test]
async fn access_log_names_the_route_of_a_request_refused_after_routing() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let (proxy, addr) = spawn_holdfast(&binary_config(&upstream.url(), "json"), &[]).await;
    let resp = send_one(addr, &ClientRequest::get("/api/..;/admin")).await;
    assert_eq!(resp.status, 400, "{resp:?}");
    assert!(
        proxy.wait_for_log("\"/api/..;/admin\"", WAIT).await,
        "{}",
        proxy.logs()
    );
    let logs = proxy.logs();
    let v = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["target"] == "holdfast::access")
        .unwrap_or_else(|| panic!("no access line:\n{logs}"));
    assert_eq!(v["status"], 400, "{v}");
    assert_eq!(v["route"], "route[0]", "{v}");
}

/// A tunnel holds its upstream connection until it closes: it still counts under the
/// upstream's `pool.max_connections`, so a request meanwhile waits for a slot instead
/// of opening a connection past the limit.
#[tokio::test]
async fn an_open_tunnel_counts_against_the_upstream_max_connections() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let open = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (o, m) = (open.clone(), most.clone());
    // Answers 101 to an upgrade (then echoes until EOF), 200 to anything else.
    let upstream = raw_upstream(move |stream| {
        let (open, most) = (o.clone(), m.clone());
        async move {
            let now = open.fetch_add(1, SeqCst) + 1;
            most.fetch_max(now, SeqCst);
            let mut io = BufReader::new(stream);
            // Bounded by the peer: one request after another until EOF.
            while let Ok(Some(head)) = read_head(&mut io).await {
                if header(&head, "upgrade").is_none() {
                    if io
                        .get_mut()
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await
                        .is_err()
                    {
                        break;
                    }
                    continue;
                }
                let answer = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n";
                if io.get_mut().write_all(answer).await.is_err() {
                    break;
                }
                let mut buf = [0u8; 4096];
                // Bounded by the peer: ends at its EOF.
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.get_mut().write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                break;
            }
            open.fetch_sub(1, SeqCst);
        }
    })
    .await;
    let gw = start(&format!(
        "{}\n[upstream.up.pool]\nmax_connections = 1\nmax_idle = 1\nqueue_timeout = \"300ms\"\n",
        proxy_to(&format!("http://{}", upstream.addr))
    ))
    .await;
    let mut ws = RawClient::connect(gw.addr).await.unwrap();
    ws.send("GET /chat HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(ws.read_response(WAIT).await.unwrap().status, 101);
    ws.send(b"ping").await.unwrap();
    assert_eq!(read_exactly(&mut ws, 4).await, b"ping");
    // The tunnel holds the one connection allowed: this request waits, then gives up.
    let resp = send_one(gw.addr, &ClientRequest::get("/other")).await;
    assert_eq!(resp.status, 503, "{resp:?}");
    assert_eq!(most.load(SeqCst), 1, "upstream connections open at once");
    // The tunnel ends; its slot is free again.
    ws.shutdown_write().await.unwrap();
    assert_eq!(ws.wait_close(WAIT).await, PeerClose::Eof);
    drop(ws);
    let deadline = Instant::now() + WAIT;
    // Bounded by the deadline: the tunnel task ends promptly after both sides closed.
    let resp = loop {
        let resp = send_one(gw.addr, &ClientRequest::get("/after")).await;
        if resp.status != 503 || Instant::now() >= deadline {
            break resp;
        }
    };
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(most.load(SeqCst), 1, "upstream connections open at once");
}

/// An upgrade the upstream refuses (a 401 to a WebSocket without credentials) is an
/// ordinary exchange: the answer promised keep-alive, so the connection stays open
/// for the client's next request, through the park of an idle connection too.
#[tokio::test]
async fn a_refused_upgrade_keeps_the_connection_alive() {
    let upstream =
        TestUpstream::start(Behaviour::respond(|_| Reply::new(401).body("who are you"))).await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    client
        .send("GET /chat HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    let resp = client.read_response(WAIT).await.unwrap();
    assert_eq!(resp.status, 401, "{resp:?}");
    assert!(resp.keeps_alive(), "{resp:?}");
    // Idle past the park (100 ms): the connection is parked, not closed.
    gw.wait_metric("holdfast_client_parked_connections", 1.0, WAIT)
        .await;
    client
        .send("GET /next HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let resp = client.read_response(WAIT).await;
    assert_eq!(resp.map(|r| r.status), Ok(401));
}

/// RFC 9110 7.8: an `Upgrade` in an HTTP/1.0 request is ignored; hyper cannot
/// switch such a connection anyway. The request reaches the upstream as a plain one,
/// and a 101 the upstream answers regardless is not passed on as a switch that
/// cannot happen.
#[tokio::test]
async fn an_upgrade_in_an_http_1_0_request_is_ignored() {
    // Switches whenever asked; answers 200 otherwise.
    let upstream = raw_upstream(|stream| async move {
        let mut io = BufReader::new(stream);
        let Ok(Some(head)) = read_head(&mut io).await else {
            return;
        };
        let answer: &[u8] = if header(&head, "upgrade").is_some() {
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
        } else {
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain"
        };
        let _ = io.get_mut().write_all(answer).await;
        // Holds the connection until holdfast closes it (bounded by the test's wait).
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(WAIT, io.read(&mut buf)).await;
    })
    .await;
    let gw = start(&proxy_to(&format!("http://{}", upstream.addr))).await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    client
        .send("GET /chat HTTP/1.0\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n")
        .await
        .unwrap();
    let resp = client.read_response(WAIT).await.unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.text(), "plain");
}

/// An HTTP/1.0 client keeps its connection only when asked with `Connection:
/// keep-alive` (RFC 9112 9.3), and reads that token to learn whether the server
/// agreed. The response that ends the connection (here the last one allowed on it)
/// must say `close` and only that: hyper added `keep-alive` beside it for such a
/// client, and a client that looks for the token took the connection for open.
#[tokio::test]
async fn an_http_1_0_keep_alive_client_is_told_close_alone_when_its_connection_ends() {
    let upstream = TestUpstream::start(Behaviour::fixed(200, 5)).await;
    let gw = start(&format!(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\nmax_requests_per_connection = 2\n\n{}",
        proxy_to(&upstream.url())
    ))
    .await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    let request = "GET /a HTTP/1.0\r\nconnection: keep-alive\r\n\r\n";
    client.send(request).await.unwrap();
    let first = client.read_response(WAIT).await.unwrap();
    assert_eq!(first.header("connection"), Some("keep-alive"), "{first:?}");
    client.send(request).await.unwrap();
    let last = client.read_response(WAIT).await.unwrap();
    assert_eq!(last.status, 200, "{last:?}");
    assert_eq!(last.header("connection"), Some("close"), "{last:?}");
    assert_eq!(last.header("keep-alive"), None, "{last:?}");
    assert_eq!(client.wait_close(WAIT).await, PeerClose::Eof);
}

/// HTTP/1.0 has no chunked coding: a body of unknown length (chunked from the
/// upstream) reaches an HTTP/1.0 client delimited by the connection's close, so the
/// response must say `close`, not promise keep-alive it cannot keep.
#[tokio::test]
async fn a_body_of_unknown_length_to_an_http_1_0_client_says_close() {
    let upstream = TestUpstream::start(Behaviour::Fixed {
        status: 200,
        headers: Vec::new(),
        body_len: 5,
        framing: Framing::Chunked,
    })
    .await;
    let gw = start(&proxy_to(&upstream.url())).await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    client
        .send("GET /a HTTP/1.0\r\nconnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let resp = client.read_response(WAIT).await.unwrap();
    assert_eq!(resp.status, 200, "{resp:?}");
    assert_eq!(resp.body_len, 5, "{resp:?}");
    assert_eq!(resp.header("content-length"), None, "{resp:?}");
    assert_eq!(resp.header("connection"), Some("close"), "{resp:?}");
    assert_eq!(resp.header("keep-alive"), None, "{resp:?}");
}

/// An upstream that answers before it has read the request body (a 401 to an
/// upload, right after its head) ends the exchange with the body still on its way
/// from the client; holdfast then drops the rest, and hyper closes the client
/// connection after the answer. RFC 9110 10.1.1: a server that answers before
/// reading the whole content says whether it will close; the answer must not promise
/// keep-alive, or a client that finishes its body and sends its next request on the
/// connection loses it. Here the client asked `Expect: 100-continue`, got its 100,
/// and reads the answer before sending its body.
#[tokio::test]
async fn an_upstream_answer_before_the_body_was_sent_does_not_promise_keep_alive() {
    // Answers at once after the head; then reads (and drops) whatever comes, so that
    // holdfast's writes do not fail.
    let upstream = raw_upstream(|stream| async move {
        let mut io = BufReader::new(stream);
        if !matches!(read_head(&mut io).await, Ok(Some(_))) {
            return;
        }
        if io
            .get_mut()
            .write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 4\r\n\r\nnope")
            .await
            .is_err()
        {
            return;
        }
        let mut buf = [0u8; 4096];
        // Bounded by the peer (holdfast closes it) and the test's wait.
        while let Ok(Ok(n)) = tokio::time::timeout(WAIT, io.read(&mut buf)).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    // One attempt: the body streams (nothing is kept for a retry).
    let gw = start(&format!(
        "{}[upstream.up.retry]\nattempts = 1\n",
        proxy_to(&format!("http://{}", upstream.addr))
    ))
    .await;
    let mut client = RawClient::connect(gw.addr).await.unwrap();
    client
        .send(
            "POST /upload HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n\
             content-length: 5\r\n\r\n",
        )
        .await
        .unwrap();
    let resp = client.read_response(WAIT).await.unwrap();
    assert_eq!(resp.status, 401, "{resp:?}");
    assert_eq!(resp.informational, vec![100], "{resp:?}");
    if resp.keeps_alive() {
        // Promised: the body and the next request must be taken.
        client.send("hello").await.unwrap();
        client
            .send("GET /next HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let next = client.read_response(WAIT).await;
        assert!(next.is_ok(), "keep-alive was promised, then: {next:?}");
    } else {
        assert_eq!(resp.header("connection"), Some("close"), "{resp:?}");
    }
}

/// As above, with an upstream that closes after its early answer, its socket holding
/// the body it did not read: holdfast's next write of the body fails (a reset)
/// before it reads the answer, and the rest of the body is dropped. The answer still
/// reaches the client, and says the connection closes, with no `Keep-Alive` timeout
/// beside it: it is the client's last on the connection.
#[tokio::test]
async fn an_upstream_answer_then_close_before_the_body_was_sent_does_not_promise_keep_alive() {
    let upstream = raw_upstream(|stream| async move {
        let mut io = BufReader::new(stream);
        if matches!(read_head(&mut io).await, Ok(Some(_))) {
            let _ = io
                .get_mut()
                .write_all(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 4\r\n\r\nnope")
                .await;
        }
    })
    .await;
    for attempts in [1, 3] {
        let gw = start(&format!(
            "{}[upstream.up.retry]\nattempts = {attempts}\n",
            proxy_to(&format!("http://{}", upstream.addr))
        ))
        .await;
        let (mut read, mut write) = TcpStream::connect(gw.addr)
            .await
            .expect("connect")
            .into_split();
        const LEN: usize = 4 << 20;
        // The body goes on until holdfast closes (its linger reads it all).
        let uploading = tokio::spawn(async move {
            let head = format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {LEN}\r\n\r\n");
            write.write_all(head.as_bytes()).await?;
            write.write_all(&vec![b'x'; LEN]).await
        });
        let mut got = Vec::new();
        tokio::time::timeout(WAIT, read.read_to_end(&mut got))
            .await
            .expect("holdfast closes after its answer")
            .expect("the answer, then a FIN");
        let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
        assert!(
            text.starts_with("http/1.1 401"),
            "attempts = {attempts}: {text}"
        );
        assert!(text.ends_with("nope"), "attempts = {attempts}: {text}");
        assert!(
            text.contains("\r\nconnection: close\r\n"),
            "attempts = {attempts}: {text}"
        );
        assert!(
            !text.contains("keep-alive"),
            "attempts = {attempts}: {text}"
        );
        let _ = uploading.await;
    }
}

/// A request hyper refuses while reading its head (malformed: 400; over
/// `max_header_bytes`: 431) is answered by hyper before holdfast sees a request; it
/// still gets its access-log line (nginx logs them), holdfast's own answer under no
/// route, method and target `-`, and is counted in `holdfast_requests_total`.
#[tokio::test]
async fn access_log_has_a_line_for_a_head_hyper_refused() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let config = binary_config(&upstream.url(), "json").replace(
        "listen = \"127.0.0.1:0\"\n\n[[route]]",
        "listen = \"127.0.0.1:0\"\nmax_header_bytes = \"1KiB\"\n\n[[route]]",
    );
    assert!(config.contains("max_header_bytes"), "{config}");
    let (proxy, addr) = spawn_holdfast(&config, &[]).await;
    let long = "x".repeat(2048);
    for (head, status) in [
        (
            "GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n".to_owned(),
            400,
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: x\r\nX-Long: {long}\r\n\r\n"),
            431,
        ),
    ] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(WAIT, s.read_to_end(&mut out))
            .await
            .expect("answered and closed in time")
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{out}");
    }
    let lines = |logs: &str| -> Vec<serde_json::Value> {
        logs.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "holdfast::access")
            .collect()
    };
    holdfast_test::wait_until(WAIT, || lines(&proxy.logs()).len() >= 2).await;
    let logs = proxy.logs();
    let mut seen = lines(&logs);
    assert_eq!(seen.len(), 2, "{logs}");
    // Each line is written as its connection ends, which can be after the client
    // saw the close: the second connection's line may come first.
    seen.sort_by_key(|v| v["status"].as_u64());
    for (v, status) in seen.iter().zip([400, 431]) {
        assert_eq!(v["status"], status, "{v}");
        assert_eq!(v["method"], "-", "{v}");
        assert_eq!(v["path"], "-", "{v}");
        assert_eq!(v["route"], "-", "{v}");
        assert_eq!(v["outcome"], "local", "{v}");
        assert_eq!(v["bytes"], 0, "{v}");
    }
    let admin = logs
        .lines()
        .filter(|l| l.contains("admin listening"))
        .find_map(loopback_addr)
        .expect("the admin address");
    let metrics = KeepAliveClient::new(admin)
        .get("/metrics")
        .await
        .expect("GET /metrics");
    let metrics = metrics.text();
    assert!(
        metrics.contains("holdfast_requests_total{route=\"none\",class=\"4xx\"} 2"),
        "{metrics}"
    );
    assert_eq!(upstream.stats().connections_accepted, 0);
}

/// A request a client sends as holdfast closes its idle connection, before any FIN,
/// is answered, not dropped with the close; here the keep-alive timeout closes a plain
/// connection idle for less than the park delay (so never parked). holdfast's close
/// comes a turn of tokio's reactor after its timer fired: a request that reached the
/// socket since that turn looked unread and was dropped, the client getting a FIN
/// after its request and no answer. Shown by timing, bounded: a task in holdfast's
/// runtime takes the thread for 3 ms after each turn of the reactor (a busy server),
/// so that the close runs well after the turn that fired it, and a client thread sends its
/// second request at times swept across the close. A request sent after the FIN
/// reached the client (seen before sending), or within 250 µs after it (holdfast
/// looked and closed while it was on its way), is the race no server can win and is
/// not counted. Without the fix about 11 of the 44 or so sends before the close were dropped, in
/// every run.
#[tokio::test]
async fn a_request_sent_as_an_unparked_idle_connection_closes_is_answered() {
    second_requests_swept_across_an_idle_close(b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n", 200)
        .await;
}

/// As `a_request_sent_as_an_unparked_idle_connection_closes_is_answered`, after an
/// upgrade the upstream refused (a 401 to a WebSocket without credentials). hyper
/// keeps such an upgrade pending, and when holdfast closed the idle connection it
/// handed the socket to that upgrade instead of shutting it down: the look for a
/// request already in the socket (`ClientIo::poll_shutdown`) never ran, and a
/// request sent just before the close was dropped unanswered (about 10 of 44 in
/// every run).
#[tokio::test]
async fn a_request_sent_as_an_idle_connection_closes_after_a_refused_upgrade_is_answered() {
    second_requests_swept_across_an_idle_close(
        b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        401,
    )
    .await;
}

/// As `a_request_sent_as_an_unparked_idle_connection_closes_is_answered`, on a
/// connection woken from its park by a stray CRLF (RFC 9112 2.2) shortly before its
/// idle close. hyper holds that line as a head begun and does not end at the
/// graceful shutdown, so holdfast drops the connection itself (`closing_http1`):
/// without the look for a request already in the socket, and one sent just before
/// the close was dropped unanswered.
#[tokio::test]
async fn a_request_sent_as_a_connection_woken_by_a_crlf_closes_is_answered() {
    second_requests_swept_across_an_idle_close_after(
        b"GET /first HTTP/1.1\r\nHost: a\r\n\r\n",
        200,
        Some(Duration::from_millis(130)),
    )
    .await;
}

/// Sends `first` (answered `status`), then a second request at times swept across
/// the idle close of an unparked connection (see
/// `a_request_sent_as_an_unparked_idle_connection_closes_is_answered`); fails if one
/// sent before the FIN went unanswered.
async fn second_requests_swept_across_an_idle_close(first: &'static [u8], status: u16) {
    second_requests_swept_across_an_idle_close_after(first, status, None).await;
}

/// The same, with a keep-alive timeout of 20 ms; or, given `crlf_at`, of 200 ms, the
/// client sending a CRLF (after the park) that long after the first answer, and the
/// second request swept across 200 ms instead of 20.
async fn second_requests_swept_across_an_idle_close_after(
    first: &'static [u8],
    status: u16,
    crlf_at: Option<Duration>,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    // `/chat` is refused (it is the upgrade), anything else answered.
    let upstream = TestUpstream::start(Behaviour::respond(|req| {
        if req.target == "/chat" {
            Reply::new(401).body("who are you")
        } else {
            Reply::new(200).body("ok")
        }
    }))
    .await;
    let gw = start(&format!(
        "{}\n[[listener]]\nlisten = \"127.0.0.1:0\"\nkeepalive_timeout = \"{}ms\"\n\
         keepalive_min_idle = \"0s\"\n",
        proxy_to(&upstream.url()),
        if crlf_at.is_some() { 200 } else { 20 },
    ))
    .await;
    let stop = Arc::new(AtomicBool::new(false));
    // Woken by its own socket at each turn of the reactor, so ahead of every task a
    // timer wakes in that turn, it then holds the thread for 3 ms.
    let (hog_in, hog_out) = tokio::net::UnixStream::pair().unwrap();
    let hog = tokio::spawn({
        let stop = stop.clone();
        async move {
            hog_out.try_write(b"x").unwrap();
            let mut buf = [0u8; 64];
            // Bounded by the client's loop, and by half a minute in any case.
            for _ in 0..10_000 {
                if stop.load(Relaxed) {
                    return;
                }
                hog_in.readable().await.unwrap();
                // Read until it would block, which clears the readiness: the byte
                // written next is seen at the next turn only.
                while hog_in.try_read(&mut buf).is_ok() {}
                hog_out.try_write(b"x").unwrap();
                std::thread::sleep(Duration::from_millis(3));
            }
        }
    });
    /// Reads one response (head, then a `Content-Length` body); `None` at EOF first.
    fn read_response(s: &mut std::net::TcpStream) -> Option<u16> {
        let mut got = Vec::new();
        let mut byte = [0u8; 4096];
        loop {
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if got.len() >= end + 4 + len {
                    return head.get(9..12)?.parse().ok();
                }
            }
            match s.read(&mut byte) {
                Ok(0) | Err(_) => return None,
                Ok(n) => got.extend_from_slice(&byte[..n]),
            }
        }
    }
    let addr = gw.addr;
    let (sent, dropped) = tokio::task::spawn_blocking(move || {
        let (mut sent, mut dropped) = (0u32, 0u32);
        for i in 0..60u64 {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(WAIT)).unwrap();
            s.write_all(first).unwrap();
            assert_eq!(read_response(&mut s), Some(status), "first, iteration {i}");
            // 12 to 30 ms after the answer, in 0.3 ms steps: the close is due 20 ms
            // after it, and runs some milliseconds later on this busy runtime.
            let mut sweep = Duration::from_micros(12_000 + i * 300);
            if let Some(at) = crlf_at {
                std::thread::sleep(at);
                s.write_all(b"\r\n").unwrap();
                sweep += Duration::from_millis(180) - at;
            }
            std::thread::sleep(sweep);
            // Not closed yet, then the request: if the thread was held up between the
            // two (a loaded machine), the FIN may have come first; not counted then.
            let started = Instant::now();
            s.set_nonblocking(true).unwrap();
            let mut peek = [0u8; 1];
            let closed = matches!(s.peek(&mut peek), Ok(0));
            s.set_nonblocking(false).unwrap();
            if closed {
                continue;
            }
            s.write_all(b"GET /second HTTP/1.1\r\nHost: a\r\n\r\n")
                .unwrap();
            let mut clear = started.elapsed() < Duration::from_micros(200);
            // A FIN within 250 µs of the request crossed it: holdfast looked at its
            // socket and closed in the microseconds the request was on its way, the
            // race no server can win; not counted. (A close that dropped a request
            // already waiting came 0.3 to 3 ms after it here, a reactor turn later.)
            // Looked for by spinning: a socket's read timeout counts in jiffies.
            let wrote = Instant::now();
            s.set_nonblocking(true).unwrap();
            while wrote.elapsed() < Duration::from_micros(250) {
                match s.peek(&mut peek) {
                    Ok(0) => clear = false,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::yield_now();
                        continue;
                    }
                    _ => {}
                }
                break;
            }
            s.set_nonblocking(false).unwrap();
            sent += u32::from(clear);
            match read_response(&mut s) {
                Some(status) => assert_eq!(status, 200),
                None => dropped += u32::from(clear),
            }
        }
        (sent, dropped)
    })
    .await
    .unwrap();
    stop.store(true, Relaxed);
    hog.await.unwrap();
    eprintln!("second requests sent before the close: {sent}, dropped: {dropped}");
    assert!(sent > 0, "every second request came after the close");
    // One is let pass: on a machine loaded by other tests, holdfast's thread can be
    // held up between its look at the socket and its close for longer than the
    // 250 µs above, and a request crossing that close is the race no server wins
    // (seen in about 1 run of 40 under load, one request each time). The closes
    // that drop requests already waiting drop 6 to 11 per run.
    assert!(
        dropped <= 1,
        "{dropped} requests sent before the FIN went unanswered"
    );
}
