//! One upstream address ("peer"): its pool, passive health, outstanding requests, and
//! how a connection to it is opened (TCP or unix socket, then TLS, then HTTP/1.1,
//! HTTP/2 or FastCGI).
//!
//! A peer is one (address, TLS settings) pair: the TLS client config belongs to the
//! upstream, so two upstreams naming one address with different certificates or
//! names have two pools, and a connection is only reused under the identity it was
//! opened with.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use holdfast_fastcgi::ServerValues;
use tokio::time::Instant;

use super::error::{Delivery, Kind, UpstreamError};
use super::io::{Stream, UpstreamIo};
use super::pool::{Connected, Http2Snapshot, Pool, PoolSettings, PoolSnapshot, PooledConn, Want};
use super::tls::TlsClient;
use super::{fastcgi, http1, http2};
use crate::config::{
    HealthConfig, HttpVersion, Protocol, TcpConfig, TimeoutConfig, UpstreamConfig,
    UpstreamHttp2Config,
};

/// An upstream's TLS client, shared by its peers, or why it could not be built (its
/// files changed after the config was checked): connections then fail saying so.
pub type TlsSetup = Option<Result<Arc<TlsClient>, Arc<str>>>;

/// A resolved address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Tcp(a) => write!(f, "{a}"),
            PeerAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

pub struct Peer {
    pub addr: PeerAddr,
    pub label: Arc<str>,
    pub pool: Arc<Pool>,
    protocol: Protocol,
    /// The address's host as configured: the TLS name unless `tls.server_name` says
    /// otherwise.
    host: Arc<str>,
    tls: TlsSetup,
    version: HttpVersion,
    http2: UpstreamHttp2Config,
    /// `http_version = "auto"` over TLS: the last handshake's ALPN picked `h2`, so
    /// requests take streams on shared connections.
    alpn_h2: AtomicBool,
    tcp: TcpConfig,
    timeouts: TimeoutConfig,
    pub health: Health,
    /// Requests in flight to the address, shared with the peer a reload replaced (and
    /// its successor): its requests still running are in flight to the address too.
    outstanding: Arc<AtomicUsize>,
    /// No longer in the upstream's address list (DNS changed): serves what it has,
    /// takes nothing new.
    removed: AtomicBool,
    /// What a FastCGI application said about itself (GET_VALUES), asked once it
    /// could be reached.
    fastcgi_values: tokio::sync::OnceCell<Option<ServerValues>>,
    /// One question at a time.
    fastcgi_asking: tokio::sync::Mutex<()>,
    /// Questions that found no application to ask.
    fastcgi_unreached: AtomicU64,
}

impl Peer {
    /// `previous`: the peer at this address that a reload replaces, whose pool's
    /// figures and slots the new pool takes over (see [`Pool::succeeding`]), whose
    /// count of requests in flight and passive health go on here, and what its
    /// FastCGI application said about itself.
    pub fn new(
        addr: PeerAddr,
        host: Arc<str>,
        config: &UpstreamConfig,
        tls: TlsSetup,
        previous: Option<&Peer>,
    ) -> Arc<Peer> {
        let label: Arc<str> = addr.to_string().into();
        let mut settings = PoolSettings::from(&config.pool);
        settings.free_workers = config.protocol() == Protocol::FastCgi;
        // `pool.max_connections` bounds every address's open connections, shared
        // ones included.
        settings.h2_connections = config
            .http2
            .connections
            .min(config.pool.max_connections)
            .max(1);
        settings.h2_idle_timeout = config.http2.idle_timeout.non_zero();
        let fastcgi_values = match previous.and_then(|p| p.fastcgi_values.get()) {
            Some(Some(values)) if config.protocol() == Protocol::FastCgi => {
                tokio::sync::OnceCell::new_with(Some(Some(*values)))
            }
            _ => tokio::sync::OnceCell::new(),
        };
        Arc::new(Peer {
            pool: Pool::succeeding(label.clone(), settings, previous.map(|p| &*p.pool)),
            label,
            addr,
            protocol: config.protocol(),
            host,
            tls,
            version: config.effective_http_version(),
            http2: config.http2.clone(),
            alpn_h2: AtomicBool::new(false),
            tcp: config.tcp.clone(),
            timeouts: config.timeouts.clone(),
            health: Health::succeeding(config.health.clone(), previous.map(|p| &p.health)),
            outstanding: previous.map_or_else(Arc::default, |p| p.outstanding.clone()),
            removed: AtomicBool::new(false),
            fastcgi_values,
            fastcgi_asking: tokio::sync::Mutex::new(()),
            fastcgi_unreached: AtomicU64::new(0),
        })
    }

    /// The address's host as configured.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Relaxed)
    }

    /// What a FastCGI application said about itself (GET_VALUES), once asked.
    pub fn fastcgi_values(&self) -> Option<&ServerValues> {
        self.fastcgi_values.get().and_then(Option::as_ref)
    }

    /// Counts a request in flight until the guard drops.
    pub fn track(self: &Arc<Self>) -> Outstanding {
        self.outstanding.fetch_add(1, Relaxed);
        Outstanding(self.clone())
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Relaxed)
    }

    pub fn remove(&self) {
        self.removed.store(true, Relaxed);
        self.pool.drain();
    }

    /// A connection for one request.
    ///
    /// # Errors
    /// As [`Pool::checkout`]; connect failures say the request was not sent.
    pub async fn checkout(
        self: &Arc<Self>,
        want: Want,
        check_idle: bool,
    ) -> Result<PooledConn, UpstreamError> {
        // The connect future is boxed: it is large (TLS and HTTP/2 handshakes) and
        // rarely run, and every request's future would otherwise carry its size.
        if self.shares_connections() {
            return self.pool.checkout_shared(|| Box::pin(self.connect())).await;
        }
        if self.protocol == Protocol::FastCgi && !self.fastcgi_values.initialized() {
            // Before taking a slot: the answer may lower `max_connections`, which
            // takes back slots in use only as they come back. Concurrent first
            // requests holding theirs while they wait for it would each open a
            // connection, over the cap. And before
            // any connection of ours is open: php-fpm gives every open connection a
            // worker, so with all workers held the question would wait in its accept
            // queue until the connect timeout. (`connect` relies on this.)
            Box::pin(self.ask_fastcgi_values()).await;
        }
        self.pool
            .checkout(want, check_idle, || Box::pin(self.connect()))
            .await
    }

    /// A request sent here now would wait for a connection: every one of
    /// `max_connections` is busy (or being opened). Never for HTTP/2, whose requests
    /// take streams on shared connections instead.
    pub fn is_full(&self) -> bool {
        !self.shares_connections() && self.pool.is_full()
    }

    /// The pool's figures, as `/pools` shows them. An HTTP/2 address has its `http2`
    /// figures with no connection open too (none yet, or the last one closed idle):
    /// the idle timeout in force for its connections is `http2.idle_timeout`, not the
    /// HTTP/1 `effective_idle_timeout` beside it.
    pub fn snapshot(&self) -> PoolSnapshot {
        let mut snap = self.pool.snapshot();
        if snap.http2.is_none() && self.shares_connections() {
            snap.http2 = Some(Http2Snapshot {
                connections: 0,
                streams: 0,
                max_streams: 0,
                idle_timeout: self.http2.idle_timeout.non_zero(),
            });
        }
        snap
    }

    /// Whether requests take streams on shared HTTP/2 connections.
    fn shares_connections(&self) -> bool {
        match self.version {
            HttpVersion::Http2 => self.protocol != Protocol::FastCgi,
            HttpVersion::Auto => self.tls.is_some() && self.alpn_h2.load(Relaxed),
            HttpVersion::Http1 => false,
        }
    }

    async fn connect(&self) -> Result<Connected, UpstreamError> {
        let stream =
            match tokio::time::timeout(self.timeouts.connect.get(), self.open_stream()).await {
                Err(_) => return Err(UpstreamError::new(Kind::ConnectTimeout, Delivery::NotSent)),
                Ok(Err(e)) => {
                    let kind = match e.kind() {
                        std::io::ErrorKind::ConnectionRefused => Kind::ConnectRefused,
                        _ => Kind::ConnectFailed,
                    };
                    return Err(UpstreamError::new(kind, Delivery::NotSent).with_cause(e));
                }
                Ok(Ok(s)) => s,
            };
        match (self.protocol, &self.tls) {
            (Protocol::FastCgi, _) => Ok(fastcgi::connected(
                stream,
                self.timeouts.write.get(),
                self.label.clone(),
            )),
            (_, Some(tls)) => self.connect_tls(stream, tls).await,
            (_, None) if self.version == HttpVersion::Http2 => {
                let stream = Arc::new(stream);
                let io = UpstreamIo::new(stream.clone(), self.timeouts.write.get());
                let wait = self.timeouts.connect.get();
                http2::handshake(io, stream, false, &self.http2, wait).await
            }
            (_, None) => Ok(http1::connected(stream, self.timeouts.write.get())),
        }
    }

    /// TLS, then HTTP/2 if ALPN picked it (or `http_version = "2"`), else HTTP/1.1.
    async fn connect_tls(
        &self,
        stream: Stream,
        tls: &Result<Arc<TlsClient>, Arc<str>>,
    ) -> Result<Connected, UpstreamError> {
        let tls = tls.as_ref().map_err(|why| {
            UpstreamError::new(Kind::TlsHandshake, Delivery::NotSent).with_cause(why.to_string())
        })?;
        let name = tls.server_name(&self.host)?;
        let stream = Arc::new(stream);
        let io = UpstreamIo::new(stream.clone(), self.timeouts.write.get());
        let wait = self.timeouts.connect.get();
        let (io, done) = match tokio::time::timeout(wait, tls.connect(name, io)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(UpstreamError::new(Kind::ConnectTimeout, Delivery::NotSent)
                    .with_cause("TLS handshake timed out"));
            }
        };
        self.pool.figures.tls_handshakes.fetch_add(1, Relaxed);
        if done.resumed {
            self.pool.figures.tls_resumed.fetch_add(1, Relaxed);
        }
        let h2 = done.h2 || self.version == HttpVersion::Http2;
        self.alpn_h2.store(h2, Relaxed);
        if h2 {
            http2::handshake(io, stream, true, &self.http2, wait).await
        } else {
            http1::handshake_on(io, stream).await
        }
    }

    async fn open_stream(&self) -> std::io::Result<Stream> {
        match &self.addr {
            PeerAddr::Tcp(a) => Stream::connect_tcp(*a, &self.tcp).await,
            PeerAddr::Unix(p) => Stream::connect_unix(p).await,
        }
    }

    /// Asks the application for its values unless that is done. A question that
    /// could not reach it (not up yet, restarting) is asked again by a later request,
    /// not by those that waited for it: they go on without, as one answer at a time
    /// under the connect timeout would make the last of a burst wait for them all.
    async fn ask_fastcgi_values(&self) {
        let unreached = self.fastcgi_unreached.load(Relaxed);
        // Asked again only while no connection of ours is open: php-fpm gives each a
        // worker, and with them all held the question would wait in its accept queue
        // until the connect timeout, and the request asking it with it.
        if unreached > 0 && self.pool.open_connections() > 0 {
            return;
        }
        let _turn = self.fastcgi_asking.lock().await;
        if self.fastcgi_values.initialized() || self.fastcgi_unreached.load(Relaxed) != unreached {
            return;
        }
        match self.query_fastcgi_values().await {
            Some(values) => {
                let _ = self.fastcgi_values.set(values);
            }
            None => {
                self.fastcgi_unreached.fetch_add(1, Relaxed);
            }
        }
    }

    /// Learns what the FastCGI application accepts and caps the pool by it; `None`
    /// when the application could not be reached.
    async fn query_fastcgi_values(&self) -> Option<Option<ServerValues>> {
        // Under the connect timeout too: the first requests wait for this before they
        // take a slot, outside the queue's bounds.
        let stream = tokio::time::timeout(self.timeouts.connect.get(), self.open_stream())
            .await
            .ok()?
            .ok()?;
        let values = fastcgi::query_values(stream, self.timeouts.connect.get()).await;
        match values.and_then(|v| v.max_conns) {
            Some(n) => self.pool.cap(n as usize),
            None => {
                tracing::info!(address = %self.label, "FastCGI application did not say how many connections it accepts")
            }
        }
        Some(values)
    }
}

/// Decrements a peer's outstanding count on drop.
pub struct Outstanding(Arc<Peer>);

impl Drop for Outstanding {
    fn drop(&mut self) {
        self.0.outstanding.fetch_sub(1, Relaxed);
    }
}

/// Passive health: consecutive failures eject the address for a growing backoff.
pub struct Health {
    config: HealthConfig,
    fails: AtomicU32,
    ejected_once: AtomicBool,
    ejected: Mutex<Ejection>,
}

#[derive(Default)]
struct Ejection {
    until: Option<Instant>,
    /// Ejections in a row; after readmission one more failure ejects again, longer.
    streak: u32,
}

/// Health as shown in `/pools`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Healthy,
    Ejected,
    /// Readmitted after an ejection; the next failure ejects again.
    Probation,
}

impl Health {
    fn new(config: HealthConfig) -> Self {
        Health {
            config,
            fails: AtomicU32::new(0),
            ejected_once: AtomicBool::new(false),
            ejected: Mutex::new(Ejection::default()),
        }
    }

    /// Health under `config` that goes on from `previous`'s (a reload replacing the
    /// address's peer): an address ejected stays ejected, at most the new
    /// `eject_max` from now; one on probation stays on probation. Started afresh, a
    /// reload that changed any pool setting sent requests to an address known to be
    /// down, each paying a failed connect (up to `timeouts.connect`) until `max_fails`
    /// ejected it again.
    fn succeeding(config: HealthConfig, previous: Option<&Health>) -> Self {
        let health = Health::new(config);
        if let Some(p) = previous {
            let e = p.lock();
            let until = e
                .until
                .map(|t| t.min(Instant::now() + health.config.eject_max.get()));
            *health.lock() = Ejection {
                until,
                streak: e.streak,
            };
            health.fails.store(p.fails.load(Relaxed), Relaxed);
            health
                .ejected_once
                .store(p.ejected_once.load(Relaxed), Relaxed);
        }
        health
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ejection> {
        self.ejected.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self, now: Instant) -> HealthState {
        if !self.ejected_once.load(Relaxed) {
            return HealthState::Healthy;
        }
        let e = self.lock();
        match e.until {
            Some(t) if t > now => HealthState::Ejected,
            _ if e.streak > 0 => HealthState::Probation,
            _ => HealthState::Healthy,
        }
    }

    pub fn is_available(&self, now: Instant) -> bool {
        self.state(now) != HealthState::Ejected
    }

    pub fn on_success(&self) {
        if self.fails.load(Relaxed) != 0 {
            self.fails.store(0, Relaxed);
        }
        // The lock is only taken after an ejection, never on the healthy path.
        if self.ejected_once.load(Relaxed) {
            let mut e = self.lock();
            if e.streak > 0 && e.until.is_none_or(|t| t <= Instant::now()) {
                *e = Ejection::default();
                self.ejected_once.store(false, Relaxed);
            }
        }
    }

    /// Records a failure; returns the ejection time if this one ejects the address.
    pub fn on_failure(&self) -> Option<Duration> {
        let fails = self.fails.fetch_add(1, Relaxed) + 1;
        let mut e = self.lock();
        if fails < self.config.max_fails.max(1) && e.streak == 0 {
            return None;
        }
        let now = Instant::now();
        if e.until.is_some_and(|t| t > now) {
            return None;
        }
        let factor = 1u32 << e.streak.min(16);
        let span = (self.config.eject_for.get() * factor).min(self.config.eject_max.get());
        e.until = Some(now + span);
        e.streak += 1;
        self.ejected_once.store(true, Relaxed);
        self.fails.store(0, Relaxed);
        Some(span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Dur;

    #[tokio::test(start_paused = true)]
    async fn ejects_after_max_fails_with_growing_backoff() {
        let h = Health::new(HealthConfig {
            max_fails: 3,
            eject_for: Dur::secs(5),
            eject_max: Dur::secs(12),
        });
        assert_eq!(h.on_failure(), None);
        assert_eq!(h.on_failure(), None);
        assert_eq!(h.on_failure(), Some(Duration::from_secs(5)));
        assert_eq!(h.state(Instant::now()), HealthState::Ejected);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(h.state(Instant::now()), HealthState::Probation);
        // One failure on probation ejects again, for twice as long.
        assert_eq!(h.on_failure(), Some(Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            h.on_failure(),
            Some(Duration::from_secs(12)),
            "capped by eject_max"
        );
        tokio::time::advance(Duration::from_secs(12)).await;
        h.on_success();
        assert_eq!(h.state(Instant::now()), HealthState::Healthy);
        assert_eq!(h.on_failure(), None, "a success resets the streak");
    }
}
