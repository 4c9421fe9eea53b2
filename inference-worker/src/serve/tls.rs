//! TLS (rustls, ring) from PEM files that a mounted Kubernetes Secret keeps current: a
//! server certificate and key, or the CA a client trusts. Files are re-read when they change
//! ([`Reloading`], checked on use), so a renewed certificate applies to the next connection
//! without a restart; a change that does not load keeps the last good one.

use crate::error::{Error, Result};
use crate::serve::reload::Reloading;
use rustls::client::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ServerConfig};
use rustls::sign::CertifiedKey;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(what: impl Into<String>) -> Error {
    Error::Tls(what.into())
}

fn load_certified_key(paths: &[PathBuf]) -> Result<CertifiedKey> {
    let (cert, key) = (&paths[0], &paths[1]);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls_err(format!("{}: {e}", cert.display())))?
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| tls_err(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(tls_err(format!("{}: no certificate", cert.display())));
    }
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| tls_err(format!("{}: {e}", key.display())))?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| tls_err(format!("{}: {e}", key.display())))?;
    let ck = CertifiedKey::new(certs, signing);
    ck.keys_match()
        .map_err(|e| tls_err(format!("{} and {}: {e}", cert.display(), key.display())))?;
    Ok(ck)
}

/// The server's certificate, re-read when its files change.
struct ServerCert(Reloading<CertifiedKey>);

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ServerCert").field(&self.0.paths).finish()
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.get())
    }
}

/// A server configuration (HTTP/2 and HTTP/1.1 by ALPN) serving `cert` (PEM chain) with
/// `key` (PEM), both re-read when they change. Fails now if they do not load.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let resolver = ServerCert(Reloading::open(
        "TLS certificate and key",
        vec![cert.to_path_buf(), key.to_path_buf()],
        load_certified_key,
    )?);
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Which protocol a client offers by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    H2,
    Http11,
}

fn load_roots(paths: &[PathBuf]) -> Result<rustls::RootCertStore> {
    let ca = &paths[0];
    let mut roots = rustls::RootCertStore::empty();
    for cert in
        CertificateDer::pem_file_iter(ca).map_err(|e| tls_err(format!("{}: {e}", ca.display())))?
    {
        let cert = cert.map_err(|e| tls_err(format!("{}: {e}", ca.display())))?;
        roots
            .add(cert)
            .map_err(|e| tls_err(format!("{}: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(tls_err(format!("{}: no CA certificate", ca.display())));
    }
    Ok(roots)
}

/// Client configurations trusting the CAs of a PEM file, rebuilt when it changes.
pub struct TrustedCa {
    roots: Reloading<rustls::RootCertStore>,
    alpn: Alpn,
    built: Mutex<Option<(Arc<rustls::RootCertStore>, Arc<ClientConfig>)>>,
}

impl std::fmt::Debug for TrustedCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustedCa")
            .field("files", &self.roots.paths)
            .field("alpn", &self.alpn)
            .finish()
    }
}

impl TrustedCa {
    /// Fails now if `ca` holds no usable certificate.
    pub fn open(ca: &Path, alpn: Alpn) -> Result<Arc<Self>> {
        Ok(Arc::new(Self {
            roots: Reloading::open("trusted CA", vec![ca.to_path_buf()], load_roots)?,
            alpn,
            built: Mutex::new(None),
        }))
    }

    /// The configuration for a new connection (the same `Arc` until the CA file changes).
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let roots = self.roots.get();
        let mut built = self.built.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((r, cfg)) = built.as_ref()
            && Arc::ptr_eq(r, &roots)
        {
            return cfg.clone();
        }
        let mut cfg = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        cfg.alpn_protocols = match self.alpn {
            Alpn::H2 => vec![b"h2".to_vec()],
            Alpn::Http11 => vec![b"http/1.1".to_vec()],
        };
        let cfg = Arc::new(cfg);
        *built = Some((roots, cfg.clone()));
        cfg
    }
}
