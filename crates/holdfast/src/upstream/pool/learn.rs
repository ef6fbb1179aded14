//! What one upstream address has told or shown about its keep-alive behaviour, and the
//! effective idle timeout and request cap that follow.
//!
//! Pure: fed with header values and observed closes, no clocks of its own. Learned
//! values only ever make the pool more careful (shorter idle time, fewer requests per
//! connection), are bounded below, and are logged by the caller when they change.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

/// Where the effective idle timeout comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdleSource {
    Config,
    KeepAliveHeader,
    Observed,
}

impl IdleSource {
    pub fn as_str(self) -> &'static str {
        match self {
            IdleSource::Config => "config",
            IdleSource::KeepAliveHeader => "keep_alive_header",
            IdleSource::Observed => "observed",
        }
    }
}

/// The parameters of a `Keep-Alive: timeout=N, max=M` response header (RFC 2068
/// 19.7.1.1; still sent by Apache, Node.js and others).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KeepAliveHint {
    pub timeout_secs: Option<u64>,
    pub max: Option<u64>,
}

impl KeepAliveHint {
    pub fn parse(value: &[u8]) -> KeepAliveHint {
        let mut hint = KeepAliveHint::default();
        let Ok(text) = std::str::from_utf8(value) else {
            return hint;
        };
        for part in text.split(',') {
            let Some((k, v)) = part.split_once('=') else {
                continue;
            };
            let v = v.trim().trim_matches('"').parse::<u64>().ok();
            match k.trim().to_ascii_lowercase().as_str() {
                "timeout" => hint.timeout_secs = v,
                "max" => hint.max = v,
                _ => {}
            }
        }
        hint
    }

    /// `timeout=0` or `timeout=1` leaves no safe time to reuse the connection.
    pub fn forbids_pooling(&self) -> bool {
        self.timeout_secs.is_some_and(|t| t <= 1)
    }
}

/// An idle close counted as "right after the response" when it came this soon: that
/// is a per-connection request limit, not an idle timeout.
pub const PROMPT_CLOSE: Duration = Duration::from_millis(250);
/// Two unasked closes this close together in time whose idle ages differ by more than
/// the time between them (plus [`AGE_TOLERANCE`]) are one event: see
/// [`Learner::on_idle_close_at`].
pub const SAME_EVENT: Duration = Duration::from_millis(100);
/// Scheduling jitter allowed between the ages of closes made by one per-connection rule.
pub const AGE_TOLERANCE: Duration = Duration::from_millis(10);
/// The shortest idle timeout holdfast will learn.
pub const MIN_LEARNED_IDLE: Duration = Duration::from_millis(100);
const SAMPLES: usize = 8;

/// A change worth logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    IdleTimeout(Duration, IdleSource),
    MaxRequests(u64),
}

#[derive(Debug, Clone)]
pub struct Learner {
    enabled: bool,
    /// Whether a prompt close after a steady number of requests is taken as a
    /// per-connection request limit. Not for an application whose limit counts a
    /// worker's requests on whatever connections (php-fpm's `pm.max_requests`): how
    /// many requests a connection gets then depends on what its worker served
    /// before, and two alike would teach a limit down to 1, ending reuse for good.
    request_limits: bool,
    config_idle: Duration,
    header_idle: Option<Duration>,
    observed_idle: Option<Duration>,
    max_requests: Option<u64>,
    idle_close_ages: VecDeque<Duration>,
    prompt_close_requests: VecDeque<u64>,
    /// When the upstream last closed a connection unasked, and its idle age then.
    last_close: Option<(tokio::time::Instant, Duration)>,
    /// The same, for the last close taken as a sample.
    last_sample: Option<(tokio::time::Instant, Duration)>,
}

impl Learner {
    /// A learner; a disabled one keeps the configured idle timeout and learns nothing.
    pub fn new(config_idle: Duration, enabled: bool) -> Self {
        Learner {
            enabled,
            request_limits: true,
            config_idle,
            header_idle: None,
            observed_idle: None,
            max_requests: None,
            idle_close_ages: VecDeque::new(),
            prompt_close_requests: VecDeque::new(),
            last_close: None,
            last_sample: None,
        }
    }

    /// Whether prompt closes may teach a request limit (see `request_limits`).
    #[must_use]
    pub fn with_request_limits(mut self, learn: bool) -> Self {
        self.request_limits = learn;
        self
    }

    /// The idle timeout in force and where it comes from: the shortest of the three.
    pub fn effective_idle(&self) -> (Duration, IdleSource) {
        let mut best = (self.config_idle, IdleSource::Config);
        for (d, src) in [
            (self.header_idle, IdleSource::KeepAliveHeader),
            (self.observed_idle, IdleSource::Observed),
        ] {
            if let Some(d) = d
                && d < best.0
            {
                best = (d, src);
            }
        }
        best
    }

    /// Requests per connection learned from observed closes, if any.
    pub fn learned_max_requests(&self) -> Option<u64> {
        self.max_requests
    }

    /// How long a connection whose answer said `Keep-Alive: timeout=N` may stay idle:
    /// a margin before N, so a request never leaves as the upstream's timer fires (one
    /// RTT and clock skew). `None` when nothing is learned (`timeout<=1` is not pooled).
    pub fn announced_idle(&self, secs: u64) -> Option<Duration> {
        if secs <= 1 || !self.enabled {
            return None;
        }
        let announced = Duration::from_secs(secs);
        let margin = (announced / 8).max(Duration::from_millis(500));
        Some(announced - margin)
    }

    /// The upstream announced `Keep-Alive: timeout=N`: expire a margin before N (see
    /// [`Learner::announced_idle`]). The last word is the address's; each connection
    /// also keeps to what its own answer said (`Pool::checkin`).
    pub fn on_announced_timeout(&mut self, secs: u64) -> Option<Learned> {
        let idle = self.announced_idle(secs)?;
        if self.header_idle == Some(idle) {
            return None;
        }
        let before = self.effective_idle();
        self.header_idle = Some(idle);
        let after = self.effective_idle();
        (after != before).then_some(Learned::IdleTimeout(after.0, after.1))
    }

    /// [`Learner::on_idle_close`] for a close seen at `now`. A rule of the upstream's
    /// own (an idle timeout, a request limit) closes each connection at the same idle
    /// age, whenever it went idle; an upstream restart (or a graceful shutdown closing
    /// every idle connection) closes them all at one instant, whatever their ages and
    /// request counts. Closes nearly at once with ages further apart than the time
    /// between them are one such event and give one sample, not one per connection:
    /// taken one by one, two connections that had each served one request would teach
    /// a request limit of 1 (keep-alive ended for good: learned values never rise),
    /// and idle ones of different ages an idle timeout. A close is looked at beside
    /// the last one and the last sample: of three closes of one event aged 150, 100
    /// and 100 ms, the third matches the second but not the first, the sample.
    pub fn on_idle_close_at(
        &mut self,
        idle_age: Duration,
        requests: u64,
        now: tokio::time::Instant,
    ) -> Option<Learned> {
        let one_event = |(at, age): (tokio::time::Instant, Duration)| {
            let gap = now.saturating_duration_since(at);
            gap < SAME_EVENT && idle_age.abs_diff(age) > gap + AGE_TOLERANCE
        };
        let last = self.last_close.replace((now, idle_age));
        if last.is_some_and(one_event) || self.last_sample.is_some_and(one_event) {
            return None;
        }
        self.last_sample = Some((now, idle_age));
        self.on_idle_close(idle_age, requests)
    }

    /// A connection that has served `requests` requests goes back to the idle list,
    /// after answering a request sent when it had been idle for `survived` (at least;
    /// `None`: it was new). The upstream keeps connections past any smaller count and
    /// idle age, so earlier closes after fewer requests or at a smaller age (an
    /// upstream restart, a network blip) were neither a request limit nor an idle
    /// timeout, and must not be taken together with later ones as if they were.
    /// Called at each check-in, under the pool's lock: a look over two queues of at
    /// most `SAMPLES` entries.
    pub fn on_kept(&mut self, requests: u64, survived: Option<Duration>) {
        // The usual case, every check-in: no close seen, nothing to look over.
        if self.prompt_close_requests.is_empty() && self.idle_close_ages.is_empty() {
            return;
        }
        if self
            .prompt_close_requests
            .iter()
            .any(|&closed_after| closed_after < requests)
        {
            self.prompt_close_requests
                .retain(|&closed_after| closed_after >= requests);
        }
        if let Some(survived) = survived
            && self.idle_close_ages.iter().any(|&age| age < survived)
        {
            self.idle_close_ages.retain(|&age| age >= survived);
        }
    }

    /// The upstream closed a connection that had been idle for `idle_age` after
    /// serving `requests` requests, without saying it would.
    pub fn on_idle_close(&mut self, idle_age: Duration, requests: u64) -> Option<Learned> {
        if !self.enabled {
            return None;
        }
        if idle_age < PROMPT_CLOSE {
            if !self.request_limits {
                return None;
            }
            push_bounded(&mut self.prompt_close_requests, requests);
            // Two connections in a row closed right after the same number of
            // requests: the upstream has a per-connection limit it does not announce.
            let n = self.prompt_close_requests.len();
            if n >= 2 {
                let last = self.prompt_close_requests[n - 1];
                if self.prompt_close_requests[n - 2] == last
                    && self.max_requests.is_none_or(|m| last < m)
                {
                    self.max_requests = Some(last.max(1));
                    return Some(Learned::MaxRequests(last.max(1)));
                }
            }
            return None;
        }
        push_bounded(&mut self.idle_close_ages, idle_age);
        // Three closes at about the same idle age: an unannounced idle timeout.
        let n = self.idle_close_ages.len();
        if n < 3 {
            return None;
        }
        let recent = self.idle_close_ages.iter().skip(n - 3);
        let (lo, hi) = recent.fold((Duration::MAX, Duration::ZERO), |(lo, hi), &d| {
            (lo.min(d), hi.max(d))
        });
        if hi > lo * 2 {
            return None;
        }
        let idle = (lo * 4 / 5).max(MIN_LEARNED_IDLE);
        if self.observed_idle.is_some_and(|o| o <= idle) {
            return None;
        }
        let before = self.effective_idle();
        self.observed_idle = Some(idle);
        let after = self.effective_idle();
        (after != before).then_some(Learned::IdleTimeout(after.0, after.1))
    }
}

fn push_bounded<T>(q: &mut VecDeque<T>, v: T) {
    if q.len() == SAMPLES {
        q.pop_front();
    }
    q.push_back(v);
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn parses_keep_alive_header() {
        let h = KeepAliveHint::parse(b"timeout=8, max=100");
        assert_eq!(
            h,
            KeepAliveHint {
                timeout_secs: Some(8),
                max: Some(100)
            }
        );
        assert_eq!(
            KeepAliveHint::parse(b"Timeout = \"5\""),
            KeepAliveHint {
                timeout_secs: Some(5),
                max: None
            }
        );
        assert_eq!(
            KeepAliveHint::parse(b"garbage,,=,timeout=x"),
            KeepAliveHint::default()
        );
        assert!(KeepAliveHint::parse(b"timeout=1").forbids_pooling());
        assert!(KeepAliveHint::parse(b"timeout=0").forbids_pooling());
        assert!(!KeepAliveHint::parse(b"timeout=2").forbids_pooling());
    }

    #[test]
    fn announced_timeout_expires_a_margin_before() {
        let mut l = Learner::new(S(15), true);
        assert_eq!(
            l.on_announced_timeout(8),
            Some(Learned::IdleTimeout(S(7), IdleSource::KeepAliveHeader))
        );
        assert_eq!(l.effective_idle(), (S(7), IdleSource::KeepAliveHeader));
        assert_eq!(l.on_announced_timeout(8), None, "no news");
        let mut l = Learner::new(S(4), true);
        assert_eq!(
            l.on_announced_timeout(30),
            None,
            "config is already shorter"
        );
        assert_eq!(l.effective_idle(), (S(4), IdleSource::Config));
    }

    #[test]
    fn unannounced_idle_timeout_is_learned_from_three_similar_closes() {
        let mut l = Learner::new(S(15), true);
        assert_eq!(l.on_idle_close(Duration::from_millis(2010), 1), None);
        assert_eq!(l.on_idle_close(Duration::from_millis(2003), 4), None);
        let got = l.on_idle_close(Duration::from_millis(2001), 2);
        assert_eq!(
            got,
            Some(Learned::IdleTimeout(
                Duration::from_millis(2001) * 4 / 5,
                IdleSource::Observed
            ))
        );
        assert_eq!(
            l.learned_max_requests(),
            None,
            "different counts: not a request limit"
        );
    }

    #[test]
    fn scattered_closes_teach_nothing() {
        let mut l = Learner::new(S(15), true);
        for age in [1, 7, 3] {
            assert_eq!(l.on_idle_close(S(age), 1), None);
        }
        assert_eq!(l.effective_idle().1, IdleSource::Config);
    }

    #[test]
    fn prompt_closes_teach_a_request_limit() {
        let mut l = Learner::new(S(15), true);
        assert_eq!(l.on_idle_close(Duration::from_micros(80), 1), None);
        assert_eq!(
            l.on_idle_close(Duration::from_micros(50), 1),
            Some(Learned::MaxRequests(1))
        );
        assert_eq!(l.learned_max_requests(), Some(1));
        assert_eq!(
            l.effective_idle().1,
            IdleSource::Config,
            "not an idle timeout"
        );
    }

    #[test]
    fn closes_of_one_event_give_one_sample_in_any_order() {
        let ms = Duration::from_millis;
        let at = tokio::time::Instant::now();
        let mut l = Learner::new(S(15), true);
        // One restart: ages 150, 100, 100 ms, each connection after one request.
        assert_eq!(l.on_idle_close_at(ms(150), 1, at), None);
        assert_eq!(l.on_idle_close_at(ms(100), 1, at + ms(1)), None);
        assert_eq!(l.on_idle_close_at(ms(100), 1, at + ms(2)), None);
        assert_eq!(l.learned_max_requests(), None);
        // A close in a later event is a second sample.
        let later = at + S(5);
        assert_eq!(
            l.on_idle_close_at(ms(150), 1, later),
            Some(Learned::MaxRequests(1))
        );
    }

    #[test]
    fn a_connection_kept_after_more_requests_voids_smaller_prompt_closes() {
        let mut l = Learner::new(S(15), true);
        assert_eq!(l.on_idle_close(Duration::from_micros(80), 1), None);
        l.on_kept(2, None);
        assert_eq!(
            l.on_idle_close(Duration::from_micros(80), 1),
            None,
            "paired with a close a kept connection contradicts"
        );
        // Kept after as many requests as the limit: no contradiction.
        l.on_kept(1, None);
        assert_eq!(
            l.on_idle_close(Duration::from_micros(80), 1),
            Some(Learned::MaxRequests(1))
        );
    }

    #[test]
    fn a_connection_reused_after_a_longer_idle_voids_shorter_idle_closes() {
        let ms = Duration::from_millis;
        let mut l = Learner::new(S(15), true);
        assert_eq!(l.on_idle_close(ms(1000), 3), None);
        assert_eq!(l.on_idle_close(ms(1500), 7), None);
        // Reused after 1.6 s idle and answered: the upstream keeps idle connections
        // longer than those two closes.
        l.on_kept(9, Some(ms(1600)));
        assert_eq!(
            l.on_idle_close(ms(2000), 1),
            None,
            "taught by voided closes"
        );
        assert_eq!(l.on_idle_close(ms(2010), 1), None);
        assert_eq!(
            l.on_idle_close(ms(2005), 1),
            Some(Learned::IdleTimeout(ms(2000) * 4 / 5, IdleSource::Observed))
        );
    }

    /// php-fpm's `pm.max_requests` counts a worker's requests on whatever
    /// connections: two connections closed promptly after one request each (their
    /// workers had served the rest elsewhere) must not end reuse with a limit of 1.
    #[test]
    fn a_learner_without_request_limits_takes_none_from_prompt_closes() {
        let mut l = Learner::new(S(15), true).with_request_limits(false);
        for _ in 0..3 {
            assert_eq!(l.on_idle_close(Duration::from_micros(50), 1), None);
        }
        assert_eq!(l.learned_max_requests(), None);
        // Idle timeouts are still learned.
        for _ in 0..2 {
            assert_eq!(l.on_idle_close(Duration::from_millis(2000), 1), None);
        }
        assert!(matches!(
            l.on_idle_close(Duration::from_millis(2000), 1),
            Some(Learned::IdleTimeout(..))
        ));
    }

    #[test]
    fn a_disabled_learner_learns_nothing() {
        let mut l = Learner::new(S(15), false);
        assert_eq!(l.on_announced_timeout(8), None);
        l.on_idle_close(Duration::from_micros(50), 1);
        l.on_idle_close(Duration::from_micros(50), 1);
        assert_eq!(l.learned_max_requests(), None);
        assert_eq!(l.effective_idle(), (S(15), IdleSource::Config));
    }

    #[test]
    fn learned_idle_is_bounded_below() {
        let mut l = Learner::new(S(15), true);
        for _ in 0..3 {
            l.on_idle_close(Duration::from_millis(260), 1);
        }
        assert_eq!(l.effective_idle().0, Duration::from_millis(208));
        assert!(l.effective_idle().0 >= MIN_LEARNED_IDLE);
    }
}
