//! Shared by the integration tests: holdfast started in-process on loopback.
//!
//! [`start`] takes a config as TOML. A config without `[[listener]]` gets one on
//! `127.0.0.1:0`; one without `[admin]` gets the admin listener on `127.0.0.1:0`, so
//! every test has its own ephemeral ports. [`proxy_to`] writes the common part: one
//! catch-all route to `[upstream.up]`.

#![allow(dead_code)] // Each test target uses its own subset.

pub mod fastcgi_app;
pub mod pki;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Once};
use std::time::Duration;

use holdfast::config::{Config, LogConfig};
use holdfast::server::{Control, DrainReport, Server, ServerState};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// A running in-process holdfast.
///
/// # Drop behavior
///
/// Asks the server to drain without waiting for it; the test runtime ending stops it.
/// Call [`Gateway::drain`] to wait for the drain and see its report.
pub struct Gateway {
    /// The first listener's address.
    pub addr: SocketAddr,
    /// The admin listener's address.
    pub admin: SocketAddr,
    /// Every listener's address, in config order.
    pub listeners: Vec<SocketAddr>,
    pub state: Arc<ServerState>,
    control: mpsc::Sender<Control>,
    task: Option<JoinHandle<DrainReport>>,
}

/// Starts holdfast with `config_toml` (see the module docs for what is added).
///
/// # Panics
///
/// If the config is invalid or a socket cannot be bound.
pub async fn start(config_toml: &str) -> Gateway {
    init_logging();
    let server = Server::bind(config(config_toml))
        .await
        .expect("bind the test gateway");
    let listeners = server.listen_addrs();
    let admin = server
        .admin_addr()
        .expect("the test gateway has an admin listener");
    let state = server.state.clone();
    let (control, rx) = mpsc::channel(4);
    let task = tokio::spawn(server.run(rx));
    Gateway {
        addr: listeners[0],
        admin,
        listeners,
        state,
        control,
        task: Some(task),
    }
}

/// `config_toml` with what [`start`] adds, as a config (for a reload, say).
///
/// # Panics
///
/// If the config is invalid.
pub fn config(config_toml: &str) -> Config {
    let mut text = config_toml.to_owned();
    if !text.contains("[[listener]]") {
        text.push_str("\n[[listener]]\nlisten = \"127.0.0.1:0\"\n");
    }
    if !text.contains("[admin]") {
        text.push_str("\n[admin]\nlisten = \"127.0.0.1:0\"\n");
    }
    Config::from_toml(&text, Path::new("test.toml"))
        .unwrap_or_else(|e| panic!("invalid test config:\n{e}\n---\n{text}"))
}

/// One catch-all route to `[upstream.up]` at `url`. Append `[upstream.up.*]` tables
/// (or keys for `[upstream.up]` right after it) to tune the upstream.
pub fn proxy_to(url: &str) -> String {
    format!("[[route]]\nupstream = \"up\"\n\n[upstream.up]\naddresses = [\"{url}\"]\n")
}

impl Gateway {
    /// `http://ADDR` of the first listener.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends a control message (reload, drain, exit).
    pub async fn send(&self, control: Control) {
        self.control
            .send(control)
            .await
            .expect("the test gateway is running");
    }

    /// An unlabelled sample from `/metrics` (`holdfast_client_connections`, say);
    /// `None` if it is not there.
    ///
    /// # Panics
    ///
    /// If the admin listener does not answer 200.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let resp = holdfast_test::KeepAliveClient::new(self.admin)
            .get("/metrics")
            .await
            .expect("GET /metrics");
        assert_eq!(resp.status, 200, "GET /metrics");
        resp.text().lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(' ')?;
            value.trim().parse().ok()
        })
    }

    /// Polls `/metrics` until the unlabelled sample `name` is `want`, for an event
    /// the gateway shows nowhere else (a client connection parked, say).
    ///
    /// # Panics
    ///
    /// If it is not within `within`, showing the last value.
    pub async fn wait_metric(&self, name: &str, want: f64, within: Duration) {
        let deadline = Instant::now() + within;
        // Bounded by the deadline; a scrape every few milliseconds.
        loop {
            let got = self.metric(name).await;
            if got == Some(want) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} is {got:?}, not {want}, after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Drains and waits for the server to return.
    ///
    /// # Panics
    ///
    /// If the server task panicked.
    pub async fn drain(mut self) -> DrainReport {
        let _ = self.control.send(Control::Drain).await;
        let task = self.task.take().expect("not drained yet");
        task.await.expect("the server task did not panic")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if self.task.is_some() {
            let _ = self.control.try_send(Control::Drain);
        }
    }
}

/// Logs to stderr (nextest shows them for failing tests); `HOLDFAST_TEST_LOG` sets the
/// filter, default `warn`.
fn init_logging() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let level = std::env::var("HOLDFAST_TEST_LOG").unwrap_or_else(|_| "warn".into());
        holdfast::telemetry::init(&LogConfig {
            level,
            ..LogConfig::default()
        });
    });
}
