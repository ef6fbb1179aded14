//! One task per HTTP/2 upstream connection: hyper's dispatcher and every future it
//! spawns (h2's connection, each request's response and body pipes) run inside it.
//!
//! Why not `TokioExecutor`: hyper's dispatcher opens a request's stream in h2 and then
//! asks h2 whether the connection can take more (`poll_ready`). On a multi-thread
//! runtime, h2's connection task, running beside it on another thread, can read a
//! graceful GOAWAY between the two calls; the second then fails with the GOAWAY, and
//! hyper fails the request with it and drops the stream (hyper#2500), although the
//! stream was opened below the GOAWAY's last-stream-id and its HEADERS go out: the
//! upstream runs the request. A GOAWAY error is otherwise proof that the upstream did
//! not process the request (RFC 9113 6.8), so holdfast sends it again even when it is
//! not idempotent, and a POST ran twice. With frames read only inside this task, never
//! during a poll of the dispatcher, a request that fails with a GOAWAY is one h2
//! refused, as the pool's retry rule assumes.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use futures_util::stream::{FuturesUnordered, StreamExt};

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Futures spawned but not yet taken by the driver, and the driver's waker.
#[derive(Default)]
struct Queue {
    spawned: Vec<Task>,
    waker: Option<Waker>,
}

/// The executor hyper's HTTP/2 client is built with: it hands each future to the
/// connection's [`ConnDriver`].
#[derive(Clone, Default)]
pub struct ConnExec(Arc<Mutex<Queue>>);

impl<F> hyper::rt::Executor<F> for ConnExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let waker = {
            let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
            q.spawned.push(Box::pin(fut));
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Runs a connection's dispatcher and what it spawned, until all of them end: after
/// a graceful GOAWAY the dispatcher ends at once, while h2 still finishes the streams
/// below the last-stream-id. Dropping it ends the connection.
pub struct ConnDriver<D> {
    dispatcher: Option<Pin<Box<D>>>,
    on_dispatcher_end: Option<Box<dyn FnOnce() + Send>>,
    tasks: FuturesUnordered<Task>,
    queue: ConnExec,
}

impl<D: Future<Output = ()>> ConnDriver<D> {
    /// `on_dispatcher_end` runs once, when the dispatcher ends (the connection takes no
    /// new request from then on).
    pub fn new(
        dispatcher: D,
        exec: ConnExec,
        on_dispatcher_end: impl FnOnce() + Send + 'static,
    ) -> Self {
        ConnDriver {
            dispatcher: Some(Box::pin(dispatcher)),
            on_dispatcher_end: Some(Box::new(on_dispatcher_end)),
            tasks: FuturesUnordered::new(),
            queue: exec,
        }
    }

    /// Moves newly spawned futures into the set; registers the waker for more.
    fn take_spawned(&mut self, cx: &Context<'_>) -> bool {
        let mut q = self.queue.0.lock().unwrap_or_else(|p| p.into_inner());
        if !q.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            q.waker = Some(cx.waker().clone());
        }
        let any = !q.spawned.is_empty();
        for t in q.spawned.drain(..) {
            self.tasks.push(t);
        }
        any
    }
}

impl<D: Future<Output = ()>> Future for ConnDriver<D> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let me = &mut *self;
        // Bounded: each round either took new futures (hyper spawns a few per request)
        // or stops.
        loop {
            me.take_spawned(cx);
            if let Some(d) = &mut me.dispatcher
                && d.as_mut().poll(cx).is_ready()
            {
                me.dispatcher = None;
                if let Some(f) = me.on_dispatcher_end.take() {
                    f();
                }
            }
            while let Poll::Ready(Some(())) = me.tasks.poll_next_unpin(cx) {}
            // What the dispatcher or a task spawned just now is polled before sleeping.
            if me.take_spawned(cx) {
                continue;
            }
            return if me.dispatcher.is_none() && me.tasks.is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    #[tokio::test]
    async fn spawned_futures_run_inside_the_driver_and_outlive_the_dispatcher() {
        let exec = ConnExec::default();
        let ran = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let dispatcher = {
            let (exec, ran) = (exec.clone(), ran.clone());
            async move {
                // Spawns a task that ends only after the dispatcher did.
                exec.execute(async move {
                    let _ = rx.await;
                    ran.fetch_add(1, Relaxed);
                });
            }
        };
        let ended = Arc::new(AtomicUsize::new(0));
        let e = ended.clone();
        let mut driver = Box::pin(ConnDriver::new(dispatcher, exec, move || {
            e.fetch_add(1, Relaxed);
        }));
        // The dispatcher ends; the task it spawned keeps the driver going.
        let first = std::future::poll_fn(|cx| Poll::Ready(driver.as_mut().poll(cx))).await;
        assert!(first.is_pending());
        assert_eq!(ended.load(Relaxed), 1);
        assert_eq!(ran.load(Relaxed), 0);
        tx.send(()).unwrap();
        driver.await;
        assert_eq!(ran.load(Relaxed), 1);
        assert_eq!(ended.load(Relaxed), 1);
    }
}
