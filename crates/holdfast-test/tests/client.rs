//! The keep-alive client's error reporting, against scripted upstreams.

use std::time::Duration;

use holdfast_test::{
    Behaviour, Checkout, ClientRequest, ErrorKind, KeepAliveClient, Phase, Reply, TestUpstream,
    free_addr,
};

const WAIT: Duration = Duration::from_secs(5);

#[tokio::test]
async fn reuses_one_connection_across_requests() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let mut client = KeepAliveClient::new(upstream.addr());
    for i in 1..=3 {
        let res = client.get(&format!("/{i}")).await.unwrap();
        assert_eq!(res.header("x-upstream-seq"), Some(i.to_string().as_str()));
    }
    assert_eq!(client.connections_opened(), 1);
    assert_eq!(upstream.connections_accepted(), 1);
}

/// Story 1a: the server closed the idle connection; the next request on it gets EOF
/// before any response byte.
#[tokio::test]
async fn reports_eof_before_response_on_a_connection_the_server_closed() {
    let upstream = TestUpstream::start(Behaviour::CloseIdleAfter(Duration::from_millis(50))).await;
    let mut client = KeepAliveClient::new(upstream.addr());
    client.get("/first").await.unwrap();
    upstream.wait_for_closed(1, WAIT).await.unwrap();
    let err = client.get("/second").await.unwrap_err();
    assert!(
        matches!(err.kind, ErrorKind::Eof | ErrorKind::Reset),
        "{err}"
    );
    assert_eq!(
        (err.phase, err.checkout),
        (Phase::BeforeResponse, Checkout::Reused),
        "{err}"
    );
    assert!(!client.is_connected());
    // The next request opens a new connection.
    client.get("/third").await.unwrap();
    assert_eq!(client.connections_opened(), 2);
}

#[tokio::test]
async fn reports_refused_when_nothing_listens() {
    let mut client = KeepAliveClient::new(free_addr());
    let err = client.get("/").await.unwrap_err();
    assert_eq!((err.kind, err.phase), (ErrorKind::Refused, Phase::Connect));
    assert!(err.is_refused());
}

#[tokio::test]
async fn reports_timeout_and_drops_the_connection() {
    let upstream = TestUpstream::start(Behaviour::Hang).await;
    let mut client = KeepAliveClient::new(upstream.addr()).with_timeout(Duration::from_millis(200));
    let err = client.get("/").await.unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert_eq!(
        (err.phase, err.checkout),
        (Phase::BeforeResponse, Checkout::Fresh)
    );
    assert!(!client.is_connected());
}

#[tokio::test]
async fn a_close_response_ends_the_connection_without_error() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let mut client = KeepAliveClient::new(upstream.addr());
    let res = client
        .send(&ClientRequest::get("/").header("Connection", "close"))
        .await
        .unwrap();
    assert_eq!(res.header("connection"), Some("close"));
    assert!(!client.is_connected());
    client.get("/").await.unwrap();
    assert_eq!(client.connections_opened(), 2);
}

#[tokio::test]
async fn bodiless_statuses_keep_the_connection_usable() {
    let upstream = TestUpstream::start(Behaviour::respond(|req| match req.target.as_str() {
        "/204" => Reply::new(204),
        "/304" => Reply::new(304).header("etag", "\"x\""),
        _ => Reply::new(200).body("ok"),
    }))
    .await;
    let mut client = KeepAliveClient::new(upstream.addr());
    assert_eq!(client.get("/204").await.unwrap().status, 204);
    assert_eq!(client.get("/304").await.unwrap().status, 304);
    let res = client.send(&ClientRequest::head("/")).await.unwrap();
    assert_eq!((res.status, res.body_len), (200, 0));
    assert_eq!(&client.get("/").await.unwrap().body[..], b"ok");
    assert_eq!(client.connections_opened(), 1);
}
