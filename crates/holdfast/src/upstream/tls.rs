//! TLS to `https://` upstreams: one rustls client config per upstream, and the
//! handshake on a new connection.
//!
//! rustls with the ring provider (as the TLS front), TLS 1.3 and 1.2. Roots come from
//! `tls.ca_file` or, by default, the system's trust store (read once per process).
//! The client config is shared by every address of the upstream, so its session cache
//! resumes TLS sessions across connections and addresses (RFC 8446 2.2). ALPN offers
//! what `http_version` allows. A handshake failure is never sent anything: it is
//! `Delivery::NotSent`, and a certificate problem says which one (expired, wrong name,
//! unknown issuer) in the 502's `Proxy-Status`.
//!
//! Not here: choosing HTTP/1.1 or HTTP/2 from the ALPN result (`peer.rs`).

use std::hash::{Hash, Hasher};
use std::io;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::error::{Delivery, Kind, UpstreamError};
use crate::config::{HttpVersion, UpstreamTlsConfig};

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// The TLS side of one upstream: its client config (with the session cache) and the
/// name override.
pub struct TlsClient {
    connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

/// What a finished handshake says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handshake {
    /// The upstream picked `h2` by ALPN.
    pub h2: bool,
    /// An earlier session was resumed (no certificate exchange).
    pub resumed: bool,
}

impl TlsClient {
    /// Builds the client config of an upstream, reading its files.
    ///
    /// # Errors
    /// A file cannot be read or holds nothing usable, or the client certificate and
    /// key do not match; the message names the key and the file.
    pub fn new(tls: &UpstreamTlsConfig, version: HttpVersion) -> Result<TlsClient, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = match &tls.ca_file {
            Some(path) => Arc::new(read_roots(path).map_err(|(k, m)| format!("tls.{k}: {m}"))?),
            None => system_roots(),
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("TLS setup: {e}"))?
            .with_root_certificates(roots);
        let mut config = match (&tls.client_cert, &tls.client_key) {
            (Some(cert), Some(key)) => {
                let (chain, key) =
                    read_identity(cert, key).map_err(|(k, m)| format!("tls.{k}: {m}"))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("tls.client_key: {}: {e}", key_path(tls)))?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = match version {
            HttpVersion::Auto => vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()],
            HttpVersion::Http1 => vec![ALPN_HTTP1.to_vec()],
            HttpVersion::Http2 => vec![ALPN_H2.to_vec()],
        };
        // No early data: a request in 0-RTT could be replayed by an attacker.
        config.enable_early_data = false;
        let server_name =
            match &tls.server_name {
                Some(n) => Some(ServerName::try_from(n.clone()).map_err(|_| {
                    format!("tls.server_name: {n:?} is not a DNS name or IP address")
                })?),
                None => None,
            };
        Ok(TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The name to verify (and send as SNI) for an address whose config host is `host`.
    ///
    /// # Errors
    /// `host` is neither a DNS name nor an IP address (a unix socket path).
    pub fn server_name(&self, host: &str) -> Result<ServerName<'static>, UpstreamError> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        ServerName::try_from(host.to_owned()).map_err(|_| {
            UpstreamError::new(Kind::TlsHandshake, Delivery::NotSent).with_cause(format!(
                "{host:?} is no name to verify a certificate for; set tls.server_name"
            ))
        })
    }

    /// Runs the handshake on a connected socket.
    ///
    /// # Errors
    /// The handshake failed: [`Kind::TlsCertificate`] when the upstream's certificate
    /// was rejected, [`Kind::TlsHandshake`] otherwise; never sent.
    pub async fn connect<IO>(
        &self,
        name: ServerName<'static>,
        io: IO,
    ) -> Result<(TlsStream<IO>, Handshake), UpstreamError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let tls = self
            .connector
            .connect(name, io)
            .await
            .map_err(handshake_error)?;
        let conn = tls.get_ref().1;
        let done = Handshake {
            h2: conn.alpn_protocol() == Some(ALPN_H2),
            resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        };
        Ok((tls, done))
    }
}

/// Reads the files of `tls` as [`TlsClient::new`] would.
///
/// # Errors
/// The first problem, as (key below `tls.`, message).
pub fn check(tls: &UpstreamTlsConfig) -> Result<(), (&'static str, String)> {
    if let Some(ca) = &tls.ca_file {
        read_roots(ca)?;
    }
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        let (chain, key) = read_identity(cert, key)?;
        rustls::sign::CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
            .map_err(|e| ("client_key", format!("{}: {e}", key_path(tls))))?;
    }
    Ok(())
}

/// A digest of the files `tls` names, so a reload that keeps the paths but not the
/// contents (a renewed client certificate) builds a new upstream.
pub fn fingerprint(tls: Option<&UpstreamTlsConfig>) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    if let Some(tls) = tls {
        for path in [&tls.ca_file, &tls.client_cert, &tls.client_key]
            .into_iter()
            .flatten()
        {
            std::fs::read(path).ok().hash(&mut h);
        }
    }
    h.finish()
}

fn key_path(tls: &UpstreamTlsConfig) -> String {
    tls.client_key
        .as_deref()
        .map_or_else(String::new, |p| p.display().to_string())
}

fn read_roots(path: &Path) -> Result<RootCertStore, (&'static str, String)> {
    let bad = |m: String| ("ca_file", format!("{}: {m}", path.display()));
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots.add(c).map_err(|e| bad(e.to_string()))?;
    }
    Ok(roots)
}

type Identity = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn read_identity(cert: &Path, key: &Path) -> Result<Identity, (&'static str, String)> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ("client_cert", format!("{}: {e}", cert.display())))?;
    if chain.is_empty() {
        return Err((
            "client_cert",
            format!("{}: no PEM certificate in it", cert.display()),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ("client_key", format!("{}: {e}", key.display())))?;
    Ok((chain, key))
}

/// The system's trust store, read once per process. Certificates it cannot parse are
/// skipped (the store often holds a few); an empty store is logged, and every
/// handshake then fails naming the unknown issuer.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!(errors = ?found.errors, "no system CA certificates found; https:// upstreams need tls.ca_file");
            }
            Arc::new(roots)
        })
        .clone()
}

/// Classifies a failed handshake. rustls errors come wrapped in `io::Error`.
fn handshake_error(e: io::Error) -> UpstreamError {
    let kind = match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(_)) => Kind::TlsCertificate,
        _ => Kind::TlsHandshake,
    };
    let cause: Box<dyn std::error::Error + Send + Sync> = match e.get_ref() {
        Some(_) => e
            .into_inner()
            .unwrap_or_else(|| "TLS handshake failed".into()),
        None => format!("during the TLS handshake: {e}").into(),
    };
    UpstreamError::new(kind, Delivery::NotSent).with_cause(cause)
}
