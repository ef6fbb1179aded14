//! A deadline that a hot task looks at on every wake-up, without re-registering.
//!
//! Each poll of a tokio `Sleep` registers the task's waker again: a
//! compare-and-swap pair in its `AtomicWaker`, and ~100 instructions. Once
//! registered for a deadline, the waker stays so until the timer fires or is
//! reset, and a task's waker does not change between polls; so [`Timer`] polls
//! once after each reset and otherwise asks `Sleep::is_elapsed`, a load. The
//! client connection task and a plain HTTP/1 upstream exchange wake about twice
//! per request each.
//!
//! [`StallDeadline`] limits one wait at a time (a write that would block, the next
//! piece of a body). Also the process's clock base, for instants kept in atomics as µs.

use std::ops::DerefMut;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::Context;

use tokio::time::{Instant, Sleep};

/// A fixed instant early in the process: times kept in atomics are µs since it.
pub fn clock_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// `at` as µs since [`clock_base`] (0 for anything before it).
pub fn micros_since_base(at: Instant) -> u64 {
    let d = at.saturating_duration_since(clock_base());
    // Not `as_micros`, a u128 division.
    d.as_secs() * 1_000_000 + u64::from(d.subsec_micros())
}

pub fn instant_from_micros(micros: u64) -> Instant {
    clock_base() + std::time::Duration::from_micros(micros)
}

pub struct Timer<P> {
    sleep: Pin<P>,
    /// The task's waker is registered for the current deadline.
    registered: bool,
}

impl<P: DerefMut<Target = Sleep>> Timer<P> {
    pub fn new(sleep: Pin<P>) -> Self {
        Timer {
            sleep,
            registered: false,
        }
    }

    pub fn reset(&mut self, at: Instant) {
        self.sleep.as_mut().reset(at);
        self.registered = false;
    }

    pub fn deadline(&self) -> Instant {
        self.sleep.deadline()
    }

    /// Whether the deadline has passed; registers the task's waker first if it is
    /// not registered for this deadline yet. The waker registered is that of the
    /// first task to look after a reset: another task must reset before looking.
    pub fn poll_due(&mut self, cx: &mut Context<'_>) -> bool {
        if self.registered && !self.sleep.is_elapsed() {
            return false;
        }
        self.registered = true;
        // Outside tokio's cooperative budget: a `Sleep` polled by a task that has
        // spent it answers `Pending` without registering the waker (or, the first
        // time, its timer), and this poll is the only one until the next reset.
        let mut sleep = tokio::task::unconstrained(self.sleep.as_mut());
        Pin::new(&mut sleep).poll(cx).is_ready()
    }
}

/// A limit on how long one wait may last: a write that would block, the next piece
/// of a body. The deadline starts with a wait and is cleared by progress. Its timer is
/// made on the first wait and reset for each later one: a slow peer waits many times,
/// and each wait would otherwise allocate and register a timer of its own.
#[derive(Debug, Default)]
pub struct StallDeadline {
    sleep: Option<Pin<Box<Sleep>>>,
    /// A wait is on, and `sleep` is set for it.
    waiting: bool,
}

impl StallDeadline {
    /// Progress: the next wait gets the whole limit again.
    pub fn progressed(&mut self) {
        self.waiting = false;
    }

    /// Still waiting: whether the wait has lasted `limit` (`0`: no limit). Registers
    /// the task to be woken when it will have.
    pub fn expired(&mut self, limit: std::time::Duration, cx: &mut Context<'_>) -> bool {
        if limit.is_zero() {
            return false;
        }
        let sleep = match &mut self.sleep {
            Some(sleep) if !self.waiting => {
                sleep.as_mut().reset(Instant::now() + limit);
                sleep
            }
            Some(sleep) => sleep,
            None => self.sleep.insert(Box::pin(tokio::time::sleep(limit))),
        };
        self.waiting = true;
        sleep.as_mut().poll(cx).is_ready()
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    use std::task::{Poll, Wake, Waker};
    use std::time::Duration;

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Relaxed);
        }
    }

    /// Spends the task's cooperative budget, as a poll that did much I/O first does.
    fn spend_budget(cx: &mut Context<'_>) {
        while let Poll::Ready(restore) = tokio::task::coop::poll_proceed(cx) {
            restore.made_progress();
        }
    }

    /// Looks at `t`, not yet due, from a task that has spent its budget.
    async fn first_look_out_of_budget<P: DerefMut<Target = Sleep>>(t: &mut Timer<P>) {
        poll_fn(|cx| {
            spend_budget(cx);
            assert!(!t.poll_due(cx), "not due yet");
            Poll::Ready(())
        })
        .await;
    }

    /// Waits (paused time) until `t` is due, looking at it on every wake-up as a
    /// task would; gives up after `limit`.
    async fn until_due<P: DerefMut<Target = Sleep>>(t: &mut Timer<P>, limit: Duration) {
        let looked = poll_fn(|cx| {
            if t.poll_due(cx) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        let _ = tokio::time::timeout(limit, looked).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_first_looked_at_by_a_task_out_of_budget_still_wakes_it() {
        let start = Instant::now();
        let mut t = Timer::new(Box::pin(tokio::time::sleep_until(
            start + Duration::from_secs(1),
        )));
        first_look_out_of_budget(&mut t).await;
        until_due(&mut t, Duration::from_secs(10)).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(1),
            "woken at the deadline"
        );

        // Reset after firing, looked at first by a task out of budget again (an
        // upstream connection's next request, after a large request body).
        t.reset(Instant::now() + Duration::from_secs(1));
        first_look_out_of_budget(&mut t).await;
        until_due(&mut t, Duration::from_secs(10)).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(2),
            "woken at the new deadline"
        );
    }

    #[test]
    fn instants_kept_as_micros_come_back_to_the_microsecond() {
        let base = clock_base();
        for micros in [0, 1, 999_999, 1_000_000, 86_400_000_000 + 123_456] {
            let at = base + Duration::from_micros(micros);
            assert_eq!(micros_since_base(at), micros);
            assert_eq!(instant_from_micros(micros_since_base(at)), at);
        }
        // Sub-microsecond parts are dropped, never rounded up.
        let at = base + Duration::from_nanos(1_999);
        assert_eq!(micros_since_base(at), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_timer_looked_at_without_polling_still_wakes_and_comes_due() {
        let wakes = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let start = Instant::now();
        let mut t = Timer::new(Box::pin(tokio::time::sleep_until(
            start + Duration::from_secs(1),
        )));
        assert!(!t.poll_due(&mut cx), "not due yet");
        assert!(!t.poll_due(&mut cx), "still not due, and not polled again");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            wakes.0.load(Relaxed),
            1,
            "the one registration woke the task"
        );
        assert!(t.poll_due(&mut cx), "due once it fired");

        // After a reset, the next task to look is the one woken (a plain HTTP/1
        // upstream connection serves a different client's task each request).
        let other = Arc::new(Count(AtomicUsize::new(0)));
        let other_waker = Waker::from(other.clone());
        let mut other_cx = Context::from_waker(&other_waker);
        t.reset(Instant::now() + Duration::from_secs(1));
        assert_eq!(t.deadline(), start + Duration::from_millis(2500));
        assert!(!t.poll_due(&mut other_cx));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            other.0.load(Relaxed),
            1,
            "the task that looked after the reset"
        );
        assert_eq!(wakes.0.load(Relaxed), 1, "not the one before it");
        assert!(t.poll_due(&mut other_cx));
    }

    /// A wait that lasts the limit expires; progress gives the next wait the whole
    /// limit again, on the same timer.
    #[tokio::test(start_paused = true)]
    async fn a_stall_deadline_runs_per_wait() {
        let mut d = StallDeadline::default();
        async fn expired(d: &mut StallDeadline) -> bool {
            poll_fn(|cx| Poll::Ready(d.expired(Duration::from_secs(1), cx))).await
        }
        assert!(!expired(&mut d).await);
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(
            !expired(&mut d).await,
            "the same wait, not yet at the limit"
        );
        d.progressed();
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(!expired(&mut d).await, "a new wait starts afresh");
        tokio::time::advance(Duration::from_millis(600)).await;
        assert!(!expired(&mut d).await);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(expired(&mut d).await, "1.1s into this wait");
        assert!(!d.expired(Duration::ZERO, &mut Context::from_waker(Waker::noop())));
    }
}
