//! `/metrics`, `/pools` and `/config` after scripted traffic: the numbers, not just the
//! names.
//!
//! Each test runs holdfast in-process on `127.0.0.1:0` (listener and admin) in front of
//! scripted upstreams, sends a known number of requests, and reads the admin endpoints.
//! Figures are recorded when a response ends, a moment after the client has its last
//! byte, so each check polls the endpoint until the expected value shows (bounded).

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use holdfast::server::{Control, DrainReport, Server};
use holdfast_test::{Behaviour, KeepAliveClient, Reply, TestUpstream};
use support::fastcgi_app::FastCgiApp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on waiting for a figure to show.
const SHOW: Duration = Duration::from_secs(5);

// === fixtures ===

struct Gateway {
    addr: SocketAddr,
    admin: SocketAddr,
    control: mpsc::Sender<Control>,
    task: JoinHandle<DrainReport>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The config around `body` (routes and upstreams), both listeners on port 0.
fn config(body: &str) -> holdfast::config::Config {
    let text = format!(
        r#"
[log]
access_log = false

[admin]
listen = "127.0.0.1:0"

[[listener]]
listen = "127.0.0.1:0"

{body}
"#
    );
    holdfast::config::Config::from_toml(&text, Path::new("t.toml"))
        .unwrap_or_else(|e| panic!("config: {e}\n{text}"))
}

async fn start(body: &str) -> Gateway {
    let server = Server::bind(config(body)).await.expect("bind holdfast");
    let addr = server.listen_addrs()[0];
    let admin = server.admin_addr().expect("admin listener");
    let (control, rx) = mpsc::channel(4);
    let task = tokio::spawn(server.run(rx));
    Gateway {
        addr,
        admin,
        control,
        task,
    }
}

impl Gateway {
    /// Sends `n` sequential GETs on one keep-alive connection; returns the statuses.
    async fn get_n(&self, target: &str, n: usize) -> Vec<u16> {
        let mut c = KeepAliveClient::new(self.addr).with_timeout(RESPONSE_TIMEOUT);
        let mut statuses = Vec::new();
        for _ in 0..n {
            let r = c
                .get(target)
                .await
                .unwrap_or_else(|e| panic!("GET {target}: {e}"));
            statuses.push(r.status);
        }
        statuses
    }

    async fn admin_get(&self, path: &str) -> holdfast_test::Response {
        KeepAliveClient::new(self.admin)
            .with_timeout(RESPONSE_TIMEOUT)
            .get(path)
            .await
            .unwrap_or_else(|e| panic!("GET {path} from admin: {e}"))
    }

    async fn metrics(&self) -> Metrics {
        let r = self.admin_get("/metrics").await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("content-type"),
            Some("text/plain; version=0.0.4; charset=utf-8")
        );
        Metrics::parse(&r.text())
    }

    /// Polls `/metrics` until `check` holds (bounded by [`SHOW`]); returns the last
    /// scrape either way, so the caller's assertion shows the numbers.
    async fn metrics_once(&self, check: impl Fn(&Metrics) -> bool) -> Metrics {
        let deadline = tokio::time::Instant::now() + SHOW;
        // Bounded by the deadline; a scrape every few milliseconds.
        loop {
            let m = self.metrics().await;
            if check(&m) || tokio::time::Instant::now() >= deadline {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// One scrape: samples by name and label set, after checking the text is well formed.
#[derive(Debug)]
struct Metrics {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    text: String,
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        let mut typed = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line");
                assert!(
                    typed.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "family {name} declared twice"
                );
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_owned(), BTreeMap::new()),
                Some((name, rest)) => {
                    let body = rest.strip_suffix('}').expect("closing brace");
                    let labels = body
                        .split("\",")
                        .map(|kv| {
                            let (k, v) = kv.split_once("=\"").expect("label");
                            (k.to_owned(), v.trim_end_matches('"').to_owned())
                        })
                        .collect();
                    (name.to_owned(), labels)
                }
            };
            assert!(name.starts_with("holdfast_"), "{name} lacks the prefix");
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains_key(*f)))
                .unwrap_or(&name);
            assert!(typed.contains_key(family), "{name} has no # TYPE before it");
            samples.push((name, labels, value));
        }
        Metrics {
            samples,
            text: text.to_owned(),
        }
    }

    /// The one sample of `name` whose labels include `labels`.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        assert!(
            found.len() <= 1,
            "{name} {labels:?} matches {} samples",
            found.len()
        );
        found.first().copied()
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels)
            .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{}", self.text))
    }
}

// === tests ===

/// An admin client that never finishes its request head is cut after
/// `ADMIN_HEAD_TIMEOUT`: it cannot hold an admin connection forever.
#[tokio::test]
async fn an_admin_client_that_dawdles_over_its_head_is_cut() {
    let gw = start("").await;
    let mut client = holdfast_test::RawClient::connect(gw.admin).await.unwrap();
    client.send("GET /live HTTP/1.1\r\nhost: a").await.unwrap();
    let started = tokio::time::Instant::now();
    let limit = holdfast::admin::ADMIN_HEAD_TIMEOUT + Duration::from_secs(3);
    match client.wait_close(limit).await {
        holdfast_test::PeerClose::StillOpen => panic!("still open after {limit:?}"),
        // A 408 before the close is fine too.
        _ => assert!(
            started.elapsed() >= holdfast::admin::ADMIN_HEAD_TIMEOUT - Duration::from_millis(500)
        ),
    }
}

#[tokio::test]
async fn requests_are_counted_by_route_and_status_class() {
    let a = TestUpstream::start(Behaviour::Echo).await;
    let b = TestUpstream::start(Behaviour::fixed(404, 3)).await;
    let gw = start(&format!(
        r#"
[[route]]
path = "/a"
upstream = "a"

[[route]]
path = "/b"
upstream = "b"

[upstream.a]
addresses = ["{}"]

[upstream.b]
addresses = ["{}"]
"#,
        a.url(),
        b.url()
    ))
    .await;
    assert_eq!(gw.get_n("/a/x", 5).await, [200; 5]);
    assert_eq!(gw.get_n("/b", 3).await, [404; 3]);
    assert_eq!(gw.get_n("/nowhere", 2).await, [404; 2]);

    let m = gw
        .metrics_once(|m| {
            m.get(
                "holdfast_request_duration_seconds_count",
                &[("route", "route[0]")],
            ) == Some(5.0)
        })
        .await;
    let requests = |route: &str, class: &str| {
        m.value(
            "holdfast_requests_total",
            &[("route", route), ("class", class)],
        )
    };
    assert_eq!(requests("route[0]", "2xx"), 5.0);
    assert_eq!(requests("route[0]", "4xx"), 0.0);
    assert_eq!(requests("route[1]", "4xx"), 3.0);
    assert_eq!(requests("route[1]", "2xx"), 0.0);
    assert_eq!(requests("none", "4xx"), 2.0, "no route: counted apart");
    let route0 = [("route", "route[0]")];
    assert_eq!(
        m.value("holdfast_request_duration_seconds_count", &route0),
        5.0
    );
    assert_eq!(
        m.value(
            "holdfast_request_duration_seconds_bucket",
            &[("route", "route[0]"), ("le", "+Inf")]
        ),
        5.0
    );
    assert_eq!(
        m.value(
            "holdfast_upstream_time_to_first_byte_seconds_count",
            &route0
        ),
        5.0
    );
    assert_eq!(
        m.value(
            "holdfast_upstream_time_to_first_byte_seconds_count",
            &[("route", "none")]
        ),
        0.0,
        "no upstream, no time to first byte"
    );
    assert_eq!(
        m.value(
            "holdfast_route_info",
            &[("route", "route[1]"), ("path", "/b"), ("upstream", "b")]
        ),
        1.0
    );
    assert_eq!(
        m.value("holdfast_upstream_requests_total", &[("upstream", "a")]),
        5.0
    );
    let addr_a = a.addr().to_string();
    let pool_a = [("upstream", "a"), ("address", addr_a.as_str())];
    let created = m.value("holdfast_pool_connections_created_total", &pool_a);
    let reused = m.value("holdfast_pool_connections_reused_total", &pool_a);
    assert_eq!(created, a.connections_accepted() as f64);
    assert_eq!(created + reused, 5.0, "every request used a connection");
    assert_eq!(
        m.value("holdfast_pool_idle_age_at_reuse_seconds_count", &pool_a),
        reused
    );
    assert_eq!(m.value("holdfast_pool_in_use_connections", &pool_a), 0.0);
    assert_eq!(m.value("holdfast_pool_waiting_requests", &pool_a), 0.0);
    assert_eq!(
        m.value("holdfast_pool_open_connections", &pool_a),
        m.value("holdfast_pool_idle_connections", &pool_a)
    );
    assert_eq!(
        m.value(
            "holdfast_upstream_health",
            &[pool_a[0], pool_a[1], ("state", "healthy")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "holdfast_pool_idle_timeout_seconds",
            &[pool_a[0], pool_a[1], ("source", "config")]
        ),
        4.0
    );
    assert_eq!(m.value("holdfast_draining", &[]), 0.0);
}

#[tokio::test]
async fn a_504_counts_as_5xx_and_closes_its_connection_for_timeout() {
    let up = TestUpstream::start(Behaviour::Hang).await;
    let gw = start(&format!(
        r#"
[[route]]
upstream = "slow"

[upstream.slow]
addresses = ["{}"]
timeouts.response_headers = "200ms"
"#,
        up.url()
    ))
    .await;
    assert_eq!(gw.get_n("/", 1).await, [504]);
    let m = gw
        .metrics_once(|m| {
            m.get(
                "holdfast_requests_total",
                &[("route", "route[0]"), ("class", "5xx")],
            ) == Some(1.0)
        })
        .await;
    assert_eq!(
        m.value(
            "holdfast_requests_total",
            &[("route", "route[0]"), ("class", "5xx")]
        ),
        1.0
    );
    assert_eq!(
        m.value(
            "holdfast_upstream_time_to_first_byte_seconds_count",
            &[("route", "route[0]")]
        ),
        0.0
    );
    let d = m.value(
        "holdfast_request_duration_seconds_sum",
        &[("route", "route[0]")],
    );
    assert!((0.2..5.0).contains(&d), "the 504 took the timeout: {d}");
    let addr = up.addr().to_string();
    assert_eq!(
        m.value(
            "holdfast_pool_connections_closed_total",
            &[("address", addr.as_str()), ("reason", "timeout")]
        ),
        1.0
    );
}

#[tokio::test]
async fn idle_closes_by_the_upstream_are_counted_and_teach_the_idle_timeout() {
    let up = TestUpstream::start(Behaviour::CloseIdleAfter(Duration::from_millis(300))).await;
    let gw = start(&format!(
        r#"
[[route]]
upstream = "idle"

[upstream.idle]
addresses = ["{}"]
pool.idle_timeout = "10s"
"#,
        up.url()
    ))
    .await;
    let addr = up.addr().to_string();
    let pool = [("upstream", "idle"), ("address", addr.as_str())];
    // Three closes at the same idle age: an unannounced idle timeout, learned.
    for round in 1..=3usize {
        assert_eq!(gw.get_n("/", 1).await, [200]);
        up.wait_for_closed(round, SHOW)
            .await
            .expect("upstream idle close");
        let m = gw
            .metrics_once(|m| {
                m.get(
                    "holdfast_pool_connections_closed_total",
                    &[pool[1], ("reason", "closed_by_upstream_idle")],
                ) == Some(round as f64)
            })
            .await;
        assert_eq!(
            m.value(
                "holdfast_pool_connections_closed_total",
                &[pool[1], ("reason", "closed_by_upstream_idle")]
            ),
            round as f64
        );
    }
    let m = gw.metrics().await;
    assert_eq!(
        m.value(
            "holdfast_pool_idle_age_at_upstream_close_seconds_count",
            &pool
        ),
        3.0
    );
    assert_eq!(
        m.value(
            "holdfast_pool_idle_age_at_upstream_close_seconds_bucket",
            &[pool[0], pool[1], ("le", "0.25")]
        ),
        0.0,
        "closed at 300 ms"
    );
    assert_eq!(
        m.value(
            "holdfast_pool_idle_age_at_upstream_close_seconds_bucket",
            &[pool[0], pool[1], ("le", "0.5")]
        ),
        3.0
    );
    let learned = m.value(
        "holdfast_pool_idle_timeout_seconds",
        &[pool[0], pool[1], ("source", "observed")],
    );
    assert!((0.2..0.3).contains(&learned), "4/5 of 300 ms: {learned}");
    assert_eq!(
        m.get(
            "holdfast_pool_idle_timeout_seconds",
            &[pool[0], pool[1], ("source", "config")]
        ),
        None,
        "one series, labelled with the source in force"
    );
    assert_eq!(m.value("holdfast_pool_open_connections", &pool), 0.0);
}

#[tokio::test]
async fn pools_shows_health_and_the_announced_idle_timeout() {
    let up = TestUpstream::start(Behaviour::respond(|_| {
        Reply::new(200).header("Keep-Alive", "timeout=5").body("ok")
    }))
    .await;
    let gw = start(&format!(
        r#"
[[route]]
upstream = "ka"

[upstream.ka]
addresses = ["{}"]
pool.idle_timeout = "30s"
"#,
        up.url()
    ))
    .await;
    assert_eq!(gw.get_n("/", 2).await, [200, 200]);
    let r = gw.admin_get("/pools").await;
    let pools: serde_json::Value = serde_json::from_slice(&r.body).expect("/pools is JSON");
    let addr = &pools[0]["addresses"][0];
    assert_eq!(pools[0]["name"], "ka");
    assert_eq!(addr["address"], up.addr().to_string());
    assert_eq!(addr["health"], "healthy");
    assert_eq!(addr["idle_timeout_source"], "keep_alive_header");
    // 5 s announced, less a margin of max(0.5 s, 1/8).
    assert_eq!(addr["effective_idle_timeout"], 4.375);
    let m = gw.metrics().await;
    let a = up.addr().to_string();
    assert_eq!(
        m.value(
            "holdfast_pool_idle_timeout_seconds",
            &[("address", a.as_str()), ("source", "keep_alive_header")]
        ),
        4.375
    );
}

#[tokio::test]
async fn drain_gauge_and_reload_counter() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let body = format!(
        r#"
[drain]
pre_delay = "30s"

[[route]]
upstream = "e"

[upstream.e]
addresses = ["{}"]
"#,
        up.url()
    );
    let gw = start(&body).await;
    assert_eq!(gw.get_n("/", 2).await, [200, 200]);
    let class = [("route", "route[0]"), ("class", "2xx")];
    gw.metrics_once(|m| m.get("holdfast_requests_total", &class) == Some(2.0))
        .await;

    gw.control
        .send(Control::Reload(Box::new(config(&body))))
        .await
        .expect("server listens");
    let m = gw
        .metrics_once(|m| m.get("holdfast_reloads_total", &[]) == Some(1.0))
        .await;
    assert_eq!(m.value("holdfast_reloads_total", &[]), 1.0);
    assert_eq!(m.value("holdfast_reload_failures_total", &[]), 0.0);
    assert_eq!(
        m.value("holdfast_requests_total", &class),
        2.0,
        "an unchanged route keeps its counts over a reload"
    );
    assert_eq!(m.value("holdfast_upgrades_total", &[]), 0.0);
    assert_eq!(m.value("holdfast_draining", &[]), 0.0);

    // A checker's keep-alive admin connection, open before the drain.
    let mut checker = KeepAliveClient::new(gw.admin).with_timeout(RESPONSE_TIMEOUT);
    assert_eq!(checker.get("/ready").await.expect("GET /ready").status, 200);

    // The pre-delay keeps the admin listener up while /ready fails.
    gw.control
        .send(Control::Drain)
        .await
        .expect("server listens");
    let m = gw
        .metrics_once(|m| m.get("holdfast_draining", &[]) == Some(1.0))
        .await;
    assert_eq!(m.value("holdfast_draining", &[]), 1.0);
    assert_eq!(gw.admin_get("/ready").await.status, 503);
    // Draining, admin answers close their connection: after an upgrade a checker
    // that comes back reaches the new process, not this one.
    let r = checker.get("/ready").await.expect("GET /ready");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("connection"), Some("close"), "{:?}", r.headers);
    gw.control
        .send(Control::Exit)
        .await
        .expect("server listens");
}

/// Client connections: the open gauge, the accepted count, and the two usual ways a
/// client fails (a malformed request; a head that never completes).
#[tokio::test]
async fn client_connections_and_their_errors_are_counted() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        r#"header_timeout = "300ms"

[[route]]
upstream = "e"

[upstream.e]
addresses = ["{}"]
"#,
        up.url()
    ))
    .await;
    // A good request on a connection that stays open.
    let mut held = KeepAliveClient::new(gw.addr).with_timeout(RESPONSE_TIMEOUT);
    assert_eq!(held.get("/").await.expect("GET").status, 200);

    // A malformed request: answered 400 and closed.
    let mut bad = TcpStream::connect(gw.addr).await.expect("connect");
    bad.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(RESPONSE_TIMEOUT, bad.read_to_end(&mut answer))
        .await
        .expect("closed in time")
        .expect("read");
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // A head that never completes: closed after header_timeout.
    let mut slow = TcpStream::connect(gw.addr).await.expect("connect");
    slow.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
    let mut rest = Vec::new();
    tokio::time::timeout(RESPONSE_TIMEOUT, slow.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("read");

    let errors = |kind| [("kind", kind)];
    let m = gw
        .metrics_once(|m| {
            m.get("holdfast_client_errors_total", &errors("head_timeout")) == Some(1.0)
                && m.get("holdfast_client_connections", &[]) == Some(1.0)
        })
        .await;
    assert_eq!(m.value("holdfast_client_connections_total", &[]), 3.0);
    assert_eq!(
        m.value("holdfast_client_connections", &[]),
        1.0,
        "the held one"
    );
    assert_eq!(
        m.value("holdfast_client_errors_total", &errors("malformed")),
        1.0
    );
    assert_eq!(
        m.value("holdfast_client_errors_total", &errors("head_timeout")),
        1.0
    );
    assert_eq!(
        m.value("holdfast_client_errors_total", &errors("tls_handshake")),
        0.0
    );
    assert_eq!(
        m.value("holdfast_client_errors_total", &errors("http2_abuse")),
        0.0
    );
    drop(held);
}

/// `holdfast_client_parked_connections`: an idle HTTP/1 connection parks after
/// 100 ms of quiet and counts until a request wakes it or its client closes it; one
/// with a request in flight does not count, however long the request takes.
#[tokio::test]
async fn parked_client_connections_are_counted_until_woken_or_closed() {
    use holdfast_test::{ClientRequest, RawClient};
    let echo = TestUpstream::start(Behaviour::Echo).await;
    let hang = TestUpstream::start(Behaviour::Hang).await;
    let gw = start(&format!(
        r#"
[[route]]
path = "/hang"
upstream = "hang"

[[route]]
upstream = "echo"

[upstream.hang]
addresses = ["{}"]

[upstream.echo]
addresses = ["{}"]
"#,
        hang.url(),
        echo.url()
    ))
    .await;
    let parked = |m: &Metrics| m.value("holdfast_client_parked_connections", &[]);
    let open = |m: &Metrics| m.value("holdfast_client_connections", &[]);
    let connect = || async { RawClient::connect(gw.addr).await.expect("connect") };

    // Busy from the start: its request waits on an upstream that never answers.
    let mut busy = connect().await;
    busy.send_request(&ClientRequest::get("/hang"))
        .await
        .expect("request");
    hang.wait_for_requests(1, SHOW).await.expect("forwarded");

    // Two idle after their answer: each parks (busy is older, and still does not).
    let mut idle = Vec::new();
    for n in 1..=2 {
        let mut c = connect().await;
        c.send_request(&ClientRequest::get("/"))
            .await
            .expect("request");
        let resp = c.read_response(RESPONSE_TIMEOUT).await.expect("response");
        assert_eq!(resp.status, 200);
        idle.push(c);
        let m = gw.metrics_once(|m| parked(m) == f64::from(n)).await;
        assert_eq!(
            (parked(&m), open(&m)),
            (f64::from(n), f64::from(n) + 1.0),
            "idle ones park"
        );
    }

    // A request wakes the first one, and holds it busy.
    idle[0]
        .send_request(&ClientRequest::get("/hang"))
        .await
        .expect("request");
    hang.wait_for_requests(2, SHOW).await.expect("forwarded");
    let m = gw.metrics_once(|m| parked(m) == 1.0).await;
    assert_eq!(
        (parked(&m), open(&m)),
        (1.0, 3.0),
        "woken: no longer parked"
    );

    // The second one's client closes.
    drop(idle.pop());
    let m = gw
        .metrics_once(|m| parked(m) == 0.0 && open(m) == 2.0)
        .await;
    assert_eq!(
        (parked(&m), open(&m)),
        (0.0, 2.0),
        "closed: no longer counted"
    );
    drop(busy);
}

#[tokio::test]
async fn config_hides_secrets_and_fastcgi_upstreams_show_what_the_application_said() {
    let app = FastCgiApp::start(7, None).await;
    let root = holdfast_test::tempdir();
    let gw = start(&format!(
        r#"
[[route]]
upstream = "php"

[route.fastcgi]
root = "{}"
check_file = false
fallback = "/index.php"
params = {{ DB_PASSWORD = "hunter2", APP_ENV = "prod" }}

[upstream.php]
addresses = ["fastcgi://{}"]
"#,
        root.path().display(),
        app.addr
    ))
    .await;

    let config = gw.admin_get("/config").await.text().into_owned();
    assert!(!config.contains("hunter2"), "secret shown:\n{config}");
    assert!(config.contains("DB_PASSWORD"), "{config}");
    assert!(config.contains("<redacted>"), "{config}");
    assert!(config.contains("prod"), "{config}");
    let parsed: toml::Value = toml::from_str(&config).expect("/config is TOML");
    assert_eq!(
        parsed["upstream"]["php"]["pool"]["idle_timeout"].as_str(),
        Some("4s")
    );

    assert_eq!(gw.get_n("/", 2).await, [200, 200]);
    let addr = app.addr.to_string();
    let labels = [("upstream", "php"), ("address", addr.as_str())];
    let m = gw
        .metrics_once(|m| {
            m.get(
                "holdfast_requests_total",
                &[("route", "route[0]"), ("class", "2xx")],
            ) == Some(2.0)
        })
        .await;
    assert_eq!(
        m.value(
            "holdfast_upstream_info",
            &[("upstream", "php"), ("protocol", "fastcgi")]
        ),
        1.0
    );
    assert_eq!(m.value("holdfast_fastcgi_max_conns", &labels), 7.0);
    assert_eq!(
        m.value("holdfast_pool_max_connections", &labels),
        7.0,
        "capped by what the application accepts"
    );
    assert_eq!(
        m.value("holdfast_pool_connections_reused_total", &labels),
        1.0,
        "FCGI_KEEP_CONN: the second request reused the connection"
    );
}

// === operator-facing figures ===

/// A client that gives up while its request waits for the upstream's answer (a slow
/// upstream, a client with a shorter timeout: nginx's 499) is still a request: it
/// must show in `holdfast_requests_total` and the duration histogram, not vanish.
#[tokio::test]
async fn a_request_whose_client_leaves_before_the_answer_is_still_counted() {
    let up = TestUpstream::start(Behaviour::Hang).await;
    let gw = start(&format!(
        r#"
[[route]]
upstream = "slow"

[upstream.slow]
addresses = ["{}"]
"#,
        up.url()
    ))
    .await;
    let mut c = TcpStream::connect(gw.addr).await.expect("connect");
    c.write_all(b"GET /gone HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    up.wait_for_requests(1, SHOW).await.expect("forwarded");
    drop(c);
    // holdfast has seen the client go: its connection is no longer open.
    let m = gw
        .metrics_once(|m| m.get("holdfast_client_connections", &[]) == Some(0.0))
        .await;
    assert_eq!(m.value("holdfast_client_connections", &[]), 0.0);
    let total = |m: &Metrics| {
        ["1xx", "2xx", "3xx", "4xx", "5xx"]
            .iter()
            .map(|c| {
                m.value(
                    "holdfast_requests_total",
                    &[("route", "route[0]"), ("class", c)],
                )
            })
            .sum::<f64>()
    };
    let m = gw.metrics_once(|m| total(m) == 1.0).await;
    assert_eq!(
        total(&m),
        1.0,
        "the abandoned request is not counted at all:\n{}",
        m.text
    );
    assert_eq!(
        m.value(
            "holdfast_request_duration_seconds_count",
            &[("route", "route[0]")]
        ),
        1.0
    );
    assert_eq!(
        m.value("holdfast_upstream_requests_total", &[("upstream", "slow")]),
        1.0,
        "the upstream side did count it"
    );
}

/// Every series appears once in an exposition (Prometheus drops or rejects
/// duplicates). Two names resolving to overlapping addresses, or one address listed
/// twice apart, must not give one address two pools and two series.
#[tokio::test]
async fn an_address_listed_twice_apart_gives_one_series() {
    let a = TestUpstream::start(Behaviour::Echo).await;
    let b = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        r#"
[[route]]
upstream = "ab"

[upstream.ab]
addresses = ["{a}", "{b}", "{a}"]
"#,
        a = a.url(),
        b = b.url()
    ))
    .await;
    assert_eq!(gw.get_n("/", 3).await, [200; 3]);
    let m = gw.metrics().await;
    let mut seen = std::collections::BTreeSet::new();
    let dups: Vec<String> = m
        .samples
        .iter()
        .filter(|(n, l, _)| !seen.insert((n.clone(), l.clone())))
        .map(|(n, l, _)| format!("{n} {l:?}"))
        .collect();
    assert!(dups.is_empty(), "duplicate series: {dups:#?}");
    let r = gw.admin_get("/pools").await;
    let pools: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON");
    assert_eq!(
        pools[0]["addresses"].as_array().map(Vec::len),
        Some(2),
        "{pools:#}"
    );
}

/// A reload applies routes, upstreams and some settings; listener and admin settings,
/// `drain.idle_close_after`, `workers`, `pid_file` and `log.format` wait for an
/// upgrade. `/config` shows the config in force, so it shows those as they are, not
/// as the reloaded file has them.
#[tokio::test]
async fn config_shows_the_listener_settings_in_force_after_a_reload() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let routes = format!(
        "[[route]]\nupstream = \"e\"\n\n[upstream.e]\naddresses = [\"{}\"]\n",
        up.url()
    );
    let gw = start(&routes).await;
    let reloaded = config(&format!(
        "max_connections = 7\n\n[drain]\nidle_close_after = \"5s\"\ntimeout = \"9s\"\n\n{routes}"
    ));
    gw.control
        .send(Control::Reload(Box::new(reloaded)))
        .await
        .expect("server listens");
    gw.metrics_once(|m| m.get("holdfast_reloads_total", &[]) == Some(1.0))
        .await;
    let r = gw.admin_get("/config").await;
    let text = r.text();
    let shown: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(
        shown["listener"][0]["max_connections"].as_integer(),
        Some(10_000),
        "the listener's cap in force, not the reloaded file's:\n{text}"
    );
    assert_eq!(
        shown["drain"]["idle_close_after"].as_str(),
        Some("1s"),
        "{text}"
    );
    assert_eq!(
        shown["drain"]["timeout"].as_str(),
        Some("9s"),
        "a setting a reload applies shows its new value:\n{text}"
    );
}

/// A request refused for its `Host` (here two of them) matched no route by it: it is
/// counted apart, not in the figures of the route its path alone would match.
#[tokio::test]
async fn a_request_with_a_bad_host_is_counted_under_no_route() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let gw = start(&format!(
        "[[route]]\nupstream = \"a\"\n\n[upstream.a]\naddresses = [\"{}\"]\n",
        up.url()
    ))
    .await;
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut answer = Vec::new();
    tokio::time::timeout(RESPONSE_TIMEOUT, s.read_to_end(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    let class = |route| [("route", route), ("class", "4xx")];
    let m = gw
        .metrics_once(|m| m.get("holdfast_requests_total", &class("none")) == Some(1.0))
        .await;
    assert_eq!(m.value("holdfast_requests_total", &class("none")), 1.0);
    assert_eq!(
        m.get("holdfast_requests_total", &class("route[0]"))
            .unwrap_or(0.0),
        0.0
    );
}

/// The admin endpoints are read-only: GET and HEAD get the answer (HEAD without its
/// body), any other method 405 naming those two, so that a `POST /ready` or a
/// `DELETE /config` is not taken for something it did.
#[tokio::test]
async fn admin_endpoints_answer_get_and_head_and_refuse_other_methods() {
    let gw = start("").await;
    let mut c = KeepAliveClient::new(gw.admin).with_timeout(RESPONSE_TIMEOUT);
    for path in ["/live", "/ready", "/metrics", "/config", "/pools"] {
        let get = c.get(path).await.expect("GET");
        assert_eq!(get.status, 200, "GET {path}");
        let head = c
            .send(&holdfast_test::ClientRequest::new("HEAD", path))
            .await
            .expect("HEAD");
        assert_eq!(head.status, 200, "HEAD {path}");
        assert!(head.body.is_empty(), "HEAD {path} has a body");
        assert_eq!(
            head.header("content-type"),
            get.header("content-type"),
            "HEAD {path}"
        );
        for method in ["POST", "PUT", "DELETE"] {
            let r = c
                .send(&holdfast_test::ClientRequest::new(method, path))
                .await
                .expect(method);
            assert_eq!(r.status, 405, "{method} {path}: {}", r.text());
            assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method} {path}");
        }
    }
}

/// A `redirect_https` listener answers every request itself (308, or 400 without a
/// usable host): those are client requests answered, counted under no route like
/// holdfast's other own answers, not missing from `holdfast_requests_total`.
#[tokio::test]
async fn requests_answered_by_a_redirect_listener_are_counted() {
    let server = Server::bind(config(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\nredirect_https = true\nredirect_https_port = 8443\n",
    ))
    .await
    .expect("bind holdfast");
    let redirect = server.listen_addrs()[1];
    let (control, rx) = mpsc::channel(4);
    let gw = Gateway {
        addr: server.listen_addrs()[0],
        admin: server.admin_addr().expect("admin listener"),
        control,
        task: tokio::spawn(server.run(rx)),
    };
    let mut c = KeepAliveClient::new(redirect).with_timeout(RESPONSE_TIMEOUT);
    let r = c.get("/a").await.expect("GET");
    assert_eq!(r.status, 308);
    let mut raw = holdfast_test::RawClient::connect(redirect).await.unwrap();
    raw.send("GET /b HTTP/1.0\r\n\r\n").await.unwrap();
    let r = raw.read_response(RESPONSE_TIMEOUT).await.unwrap();
    assert_eq!(r.status, 400, "no host to redirect to");
    let class = |class| [("route", "none"), ("class", class)];
    let m = gw
        .metrics_once(|m| {
            m.get("holdfast_requests_total", &class("3xx")) == Some(1.0)
                && m.get("holdfast_requests_total", &class("4xx")) == Some(1.0)
        })
        .await;
    assert_eq!(m.value("holdfast_requests_total", &class("3xx")), 1.0);
    assert_eq!(m.value("holdfast_requests_total", &class("4xx")), 1.0);
    assert_eq!(
        m.value(
            "holdfast_request_duration_seconds_count",
            &[("route", "none")]
        ),
        2.0
    );
}

/// README: an HTTP/2 address has `http2` in `/pools`, with the idle timeout its
/// connections keep to. With no connection open (none yet, or the last one closed
/// idle) the field was left out, and the address showed only the HTTP/1
/// `effective_idle_timeout` (4 s, "config"), which its connections do not use.
#[tokio::test]
async fn pools_shows_http2_figures_for_an_http2_address_with_no_connection() {
    // Nothing listens there: no connection is ever open.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gw = start(&format!(
        r#"
[[route]]
upstream = "grpc"

[upstream.grpc]
addresses = ["h2c://{closed}"]
http2.idle_timeout = "90s"

[upstream.other]
addresses = ["h2c://{closed}"]
http2.idle_timeout = "0s"
"#
    ))
    .await;
    let r = gw.admin_get("/pools").await;
    let pools: serde_json::Value = serde_json::from_slice(&r.body).expect("/pools is JSON");
    let by_name = |name: &str| {
        pools
            .as_array()
            .and_then(|a| a.iter().find(|u| u["name"] == name))
            .map(|u| u["addresses"][0].clone())
            .unwrap_or_else(|| panic!("{name} in /pools: {pools}"))
    };
    let grpc = by_name("grpc");
    assert_eq!(grpc["open"], 0, "{grpc}");
    let h2 = &grpc["http2"];
    assert_eq!(h2["idle_timeout"], 90.0, "{grpc}");
    assert_eq!((&h2["connections"], &h2["streams"]), (&0.into(), &0.into()));
    let other = by_name("other");
    assert!(other["http2"]["idle_timeout"].is_null(), "{other}");
    assert!(other["http2"].is_object(), "{other}");
}
