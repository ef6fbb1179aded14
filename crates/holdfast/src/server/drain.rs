//! The drain signal every listener and client connection watches, and the count of
//! open client connections the process waits on before it exits.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use tokio::sync::{Notify, watch};

/// The process's phase, as client connections see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Running,
    /// Stop accepting; finish what is in flight with `Connection: close`; close idle
    /// connections once they have been quiet for a moment.
    Draining,
}

/// Sends the drain to everyone holding a [`DrainWatch`].
#[derive(Debug)]
pub struct DrainSignal(watch::Sender<Phase>);

/// Watches for the drain.
#[derive(Debug, Clone)]
pub struct DrainWatch(watch::Receiver<Phase>);

pub fn channel() -> (DrainSignal, DrainWatch) {
    let (tx, rx) = watch::channel(Phase::Running);
    (DrainSignal(tx), DrainWatch(rx))
}

impl DrainSignal {
    pub fn start(&self) {
        self.0.send_replace(Phase::Draining);
    }
}

impl DrainWatch {
    pub fn is_draining(&self) -> bool {
        *self.0.borrow() == Phase::Draining
    }

    /// Resolves once the drain has started (at once if it already has).
    ///
    /// # Cancel safety
    /// Cancel safe: it only observes.
    pub async fn draining(&mut self) {
        // The sender lives as long as the server; if it is gone, so is the server.
        let _ = self.0.wait_for(|p| *p == Phase::Draining).await;
    }
}

/// Counts open client connections (including lingering closes), and keeps the
/// figures about client connections that `/metrics` shows.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    inner: Arc<TrackerInner>,
}

#[derive(Debug, Default)]
struct TrackerInner {
    open: AtomicUsize,
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

    #[tokio::test]
    async fn drain_watch_sees_the_signal() {
        let (signal, mut watch) = channel();
        assert!(!watch.is_draining());
        signal.start();
        watch.draining().await;
        assert!(watch.is_draining());
    }
}
