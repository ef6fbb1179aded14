//! The route table: which upstream serves a request, by Host and path prefix.
//!
//! Pure and I/O-free. The most specific route wins: an exact host beats a wildcard
//! (`*.example.com`) which beats no host; then the longest path prefix. Prefixes match
//! on segment boundaries, so `/api` matches `/api` and `/api/x` but not `/apix`.

use std::borrow::Cow;

use crate::config::RouteConfig;

/// A matched route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Position in the config (`route[N]`), for logs and metrics.
    pub index: usize,
    host: HostMatch,
    prefix: String,
    strip_prefix: bool,
    /// Name of the upstream that serves this route.
    pub upstream: String,
    /// Script mapping when the upstream is FastCGI.
    pub fastcgi: Option<std::sync::Arc<crate::config::FastCgiRoute>>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum HostMatch {
    Any,
    /// `*.example.com`, stored as `.example.com`.
    Suffix(String),
    Exact(String),
}

/// Every route, most specific first.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(configs: &[RouteConfig]) -> Self {
        let mut routes: Vec<Route> = configs
            .iter()
            .enumerate()
            .map(|(i, c)| Route {
                index: i,
                host: HostMatch::of(c),
                prefix: prefix_of(c),
                strip_prefix: c.strip_prefix,
                upstream: c.upstream.get_ref().clone(),
                fastcgi: c.fastcgi.clone().map(std::sync::Arc::new),
            })
            .collect();
        // Stable sort keeps config order among equals.
        routes.sort_by(|a, b| {
            b.host
                .rank()
                .cmp(&a.host.rank())
                .then_with(|| b.host.len().cmp(&a.host.len()))
                .then_with(|| b.prefix.len().cmp(&a.prefix.len()))
        });
        RouteTable { routes }
    }

    /// The route for a request; `host` may carry a port, which is ignored, and end
    /// with the root's dot (`shop.example.com.`), which names the same host.
    /// `path` should be free of dot segments ([`remove_dot_segments`]).
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        let host = host.map(|h| {
            let h = strip_port(h);
            h.strip_suffix('.').unwrap_or(h)
        });
        self.routes
            .iter()
            .find(|r| r.host.matches(host) && prefix_matches(&r.prefix, path))
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

/// Routes that can never match, each with the earlier one that takes every request it
/// would: the same host and path prefix as matching reads them (`/api/` is `/api`,
/// `Shop.example.com` is `shop.example.com`), as (index, earlier index).
pub fn shadowed(configs: &[RouteConfig]) -> Vec<(usize, usize)> {
    let keys: Vec<(HostMatch, String)> = configs
        .iter()
        .map(|c| (HostMatch::of(c), prefix_of(c)))
        .collect();
    keys.iter()
        .enumerate()
        .filter_map(|(i, k)| keys[..i].iter().position(|e| e == k).map(|j| (i, j)))
        .collect()
}

/// A route's path prefix as requests' paths are matched (`normalize_path`): a prefix
/// written `/%7Ealice` would otherwise match no request at all.
fn prefix_of(c: &RouteConfig) -> String {
    normalize_path(&c.path)
        .as_deref()
        .unwrap_or(&c.path)
        .trim_end_matches('/')
        .to_owned()
}

impl Route {
    /// The path (and query) to send upstream.
    pub fn rewrite<'a>(&self, path_and_query: &'a str) -> Cow<'a, str> {
        if !self.strip_prefix || self.prefix.is_empty() {
            return Cow::Borrowed(path_and_query);
        }
        let rest = &path_and_query[self.prefix.len().min(path_and_query.len())..];
        if rest.starts_with('/') {
            Cow::Borrowed(rest)
        } else {
            Cow::Owned(format!("/{rest}"))
        }
    }
}

impl HostMatch {
    fn of(c: &RouteConfig) -> HostMatch {
        match c.host.as_deref() {
            None | Some("*") | Some("") => HostMatch::Any,
            Some(h) => match h.trim_end_matches('.').strip_prefix('*') {
                Some(suffix) => HostMatch::Suffix(suffix.to_ascii_lowercase()),
                // Requests' hosts are compared without brackets (`strip_port`).
                None => HostMatch::Exact(
                    h.trim_end_matches('.')
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_ascii_lowercase(),
                ),
            },
        }
    }

    fn rank(&self) -> u8 {
        match self {
            HostMatch::Any => 0,
            HostMatch::Suffix(_) => 1,
            HostMatch::Exact(_) => 2,
        }
    }

    fn len(&self) -> usize {
        match self {
            HostMatch::Any => 0,
            HostMatch::Suffix(s) | HostMatch::Exact(s) => s.len(),
        }
    }

    fn matches(&self, host: Option<&str>) -> bool {
        match (self, host) {
            (HostMatch::Any, _) => true,
            (_, None) => false,
            (HostMatch::Exact(h), Some(got)) => h.eq_ignore_ascii_case(got),
            (HostMatch::Suffix(s), Some(got)) => {
                got.len() > s.len()
                    && got.is_char_boundary(got.len() - s.len())
                    && got[got.len() - s.len()..].eq_ignore_ascii_case(s)
            }
        }
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_once(']').map_or(host, |(h, _)| &h[1..]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// `path` as routes match it and upstreams are sent it: percent-encoded unreserved
/// characters decoded (RFC 3986 2.3: `%61` is `a` to every upstream, so `/%61dmin`
/// must not slip past an `/admin` route), then dot segments removed
/// ([`remove_dot_segments`]); `None` when it is already so (most paths).
pub fn normalize_path(path: &str) -> Option<String> {
    match decode_unreserved(path) {
        None => remove_dot_segments(path),
        Some(decoded) => Some(remove_dot_segments(&decoded).unwrap_or(decoded)),
    }
}

/// `path` with every percent-encoded unreserved character (`ALPHA / DIGIT / "-" / "."
/// / "_" / "~"`) decoded, or `None` if it has none. Other encodings stay as they are:
/// decoding `%2F` or `%3B` would change what the path means.
fn decode_unreserved(path: &str) -> Option<String> {
    let b = path.as_bytes();
    let mut i = b.iter().position(|&c| c == b'%')?;
    let mut out: Option<String> = None;
    let mut copied = 0;
    while i < b.len() {
        let decoded = (b[i] == b'%')
            .then(|| b.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| Some(hex(h[0])? << 4 | hex(h[1])?))
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~'));
        match decoded {
            Some(c) => {
                let o = out.get_or_insert_with(|| String::with_capacity(path.len()));
                // `i` is at an ASCII `%`: a char boundary.
                o.push_str(&path[copied..i]);
                o.push(char::from(c));
                i += 3;
                copied = i;
            }
            None => i += 1,
        }
    }
    let mut out = out?;
    out.push_str(&path[copied..]);
    Some(out)
}

fn hex(d: u8) -> Option<u8> {
    char::from(d).to_digit(16).map(|v| v as u8)
}

/// `path` without its dot segments (RFC 3986 5.2.4; `%2e` is a dot, 2.3), or `None`
/// when it has none (most paths: one pass over the bytes, no allocation). Routes match,
/// and upstreams are sent, the path without them: `/api/../admin` is `/admin` to any
/// upstream that normalizes, and must not be matched against the `/api` route. `..`
/// above the root stays at the root.
pub fn remove_dot_segments(path: &str) -> Option<String> {
    // Every dot segment starts right after a slash, with `.` or `%`: most paths have
    // neither pair, and one pass over the bytes says so.
    if !path
        .as_bytes()
        .windows(2)
        .any(|w| w[0] == b'/' && (w[1] == b'.' || w[1] == b'%'))
    {
        return None;
    }
    let rest = path.strip_prefix('/')?;
    if !rest.split('/').any(|s| dot(s) || dot_dot(s)) {
        return None;
    }
    let segments: Vec<&str> = rest.split('/').collect();
    let last = segments.len() - 1;
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, seg) in segments.into_iter().enumerate() {
        if dot(seg) || dot_dot(seg) {
            if dot_dot(seg) {
                out.pop();
            }
            // A trailing dot segment leaves a directory: `/a/b/..` is `/a/`.
            if i == last {
                out.push("");
            }
            continue;
        }
        out.push(seg);
    }
    Some(format!("/{}", out.join("/")))
}

/// `.` or `%2e`, compared as bytes (a path may hold UTF-8).
fn is_dot(b: &[u8]) -> bool {
    b == b"." || b.eq_ignore_ascii_case(b"%2e")
}

fn dot(seg: &str) -> bool {
    is_dot(seg.as_bytes())
}

/// `..`, each dot perhaps written `%2e`.
fn dot_dot(seg: &str) -> bool {
    let b = seg.as_bytes();
    (2..=6).contains(&b.len())
        && [1, 3]
            .into_iter()
            .any(|i| i < b.len() && is_dot(&b[..i]) && is_dot(&b[i..]))
}

/// Whether `path` holds a `..` segment behind an encoded or backslash separator
/// (`/api/..%2Fadmin`, `/api/..\\admin`), or with `;` parameters (`/api/..;/admin`):
/// an upstream that decodes `%2F`, reads `\\` as `/` or drops a segment's parameters
/// before resolving dot segments (servlet containers do) would resolve it where
/// routing did not. Such a path is refused, not guessed at (nginx decodes and
/// resolves; no client of ours has a reason to send one). For a path whose plain dot
/// segments are already resolved ([`remove_dot_segments`]).
pub fn hides_dot_segment(path: &str) -> bool {
    let b = path.as_bytes();
    if !b.iter().any(|&c| c == b'%' || c == b'\\' || c == b';') {
        return false; // the usual path: no encoded or backslash separator possible
    }
    let mut start = 0;
    let mut i = 0;
    while i <= b.len() {
        let sep = match b.get(i) {
            None => 1,
            Some(b'/' | b'\\') => 1,
            Some(b'%')
                if b.get(i + 1..i + 3).is_some_and(|h| {
                    h.eq_ignore_ascii_case(b"2f") || h.eq_ignore_ascii_case(b"5c")
                }) =>
            {
                3
            }
            Some(_) => {
                i += 1;
                continue;
            }
        };
        // A segment's parameters (`..;x`) do not count.
        if path
            .get(start..i)
            .is_some_and(|seg| dot_dot(seg.split(';').next().unwrap_or(seg)))
        {
            return true;
        }
        i += sep;
        start = i;
    }
    false
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.is_empty(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn table(routes: &[(Option<&str>, &str, &str)]) -> RouteTable {
        let configs: Vec<RouteConfig> = routes
            .iter()
            .map(|(host, path, up)| {
                let mut c = RouteConfig::new(path, up);
                c.host = host.map(str::to_owned);
                c
            })
            .collect();
        RouteTable::new(&configs)
    }

    #[test]
    fn most_specific_wins() {
        let t = table(&[
            (None, "/", "default"),
            (None, "/api", "api"),
            (None, "/api/v2", "v2"),
            (Some("*.example.com"), "/", "wild"),
            (Some("shop.example.com"), "/", "shop"),
        ]);
        let up = |h, p| t.find(h, p).map(|r| r.upstream.as_str());
        assert_eq!(up(None, "/"), Some("default"));
        assert_eq!(up(None, "/apix"), Some("default"));
        assert_eq!(up(None, "/api"), Some("api"));
        assert_eq!(up(None, "/api/x?q=1"), Some("api"));
        assert_eq!(up(None, "/api?q=1"), Some("api"));
        assert_eq!(up(None, "/api/v2/x"), Some("v2"));
        assert_eq!(up(Some("a.example.com:8080"), "/api"), Some("wild"));
        assert_eq!(up(Some("SHOP.example.com"), "/api"), Some("shop"));
        assert_eq!(up(Some("example.com"), "/api"), Some("api"));
    }

    /// Requests are matched by their path with encoded unreserved characters decoded
    /// (`normalize_path`), so a route written with one (`/%7Ealice`) is matched as
    /// decoded too: `/%7Ealice/x` and `/~alice/x` both reach it, as they did (the
    /// first) before paths were decoded.
    #[test]
    fn a_route_written_with_encoded_unreserved_characters_still_matches() {
        let mut c = RouteConfig::new("/%7Ealice/", "alice");
        c.strip_prefix = true;
        let t = RouteTable::new(&[RouteConfig::new("/", "default"), c]);
        for sent in ["/%7Ealice/x?q=1", "/~alice/x?q=1", "/%7ealice/x?q=1"] {
            let path = normalize_path(sent).unwrap_or_else(|| sent.to_owned());
            let r = t.find(None, &path).expect(sent);
            assert_eq!(r.upstream, "alice", "{sent}");
            assert_eq!(r.rewrite(&path), "/x?q=1", "{sent}");
        }
    }

    #[test]
    fn no_route_is_none() {
        let t = table(&[(Some("a.test"), "/", "a")]);
        assert!(t.find(Some("b.test"), "/").is_none());
        assert!(t.find(None, "/").is_none());
    }

    #[test]
    fn strip_prefix_keeps_a_leading_slash_and_the_query() {
        let mut c = RouteConfig::new("/api/", "api");
        c.strip_prefix = true;
        let t = RouteTable::new(&[c]);
        let r = t.find(None, "/api/users?id=1").unwrap();
        assert_eq!(r.rewrite("/api/users?id=1"), "/users?id=1");
        assert_eq!(r.rewrite("/api"), "/");
        assert_eq!(r.rewrite("/api?x=1"), "/?x=1");
    }

    #[test]
    fn dot_segments_are_removed() {
        for (path, want) in [
            ("/api/x", None),
            ("/a.b/..c/.d", None),
            ("/api/../admin", Some("/admin")),
            ("/api/%2e%2E/admin", Some("/admin")),
            ("/api/.%2e/admin", Some("/admin")),
            ("/api/%2e./admin", Some("/admin")),
            ("/api/./x", Some("/api/x")),
            ("/api/..", Some("/")),
            ("/a/b/.", Some("/a/b/")),
            ("/../../etc", Some("/etc")),
            ("/a//../b", Some("/a/b")),
        ] {
            assert_eq!(remove_dot_segments(path).as_deref(), want, "{path}");
        }
    }

    #[test]
    fn unreserved_characters_are_decoded_and_others_kept() {
        for (path, want) in [
            ("/api/x", None),
            ("/a%20b%2Fc%3b", None),
            ("/%61pi/%7Ex", Some("/api/~x")),
            ("/%41%2d%5F%2E%30", Some("/A-_.0")),
            ("/%61%2F%6", Some("/a%2F%6")),
            ("/%c3%a9/%61", Some("/%c3%a9/a")),
            ("/x/%2e%2E/%61pi", Some("/api")),
            ("/é/%62", Some("/é/b")),
        ] {
            assert_eq!(normalize_path(path).as_deref(), want, "{path}");
        }
    }

    #[test]
    fn a_dot_dot_behind_an_encoded_separator_is_found() {
        for path in [
            "/api/..%2Fadmin",
            "/api/..%2fadmin",
            "/api/%2e%2e%5Cadmin",
            "/api/..\\admin",
            "/api%2F..%2Fadmin",
            "/api/x%2F..",
            "/api/..;/admin",
            "/api/%2e.;v=1/admin",
            "/api/x/..;",
        ] {
            assert!(hides_dot_segment(path), "{path}");
        }
        for path in [
            "/api/x",
            "/a%20b/..c",
            "/a%2Fb",
            "/a/%2e%2e./x",
            "/..%2",
            "/a;v=1/..b;c",
            "/a/.;/b",
        ] {
            assert!(!hides_dot_segment(path), "{path}");
        }
    }

    #[test]
    fn an_ipv6_host_matches_with_or_without_brackets_and_port() {
        let t = table(&[(None, "/", "any"), (Some("[::1]"), "/", "v6")]);
        let up = |h| t.find(Some(h), "/").map(|r| r.upstream.as_str());
        assert_eq!(up("[::1]"), Some("v6"));
        assert_eq!(up("[::1]:8080"), Some("v6"));
        assert_eq!(up("[::2]"), Some("any"));
    }

    #[test]
    fn a_trailing_dot_names_the_same_host() {
        let t = table(&[(None, "/", "any"), (Some("shop.test"), "/", "shop")]);
        let up = |h| t.find(Some(h), "/").map(|r| r.upstream.as_str());
        assert_eq!(up("shop.test."), Some("shop"));
        assert_eq!(up("SHOP.test.:8080"), Some("shop"));
    }

    proptest! {
        #[test]
        fn a_match_is_always_a_segment_prefix(prefix in "(/[a-z]{1,3}){0,3}", path in "(/[a-z]{0,3}){0,4}") {
            let t = table(&[(None, if prefix.is_empty() { "/" } else { &prefix }, "u")]);
            let matched = t.find(None, if path.is_empty() { "/" } else { &path }).is_some();
            let p = if path.is_empty() { "/".to_string() } else { path.clone() };
            let expect = prefix.is_empty() || p == prefix || p.starts_with(&format!("{prefix}/"));
            prop_assert_eq!(matched, expect);
        }
    }
}
