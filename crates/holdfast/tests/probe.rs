//! `holdfast probe` against upstreams whose keep-alive behaviour is known: the scripted
//! misbehaving upstreams, a real nginx (`keepalive_timeout 3s; keepalive_requests 7;`,
//! over plain HTTP and over TLS), a raw server that resets idle connections, a FastCGI
//! application that closes after a number of requests, as php-fpm's `pm.max_requests`
//! does, and a real php-fpm on its unix socket.
//!
//! Probe limits are small (`max_idle` a few seconds) so the file runs in seconds; the
//! measured idle timeouts must be within the probe's stated precision, ±0.5 s.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use holdfast::probe::{CloseStyle, ProbeOptions, ProbeReport};
use holdfast_test::{
    Behaviour, KeepAliveClient, Nginx, PhpFpm, PhpFpmOptions, Reply, TestUpstream,
};
use support::fastcgi_app::FastCgiApp;
use support::pki::TestCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const PRECISION: f64 = 0.5;

fn options(url: &str, max_idle: Duration) -> ProbeOptions {
    let mut o = ProbeOptions::new(url);
    o.max_idle = max_idle;
    o.max_requests = 20;
    o.timeout = Duration::from_secs(5);
    o
}

/// Runs a probe, keeping its progress lines.
async fn probe(o: &ProbeOptions) -> (ProbeReport, Vec<String>) {
    let lines = Mutex::new(Vec::new());
    let progress = |l: String| lines.lock().unwrap().push(l);
    let report = holdfast::probe::run(o, &progress)
        .await
        .unwrap_or_else(|e| panic!("probe {}: {e}", o.url));
    (report, lines.into_inner().unwrap())
}

fn assert_near(measured: f64, expected: f64, what: &str) {
    assert!(
        (measured - expected).abs() <= PRECISION,
        "{what}: measured {measured:.3} s, expected {expected} s ±{PRECISION}"
    );
}

#[tokio::test]
async fn an_unannounced_idle_timeout_is_measured_within_half_a_second() {
    let up = TestUpstream::start(Behaviour::CloseIdleAfter(Duration::from_secs(2))).await;
    let (r, progress) = probe(&options(&up.url(), Duration::from_secs(6))).await;

    assert_eq!(r.idle.closes_secs.len(), 3, "{:?}", r.idle);
    for s in &r.idle.closes_secs {
        assert_near(*s, 2.0, "each idle close");
    }
    assert_near(r.idle.timeout_secs.expect("measured"), 2.0, "idle timeout");
    assert_eq!(r.idle.close, Some(CloseStyle::Fin));
    assert!(!r.idle.closes_after_every_response);
    assert_eq!(r.requests_per_connection.limit, None, "no request limit");
    assert_eq!(r.requests_per_connection.sent, 20);
    assert_eq!(r.verdict.keeps_its_word, None, "it announced nothing");
    assert_eq!(r.recommended.idle_timeout.as_deref(), Some("1500ms"));
    assert!(
        r.recommended
            .toml
            .contains("[upstream.NAME.pool]\nidle_timeout = \"1500ms\""),
        "{}",
        r.recommended.toml
    );
    // Polite: one connection for the request count, three watched.
    assert_eq!(r.connections_opened, 4);
    assert_eq!(up.connections_accepted(), 4);
    assert_eq!(r.requests_sent, 23);
    assert!(
        progress
            .iter()
            .filter(|l| l.contains("closed by the upstream after"))
            .count()
            == 3,
        "{progress:#?}"
    );
}

#[tokio::test]
async fn a_silent_request_limit_is_counted() {
    let up = TestUpstream::start(Behaviour::CloseAfterRequests(5)).await;
    let mut o = options(&up.url(), Duration::from_millis(500));
    o.connections = 1;
    let (r, _) = probe(&o).await;

    assert_eq!(r.requests_per_connection.limit, Some(5));
    assert_eq!(r.requests_per_connection.close, Some(CloseStyle::Fin));
    assert_eq!(
        r.requests_per_connection.sent, 6,
        "the sixth found it closed"
    );
    assert_eq!(r.first_response.connection, None);
    assert_eq!(r.verdict.keeps_its_word, None);
    assert!(
        r.verdict.findings[0].contains("after 5 request(s) silently (FIN)"),
        "{:?}",
        r.verdict.findings
    );
    assert_eq!(r.recommended.max_requests, Some(4));
    // The idle connection was still open at max_idle, and still answered.
    assert_eq!(r.idle.still_open, 1);
    assert_eq!(r.idle.usable_after_max_idle, [true]);
    assert_eq!(r.idle.timeout_secs, None);
}

#[tokio::test]
async fn announcing_keep_alive_and_closing_anyway_is_a_broken_word() {
    let up = TestUpstream::start(Behaviour::AnnounceKeepAliveThenClose { timeout_secs: 5 }).await;
    let (r, _) = probe(&options(&up.url(), Duration::from_secs(3))).await;

    assert_eq!(r.first_response.connection.as_deref(), Some("keep-alive"));
    assert_eq!(r.first_response.keep_alive.as_deref(), Some("timeout=5"));
    assert_eq!(r.first_response.announced_timeout_secs, Some(5));
    assert_eq!(r.verdict.keeps_its_word, Some(false));
    assert!(
        r.verdict.findings[0].starts_with("announces keep-alive but closed the connection after 1"),
        "{:?}",
        r.verdict.findings
    );
    assert_eq!(r.requests_per_connection.limit, Some(1));
    assert!(r.idle.closes_after_every_response, "{:?}", r.idle);
    assert_eq!(r.recommended.max_requests, Some(1));
    assert_eq!(r.recommended.idle_timeout, None);
    assert!(r.elapsed_secs < 3.0, "no idle wait when nothing stays open");
}

#[tokio::test]
async fn nginx_with_keepalive_timeout_3s_and_keepalive_requests_7() {
    let nginx = Nginx::start(
        r#"
    server {
        listen 127.0.0.1:{port};
        keepalive_timeout 3s;
        keepalive_requests 7;
        location / { return 200 "ok\n"; }
    }
"#,
    )
    .await;
    let mut o = options(&format!("{}/", nginx.url()), Duration::from_secs(8));
    o.name = "nginx".into();
    let (r, _) = probe(&o).await;

    assert_eq!(r.requests_per_connection.limit, Some(7));
    assert_eq!(
        r.requests_per_connection.close,
        Some(CloseStyle::ConnectionClose),
        "nginx says Connection: close on the last one"
    );
    assert_near(
        r.idle.timeout_secs.expect("measured"),
        3.0,
        "nginx idle timeout",
    );
    assert_eq!(r.idle.close, Some(CloseStyle::Fin));
    assert_eq!(r.recommended.idle_timeout.as_deref(), Some("2500ms"));
    assert_eq!(r.recommended.max_requests, Some(6));
    assert!(
        r.recommended.toml.starts_with(&format!(
            "# holdfast probe {}/\n[upstream.nginx.pool]\nidle_timeout = \"2500ms\"",
            nginx.url()
        )),
        "{}",
        r.recommended.toml
    );
    eprintln!("{}", r.render());
}

/// The same nginx over TLS: `https://` with the test CA (`--ca-file`) measures the
/// same figures through TLS; without the CA the certificate is refused, said plainly.
#[tokio::test]
async fn https_to_nginx_measures_through_tls_and_refuses_an_unknown_issuer() {
    let pki = TestCa::new("holdfast probe test CA");
    let (cert, key) = pki.issue("nginx", &["localhost"], false);
    let nginx = Nginx::start(&format!(
        "server {{\n\
         \x20   listen 127.0.0.1:{{port}} ssl;\n\
         \x20   ssl_certificate {};\n\
         \x20   ssl_certificate_key {};\n\
         \x20   keepalive_timeout 3s;\n\
         \x20   keepalive_requests 7;\n\
         \x20   location / {{ return 200 \"ok\\n\"; }}\n\
         }}\n",
        cert.display(),
        key.display(),
    ))
    .await;
    let url = format!("https://localhost:{}/", nginx.port());
    let mut o = options(&url, Duration::from_secs(8));
    o.ca_file = Some(pki.ca_file());
    let (r, _) = probe(&o).await;
    assert!(r.tls);
    assert_eq!(r.first_response.status, 200);
    assert_eq!(r.requests_per_connection.limit, Some(7));
    assert_near(
        r.idle.timeout_secs.expect("measured"),
        3.0,
        "nginx idle timeout over TLS",
    );
    assert_eq!(
        r.idle.close,
        Some(CloseStyle::Fin),
        "close_notify, then FIN"
    );
    assert_eq!(r.recommended.max_requests, Some(6));

    let o = options(&url, Duration::from_secs(1));
    let e = holdfast::probe::run(&o, &|_| {})
        .await
        .expect_err("the test CA is not a system root");
    let msg = e.to_string();
    assert!(
        msg.contains("TLS handshake") && msg.contains("certificate"),
        "{msg}"
    );
}

/// nginx asking for a client certificate (`ssl_verify_client on`), on an address its
/// certificate does not name: `--server-name` (the name to verify and send as SNI)
/// and `--client-cert`/`--client-key` (mutual TLS) probe it as holdfast would reach
/// it with the same `[upstream.NAME.tls]` keys. Without a client certificate nginx
/// answers 400 to everything, and without the name the certificate is refused.
#[tokio::test]
async fn an_mtls_upstream_is_probed_with_its_server_name_and_a_client_certificate() {
    let pki = TestCa::new("holdfast probe test CA");
    let (cert, key) = pki.issue("nginx", &["api.test"], false);
    let (client_cert, client_key) = pki.issue("probe-client", &[], false);
    let nginx = Nginx::start(&format!(
        "server {{\n\
         \x20   listen 127.0.0.1:{{port}} ssl;\n\
         \x20   ssl_certificate {};\n\
         \x20   ssl_certificate_key {};\n\
         \x20   ssl_client_certificate {};\n\
         \x20   ssl_verify_client on;\n\
         \x20   keepalive_timeout 2s;\n\
         \x20   keepalive_requests 5;\n\
         \x20   location / {{ return 200 \"$ssl_client_s_dn\\n\"; }}\n\
         }}\n",
        cert.display(),
        key.display(),
        pki.ca_file().display(),
    ))
    .await;
    let url = format!("https://127.0.0.1:{}/", nginx.port());
    let mut o = options(&url, Duration::from_secs(4));
    o.ca_file = Some(pki.ca_file());
    o.connections = 1;

    let e = holdfast::probe::run(&o, &|_| {})
        .await
        .expect_err("the certificate names api.test, not 127.0.0.1");
    assert!(e.to_string().contains("certificate"), "{e}");

    o.server_name = Some("api.test".into());
    let (r, _) = probe(&o).await;
    assert_eq!(
        r.first_response.status, 400,
        "no client certificate: nginx refuses every request"
    );

    o.client_cert = Some(client_cert);
    o.client_key = Some(client_key);
    let (r, _) = probe(&o).await;
    assert!(r.tls);
    assert_eq!(r.first_response.status, 200, "{}", r.render());
    assert_eq!(r.requests_per_connection.limit, Some(5), "{}", r.render());
    assert_near(
        r.idle.timeout_secs.expect("measured"),
        2.0,
        "nginx idle timeout over mutual TLS",
    );
}

/// The TLS flags are checked as the config checks its `[upstream.NAME.tls]` keys,
/// naming the flag: a certificate without its key, a name that is no name, a file
/// that cannot be read, a TLS flag on a URL that is not `https`.
#[tokio::test]
async fn tls_flags_that_cannot_work_are_refused_naming_the_flag() {
    let pki = TestCa::new("holdfast probe test CA");
    let (cert, key) = pki.issue("probe-client", &[], false);
    let up = TestUpstream::start(Behaviour::Echo).await;
    let https = format!("https://127.0.0.1:{}/", up.addr().port());
    type SetFlags<'a> = Box<dyn Fn(&mut ProbeOptions) + 'a>;
    let cases: [(&str, SetFlags<'_>, &str); 5] = [
        (
            &https,
            Box::new(|o| o.client_cert = Some(cert.clone())),
            "--client-cert needs --client-key",
        ),
        (
            &https,
            Box::new(|o| o.client_key = Some(key.clone())),
            "--client-key needs --client-cert",
        ),
        (
            &https,
            Box::new(|o| o.server_name = Some("not a name".into())),
            "--server-name: \"not a name\" is not a DNS name or IP address",
        ),
        (
            &https,
            Box::new(|o| {
                o.client_cert = Some("/nonexistent/client.pem".into());
                o.client_key = Some(key.clone());
            }),
            "--client-cert: /nonexistent/client.pem",
        ),
        (
            &up.url(),
            Box::new(|o| o.server_name = Some("api.test".into())),
            "--server-name: only for https:// URLs",
        ),
    ];
    for (url, set, says) in cases {
        let mut o = options(url, Duration::from_millis(300));
        set(&mut o);
        match holdfast::probe::run(&o, &|_| {}).await {
            Err(e @ holdfast::probe::ProbeError::Usage(_)) => {
                assert!(e.to_string().contains(says), "expected {says:?}, got {e}");
            }
            Err(e) => panic!("{says}: not a usage error: {e}"),
            Ok(r) => panic!("{says}: probed:\n{}", r.render()),
        }
    }
}

/// A TLS upstream that drops idle connections with a bare FIN, no close_notify (as
/// many do): the probe reads that as a silent close after the idle time, not as an
/// error.
#[tokio::test]
async fn a_tls_close_without_close_notify_is_a_fin() {
    let pki = TestCa::new("holdfast probe test CA");
    let (cert, key) = pki.issue("up", &["localhost"], false);
    let up = TlsDropsWhenIdle::start(&cert, &key, Duration::from_millis(1500)).await;
    let mut o = options(
        &format!("https://localhost:{}/", up.addr.port()),
        Duration::from_secs(4),
    );
    o.ca_file = Some(pki.ca_file());
    o.connections = 1;
    o.max_requests = 3;
    let (r, _) = probe(&o).await;
    assert!(r.idle.errors.is_empty(), "{:?}", r.idle.errors);
    assert_near(
        r.idle.timeout_secs.expect("measured"),
        1.5,
        "idle close without close_notify",
    );
    assert_eq!(r.idle.close, Some(CloseStyle::Fin));
}

/// php-fpm on its unix socket (`fastcgi+unix://`), as Debian installs it: the probe
/// asks GET_VALUES and runs the script there.
#[tokio::test]
async fn php_fpm_on_a_unix_socket() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    let script = fpm.script("probe.php", "<?php echo 'probed';");
    let mut o = options(
        &format!("fastcgi+unix://{}", fpm.socket_path().display()),
        Duration::from_millis(500),
    );
    o.script = Some(script.display().to_string());
    o.connections = 1;
    o.max_requests = 5;
    let (r, _) = probe(&o).await;
    assert_eq!(r.protocol, "fastcgi");
    assert_eq!(r.address, fpm.socket_path().display().to_string());
    assert_eq!(r.first_response.status, 200);
    let v = r.fastcgi.as_ref().expect("GET_VALUES asked");
    assert!(v.mpxs_conns.is_some(), "php-fpm answers GET_VALUES: {v:?}");
    assert_eq!(
        r.requests_per_connection.limit, None,
        "php-fpm keeps the connection (FCGI_KEEP_CONN)"
    );
    assert_eq!(r.idle.usable_after_max_idle, [true]);
}

#[tokio::test]
async fn an_idle_reset_is_told_from_a_fin() {
    let up = ResetWhenIdle::start(Duration::from_millis(700)).await;
    let mut o = options(&format!("http://{}/", up.addr), Duration::from_secs(3));
    o.max_requests = 3;
    let (r, _) = probe(&o).await;

    assert_eq!(r.idle.close, Some(CloseStyle::Rst));
    assert_near(r.idle.timeout_secs.expect("measured"), 0.7, "idle reset");
    assert!(
        r.verdict
            .findings
            .iter()
            .any(|f| f.contains("resets idle connections")),
        "{:?}",
        r.verdict.findings
    );
}

#[tokio::test]
async fn a_fastcgi_application_that_closes_after_n_requests() {
    let app = FastCgiApp::start(8, Some(4)).await;
    let mut o = options(
        &format!("fastcgi://{}", app.addr),
        Duration::from_millis(500),
    );
    o.script = Some("/srv/www/index.php".into());
    o.connections = 1;
    let (r, _) = probe(&o).await;

    assert_eq!(r.protocol, "fastcgi");
    assert_eq!(r.first_response.status, 200);
    let v = r.fastcgi.as_ref().expect("GET_VALUES asked");
    assert_eq!(v.max_conns, Some(8));
    assert_eq!(r.requests_per_connection.limit, Some(4));
    assert_eq!(r.requests_per_connection.close, Some(CloseStyle::Fin));
    assert_eq!(r.recommended.max_requests, Some(4));
    assert_eq!(r.idle.usable_after_max_idle, [true]);
}

/// php-fpm's `pm.max_requests` counts a worker's requests, and a worker serves one
/// connection at a time: a fresh worker's connection closes after exactly that many.
/// The snippet's `max_requests` must let a connection end with its worker. One
/// below (what the snippet said, as for an HTTP upstream's own limit) retires each
/// connection a request early: the worker, one request left, takes the next
/// connection and closes it after that request, right after its END_REQUEST, and
/// the request behind it races the close (a POST gets 502). Here holdfast runs with
/// the snippet in front of the same php-fpm, restarted: no connection may be closed
/// under it.
#[tokio::test]
async fn the_fastcgi_snippet_lets_a_connection_end_with_its_php_fpm_worker() {
    let mut fpm = PhpFpm::start(PhpFpmOptions {
        max_children: 1,
        pool_directives: "pm.max_requests = 4\n".into(),
        ..PhpFpmOptions::default()
    })
    .await;
    let script = fpm.script("n.php", "<?php echo 'n';");
    let mut o = options(
        &format!("fastcgi://{}", fpm.addr()),
        Duration::from_millis(500),
    );
    o.script = Some(script.display().to_string());
    o.connections = 1;
    o.name = "php".into();
    let (r, _) = probe(&o).await;
    assert_eq!(r.requests_per_connection.limit, Some(4), "{r:?}");
    // Fresh workers: the probe's own requests counted against the one it had.
    fpm.restart().await;

    let gw = support::start(&format!(
        "[[route]]\nupstream = \"php\"\n\n[route.fastcgi]\nroot = \"{}\"\n\n\
         [upstream.php]\naddresses = [\"fastcgi://{}\"]\n\n{}",
        fpm.www().display(),
        fpm.addr(),
        r.recommended.toml
    ))
    .await;
    let mut client = KeepAliveClient::new(gw.addr).with_timeout(Duration::from_secs(10));
    for i in 0..12 {
        let resp = client.get("/n.php").await.expect("GET");
        assert_eq!(
            (resp.status, resp.text().as_ref()),
            (200, "n"),
            "request {i}"
        );
    }
    let pools = KeepAliveClient::new(gw.admin)
        .get("/pools")
        .await
        .expect("GET /pools");
    let pools: serde_json::Value = serde_json::from_slice(&pools.body).expect("JSON");
    let up = &pools[0];
    let address = &up["addresses"][0];
    let closed_under_us = address["closed"]["closed_by_upstream_idle"]
        .as_u64()
        .unwrap()
        + address["stale_caught"].as_u64().unwrap()
        + up["retries"]["stale_connection"].as_u64().unwrap();
    assert_eq!(
        closed_under_us, 0,
        "php-fpm closed connections holdfast still held ({}): {pools}",
        r.recommended.toml
    );
}

#[tokio::test]
async fn a_failed_watch_is_a_finding_and_the_others_still_measure() {
    // Connections 1 (request count) and 2 answer; 3 and 4 answer something not HTTP.
    let up = TestUpstream::start(
        Behaviour::respond(|r| Reply::new(if r.conn >= 3 { 0 } else { 200 }).body("ok"))
            .and(Behaviour::CloseIdleAfter(Duration::from_secs(1))),
    )
    .await;
    let mut o = options(&up.url(), Duration::from_secs(3));
    o.max_requests = 2;
    let (r, _) = probe(&o).await;

    assert_eq!(r.idle.errors.len(), 2, "{:?}", r.idle);
    assert_eq!(r.idle.closes_secs.len(), 1);
    assert_near(r.idle.timeout_secs.expect("measured"), 1.0, "idle close");
    assert!(!r.idle.closes_after_every_response);
    assert!(
        r.verdict
            .findings
            .iter()
            .any(|f| f.starts_with("an idle-watch connection failed: not an HTTP response")),
        "{:?}",
        r.verdict.findings
    );
    assert_eq!(r.connections_opened, 4);
}

/// Every idle watch failed (here the upstream answers later connections with
/// something that is not HTTP): nothing about idle connections was measured, yet
/// the snippet said the upstream "closes idle connections too soon for any margin"
/// and the report "none within 3 s (3 connection(s) watched)".
#[tokio::test]
async fn when_every_idle_watch_fails_the_idle_timeout_is_not_measured() {
    let up = TestUpstream::start(Behaviour::respond(|r| {
        Reply::new(if r.conn >= 2 { 0 } else { 200 }).body("ok")
    }))
    .await;
    let mut o = options(&up.url(), Duration::from_secs(3));
    o.max_requests = 2;
    let (r, _) = probe(&o).await;
    assert_eq!(r.idle.errors.len(), 3, "{:?}", r.idle);
    let text = r.render();
    assert!(
        !text.contains("too soon") && !text.contains("none within"),
        "{text}"
    );
    assert!(
        r.recommended.toml.contains("idle_timeout: NOT MEASURED"),
        "{}",
        r.recommended.toml
    );
    assert!(text.contains("idle timeout: not measured"), "{text}");
}

#[tokio::test]
async fn the_binary_prints_json_on_stdout_and_progress_on_stderr() {
    let up = TestUpstream::start(Behaviour::CloseAfterRequests(3)).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args([
            "probe",
            "--json",
            "--max-idle",
            "300ms",
            "--connections",
            "1",
        ])
        .arg(up.url())
        .output()
        .await
        .expect("run holdfast probe");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(json["requests_per_connection"]["limit"], 3);
    assert_eq!(json["requests_per_connection"]["close"], "fin");
    assert_eq!(json["recommended"]["max_requests"], 2);
    assert!(
        stderr.contains("probe: requests per connection: closed after 3"),
        "{stderr}"
    );

    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(["probe", "h2c://127.0.0.1:1/"])
        .output()
        .await
        .expect("run holdfast probe");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the scheme must be http, https, fastcgi or fastcgi+unix"),
        "{stderr}"
    );
}

// === edge cases: limits at the search bound, short watches, findings ===

/// Off by one: an upstream that closes silently after exactly `--max-requests`
/// requests is reported as having no limit, because request max+1 is never sent.
/// (A limit said with `Connection: close` on the max-th response is found.)
#[tokio::test]
async fn a_silent_limit_equal_to_max_requests_is_found() {
    let up = TestUpstream::start(Behaviour::CloseAfterRequests(5)).await;
    let mut o = options(&up.url(), Duration::from_millis(300));
    o.max_requests = 5;
    o.connections = 1;
    let (r, _) = probe(&o).await;
    assert_eq!(
        r.requests_per_connection.limit,
        Some(5),
        "served 5 then closed (FIN); snippet: {}",
        r.recommended.toml
    );
}

/// With `--max-idle` below the default idle timeout (4 s), "no idle close within
/// 1 s" proves nothing about 4 s, yet the snippet calls the default safe: this
/// upstream closes idle connections after 2 s.
#[tokio::test]
async fn a_short_max_idle_does_not_vouch_for_the_default() {
    let up = TestUpstream::start(Behaviour::CloseIdleAfter(Duration::from_secs(2))).await;
    let mut o = options(&up.url(), Duration::from_secs(1));
    o.connections = 1;
    o.max_requests = 3;
    let (r, _) = probe(&o).await;
    assert!(
        !r.recommended.toml.contains("is safe"),
        "the upstream closes idle connections after 2 s:\n{}",
        r.recommended.toml
    );
}

/// Story 1a without the FIN: an upstream that drops a connection idle for 1 s only
/// when the next request comes (a lazy idle check, or state lost behind a NAT) is
/// found unusable after `--max-idle`, yet the snippet says the default 4 s is safe,
/// and the close (a FIN from the upstream itself) is blamed on "something on the
/// path".
#[tokio::test]
async fn a_close_found_only_on_the_next_request_is_not_called_safe() {
    let up = ClosesStaleOnUse::start(Duration::from_secs(1)).await;
    let mut o = options(&format!("http://{}/", up.addr), Duration::from_secs(2));
    o.connections = 1;
    o.max_requests = 3;
    let (r, _) = probe(&o).await;
    assert_eq!(r.idle.usable_after_max_idle, [false], "{:?}", r.idle);
    assert!(
        !r.recommended.toml.contains("is safe"),
        "a connection idle for 2 s no longer worked:\n{}",
        r.recommended.toml
    );
}

/// An idle timeout of `--max-idle` itself (Node.js's 5 s probed with
/// `--max-idle 5s`): the upstream's close lands on the border, just after the watch
/// ended, while the request that checks the connection is on its way, unread when the
/// upstream's timer fires. That request then found the connection closed, and the
/// probe reported a connection dead when used "with no FIN or RST while idle", the
/// idle timeout NOT MEASURED, and advised a smaller `--max-idle`, for an upstream
/// that closes with a FIN at the idle time asked about.
#[tokio::test]
async fn an_idle_close_just_after_max_idle_is_measured_not_taken_for_a_silent_drop() {
    let up = ClosesAfterIdleUnread::start(Duration::from_millis(1030)).await;
    let mut o = options(&format!("http://{}/", up.addr), Duration::from_secs(1));
    o.connections = 1;
    o.max_requests = 3;
    let (r, _) = probe(&o).await;
    assert_eq!(
        r.idle.usable_after_max_idle,
        Vec::<bool>::new(),
        "{:?}\n{}",
        r.verdict.findings,
        r.recommended.toml
    );
    assert_near(
        r.idle.timeout_secs.expect("measured"),
        1.03,
        "idle close on the border",
    );
    assert_eq!(r.idle.close, Some(CloseStyle::Fin));
    assert!(
        !r.recommended.toml.contains("NOT MEASURED"),
        "{}",
        r.recommended.toml
    );
}

/// An idle timeout under 250 ms is taken for "closes every connection right after
/// its response: nothing to reuse", although the same probe just reused one
/// connection 20 times.
#[tokio::test]
async fn a_short_idle_timeout_is_not_closing_after_every_response() {
    let up = TestUpstream::start(Behaviour::CloseIdleAfter(Duration::from_millis(150))).await;
    let (r, _) = probe(&options(&up.url(), Duration::from_secs(2))).await;
    assert_eq!(r.requests_per_connection.limit, None, "20 requests on one");
    assert!(
        !r.idle.closes_after_every_response,
        "findings: {:?}\n{}",
        r.verdict.findings, r.recommended.toml
    );
    assert_near(
        r.idle.timeout_secs.expect("measured"),
        0.15,
        "short idle timeout",
    );
}

/// An idle timeout shorter than the pause after the last of `--max-requests`
/// answers (100 ms) closes the counting connection in that pause: taken for a
/// silent request limit of exactly `--max-requests`, it made the snippet say
/// `max_requests = 4` for an upstream that serves any number of requests.
#[tokio::test]
async fn an_idle_timeout_under_the_limit_check_is_no_request_limit() {
    let up = TestUpstream::start(Behaviour::CloseIdleAfter(Duration::from_millis(70))).await;
    let mut o = options(&up.url(), Duration::from_secs(1));
    o.max_requests = 5;
    o.connections = 1;
    let (r, _) = probe(&o).await;
    assert_eq!(
        r.requests_per_connection.limit, None,
        "5 requests back to back, then an idle close: {:?}\n{}",
        r.verdict.findings, r.recommended.toml
    );
    assert_eq!(r.recommended.max_requests, None, "{}", r.recommended.toml);
    assert_near(
        r.idle.timeout_secs.expect("measured"),
        0.07,
        "short idle timeout",
    );
}

/// A URL with a space, a line break or another control character went into the
/// request line as written (`GET /a\r\nX-Injected: 1 HTTP/1.1`: a header of the
/// URL's making) and into the snippet's first comment line, which a line break
/// turns into config. It is refused, saying what to percent-encode.
#[tokio::test]
async fn a_url_with_spaces_or_control_characters_is_refused() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    for path in ["/a b", "/a\r\nX-Injected: 1", "/a\tb", "/caf\u{e9}"] {
        let mut o = options(&format!("{}{path}", up.url()), Duration::from_millis(300));
        o.connections = 1;
        o.max_requests = 1;
        let progress = |_: String| {};
        match holdfast::probe::run(&o, &progress).await {
            Err(e @ holdfast::probe::ProbeError::Url(_)) => {
                assert!(e.to_string().contains("percent-encode"), "{path:?}: {e}");
            }
            Err(e) => panic!("{path:?}: not a URL error: {e}"),
            Ok(r) => panic!("{path:?}: probed:\n{}", r.recommended.toml),
        }
    }
}

/// A FastCGI application slow to answer GET_VALUES (or one that ignores it, as
/// GET_VALUES is optional) fails the whole probe with "no response within 1s",
/// although the code reports "GET_VALUES: no answer" as a finding otherwise.
#[tokio::test]
async fn an_unanswered_get_values_does_not_fail_the_probe() {
    let app = FastCgiApp::start_with(support::fastcgi_app::FastCgiAppOptions {
        values_delay: Duration::from_secs(3),
        ..Default::default()
    })
    .await;
    let mut o = options(
        &format!("fastcgi://{}", app.addr),
        Duration::from_millis(300),
    );
    o.script = Some("/srv/www/index.php".into());
    o.connections = 1;
    o.max_requests = 3;
    o.timeout = Duration::from_secs(1);
    let r = holdfast::probe::run(&o, &|_| {}).await;
    let r = r.unwrap_or_else(|e| panic!("the application answers requests: {e}"));
    assert_eq!(r.first_response.status, 200);
}

/// "Later failures are findings, not errors" (`probe::run`): a failure on the
/// request-count connection after the first answer throws every measurement away.
#[tokio::test]
async fn a_later_failure_on_the_counting_connection_is_a_finding() {
    let up = TestUpstream::start(Behaviour::respond(|r| {
        Reply::new(if r.conn == 1 && r.seq >= 3 { 0 } else { 200 }).body("ok")
    }))
    .await;
    let mut o = options(&up.url(), Duration::from_millis(300));
    o.connections = 1;
    let r = holdfast::probe::run(&o, &|_| {}).await;
    r.unwrap_or_else(|e| panic!("two answers, then a bad one: {e}"));
}

/// `Content-Length: 2` sent twice (RFC 9110 8.6 allows identical repeats) is joined
/// to "2, 2", fails to parse, and the body is read as close-delimited: the probe
/// waits for a close that a keep-alive upstream never sends and fails.
#[tokio::test]
async fn a_repeated_content_length_frames_the_body() {
    let up = TestUpstream::start(Behaviour::respond(|_| {
        Reply::new(200)
            .header("Content-Length", "2")
            .header("Content-Length", "2")
            .body("ok")
    }))
    .await;
    let mut o = options(&up.url(), Duration::from_millis(300));
    o.connections = 1;
    o.max_requests = 3;
    o.timeout = Duration::from_secs(1);
    let r = holdfast::probe::run(&o, &|_| {}).await;
    let r = r.unwrap_or_else(|e| panic!("keep-alive with a sized body: {e}"));
    assert_eq!(r.requests_per_connection.limit, None);
}

/// A php-fpm with `pm.max_children = 2` (the fixture's default): php-fpm binds a
/// worker to each open connection and has no idle timeout, so the probe's 3 idle
/// connections need 3 workers; the third waits for one until `--timeout` and is
/// reported as a failed connection. (php-fpm does not say FCGI_MAX_CONNS.)
#[tokio::test]
async fn fastcgi_watches_fit_in_fcgi_max_conns() {
    let fpm = PhpFpm::start(PhpFpmOptions::default()).await;
    let script = fpm.script("probe.php", "<?php echo 'probed';");
    let mut o = options(
        &format!("fastcgi+unix://{}", fpm.socket_path().display()),
        Duration::from_secs(2),
    );
    o.script = Some(script.display().to_string());
    o.max_requests = 3;
    o.timeout = Duration::from_secs(1);
    let (r, _) = probe(&o).await;
    assert!(r.idle.errors.is_empty(), "{:?}", r.idle.errors);
}

/// A huge `--max-idle` (or `--timeout`) panics on `Instant + Duration` overflow
/// instead of being refused.
#[tokio::test]
async fn a_huge_max_idle_is_refused_not_a_panic() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args([
            "probe",
            "--connections",
            "1",
            "--max-requests",
            "1",
            "--timeout",
        ])
        .arg("300000000000y")
        .arg(up.url())
        .output()
        .await
        .expect("run holdfast probe");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `--timeout 0s` made every connect time out, and the probe failed saying it
/// could not connect to an upstream that was there.
#[tokio::test]
async fn a_zero_timeout_is_refused_naming_the_flag() {
    let up = TestUpstream::start(Behaviour::Echo).await;
    let mut o = options(&up.url(), Duration::from_millis(300));
    o.timeout = Duration::ZERO;
    match holdfast::probe::run(&o, &|_| {}).await {
        Err(e @ holdfast::probe::ProbeError::Usage(_)) => {
            assert_eq!(e.to_string(), "--timeout: more than 0s");
        }
        Err(e) => panic!("not a usage error: {e}"),
        Ok(r) => panic!("probed:\n{}", r.render()),
    }
}

/// `--name api.v2` (a dotted name, valid for `[upstream."api.v2"]`) gives
/// `[upstream.api.v2.pool]`: a pool for an upstream `api`, not valid config.
#[tokio::test]
async fn the_snippet_is_valid_config_for_any_name() {
    let up = TestUpstream::start(Behaviour::CloseAfterRequests(3)).await;
    let mut o = options(&up.url(), Duration::from_millis(300));
    o.connections = 1;
    o.name = "api.v2".into();
    let (r, _) = probe(&o).await;
    let text = format!(
        "[[listener]]\nlisten = \"127.0.0.1:0\"\n[[route]]\nupstream = \"api.v2\"\n\
         [upstream.\"api.v2\"]\naddresses = [\"{}\"]\n{}",
        up.url(),
        r.recommended.toml
    );
    let c = holdfast::config::Config::from_toml(&text, Path::new("snippet.toml"))
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(c.upstreams["api.v2"].pool.max_requests, 2, "{text}");
}

/// Answers each request with a small 200; a request that comes after the
/// connection sat idle for `after` or more is not answered: the connection is
/// closed (FIN) then. Nothing is sent while idle.
struct ClosesStaleOnUse {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for ClosesStaleOnUse {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ClosesStaleOnUse {
    async fn start(after: Duration) -> ClosesStaleOnUse {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut idle_since = tokio::time::Instant::now();
                    // Bounded by the peer: each round reads bytes or ends.
                    loop {
                        let mut chunk = [0u8; 4096];
                        let n = match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if idle_since.elapsed() >= after {
                            let _ = s.shutdown().await;
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
                            if s.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                        idle_since = tokio::time::Instant::now();
                    }
                });
            }
        });
        ClosesStaleOnUse { addr, task }
    }
}

/// Answers each request with a small 200 and closes a connection idle for `after`
/// (a FIN), but reads nothing in the last 100 ms before: a request arriving then
/// waits unread, as one does when an upstream's idle timer fires before its event
/// loop reads it (or its timer is coarse).
struct ClosesAfterIdleUnread {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for ClosesAfterIdleUnread {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ClosesAfterIdleUnread {
    async fn start(after: Duration) -> ClosesAfterIdleUnread {
        const DEAF: Duration = Duration::from_millis(100);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if !answer_until_idle(&mut s, after - DEAF).await {
                        return;
                    }
                    tokio::time::sleep(DEAF).await;
                    let _ = s.shutdown().await;
                    // What came meanwhile is drained, so the close stays a FIN and
                    // not a reset for unread data.
                    let mut sink = [0u8; 4096];
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Ok(n) = s.read(&mut sink).await {
                            if n == 0 {
                                break;
                            }
                        }
                    })
                    .await;
                });
            }
        });
        ClosesAfterIdleUnread { addr, task }
    }
}

// === fixtures ===

/// Answers each request head on `stream` with a small 200 until the peer goes
/// (`false`) or sends nothing for `after` (`true`: the caller closes its way).
async fn answer_until_idle<S>(stream: &mut S, after: Duration) -> bool
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = match tokio::time::timeout(after, stream.read(&mut chunk)).await {
            Err(_) => return true,
            Ok(Ok(0) | Err(_)) => return false,
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        // Bounded by what the peer sent: one answer per request head.
        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.drain(..end + 4);
            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n";
            if stream.write_all(ok).await.is_err() || stream.flush().await.is_err() {
                return false;
            }
        }
    }
}

/// Over TLS, answers each request with a small 200 and closes a connection idle for
/// `after` at the TCP level only: a FIN with no TLS close_notify before it.
struct TlsDropsWhenIdle {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for TlsDropsWhenIdle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsDropsWhenIdle {
    async fn start(cert: &Path, key: &Path, after: Duration) -> TlsDropsWhenIdle {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(cert)
            .expect("cert file")
            .collect::<Result<Vec<_>, _>>()
            .expect("certs");
        let key = PrivateKeyDer::from_pem_file(key).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(sock).await else {
                        return;
                    };
                    if answer_until_idle(&mut tls, after).await {
                        // Past TLS: the TCP socket closes, with no close_notify.
                        let (tcp, _) = tls.into_inner();
                        drop(tcp);
                    }
                });
            }
        });
        TlsDropsWhenIdle { addr, task }
    }
}

/// Answers each request with a small 200 and resets (SO_LINGER 0) a connection idle
/// for `after`.
struct ResetWhenIdle {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for ResetWhenIdle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ResetWhenIdle {
    async fn start(after: Duration) -> ResetWhenIdle {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if answer_until_idle(&mut s, after).await {
                        // Closed with SO_LINGER 0 when dropped: a reset.
                        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                    }
                });
            }
        });
        ResetWhenIdle { addr, task }
    }
}
