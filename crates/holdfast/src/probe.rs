//! `holdfast probe URL`: measures an upstream's keep-alive behaviour and recommends
//! the `[upstream.NAME.pool]` settings that follow, so finding out that a provider
//! closes idle connections after 8 s (story 1a) takes one command, not a packet
//! capture.
//!
//! In order, with few connections and few requests:
//! 1. One connection carries up to `max_requests` sequential requests: the first
//!    response's `Connection` and `Keep-Alive` headers, and after how many requests the
//!    upstream closes and how (`Connection: close`, a FIN, or an RST).
//! 2. `connections` connections, opened a fraction of a second apart (staggered, so a
//!    coarse timer on the upstream shows as spread rather than as a false precision),
//!    send one request each and then sit idle; each is watched for the upstream's FIN
//!    or RST until `max_idle` (and the half second of the stated precision beyond,
//!    so a timeout of `max_idle` itself is measured). The close is seen the moment it
//!    arrives, so the idle timeout is measured to a few milliseconds plus the
//!    upstream's own timer slack. A connection still open then sends one more
//!    request, which tells a working connection from one dropped silently on the way.
//! 3. A verdict (does it keep its word?) and a TOML snippet ([`report`]).
//!
//! URLs: `http://`, `https://` (TLS verified against `--ca-file` or the system's
//! roots, ALPN `http/1.1`; `--server-name`, `--client-cert` and `--client-key` as the
//! upstream TLS keys of those names), `fastcgi://host:port` and `fastcgi+unix:///path.sock`.
//! Not here: HTTP/2 (which closes with GOAWAY, not a race) and `http+unix`.

pub mod conn;
pub mod report;

use std::path::PathBuf;
use std::time::Duration;

use futures_util::future::join_all;
use tokio::time::Instant;

use crate::config::UpstreamTlsConfig;

pub use self::conn::CloseStyle;
use self::conn::{Answer, Conn, Dialer, Watch};
pub use self::report::ProbeReport;
use self::report::{FastCgiValues, FirstResponse, IdleReport, RequestLimit};

/// A close this soon after the last of `max_requests` answers is a request limit of
/// exactly `max_requests` (the FIN follows the response at once); short enough not
/// to take a short idle timeout for one.
const LIMIT_CLOSE: Duration = Duration::from_millis(100);

/// What to probe and how far to go.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// `http[s]://host[:port]/path`, `fastcgi://host:port` or
    /// `fastcgi+unix:///path.sock`.
    pub url: String,
    /// `https`: PEM CA certificates to verify the upstream with; default: the
    /// system's trust store.
    pub ca_file: Option<PathBuf>,
    /// `https`: the name sent as SNI and verified in the certificate (the upstream
    /// TLS key `server_name`); default: the URL's host.
    pub server_name: Option<String>,
    /// `https`: PEM certificate chain presented when the upstream asks for one
    /// (mutual TLS; the upstream TLS key `client_cert`); needs `client_key`.
    pub client_cert: Option<PathBuf>,
    /// `https`: PEM private key of `client_cert` (the upstream TLS key `client_key`).
    pub client_key: Option<PathBuf>,
    /// For FastCGI: the script to run (SCRIPT_FILENAME), as the application sees it.
    pub script: Option<String>,
    /// Longest idle time watched for. Default 120 s.
    pub max_idle: Duration,
    /// Most requests sent on the one connection. Default 100.
    pub max_requests: u32,
    /// Idle connections watched at once. Default 3.
    pub connections: usize,
    /// Bound on each connect and each response. Default 10 s.
    pub timeout: Duration,
    /// The upstream's name in the snippet.
    pub name: String,
}

impl ProbeOptions {
    pub fn new(url: impl Into<String>) -> Self {
        ProbeOptions {
            url: url.into(),
            ca_file: None,
            server_name: None,
            client_cert: None,
            client_key: None,
            script: None,
            max_idle: Duration::from_secs(120),
            max_requests: 100,
            connections: 3,
            timeout: Duration::from_secs(10),
            name: "NAME".into(),
        }
    }
}

/// Why a probe could not finish.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Url(String),
    /// An option out of range.
    #[error("{0}")]
    Usage(String),
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, std::io::Error),
    #[error("cannot connect to {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("{0}")]
    Tls(String),
    #[error("no response within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    Io(std::io::Error),
}

/// A parsed probe URL.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// Request target (origin form).
    pub path: String,
    /// `Host` header value.
    pub host_header: String,
    /// `Some` for FastCGI.
    pub fastcgi_script: Option<String>,
    /// `https`.
    pub tls: bool,
    /// `fastcgi+unix`: the socket (then `host` is `localhost`).
    pub unix: Option<PathBuf>,
}

impl Target {
    /// # Errors
    /// An unsupported scheme or a malformed URL, said plainly.
    pub fn parse(url: &str, script: Option<&str>) -> Result<Target, ProbeError> {
        // The URL goes into the request line and the snippet's comment as written.
        if let Some(c) = url.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(ProbeError::Url(format!(
                "{url:?}: {c:?} cannot go into a request line; percent-encode it (a space is %20)"
            )));
        }
        let bad = |why: &str| ProbeError::Url(format!("{url}: {why}"));
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            bad("expected http[s]://host[:port]/path, fastcgi://host:port or fastcgi+unix:///path")
        })?;
        let script = |fastcgi: bool| match (fastcgi, script) {
            (false, _) => Ok(None),
            (true, Some(s)) => Ok(Some(s.to_owned())),
            (true, None) => Err(bad(
                "FastCGI needs --script, the path of a script the application can run",
            )),
        };
        let (default_port, fastcgi, tls) = match scheme.to_ascii_lowercase().as_str() {
            "http" => (80, false, false),
            "https" => (443, false, true),
            "fastcgi" => (9000, true, false),
            "fastcgi+unix" => {
                if !rest.starts_with('/') {
                    return Err(bad("expected fastcgi+unix:///absolute/path.sock"));
                }
                return Ok(Target {
                    host: "localhost".into(),
                    port: 80,
                    path: "/".into(),
                    host_header: "localhost".into(),
                    fastcgi_script: script(true)?,
                    tls: false,
                    unix: Some(PathBuf::from(rest)),
                });
            }
            _ => {
                return Err(bad(
                    "the scheme must be http, https, fastcgi or fastcgi+unix",
                ));
            }
        };
        // A fragment is the client's own (RFC 9110 4.2.4): never sent.
        let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
        // The authority ends at the path or the query (`http://h?x=1` is `/?x=1`).
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_owned()),
            None => (rest, "/".to_owned()),
        };
        if authority.contains('@') {
            return Err(bad(
                "user information (user@host) is not supported; the probe sends no credentials",
            ));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let port = match port {
            None => default_port,
            Some(p) => p.parse().map_err(|_| bad("bad port"))?,
        };
        Ok(Target {
            host: host.to_owned(),
            port,
            path,
            host_header: authority.to_owned(),
            fastcgi_script: script(fastcgi)?,
            tls,
            unix: None,
        })
    }
}

/// Runs a probe; `progress` gets a line at each step.
///
/// # Errors
/// The URL is unusable, the upstream cannot be reached, or its first answer is not
/// HTTP (or FastCGI). Later failures are findings, not errors.
pub async fn run(
    options: &ProbeOptions,
    progress: &(dyn Fn(String) + Sync),
) -> Result<ProbeReport, ProbeError> {
    let started = Instant::now();
    // Deadlines are `Instant + Duration`, which panics past the clock's range.
    for (flag, d, most) in [
        (
            "--max-idle",
            options.max_idle,
            Duration::from_secs(24 * 3600),
        ),
        ("--timeout", options.timeout, Duration::from_secs(3600)),
    ] {
        if d > most {
            return Err(ProbeError::Usage(format!(
                "{flag}: at most {}",
                crate::config::Dur(most)
            )));
        }
    }
    // No connect or answer takes no time: every one would time out, blamed on the
    // upstream.
    if options.timeout.is_zero() {
        return Err(ProbeError::Usage("--timeout: more than 0s".into()));
    }
    let target = Target::parse(&options.url, options.script.as_deref())?;
    let tls = tls_options(options, &target)?;
    let dialer = Dialer::new(&target, tls.as_ref(), options.timeout).await?;
    let mut connections = 0;
    let mut requests = 0;

    let fastcgi = if target.fastcgi_script.is_some() {
        connections += 1;
        // GET_VALUES is optional (FastCGI 1.0, 4.1): an application that ignores it
        // or answers late can still be probed.
        let v = match conn::fastcgi_values(&dialer, options.timeout).await {
            Ok(v) => v,
            Err(ProbeError::Timeout(_)) => None,
            Err(e) => return Err(e),
        };
        progress(match &v {
            Some(v) => format!(
                "GET_VALUES: FCGI_MAX_CONNS={:?} FCGI_MAX_REQS={:?} FCGI_MPXS_CONNS={:?}",
                v.max_conns, v.max_reqs, v.mpxs_conns
            ),
            None => "GET_VALUES: no answer".into(),
        });
        Some(v.map_or(
            FastCgiValues {
                max_conns: None,
                max_reqs: None,
                mpxs_conns: None,
            },
            |v| FastCgiValues {
                max_conns: v.max_conns,
                max_reqs: v.max_reqs,
                mpxs_conns: v.mpxs_conns,
            },
        ))
    } else {
        None
    };

    // 1. Requests on one connection.
    let mut c = Conn::open(&target, &dialer, options.timeout).await?;
    connections += 1;
    // Known once a connection is made: the host may resolve to several.
    let addr = dialer.describe();
    progress(format!("connected to {addr}"));
    let mut first: Option<FirstResponse> = None;
    let mut limit = RequestLimit {
        sent: 0,
        limit: None,
        close: None,
        searched_up_to: options.max_requests,
        error: None,
    };
    for i in 1..=options.max_requests.max(1) {
        requests += 1;
        limit.sent = i;
        let answer = match c.exchange().await {
            Ok(a) => a,
            Err(e) if first.is_none() => return Err(e),
            // A later failure is a finding: what was measured stays.
            Err(e) => {
                progress(format!("request {i} on one connection failed: {e}"));
                limit.error = Some(format!("request {i} on one connection failed: {e}"));
                break;
            }
        };
        match answer {
            Answer::Response(f) => {
                if first.is_none() {
                    progress(format!(
                        "first response: {} {}, Connection: {}, Keep-Alive: {}",
                        f.version,
                        f.status,
                        f.connection.as_deref().unwrap_or("-"),
                        f.keep_alive.as_deref().unwrap_or("-")
                    ));
                    let hint = f
                        .keep_alive
                        .as_deref()
                        .map(|v| crate::upstream::pool::learn::KeepAliveHint::parse(v.as_bytes()))
                        .unwrap_or_default();
                    first = Some(FirstResponse {
                        status: f.status,
                        version: f.version,
                        connection: f.connection.clone(),
                        keep_alive: f.keep_alive.clone(),
                        announced_timeout_secs: hint.timeout_secs,
                        announced_max: hint.max,
                    });
                }
                if f.closes {
                    limit.limit = Some(i);
                    limit.close = Some(CloseStyle::ConnectionClose);
                    break;
                }
            }
            Answer::Closed(style) if i == 1 => {
                return Err(ProbeError::Protocol(format!(
                    "the upstream closed the connection {} before answering",
                    style.describe()
                )));
            }
            Answer::Closed(style) => {
                limit.limit = Some(i - 1);
                limit.close = Some(style);
                break;
            }
        }
        if i % 10 == 0 {
            progress(format!("{i} requests on one connection, still open"));
        }
    }
    // The last request answered: a silent close right after it is a limit of exactly
    // `max_requests`, found without sending one more. (Or an idle timeout shorter than
    // the wait: told apart below, once the idle closes are measured.)
    let mut limit_close_after = None;
    if limit.limit.is_none()
        && limit.error.is_none()
        && let Watch::Closed { style, after, .. } =
            c.watch_close(Instant::now() + LIMIT_CLOSE).await
    {
        limit.limit = Some(limit.sent);
        limit.close = Some(style);
        limit_close_after = Some(after);
    }
    drop(c);
    let Some(first) = first else {
        return Err(ProbeError::Protocol("no response".into()));
    };
    progress(match (limit.limit, limit.close) {
        (Some(n), Some(style)) => format!(
            "requests per connection: closed after {n}, {}",
            style.describe()
        ),
        _ => format!(
            "requests per connection: still open after {} requests",
            limit.sent
        ),
    });

    // 2. Idle connections, staggered.
    let mut k = options.connections.max(1);
    if let Some(v) = &fastcgi {
        // A FastCGI application binds a worker to each open connection (php-fpm), and
        // says FCGI_MAX_CONNS only sometimes (php-fpm does not): more idle connections
        // than workers would leave one waiting for a worker, not measuring.
        let most = v.max_conns.map_or(1, |n| n.max(1) as usize);
        if k > most {
            progress(format!(
                "FastCGI: watching {most} idle connection(s), not {k}: each holds a worker"
            ));
            k = most;
        }
    }
    progress(format!(
        "watching {k} idle connection(s) for up to {:.0} s",
        options.max_idle.as_secs_f64()
    ));
    let stagger = Duration::from_secs(1) / k as u32;
    let watches = join_all((0..k).map(|i| {
        let (target, dialer) = (&target, &dialer);
        async move {
            tokio::time::sleep(stagger * i as u32).await;
            watch_one(i + 1, target, dialer, options, progress).await
        }
    }))
    .await;
    let mut idle = IdleReport {
        connections: k,
        max_idle_secs: options.max_idle.as_secs_f64(),
        closes_secs: Vec::new(),
        timeout_secs: None,
        close: None,
        closes_after_every_response: false,
        still_open: 0,
        usable_after_max_idle: Vec::new(),
        unsolicited_bytes: 0,
        errors: Vec::new(),
    };
    // The first connection served more than one request back to back: a close soon
    // after a response is then a short idle timeout, not a close after every response.
    let reusable = limit.limit.is_none_or(|n| n > 1);
    let prompt_close = |after: Duration| !reusable && report::is_prompt(after);
    let mut prompt = 0;
    for (i, w) in watches.into_iter().enumerate() {
        connections += 1;
        let w = match w {
            Ok(w) => w,
            Err(e) => {
                // One failed watch is a finding; the others still measured.
                progress(format!("connection {}: {e}", i + 1));
                idle.errors.push(e.to_string());
                continue;
            }
        };
        requests += w.requests;
        idle.unsolicited_bytes += w.unsolicited;
        match w.outcome {
            IdleOutcome::Closed(after, style) => {
                if prompt_close(after) {
                    prompt += 1;
                }
                idle.closes_secs.push(after.as_secs_f64());
                idle.close = Some(idle.close.map_or(style, |s| s.max_severity(style)));
            }
            IdleOutcome::ClosedByResponse => prompt += 1,
            IdleOutcome::Open { usable } => {
                idle.still_open += 1;
                idle.usable_after_max_idle.push(usable);
            }
        }
    }
    idle.closes_after_every_response = prompt > 0 && prompt == k - idle.errors.len();
    idle.timeout_secs = idle
        .closes_secs
        .iter()
        .copied()
        .filter(|&s| !prompt_close(Duration::from_secs_f64(s)))
        .reduce(f64::min);

    // The close after the last answer came no sooner than idle connections close:
    // that was the idle timeout, not a request limit (a limit's FIN follows the
    // answer at once).
    if let (Some(after), Some(timeout)) = (limit_close_after, idle.timeout())
        && after * 2 >= timeout
    {
        progress(format!(
            "the close {:.2} s after answer {} was the idle timeout, not a request limit",
            after.as_secs_f64(),
            limit.sent
        ));
        limit.limit = None;
        limit.close = None;
    }

    let verdict = report::verdict(&first, &limit, &idle);
    let recommended = report::recommend(&options.name, &options.url, &first, &limit, &idle);
    Ok(ProbeReport {
        url: options.url.clone(),
        address: addr,
        protocol: if target.fastcgi_script.is_some() {
            "fastcgi"
        } else {
            "http1"
        },
        tls: target.tls,
        first_response: first,
        requests_per_connection: limit,
        idle,
        fastcgi,
        verdict,
        recommended,
        connections_opened: connections,
        requests_sent: requests,
        elapsed_secs: started.elapsed().as_secs_f64(),
    })
}

/// The `https` settings the flags make, as `[upstream.NAME.tls]` would hold them,
/// checked as the config checks them but naming the flags.
///
/// # Errors
/// A TLS flag on a URL that is not `https`, a certificate without its key (or the
/// reverse), a server name that is no name, or a file that cannot be used.
fn tls_options(
    options: &ProbeOptions,
    target: &Target,
) -> Result<Option<UpstreamTlsConfig>, ProbeError> {
    let tls = UpstreamTlsConfig {
        ca_file: options.ca_file.clone(),
        server_name: options.server_name.clone(),
        client_cert: options.client_cert.clone(),
        client_key: options.client_key.clone(),
    };
    if !target.tls {
        return match tls_flags_given(&tls).first() {
            Some(flag) => Err(ProbeError::Usage(format!("{flag}: only for https:// URLs"))),
            None => Ok(None),
        };
    }
    let flag = |key: &str| format!("--{}", key.replace('_', "-"));
    match (&tls.client_cert, &tls.client_key) {
        (Some(_), None) => {
            return Err(ProbeError::Usage("--client-cert needs --client-key".into()));
        }
        (None, Some(_)) => {
            return Err(ProbeError::Usage("--client-key needs --client-cert".into()));
        }
        _ => {}
    }
    if let Some((key, message)) = tls.problems().into_iter().next() {
        return Err(ProbeError::Usage(format!("{}: {message}", flag(key))));
    }
    crate::upstream::tls::check(&tls)
        .map_err(|(key, message)| ProbeError::Usage(format!("{}: {message}", flag(key))))?;
    Ok(Some(tls))
}

/// The TLS flags set, by name.
fn tls_flags_given(tls: &UpstreamTlsConfig) -> Vec<&'static str> {
    [
        ("--ca-file", tls.ca_file.is_some()),
        ("--server-name", tls.server_name.is_some()),
        ("--client-cert", tls.client_cert.is_some()),
        ("--client-key", tls.client_key.is_some()),
    ]
    .into_iter()
    .filter_map(|(flag, set)| set.then_some(flag))
    .collect()
}

enum IdleOutcome {
    Closed(Duration, CloseStyle),
    /// The response itself ended the connection.
    ClosedByResponse,
    Open {
        usable: bool,
    },
}

struct Watched {
    outcome: IdleOutcome,
    requests: u32,
    unsolicited: usize,
}

/// One idle connection: a request, then watch until the upstream closes it or
/// `max_idle` passes (then one more request says whether it still works).
async fn watch_one(
    n: usize,
    target: &Target,
    dialer: &Dialer,
    options: &ProbeOptions,
    progress: &(dyn Fn(String) + Sync),
) -> Result<Watched, ProbeError> {
    let mut c = Conn::open(target, dialer, options.timeout).await?;
    let closed_by_response = |requests| Watched {
        outcome: IdleOutcome::ClosedByResponse,
        requests,
        unsolicited: 0,
    };
    match c.exchange().await? {
        Answer::Response(f) if f.closes => return Ok(closed_by_response(1)),
        Answer::Response(_) => {}
        Answer::Closed(_) => return Ok(closed_by_response(1)),
    }
    // Watched a little past `max_idle`, by the stated precision: an idle timeout of
    // `max_idle` itself (a round figure probed with that figure) closes on the border,
    // and a request sent at `max_idle` would meet that close on its way, unread,
    // and take a FIN after the idle time asked about for a connection dead when used.
    let until = c.idle_since + options.max_idle + report::TOLERANCE;
    match c.watch_close(until).await {
        Watch::Closed {
            after,
            style,
            unsolicited,
        } => {
            progress(format!(
                "connection {n}: closed by the upstream after {:.2} s idle, {}",
                after.as_secs_f64(),
                style.describe()
            ));
            Ok(Watched {
                outcome: IdleOutcome::Closed(after, style),
                requests: 1,
                unsolicited,
            })
        }
        Watch::Open { unsolicited } => {
            let usable = matches!(c.exchange().await, Ok(Answer::Response(_)));
            progress(format!(
                "connection {n}: still open after {:.0} s idle; {}",
                options.max_idle.as_secs_f64(),
                if usable {
                    "it answers a request"
                } else {
                    "but a request on it fails: dropped silently"
                }
            ));
            Ok(Watched {
                outcome: IdleOutcome::Open { usable },
                requests: 2,
                unsolicited,
            })
        }
    }
}

impl CloseStyle {
    /// Of two ways the same upstream closed, the one worth reporting.
    fn max_severity(self, other: CloseStyle) -> CloseStyle {
        let rank = |s| match s {
            CloseStyle::ConnectionClose => 0,
            CloseStyle::Fin => 1,
            CloseStyle::Rst => 2,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

/// The `probe` command: progress on stderr, the report (or `--json`) on stdout.
/// Returns the exit status: 0, or 1 if the probe could not finish.
pub async fn run_cli(options: ProbeOptions, json: bool) -> u8 {
    let progress = |line: String| eprintln!("probe: {line}");
    match run(&options, &progress).await {
        Ok(report) => {
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        eprintln!("probe: cannot render JSON: {e}");
                        return 1;
                    }
                }
            } else {
                print!("{}", report.render());
            }
            0
        }
        Err(e) => {
            eprintln!("probe {} failed: {e}", options.url);
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_and_fastcgi_urls() {
        let t = Target::parse("http://example.com:8080/health?x=1", None).unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.path.as_str(),
                t.host_header.as_str()
            ),
            ("example.com", 8080, "/health?x=1", "example.com:8080")
        );
        let t = Target::parse("http://[::1]", None).unwrap();
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("::1", 80, "/"));
        let t = Target::parse("fastcgi://127.0.0.1:9001", Some("/srv/i.php")).unwrap();
        assert_eq!(t.fastcgi_script.as_deref(), Some("/srv/i.php"));
        assert_eq!(t.port, 9001);
        let t = Target::parse("https://api.example.com/v1", None).unwrap();
        assert_eq!((t.port, t.tls, t.path.as_str()), (443, true, "/v1"));
        let t = Target::parse("fastcgi+unix:///run/php/php-fpm.sock", Some("/i.php")).unwrap();
        assert_eq!(
            t.unix.as_deref(),
            Some(std::path::Path::new("/run/php/php-fpm.sock"))
        );
        assert!(!t.tls);
    }

    #[test]
    fn refuses_what_it_cannot_probe_and_says_why() {
        let e = Target::parse("h2c://example.com/", None).unwrap_err();
        assert!(e.to_string().contains("https"), "lists what it takes: {e}");
        let e = Target::parse("fastcgi+unix://run/php.sock", Some("/i.php")).unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
        let e = Target::parse("fastcgi+unix:///run/php.sock", None).unwrap_err();
        assert!(e.to_string().contains("--script"), "{e}");
        let e = Target::parse("fastcgi://127.0.0.1:9000", None).unwrap_err();
        assert!(e.to_string().contains("--script"), "{e}");
        assert!(Target::parse("example.com", None).is_err());
        assert!(Target::parse("http://:80/", None).is_err());
        assert!(Target::parse("http://h:x/", None).is_err());
    }

    /// A query with no path before it was taken into the host ("cannot resolve
    /// example.com?x=1"), a fragment went into the request line (which servers
    /// answer 400, so the probe measured an error page), and user information into
    /// the host or the port ("bad port").
    #[test]
    fn a_query_without_a_path_a_fragment_and_user_information_are_read_as_urls_are() {
        let t = Target::parse("http://example.com?x=1#top", None).unwrap();
        assert_eq!(
            (t.host.as_str(), t.path.as_str(), t.host_header.as_str()),
            ("example.com", "/?x=1", "example.com")
        );
        let t = Target::parse("http://example.com/a#b/c", None).unwrap();
        assert_eq!((t.host.as_str(), t.path.as_str()), ("example.com", "/a"));
        let e = Target::parse("http://user:pw@example.com/", None).unwrap_err();
        assert!(e.to_string().contains("user information"), "{e}");
    }
}
