//! The connection budget of one address: `max_connections` slots and the count of
//! open connections. A pool owns one; the pool a reload builds for the same address
//! (its settings changed) shares its predecessor's, so the connections the old pool's
//! requests still hold count against the new limit, and a slot one of them gives back
//! goes to the first request waiting in either pool.
//!
//! The limit can fall below the slots in use (a reload lowers `max_connections`, a
//! FastCGI application says it takes fewer): those beyond it are a debt, repaid by
//! forgetting slots as they come back instead of handing them out.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use tokio::sync::{AcquireError, Semaphore, TryAcquireError};

pub(crate) struct Slots {
    /// Permits: `limit + debt` in all, those not held available.
    sem: Semaphore,
    limit: AtomicUsize,
    /// Permits held beyond `limit`: forgotten as they come back.
    debt: AtomicUsize,
    /// Connections open now (idle, busy and being opened), in every pool sharing this.
    pub(super) open: Arc<AtomicUsize>,
    /// Requests queued for a slot, in every pool sharing this: a slot given back goes
    /// to the first of them, whichever pool it queued in.
    pub(super) waiting: AtomicUsize,
    /// One change of the limit at a time.
    resizing: Mutex<()>,
}

impl Slots {
    pub(super) fn new(limit: usize) -> Arc<Slots> {
        Arc::new(Slots {
            sem: Semaphore::new(limit),
            limit: AtomicUsize::new(limit),
            debt: AtomicUsize::new(0),
            open: Arc::default(),
            waiting: AtomicUsize::new(0),
            resizing: Mutex::new(()),
        })
    }

    pub(super) fn limit(&self) -> usize {
        self.limit.load(Relaxed)
    }

    /// Slots taken (by requests connecting or in use), in every pool sharing this.
    pub(super) fn in_use(&self) -> usize {
        (self.limit.load(Relaxed) + self.debt.load(Relaxed))
            .saturating_sub(self.sem.available_permits())
    }

    /// Takes a slot if one is free at once.
    pub(super) fn try_take(&self) -> Result<SlotHeld<'_>, TryAcquireError> {
        self.sem.try_acquire().map(|p| {
            p.forget();
            SlotHeld(Some(self))
        })
    }

    /// Waits for a slot, first come first served.
    pub(super) async fn take(&self) -> Result<SlotHeld<'_>, AcquireError> {
        let p = self.sem.acquire().await?;
        p.forget();
        Ok(SlotHeld(Some(self)))
    }

    /// A slot comes back: to the next request, or forgotten while the limit is below
    /// the slots in use. One load on the usual path (no debt).
    pub(super) fn give_back(&self) {
        if self.debt.load(Relaxed) != 0
            && self
                .debt
                .fetch_update(Relaxed, Relaxed, |d| d.checked_sub(1))
                .is_ok()
        {
            return;
        }
        self.sem.add_permits(1);
    }

    /// Sets the limit; slots in use beyond a lower one are given back for good.
    pub(super) fn set_limit(&self, limit: usize) {
        let _one = self.resizing.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.limit.load(Relaxed);
        if limit > current {
            let more = limit - current;
            let prev = self
                .debt
                .fetch_update(Relaxed, Relaxed, |d| Some(d.saturating_sub(more)))
                .unwrap_or_else(|d| d);
            self.limit.store(limit, Relaxed);
            self.sem.add_permits(more - prev.min(more));
        } else if limit < current {
            let fewer = current - limit;
            self.limit.store(limit, Relaxed);
            // Owed first, so that a slot given back meanwhile is forgotten, not
            // handed out; then the free ones are forgotten at once and the debt
            // lowered by as many (any repaid meanwhile come back as permits).
            self.debt.fetch_add(fewer, Relaxed);
            let forgotten = self.sem.forget_permits(fewer);
            let prev = self
                .debt
                .fetch_update(Relaxed, Relaxed, |d| Some(d.saturating_sub(forgotten)))
                .unwrap_or_else(|d| d);
            if prev < forgotten {
                self.sem.add_permits(forgotten - prev);
            }
        }
    }

    /// Lowers the limit to `limit` if it is higher.
    pub(super) fn lower_to(&self, limit: usize) {
        if limit < self.limit() {
            self.set_limit(limit);
        }
    }

    /// Slots free now: none, and a request must wait for one.
    pub(super) fn available(&self) -> usize {
        self.sem.available_permits()
    }
}

/// A slot taken and not yet handed to a [`super::PooledConn`]: given back if dropped.
pub(super) struct SlotHeld<'a>(Option<&'a Slots>);

impl SlotHeld<'_> {
    /// Handed to a `PooledConn`, which gives it back when it drops.
    pub(super) fn hand_over(mut self) {
        self.0 = None;
    }
}

impl Drop for SlotHeld<'_> {
    fn drop(&mut self) {
        if let Some(slots) = self.0 {
            slots.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lowering the limit below the slots in use forgets the free ones at once and
    /// the rest as they come back; raising it again first cancels what is still owed.
    #[test]
    fn a_lower_limit_is_reached_as_slots_come_back() {
        let s = Slots::new(3);
        let a = s.try_take().expect("slot");
        let b = s.try_take().expect("slot");
        a.hand_over();
        b.hand_over();
        s.set_limit(1);
        assert_eq!((s.in_use(), s.available()), (2, 0));
        assert!(s.try_take().is_err(), "over the limit: no slot");
        s.give_back();
        assert_eq!((s.in_use(), s.available()), (1, 0), "forgotten, not free");
        s.give_back();
        assert_eq!((s.in_use(), s.available()), (0, 1));
        let c = s.try_take().expect("slot");
        c.hand_over();
        s.set_limit(0);
        s.set_limit(2);
        assert_eq!((s.in_use(), s.available()), (1, 1), "the debt cancelled");
        s.give_back();
        assert_eq!((s.in_use(), s.available(), s.limit()), (0, 2, 2));
    }
}
