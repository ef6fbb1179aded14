//! `holdfast demo`: story 1a on this machine in a few seconds.
//!
//! Starts an upstream that silently closes keep-alive connections idle for 2 s (as the
//! payment API in story 1a did at 8 s), puts holdfast in front of it, and sends
//! requests spaced around 2 s both through holdfast and through a naive pooled client
//! that reuses connections without watching them. Prints what each saw.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::config::{Config, ListenerConfig, RouteConfig, UpstreamConfig};
use crate::server::{Control, Server};

const UPSTREAM_IDLE: Duration = Duration::from_secs(2);

/// What one client saw.
#[derive(Debug, Default)]
pub struct Tally {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub reused: AtomicU64,
}

pub async fn run(duration: Duration) -> std::io::Result<()> {
    let upstream = start_upstream().await?;
    let mut config = Config::empty();
    config.admin.enabled = false;
    config.log.access_log = false;
    config
        .listeners
        .push(ListenerConfig::new(SocketAddr::from(([127, 0, 0, 1], 0))));
    config.routes.push(RouteConfig::new("/", "payments"));
    config.upstreams.insert(
        "payments".into(),
        UpstreamConfig::new(vec![
            format!("http://{upstream}")
                .parse()
                .map_err(std::io::Error::other)?,
        ]),
    );
    let server = Server::bind(config).await?;
    let front = server.listen_addrs()[0];
    let proxy = server.proxy().clone();
    let (tx, rx) = mpsc::channel(1);
    let running = tokio::spawn(server.run(rx));

    println!(
        "upstream on {upstream} closes idle keep-alive connections after {UPSTREAM_IDLE:?}, without saying so"
    );
    println!("holdfast on {front} in front of it (default pool idle timeout 4s)");
    println!(
        "sending requests spaced 1.95-2.4 s apart for {duration:?}, through holdfast and through a naive pool...\n"
    );

    let through = Arc::new(Tally::default());
    let naive = Arc::new(Tally::default());
    let mut clients = Vec::new();
    for i in 0..4u64 {
        let offset = Duration::from_millis(i * 20);
        clients.push(tokio::spawn(client_loop(
            front,
            offset,
            duration,
            through.clone(),
        )));
        clients.push(tokio::spawn(client_loop(
            upstream,
            offset,
            duration,
            naive.clone(),
        )));
    }
    for c in clients {
        let _ = c.await;
    }

    let pools = crate::admin::pools(&proxy);
    let _ = tx.send(Control::Drain).await;
    let _ = running.await;

    let r = |t: &Tally| (t.requests.load(Relaxed), t.errors.load(Relaxed));
    let (n, e) = r(&naive);
    println!(
        "naive pooled client, straight to the upstream: {n} requests, {e} failed (\"server closed connection before returning the first response byte\")"
    );
    let (n, e) = r(&through);
    println!("through holdfast:                              {n} requests, {e} failed\n");
    for u in &pools {
        for a in &u.addresses {
            println!("holdfast's pool for {}:", a.address);
            println!("  connections opened                      {}", a.created);
            println!("  requests on a reused connection         {}", a.reused);
            println!("  closed by the upstream while idle,");
            println!(
                "    noticed before reuse                  {}",
                a.closed.get("closed_by_upstream_idle").unwrap_or(&0)
            );
            println!(
                "  retried after a stale connection        {}",
                u.retries.get("stale_connection").unwrap_or(&0)
            );
            println!(
                "  effective idle timeout now              {:.1}s (from {})",
                a.pool.effective_idle_timeout.as_secs_f64(),
                a.pool.idle_timeout_source.as_str()
            );
        }
    }
    Ok(())
}

/// One keep-alive client: a request, a pause of about the upstream's idle timeout,
/// again, on one connection for as long as it lasts.
async fn client_loop(addr: SocketAddr, offset: Duration, duration: Duration, tally: Arc<Tally>) {
    tokio::time::sleep(offset).await;
    let end = tokio::time::Instant::now() + duration;
    let spacings = [2100u64, 1950, 2250, 2050, 2400];
    let mut conn: Option<TcpStream> = None;
    let mut i = 0;
    while tokio::time::Instant::now() < end {
        tally.requests.fetch_add(1, Relaxed);
        let reused = conn.is_some();
        let stream = match conn.take() {
            Some(s) => s,
            None => match TcpStream::connect(addr).await {
                Ok(s) => s,
                Err(_) => {
                    tally.errors.fetch_add(1, Relaxed);
                    break;
                }
            },
        };
        match exchange(stream).await {
            Some(s) => {
                conn = Some(s);
                if reused {
                    tally.reused.fetch_add(1, Relaxed);
                }
            }
            None => {
                tally.errors.fetch_add(1, Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(spacings[i % spacings.len()])).await;
        i += 1;
    }
}

/// Sends a GET and reads a response with a Content-Length body; `None` on any error.
async fn exchange(mut s: TcpStream) -> Option<TcpStream> {
    s.write_all(b"GET /pay HTTP/1.1\r\nHost: payments\r\n\r\n")
        .await
        .ok()?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = resp.parse(&buf) {
            let len = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())?;
            if resp.code != Some(200) {
                return None;
            }
            if buf.len() >= head + len {
                let closes = resp.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("connection")
                        && h.value.eq_ignore_ascii_case(b"close")
                });
                return (!closes).then_some(s);
            }
        }
    }
}

/// The upstream of story 1a: answers `200 ok` and closes a connection idle for
/// [`UPSTREAM_IDLE`] without a word.
async fn start_upstream() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    let read = tokio::time::timeout(UPSTREAM_IDLE, s.read(&mut chunk)).await;
                    let n = match read {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => return, // idle too long, or closed: drop = FIN
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    Ok(addr)
}
