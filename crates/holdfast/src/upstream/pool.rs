//! The connection pool of one upstream address: slots, the wait queue, idle
//! connections and every rule of a connection's life.
//!
//! Lifecycle rules (ARCHITECTURE.md has the full list):
//! - A request first takes a slot (`max_connections` in flight at most); when none is
//!   free it waits in a bounded FIFO queue for at most `queue_timeout`.
//! - With a slot it takes the most recent idle connection allowed by its method, or
//!   opens a new one. Open connections never exceed `max_connections`: the oldest idle
//!   one is closed to make room.
//! - A connection goes back to the idle list only through [`PooledConn::release`],
//!   after its whole response was read and only if nothing says it is finished.
//!   Dropping a [`PooledConn`] any other way closes the connection: ownership is the
//!   rule, so a timeout or a vanished client can never leak a half-used connection.
//! - Idle connections are watched: the protocol driver notices a FIN, reset or stray
//!   bytes and the connection leaves the idle list at once; a reaper closes each one at
//!   its expiry.
//!
//! HTTP/2 connections follow other rules: many requests share one, each holding a
//! stream on it rather than the connection (`shared.rs`, with its own list and the
//! same FIFO queue settings). A checkout of an HTTP/2 address goes there
//! ([`Pool::checkout_shared`]); a connection opened here that turns out HTTP/2 (ALPN)
//! is handed over to it. Neither list ever holds the other's connections.
//!
//! This module does not know HTTP: protocol clients plug in through [`Client`] and a
//! connect function.

pub mod idle;
pub mod learn;
mod pooled;
pub mod shared;
mod slots;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::{Notify, TryAcquireError, oneshot};
use tokio::time::Instant;

use self::idle::{IdleList, Keyed, Take};
use self::learn::{IdleSource, Learned, Learner, PROMPT_CLOSE};
pub use self::pooled::{PooledConn, ResponseHint};
use self::shared::SharedState;
use self::slots::{SlotHeld, Slots};
use super::error::{Delivery, Kind, UpstreamError};
use super::figures::{CloseReason, PoolFigures};
use super::io::{IdleProbe, Stream};
use crate::config::PoolConfig;

/// A protocol's handle on one connection.
pub enum Client {
    /// Plain HTTP/1.1: holdfast's own client, driven by the request holding it.
    Http1(Box<super::http1::conn::Http1Conn>),
    /// HTTP/1.1 over TLS: hyper's client.
    Http1Tls(hyper::client::conn::http1::SendRequest<crate::body::RequestBody>),
    /// A handle on a shared HTTP/2 connection (a clone per request).
    Http2(super::http2::Http2Client),
    FastCgi(Box<super::fastcgi::FastCgiConn>),
}

impl Client {
    fn is_closed(&self) -> bool {
        match self {
            Client::Http1(c) => c.is_closed(),
            Client::Http1Tls(s) => s.is_closed(),
            Client::Http2(c) => c.is_closed(),
            Client::FastCgi(c) => c.is_closed(),
        }
    }

    /// The connection goes idle: hands its watching to the driver (HTTP/1). Called
    /// under the pool's lock, which the driver's end takes too: a driver or FastCGI
    /// watch that ended before this (the upstream closed the connection between the
    /// end of the response and the check-in) is seen here, one that ends after it
    /// finds the connection listed and removes it. A look before the lock would
    /// leave a driver ending in between, on another worker, unseen by both.
    fn park(&mut self) -> Result<(), CloseReason> {
        match self {
            Client::Http1(c) => c.park(),
            Client::Http1Tls(s) if s.is_closed() => Err(CloseReason::ClosedByUpstreamIdle),
            // Left unusable by its answer (a record past END_REQUEST, STDIN not all
            // written): holdfast's own close, not the application's.
            Client::FastCgi(c) if c.is_broken() => Err(CloseReason::NotPoolable),
            Client::FastCgi(c) if c.is_closed() => Err(CloseReason::ClosedByUpstreamIdle),
            _ => Ok(()),
        }
    }

    /// Waits until the protocol can take a request; `false` if the connection ended.
    async fn ready(&mut self) -> bool {
        match self {
            // Always ready; `is_closed` was just asked, and `Http1Conn::begin` asks
            // again, under the same lock as the driver's look at the socket.
            Client::Http1(_) => true,
            Client::Http1Tls(s) => s.ready().await.is_ok(),
            Client::Http2(c) => !c.is_closed(),
            Client::FastCgi(c) => !c.is_closed(),
        }
    }
}

/// A new connection, ready for its first request.
pub struct Connected {
    pub stream: Arc<Stream>,
    pub client: Client,
    /// Runs the protocol for the connection's whole life; ends when it closes.
    pub driver: Pin<Box<dyn Future<Output = ()> + Send>>,
}

/// Which connection a request may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// An idle connection if a suitable one exists, else a new one.
    Idle(Take),
    /// A new connection (after a stale one failed).
    Fresh,
}

/// Settings of one pool, from `[upstream.NAME.pool]`.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: usize,
    pub max_idle: usize,
    pub idle_timeout: Duration,
    pub max_requests: Option<u64>,
    pub max_lifetime: Option<Duration>,
    pub queue_size: usize,
    pub queue_timeout: Duration,
    pub learn: bool,
    /// The upstream gives each open connection a worker of its own (php-fpm): once a
    /// new connection has waited for its first response for twice the usual answer
    /// time (at least [`WORKER_WAIT`], at most [`MAX_WORKER_WAIT`]), it may be
    /// waiting for a worker that an idle connection holds, so one idle connection is
    /// closed at once and finished ones are closed rather than pooled until it is
    /// answered.
    pub free_workers: bool,
    /// HTTP/2 connections per address (`http2.connections`).
    pub h2_connections: usize,
    /// HTTP/2: a connection with no stream in flight this long closes
    /// (`http2.idle_timeout`; `None`: never).
    pub h2_idle_timeout: Option<Duration>,
}

impl From<&PoolConfig> for PoolSettings {
    fn from(c: &PoolConfig) -> Self {
        PoolSettings {
            max_connections: c.max_connections,
            max_idle: c.max_idle,
            idle_timeout: c.idle_timeout.get(),
            max_requests: (c.max_requests > 0).then_some(c.max_requests),
            max_lifetime: c.max_lifetime.non_zero(),
            queue_size: c.queue_size,
            queue_timeout: c.queue_timeout.get(),
            learn: c.learn,
            free_workers: false,
            h2_connections: 1,
            h2_idle_timeout: None,
        }
    }
}

/// One open connection, owned by the idle list or by a [`PooledConn`].
pub struct Conn {
    id: u64,
    created: Instant,
    /// Requests completed on this connection.
    requests: u64,
    /// Requests the upstream still allows (`Keep-Alive: max`).
    remaining: Option<u64>,
    stream: Arc<Stream>,
    client: Client,
    /// The protocol handed the socket to an upgraded stream (`101`): it outlives us.
    handed_over: bool,
    /// Dropping this ends the driver task, closing the socket.
    _kill: oneshot::Sender<()>,
    _open: OpenGuard,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The driver task holds the socket too and closes it only when it next runs:
        // shut it down now, so the upstream sees the close before the slot this
        // connection held can open another one (never more than `max_connections`).
        if !self.handed_over {
            self.stream.shutdown_both();
        }
    }
}

impl Keyed for Conn {
    fn key(&self) -> u64 {
        self.id
    }
}

/// A connection off the idle list while a checkout awaits: counted closed
/// (abandoned) if the checkout is dropped there.
struct Abandoned<'a>(Option<Conn>, &'a PoolFigures);

impl Abandoned<'_> {
    fn conn(&mut self) -> &mut Conn {
        self.0.as_mut().expect("held until kept")
    }

    /// The await is over: the connection is the checkout's again.
    fn keep(mut self) -> Conn {
        self.0.take().expect("held until kept")
    }
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            self.1.closed(CloseReason::Abandoned);
            drop(conn);
        }
    }
}

struct OpenGuard(Arc<AtomicUsize>);

impl OpenGuard {
    fn count(open: &Arc<AtomicUsize>) -> OpenGuard {
        open.fetch_add(1, Relaxed);
        OpenGuard(open.clone())
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

struct State {
    idle: IdleList<Conn>,
    learner: Learner,
    /// When the reaper will wake next, so a push only wakes it when it must.
    reaper_target: Option<Instant>,
    /// With `free_workers`: new connections waiting for their first response, by id.
    fresh: BTreeMap<u64, Fresh>,
    /// With `free_workers`: how long answers usually take.
    answer_wait: AnswerWait,
    /// HTTP/2: shared connections and requests waiting for a stream.
    shared: SharedState,
}

/// A new connection waiting for its first response (`free_workers`).
struct Fresh {
    opened: Instant,
    /// Whether its request's streamed body waits on the client.
    upload: Option<Arc<super::fastcgi::UploadClock>>,
}

impl Fresh {
    /// Since when the connection waits on the application; `None` while it waits on
    /// the client's upload instead: a slow client is no sign of a missing worker.
    fn unanswered_since(&self) -> Option<Instant> {
        match self.upload.as_ref().and_then(|u| u.client_wait()) {
            None => Some(self.opened),
            Some(None) => None,
            Some(Some(at)) => Some(at.max(self.opened)),
        }
    }
}

pub struct Pool {
    me: Weak<Pool>,
    label: Arc<str>,
    settings: PoolSettings,
    /// `max_connections` (lowered when the application says it takes fewer) and the
    /// open connections: shared with the pool a reload replaced, if any.
    slots: Arc<Slots>,
    /// What the application says it takes (FastCGI `FCGI_MAX_CONNS`), once it said.
    app_max_conns: AtomicUsize,
    idle_limit: AtomicUsize,
    state: Mutex<State>,
    reaper: Arc<Notify>,
    draining: AtomicBool,
    /// Shared with the pool a reload replaced for the same address, if any.
    pub figures: Arc<PoolFigures>,
}

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// With `free_workers`, how long a new connection waits for its first response before
/// it counts as waiting for a worker, at least. Closing idle connections as soon as any
/// new one is pending would also close them while the application has workers to
/// spare: two clients on two php-fpm workers would then open a connection per request,
/// each one closing the other's. So the wait is also at least twice as long as answers
/// usually take (`AnswerWait`): a new connection running a slow script is not
/// waiting for a worker.
pub const WORKER_WAIT: Duration = Duration::from_millis(50);

/// The longest a new connection waits before it counts as waiting for a worker,
/// however slow answers are: a starved connection is freed by then. Scripts that take
/// longer pay a new connection now and then, small beside their own time.
pub const MAX_WORKER_WAIT: Duration = Duration::from_secs(2);

/// How long a FastCGI application usually takes to answer: a moving average of the
/// time from sending a request on a reused connection to its response head (a quarter
/// weight to the newest).
/// php-fpm does not say how many workers it has, so an unanswered new connection is
/// only suspected of waiting for one when it has waited much longer than that.
#[derive(Debug, Default)]
struct AnswerWait {
    average: Option<Duration>,
}

impl AnswerWait {
    fn record(&mut self, ttfb: Duration) {
        self.average = Some(match self.average {
            None => ttfb,
            Some(avg) => (avg * 3 + ttfb) / 4,
        });
    }

    /// How long a new connection may go unanswered before it counts as waiting for a
    /// worker.
    fn worker_wait(&self) -> Duration {
        self.average
            .map_or(WORKER_WAIT, |avg| avg.saturating_mul(2))
            .clamp(WORKER_WAIT, MAX_WORKER_WAIT)
    }
}

impl Pool {
    /// Every slot is taken: a request for a connection of its own would wait for one.
    /// One atomic load.
    pub fn is_full(&self) -> bool {
        self.slots.available() == 0
    }

    /// Creates a pool and starts its reaper. Must be called inside a Tokio runtime.
    pub fn new(label: Arc<str>, settings: PoolSettings) -> Arc<Pool> {
        Pool::succeeding(label, settings, None)
    }

    /// As [`Pool::new`], for the address of `previous`, the pool a reload replaces:
    /// counting in its figures and sharing its slots (what the application said it
    /// takes included), so that its connections still in use count against this
    /// pool's `max_connections`. The limit changes to this pool's only with
    /// [`Pool::take_over`], once the reload is sure to apply.
    pub fn succeeding(
        label: Arc<str>,
        settings: PoolSettings,
        previous: Option<&Pool>,
    ) -> Arc<Pool> {
        // What a FastCGI application said about itself holds for its successor too.
        let app_max_conns = previous
            .filter(|p| p.settings.free_workers == settings.free_workers)
            .map_or(usize::MAX, |p| p.app_max_conns.load(Relaxed));
        let idle_limit = settings.max_idle.min(idle_for(app_max_conns));
        let pool = Arc::new_cyclic(|me| Pool {
            me: me.clone(),
            label,
            slots: previous
                .map_or_else(|| Slots::new(settings.max_connections), |p| p.slots.clone()),
            app_max_conns: AtomicUsize::new(app_max_conns),
            idle_limit: AtomicUsize::new(idle_limit),
            state: Mutex::new(State {
                idle: IdleList::default(),
                // php-fpm's request limit is its worker's, not the connection's.
                learner: Learner::new(settings.idle_timeout, settings.learn)
                    .with_request_limits(!settings.free_workers),
                reaper_target: None,
                fresh: BTreeMap::new(),
                answer_wait: AnswerWait::default(),
                shared: SharedState::default(),
            }),
            reaper: Arc::new(Notify::new()),
            draining: AtomicBool::new(false),
            figures: previous.map(|p| p.figures.clone()).unwrap_or_default(),
            settings,
        });
        tokio::spawn(reap(Arc::downgrade(&pool), pool.reaper.clone()));
        pool
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the idle list inconsistent
        // (every method restores it before returning), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot, then a suitable idle connection or a new one from `connect`.
    ///
    /// `check_idle` makes the pool look at the socket of an idle connection before
    /// handing it out (one non-blocking peek), for requests that cannot be retried.
    ///
    /// # Errors
    /// No slot within `queue_timeout` or a full queue (503), or `connect` failed.
    ///
    /// # Cancel safety
    /// Dropping the future gives back the slot and closes a connection being opened.
    pub async fn checkout<F, Fut>(
        self: &Arc<Self>,
        want: Want,
        check_idle: bool,
        connect: F,
    ) -> Result<PooledConn, UpstreamError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Connected, UpstreamError>>,
    {
        let permit = self.acquire_slot().await?;
        if let Want::Idle(take) = want {
            // The clock is read again for each connection: one found dead may have
            // kept the checkout waiting (hyper), and the next one aged meanwhile.
            loop {
                let now = Instant::now();
                let Some((conn, idle_since, settled_at)) = self.take_idle(take, now) else {
                    break;
                };
                let probe = if conn.client.is_closed() {
                    IdleProbe::Closed
                } else if check_idle {
                    conn.stream.probe_idle()
                } else {
                    IdleProbe::Quiet
                };
                // A checkout dropped while the protocol gets ready (hyper finishing
                // the last exchange) closes the connection: counted like any close.
                let mut held = Abandoned(Some(conn), &self.figures);
                let ready = probe == IdleProbe::Quiet && held.conn().client.ready().await;
                let conn = held.keep();
                if ready {
                    let age = now.saturating_duration_since(idle_since);
                    self.figures.reused.fetch_add(1, Relaxed);
                    self.figures.idle_age_at_reuse.observe(age);
                    return Ok(PooledConn::new(
                        conn,
                        self.clone(),
                        permit,
                        Some((idle_since, settled_at)),
                        now,
                    ));
                }
                // Closed while idle and not yet noticed by its driver.
                self.figures.stale_caught.fetch_add(1, Relaxed);
                let age = now.saturating_duration_since(settled_at);
                let read_for = settled_at.saturating_duration_since(idle_since);
                self.upstream_closed_idle(conn, age, learnable_close(age, read_for));
            }
        }
        // Counted before it exists, so that concurrent checkouts cannot together open
        // more than `max_connections`; a failed connect gives the count back.
        let open = self.reserve_open();
        let connected = connect().await?;
        if let Client::Http2(_) = connected.client {
            // ALPN picked HTTP/2: the connection is shared, and needs no slot.
            drop(permit);
            return match self.adopt_shared(connected, open, None) {
                Ok(pooled) => Ok(pooled),
                Err(_) => unreachable!("an HTTP/2 client is adopted"),
            };
        }
        Ok(self.new_exclusive(connected, open, permit))
    }

    /// Wraps a new connection for the one request that opened it.
    fn new_exclusive(
        self: &Arc<Self>,
        connected: Connected,
        open: OpenGuard,
        permit: SlotHeld<'_>,
    ) -> PooledConn {
        let (kill, killed) = oneshot::channel();
        let created = Instant::now();
        let conn = Conn {
            id: NEXT_CONN_ID.fetch_add(1, Relaxed),
            created,
            requests: 0,
            remaining: None,
            stream: connected.stream,
            client: connected.client,
            handed_over: false,
            _kill: kill,
            _open: open,
        };
        self.figures.created.fetch_add(1, Relaxed);
        tokio::spawn(drive(
            conn.id,
            connected.driver,
            killed,
            Arc::downgrade(self),
        ));
        let id = conn.id;
        let upload = match &conn.client {
            Client::FastCgi(c) if self.settings.free_workers => Some(c.upload_clock()),
            _ => None,
        };
        let mut pooled = PooledConn::new(conn, self.clone(), permit, None, created);
        if self.settings.free_workers {
            let fresh = Fresh {
                opened: created,
                upload,
            };
            self.lock().fresh.insert(id, fresh);
            pooled.first_response_pending = Some(id);
            tokio::spawn(free_worker_if_unanswered(Arc::downgrade(self), id, created));
        }
        pooled
    }

    async fn acquire_slot(&self) -> Result<SlotHeld<'_>, UpstreamError> {
        match self.slots.try_take() {
            Ok(p) => Ok(p),
            Err(TryAcquireError::NoPermits) => Box::pin(self.wait_for_slot()).await,
            Err(TryAcquireError::Closed) => {
                Err(UpstreamError::new(Kind::NoPeer, Delivery::NotSent))
            }
        }
    }

    /// Queues for a slot (FIFO). Boxed by the caller: rare, and its timer would
    /// otherwise sit in every request's future.
    async fn wait_for_slot(&self) -> Result<SlotHeld<'_>, UpstreamError> {
        // Counted with the waiters of the pool a reload replaced, which wait for the
        // same slots: `queue_size` (the new one) bounds them all, as
        // `max_connections` bounds their connections.
        let waiting = &self.slots.waiting;
        if waiting.fetch_add(1, Relaxed) >= self.settings.queue_size {
            waiting.fetch_sub(1, Relaxed);
            self.figures.queue_full.fetch_add(1, Relaxed);
            return Err(UpstreamError::new(Kind::QueueFull, Delivery::NotSent));
        }
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Relaxed);
            }
        }
        let _waiting = Waiting(waiting);
        // Tokio's semaphore is fair: waiters are served in FIFO order.
        match tokio::time::timeout(self.settings.queue_timeout, self.slots.take()).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(UpstreamError::new(Kind::NoPeer, Delivery::NotSent)),
            Err(_) => {
                self.figures.queue_timeouts.fetch_add(1, Relaxed);
                Err(UpstreamError::new(Kind::QueueTimeout, Delivery::NotSent))
            }
        }
    }

    fn take_idle(&self, take: Take, now: Instant) -> Option<(Conn, Instant, Instant)> {
        let mut expired = Vec::new();
        let got = self.lock().idle.take(now, take, &mut expired);
        self.close_expired(expired, now);
        got.map(|e| (e.conn, e.idle_since, e.settled_at))
    }

    /// Connections open now (idle, busy and being opened).
    pub fn open_connections(&self) -> usize {
        self.slots.open.load(Relaxed)
    }

    /// Counts a connection about to be opened, first closing the oldest idle ones while
    /// open connections (idle, busy and being opened) are over `max_connections`. Busy
    /// and opening ones each hold a slot, so while over the cap an idle one exists.
    fn reserve_open(&self) -> OpenGuard {
        let guard = OpenGuard::count(&self.slots.open);
        // Bounded: each round closes an idle connection or stops.
        while self.slots.open.load(Relaxed) > self.slots.limit() {
            let Some(conn) = self.lock().idle.pop_oldest() else {
                break;
            };
            self.figures.closed(CloseReason::Evicted);
            drop(conn);
        }
        guard
    }

    /// Closes idle connections whose expiry passed by `now`: counted `lifetime` if
    /// `max_lifetime` had passed too (the expiry is the earlier of the idle timeout's
    /// and the lifetime's end), `idle_expired` otherwise.
    fn close_expired(&self, conns: Vec<Conn>, now: Instant) {
        for conn in conns {
            let reason = if self
                .settings
                .max_lifetime
                .is_some_and(|l| now.saturating_duration_since(conn.created) >= l)
            {
                CloseReason::Lifetime
            } else {
                CloseReason::IdleExpired
            };
            self.figures.closed(reason);
            drop(conn);
        }
    }

    fn close_all(&self, conns: Vec<Conn>, reason: CloseReason) {
        for conn in conns {
            self.figures.closed(reason);
            drop(conn);
        }
    }

    /// The upstream closed a connection that sat idle for `idle_age`; `learn`: see
    /// [`learnable_close`].
    fn upstream_closed_idle(&self, conn: Conn, idle_age: Duration, learn: bool) {
        self.figures.closed(CloseReason::ClosedByUpstreamIdle);
        self.figures.idle_age_at_upstream_close.observe(idle_age);
        if !learn {
            return;
        }
        let learned = self
            .lock()
            .learner
            .on_idle_close_at(idle_age, conn.requests, Instant::now());
        drop(conn);
        self.apply_learned(learned);
    }

    fn apply_learned(&self, learned: Option<Learned>) {
        match learned {
            None => {}
            Some(Learned::IdleTimeout(timeout, source)) => {
                tracing::info!(
                    address = %self.label,
                    idle_timeout = ?timeout,
                    source = source.as_str(),
                    "lowered the upstream idle timeout to what the upstream shows"
                );
                self.lock().idle.cap_expiry(timeout);
                self.reaper.notify_one();
            }
            Some(Learned::MaxRequests(n)) => {
                tracing::info!(
                    address = %self.label,
                    max_requests = n,
                    "upstream closes connections after {n} request(s) without saying so; retiring them before"
                );
            }
        }
    }

    /// A reused connection failed before any response byte. Connections idle as long
    /// or longer are likely dead too: close them now rather than find out one by one.
    /// `settled_at`: when its last answer had been read in full (the late bound, so
    /// that every connection that may be older goes); `idle_age`: the short one.
    /// `idle_since`: when that answer began to arrive (see `learnable_close`).
    pub fn on_stale(
        &self,
        idle_since: Instant,
        settled_at: Instant,
        idle_age: Duration,
        requests: u64,
    ) {
        let read_for = settled_at.saturating_duration_since(idle_since);
        let (older, learned) = {
            let mut st = self.lock();
            let older = st.idle.drain_idle_since(settled_at);
            // Only a prompt close says something exact (a per-connection request limit).
            let learned = (idle_age < PROMPT_CLOSE && learnable_close(idle_age, read_for))
                .then(|| {
                    st.learner
                        .on_idle_close_at(idle_age, requests, Instant::now())
                })
                .flatten();
            (older, learned)
        };
        self.close_all(older, CloseReason::Evicted);
        self.apply_learned(learned);
    }

    /// The upstream closed a connection as it was checked in: promptly after its
    /// answer (a request limit it does not announce) only if the answer was read
    /// promptly too. After a long read (a slow client) it may as well have been the
    /// upstream's idle timeout, and taken as a request limit it would end keep-alive
    /// to the address: nothing is learned.
    fn closed_at_checkin(&self, conn: Conn, answer_read_for: Duration) {
        if answer_read_for < PROMPT_CLOSE {
            self.upstream_closed_idle(conn, Duration::ZERO, true);
        } else {
            self.figures.closed(CloseReason::ClosedByUpstreamIdle);
        }
    }

    /// Called by a connection's driver when it ends. If the connection was idle, the
    /// upstream closed it (a connection in use is owned by a `PooledConn`, and one the
    /// pool closed is no longer listed).
    fn on_driver_end(&self, id: u64) {
        let entry = self.lock().idle.remove(id);
        if let Some(e) = entry {
            let age = e.closed_age(Instant::now());
            let read_for = e.settled_at.saturating_duration_since(e.idle_since);
            self.upstream_closed_idle(e.conn, age, learnable_close(age, read_for));
        }
    }

    /// Whether this connection may go back to the idle list, or why not.
    fn retire_reason(&self, conn: &Conn, hint: &ResponseHint, now: Instant) -> Option<CloseReason> {
        if hint.connection_close {
            return Some(CloseReason::UpstreamConnectionClose);
        }
        if hint.keep_alive.forbids_pooling() {
            return Some(CloseReason::NotPoolable);
        }
        let learned_max = self.lock().learner.learned_max_requests();
        let over = |limit: Option<u64>| limit.is_some_and(|m| conn.requests >= m);
        if over(self.settings.max_requests) || over(learned_max) || conn.remaining == Some(0) {
            return Some(CloseReason::MaxRequests);
        }
        if self
            .settings
            .max_lifetime
            .is_some_and(|l| now.saturating_duration_since(conn.created) >= l)
        {
            return Some(CloseReason::Lifetime);
        }
        if self.settings.free_workers && self.waits_for_worker(now) {
            return Some(CloseReason::Evicted);
        }
        if self.draining.load(Relaxed) {
            return Some(CloseReason::Evicted);
        }
        // Whether the upstream closed it is looked at by `Client::park`, under the
        // pool's lock.
        None
    }

    /// Whether a new connection has waited so long for its first response that it may
    /// be waiting for a worker an idle connection holds (`free_workers`).
    fn waits_for_worker(&self, now: Instant) -> bool {
        let st = self.lock();
        let wait = st.answer_wait.worker_wait();
        st.fresh
            .values()
            .filter_map(Fresh::unanswered_since)
            .any(|since| now.saturating_duration_since(since) >= wait)
    }

    /// A connection's answer was read in full at `now`; `survived`: how long it had
    /// been idle (at least) when it was handed out for that request, if it was reused.
    fn checkin(
        &self,
        mut conn: Conn,
        hint: ResponseHint,
        now: Instant,
        survived: Option<Duration>,
    ) {
        // Idle since its answer began to arrive, not since it was read (a slow client
        // can hold the end up for seconds): the upstream's timer began no earlier.
        let idle_since = conn.stream.answer_began().map_or(now, |at| at.min(now));
        conn.requests += 1;
        conn.remaining = match (hint.keep_alive.max, conn.remaining) {
            (Some(max), _) => Some(max),
            (None, Some(r)) => Some(r.saturating_sub(1)),
            (None, None) => None,
        };
        if let Some(reason) = self.retire_reason(&conn, &hint, now) {
            if reason == CloseReason::ClosedByUpstreamIdle {
                self.closed_at_checkin(conn, now.saturating_duration_since(idle_since));
            } else {
                self.figures.closed(reason);
            }
            return;
        }
        let mut st = self.lock();
        // Looked at again under the lock, which `drain` takes after setting the flag:
        // a drain that began since `retire_reason` either shows here or finds the
        // connection listed, never neither.
        if self.draining.load(Relaxed) {
            drop(st);
            self.figures.closed(CloseReason::Evicted);
            return;
        }
        // Under the pool's lock: an event the driver sees from here on finds the
        // connection listed, so `on_driver_end` removes it.
        if let Err(reason) = conn.client.park() {
            drop(st);
            if reason == CloseReason::ClosedByUpstreamIdle {
                self.closed_at_checkin(conn, now.saturating_duration_since(idle_since));
            } else {
                self.figures.closed(reason);
            }
            return;
        }
        st.learner.on_kept(conn.requests, survived);
        // Listed in its place by `idle_since`, which may be earlier than others'.
        let (mut idle_timeout, _) = st.learner.effective_idle();
        // Its own answer's word, whatever others on the address said since.
        if let Some(own) = hint
            .keep_alive
            .timeout_secs
            .and_then(|secs| st.learner.announced_idle(secs))
        {
            idle_timeout = idle_timeout.min(own);
        }
        let mut expires_at = idle_since + idle_timeout;
        if let Some(lifetime) = self.settings.max_lifetime {
            expires_at = expires_at.min(conn.created + lifetime);
        }
        if expires_at <= now {
            drop(st);
            self.figures.closed(CloseReason::IdleExpired);
            return;
        }
        let evicted = st.idle.push(
            conn,
            idle_since,
            now,
            expires_at,
            self.idle_limit.load(Relaxed),
        );
        let wake = st.reaper_target.is_none_or(|t| expires_at < t);
        drop(st);
        if wake {
            self.reaper.notify_one();
        }
        if let Some(c) = evicted {
            self.figures.closed(CloseReason::Evicted);
            drop(c);
        }
    }

    /// Lowers the connection cap to what the upstream application accepts (FastCGI
    /// `FCGI_MAX_CONNS`), and keeps idle connections to half of it: php-fpm gives
    /// each open connection a worker of its own, idle or not, so a full idle pool
    /// would leave it nothing for anyone else.
    pub fn cap(&self, max_conns: usize) {
        let max_conns = max_conns.max(1);
        self.app_max_conns.fetch_min(max_conns, Relaxed);
        // Slots in use beyond it are forgotten as they come back.
        self.slots.lower_to(max_conns);
        let idle = idle_for(max_conns);
        if idle < self.idle_limit.load(Relaxed) {
            self.idle_limit.store(idle, Relaxed);
        }
        tracing::info!(address = %self.label, max_connections = self.slots.limit(), max_idle = self.idle_limit.load(Relaxed), "pool capped by what the application accepts");
    }

    /// A reload replaced the pool this one succeeds (see [`Pool::succeeding`]) and is
    /// sure to apply: the address's limit is this pool's `max_connections` from now
    /// on (or what the application said it takes, if lower). Slots the old pool's
    /// requests hold beyond a lower limit are forgotten as they come back.
    pub fn take_over(&self) {
        let limit = self
            .settings
            .max_connections
            .min(self.app_max_conns.load(Relaxed));
        self.slots.set_limit(limit);
    }

    /// Whether this pool shares its slots with `other` (it succeeds it, or the
    /// reverse).
    pub fn shares_slots_with(&self, other: &Pool) -> bool {
        Arc::ptr_eq(&self.slots, &other.slots)
    }

    /// Closes every idle connection and retires busy ones when they finish.
    pub fn drain(&self) {
        self.draining.store(true, Relaxed);
        let idle = self.lock().idle.drain_all();
        self.close_all(idle, CloseReason::Evicted);
        self.drain_shared();
    }

    /// How long a connection may have been idle and still carry a request that
    /// cannot be retried: well below the upstream's idle timeout.
    pub fn safe_reuse_age(&self) -> Duration {
        let (idle, _) = self.lock().learner.effective_idle();
        (idle / 4).min(Duration::from_secs(1))
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        let st = self.lock();
        let (idle_timeout, source) = st.learner.effective_idle();
        let (connections, streams, max_streams, stream_waiters, retiring_streams) =
            st.shared.figures();
        let http2 =
            (connections > 0 || streams > 0 || stream_waiters > 0).then_some(Http2Snapshot {
                connections,
                streams,
                max_streams,
                idle_timeout: self.settings.h2_idle_timeout,
            });
        PoolSnapshot {
            open: self.slots.open.load(Relaxed),
            idle: st.idle.len(),
            in_use: self.slots.in_use() + streams + retiring_streams,
            waiting: self.slots.waiting.load(Relaxed) + stream_waiters,
            max_connections: self.slots.limit(),
            effective_idle_timeout: idle_timeout,
            idle_timeout_source: source,
            learned_max_requests: st.learner.learned_max_requests(),
            http2,
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Wakes the reaper so it sees the pool is gone and ends.
        self.reaper.notify_one();
    }
}

/// Gauges of one pool at one moment.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolSnapshot {
    pub open: usize,
    pub idle: usize,
    pub in_use: usize,
    pub waiting: usize,
    pub max_connections: usize,
    #[serde(serialize_with = "ser_secs")]
    pub effective_idle_timeout: Duration,
    pub idle_timeout_source: IdleSource,
    pub learned_max_requests: Option<u64>,
    /// HTTP/2 addresses: the shared connections taking new streams.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http2: Option<Http2Snapshot>,
}

/// The shared HTTP/2 connections of one pool (`in_use` and `waiting` count their
/// streams and waiters too).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Http2Snapshot {
    /// Connections taking new streams (not those going away).
    pub connections: usize,
    /// Streams in flight on them.
    pub streams: usize,
    /// Streams they take at once (the upstream's `SETTINGS_MAX_CONCURRENT_STREAMS`).
    pub max_streams: usize,
    /// How long one of them may go with no stream in flight (`http2.idle_timeout`;
    /// `None`: no limit): what is in force for these connections, where the address's
    /// `effective_idle_timeout` (HTTP/1 keep-alive) is not.
    #[serde(serialize_with = "ser_opt_secs")]
    pub idle_timeout: Option<Duration>,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn ser_opt_secs<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_secs_f64()),
        None => s.serialize_none(),
    }
}

/// Idle connections kept at most when the application takes `max_conns` connections:
/// half of them (php-fpm gives each open connection a worker, idle or not).
fn idle_for(max_conns: usize) -> usize {
    (max_conns / 2).max(1)
}

/// Whether an upstream close of an idle connection, seen `closed_age` after its last
/// answer had been read in full, which took `read_for` from the answer's first bytes,
/// can be learned from. A close that soon after the check-in reads as "right after
/// the answer" (a request limit) only if the answer was read promptly too: behind a
/// slow client the upstream's idle timer ran during the read, and the close may as
/// well be its idle timeout (as at check-in: `Pool::closed_at_checkin`).
fn learnable_close(closed_age: Duration, read_for: Duration) -> bool {
    closed_age >= PROMPT_CLOSE || read_for < PROMPT_CLOSE
}

/// Runs a connection's protocol until it ends or the pool drops it.
async fn drive(
    id: u64,
    driver: Pin<Box<dyn Future<Output = ()> + Send>>,
    killed: oneshot::Receiver<()>,
    pool: Weak<Pool>,
) {
    tokio::select! {
        () = driver => {
            if let Some(pool) = pool.upgrade() {
                pool.on_driver_end(id);
            }
        }
        _ = killed => {}
    }
}

/// With `free_workers`: if new connection `id`, opened at `opened`, is still
/// unanswered after the worker wait (see [`AnswerWait::worker_wait`]), closes the
/// oldest idle connection, freeing the worker it holds. A request that declined the
/// idle connections (a POST avoids old ones) would otherwise wait for that worker
/// until their idle timeout; without idle ones, the next connection to finish is
/// closed instead (see `retire_reason`).
async fn free_worker_if_unanswered(pool: Weak<Pool>, id: u64, opened: Instant) {
    // Looked at again when answers were found slower meanwhile, or the client gave
    // more of its upload: bounded by the connection's first response (or its end).
    let mut at = opened + WORKER_WAIT;
    loop {
        tokio::time::sleep_until(at).await;
        let Some(pool) = pool.upgrade() else { return };
        let oldest = {
            let mut st = pool.lock();
            let Some(fresh) = st.fresh.get(&id) else {
                return;
            };
            let now = Instant::now();
            let due = fresh.unanswered_since().unwrap_or(now) + st.answer_wait.worker_wait();
            if due > now {
                at = due;
                continue;
            }
            st.idle.pop_oldest()
        };
        if let Some(conn) = oldest {
            pool.figures.closed(CloseReason::Evicted);
            drop(conn);
        }
        return;
    }
}

/// Closes idle connections at their expiry, so none stays open past it, and retires
/// HTTP/2 connections at their lifetime and idle deadlines.
async fn reap(pool: Weak<Pool>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(pool) = pool.upgrade() else { return };
            let (expired, now) = {
                let mut st = pool.lock();
                let now = Instant::now();
                let expired = st.idle.drain_expired(now);
                pool.retire_spent(&mut st, now);
                st.reaper_target = st
                    .idle
                    .next_expiry()
                    .into_iter()
                    .chain(st.shared.next_deadline(&pool.settings))
                    .min();
                (expired, now)
            };
            pool.close_expired(expired, now);

            pool.lock().reaper_target
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

#[cfg(test)]
mod tests;
