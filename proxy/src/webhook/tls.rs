//! The webhook's serving certificate: parsed from PEM, swapped in place when
//! it changes, served through rustls with the ring provider.
//!
//! Why a swappable resolver instead of a fixed `ServerConfig`: cert-manager
//! renews the certificate by rewriting the mounted Secret files, and the
//! bootstrap mode re-issues its leaf before expiry. Either way the new
//! certificate must be served without a restart (a restart of every replica
//! at once would be a window where Service creation skips the webhook).
//!
//! Why ring explicitly (never `ServerConfig::builder()`): kube's rustls-tls is
//! built with ring; naming the provider here keeps this code correct even if
//! a second provider is ever compiled into the binary, where rustls's
//! process-default lookup would panic on the ambiguity.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// How often mounted certificate files are re-read.
pub const RELOAD_EVERY: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: no PEM CERTIFICATE block")]
    NoCertificate { what: String },
    #[error("{what}: bad PEM: {source}")]
    Pem {
        what: String,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{what}: key does not load or does not match the certificate: {source}")]
    Key { what: String, source: rustls::Error },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The crypto provider every TLS object in lightpath uses (see module doc).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default provider, for libraries (kube) that
/// call `ClientConfig::builder()`. Harmless if a provider is already set.
pub fn install_default_provider() {
    let _already_set = rustls::crypto::ring::default_provider().install_default();
}

/// Parse a PEM certificate chain (leaf first) and a PEM private key (PKCS#8,
/// PKCS#1 or SEC1), and check that they belong together. `what` names the
/// source in errors (file paths or a Secret).
pub fn certified_key(
    cert_pem: &[u8],
    key_pem: &[u8],
    what: &str,
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: format!("{what} certificate"),
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            what: what.to_string(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|source| TlsError::Pem {
        what: format!("{what} key"),
        source,
    })?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|source| TlsError::Key {
        what: what.to_string(),
        source,
    })
}

/// A certificate resolver whose certificate can be replaced while serving.
#[derive(Debug)]
pub struct SwappableCert {
    current: ArcSwap<CertifiedKey>,
}

impl SwappableCert {
    pub fn new(key: CertifiedKey) -> Arc<SwappableCert> {
        Arc::new(SwappableCert {
            current: ArcSwap::from_pointee(key),
        })
    }

    /// New handshakes use `key` from now on; established connections keep
    /// the certificate they negotiated.
    pub fn replace(&self, key: CertifiedKey) {
        self.current.store(Arc::new(key));
    }
}

impl ResolvesServerCert for SwappableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// A rustls server configuration over `certs`, offering HTTP/2 and HTTP/1.1
/// (the API server uses either).
pub fn server_config(certs: Arc<SwappableCert>) -> Result<rustls::ServerConfig, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A certificate and key pair on disk (a mounted `kubernetes.io/tls` Secret).
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    /// Read both files; returns their bytes so callers can tell a change.
    pub fn read(&self) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
        Ok((read(&self.cert)?, read(&self.key)?))
    }

    pub fn load(&self) -> Result<CertifiedKey, TlsError> {
        let (cert, key) = self.read()?;
        certified_key(&cert, &key, &self.describe())
    }

    fn describe(&self) -> String {
        format!("{} + {}", self.cert.display(), self.key.display())
    }

    /// Re-read the files every `every` ([`RELOAD_EVERY`] in production) and
    /// swap in a changed pair. A pair that fails to parse (caught
    /// mid-rewrite, or broken) is logged and the last good certificate keeps
    /// serving.
    pub async fn watch(self, certs: Arc<SwappableCert>, every: Duration) {
        let mut last = self.read().ok();
        let mut tick = tokio::time::interval(every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = match self.read() {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook certificate reload failed; keeping the current one");
                    continue;
                }
            };
            if last.as_ref() == Some(&now) {
                continue;
            }
            match certified_key(&now.0, &now.1, &self.describe()) {
                Ok(key) => {
                    certs.replace(key);
                    tracing::info!(files = %self.describe(), "webhook certificate reloaded");
                    last = Some(now);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "webhook certificate reload failed; keeping the current one");
                }
            }
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}
