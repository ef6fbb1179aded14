//! Upstream addresses as written in the config: `http://127.0.0.1:9000`,
//! `http://backend.internal:8080`, `http+unix:///run/app.sock`, `https://api.example.com`
//! (TLS; HTTP/2 or HTTP/1.1 by ALPN), `h2c://127.0.0.1:50051` and
//! `h2c+unix:///run/grpc.sock` (HTTP/2 with prior knowledge), `fastcgi://127.0.0.1:9000`,
//! `fastcgi+unix:///run/php/php-fpm.sock`.
//!
//! Parsing only; resolving host names is the upstream module's job.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Which protocol holdfast speaks to an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// HTTP/1.1, or over TLS whatever ALPN picks (see `UpstreamConfig::http_version`).
    Http1,
    /// HTTP/2 with prior knowledge (`h2c://`, RFC 9113 3.3).
    Http2,
    FastCgi,
}

/// Where the upstream listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A host name or IP literal and a port; names are resolved (and re-resolved).
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
}

/// One `addresses` entry of an upstream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UpstreamAddr {
    pub protocol: Protocol,
    /// `https://`: TLS to the upstream.
    pub tls: bool,
    pub endpoint: Endpoint,
    original: String,
}

impl UpstreamAddr {
    /// The value of the `Host` header when the upstream asks for its own name.
    pub fn authority(&self) -> String {
        let default_port = if self.tls { 443 } else { 80 };
        match &self.endpoint {
            // An IPv6 literal keeps its brackets, with its port or without.
            Endpoint::Tcp { host, port } if host.contains(':') && *port == default_port => {
                format!("[{host}]")
            }
            Endpoint::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            Endpoint::Tcp { host, port } if *port == default_port => host.clone(),
            Endpoint::Tcp { host, port } => format!("{host}:{port}"),
            Endpoint::Unix(_) => "localhost".to_owned(),
        }
    }
}

impl FromStr for UpstreamAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            format!("invalid upstream address {s:?}: expected a URL like http://127.0.0.1:9000")
        })?;
        let (protocol, tls, unix) = match scheme {
            "http" => (Protocol::Http1, false, false),
            "http+unix" | "unix" => (Protocol::Http1, false, true),
            "https" => (Protocol::Http1, true, false),
            "h2c" => (Protocol::Http2, false, false),
            "h2c+unix" => (Protocol::Http2, false, true),
            "fastcgi" => (Protocol::FastCgi, false, false),
            "fastcgi+unix" => (Protocol::FastCgi, false, true),
            "h2" => {
                return Err(format!(
                    "{s:?}: for HTTP/2 over TLS write https:// (ALPN picks h2) and, to insist on it, http_version = \"2\""
                ));
            }
            other => {
                return Err(format!(
                    "unknown upstream scheme {other:?}; expected http, http+unix, https, h2c, h2c+unix, fastcgi or fastcgi+unix"
                ));
            }
        };
        let endpoint = if unix {
            if !rest.starts_with('/') {
                return Err(format!(
                    "{s:?}: a unix socket path must be absolute, like {scheme}:///run/app.sock"
                ));
            }
            Endpoint::Unix(PathBuf::from(rest))
        } else {
            let authority = rest.trim_end_matches('/');
            if authority.contains('/') {
                return Err(format!(
                    "{s:?}: an upstream address has no path; routes rewrite paths"
                ));
            }
            if authority.contains('@') {
                // Taken as part of the host name it would never resolve, and the
                // error would print the password.
                return Err(format!(
                    "{scheme}://...: an upstream address has no user or password; holdfast sends no credentials upstream"
                ));
            }
            let default_port = match protocol {
                Protocol::Http1 if tls => 443,
                Protocol::Http1 | Protocol::Http2 => 80,
                Protocol::FastCgi => 9000,
            };
            let (host, port) = split_host_port(authority, default_port)
                .ok_or_else(|| format!("{s:?}: expected host:port"))?;
            // Nothing listens on port 0 nor at an empty host: every connect would fail.
            if host.is_empty() {
                return Err(format!("{s:?}: the host is empty"));
            }
            if port == 0 {
                return Err(format!("{s:?}: port 0 is no port to connect to"));
            }
            Endpoint::Tcp { host, port }
        };
        Ok(UpstreamAddr {
            protocol,
            tls,
            endpoint,
            original: s.to_owned(),
        })
    }
}

fn split_host_port(authority: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(v6) = authority.strip_prefix('[') {
        let (host, rest) = v6.split_once(']')?;
        let port = match rest.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if rest.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => Some((host.to_owned(), port.parse().ok()?)),
        Some(_) => None,
        None if !authority.is_empty() => Some((authority.to_owned(), default_port)),
        None => None,
    }
}

impl fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}

impl<'de> Deserialize<'de> for UpstreamAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for UpstreamAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connect to these would fail: they are refused where they are written.
    #[test]
    fn port_zero_and_an_empty_host_are_refused() {
        for bad in [
            "http://127.0.0.1:0",
            "fastcgi://[::1]:0",
            "http://[]:80",
            "h2c://[]",
        ] {
            let e = bad.parse::<UpstreamAddr>().expect_err(bad);
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn parses_each_form() {
        let a: UpstreamAddr = "http://127.0.0.1:9000".parse().unwrap();
        assert_eq!(
            a.endpoint,
            Endpoint::Tcp {
                host: "127.0.0.1".into(),
                port: 9000
            }
        );
        assert_eq!(a.protocol, Protocol::Http1);
        let a: UpstreamAddr = "http://[::1]:81/".parse().unwrap();
        assert_eq!(
            a.endpoint,
            Endpoint::Tcp {
                host: "::1".into(),
                port: 81
            }
        );
        assert_eq!(a.authority(), "[::1]:81");
        let a: UpstreamAddr = "fastcgi+unix:///run/php.sock".parse().unwrap();
        assert_eq!(a.endpoint, Endpoint::Unix("/run/php.sock".into()));
        assert_eq!(a.protocol, Protocol::FastCgi);
        let a: UpstreamAddr = "http://backend".parse().unwrap();
        assert_eq!(
            a.endpoint,
            Endpoint::Tcp {
                host: "backend".into(),
                port: 80
            }
        );
        let a: UpstreamAddr = "https://api.example.com".parse().unwrap();
        assert!(a.tls);
        assert_eq!(a.protocol, Protocol::Http1);
        assert_eq!(
            a.endpoint,
            Endpoint::Tcp {
                host: "api.example.com".into(),
                port: 443
            }
        );
        assert_eq!(a.authority(), "api.example.com");
        let a: UpstreamAddr = "h2c://127.0.0.1:50051".parse().unwrap();
        assert_eq!((a.protocol, a.tls), (Protocol::Http2, false));
        let a: UpstreamAddr = "h2c+unix:///run/grpc.sock".parse().unwrap();
        assert_eq!(a.endpoint, Endpoint::Unix("/run/grpc.sock".into()));
        assert_eq!(a.protocol, Protocol::Http2);
    }

    /// An IPv6 address on its scheme's default port (`http://[::1]`,
    /// `https://[2001:db8::1]`) gave `::1` as the `Host` sent upstream with
    /// `host_header = "upstream"` (or for a client that sent none): no valid Host (RFC
    /// 9110 7.2, RFC 3986 3.2.2), which nginx answers 400.
    #[test]
    fn an_ipv6_address_on_the_default_port_keeps_its_brackets_in_the_host() {
        for (addr, host) in [
            ("http://[::1]", "[::1]"),
            ("http://[::1]:80", "[::1]"),
            ("https://[2001:db8::1]/", "[2001:db8::1]"),
            ("h2c://[::1]:8080", "[::1]:8080"),
        ] {
            let a: UpstreamAddr = addr.parse().unwrap();
            assert_eq!(a.authority(), host, "{addr}");
            assert!(
                format!("http://{}/", a.authority())
                    .parse::<http::Uri>()
                    .is_ok(),
                "{addr}"
            );
        }
    }

    #[test]
    fn rejects_what_it_cannot_serve() {
        for bad in [
            "127.0.0.1:9000",
            "ftp://x",
            "http://h:99999",
            "http://h/api",
            "http+unix://rel",
            "h2://h:443",
            "http://user:pw@10.0.0.1:8080",
        ] {
            assert!(bad.parse::<UpstreamAddr>().is_err(), "{bad} parsed");
        }
    }
}
