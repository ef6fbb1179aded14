//! When a request may be sent again, and how many retries an upstream may take.
//!
//! A retry is safe only when it cannot make the upstream act twice: the method is
//! idempotent (RFC 9110 9.2.2), the client sent an idempotency key, or the request
//! provably never reached the upstream. Everything else gets a 502 saying so.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering::Relaxed};

use http::{HeaderMap, HeaderName, Method};
use tokio::time::Instant;

use crate::config::RetryConfig;

/// What a failure after sending allows for this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Idempotent, or carries `Idempotency-Key` / `X-Idempotency-Key`: may be sent
    /// again after a stale connection swallowed it.
    Safe,
    /// May be sent again only if it provably never left.
    NotSentOnly,
}

impl Replay {
    pub fn classify(method: &Method, headers: &HeaderMap) -> Replay {
        let idempotent = matches!(
            *method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        if idempotent || has_idempotency_key(headers) {
            Replay::Safe
        } else {
            Replay::NotSentOnly
        }
    }
}

/// Up to this many fields, a pass over the names costs less than the two lookups of
/// a custom name (each hashes it: ~150 instructions, a POST's largest cost here).
const SCAN_UP_TO: usize = 16;

fn has_idempotency_key(headers: &HeaderMap) -> bool {
    // Names as constants: a `&str` key is parsed and validated on every lookup.
    const KEY: HeaderName = HeaderName::from_static("idempotency-key");
    const X_KEY: HeaderName = HeaderName::from_static("x-idempotency-key");
    if headers.keys_len() <= SCAN_UP_TO {
        headers.keys().any(|name| *name == KEY || *name == X_KEY)
    } else {
        headers.contains_key(&KEY) || headers.contains_key(&X_KEY)
    }
}

const UNIT: i64 = 1000;

/// Retries allowed per upstream: `budget_ratio` of requests plus
/// `budget_min_per_second`, so retries never become a storm against an upstream
/// that is failing for real (the approach of Finagle and linkerd).
#[derive(Debug)]
pub struct RetryBudget {
    /// Milli-retries available.
    balance: AtomicI64,
    per_request: i64,
    min_per_second: i64,
    cap: i64,
    last_refill: Mutex<Instant>,
}

impl RetryBudget {
    pub fn new(c: &RetryConfig) -> Self {
        let min_per_second = i64::from(c.budget_min_per_second) * UNIT;
        RetryBudget {
            balance: AtomicI64::new(min_per_second),
            // The ratio is validated to 0.0..=1.0, so this fits.
            per_request: (c.budget_ratio * UNIT as f64) as i64,
            min_per_second,
            cap: min_per_second * 10 + 100 * UNIT,
            last_refill: Mutex::new(Instant::now()),
        }
    }

    /// Every request adds its share.
    pub fn deposit(&self) {
        if self.per_request > 0 && self.balance.load(Relaxed) < self.cap {
            self.balance.fetch_add(self.per_request, Relaxed);
        }
    }

    /// Takes one retry if the budget allows it.
    pub fn withdraw(&self) -> bool {
        if self.min_per_second > 0 {
            let mut last = self.last_refill.lock().unwrap_or_else(|p| p.into_inner());
            let elapsed_ns = Instant::now().saturating_duration_since(*last).as_nanos();
            // In u128: no overflow after a long quiet spell with a large floor.
            let per_second = self.min_per_second as u128;
            let refill = per_second * elapsed_ns / 1_000_000_000;
            if refill > 0 {
                // The mark moves by the time those milli-retries took, not to now: the
                // remainder counts towards the next refill instead of being lost.
                let used_ns = (refill * 1_000_000_000).div_ceil(per_second);
                *last +=
                    std::time::Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
                let refill = i64::try_from(refill).unwrap_or(i64::MAX);
                // One atomic update: withdrawals and deposits run beside it, outside
                // the lock, and a load-then-store would undo them.
                let _ = self.balance.fetch_update(Relaxed, Relaxed, |cur| {
                    Some(cur.saturating_add(refill).min(self.cap.max(cur)))
                });
            }
        }
        if self.balance.fetch_sub(UNIT, Relaxed) >= UNIT {
            true
        } else {
            self.balance.fetch_add(UNIT, Relaxed);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_or_keyed_is_safe() {
        let none = HeaderMap::new();
        assert_eq!(Replay::classify(&Method::GET, &none), Replay::Safe);
        assert_eq!(Replay::classify(&Method::PUT, &none), Replay::Safe);
        assert_eq!(Replay::classify(&Method::POST, &none), Replay::NotSentOnly);
        assert_eq!(Replay::classify(&Method::PATCH, &none), Replay::NotSentOnly);
        let mut keyed = HeaderMap::new();
        keyed.insert("idempotency-key", "abc".parse().unwrap());
        assert_eq!(Replay::classify(&Method::POST, &keyed), Replay::Safe);
        let mut keyed = HeaderMap::new();
        keyed.insert("x-idempotency-key", "abc".parse().unwrap());
        assert_eq!(Replay::classify(&Method::POST, &keyed), Replay::Safe);
    }

    #[test]
    fn a_key_is_found_among_few_fields_and_among_many() {
        for fields in [0, 3, SCAN_UP_TO - 1, SCAN_UP_TO + 1, 60] {
            let mut map = HeaderMap::new();
            for i in 0..fields {
                map.insert(
                    HeaderName::try_from(format!("x-field-{i}")).unwrap(),
                    "v".parse().unwrap(),
                );
            }
            assert_eq!(
                Replay::classify(&Method::POST, &map),
                Replay::NotSentOnly,
                "{fields}"
            );
            for key in ["idempotency-key", "x-idempotency-key"] {
                let mut keyed = map.clone();
                keyed.insert(key, "abc".parse().unwrap());
                assert_eq!(
                    Replay::classify(&Method::POST, &keyed),
                    Replay::Safe,
                    "{fields} {key}"
                );
                // A look-alike is not a key.
                let mut other = map.clone();
                other.insert(
                    HeaderName::try_from(format!("{key}s")).unwrap(),
                    "abc".parse().unwrap(),
                );
                assert_eq!(
                    Replay::classify(&Method::POST, &other),
                    Replay::NotSentOnly,
                    "{fields} {key}s"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn budget_allows_ratio_plus_floor() {
        let c = RetryConfig {
            budget_ratio: 0.2,
            budget_min_per_second: 2,
            ..RetryConfig::default()
        };
        let b = RetryBudget::new(&c);
        // The floor: two at once.
        assert!(b.withdraw());
        assert!(b.withdraw());
        assert!(!b.withdraw(), "floor spent");
        // 100 requests earn 20 retries.
        for _ in 0..100 {
            b.deposit();
        }
        let granted = (0..50).filter(|_| b.withdraw()).count();
        assert_eq!(granted, 20);
        // A second later the floor refills.
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        assert!(b.withdraw());
        assert!(b.withdraw());
        assert!(!b.withdraw());
    }

    /// The floor refills at `budget_min_per_second` however often retries are asked
    /// for: asked every 1.9 ms for 10 s with a floor of 10 per second (and no ratio),
    /// about 100 retries are granted beyond the first second's 10, not half of that
    /// (each refill dropped what was left of a millisecond).
    #[tokio::test(start_paused = true)]
    async fn budget_floor_refills_at_its_rate_whatever_the_spacing() {
        let c = RetryConfig {
            budget_ratio: 0.0,
            budget_min_per_second: 10,
            ..RetryConfig::default()
        };
        let b = RetryBudget::new(&c);
        let mut granted = 0;
        for _ in 0..(10_000 * 10 / 19) {
            tokio::time::advance(std::time::Duration::from_micros(1900)).await;
            granted += u32::from(b.withdraw());
        }
        assert!(
            (105..=111).contains(&granted),
            "10 s at 10 per second, plus the 10 to start with: granted {granted}"
        );
    }
}
