//! The drain signal every listener and client connection watches, and the count of
//! open client connections the process waits on before it exits (and of the parked
//! ones among them, for `/metrics`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use slab::Slab;
use tokio::sync::Notify;

/// The process's phase, as client connections see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Stop accepting; finish what is in flight with `Connection: close`; close idle
    /// connections once they have been quiet for a moment.
    Draining,
}

/// Sends the drain to everyone holding a [`DrainWatch`]. Dropping it starts the drain
/// too: without a sender there is no server left to run.
#[derive(Debug)]
pub struct DrainSignal(Arc<DrainShared>);

/// Watches for the drain.
#[derive(Debug, Clone)]
pub struct DrainWatch(Arc<DrainShared>);

/// Written by hand rather than with `tokio::sync::watch`: every client connection's
/// task polls the drain each time it wakes (several times per request), and a
/// `watch` (or `Notify`) future takes a lock on every poll. Here a poll is an atomic
/// load while the task's waker is already registered.
#[derive(Debug, Default)]
struct DrainShared {
    draining: AtomicBool,
    /// A slab rather than a map: registering is an index, not a hash, and every new
    /// client connection registers once.
    waiters: Mutex<Slab<Waker>>,
}

pub fn channel() -> (DrainSignal, DrainWatch) {
    let shared = Arc::new(DrainShared::default());
    (DrainSignal(shared.clone()), DrainWatch(shared))
}

impl DrainSignal {
    pub fn start(&self) {
        self.0.draining.store(true, Ordering::Release);
        let waiters = std::mem::take(&mut *lock(&self.0.waiters));
        for (_, w) in waiters {
            w.wake();
        }
    }
}

impl Drop for DrainSignal {
    fn drop(&mut self) {
        self.start();
    }
}

impl DrainWatch {
    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Acquire)
    }

    /// Resolves once the drain has started (at once if it already has).
    ///
    /// # Cancel safety
    /// Cancel safe: it only observes.
    pub fn draining(&mut self) -> Draining<'_> {
        Draining {
            shared: &self.0,
            key: None,
            waker: None,
        }
    }
}

/// The future of [`DrainWatch::draining`].
#[derive(Debug)]
pub struct Draining<'a> {
    shared: &'a DrainShared,
    /// This future's entry in `waiters`, once registered.
    key: Option<usize>,
    /// A copy of the registered waker, to see without the lock that it still fits.
    waker: Option<Waker>,
}

impl Future for Draining<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        if this.shared.draining.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if this.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        {
            let mut waiters = lock(&this.shared.waiters);
            match this.key.and_then(|k| waiters.get_mut(k)) {
                Some(slot) => slot.clone_from(cx.waker()),
                None => this.key = Some(waiters.insert(cx.waker().clone())),
            }
        }
        this.waker = Some(cx.waker().clone());
        // The drain may have started, and taken the waiters, just before the insert.
        if this.shared.draining.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

impl Drop for Draining<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            // After a drain took the waiters the key may name someone else's entry:
            // harmless then, since nobody waits for anything but the drain.
            lock(&self.shared.waiters).try_remove(key);
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing here can panic while holding the lock; a poisoned map is still sound.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counts open client connections (including lingering closes, also counted apart:
/// a drain waits for them but does not call them cut), and keeps the figures about
/// client connections that `/metrics` shows.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    inner: Arc<TrackerInner>,
}

#[derive(Debug, Default)]
struct TrackerInner {
    open: AtomicUsize,
    /// Of the open ones, idle HTTP/1 connections parked now (see `server/conn.rs`).
    parked: AtomicUsize,
    /// Of the open ones, those closed by holdfast and lingering (reading what the
    /// client still sends so that the close is a FIN, never a reset): nothing of
    /// theirs is left to answer.
    lingering: AtomicUsize,
    zero: Notify,
    figures: Arc<ClientFigures>,
}

/// Client connections accepted, and ended by the client's fault (each kind is also a
/// log line, see `server/conn.rs`).
#[derive(Debug, Default)]
pub struct ClientFigures {
    pub accepted: AtomicU64,
    /// A request hyper refused (answered 400 or 431 where it could).
    pub malformed: AtomicU64,
    /// No complete request head within `header_timeout` (also: an HTTP/2 client that
    /// did not finish closing after GOAWAY).
    pub head_timeout: AtomicU64,
    /// A TLS handshake that failed or did not finish within `header_timeout`.
    pub tls_handshake: AtomicU64,
    /// An HTTP/2 client closed with GOAWAY `ENHANCE_YOUR_CALM` (rapid reset).
    pub http2_abuse: AtomicU64,
}

/// One open connection; dropping it counts the connection closed.
#[derive(Debug)]
pub struct Tracked(Arc<TrackerInner>);

impl Tracker {
    pub fn track(&self) -> Tracked {
        self.inner.open.fetch_add(1, Ordering::Relaxed);
        self.inner.figures.accepted.fetch_add(1, Ordering::Relaxed);
        Tracked(self.inner.clone())
    }

    pub fn figures(&self) -> &ClientFigures {
        &self.inner.figures
    }

    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Acquire)
    }

    /// Idle connections parked now: hyper's buffers freed, only the socket and a
    /// small task left until the client sends again.
    pub fn parked(&self) -> usize {
        self.inner.parked.load(Ordering::Relaxed)
    }

    /// Open connections with work left: those not closed already and lingering.
    pub fn unfinished(&self) -> usize {
        let lingering = self.inner.lingering.load(Ordering::Acquire);
        self.open().saturating_sub(lingering)
    }

    /// Resolves when no connection is open.
    pub async fn wait_zero(&self) {
        loop {
            let notified = self.inner.zero.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Tracked {
    pub fn figures(&self) -> Arc<ClientFigures> {
        self.0.figures.clone()
    }

    /// Counts the connection parked until the guard drops.
    pub fn park(&self) -> Parked<'_> {
        self.0.parked.fetch_add(1, Ordering::Relaxed);
        Parked(&self.0.parked)
    }
}

impl Tracked {
    /// Counts the connection lingering until the guard drops.
    pub fn linger(&self) -> Lingering<'_> {
        self.0.lingering.fetch_add(1, Ordering::AcqRel);
        Lingering(&self.0.lingering)
    }
}

/// A lingering close; dropping it counts the connection no longer lingering. Dropped
/// before the connection's [`Tracked`], so a connection is never counted lingering
/// and not open.
#[derive(Debug)]
pub struct Lingering<'a>(&'a AtomicUsize);

impl Drop for Lingering<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A parked connection; dropping it counts the connection no longer parked (woken,
/// or closing).
#[derive(Debug)]
pub struct Parked<'a>(&'a AtomicUsize);

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.zero.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_zero_resolves_when_the_last_connection_closes() {
        let t = Tracker::default();
        let a = t.track();
        let b = t.track();
        let waiter = tokio::spawn({
            let t = t.clone();
            async move { t.wait_zero().await }
        });
        drop(a);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        waiter.await.unwrap();
        assert_eq!(t.open(), 0);
    }

    #[test]
    fn a_connection_counts_as_parked_while_its_guard_lives() {
        let t = Tracker::default();
        let a = t.track();
        let b = t.track();
        let parked = a.park();
        assert_eq!((t.open(), t.parked()), (2, 1));
        let again = b.park();
        assert_eq!(t.parked(), 2);
        drop(parked);
        assert_eq!(t.parked(), 1, "woken");
        drop(again);
        drop((a, b));
        assert_eq!((t.open(), t.parked()), (0, 0));
    }

    #[tokio::test]
    async fn the_drain_wakes_every_watcher_already_waiting() {
        let (signal, watch) = channel();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let mut w = watch.clone();
                tokio::spawn(async move { w.draining().await })
            })
            .collect();
        // Every watcher is registered (polled once, pending) before the signal.
        let registered = || lock(&watch.0.waiters).len();
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while registered() < 3 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("every watcher registered");
        signal.start();
        for w in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(5), w)
                .await
                .expect("woken")
                .unwrap();
        }
        assert!(watch.is_draining());
        assert_eq!(registered(), 0);
    }

    #[tokio::test]
    async fn a_dropped_signal_ends_the_wait_and_a_dropped_wait_leaves_nothing() {
        let (signal, mut watch) = channel();
        {
            let mut w = watch.clone();
            let mut fut = std::pin::pin!(w.draining());
            let mut cx = Context::from_waker(Waker::noop());
            assert!(fut.as_mut().poll(&mut cx).is_pending());
            assert!(fut.as_mut().poll(&mut cx).is_pending());
            assert_eq!(lock(&watch.0.waiters).len(), 1, "registered once");
        }
        assert_eq!(lock(&watch.0.waiters).len(), 0, "removed when dropped");
        drop(signal);
        tokio::time::timeout(std::time::Duration::from_secs(5), watch.draining())
            .await
            .expect("resolved");
    }

    #[tokio::test]
    async fn drain_watch_sees_the_signal() {
        let (signal, mut watch) = channel();
        assert!(!watch.is_draining());
        signal.start();
        watch.draining().await;
        assert!(watch.is_draining());
    }
}
