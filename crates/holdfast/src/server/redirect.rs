//! The HTTP→HTTPS redirect listener (`redirect_https = true`): every request is
//! answered with `308 Permanent Redirect` to the same host and target over https,
//! instead of being proxied.
//!
//! 308 rather than 301: a client must repeat the method and body (RFC 9110 15.4.9),
//! so a POST is not turned into a GET. The host comes from the request (`Host`, or
//! the authority of an absolute or HTTP/2 target); without a usable one the answer is
//! 400, never a redirect to somewhere the client did not name. So is a request with
//! more than one `Host` (RFC 9112 3.2), whichever the target: which host it is for
//! is ambiguous, and a cache in front may read another one than the first.

use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, StatusCode};

use crate::proxy::response::ResponseBody;

/// The answer to `req` on a redirect listener whose HTTPS side listens on `port`.
pub fn respond<B>(req: &Request<B>, port: u16) -> Response<ResponseBody> {
    match location(req, port) {
        Some(url) => {
            let mut resp = Response::new(ResponseBody::full(format!("{url}\n")));
            *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
            if let Ok(v) = HeaderValue::try_from(url) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            text(resp)
        }
        None => {
            let mut resp = Response::new(ResponseBody::full(
                "a redirect to https needs one Host header naming a host\n",
            ));
            *resp.status_mut() = StatusCode::BAD_REQUEST;
            text(resp)
        }
    }
}

fn text(mut resp: Response<ResponseBody>) -> Response<ResponseBody> {
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// `https://HOST[:port]/target`, or `None` when the request names no usable host.
fn location<B>(req: &Request<B>, port: u16) -> Option<String> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return None;
    }
    let authority = match req.uri().authority() {
        Some(a) => a.clone(),
        None => host?.to_str().ok()?.parse::<Authority>().ok()?,
    };
    // `user@host` would let a request pick where the redirect goes in odd ways.
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return None;
    }
    let host = authority.host();
    // `path()` rather than the path-and-query as sent: an absolute-form target with
    // no path (`http://host?q`) has an empty one, which HTTP reads as `/`.
    let path = req.uri().path();
    let (path, query) = if path.starts_with('/') {
        (path, req.uri().query())
    } else {
        ("/", None)
    };
    let (mark, query) = query.map_or(("", ""), |q| ("?", q));
    Some(if port == 443 {
        format!("https://{host}{path}{mark}{query}")
    } else {
        format!("https://{host}:{port}{path}{mark}{query}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(target: &str, host: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri(target);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn location_keeps_host_and_target_and_drops_the_plain_port() {
        let cases = [
            (
                "/a/b?c=d",
                Some("shop.example:8080"),
                443,
                Some("https://shop.example/a/b?c=d"),
            ),
            (
                "/",
                Some("shop.example"),
                8443,
                Some("https://shop.example:8443/"),
            ),
            ("/x", Some("[::1]:80"), 443, Some("https://[::1]/x")),
            (
                "http://h2.example/p",
                None,
                443,
                Some("https://h2.example/p"),
            ),
            (
                "http://h2.example?q=1",
                Some("other.example"),
                443,
                Some("https://h2.example/?q=1"),
            ),
            (
                "http://h2.example:80/p?",
                None,
                8443,
                Some("https://h2.example:8443/p?"),
            ),
            (
                "*",
                Some("shop.example"),
                443,
                Some("https://shop.example/"),
            ),
            ("/x", None, 443, None),
            ("/x", Some("evil@shop.example"), 443, None),
            ("/x", Some("bad host"), 443, None),
        ];
        for (target, host, port, want) in cases {
            assert_eq!(
                location(&req(target, host), port).as_deref(),
                want,
                "{target} {host:?}"
            );
        }
    }

    #[test]
    fn answers_308_with_location_or_400() {
        let r = respond(&req("/p?q", Some("a.example")), 443);
        assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(r.headers()[header::LOCATION], "https://a.example/p?q");
        let r = respond(&req("/p", None), 443);
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }
}
