//! The request path: route, rewrite headers, forward through the upstream, and turn
//! the outcome into the client's response.
//!
//! Every failure ends as a response here (`Proxy::rescue`): 404 without a route, 413/400
//! for bad request bodies, 502/503/504 from the upstream with an RFC 9209
//! `Proxy-Status` saying whether the request reached it.

pub mod access_log;
pub mod fastcgi;
pub mod figures;
pub mod headers;
pub mod response;
pub mod tunnel;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

use self::access_log::AccessRecord;
use self::figures::{CLIENT_CLOSED_REQUEST, RouteFigures, Tally};
use self::headers::ClientFacts;
use self::response::{BodyDeadlines, ResponseBody, UpstreamBody};
use crate::body::RequestBody;
use crate::config::{Config, ListenerConfig, Protocol};
use crate::route::RouteTable;
use crate::server::conn::InFlight;
use crate::upstream::error::{Delivery, Kind, UpstreamError};
use crate::upstream::figures::CloseReason;
use crate::upstream::pool::Client;
use crate::upstream::{Exchange, Failure, FastCgiParams, Payload, SetFields, Upstream, Upstreams};

/// Routes and upstreams in force; replaced whole on reload.
pub struct Routing {
    pub config: Arc<Config>,
    pub routes: RouteTable,
    pub upstreams: Upstreams,
    route_names: Vec<Arc<str>>,
    /// Per-route request figures, indexed like `config.routes`.
    pub figures: RouteFigures,
}

impl Routing {
    pub async fn build(config: Arc<Config>, previous: Option<&Routing>) -> Routing {
        let upstreams = Upstreams::build(&config.upstreams, previous.map(|p| &p.upstreams)).await;
        Routing::with_upstreams(config, upstreams, previous)
    }

    /// As [`Routing::build`], with the upstreams built already (from
    /// `config.upstreams`).
    pub fn with_upstreams(
        config: Arc<Config>,
        upstreams: Upstreams,
        previous: Option<&Routing>,
    ) -> Routing {
        let routes = RouteTable::new(&config.routes);
        let route_names = (0..config.routes.len())
            .map(|i| Arc::from(format!("route[{i}]")))
            .collect();
        let figures = RouteFigures::build(
            &config.routes,
            previous.map(|p| (&p.config.routes[..], &p.figures)),
        );
        Routing {
            config,
            routes,
            upstreams,
            route_names,
            figures,
        }
    }
}

/// The proxy shared by every client connection.
pub struct Proxy {
    routing: ArcSwap<Routing>,
}

/// What one client connection tells the proxy about itself.
#[derive(Debug, Clone)]
pub struct ConnContext {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
    pub listener: Arc<ListenerConfig>,
    /// The client's address as an `X-Forwarded-For` value (and for the access log),
    /// formatted once per connection rather than once per request.
    remote_ip_value: HeaderValue,
}

impl ConnContext {
    pub fn new(
        remote: SocketAddr,
        local: SocketAddr,
        tls: bool,
        listener: Arc<ListenerConfig>,
    ) -> ConnContext {
        let remote_ip_value = headers::ip_value(remote.ip());
        ConnContext {
            remote,
            local,
            tls,
            listener,
            remote_ip_value,
        }
    }
}

impl Proxy {
    pub fn new(routing: Routing) -> Proxy {
        Proxy {
            routing: ArcSwap::from_pointee(routing),
        }
    }

    pub fn routing(&self) -> Arc<Routing> {
        self.routing.load_full()
    }

    /// Swaps in new routes and upstreams; requests already running keep the old ones.
    pub fn replace(&self, routing: Routing) {
        self.routing.store(Arc::new(routing));
    }

    /// Serves one request. Never fails: every error becomes a response.
    /// `start`: when the request arrived (its latency and deadlines count from then).
    ///
    /// An async block rather than an `async fn`, which would keep `req` twice in the
    /// future (see [`Upstream::forward`]): hyper moves this future for every request.
    ///
    /// `in_flight`: the request's hold on its client connection, which a streamed
    /// body extends until it ends (see [`UploadHold`](crate::server::conn::UploadHold)).
    #[allow(clippy::manual_async_fn)]
    pub fn handle(
        &self,
        mut req: Request<Incoming>,
        conn: &ConnContext,
        start: Instant,
        in_flight: &InFlight,
    ) -> impl Future<Output = Response<ResponseBody>> {
        async move {
            let routing = self.routing.load_full();
            let mut log = access_record(&routing, &req, conn, start);

            let (host, bad_host) = match request_host(&req) {
                Ok(host) => (host, None),
                Err(why) => (None, Some(why)),
            };
            let bad_host = bad_host.or_else(|| bad_target(&req));
            // Dot segments are resolved before routing, and the upstream gets the
            // path without them, so that `/api/../admin` can neither match `/api` nor
            // reach an `/api` upstream as `/admin`; so are encoded unreserved
            // characters decoded, so that `/%61dmin` matches `/admin`.
            let resolved = crate::route::normalize_path(req.uri().path()).or_else(|| {
                // An absolute-form target with a query and no path (`http://host?q`)
                // has `?q` as its path-and-query: HTTP reads the empty path as `/`
                // (RFC 9110 4.2.3), which the target sent on must start with.
                req.uri()
                    .path_and_query()
                    .is_some_and(|p| p.as_str().starts_with('?'))
                    .then(|| "/".to_owned())
            });
            let path = resolved.as_deref().unwrap_or(req.uri().path());
            let route = routing
                .routes
                .find(host.as_ref().and_then(|h| h.to_str().ok()), path);
            // A request refused for its Host (or a target with no path) matched no
            // route by it: counted apart.
            let counted = route.filter(|_| bad_host.is_none()).map(|r| r.index);
            let tally = Tally::new(routing.figures.cell(counted), start);
            // Named in the line as it is counted, refused or not.
            if let (Some(l), Some(i)) = (&mut log, counted) {
                l.route = routing.route_names.get(i).cloned();
            }
            if let Some(why) = bad_host {
                return finish_local(StatusCode::BAD_REQUEST, why, None, (log, tally));
            }
            // Looked for after the plain dot segments are gone, so any `..` left
            // sits behind an encoded or backslash separator, or carries parameters.
            if crate::route::hides_dot_segment(path) {
                return finish_local(
                    StatusCode::BAD_REQUEST,
                    "a `..` segment behind an encoded or backslash separator, or with parameters\n",
                    None,
                    (log, tally),
                );
            }
            // RFC 9110 4.2.4: userinfo in an http(s) target is an error (it would
            // otherwise become part of the Host sent upstream).
            if req
                .uri()
                .authority()
                .is_some_and(|a| a.as_str().contains('@'))
            {
                return finish_local(
                    StatusCode::BAD_REQUEST,
                    "userinfo in the request target\n",
                    None,
                    (log, tally),
                );
            }
            // hyper undoes chunked once; any other transfer coding (or chunked again)
            // would reach the upstream still applied, without the hop-by-hop field that
            // says so (RFC 9112 6.1: 501 for a coding a server does not understand;
            // nginx does the same).
            // (Only a request with a body can have one: a bodiless one skips the lookup.)
            if !http_body::Body::is_end_stream(req.body())
                && !crate::upstream::http1::codec::only_chunked(
                    req.headers()
                        .get_all(header::TRANSFER_ENCODING)
                        .iter()
                        .map(HeaderValue::as_bytes),
                )
            {
                return finish_local(
                    StatusCode::NOT_IMPLEMENTED,
                    "transfer codings other than chunked are not supported\n",
                    None,
                    (log, tally),
                );
            }
            if req.method() == http::Method::CONNECT {
                // A tunnel is not a reverse proxy's to open; forwarded as a request it
                // would lose its authority-form target and its tunnel.
                return finish_local(
                    StatusCode::NOT_IMPLEMENTED,
                    "CONNECT is not supported\n",
                    None,
                    (log, tally),
                );
            }
            let Some(route) = route else {
                return finish_local(
                    StatusCode::NOT_FOUND,
                    "no route for this host and path\n",
                    None,
                    (log, tally),
                );
            };
            let Some(upstream) = routing.upstreams.get(&route.upstream).cloned() else {
                return finish_local(
                    StatusCode::BAD_GATEWAY,
                    "route names an unknown upstream\n",
                    None,
                    (log, tally),
                );
            };
            if let Some(l) = &mut log {
                l.upstream = Some(upstream.name.clone());
            }

            // A request with a body is passed on as one, without the upgrade: its
            // body would otherwise be dropped (`Upgrade: h2c` on a POST, RFC 9113 3.1
            // notwithstanding, asks for a switch after the body, which no upstream
            // here is asked to make).
            // Only HTTP/1.1 switches: RFC 9110 7.8 has an HTTP/1.0 request's
            // `Upgrade` ignored (hyper could not switch its connection either), and
            // HTTP/2 has no `Upgrade`; there it is removed as hop-by-hop.
            let upgrade = req.version() == http::Version::HTTP_11
                && headers::is_upgrade_request(req.headers())
                && http_body::Body::is_end_stream(req.body());
            let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
            let (mut parts, body) = req.into_parts();
            let fastcgi = upstream.config.protocol() == Protocol::FastCgi;
            // REQUEST_URI is the target as the client sent it, before any rewrite, in
            // origin form (`?q` from `http://host?q` is `/?q`).
            let original_target = fastcgi.then(|| {
                parts.uri.path_and_query().map_or_else(
                    || "/".to_owned(),
                    |p| match p.as_str() {
                        q if q.starts_with('?') => format!("/{q}"),
                        t => t.to_owned(),
                    },
                )
            });

            // Origin-form target with the route's prefix rewrite.
            let resolved = resolved.map(|p| match parts.uri.query() {
                Some(q) => format!("{p}?{q}"),
                None => p,
            });
            let target = resolved
                .as_deref()
                .unwrap_or_else(|| parts.uri.path_and_query().map_or("/", |p| p.as_str()));
            let rewritten = route.rewrite(target);
            if resolved.is_some() || rewritten != target || parts.uri.scheme().is_some() {
                match Uri::try_from(rewritten.as_ref()) {
                    Ok(u) => parts.uri = u,
                    Err(_) => {
                        return finish_local(
                            StatusCode::BAD_REQUEST,
                            "bad request target\n",
                            None,
                            (log, tally),
                        );
                    }
                }
            }
            let set = prepare_request_headers(&mut parts, conn, &upstream, host, upgrade);
            // Plain HTTP/1.1 writes them with the head; anything else needs them in the map
            // (FastCGI params below read it too).
            let set = if upstream.speaks_plain_http1() {
                Some(set)
            } else {
                set.apply(&mut parts.headers);
                None
            };
            if parts.version == http::Version::HTTP_2 {
                headers::join_cookies(&mut parts.headers);
            }
            parts.version = http::Version::HTTP_11;

            let max_body = conn.listener.max_body_bytes.get();
            // A declared length over the limit is refused before anything is sent upstream,
            // whether the body would be buffered or streamed.
            if max_body > 0
                && http_body::Body::size_hint(&body)
                    .exact()
                    .is_some_and(|n| n > max_body)
            {
                let failure = Failure {
                    error: UpstreamError::new(Kind::BodyTooLarge, Delivery::NotSent),
                    peer: None,
                    attempts: 0,
                    reused: None,
                };
                return self.rescue(failure, &upstream, (log, tally));
            }
            let has_length = parts.headers.contains_key(header::CONTENT_LENGTH);
            // FastCGI: the script is looked for before the body is read, so that a
            // request for none gets its 404 without sending (or holdfast spooling) its
            // body; a length known only once the body is read whole is filled in then.
            let declared = http_body::Body::size_hint(&body)
                .exact()
                .filter(|&n| n > 0 || has_length);
            let fcgi_params = match (original_target, route.fastcgi.as_deref()) {
                (Some(original_target), Some(fcgi)) => {
                    match Box::pin(fastcgi::params(
                        &parts,
                        &original_target,
                        fcgi,
                        conn,
                        declared,
                    ))
                    .await
                    {
                        Ok(p) => Some(p),
                        Err(status) => {
                            let msg = match status {
                                StatusCode::NOT_FOUND => "no such script\n",
                                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
                                    "a header or the target is too large for FastCGI\n"
                                }
                                _ => "bad path\n",
                            };
                            return finish_local(status, msg, None, (log, tally));
                        }
                    }
                }
                _ => None,
            };
            // FastCGI: the body is read whole first (`request_buffering`, as nginx does),
            // and always when chunked: the application needs CONTENT_LENGTH up front.
            let spool = match route.fastcgi.as_deref() {
                Some(f) if fastcgi && !upgrade && (f.request_buffering || !has_length) => Some(f),
                _ => None,
            };
            let keep = if upgrade || spool.is_some() {
                None
            } else if upstream.config.retry.attempts > 1 {
                Some(upstream.config.retry.replay_body_limit.get())
            } else {
                None
            };
            let stall = conn.listener.body_timeout.get();
            let total = upstream.config.timeouts.total.non_zero();
            let deadline = total.map(|t| start + t);
            let read = match (spool, keep) {
                _ if upgrade => Ok(RequestBody::Empty),
                (Some(_), _) | (None, Some(_)) if http_body::Body::is_end_stream(&body) => {
                    Ok(RequestBody::Empty)
                }
                (Some(f), _) => {
                    read_by(
                        || {
                            RequestBody::spool(
                                body,
                                f.body_memory.get(),
                                max_body,
                                stall,
                                f.body_temp_dir.as_deref(),
                            )
                        },
                        deadline,
                    )
                    .await
                }
                (None, Some(limit)) => {
                    read_by(
                        || RequestBody::prepare(body, limit, max_body, stall),
                        deadline,
                    )
                    .await
                }
                (None, None) => Ok(RequestBody::stream(body, max_body, stall)),
            };
            let body = match read {
                Ok(b) => b,
                Err(e) if e.is::<crate::body::SpoolError>() => {
                    // holdfast's own failure (a full disk): the application saw nothing.
                    tracing::error!(route = route.index, upstream = %upstream.name, "{e}");
                    return finish_local(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the request body could not be stored\n",
                        None,
                        (log, tally),
                    );
                }
                Err(e) => {
                    let error = if e.is::<crate::body::BodyTooLarge>() {
                        UpstreamError::new(Kind::BodyTooLarge, Delivery::NotSent)
                    } else if e.is::<BodyPastTotal>() {
                        UpstreamError::new(Kind::TotalTimeout, Delivery::NotSent)
                    } else {
                        UpstreamError::new(Kind::ClientBody, Delivery::NotSent).with_cause(e)
                    };
                    let failure = Failure {
                        error,
                        peer: None,
                        attempts: 0,
                        reused: None,
                    };
                    return self.rescue(failure, &upstream, (log, tally));
                }
            };
            // An upstream may go on taking a streamed body after its answer: the client
            // connection stays busy until the body ends.
            let mut body = body;
            body.hold_connection(|| in_flight.hold_upload());
            if let Some(mut p) = fcgi_params {
                if declared.is_none() {
                    // Read whole (chunked): its length is known now. A body held
                    // whole has it even when trailers ended it (they are not sent to
                    // a FastCGI application); its size hint is then inexact.
                    let length = match &body {
                        RequestBody::Buffered { data, .. } => data.as_ref().map(|d| d.len() as u64),
                        RequestBody::Spooled(s) => Some(s.length()),
                        _ => None,
                    };
                    if let Some(n) = length.filter(|&n| n > 0) {
                        fastcgi::set_content_length(&mut p, n);
                    }
                }
                parts.extensions.insert(FastCgiParams(Arc::new(p)));
            }
            if matches!(
                body,
                RequestBody::Empty
                    | RequestBody::Buffered { trailers: None, .. }
                    | RequestBody::Spooled(_)
            ) {
                // Sent whole with Content-Length: no trailers follow (see `declared_trailers`).
                parts.headers.remove(header::TRAILER);
            }

            let head_request = parts.method == http::Method::HEAD;
            // The forward future is built in each arm rather than bound to a local:
            // a local it is moved out of (into `pin!` or `timeout_at`) keeps its room
            // in this future too, and hyper moves this future for every request
            // (6.8 KB with the local, 4.1 KB without).
            let result = match deadline {
                None => upstream.forward(parts, set, body, deadline).await,
                Some(at) => {
                    match tokio::time::timeout_at(at, upstream.forward(parts, set, body, deadline))
                        .await
                    {
                        Ok(r) => r,
                        Err(_) => Err(Failure {
                            error: UpstreamError::new(Kind::TotalTimeout, Delivery::MaybeSent),
                            peer: None,
                            attempts: 0,
                            reused: None,
                        }),
                    }
                }
            };
            match result {
                Ok(exchange) => {
                    let deadlines = BodyDeadlines {
                        read_idle: upstream.config.timeouts.read_idle.non_zero(),
                        total: deadline,
                    };
                    respond(
                        exchange,
                        client_upgrade,
                        head_request,
                        deadlines,
                        (log, tally),
                    )
                }
                Err(failure) => self.rescue(failure, &upstream, (log, tally)),
            }
        }
    }

    /// A request on a `redirect_https` listener: answered with its redirect to
    /// https (or 400, see [`redirect::respond`](crate::server::redirect::respond)),
    /// and counted and logged as holdfast's own answer to a request no route took.
    pub fn redirect<B>(
        &self,
        req: &Request<B>,
        conn: &ConnContext,
        start: Instant,
        port: u16,
    ) -> Response<ResponseBody> {
        let routing = self.routing.load_full();
        let log = access_record(&routing, req, conn, start);
        let tally = Tally::new(routing.figures.cell(None), start);
        let resp = crate::server::redirect::respond(req, port);
        tally.finish_with(resp.status().as_u16());
        if let Some(mut l) = log {
            l.status = resp.status().as_u16();
            l.outcome = "local";
            let sent = if l.method == http::Method::HEAD {
                0
            } else {
                http_body::Body::size_hint(resp.body()).exact().unwrap_or(0)
            };
            l.emit(sent);
        }
        resp
    }

    /// A request head hyper refused and answered itself (HTTP/1: malformed, 400; too
    /// large, 431 or 414) before any service saw it: counted under no route and
    /// logged as holdfast's own answer, with method and target `-` (hyper keeps
    /// neither). `start`: when the head began to arrive.
    pub fn refused_head(&self, conn: &ConnContext, status: StatusCode, start: Instant) {
        let routing = self.routing.load_full();
        Tally::new(routing.figures.cell(None), start).finish_with(status.as_u16());
        let method = http::Method::from_bytes(b"-").expect("`-` is a token");
        if let Some(mut l) = new_access_record(&routing, conn, start, method, None) {
            l.status = status.as_u16();
            l.outcome = "local";
            // hyper's answer has no body.
            l.emit(0);
        }
    }

    /// Turns a failure into the client's response and a log line naming route,
    /// upstream, address and cause.
    fn rescue(
        &self,
        failure: Failure,
        upstream: &Upstream,
        (mut log, tally): (Option<Box<AccessRecord>>, Tally),
    ) -> Response<ResponseBody> {
        let Failure {
            error,
            peer,
            attempts,
            reused,
        } = failure;
        let status = error.status();
        // The client went away mid-upload: nobody reads the answer, and the request
        // is one its client left before any answer was made (README: 499).
        let gone = error.client_gone();
        let address = peer.as_ref().map(|p| p.label.clone());
        tracing::warn!(
            upstream = %upstream.name,
            address = address.as_deref().unwrap_or("-"),
            status = if gone { CLIENT_CLOSED_REQUEST } else { status.as_u16() },
            attempts,
            reused,
            delivery = error.delivery_details(),
            "request failed: {error}"
        );
        let proxy_status = format!(
            "holdfast; error={}; details=\"{}: {}\"",
            error.proxy_status_error(),
            error.delivery_details(),
            error.to_string().replace(['"', '\\'], "'")
        );
        if let Some(l) = &mut log {
            l.address = address;
            l.attempts = attempts;
            l.reused = reused;
            // A 4xx here is about the client's own request (a body too large, or one
            // that failed): holdfast's answer, not an upstream's failure.
            l.outcome = if status.is_client_error() {
                "local"
            } else {
                "error"
            };
        }
        let body = format!(
            "{} {}: {}\n",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            error
        );
        if gone {
            tally.finish_with(CLIENT_CLOSED_REQUEST);
            if let Some(mut l) = log {
                l.status = CLIENT_CLOSED_REQUEST;
                l.outcome = "client_gone";
                l.emit(0);
            }
            return local_response(status, body.into(), Some(proxy_status));
        }
        finish_local(status, body, Some(proxy_status), (log, tally))
    }
}

/// The request's `timeouts.total` passed while its body was being read whole.
#[derive(Debug)]
struct BodyPastTotal;

impl std::fmt::Display for BodyPastTotal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body still arriving at the total timeout")
    }
}

impl std::error::Error for BodyPastTotal {}

/// Reads a body whole (or its replayable part), by the request's total deadline if
/// it has one: a request whose time ran out while its body arrived goes nowhere.
/// Sent after its deadline, it would be cut at once, and a FastCGI application runs
/// its script on whatever STDIN came (PHP does, on none or part of the body).
async fn read_by<F: Future<Output = Result<RequestBody, crate::body::BoxError>>>(
    read: impl FnOnce() -> F,
    deadline: Option<Instant>,
) -> Result<RequestBody, crate::body::BoxError> {
    // Boxed: only requests with a body get here, and the read loop's state would
    // otherwise sit in every request's future. Made and boxed in each arm: the box
    // without a deadline holds no timer (and stays in the smaller size class).
    match deadline {
        None => Box::pin(read()).await,
        Some(at) => Box::pin(tokio::time::timeout_at(at, read()))
            .await
            .unwrap_or_else(|_| Err(Box::new(BodyPastTotal))),
    }
}

/// The access-log record of `req`, if its line is to be written: the config in
/// force decides, so a reload turns the access log on or off.
fn access_record<B>(
    routing: &Routing,
    req: &Request<B>,
    conn: &ConnContext,
    start: Instant,
) -> Option<Box<AccessRecord>> {
    // A reference to the request's bytes, not a copy; `-` for a target without one
    // (CONNECT's, or a malformed one).
    let path = req.uri().path_and_query().cloned();
    new_access_record(routing, conn, start, req.method().clone(), path)
}

/// A record for a request `method path` from `conn`, if the access log is on.
fn new_access_record(
    routing: &Routing,
    conn: &ConnContext,
    start: Instant,
    method: http::Method,
    path: Option<http::uri::PathAndQuery>,
) -> Option<Box<AccessRecord>> {
    (routing.config.log.access_log
        && tracing::enabled!(target: "holdfast::access", tracing::Level::INFO))
    // Boxed: only a request that is logged pays for its room, which every
    // request's future and response body would otherwise carry.
    .then(|| {
        Box::new(AccessRecord {
            start,
            client: conn.remote_ip_value.clone(),
            method,
            path,
            status: 0,
            route: None,
            upstream: None,
            address: None,
            reused: None,
            attempts: 0,
            ttfb: None,
            outcome: "ok",
            emitted: false,
        })
    })
}

/// A response holdfast makes itself.
fn finish_local(
    status: StatusCode,
    body: impl Into<bytes::Bytes>,
    proxy_status: Option<String>,
    (log, tally): (Option<Box<AccessRecord>>, Tally),
) -> Response<ResponseBody> {
    tally.finish_with(status.as_u16());
    let body: bytes::Bytes = body.into();
    let body_len = body.len() as u64;
    let resp = local_response(status, body, proxy_status);
    if let Some(mut l) = log {
        l.status = status.as_u16();
        if l.outcome == "ok" {
            l.outcome = "local";
        }
        // The body holdfast sends (none for HEAD).
        let sent = if l.method == http::Method::HEAD {
            0
        } else {
            body_len
        };
        l.emit(sent);
    }
    resp
}

/// The response of [`finish_local`], without counting or logging it.
fn local_response(
    status: StatusCode,
    body: bytes::Bytes,
    proxy_status: Option<String>,
) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Some(ps) = proxy_status.and_then(|p| HeaderValue::try_from(p).ok()) {
        h.insert("proxy-status", ps);
    }
    resp
}

fn log_tunnel_end(end: &tunnel::TunnelEnd, upstream_address: &str) {
    match end {
        tunnel::TunnelEnd::Idle => tracing::info!(
            address = upstream_address,
            "upgraded connection closed: no byte either way for timeouts.read_idle"
        ),
        tunnel::TunnelEnd::Failed(kind) => {
            tracing::debug!(address = upstream_address, error = ?kind, "upgraded connection failed")
        }
        tunnel::TunnelEnd::Closed => {}
    }
}

fn respond(
    exchange: Exchange,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    head_request: bool,
    deadlines: BodyDeadlines,
    (mut log, mut tally): (Option<Box<AccessRecord>>, Tally),
) -> Response<ResponseBody> {
    let Exchange {
        mut response,
        mut conn,
        peer,
        attempts,
        ttfb,
        outstanding,
    } = exchange;
    let status = response.status();
    tally.upstream_responded(status.as_u16(), ttfb);
    if let Some(l) = &mut log {
        l.status = status.as_u16();
        l.address = Some(peer.label.clone());
        l.reused = Some(conn.is_reused());
        l.attempts = attempts;
        l.ttfb = Some(ttfb);
    }
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    match (switching, client_upgrade) {
        (true, Some(client)) => {
            conn.set_close_reason(CloseReason::Abandoned);
            // A tunnel is bounded by the gap between bytes, either way, not by
            // `timeouts.total`: a WebSocket lives as long as it is used.
            let idle = deadlines.read_idle;
            let label = peer.label.clone();
            match conn.client() {
                Client::Http1(c) => {
                    let mut upstream_side = c.take_upgraded();
                    tokio::spawn(async move {
                        // The pooled connection (its slot under `max_connections`)
                        // is held as long as the tunnel is open.
                        let mut conn = conn;
                        let _outstanding = outstanding;
                        if let Ok(c) = client.await {
                            let end =
                                tunnel::run(&mut TokioIo::new(c), &mut upstream_side, idle).await;
                            conn.set_close_reason(end.close_reason());
                            log_tunnel_end(&end, &label);
                        }
                    });
                }
                _ => {
                    let upstream_side = hyper::upgrade::on(&mut response);
                    tokio::spawn(async move {
                        // The pooled connection (its slot under `max_connections`)
                        // is held as long as the tunnel is open.
                        let mut conn = conn;
                        let _outstanding = outstanding;
                        let (client, upstream_side) = tokio::join!(client, upstream_side);
                        if let (Ok(c), Ok(u)) = (client, upstream_side) {
                            let end =
                                tunnel::run(&mut TokioIo::new(c), &mut TokioIo::new(u), idle).await;
                            conn.set_close_reason(end.close_reason());
                            log_tunnel_end(&end, &label);
                        }
                    });
                }
            }
            let (mut parts, _) = response.into_parts();
            // RFC 9110 2.5: a proxy sends its own HTTP-version.
            parts.version = http::Version::HTTP_11;
            headers::remove_hop_by_hop(&mut parts.headers, true);
            headers::add_via(&mut parts.headers);
            if let Some(l) = log {
                l.emit(0);
            }
            tally.finish();
            Response::from_parts(parts, ResponseBody::empty())
        }
        (true, None) => {
            // A 101 nobody asked for cannot be relayed.
            conn.set_close_reason(CloseReason::Error);
            let error = UpstreamError::new(Kind::Protocol, Delivery::MaybeSent)
                .with_cause("unsolicited 101 Switching Protocols");
            // No usable upstream response: an error, not holdfast's own answer.
            if let Some(l) = &mut log {
                l.outcome = "error";
            }
            finish_local(
                StatusCode::BAD_GATEWAY,
                format!("502 Bad Gateway: {error}\n"),
                None,
                (log, tally),
            )
        }
        (false, _) => {
            let (mut parts, body) = response.into_parts();
            // RFC 9110 2.5: a proxy sends its own HTTP-version, whatever the
            // upstream's (hyper lowers it for an HTTP/1.0 client).
            parts.version = http::Version::HTTP_11;
            if !matches!(
                body,
                Payload::Http1 {
                    hop_by_hop_removed: true,
                    ..
                }
            ) {
                let trailer = headers::declared_trailers(&parts.headers);
                headers::remove_hop_by_hop(&mut parts.headers, false);
                headers::restore_trailers(&mut parts.headers, trailer);
            }
            headers::add_via(&mut parts.headers);
            // No body by its status or its request's method, or the whole body once its
            // Content-Length went out: a FastCGI answer may still carry STDOUT, and
            // ends with END_REQUEST, which the dropped body reads
            // (`UpstreamBody::complete_at`).
            let fastcgi = matches!(body, Payload::FastCgi(_));
            let bodiless = fastcgi
                && (head_request
                    || matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED));
            // Looked up for FastCGI only: every other response would pay for it.
            let length = fastcgi
                .then(|| parts.headers.get(header::CONTENT_LENGTH))
                .flatten()
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let request_unsent = matches!(conn.client(), Client::Http1(c) if !c.request_sent());
            let mut body = UpstreamBody::new(body, conn, deadlines, (log, tally), outstanding);
            body.request_unsent = request_unsent;
            if bodiless {
                body.complete_at(0);
                drop(body);
                return Response::from_parts(parts, ResponseBody::bodiless());
            }
            if let Some(n) = length {
                body.complete_at(n);
            }
            Response::from_parts(parts, ResponseBody::upstream(body))
        }
    }
}

/// The host a request is for: the absolute-form authority, or the `Host` header (a
/// shared handle on hyper's buffer, not a copy).
///
/// # Errors
/// What RFC 9112 3.2 answers with 400: more than one `Host`, a `Host` that is not a
/// host and port, or an HTTP/1.1 request with neither a `Host` nor an absolute
/// target. holdfast would otherwise pick one reading (the first `Host`) where a
/// server behind it, or a cache in front, may pick another.
fn request_host(req: &Request<Incoming>) -> Result<Option<HeaderValue>, &'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err("more than one Host header\n");
    }
    if let Some(a) = req.uri().authority() {
        return Ok(HeaderValue::try_from(a.as_str()).ok());
    }
    match first {
        None if req.version() == http::Version::HTTP_11 => {
            Err("an HTTP/1.1 request needs a Host header\n")
        }
        None => Ok(None),
        Some(h) if !is_host_and_port(h.as_bytes()) => Err("the Host header is not a host\n"),
        Some(h) => Ok(Some(h.clone())),
    }
}

/// What RFC 9112 3.2 and RFC 9113 8.3.1 make a malformed target, which must not be
/// forwarded: a request other than CONNECT whose target has no path, as an HTTP/2
/// request without `:path` (h2 lets it through when it has no `:authority` either)
/// or an HTTP/1 authority-form target (`GET example.com:80`, which would otherwise
/// be routed by that authority, whatever its `Host`, and sent on as `GET /`); or
/// `*` for any method but OPTIONS. Both would otherwise reach the upstream as a
/// request the client never made. One byte compared for an ordinary target.
fn bad_target<B>(req: &Request<B>) -> Option<&'static str> {
    let path = req.uri().path();
    if path.starts_with('/') || req.method() == http::Method::CONNECT {
        return None;
    }
    if path == "*" && req.method() == http::Method::OPTIONS {
        return None;
    }
    Some("the request target is not a path (nor `*` for OPTIONS)\n")
}

/// Whether `value` can be a `Host` (RFC 9110 7.2: `uri-host [ ":" port ]`): only
/// the characters of a reg-name, an IP literal and a port; no userinfo, path, space
/// or control character.
pub(crate) fn is_host_and_port(value: &[u8]) -> bool {
    value.iter().all(|&b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'%'
                    | b':'
                    | b'['
                    | b']'
            )
    })
}

/// Removes what must not pass (hop-by-hop fields, `Expect`) and returns the fields
/// holdfast sets: `X-Forwarded-*`, `TE: trailers`, `Host` (and `Via`), which
/// [`SetFields::apply`] or the HTTP/1 encoder puts in.
fn prepare_request_headers(
    parts: &mut http::request::Parts,
    conn: &ConnContext,
    upstream: &Upstream,
    original_host: Option<HeaderValue>,
    upgrade: bool,
) -> SetFields {
    let version = parts.version;
    let h = &mut parts.headers;
    let present = headers::ConnectionFields::of(h);
    let mut te_trailers = false;
    if present.any() {
        // `TE: trailers` is the one TE value worth passing on (RFC 9110 10.1.4).
        // Listed among other codings (`TE: trailers, deflate;q=0.5`) it still counts.
        te_trailers = present.has(&header::TE)
            && h.get_all(header::TE).iter().any(|v| {
                v.as_bytes()
                    .split(|&b| b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
            });
        // Only a chunked body can carry the trailers that `Trailer` declares. An
        // HTTP/2 request has no `Transfer-Encoding`: without a length, its body goes
        // chunked to an HTTP/1.1 upstream.
        let trailer = if !present.has(&header::TRAILER) {
            Vec::new()
        } else if present.has(&header::TRANSFER_ENCODING) {
            headers::declared_trailers(h)
        } else if version == http::Version::HTTP_2 && !h.contains_key(header::CONTENT_LENGTH) {
            h.get_all(header::TRAILER).iter().cloned().collect()
        } else {
            Vec::new()
        };
        headers::remove_present_hop_by_hop(h, upgrade, present);
        headers::restore_trailers(h, trailer);
        if present.has(&header::EXPECT) {
            // holdfast answered `Expect: 100-continue` itself when it began reading
            // the body.
            h.remove(header::EXPECT);
        }
    }
    if present.forwarding()
        && !headers::is_trusted(conn.remote.ip(), &conn.listener.trusted_proxies)
    {
        headers::remove_untrusted_forwarding(h);
    }
    let forwarded = headers::forwarded(
        h,
        ClientFacts {
            ip: conn.remote.ip(),
            ip_value: &conn.remote_ip_value,
            tls: conn.tls,
        },
        &conn.listener.trusted_proxies,
        original_host.as_ref(),
    );
    let host = match upstream.config.host_header.as_str() {
        "client" => original_host.or_else(|| upstream_authority(upstream)),
        "upstream" => upstream_authority(upstream),
        literal => HeaderValue::try_from(literal).ok(),
    };
    SetFields {
        forwarded,
        te_trailers,
        host,
    }
}

fn upstream_authority(upstream: &Upstream) -> Option<HeaderValue> {
    upstream
        .config
        .addresses
        .first()
        .and_then(|a| HeaderValue::try_from(a.authority()).ok())
}
