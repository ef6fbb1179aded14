//! Each `Behaviour` of the scripted upstream, observed with a `RawClient`.

use std::time::Duration;

use holdfast_test::{
    Behaviour, BodyFraming, ClientRequest, CloseCause, ErrorKind, Event, Framing, PeerClose, Phase,
    RawClient, Reply, TestUpstream, is_pattern,
};
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(5);

async fn client(upstream: &TestUpstream) -> RawClient {
    RawClient::connect(upstream.addr())
        .await
        .expect("connect to the test upstream")
}

#[tokio::test]
async fn echo_reflects_the_request_and_keeps_the_connection() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let mut c = client(&upstream).await;
    let req = ClientRequest::post("/submit?x=1", "payload")
        .header("X-Request-Id", "abc-123")
        .header("X-Dup", "one")
        .header("x-dup", "two");
    c.send_request(&req).await.unwrap();
    let res = c.read_response(WAIT).await.unwrap();
    assert_eq!(res.status, 200);
    assert_eq!(res.header("x-request-id"), Some("abc-123"));
    assert_eq!(res.header("x-upstream-conn"), Some("1"));
    assert_eq!(res.header("x-upstream-seq"), Some("1"));
    let echoed = res.echoed().expect("an echo body");
    assert_eq!(echoed.method, "POST");
    assert_eq!(echoed.target, "/submit?x=1");
    assert_eq!(&echoed.body[..], b"payload");
    let names: Vec<&str> = echoed.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["host", "X-Request-Id", "X-Dup", "x-dup", "content-length"]
    );

    c.send_request(&ClientRequest::get("/again")).await.unwrap();
    let res = c.read_response(WAIT).await.unwrap();
    assert_eq!(res.header("x-upstream-seq"), Some("2"));
    assert!(res.keeps_alive());
    assert_eq!(upstream.connections_accepted(), 1);
    assert_eq!(upstream.requests_seen(), 2);
    assert_eq!(upstream.requests()[1].target, "/again");
}

#[tokio::test]
async fn chunked_request_bodies_are_decoded_with_trailers() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let mut c = client(&upstream).await;
    c.send(
        "POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
         4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nChecksum: 99\r\n\r\n",
    )
    .await
    .unwrap();
    let res = c.read_response(WAIT).await.unwrap();
    assert_eq!(&res.echoed().unwrap().body[..], b"Wikipedia");
    let seen = &upstream.requests()[0];
    assert_eq!(&seen.body[..], b"Wikipedia");
    assert_eq!(seen.trailers.get("checksum"), Some("99"));
}

#[tokio::test]
async fn expect_continue_gets_an_interim_response() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let mut c = client(&upstream).await;
    c.send("PUT /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi")
        .await
        .unwrap();
    let res = c.read_response_for("PUT", WAIT).await.unwrap();
    assert_eq!(res.informational, [100]);
    assert_eq!(&res.echoed().unwrap().body[..], b"hi");
}

#[tokio::test]
async fn fixed_bodies_follow_the_pattern_in_every_framing() {
    for framing in [Framing::ContentLength, Framing::Chunked] {
        let upstream = TestUpstream::start(Behaviour::Fixed {
            status: 201,
            headers: vec![("x-kind".into(), "fixed".into())],
            body_len: 100_000,
            framing,
        })
        .await;
        let mut c = client(&upstream).await;
        c.send_request(&ClientRequest::get("/")).await.unwrap();
        let res = c.read_response(WAIT).await.unwrap();
        assert_eq!(res.status, 201);
        assert_eq!(res.header("x-kind"), Some("fixed"));
        assert_eq!(res.body.len(), 100_000);
        assert!(is_pattern(0, &res.body));
        let expected = match framing {
            Framing::Chunked => BodyFraming::Chunked,
            _ => BodyFraming::Length(100_000),
        };
        assert_eq!(res.framing, expected);

        c.send_request(&ClientRequest::head("/")).await.unwrap();
        let res = c.read_response_for("HEAD", WAIT).await.unwrap();
        assert_eq!((res.status, res.body_len), (201, 0));
    }
}

#[tokio::test]
async fn close_delimited_bodies_end_with_the_connection() {
    let upstream = TestUpstream::start(Behaviour::Fixed {
        status: 200,
        headers: Vec::new(),
        body_len: 3000,
        framing: Framing::CloseDelimited,
    })
    .await;
    let mut c = client(&upstream).await;
    c.send_request(&ClientRequest::get("/")).await.unwrap();
    let res = c.read_response(WAIT).await.unwrap();
    assert_eq!(res.framing, BodyFraming::UntilEof);
    assert_eq!(res.body.len(), 3000);
    assert!(!res.keeps_alive());
}

#[tokio::test]
async fn close_idle_after_closes_an_idle_connection_with_fin() {
    let idle = Duration::from_millis(200);
    let upstream = TestUpstream::start(Behaviour::CloseIdleAfter(idle)).await;
    let mut c = client(&upstream).await;
    c.send_request(&ClientRequest::get("/")).await.unwrap();
    let res = c.read_response(WAIT).await.unwrap();
    assert!(res.keeps_alive(), "the close is not announced");
    let answered = Instant::now();
    assert_eq!(c.wait_close(WAIT).await, PeerClose::Eof);
    assert!(answered.elapsed() >= idle - Duration::from_millis(20));
    upstream.wait_for_closed(1, WAIT).await.unwrap();
    assert!(upstream.events().contains(&Event::Closed {
        conn: 1,
        cause: CloseCause::IdleTimeout
    }));
}

#[tokio::test]
async fn announce_keep_alive_then_close_closes_after_the_response() {
    let upstream =
        TestUpstream::start(Behaviour::AnnounceKeepAliveThenClose { timeout_secs: 8 }).await;
    let mut c = client(&upstream).await;
    c.send_request(&ClientRequest::get("/")).await.unwrap();
    let res = c.read_response(WAIT).await.unwrap();
    assert_eq!(res.header("connection"), Some("keep-alive"));
    assert_eq!(res.keep_alive_timeout(), Some(8));
    assert_eq!(c.wait_close(WAIT).await, PeerClose::Eof);
}

#[tokio::test]
async fn close_after_each_response_closes_without_announcing() {
    let upstream = TestUpstream::start(Behaviour::CloseAfterEachResponse).await;
    let mut c = client(&upstream).await;
    c.send_request(&ClientRequest::get("/")).await.unwrap();
    let res = c.read_response(WAIT).await.unwrap();
    assert_eq!(res.header("connection"), None);
    assert_eq!(res.header("keep-alive"), None);
    assert_eq!(c.wait_close(WAIT).await, PeerClose::Eof);
}

#[tokio::test]
async fn close_after_requests_closes_after_the_nth_response() {
    let upstream = TestUpstream::start(Behaviour::CloseAfterRequests(2)).await;
    let mut c = client(&upstream).await;
    for _ in 0..2 {
        c.send_request(&ClientRequest::get("/")).await.unwrap();
        c.read_response(WAIT).await.unwrap();
    }
    assert_eq!(c.wait_close(WAIT).await, PeerClose::Eof);
    assert_eq!(upstream.requests_seen(), 2);
}

#[tokio::test]
async fn hang_reads_the_request_and_never_answers() {
    let upstream = TestUpstream::start(Behaviour::Hang).await;
    let mut c = client(&upstream).await;
    c.send_request(&ClientRequest::get("/slow")).await.unwrap();
    upstream.wait_for_requests(1, WAIT).await.unwrap();
    let err = c
        .read_response(Duration::from_millis(300))
        .await
        .unwrap_err();
    assert_eq!(
        (err.kind, err.phase),
        (ErrorKind::Timeout, Phase::BeforeResponse)
    );
    assert_eq!(upstream.open_connections(), 1, "the socket is held");
    upstream.kill_all_connections().await;
    assert_eq!(c.wait_close(WAIT).await, PeerClose::Eof);
}

#[tokio::test]
async fn delay_answers_after_the_delay() {
    let delay = Duration::from_millis(200);
    let upstream = TestUpstream::start(Behaviour::Delay(delay)).await;
    let mut c = client(&upstream).await;
    let sent = Instant::now();
    c.send_request(&ClientRequest::get("/")).await.unwrap();
    c.read_response(WAIT).await.unwrap();
    assert!(sent.elapsed() >= delay);
}

#[tokio::test]
async fn reset_mid_body_yields_a_reset() {
    let upstream = TestUpstream::start(Behaviour::ResetMidBody).await;
    let mut c = client(&upstream).await;
    c.send_request(&ClientRequest::get("/")).await.unwrap();
    let err = c.read_response(WAIT).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Reset, "{err}");
}

#[tokio::test]
async fn close_mid_body_yields_eof_mid_response() {
    let upstream = TestUpstream::start(Behaviour::CloseMidBody).await;
    let mut c = client(&upstream).await;
    c.send_request(&ClientRequest::get("/")).await.unwrap();
    let err = c.read_response(WAIT).await.unwrap_err();
    assert_eq!(
        (err.kind, err.phase),
        (ErrorKind::Eof, Phase::MidResponse),
        "{err}"
    );
}

#[tokio::test]
async fn garbage_is_not_http() {
    let upstream = TestUpstream::start(Behaviour::Garbage).await;
    let mut c = client(&upstream).await;
    c.send_request(&ClientRequest::get("/")).await.unwrap();
    let err = c.read_response(WAIT).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Malformed, "{err}");
}

#[tokio::test]
async fn bytes_while_idle_arrive_on_the_idle_connection() {
    let upstream = TestUpstream::start(Behaviour::BytesWhileIdle(Duration::from_millis(50))).await;
    let mut c = client(&upstream).await;
    c.send_request(&ClientRequest::get("/")).await.unwrap();
    c.read_response(WAIT).await.unwrap();
    match c.wait_close(WAIT).await {
        PeerClose::Data(bytes) => assert!(bytes.starts_with(b"HTTP/1.1 408")),
        other => panic!("expected unsolicited bytes, got {other:?}"),
    }
    assert_eq!(c.wait_close(Duration::ZERO).await, PeerClose::StillOpen);
}

#[tokio::test]
async fn slow_headers_still_parse() {
    let upstream = TestUpstream::start(Behaviour::SlowHeaders(Duration::from_millis(50))).await;
    let mut c = client(&upstream).await;
    c.send_request(&ClientRequest::get("/")).await.unwrap();
    assert_eq!(c.read_response(WAIT).await.unwrap().status, 200);
}

#[tokio::test]
async fn stream_body_streams_a_large_body_in_pattern() {
    const LEN: u64 = 256 * 1024 * 1024;
    let upstream = TestUpstream::start(Behaviour::StreamBody { len: LEN }).await;
    let mut c = client(&upstream).await;
    c.send_request(&ClientRequest::get("/big")).await.unwrap();
    let mut offset = 0u64;
    let mut intact = true;
    let res = c
        .read_response_streaming("GET", Duration::from_secs(60), |piece| {
            // Check the first and last byte of each piece; full checks would dominate.
            intact &= is_pattern(offset, &piece[..1])
                && is_pattern(offset + piece.len() as u64 - 1, &piece[piece.len() - 1..]);
            offset += piece.len() as u64;
        })
        .await
        .unwrap();
    assert_eq!(res.body_len, LEN);
    assert!(res.body.is_empty());
    assert!(intact);
}

#[tokio::test]
async fn respond_scripts_any_reply() {
    let upstream = TestUpstream::start(Behaviour::respond(|req| {
        if req.target == "/none" {
            Reply::new(204).header("x-seen", req.seq.to_string())
        } else {
            Reply::new(404).body("nope").framing(Framing::Chunked)
        }
    }))
    .await;
    let mut c = client(&upstream).await;
    c.send_request(&ClientRequest::get("/none")).await.unwrap();
    let res = c.read_response(WAIT).await.unwrap();
    assert_eq!((res.status, res.header("x-seen")), (204, Some("1")));
    c.send_request(&ClientRequest::get("/other")).await.unwrap();
    let res = c.read_response(WAIT).await.unwrap();
    assert_eq!((res.status, &res.body[..]), (404, &b"nope"[..]));
}

#[tokio::test]
async fn behaviours_compose() {
    let behaviour = Behaviour::fixed(503, 10)
        .and(Behaviour::Delay(Duration::from_millis(10)))
        .and(Behaviour::CloseAfterRequests(1));
    let upstream = TestUpstream::start(behaviour).await;
    let mut c = client(&upstream).await;
    c.send_request(&ClientRequest::get("/")).await.unwrap();
    let res = c.read_response(WAIT).await.unwrap();
    assert_eq!((res.status, res.body.len()), (503, 10));
    assert_eq!(c.wait_close(WAIT).await, PeerClose::Eof);
}

#[tokio::test]
async fn malformed_requests_get_400_and_a_close() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let mut c = client(&upstream).await;
    c.send("NOT HTTP AT ALL\r\n\r\n").await.unwrap();
    let res = c.read_response(WAIT).await.unwrap();
    assert_eq!(res.status, 400);
    assert_eq!(c.wait_close(WAIT).await, PeerClose::Eof);
}

#[tokio::test]
async fn kill_all_connections_closes_every_connection_at_once() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(client(&upstream).await);
    }
    upstream.wait_for_connections(3, WAIT).await.unwrap();
    upstream.kill_all_connections().await;
    assert_eq!(upstream.open_connections(), 0);
    for c in &mut clients {
        assert_eq!(c.wait_close(WAIT).await, PeerClose::Eof);
    }
    // Still accepting.
    let mut c = client(&upstream).await;
    c.send_request(&ClientRequest::get("/")).await.unwrap();
    c.read_response(WAIT).await.unwrap();
}

#[tokio::test]
async fn stop_accepting_refuses_and_resume_accepts_again() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let mut kept = client(&upstream).await;
    upstream.wait_for_connections(1, WAIT).await.unwrap();
    upstream.stop_accepting().await;
    let refused = RawClient::connect(upstream.addr()).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    kept.send_request(&ClientRequest::get("/")).await.unwrap();
    kept.read_response(WAIT)
        .await
        .expect("open connections are kept");

    upstream.resume_accepting().await;
    let mut c = client(&upstream).await;
    c.send_request(&ClientRequest::get("/")).await.unwrap();
    c.read_response(WAIT).await.unwrap();
    assert_eq!(upstream.connections_accepted(), 2);
}

#[tokio::test]
async fn dropping_the_upstream_closes_its_connections() {
    let upstream = TestUpstream::start(Behaviour::Hang).await;
    let mut c = client(&upstream).await;
    c.send_request(&ClientRequest::get("/")).await.unwrap();
    upstream.wait_for_requests(1, WAIT).await.unwrap();
    drop(upstream);
    assert_eq!(c.wait_close(WAIT).await, PeerClose::Eof);
}
