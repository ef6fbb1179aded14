//! The load helper counts every outcome and stays within its bounds.

use std::time::Duration;

use holdfast_test::{
    Behaviour, ClientRequest, ErrorKind, Load, LoadConfig, TestUpstream, run_load,
};

#[tokio::test]
async fn load_against_a_healthy_upstream_is_clean() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let config = LoadConfig {
        connections: 4,
        max_requests: 200,
        ..LoadConfig::default()
    };
    let report = run_load(upstream.addr(), config, |slot| {
        ClientRequest::get(format!("/c{}/{}", slot.connection, slot.seq))
    })
    .await;
    report.assert_clean();
    assert_eq!(report.requests, 200);
    assert_eq!(report.ok, 200);
    assert_eq!(report.connections_opened, 4);
    assert_eq!(upstream.requests_seen(), 200);
}

#[tokio::test]
async fn load_counts_transport_errors_by_kind() {
    // Unannounced closes: every reuse of a connection races its close.
    let upstream = TestUpstream::start(Behaviour::CloseAfterEachResponse).await;
    let config = LoadConfig {
        connections: 2,
        max_requests: 40,
        ..LoadConfig::default()
    };
    let report = run_load(upstream.addr(), config, |_| ClientRequest::get("/")).await;
    assert_eq!(report.requests, 40);
    assert!(report.error_count() > 0, "{report}");
    assert_eq!(
        report.errors_of(ErrorKind::Eof) + report.errors_of(ErrorKind::Reset),
        report.error_count(),
        "{report}"
    );
    assert_eq!(report.ok + report.error_count(), 40);
}

#[tokio::test]
async fn load_counts_statuses() {
    let upstream = TestUpstream::start(Behaviour::fixed(503, 0)).await;
    let config = LoadConfig {
        connections: 1,
        max_requests: 10,
        ..LoadConfig::default()
    };
    let report = run_load(upstream.addr(), config, |_| ClientRequest::get("/")).await;
    assert_eq!(report.by_status.get(&503), Some(&10));
    assert_eq!(report.non_2xx_count(), 10);
}

#[tokio::test]
async fn load_stops_on_request_and_by_deadline() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let config = LoadConfig {
        connections: 2,
        max_duration: Duration::from_secs(30),
        max_requests: u64::MAX,
        ..LoadConfig::default()
    };
    let load = Load::spawn(upstream.addr(), config, |_| ClientRequest::get("/"));
    assert!(load.wait_for_completed(50, Duration::from_secs(10)).await);
    let report = load.stop().await;
    assert!(report.requests >= 50);
    report.assert_clean();

    let config = LoadConfig {
        connections: 1,
        max_duration: Duration::from_millis(200),
        max_requests: u64::MAX,
        think_time: Duration::from_millis(10),
        ..LoadConfig::default()
    };
    let report = run_load(upstream.addr(), config, |_| ClientRequest::get("/")).await;
    assert!(report.elapsed < Duration::from_secs(5), "{report}");
    report.assert_clean();
}
