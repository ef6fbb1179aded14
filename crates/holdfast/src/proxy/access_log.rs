//! The access log: one line per request at target `holdfast::access`, written when
//! its response ends.
//!
//! tracing's filter decides whether the line is written (`log.access_log`,
//! `log.level`), but once [`crate::telemetry::init`] has installed holdfast's logger
//! the line is formatted here and written to stderr in one `write`, in the same
//! shape as tracing's text or JSON formatter would give it. Formatting through
//! tracing's field visitor cost ~21,000 instructions and 2 allocations a line,
//! nearly as much as proxying the request; this costs ~3,100 and none (nginx's own
//! log line ~2,600).
//! Without holdfast's logger (a library user's own subscriber), lines go through
//! `tracing::info!` as any other event.

use std::cell::RefCell;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use http::uri::PathAndQuery;
use http::{HeaderValue, Method};
use tokio::time::Instant;

use crate::config::LogFormat;

/// One access-log line, emitted when the response ends (or at once for responses
/// holdfast makes itself).
pub struct AccessRecord {
    pub start: Instant,
    /// The client's address, as formatted once per connection.
    pub client: HeaderValue,
    pub method: Method,
    /// `None`: unknown (a head hyper refused), written `-`.
    pub path: Option<PathAndQuery>,
    pub status: u16,
    pub route: Option<Arc<str>>,
    pub upstream: Option<Arc<str>>,
    pub address: Option<Arc<str>>,
    pub reused: Option<bool>,
    pub attempts: u32,
    pub ttfb: Option<Duration>,
    pub outcome: &'static str,
    /// Written already; a record dropped unwritten (its request cancelled because
    /// the client went away before the answer) writes itself as `client_gone`.
    pub emitted: bool,
}

/// Set once holdfast's own logger is installed: lines are written here, in this format.
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Called by [`crate::telemetry::init`] once its subscriber is the global one.
pub(crate) fn write_directly(format: LogFormat) {
    let _ = FORMAT.set(format);
}

impl AccessRecord {
    pub fn emit(mut self: Box<Self>, bytes: u64) {
        self.write(bytes);
        self.emitted = true;
    }

    fn write(&self, bytes: u64) {
        let total = self.start.elapsed();
        let Some(format) = FORMAT.get() else {
            self.emit_event(bytes, total);
            return;
        };
        thread_local! {
            static LINE: RefCell<String> = const { RefCell::new(String::new()) };
        }
        // `try_with`: a record dropped while a thread ends (a runtime shutting down)
        // must not panic for want of the buffer.
        let _ = LINE.try_with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            match format {
                LogFormat::Text => self.text(&mut line, bytes, total),
                LogFormat::Json => self.json(&mut line, bytes, total),
            }
            // One write for the line; a failed log write must not fail the request.
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
        });
    }

    /// As tracing's text formatter writes an event (without colour):
    /// `TIMESTAMP  INFO holdfast::access: client=.. method=.. ..`, string fields quoted.
    fn text(&self, out: &mut String, bytes: u64, total: Duration) {
        push_timestamp(out);
        out.push_str("  INFO holdfast::access: client=");
        out.push_str(self.client());
        out.push_str(" method=");
        out.push_str(self.method.as_str());
        out.push_str(" path=");
        push_unquoted(out, self.path());
        self.fields(out, bytes, total, &TEXT_NAMES);
        out.push('\n');
    }

    /// As tracing's JSON formatter writes an event with `flatten_event(true)`.
    fn json(&self, out: &mut String, bytes: u64, total: Duration) {
        out.push_str("{\"timestamp\":\"");
        push_timestamp(out);
        out.push_str("\",\"level\":\"INFO\",\"client\":");
        push_quoted(out, self.client());
        out.push_str(",\"method\":");
        push_quoted(out, self.method.as_str());
        out.push_str(",\"path\":");
        push_quoted(out, self.path());
        self.fields(out, bytes, total, &JSON_NAMES);
        out.push_str(",\"target\":\"holdfast::access\"}\n");
    }

    /// `status` to `outcome`, which both formats write alike but for the `names`
    /// (each with the format's punctuation, so one `push_str` per name).
    fn fields(&self, out: &mut String, bytes: u64, total: Duration, names: &FieldNames) {
        let [
            status,
            route,
            upstream,
            address,
            conn,
            attempts,
            retries,
            bytes_name,
            total_ms,
            ttfb_ms,
            outcome,
        ] = names;
        out.push_str(status);
        push_int(out, u64::from(self.status));
        for (name, value) in [
            (route, self.route.as_deref().unwrap_or("-")),
            (upstream, self.upstream.as_deref().unwrap_or("-")),
            (address, self.address.as_deref().unwrap_or("-")),
            (conn, self.conn()),
        ] {
            out.push_str(name);
            push_quoted(out, value);
        }
        for (name, value) in [
            (attempts, u64::from(self.attempts)),
            (retries, u64::from(self.attempts.saturating_sub(1))),
            (bytes_name, bytes),
        ] {
            out.push_str(name);
            push_int(out, value);
        }
        for (name, d) in [(total_ms, Some(total)), (ttfb_ms, self.ttfb)] {
            out.push_str(name);
            push_ms(out, d);
        }
        out.push_str(outcome);
        push_quoted(out, self.outcome);
    }

    fn path(&self) -> &str {
        self.path.as_ref().map_or("-", PathAndQuery::as_str)
    }

    fn client(&self) -> &str {
        self.client.to_str().unwrap_or("-")
    }

    fn conn(&self) -> &'static str {
        match self.reused {
            Some(true) => "reused",
            Some(false) => "new",
            None => "-",
        }
    }

    /// The line as a tracing event, for a subscriber that is not holdfast's.
    fn emit_event(&self, bytes: u64, total: Duration) {
        tracing::info!(
            target: "holdfast::access",
            client = %self.client(),
            method = %self.method,
            path = %self.path(),
            status = self.status,
            route = self.route.as_deref().unwrap_or("-"),
            upstream = self.upstream.as_deref().unwrap_or("-"),
            address = self.address.as_deref().unwrap_or("-"),
            conn = self.conn(),
            attempts = self.attempts,
            retries = self.attempts.saturating_sub(1),
            bytes,
            total_ms = total.as_secs_f64() * 1000.0,
            ttfb_ms = self.ttfb.map_or(-1.0, |d| d.as_secs_f64() * 1000.0),
            outcome = self.outcome,
        );
    }
}

/// Set when a drain ends by cutting what still runs (at `drain.timeout`, or a second
/// SIGINT), just before the process drops it: a request ended from then on was cut by
/// holdfast, not left by its client. Read only when a request ends early.
static DRAIN_CUT: AtomicBool = AtomicBool::new(false);

/// The drain is cutting what still runs (see `DRAIN_CUT`).
pub fn drain_cuts() {
    DRAIN_CUT.store(true, Ordering::Relaxed);
}

/// The outcome of a request dropped before its end: its client went away, or the
/// drain cut it.
pub(crate) fn dropped_outcome() -> &'static str {
    if DRAIN_CUT.load(Ordering::Relaxed) {
        "drain_cut"
    } else {
        "client_gone"
    }
}

impl Drop for AccessRecord {
    fn drop(&mut self) {
        if !self.emitted {
            self.emitted = true;
            self.outcome = dropped_outcome();
            if self.status == 0 {
                self.status = if self.outcome == "drain_cut" {
                    // nginx's status for a connection closed with no response.
                    CLOSED_WITHOUT_RESPONSE
                } else {
                    super::figures::CLIENT_CLOSED_REQUEST
                };
            }
            self.write(0);
        }
    }
}

/// Written for a request the drain cut before any answer was made for it.
const CLOSED_WITHOUT_RESPONSE: u16 = 444;

/// The names of the fields from `status` to `outcome`, in line order, with the
/// format's punctuation around them.
type FieldNames = [&'static str; 11];

const TEXT_NAMES: FieldNames = [
    " status=",
    " route=",
    " upstream=",
    " address=",
    " conn=",
    " attempts=",
    " retries=",
    " bytes=",
    " total_ms=",
    " ttfb_ms=",
    " outcome=",
];

const JSON_NAMES: FieldNames = [
    ",\"status\":",
    ",\"route\":",
    ",\"upstream\":",
    ",\"address\":",
    ",\"conn\":",
    ",\"attempts\":",
    ",\"retries\":",
    ",\"bytes\":",
    ",\"total_ms\":",
    ",\"ttfb_ms\":",
    ",\"outcome\":",
];

fn push_timestamp(out: &mut String) {
    use std::fmt::Write as _;
    // humantime panics on a time before 1970 (a clock not yet set at boot).
    let now = SystemTime::now().max(SystemTime::UNIX_EPOCH);
    let _ = write!(out, "{}", humantime::format_rfc3339_micros(now));
}

fn push_int(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// Milliseconds with three decimals (microseconds); `-1.000` for none, a float like
/// every other value of the field.
fn push_ms(out: &mut String, d: Option<Duration>) {
    let Some(d) = d else {
        out.push_str("-1.000");
        return;
    };
    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    push_int(out, micros / 1000);
    let frac = micros % 1000;
    out.push('.');
    if frac < 100 {
        out.push('0');
    }
    if frac < 10 {
        out.push('0');
    }
    push_int(out, frac);
}

/// `value` in double quotes, with `"`, `\` and control characters escaped as JSON
/// writes them (and as tracing's text format does, but for its `\u{1}` form). C1
/// controls (U+0080 to U+009F; a request target may carry them) are escaped too, as
/// tracing escapes them: U+009B is a terminal's CSI, U+0085 a line break to many
/// readers.
fn push_quoted(out: &mut String, value: &str) {
    out.push('"');
    if !value
        .bytes()
        .any(|b| b == b'"' || b == b'\\' || b.is_ascii_control() || !b.is_ascii())
    {
        // The common case: nothing to escape.
        out.push_str(value);
        out.push('"');
        return;
    }
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => push_char(out, c),
        }
    }
    out.push('"');
}

/// `value` (the request target, which has no ASCII control character or space) as
/// it is, but for its C1 control characters, escaped as [`push_quoted`] does.
fn push_unquoted(out: &mut String, value: &str) {
    if value.is_ascii() {
        out.push_str(value);
        return;
    }
    value.chars().for_each(|c| push_char(out, c));
}

/// `c`, or `\u00XX` for a control character.
fn push_char(out: &mut String, c: char) {
    if c.is_control() {
        use std::fmt::Write as _;
        let _ = write!(out, "\\u{:04x}", u32::from(c));
    } else {
        out.push(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> AccessRecord {
        AccessRecord {
            start: Instant::now(),
            client: HeaderValue::from_static("10.0.0.7"),
            method: Method::POST,
            path: Some(PathAndQuery::from_static("/a?b=%22c%22")),
            status: 201,
            route: Some(Arc::from("route[0]")),
            upstream: Some(Arc::from("up\"stream")),
            address: Some(Arc::from("127.0.0.1:8080")),
            reused: Some(true),
            attempts: 2,
            ttfb: Some(Duration::from_micros(2_045)),
            outcome: "ok",
            // Formatted by the tests, never written.
            emitted: true,
        }
    }

    #[test]
    fn text_lines_have_every_field_in_tracings_shape() {
        let mut line = String::new();
        record().text(&mut line, 1234, Duration::from_micros(12_345_678));
        let (stamp, rest) = line.split_once("  ").unwrap();
        assert!(humantime::parse_rfc3339(stamp).is_ok(), "{stamp}");
        assert_eq!(
            rest,
            "INFO holdfast::access: client=10.0.0.7 method=POST path=/a?b=%22c%22 status=201 \
             route=\"route[0]\" upstream=\"up\\\"stream\" address=\"127.0.0.1:8080\" \
             conn=\"reused\" attempts=2 retries=1 bytes=1234 total_ms=12345.678 \
             ttfb_ms=2.045 outcome=\"ok\"\n"
        );
    }

    #[test]
    fn json_lines_parse_with_every_field() {
        let mut rec = record();
        rec.ttfb = None;
        rec.route = Some(Arc::from("tab\there\u{1}"));
        let mut line = String::new();
        rec.json(&mut line, 7, Duration::from_micros(5));
        assert!(line.ends_with("}\n"), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert!(humantime::parse_rfc3339(v["timestamp"].as_str().unwrap()).is_ok());
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["target"], "holdfast::access");
        assert_eq!(v["client"], "10.0.0.7");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["path"], "/a?b=%22c%22");
        assert_eq!(v["status"], 201);
        assert_eq!(v["route"], "tab\there\u{1}");
        assert_eq!(v["upstream"], "up\"stream");
        assert_eq!(v["conn"], "reused");
        assert_eq!(v["attempts"], 2);
        assert_eq!(v["retries"], 1);
        assert_eq!(v["bytes"], 7);
        assert_eq!(v["total_ms"], 0.005);
        assert_eq!(v["ttfb_ms"], -1.0);
        assert!(line.contains("\"ttfb_ms\":-1.000,"), "{line}");
        assert_eq!(v["outcome"], "ok");
    }

    #[test]
    fn milliseconds_keep_three_decimals() {
        for (micros, text) in [
            (0, "0.000"),
            (7, "0.007"),
            (1_050, "1.050"),
            (999_999, "999.999"),
        ] {
            let mut out = String::new();
            push_ms(&mut out, Some(Duration::from_micros(micros)));
            assert_eq!(out, text);
        }
    }
}
