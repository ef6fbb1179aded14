//! The idle list of one pool: most-recent-first reuse, a cap, and expiry.
//!
//! Pure bookkeeping over `Instant`s, no I/O, so the rules can be tested with fake
//! connections (see the property test below). Closing what it hands back is the
//! caller's job: every method that removes entries returns them.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// Anything the idle list can hold.
pub trait Keyed {
    fn key(&self) -> u64;
}

#[derive(Debug)]
pub struct IdleEntry<C> {
    pub conn: C,
    /// The earliest the upstream may have started counting it idle (its answer began
    /// to arrive): what expiry and reuse go by.
    pub idle_since: Instant,
    /// The latest it may have (holdfast had read the whole answer): an upstream close
    /// is learned from the idle age since this, so a learned timeout errs short.
    pub settled_at: Instant,
    pub expires_at: Instant,
}

impl<C> IdleEntry<C> {
    pub fn idle_age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.idle_since)
    }

    /// The idle age at which the upstream closed it, taken short (see `settled_at`).
    pub fn closed_age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.settled_at)
    }
}

/// Idle connections, oldest at the front, most recent at the back.
#[derive(Debug)]
pub struct IdleList<C> {
    entries: VecDeque<IdleEntry<C>>,
}

impl<C> Default for IdleList<C> {
    fn default() -> Self {
        IdleList {
            entries: VecDeque::new(),
        }
    }
}

/// Which idle connection a request may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// The most recent one, whatever its idle age.
    MostRecent,
    /// The most recent one only if it went idle at most this long ago (requests that
    /// cannot be retried avoid connections near the upstream's idle timeout).
    IdleAtMost(Duration),
}

impl<C: Keyed> IdleList<C> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Adds a connection that just finished a request, counted idle since `idle_since`
    /// (its answer began to arrive) and read in full at `settled_at`; returns the
    /// oldest one if the list is over `cap`.
    pub fn push(
        &mut self,
        conn: C,
        idle_since: Instant,
        settled_at: Instant,
        expires_at: Instant,
        cap: usize,
    ) -> Option<C> {
        // Later times may be listed already: one read by another worker's check-in
        // before this one's, or a connection whose answer began later (this one's
        // may have been long, or read by a slow client). Go past those, keeping the
        // list ordered (`drain_idle_since` and `take` rely on it).
        let at = self.entries.len()
            - self
                .entries
                .iter()
                .rev()
                .take_while(|e| e.idle_since > idle_since)
                .count();
        self.entries.insert(
            at,
            IdleEntry {
                conn,
                idle_since,
                settled_at,
                expires_at,
            },
        );
        if self.entries.len() > cap {
            return self.entries.pop_front().map(|e| e.conn);
        }
        None
    }

    /// Takes the most recent connection allowed by `take`; expired ones met on the way
    /// are moved to `expired` for the caller to close.
    pub fn take(&mut self, now: Instant, take: Take, expired: &mut Vec<C>) -> Option<IdleEntry<C>> {
        while let Some(back) = self.entries.back() {
            if back.expires_at <= now {
                expired.extend(self.entries.pop_back().map(|e| e.conn));
                continue;
            }
            if let Take::IdleAtMost(max) = take
                && back.idle_age(now) > max
            {
                return None;
            }
            return self.entries.pop_back();
        }
        None
    }

    /// Removes one connection by key (it closed while idle).
    pub fn remove(&mut self, key: u64) -> Option<IdleEntry<C>> {
        let pos = self.entries.iter().position(|e| e.conn.key() == key)?;
        self.entries.remove(pos)
    }

    /// Removes the oldest connection, to make room for a new one.
    pub fn pop_oldest(&mut self) -> Option<C> {
        self.entries.pop_front().map(|e| e.conn)
    }

    /// Removes every connection expired at `now`.
    pub fn drain_expired(&mut self, now: Instant) -> Vec<C> {
        let mut out = Vec::new();
        let mut kept = VecDeque::with_capacity(self.entries.len());
        for e in self.entries.drain(..) {
            if e.expires_at <= now {
                out.push(e.conn);
            } else {
                kept.push_back(e);
            }
        }
        self.entries = kept;
        out
    }

    /// Removes every connection idle since `since` or earlier: when one of that age
    /// turned out dead, the older ones likely are too (an upstream restart kills all).
    pub fn drain_idle_since(&mut self, since: Instant) -> Vec<C> {
        let split = self
            .entries
            .iter()
            .position(|e| e.idle_since > since)
            .unwrap_or(self.entries.len());
        self.entries.drain(..split).map(|e| e.conn).collect()
    }

    /// Removes everything.
    pub fn drain_all(&mut self) -> Vec<C> {
        self.entries.drain(..).map(|e| e.conn).collect()
    }

    /// Brings every expiry forward to at most `idle_since + timeout`.
    pub fn cap_expiry(&mut self, timeout: Duration) {
        for e in &mut self.entries {
            e.expires_at = e.expires_at.min(e.idle_since + timeout);
        }
    }

    pub fn next_expiry(&self) -> Option<Instant> {
        self.entries.iter().map(|e| e.expires_at).min()
    }

    pub fn iter(&self) -> impl Iterator<Item = &IdleEntry<C>> {
        self.entries.iter()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    struct Fake(u64);

    impl Keyed for Fake {
        fn key(&self) -> u64 {
            self.0
        }
    }

    #[test]
    fn most_recent_first_and_capped() {
        let t0 = Instant::now();
        let mut l = IdleList::default();
        let exp = t0 + Duration::from_secs(10);
        assert!(l.push(Fake(1), t0, t0, exp, 2).is_none());
        assert!(l.push(Fake(2), t0, t0, exp, 2).is_none());
        assert_eq!(l.push(Fake(3), t0, t0, exp, 2), Some(Fake(1)));
        let mut expired = Vec::new();
        assert_eq!(
            l.take(t0, Take::MostRecent, &mut expired).unwrap().conn,
            Fake(3)
        );
        assert_eq!(
            l.take(t0, Take::MostRecent, &mut expired).unwrap().conn,
            Fake(2)
        );
        assert!(expired.is_empty());
    }

    #[test]
    fn idle_age_limit_refuses_old_connections() {
        let t0 = Instant::now();
        let mut l = IdleList::default();
        l.push(Fake(1), t0, t0, t0 + Duration::from_secs(10), 8);
        let later = t0 + Duration::from_secs(2);
        let mut expired = Vec::new();
        assert!(
            l.take(
                later,
                Take::IdleAtMost(Duration::from_secs(1)),
                &mut expired
            )
            .is_none()
        );
        assert_eq!(l.len(), 1, "refused, not removed");
        assert!(l.take(later, Take::MostRecent, &mut expired).is_some());
    }

    #[test]
    fn evidence_spreads_to_older_connections() {
        let t0 = Instant::now();
        let mut l = IdleList::default();
        for i in 0..4 {
            l.push(
                Fake(i),
                t0 + Duration::from_secs(i),
                t0 + Duration::from_secs(i),
                t0 + Duration::from_secs(100),
                8,
            );
        }
        let gone = l.drain_idle_since(t0 + Duration::from_secs(1));
        assert_eq!(gone, vec![Fake(0), Fake(1)]);
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn a_check_in_listed_late_takes_its_place_by_time() {
        // Two workers read the clock, then list their connections in the other order.
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut l = IdleList::default();
        l.push(Fake(0), t0, t0, t0 + s(100), 8);
        l.push(Fake(2), t0 + s(2), t0 + s(2), t0 + s(100), 8);
        l.push(Fake(1), t0 + s(1), t0 + s(1), t0 + s(100), 8);
        assert_eq!(
            l.iter().map(|e| e.conn.0).collect::<Vec<_>>(),
            [0, 1, 2],
            "oldest first"
        );
        // Evidence against connections idle since t0+1 s spares the later one.
        assert_eq!(l.drain_idle_since(t0 + s(1)), vec![Fake(0), Fake(1)]);
        let mut expired = Vec::new();
        assert_eq!(
            l.take(t0 + s(3), Take::MostRecent, &mut expired)
                .unwrap()
                .conn,
            Fake(2)
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push,
        /// A check-in whose answer began this many ms ago.
        PushSettled(u64),
        Take(bool),
        Remove(u64),
        Advance(u64),
        Expire,
        Spread(u64),
        Cap(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Push),
            (0u64..2000).prop_map(Op::PushSettled),
            any::<bool>().prop_map(Op::Take),
            (0u64..40).prop_map(Op::Remove),
            (0u64..3000).prop_map(Op::Advance),
            Just(Op::Expire),
            (0u64..3000).prop_map(Op::Spread),
            (1u64..3000).prop_map(Op::Cap),
        ]
    }

    proptest! {
        /// No connection is handed out twice, none past its expiry, none is lost
        /// (every one pushed is handed out, removed or returned for closing exactly
        /// once), and the cap holds.
        #[test]
        fn idle_list_invariants(ops in proptest::collection::vec(op(), 1..200)) {
            let timeout = Duration::from_millis(1000);
            let cap = 5;
            let mut now = Instant::now();
            let mut l = IdleList::default();
            let mut inside: HashSet<u64> = HashSet::new();
            let mut next_id = 0u64;
            for op in ops {
                match op {
                    Op::Push => {
                        next_id += 1;
                        inside.insert(next_id);
                        if let Some(evicted) = l.push(Fake(next_id), now, now, now + timeout, cap) {
                            prop_assert!(inside.remove(&evicted.0));
                        }
                    }
                    Op::PushSettled(ms) => {
                        next_id += 1;
                        inside.insert(next_id);
                        let since = now.checked_sub(Duration::from_millis(ms)).unwrap_or(now);
                        if let Some(evicted) = l.push(Fake(next_id), since, now, since + timeout, cap) {
                            prop_assert!(inside.remove(&evicted.0));
                        }
                    }
                    Op::Take(strict) => {
                        let take = if strict { Take::IdleAtMost(Duration::from_millis(300)) } else { Take::MostRecent };
                        let mut expired = Vec::new();
                        let got = l.take(now, take, &mut expired);
                        for e in expired {
                            prop_assert!(inside.remove(&e.0), "expired twice");
                        }
                        if let Some(e) = got {
                            prop_assert!(e.expires_at > now, "handed out past expiry");
                            prop_assert!(
                                l.iter().all(|o| o.idle_since <= e.idle_since),
                                "a more recently idle connection was passed over"
                            );
                            if strict {
                                prop_assert!(e.idle_age(now) <= Duration::from_millis(300));
                            }
                            prop_assert!(inside.remove(&e.conn.0), "handed out twice");
                        }
                    }
                    Op::Remove(k) => {
                        if let Some(e) = l.remove(k) {
                            prop_assert!(inside.remove(&e.conn.0));
                        }
                    }
                    Op::Advance(ms) => now += Duration::from_millis(ms),
                    Op::Expire => {
                        for c in l.drain_expired(now) {
                            prop_assert!(inside.remove(&c.0));
                        }
                        prop_assert!(l.next_expiry().is_none_or(|t| t > now));
                    }
                    Op::Spread(ms) => {
                        let since = now.checked_sub(Duration::from_millis(ms)).unwrap_or(now);
                        for c in l.drain_idle_since(since) {
                            prop_assert!(inside.remove(&c.0));
                        }
                        prop_assert!(l.iter().all(|e| e.idle_since > since));
                    }
                    Op::Cap(ms) => {
                        l.cap_expiry(Duration::from_millis(ms));
                        prop_assert!(l.iter().all(|e| e.expires_at <= e.idle_since + Duration::from_millis(ms)));
                    }
                }
                prop_assert!(l.len() <= cap);
                prop_assert_eq!(l.len(), inside.len(), "a connection leaked or vanished");
                let entries: Vec<_> = l.iter().collect();
                prop_assert!(
                    entries.windows(2).all(|w| w[0].idle_since <= w[1].idle_since),
                    "not ordered by idle_since"
                );
                prop_assert!(entries.iter().all(|e| e.settled_at >= e.idle_since));
            }
        }
    }
}
