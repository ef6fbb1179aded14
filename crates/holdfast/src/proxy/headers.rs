//! Header rules between client and upstream: hop-by-hop removal (RFC 9110 7.6.1),
//! `Via`, `X-Forwarded-*`, `Host`, and the WebSocket upgrade exception.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

const HOP_BY_HOP_COUNT: usize = 9;

/// Headers that describe one connection, never forwarded (plus whatever `Connection`
/// lists).
const HOP_BY_HOP: [HeaderName; HOP_BY_HOP_COUNT] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
];

pub const VIA_VALUE: &str = "1.1 holdfast";

/// Whether `Connection` carries `token` (case-insensitive, comma-separated).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// A request asking to switch protocols (WebSocket). Not one that asks only for
/// `h2c`: HTTP/1.1's upgrade to cleartext HTTP/2 (RFC 9113 3.1 deprecates it) is
/// between the client and holdfast, not to be tunnelled to the upstream, where a
/// lenient server that switched would get a raw tunnel past routing and the
/// `X-Forwarded-*` rules. Such a request goes on as a plain one, `Upgrade` removed
/// with the other hop-by-hop fields, as nginx does.
pub fn is_upgrade_request(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && connection_has(headers, "upgrade")
        && headers.get_all(header::UPGRADE).iter().any(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .any(|t| !t.is_empty() && !t.eq_ignore_ascii_case(b"h2c"))
        })
}

/// Which hop-by-hop fields, and `Expect`, a message carries: the fields a proxy acts
/// on before forwarding it. Found in one pass over the (few) names instead of a hash
/// lookup for each; most messages carry none or one of them.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionFields(u16);

/// `Expect`'s bit, after those of `HOP_BY_HOP`.
const EXPECT_BIT: u16 = 1 << HOP_BY_HOP_COUNT;
/// Set when a forwarding field is present (see [`is_forwarding`]).
const FORWARDING_BIT: u16 = EXPECT_BIT << 1;

impl ConnectionFields {
    pub fn of(headers: &HeaderMap) -> ConnectionFields {
        let mut present = 0u16;
        for name in headers.keys() {
            if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
                present |= 1 << i;
            } else if name == header::EXPECT {
                present |= EXPECT_BIT;
            } else if is_forwarding(name) {
                present |= FORWARDING_BIT;
            }
        }
        ConnectionFields(present)
    }

    /// A hop-by-hop field or `Expect` is present.
    pub fn any(self) -> bool {
        self.0 & !FORWARDING_BIT != 0
    }

    /// A forwarding field (`Forwarded`, `X-Real-IP`, `X-Forwarded-*`) is present.
    pub fn forwarding(self) -> bool {
        self.0 & FORWARDING_BIT != 0
    }

    /// `name`: one of the hop-by-hop fields or `Expect` (any other is never present).
    pub fn has(self, name: &HeaderName) -> bool {
        let bit = if *name == header::EXPECT {
            Some(EXPECT_BIT)
        } else {
            HOP_BY_HOP.iter().position(|h| h == name).map(|i| 1 << i)
        };
        bit.is_some_and(|bit| self.0 & bit != 0)
    }
}

/// Removes hop-by-hop headers. With `keep_upgrade`, `Upgrade` survives and
/// `Connection: upgrade` is set again, for a protocol switch passed through.
pub fn remove_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let present = ConnectionFields::of(headers);
    remove_present_hop_by_hop(headers, keep_upgrade, present);
}

/// [`remove_hop_by_hop`] when the caller has already looked for them.
pub fn remove_present_hop_by_hop(
    headers: &mut HeaderMap,
    keep_upgrade: bool,
    present: ConnectionFields,
) {
    let present = present.0 & !(EXPECT_BIT | FORWARDING_BIT);
    if present == 0 {
        return;
    }
    // `HOP_BY_HOP[0]` is `Connection`.
    if present & 1 != 0 {
        // The usual tokens name no field (`close`) or one removed below anyway.
        let listed: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|t| !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive"))
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for name in listed {
            if !(keep_upgrade && name == header::UPGRADE) {
                headers.remove(&name);
            }
        }
    }
    let upgrade = keep_upgrade
        .then(|| headers.remove(header::UPGRADE))
        .flatten();
    // `HOP_BY_HOP[4]` is `Transfer-Encoding`, which framed the message: a
    // Content-Length beside it is not passed on (RFC 9112 6.3, point 3), or the next
    // hop would frame the body by it.
    if present & (1 << 4) != 0 {
        headers.remove(header::CONTENT_LENGTH);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if let Some(u) = upgrade {
        headers.insert(header::UPGRADE, u);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// HTTP/2 splits `Cookie` into one field per cookie (RFC 9113 8.2.3); on HTTP/1.1
/// they must be one field again, joined with "; ", or a server that reads one line
/// loses the rest.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.nth(1).is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    // Joined valid values with a valid separator are valid.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, v);
    }
}

/// The `Trailer` declaration of a chunked message, which holdfast passes on with its
/// trailers: hyper writes trailer fields only when `Trailer` names them (RFC 9110
/// 6.6.2). On a message without a chunked body it declares nothing and is dropped.
pub fn declared_trailers(headers: &HeaderMap) -> Vec<HeaderValue> {
    let chunked = headers.get_all(header::TRANSFER_ENCODING).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
    });
    if !chunked || connection_has(headers, "trailer") {
        return Vec::new();
    }
    headers.get_all(header::TRAILER).iter().cloned().collect()
}

/// Puts back what [`declared_trailers`] kept, after [`remove_hop_by_hop`].
pub fn restore_trailers(headers: &mut HeaderMap, declared: Vec<HeaderValue>) {
    for v in declared {
        headers.append(header::TRAILER, v);
    }
}

/// Removes from a request's trailer section what holdfast removes or sets in its head:
/// hop-by-hop fields (and those `Connection` names there), framing, `Host`, `Expect`,
/// `Via` and every forwarding field. RFC 9110 6.5.1: they must not be sent as
/// trailers, and an upstream that merges trailers into the head (Apache's
/// `MergeTrailers`, CVE-2013-5704) would take them as the client's word.
pub fn remove_from_trailers(trailers: &mut HeaderMap) {
    let present = ConnectionFields::of(trailers);
    remove_present_hop_by_hop(trailers, false, present);
    trailers.remove(header::CONTENT_LENGTH);
    trailers.remove(header::HOST);
    trailers.remove(header::VIA);
    if present.has(&header::EXPECT) {
        trailers.remove(header::EXPECT);
    }
    if present.forwarding() {
        let forged: Vec<HeaderName> = trailers
            .keys()
            .filter(|n| is_forwarding(n))
            .cloned()
            .collect();
        for name in forged {
            trailers.remove(name);
        }
    }
}

/// Removes from a response's trailer section the hop-by-hop fields (and those
/// `Connection` names there) and `Content-Length`, which frame or describe one
/// connection and must not pass a proxy (RFC 9110 6.5.1, 7.6.1). An HTTP/2 client
/// could not be sent them at all: h2 refuses connection-specific fields in a
/// trailer section (RFC 9113 8.2.2), so the stream, its body already sent whole,
/// was reset instead of ended.
pub fn remove_from_response_trailers(trailers: &mut HeaderMap) {
    remove_hop_by_hop(trailers, false);
    trailers.remove(header::CONTENT_LENGTH);
}

/// Appends holdfast to `Via`.
pub fn add_via(headers: &mut HeaderMap) {
    headers.append(header::VIA, HeaderValue::from_static(VIA_VALUE));
}

/// An address as a header value (`X-Forwarded-For`). IPv4 is written by hand: it is
/// done for every new client connection, and `Display` costs about 25 times as much.
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    match ip {
        IpAddr::V4(v4) => {
            // On the stack, then moved once into its `Bytes`.
            let mut out = [0u8; 15];
            let mut n = 0;
            let mut push = |b: u8| {
                out[n] = b;
                n += 1;
            };
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    push(b'.');
                }
                if octet >= 100 {
                    push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    push(b'0' + octet / 10 % 10);
                }
                push(b'0' + octet % 10);
            }
            // `from_owner`: one allocation, and clones (one per request) only count
            // references; a copied slice would allocate again at its first clone.
            HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(out).slice(..n))
                .expect("digits and dots are a valid header value")
        }
        IpAddr::V6(v6) => {
            HeaderValue::try_from(v6.to_string()).expect("an IPv6 address is a valid header value")
        }
    }
}

/// What the proxy knows about the client connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ClientFacts<'a> {
    pub ip: IpAddr,
    /// `ip` as a header value.
    pub ip_value: &'a HeaderValue,
    pub tls: bool,
}

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// The `X-Forwarded-For/-Proto/-Host` values to set; `None` keeps what the request
/// has, `Some(None)` (`-Host` only) removes it.
#[derive(Debug, Clone, Default)]
pub struct Forwarded {
    pub xff: Option<HeaderValue>,
    pub xfp: Option<HeaderValue>,
    pub xfh: Option<Option<HeaderValue>>,
}

/// Puts [`Forwarded`] values into `headers`.
pub fn insert_forwarded(headers: &mut HeaderMap, f: Forwarded) {
    if let Some(v) = f.xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if let Some(v) = f.xfp {
        headers.insert(X_FORWARDED_PROTO, v);
    }
    match f.xfh {
        Some(Some(v)) => {
            headers.insert(X_FORWARDED_HOST, v);
        }
        Some(None) => {
            headers.remove(X_FORWARDED_HOST);
        }
        None => {}
    }
}

/// Whether `ip` is one of `trusted_proxies`.
pub fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    !trusted.is_empty() && trusted.iter().any(|n| n.contains(&ip))
}

/// `Forwarded`, `X-Real-IP` or an `X-Forwarded-*` field: what applications read to
/// learn the client's address, scheme, host or port.
fn is_forwarding(name: &HeaderName) -> bool {
    if *name == header::FORWARDED {
        return true;
    }
    let s = name.as_str().as_bytes();
    s.first() == Some(&b'x') && (s == b"x-real-ip" || s.starts_with(b"x-forwarded-"))
}

/// Removes the forwarding fields holdfast does not set itself (RFC 7239 `Forwarded`,
/// `X-Forwarded-Port`, `-Prefix`, `-Server`, ..., and nginx's `X-Real-IP`) from a request that did not come
/// from a trusted proxy: applications read them as they read `X-Forwarded-For`, and
/// from anyone else they are forged. Called only when [`ConnectionFields::forwarding`]
/// says one is there.
pub fn remove_untrusted_forwarding(headers: &mut HeaderMap) {
    let forged: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            is_forwarding(n)
                && **n != X_FORWARDED_FOR
                && **n != X_FORWARDED_PROTO
                && **n != X_FORWARDED_HOST
        })
        .cloned()
        .collect();
    for name in forged {
        headers.remove(name);
    }
}

/// `X-Forwarded-For/-Proto/-Host` for a request. From a trusted proxy the incoming
/// values are kept (and `-For` extended); from anyone else they are replaced, so a
/// client cannot forge its address.
pub fn forwarded(
    headers: &HeaderMap,
    client: ClientFacts<'_>,
    trusted: &[IpNet],
    host: Option<&HeaderValue>,
) -> Forwarded {
    const XFF: HeaderName = X_FORWARDED_FOR;
    const XFP: HeaderName = X_FORWARDED_PROTO;
    const XFH: HeaderName = X_FORWARDED_HOST;
    let trusted = is_trusted(client.ip, trusted);
    let prior: Option<String> = if trusted {
        let parts: Vec<&str> = headers
            .get_all(&XFF)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        (!parts.is_empty()).then(|| parts.join(", "))
    } else {
        None
    };
    let xff = match prior {
        Some(p) => HeaderValue::try_from(format!("{p}, {}", client.ip)).ok(),
        None => Some(client.ip_value.clone()),
    };
    let xfp = (!(trusted && headers.contains_key(&XFP)))
        .then(|| HeaderValue::from_static(if client.tls { "https" } else { "http" }));
    let xfh = (!(trusted && headers.contains_key(&XFH))).then(|| host.cloned());
    Forwarded { xff, xfp, xfh }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `SetFields::apply` does with the `X-Forwarded-*` fields.
    fn set_forwarded(
        headers: &mut HeaderMap,
        client: ClientFacts<'_>,
        trusted: &[IpNet],
        host: Option<&HeaderValue>,
    ) {
        let f = forwarded(headers, client, trusted, host);
        insert_forwarded(headers, f);
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn removes_fixed_and_listed_hop_by_hop_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic x"),
            ("proxy-authenticate", "Basic"),
            ("x-kept", "yes"),
        ]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn cookies_split_by_http2_are_joined() {
        let mut split = map(&[("cookie", "a=1"), ("cookie", "b=2"), ("cookie", "c=3")]);
        join_cookies(&mut split);
        let all: Vec<_> = split.get_all("cookie").iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3"]);
        let mut one = map(&[("cookie", "a=1; b=2")]);
        join_cookies(&mut one);
        assert_eq!(one["cookie"], "a=1; b=2");
    }

    #[test]
    fn transfer_encoding_takes_a_content_length_beside_it_along() {
        let mut both = map(&[
            ("transfer-encoding", "chunked"),
            ("content-length", "5"),
            ("x-kept", "yes"),
        ]);
        remove_hop_by_hop(&mut both, false);
        assert_eq!(both.len(), 1, "{both:?}");
        let mut length = map(&[("content-length", "5")]);
        remove_hop_by_hop(&mut length, false);
        assert_eq!(length["content-length"], "5");
    }

    #[test]
    fn connection_fields_are_every_hop_by_hop_field_and_expect() {
        let ordinary = map(&[
            ("host", "a"),
            ("accept", "*/*"),
            ("x-connection", "close"),
            ("keep-alive-x", "1"),
        ]);
        assert!(!ConnectionFields::of(&ordinary).any());
        let hop_by_hop = HOP_BY_HOP;
        let names = hop_by_hop.iter().chain([&header::EXPECT]);
        for name in names.clone() {
            let h = map(&[("host", "a"), (name.as_str(), "1"), ("accept", "*/*")]);
            let found = ConnectionFields::of(&h);
            assert!(found.any(), "{name}");
            for other in names.clone() {
                assert_eq!(found.has(other), other == name, "{other} with {name}");
            }
        }
        let h = map(&[("Proxy-Connection", "x"), ("Expect", "100-continue")]);
        let found = ConnectionFields::of(&h);
        assert!(found.has(&HeaderName::from_static("proxy-connection")));
        assert!(found.has(&header::EXPECT));
        assert!(!found.has(&header::HOST), "not one of them");
    }

    #[test]
    fn connection_options_remove_only_connection_and_listed_fields_in_later_values() {
        let mut h = map(&[("connection", "close"), ("x-kept", "yes")]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");

        // A second `Connection` field still names fields to remove.
        let mut h = map(&[
            ("connection", "Close"),
            ("connection", " , X-Secret "),
            ("x-secret", "1"),
            ("x-kept", "yes"),
        ]);
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn an_upgrade_to_h2c_alone_is_no_upgrade_request() {
        let with = |upgrade| {
            map(&[
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", upgrade),
            ])
        };
        assert!(!is_upgrade_request(&with("h2c")));
        assert!(!is_upgrade_request(&with(" H2C ")));
        assert!(is_upgrade_request(&with("websocket")));
        assert!(is_upgrade_request(&with("h2c, websocket")));
    }

    #[test]
    fn upgrade_survives_when_passed_through() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        assert!(is_upgrade_request(&h));
        remove_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["sec-websocket-key"], "k");
    }

    #[test]
    fn ip_values_match_display() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.200.9.255",
            "100.10.1.99",
            "::1",
            "2001:db8::8:800:200c:417a",
            "::ffff:192.0.2.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_value(ip), ip.to_string(), "{ip}");
        }
    }

    #[test]
    fn forwarded_headers_trust_only_trusted_proxies() {
        let ip_value = HeaderValue::from_static("10.0.0.5");
        let client = ClientFacts {
            ip: "10.0.0.5".parse().unwrap(),
            ip_value: &ip_value,
            tls: false,
        };
        let host = HeaderValue::from_static("shop.test");
        let forged = || {
            map(&[
                ("x-forwarded-for", "1.2.3.4"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "evil"),
            ])
        };

        let mut h = forged();
        set_forwarded(&mut h, client, &[], Some(&host));
        assert_eq!(h["x-forwarded-for"], "10.0.0.5");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.test");

        let mut h = forged();
        set_forwarded(
            &mut h,
            client,
            &["10.0.0.0/8".parse().unwrap()],
            Some(&host),
        );
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.5");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "evil");
    }
}
