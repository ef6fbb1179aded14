//! A test CA made at test time (rcgen) and the certificates it signs, as PEM files in
//! a temp dir, plus rustls clients that trust it.

use std::path::PathBuf;
use std::sync::Arc;

use holdfast_test::TempDir;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::{ClientConfig, RootCertStore};

/// A test CA and what it signs, as PEM files in a temp dir.
pub struct TestCa {
    dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl TestCa {
    /// A self-signed CA with `common_name`, written as `ca.pem`.
    pub fn new(common_name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let dir = holdfast_test::tempdir();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        TestCa { dir, ca }
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Writes a leaf for `names`, signed by the CA, as `stem.pem` and `stem.key`
    /// (replacing what was there).
    pub fn leaf(&self, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        self.sign(stem, CertificateParams::new(names).unwrap())
    }

    /// A certificate for `names` (CN `stem`), optionally expired, as `stem.pem` and
    /// `stem.key`.
    pub fn issue(&self, stem: &str, names: &[&str], expired: bool) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, stem);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        self.sign(stem, params)
    }

    /// Signs `params` with a new key and writes `stem.pem` and `stem.key`.
    fn sign(&self, stem: &str, params: CertificateParams) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (c, k) = self.paths(stem);
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    /// Where [`TestCa::leaf`] and [`TestCa::issue`] write `stem`'s certificate and key.
    pub fn paths(&self, stem: &str) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join(format!("{stem}.pem")),
            self.dir.path().join(format!("{stem}.key")),
        )
    }

    /// A server config with a new leaf for `names` signed by the CA, offering `alpn`.
    pub fn server(&self, names: &[&str], alpn: &[&str]) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.ca)
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let mut c = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
        c.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(c)
    }

    /// A client that trusts the CA, offering `alpn` (TLS 1.3 and 1.2).
    pub fn client(&self, alpn: &[&str]) -> Arc<ClientConfig> {
        self.client_with(alpn, &[&rustls::version::TLS13, &rustls::version::TLS12])
    }

    pub fn client_with(
        &self,
        alpn: &[&str],
        versions: &[&'static rustls::SupportedProtocolVersion],
    ) -> Arc<ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let mut c =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(versions)
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(c)
    }
}
