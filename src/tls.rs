//! The one rustls crypto provider of the binary: *ring*.
//!
//! rustls picks a process-wide default provider when a configuration is built without one, and
//! refuses to guess when two are compiled in. The build keeps aws-lc-rs out (lapin without its
//! `rustls` feature, hyper-rustls with `ring`), so ring is the only provider in `Cargo.lock`;
//! [`provider`] installs it as the process default once, before anything builds a TLS
//! configuration, so every TLS client (HTTP sink, `amqps://`) and the webhook listener's TLS
//! (`crate::server::tls`) use the same one. Build configurations with
//! `builder_with_provider(provider())` rather than relying on the default.

use rustls::crypto::CryptoProvider;
use std::sync::{Arc, OnceLock};

/// The process-wide crypto provider, installed as rustls's default on first use.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            // Installing fails only if a default is already there (another thread, or a
            // library that installed its own first): then that one is the process's.
            let _ = rustls::crypto::ring::default_provider().install_default();
            CryptoProvider::get_default().cloned().unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
        })
        .clone()
}

/// The CA certificates of `path` as PEM text (what lapin and the Redis client take), checked to hold at least one
/// certificate that parses.
pub fn read_ca_file(path: &std::path::Path) -> Result<String, CaFileError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let text = std::fs::read_to_string(path).map_err(|source| CaFileError::Read { path: path.to_owned(), source })?;
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CaFileError::NotPem { path: path.to_owned(), source })?;
    if certs.is_empty() {
        return Err(CaFileError::NoCertificate(path.to_owned()));
    }
    Ok(text)
}

/// Why a CA file (`tls_ca_file`, `delivery.dedup_store_ca_file`) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: std::path::PathBuf, source: std::io::Error },
    #[error("{}: not a PEM certificate file: {source}", path.display())]
    NotPem { path: std::path::PathBuf, source: rustls::pki_types::pem::Error },
    #[error("{}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file", .0.display())]
    NoCertificate(std::path::PathBuf),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_provider_is_ring_and_is_the_process_default() {
        let p = provider();
        let ring = rustls::crypto::ring::default_provider();
        let suites = |p: &CryptoProvider| p.cipher_suites.iter().map(|s| s.suite()).collect::<Vec<_>>();
        assert_eq!(suites(&p), suites(&ring));
        let default = CryptoProvider::get_default().expect("installed");
        assert!(Arc::ptr_eq(&p, default) || suites(default) == suites(&ring));
    }
}
