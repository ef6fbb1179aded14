//! The parts of a `[[listener]]` beyond its socket: `[listener.tls]` (certificates,
//! chosen by SNI) and `[listener.http2]` (HTTP/2 limits).
//!
//! Only the schema and its defaults live here; `server::tls` loads the files and
//! `server::conn` applies the limits.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::ByteSize;

/// `[listener.tls]`: terminate TLS (1.2 and 1.3) on this listener, offering HTTP/2 and
/// HTTP/1.1 (and HTTP/1.0) by ALPN. Files are read at start and again on every reload (SIGHUP); a
/// file that cannot be used then keeps the certificates in force.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first: the certificate for clients whose SNI name
    /// matches no entry of `certificates` (or who send none). Paths are used as written
    /// (relative ones from holdfast's working directory).
    pub cert: PathBuf,
    /// PEM private key of `cert` (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// `[[listener.tls.certificates]]`: more certificates, chosen by the SNI name the
    /// client sends. Default: none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<TlsCertificate>,
}

/// One `[[listener.tls.certificates]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCertificate {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// SNI names this certificate answers: `shop.example.com`, or `*.example.com` for
    /// one label below it (an exact name wins over a wildcard); each must be a name the
    /// certificate is valid for. Default: the DNS names in the certificate's subject
    /// alternative names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

impl TlsConfig {
    /// One certificate and key, for `holdfast proxy --tls-cert --tls-key` and tests.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        TlsConfig {
            cert: cert.into(),
            key: key.into(),
            certificates: Vec::new(),
        }
    }
}

/// `[listener.http2]`: limits for HTTP/2 client connections (TLS with ALPN `h2`, or
/// `h2c = true` on a plain listener).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http2Config {
    /// Requests (streams) one connection may have open at once
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`). Default 128.
    pub max_concurrent_streams: u32,
    /// Largest request header list as HTTP/2 counts it: names plus values plus 32
    /// bytes per field (`SETTINGS_MAX_HEADER_LIST_SIZE`). Default `16KiB`.
    pub max_header_list_size: ByteSize,
    /// Flow-control window of each request: body bytes a client may send ahead of
    /// holdfast reading them. At most 2^31-1. Default `1MiB`.
    pub initial_stream_window: ByteSize,
    /// Flow-control window of the whole connection. At most 2^31-1. Default `4MiB`.
    /// The window announced is at least `max_concurrent_streams` times
    /// `initial_stream_window` (see [`Http2Config::connection_window`]).
    pub initial_connection_window: ByteSize,
    /// Rapid reset (CVE-2023-44487): streams a client opened and cancelled before
    /// holdfast took them up. One more than this and the connection gets
    /// `GOAWAY ENHANCE_YOUR_CALM` and is closed. Default 20.
    pub max_pending_accept_reset_streams: usize,
    /// Streams holdfast had to reset because the client broke the protocol on them.
    /// More than this and the connection gets `GOAWAY ENHANCE_YOUR_CALM` and is
    /// closed. Default 1024.
    pub max_local_error_reset_streams: usize,
}

impl Default for Http2Config {
    fn default() -> Self {
        Http2Config {
            max_concurrent_streams: 128,
            max_header_list_size: ByteSize::kib(16),
            initial_stream_window: ByteSize::mib(1),
            initial_connection_window: ByteSize::mib(4),
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 1024,
        }
    }
}

/// The largest HTTP/2 flow-control window (RFC 9113 6.9.1).
pub const MAX_WINDOW: u64 = (1 << 31) - 1;

impl Http2Config {
    /// The connection's window holdfast announces: `initial_connection_window`, and
    /// at least what every stream's window adds up to (at most 2^31-1). A stream's
    /// body may wait unread (its request queued for an upstream connection, or an
    /// upstream reading slowly) with its window's worth sent; counted against a
    /// smaller connection window, a few such streams left none to the others, and
    /// one whose upload an upstream connection waited for then stalled behind the
    /// very requests waiting for that connection. What a connection holds stays
    /// bounded by its streams' windows.
    pub fn connection_window(&self) -> u32 {
        let streams =
            u64::from(self.max_concurrent_streams).saturating_mul(self.initial_stream_window.get());
        let w = self
            .initial_connection_window
            .get()
            .max(streams)
            .min(MAX_WINDOW);
        u32::try_from(w).unwrap_or(u32::MAX >> 1)
    }

    /// (key below `http2.`, problem) pairs.
    pub(super) fn problems(&self) -> Vec<(&'static str, String)> {
        let mut bad = Vec::new();
        for (key, v) in [
            ("initial_stream_window", self.initial_stream_window.get()),
            (
                "initial_connection_window",
                self.initial_connection_window.get(),
            ),
        ] {
            if !(65_535..=MAX_WINDOW).contains(&v) {
                bad.push((key, format!("{v} is outside 65535..=2147483647 bytes")));
            }
        }
        if self.max_concurrent_streams == 0 {
            bad.push(("max_concurrent_streams", "must be at least 1".into()));
        }
        let h = self.max_header_list_size.get();
        // 4GiB, as README allows, is one more than HTTP/2's SETTINGS field holds; it is
        // sent as the most that field holds (`server::conn`), as good as no limit.
        if !(1024..=4 << 30).contains(&h) {
            bad.push((
                "max_header_list_size",
                "must be between 1KiB and 4GiB".into(),
            ));
        }
        bad
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_window_holds_every_streams_window() {
        let mut h = Http2Config::default();
        assert_eq!(h.connection_window(), 128 << 20);
        h.initial_connection_window = ByteSize::mib(512);
        assert_eq!(h.connection_window(), 512 << 20);
        h.max_concurrent_streams = 10_000;
        assert_eq!(u64::from(h.connection_window()), MAX_WINDOW);
    }
}
