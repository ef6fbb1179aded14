//! TLS termination for client connections.
//!
//! rustls with the ring provider; TLS 1.3 and 1.2 only; ALPN offers `h2`, then
//! `http/1.1`, then `http/1.0` (an HTTP/1.0 client may offer that alone, and rustls
//! refuses a handshake whose offer names nothing of the list); session tickets (a rotating ticketer) and a server-side session cache
//! for resumption; no 0-RTT (early data could be replayed). Certificates are chosen by
//! SNI ([`certs::CertStore`]) through a resolver that reads an `ArcSwap`, so
//! [`TlsFront::install`] swaps in freshly read files for new handshakes while every open
//! connection keeps the session it has.
//!
//! Not here: what runs over the TLS stream (`server::conn`), client certificates.

pub mod certs;

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

pub use self::certs::CertStore;
use crate::config::TlsConfig;

/// ALPN names in the order the server prefers them.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
pub const ALPN_HTTP10: &[u8] = b"http/1.0";

/// Sessions remembered for resumption by clients that do not take tickets.
const SESSION_CACHE: usize = 4096;

/// One TLS listener's server side: the rustls config, built once, and the
/// certificates, swapped on reload.
pub struct TlsFront {
    acceptor: TlsAcceptor,
    resolver: Arc<Resolver>,
}

/// Answers each handshake from the certificates in force at that moment.
#[derive(Debug)]
struct Resolver(ArcSwap<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().pick(hello.server_name()))
    }
}

impl TlsFront {
    /// Reads the certificates and builds the server config.
    ///
    /// # Errors
    /// A certificate or key cannot be read or used; the message names the file.
    pub fn new(config: &TlsConfig) -> Result<TlsFront, String> {
        let store = CertStore::load(config).map_err(join)?;
        let resolver = Arc::new(Resolver(ArcSwap::from_pointee(store)));
        let mut server =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(|e| format!("TLS setup: {e}"))?
                .with_no_client_auth()
                .with_cert_resolver(resolver.clone());
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_HTTP10.to_vec()];
        server.ticketer =
            rustls::crypto::ring::Ticketer::new().map_err(|e| format!("TLS tickets: {e}"))?;
        server.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE);
        Ok(TlsFront {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            resolver,
        })
    }

    /// Runs the handshake on an accepted connection.
    ///
    /// # Errors
    /// The handshake failed (the client offered nothing we accept, went away, or sent
    /// something that is not TLS); rustls has sent an alert where it could.
    pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
    ) -> std::io::Result<TlsStream<S>> {
        self.acceptor.accept(stream).await
    }

    /// Reads the certificate files again (SIGHUP), for [`TlsFront::install`] once
    /// the whole reload is sure to apply.
    ///
    /// # Errors
    /// As [`TlsFront::new`]; the message says which file.
    pub fn load(config: &TlsConfig) -> Result<CertStore, String> {
        CertStore::load(config).map_err(join)
    }

    /// Uses `store` for new handshakes; open connections keep theirs. Returns how many
    /// certificates it holds.
    pub fn install(&self, store: CertStore) -> usize {
        let n = store.count();
        self.resolver.0.store(Arc::new(store));
        n
    }
}

/// Problems with a `[listener.tls]` table's files, as (key below `tls.`, message)
/// pairs, for config validation.
pub fn check(config: &TlsConfig) -> Vec<(String, String)> {
    CertStore::load(config).err().unwrap_or_default()
}

fn join(problems: Vec<(String, String)>) -> String {
    problems
        .into_iter()
        .map(|(k, m)| format!("tls.{k}: {m}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Whether ALPN settled on HTTP/2.
pub fn negotiated_h2<S>(stream: &TlsStream<S>) -> bool {
    stream.get_ref().1.alpn_protocol() == Some(ALPN_H2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modern_defaults_alpn_tickets_and_a_session_cache() {
        let dir = holdfast_test::tempdir();
        let c = rcgen::generate_simple_self_signed(vec!["a.test".to_owned()]).unwrap();
        let (cert, key) = (dir.path().join("a.pem"), dir.path().join("a.key"));
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        let front = TlsFront::new(&TlsConfig::new(cert, key)).unwrap();
        let server = front.acceptor.config();
        assert_eq!(
            server.alpn_protocols,
            [ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_HTTP10.to_vec()]
        );
        assert!(server.ticketer.enabled(), "session tickets");
        assert!(server.session_storage.can_cache(), "a session cache");
        assert_eq!(server.max_early_data_size, 0, "no 0-RTT");
    }
}
