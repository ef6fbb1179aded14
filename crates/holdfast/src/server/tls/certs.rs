//! The certificates of one TLS listener, read from PEM files, and the SNI lookup.
//!
//! An exact name wins over a wildcard (`*.example.com`, one label), and a client whose
//! name matches nothing, or who sends none, gets the default certificate
//! (`[listener.tls] cert`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, DnsName, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::config::TlsConfig;

/// Certificates by SNI name, and the default.
#[derive(Debug)]
pub struct CertStore {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by what follows `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    count: usize,
}

impl CertStore {
    /// Reads every certificate and key of `config`.
    ///
    /// # Errors
    /// Every problem, as (key below `tls.`, message) pairs: a file that cannot be read,
    /// holds no certificate or key, a key that does not belong to its certificate, a
    /// bad or repeated name.
    pub fn load(config: &TlsConfig) -> Result<CertStore, Vec<(String, String)>> {
        let provider = rustls::crypto::ring::default_provider();
        let mut problems = Vec::new();
        let default = load_pair(&config.cert, &config.key, &provider)
            .map_err(|(k, m)| problems.push((k.to_owned(), m)))
            .ok();
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for (i, c) in config.certificates.iter().enumerate() {
            let at = |k: &str| format!("certificates[{i}].{k}");
            let (key, names) = match load_pair(&c.cert, &c.key, &provider) {
                Ok(pair) => pair,
                Err((k, m)) => {
                    problems.push((at(k), m));
                    continue;
                }
            };
            let covers = names.iter().map(|n| normalize(n)).collect::<Vec<_>>();
            let names = if c.names.is_empty() {
                if names.is_empty() {
                    problems.push((
                        at("names"),
                        format!(
                            "{} names no DNS name (subject alternative names); list the names it serves",
                            c.cert.display()
                        ),
                    ));
                }
                names
            } else {
                c.names.clone()
            };
            for name in names {
                let name = normalize(&name);
                let (table, bare) = match name.strip_prefix("*.") {
                    Some(rest) => (&mut wildcard, rest.to_owned()),
                    None => (&mut exact, name.clone()),
                };
                if DnsName::try_from(bare.as_str()).is_err() || bare.contains('*') {
                    problems.push((
                        at("names"),
                        format!("{name:?} is not a host name or `*.` followed by one"),
                    ));
                } else if !covered(&covers, &name) {
                    problems.push((
                        at("names"),
                        format!(
                            "{} is not valid for {name:?}, so clients would refuse it (its names: {})",
                            c.cert.display(),
                            if covers.is_empty() { "none".to_owned() } else { covers.join(", ") }
                        ),
                    ));
                } else if table.insert(bare, key.clone()).is_some() {
                    problems.push((
                        at("names"),
                        format!("{name:?} is named by another certificate too"),
                    ));
                }
            }
        }
        match default {
            Some((default, _)) if problems.is_empty() => Ok(CertStore {
                default,
                exact,
                wildcard,
                count: 1 + config.certificates.len(),
            }),
            _ => Err(problems),
        }
    }

    /// The certificate for a client that sent SNI `name` (or none).
    pub fn pick(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name.map(normalize) else {
            return self.default.clone();
        };
        if let Some(k) = self.exact.get(&name) {
            return k.clone();
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
            .clone()
    }

    /// Certificates held, the default included.
    pub fn count(&self) -> usize {
        self.count
    }
}

/// Whether a certificate with the DNS names `covers` (normalized) is valid for
/// `name` (normalized; `*.` and one label for a wildcard entry), as a client checks it:
/// the name itself, or a wildcard for its parent (RFC 6125 6.4.3, one label).
fn covered(covers: &[String], name: &str) -> bool {
    covers.iter().any(|c| c == name)
        || (!name.starts_with("*.")
            && name.split_once('.').is_some_and(|(_, parent)| {
                covers.iter().any(|c| c.strip_prefix("*.") == Some(parent))
            }))
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

type Loaded = (Arc<CertifiedKey>, Vec<String>);

/// A certificate chain and its key, and the DNS names the leaf carries.
fn load_pair(
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<Loaded, (&'static str, String)> {
    let read = |p: &Path, what| {
        std::fs::read(p).map_err(|e| (what, format!("cannot read {}: {e}", p.display())))
    };
    let pem = read(cert, "cert")?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ("cert", format!("{}: {e}", cert.display())))?;
    let Some(leaf) = chain.first() else {
        return Err((
            "cert",
            format!("{} holds no PEM CERTIFICATE", cert.display()),
        ));
    };
    let names = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| {
            (
                "cert",
                format!("{}: not a usable certificate: {e}", cert.display()),
            )
        })?
        .valid_dns_names()
        .map(str::to_owned)
        .collect();
    let pem = read(key, "key")?;
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        (
            "key",
            format!("{}: no usable PEM private key: {e}", key.display()),
        )
    })?;
    let certified = CertifiedKey::from_der(chain, der, provider).map_err(|e| {
        (
            "key",
            format!(
                "{} cannot be used with {}: {e}",
                key.display(),
                cert.display()
            ),
        )
    })?;
    Ok((Arc::new(certified), names))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::TlsCertificate;

    /// A self-signed certificate for `names`, written as `stem.pem` and `stem.key`.
    fn write_cert(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let c = rcgen::generate_simple_self_signed(names).unwrap();
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    fn leaf(k: &CertifiedKey) -> &[u8] {
        k.cert[0].as_ref()
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_default() {
        let dir = holdfast_test::tempdir();
        let (dc, dk) = write_cert(dir.path(), "default", &["default.test"]);
        let (ac, ak) = write_cert(dir.path(), "a", &["a.test"]);
        let (wc, wk) = write_cert(dir.path(), "w", &["*.w.test"]);
        let (xc, xk) = write_cert(dir.path(), "x", &["ignored.test", "exact.w.test"]);
        let mut config = TlsConfig::new(dc, dk);
        config.certificates = vec![
            TlsCertificate {
                cert: ac,
                key: ak,
                names: vec![],
            },
            TlsCertificate {
                cert: wc,
                key: wk,
                names: vec![],
            },
            TlsCertificate {
                cert: xc,
                key: xk,
                names: vec!["exact.w.test".into()],
            },
        ];
        let store = CertStore::load(&config).unwrap();
        assert_eq!(store.count(), 4);
        let default = store.pick(None);
        let a = store.pick(Some("A.test."));
        let w = store.pick(Some("one.w.test"));
        let x = store.pick(Some("exact.w.test"));
        assert_ne!(leaf(&a), leaf(&default));
        assert_ne!(leaf(&w), leaf(&default));
        assert_ne!(leaf(&x), leaf(&w), "an exact name wins over a wildcard");
        for other in ["w.test", "two.one.w.test", "ignored.test", "nope.test"] {
            assert_eq!(leaf(&store.pick(Some(other))), leaf(&default), "{other}");
        }
    }

    #[test]
    fn every_bad_file_is_named_with_its_key() {
        let dir = holdfast_test::tempdir();
        let (dc, _) = write_cert(dir.path(), "default", &["default.test"]);
        let (_, other_key) = write_cert(dir.path(), "other", &["other.test"]);
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not pem\n").unwrap();
        let mut config = TlsConfig::new(dc.clone(), other_key);
        config.certificates = vec![
            TlsCertificate {
                cert: garbage,
                key: dc.clone(),
                names: vec![],
            },
            TlsCertificate {
                cert: dc.clone(),
                key: dir.path().join("missing.key"),
                names: vec![],
            },
        ];
        let problems = CertStore::load(&config).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            keys,
            ["key", "certificates[0].cert", "certificates[1].key"],
            "{problems:?}"
        );
        assert!(
            problems[0].1.contains("cannot be used with"),
            "{problems:?}"
        );
        assert!(problems[1].1.contains("no PEM CERTIFICATE"), "{problems:?}");
        assert!(problems[2].1.contains("missing.key"), "{problems:?}");
    }

    #[test]
    fn names_must_be_host_names_and_unique() {
        let dir = holdfast_test::tempdir();
        let (c, k) = write_cert(dir.path(), "a", &["a.test"]);
        let mut config = TlsConfig::new(c.clone(), k.clone());
        let entry = |names: &[&str]| TlsCertificate {
            cert: c.clone(),
            key: k.clone(),
            names: names.iter().map(|s| (*s).to_owned()).collect(),
        };
        config.certificates = vec![entry(&["a.test", "*.*.test"]), entry(&["A.TEST"])];
        let problems = CertStore::load(&config).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].1.contains("not a host name"), "{problems:?}");
        assert_eq!(problems[1].0, "certificates[1].names");
        assert!(
            problems[1].1.contains("another certificate"),
            "{problems:?}"
        );
    }
}
