//! Upstreams: named groups of addresses, how a request picks one, and the attempt
//! loop with its safe retries.
//!
//! Data path: [`Upstream::forward`] picks a [`Peer`] (round robin or least
//! outstanding, skipping ejected ones), checks out a connection from its pool (method
//! aware: a request that cannot be retried only takes a connection that went idle
//! moments ago, after a peek at its socket), sends, and on failure decides from
//! [`retry::Replay`], the failure's [`Delivery`] and the retry budget whether to go
//! again on a new connection. An HTTP/2 address shares its connections: a request
//! takes a stream, and one the upstream refused (GOAWAY, `REFUSED_STREAM`) is retried
//! like one never sent, whatever its method.

pub mod error;
pub mod fastcgi;
pub mod figures;
pub mod http1;
pub mod http2;
pub mod io;
pub mod peer;
pub mod pool;
pub mod retry;
pub mod tls;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::task::{Poll, ready};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::time::Instant;

use self::error::{Delivery, Kind, UpstreamError};
use self::figures::{CloseReason, RetryReason, UpstreamFigures};
use self::peer::{Outstanding, Peer, PeerAddr, TlsSetup};
use self::pool::idle::Take;
use self::pool::{Client, PooledConn, Want};
use self::retry::{Replay, RetryBudget};
use crate::body::RequestBody;
use crate::config::{Balance, Endpoint, UpstreamConfig};

/// A named upstream from `[upstream.NAME]`.
pub struct Upstream {
    pub name: Arc<str>,
    pub config: UpstreamConfig,
    peers: ArcSwap<Vec<Arc<Peer>>>,
    next: AtomicUsize,
    budget: RetryBudget,
    /// The TLS client shared by every address (and so its session cache).
    tls: TlsSetup,
    /// What the TLS files held when this upstream was built.
    tls_fingerprint: u64,
    /// Carried over from the upstream of the same name a reload replaced, so that its
    /// counters go on (and requests it still serves count in them).
    pub figures: Arc<UpstreamFigures>,
    /// Replaced by a reload: it stops resolving its names again (its successor does,
    /// and may share its peers).
    retired: AtomicBool,
}

/// A response body as the upstream protocol delivers it.
pub enum Payload {
    /// hyper's body (HTTP/2, HTTP/1.1 over TLS).
    Http(Incoming),
    /// Plain HTTP/1.1: read from the connection as the body is polled; `empty` when
    /// the response has no body at all, `hop_by_hop_removed` when the codec left the
    /// hop-by-hop fields out of the head already.
    Http1 {
        empty: bool,
        hop_by_hop_removed: bool,
    },
    /// FastCGI STDOUT: what arrived with the CGI head; the rest is read from the
    /// connection as the body is polled.
    FastCgi(bytes::Bytes),
}

/// Fields the proxy sets on a request, kept beside its head: holdfast's own HTTP/1.1
/// encoder writes them as it writes the head (no header-map insertions, and no
/// growth of the map), and [`SetFields::apply`] puts them into the map for every
/// other protocol.
#[derive(Debug, Clone, Default)]
pub struct SetFields {
    /// `X-Forwarded-For/-Proto/-Host`: see `proxy::headers::forwarded`.
    pub forwarded: crate::proxy::headers::Forwarded,
    /// `TE: trailers`, the one `TE` passed on (after hop-by-hop removal took it).
    pub te_trailers: bool,
    pub host: Option<http::HeaderValue>,
}

static TE_TRAILERS: http::HeaderValue = http::HeaderValue::from_static("trailers");
static VIA: http::HeaderValue = http::HeaderValue::from_static(crate::proxy::headers::VIA_VALUE);
static VIA_NAME: http::HeaderName = http::header::VIA;

impl SetFields {
    /// Puts the fields into `headers` (and `Via`).
    pub fn apply(self, headers: &mut http::HeaderMap) {
        // Room for all of them at once, rather than a rehash each time the map fills.
        headers.reserve(6);
        if self.te_trailers {
            headers.insert(http::header::TE, TE_TRAILERS.clone());
        }
        crate::proxy::headers::insert_forwarded(headers, self.forwarded);
        headers.append(http::header::VIA, VIA.clone());
        if let Some(v) = self.host {
            headers.insert(http::header::HOST, v);
        }
    }

    /// The fields as [`http1::codec::encode_request_head_with`] takes them: replaced
    /// ones (a `None` value removes); `Via` is [`SetFields::appended`].
    pub fn replaced(&self) -> ([(&http::HeaderName, Option<&http::HeaderValue>); 5], usize) {
        use crate::proxy::headers::{X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO};
        static NAMES: [http::HeaderName; 5] = [
            X_FORWARDED_FOR,
            X_FORWARDED_PROTO,
            X_FORWARDED_HOST,
            http::header::HOST,
            http::header::TE,
        ];
        let f = &self.forwarded;
        let mut out = [(&NAMES[0], None); 5];
        let mut n = 0;
        let mut push = |name, value| {
            out[n] = (name, value);
            n += 1;
        };
        if let Some(v) = &f.xff {
            push(&NAMES[0], Some(v));
        }
        if let Some(v) = &f.xfp {
            push(&NAMES[1], Some(v));
        }
        if let Some(v) = &f.xfh {
            push(&NAMES[2], v.as_ref());
        }
        if let Some(v) = &self.host {
            push(&NAMES[3], Some(v));
        }
        if self.te_trailers {
            push(&NAMES[4], Some(&TE_TRAILERS));
        }
        (out, n)
    }

    /// `Via`, appended after the request's own.
    pub fn appended() -> [(&'static http::HeaderName, &'static http::HeaderValue); 1] {
        [(&VIA_NAME, &VIA)]
    }
}

/// CGI parameters for a FastCGI upstream, built by the proxy from the route and
/// carried in the request's extensions.
#[derive(Clone, Debug)]
pub struct FastCgiParams(pub Arc<Vec<(bytes::Bytes, bytes::Bytes)>>);

/// A response on its way back, with the connection it came on.
pub struct Exchange {
    pub response: Response<Payload>,
    pub conn: PooledConn,
    pub peer: Arc<Peer>,
    pub attempts: u32,
    /// Time from sending the request to its response head.
    pub ttfb: Duration,
    /// Counts the request against its address until the response ends.
    pub outstanding: Outstanding,
}

/// A request that failed for good.
pub struct Failure {
    pub error: UpstreamError,
    pub peer: Option<Arc<Peer>>,
    pub attempts: u32,
    /// Whether the last attempt's connection was a reused one; `None` if it got no
    /// connection (no address, no slot within `queue_timeout`).
    pub reused: Option<bool>,
}

impl Upstream {
    /// Builds an upstream, resolving its addresses. Must run inside a Tokio runtime.
    ///
    /// `previous`: the upstream of this name that a reload replaces. Its figures go
    /// on here; and when every setting its peers were built from is the same (pool,
    /// connect and write timeouts, TCP, HTTP/2, health, protocol, TLS and its files),
    /// each address it still has keeps its peer: its pool, with the connections in
    /// use by requests of the old config, stays the one `max_connections` bounds.
    /// Otherwise an address gets a new pool, which takes over the old one's figures.
    pub async fn new(
        name: &str,
        config: &UpstreamConfig,
        previous: Option<&Upstream>,
    ) -> Arc<Upstream> {
        let tls_fingerprint = tls::fingerprint(config.tls.as_ref());
        let same_peers = previous.filter(|p| {
            p.tls_fingerprint == tls_fingerprint && same_peer_settings(&p.config, config)
        });
        let tls: TlsSetup = match same_peers {
            Some(p) => p.tls.clone(),
            None => config.uses_tls().then(|| {
                let settings = config.tls.clone().unwrap_or_default();
                tls::TlsClient::new(&settings, config.http_version)
                    .map(Arc::new)
                    .map_err(|e| {
                        tracing::error!(upstream = name, error = %e, "cannot set up TLS; requests to this upstream will fail");
                        Arc::from(e)
                    })
            }),
        };
        let old_peers = previous.map(|p| p.peers()).unwrap_or_default();
        let addrs = resolve_all(name, config, &old_peers).await;
        let peers = addrs
            .into_iter()
            .map(|(a, host)| {
                let old = old_peers.iter().find(|p| p.addr == a);
                match old.filter(|p| same_peers.is_some() && p.host() == &*host && !p.is_removed())
                {
                    Some(kept) => kept.clone(),
                    None => Peer::new(a, host, config, tls.clone(), old.map(|p| &**p)),
                }
            })
            .collect();
        let up = Arc::new(Upstream {
            name: Arc::from(name),
            config: config.clone(),
            peers: ArcSwap::from_pointee(peers),
            next: AtomicUsize::new(0),
            budget: RetryBudget::new(&config.retry),
            tls,
            tls_fingerprint,
            figures: previous.map(|p| p.figures.clone()).unwrap_or_default(),
            retired: AtomicBool::new(false),
        });
        if needs_resolving(config) {
            tokio::spawn(re_resolve(Arc::downgrade(&up), config.resolve_every.get()));
        }
        up
    }

    /// Every connection of this upstream is plain HTTP/1.1, which holdfast speaks
    /// itself (so [`SetFields`] can wait for the encoder).
    pub fn speaks_plain_http1(&self) -> bool {
        self.config.protocol() == crate::config::Protocol::Http1
            && !self.config.uses_tls()
            && self.config.effective_http_version() == crate::config::HttpVersion::Http1
    }

    pub fn peers(&self) -> Arc<Vec<Arc<Peer>>> {
        self.peers.load_full()
    }

    /// Sends a request, retrying only when that is safe.
    ///
    /// # Errors
    /// The last attempt's failure, with whether the request reached the upstream.
    /// `total_deadline` is the request's `timeouts.total`, if any; the caller bounds
    /// the whole call by it as well.
    ///
    /// An async block rather than an `async fn`: an `async fn` keeps each argument
    /// twice in its future (captured, then moved into a local; rust-lang/rust#62958),
    /// and this future is inside every request's, which is moved as a whole.
    pub fn forward(
        &self,
        parts: http::request::Parts,
        set: Option<SetFields>,
        body: RequestBody,
        total_deadline: Option<Instant>,
    ) -> impl Future<Output = Result<Exchange, Failure>> {
        let replay = Replay::classify(&parts.method, &parts.headers);
        let mut parts = Some(parts);
        let mut body = Some(body);
        let mut set = set;
        async move {
            let max_attempts = self.config.retry.attempts.max(1);
            self.figures.requests.fetch_add(1, Relaxed);
            self.budget.deposit();

            let mut attempts = 0;
            let mut fresh_only = false;
            let mut avoid: Option<Arc<Peer>> = None;
            // An earlier attempt may have reached the upstream: the final failure must not
            // say "not sent" because the last attempt was not.
            let mut sent_before = false;
            loop {
                attempts += 1;
                let Some(peer) = self.pick(avoid.as_ref()) else {
                    return Err(Failure {
                        error: UpstreamError::new(Kind::NoPeer, Delivery::NotSent)
                            .sent_before(sent_before),
                        peer: None,
                        attempts,
                        reused: None,
                    });
                };
                let outstanding = peer.track();
                let last_try = attempts >= max_attempts;
                // Whether a reused connection that swallows this attempt could be
                // followed by another: not for a method that may not be sent twice, a
                // body streamed from the client (it cannot be sent again), or the last
                // attempt. A request that could not takes only a connection that went
                // idle moments ago, after a look at its socket.
                let resendable = replay == Replay::Safe
                    && !last_try
                    && !matches!(body, Some(RequestBody::Streaming(_)));
                let (want, check_idle) = match (fresh_only, resendable) {
                    (true, _) => (Want::Fresh, false),
                    (false, true) => (Want::Idle(Take::MostRecent), false),
                    (false, false) => (
                        Want::Idle(Take::IdleAtMost(peer.pool.safe_reuse_age())),
                        true,
                    ),
                };
                // The total deadline bounds the wait for a slot and the connect too, so
                // that running out there is reported as a request never sent. (Built
                // in each arm, not bound to a local: see `Proxy::handle`.)
                let checked_out = match total_deadline {
                    None => peer.checkout(want, check_idle).await,
                    Some(t) => tokio::time::timeout_at(t, peer.checkout(want, check_idle))
                        .await
                        .unwrap_or_else(|_| {
                            Err(UpstreamError::new(Kind::TotalTimeout, Delivery::NotSent))
                        }),
                };
                let mut conn = match checked_out {
                    Ok(c) => c,
                    Err(error) => {
                        if error.counts_against_health() {
                            self.note_failure(&peer, &error);
                        }
                        // Opening the connection failed (connect, TLS, the HTTP/2
                        // handshake): nothing was sent, another address may do.
                        let opening_failed = error.is_connect()
                            || error.kind() == Kind::Protocol
                                && error.delivery() == Delivery::NotSent;
                        if opening_failed && !last_try && self.allow_retry(RetryReason::NotSent) {
                            avoid = Some(peer);
                            continue;
                        }
                        // A connection was tried only if opening one failed.
                        return Err(Failure {
                            error: error.sent_before(sent_before),
                            peer: Some(peer),
                            attempts,
                            reused: opening_failed.then_some(false),
                        });
                    }
                };
                // Keep a copy for another attempt only if one can happen.
                let attempt_body = match body
                    .as_ref()
                    .and_then(|b| if last_try { None } else { b.try_clone() })
                {
                    Some(copy) => copy,
                    None => body.take().unwrap_or(RequestBody::Empty),
                };
                let reused_since = conn.reused_since();
                let settled_at = conn.reused_settled_at();
                // The pool read the clock as it handed the connection over, just now.
                let sent_at = conn.handed_at().unwrap_or_else(Instant::now);
                // The request's total deadline is enforced here too while a connection is
                // held, so that the connection it closes counts as a timeout, not as
                // abandoned by a cancelled request.
                let due = http1::conn::HeadDue {
                    timeout: self.config.timeouts.response_headers.get(),
                    total: total_deadline,
                };
                let sent = if let Some(head) = parts.as_ref().filter(|_| conn.is_plain_http1()) {
                    // Sent from the borrowed head, which stays for another attempt;
                    // the deadline is kept by the connection's own timer (and a
                    // streamed body's time to first byte counts from its end).
                    match send_http1(&mut conn, head, set.as_ref(), attempt_body, sent_at, due)
                        .await
                    {
                        Ok(Err((e, returned))) => {
                            body = returned.or(body);
                            Ok(Err((e, None)))
                        }
                        Ok(Ok(response)) => Ok(Ok(response)),
                        Err(TimedOut) => Err(TimedOut),
                    }
                } else {
                    // hyper takes the request: the head is copied only when a retry could
                    // need it after that, a stale reused connection (idempotent requests),
                    // a refused HTTP/2 stream, or the first request on a new HTTP/1.1
                    // connection over TLS, which may meet the upstream refusing the
                    // handshake only then (TLS 1.3, a client certificate refused; see
                    // `UpstreamError::from_hyper`). A request that never left comes back
                    // whole from hyper.
                    let keep_head = !last_try
                        && (conn.is_shared()
                            || replay == Replay::Safe && reused_since.is_some()
                            || reused_since.is_none()
                                && matches!(conn.client(), Client::Http1Tls(_)));
                    let mut attempt_body = attempt_body;
                    // FastCGI writes a body held whole as the script reads it: it is
                    // timed as one streamed (see `FastCgiConn::watch_body`).
                    let streamed = match conn.client() {
                        Client::FastCgi(c) => c.watch_body(&mut attempt_body),
                        _ => attempt_body.watch_end(),
                    };
                    // In a block of its own: the moved-from head would otherwise keep
                    // its room in this future, and so in every request's.
                    let req = {
                        let Some(mut head) = parts.take() else {
                            unreachable!("every attempt starts with the request head")
                        };
                        if let Some(set) = set.take() {
                            set.apply(&mut head.headers);
                        }
                        if keep_head {
                            parts = Some(clone_parts(&head));
                        }
                        Request::from_parts(head, attempt_body)
                    };
                    head_due(send(&mut conn, req), streamed, sent_at, due).await
                };
                let result = match sent {
                    Ok(r) => r,
                    Err(_) => {
                        conn.set_close_reason(CloseReason::Timeout);
                        // The total deadline, if the one that passed was that (a
                        // clock reading, on this failure only).
                        let kind = if total_deadline.is_some_and(|t| t <= Instant::now()) {
                            Kind::TotalTimeout
                        } else {
                            Kind::ResponseHeadersTimeout
                        };
                        let error = UpstreamError::new(kind, Delivery::MaybeSent);
                        return Err(Failure {
                            error,
                            peer: Some(peer),
                            attempts,
                            reused: Some(reused_since.is_some()),
                        });
                    }
                };
                match result {
                    Ok(response) => {
                        peer.health.on_success();
                        // Plain HTTP/1: dated as the answer's first bytes were read,
                        // no clock reading of its own. Over TLS the first bytes read
                        // may be a session ticket instead.
                        let ttfb = conn
                            .answer_began(sent_at)
                            .filter(|_| conn.is_plain_http1())
                            .map_or_else(|| sent_at.elapsed(), |at| at - sent_at);
                        conn.responded(ttfb);
                        if response.status() == http::StatusCode::SWITCHING_PROTOCOLS {
                            conn.hand_over();
                        }
                        if let Payload::Http(_) | Payload::Http1 { .. } = response.body() {
                            conn.on_response_head(response.headers(), response.version());
                        }
                        // The request's field map is done with: it holds the next
                        // response's fields on this connection, and no map is made.
                        if let (Some(head), Client::Http1(c)) = (parts.as_mut(), conn.client()) {
                            c.recycle_map(std::mem::take(&mut head.headers));
                        }
                        return Ok(Exchange {
                            response,
                            conn,
                            peer,
                            attempts,
                            ttfb,
                            outstanding,
                        });
                    }
                    Err((error, returned)) => {
                        // The request's own body failed: that is the cause (hyper's
                        // HTTP/2 client reports only the stream it reset for it).
                        let error = match conn.body_failure() {
                            Some(crate::body::BodyFailure::Gone) if !error.client_gone() => {
                                UpstreamError::new(Kind::ClientBody, error.delivery())
                                    .with_cause(crate::body::ClientGone)
                            }
                            Some(failure) => {
                                let kind = match failure {
                                    crate::body::BodyFailure::TooLarge => Kind::BodyTooLarge,
                                    _ => Kind::ClientBody,
                                };
                                if error.kind() == kind {
                                    error
                                } else {
                                    UpstreamError::new(kind, error.delivery()).with_cause(error)
                                }
                            }
                            None => error,
                        };
                        if let Some(req) = returned {
                            let (head, returned_body) = req.into_parts();
                            parts = Some(head);
                            body = Some(returned_body);
                        }
                        let requests = conn.requests();
                        let shared = conn.is_shared();
                        conn.set_close_reason(if error.is_timeout() {
                            CloseReason::Timeout
                        } else {
                            CloseReason::Error
                        });
                        drop(conn);
                        let stale = reused_since.is_some() && error.kind() == Kind::Closed;
                        if let Some(since) = reused_since.filter(|_| stale && !shared) {
                            // The pool's own matter, not the address's health.
                            // The late bound for both (see `IdleEntry`): evicts
                            // more, learns a shorter age.
                            let settled = settled_at.unwrap_or(since);
                            peer.pool
                                .on_stale(since, settled, settled.elapsed(), requests);
                        } else if error.counts_against_health() {
                            self.note_failure(&peer, &error);
                        }
                        let reason = match (error.delivery(), stale, replay) {
                            (Delivery::NotSent, _, _) if error.kind() == Kind::Refused => {
                                Some(RetryReason::Refused)
                            }
                            (Delivery::NotSent, _, _) => Some(RetryReason::NotSent),
                            (Delivery::MaybeSent, true, Replay::Safe) => {
                                Some(RetryReason::StaleConnection)
                            }
                            _ => None,
                        };
                        sent_before |= error.delivery() == Delivery::MaybeSent;
                        let can =
                            reason.is_some() && !last_try && body.is_some() && parts.is_some();
                        if let Some(reason) = reason.filter(|_| can)
                            && self.allow_retry(reason)
                        {
                            tracing::debug!(upstream = %self.name, address = %peer.label, reason = reason.as_str(), %error, "retrying on a new connection");
                            fresh_only = true;
                            // The address refused the TLS handshake (see `keep_head`):
                            // another one may do, as after a failed connect.
                            if error.is_connect() {
                                avoid = Some(peer);
                            }
                            continue;
                        }
                        return Err(Failure {
                            error: error.sent_before(sent_before),
                            peer: Some(peer),
                            attempts,
                            reused: Some(reused_since.is_some()),
                        });
                    }
                }
            }
        }
    }

    fn allow_retry(&self, reason: RetryReason) -> bool {
        if self.budget.withdraw() {
            self.figures.retried(reason);
            true
        } else {
            self.figures.retry_budget_exhausted.fetch_add(1, Relaxed);
            false
        }
    }

    fn note_failure(&self, peer: &Peer, error: &UpstreamError) {
        if let Some(span) = peer.health.on_failure() {
            tracing::warn!(upstream = %self.name, address = %peer.label, ejected_for = ?span, %error, "address ejected after consecutive failures");
        }
    }

    /// Picks an address: skips ejected and removed ones (unless every one is ejected:
    /// then any, rather than fail everything) and `avoid` when there is a choice.
    fn pick(&self, avoid: Option<&Arc<Peer>>) -> Option<Arc<Peer>> {
        let peers = self.peers.load();
        let n = peers.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            return Some(peers[0].clone());
        }
        let now = Instant::now();
        let avoided = |p: &Arc<Peer>| avoid.is_some_and(|a| Arc::ptr_eq(a, p));
        let usable = |p: &Arc<Peer>| !p.is_removed() && p.health.is_available(now) && !avoided(p);
        // Every address ejected (or avoided): any that is not removed rather than fail
        // everything, from `start` on so that load and retries spread, the one to avoid
        // last.
        let list: &[Arc<Peer>] = &peers;
        let fallback = |start: usize| {
            let from_start = || (0..n).map(move |i| &list[(start + i) % n]);
            from_start()
                .find(|p| !p.is_removed() && !avoided(p))
                .or_else(|| from_start().find(|p| !p.is_removed()))
        };
        match self.config.balance {
            Balance::RoundRobin => {
                let start = self.next.fetch_add(1, Relaxed);
                // The next usable address, passing over those with every connection
                // busy while another has room (as nginx passes over a server at
                // `max_conns`): a request queued there waited for a slot, up to
                // `queue_timeout` and a 503, beside an address with connections free.
                // When all are full, the first usable one queues it.
                let mut first_usable = None;
                (0..n)
                    .map(|i| &peers[(start + i) % n])
                    .filter(|p| usable(p))
                    .find(|p| {
                        first_usable.get_or_insert(*p);
                        !p.is_full()
                    })
                    .or(first_usable)
                    .or_else(|| fallback(start))
            }
            Balance::LeastOutstanding => {
                // Power of two choices: two different random candidates, the less busy
                // wins (drawn with replacement, a hung address of two would still get a
                // quarter of the requests).
                let i = fastrand::usize(..n);
                let a = &peers[i];
                let b = &peers[(i + 1 + fastrand::usize(..n - 1)) % n];
                let pick = match (usable(a), usable(b)) {
                    (true, true) => Some(if b.outstanding() < a.outstanding() {
                        b
                    } else {
                        a
                    }),
                    (true, false) => Some(a),
                    (false, true) => Some(b),
                    (false, false) => peers
                        .iter()
                        .filter(|p| usable(p))
                        .min_by_key(|p| p.outstanding()),
                };
                // A full pick (every connection busy) yields to the least busy usable
                // address with room, if any (see round robin).
                let pick = match pick {
                    Some(p) if p.is_full() => peers
                        .iter()
                        .filter(|q| usable(q) && !q.is_full())
                        .min_by_key(|q| q.outstanding())
                        .or(Some(p)),
                    other => other,
                };
                pick.or_else(|| fallback(fastrand::usize(..n)))
            }
        }
        .cloned()
    }

    /// Closes idle connections of every address (a drain).
    pub fn drain(&self) {
        for p in self.peers.load().iter() {
            p.pool.drain();
        }
    }

    /// A reload replaced (or removed) this upstream with `successor`: it stops
    /// resolving again, and the addresses the successor did not keep drain: their idle
    /// connections close, and those in use close when their requests end.
    fn retire(&self, successor: Option<&Upstream>) {
        self.retired.store(true, Relaxed);
        let kept = successor.map(|s| s.peers()).unwrap_or_default();
        for p in self.peers.load().iter() {
            if kept.iter().any(|k| Arc::ptr_eq(k, p)) {
                continue;
            }
            p.pool.drain();
            // A new pool for the address, sharing this one's slots: its limit applies
            // from now on, to both.
            if let Some(next) = kept.iter().find(|k| k.pool.shares_slots_with(&p.pool)) {
                next.pool.take_over();
            }
        }
    }
}

/// Whether peers built for `a` serve `b` unchanged: every setting of `b` that a
/// [`Peer`] (its pool, its connections) is built from is the same in `a` (the TLS
/// files' contents are compared by the caller).
fn same_peer_settings(a: &UpstreamConfig, b: &UpstreamConfig) -> bool {
    a.pool == b.pool
        && a.http2 == b.http2
        && a.tcp == b.tcp
        && a.health == b.health
        && a.timeouts.connect == b.timeouts.connect
        && a.timeouts.write == b.timeouts.write
        && a.protocol() == b.protocol()
        && a.uses_tls() == b.uses_tls()
        && a.effective_http_version() == b.effective_http_version()
        && a.http_version == b.http_version
        && a.tls == b.tls
}

/// The outcome of one attempt: a response, or an error and, if the request provably
/// never left, the request itself for another attempt.
type SendResult = Result<Response<Payload>, (UpstreamError, Option<Request<RequestBody>>)>;

/// Starts one attempt on hyper's clients. On HTTP/1 over TLS the request is queued to
/// the connection right here and only hyper's small response future is awaited: every layer of `async fn`
/// between the request and the connection would copy the request again and add its
/// size to every request's future. The other protocols' futures are boxed for the
/// same reason.
#[expect(
    clippy::result_large_err,
    reason = "the error carries the unsent request back for another attempt, by design"
)]
fn send(
    conn: &mut PooledConn,
    mut req: Request<RequestBody>,
) -> impl Future<Output = SendResult> + Send + '_ {
    use futures_util::FutureExt;
    use futures_util::future::Either;
    // hyper keeps sending a streamed body after the response ended (an early answer):
    // the connection is not pooled until the body is all sent.
    // On HTTP/2 the stream stays open until then, and is counted until then.
    if let Client::Http1Tls(_) | Client::Http2(_) = conn.client()
        && let Some(ended) = req.body_mut().watch_end()
    {
        conn.watch_body_end(ended);
    }
    match conn.client() {
        Client::Http1Tls(sender) => {
            Either::Left(http1::send(sender, req).map(|r| r.map(|resp| resp.map(Payload::Http))))
        }
        _ => Either::Right(Box::pin(send_other(conn, req))),
    }
}

/// The response head did not come by its deadline.
struct TimedOut;

/// Awaits `answer`, from a protocol handle that takes the request's body as it goes
/// out (hyper's clients, FastCGI), until its head is due: `due.after(sent_at)` for a
/// request sent whole with its head. One whose body streams from the client (`body`)
/// is timed from the body's end, and given another `due.timeout` each time one passes
/// with more of it taken, as plain HTTP/1.1 is (see
/// [`Http1Conn::set_deadline`](http1::conn::Http1Conn::set_deadline)): timed from its
/// head, an upload slower than `response_headers` got 504 while it still arrived.
/// The clock is read only when a deadline passes.
///
/// Not an `async fn`: its state would hold `answer` twice, and it is part of every
/// request's future (plain HTTP/1 included, which never takes this path). A request
/// sent whole awaits a plain [`tokio::time::Timeout`]; the streamed case is boxed.
fn head_due<F: Future + Send>(
    answer: F,
    body: Option<Arc<crate::body::BodyEnd>>,
    sent_at: Instant,
    due: http1::conn::HeadDue,
) -> impl Future<Output = Result<F::Output, TimedOut>> + Send {
    use futures_util::FutureExt;
    use futures_util::future::Either;
    let Some(body) = body else {
        return Either::Left(
            tokio::time::timeout_at(due.after(sent_at), answer).map(|r| r.map_err(|_| TimedOut)),
        );
    };
    Either::Right(Box::pin(async move {
        let mut answer = std::pin::pin!(answer);
        let mut deadline = due.after(sent_at);
        let mut taken = body.taken();
        loop {
            if let Ok(out) = tokio::time::timeout_at(deadline, answer.as_mut()).await {
                return Ok(out);
            }
            let now = Instant::now();
            let next = match body.ended_at() {
                Some(end) => due.after(end),
                // Stalled (its gaps are the listener's `body_timeout`'s to bound) or failed.
                None if body.taken() == taken || body.failure().is_some() => {
                    return Err(TimedOut);
                }
                None => {
                    taken = body.taken();
                    due.after(now)
                }
            };
            if next <= now {
                return Err(TimedOut);
            }
            deadline = next;
        }
    }))
}

/// A response, or the failure with the body if none of it was sent.
type Http1Sent = Result<Response<Payload>, (UpstreamError, Option<RequestBody>)>;

/// One attempt on a plain HTTP/1.1 connection: the head is encoded from a borrow
/// and queued now; only a small poll of the connection is awaited, until the head is
/// due (`due`, see [`Http1Conn::set_deadline`](http1::conn::Http1Conn::set_deadline)).
/// On failure the body comes back if nothing was sent.
fn send_http1<'a>(
    conn: &'a mut PooledConn,
    head: &http::request::Parts,
    set: Option<&SetFields>,
    body: RequestBody,
    sent_at: Instant,
    due: http1::conn::HeadDue,
) -> impl Future<Output = Result<Http1Sent, TimedOut>> + Send + 'a {
    use futures_util::future::Either;
    let Client::Http1(c) = conn.client() else {
        unreachable!("send_http1 is only called for plain HTTP/1.1")
    };
    match c.begin(head, set, body) {
        Ok(()) => {
            c.set_deadline(sent_at, due);
            Either::Left(std::future::poll_fn(move |cx| {
                if let Poll::Ready(r) = c.poll_response(cx) {
                    return Poll::Ready(Ok(r.map_err(|e| unsent_body(c, e))));
                }
                ready!(c.poll_deadline(cx));
                Poll::Ready(Err(TimedOut))
            }))
        }
        Err((e, body)) => Either::Right(std::future::ready(Ok(Err((e, Some(body)))))),
    }
}

/// A failed attempt on a plain HTTP/1.1 connection, with its body back if not a
/// byte of the request left (a streamed body is not cloned for another attempt).
fn unsent_body(
    c: &mut http1::conn::Http1Conn,
    e: UpstreamError,
) -> (UpstreamError, Option<RequestBody>) {
    let body = if e.delivery() == Delivery::NotSent {
        c.take_unsent_body()
    } else {
        None
    };
    (e, body)
}

/// The boxed side of [`send`]: HTTP/2 and FastCGI (and HTTP/1, which `send` handles
/// itself, so that this stays complete).
async fn send_other(conn: &mut PooledConn, req: Request<RequestBody>) -> SendResult {
    match conn.client() {
        Client::Http1(c) => {
            let (head, body) = req.into_parts();
            if let Err((e, body)) = c.begin(&head, None, body) {
                return Err((e, Some(Request::from_parts(head, body))));
            }
            std::future::poll_fn(|cx| c.poll_response(cx))
                .await
                .map_err(|e| {
                    let (e, body) = unsent_body(c, e);
                    (e, body.map(|b| Request::from_parts(head, b)))
                })
        }
        Client::Http1Tls(sender) => http1::send(sender, req)
            .await
            .map(|resp| resp.map(Payload::Http)),
        Client::Http2(client) => http2::send(client, req)
            .await
            .map(|resp| resp.map(Payload::Http)),
        Client::FastCgi(c) => {
            let Some(params) = req.extensions().get::<FastCgiParams>().cloned() else {
                let e = UpstreamError::new(Kind::Protocol, Delivery::NotSent)
                    .with_cause("a FastCGI upstream needs a route with [route.fastcgi] settings");
                return Err((e, Some(req)));
            };
            let (head, body) = req.into_parts();
            match c.send(&params.0, body).await {
                Ok(response) => fastcgi::into_response(response).map_err(|e| (e, None)),
                Err((e, returned)) => Err((e, returned.map(|b| Request::from_parts(head, b)))),
            }
        }
    }
}

fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    if let Some(p) = parts.extensions.get::<FastCgiParams>() {
        req.extensions_mut().insert(p.clone());
    }
    req.into_parts().0
}

fn needs_resolving(config: &UpstreamConfig) -> bool {
    config.addresses.iter().any(|a| match &a.endpoint {
        Endpoint::Tcp { host, .. } => host.parse::<std::net::IpAddr>().is_err(),
        Endpoint::Unix(_) => false,
    })
}

/// Every address of an upstream, each with the host it was configured with (the TLS
/// name). A name that fails to resolve is logged and keeps the addresses it had among
/// `known` (the peers in use): a resolver's blip is not the name's addresses gone.
async fn resolve_all(
    name: &str,
    config: &UpstreamConfig,
    known: &[Arc<Peer>],
) -> Vec<(PeerAddr, Arc<str>)> {
    let mut out = Vec::new();
    for a in &config.addresses {
        match &a.endpoint {
            Endpoint::Unix(p) => out.push((PeerAddr::Unix(p.clone()), Arc::from("localhost"))),
            Endpoint::Tcp { host, port } => {
                let named: Arc<str> = Arc::from(host.as_str());
                match host.parse::<std::net::IpAddr>() {
                    Ok(ip) => out.push((PeerAddr::Tcp((ip, *port).into()), named)),
                    Err(_) => match lookup_host(host, *port).await {
                        Ok(addrs) => {
                            out.extend(addrs.into_iter().map(|a| (PeerAddr::Tcp(a), named.clone())))
                        }
                        Err(e) => {
                            let had = known
                                .iter()
                                .filter(|p| p.host() == host && !p.is_removed())
                                .map(|p| (p.addr.clone(), named.clone()));
                            let before = out.len();
                            out.extend(had);
                            let kept = out.len() - before;
                            tracing::warn!(upstream = name, %host, error = %e, kept, "cannot resolve upstream host; keeping the addresses it had")
                        }
                    },
                }
            }
        }
    }
    // One peer per address, however many names lead to it: two peers with one
    // address would be two pools and two `/metrics` series with the same labels.
    let mut seen = std::collections::HashSet::new();
    out.retain(|(a, _)| seen.insert(a.clone()));
    out
}

/// The system resolver (`getaddrinfo`) on a thread of its own, not on tokio's
/// blocking pool: a runtime waits for its blocking tasks as it shuts down, so one
/// lookup hung on a resolver that never answers would keep a drained process from
/// exiting. Abandoned, the thread ends with its lookup, or with the process.
pub(crate) async fn lookup_host(
    host: &str,
    port: u16,
) -> std::io::Result<Vec<std::net::SocketAddr>> {
    use std::net::ToSocketAddrs;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let host = host.to_owned();
    std::thread::Builder::new()
        .name("holdfast-resolve".into())
        .spawn(move || {
            #[cfg(test)]
            tests::hang_if_asked(&host);
            #[cfg(test)]
            if let Some(answer) = tests::flaky_answer(&host, port) {
                let _ = tx.send(answer);
                return;
            }
            let _ = tx.send(
                (host.as_str(), port)
                    .to_socket_addrs()
                    .map(Iterator::collect),
            );
        })?;
    rx.await
        .unwrap_or_else(|_| Err(std::io::Error::other("the resolver thread ended")))
}

/// Resolves host names again every `every`; addresses that disappeared are drained
/// (no new requests; requests in flight finish), new ones get pools.
async fn re_resolve(up: std::sync::Weak<Upstream>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(up) = up.upgrade() else { return };
        if up.retired.load(Relaxed) {
            return;
        }
        let current = up.peers.load_full();
        let addrs = resolve_all(&up.name, &up.config, &current).await;
        if addrs.is_empty() {
            continue; // Keep what works rather than empty the upstream on a DNS blip.
        }
        if current
            .iter()
            .map(|p| &p.addr)
            .eq(addrs.iter().map(|(a, _)| a))
        {
            continue;
        }
        let next: Vec<Arc<Peer>> = addrs
            .iter()
            .map(|(a, host)| {
                current
                    .iter()
                    .find(|p| &p.addr == a)
                    .cloned()
                    .unwrap_or_else(|| {
                        Peer::new(a.clone(), host.clone(), &up.config, up.tls.clone(), None)
                    })
            })
            .collect();
        for gone in current
            .iter()
            .filter(|p| !addrs.iter().any(|(a, _)| a == &p.addr))
        {
            tracing::info!(upstream = %up.name, address = %gone.label, "address no longer resolves; draining it");
            gone.remove();
        }
        up.peers.store(Arc::new(next));
    }
}

/// Every upstream by name. Reloads keep the `Upstream` (and so its pools) of every
/// upstream whose config did not change.
#[derive(Default, Clone)]
pub struct Upstreams {
    by_name: BTreeMap<String, Arc<Upstream>>,
}

impl Upstreams {
    pub async fn build(
        configs: &BTreeMap<String, UpstreamConfig>,
        previous: Option<&Upstreams>,
    ) -> Upstreams {
        let mut by_name = BTreeMap::new();
        for (name, config) in configs {
            // A renewed certificate or CA file under the same path builds a new
            // upstream too: its connections must not outlive the identity they used.
            let old = previous.and_then(|p| p.by_name.get(name));
            let kept = old
                .filter(|u| &u.config == config)
                .filter(|u| u.tls_fingerprint == tls::fingerprint(config.tls.as_ref()))
                .cloned();
            let up = match kept {
                Some(u) => u,
                None => Upstream::new(name, config, old.map(|u| &**u)).await,
            };
            by_name.insert(name.clone(), up);
        }
        // Only once every new upstream is built: a reload abandoned before (see
        // `server::reload`) leaves the running ones as they were.
        if let Some(prev) = previous {
            for (name, old) in &prev.by_name {
                let successor = by_name.get(name);
                if !successor.is_some_and(|u| Arc::ptr_eq(u, old)) {
                    old.retire(successor.map(|u| &**u));
                }
            }
        }
        Upstreams { by_name }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.by_name.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.by_name.values()
    }

    pub fn drain(&self) {
        for u in self.by_name.values() {
            u.drain();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    /// A host name whose lookup never returns, as with a resolver that never answers
    /// (tests may not ask a real one: it is not on loopback).
    pub(crate) const HUNG_HOST: &str = "hung-resolver.test";

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    use std::time::Duration;

    use tokio::sync::Notify;

    use super::{PeerAddr, Upstreams};

    /// Lookups of [`HUNG_HOST`] begun.
    pub(crate) static HUNG_LOOKUPS: AtomicUsize = AtomicUsize::new(0);
    /// Told of each lookup of [`HUNG_HOST`] as it begins.
    static HUNG_LOOKUP_BEGUN: Notify = Notify::const_new();

    /// Blocks the resolver thread for good when asked for [`HUNG_HOST`].
    pub(crate) fn hang_if_asked(host: &str) {
        if host == HUNG_HOST {
            HUNG_LOOKUPS.fetch_add(1, SeqCst);
            HUNG_LOOKUP_BEGUN.notify_waiters();
            loop {
                std::thread::park();
            }
        }
    }

    /// A host name that resolves to 127.0.0.1, or fails while [`FLAKY_FAILS`] is set
    /// (a resolver's blip).
    const FLAKY_HOST: &str = "flaky-resolver.test";
    static FLAKY_FAILS: AtomicBool = AtomicBool::new(false);
    /// Lookups of [`FLAKY_HOST`] answered.
    static FLAKY_LOOKUPS: AtomicUsize = AtomicUsize::new(0);

    /// The answer for [`FLAKY_HOST`]; `None` for any other name.
    pub(crate) fn flaky_answer(
        host: &str,
        port: u16,
    ) -> Option<std::io::Result<Vec<std::net::SocketAddr>>> {
        if host != FLAKY_HOST {
            return None;
        }
        let answer = if FLAKY_FAILS.load(SeqCst) {
            Err(std::io::Error::other(
                "temporary failure in name resolution",
            ))
        } else {
            Ok(vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))])
        };
        FLAKY_LOOKUPS.fetch_add(1, SeqCst);
        Some(answer)
    }

    fn upstreams(text: &str) -> std::collections::BTreeMap<String, crate::config::UpstreamConfig> {
        let text = format!(
            "[[listener]]\nlisten = \"127.0.0.1:0\"\n\n[[route]]\nupstream = \"u\"\n\n\
             [upstream.u]\n{text}"
        );
        crate::config::Config::from_toml(&text, std::path::Path::new("t.toml"))
            .expect("valid config")
            .upstreams
    }

    /// A reload while one of an upstream's names does not resolve (a resolver's blip)
    /// keeps the addresses that name had, peers and pools as they were: before, the
    /// reload dropped them, and an upstream of that one name was left with no address
    /// at all, every request 502 until its next successful lookup (`resolve_every`).
    #[tokio::test]
    async fn a_reload_during_a_resolver_blip_keeps_the_names_addresses() {
        let first = Upstreams::build(
            &upstreams(&format!(
                "addresses = [\"http://{FLAKY_HOST}:9\"]\nretry.attempts = 3\n"
            )),
            None,
        )
        .await;
        let before = first.get("u").expect("u").peers();
        assert_eq!(before.len(), 1);
        FLAKY_FAILS.store(true, SeqCst);
        let second = Upstreams::build(
            &upstreams(&format!(
                "addresses = [\"http://{FLAKY_HOST}:9\"]\nretry.attempts = 2\n"
            )),
            Some(&first),
        )
        .await;
        let after = second.get("u").expect("u").peers();
        assert_eq!(after.len(), 1, "the address the name had is kept");
        assert!(Arc::ptr_eq(&after[0], &before[0]), "with its peer and pool");
        assert!(!after[0].is_removed());
    }

    /// A re-resolve in which one of an upstream's names fails (a resolver's blip)
    /// while another answers keeps that name's addresses: before, they were taken as
    /// gone and drained (their idle connections closed, their figures begun again
    /// when the name next resolved), though a blip of the upstream's only name kept
    /// them.
    #[tokio::test]
    async fn a_resolver_blip_for_one_name_does_not_drain_its_addresses() {
        let set = Upstreams::build(
            &upstreams(&format!(
                "addresses = [\"http://{FLAKY_HOST}:9\", \"http://127.0.0.2:9\"]\n\
                 resolve_every = \"50ms\"\n"
            )),
            None,
        )
        .await;
        let up = set.get("u").expect("u");
        let flaky = up.peers()[0].clone();
        assert_eq!(flaky.addr, PeerAddr::Tcp(([127, 0, 0, 1], 9).into()));
        FLAKY_FAILS.store(true, SeqCst);
        let failed = FLAKY_LOOKUPS.load(SeqCst);
        // Two failed lookups: the re-resolve of the first is over by the second.
        let blipped = tokio::time::timeout(Duration::from_secs(5), async {
            while FLAKY_LOOKUPS.load(SeqCst) < failed + 2 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(blipped.is_ok(), "re-resolved meanwhile");
        assert!(!flaky.is_removed(), "the name's address was drained");
        assert!(
            up.peers().iter().any(|p| Arc::ptr_eq(p, &flaky)),
            "the name's address is still in the list"
        );
    }

    /// Waits, at most `within`, for a lookup of [`HUNG_HOST`] beyond the first
    /// `before` (read [`HUNG_LOOKUPS`] before starting what looks it up); whether
    /// one began.
    pub(crate) async fn hung_lookup_begun(before: usize, within: Duration) -> bool {
        tokio::time::timeout(within, async {
            loop {
                let begun = HUNG_LOOKUP_BEGUN.notified();
                tokio::pin!(begun);
                // Listening before looking: a lookup beginning in between wakes it.
                begun.as_mut().enable();
                if HUNG_LOOKUPS.load(SeqCst) > before {
                    return;
                }
                begun.await;
            }
        })
        .await
        .is_ok()
    }
}
