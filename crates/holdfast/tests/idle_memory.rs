//! Idle keep-alive client connections cost little memory: after a moment of quiet an
//! HTTP/1 connection parks (hyper's 16 KiB of buffers are freed; only the socket and a
//! small task remain) and wakes when the client sends again.
//!
//! Scenario: 1,000 clients each send one request and keep their connection open.
//! holdfast's resident memory per idle connection must fall under the bound,
//! and every parked connection must still serve its next request.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use holdfast_test::{Behaviour, HoldfastProcess, TestUpstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

const CONNECTIONS: usize = 1000;
/// The target for RSS per idle client connection, in a release build (the
/// benchmark measures that); a debug build's tasks are about twice as large.
const MAX_KIB_PER_CONNECTION: f64 = if cfg!(debug_assertions) { 12.0 } else { 4.0 };

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_park_and_wake() {
    let upstream = TestUpstream::start(Behaviour::fixed(200, 16)).await;
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[log]\naccess_log = false\nlevel = \"info,holdfast::server::conn=trace\"\n\n\
         [[listener]]\nlisten = \"127.0.0.1:0\"\n\n\
         [[route]]\npath = \"/\"\nupstream = \"up\"\n\n\
         [upstream.up]\naddresses = [\"{}\"]\n",
        upstream.url()
    );
    let proxy = HoldfastProcess::spawn_with_env(
        Path::new(env!("CARGO_BIN_EXE_holdfast")),
        &["run"],
        Some(&config),
        &[("NO_COLOR", "1")],
    );
    assert!(
        proxy
            .wait_for_log("admin listening", Duration::from_secs(10))
            .await,
        "holdfast did not start:\n{}",
        proxy.logs()
    );
    let addr = listen_addr(&proxy.logs());

    // Warm up so the baseline includes the pool and the runtime.
    let mut warm = TcpStream::connect(addr).await.unwrap();
    exchange(&mut warm).await;
    drop(warm);
    let before = rss_kib(proxy.pid());

    let mut conns = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut c = TcpStream::connect(addr).await.unwrap();
        exchange(&mut c).await;
        conns.push(c);
    }

    // Parking happens after a moment of quiet; wait for it (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let parked = || proxy.logs().matches("idle connection parked").count();
    while parked() < CONNECTIONS && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(parked(), CONNECTIONS, "every idle connection parks");
    let per_conn = loop {
        let per_conn = (rss_kib(proxy.pid()).saturating_sub(before)) as f64 / CONNECTIONS as f64;
        if per_conn <= MAX_KIB_PER_CONNECTION || Instant::now() >= deadline {
            break per_conn;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("holdfast RSS per idle client connection: {per_conn:.2} KiB");
    assert!(
        per_conn <= MAX_KIB_PER_CONNECTION,
        "{per_conn:.2} KiB per idle connection (bound {MAX_KIB_PER_CONNECTION} KiB)"
    );

    // Every parked connection wakes for its next request.
    for c in conns.iter_mut().step_by(10) {
        exchange(c).await;
    }
}

/// One GET and its whole response on a keep-alive connection.
async fn exchange(c: &mut TcpStream) {
    c.write_all(b"GET / HTTP/1.1\r\nhost: idle.test\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::with_capacity(512);
    let read = async {
        loop {
            let mut chunk = [0u8; 512];
            let n = c.read(&mut chunk).await.unwrap();
            assert!(n > 0, "holdfast closed a keep-alive connection");
            buf.extend_from_slice(&chunk[..n]);
            if let Some(head) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&buf[..head]).to_ascii_lowercase();
                assert!(text.starts_with("http/1.1 200"), "{text}");
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .expect("content-length");
                if buf.len() >= head + 4 + len {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("response in time");
}

fn listen_addr(logs: &str) -> SocketAddr {
    logs.lines()
        .filter(|l| l.contains("listening") && !l.contains("admin"))
        .find_map(|l| {
            let start = l.find("127.0.0.1:")?;
            let port: String = l[start + 10..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            format!("127.0.0.1:{port}").parse().ok()
        })
        .unwrap_or_else(|| panic!("no listening address in:\n{logs}"))
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}
