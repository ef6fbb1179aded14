//! What a probe found, whether the upstream keeps its word, and the pool settings that
//! follow. Pure: built from measurements, no I/O, unit-tested below.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::conn::CloseStyle;
use crate::config::Dur;
use crate::upstream::pool::learn::{KeepAliveHint, PROMPT_CLOSE};

/// Slack when comparing a measured idle close with an announced timeout: the
/// upstream's timer may fire a little early (coarse timers), and the measurement has
/// one network round trip of noise.
pub const TOLERANCE: Duration = Duration::from_millis(500);

/// Everything `holdfast probe` reports; `--json` prints it as is.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeReport {
    pub url: String,
    pub address: String,
    /// `http1` or `fastcgi`.
    pub protocol: &'static str,
    /// Over TLS (`https`).
    pub tls: bool,
    pub first_response: FirstResponse,
    pub requests_per_connection: RequestLimit,
    pub idle: IdleReport,
    /// What the FastCGI application announced (GET_VALUES), if asked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fastcgi: Option<FastCgiValues>,
    pub verdict: Verdict,
    pub recommended: Recommendation,
    pub connections_opened: usize,
    pub requests_sent: u32,
    pub elapsed_secs: f64,
}

/// [`FirstResponse::version`] of a FastCGI answer.
pub const FASTCGI: &str = "FastCGI";

#[derive(Debug, Clone, Serialize)]
pub struct FirstResponse {
    pub status: u16,
    pub version: &'static str,
    /// The `Connection` header, as sent.
    pub connection: Option<String>,
    /// The `Keep-Alive` header, as sent.
    pub keep_alive: Option<String>,
    pub announced_timeout_secs: Option<u64>,
    pub announced_max: Option<u64>,
}

impl FirstResponse {
    /// Whether the upstream promised keep-alive in so many words.
    pub fn announces_keep_alive(&self) -> bool {
        self.keep_alive.is_some()
            || self.connection.as_deref().is_some_and(|c| {
                c.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("keep-alive"))
            })
    }

    /// The answer came from a FastCGI application.
    pub fn is_fastcgi(&self) -> bool {
        self.version == FASTCGI
    }

    pub fn hint(&self) -> KeepAliveHint {
        self.keep_alive
            .as_deref()
            .map(|v| KeepAliveHint::parse(v.as_bytes()))
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RequestLimit {
    /// Requests sent on the one connection.
    pub sent: u32,
    /// The most requests the upstream served on it before closing; `None` if it did
    /// not close within `searched_up_to`.
    pub limit: Option<u32>,
    /// How it closed.
    pub close: Option<CloseStyle>,
    pub searched_up_to: u32,
    /// A request after the first that failed, which ended the count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    /// Connections watched, each after one request.
    pub connections: usize,
    pub max_idle_secs: f64,
    /// Idle time at each observed close, in seconds, in order of connection.
    pub closes_secs: Vec<f64>,
    /// The shortest observed idle close, in seconds.
    pub timeout_secs: Option<f64>,
    pub close: Option<CloseStyle>,
    /// Every connection closed right after its response: there is no idle time to
    /// measure.
    pub closes_after_every_response: bool,
    /// Connections still open at `max_idle_secs`.
    pub still_open: usize,
    /// Of those, how many then answered a request (`false` ones were dropped silently,
    /// e.g. by a middlebox that forgot the connection).
    pub usable_after_max_idle: Vec<bool>,
    /// Bytes sent on idle connections without a request (a 408, say).
    pub unsolicited_bytes: usize,
    /// Watched connections that failed (connect or first request).
    pub errors: Vec<String>,
}

impl IdleReport {
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout_secs.map(Duration::from_secs_f64)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FastCgiValues {
    pub max_conns: Option<u32>,
    pub max_reqs: Option<u32>,
    pub mpxs_conns: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// `None` when the upstream promised nothing explicit (no `Connection:
    /// keep-alive`, no `Keep-Alive`); else whether its behaviour matched.
    pub keeps_its_word: Option<bool>,
    /// One line per thing worth knowing, worst first.
    pub findings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Recommendation {
    pub idle_timeout: Option<String>,
    pub max_requests: Option<u64>,
    /// The `[upstream.NAME.pool]` snippet to paste.
    pub toml: String,
}

// === verdict ===

pub fn verdict(first: &FirstResponse, limit: &RequestLimit, idle: &IdleReport) -> Verdict {
    let mut broken = Vec::new();
    let mut notes = Vec::new();
    let announced = first.announces_keep_alive();
    let hint = first.hint();
    let silent_limit = limit
        .limit
        .filter(|_| matches!(limit.close, Some(CloseStyle::Fin | CloseStyle::Rst)));
    if let Some(n) = silent_limit {
        let what = format!(
            "closed the connection after {n} request(s) {} instead of saying Connection: close",
            limit.close.map_or("", CloseStyle::describe)
        );
        if announced {
            broken.push(format!("announces keep-alive but {what}"));
        } else {
            notes.push(format!(
                "{what}: a client that reuses the connection races the close"
            ));
        }
    }
    if let (Some(t), Some(m)) = (hint.timeout_secs, idle.timeout())
        && m + TOLERANCE < Duration::from_secs(t)
    {
        broken.push(format!(
            "announces Keep-Alive: timeout={t} but closed idle connections after {:.2} s",
            m.as_secs_f64()
        ));
    }
    if let (Some(max), Some(n)) = (hint.max, limit.limit)
        && u64::from(n) < max
    {
        broken.push(format!(
            "announces Keep-Alive: max={max} but closed after {n} request(s)"
        ));
    }
    if idle.closes_after_every_response {
        notes.push("closes every connection right after its response: nothing to reuse".into());
    } else if let (Some(m), Some(style)) = (idle.timeout(), idle.close) {
        notes.push(format!(
            "closes idle connections after {:.2} s, {}",
            m.as_secs_f64(),
            style.describe()
        ));
    }
    if idle.close == Some(CloseStyle::Rst) {
        notes.push(
            "resets idle connections: a request racing the close gets a reset, not a clean EOF"
                .into(),
        );
    }
    if let Some(e) = &limit.error {
        notes.push(e.clone());
    }
    for e in &idle.errors {
        notes.push(format!("an idle-watch connection failed: {e}"));
    }
    if idle.unsolicited_bytes > 0 {
        notes.push(format!(
            "sent {} byte(s) on idle connections without a request",
            idle.unsolicited_bytes
        ));
    }
    if idle.usable_after_max_idle.iter().any(|ok| !ok) {
        notes.push(format!(
            "connections idle for {} no longer worked although no FIN or RST came while \
             they were idle: the upstream closes stale connections only when used, or \
             something on the path dropped them silently",
            secs(idle.max_idle_secs)
        ));
    } else if idle.still_open > 0 && idle.timeout_secs.is_none() {
        notes.push(format!(
            "kept idle connections open for at least {:.0} s",
            idle.max_idle_secs
        ));
    }
    if limit.error.is_some() {
        // Said above: nothing is known about a limit.
    } else if limit.limit.is_none() {
        notes.push(format!(
            "served {} requests on one connection without closing it",
            limit.sent
        ));
    } else if limit.close == Some(CloseStyle::ConnectionClose) {
        notes.push(format!(
            "allows {} request(s) per connection and says so (Connection: close)",
            limit.limit.unwrap_or(0)
        ));
    }
    let keeps_its_word = if !broken.is_empty() {
        Some(false)
    } else if announced {
        Some(true)
    } else {
        None
    };
    broken.extend(notes);
    Verdict {
        keeps_its_word,
        findings: broken,
    }
}

// === recommendation ===

/// The idle timeout to configure below an upstream's `limit`: the limit to the nearest
/// 100 ms (a timer that fires at 2.998 s is a 3 s timer), less a margin of 1/8 and at
/// least 500 ms (the margin holdfast applies to an announced timeout), rounded down to
/// 100 ms; `None` when no margin fits.
pub fn idle_below(limit: Duration) -> Option<Duration> {
    let limit = Duration::from_millis((limit.as_millis() as u64 + 50) / 100 * 100);
    let margin = (limit / 8).max(TOLERANCE);
    let d = limit.checked_sub(margin)?;
    let d = Duration::from_millis(d.as_millis() as u64 / 100 * 100);
    (d >= Duration::from_millis(100)).then_some(d)
}

pub fn recommend(
    name: &str,
    url: &str,
    first: &FirstResponse,
    limit: &RequestLimit,
    idle: &IdleReport,
) -> Recommendation {
    let announced = first.hint().timeout_secs.map(Duration::from_secs);
    let measured = idle.timeout().filter(|_| !idle.closes_after_every_response);
    let upstream_idle = match (measured, announced) {
        (Some(m), Some(a)) => Some(m.min(a)),
        (m, a) => m.or(a),
    };
    let never_reused = idle.closes_after_every_response || limit.limit == Some(1);
    let idle_timeout = upstream_idle
        .filter(|_| !never_reused)
        .and_then(idle_below)
        .map(|d| Dur(d).to_string());
    // A FastCGI application's limit is its process's (php-fpm's `pm.max_requests`
    // counts a worker's requests, and a worker serves one connection at a time):
    // retired at it, a connection ends with its worker. One below, the worker would
    // take the next connection and close it after one request, racing the request
    // sent after that one.
    let fastcgi = first.is_fastcgi();
    let max_requests = limit.limit.map(|n| {
        let n = if fastcgi { n } else { n.saturating_sub(1) };
        u64::from(n.max(1))
    });

    let mut t = String::new();
    let _ = writeln!(t, "# holdfast probe {url}");
    let _ = writeln!(t, "[upstream.{}.pool]", crate::config::toml_key(name));
    match (&idle_timeout, upstream_idle) {
        (Some(d), Some(u)) => {
            let _ = writeln!(
                t,
                "idle_timeout = \"{d}\"  # the upstream closes idle connections after {:.1} s; a margin below",
                u.as_secs_f64()
            );
        }
        _ if never_reused => {
            let _ = writeln!(
                t,
                "# no idle_timeout: the upstream never lets a connection be reused"
            );
        }
        _ if idle.usable_after_max_idle.iter().any(|ok| !ok) => {
            let _ = writeln!(
                t,
                "# idle_timeout: NOT MEASURED: connections idle for {} were dead when used, \
                 with no FIN or RST while idle; probe again with a smaller --max-idle",
                secs(idle.max_idle_secs)
            );
        }
        _ if idle.still_open > 0 && idle.max_idle_secs >= default_idle().as_secs_f64() => {
            let _ = writeln!(
                t,
                "# idle_timeout: no idle close within {}; the default ({}) is safe",
                secs(idle.max_idle_secs),
                Dur(default_idle())
            );
        }
        _ if idle.still_open > 0 => {
            let _ = writeln!(
                t,
                "# idle_timeout: no idle close within {}, which says nothing about the \
                 default ({}); probe with --max-idle {} or more",
                secs(idle.max_idle_secs),
                Dur(default_idle()),
                Dur(default_idle())
            );
        }
        _ if upstream_idle.is_some() => {
            let _ = writeln!(
                t,
                "# idle_timeout: the upstream closes idle connections too soon for any margin; keep the default and let holdfast learn"
            );
        }
        _ => {
            let _ = writeln!(
                t,
                "# idle_timeout: NOT MEASURED: every idle-watch connection failed (see the findings)"
            );
        }
    }
    match (max_requests, limit.limit) {
        _ if limit.error.is_some() => {
            let _ = writeln!(
                t,
                "# max_requests: not measured ({})",
                limit.error.as_deref().unwrap_or_default()
            );
        }
        (Some(m), Some(1)) => {
            let _ = writeln!(
                t,
                "max_requests = {m}  # the upstream serves one request per connection"
            );
        }
        (Some(m), Some(n)) if fastcgi => {
            let _ = writeln!(
                t,
                "max_requests = {m}  # the application ends its process after {n} requests \
                 (php-fpm: pm.max_requests, per worker); a connection then ends with its worker"
            );
        }
        (Some(m), Some(n)) => {
            let _ = writeln!(
                t,
                "max_requests = {m}  # the upstream closes connections after {n} requests; one below"
            );
        }
        _ => {
            let _ = writeln!(
                t,
                "# max_requests: no limit within {} requests",
                limit.searched_up_to
            );
        }
    }
    Recommendation {
        idle_timeout,
        max_requests,
        toml: t,
    }
}

// === human output ===

impl ProbeReport {
    /// The report as a person reads it.
    pub fn render(&self) -> String {
        let mut t = String::new();
        let f = &self.first_response;
        let tls = if self.tls { " over TLS" } else { "" };
        let _ = writeln!(t, "{} ({}, {}{tls})", self.url, self.address, self.protocol);
        let _ = writeln!(t, "  first response: {} {}", f.version, f.status);
        let _ = writeln!(
            t,
            "  Connection: {}",
            f.connection.as_deref().unwrap_or("(not sent)")
        );
        let _ = writeln!(
            t,
            "  Keep-Alive: {}",
            f.keep_alive.as_deref().unwrap_or("(not sent)")
        );
        if let Some(v) = &self.fastcgi {
            let show =
                |v: Option<u32>| v.map_or_else(|| "(not said)".to_owned(), |n| n.to_string());
            let _ = writeln!(
                t,
                "  FCGI_MAX_CONNS: {}, FCGI_MAX_REQS: {}, FCGI_MPXS_CONNS: {}",
                show(v.max_conns),
                show(v.max_reqs),
                v.mpxs_conns
                    .map_or("(not said)", |b| if b { "1" } else { "0" })
            );
        }
        let r = &self.requests_per_connection;
        let _ = match (r.limit, r.close) {
            _ if r.error.is_some() => writeln!(
                t,
                "  requests per connection: not measured ({})",
                r.error.as_deref().unwrap_or_default()
            ),
            (Some(n), Some(style)) => writeln!(
                t,
                "  requests per connection: {n}, then closed {}",
                style.describe()
            ),
            _ => writeln!(
                t,
                "  requests per connection: no limit within {}",
                r.searched_up_to
            ),
        };
        let i = &self.idle;
        let closes: Vec<String> = i.closes_secs.iter().map(|s| format!("{s:.2}")).collect();
        let _ = match (i.timeout_secs, i.close) {
            _ if i.closes_after_every_response => {
                writeln!(
                    t,
                    "  idle timeout: none to measure (closes after every response)"
                )
            }
            (Some(s), Some(style)) => writeln!(
                t,
                "  idle timeout: {s:.2} s, closed {} (idle closes at {} s on {} connection(s))",
                style.describe(),
                closes.join(", "),
                i.connections
            ),
            _ if i.still_open == 0 => writeln!(
                t,
                "  idle timeout: not measured (every idle-watch connection failed)"
            ),
            _ => writeln!(
                t,
                "  idle timeout: none within {:.0} s ({} connection(s) watched)",
                i.max_idle_secs, i.connections
            ),
        };
        let _ = writeln!(
            t,
            "  keeps its word: {}",
            match self.verdict.keeps_its_word {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "it promises nothing explicit",
            }
        );
        for finding in &self.verdict.findings {
            let _ = writeln!(t, "  - {finding}");
        }
        let _ = writeln!(
            t,
            "  ({} connection(s), {} request(s), {:.1} s)\n",
            self.connections_opened, self.requests_sent, self.elapsed_secs
        );
        let _ = writeln!(t, "Recommended settings:\n");
        t.push_str(&self.recommended.toml);
        t
    }
}

/// holdfast's default `pool.idle_timeout`, which a long enough watch vouches for.
fn default_idle() -> Duration {
    crate::config::PoolConfig::default().idle_timeout.get()
}

/// Seconds for a sentence: `120 s`, or `300 ms` below a second (not `0 s`).
fn secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.0} s")
    } else {
        format!("{:.0} ms", s * 1000.0)
    }
}

/// Whether an idle close this soon is the response's close rather than an idle timeout.
pub fn is_prompt(after: Duration) -> bool {
    after < PROMPT_CLOSE
}

#[cfg(test)]
mod tests;
