//! HTTP/2: `send_timeout` for one stream whose client grants no window.
//!
//! On HTTP/1 a client that stops reading stalls the socket's writes, and `ClientIo`
//! cuts a write stalled past `send_timeout`. On HTTP/2 one stream's window can stay
//! closed while the others (and so the socket) flow: hyper takes a chunk of the
//! response body, then waits for window to send it and polls the body no more, so
//! neither the body's deadlines (`read_idle`, `total`) nor the socket's are ever
//! looked at, and the upstream connection stays checked out for as long as the client
//! keeps the connection open.
//!
//! So each stream's task (hyper spawns one per stream, through [`StreamExec`]) carries
//! a [`StreamWatch`]: the response body notes each poll in it (a load and a store, no
//! lock, no clock reading), and whether the last poll handed hyper a piece it still
//! holds. The connection task, which looks at a busy HTTP/2 connection every
//! `BUSY_RECHECK` anyway, goes over the connection's watched streams then
//! ([`Streams::cut_stalled`], one lock per look): a stream whose body has not been polled since
//! it handed over a piece, for `send_timeout`, is cut. Its task is woken and drops
//! hyper's stream future: h2 resets the stream (`RST_STREAM`, `CANCEL`), the body is
//! dropped and closes its upstream connection (counted as a timeout, outcome
//! `send_timeout`); the other streams go on. No timer and no task per request: a
//! stream's task (hyper's own) carries one `Arc`, and a stream whose response has a
//! body takes one lock, to be listed.
//!
//! The unit of progress is a piece taken: hyper holds a whole chunk until the window
//! has taken it, so a watched body hands chunks over in pieces of at most
//! [`PIECE`] bytes, and a client that reads that much per `send_timeout` is not cut.
//! A body's last piece is watched too, and so is holdfast's own answer (a 404, a
//! 502): hyper polls a body before it waits for window, and holds the piece, and the
//! body, until the window takes some of it. Once h2 took it (some of it may still wait
//! in h2), the stream's task ends and the connection's own rules apply.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::time::Instant;

/// Largest piece of a response body handed to hyper at a time on a watched stream:
/// HTTP/2's default frame size.
pub(crate) const PIECE: usize = 16 * 1024;

/// One stream's response body, as the connection task sees it.
#[derive(Debug, Default)]
pub(crate) struct StreamWatch {
    /// Polls of the body, times two, plus one when the last poll handed hyper a piece
    /// (which it holds until the stream's window takes it, polling no more). Written
    /// by the body only, so a load and a store, no read-modify-write.
    progress: AtomicU64,
    /// The connection task cut the stream.
    cut: AtomicBool,
    /// The stream task's, to wake it when cut.
    waker: AtomicWaker,
}

impl StreamWatch {
    /// The body was polled; `handed`: it gave hyper a piece (not the end).
    pub(crate) fn polled(&self, handed: bool) {
        let n = self.progress.load(Ordering::Relaxed) >> 1;
        self.progress.store(
            (n.wrapping_add(1) << 1) | u64::from(handed),
            Ordering::Relaxed,
        );
    }

    /// The stream was cut for `send_timeout`.
    pub(crate) fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        self.waker.wake();
    }
}

thread_local! {
    /// The watch of the stream task being polled on this thread.
    static CURRENT: Cell<Option<Arc<StreamWatch>>> = const { Cell::new(None) };
}

/// The watch of the HTTP/2 stream whose task is running (the service's future runs
/// inside it); `None` outside one, or when the listener has no `send_timeout`.
pub(crate) fn current() -> Option<Arc<StreamWatch>> {
    CURRENT.with(|c| {
        let w = c.take();
        let found = w.clone();
        c.set(w);
        found
    })
}

/// hyper's HTTP/2 server spawns each stream's task through this: with a
/// `send_timeout`, the task carries a [`StreamWatch`] and ends when it is cut.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamExec {
    watch: bool,
}

impl StreamExec {
    pub(crate) fn new(send_timeout: Duration) -> Self {
        StreamExec {
            watch: !send_timeout.is_zero(),
        }
    }
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        if self.watch {
            tokio::spawn(Watched {
                fut: Some(fut),
                watch: Some(Arc::default()),
                registered: false,
            });
        } else {
            tokio::spawn(fut);
        }
    }
}

pin_project_lite::pin_project! {
    /// A stream's task: hyper's future, dropped when the watch says cut. `watch` is
    /// lent to [`CURRENT`] while `fut` is polled.
    struct Watched<F> {
        #[pin]
        fut: Option<F>,
        watch: Option<Arc<StreamWatch>>,
        registered: bool,
    }
}

impl<F: Future<Output = ()>> Future for Watched<F> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let Some(watch) = this.watch.take() else {
            return Poll::Ready(());
        };
        if !*this.registered {
            // A tokio task's waker is the same on every poll.
            watch.waker.register(cx.waker());
            *this.registered = true;
        }
        if watch.is_cut() {
            // Drops hyper's stream: h2 resets it, the body closes its upstream.
            this.fut.set(None);
            return Poll::Ready(());
        }
        let Some(fut) = this.fut.as_mut().as_pin_mut() else {
            return Poll::Ready(());
        };
        let _lent = Lent {
            outer: CURRENT.replace(Some(watch)),
            home: this.watch,
        };
        fut.poll(cx)
    }
}

/// A stream's watch lent to [`CURRENT`]: given back when dropped, a panic included.
struct Lent<'a> {
    outer: Option<Arc<StreamWatch>>,
    home: &'a mut Option<Arc<StreamWatch>>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        *self.home = CURRENT.replace(self.outer.take());
    }
}

/// A watched stream of a connection, with what the connection task last saw of it.
#[derive(Debug)]
pub(crate) struct Listed {
    watch: Arc<StreamWatch>,
    seen: u64,
    /// When `seen` was first seen.
    since: Instant,
}

/// The watched streams of one connection.
#[derive(Debug, Default)]
pub(crate) struct Streams(Mutex<List>);

#[derive(Debug, Default)]
struct List {
    streams: Vec<Listed>,
    /// Ended streams are forgotten when the list reaches this length, as well as at
    /// each look: a busy connection may end thousands of streams between two looks.
    prune_at: usize,
}

/// The least `List::prune_at`.
const PRUNE_AT: usize = 64;

impl Streams {
    /// Lists a stream whose response body is about to be taken by hyper.
    pub(crate) fn list(&self, watch: Arc<StreamWatch>, now: Instant) {
        let seen = watch.progress.load(Ordering::Relaxed);
        let mut list = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if list.streams.len() >= list.prune_at.max(PRUNE_AT) {
            list.streams.retain(|s| Arc::strong_count(&s.watch) > 1);
            list.prune_at = 2 * list.streams.len();
        }
        list.streams.push(Listed {
            watch,
            seen,
            since: now,
        });
    }

    /// Cuts each listed stream whose body has held a piece, untaken, for `limit`
    /// (as last seen by the previous look: at most one look's interval more); forgets
    /// streams that ended. Returns how many were cut.
    pub(crate) fn cut_stalled(&self, limit: Duration, now: Instant) -> usize {
        let mut list = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut cut = 0;
        list.streams.retain_mut(|s| {
            // Only the list holds it: the stream's task has ended.
            if Arc::strong_count(&s.watch) == 1 {
                return false;
            }
            let progress = s.watch.progress.load(Ordering::Relaxed);
            if progress != s.seen {
                s.seen = progress;
                s.since = now;
                return true;
            }
            if progress & 1 == 0 || now.saturating_duration_since(s.since) < limit {
                return true;
            }
            s.watch.cut();
            cut += 1;
            false
        });
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_piece_held_untaken_for_the_limit_is_cut() {
        let streams = Streams::default();
        let t0 = Instant::now();
        let limit = Duration::from_secs(1);
        let (held, waiting, moving) = (
            Arc::new(StreamWatch::default()),
            Arc::new(StreamWatch::default()),
            Arc::new(StreamWatch::default()),
        );
        for w in [&held, &waiting, &moving] {
            streams.list(w.clone(), t0);
        }
        let ended = Arc::new(StreamWatch::default());
        streams.list(ended.clone(), t0);
        drop(ended);
        held.polled(true);
        // The body waits for its upstream: hyper polls it, it says `Pending`.
        waiting.polled(false);
        moving.polled(true);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(
            streams.cut_stalled(limit, at(250)),
            0,
            "progress since listed"
        );
        assert_eq!(
            streams.0.lock().unwrap().streams.len(),
            3,
            "the ended one forgotten"
        );
        moving.polled(true);
        assert_eq!(streams.cut_stalled(limit, at(1000)), 0, "held for 750 ms");
        moving.polled(true);
        assert_eq!(streams.cut_stalled(limit, at(1250)), 1);
        assert!(held.is_cut() && !waiting.is_cut() && !moving.is_cut());
        assert_eq!(
            streams.0.lock().unwrap().streams.len(),
            2,
            "the cut one forgotten"
        );
        // Its piece taken, the body waits for its upstream (`read_idle` bounds that).
        moving.polled(false);
        assert_eq!(streams.cut_stalled(limit, at(5000)), 0);
        assert!(!waiting.is_cut() && !moving.is_cut());
    }

    #[test]
    fn ended_streams_are_forgotten_as_the_list_grows() {
        let streams = Streams::default();
        let now = Instant::now();
        let open: Vec<_> = (0..10).map(|_| Arc::new(StreamWatch::default())).collect();
        for w in &open {
            streams.list(w.clone(), now);
        }
        for _ in 0..1000 {
            streams.list(Arc::default(), now);
        }
        let len = streams.0.lock().unwrap().streams.len();
        assert!(len <= 2 * PRUNE_AT, "{len} listed");
        assert_eq!(streams.cut_stalled(Duration::from_secs(1), now), 0);
        assert_eq!(streams.0.lock().unwrap().streams.len(), open.len());
    }

    /// A cut stream's task wakes and drops hyper's future; the service's future sees
    /// its stream's watch while it runs, and no other.
    #[tokio::test]
    async fn a_cut_stream_task_drops_its_future() {
        struct Dropped(Arc<AtomicBool>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let guard = Dropped(dropped.clone());
        hyper::rt::Executor::execute(&StreamExec::new(Duration::from_secs(1)), async move {
            let _guard = guard;
            let _ = tx.send(current().expect("the stream's watch"));
            std::future::pending::<()>().await;
        });
        let watch = rx.await.unwrap();
        assert!(current().is_none(), "outside the stream's task");
        let streams = Streams::default();
        streams.list(watch.clone(), Instant::now());
        watch.polled(true);
        streams.cut_stalled(Duration::ZERO, Instant::now());
        assert_eq!(streams.cut_stalled(Duration::ZERO, Instant::now()), 1);
        // Bounded: the task runs at the next turn.
        for _ in 0..100 {
            if dropped.load(Ordering::Relaxed) {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(
            dropped.load(Ordering::Relaxed),
            "the stream's future dropped"
        );
    }
}
