//! HTTP/2 connections shared by many requests: the pool's second mode, beside the
//! one-request-per-connection rules of HTTP/1 and FastCGI in `pool.rs`.
//!
//! - A checkout takes a *stream* on a listed connection, not the connection: a
//!   [`Lease`] holds a clone of hyper's sender and counts one stream in flight on
//!   that connection until it is released or dropped. Dropping a lease never closes
//!   the connection (hyper resets that one stream).
//! - A request takes the least busy listed connection whose streams in flight are
//!   below the upstream's `SETTINGS_MAX_CONCURRENT_STREAMS`. When every listed one is
//!   busy and fewer than `http2.connections` are open or opening, it opens another
//!   (within `pool.max_connections`, which counts the connections off the list whose
//!   streams are still in flight too); when none has a free stream and none may
//!   open, it waits in a FIFO queue
//!   (`queue_size`, `queue_timeout`). A freed stream, a new connection or a raised
//!   limit is handed to the first waiter directly (`Grant`), so nobody overtakes.
//! - A connection leaves the list, and takes no new stream, the moment it is known
//!   to be finished: a GOAWAY read off the wire, a failed request, an unanswered
//!   PING, its end. Its streams in flight go on; the socket closes when the last
//!   lease is gone. Requests the GOAWAY refused are retried by `Upstream::forward`.
//! - holdfast retires connections the same way, so its own closes cannot race a
//!   request either: at `pool.max_requests` streams (the moment the last one is
//!   leased), at `pool.max_lifetime`, and after `http2.idle_timeout` with no stream
//!   in flight. The pool's reaper wakes for the last two.
//!
//! Everything here runs under the pool's one lock; grants are sent while holding it
//! and defused if the waiter is gone, so no drop re-enters the lock.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{Client, Connected, NEXT_CONN_ID, OpenGuard, Pool, PoolSettings, PooledConn, State};
use crate::upstream::error::{Delivery, Kind, UpstreamError};
use crate::upstream::figures::CloseReason;
use crate::upstream::http2::{Http2Client, Signals};
use crate::upstream::io::Stream;

/// The shared connections of one pool and the requests waiting for a stream.
#[derive(Default)]
pub(super) struct SharedState {
    /// Connections taking new streams.
    conns: Vec<Arc<SharedConn>>,
    /// Connections being opened by a request that will take their first stream.
    opening: usize,
    /// Connections off the list (going away, retired, never listed) whose streams
    /// are still in flight: open, so counted under `pool.max_connections`.
    retiring: usize,
    /// The streams in flight on those: requests in use (`/pools` `in_use`).
    retiring_streams: usize,
    waiters: VecDeque<oneshot::Sender<Grant>>,
}

/// One HTTP/2 connection, owned by the list and by the leases on it.
pub(super) struct SharedConn {
    id: u64,
    created: Instant,
    client: Http2Client,
    stream: Arc<Stream>,
    /// Streams in flight; changed only under the pool lock.
    in_flight: AtomicUsize,
    /// Streams finished on this connection.
    served: AtomicU64,
    /// Streams leased on this connection, the one in flight included.
    started: AtomicU64,
    /// When the last stream in flight ended, in ms after `created`; [`BUSY`] while
    /// streams are in flight. Changed only under the pool lock.
    idle_since_ms: AtomicU64,
    /// Off the list for good (see [`SharedState::delist`]). Changed only under the
    /// pool lock.
    delisted: AtomicBool,
    /// Dropping this ends the connection's drive task.
    _kill: oneshot::Sender<()>,
    _open: OpenGuard,
}

impl Drop for SharedConn {
    fn drop(&mut self) {
        // No lease is left, so no stream of ours is open: close now rather than when
        // hyper's task next runs.
        self.stream.shutdown_both();
    }
}

impl SharedConn {
    fn signals(&self) -> &Signals {
        &self.client.signals
    }

    fn has_free_stream(&self) -> bool {
        !self.signals().is_going_away()
            && self.in_flight.load(Relaxed) < self.signals().max_streams()
    }

    /// Why holdfast retires this connection at `now`, if it does: it then takes no
    /// new stream and closes when those in flight end.
    fn spent(&self, settings: &PoolSettings, now: Instant) -> Option<CloseReason> {
        if self.at_max_requests(settings) {
            return Some(CloseReason::MaxRequests);
        }
        if settings
            .max_lifetime
            .is_some_and(|life| now >= self.created + life)
        {
            return Some(CloseReason::Lifetime);
        }
        match self.idle_deadline(settings) {
            Some(at) if now >= at => Some(CloseReason::IdleExpired),
            _ => None,
        }
    }

    /// Its last stream under `pool.max_requests` is leased.
    fn at_max_requests(&self, settings: &PoolSettings) -> bool {
        settings
            .max_requests
            .is_some_and(|max| self.started.load(Relaxed) >= max)
    }

    fn idle_deadline(&self, settings: &PoolSettings) -> Option<Instant> {
        let since = self.idle_since_ms.load(Relaxed);
        let timeout = settings.h2_idle_timeout?;
        (since != BUSY).then(|| self.created + Duration::from_millis(since) + timeout)
    }

    /// The next time [`SharedConn::spent`] may change without a lease or release.
    fn next_deadline(&self, settings: &PoolSettings) -> Option<Instant> {
        let lifetime = settings.max_lifetime.map(|life| self.created + life);
        lifetime
            .into_iter()
            .chain(self.idle_deadline(settings))
            .min()
    }

    /// One stream more in flight (under the pool lock).
    fn take_stream(&self) {
        self.in_flight.fetch_add(1, Relaxed);
        self.started.fetch_add(1, Relaxed);
        self.idle_since_ms.store(BUSY, Relaxed);
    }

    /// One stream fewer in flight (under the pool lock). The last stream of a
    /// connection off the list closes it: it no longer counts as open.
    fn give_back_stream(&self, shared: &mut SharedState, now: Instant) {
        let delisted = self.delisted.load(Relaxed);
        if delisted {
            shared.retiring_streams -= 1;
        }
        if self.in_flight.fetch_sub(1, Relaxed) == 1 {
            let since = now.saturating_duration_since(self.created).as_millis();
            self.idle_since_ms
                .store(u64::try_from(since).unwrap_or(BUSY - 1), Relaxed);
            if delisted {
                shared.retiring -= 1;
                // No stream of ours is left on it: close it now, before the room it
                // leaves can open another (as its drop, just after, would).
                self.stream.shutdown_both();
            }
        }
    }
}

/// [`SharedConn::idle_since_ms`] while streams are in flight.
const BUSY: u64 = u64::MAX;

/// A stream on a shared connection, for one request.
///
/// # Drop behavior
/// Gives the stream back to the pool, which hands it to the first waiter.
pub struct Lease {
    conn: Arc<SharedConn>,
    pool: Weak<Pool>,
    pub(super) client: Client,
    /// The connection served other requests before this one.
    pub(super) reused: bool,
    armed: bool,
}

impl Lease {
    fn new(conn: Arc<SharedConn>, pool: Weak<Pool>, reused: bool) -> Lease {
        Lease {
            client: Client::Http2(conn.client.clone()),
            conn,
            pool,
            reused,
            armed: true,
        }
    }

    pub(super) fn created(&self) -> Instant {
        self.conn.created
    }

    pub(super) fn served(&self) -> u64 {
        self.conn.served.load(Relaxed)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.armed
            && let Some(pool) = self.pool.upgrade()
        {
            pool.release_stream(&self.conn);
        }
    }
}

/// The right to open a connection, counted in `opening` until used or dropped.
pub(super) struct OpenTicket {
    pool: Weak<Pool>,
    armed: bool,
}

impl Drop for OpenTicket {
    fn drop(&mut self) {
        if self.armed
            && let Some(pool) = self.pool.upgrade()
        {
            let mut st = pool.lock();
            st.shared.opening -= 1;
            pool.dispatch(&mut st);
        }
    }
}

/// What a waiter is handed.
pub(super) enum Grant {
    Stream(Lease),
    Open(OpenTicket),
}

impl Grant {
    /// For a grant that never reached its waiter: the caller undoes the counts.
    fn defuse(self) {
        match self {
            Grant::Stream(mut l) => l.armed = false,
            Grant::Open(mut t) => t.armed = false,
        }
    }
}

enum Choice {
    Stream(Arc<SharedConn>),
    Open,
    Wait,
}

impl SharedState {
    /// `limit`: connections listed or opening (`http2.connections`); `cap`: open
    /// ones, those off the list with streams still in flight included
    /// (`pool.max_connections`).
    fn choose(&self, limit: usize, cap: usize) -> Choice {
        let best = self
            .conns
            .iter()
            .filter(|c| c.has_free_stream())
            .min_by_key(|c| c.in_flight.load(Relaxed));
        let all_busy = best.is_none_or(|c| c.in_flight.load(Relaxed) > 0);
        let listed = self.conns.len() + self.opening;
        match best {
            _ if all_busy && listed < limit && listed + self.retiring < cap => Choice::Open,
            Some(c) => Choice::Stream(c.clone()),
            None => Choice::Wait,
        }
    }

    /// Marks a connection taken off the list (or never put on it): it takes no new
    /// stream, and counts as open until its last stream ends.
    fn delist(&mut self, conn: &SharedConn) {
        let in_flight = conn.in_flight.load(Relaxed);
        if !conn.delisted.swap(true, Relaxed) && in_flight > 0 {
            self.retiring += 1;
            self.retiring_streams += in_flight;
        }
    }

    /// Takes the connections holdfast retires at `now` off the list (see
    /// [`SharedConn::spent`]); each closes when its last stream ends.
    fn retire_spent(
        &mut self,
        settings: &PoolSettings,
        now: Instant,
    ) -> Vec<(Arc<SharedConn>, CloseReason)> {
        let mut gone = Vec::new();
        self.conns.retain(|c| match c.spent(settings, now) {
            Some(reason) => {
                gone.push((c.clone(), reason));
                false
            }
            None => true,
        });
        for (c, _) in &gone {
            self.delist(c);
        }
        gone
    }

    /// When the reaper must look at the listed connections next.
    pub(super) fn next_deadline(&self, settings: &PoolSettings) -> Option<Instant> {
        self.conns
            .iter()
            .filter_map(|c| c.next_deadline(settings))
            .min()
    }

    /// Connections, streams in flight on them, the streams they take, and the
    /// requests still waiting, for `/pools`; and the streams in flight on connections
    /// off the list.
    pub(super) fn figures(&self) -> (usize, usize, usize, usize, usize) {
        let streams = self.conns.iter().map(|c| c.in_flight.load(Relaxed)).sum();
        let max = self
            .conns
            .iter()
            .map(|c| c.signals().max_streams())
            .fold(0usize, usize::saturating_add);
        // A waiter that gave up (queue timeout, client gone) stays queued until the
        // next dispatch or checkout: not waiting.
        let waiting = self.waiters.iter().filter(|w| !w.is_closed()).count();
        (
            self.conns.len(),
            streams,
            max,
            waiting,
            self.retiring_streams,
        )
    }
}

type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;

impl Pool {
    /// A stream on a shared HTTP/2 connection: the least busy one with a free stream,
    /// a new one, or a wait in the queue (see the module docs). `connect` opens an
    /// HTTP/2 connection; if it turns out HTTP/1.1 (ALPN), it is used as an exclusive
    /// one.
    ///
    /// # Errors
    /// A full queue or `queue_timeout` (503), or `connect` failed.
    ///
    /// # Cancel safety
    /// Dropping the future gives back the place in the queue, a stream handed to it,
    /// or the right to open a connection.
    pub async fn checkout_shared<F, Fut>(
        self: &Arc<Self>,
        connect: F,
    ) -> Result<PooledConn, UpstreamError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Connected, UpstreamError>>,
    {
        let waiting = {
            let mut st = self.lock();
            let limit = self.settings.h2_connections;
            self.retire_spent(&mut st, Instant::now());
            st.shared.waiters.retain(|w| !w.is_closed());
            let choice = if st.shared.waiters.is_empty() {
                st.shared.choose(limit, self.slots.limit())
            } else {
                Choice::Wait
            };
            match choice {
                Choice::Stream(conn) => {
                    self.figures.reused.fetch_add(1, Relaxed);
                    let lease = self.lease(&mut st, conn);
                    return Ok(PooledConn::shared(lease, self.clone()));
                }
                Choice::Open => {
                    st.shared.opening += 1;
                    Err(OpenTicket {
                        pool: Arc::downgrade(self),
                        armed: true,
                    })
                }
                Choice::Wait => {
                    if st.shared.waiters.len() >= self.settings.queue_size {
                        self.figures.queue_full.fetch_add(1, Relaxed);
                        return Err(UpstreamError::new(Kind::QueueFull, Delivery::NotSent));
                    }
                    let (tx, rx) = oneshot::channel();
                    st.shared.waiters.push_back(tx);
                    Ok(rx)
                }
            }
        };
        let ticket = match waiting {
            Err(ticket) => ticket,
            Ok(rx) => match tokio::time::timeout(self.settings.queue_timeout, rx).await {
                Ok(Ok(Grant::Stream(lease))) => {
                    self.figures.reused.fetch_add(1, Relaxed);
                    return Ok(PooledConn::shared(lease, self.clone()));
                }
                Ok(Ok(Grant::Open(ticket))) => ticket,
                Ok(Err(_)) => return Err(UpstreamError::new(Kind::NoPeer, Delivery::NotSent)),
                Err(_) => {
                    self.figures.queue_timeouts.fetch_add(1, Relaxed);
                    return Err(UpstreamError::new(Kind::QueueTimeout, Delivery::NotSent));
                }
            },
        };
        let open = OpenGuard::count(&self.slots.open);
        let connected = connect().await?;
        match self.adopt_shared(connected, open, Some(ticket)) {
            Ok(pooled) => Ok(pooled),
            Err((connected, open)) => {
                // HTTP/1.1 after all (the upstream's ALPN changed): exclusive.
                let slot = self.acquire_slot().await?;
                Ok(self.new_exclusive(connected, open, slot))
            }
        }
    }

    /// Lists a new HTTP/2 connection and leases its first stream; gives `connected`
    /// back if it is not HTTP/2.
    pub(super) fn adopt_shared(
        self: &Arc<Self>,
        connected: Connected,
        open: OpenGuard,
        ticket: Option<OpenTicket>,
    ) -> Result<PooledConn, (Connected, OpenGuard)> {
        let Connected {
            stream,
            client,
            driver,
        } = connected;
        let client = match client {
            Client::Http2(c) => c,
            other => {
                return Err((
                    Connected {
                        stream,
                        client: other,
                        driver,
                    },
                    open,
                ));
            }
        };
        let (kill, killed) = oneshot::channel();
        let signals = client.signals.clone();
        let conn = Arc::new(SharedConn {
            id: NEXT_CONN_ID.fetch_add(1, Relaxed),
            created: Instant::now(),
            client,
            stream,
            in_flight: AtomicUsize::new(1),
            served: AtomicU64::new(0),
            started: AtomicU64::new(1),
            idle_since_ms: AtomicU64::new(BUSY),
            delisted: AtomicBool::new(false),
            _kill: kill,
            _open: open,
        });
        self.figures.created.fetch_add(1, Relaxed);
        tokio::spawn(drive_shared(
            conn.id,
            driver,
            killed,
            signals,
            Arc::downgrade(self),
        ));
        {
            let mut st = self.lock();
            if let Some(mut t) = ticket {
                t.armed = false;
                st.shared.opening -= 1;
            }
            // Not listed, the connection serves this one stream and closes with it;
            // counted closed here, as a listed one is when it leaves the list.
            let unlisted = if conn.signals().is_going_away() {
                Some(match conn.signals().goaway_last_stream_id() {
                    Some(_) => CloseReason::GoAway,
                    None => CloseReason::Error,
                })
            } else if st.shared.conns.len() >= self.settings.h2_connections {
                Some(CloseReason::Evicted)
            } else if conn.at_max_requests(&self.settings) {
                // `max_requests = 1`: this stream is its only one.
                Some(CloseReason::MaxRequests)
            } else {
                None
            };
            match unlisted {
                Some(reason) => {
                    st.shared.delist(&conn);
                    self.figures.closed(reason);
                }
                None => {
                    st.shared.conns.push(conn.clone());
                    self.wake_reaper_for(&st, conn.next_deadline(&self.settings));
                }
            }
            self.dispatch(&mut st);
        }
        let lease = Lease::new(conn, Arc::downgrade(self), false);
        Ok(PooledConn::shared(lease, self.clone()))
    }

    /// A lease ended: its stream goes to the first waiter, or back to the connection.
    /// In a drain, a listed connection left with no stream in flight leaves the list
    /// and closes (see [`Pool::drain_shared`]).
    fn release_stream(&self, conn: &Arc<SharedConn>) {
        let now = Instant::now();
        let mut st = self.lock();
        conn.give_back_stream(&mut st.shared, now);
        conn.served.fetch_add(1, Relaxed);
        self.dispatch(&mut st);
        if conn.in_flight.load(Relaxed) == 0 {
            // Looked at under the lock, which `drain_shared` takes after the flag is
            // set: a drain either shows here or finds the connection idle.
            if self.draining.load(Relaxed) && !conn.delisted.load(Relaxed) {
                st.shared.conns.retain(|c| !Arc::ptr_eq(c, conn));
                st.shared.delist(conn);
                drop(st);
                self.figures.closed(CloseReason::Evicted);
                // No stream of ours is left on it: close it now (its last `Arc`,
                // this lease's, goes just after).
                conn.stream.shutdown_both();
                return;
            }
            // Idle now: the reaper closes it at its idle deadline.
            self.wake_reaper_for(&st, conn.next_deadline(&self.settings));
        }
    }

    /// Leases a stream on a listed connection (under the pool lock). A connection
    /// whose last stream under `max_requests` this is leaves the list at once.
    fn lease(&self, st: &mut State, conn: Arc<SharedConn>) -> Lease {
        conn.take_stream();
        if conn.at_max_requests(&self.settings) {
            st.shared.conns.retain(|c| !Arc::ptr_eq(c, &conn));
            st.shared.delist(&conn);
            self.figures.closed(CloseReason::MaxRequests);
        }
        Lease::new(conn, self.me.clone(), true)
    }

    /// Takes the connections holdfast retires at `now` off the list (under the pool
    /// lock); each closes when its last stream ends.
    pub(super) fn retire_spent(&self, st: &mut State, now: Instant) {
        let retired = st.shared.retire_spent(&self.settings, now);
        for (conn, reason) in &retired {
            tracing::debug!(address = %self.label, in_flight = conn.in_flight.load(Relaxed), reason = reason.as_str(), "HTTP/2 connection retired: no new streams");
            self.figures.closed(*reason);
        }
        if !retired.is_empty() {
            // Waiters may open a connection in place of a retired one.
            self.dispatch(st);
        }
    }

    /// Wakes the reaper if `at` comes before the time it sleeps until.
    fn wake_reaper_for(&self, st: &State, at: Option<Instant>) {
        if at.is_some_and(|at| st.reaper_target.is_none_or(|t| at < t)) {
            self.reaper.notify_one();
        }
    }

    /// Hands free streams, and the right to open connections, to waiters in order.
    pub(super) fn dispatch(&self, st: &mut State) {
        let limit = self.settings.h2_connections;
        let cap = self.slots.limit();
        // Bounded: each round removes a waiter or stops.
        loop {
            while st.shared.waiters.front().is_some_and(|w| w.is_closed()) {
                st.shared.waiters.pop_front();
            }
            if st.shared.waiters.is_empty() {
                return;
            }
            let grant = match st.shared.choose(limit, cap) {
                Choice::Wait => return,
                Choice::Stream(conn) => Grant::Stream(self.lease(st, conn)),
                Choice::Open => {
                    st.shared.opening += 1;
                    Grant::Open(OpenTicket {
                        pool: self.me.clone(),
                        armed: true,
                    })
                }
            };
            let Some(waiter) = st.shared.waiters.pop_front() else {
                return;
            };
            if let Err(grant) = waiter.send(grant) {
                match &grant {
                    Grant::Stream(l) => {
                        // Not started after all (a connection this retired at
                        // `max_requests` stays retired: one stream early, no harm).
                        l.conn.started.fetch_sub(1, Relaxed);
                        l.conn.give_back_stream(&mut st.shared, Instant::now());
                    }
                    Grant::Open(_) => st.shared.opening -= 1,
                }
                grant.defuse();
            }
        }
    }

    /// A shared connection's signals changed: delist it if it takes no more streams,
    /// and hand out what changed (a raised limit).
    fn shared_changed(&self) {
        let mut gone = Vec::new();
        {
            let mut st = self.lock();
            st.shared.conns.retain(|c| {
                let keep = !c.signals().is_going_away();
                if !keep {
                    gone.push(c.clone());
                }
                keep
            });
            for c in &gone {
                st.shared.delist(c);
            }
            self.dispatch(&mut st);
        }
        for conn in gone {
            let reason = match conn.signals().goaway_last_stream_id() {
                Some(last) => {
                    tracing::debug!(address = %self.label, last_stream_id = last, in_flight = conn.in_flight.load(Relaxed), "upstream sent GOAWAY; no new streams on this connection");
                    CloseReason::GoAway
                }
                None => CloseReason::Error,
            };
            self.figures.closed(reason);
        }
    }

    /// The pool drains (its `draining` flag is set): shared connections with no
    /// stream in flight leave the list and close now; busy ones stay listed, taking
    /// streams as before, and leave as their last stream ends ([`Pool::release_stream`]),
    /// as an idle HTTP/1 connection closes at once and a busy one at its check-in. A
    /// request that comes during the drain (on a client connection it has not closed
    /// yet, a stream sent before the client saw the GOAWAY, a retry) shares them:
    /// delisted, each such request needed a connection of its own, and with
    /// `pool.max_connections` held by the busy ones it waited for `queue_timeout`.
    pub(super) fn drain_shared(&self) {
        let gone = {
            let mut st = self.lock();
            let mut gone = Vec::new();
            st.shared.conns.retain(|c| {
                let idle = c.in_flight.load(Relaxed) == 0;
                if idle {
                    gone.push(c.clone());
                }
                !idle
            });
            for c in &gone {
                st.shared.delist(c);
            }
            self.dispatch(&mut st);
            gone
        };
        for _ in &gone {
            self.figures.closed(CloseReason::Evicted);
        }
    }
}

/// Runs a shared connection's dispatcher until it ends or the connection is dropped,
/// telling the pool whenever its signals change.
async fn drive_shared(
    id: u64,
    mut driver: Driver,
    mut killed: oneshot::Receiver<()>,
    signals: Arc<Signals>,
    pool: Weak<Pool>,
) {
    loop {
        tokio::select! {
            () = &mut driver => {
                signals.fail();
                if let Some(pool) = pool.upgrade() {
                    pool.shared_changed();
                }
                tracing::trace!(conn = id, "HTTP/2 dispatcher ended");
                return;
            }
            _ = &mut killed => return,
            () = signals.changed.notified() => {
                let Some(pool) = pool.upgrade() else { return };
                pool.shared_changed();
            }
        }
    }
}
