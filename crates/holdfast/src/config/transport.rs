//! How holdfast talks to an HTTP upstream: the HTTP version, `[upstream.NAME.tls]` and
//! `[upstream.NAME.http2]`.
//!
//! Parsing and checks that need no files; reading the certificate files is
//! `upstream::tls`'s job (called from `Config::validate`, so `holdfast check` and a
//! reload see a bad file before anything is swapped).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Dur;

/// Which HTTP version holdfast speaks to an `http://` or `https://` upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum HttpVersion {
    /// `https://`: offer `h2` and `http/1.1` by ALPN and speak what the upstream picks;
    /// `http://`: HTTP/1.1. `h2c://` addresses: HTTP/2.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// HTTP/1.1 only (ALPN offers only `http/1.1`).
    #[serde(rename = "1.1")]
    Http1,
    /// HTTP/2 only: ALPN `h2` over TLS, prior knowledge (h2c) without.
    #[serde(rename = "2")]
    Http2,
}

/// `[upstream.NAME.tls]`: how an `https://` upstream is verified and whom holdfast
/// says it is. One rustls client config per upstream, shared by its addresses, so TLS
/// sessions are resumed across connections.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamTlsConfig {
    /// PEM file of the CA certificates the upstream's certificate must chain to.
    /// Default: the system's trust store.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Name sent as SNI and checked against the upstream's certificate. Default: the
    /// address's host; an IP address is checked against the certificate's IP
    /// addresses, and no SNI is sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_name: Option<String>,
    /// PEM certificate chain holdfast presents when the upstream asks for one (mutual
    /// TLS); needs `client_key`. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `client_cert`. Default: none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key: Option<PathBuf>,
}

/// `[upstream.NAME.http2]`: HTTP/2 connections to an upstream address, shared by
/// concurrent requests.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamHttp2Config {
    /// HTTP/2 connections per address. A request takes a stream on the least busy one
    /// that has a free stream (below the upstream's `SETTINGS_MAX_CONCURRENT_STREAMS`);
    /// another connection opens when all are busy and fewer than this are open; when
    /// none has a free stream, requests wait in the pool's queue (`pool.queue_size`,
    /// `pool.queue_timeout`). At most `pool.max_connections` are used. Default 1.
    pub connections: usize,
    /// How often a PING checks that the upstream still answers, busy or idle; `0s`
    /// turns PINGs off. Default `10s`.
    pub ping_interval: Dur,
    /// How long a PING may go unanswered before the connection is closed and its
    /// requests fail (the address's other connections are unaffected). Default `5s`.
    pub ping_timeout: Dur,
    /// A connection with no stream in flight for this long closes; `0s` keeps idle
    /// connections open while they answer PINGs. Nothing can race the close: the
    /// connection is taken off the list, so no new stream starts on it, before it
    /// closes. Default `60s`. (`pool.max_requests` and `pool.max_lifetime` apply to
    /// HTTP/2 connections too: one that reaches either takes no new stream, finishes
    /// the ones in flight, then closes.)
    pub idle_timeout: Dur,
}

impl Default for UpstreamHttp2Config {
    fn default() -> Self {
        UpstreamHttp2Config {
            connections: 1,
            ping_interval: Dur::secs(10),
            ping_timeout: Dur::secs(5),
            idle_timeout: Dur::secs(60),
        }
    }
}

impl UpstreamTlsConfig {
    /// Cross-key problems that need no files, as (key below `tls.`, message).
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        match (&self.client_cert, &self.client_key) {
            (Some(_), None) => out.push(("client_key", "client_cert needs client_key".into())),
            (None, Some(_)) => out.push(("client_cert", "client_key needs client_cert".into())),
            _ => {}
        }
        if let Some(name) = &self.server_name
            && rustls::pki_types::ServerName::try_from(name.as_str()).is_err()
        {
            out.push((
                "server_name",
                format!("{name:?} is not a DNS name or IP address"),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::{Config, HttpVersion, Protocol};

    fn config(upstream: &str) -> String {
        format!(
            "[[listener]]\nlisten = \"127.0.0.1:8080\"\n\n[[route]]\nupstream = \"up\"\n\n[upstream.up]\n{upstream}\n"
        )
    }

    /// Every problem, as (key, message).
    fn problems(upstream: &str) -> Vec<(String, String)> {
        match Config::from_toml(&config(upstream), Path::new("t.toml")) {
            Ok(_) => Vec::new(),
            Err(e) => {
                e.0.into_iter()
                    .map(|e| (e.key.unwrap_or_default(), e.message))
                    .collect()
            }
        }
    }

    #[test]
    fn https_h2c_and_the_http_version_combine() {
        for (upstream, tls, version) in [
            (
                "addresses = [\"https://api.test\"]",
                true,
                HttpVersion::Auto,
            ),
            (
                "addresses = [\"https://api.test\"]\nhttp_version = \"1.1\"",
                true,
                HttpVersion::Http1,
            ),
            (
                "addresses = [\"http://127.0.0.1:81\"]",
                false,
                HttpVersion::Http1,
            ),
            (
                "addresses = [\"http://127.0.0.1:81\"]\nhttp_version = \"2\"",
                false,
                HttpVersion::Http2,
            ),
            (
                "addresses = [\"h2c://127.0.0.1:81\"]",
                false,
                HttpVersion::Http2,
            ),
        ] {
            let c = Config::from_toml(&config(upstream), Path::new("t.toml"))
                .unwrap_or_else(|e| panic!("{upstream}: {e}"));
            let up = &c.upstreams["up"];
            assert_eq!(up.uses_tls(), tls, "{upstream}");
            assert_eq!(up.effective_http_version(), version, "{upstream}");
        }
        let c = Config::from_toml(
            &config(
                "addresses = [\"https://10.0.0.1\"]\n[upstream.up.tls]\nserver_name = \"api.test\"\n[upstream.up.http2]\nconnections = 3",
            ),
            Path::new("t.toml"),
        )
        .unwrap();
        let up = &c.upstreams["up"];
        assert_eq!(up.protocol(), Protocol::Http1);
        assert_eq!(
            up.tls.as_ref().unwrap().server_name.as_deref(),
            Some("api.test")
        );
        assert_eq!(up.http2.connections, 3);
    }

    #[test]
    fn tls_settings_that_cannot_work_are_rejected_naming_the_key() {
        for (upstream, key, says) in [
            (
                "addresses = [\"http://127.0.0.1:81\"]\n[upstream.up.tls]\nserver_name = \"a.test\"",
                "upstream.up.tls",
                "https://",
            ),
            (
                "addresses = [\"https://a.test\"]\n[upstream.up.tls]\nclient_cert = \"/c.pem\"",
                "upstream.up.tls.client_key",
                "needs client_key",
            ),
            (
                "addresses = [\"https://a.test\"]\n[upstream.up.tls]\nca_file = \"/nonexistent/ca.pem\"",
                "upstream.up.tls.ca_file",
                "/nonexistent/ca.pem",
            ),
            (
                "addresses = [\"https://a.test\"]\n[upstream.up.tls]\nserver_name = \"not a name\"",
                "upstream.up.tls.server_name",
                "not a DNS name",
            ),
            (
                "addresses = [\"h2c://127.0.0.1:81\"]\nhttp_version = \"1.1\"",
                "upstream.up.http_version",
                "HTTP/2",
            ),
            (
                "addresses = [\"https://a.test\", \"http://b.test\"]",
                "upstream.up.addresses",
                "one protocol",
            ),
            (
                "addresses = [\"h2c://127.0.0.1:81\"]\n[upstream.up.http2]\nconnections = 0",
                "upstream.up.http2.connections",
                "at least 1",
            ),
        ] {
            let found = problems(upstream);
            assert!(
                found.iter().any(|(k, m)| k == key && m.contains(says)),
                "{upstream}: expected {key}: …{says}…, got {found:?}"
            );
        }
    }
}
