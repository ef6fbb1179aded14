//! A real nginx per test, on an ephemeral port, stopped by PID.

use std::time::Duration;

use holdfast_test::{
    Behaviour, KeepAliveClient, Nginx, NginxOptions, TestUpstream, sys, wait_until,
};

#[tokio::test]
async fn nginx_serves_a_snippet_and_stops_on_drop() {
    let nginx = Nginx::start(
        r#"
        server {
            listen 127.0.0.1:{port};
            location / { return 200 "hello from nginx\n"; }
        }
        "#,
    )
    .await;
    let pid = nginx.pid();
    let mut client = KeepAliveClient::new(nginx.addr());
    let res = client.get("/").await.unwrap();
    assert_eq!(res.status, 200);
    assert_eq!(res.text(), "hello from nginx\n");
    assert!(res.header("server").is_some_and(|s| s.starts_with("nginx")));
    assert!(nginx.dir().join("nginx.pid").exists());
    drop(client);
    drop(nginx);
    assert!(!sys::is_running(pid));
}

#[tokio::test]
async fn nginx_proxies_to_a_test_upstream_with_keepalive() {
    let upstream = TestUpstream::start(Behaviour::Echo).await;
    let snippet = format!(
        r#"
        upstream origin {{
            server {};
            keepalive 4;
        }}
        server {{
            listen 127.0.0.1:{{port}};
            location / {{
                proxy_pass http://origin;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
            }}
        }}
        "#,
        upstream.addr()
    );
    let nginx = Nginx::start_with(
        NginxOptions {
            master_process: true,
            ..NginxOptions::default()
        },
        &snippet,
    )
    .await;
    let master = nginx.pid();
    assert!(
        wait_until(Duration::from_secs(5), || !sys::children_of(master)
            .is_empty())
        .await,
        "a worker starts"
    );
    let workers = sys::children_of(master);
    let mut client = KeepAliveClient::new(nginx.addr());
    for _ in 0..3 {
        let res = client.get("/via-nginx").await.unwrap();
        assert_eq!(res.echoed().unwrap().target, "/via-nginx");
    }
    assert_eq!(upstream.requests_seen(), 3);
    assert_eq!(
        upstream.connections_accepted(),
        1,
        "nginx reused its upstream connection"
    );
    drop(client);
    drop(nginx);
    assert!(!sys::is_running(master));
    assert!(workers.iter().all(|w| !sys::is_running(*w)));
}
